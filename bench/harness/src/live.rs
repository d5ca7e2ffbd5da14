//! Live: append→SSE delivery latency at 1 … 10,000 subscribers on one thread, and idle
//! event streams per GiB of gateway memory up to 50,000 streams.

use crate::ctx::Ctx;
use crate::gw::{Gateway, Mode, delta};
use crate::load::{count, ms, msf, pct};
use crate::results::{Plot, Section, Series, Table};
use anyhow::{Result, ensure};
use futures::StreamExt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Connections per loopback source address: well below the 28,232 ephemeral ports Linux
/// gives one (source, destination) pair by default.
const PER_SOURCE: usize = 10_000;
/// Event streams being opened at once: more overflows the listen backlog (`somaxconn`, 4,096
/// by default), and the kernel then drops connections the client thinks are open.
const OPEN_CONCURRENCY: usize = 256;
/// Descriptors kept free in each process besides its streams (listener, NATS, PostgreSQL,
/// files, the harness's own clients).
const FD_HEADROOM: usize = 1_500;
/// How long opening every subscriber may take.
const OPEN_DEADLINE: Duration = Duration::from_secs(300);
/// How long a subscriber waits for the last event after it was appended.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// Gateway flags that admit this many streams.
fn admit(streams: usize) -> Vec<String> {
    vec![
        "--max-connections".into(),
        (streams + 1_000).to_string(),
        "--max-streams".into(),
        (streams + 500).to_string(),
    ]
}

/// The next unused loopback source address (127.0.0.2, .3, …): a closed connection keeps
/// its port in TIME_WAIT for a minute, so every set of subscribers gets addresses of its own.
static NEXT_SOURCE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// One reqwest client per loopback source address, enough for `n` connections.
fn clients(n: usize) -> Vec<reqwest::Client> {
    (0..n.div_ceil(PER_SOURCE).max(1))
        .map(|_| {
            let host = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed).max(2);
            reqwest::Client::builder()
                .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
                .pool_max_idle_per_host(0)
                .build()
                .expect("reqwest client")
        })
        .collect()
}

/// Opens an event stream (`?after=0`) once `gate` has room; fails unless it is a 200.
async fn open(
    gate: &tokio::sync::Semaphore,
    http: &reqwest::Client,
    base: &str,
    id: &str,
) -> Result<reqwest::Response> {
    let _permit = gate.acquire().await?;
    let res = http
        .get(format!("{base}/v1/threads/{id}/events?after=0"))
        .send()
        .await?;
    ensure!(
        res.status() == 200,
        "event stream answered {}",
        res.status()
    );
    Ok(res)
}

/// Reads `res` until version `last` arrives (or the deadline); when each `id:` arrived.
async fn receive(res: reqwest::Response, last: u64) -> Vec<(u64, Instant)> {
    let mut out = Vec::new();
    let mut body = res.bytes_stream();
    let mut line = Vec::new();
    let read = async {
        while let Some(Ok(chunk)) = body.next().await {
            let now = Instant::now();
            for &b in chunk.iter() {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                if let Some(v) = line
                    .strip_prefix(b"id:")
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    out.push((v, now));
                    if v >= last {
                        return;
                    }
                }
                line.clear();
            }
        }
    };
    let _ = tokio::time::timeout(DELIVERY_DEADLINE, read).await;
    out
}

