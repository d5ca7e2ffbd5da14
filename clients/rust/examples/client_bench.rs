//! What the client costs on top of the gateway (a measurement, not a test: it never fails on
//! numbers). Starts a gateway in-process (memory store, direct mode, loopback) and reports:
//!
//! * `append` — sequential appends through `ThreadgateStore::append` (JSON, idempotency key,
//!   `If-Match`) against the same appends as raw `reqwest` POSTs: latency p50/p99.
//! * `follow` — append → `follow` event delivery latency p50/p99.
//! * `list`   — `list_threads` (offset 0, limit 50) with 1,000 and 10,000 threads: tirea's
//!   offset and total take one gateway page per 200 threads.
//!
//!   cargo run --release -p threadgate-client --example client_bench [-- <appends>]
//!
//! Results are kept in `bench/results-client.md`.

use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use threadgate::config::Config;
use threadgate_client::{LiveEvent, ThreadReader, ThreadWriter, ThreadgateStore};
use tirea_contract::storage::{ThreadListQuery, VersionPrecondition};
use tirea_contract::{CheckpointReason, Message, Thread, ThreadChangeSet};

fn step(i: usize) -> ThreadChangeSet {
    ThreadChangeSet::from_parts(
        "run",
        None,
        CheckpointReason::AssistantTurnCommitted,
        vec![Arc::new(Message::assistant(format!(
            "step {i}: {}",
            "x".repeat(200)
        )))],
        vec![],
        vec![],
        None,
    )
}

fn percentiles(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort();
    let at = |q: f64| d[((d.len() as f64 * q) as usize).min(d.len() - 1)];
    (at(0.50), at(0.99))
}

fn row(name: &str, n: usize, total: Duration, lat: Vec<Duration>) {
    let (p50, p99) = percentiles(lat);
    println!(
        "| {name} | {n} | {:.0} | {:.3} ms | {:.3} ms |",
        n as f64 / total.as_secs_f64(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2_000);
    let gateway = threadgate::app::start(&Config::for_tests("memory:")).await?;
    let base = format!("http://{}", gateway.addr);
    let store = ThreadgateStore::new(&base)?;
    let raw = reqwest::Client::new();

    println!("| scenario | operations | per second | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");

    // Raw POSTs first, then the client, each on a thread of its own.
    store.create(&Thread::new("raw")).await?;
    let url = format!("{base}/v1/threads/raw/deltas");
    let (mut lat, started) = (Vec::with_capacity(n), Instant::now());
    for i in 0..n {
        let body = serde_json::to_vec(&step(i))?;
        let t = Instant::now();
        let res = raw
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert!(res.status().is_success());
        res.bytes().await?;
        lat.push(t.elapsed());
    }
    row("append, raw reqwest POST", n, started.elapsed(), lat);

    store.create(&Thread::new("client")).await?;
    let (mut lat, started) = (Vec::with_capacity(n), Instant::now());
    for i in 0..n {
        let d = step(i);
        let t = Instant::now();
        store
            .append("client", &d, VersionPrecondition::Exact(i as u64))
            .await?;
        lat.push(t.elapsed());
    }
    row(
        "append, ThreadgateStore (key + If-Match)",
        n,
        started.elapsed(),
        lat,
    );

    // Append → event delivered to a follower.
    store.create(&Thread::new("live")).await?;
    let mut live = store.follow("live", 0);
    let m = n.min(1_000);
    let (mut lat, started) = (Vec::with_capacity(m), Instant::now());
    for i in 0..m {
        let d = step(i);
        let t = Instant::now();
        store.append("live", &d, VersionPrecondition::Any).await?;
        match live.next().await {
            Some(Ok(LiveEvent::Delta { version, .. })) if version == i as u64 + 1 => {}
            other => panic!("expected version {}, got {other:?}", i + 1),
        }
        lat.push(t.elapsed());
    }
    row("append → follow event", m, started.elapsed(), lat);

    // Listing: tirea's offset + total over the gateway's keyset pages.
    let mut created = 3;
    for target in [1_000usize, 10_000] {
        while created < target {
            store.create(&Thread::new(format!("l{created:06}"))).await?;
            created += 1;
        }
        let q = ThreadListQuery::default();
        let (mut lat, started) = (Vec::new(), Instant::now());
        for _ in 0..20 {
            let t = Instant::now();
            let page = store.list_threads(&q).await?;
            assert_eq!(page.total, target);
            lat.push(t.elapsed());
        }
        row(
            &format!(
                "list_threads, {target} threads ({} gateway pages)",
                target.div_ceil(200)
            ),
            20,
            started.elapsed(),
            lat,
        );
    }
    gateway.stop().await?;
    Ok(())
}
