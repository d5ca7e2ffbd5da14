//! Two tenants over every route, in direct and buffered mode, over real HTTP with real tokens:
//! zero cross-tenant reads or writes.
//!
//! Alice and Bob hold tokens scoped to their resource; an admin token sees everything. Every
//! route that names a thread, asked by Bob about Alice's thread (or by either about a thread
//! without a resource_id), must answer exactly what it answers for a thread that does not
//! exist: the same status and the same body, byte for byte, with `If-Match` (never a `412`
//! that would show a version), an `Idempotency-Key` Alice used (never a replay of her write),
//! the event stream and the history included. Afterwards Alice's thread is exactly as she left
//! it, and her open stream saw nothing but her own writes. Lists are filtered, creating or
//! moving a thread to another resource is `403`, and a thread an admin moves away ends its
//! previous owner's stream with `deleted`.

use crate::harness::enc;
use crate::support::tenants::{ADMIN, ALICE, BOB, Caller, Mode, start};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeSet;

macro_rules! each_mode {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use crate::harness::Backend;
                use crate::support::tenants::Mode;
                #[tokio::test]
                async fn direct_memory() { super::$case(Mode::Direct(Backend::Memory)).await }
                #[tokio::test]
                async fn direct_postgres() { super::$case(Mode::Direct(Backend::Postgres)).await }
                #[tokio::test]
                async fn buffered_postgres() { super::$case(Mode::Buffered(Backend::Postgres)).await }
            }
        )*
    };
}

each_mode!(
    two_tenants_over_every_route,
    moving_a_thread_ends_the_old_owners_access
);

/// Alice's first delta: a run with metadata, a message and a state patch.
fn alice_delta() -> Value {
    json!({"run_id": "r1", "reason": "AssistantTurnCommitted",
        "run_meta": {"agent_id": "agent", "origin": "user", "status": "running"},
        "messages": [{"id": "m1", "role": "assistant", "content": "alice's secret"}],
        "patches": [{"patch": {"ops": [{"op": "set", "path": ["k"], "value": "alice"}]}}]})
}

/// A request against a thread: method, path after `/v1/threads/{id}`, body, headers.
type Route = (
    Method,
    &'static str,
    Option<Value>,
    Vec<(&'static str, &'static str)>,
);

/// Every route that names a thread, with the headers that could leak (a current `If-Match`, an
/// `Idempotency-Key` the owner used with the very same body, `If-None-Match`, positions).
fn routes() -> Vec<Route> {
    let delta = Some(alice_delta());
    vec![
        (Method::GET, "", None, vec![]),
        (Method::GET, "?view=live", None, vec![]),
        (Method::GET, "", None, vec![("if-none-match", "\"1\"")]),
        (Method::GET, "/messages", None, vec![]),
        (
            Method::GET,
            "/messages?view=live&visibility=any",
            None,
            vec![],
        ),
        (Method::GET, "/state", None, vec![]),
        (Method::GET, "/state?view=live", None, vec![]),
        (Method::GET, "/runs", None, vec![]),
        (Method::GET, "/runs?view=live", None, vec![]),
        (Method::GET, "/runs/r1", None, vec![]),
        (Method::GET, "/deltas?after=0", None, vec![]),
        (Method::GET, "/events", None, vec![]),
        (Method::GET, "/events?after=0", None, vec![]),
        (
            Method::GET,
            "/events?snapshot=true",
            None,
            vec![("last-event-id", "0")],
        ),
        (Method::POST, "/deltas", delta.clone(), vec![]),
        (
            Method::POST,
            "/deltas",
            delta.clone(),
            vec![("if-match", "\"1\"")],
        ),
        (
            Method::POST,
            "/deltas",
            delta.clone(),
            vec![("if-match", "\"0\"")],
        ),
        (
            Method::POST,
            "/deltas",
            delta.clone(),
            vec![("idempotency-key", "alice-key")],
        ),
        (
            Method::PUT,
            "",
            Some(json!({"messages": [], "state": {"taken": true}})),
            vec![("if-match", "\"1\"")],
        ),
        (Method::PUT, "", Some(json!({"state": {}})), vec![]),
        (
            Method::PATCH,
            "",
            Some(json!({"title": "taken"})),
            vec![("if-match", "\"1\"")],
        ),
        (Method::PATCH, "", Some(json!({"title": "taken"})), vec![]),
        (Method::DELETE, "", None, vec![("if-match", "\"1\"")]),
        (Method::DELETE, "", None, vec![]),
        (Method::POST, "/flush", None, vec![]),
    ]
}

