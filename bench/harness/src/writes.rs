//! Writes: append latency and throughput at 1, 8 and 64 concurrent writers (threadgate direct
//! and buffered, the reference crate, raw JetStream publish + ack), and how append and fold
//! costs grow with thread length and state size.

use crate::ctx::Ctx;
use crate::gw::{Client, Gateway, Mode, delta, message};
use crate::load::{Stats, closed_loop, count, ms, msf};
use crate::reference::{Reference, changeset};
use crate::results::{Plot, Section, Series, Table};
use crate::support::PgSchema;
use anyhow::{Result, ensure};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most messages per delta when loading a long thread (the gateway's default limit).
const LOAD_CHUNK: usize = 1_000;

/// A load-test delta: one ~100-character message without an id (ids are unique per
/// thread, and the same thread is written by several series).
fn anonymous_delta() -> Value {
    let mut d = delta("load", 0, "AssistantTurnCommitted");
    d["messages"][0].as_object_mut().unwrap().remove("id");
    d
}

/// Append latency and throughput by concurrent writers, each writer on its own thread.
pub async fn appends(ctx: &Ctx) -> Result<Section> {
    let writer_counts: Vec<usize> = ctx.pick(vec![1, 8, 64], vec![1, 8]);
    let max = *writer_counts.iter().max().unwrap();
    let raw_subjects = format!("{}.raw", ctx.prefix);
    ctx.js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: format!("{}_raw", ctx.prefix),
            subjects: vec![format!("{raw_subjects}.>")],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("raw stream: {e}"))?;
    let body = anonymous_delta();
    let bytes = bytes::Bytes::from(serde_json::to_vec(&body)?);
    // What the gateway publishes for a delta: its own envelope around the same JSON.
    let raw_payload =
        bytes::Bytes::from(serde_json::to_vec(&json!({"kind": "delta", "body": body}))?);
    let cs = Arc::new(changeset(&body)?);

    let buffered = Gateway::start(ctx, Mode::Buffered, true, &ctx.unique("w"), &[]).await?;
    let direct = Gateway::start(ctx, Mode::Direct, true, "", &[]).await?;
    let reference = Arc::new(Reference::new(ctx).await?);
    for w in 0..max {
        buffered.client.create(&format!("w{w}"), None).await?;
        direct.client.create(&format!("w{w}"), None).await?;
        reference.create(&format!("w{w}")).await?;
    }

    let names = [
        "raw JetStream publish + ack",
        "reference NatsBufferedThreadWriter",
        "threadgate buffered (PostgreSQL)",
        "threadgate direct (PostgreSQL)",
    ];
    let mut stats: Vec<Vec<(usize, Stats)>> = vec![Vec::new(); names.len()];
    for &n in &writer_counts {
        eprintln!("[bench]   {n} writer(s)");
        let js = ctx.js.clone();
        let (subj, p) = (raw_subjects.clone(), raw_payload.clone());
        let raw = closed_loop(n, ctx.warmup(), ctx.window(), move |w, _| {
            let (js, subj, p) = (js.clone(), format!("{subj}.{w}"), p.clone());
            async move {
                js.publish(subj, p).await?.await?;
                Ok(())
            }
        })
        .await?;
        let (r, d) = (reference.clone(), cs.clone());
        let refs = closed_loop(n, ctx.warmup(), ctx.window(), move |w, _| {
            let (r, d) = (r.clone(), d.clone());
            async move { r.append(&format!("w{w}"), &d).await }
        })
        .await?;
        let buf = http_appends(&buffered.client, n, ctx, &bytes).await?;
        let dir = http_appends(&direct.client, n, ctx, &bytes).await?;
        for (i, s) in [raw, refs, buf, dir].into_iter().enumerate() {
            stats[i].push((n, s));
        }
    }
    buffered.stop().await;
    direct.stop().await;
    if let Ok(r) = Arc::try_unwrap(reference) {
        r.drop().await;
    }

    let mut table = Table {
        columns: [
            "writers",
            "system",
            "appends",
            "appends/s",
            "p50",
            "p99",
            "p50 ÷ raw p50",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for (k, &n) in writer_counts.iter().enumerate() {
        let raw_p50 = stats[0][k].1.p50;
        for (i, name) in names.iter().enumerate() {
            let s = &stats[i][k].1;
            table.rows.push(vec![
                n.to_string(),
                name.to_string(),
                count(s.n as f64),
                count(s.rate),
                ms(s.p50),
                ms(s.p99),
                format!("{:.2}×", s.p50.as_secs_f64() / raw_p50.as_secs_f64()),
            ]);
        }
    }
    let series = |f: &dyn Fn(&Stats) -> f64| -> Vec<Series> {
        names
            .iter()
            .zip(&stats)
            .map(|(name, s)| Series {
                name: name.to_string(),
                points: s.iter().map(|(n, st)| (*n as f64, f(st))).collect(),
            })
            .collect()
    };
    Ok(Section {
        id: "writes".into(),
        title: "Appends: latency and throughput by concurrent writers".into(),
        notes: vec![
            format!(
                "Closed loop: each writer appends one ~100-character message after another to its \
                 own thread for {:?} after {:?} of warm-up. threadgate is the release binary \
                 as its own process over HTTP/1.1 (reqwest, keep-alive); the reference crate and \
                 raw publish run in the harness process, so they pay no HTTP at all. Buffered \
                 deltas are not folded during the window (`--fold-idle 1h`).",
                ctx.window(),
                ctx.warmup()
            ),
            "Target: threadgate buffered append p50 ≤ 2× raw publish + ack.".into(),
        ],
        table,
        plots: vec![
            Plot {
                file: "writes-p50".into(),
                title: "Append p50 latency by concurrent writers".into(),
                x_label: "concurrent writers".into(),
                y_label: "p50 latency (ms)".into(),
                log_x: true,
                log_y: true,
                series: series(&|s| msf(s.p50)),
            },
            Plot {
                file: "writes-throughput".into(),
                title: "Append throughput by concurrent writers".into(),
                x_label: "concurrent writers".into(),
                y_label: "appends per second".into(),
                log_x: true,
                log_y: true,
                series: series(&|s| s.rate),
            },
        ],
    })
}

/// Closed-loop HTTP appends of `body`, writer `w` on thread `w<w>`.
async fn http_appends(c: &Client, n: usize, ctx: &Ctx, body: &bytes::Bytes) -> Result<Stats> {
    let (c, body) = (c.clone(), body.clone());
    closed_loop(n, ctx.warmup(), ctx.window(), move |w, _| {
        let (c, body) = (c.clone(), body.clone());
        async move { c.append(&format!("w{w}"), body).await.map(|_| ()) }
    })
    .await
}

/// `k` sequential appends made by `make(i)`; their latencies.
async fn sequential(
    c: &Client,
    id: &str,
    k: usize,
    make: impl Fn(usize) -> Value,
) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(k);
    for i in 0..k {
        let body = make(i).to_string();
        let t = Instant::now();
        c.append(id, body).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// Lets PostgreSQL finish with a load before appends are timed: a checkpoint writes back what
/// the load dirtied and `ANALYZE` refreshes the statistics, so the timed appends measure the
/// thread's size, not the write-back of loading it (best effort: needs a superuser for the
/// checkpoint).
async fn settle(schemas: &[&PgSchema]) {
    use sqlx::Connection;
    for schema in schemas {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&schema.url()).await {
            let _ = sqlx::query("ANALYZE threads, messages, patches, history")
                .execute(&mut conn)
                .await;
            let _ = sqlx::query("CHECKPOINT").execute(&mut conn).await;
        }
    }
}

/// One growth point: direct and buffered append p50, and fold time per delta.
struct Point {
    direct: Duration,
    buffered: Duration,
    fold_per_delta: Duration,
}

/// Measures one thread shape on both gateways: `setup` loads it, then `k` appends made by
/// `make` are timed, then (buffered) `f` more are folded by one timed flush.
async fn point(
    ctx: &Ctx,
    gws: (&Client, &Client, &[&PgSchema]),
    id: &str,
    state: Option<&Value>,
    load: &[Value],
    make: &(dyn Fn(usize) -> Value + Sync),
) -> Result<Point> {
    let (k, f) = (ctx.pick(200, 20), ctx.pick(100, 10));
    let (direct, buffered, _) = gws;
    let mut p50 = Vec::new();
    for c in [direct, buffered] {
        c.create(id, state).await?;
        for d in load {
            c.append(id, d.to_string()).await?;
        }
        if std::ptr::eq(c, buffered) {
            c.flush(id).await?;
        }
        settle(gws.2).await;
        let mut s = sequential(c, id, k, make).await?;
        s.sort();
        p50.push(crate::load::pct(&s, 50.0));
    }
    buffered.flush(id).await?;
    sequential(buffered, id, f, |i| make(k + i)).await?;
    let t = Instant::now();
    let folded = buffered.flush(id).await?;
    let took = t.elapsed();
    ensure!(
        folded["applied"] == f as u64,
        "flush of {f} deltas answered {folded}"
    );
    Ok(Point {
        direct: p50[0],
        buffered: p50[1],
        fold_per_delta: took / f as u32,
    })
}

/// Append and fold cost by thread length (100 … 100,000 messages) and state size (1 KB … 1 MB).
pub async fn growth(ctx: &Ctx) -> Result<Section> {
    let lengths: Vec<usize> = ctx.pick(vec![100, 1_000, 10_000, 100_000], vec![100, 1_000]);
    let sizes: Vec<usize> = ctx.pick(vec![1_000, 10_000, 100_000, 1_000_000], vec![1_000, 10_000]);
    let direct = Gateway::start(ctx, Mode::Direct, true, "", &[]).await?;
    let buffered = Gateway::start(ctx, Mode::Buffered, true, &ctx.unique("g"), &[]).await?;
    let schemas: Vec<&PgSchema> = [&direct, &buffered]
        .iter()
        .filter_map(|g| g.schema.as_ref())
        .collect();
    let gws = (&direct.client, &buffered.client, &schemas[..]);
    let mut by_len = Vec::new();
    for &len in &lengths {
        eprintln!("[bench]   thread of {len} messages");
        let load: Vec<Value> = (0..len)
            .collect::<Vec<_>>()
            .chunks(LOAD_CHUNK)
            .map(|c| {
                json!({"run_id": "load", "reason": "AssistantTurnCommitted", "patches": [],
                    "messages": c.iter().map(|&i| message("load", i)).collect::<Vec<_>>()})
            })
            .collect();
        let make = |i: usize| delta("grow", i, "AssistantTurnCommitted");
        by_len.push((
            len,
            point(ctx, gws, &format!("len{len}"), None, &load, &make).await?,
        ));
    }
    let mut by_size = Vec::new();
    for &size in &sizes {
        eprintln!("[bench]   state of {size} bytes");
        let state = json!({"blob": "x".repeat(size), "n": 0});
        let make = |i: usize| {
            json!({"run_id": "grow", "reason": "AssistantTurnCommitted", "messages": [],
                "patches": [{"patch": {"ops": [{"op": "set", "path": ["n"], "value": i}]}}]})
        };
        by_size.push((
            size,
            point(ctx, gws, &format!("size{size}"), Some(&state), &[], &make).await?,
        ));
    }
    direct.stop().await;
    buffered.stop().await;

    let mut table = Table {
        columns: [
            "thread",
            "direct append p50",
            "buffered append p50",
            "buffered fold, per delta",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for (label, points) in [
        (
            "messages",
            by_len.iter().map(|(n, p)| (*n, p)).collect::<Vec<_>>(),
        ),
        (
            "bytes of state",
            by_size.iter().map(|(n, p)| (*n, p)).collect(),
        ),
    ] {
        for (n, p) in points {
            table.rows.push(vec![
                format!("{} {label}", count(n as f64)),
                ms(p.direct),
                ms(p.buffered),
                ms(p.fold_per_delta),
            ]);
        }
    }
    let plot = |file: &str, title: &str, x: &str, pts: &[(usize, Point)]| Plot {
        file: file.into(),
        title: title.into(),
        x_label: x.into(),
        y_label: "ms".into(),
        log_x: true,
        log_y: true,
        series: [
            ("direct append p50", 0),
            ("buffered append p50", 1),
            ("buffered fold per delta", 2),
        ]
        .into_iter()
        .map(|(name, k)| Series {
            name: name.into(),
            points: pts
                .iter()
                .map(|(n, p)| {
                    let d = [p.direct, p.buffered, p.fold_per_delta][k];
                    (*n as f64, msf(d))
                })
                .collect(),
        })
        .collect(),
    };
    Ok(Section {
        id: "growth".into(),
        title: "Growth: thread length and state size".into(),
        notes: vec![
            format!(
                "Each thread is loaded first (messages in deltas of {LOAD_CHUNK}; the state as \
                 the thread's base state), then {} sequential appends are timed (one ~100-character \
                 message each for length, one `set` patch each for state size), then {} more are \
                 buffered and folded by one timed `POST /flush`. PostgreSQL store for both modes; \
                 after each load the harness runs `ANALYZE` and `CHECKPOINT`, so the timed \
                 appends do not pay for writing the load back.",
                ctx.pick(200, 20),
                ctx.pick(100, 10)
            ),
            "Targets: append and fold cost flat in thread length, at most linear in state size."
                .into(),
        ],
        table,
        plots: vec![
            plot(
                "growth-length",
                "Append and fold cost by thread length",
                "messages in the thread",
                &by_len,
            ),
            plot(
                "growth-state",
                "Append and fold cost by state size",
                "bytes of state",
                &by_size,
            ),
        ],
    })
}
