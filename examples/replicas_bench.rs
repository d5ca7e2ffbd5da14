//! Direct mode across replicas, measured (a measurement, not a test: it never fails on
//! numbers). Starts two gateways in-process on one fresh PostgreSQL schema (no NATS) and
//! reports:
//!
//! * `cross-replica` — append through replica A, then the time until the event arrives on a
//!   stream open on replica B (`LISTEN/NOTIFY`, then B reads the history row): p50/p99/max.
//! * `append` — sequential append latency through A, and concurrent throughput (one writer
//!   per thread), with the commit notifications on (direct mode) and off
//!   (`threadgate.notify=off`, what buffered mode sets): the cost of the trigger and of
//!   `NOTIFY`'s commit-time lock.
//!
//!   cargo run --release --example replicas_bench [-- <appends> <writers>]
//!
//! PostgreSQL comes from `THREADGATE_TEST_PG_URL` (default the local test database); the
//! schema is dropped at the end.

use futures::StreamExt;
use std::time::{Duration, Instant};
use threadgate::config::Config;

fn percentiles(mut d: Vec<Duration>) -> (Duration, Duration, Duration) {
    d.sort();
    let at = |q: f64| d[((d.len() as f64 * q) as usize).min(d.len() - 1)];
    (at(0.50), at(0.99), *d.last().unwrap())
}

fn delta(i: usize) -> serde_json::Value {
    serde_json::json!({"run_id": "r", "reason": "AssistantTurnCommitted",
        "messages": [{"role": "assistant", "content": format!("step {i}: {}", "x".repeat(200))}],
        "patches": []})
}

async fn start(url: &str) -> threadgate::app::Running {
    let mut config = Config::for_tests(url);
    config.pg_max_connections = 20;
    threadgate::app::start(&config)
        .await
        .expect("gateway starts")
}

async fn append(http: &reqwest::Client, base: &str, id: &str, i: usize) {
    let res = http
        .post(format!("{base}/v1/threads/{id}/deltas"))
        .json(&delta(i))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
}

async fn create(http: &reqwest::Client, base: &str, id: &str) {
    let res = http
        .post(format!("{base}/v1/threads"))
        .json(&serde_json::json!({"id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201);
}

/// Sequential append latency and concurrent throughput through `base`.
async fn appends(base: &str, tag: &str, n: usize, writers: usize) -> (Duration, Duration, f64) {
    let http = reqwest::Client::new();
    let id = format!("seq-{tag}");
    create(&http, base, &id).await;
    let mut lat = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        append(&http, base, &id, i).await;
        lat.push(t.elapsed());
    }
    let (p50, p99, _) = percentiles(lat);
    for w in 0..writers {
        create(&http, base, &format!("par-{tag}-{w}")).await;
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (http, base, id) = (http.clone(), base.to_owned(), format!("par-{tag}-{w}"));
            tokio::spawn(async move {
                for i in 0..n {
                    append(&http, &base, &id, i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (n * writers) as f64 / started.elapsed().as_secs_f64();
    (p50, p99, rate)
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(500);
    let writers = args.get(1).copied().unwrap_or(8);
    let base_url = std::env::var("THREADGATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = sqlx::PgPool::connect(&base_url).await.unwrap();
    let schema = format!("bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let sep = if base_url.contains('?') { '&' } else { '?' };
    let url = format!("{base_url}{sep}options=-c%20search_path%3D{schema}");

    let a = start(&url).await;
    let b = start(&url).await;
    let (base_a, base_b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let http = reqwest::Client::new();

    // Cross-replica delivery.
    create(&http, &base_a, "x").await;
    let res = http
        .get(format!("{base_b}/v1/threads/x/events?after=0"))
        .send()
        .await
        .unwrap();
    let mut body = res.bytes_stream();
    let mut buf = Vec::new();
    let mut lat = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        append(&http, &base_a, "x", i).await;
        let want = format!("id: {}\n", i + 1);
        loop {
            if let Some(pos) = buf.windows(want.len()).position(|w| w == want.as_bytes()) {
                buf.drain(..pos + want.len());
                break;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
                .await
                .expect("event within 10 s")
                .unwrap()
                .unwrap();
            buf.extend_from_slice(&chunk);
        }
        lat.push(t.elapsed());
    }
    drop(body);
    let (p50, p99, max) = percentiles(lat);
    println!(
        "cross-replica (append through A answered + event on B), {n} writes: \
         p50 {p50:?}  p99 {p99:?}  max {max:?}"
    );

    let (p50, p99, rate) = appends(&base_a, "on", n, writers).await;
    println!(
        "append, notifications on:  sequential p50 {p50:?} p99 {p99:?}; \
         {writers} writers: {rate:.0} appends/s"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    let off = format!("{url}%20-c%20threadgate.notify%3Doff");
    let c = start(&off).await;
    let (p50, p99, rate) = appends(&format!("http://{}", c.addr), "off", n, writers).await;
    println!(
        "append, notifications off: sequential p50 {p50:?} p99 {p99:?}; \
         {writers} writers: {rate:.0} appends/s"
    );
    c.stop().await.unwrap();
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
}
