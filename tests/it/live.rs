//! Live events (`GET /v1/threads/{id}/events`, Server-Sent Events) end to end over real HTTP,
//! in direct mode on every backend and in buffered mode on NATS: gap-free handoff from a
//! snapshot under concurrent appends, replay from the store and the log, `reset`,
//! `Last-Event-ID`, snapshots, deletes, slow consumers, any replica, graceful shutdown.

use crate::each_backend;
use crate::harness::{Backend, Gateway, NatsServer, enc, expect_problem, nats_prefix, nats_url};
use crate::pg::PgSchema;
use crate::support::sse::{Ev, Sse};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use threadgate::config::Config;
use threadgate::id::ThreadId;

/// Asserts a `delta` at `version` whose message says `v<version>`.
fn assert_delta(e: &Ev, version: u64) {
    let short = || {
        let mut s = format!("{e:?}");
        s.truncate(300);
        s
    };
    assert_eq!(e.event, "delta", "{}", short());
    assert_eq!(e.id, Some(version), "{}", short());
    assert_eq!(e.data["version"], version, "{}", short());
    assert_eq!(
        content(e).split(' ').next().unwrap(),
        format!("v{version}"),
        "{}",
        short()
    );
}

fn content(e: &Ev) -> &str {
    e.data["delta"]["messages"][0]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("a message in {e:?}"))
}

/// The delta every test appends as version `v`: one assistant message `v<v>` (plus padding).
fn step(v: u64, pad: usize) -> Value {
    let text = if pad == 0 {
        format!("v{v}")
    } else {
        format!("v{v} {}", "x".repeat(pad))
    };
    json!({"run_id": "r", "reason": "AssistantTurnCommitted",
        "messages": [{"role": "assistant", "content": text}], "patches": []})
}

/// Appends through any client; returns the version it produced.
async fn append(http: &reqwest::Client, base: &str, id: &str, delta: &Value) -> u64 {
    let res = http
        .post(format!("{base}/v1/threads/{}/deltas", enc(id)))
        .json(delta)
        .send()
        .await
        .expect("append reaches the gateway");
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "append: {body}");
    body["version"].as_u64().unwrap()
}

/// Appends `from..=to` (each `step(v)`), asserting each gets its expected version.
async fn append_steps(gw: &Gateway, id: &str, from: u64, to: u64) {
    for v in from..=to {
        assert_eq!(append(&gw.http, &gw.base, id, &step(v, 0)).await, v);
    }
}