/// Append→delivery latency by subscribers on one thread, direct and buffered.
pub async fn fanout(ctx: &Ctx) -> Result<Section> {
    let counts: Vec<usize> = ctx.pick(vec![1, 100, 1_000, 10_000], vec![1, 10]);
    let events = ctx.pick(20u64, 3);
    let spacing = ctx.pick(Duration::from_millis(100), Duration::from_millis(20));
    let max = *counts.iter().max().unwrap();
    let flags = admit(max);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut rows = Vec::new();
    let mut plot_series = Vec::new();
    for mode in [Mode::Direct, Mode::Buffered] {
        let label = match mode {
            Mode::Direct => "direct (memory store)",
            Mode::Buffered => "buffered (JetStream, memory store)",
        };
        let gw = Gateway::start(ctx, mode, false, &ctx.unique("l"), &flags).await?;
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for &n in &counts {
            eprintln!("[bench]   {label}: {n} subscriber(s)");
            let id = format!("fan{n}");
            gw.client.create(&id, None).await?;
            let http = clients(n);
            let opened = Arc::new(AtomicUsize::new(0));
            let gate = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
            let mut subs = Vec::with_capacity(n);
            for j in 0..n {
                let (http, base, id) = (
                    http[j / PER_SOURCE].clone(),
                    gw.client.base.clone(),
                    id.clone(),
                );
                let (opened, gate) = (opened.clone(), gate.clone());
                subs.push(tokio::spawn(async move {
                    let res = open(&gate, &http, &base, &id).await;
                    opened.fetch_add(1, Ordering::Relaxed);
                    anyhow::Ok(receive(res?, events).await)
                }));
            }
            let until = Instant::now() + OPEN_DEADLINE;
            while opened.load(Ordering::Relaxed) < n {
                ensure!(Instant::now() < until, "subscribers did not open in time");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut sent = Vec::with_capacity(events as usize);
            for i in 0..events {
                let t = Instant::now();
                let v = gw
                    .client
                    .append(
                        &id,
                        delta("fan", i as usize, "AssistantTurnCommitted").to_string(),
                    )
                    .await?;
                ensure!(v == i + 1, "append {i} got version {v}");
                sent.push(t);
                tokio::time::sleep(spacing).await;
            }
            let mut lat = Vec::with_capacity(n * events as usize);
            for s in subs {
                for (v, at) in s.await?? {
                    if let Some(t) = v.checked_sub(1).and_then(|k| sent.get(k as usize)) {
                        lat.push(at.saturating_duration_since(*t));
                    }
                }
            }
            let delivered = lat.len();
            lat.sort();
            p50s.push((n as f64, msf(pct(&lat, 50.0))));
            p99s.push((n as f64, msf(pct(&lat, 99.0))));
            rows.push(vec![
                label.to_owned(),
                count(n as f64),
                format!(
                    "{} of {}",
                    count(delivered as f64),
                    count((n * events as usize) as f64)
                ),
                ms(pct(&lat, 50.0)),
                ms(pct(&lat, 99.0)),
            ]);
        }
        gw.stop().await;
        plot_series.push(Series {
            name: format!("{label} p50"),
            points: p50s,
        });
        plot_series.push(Series {
            name: format!("{label} p99"),
            points: p99s,
        });
    }
    Ok(Section {
        id: "live".into(),
        title: "Live: append→SSE delivery by subscribers on one thread".into(),
        notes: vec![format!(
            "N subscribers open `GET /v1/threads/{{id}}/events?after=0` on one thread (reqwest, \
             in the harness process), then {events} appends are made {spacing:?} apart; the \
             latency of an event is from just before its `POST` was sent to when a subscriber \
             read its `id:` line. Every subscriber must see every version: \"delivered\" counts \
             the events read of those expected."
        )],
        table: Table {
            columns: ["mode", "subscribers", "delivered", "p50", "p99"]
                .map(String::from)
                .to_vec(),
            rows,
        },
        plots: vec![Plot {
            file: "live".into(),
            title: "Append→SSE delivery latency by subscribers".into(),
            x_label: "subscribers on the thread".into(),
            y_label: "latency (ms)".into(),
            log_x: true,
            log_y: true,
            series: plot_series,
        }],
    })
}

/// Idle event streams per GiB of gateway RSS.
pub async fn idle(ctx: &Ctx) -> Result<Section> {
    // Each stream holds a descriptor on both sides (the harness and the gateway), so the
    // largest step is bounded by the descriptor limit every process here gets.
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let cap = (hard as usize).saturating_sub(FD_HEADROOM);
    let mut steps: Vec<usize> = ctx.pick(vec![1_000, 10_000, 25_000, 50_000], vec![50, 100]);
    let wanted = *steps.last().unwrap();
    steps.retain(|&s| s <= cap);
    if wanted > cap {
        steps.push(cap);
    }
    let limited = (wanted > cap).then(|| {
        format!(
            " The plan was {} streams; this machine's open-files hard limit is {} per process \
             and the harness may not raise it (no CAP_SYS_RESOURCE), so the largest step is {}.",
            count(wanted as f64),
            count(hard as f64),
            count(cap as f64)
        )
    });
    let threads = ctx.pick(1_000, 10);
    let settle = ctx.pick(Duration::from_secs(2), Duration::from_millis(200));
    let max = *steps.iter().max().unwrap();
    let flags = admit(max);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = Gateway::start(ctx, Mode::Direct, false, "", &flags).await?;
    for t in 0..threads {
        gw.client.create(&format!("idle{t}"), None).await?;
    }
    tokio::time::sleep(settle).await;
    let (base_rss, _) = gw.process.rss()?;
    let http = clients(max);
    let mut streams = Vec::with_capacity(max);
    let gate = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let mut rows = Vec::new();
    let mut points = vec![(0.0, base_rss)];
    for &step in &steps {
        eprintln!("[bench]   {step} idle streams");
        let mut opening = Vec::new();
        for j in streams.len()..step {
            let (http, base) = (http[j / PER_SOURCE].clone(), gw.client.base.clone());
            let (id, gate) = (format!("idle{}", j % threads), gate.clone());
            opening.push(tokio::spawn(
                async move { open(&gate, &http, &base, &id).await },
            ));
        }
        let started = Instant::now();
        for o in opening {
            match o.await? {
                Ok(res) => streams.push(res),
                Err(e) => {
                    diagnose(&gw, streams.len());
                    return Err(e);
                }
            }
        }
        let took = started.elapsed();
        tokio::time::sleep(settle).await;
        let (rss, _) = gw.process.rss()?;
        let per = (rss - base_rss) * 1024.0 / step as f64;
        points.push((step as f64, rss));
        rows.push(vec![
            count(step as f64),
            format!("{rss:.1} MiB"),
            format!("{per:.1} KiB"),
            count(step as f64 / ((rss - base_rss).max(1e-3) / 1024.0)),
            format!("{:.1} s", took.as_secs_f64()),
        ]);
    }
    // Every followed thread still delivers: one append each, read on a sample of streams.
    for t in 0..threads {
        gw.client
            .append(
                &format!("idle{t}"),
                delta("idle", t, "AssistantTurnCommitted").to_string(),
            )
            .await?;
    }
    let sample: Vec<_> = streams.drain(..threads.min(streams.len())).collect();
    let n = sample.len();
    let mut delivered = 0;
    for res in sample {
        if receive(res, 1).await.iter().any(|(v, _)| *v == 1) {
            delivered += 1;
        }
    }
    drop(streams);
    gw.stop().await;
    ensure!(
        delivered == n,
        "only {delivered} of {n} sampled idle streams delivered"
    );
    Ok(Section {
        id: "idle".into(),
        title: "Idle event streams per GiB".into(),
        notes: vec![format!(
            "Direct mode, memory store. Idle streams (`?after=0`) are opened in steps over \
             {threads} threads (reqwest in the harness process, several loopback source \
             addresses); the gateway's RSS is read from /proc {settle:?} after each step. \
             Per-stream cost is (RSS − RSS with no stream, {base_rss:.1} MiB) ÷ streams. \
             Afterwards one append per thread must reach a stream of each thread ({n} of {n} \
             did).{}",
            limited.unwrap_or_default()
        )],
        table: Table {
            columns: [
                "streams",
                "gateway RSS",
                "per stream",
                "streams per GiB",
                "opened in",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        },
        plots: vec![Plot {
            file: "idle".into(),
            title: "Gateway RSS by idle event streams".into(),
            x_label: "idle streams".into(),
            y_label: "RSS (MiB)".into(),
            log_x: false,
            log_y: false,
            series: vec![Series {
                name: "threadgate direct (memory store)".into(),
                points,
            }],
        }],
    })
}

/// What the gateway said and its descriptor limit, when a stream could not be opened.
fn diagnose(gw: &Gateway, open: usize) {
    eprintln!("[bench]   a stream failed to open with {open} open; the gateway's last log lines:");
    for line in gw.process.log.lock().unwrap().iter().rev().take(5) {
        eprintln!("[bench]     {line}");
    }
    if let Ok(limits) = std::fs::read_to_string(format!("/proc/{}/limits", gw.process.pid)) {
        for l in limits.lines().filter(|l| l.starts_with("Max open files")) {
            eprintln!("[bench]     {l}");
        }
    }
}
