//! Every wait has a deadline (issue 7 E): reads of a log trimmed under them end, a fold cut
//! off from NATS lets go of its lock, shutdown finishes within its bound whatever NATS and the
//! store do, and start-up waits (bounded) for a backend that is briefly unreachable.
//!
//! The time limits here only detect hangs (each is many times what a healthy run takes);
//! they are not performance assertions.

use crate::harness::{
    Backend, Gateway, NatsServer, Process, delta_msg, drop_streams, nats_prefix, nats_url,
};
use crate::pg::PgSchema;
use crate::proxy::postgres_via_proxy;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use threadgate::buffer::log::{Log, LogConfig};
use threadgate::id::ThreadId;
use threadgate::model::ChangeSet;
use threadgate::store::Change;

/// What no healthy call in these tests comes near.
const HANG: Duration = Duration::from_secs(30);

async fn log(url: &str, prefix: &str) -> Log {
    Log::connect(&LogConfig {
        url: url.to_owned(),
        prefix: prefix.to_owned(),
        startup_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .await
    .expect("log connects")
}

fn delta(i: u64) -> bytes::Bytes {
    let d: ChangeSet = serde_json::from_value(delta_msg("r", Some(&format!("m{i}")), "x")).unwrap();
    Log::encode(Some(&Change::Delta(d))).unwrap()
}

/// Publishes `n` entries (versions 1..=n) to the thread's log.
async fn fill(log: &Log, id: &ThreadId, n: u64) {
    let mut seq = 0;
    for v in 1..=n {
        seq = match log.publish(id, delta(v), v, seq, None).await {
            Ok(p) => p.seq,
            Err(_) => panic!("publish {v}"),
        };
    }
}

/// A reader whose range is trimmed while it reads ends (with what it had) instead of
/// waiting for messages that no longer exist: before its first page, between its one-by-one
/// reads, and after it switched to a consumer.
#[tokio::test]
async fn a_log_trimmed_under_a_reader_ends_the_read() {
    let prefix = nats_prefix();
    let log = log(&nats_url(), &prefix).await;
    for (case, n, first_page) in [("before", 3, 0), ("single", 10, 2), ("consumer", 40, 10)] {
        let id = ThreadId::parse(case).unwrap();
        fill(&log, &id, n).await;
        let mut reader = log.reader(&id, None).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < first_page {
            let page = tokio::time::timeout(HANG, reader.next_page(first_page - seen.len()))
                .await
                .expect("a page comes")
                .unwrap()
                .expect("not at the end yet");
            seen.extend(page.into_iter().map(|e| e.version));
        }
        log.purge(&id, None).await.unwrap();
        let rest = tokio::time::timeout(HANG, reader.next_page(1_000))
            .await
            .unwrap_or_else(|_| panic!("{case}: the read hangs on a trimmed range"))
            .unwrap();
        assert_eq!(rest, None, "{case}: a trimmed range is the end of the read");
        assert_eq!(seen, (1..=first_page as u64).collect::<Vec<_>>(), "{case}");
    }
    // A read of a log that is not trimmed sees exactly what was there when it began.
    let id = ThreadId::parse("whole").unwrap();
    fill(&log, &id, 30).await;
    let reader = log.reader(&id, None).await.unwrap();
    fill_more(&log, &id).await;
    let all = tokio::time::timeout(HANG, reader.collect(7))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        all.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    drop_streams(&nats_url(), &prefix).await;
}

/// One more entry after a reader began (it must not be read).
async fn fill_more(log: &Log, id: &ThreadId) {
    let last = log.last(id).await.unwrap().unwrap();
    log.publish(id, delta(31), 31, last.seq, None)
        .await
        .ok()
        .unwrap();
}

/// The issue's reproduction: threads folded and trimmed by the sweeper while live reads
/// hammer them; every read answers, with every write.
#[tokio::test]
async fn live_reads_never_hang_while_folds_trim() {
    let gw = Gateway::start_buffered(Backend::Memory, &nats_url(), |c| {
        c.fold_idle = Duration::from_millis(100);
        c.keep_folded = Duration::ZERO;
    })
    .await;
    let ids: Vec<String> = (0..20).map(|i| format!("idle.{i}")).collect();
    for id in &ids {
        gw.create(json!({"id": id})).await;
        for step in 0..3 {
            gw.append(id, delta_msg("r", Some(&format!("m{step}")), "x"))
                .await;
        }
    }
    let until = Instant::now() + Duration::from_secs(3);
    let readers = (0..8).map(|r| {
        let (http, base, ids) = (gw.http.clone(), gw.base.clone(), ids.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while Instant::now() < until {
                let id = &ids[(reads * 7 + r) % ids.len()];
                let url = format!("{base}/v1/threads/{id}?view=live");
                let res = tokio::time::timeout(HANG, http.get(&url).send())
                    .await
                    .unwrap_or_else(|_| panic!("GET {url} hangs"))
                    .unwrap();
                assert_eq!(res.status(), StatusCode::OK, "GET {url}");
                let t: Value = res.json().await.unwrap();
                assert_eq!(t["version"], 3, "GET {url}");
                reads += 1;
            }
            reads
        })
    });
    let reads: usize = futures::future::join_all(readers)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    assert!(reads > 20, "{reads} reads");
    // Everything was folded meanwhile (the sweeper ran), and the store has every write.
    for id in &ids {
        crate::support::eventually(HANG, || async {
            gw.get_json(&format!("/v1/threads/{id}")).await["version"] == 3
        })
        .await;
    }
    gw.stop().await;
}

/// Start-up in buffered mode with PostgreSQL behind a proxy and NATS of the test's own.
fn args(store: &str, nats: &str, prefix: &str) -> Vec<String> {
    [
        "--store",
        store,
        "--nats-url",
        nats,
        "--nats-prefix",
        prefix,
        "--fold-idle",
        "1h",
        "--shutdown-timeout",
        "6s",
        "--startup-timeout",
        "20s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn spawn(args: &[String]) -> Process {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::spawn(&args).await
}

async fn post(http: &reqwest::Client, url: String, body: &Value) -> (StatusCode, Value) {
    let res = http.post(url).json(body).send().await.unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// A fold cut off by a NATS kill lets go of its lock: once NATS is back, the next RunFinished
/// folds before answering.
#[tokio::test]
async fn nats_killed_during_a_fold_then_run_finished_folds_promptly() {
    let mut nats = NatsServer::start().await;
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let mut gw = spawn(&args(&schema.url(), &nats.url(), &prefix)).await;
    let (http, base) = (reqwest::Client::new(), gw.base());
    post(&http, format!("{base}/v1/threads"), &json!({"id": "t"})).await;
    let n = 2_000u64;
    futures::future::join_all((0..n).map(|i| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let d = delta_msg("run", Some(&format!("m{i}")), "x");
            let (status, _) = post(&http, format!("{base}/v1/threads/t/deltas"), &d).await;
            assert_eq!(status, StatusCode::OK);
        }
    }))
    .await;
    let flush = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move { post(&http, format!("{base}/v1/threads/t/flush"), &json!({})).await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    nats.kill();
    let (status, _) = tokio::time::timeout(HANG, flush)
        .await
        .expect("the flush answers while NATS is down")
        .unwrap();
    assert!(
        status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}"
    );
    nats.restart().await;
    crate::support::eventually(HANG, || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let finish = json!({"run_id": "run", "reason": "RunFinished", "messages": [], "patches": []});
    let (status, body) = post(&http, format!("{base}/v1/threads/t/deltas"), &finish).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"version": n + 1, "flushed": true}));
    let t: Value = http
        .get(format!("{base}/v1/threads/t"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["version"], n + 1);
    assert_eq!(t["messages"].as_array().unwrap().len() as u64, n);
    gw.terminate().await;
}

