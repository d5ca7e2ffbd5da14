//! `GET /v1/threads/{id}/deltas`: a thread's past writes as JSON pages, from the store's
//! history and (buffered mode) the unfolded log, on every backend.

use crate::each_backend;
use crate::harness::{Backend, Gateway, delta_msg, expect_problem, nats_url};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

each_backend!(history_pages_every_kind_of_write);

fn versions(page: &Value) -> Vec<u64> {
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect()
}

fn events(page: &Value) -> Vec<String> {
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

async fn history_pages_every_kind_of_write(gw: Gateway) {
    gw.create(json!({"id": "h", "state": {"n": 0}})).await;
    let d1 = delta_msg("r1", Some("m1"), "hello");
    let d2 = json!({"run_id": "r1", "reason": "AssistantTurnCommitted", "messages": [],
        "patches": [{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 2}]}}]});
    assert_eq!(gw.append("h", d1.clone()).await, 1);
    assert_eq!(gw.append("h", d2.clone()).await, 2);
    let res = gw
        .send(Method::PATCH, "/v1/threads/h", Some(&json!({"title": "T"})))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = gw
        .send(
            Method::PUT,
            "/v1/threads/h",
            Some(&json!({"messages": [{"role": "user", "content": "again"}], "state": {"n": 9}})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let d5 = delta_msg("r2", None, "after the save");
    assert_eq!(gw.append("h", d5.clone()).await, 5);

    let all = gw.get_json("/v1/threads/h/deltas").await;
    assert_eq!(versions(&all), [1, 2, 3, 4, 5]);
    assert_eq!(
        events(&all),
        ["delta", "delta", "metadata", "snapshot", "delta"]
    );
    assert_eq!(all["version"], 5);
    assert_eq!(all["complete"], true);
    assert_eq!(all["has_more"], false);
    let e = &all["entries"];
    assert_eq!(e[0]["delta"], d1);
    assert_eq!(e[1]["delta"], d2);
    assert_eq!(e[2]["metadata"], json!({"title": "T"}));
    assert_eq!(e[3]["thread"]["messages"][0]["content"], "again");
    assert_eq!(e[3]["thread"]["state"], json!({"n": 9}));
    assert_eq!(e[4]["delta"], d5);

    // Paging: `after` = the last version seen.
    let page = gw.get_json("/v1/threads/h/deltas?after=2&limit=2").await;
    assert_eq!(versions(&page), [3, 4]);
    assert_eq!(page["has_more"], true);
    let page = gw.get_json("/v1/threads/h/deltas?after=4&limit=2").await;
    assert_eq!(versions(&page), [5]);
    assert_eq!(page["has_more"], false);
    // At the head: nothing, complete.
    let page = gw.get_json("/v1/threads/h/deltas?after=5").await;
    assert_eq!(
        page,
        json!({"entries": [], "version": 5, "complete": true, "has_more": false})
    );
    // A position the thread never had cannot be continued.
    let page = gw.get_json("/v1/threads/h/deltas?after=6").await;
    assert_eq!(
        page,
        json!({"entries": [], "version": 5, "complete": false, "has_more": false})
    );

    // Bad input names the parameter; a missing thread is 404.
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=-1", "after"),
        ("after=x", "after"),
    ] {
        let res = gw.get(&format!("/v1/threads/h/deltas?{q}")).await;
        let p = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_query").await;
        assert_eq!(p["field"], field, "{q}: {p}");
    }
    let res = gw.get("/v1/threads/h/deltas?since=1").await;
    expect_problem(res, StatusCode::BAD_REQUEST, "invalid_query").await;
    let res = gw.get("/v1/threads/nope/deltas").await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    let res = gw.get("/v1/threads/tab%09here/deltas").await;
    expect_problem(res, StatusCode::BAD_REQUEST, "invalid_id").await;
    gw.stop().await;
}

/// The store keeps the last 1,000 writes: a position older than that is not `complete`
/// (never a silent gap), and the oldest kept position pages through all 1,000.
#[tokio::test]
async fn history_older_than_what_is_kept_is_incomplete() {
    let gw = Gateway::start(Backend::Memory).await;
    gw.create(json!({"id": "long"})).await;
    let step =
        json!({"run_id": "r", "reason": "AssistantTurnCommitted", "messages": [], "patches": []});
    for v in 1..=1002 {
        assert_eq!(gw.append("long", step.clone()).await, v);
    }
    for after in [0, 1] {
        let page = gw
            .get_json(&format!("/v1/threads/long/deltas?after={after}"))
            .await;
        assert_eq!(page["complete"], false, "after={after}");
        assert_eq!(page["version"], 1002);
        assert_eq!(page["entries"], json!([]));
    }
    let page = gw
        .get_json("/v1/threads/long/deltas?after=2&limit=1000")
        .await;
    assert_eq!(page["complete"], true);
    assert_eq!(page["has_more"], false);
    assert_eq!(versions(&page), (3..=1002).collect::<Vec<_>>());
    let page = gw.get_json("/v1/threads/long/deltas?after=2").await;
    assert_eq!(
        versions(&page),
        (3..=102).collect::<Vec<_>>(),
        "default limit 100"
    );
    assert_eq!(page["has_more"], true);
    gw.stop().await;
}

/// Buffered mode: folded writes come from the store, the rest from the log, contiguous.
#[tokio::test]
async fn buffered_history_merges_store_and_log() {
    let gw = Gateway::start_buffered(Backend::Postgres, &nats_url(), |_| {}).await;
    gw.create(json!({"id": "b"})).await;
    for v in 1..=3 {
        let d = delta_msg("r", Some(&format!("m{v}")), &format!("folded {v}"));
        assert_eq!(gw.append("b", d).await, v);
    }
    let res = gw.post("/v1/threads/b/flush", &json!({})).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(gw.get_json("/v1/threads/b").await["version"], 3, "folded");
    for v in 4..=5 {
        let d = delta_msg("r", Some(&format!("m{v}")), &format!("buffered {v}"));
        assert_eq!(gw.append("b", d).await, v);
    }
    let res = gw
        .send(Method::PATCH, "/v1/threads/b", Some(&json!({"k": 1})))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        gw.get_json("/v1/threads/b").await["version"],
        3,
        "still buffered"
    );

    let page = gw.get_json("/v1/threads/b/deltas").await;
    assert_eq!(versions(&page), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        events(&page),
        ["delta", "delta", "delta", "delta", "delta", "metadata"]
    );
    assert_eq!(page["version"], 6);
    assert_eq!(page["complete"], true);
    let texts: Vec<&str> = page["entries"].as_array().unwrap()[..5]
        .iter()
        .map(|e| e["delta"]["messages"][0]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "folded 1",
            "folded 2",
            "folded 3",
            "buffered 4",
            "buffered 5"
        ]
    );
    let page = gw.get_json("/v1/threads/b/deltas?after=4").await;
    assert_eq!(versions(&page), [5, 6]);

    // A deleted thread is gone from the history too.
    let res = gw.send(Method::DELETE, "/v1/threads/b", None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = gw.get("/v1/threads/b/deltas").await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    gw.stop().await;
}