/// A metric's value from `/metrics`.
async fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = gw.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("metric {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

fn buffered_config(store: &str, prefix: &str) -> Config {
    let mut c = Config::for_tests(store);
    c.nats_url = Some(nats_url());
    c.nats_prefix = prefix.to_owned();
    c
}

async fn buffered(backend: Backend) -> Gateway {
    Gateway::start_buffered(backend, &nats_url(), |_| {}).await
}

// ---------------------------------------------------------------------------------------
// (1) The race: appends at full speed while many clients hand off from a snapshot to the
// stream; each must see V+1, V+2, … with no gap and no repeat.

const RACE_CLIENTS: usize = 20;
const RACE_ITERATIONS: usize = 30;
/// Events each handoff checks after its snapshot.
const RACE_AHEAD: u64 = 3;

/// `views`: the snapshot views clients alternate between; `run_every`: every n-th append is
/// a `RunFinished` (in buffered mode it folds the run into the store mid-race).
async fn race(gw: Gateway, views: &[&'static str], run_every: Option<u64>) {
    gw.create(json!({"id": "race"})).await;
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let (http, base, stop) = (gw.http.clone(), gw.base.clone(), stop.clone());
        tokio::spawn(async move {
            let mut v = 0;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                let mut delta = step(v, 0);
                if run_every.is_some_and(|n| v % n == 0) {
                    delta["reason"] = "RunFinished".into();
                }
                assert_eq!(append(&http, &base, "race", &delta).await, v);
            }
            v
        })
    };
    let mut clients = Vec::new();
    for c in 0..RACE_CLIENTS {
        let (http, base) = (reqwest::Client::new(), gw.base.clone());
        let views = views.to_vec();
        clients.push(tokio::spawn(async move {
            for i in 0..RACE_ITERATIONS {
                let view = views[(c + i) % views.len()];
                let snap: Value = http
                    .get(format!("{base}/v1/threads/race?view={view}"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let v = snap["version"].as_u64().expect("snapshot version");
                assert_eq!(
                    snap["messages"].as_array().unwrap().len() as u64,
                    v,
                    "the {view} snapshot at {v} holds exactly {v} messages"
                );
                let url = format!("{base}/v1/threads/race/events?after={v}");
                let mut sse = Sse::open_with(&http, &url, None).await;
                for k in 1..=RACE_AHEAD {
                    let e = sse.write().await;
                    assert_delta(&e, v + k);
                }
            }
        }));
    }
    for c in clients {
        c.await.expect("client handoffs saw no gap and no repeat");
    }
    stop.store(true, Ordering::Relaxed);
    let appended = appender.await.unwrap();
    assert!(appended > RACE_AHEAD);
    gw.stop().await;
}

macro_rules! race_direct {
    ($($name:ident: $backend:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                race(Gateway::start($backend).await, &["store"], None).await
            }
        )*
    };
}

race_direct!(
    race_direct_memory: Backend::Memory,
    race_direct_file: Backend::File,
    race_direct_postgres: Backend::Postgres,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_buffered_memory() {
    race(
        buffered(Backend::Memory).await,
        &["store", "live"],
        Some(25),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_buffered_postgres() {
    race(
        buffered(Backend::Postgres).await,
        &["store", "live"],
        Some(25),
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Direct mode on every backend.

each_backend!(
    replay_from_history,
    reset_beyond_retention,
    last_event_id_resume,
    snapshot_replace_metadata_delete,
    errors_before_any_event,
);

/// (2) Replay after V from the store's history, then live, across runs.
async fn replay_from_history(gw: Gateway) {
    gw.create(json!({"id": "h"})).await;
    append_steps(&gw, "h", 1, 10).await;
    let mut sse = Sse::open(&gw, "/v1/threads/h/events?after=3").await;
    for v in 4..=10 {
        assert_delta(&sse.write().await, v);
    }
    append_steps(&gw, "h", 11, 12).await;
    // A run ends and the next one starts: the stream follows the thread.
    let mut fin = step(13, 0);
    fin["reason"] = "RunFinished".into();
    assert_eq!(append(&gw.http, &gw.base, "h", &fin).await, 13);
    let mut next = step(14, 0);
    next["run_id"] = "r2".into();
    assert_eq!(append(&gw.http, &gw.base, "h", &next).await, 14);
    for v in 11..=14 {
        assert_delta(&sse.write().await, v);
    }
    // Without a position the stream starts at the head.
    let mut head = Sse::open(&gw, "/v1/threads/h/events").await;
    append_steps(&gw, "h", 15, 15).await;
    assert_delta(&head.write().await, 15);
    assert_delta(&sse.write().await, 15);
    // after=0 replays everything still kept.
    let mut all = Sse::open(&gw, "/v1/threads/h/events?after=0").await;
    for v in 1..=15 {
        assert_delta(&all.write().await, v);
    }
    gw.stop().await;
}

/// (3) A position older than the kept history answers `reset` with the current version and
/// ends; with `snapshot=true` a fresh snapshot replaces the reset. A position ahead of the
/// thread is not one of its positions: `reset` too.
async fn reset_beyond_retention(gw: Gateway) {
    let limit = threadgate::store::HISTORY_LIMIT as u64;
    let head = limit + 10;
    gw.create(json!({"id": "old"})).await;
    append_steps(&gw, "old", 1, head).await;

    let mut sse = Sse::open(&gw, "/v1/threads/old/events?after=1").await;
    let e = sse.event().await.unwrap();
    assert_eq!(e.event, "reset", "{e:?}");
    assert_eq!(e.id, None, "reset never moves Last-Event-ID");
    assert_eq!(e.data, json!({"version": head}));
    sse.expect_end().await;

    // The oldest kept write still replays.
    let kept_from = head - limit + 1;
    let mut sse = Sse::open(
        &gw,
        &format!("/v1/threads/old/events?after={}", kept_from - 1),
    )
    .await;
    assert_delta(&sse.write().await, kept_from);
    drop(sse);
    let mut sse = Sse::open(
        &gw,
        &format!("/v1/threads/old/events?after={}", kept_from - 2),
    )
    .await;
    assert_eq!(sse.event().await.unwrap().event, "reset");

    let mut sse = Sse::open(&gw, "/v1/threads/old/events?after=1&snapshot=true").await;
    let e = sse.event().await.unwrap();
    assert_eq!(e.event, "snapshot", "{e:?}");
    assert_eq!(e.id, Some(head));
    assert_eq!(e.data["version"], head);
    assert_eq!(
        e.data["thread"]["messages"].as_array().unwrap().len() as u64,
        head
    );
    append_steps(&gw, "old", head + 1, head + 1).await;
    assert_delta(&sse.write().await, head + 1);

    let mut sse = Sse::open(&gw, &format!("/v1/threads/old/events?after={}", head + 5)).await;
    let e = sse.event().await.unwrap();
    assert_eq!(e.event, "reset");
    assert_eq!(e.data, json!({"version": head + 1}));
    sse.expect_end().await;
    gw.stop().await;
}

/// (4) A browser's reconnect sends `Last-Event-ID` and repeats the URL it was opened with:
/// the later of the two positions wins, so the reconnect never replays what it had.
async fn last_event_id_resume(gw: Gateway) {
    gw.create(json!({"id": "r"})).await;
    let mut sse = Sse::open(&gw, "/v1/threads/r/events?snapshot=true").await;
    let first = sse.event().await.unwrap();
    assert_eq!((first.event.as_str(), first.id), ("snapshot", Some(0)));
    append_steps(&gw, "r", 1, 3).await;
    let mut last = 0;
    for v in 1..=3 {
        let e = sse.write().await;
        assert_delta(&e, v);
        last = e.id.unwrap();
    }
    drop(sse); // the connection drops…
    append_steps(&gw, "r", 4, 6).await; // …while the agent keeps writing
    let url = gw.url("/v1/threads/r/events?snapshot=true");
    let mut sse = Sse::open_with(&gw.http, &url, Some(&last.to_string())).await;
    for v in 4..=6 {
        assert_delta(&sse.write().await, v);
    }
    let url = gw.url("/v1/threads/r/events?after=1");
    let mut sse = Sse::open_with(&gw.http, &url, Some("5")).await;
    assert_delta(&sse.write().await, 6);
    let url = gw.url("/v1/threads/r/events?after=4");
    let mut sse = Sse::open_with(&gw.http, &url, Some("2")).await;
    assert_delta(&sse.write().await, 5);
    gw.stop().await;
}

/// (6) `snapshot=true` starts with the thread; a full save is a `snapshot`, a metadata patch a
/// `metadata` event; a delete is `deleted` and ends every stream of the thread.
async fn snapshot_replace_metadata_delete(gw: Gateway) {
    gw.create(json!({"id": "s", "state": {"n": 1}, "metadata": {"title": "A"}}))
        .await;
    append_steps(&gw, "s", 1, 2).await;
    let mut sse = Sse::open(&gw, "/v1/threads/s/events?snapshot=true").await;
    let e = sse.event().await.unwrap();
    assert_eq!((e.event.as_str(), e.id), ("snapshot", Some(2)));
    let got = gw.get_json("/v1/threads/s").await;
    let mut expected = got.clone();
    expected.as_object_mut().unwrap().remove("version");
    assert_eq!(e.data, json!({"version": 2, "thread": expected}));
    let mut tail = Sse::open(&gw, "/v1/threads/s/events?after=2").await;

    let res = gw
        .send(
            reqwest::Method::PUT,
            "/v1/threads/s",
            Some(
                &json!({"state": {"n": 7}, "messages": [{"role": "user", "content": "fresh"}],
                "metadata": {"title": "B", "version": 99}}),
            ),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = gw
        .send(
            reqwest::Method::PATCH,
            "/v1/threads/s",
            Some(&json!({"title": "C", "gone": null})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    append_steps(&gw, "s", 5, 5).await;
    for s in [&mut sse, &mut tail] {
        let e = s.write().await;
        assert_eq!((e.event.as_str(), e.id), ("snapshot", Some(3)), "{e:?}");
        assert_eq!(e.data["version"], 3);
        assert_eq!(e.data["thread"]["id"], "s");
        assert_eq!(e.data["thread"]["state"], json!({"n": 7}));
        assert_eq!(e.data["thread"]["messages"][0]["content"], "fresh");
        assert_eq!(
            e.data["thread"]["metadata"],
            json!({"title": "B"}),
            "the thread as saved: server keys are the server's"
        );
        let e = s.write().await;
        assert_eq!((e.event.as_str(), e.id), ("metadata", Some(4)), "{e:?}");
        assert_eq!(
            e.data,
            json!({"version": 4, "metadata": {"title": "C", "gone": null}})
        );
        assert_delta(&s.write().await, 5);
    }
    // The same events replay from the history.
    let mut replay = Sse::open(&gw, "/v1/threads/s/events?after=2").await;
    let e = replay.write().await;
    assert_eq!(
        (e.event.as_str(), e.data["thread"]["state"].clone()),
        ("snapshot", json!({"n": 7}))
    );
    assert_eq!(replay.write().await.event, "metadata");
    assert_delta(&replay.write().await, 5);

    let res = gw
        .send(reqwest::Method::DELETE, "/v1/threads/s", None)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    for s in [&mut sse, &mut tail, &mut replay] {
        let e = s.event().await.unwrap();
        assert_eq!(e.event, "deleted", "{e:?}");
        assert_eq!(e.id, None);
        s.expect_end().await;
    }
    // A thread of the same id created afterwards has a stream of its own.
    gw.create(json!({"id": "s"})).await;
    let mut again = Sse::open(&gw, "/v1/threads/s/events?after=0").await;
    append_steps(&gw, "s", 1, 1).await;
    assert_delta(&again.write().await, 1);
    gw.stop().await;
}

/// (5) A missing thread is a 404 and a malformed position a 400, before any event.
async fn errors_before_any_event(gw: Gateway) {
    expect_problem(
        gw.get("/v1/threads/nope/events").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        gw.get("/v1/threads/nope/events?after=3").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        gw.get("/v1/threads/nope/events?snapshot=true").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    gw.create(json!({"id": "e"})).await;
    for bad in [
        "after=x",
        "after=-1",
        "after=1.5",
        "snapshot=maybe",
        "since=3",
    ] {
        let p = expect_problem(
            gw.get(&format!("/v1/threads/e/events?{bad}")).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        )
        .await;
        assert!(
            p["detail"].as_str().unwrap().contains("query parameter"),
            "{p}"
        );
    }
    for bad in ["x", "-1", "1 2"] {
        let res = gw
            .http
            .get(gw.url("/v1/threads/e/events"))
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        let p = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_header").await;
        assert_eq!(p["field"], "Last-Event-ID");
    }
    expect_problem(
        gw.get("/v1/threads/a%09b/events").await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    )
    .await;
    gw.stop().await;
}

/// Keep-alive comments carry the version the stream has reached.
#[tokio::test]
async fn keepalive_carries_the_head_version() {
    for buffered_mode in [false, true] {
        let tweak = |c: &mut Config| c.sse_keepalive = Duration::from_millis(200);
        let gw = if buffered_mode {
            Gateway::start_buffered(Backend::Memory, &nats_url(), tweak).await
        } else {
            Gateway::start_with(Backend::Memory, tweak).await
        };
        gw.create(json!({"id": "k"})).await;
        append_steps(&gw, "k", 1, 4).await;
        let mut sse = Sse::open(&gw, "/v1/threads/k/events?after=2").await;
        assert_delta(&sse.write().await, 3);
        assert_delta(&sse.write().await, 4);
        let e = sse.frame().await.unwrap();
        assert_eq!(
            e,
            Ev {
                event: ":".into(),
                id: None,
                data: "keep-alive 4".into()
            }
        );
        append_steps(&gw, "k", 5, 5).await;
        assert_delta(&sse.write().await, 5);
        let e = sse.frame().await.unwrap();
        assert_eq!(e.data, "keep-alive 5");
        gw.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// Buffered mode.

/// (2) Replay after V from the log, and across a fold from the store's history (the log
/// trimmed as it is once the duplicate window has passed); `flushed` after a run ends; the
/// stream follows the thread into the next run.
#[tokio::test]
async fn buffered_replay_across_a_fold() {
    for backend in [Backend::Memory, Backend::Postgres] {
        let prefix = nats_prefix();
        let (store, schema) = match backend {
            Backend::Postgres => {
                let s = PgSchema::create().await;
                (s.url(), Some(s))
            }
            _ => ("memory:".to_owned(), None),
        };
        let gw = Gateway::start_config(buffered_config(&store, &prefix), None, schema).await;
        gw.create(json!({"id": "b.1"})).await;
        append_steps(&gw, "b.1", 1, 5).await;
        // From the log alone (nothing folded yet).
        let mut sse = Sse::open(&gw, "/v1/threads/b.1/events?after=1").await;
        for v in 2..=5 {
            assert_delta(&sse.write().await, v);
        }
        drop(sse);
        let res = gw.post("/v1/threads/b.1/flush", &json!({})).await;
        assert_eq!(res.status(), StatusCode::OK);
        trim_log(&prefix, "b.1").await;
        append_steps(&gw, "b.1", 6, 8).await;
        assert_eq!(gw.get_json("/v1/threads/b.1").await["version"], 5);
        // 3..=5 come from the store, 6..=8 from the log.
        let mut sse = Sse::open(&gw, "/v1/threads/b.1/events?after=2").await;
        for v in 3..=8 {
            assert_delta(&sse.write().await, v);
        }
        let mut fin = step(9, 0);
        fin["reason"] = "RunFinished".into();
        assert_eq!(append(&gw.http, &gw.base, "b.1", &fin).await, 9);
        assert_delta(&sse.write().await, 9);
        let e = sse.event().await.unwrap();
        assert_eq!(e.event, "flushed", "{e:?}");
        assert_eq!(e.id, None, "flushed never moves Last-Event-ID");
        assert_eq!(e.data, json!({"version": 9}));
        let mut next = step(10, 0);
        next["run_id"] = "r2".into();
        assert_eq!(append(&gw.http, &gw.base, "b.1", &next).await, 10);
        assert_delta(&sse.write().await, 10);
        // The store's history (1..=9, folded) and the log (10) together, from the start.
        let mut all = Sse::open(&gw, "/v1/threads/b.1/events?after=0").await;
        for v in 1..=10 {
            assert_delta(&all.write().await, v);
        }
        gw.stop().await;
    }
}

/// A NATS restart (its own server, killed and started again on the same store): open
/// streams stay open and continue without a gap once writes resume.
#[tokio::test]
async fn buffered_stream_survives_a_nats_restart() {
    let mut nats = NatsServer::start().await;
    let gw = Gateway::start_buffered(Backend::Memory, &nats.url(), |_| {}).await;
    gw.create(json!({"id": "n"})).await;
    append_steps(&gw, "n", 1, 2).await;
    let mut sse = Sse::open(&gw, "/v1/threads/n/events?after=0").await;
    assert_delta(&sse.write().await, 1);
    assert_delta(&sse.write().await, 2);
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.restart().await;
    let mut v = 3;
    let mut tries = 0;
    while v <= 6 {
        let res = gw.post("/v1/threads/n/deltas", &step(v, 0)).await;
        if res.status() == StatusCode::OK {
            assert_eq!(res.json::<Value>().await.unwrap()["version"], v);
            v += 1;
        } else {
            tries += 1;
            assert!(tries < 300, "writes resume after NATS is back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for v in 3..=6 {
        assert_delta(&sse.write().await, v);
    }
    gw.stop().await;
}

/// Purges a thread's log subject up to its last folded message (what a fold does once the
/// duplicate window has passed).
async fn trim_log(prefix: &str, id: &str) {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(format!("{prefix}_log")).await.unwrap();
    let subject = format!("{prefix}.log.{}", ThreadId::parse(id).unwrap().encoded());
    stream.purge().filter(subject).await.unwrap();
}

/// (6) Buffered mode: the first snapshot is the live view (with the buffered tail); PUT and
/// PATCH reach the stream through the log; DELETE ends it.
#[tokio::test]
async fn buffered_snapshot_replace_delete() {
    let gw = buffered(Backend::Memory).await;
    gw.create(json!({"id": "s"})).await;
    append_steps(&gw, "s", 1, 2).await;
    let mut sse = Sse::open(&gw, "/v1/threads/s/events?snapshot=true").await;
    let e = sse.event().await.unwrap();
    assert_eq!((e.event.as_str(), e.id), ("snapshot", Some(2)));
    assert_eq!(e.data["thread"]["messages"].as_array().unwrap().len(), 2);
    let res = gw
        .send(
            reqwest::Method::PUT,
            "/v1/threads/s",
            Some(&json!({"state": {"n": 7}, "metadata": {"title": "B", "updated_at": 1}})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = gw
        .send(
            reqwest::Method::PATCH,
            "/v1/threads/s",
            Some(&json!({"title": "C"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let e = sse.write().await;
    assert_eq!((e.event.as_str(), e.id), ("snapshot", Some(3)));
    assert_eq!(e.data["thread"]["metadata"], json!({"title": "B"}));
    assert_eq!(e.data["thread"]["state"], json!({"n": 7}));
    let e = sse.write().await;
    assert_eq!(e.data, json!({"version": 4, "metadata": {"title": "C"}}));
    let res = gw
        .send(reqwest::Method::DELETE, "/v1/threads/s", None)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(sse.event().await.unwrap().event, "deleted");
    sse.expect_end().await;
    expect_problem(
        gw.get("/v1/threads/s/events?after=1").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    gw.stop().await;
}

/// Fan-out: one upstream per thread per process (one NATS consumer, however many browsers),
/// removed with the last subscriber.
#[tokio::test]
async fn one_upstream_per_thread() {
    let prefix = nats_prefix();
    let gw = Gateway::start_config(buffered_config("memory:", &prefix), None, None).await;
    gw.create(json!({"id": "f"})).await;
    gw.create(json!({"id": "g"})).await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        streams.push(Sse::open(&gw, "/v1/threads/f/events").await);
    }
    for _ in 0..3 {
        streams.push(Sse::open(&gw, "/v1/threads/g/events").await);
    }
    assert_eq!(metric(&gw, "threadgate_sse_streams").await, 9.0);
    assert_eq!(metric(&gw, "threadgate_sse_topics").await, 2.0);
    assert_eq!(live_consumers(&prefix).await, 2);
    append_steps(&gw, "f", 1, 1).await;
    for s in &mut streams[..6] {
        assert_delta(&s.write().await, 1);
    }
    streams.clear();
    for _ in 0..100 {
        if metric(&gw, "threadgate_sse_topics").await == 0.0 && live_consumers(&prefix).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&gw, "threadgate_sse_streams").await, 0.0);
    assert_eq!(metric(&gw, "threadgate_sse_topics").await, 0.0);
    assert_eq!(
        live_consumers(&prefix).await,
        0,
        "the upstream left with the last subscriber"
    );
    gw.stop().await;
}

/// The live upstreams' consumers on the log stream (replays use short-lived ones that read
/// from the start; live ones deliver only new messages).
async fn live_consumers(prefix: &str) -> usize {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(format!("{prefix}_log")).await.unwrap();
    let mut consumers = stream.consumers();
    let mut n = 0;
    while let Some(c) = consumers.next().await {
        let c = c.unwrap();
        if c.config.deliver_policy == async_nats::jetstream::consumer::DeliverPolicy::New {
            n += 1;
        }
    }
    n
}

/// (8) Any replica serves any thread: two gateways on one NATS and one PostgreSQL schema,
/// both appending to the same thread at once; subscribers on either see the same writes, in
/// the same order, and they are exactly what the store folds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica() {
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let a = Gateway::start_config(buffered_config(&schema.url(), &prefix), None, None).await;
    let b =
        Gateway::start_config(buffered_config(&schema.url(), &prefix), None, Some(schema)).await;
    a.create(json!({"id": "x"})).await;
    let mut on_a = Sse::open(&a, "/v1/threads/x/events?after=0").await;
    let mut on_b = Sse::open(&b, "/v1/threads/x/events?after=0").await;
    const EACH: usize = 30;
    let writers: Vec<_> = [(&a, "a"), (&b, "b")]
        .into_iter()
        .map(|(gw, name)| {
            let (http, base) = (gw.http.clone(), gw.base.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let d = json!({"run_id": "r", "reason": "AssistantTurnCommitted",
                        "messages": [{"role": "assistant", "content": format!("{name}{i}")}], "patches": []});
                    append(&http, &base, "x", &d).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let total = 2 * EACH as u64;
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    for v in 1..=total {
        let ea = on_a.write().await;
        let eb = on_b.write().await;
        assert_eq!((ea.event.as_str(), ea.id), ("delta", Some(v)), "{ea:?}");
        assert_eq!(ea, eb, "both replicas stream the same write at {v}");
        seen_a.push(content(&ea).to_owned());
        seen_b.push(content(&eb).to_owned());
    }
    assert_eq!(seen_a, seen_b);
    for name in ["a", "b"] {
        let mine: Vec<_> = seen_a
            .iter()
            .filter(|c| c.starts_with(name))
            .cloned()
            .collect();
        let expected: Vec<_> = (0..EACH).map(|i| format!("{name}{i}")).collect();
        assert_eq!(mine, expected, "each writer's appends in its order, once");
    }
    // A stream opened on b after a fold through a replays from the store.
    let res = a.post("/v1/threads/x/flush", &json!({})).await;
    assert_eq!(res.status(), StatusCode::OK);
    let folded = b.get_json("/v1/threads/x").await;
    assert_eq!(folded["version"], total);
    let folded: Vec<_> = folded["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(folded, seen_a, "the stream is exactly what was folded");
    // The fold's notice reaches b's subscriber too.
    let e = on_b.event().await.unwrap();
    assert_eq!(
        (e.event.as_str(), e.data.clone()),
        ("flushed", json!({"version": total}))
    );
    let mut late = Sse::open(&b, &format!("/v1/threads/x/events?after={}", total - 3)).await;
    for v in total - 2..=total {
        assert_eq!(late.write().await.id, Some(v));
    }
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// (7) Slow consumers.

/// One client stops reading (its socket fills, its place in the bounded channel is
/// overrun) while another keeps receiving everything; the slow one then resumes with a
/// gap-free continuation or an explicit `reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_never_stalls_others() {
    for buffered_mode in [false, true] {
        let tweak = |c: &mut Config| c.sse_buffer = 8;
        let gw = if buffered_mode {
            Gateway::start_buffered(Backend::Memory, &nats_url(), tweak).await
        } else {
            Gateway::start_with(Backend::Memory, tweak).await
        };
        gw.create(json!({"id": "slow"})).await;
        // Enough bytes to fill both socket buffers of the stalled connection several times.
        const N: u64 = 600;
        const PAD: usize = 48 * 1024;
        let mut slow = Sse::open(&gw, "/v1/threads/slow/events?after=0").await;
        let fast = {
            let (http, url) = (
                reqwest::Client::new(),
                gw.url("/v1/threads/slow/events?after=0"),
            );
            let mut fast = Sse::open_with(&http, &url, None).await;
            tokio::spawn(async move {
                for v in 1..=N {
                    assert_delta(&fast.write().await, v);
                }
            })
        };
        for v in 1..=N {
            assert_eq!(append(&gw.http, &gw.base, "slow", &step(v, PAD)).await, v);
        }
        fast.await
            .expect("the fast client received everything while the slow one stalled");
        // The slow client resumes: contiguous from 1, then either everything or `reset`.
        let mut expected = 1;
        while expected <= N {
            let e = slow.write().await;
            if e.event == "reset" {
                assert_eq!(e.data, json!({"version": N}));
                slow.expect_end().await;
                break;
            }
            assert_delta(&e, expected);
            expected += 1;
        }
        assert!(
            metric(&gw, "threadgate_sse_lagged_total").await >= 1.0,
            "the slow client was overrun (the test exercised the slow path)"
        );
        gw.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// (9) Graceful shutdown never waits on open streams.

#[tokio::test]
async fn shutdown_ends_open_streams() {
    for buffered_mode in [false, true] {
        let gw = if buffered_mode {
            buffered(Backend::Memory).await
        } else {
            Gateway::start(Backend::Memory).await
        };
        gw.create(json!({"id": "z"})).await;
        append_steps(&gw, "z", 1, 2).await;
        let mut streams = Vec::new();
        for q in ["after=0", "snapshot=true", "", "after=2", "after=1"] {
            let mut s = Sse::open(&gw, &format!("/v1/threads/z/events?{q}")).await;
            if !q.is_empty() && q != "after=2" {
                s.write().await;
            }
            streams.push(s);
        }
        tokio::time::timeout(Duration::from_secs(10), gw.stop())
            .await
            .expect("graceful shutdown completes with streams open");
        for mut s in streams {
            while let Some(e) = s.event().await {
                assert_ne!(e.event, "reset", "{e:?}");
            }
        }
    }
}

/// (OpenAPI) The stream and each event's data schema are documented.
#[tokio::test]
async fn openapi_documents_the_stream() {
    let gw = Gateway::start(Backend::Memory).await;
    let doc = gw.get_json("/openapi.json").await;
    let op = &doc["paths"]["/v1/threads/{id}/events"]["get"];
    assert!(
        op["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some(),
        "{op}"
    );
    let params: Vec<&str> = op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        params,
        ["id", "after", "snapshot", "incarnation", "Last-Event-ID"]
    );
    for (schema, fields) in [
        ("DeltaEvent", &["version", "delta"][..]),
        ("SnapshotEvent", &["version", "thread"]),
        ("MetadataEvent", &["version", "metadata"]),
        ("FlushedEvent", &["version"]),
        ("ResetEvent", &["version"]),
        ("DeletedEvent", &[]),
    ] {
        let s = &doc["components"]["schemas"][schema];
        assert_eq!(s["type"], "object", "{schema}: {s}");
        for f in fields {
            assert!(s["properties"].get(f).is_some(), "{schema}.{f}: {s}");
        }
    }
    gw.stop().await;
}
