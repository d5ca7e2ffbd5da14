//! A thread deleted and created again is a new life of its id (issue 7 B): nothing of the old
//! life (idempotency keys, live-stream positions) carries into the new one, and an
//! idempotent retry whose original can no longer be found never becomes a lasting 503.

use crate::harness::{Backend, Gateway, delta_msg, expect_problem, nats_url};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use threadgate::id::ThreadId;

async fn keyed(gw: &Gateway, id: &str, key: &str, text: &str) -> reqwest::Response {
    gw.http
        .post(gw.url(&format!("/v1/threads/{id}/deltas")))
        .header("idempotency-key", key)
        .json(&delta_msg("r", None, text))
        .send()
        .await
        .unwrap()
}

/// The issue's reproduction, in buffered mode (where it answered 503 for ten minutes) and in
/// direct mode.
#[tokio::test]
async fn idempotency_keys_do_not_outlive_their_thread() {
    for buffered in [true, false] {
        let gw = if buffered {
            Gateway::start_buffered(Backend::Memory, &nats_url(), |_| {}).await
        } else {
            Gateway::start(Backend::Memory).await
        };
        gw.create(json!({"id": "x"})).await;
        let first = keyed(&gw, "x", "k", "first life").await;
        assert_eq!(first.status(), StatusCode::OK);
        let res = gw.send(Method::DELETE, "/v1/threads/x", None).await;
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
        gw.create(json!({"id": "x"})).await;
        let again = keyed(&gw, "x", "k", "second life").await;
        assert_eq!(again.status(), StatusCode::OK, "buffered: {buffered}");
        assert!(again.headers().get("idempotent-replayed").is_none());
        let body: Value = again.json().await.unwrap();
        assert_eq!(body["version"], 1);
        let t = gw.get_json("/v1/threads/x?view=live").await;
        assert_eq!(t["messages"][0]["content"], "second life");
        // Within the new life the key works as before.
        let retry = keyed(&gw, "x", "k", "second life").await;
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        gw.stop().await;
    }
}

/// A retry that JetStream recognises but whose original is neither in the log (trimmed) nor
/// remembered by the store (more than 1,000 newer keys): a clear 409, not a 503.
#[tokio::test]
async fn a_retry_whose_original_is_gone_is_a_409() {
    let prefix = crate::harness::nats_prefix();
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.nats_url = Some(nats_url());
        c.nats_prefix = prefix.clone();
        c.fold_idle = Duration::from_secs(3600);
    })
    .await;
    gw.create(json!({"id": "t"})).await;
    assert_eq!(keyed(&gw, "t", "k0", "0").await.status(), StatusCode::OK);
    let newer = threadgate::store::IDEMPOTENCY_KEYS_KEPT;
    futures::future::join_all((1..=newer).map(|i| {
        let gw = &gw;
        async move {
            let res = keyed(gw, "t", &format!("k{i}"), &i.to_string()).await;
            assert_eq!(res.status(), StatusCode::OK);
        }
    }))
    .await;
    let res = gw.post("/v1/threads/t/flush", &json!({})).await;
    assert_eq!(res.status(), StatusCode::OK);
    // The keep window ran out: the folded entries are trimmed.
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let log = js.get_stream(format!("{prefix}_log")).await.unwrap();
    let subject = format!("{prefix}.log.{}", ThreadId::parse("t").unwrap().encoded());
    log.purge().filter(subject).await.unwrap();

    let res = keyed(&gw, "t", "k0", "0").await;
    let body = expect_problem(res, StatusCode::CONFLICT, "idempotency_key_expired").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not applied again"),
        "{body}"
    );
    // A recent key is still answered from the store, and nothing was appended twice.
    let res = keyed(&gw, "t", &format!("k{newer}"), &newer.to_string()).await;
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(
        gw.get_json("/v1/threads/t").await["version"],
        newer as u64 + 1
    );
    gw.stop().await;
}

/// Reads the first SSE event's name and data (the stream is known to start at once).
async fn first_event(gw: &Gateway, path: &str, last_event_id: Option<&str>) -> (String, Value) {
    let mut req = gw.http.get(gw.url(path));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let mut res = req.send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "{path}");
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), res.chunk())
            .await
            .expect("an event comes")
            .unwrap()
            .expect("the stream is open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let block = text.split("\n\n").next().unwrap();
    let event = block
        .lines()
        .find_map(|l| l.strip_prefix("event: "))
        .unwrap()
        .to_owned();
    let data = block
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    (event, serde_json::from_str(data).unwrap())
}

/// A stream position of the old life, with the incarnation it came from, is answered with
/// `reset`; the same position in the new life continues.
#[tokio::test]
async fn a_position_of_an_earlier_life_gets_reset() {
    for buffered in [false, true] {
        let gw = if buffered {
            Gateway::start_buffered(Backend::Memory, &nats_url(), |_| {}).await
        } else {
            Gateway::start(Backend::File).await
        };
        gw.create(json!({"id": "s"})).await;
        for i in 0..3 {
            gw.append("s", delta_msg("r", None, &format!("old {i}")))
                .await;
        }
        let old = gw.get_json("/v1/threads/s?view=live").await;
        let old_life = old["incarnation"].as_str().unwrap().to_owned();
        assert_eq!(old_life.len(), 16);
        gw.send(Method::DELETE, "/v1/threads/s", None).await;
        let new = gw.create(json!({"id": "s"})).await;
        let new_life = new["incarnation"].as_str().unwrap().to_owned();
        assert_ne!(new_life, old_life);
        for i in 0..5 {
            gw.append("s", delta_msg("r", None, &format!("new {i}")))
                .await;
        }
        let path = format!("/v1/threads/s/events?after=2&incarnation={old_life}");
        let (event, data) = first_event(&gw, &path, None).await;
        assert_eq!((event.as_str(), &data), ("reset", &json!({"version": 5})));
        // The browser's reconnect: same URL, plus Last-Event-ID.
        let (event, _) = first_event(&gw, &path, Some("2")).await;
        assert_eq!(event, "reset");
        let path = format!("/v1/threads/s/events?after=2&incarnation={new_life}");
        let (event, data) = first_event(&gw, &path, None).await;
        assert_eq!(event, "delta");
        assert_eq!(data["version"], 3);
        assert_eq!(data["delta"]["messages"][0]["content"], "new 2");
        let res = gw
            .get("/v1/threads/s/events?after=2&incarnation=nothex")
            .await;
        expect_problem(res, StatusCode::BAD_REQUEST, "invalid_query").await;
        gw.stop().await;
    }
}
