//! `follow`: every version exactly once across gateway restarts and dead connections, and the
//! stream's ends (`reset`, `deleted`, a missing thread, a gateway that stays away).

use crate::harness::{Gateway, LossyProxy, Mode, client_for};
use futures::StreamExt;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use threadgate_client::{LiveEvent, LiveStream, ThreadReader, ThreadWriter, ThreadgateStore};
use tirea_contract::storage::{ThreadStoreError, VersionPrecondition};
use tirea_contract::{CheckpointReason, Message, Thread, ThreadChangeSet};
use tokio::sync::mpsc;

/// Longest wait for one event in these tests.
const EVENT_WAIT: Duration = Duration::from_secs(20);

fn said(text: &str) -> ThreadChangeSet {
    ThreadChangeSet::from_parts(
        "run",
        None,
        CheckpointReason::AssistantTurnCommitted,
        vec![Arc::new(Message::assistant(text))],
        vec![],
        vec![],
        None,
    )
}

/// Drives a follow stream in the background, forwarding every item.
fn collect(mut stream: LiveStream) -> mpsc::UnboundedReceiver<Result<LiveEvent, String>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            if tx.send(item.map_err(|e| format!("{e:?}"))).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next write event (skipping `flushed` notices).
async fn next_write(rx: &mut mpsc::UnboundedReceiver<Result<LiveEvent, String>>) -> LiveEvent {
    loop {
        let item = tokio::time::timeout(EVENT_WAIT, rx.recv())
            .await
            .expect("an event within the deadline")
            .expect("the stream goes on");
        match item {
            Ok(LiveEvent::Flushed { .. }) => continue,
            Ok(e) => return e,
            Err(e) => panic!("stream error: {e}"),
        }
    }
}

fn text(e: &LiveEvent) -> (u64, String) {
    match e {
        LiveEvent::Delta { version, delta } => (*version, delta.messages[0].content.clone()),
        other => panic!("expected a delta, got {other:?}"),
    }
}

/// Two graceful restarts of the gateway (same address, same store) while a client follows:
/// it reconnects with `Last-Event-ID` and sees versions 1..=12 once each, in order, including
/// the ones appended while it was reconnecting.
async fn every_version_once_across_restarts(mode: Mode) {
    let mut gw = Gateway::start(mode).await;
    let store = gw.client();
    store.create(&Thread::new("f")).await.unwrap();
    let mut rx = collect(store.follow("f", 0));

    let mut seen = Vec::new();
    for round in 0..3u64 {
        for i in 1..=4u64 {
            let v = round * 4 + i;
            let c = store
                .append("f", &said(&format!("step {v}")), VersionPrecondition::Any)
                .await
                .unwrap();
            assert_eq!(c.version, v);
        }
        // Half the round is seen before the restart, the rest is replayed after it.
        for _ in 0..2 {
            seen.push(text(&next_write(&mut rx).await));
        }
        if round < 2 {
            gw.restart().await;
        }
    }
    while seen.len() < 12 {
        seen.push(text(&next_write(&mut rx).await));
    }
    let want: Vec<(u64, String)> = (1..=12).map(|v| (v, format!("step {v}"))).collect();
    assert_eq!(seen, want);
    // And nothing more: no duplicate is still on its way.
    store
        .append("f", &said("step 13"), VersionPrecondition::Any)
        .await
        .unwrap();
    assert_eq!(text(&next_write(&mut rx).await), (13, "step 13".into()));
    gw.stop().await;
}

#[tokio::test]
async fn every_version_once_across_restarts_direct() {
    every_version_once_across_restarts(Mode::Postgres).await;
}

#[tokio::test]
async fn every_version_once_across_restarts_buffered() {
    every_version_once_across_restarts(Mode::Buffered).await;
}

/// A memory gateway, a proxy that can stall, thread `s` followed through the proxy with
/// short deadlines, and its first write (version 1, "one") already delivered.
async fn following_through_a_proxy() -> (
    Gateway,
    LossyProxy,
    ThreadgateStore,
    mpsc::UnboundedReceiver<Result<LiveEvent, String>>,
) {
    let gw = Gateway::start(Mode::Memory).await;
    let proxy = LossyProxy::start(gw.addr).await;
    let store = client_for(&gw.base());
    store.create(&Thread::new("s")).await.unwrap();
    let follower = ThreadgateStore::builder(proxy.base())
        .follow_idle_timeout(Duration::from_millis(300))
        .timeout(Duration::from_millis(500))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .unwrap();
    let mut rx = collect(follower.follow("s", 0));
    store
        .append("s", &said("one"), VersionPrecondition::Any)
        .await
        .unwrap();
    assert_eq!(text(&next_write(&mut rx).await), (1, "one".into()));
    (gw, proxy, store, rx)
}

