//! Retry safety: answers lost after the gateway applied the request, unreachable gateways and
//! a gateway answering `503` while its NATS is down.

use crate::harness::{Gateway, LossyProxy, Mode, NatsServer, client_for};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use threadgate_client::{ThreadReader, ThreadWriter, ThreadgateStore};
use tirea_contract::storage::{ThreadStoreError, VersionPrecondition};
use tirea_contract::{CheckpointReason, Message, Thread, ThreadChangeSet};
use tirea_state::{Op, Patch, TrackedPatch, path};

/// A step whose duplication would show: a message without an id (never de-duplicated) and
/// an increment.
fn step(text: &str) -> ThreadChangeSet {
    let message = Message {
        id: None,
        ..Message::assistant(text)
    };
    let mut d = ThreadChangeSet::from_parts(
        "run",
        None,
        CheckpointReason::AssistantTurnCommitted,
        vec![Arc::new(message)],
        vec![],
        vec![],
        None,
    );
    d.patches = vec![TrackedPatch::new(
        Patch::new().with_op(Op::increment(path!("n"), 1)),
    )];
    d
}

async fn lost_answers_are_not_applied_twice(mode: Mode) {
    let gw = Gateway::start(mode).await;
    let proxy = LossyProxy::start(gw.addr).await;
    let store = client_for(&proxy.base());

    // create: the retry finds the thread it created, rather than reporting AlreadyExists.
    let created = Thread::with_initial_state("r", json!({"n": 0}));
    proxy.lose_next(1);
    assert_eq!(store.create(&created).await.unwrap().version, 0);
    assert_eq!(proxy.lost(), 1, "the first answer to the create was lost");

    // append, without and with a precondition: the retry answers the first version.
    proxy.lose_next(1);
    let c = store
        .append("r", &step("one"), VersionPrecondition::Any)
        .await
        .unwrap();
    assert_eq!(proxy.lost(), 2);
    assert_eq!(c.version, 1);
    proxy.lose_next(1);
    let c = store
        .append("r", &step("two"), VersionPrecondition::Exact(1))
        .await
        .unwrap();
    assert_eq!(proxy.lost(), 3);
    assert_eq!(c.version, 2);
    let head = store.load("r").await.unwrap().unwrap();
    assert_eq!(head.version, 2, "each append applied once");
    let texts: Vec<&str> = head
        .thread
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(texts, ["one", "two"]);
    assert_eq!(head.thread.rebuild_state().unwrap(), json!({"n": 2}));

    // save: the retry sees its write done and does not write again (one version, not two).
    let mut saved = head.thread.clone();
    saved.state = json!({"n": 40});
    saved.patches.clear();
    proxy.lose_next(1);
    store.save(&saved).await.unwrap();
    assert_eq!(proxy.lost(), 4);
    let head = store.load("r").await.unwrap().unwrap();
    assert_eq!(head.version, 3);
    assert_eq!(head.thread.state, json!({"n": 40}));

    // delete: a retry finds nothing left to delete, which is success.
    proxy.lose_next(1);
    store.delete("r").await.unwrap();
    assert_eq!(proxy.lost(), 5);
    assert!(store.load("r").await.unwrap().is_none());

    // The premise: the proxy loses answers to requests the gateway did apply, so a client
    // that retried blindly would have applied them twice.
    store.create(&created).await.unwrap();
    let raw = reqwest::Client::new();
    proxy.lose_next(1);
    let res = raw
        .post(format!("{}/v1/threads/r/deltas", proxy.base()))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&step("blind")).unwrap())
        .send()
        .await;
    assert!(res.is_err(), "the answer was lost");
    assert_eq!(
        store.load("r").await.unwrap().unwrap().version,
        1,
        "but applied"
    );
    gw.stop().await;
}

#[tokio::test]
async fn lost_answers_are_not_applied_twice_direct() {
    lost_answers_are_not_applied_twice(Mode::Memory).await;
}

#[tokio::test]
async fn lost_answers_are_not_applied_twice_buffered() {
    lost_answers_are_not_applied_twice(Mode::Buffered).await;
}

/// Nothing listens: bounded retries, then `Io` (connection refused), quickly.
#[tokio::test]
async fn unreachable_gateway_is_io_after_bounded_retries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = ThreadgateStore::builder(format!("http://127.0.0.1:{port}"))
        .retries(3)
        .backoff(Duration::from_millis(20), Duration::from_millis(40))
        .build()
        .unwrap();
    let started = Instant::now();
    let e = store.load("t").await.unwrap_err();
    match &e {
        ThreadStoreError::Io(io) => {
            assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused, "{io}");
            assert!(io.to_string().contains("4 attempt(s)"), "{io}");
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after {:?}",
        started.elapsed()
    );
}

/// Buffered mode with NATS down: the gateway answers `503` (and keeps the store as it was);
/// the client retries, surfaces `Io` when its budget runs out, and succeeds once NATS is back
/// within the budget.
#[tokio::test]
async fn unavailable_is_retried_then_io() {
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    let gw = Gateway::start_with(Mode::Buffered, |c| c.nats_url = Some(url)).await;
    let store = gw.client();
    store
        .create(&Thread::with_initial_state("u", json!({"n": 0})))
        .await
        .unwrap();
    store
        .append("u", &step("before"), VersionPrecondition::Any)
        .await
        .unwrap();

    nats.kill();
    let impatient = ThreadgateStore::builder(gw.base())
        .retries(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let e = impatient
        .append("u", &step("during"), VersionPrecondition::Any)
        .await
        .unwrap_err();
    match &e {
        ThreadStoreError::Io(io) => {
            assert!(io.to_string().contains("503"), "{io}");
            assert!(io.to_string().contains("3 attempt(s)"), "{io}");
        }
        other => panic!("expected Io, got {other:?}"),
    }

    // NATS comes back while a patient client is still retrying.
    let patient = ThreadgateStore::builder(gw.base())
        .retries(100)
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .unwrap();
    let append = tokio::spawn(async move {
        patient
            .append("u", &step("after"), VersionPrecondition::Any)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.restart().await;
    let c = append.await.unwrap().expect("succeeds once NATS is back");
    let head = store.load("u").await.unwrap().unwrap();
    assert_eq!(head.version, c.version);
    let texts: Vec<&str> = head
        .thread
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    // The 503s lost nothing and applied nothing; the retried append applied once.
    assert_eq!(texts, ["before", "after"]);
    gw.stop().await;
}
