//! Unicode thread ids (any text without control characters or `/ \ ? # %`, up to 128 bytes)
//! round-trip through every store, in URLs, in NATS subjects (buffered mode) and over SSE, and
//! list in the same byte-wise order everywhere, keyset paging included.

use crate::each_backend;
use crate::harness::{Backend, Gateway, delta_msg, enc, nats_url};
use crate::support::resume::Sse;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

/// Hang guard for one request or event (never a speed assertion).
const WAIT: Duration = Duration::from_secs(30);

fn ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "café-1",
        "cafe\u{301}-1",
        "ana@example.com",
        "a b",
        " x ",
        "会话 7",
        "🚀",
        "Zürich",
        "z",
        "A",
        "ёлка",
        "\u{a0}",
        "\u{ffff}",
        "...",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    ids.push("é".repeat(64)); // 128 bytes
    ids.push("🚀".repeat(32)); // 128 bytes
    ids
}

async fn unicode_ids(gw: Gateway) {
    let ids = ids();
    for id in &ids {
        let res = gw
            .post("/v1/threads", &json!({"id": id, "resource_id": "uni"}))
            .await;
        assert_eq!(res.status(), StatusCode::CREATED, "create {id:?}");
        assert_eq!(
            res.headers()["location"],
            format!("/v1/threads/{}", enc(id)).as_str()
        );
        let created: serde_json::Value = res.json().await.unwrap();
        assert_eq!(created["id"], id.as_str());
    }
    // A stream on every id, then one append each: the event arrives on the id's own stream.
    let mut streams = Vec::new();
    for id in &ids {
        let url = gw.url(&format!("/v1/threads/{}/events", enc(id)));
        let sse = Sse::open(&gw.http, &url, Some(0), WAIT)
            .await
            .unwrap_or_else(|e| panic!("stream of {id:?}: {e}"));
        streams.push(sse);
    }
    for id in &ids {
        assert_eq!(
            gw.append(id, delta_msg("r", None, &format!("for {id}")))
                .await,
            1
        );
    }
    for (id, sse) in ids.iter().zip(&mut streams) {
        let e = sse
            .next(WAIT)
            .await
            .unwrap_or_else(|| panic!("event on {id:?}"));
        assert_eq!((e.event.as_str(), e.id), ("delta", Some(1)), "{id:?}");
        assert_eq!(
            e.data["delta"]["messages"][0]["content"],
            format!("for {id}")
        );
    }
    drop(streams);
    for id in &ids {
        let t = gw
            .get_json(&format!("/v1/threads/{}?view=live", enc(id)))
            .await;
        assert_eq!(t["id"], id.as_str());
        let msgs = t["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{id:?} sees only its own messages");
        assert_eq!(msgs[0]["content"], format!("for {id}"));
    }
    // Listing by id is byte order (Rust's `str` order) in every store, across pages, both ways.
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    for (order, want) in [
        ("asc", want.clone()),
        ("desc", want.iter().rev().copied().collect()),
    ] {
        let mut got = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/threads?resource_id=uni&order_by=id&order={order}&limit=3");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = gw.get_json(&path).await;
            for t in page["threads"].as_array().unwrap() {
                got.push(t["id"].as_str().unwrap().to_owned());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(got, want, "order={order}");
    }
    for id in &ids {
        let res = gw
            .send(Method::DELETE, &format!("/v1/threads/{}", enc(id)), None)
            .await;
        assert_eq!(res.status(), StatusCode::NO_CONTENT, "delete {id:?}");
    }
    gw.stop().await;
}

each_backend!(unicode_ids);

#[tokio::test]
async fn unicode_ids_buffered() {
    unicode_ids(Gateway::start_buffered(Backend::Postgres, &nats_url(), |_| {}).await).await
}