/// A connection that goes silent (the path dies, no FIN) is noticed by the idle deadline and
/// replaced; the stream continues after the last version it delivered.
#[tokio::test]
async fn a_silent_connection_is_replaced() {
    let (gw, proxy, store, mut rx) = following_through_a_proxy().await;

    proxy.stall(true);
    store
        .append("s", &said("two"), VersionPrecondition::Any)
        .await
        .unwrap();
    // Long enough for the idle deadline and a reconnect that stalls too.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.stall(false);
    assert_eq!(text(&next_write(&mut rx).await), (2, "two".into()));
    store
        .append("s", &said("three"), VersionPrecondition::Any)
        .await
        .unwrap();
    assert_eq!(text(&next_write(&mut rx).await), (3, "three".into()));
    gw.stop().await;
}

/// A thread deleted and created again while the stream was away is not continued into: the
/// reconnect names the life it followed, and the gateway answers `reset`.
#[tokio::test]
async fn a_thread_created_again_while_away_is_a_reset() {
    let (gw, proxy, store, mut rx) = following_through_a_proxy().await;

    proxy.stall(true);
    store.delete("s").await.unwrap();
    store.create(&Thread::new("s")).await.unwrap();
    for t in ["new one", "new two"] {
        store
            .append("s", &said(t), VersionPrecondition::Any)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.stall(false);
    let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("the stream has an item");
    assert!(
        matches!(next, Ok(LiveEvent::Reset { version: 2 })),
        "a reset to the new life's version, not its writes: {next:?}"
    );
    gw.stop().await;
}

/// How a stream ends: `reset` for a position the gateway cannot continue, `deleted`, and an
/// error for a missing thread or a bad id; a full save arrives as a snapshot.
#[tokio::test]
async fn stream_ends_and_snapshots() {
    let gw = Gateway::start(Mode::Memory).await;
    let store = gw.client();

    let mut missing = store.follow("nope", 0);
    let first = missing.next().await.expect("one item");
    assert!(
        matches!(first, Err(ThreadStoreError::NotFound(ref id)) if id == "nope"),
        "{first:?}"
    );
    assert!(missing.next().await.is_none(), "and the end");
    let mut bad = store.follow("tab\there", 0);
    assert!(matches!(
        bad.next().await,
        Some(Err(ThreadStoreError::InvalidId(_)))
    ));
    assert!(bad.next().await.is_none());

    store.create(&Thread::new("z")).await.unwrap();
    let mut ahead = store.follow("z", 5);
    assert!(matches!(
        ahead.next().await,
        Some(Ok(LiveEvent::Reset { version: 0 }))
    ));
    assert!(ahead.next().await.is_none(), "reset ends the stream");

    let mut rx = collect(store.follow("z", 0));
    store
        .append("z", &said("hi"), VersionPrecondition::Any)
        .await
        .unwrap();
    let mut saved = store.load("z").await.unwrap().unwrap().thread;
    saved.state = json!({"saved": true});
    store.save(&saved).await.unwrap();
    store.delete("z").await.unwrap();
    assert_eq!(text(&next_write(&mut rx).await), (1, "hi".into()));
    match next_write(&mut rx).await {
        LiveEvent::Snapshot { version, thread } => {
            assert_eq!(version, 2);
            assert_eq!(thread.state, json!({"saved": true}));
            assert_eq!(thread.messages.len(), 1);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    assert!(matches!(next_write(&mut rx).await, LiveEvent::Deleted));
    let end = tokio::time::timeout(EVENT_WAIT, rx.recv()).await.unwrap();
    assert!(end.is_none(), "deleted ends the stream: {end:?}");
    gw.stop().await;
}

/// A gateway that never comes back: the stream gives up after its reconnect budget.
#[tokio::test]
async fn follow_gives_up_when_the_gateway_stays_away() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = ThreadgateStore::builder(format!("http://127.0.0.1:{port}"))
        .follow_reconnects(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .build()
        .unwrap();
    let mut s = store.follow("t", 0);
    let item = tokio::time::timeout(EVENT_WAIT, s.next()).await.unwrap();
    match item {
        Some(Err(ThreadStoreError::Io(io))) => assert!(io.to_string().contains("3 times"), "{io}"),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(s.next().await.is_none());
}
