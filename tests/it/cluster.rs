//! Beyond one machine (issue 12): a three-node JetStream cluster (three nats-server processes
//! joined by routes, all on loopback) holding the log with three replicas, and three gateway
//! replicas (the real binary) on one PostgreSQL schema, with no sticky routing: writers spread
//! their appends over the replicas and SSE clients reconnect to any replica with
//! `Last-Event-ID`, as behind a load balancer. Meanwhile the stream's leader node is killed
//! with SIGKILL and later restarted.
//!
//! What must hold: every acknowledged append is in the final threads, exactly as an in-memory
//! oracle of the acknowledged appends says (retries carry an `Idempotency-Key`, so a retried
//! append is never doubled); every SSE client sees every version exactly once, in order; the
//! outage is a short run of `503`s, and no request hangs.

use crate::harness::{NatsCluster, Process, enc, nats_prefix};
use crate::pg::PgSchema;
use crate::support::resume::Sse;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Threads written at once (one writer each).
const THREADS: usize = 3;
/// Client-side bound on any one request: an answer slower than this is a hang.
const HANG: Duration = Duration::from_secs(30);
/// Pause between one writer's appends (keeps the test's volume modest).
const PACE: Duration = Duration::from_millis(20);

/// What the writers observed.
#[derive(Default)]
struct Observed {
    /// Per thread: the acknowledged appends' texts by version.
    oracle: HashMap<String, Vec<(u64, String)>>,
    /// Every append answer: when it came, how long it took, and its status (0: no answer).
    answers: Vec<(Instant, Duration, u16)>,
}