/// SIGTERM with NATS down, and with the store cut off: the process exits within its bound
/// (`--shutdown-timeout 6s`; `terminate` allows 10 s) and loses nothing acknowledged.
#[tokio::test]
async fn sigterm_with_nats_down_or_the_store_cut_exits_in_time_and_loses_nothing() {
    let mut nats = NatsServer::start().await;
    let schema = PgSchema::create().await;
    let (proxy, via) = postgres_via_proxy(&schema.url()).await;
    let prefix = nats_prefix();
    let http = reqwest::Client::new();
    let mut acked = 0u64;
    for outage in ["nats", "store"] {
        let mut gw = spawn(&args(&via, &nats.url(), &prefix)).await;
        let base = gw.base();
        if acked == 0 {
            post(&http, format!("{base}/v1/threads"), &json!({"id": "t"})).await;
        }
        for _ in 0..5 {
            acked += 1;
            let d = delta_msg("r", Some(&format!("m{acked}")), "x");
            let (status, body) = post(&http, format!("{base}/v1/threads/t/deltas"), &d).await;
            assert_eq!(
                (status, body["version"].as_u64()),
                (StatusCode::OK, Some(acked))
            );
        }
        match outage {
            "nats" => nats.kill(),
            _ => proxy.cut(),
        }
        let started = Instant::now();
        gw.terminate().await;
        eprintln!(
            "SIGTERM with the {outage} down: exited after {:?}",
            started.elapsed()
        );
        match outage {
            "nats" => nats.restart().await,
            _ => proxy.restore(),
        }
    }
    // Recovery at start-up folds everything acknowledged.
    let mut gw = spawn(&args(&via, &nats.url(), &prefix)).await;
    let url = format!("{}/v1/threads/t", gw.base());
    crate::support::eventually(HANG, || async {
        let t: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        t["version"] == acked
    })
    .await;
    let t: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(t["messages"].as_array().unwrap().len() as u64, acked);
    gw.terminate().await;
}

/// A PostgreSQL or NATS that is unreachable for a moment at start-up is waited for (with
/// back-off, up to `--startup-timeout`) instead of stopping the process.
#[tokio::test]
async fn start_up_waits_for_briefly_unreachable_backends() {
    let schema = PgSchema::create().await;
    let (proxy, via) = postgres_via_proxy(&schema.url()).await;
    let mut nats = NatsServer::start().await;
    nats.kill();
    proxy.cut();
    let prefix = nats_prefix();
    let args = args(&via, &nats.url(), &prefix);
    let restore = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        proxy.restore();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        nats.restart().await;
        (proxy, nats)
    });
    let mut gw = spawn(&args).await;
    let (_proxy, _nats) = restore.await.unwrap();
    let http = reqwest::Client::new();
    let (status, _) = post(
        &http,
        format!("{}/v1/threads", gw.base()),
        &json!({"id": "t"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    gw.terminate().await;
    // Beyond the budget, start-up fails with the reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_threadgate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--store",
            "postgres://postgres@127.0.0.1:9/none",
        ])
        .args(["--startup-timeout", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--startup-timeout"), "{text}");
}