/// Status and body of `who` asking `route` about thread `id`.
async fn ask(who: &Caller<'_>, id: &str, route: &Route) -> (StatusCode, String) {
    let (method, tail, body, headers) = route;
    let path = format!("/v1/threads/{}{tail}", enc(id));
    let res = who
        .send(method.clone(), &path, body.as_ref(), headers)
        .await;
    (res.status(), res.text().await.unwrap())
}

/// Every route about `id` answers `who` exactly as about a thread that does not exist.
async fn indistinguishable_from_missing(who: &Caller<'_>, id: &str) {
    for route in routes() {
        let missing = ask(who, "no-such-thread", &route).await;
        let got = ask(who, id, &route).await;
        assert_eq!(missing.0, StatusCode::NOT_FOUND, "{route:?}: {}", missing.1);
        assert_eq!(got, missing, "{} {}{} about {id}", route.0, id, route.1);
    }
}

/// The live view without the times that a buffered read computes at read time.
async fn live_view(who: &Caller<'_>, id: &str) -> Value {
    let mut v = who.get_json(&format!("/v1/threads/{id}?view=live")).await;
    let meta = v["metadata"].as_object_mut().unwrap();
    meta.remove("updated_at");
    meta.remove("version_timestamp");
    v
}

fn ids(list: &Value) -> BTreeSet<String> {
    list["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

async fn two_tenants_over_every_route(mode: Mode) {
    let gw = start(mode, |_| {}).await;
    let (admin, alice, bob, anonymous) = (
        Caller::new(&gw, Some(ADMIN)),
        Caller::new(&gw, Some(ALICE)),
        Caller::new(&gw, Some(BOB)),
        Caller::new(&gw, None),
    );

    // Threads: a scoped creator's thread is its own; naming another resource is 403.
    let a1 = alice
        .post_expect(
            "/v1/threads",
            &json!({"id": "a1", "metadata": {"title": "A"},
                "messages": [{"id": "m0", "role": "user", "content": "alice's question"}]}),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(a1["resource_id"], "alice");
    let forbidden = alice
        .post_expect(
            "/v1/threads",
            &json!({"id": "sneaky", "resource_id": "bob"}),
            StatusCode::FORBIDDEN,
        )
        .await;
    assert_eq!(forbidden["code"], "forbidden");
    assert_eq!(forbidden["field"], "resource_id");
    alice
        .post_expect(
            "/v1/threads",
            &json!({"id": "a-child", "resource_id": "alice", "parent_thread_id": "a1"}),
            StatusCode::CREATED,
        )
        .await;
    bob.post_expect("/v1/threads", &json!({"id": "b1"}), StatusCode::CREATED)
        .await;
    bob.post_expect(
        "/v1/threads",
        &json!({"id": "b-child", "parent_thread_id": "a1"}),
        StatusCode::CREATED,
    )
    .await;
    admin
        .post_expect("/v1/threads", &json!({"id": "orphan"}), StatusCode::CREATED)
        .await;
    // Ids are one namespace: a taken id is 409 whoever holds it (documented).
    bob.post_expect("/v1/threads", &json!({"id": "a1"}), StatusCode::CONFLICT)
        .await;
    assert!(admin.get_json("/v1/threads/orphan").await["resource_id"].is_null());

    // Alice follows her thread and writes to it, with an idempotency key.
    let mut stream = alice.events("/v1/threads/a1/events?after=0").await;
    let key = [("idempotency-key", "alice-key")];
    let first = alice
        .send(
            Method::POST,
            "/v1/threads/a1/deltas",
            Some(&alice_delta()),
            &key,
        )
        .await;
    assert_eq!(first.status(), StatusCode::OK);
    let replay = alice
        .send(
            Method::POST,
            "/v1/threads/a1/deltas",
            Some(&alice_delta()),
            &key,
        )
        .await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let before = (
        admin.get_json("/v1/threads/a1").await,
        live_view(&admin, "a1").await,
    );
    assert_eq!(before.1["version"], 1);

    // Bob, about Alice's thread; both of them, about the thread without a resource.
    indistinguishable_from_missing(&bob, "a1").await;
    indistinguishable_from_missing(&bob, "orphan").await;
    indistinguishable_from_missing(&alice, "orphan").await;
    indistinguishable_from_missing(&alice, "b1").await;

    // Alice's thread is exactly as she left it; her stream saw only her write.
    let after = (
        admin.get_json("/v1/threads/a1").await,
        live_view(&admin, "a1").await,
    );
    assert_eq!(after, before);
    let e = stream.event().await.unwrap();
    assert_eq!((e.event.as_str(), e.id), ("delta", Some(1)));
    assert_eq!(e.data["delta"]["messages"][0]["content"], "alice's secret");
    let v2 = json!({"run_id": "r1", "reason": "RunFinished", "messages": [], "patches": [],
        "run_meta": {"agent_id": "agent", "origin": "user", "status": "done"}});
    alice
        .post_expect("/v1/threads/a1/deltas", &v2, StatusCode::OK)
        .await;
    let e = stream.event().await.unwrap();
    assert_eq!((e.event.as_str(), e.id), ("delta", Some(2)), "{e:?}");
    drop(stream);

    // Bob's own thread took the same idempotency key as a fresh write, not a replay of hers.
    let bob_write = bob
        .send(
            Method::POST,
            "/v1/threads/b1/deltas",
            Some(&alice_delta()),
            &key,
        )
        .await;
    assert_eq!(bob_write.status(), StatusCode::OK);
    assert!(bob_write.headers().get("idempotent-replayed").is_none());

    // Alice can do everything on her own thread.
    for path in [
        "/v1/threads/a1",
        "/v1/threads/a1?view=live",
        "/v1/threads/a1/messages",
        "/v1/threads/a1/state?view=live",
        "/v1/threads/a1/runs?view=live",
        "/v1/threads/a1/deltas?after=0",
    ] {
        alice.get_json(path).await;
    }
    alice
        .post_expect("/v1/threads/a1/flush", &json!(null), StatusCode::OK)
        .await;
    assert_eq!(
        alice.get_json("/v1/threads/a1/runs/r1").await["run_id"],
        "r1"
    );
    let history = alice.get_json("/v1/threads/a1/deltas?after=0").await;
    assert_eq!(history["entries"].as_array().unwrap().len(), 2);
    // Her If-Match gets the real 412 with the version; Bob's got a 404 above.
    let res = alice
        .send(
            Method::POST,
            "/v1/threads/a1/deltas",
            Some(&alice_delta()),
            &[("if-match", "\"0\"")],
        )
        .await;
    assert_eq!(res.status(), StatusCode::PRECONDITION_FAILED);
    // Saving her thread: another resource is 403; none keeps it hers.
    let res = alice
        .send(
            Method::PUT,
            "/v1/threads/a1",
            Some(&json!({"resource_id": "bob", "state": {}})),
            &[],
        )
        .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = alice
        .send(
            Method::PUT,
            "/v1/threads/a1",
            Some(&json!({"state": {"n": 1}})),
            &[],
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        admin.get_json("/v1/threads/a1?view=live").await["resource_id"],
        "alice"
    );

    // Lists: filtered to the caller's resource whatever the filters say.
    assert_eq!(
        ids(&alice.get_json("/v1/threads").await),
        set(&["a-child", "a1"])
    );
    assert_eq!(
        ids(&bob.get_json("/v1/threads").await),
        set(&["b-child", "b1"])
    );
    assert!(ids(&alice.get_json("/v1/threads?resource_id=bob").await).is_empty());
    assert_eq!(
        ids(&alice.get_json("/v1/threads?parent_thread_id=a1").await),
        set(&["a-child"])
    );
    assert_eq!(
        ids(&bob.get_json("/v1/threads?parent_thread_id=a1").await),
        set(&["b-child"])
    );
    assert_eq!(
        ids(&admin.get_json("/v1/threads").await),
        set(&["a-child", "a1", "b-child", "b1", "orphan"])
    );
    // Paging one by one never reaches another tenant's thread either.
    let mut seen = BTreeSet::new();
    let mut page = alice
        .get_json("/v1/threads?limit=1&order_by=updated_at&order=desc")
        .await;
    loop {
        seen.extend(ids(&page));
        let Some(c) = page["next_cursor"].as_str() else {
            break;
        };
        page = alice
            .get_json(&format!(
                "/v1/threads?limit=1&order_by=updated_at&order=desc&cursor={c}"
            ))
            .await;
    }
    assert_eq!(seen, set(&["a-child", "a1"]));

    // Without a token nothing is readable; the token in the query works on reads only.
    let res = anonymous.get("/v1/threads/a1").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let ok = gw
        .http
        .get(gw.url(&format!("/v1/threads/a1?access_token={ALICE}")))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let refused = gw
        .http
        .post(gw.url(&format!("/v1/threads/a1/deltas?access_token={ALICE}")))
        .json(&alice_delta())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let bob_by_query = gw
        .http
        .get(gw.url(&format!("/v1/threads/a1/events?access_token={BOB}")))
        .send()
        .await
        .unwrap();
    assert_eq!(bob_by_query.status(), StatusCode::NOT_FOUND);
    // Deleting: Bob cannot (above); Alice can.
    let res = alice
        .send(Method::DELETE, "/v1/threads/a1", None, &[])
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    gw.stop().await;
}

/// An admin moves Alice's thread to Bob: Alice's open stream ends with `deleted`, and from
/// then on the thread is Bob's and not Alice's on every route.
async fn moving_a_thread_ends_the_old_owners_access(mode: Mode) {
    let gw = start(mode, |_| {}).await;
    let (admin, alice, bob) = (
        Caller::new(&gw, Some(ADMIN)),
        Caller::new(&gw, Some(ALICE)),
        Caller::new(&gw, Some(BOB)),
    );
    alice
        .post_expect("/v1/threads", &json!({"id": "t"}), StatusCode::CREATED)
        .await;
    alice
        .post_expect("/v1/threads/t/deltas", &alice_delta(), StatusCode::OK)
        .await;
    let mut stream = alice.events("/v1/threads/t/events?after=1").await;
    let res = admin
        .send(
            Method::PUT,
            "/v1/threads/t",
            Some(&json!({"resource_id": "bob", "messages": [{"role": "user", "content": "bob's now"}]})),
            &[],
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let end = stream.event().await.expect("an event");
    assert_eq!(end.event, "deleted", "{end:?}");
    assert!(stream.event().await.is_none(), "the stream ends");
    indistinguishable_from_missing(&alice, "t").await;
    let snap = bob.get_json("/v1/threads/t?view=live").await;
    assert_eq!(snap["resource_id"], "bob");
    assert_eq!(snap["messages"][0]["content"], "bob's now");
    bob.post_expect("/v1/threads/t/flush", &json!(null), StatusCode::OK)
        .await;
    assert_eq!(bob.get_json("/v1/threads/t").await["resource_id"], "bob");
    indistinguishable_from_missing(&alice, "t").await;
    // A scoped caller cannot take it back.
    let res = alice
        .send(
            Method::PUT,
            "/v1/threads/t",
            Some(&json!({"resource_id": "alice"})),
            &[],
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    gw.stop().await;
}
