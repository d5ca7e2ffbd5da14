//! The REST API end to end over real HTTP, against every backend.

use crate::each_backend;
use crate::harness::{Gateway, delta_msg, enc, expect_problem};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

each_backend!(
    create_read_revalidate,
    create_generates_uuid_v7,
    create_conflict,
    append_versions_and_if_match,
    idempotency_key,
    rejected_requests_change_nothing,
    messages_pagination,
    state_and_runs,
    replace_patch_delete,
    list_filters_and_paging,
    list_ordering,
    tricky_ids,
    wire_values_round_trip,
    snapshot_reads_follow_every_write,
);

async fn create_read_revalidate(gw: Gateway) {
    let res = gw
        .post(
            "/v1/threads",
            &json!({"id": "t1", "resource_id": "u1", "state": {"n": 1}, "metadata": {"title": "hello"},
                     "messages": [{"role": "user", "content": "hi", "id": "m0"}]}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["location"], "/v1/threads/t1");
    assert_eq!(res.headers()["etag"], "\"0\"");
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["version"], 0);
    assert_eq!(created["metadata"]["title"], "hello");
    assert!(created["metadata"]["created_at"].as_i64().unwrap() > 1_600_000_000_000);

    let res = gw.get("/v1/threads/t1").await;
    assert_eq!(res.headers()["etag"], "\"0\"");
    let got: Value = res.json().await.unwrap();
    assert_eq!(got, created);
    assert_eq!(got["messages"][0]["content"], "hi");
    assert_eq!(got["resource_id"], "u1");

    let not_modified = gw
        .http
        .get(gw.url("/v1/threads/t1"))
        .header("if-none-match", "\"0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(not_modified.headers()["etag"], "\"0\"");

    assert_eq!(gw.append("t1", delta_msg("r1", None, "yo")).await, 1);
    let changed = gw
        .http
        .get(gw.url("/v1/threads/t1"))
        .header("if-none-match", "\"0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    assert_eq!(changed.headers()["etag"], "\"1\"");
    let body: Value = changed.json().await.unwrap();
    assert_eq!(body["version"], 1);
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);

    expect_problem(
        gw.get("/v1/threads/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    gw.stop().await;
}

async fn create_generates_uuid_v7(gw: Gateway) {
    let created = gw.create(json!({})).await;
    let id = created["id"].as_str().unwrap();
    let uuid = uuid::Uuid::parse_str(id).expect("generated id is a UUID");
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(created["version"], 0);
    assert_eq!(gw.get_json(&format!("/v1/threads/{id}")).await["id"], id);
    gw.stop().await;
}

async fn create_conflict(gw: Gateway) {
    gw.create(json!({"id": "dup", "metadata": {"a": 1}})).await;
    let res = gw
        .post("/v1/threads", &json!({"id": "dup", "metadata": {"a": 2}}))
        .await;
    expect_problem(res, StatusCode::CONFLICT, "already_exists").await;
    assert_eq!(gw.get_json("/v1/threads/dup").await["metadata"]["a"], 1);
    gw.stop().await;
}

async fn append_versions_and_if_match(gw: Gateway) {
    gw.create(json!({"id": "t"})).await;
    for expected in 1..=3 {
        assert_eq!(gw.append("t", delta_msg("r", None, "x")).await, expected);
    }
    let stale = gw
        .http
        .post(gw.url("/v1/threads/t/deltas"))
        .header("if-match", "\"1\"")
        .json(&delta_msg("r", None, "stale"))
        .send()
        .await
        .unwrap();
    let p = expect_problem(stale, StatusCode::PRECONDITION_FAILED, "version_mismatch").await;
    assert_eq!(p["current_version"], 3);
    let fresh = gw
        .http
        .post(gw.url("/v1/threads/t/deltas"))
        .header("if-match", "\"3\"")
        .json(&delta_msg("r", None, "fresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), StatusCode::OK);
    assert_eq!(fresh.headers()["etag"], "\"4\"");
    assert_eq!(fresh.json::<Value>().await.unwrap()["version"], 4);
    let t = gw.get_json("/v1/threads/t").await;
    let texts: Vec<_> = t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(
        texts,
        vec![json!("x"), json!("x"), json!("x"), json!("fresh")]
    );
    gw.stop().await;
}

async fn idempotency_key(gw: Gateway) {
    gw.create(json!({"id": "t"})).await;
    let send = |body: Value, key: &'static str| {
        gw.http
            .post(gw.url("/v1/threads/t/deltas"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let first = send(delta_msg("r", None, "once"), "k1").await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(first.json::<Value>().await.unwrap()["version"], 1);
    gw.append("t", delta_msg("r", None, "other")).await;
    let retry = send(delta_msg("r", None, "once"), "k1").await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["version"], 1);
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(t["version"], 2);
    assert_eq!(t["messages"].as_array().unwrap().len(), 2);
    let reused = send(delta_msg("r", None, "different"), "k1").await.unwrap();
    expect_problem(
        reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(gw.get_json("/v1/threads/t").await, t);
    gw.stop().await;
}

/// Every bad request gets a clear 4xx naming what is wrong, and the thread is unchanged.
async fn rejected_requests_change_nothing(gw: Gateway) {
    gw.create(json!({"id": "t", "state": {"count": 1, "list": []}}))
        .await;
    gw.append("t", delta_msg("r", Some("m1"), "hello")).await;
    let before = gw.get_json("/v1/threads/t").await;
    let before_state = gw.get_json("/v1/threads/t/state").await;

    struct Case {
        body: &'static str,
        content_type: &'static str,
        if_match: Option<&'static str>,
        status: StatusCode,
        code: &'static str,
        mention: &'static str,
    }
    let c = |body, status, code, mention| Case {
        body,
        content_type: "application/json",
        if_match: None,
        status,
        code,
        mention,
    };
    let cases = [
        c(
            r#"{"run_id": "r", "reason": "#,
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "JSON",
        ),
        c(
            r#"{"run_id": 5, "reason": "RunFinished"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "run_id",
        ),
        c(
            r#"{"reason": "RunFinished"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "run_id",
        ),
        c(
            r#"{"run_id": "r", "reason": "Whatever"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "reason",
        ),
        c(
            r#"{"run_id": "r", "reason": "RunFinished", "messages": [{"role": "robot", "content": "x"}]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "messages[0].role",
        ),
        c(
            r#"{"run_id": "r", "reason": "RunFinished", "patches": [{"patch": {"ops": [{"op": "frobnicate", "path": []}]}}]}"#,
            StatusCode::BAD_REQUEST,
            "unknown_op",
            "frobnicate",
        ),
        c(
            r#"{"run_id": "r", "reason": "RunFinished", "patches": [{"patch": {"ops": [{"op": "set", "path": ["a"], "value": 1}, {"op": "increment", "path": ["list"], "amount": 1}]}}]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_patch",
            "patches[0].patch.ops[1]",
        ),
        c(
            r#"{"run_id": "r", "reason": "RunFinished", "patches": [{"patch": {"ops": [{"op": "insert", "path": ["missing"], "index": 0, "value": 1}]}}]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_patch",
            "insert",
        ),
        Case {
            content_type: "text/plain",
            ..c(
                r#"{"run_id": "r", "reason": "RunFinished"}"#,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "application/json",
            )
        },
        Case {
            if_match: Some("\"0\""),
            ..c(
                r#"{"run_id": "r", "reason": "RunFinished"}"#,
                StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                "current version is 1",
            )
        },
        Case {
            if_match: Some("yesterday"),
            ..c(
                r#"{"run_id": "r", "reason": "RunFinished"}"#,
                StatusCode::BAD_REQUEST,
                "invalid_header",
                "If-Match",
            )
        },
    ];
    for case in cases {
        let mut req = gw
            .http
            .post(gw.url("/v1/threads/t/deltas"))
            .header("content-type", case.content_type)
            .body(case.body);
        if let Some(m) = case.if_match {
            req = req.header("if-match", m);
        }
        let p = expect_problem(req.send().await.unwrap(), case.status, case.code).await;
        assert!(
            p["detail"].as_str().unwrap().contains(case.mention),
            "detail of {} should mention {:?}: {p}",
            case.body,
            case.mention
        );
    }

    // Over the body limit: 413, whether the length is declared or streamed.
    let big = format!(
        r#"{{"run_id": "r", "reason": "RunFinished", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(5 << 20)
    );
    let res = gw
        .http
        .post(gw.url("/v1/threads/t/deltas"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    expect_problem(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    // Bad PUT, PATCH and create bodies.
    let put = gw
        .send(Method::PUT, "/v1/threads/t", Some(&json!({"state": {}, "patches": [{"patch": {"ops": [{"op": "increment", "path": ["nope"], "amount": 1}]}}]})))
        .await;
    expect_problem(put, StatusCode::BAD_REQUEST, "invalid_patch").await;
    let put = gw
        .send(Method::PUT, "/v1/threads/t", Some(&json!({"id": "other"})))
        .await;
    expect_problem(put, StatusCode::BAD_REQUEST, "invalid_field").await;
    let patch = gw
        .send(
            Method::PATCH,
            "/v1/threads/t",
            Some(&json!(["not", "an", "object"])),
        )
        .await;
    expect_problem(patch, StatusCode::BAD_REQUEST, "invalid_field").await;
    let dup = gw.post("/v1/threads", &json!({"id": "t"})).await;
    expect_problem(dup, StatusCode::CONFLICT, "already_exists").await;
    let del = gw
        .http
        .delete(gw.url("/v1/threads/t"))
        .header("if-match", "\"7\"")
        .send()
        .await
        .unwrap();
    expect_problem(del, StatusCode::PRECONDITION_FAILED, "version_mismatch").await;
    let q = gw.get("/v1/threads/t/messages?limit=0").await;
    let p = expect_problem(q, StatusCode::BAD_REQUEST, "invalid_query").await;
    assert_eq!(p["field"], "limit");
    let q = gw.get("/v1/threads/t/messages?order=sideways").await;
    let p = expect_problem(q, StatusCode::BAD_REQUEST, "invalid_query").await;
    assert_eq!(p["field"], "order");

    assert_eq!(
        gw.get_json("/v1/threads/t").await,
        before,
        "thread changed by a rejected request"
    );
    assert_eq!(gw.get_json("/v1/threads/t/state").await, before_state);
    gw.stop().await;
}

async fn messages_pagination(gw: Gateway) {
    gw.create(json!({"id": "t"})).await;
    for i in 0..10 {
        let mut m = json!({"role": "assistant", "content": format!("m{i}"), "id": format!("id{i}"),
                           "metadata": {"run_id": if i < 5 { "r1" } else { "r2" }}});
        if i % 3 == 0 {
            m["visibility"] = "internal".into();
        }
        gw.append("t", json!({"run_id": "r", "reason": "AssistantTurnCommitted", "messages": [m], "patches": []})).await;
    }
    let contents = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect()
    };
    let cursors = |page: &Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["cursor"].as_u64().unwrap())
            .collect()
    };
    // Default: visible messages only (0, 3, 6, 9 are internal).
    let all = gw.get_json("/v1/threads/t/messages").await;
    assert_eq!(cursors(&all), vec![1, 2, 4, 5, 7, 8]);
    assert_eq!(all["has_more"], false);
    assert_eq!(all["version"], 10);
    let any = gw
        .get_json("/v1/threads/t/messages?visibility=any&limit=4")
        .await;
    assert_eq!(cursors(&any), vec![0, 1, 2, 3]);
    assert_eq!(any["has_more"], true);
    assert_eq!(any["next_cursor"], 3);
    let next = gw
        .get_json("/v1/threads/t/messages?visibility=any&limit=4&after=3")
        .await;
    assert_eq!(cursors(&next), vec![4, 5, 6, 7]);
    assert_eq!(next["prev_cursor"], 4);
    let internal = gw
        .get_json("/v1/threads/t/messages?visibility=internal")
        .await;
    assert_eq!(cursors(&internal), vec![0, 3, 6, 9]);
    let desc = gw
        .get_json("/v1/threads/t/messages?visibility=any&order=desc&limit=3&before=9")
        .await;
    assert_eq!(cursors(&desc), vec![8, 7, 6]);
    assert_eq!(desc["next_cursor"], 6);
    let run2 = gw
        .get_json("/v1/threads/t/messages?visibility=any&run_id=r2")
        .await;
    assert_eq!(contents(&run2), vec!["m5", "m6", "m7", "m8", "m9"]);
    let window = gw
        .get_json("/v1/threads/t/messages?visibility=any&after=2&before=5")
        .await;
    assert_eq!(cursors(&window), vec![3, 4]);
    // Cursors are stable: a message re-sent with a known id is not appended again.
    gw.append("t", delta_msg("r", Some("id4"), "dup")).await;
    let again = gw
        .get_json("/v1/threads/t/messages?visibility=any&after=3&limit=1")
        .await;
    assert_eq!(contents(&again), vec!["m4"]);
    expect_problem(
        gw.get("/v1/threads/t/messages?limit=201").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    expect_problem(
        gw.get("/v1/threads/none/messages").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    gw.stop().await;
}

async fn state_and_runs(gw: Gateway) {
    gw.create(json!({"id": "t", "state": {"count": 1}})).await;
    let run_meta = |status: &str, out: u64| json!({"agent_id": "agent-a", "origin": "user", "status": status, "input_tokens": 10, "output_tokens": out});
    gw.append("t", json!({"run_id": "run-1", "reason": "AssistantTurnCommitted", "run_meta": run_meta("running", 5),
        "messages": [], "patches": [{"patch": {"ops": [{"op": "increment", "path": ["count"], "amount": 2},
                                                       {"op": "append", "path": ["log"], "value": "a"}]}}]}))
        .await;
    gw.append("t", json!({"run_id": "run-1", "reason": "RunFinished", "run_meta": run_meta("done", 7),
        "messages": [], "patches": [{"patch": {"ops": [{"op": "set", "path": ["done"], "value": true}]}}]}))
        .await;
    let state = gw.get_json("/v1/threads/t/state").await;
    assert_eq!(
        state,
        json!({"state": {"count": 3, "log": ["a"], "done": true}, "version": 2})
    );
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(
        t["state"],
        json!({"count": 1}),
        "base state stays; patches carry the changes"
    );
    assert_eq!(t["patches"].as_array().unwrap().len(), 2);

    let runs = gw.get_json("/v1/threads/t/runs").await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    let run = gw.get_json("/v1/threads/t/runs/run-1").await;
    assert_eq!(run["meta"]["status"], "done");
    assert_eq!(run["meta"]["output_tokens"], 7);
    assert_eq!(run["version"], 2);
    assert_eq!(run["thread_id"], "t");
    expect_problem(
        gw.get("/v1/threads/t/runs/run-x").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // A snapshot delta replaces the state and clears the patches.
    gw.append("t", json!({"run_id": "run-2", "reason": "RunFinished", "messages": [], "patches": [], "snapshot": {"fresh": 1}})).await;
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(t["state"], json!({"fresh": 1}));
    assert_eq!(t["patches"], json!([]));
    assert_eq!(
        gw.get_json("/v1/threads/t/state").await["state"],
        json!({"fresh": 1})
    );
    gw.stop().await;
}

async fn replace_patch_delete(gw: Gateway) {
    gw.create(json!({"id": "t", "metadata": {"keep": 1, "drop": 2}}))
        .await;
    let t = gw.get_json("/v1/threads/t").await;
    // A thread read with GET can be sent back with PUT (server metadata keys are ignored).
    let mut edited = t.clone();
    edited["messages"] = json!([{"role": "user", "content": "replaced"}]);
    edited["state"] = json!({"x": 1});
    let put = gw
        .http
        .put(gw.url("/v1/threads/t"))
        .header("if-match", "\"0\"")
        .json(&edited)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(put.json::<Value>().await.unwrap()["version"], 1);
    let stale = gw
        .http
        .put(gw.url("/v1/threads/t"))
        .header("if-match", "\"0\"")
        .json(&edited)
        .send()
        .await
        .unwrap();
    expect_problem(stale, StatusCode::PRECONDITION_FAILED, "version_mismatch").await;
    let after_put = gw.get_json("/v1/threads/t").await;
    assert_eq!(after_put["messages"][0]["content"], "replaced");
    assert_eq!(after_put["state"], json!({"x": 1}));
    assert_eq!(after_put["version"], 1);
    assert_eq!(
        after_put["metadata"]["created_at"],
        t["metadata"]["created_at"]
    );

    let patch = gw
        .http
        .patch(gw.url("/v1/threads/t"))
        .header("if-match", "\"1\"")
        .json(&json!({"drop": null, "added": "yes", "created_at": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), StatusCode::OK);
    let meta = gw.get_json("/v1/threads/t").await["metadata"].clone();
    assert_eq!(meta["keep"], 1);
    assert_eq!(meta["added"], "yes");
    assert!(meta.get("drop").is_none());
    assert_eq!(
        meta["created_at"], t["metadata"]["created_at"],
        "server keys cannot be patched"
    );
    assert_eq!(meta["version"], 2);

    let del = gw
        .http
        .delete(gw.url("/v1/threads/t"))
        .header("if-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    expect_problem(
        gw.get("/v1/threads/t").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let res = gw
        .post("/v1/threads/t/deltas", &delta_msg("r", None, "late"))
        .await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    // The id can be used again.
    assert_eq!(gw.create(json!({"id": "t"})).await["version"], 0);
    gw.stop().await;
}

/// Snapshot bodies are rendered once per version and shared (`--snapshot-cache`): every
/// write, and a delete and re-create at the same version, must still show in the next read.
async fn snapshot_reads_follow_every_write(gw: Gateway) {
    let first = gw
        .create(json!({"id": "s", "messages": [{"role": "user", "content": "first"}]}))
        .await;
    let read = gw.get_json("/v1/threads/s").await;
    assert_eq!(read, first);
    assert_eq!(gw.get_json("/v1/threads/s").await, read, "a repeated read");

    // Same id, same version 0, other content: only the incarnation tells them apart.
    let del = gw.send(Method::DELETE, "/v1/threads/s", None).await;
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let second = gw
        .create(json!({"id": "s", "messages": [{"role": "user", "content": "second"}]}))
        .await;
    assert_eq!(second["version"], 0);
    let read = gw.get_json("/v1/threads/s").await;
    assert_eq!(read["messages"][0]["content"], "second");
    assert_eq!(read, second);

    assert_eq!(gw.append("s", delta_msg("r", None, "third")).await, 1);
    let read = gw.get_json("/v1/threads/s").await;
    assert_eq!(read["version"], 1);
    assert_eq!(read["messages"][1]["content"], "third");

    let patch = gw
        .send(Method::PATCH, "/v1/threads/s", Some(&json!({"title": "t"})))
        .await;
    assert_eq!(patch.status(), StatusCode::OK);
    let read = gw.get_json("/v1/threads/s").await;
    assert_eq!(read["version"], 2);
    assert_eq!(read["metadata"]["title"], "t");
    let res = gw.get("/v1/threads/s").await;
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.headers()["etag"], "\"2\"");
    assert_eq!(gw.get_json("/v1/threads/s?view=live").await, read);
    gw.stop().await;
}

async fn list_filters_and_paging(gw: Gateway) {
    for i in 0..7 {
        let owner = if i % 2 == 0 { "alice" } else { "bob" };
        let parent = if i == 3 { Some("p") } else { None };
        gw.create(json!({"id": format!("t{i}"), "resource_id": owner, "parent_thread_id": parent}))
            .await;
    }
    let ids = |page: &Value| -> Vec<String> {
        page["threads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let alice = gw.get_json("/v1/threads?resource_id=alice").await;
    assert_eq!(ids(&alice), vec!["t0", "t2", "t4", "t6"]);
    let page1 = gw.get_json("/v1/threads?limit=3").await;
    assert_eq!(ids(&page1), vec!["t0", "t1", "t2"]);
    assert_eq!(page1["has_more"], true);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = gw
        .get_json(&format!("/v1/threads?limit=3&cursor={cursor}"))
        .await;
    assert_eq!(ids(&page2), vec!["t3", "t4", "t5"]);
    let page3 = gw
        .get_json(&format!(
            "/v1/threads?limit=3&cursor={}",
            page2["next_cursor"].as_str().unwrap()
        ))
        .await;
    assert_eq!(ids(&page3), vec!["t6"]);
    assert_eq!(page3["has_more"], false);
    assert!(page3.get("next_cursor").is_none());
    let child = gw.get_json("/v1/threads?parent_thread_id=p").await;
    assert_eq!(ids(&child), vec!["t3"]);
    let bob2 = gw.get_json("/v1/threads?resource_id=bob&limit=2").await;
    assert_eq!(ids(&bob2), vec!["t1", "t3"]);
    assert_eq!(bob2["has_more"], true);
    expect_problem(
        gw.get("/v1/threads?cursor=!!").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    expect_problem(
        gw.get("/v1/threads?bogus=1").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    gw.stop().await;
}

/// `order_by` / `order` over HTTP: "this user's threads, most recently active first", paged
/// with opaque cursors that carry their ordering; bad values are a 400 naming the parameter.
async fn list_ordering(gw: Gateway) {
    for id in ["a", "b", "c", "d", "e"] {
        gw.create(json!({"id": id, "resource_id": if id == "e" { "other" } else { "me" }}))
            .await;
    }
    for id in ["c", "a", "d"] {
        // Distinct millisecond timestamps, so the expected order is not a tie-break.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        gw.append(id, delta_msg("r", None, "hi")).await;
    }
    let ids = |page: &Value| -> Vec<String> {
        page["threads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let base = "/v1/threads?resource_id=me&order_by=updated_at&order=desc&limit=3";
    let page1 = gw.get_json(base).await;
    assert_eq!(ids(&page1), ["d", "a", "c"]);
    assert_eq!(page1["has_more"], true);
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();
    let page2 = gw.get_json(&format!("{base}&cursor={cursor}")).await;
    assert_eq!(ids(&page2), ["b"]);
    assert_eq!(page2["has_more"], false);
    let newest = gw
        .get_json("/v1/threads?order_by=created_at&order=desc&limit=10")
        .await;
    assert_eq!(ids(&newest).len(), 5);
    let stamps: Vec<(i64, String)> = newest["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["created_at"].as_i64().unwrap(),
                t["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(stamps.windows(2).all(|p| p[0] > p[1]), "{stamps:?}");
    let by_id_desc = gw.get_json("/v1/threads?order=desc&limit=2").await;
    assert_eq!(ids(&by_id_desc), ["e", "d"]);
    // A cursor is only good for the ordering it came from.
    let body = expect_problem(
        gw.get(&format!(
            "/v1/threads?resource_id=me&order_by=created_at&cursor={cursor}"
        ))
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    assert_eq!(body["field"], "cursor");
    for (query, field) in [
        ("order_by=size", "order_by"),
        ("order=sideways", "order"),
        ("order_by=updated_at&limit=0", "limit"),
    ] {
        let body = expect_problem(
            gw.get(&format!("/v1/threads?{query}")).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        )
        .await;
        assert_eq!(body["field"], field, "{query}");
    }
    gw.stop().await;
}

/// Ids with characters that are special elsewhere work fully and stay apart; invalid ids are
/// a 400 `invalid_id`, never a 500 or another thread's data.
async fn tricky_ids(gw: Gateway) {
    let ok = ["user.42", "a*b", "x>y", "a.b", "a", "*", ">"];
    for id in ok {
        let created = gw.create(json!({"id": id, "resource_id": "tricky"})).await;
        assert_eq!(created["id"], id);
    }
    for id in ok {
        assert_eq!(
            gw.append(id, delta_msg("r", None, &format!("for {id}")))
                .await,
            1
        );
    }
    for id in ok {
        let t = gw.get_json(&format!("/v1/threads/{}", enc(id))).await;
        assert_eq!(t["id"], id);
        let msgs = t["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 1, "{id} sees only its own messages");
        assert_eq!(msgs[0]["content"], format!("for {id}"));
    }
    let listed = gw
        .get_json("/v1/threads?resource_id=tricky&limit=200")
        .await;
    assert_eq!(listed["threads"].as_array().unwrap().len(), ok.len());
    for id in ok {
        let res = gw
            .send(Method::DELETE, &format!("/v1/threads/{}", enc(id)), None)
            .await;
        assert_eq!(res.status(), StatusCode::NO_CONTENT, "delete {id}");
    }
    let long = "x".repeat(300);
    // 65 two-byte characters: fewer than 128 characters, but 130 bytes.
    let long_utf8 = "é".repeat(65);
    for bad in [
        "a/b",
        "../etc",
        long.as_str(),
        long_utf8.as_str(),
        "",
        "tab\there",
        "c1\u{85}",
        "50%",
        "..",
    ] {
        let res = gw.post("/v1/threads", &json!({"id": bad})).await;
        let p = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_id").await;
        assert_eq!(p["field"], "id");
        // `..` never reaches a server as a path segment: URL parsers resolve it away.
        if !bad.is_empty() && bad != ".." {
            let res = gw.get(&format!("/v1/threads/{}", enc(bad))).await;
            expect_problem(res, StatusCode::BAD_REQUEST, "invalid_id").await;
            let res = gw
                .post(
                    &format!("/v1/threads/{}/deltas", enc(bad)),
                    &delta_msg("r", None, "x"),
                )
                .await;
            expect_problem(res, StatusCode::BAD_REQUEST, "invalid_id").await;
        }
    }
    assert_eq!(gw.get_json("/v1/threads").await["threads"], json!([]));
    gw.stop().await;
}

/// Unknown fields, NUL characters and exact floats survive the gateway.
async fn wire_values_round_trip(gw: Gateway) {
    gw.create(json!({"id": "t"})).await;
    let body = r#"{"run_id": "r", "reason": "AssistantTurnCommitted", "future_field": {"x": [1, 2.5]},
        "messages": [{"id": "m\u0000", "role": "assistant", "content": "nul:\u0000 é 😀", "tool_calls": [],
                      "metadata": {}, "new_message_field": 1e+16}],
        "patches": [{"patch": {"ops": [{"op": "set", "path": ["f"], "value": 0.1}, {"op": "set", "path": ["big"], "value": 1e+16},
                                       {"op": "set", "path": ["one"], "value": 1.0}]}}]}"#;
    let res = gw
        .http
        .post(gw.url("/v1/threads/t/deltas"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = gw.get("/v1/threads/t").await.text().await.unwrap();
    assert!(text.contains(r#""content":"nul:\u0000 é 😀""#), "{text}");
    assert!(text.contains(r#""new_message_field":1e+16"#), "{text}");
    assert!(
        text.contains(r#""tool_calls":[]"#) && text.contains(r#""metadata":{}"#),
        "{text}"
    );
    let state = gw.get("/v1/threads/t/state").await.text().await.unwrap();
    assert!(
        state.contains(r#""f":0.1"#)
            && state.contains(r#""big":1e+16"#)
            && state.contains(r#""one":1.0"#),
        "{state}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn health_openapi_and_unknown_routes() {
    let gw = Gateway::start(crate::harness::Backend::Memory).await;
    assert_eq!(gw.get_json("/healthz").await["status"], "ok");
    assert_eq!(gw.get_json("/readyz").await["status"], "ready");
    let served = gw.get("/openapi.json").await.text().await.unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        served == committed,
        "openapi/openapi.json is out of date; regenerate it with:\n  cargo run -q -- openapi > openapi/openapi.json"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    for p in [
        "/v1/threads",
        "/v1/threads/{id}",
        "/v1/threads/{id}/deltas",
        "/v1/threads/{id}/messages",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} documented");
    }
    expect_problem(gw.get("/nowhere").await, StatusCode::NOT_FOUND, "not_found").await;
    let res = gw.send(Method::PUT, "/v1/threads", None).await;
    expect_problem(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    gw.stop().await;
}

#[tokio::test]
async fn body_limit_is_configurable() {
    let gw = Gateway::start_with(crate::harness::Backend::Memory, |c| c.max_body = 1024).await;
    gw.create(json!({"id": "t"})).await;
    let res = gw
        .post(
            "/v1/threads/t/deltas",
            &delta_msg("r", None, &"y".repeat(2000)),
        )
        .await;
    let p = expect_problem(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(p["detail"].as_str().unwrap().contains("1024"));
    assert_eq!(gw.append("t", delta_msg("r", None, "small")).await, 1);
    gw.stop().await;
}

/// `If-Match` uses the strong comparison (RFC 9110 §13.1.1): only one strong tag holding a
/// version as the server sends it in `ETag`, or `*`. Weak tags, signed or zero-padded numbers,
/// bare numbers and lists are `400 invalid_header` naming If-Match on every write, and change
/// nothing; `If-None-Match` keeps the weak comparison.
#[tokio::test]
async fn if_match_is_strong_and_if_none_match_weak() {
    let gw = Gateway::start(crate::harness::Backend::Memory).await;
    gw.create(json!({"id": "t"})).await;
    assert_eq!(gw.append("t", delta_msg("r", None, "one")).await, 1);
    let writes: [(Method, &str, Option<Value>); 4] = [
        (
            Method::POST,
            "/v1/threads/t/deltas",
            Some(delta_msg("r", None, "x")),
        ),
        (Method::PUT, "/v1/threads/t", Some(json!({"state": {}}))),
        (Method::PATCH, "/v1/threads/t", Some(json!({"k": 1}))),
        (Method::DELETE, "/v1/threads/t", None),
    ];
    for bad in [
        "W/\"1\"",
        "\"+1\"",
        "1",
        "\"01\"",
        "\"1\", \"2\"",
        "\"1\",\"1\"",
        "\"\"",
        "\"-1\"",
        "\"1",
        "W/*",
    ] {
        for (method, path, body) in &writes {
            let mut req = gw.http.request(method.clone(), gw.url(path));
            if let Some(b) = body {
                req = req.json(b);
            }
            let res = req.header("if-match", bad).send().await.unwrap();
            let p = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_header").await;
            assert_eq!(
                p["field"], "If-Match",
                "{method} {path} with If-Match {bad}"
            );
        }
    }
    // Two If-Match header lines are a list too.
    let res = gw
        .http
        .delete(gw.url("/v1/threads/t"))
        .header("if-match", "\"1\"")
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    expect_problem(res, StatusCode::BAD_REQUEST, "invalid_header").await;
    // Nothing changed; the strong tag and `*` work.
    let snap = gw.get_json("/v1/threads/t").await;
    assert_eq!(snap["version"], 1);
    assert_eq!(snap["messages"].as_array().unwrap().len(), 1);
    for good in ["\"1\"", " \"2\" ", "*"] {
        let res = gw
            .http
            .patch(gw.url("/v1/threads/t"))
            .json(&json!({"k": good}))
            .header("if-match", good)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "If-Match {good}");
    }
    // If-None-Match: weak comparison, so W/"4" matches version 4; "+4" is not a tag we issued.
    for (inm, status) in [
        ("W/\"4\"", StatusCode::NOT_MODIFIED),
        ("\"4\"", StatusCode::NOT_MODIFIED),
        ("\"1\", W/\"4\"", StatusCode::NOT_MODIFIED),
        ("\"+4\"", StatusCode::OK),
        ("\"04\"", StatusCode::OK),
    ] {
        let res = gw
            .http
            .get(gw.url("/v1/threads/t"))
            .header("if-none-match", inm)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "If-None-Match {inm}");
    }
    gw.stop().await;
}

/// A path parameter that is not UTF-8 once percent-decoded is `400 invalid_id` naming that
/// parameter: `run_id` in `/v1/threads/{id}/runs/{run_id}`, `id` when the thread id is at fault.
#[tokio::test]
async fn invalid_utf8_in_a_path_names_the_parameter() {
    let gw = Gateway::start(crate::harness::Backend::Memory).await;
    gw.create(json!({"id": "t"})).await;
    let mut delta = delta_msg("r", None, "one");
    delta["run_meta"] = json!({"agent_id": "a", "origin": "user", "status": "running"});
    gw.append("t", delta).await;
    for (path, field) in [
        ("/v1/threads/t/runs/%FF", "run_id"),
        ("/v1/threads/t/runs/a%C3", "run_id"),
        ("/v1/threads/%FF/runs/r", "id"),
        ("/v1/threads/%FF/runs/%FF", "id"),
        ("/v1/threads/%FF", "id"),
        ("/v1/threads/%FE/state", "id"),
    ] {
        let res = gw.get(path).await;
        let p = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_id").await;
        assert_eq!(p["field"], field, "{path}: {p}");
        assert!(
            p["detail"].as_str().unwrap().contains(if field == "id" {
                "thread id"
            } else {
                "run id"
            }),
            "{p}"
        );
    }
    // Valid UTF-8 run ids still work, and an unknown one is 404.
    assert_eq!(gw.get_json("/v1/threads/t/runs/r").await["run_id"], "r");
    let res = gw.get("/v1/threads/t/runs/%C3%A9").await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    gw.stop().await;
}
