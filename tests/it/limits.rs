//! Hostile nesting (issue 7 A): no request can build a state, message or metadata value the
//! gateway cannot serialise, parse back, clone and drop, on any store or in buffered mode,
//! and a thread stored beyond the limits never stops start-up.

use crate::each_backend;
use crate::harness::{Backend, Gateway, expect_problem, nats_url};
use reqwest::StatusCode;
use serde_json::{Value, json};
use threadgate::model::limits::{MAX_BODY_DEPTH, MAX_STATE_DEPTH};

each_backend!(deep_input_is_refused_and_changes_nothing);

/// `{"k": {"k": ... 1}}`, `levels` objects deep.
fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = json!({ "k": v });
    }
    v
}

fn set_at(path_len: usize, value: Value) -> Value {
    json!({"run_id": "r", "reason": "AssistantTurnCommitted", "messages": [],
        "patches": [{"patch": {"ops": [{"op": "set", "path": vec!["a"; path_len], "value": value}]}}]})
}

/// Every kind of too-deep request answers 400 naming what is at fault, and the thread still
/// reads, writes and deletes afterwards.
async fn deep_input_is_refused_and_changes_nothing(gw: Gateway) {
    check_deep_input(&gw).await;
    gw.stop().await;
}

async fn check_deep_input(gw: &Gateway) {
    gw.create(json!({"id": "t", "state": {"n": 1}})).await;
    let before = gw.get_json("/v1/threads/t?view=live").await;
    // The issue's reproduction: a ~32 KB request with a 10,000-segment path, then the
    // patch-path depth just past each limit.
    for (path_len, value) in [
        (10_000, json!(1)),
        (200, json!(1)),
        (MAX_STATE_DEPTH + 1, json!(1)),
        (MAX_STATE_DEPTH - 5, nested(6)),
    ] {
        let res = gw
            .post("/v1/threads/t/deltas", &set_at(path_len, value))
            .await;
        let body = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_patch").await;
        assert_eq!(body["field"], "patches[0].patch.ops[0]", "{body}");
        assert!(body["detail"].as_str().unwrap().contains("limit"), "{body}");
    }
    // Exactly at the state limit is accepted.
    let at_limit = set_at(MAX_STATE_DEPTH - 5, nested(5));
    let res = gw.post("/v1/threads/t/deltas", &at_limit).await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "{}",
        res.text().await.unwrap()
    );
    // A body nested deeper than the body limit, anywhere (here: in a message's extra field).
    let deep_message = json!({"run_id": "r", "reason": "UserMessage", "patches": [],
        "messages": [{"role": "user", "content": "x", "deep": nested(MAX_BODY_DEPTH)}]});
    let res = gw.post("/v1/threads/t/deltas", &deep_message).await;
    let body = expect_problem(res, StatusCode::BAD_REQUEST, "limit_exceeded").await;
    assert_eq!(body["field"], "body");
    // A snapshot, a created or replaced state, deeper than the state limit.
    let snapshot = json!({"run_id": "r", "reason": "RunFinished", "messages": [], "patches": [],
        "snapshot": nested(MAX_STATE_DEPTH + 1)});
    let res = gw.post("/v1/threads/t/deltas", &snapshot).await;
    let body = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_patch").await;
    assert_eq!(body["field"], "snapshot");
    let res = gw
        .post(
            "/v1/threads",
            &json!({"id": "deep", "state": nested(MAX_STATE_DEPTH + 1)}),
        )
        .await;
    let body = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_patch").await;
    assert_eq!(body["field"], "state");
    assert_eq!(
        gw.get("/v1/threads/deep").await.status(),
        StatusCode::NOT_FOUND
    );
    let res = gw
        .send(
            reqwest::Method::PUT,
            "/v1/threads/t",
            Some(&json!({"state": nested(MAX_STATE_DEPTH + 1)})),
        )
        .await;
    let body = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_patch").await;
    assert_eq!(body["field"], "state");
    // Nothing refused changed anything; the accepted one is there, and the thread reads,
    // takes writes and deletes.
    let after = gw.get_json("/v1/threads/t?view=live").await;
    assert_eq!(after["version"], before["version"].as_u64().unwrap() + 1);
    assert_eq!(after["messages"], before["messages"]);
    let state = gw.get_json("/v1/threads/t/state?view=live").await;
    assert_eq!(state["state"]["n"], 1);
    assert_eq!(
        threadgate::model::limits::depth(&state["state"]),
        MAX_STATE_DEPTH
    );
    assert_eq!(gw.get("/v1/threads/t/state").await.status(), StatusCode::OK);
    gw.append("t", crate::harness::delta_msg("r", None, "still fine"))
        .await;
    let flushed = gw.post("/v1/threads/t/flush", &json!({})).await;
    assert_eq!(flushed.status(), StatusCode::OK);
    assert_eq!(
        gw.send(reqwest::Method::DELETE, "/v1/threads/t", None)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
}

/// The same in buffered mode, where a deep entry used to block every fold of its thread.
#[tokio::test]
async fn deep_input_is_refused_in_buffered_mode() {
    for backend in [Backend::Memory, Backend::Postgres] {
        let gw = Gateway::start_buffered(backend, &nats_url(), |_| {}).await;
        check_deep_input(&gw).await;
        gw.stop().await;
    }
}

/// A thread file that cannot be read back (an older version's deep state, or a hand edit) is
/// set aside at start-up, with the others served.
#[tokio::test]
async fn unreadable_thread_files_are_set_aside_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let config = threadgate::config::Config::for_tests(&store);
    let gw = Gateway::start_config(config.clone(), None, None).await;
    gw.create(json!({"id": "good", "state": {"a": 1}})).await;
    gw.create(json!({"id": "bad"})).await;
    gw.stop().await;
    // What an older gateway could write: a state nested past serde_json's 128 levels.
    let bad = dir.path().join(format!(
        "{}.json",
        threadgate::id::ThreadId::parse("bad").unwrap().encoded()
    ));
    let text = std::fs::read_to_string(&bad).unwrap();
    let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
    std::fs::write(
        &bad,
        text.replacen("\"state\":{}", &format!("\"state\":{deep}"), 1),
    )
    .unwrap();

    let gw = Gateway::start_config(config, None, None).await;
    assert_eq!(
        gw.get_json("/v1/threads/good/state").await["state"],
        json!({"a": 1})
    );
    assert_eq!(
        gw.get("/v1/threads/bad").await.status(),
        StatusCode::NOT_FOUND
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path().join(threadgate::store::SET_ASIDE_DIR))
        .unwrap()
        .collect();
    assert_eq!(aside.len(), 1, "the unreadable file is kept for inspection");
    assert!(!bad.exists());
    // The id is free again.
    gw.create(json!({"id": "bad"})).await;
    gw.stop().await;
}