/// Appends `m0, m1, ...` to `id` until `stop`, spreading attempts over `bases` and retrying
/// each append with its `Idempotency-Key` until it is acknowledged.
async fn writer(
    bases: Vec<String>,
    id: String,
    stop: Arc<AtomicBool>,
    observed: Arc<Mutex<Observed>>,
) {
    let http = reqwest::Client::builder().timeout(HANG).build().unwrap();
    let mut attempt = 0usize;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let text = format!("{id}: m{i}");
        let delta = json!({"run_id": "r", "reason": "AssistantTurnCommitted",
            "messages": [{"role": "assistant", "content": text}], "patches": []});
        loop {
            let base = &bases[attempt % bases.len()];
            attempt += 1;
            let started = Instant::now();
            let res = http
                .post(format!("{base}/v1/threads/{}/deltas", enc(&id)))
                .header("idempotency-key", format!("k{i}"))
                .json(&delta)
                .send()
                .await;
            let took = started.elapsed();
            let (status, body) = match res {
                Ok(r) => (r.status().as_u16(), r.json::<Value>().await.ok()),
                Err(e) => {
                    assert!(!e.is_timeout(), "an append hung for {HANG:?} on {base}");
                    (0, None)
                }
            };
            {
                let mut o = observed.lock().unwrap();
                o.answers.push((Instant::now(), took, status));
                if status == 200 {
                    let v = body.unwrap()["version"].as_u64().unwrap();
                    o.oracle.entry(id.clone()).or_default().push((v, text));
                    break;
                }
            }
            assert!(
                status == 503 || status == 0,
                "an outage answers 503, got {status} from {base}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        i += 1;
        tokio::time::sleep(PACE).await;
    }
}

/// Follows `id` from version 0 until it has seen `target` (once known), reconnecting to the
/// next replica with `Last-Event-ID` whenever a stream ends, breaks or goes quiet. Returns
/// every version seen, in order.
async fn follower(
    bases: Vec<String>,
    id: String,
    target: watch::Receiver<Option<u64>>,
) -> Vec<u64> {
    let http = reqwest::Client::new();
    let mut seen: Vec<u64> = Vec::new();
    let mut n = 0usize;
    loop {
        let last = seen.last().copied().unwrap_or(0);
        if target.borrow().is_some_and(|t| last >= t) {
            return seen;
        }
        let base = &bases[n % bases.len()];
        n += 1;
        let url = format!("{base}/v1/threads/{}/events", enc(&id));
        let Ok(mut sse) = Sse::open(&http, &url, Some(last), HANG).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while let Some(e) = sse.next(Duration::from_secs(2)).await {
            assert_ne!(e.event, "reset", "{id}: reset after {last} on {base}");
            if let Some(v) = e.id {
                let expected = seen.last().copied().unwrap_or(0) + 1;
                assert_eq!(
                    v,
                    expected,
                    "{id} on {base}: version {v} after {:?} (a gap or a repeat)",
                    seen.last()
                );
                seen.push(v);
            }
            if target
                .borrow()
                .is_some_and(|t| seen.last().copied().unwrap_or(0) >= t)
            {
                return seen;
            }
        }
    }
}

async fn stream_leader(urls: &str, stream: &str) -> String {
    let addrs: Vec<async_nats::ServerAddr> = urls.split(',').map(|u| u.parse().unwrap()).collect();
    let client = async_nats::connect(addrs).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(stream).await.unwrap();
    let info = s.info().await.unwrap();
    let cluster = info.cluster.clone().expect("a clustered stream");
    assert_eq!(info.config.num_replicas, 3);
    cluster.leader.expect("a leader")
}

#[tokio::test]
async fn three_replicas_survive_the_loss_of_the_stream_leader() {
    let mut cluster = NatsCluster::start(3).await;
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let urls = cluster.urls();
    let store = schema.url();
    let args = [
        "--store",
        &store,
        "--nats-url",
        &urls,
        "--nats-prefix",
        &prefix,
        "--nats-replicas",
        "3",
        "--fold-idle",
        "2s",
        "--sse-keepalive",
        "1s",
        "--startup-timeout",
        "60s",
    ];
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(Process::spawn(&args).await);
    }
    let bases: Vec<String> = gateways.iter().map(Process::base).collect();
    let http = reqwest::Client::builder().timeout(HANG).build().unwrap();
    let ids: Vec<String> = (0..THREADS).map(|i| format!("thread {i} ✓")).collect();
    for id in &ids {
        let res = http
            .post(format!("{}/v1/threads", bases[0]))
            .json(&json!({"id": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }

    // Every thread followed on every replica; every thread written through all of them.
    let mut targets = HashMap::new();
    let mut followers = Vec::new();
    for id in &ids {
        let (target_tx, target_rx) = watch::channel(None);
        targets.insert(id.clone(), target_tx);
        for k in 0..bases.len() {
            let mut rotated = bases.clone();
            rotated.rotate_left(k);
            let f = follower(rotated, id.clone(), target_rx.clone());
            followers.push((id.clone(), tokio::spawn(f)));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let observed = Arc::new(Mutex::new(Observed::default()));
    let writers: Vec<_> = ids
        .iter()
        .map(|id| {
            tokio::spawn(writer(
                bases.clone(),
                id.clone(),
                stop.clone(),
                observed.clone(),
            ))
        })
        .collect();

    let acked = |o: &Arc<Mutex<Observed>>| {
        o.lock()
            .unwrap()
            .oracle
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    crate::support::eventually(HANG, || async { acked(&observed) >= 60 }).await;
    let leader = stream_leader(&urls, &format!("{prefix}_log")).await;
    let killed_at = Instant::now();
    cluster.node(&leader).kill();
    // Appends go on (after a short run of 503s) on the two nodes left.
    let before = acked(&observed);
    crate::support::eventually(HANG, || async { acked(&observed) >= before + 60 }).await;
    let recovered_in = killed_at.elapsed();
    cluster.node(&leader).restart().await;
    let before = acked(&observed);
    crate::support::eventually(HANG, || async { acked(&observed) >= before + 60 }).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("a writer failed");
    }

    let observed = Arc::try_unwrap(observed)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    // The oracle: each thread's acknowledged versions are 1, 2, 3, ... with no gap.
    for (id, acks) in &observed.oracle {
        for (i, (v, _)) in acks.iter().enumerate() {
            assert_eq!(*v, i as u64 + 1, "{id}: acknowledged versions in order");
        }
    }
    let finals: HashMap<&String, u64> = ids
        .iter()
        .map(|id| (id, observed.oracle[id].len() as u64))
        .collect();

    // Every follower sees every version once, up to the final one.
    for (id, target) in &targets {
        target.send_replace(Some(finals[id]));
    }
    for (id, f) in followers {
        let seen = tokio::time::timeout(Duration::from_secs(120), f)
            .await
            .unwrap_or_else(|_| panic!("a follower of {id} never reached the end"))
            .expect("a follower failed");
        assert_eq!(seen.len() as u64, finals[&id], "{id}: every version once");
    }

    // Every replica's live view, and the store after a fold, is exactly the oracle.
    for id in &ids {
        let want: Vec<&str> = observed.oracle[id]
            .iter()
            .map(|(_, t)| t.as_str())
            .collect();
        for base in &bases {
            let t: Value = http
                .get(format!("{base}/v1/threads/{}?view=live", enc(id)))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let got: Vec<&str> = t["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["content"].as_str().unwrap())
                .collect();
            assert_eq!(got, want, "{id} on {base}");
            assert_eq!(t["version"], finals[id]);
        }
        let flushed = http
            .post(format!("{}/v1/threads/{}/flush", bases[1], enc(id)))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(flushed.status(), StatusCode::OK);
        let t: Value = http
            .get(format!("{}/v1/threads/{}", bases[2], enc(id)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got: Vec<&str> = t["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(got, want, "{id} in the store");
    }

    // The outage: how many appends failed, over how long, and the slowest answer.
    let failed: Vec<&(Instant, Duration, u16)> =
        observed.answers.iter().filter(|a| a.2 != 200).collect();
    let window = match (failed.first(), failed.last()) {
        (Some(f), Some(l)) => l.0 - f.0,
        _ => Duration::ZERO,
    };
    let slowest = observed.answers.iter().map(|a| a.1).max().unwrap();
    let acked_total: usize = observed.oracle.values().map(Vec::len).sum();
    eprintln!(
        "cluster: leader {leader} killed; {acked_total} appends acknowledged, {} failed \
         attempts (503 or no answer) within {window:?}, appends flowing again {recovered_in:?} \
         after the kill, slowest answer {slowest:?}",
        failed.len()
    );
    assert!(
        window < Duration::from_secs(30),
        "the outage is a short run of 503s: {window:?}"
    );

    for mut g in gateways {
        g.terminate().await;
    }
    drop(schema);
}
