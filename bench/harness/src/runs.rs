//! Run end and start-up: RunFinished latency by run length (threadgate buffered vs the
//! reference crate, with what each store holds afterwards), and recovery time at start-up.

use crate::ctx::Ctx;
use crate::gw::{Gateway, Mode, delta};
use crate::load::{count, ms, msf, pct};
use crate::reference::{Reference, changeset};
use crate::results::{Plot, Section, Series, Table};
use crate::support::PgSchema;
use anyhow::{Result, ensure};
use std::time::{Duration, Instant};

/// Sequential appends of the run's first `n - 1` deltas (not timed).
async fn fill_gateway(c: &crate::gw::Client, id: &str, n: usize) -> Result<()> {
    for i in 0..n.saturating_sub(1) {
        c.append(id, delta(id, i, "AssistantTurnCommitted").to_string())
            .await?;
    }
    Ok(())
}

/// RunFinished latency for runs of 1 … 10,000 deltas.
pub async fn run_finished(ctx: &Ctx) -> Result<Section> {
    let sizes: Vec<(usize, usize)> = ctx.pick(
        vec![(1, 10), (10, 10), (100, 10), (1_000, 5), (10_000, 2)],
        vec![(1, 2), (10, 1)],
    );
    let gw = Gateway::start(ctx, Mode::Buffered, true, &ctx.unique("r"), &[]).await?;
    let reference = Reference::new(ctx).await?;
    let mut rows = Vec::new();
    let (mut tg_pts, mut ref_pts) = (Vec::new(), Vec::new());
    for &(n, reps) in &sizes {
        eprintln!("[bench]   runs of {n} deltas × {reps}");
        let (mut tg, mut rf) = (Vec::new(), Vec::new());
        let (mut tg_kept, mut ref_kept) = (0, 0);
        for rep in 0..reps {
            let id = format!("run{n}x{rep}");
            gw.client.create(&id, None).await?;
            fill_gateway(&gw.client, &id, n).await?;
            let last = delta(&id, n, "RunFinished").to_string();
            let t = Instant::now();
            let a = gw
                .client
                .post(&format!("/v1/threads/{id}/deltas"), last)
                .await?;
            tg.push(t.elapsed());
            ensure!(
                a["flushed"] == true && a["version"] == n as u64,
                "RunFinished of a {n}-delta run answered {a}"
            );
            tg_kept = stored(gw.schema.as_ref().expect("PostgreSQL"), Some(&id)).await?;

            reference.create(&id).await?;
            for i in 0..n.saturating_sub(1) {
                reference
                    .append(&id, &changeset(&delta(&id, i, "AssistantTurnCommitted"))?)
                    .await?;
            }
            let last = changeset(&delta(&id, n, "RunFinished"))?;
            let t = Instant::now();
            reference.append(&id, &last).await?;
            rf.push(t.elapsed());
            ref_kept = reference.messages(&id).await?;
        }
        tg.sort();
        rf.sort();
        tg_pts.push((n as f64, msf(pct(&tg, 50.0))));
        ref_pts.push((n as f64, msf(pct(&rf, 50.0))));
        rows.push(vec![
            count(n as f64),
            reps.to_string(),
            ms(pct(&tg, 50.0)),
            ms(pct(&tg, 99.0)),
            format!("{} of {}", count(tg_kept as f64), count(n as f64)),
            ms(pct(&rf, 50.0)),
            format!("{} of {}", count(ref_kept as f64), count(n as f64)),
        ]);
    }
    gw.stop().await;
    reference.drop().await;
    Ok(Section {
        id: "runs".into(),
        title: "RunFinished: folding a run at its end".into(),
        notes: vec![
            "Each run on a fresh thread: n − 1 deltas (one ~100-character message each) are \
             appended untimed, then the RunFinished delta is timed: threadgate folds the run into \
             PostgreSQL before it answers (`\"flushed\": true` checked), the reference crate \
             drains its JetStream consumer (until 2 s pass without a message) and saves the \
             thread. \"Stored\" counts the messages in each store right after the RunFinished \
             answer (last repetition)."
                .into(),
            "Targets (threadgate, PostgreSQL, p50): 100 deltas ≤ 10 ms, 1,000 deltas ≤ 50 ms."
                .into(),
        ],
        table: Table {
            columns: [
                "run length",
                "runs",
                "threadgate p50",
                "threadgate p99",
                "threadgate stored",
                "reference p50",
                "reference stored",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        },
        plots: vec![Plot {
            file: "runs".into(),
            title: "RunFinished latency by run length".into(),
            x_label: "deltas in the run".into(),
            y_label: "p50 latency (ms)".into(),
            log_x: true,
            log_y: true,
            series: vec![
                Series {
                    name: "threadgate buffered (PostgreSQL)".into(),
                    points: tg_pts,
                },
                Series {
                    name: "reference NatsBufferedThreadWriter".into(),
                    points: ref_pts,
                },
            ],
        }],
    })
}

/// Messages of a thread (all threads when `id` is `None`) in a gateway's PostgreSQL schema,
/// read directly: the gateway's own reads would include what the log still holds.
async fn stored(schema: &PgSchema, id: Option<&str>) -> Result<usize> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&schema.url()).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE $1::text IS NULL OR thread_id = $1",
    )
    .bind(id)
    .fetch_one(&mut conn)
    .await?;
    Ok(n as usize)
}

/// Start-up recovery with nothing pending and with 100 threads × 10 deltas left by a crash.
pub async fn recovery(ctx: &Ctx) -> Result<Section> {
    const RECOVERED: &str = "start-up recovery folded buffered threads";
    let (threads, per) = ctx.pick((100, 10), (5, 3));
    let log = "warn,threadgate::app=info,threadgate::buffer=info";
    let deadline = Duration::from_secs(300);
    let mut rows = Vec::new();
    for pending in [false, true] {
        let expect = if pending { threads * per } else { 0 };
        // threadgate: a gateway buffers, is killed (no shutdown fold), and a new one starts.
        let prefix = ctx.unique("c");
        let first = Gateway::start(ctx, Mode::Buffered, true, &prefix, &[]).await?;
        if pending {
            for t in 0..threads {
                let id = format!("t{t}");
                first.client.create(&id, None).await?;
                for i in 0..per {
                    let d = delta(&id, i, "AssistantTurnCommitted").to_string();
                    first.client.append(&id, d).await?;
                }
            }
        }
        let schema = first.schema.expect("a PostgreSQL gateway");
        first.process.kill().await;
        let t = Instant::now();
        let second =
            Gateway::start_on(ctx, Mode::Buffered, Some(&schema), &prefix, &[], log).await?;
        let listening = t.elapsed();
        let fields = second.process.wait_log(RECOVERED, deadline).await?;
        let recovered = t.elapsed();
        let kept = stored(&schema, None).await?;
        second.stop().await;
        schema.drop().await;
        ensure!(
            kept == expect,
            "threadgate recovery stored {kept} of {expect} messages ({fields})"
        );
        let label = pending_label(pending, threads, per);
        rows.push(recovery_row(
            "threadgate buffered (PostgreSQL)",
            &label,
            (listening, recovered),
            (kept, expect),
        ));

        // The reference: deltas appended, the writer dropped, a new writer's recover() timed.
        let _ = ctx.js.delete_stream(crate::reference::STREAM).await;
        let reference = Reference::new(ctx).await?;
        if pending {
            for t in 0..threads {
                let id = format!("t{t}");
                reference.create(&id).await?;
                for i in 0..per {
                    let d = changeset(&delta(&id, i, "AssistantTurnCommitted"))?;
                    reference.append(&id, &d).await?;
                }
            }
        }
        let t = Instant::now();
        let writer = reference.restart(ctx).await?;
        let ready = t.elapsed();
        writer
            .recover()
            .await
            .map_err(|e| anyhow::anyhow!("reference recover: {e}"))?;
        let recovered = t.elapsed();
        let mut kept = 0;
        for t in 0..threads {
            kept += reference.messages(&format!("t{t}")).await?;
        }
        reference.drop().await;
        rows.push(recovery_row(
            "reference NatsBufferedThreadWriter",
            &label,
            (ready, recovered),
            (kept, expect),
        ));
    }
    Ok(Section {
        id: "recovery".into(),
        title: "Recovery at start-up".into(),
        notes: vec![format!(
            "threadgate: a buffered gateway takes the appends and is killed with SIGKILL (no \
             shutdown fold); the time runs from starting a new process on the same prefix and \
             schema until it listens, and until its log says start-up recovery is done. The \
             reference: the same deltas appended through one writer, then a new writer is created \
             and `recover()` timed (it drains until 2 s pass without a message). \"Stored\" \
             counts the messages in the store afterwards ({threads} threads × {per} deltas of \
             one message when something is pending)."
        )],
        table: Table {
            columns: ["system", "pending", "ready to serve", "recovered", "stored"]
                .map(String::from)
                .to_vec(),
            rows,
        },
        plots: Vec::new(),
    })
}

/// A row of the recovery table: system, what was pending, (ready, recovered) times and
/// (stored, expected) messages.
fn recovery_row(
    system: &str,
    pending: &str,
    (ready, recovered): (Duration, Duration),
    (kept, expect): (usize, usize),
) -> Vec<String> {
    vec![
        system.into(),
        pending.into(),
        ms(ready),
        ms(recovered),
        format!("{} of {}", count(kept as f64), count(expect as f64)),
    ]
}

fn pending_label(pending: bool, threads: usize, per: usize) -> String {
    if pending {
        format!("{threads} threads × {per} deltas")
    } else {
        "nothing".into()
    }
}
