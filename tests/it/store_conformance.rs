//! One behaviour suite for every `Store` backend.
//!
//! Each case is an `async fn(&DynStore)`; the `suite!` macro at the bottom turns every case
//! into one `#[tokio::test]` per backend (`store_conformance::<backend>::<case>`), each on a
//! fresh store (memory; file in a temp dir; PostgreSQL in a fresh schema).

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use threadgate::id::ThreadId;
use threadgate::model::{ChangeSet, Extra, Message, Thread};
use threadgate::store::{
    Change, DynStore, Expect, FileStore, HISTORY_LIMIT, IdempotencyKey, ListCursor, ListOrderBy,
    ListQuery, MemoryStore, MessageQuery, Order, StoreError, VisibilityFilter, Write,
};

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

/// A store plus whatever must outlive it (temp dir, schema). Fields drop in order: the
/// store first, then the guard.
pub struct Backend {
    pub store: DynStore,
    _guard: Box<dyn Send>,
}

async fn memory() -> Backend {
    Backend {
        store: Arc::new(MemoryStore::new()),
        _guard: Box::new(()),
    }
}

async fn file() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FileStore::open(dir.path()).await.expect("open file store");
    Backend {
        store: Arc::new(store),
        _guard: Box::new(dir),
    }
}

async fn postgres() -> Backend {
    let (store, schema) = crate::pg::fresh_store().await;
    Backend {
        store: Arc::new(store),
        _guard: Box::new(schema),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn tid(s: &str) -> ThreadId {
    ThreadId::parse(s).expect("valid id")
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid wire JSON")
}

fn text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

fn user(id: &str, content: &str) -> Message {
    from(json!({"id": id, "role": "user", "content": content}))
}

fn anon(content: &str) -> Message {
    from(json!({"role": "assistant", "content": content}))
}

fn delta(run: &str, messages: Vec<Message>) -> ChangeSet {
    from(json!({
        "run_id": run, "reason": "AssistantTurnCommitted", "messages": messages, "patches": []
    }))
}

fn set(path: Value, value: Value) -> Value {
    json!({"patch": {"ops": [{"op": "set", "path": path, "value": value}]}})
}

fn key(k: &str, fp: &str) -> IdempotencyKey {
    IdempotencyKey {
        key: k.into(),
        fingerprint: fp.into(),
    }
}

fn meta(v: Value) -> Extra {
    from(v)
}

/// The current state and its version.
async fn state_of(s: &DynStore, id: &ThreadId) -> (serde_json::Value, u64) {
    let st = s.state(id).await.expect("state");
    (st.state, st.version)
}

/// A log entry without an idempotency key.
fn fold(version: u64, change: Change) -> Write {
    Write {
        version,
        at: 0,
        change,
        idempotency: None,
    }
}

/// A log entry carrying a delta.
fn fd(version: u64, d: ChangeSet) -> Write {
    fold(version, Change::Delta(d))
}

/// A log entry with an idempotency key.
fn keyed(version: u64, change: Change, k: IdempotencyKey) -> Write {
    Write {
        idempotency: Some(k),
        ..fold(version, change)
    }
}

fn contents(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.content.as_str()).collect()
}

async fn create_empty(s: &DynStore, id: &str) {
    s.create(&tid(id), Thread::new(id)).await.expect("create");
}

async fn all_messages(s: &DynStore, id: &str) -> Vec<(u64, Message)> {
    let q = MessageQuery {
        limit: 10_000,
        visibility: VisibilityFilter::Any,
        ..Default::default()
    };
    s.messages(&tid(id), &q).await.expect("messages").messages
}

macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!("expected {}, got {:?}", stringify!($pat), other),
        }
    };
}

/// Everything a read can observe about a thread, for "nothing changed" checks.
async fn observe(s: &DynStore, id: &str) -> String {
    let id = tid(id);
    let snap = s.get(&id).await.expect("get");
    let (state, sv) = state_of(s, &id).await;
    let history = s.history(&id, 0, 10_000).await.expect("history");
    let runs = s.runs(&id).await.expect("runs");
    format!(
        "{} v{} w{} u{} | {} @{sv} | {:?} | {}",
        text(&snap.thread),
        snap.version,
        snap.watermark,
        snap.updated_at,
        text(&state),
        history
            .entries
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        text(&runs)
    )
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

async fn create_get_round_trip(s: &DynStore) {
    let id = tid("t1");
    let thread: Thread = from(json!({
        "id": "ignored-the-path-wins",
        "resource_id": "user-1",
        "parent_thread_id": "parent-9",
        "messages": [
            {"id": "m1", "role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "visibility": "internal"}
        ],
        "state": {"a": 1},
        "patches": [set(json!(["b"]), json!(2))],
        "metadata": {"title": "T", "version": 99, "created_at": 1, "updated_at": 2}
    }));
    let created = s.create(&id, thread).await.expect("create");
    assert_eq!(created.version, 0);
    assert_eq!(created.watermark, 0);
    assert!(
        created.created_at > 1_600_000_000_000,
        "{}",
        created.created_at
    );
    assert_eq!(created.updated_at, created.created_at);
    assert_eq!(created.thread.id, "t1");
    assert_eq!(created.thread.metadata, meta(json!({"title": "T"})));

    let got = s.get(&id).await.expect("get");
    assert_eq!(got, created);
    assert_eq!(got.thread.resource_id.as_deref(), Some("user-1"));
    assert_eq!(got.thread.parent_thread_id.as_deref(), Some("parent-9"));
    assert_eq!(contents(&got.thread.messages), ["hi", "hello"]);
    assert_eq!(got.thread.state, json!({"a": 1}));
    assert_eq!(got.thread.patches.len(), 1);
    let wire = got.to_wire();
    assert_eq!(wire.metadata["version"], json!(0));
    assert_eq!(wire.metadata["created_at"], json!(created.created_at));

    assert_eq!(s.version(&id).await.unwrap(), 0);
    assert_eq!(state_of(s, &id).await, (json!({"a": 1, "b": 2}), 0));
    let page = s
        .messages(
            &id,
            &MessageQuery {
                limit: 10,
                visibility: VisibilityFilter::Any,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.0).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(page.version, 0);
    let h = s.history(&id, 0, 10).await.unwrap();
    assert!(h.entries.is_empty());
    assert_eq!(h.first_kept, None);
    assert_eq!(h.version, 0);
    assert!(s.runs(&id).await.unwrap().is_empty());
    assert_err!(s.get(&tid("t2")).await, StoreError::NotFound);
    assert_err!(s.version(&tid("t2")).await, StoreError::NotFound);
}

async fn create_rejects_invalid_thread(s: &DynStore) {
    let dup: Thread = from(json!({"id": "x", "messages": [
        {"id": "m", "role": "user", "content": "a"}, {"id": "m", "role": "user", "content": "b"}
    ]}));
    assert_err!(
        s.create(&tid("x"), dup).await,
        StoreError::InvalidThread { .. }
    );
    let bad_patch: Thread = from(json!({"id": "x", "state": {"n": "s"}, "patches": [
        {"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}
    ]}));
    assert_err!(
        s.create(&tid("x"), bad_patch).await,
        StoreError::InvalidThread { .. }
    );
    assert_err!(s.get(&tid("x")).await, StoreError::NotFound);
    create_empty(s, "x").await;
}

async fn duplicate_create(s: &DynStore) {
    let id = tid("dup");
    let mut first = Thread::new("dup");
    first.messages.push(user("m1", "first"));
    s.create(&id, first).await.unwrap();
    let mut second = Thread::new("dup");
    second.messages.push(user("m1", "second"));
    assert_err!(s.create(&id, second).await, StoreError::AlreadyExists);
    let got = s.get(&id).await.unwrap();
    assert_eq!(contents(&got.thread.messages), ["first"]);
    assert_eq!(got.version, 0);
}

async fn concurrent_creates(s: &DynStore) {
    let tasks: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|who| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut t = Thread::new("race");
                t.messages.push(user("m", who));
                s.create(&tid("race"), t).await.map(|_| who)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut already = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(who) => winners.push(who),
            Err(StoreError::AlreadyExists) => already += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((winners.len(), already), (1, 1));
    let got = s.get(&tid("race")).await.unwrap();
    assert_eq!(contents(&got.thread.messages), [winners[0]]);
}

async fn append_versions(s: &DynStore) {
    create_empty(s, "t").await;
    let id = tid("t");
    for n in 1..=3u64 {
        let a = s
            .append(
                &id,
                &delta("r", vec![anon(&format!("m{n}"))]),
                Expect::Any,
                None,
            )
            .await
            .unwrap();
        assert_eq!((a.version, a.replayed), (n, false));
    }
    let got = s.get(&id).await.unwrap();
    assert_eq!((got.version, got.watermark), (3, 3));
    assert!(got.updated_at >= got.created_at);
    assert_eq!(contents(&got.thread.messages), ["m1", "m2", "m3"]);
    assert_eq!(s.version(&id).await.unwrap(), 3);
    assert_err!(
        s.append(&tid("nope"), &delta("r", vec![]), Expect::Any, None)
            .await,
        StoreError::NotFound
    );
}

async fn exact_conflict(s: &DynStore) {
    create_empty(s, "t").await;
    let id = tid("t");
    s.append(&id, &delta("r", vec![anon("1")]), Expect::Exact(0), None)
        .await
        .unwrap();
    let err = s
        .append(&id, &delta("r", vec![anon("2")]), Expect::Exact(0), None)
        .await
        .unwrap_err();
    match &err {
        StoreError::VersionConflict { expected, actual } => {
            assert_eq!((*expected, *actual), (0, 1))
        }
        other => panic!("expected VersionConflict, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains('0') && text.contains('1'), "{text}");
    assert_eq!(
        s.append(&id, &delta("r", vec![anon("2")]), Expect::Exact(1), None)
            .await
            .unwrap()
            .version,
        2
    );
    assert_err!(
        s.replace(&id, Thread::new("t"), Expect::Exact(1)).await,
        StoreError::VersionConflict {
            expected: 1,
            actual: 2
        }
    );
    assert_err!(
        s.patch_metadata(&id, meta(json!({"a": 1})), Expect::Exact(7))
            .await,
        StoreError::VersionConflict {
            expected: 7,
            actual: 2
        }
    );
    assert_err!(
        s.delete(&id, Expect::Exact(3)).await,
        StoreError::VersionConflict {
            expected: 3,
            actual: 2
        }
    );
    assert_eq!(
        contents(&s.get(&id).await.unwrap().thread.messages),
        ["1", "2"]
    );
}

async fn concurrent_appends_any(s: &DynStore) {
    create_empty(s, "t").await;
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let s = s.clone();
            tokio::spawn(async move {
                let d = delta("r", vec![user(&format!("m{n}"), &format!("c{n}"))]);
                s.append(&tid("t"), &d, Expect::Any, None).await
            })
        })
        .collect();
    let mut versions = BTreeSet::new();
    for t in tasks {
        versions.insert(t.await.unwrap().expect("append").version);
    }
    assert_eq!(versions, (1..=20).collect());
    let got = s.get(&tid("t")).await.unwrap();
    assert_eq!(got.version, 20);
    assert_eq!(got.thread.messages.len(), 20);
    let ids: BTreeSet<_> = got
        .thread
        .messages
        .iter()
        .filter_map(|m| m.id.clone())
        .collect();
    assert_eq!(ids.len(), 20);
    let h = s.history(&tid("t"), 0, 100).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
}

async fn concurrent_appends_exact(s: &DynStore) {
    create_empty(s, "t").await;
    // Several rounds: the later ones run on warm connections (a pooled backend's first
    // round can end up serialised by connection set-up and prove nothing).
    for round in 0..4u64 {
        let tasks: Vec<_> = (0..20)
            .map(|n| {
                let s = s.clone();
                tokio::spawn(async move {
                    let d = delta("r", vec![anon(&format!("r{round}c{n}"))]);
                    s.append(&tid("t"), &d, Expect::Exact(round), None).await
                })
            })
            .collect();
        let (mut ok, mut conflicts) = (Vec::new(), 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(a) => ok.push(a.version),
                Err(StoreError::VersionConflict { expected, actual })
                    if (expected, actual) == (round, round + 1) =>
                {
                    conflicts += 1
                }
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(ok, [round + 1]);
        assert_eq!(conflicts, 19);
    }
    let got = s.get(&tid("t")).await.unwrap();
    assert_eq!((got.version, got.thread.messages.len()), (4, 4));
}

async fn message_dedup(s: &DynStore) {
    let id = tid("t");
    let mut t = Thread::new("t");
    t.messages.push(user("m0", "zero"));
    s.create(&id, t).await.unwrap();
    let d1 = delta("r", vec![user("m1", "one"), user("m0", "zero again")]);
    s.append(&id, &d1, Expect::Any, None).await.unwrap();
    let d2 = delta(
        "r",
        vec![
            user("m1", "one again"),
            user("m2", "two"),
            anon("x"),
            anon("x"),
            user("m2", "two again"),
        ],
    );
    s.append(&id, &d2, Expect::Any, None).await.unwrap();
    let got = s.get(&id).await.unwrap();
    assert_eq!(
        contents(&got.thread.messages),
        ["zero", "one", "two", "x", "x"]
    );
    assert_eq!(got.version, 2);
    // A delta made only of known messages is still a write.
    let a = s
        .append(&id, &delta("r", vec![user("m2", "dup")]), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(a.version, 3);
    let page = all_messages(s, "t").await;
    assert_eq!(
        page.iter().map(|m| m.0).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    // The same ids on another thread are that thread's own.
    create_empty(s, "other").await;
    s.append(&tid("other"), &d1, Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(
        contents(&s.get(&tid("other")).await.unwrap().thread.messages),
        ["one", "zero again"]
    );
}

async fn invalid_delta_changes_nothing(s: &DynStore) {
    let id = tid("t");
    let t: Thread = from(json!({"id": "t", "state": {"n": "text", "k": 1}}));
    s.create(&id, t).await.unwrap();
    s.append(&id, &delta("r", vec![user("m1", "ok")]), Expect::Any, None)
        .await
        .unwrap();
    let before = observe(s, "t").await;
    let bad: ChangeSet = from(json!({
        "run_id": "r2", "reason": "AssistantTurnCommitted",
        "run_meta": {"agent_id": "a", "origin": "user", "status": "running"},
        "messages": [{"id": "m2", "role": "user", "content": "never"}],
        "patches": [
            set(json!(["k"]), json!(2)),
            {"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}
        ]
    }));
    let ik = key("k1", "fp");
    assert_err!(
        s.append(&id, &bad, Expect::Any, Some(&ik)).await,
        StoreError::InvalidDelta(_)
    );
    assert_err!(
        s.apply_batch(&id, vec![fd(2, bad.clone())]).await,
        StoreError::InvalidDelta(_)
    );
    assert_eq!(observe(s, "t").await, before);
    // A snapshot delta whose patches fail does not reset anything either.
    let mut bad_snap = bad.clone();
    bad_snap.snapshot = Some(json!({"n": "still text"}));
    assert_err!(
        s.append(&id, &bad_snap, Expect::Any, None).await,
        StoreError::InvalidDelta(_)
    );
    assert_eq!(observe(s, "t").await, before);
    // The key was not recorded: a corrected request with it is a first write.
    let a = s
        .append(
            &id,
            &delta("r", vec![user("m2", "fine")]),
            Expect::Any,
            Some(&ik),
        )
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (2, false));
    assert_eq!(state_of(s, &id).await, (json!({"n": "text", "k": 1}), 2));
}

async fn snapshot_clears_patches(s: &DynStore) {
    let id = tid("t");
    let t: Thread =
        from(json!({"id": "t", "state": {"a": 1}, "patches": [set(json!(["b"]), json!(2))]}));
    s.create(&id, t).await.unwrap();
    let d: ChangeSet = from(json!({
        "run_id": "r", "reason": "RunFinished", "messages": [],
        "patches": [set(json!(["y"]), json!(2))], "snapshot": {"x": 1}
    }));
    s.append(&id, &d, Expect::Any, None).await.unwrap();
    let got = s.get(&id).await.unwrap();
    assert_eq!(got.thread.state, json!({"x": 1}));
    assert_eq!(
        text(&got.thread.patches),
        text(&vec![set(json!(["y"]), json!(2))])
    );
    assert_eq!(state_of(s, &id).await, (json!({"x": 1, "y": 2}), 1));
    // A null snapshot is no snapshot: patches accumulate.
    let d: ChangeSet = from(json!({
        "run_id": "r", "reason": "RunFinished", "messages": [],
        "patches": [set(json!(["z"]), json!(3))], "snapshot": null
    }));
    s.append(&id, &d, Expect::Any, None).await.unwrap();
    let got = s.get(&id).await.unwrap();
    assert_eq!(got.thread.state, json!({"x": 1}));
    assert_eq!(got.thread.patches.len(), 2);
    assert_eq!(state_of(s, &id).await, (json!({"x": 1, "y": 2, "z": 3}), 2));
    // Snapshot then more patches in a later delta still rebuild.
    let d: ChangeSet = from(json!({
        "run_id": "r", "reason": "RunFinished", "messages": [], "patches": [], "snapshot": [1]
    }));
    s.append(&id, &d, Expect::Any, None).await.unwrap();
    let got = s.get(&id).await.unwrap();
    assert_eq!(
        (got.thread.state.clone(), got.thread.patches.len()),
        (json!([1]), 0)
    );
    assert_eq!(state_of(s, &id).await, (json!([1]), 3));
}

async fn idempotency(s: &DynStore) {
    create_empty(s, "t").await;
    create_empty(s, "u").await;
    let id = tid("t");
    let d = delta("r", vec![anon("once")]);
    let k = key("k1", "fp1");
    let a = s.append(&id, &d, Expect::Any, Some(&k)).await.unwrap();
    assert_eq!((a.version, a.replayed), (1, false));
    let b = s.append(&id, &d, Expect::Any, Some(&k)).await.unwrap();
    assert_eq!((b.version, b.replayed), (1, true));
    s.append(&id, &delta("r", vec![anon("other")]), Expect::Any, None)
        .await
        .unwrap();
    // A replay answers before the precondition is checked (the first attempt succeeded).
    let c = s.append(&id, &d, Expect::Exact(0), Some(&k)).await.unwrap();
    assert_eq!((c.version, c.replayed), (1, true));
    assert_err!(
        s.append(
            &id,
            &delta("r", vec![anon("x")]),
            Expect::Any,
            Some(&key("k1", "fp2"))
        )
        .await,
        StoreError::IdempotencyKeyReused
    );
    let got = s.get(&id).await.unwrap();
    assert_eq!(contents(&got.thread.messages), ["once", "other"]);
    assert_eq!(got.version, 2);
    // Keys belong to one thread.
    let u = s
        .append(&tid("u"), &d, Expect::Any, Some(&key("k1", "fp2")))
        .await
        .unwrap();
    assert_eq!((u.version, u.replayed), (1, false));
    // Concurrent retries of one request append once.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let d = delta("r", vec![anon("retried")]);
                s.append(&tid("t"), &d, Expect::Any, Some(&key("k2", "fp")))
                    .await
            })
        })
        .collect();
    let mut versions = BTreeSet::new();
    for t in tasks {
        versions.insert(t.await.unwrap().unwrap().version);
    }
    assert_eq!(versions, BTreeSet::from([3]));
    assert_eq!(s.get(&id).await.unwrap().thread.messages.len(), 3);
}

async fn runs(s: &DynStore) {
    create_empty(s, "t").await;
    let id = tid("t");
    let with_meta = |run: &str, status: &str, parent: Option<&str>| -> ChangeSet {
        let mut v = json!({
            "run_id": run, "reason": "AssistantTurnCommitted", "messages": [], "patches": [],
            "run_meta": {"agent_id": "agent", "origin": "user", "status": status,
                         "input_tokens": 3, "output_tokens": 4, "future_field": [1]}
        });
        if let Some(p) = parent {
            v["parent_run_id"] = json!(p);
        }
        from(v)
    };
    s.append(
        &id,
        &with_meta("r1", "running", Some("p0")),
        Expect::Any,
        None,
    )
    .await
    .unwrap();
    let r1 = s.run(&id, "r1").await.unwrap();
    assert_eq!((r1.run_id.as_str(), r1.thread_id.as_str()), ("r1", "t"));
    assert_eq!(r1.parent_run_id.as_deref(), Some("p0"));
    assert_eq!(r1.version, 1);
    assert_eq!(r1.created_at, r1.updated_at);
    assert_eq!(text(&r1.meta.extra["future_field"]), "[1]");
    assert_eq!(text(&r1.meta.status), "\"running\"");
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    // A delta without run_meta leaves records alone and creates none.
    s.append(&id, &delta("r9", vec![]), Expect::Any, None)
        .await
        .unwrap();
    s.append(&id, &with_meta("r1", "done", None), Expect::Any, None)
        .await
        .unwrap();
    let r1b = s.run(&id, "r1").await.unwrap();
    assert_eq!(text(&r1b.meta.status), "\"done\"");
    assert_eq!(r1b.version, 3);
    assert_eq!(r1b.created_at, r1.created_at);
    assert!(r1b.updated_at > r1.updated_at);
    assert_eq!(r1b.parent_run_id.as_deref(), Some("p0"));
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    s.append(&id, &with_meta("r2", "waiting", None), Expect::Any, None)
        .await
        .unwrap();
    let all = s.runs(&id).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|r| (r.run_id.as_str(), r.version))
            .collect::<Vec<_>>(),
        [("r1", 3), ("r2", 4)]
    );
    assert_eq!(all[0], r1b);
    assert_err!(s.run(&id, "r9").await, StoreError::RunNotFound);
    assert_err!(s.run(&id, "nope").await, StoreError::RunNotFound);
    assert_err!(s.run(&tid("missing"), "r1").await, StoreError::NotFound);
    assert_err!(s.runs(&tid("missing")).await, StoreError::NotFound);
}

async fn history_after(s: &DynStore) {
    create_empty(s, "t").await;
    let id = tid("t");
    let d1 = delta("r", vec![user("a", "A")]);
    let d2 = delta("r", vec![user("b", "B")]);
    s.append(&id, &d1, Expect::Any, None).await.unwrap();
    s.append(&id, &d2, Expect::Any, None).await.unwrap();
    s.patch_metadata(&id, meta(json!({"k": 1, "version": 5})), Expect::Any)
        .await
        .unwrap();
    let mut t = Thread::new("t");
    t.messages.push(anon("replaced"));
    s.replace(&id, t, Expect::Any).await.unwrap();
    let h = s.history(&id, 0, 100).await.unwrap();
    assert_eq!((h.first_kept, h.version), (Some(1), 4));
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    match &h.entries[0].change {
        Change::Delta(d) => assert_eq!(text(d), text(&d1)),
        other => panic!("expected a delta, got {other:?}"),
    }
    match &h.entries[2].change {
        Change::Metadata(m) => assert_eq!(m, &meta(json!({"k": 1}))),
        other => panic!("expected metadata, got {other:?}"),
    }
    match &h.entries[3].change {
        Change::Replace(t) => assert_eq!(contents(&t.messages), ["replaced"]),
        other => panic!("expected replace, got {other:?}"),
    }
    assert!(h.entries.iter().all(|e| e.at > 1_600_000_000_000));
    let h = s.history(&id, 2, 100).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        [3, 4]
    );
    let h = s.history(&id, 0, 2).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2]
    );
    let h = s.history(&id, 4, 100).await.unwrap();
    assert!(h.entries.is_empty());
    assert_eq!((h.first_kept, h.version), (Some(1), 4));
    assert_err!(
        s.history(&tid("missing"), 0, 10).await,
        StoreError::NotFound
    );
}

async fn history_bounded(s: &DynStore) {
    create_empty(s, "t").await;
    let id = tid("t");
    let total = HISTORY_LIMIT as u64 + 5;
    let batch: Vec<Write> = (1..=total)
        .map(|v| fd(v, delta("r", vec![user(&format!("m{v}"), "x")])))
        .collect();
    assert_eq!(s.apply_batch(&id, batch.clone()).await.unwrap(), total);
    let h = s.history(&id, 0, 10).await.unwrap();
    assert_eq!(h.first_kept, Some(6));
    assert_eq!(h.version, total);
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        (6..16).collect::<Vec<_>>()
    );
    let h = s.history(&id, total - 1, 10).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        [total]
    );
    let next = s
        .append(&id, &delta("r", vec![]), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(next.version, total + 1);
    assert_eq!(s.history(&id, 0, 1).await.unwrap().first_kept, Some(7));
    assert_eq!(all_messages(s, "t").await.len(), total as usize);
}

async fn apply_batch(s: &DynStore) {
    create_empty(s, "t").await;
    let id = tid("t");
    let d = |n: u32| delta("r", vec![user(&format!("m{n}"), &format!("c{n}"))]);
    let batch = vec![fd(1, d(1)), fd(2, d(2))];
    assert_eq!(s.apply_batch(&id, batch.clone()).await.unwrap(), 2);
    assert_eq!(s.apply_batch(&id, batch.clone()).await.unwrap(), 2);
    let got = s.get(&id).await.unwrap();
    assert_eq!((got.version, got.watermark), (2, 2));
    assert_eq!(contents(&got.thread.messages), ["c1", "c2"]);
    // Overlap: only the new tail is applied; message ids dedup within the batch too.
    let overlap = vec![fd(1, d(1)), fd(2, d(2)), fd(3, d(3)), fd(4, d(3))];
    assert_eq!(s.apply_batch(&id, overlap.clone()).await.unwrap(), 4);
    assert_eq!(
        contents(&s.get(&id).await.unwrap().thread.messages),
        ["c1", "c2", "c3"]
    );
    let h = s.history(&id, 0, 100).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    // Gaps are rejected and change nothing.
    let before = observe(s, "t").await;
    assert_err!(
        s.apply_batch(&id, vec![fd(6, d(6))]).await,
        StoreError::Internal(_)
    );
    assert_err!(
        s.apply_batch(&id, vec![fd(5, d(5)), fd(7, d(7))]).await,
        StoreError::Internal(_)
    );
    assert_eq!(observe(s, "t").await, before);
    assert_eq!(s.apply_batch(&id, vec![]).await.unwrap(), 4);
    // Direct appends and folds share one position space.
    assert_eq!(
        s.append(&id, &d(5), Expect::Exact(4), None)
            .await
            .unwrap()
            .version,
        5
    );
    assert_eq!(
        s.apply_batch(&id, vec![fd(5, d(5)), fd(6, d(6))])
            .await
            .unwrap(),
        6
    );
    let got = s.get(&id).await.unwrap();
    assert_eq!((got.version, got.watermark), (6, 6));
    assert_eq!(got.thread.messages.len(), 5);
    // A deleted thread never comes back from a late fold.
    s.delete(&id, Expect::Any).await.unwrap();
    assert_err!(
        s.apply_batch(&id, vec![fd(7, d(7))]).await,
        StoreError::NotFound
    );
    assert_err!(s.get(&id).await, StoreError::NotFound);
}

/// A mix of every kind of write, as a log would carry it: deltas (with a run, patches and a
/// snapshot), metadata merges (with server keys to drop) and a full replace.
fn mixed_log() -> Vec<Change> {
    let with_run: ChangeSet = from(json!({
        "run_id": "r1", "reason": "AssistantTurnCommitted",
        "run_meta": {"agent_id": "a", "origin": "user", "status": "running"},
        "messages": [{"id": "m1", "role": "user", "content": "one"}],
        "patches": [set(json!(["a"]), json!(1))]
    }));
    let replaced: Thread = from(json!({
        "id": "ignored", "resource_id": "res2", "parent_thread_id": "p",
        "messages": [{"id": "m1", "role": "user", "content": "one again"},
                     {"role": "tool", "content": "T"}, {"id": "m9", "role": "user", "content": "nine"}],
        "state": {"s": 1}, "patches": [set(json!(["p"]), json!(true))],
        "metadata": {"x": 1, "keep": "k", "created_at": 5, "version": 3}
    }));
    let after_replace: ChangeSet = from(json!({
        "run_id": "r2", "reason": "AssistantTurnCommitted",
        "run_meta": {"agent_id": "a", "origin": "user", "status": "done"},
        "messages": [{"id": "m9", "role": "user", "content": "dup"},
                     {"id": "m1", "role": "user", "content": "dup too"},
                     {"id": "m10", "role": "user", "content": "ten"}],
        "patches": [set(json!(["q"]), json!(2))]
    }));
    let snapshot: ChangeSet = from(json!({
        "run_id": "r2", "reason": "RunFinished", "messages": [{"role": "assistant", "content": "end"}],
        "patches": [set(json!(["z"]), json!(1e16))], "snapshot": {"snap": 1.0}
    }));
    vec![
        Change::Delta(with_run),
        Change::Metadata(meta(
            json!({"k": 1, "gone": null, "version": 9, "updated_at": 1}),
        )),
        Change::Delta(delta("r1", vec![user("m2", "two"), anon("x")])),
        Change::Replace(replaced),
        Change::Delta(after_replace),
        Change::Metadata(meta(json!({"x": null, "y": [2.5], "keep": "kept"}))),
        Change::Delta(snapshot),
        Change::Metadata(meta(json!({"last": true}))),
    ]
}

/// One batch that updates the same run several times (with and without a parent) and
/// replaces the state between patches: folded at once it must equal the writes one by one
/// (a set-based store writes each run once and drops patches a later snapshot replaced).
async fn apply_batch_runs_and_resets(s: &DynStore) {
    let run = |status: &str,
               parent: Option<&str>,
               msg: &str,
               patch: Option<Value>,
               snap: Option<Value>| {
        let mut v = json!({
            "run_id": "r1", "reason": "AssistantTurnCommitted",
            "run_meta": {"agent_id": "a", "origin": "user", "status": status},
            "messages": [{"id": msg, "role": "assistant", "content": msg}],
            "patches": patch.into_iter().collect::<Vec<_>>()
        });
        if let Some(p) = parent {
            v["parent_run_id"] = json!(p);
        }
        if let Some(snap) = snap {
            v["snapshot"] = snap;
        }
        Change::Delta(from(v))
    };
    let log = [
        run(
            "running",
            Some("p0"),
            "a",
            Some(set(json!(["x"]), json!(1))),
            None,
        ),
        run(
            "waiting",
            None,
            "b",
            Some(set(json!(["y"]), json!(2))),
            None,
        ),
        Change::Delta(delta("r2", vec![user("c", "c"), user("a", "dup")])),
        run(
            "running",
            None,
            "d",
            Some(set(json!(["z"]), json!(3))),
            Some(json!({"s": 0})),
        ),
        run(
            "done",
            Some("p1"),
            "e",
            Some(set(json!(["w"]), json!(4))),
            None,
        ),
        run("done", None, "f", None, None),
    ];
    for id in ["direct", "folded"] {
        create_empty(s, id).await;
    }
    direct_and_folded(s, &log).await;
    assert_eq!(comparable(s, "folded").await, comparable(s, "direct").await);
    // Spot checks, so the comparison is not of two equally wrong things.
    let r1 = s.run(&tid("folded"), "r1").await.unwrap();
    assert_eq!(r1.parent_run_id.as_deref(), Some("p1"));
    assert_eq!(r1.version, 6);
    assert_eq!(text(&r1.meta.status), "\"done\"");
    let got = s.get(&tid("folded")).await.unwrap();
    assert_eq!(
        contents(&got.thread.messages),
        ["a", "b", "c", "d", "e", "f"]
    );
    assert_eq!(got.thread.state, json!({"s": 0}));
    assert_eq!(
        got.thread.patches.len(),
        2,
        "the patches before the snapshot are gone"
    );
    assert_eq!(
        state_of(s, &tid("folded")).await,
        (json!({"s": 0, "z": 3, "w": 4}), 6)
    );
}

/// Writes `log` to thread "direct" one change at a time and folds it into thread "folded"
/// as one batch, which it returns.
async fn direct_and_folded(s: &DynStore, log: &[Change]) -> Vec<Write> {
    for (n, change) in log.iter().enumerate() {
        write_directly(s, &tid("direct"), change, n as u64 + 1).await;
    }
    let batch: Vec<Write> = log
        .iter()
        .enumerate()
        .map(|(n, c)| fold(n as u64 + 1, c.clone()))
        .collect();
    assert_eq!(
        s.apply_batch(&tid("folded"), batch.clone()).await.unwrap(),
        log.len() as u64
    );
    batch
}

/// Applies a change the direct way, expecting it to become `version`.
async fn write_directly(s: &DynStore, id: &ThreadId, change: &Change, version: u64) {
    let expect = Expect::Exact(version - 1);
    let got = match change.clone() {
        Change::Delta(d) => s.append(id, &d, expect, None).await.unwrap().version,
        Change::Replace(t) => s.replace(id, t, expect).await.unwrap(),
        Change::Metadata(m) => s.patch_metadata(id, m, expect).await.unwrap(),
    };
    assert_eq!(got, version);
}

/// Everything about a thread that must not depend on how its writes arrived (the thread id
/// and the clock aside).
async fn comparable(s: &DynStore, id: &str) -> String {
    let tid = tid(id);
    let snap = s.get(&tid).await.unwrap();
    let mut thread = snap.thread.clone();
    thread.id = "_".into();
    let (state, sv) = state_of(s, &tid).await;
    let history = s.history(&tid, 0, 10_000).await.unwrap();
    let changes: Vec<String> = history
        .entries
        .iter()
        .map(|e| {
            let mut c = e.change.clone();
            if let Change::Replace(t) = &mut c {
                t.id = "_".into();
            }
            format!("{}:{}", e.version, text(&c))
        })
        .collect();
    let runs: Vec<String> = s
        .runs(&tid)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {:?} v{} {}",
                r.run_id,
                r.parent_run_id,
                r.version,
                text(&r.meta)
            )
        })
        .collect();
    let cursors: Vec<(u64, String)> = all_messages(s, id)
        .await
        .into_iter()
        .map(|(c, m)| (c, text(&m)))
        .collect();
    let summary = s
        .list(&ListQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .threads
        .into_iter()
        .find(|t| t.id == id)
        .map(|t| {
            format!(
                "{:?} {:?} v{} n{} {}",
                t.resource_id,
                t.parent_thread_id,
                t.version,
                t.message_count,
                text(&t.metadata)
            )
        })
        .unwrap();
    format!(
        "{} v{} w{}\nstate {} @{sv}\nhistory {changes:?} first {:?} v{}\nruns {runs:?}\n\
         messages {cursors:?}\nsummary {summary}",
        text(&thread),
        snap.version,
        snap.watermark,
        text(&state),
        history.first_kept,
        history.version,
    )
}

async fn apply_batch_mixed(s: &DynStore) {
    let base: Thread = from(json!({
        "id": "x", "resource_id": "res", "messages": [{"id": "m0", "role": "user", "content": "zero"}],
        "state": {"n": 0}, "patches": [set(json!(["b"]), json!(2))],
        "metadata": {"gone": 1, "x": 0}
    }));
    for id in ["direct", "folded"] {
        s.create(&tid(id), base.clone()).await.unwrap();
    }
    let log = mixed_log();
    let batch = direct_and_folded(s, &log).await;
    let last = log.len() as u64;
    let want = comparable(s, "direct").await;
    assert_eq!(comparable(s, "folded").await, want);
    // Spot checks, so the comparison is not of two equally wrong things.
    let got = s.get(&tid("folded")).await.unwrap();
    assert_eq!((got.version, got.watermark), (last, last));
    assert_eq!(got.thread.resource_id.as_deref(), Some("res2"));
    assert_eq!(got.thread.parent_thread_id.as_deref(), Some("p"));
    assert_eq!(
        contents(&got.thread.messages),
        ["one again", "T", "nine", "ten", "end"]
    );
    assert_eq!(
        got.thread.metadata,
        meta(json!({"keep": "kept", "y": [2.5], "last": true}))
    );
    assert_eq!(got.thread.state, json!({"snap": 1.0}));
    assert_eq!(
        text(&state_of(s, &tid("folded")).await),
        text(&(json!({"snap": 1.0, "z": 1e16}), last))
    );
    let h = s.history(&tid("folded"), 0, 100).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    match &h.entries[1].change {
        Change::Metadata(m) => assert_eq!(m, &meta(json!({"k": 1, "gone": null}))),
        other => panic!("expected metadata, got {other:?}"),
    }
    match &h.entries[3].change {
        Change::Replace(t) => {
            assert_eq!(t.id, "folded");
            assert_eq!(t.metadata, meta(json!({"x": 1, "keep": "k"})));
        }
        other => panic!("expected replace, got {other:?}"),
    }
    assert_eq!(
        all_messages(s, "folded")
            .await
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let found = s
        .list(&ListQuery {
            resource_id: Some("res2".into()),
            parent_thread_id: Some("p".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found.threads.len(), 2);
    // Batches split anywhere give the same result as one batch.
    s.create(&tid("split"), base.clone()).await.unwrap();
    for chunk in batch.chunks(3) {
        s.apply_batch(&tid("split"), chunk.to_vec()).await.unwrap();
    }
    assert_eq!(comparable(s, "split").await, want);
    // Folding onto direct writes continues the same position space.
    let more = fold(last + 1, Change::Metadata(meta(json!({"after": "direct"}))));
    assert_eq!(
        s.apply_batch(
            &tid("direct"),
            vec![fold(last, log[last as usize - 1].clone()), more]
        )
        .await
        .unwrap(),
        last + 1
    );
    assert_eq!(
        s.get(&tid("direct")).await.unwrap().thread.metadata["after"],
        json!("direct")
    );
}

async fn apply_batch_idempotency(s: &DynStore) {
    create_empty(s, "t").await;
    let id = tid("t");
    let batch = vec![
        keyed(
            1,
            Change::Delta(delta("r", vec![anon("one")])),
            key("k1", "fp1"),
        ),
        keyed(2, Change::Metadata(meta(json!({"m": 1}))), key("k2", "fp2")),
        fd(3, delta("r", vec![anon("three")])),
        keyed(4, Change::Replace(Thread::new("t")), key("k4", "fp4")),
    ];
    assert_eq!(s.apply_batch(&id, batch.clone()).await.unwrap(), 4);
    for (k, fp, v) in [("k1", "fp1", 1), ("k2", "fp2", 2), ("k4", "fp4", 4)] {
        // A retry replays, whatever its precondition and body.
        let a = s
            .append(
                &id,
                &delta("r", vec![anon("retry")]),
                Expect::Exact(0),
                Some(&key(k, fp)),
            )
            .await
            .unwrap();
        assert_eq!((a.version, a.replayed), (v, true), "{k}");
        assert_err!(
            s.append(
                &id,
                &delta("r", vec![anon("other")]),
                Expect::Any,
                Some(&key(k, "other"))
            )
            .await,
            StoreError::IdempotencyKeyReused
        );
    }
    assert_eq!(s.version(&id).await.unwrap(), 4);
    assert!(s.get(&id).await.unwrap().thread.messages.is_empty());
    // A fresh key is a first write; the fold's keys stay remembered after it.
    let a = s
        .append(
            &id,
            &delta("r", vec![anon("five")]),
            Expect::Any,
            Some(&key("k5", "fp5")),
        )
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (5, false));
    // Refolding the same entries changes no key.
    assert_eq!(s.apply_batch(&id, batch.clone()).await.unwrap(), 5);
    let a = s
        .append(
            &id,
            &delta("r", vec![]),
            Expect::Any,
            Some(&key("k1", "fp1")),
        )
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (1, true));
    // The log is authoritative: a key folded again at a later version (even a key in the
    // same batch twice) answers with the latest version and fingerprint.
    let again = vec![
        keyed(6, Change::Delta(delta("r", vec![])), key("k1", "fpX")),
        keyed(7, Change::Delta(delta("r", vec![])), key("k7", "a")),
        keyed(8, Change::Delta(delta("r", vec![])), key("k7", "b")),
    ];
    assert_eq!(s.apply_batch(&id, again.clone()).await.unwrap(), 8);
    for (k, fp, v) in [("k1", "fpX", 6), ("k7", "b", 8), ("k5", "fp5", 5)] {
        let a = s
            .append(&id, &delta("r", vec![]), Expect::Any, Some(&key(k, fp)))
            .await
            .unwrap();
        assert_eq!((a.version, a.replayed), (v, true), "{k}");
    }
    for (k, fp) in [("k1", "fp1"), ("k7", "a")] {
        assert_err!(
            s.append(&id, &delta("r", vec![]), Expect::Any, Some(&key(k, fp)))
                .await,
            StoreError::IdempotencyKeyReused
        );
    }
    assert_eq!(s.version(&id).await.unwrap(), 8);
    // Keys folded into one thread are that thread's own.
    create_empty(s, "u").await;
    let a = s
        .append(
            &tid("u"),
            &delta("r", vec![]),
            Expect::Any,
            Some(&key("k1", "fp1")),
        )
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (1, false));
}

async fn apply_batch_invalid(s: &DynStore) {
    let id = tid("t");
    let t: Thread = from(json!({"id": "t", "state": {"n": "text"},
        "messages": [{"id": "m0", "role": "user", "content": "zero"}]}));
    s.create(&id, t).await.unwrap();
    s.apply_batch(&id, vec![fd(1, delta("r", vec![user("m1", "one")]))])
        .await
        .unwrap();
    let before = observe(s, "t").await;
    let good = |v| {
        keyed(
            v,
            Change::Delta(delta("r", vec![user("m2", "two")])),
            key("k", "f"),
        )
    };
    let bad_patches: Thread = from(json!({"id": "t", "state": {"n": "s"}, "patches": [
        {"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]}));
    let dup_ids: Thread = from(json!({"id": "t", "messages": [
        {"id": "x", "role": "user", "content": "1"}, {"id": "x", "role": "user", "content": "2"}]}));
    for bad in [bad_patches, dup_ids] {
        let batch = vec![
            good(2),
            fold(3, Change::Metadata(meta(json!({"m": 1})))),
            fold(4, Change::Replace(bad)),
            fd(5, delta("r", vec![anon("after")])),
        ];
        assert_err!(
            s.apply_batch(&id, batch.clone()).await,
            StoreError::InvalidThread { .. }
        );
        assert_eq!(observe(s, "t").await, before);
    }
    // A delta that fails after a valid replace undoes the replace too.
    let fine: Thread = from(json!({"id": "t", "state": {"n": "still text"}}));
    let bad_delta: ChangeSet = from(json!({
        "run_id": "r", "reason": "AssistantTurnCommitted", "messages": [],
        "patches": [{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]
    }));
    let batch = vec![
        good(2),
        fold(3, Change::Replace(fine)),
        fold(4, Change::Metadata(meta(json!({"m": 1})))),
        fd(5, bad_delta),
    ];
    assert_err!(
        s.apply_batch(&id, batch.clone()).await,
        StoreError::InvalidDelta(_)
    );
    assert_eq!(observe(s, "t").await, before);
    assert_eq!(
        contents(&s.get(&id).await.unwrap().thread.messages),
        ["zero", "one"]
    );
    // The failed batches' key was not remembered.
    let a = s
        .append(&id, &delta("r", vec![]), Expect::Any, Some(&key("k", "f")))
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (2, false));
    // A missing thread is NotFound, whatever the entries.
    assert_err!(
        s.apply_batch(
            &tid("missing"),
            vec![fold(1, Change::Replace(Thread::new("missing")))]
        )
        .await,
        StoreError::NotFound
    );
    assert_err!(s.get(&tid("missing")).await, StoreError::NotFound);
}

async fn apply_batch_twice(s: &DynStore) {
    let base: Thread = from(json!({"id": "t", "state": {"n": 0}, "metadata": {"x": 0}}));
    s.create(&tid("t"), base).await.unwrap();
    let batch: Vec<Write> = mixed_log()
        .into_iter()
        .enumerate()
        .map(|(n, c)| keyed(n as u64 + 1, c, key(&format!("k{n}"), "fp")))
        .collect();
    let last = batch.len() as u64;
    assert_eq!(s.apply_batch(&tid("t"), batch.clone()).await.unwrap(), last);
    let once = observe(s, "t").await;
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    assert_eq!(s.apply_batch(&tid("t"), batch.clone()).await.unwrap(), last);
    assert_eq!(
        s.apply_batch(&tid("t"), batch[..3].to_vec()).await.unwrap(),
        last
    );
    // `observe` includes `updated_at`: a no-op does not even touch the clock.
    assert_eq!(observe(s, "t").await, once);
    let a = s
        .append(
            &tid("t"),
            &delta("r", vec![]),
            Expect::Any,
            Some(&key("k2", "fp")),
        )
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (3, true));
}

async fn concurrent_apply_batch(s: &DynStore) {
    create_empty(s, "t").await;
    // Several rounds: the later ones run on warm connections.
    for round in 0..3u64 {
        let batch: Arc<Vec<Write>> = Arc::new(
            (round * 50 + 1..=round * 50 + 50)
                .map(|v| match v % 10 {
                    0 => keyed(
                        v,
                        Change::Metadata(meta(json!({ format!("k{v}"): v }))),
                        key(&format!("key{v}"), "fp"),
                    ),
                    _ => fd(v, delta("r", vec![anon(&format!("c{v}"))])),
                })
                .collect(),
        );
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (s, batch) = (s.clone(), batch.clone());
                tokio::spawn(async move { s.apply_batch(&tid("t"), batch.to_vec()).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), round * 50 + 50);
        }
    }
    let got = s.get(&tid("t")).await.unwrap();
    assert_eq!((got.version, got.watermark), (150, 150));
    let want: Vec<String> = (1..=150u64)
        .filter(|v| v % 10 != 0)
        .map(|v| format!("c{v}"))
        .collect();
    assert_eq!(contents(&got.thread.messages), want);
    assert_eq!(got.thread.metadata.len(), 15);
    let h = s.history(&tid("t"), 0, 1_000).await.unwrap();
    assert_eq!(
        h.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=150).collect::<Vec<_>>()
    );
    let a = s
        .append(
            &tid("t"),
            &delta("r", vec![]),
            Expect::Any,
            Some(&key("key70", "fp")),
        )
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (70, true));
}

async fn replace(s: &DynStore) {
    let id = tid("t");
    let mut t = Thread::new("t");
    t.messages.extend([user("a", "A"), user("b", "B")]);
    t.resource_id = Some("res".into());
    s.create(&id, t).await.unwrap();
    let created_at = s.get(&id).await.unwrap().created_at;
    let new: Thread = from(json!({
        "id": "t", "resource_id": "res2",
        "messages": [{"id": "b", "role": "user", "content": "B2"}, {"role": "tool", "content": "T"},
                     {"id": "c", "role": "user", "content": "C"}],
        "state": {"s": 1}, "patches": [set(json!(["p"]), json!(true))],
        "metadata": {"k": "v", "version": 42, "updated_at": 0}
    }));
    assert_eq!(
        s.replace(&id, new.clone(), Expect::Exact(0)).await.unwrap(),
        1
    );
    let got = s.get(&id).await.unwrap();
    assert_eq!(
        (got.version, got.watermark, got.created_at),
        (1, 1, created_at)
    );
    assert_eq!(contents(&got.thread.messages), ["B2", "T", "C"]);
    assert_eq!(got.thread.resource_id.as_deref(), Some("res2"));
    assert_eq!(got.thread.metadata, meta(json!({"k": "v"})));
    assert_eq!(got.to_wire().metadata["version"], json!(1));
    assert_eq!(state_of(s, &id).await, (json!({"s": 1, "p": true}), 1));
    assert_eq!(
        all_messages(s, "t")
            .await
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_err!(
        s.replace(&id, new.clone(), Expect::Exact(0)).await,
        StoreError::VersionConflict { .. }
    );
    // After a replace, message ids dedup against the new list only.
    s.append(
        &id,
        &delta("r", vec![user("a", "A again"), user("c", "no")]),
        Expect::Any,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        contents(&s.get(&id).await.unwrap().thread.messages),
        ["B2", "T", "C", "A again"]
    );
    // An invalid thread changes nothing.
    let before = observe(s, "t").await;
    let bad: Thread = from(json!({"id": "t", "messages": [
        {"id": "x", "role": "user", "content": "1"}, {"id": "x", "role": "user", "content": "2"}]}));
    assert_err!(
        s.replace(&id, bad, Expect::Any).await,
        StoreError::InvalidThread { .. }
    );
    assert_eq!(observe(s, "t").await, before);
    assert_err!(
        s.replace(&tid("missing"), new, Expect::Any).await,
        StoreError::NotFound
    );
    let list = s
        .list(&ListQuery {
            resource_id: Some("res2".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.threads.len(), 1);
}

async fn patch_metadata(s: &DynStore) {
    let id = tid("t");
    let t: Thread = from(json!({"id": "t", "metadata": {"a": 1, "b": 2, "nested": {"x": 1}}}));
    s.create(&id, t).await.unwrap();
    let created = s.get(&id).await.unwrap();
    let patch = meta(
        json!({"b": null, "c": 3, "nested": {"y": 2}, "version": 77, "created_at": 5,
                            "updated_at": 6, "version_timestamp": 7, "gone": null}),
    );
    assert_eq!(
        s.patch_metadata(&id, patch, Expect::Exact(0))
            .await
            .unwrap(),
        1
    );
    let got = s.get(&id).await.unwrap();
    assert_eq!(
        got.thread.metadata,
        meta(json!({"a": 1, "c": 3, "nested": {"y": 2}}))
    );
    assert_eq!(
        (got.version, got.watermark, got.created_at),
        (1, 1, created.created_at)
    );
    let wire = got.to_wire();
    assert_eq!(wire.metadata["version"], json!(1));
    assert_eq!(wire.metadata["created_at"], json!(created.created_at));
    assert_err!(
        s.patch_metadata(&tid("missing"), meta(json!({})), Expect::Any)
            .await,
        StoreError::NotFound
    );
}

async fn delete(s: &DynStore) {
    create_empty(s, "t").await;
    create_empty(s, "keep").await;
    let id = tid("t");
    s.append(
        &id,
        &delta("r", vec![anon("x")]),
        Expect::Any,
        Some(&key("k", "f")),
    )
    .await
    .unwrap();
    assert_err!(
        s.delete(&id, Expect::Exact(0)).await,
        StoreError::VersionConflict { .. }
    );
    s.delete(&id, Expect::Exact(1)).await.unwrap();
    assert_err!(s.get(&id).await, StoreError::NotFound);
    assert_err!(s.version(&id).await, StoreError::NotFound);
    assert_err!(s.state(&id).await, StoreError::NotFound);
    assert_err!(
        s.messages(
            &id,
            &MessageQuery {
                limit: 5,
                ..Default::default()
            }
        )
        .await,
        StoreError::NotFound
    );
    assert_err!(s.history(&id, 0, 5).await, StoreError::NotFound);
    assert_err!(s.runs(&id).await, StoreError::NotFound);
    assert_err!(
        s.append(&id, &delta("r", vec![]), Expect::Any, None).await,
        StoreError::NotFound
    );
    assert_err!(s.delete(&id, Expect::Any).await, StoreError::NotFound);
    let list = s
        .list(&ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        list.threads
            .iter()
            .map(|t| t.id.as_str())
            .collect::<Vec<_>>(),
        ["keep"]
    );
    // The id can be used again, for a brand-new thread with nothing of the old one.
    create_empty(s, "t").await;
    let got = s.get(&id).await.unwrap();
    assert_eq!((got.version, got.thread.messages.len()), (0, 0));
    assert!(s.history(&id, 0, 10).await.unwrap().entries.is_empty());
    let a = s
        .append(
            &id,
            &delta("r", vec![anon("y")]),
            Expect::Any,
            Some(&key("k", "f")),
        )
        .await
        .unwrap();
    assert_eq!((a.version, a.replayed), (1, false));
}

async fn messages_paging(s: &DynStore) {
    let id = tid("t");
    let mut t = Thread::new("t");
    for n in 0..10 {
        let mut m = json!({
            "id": format!("m{n}"), "role": "user", "content": format!("c{n}"),
            "metadata": {"run_id": if n % 2 == 0 { "ra" } else { "rb" }}
        });
        if n == 3 || n == 6 {
            m["visibility"] = json!("internal");
        }
        t.messages.push(from(m));
    }
    s.create(&id, t).await.unwrap();
    s.append(&id, &delta("r", vec![]), Expect::Any, None)
        .await
        .unwrap();
    let q = |f: &dyn Fn(&mut MessageQuery)| {
        let mut q = MessageQuery {
            limit: 50,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    let page = |q: MessageQuery| {
        let s = s.clone();
        async move {
            let p = s.messages(&tid("t"), &q).await.unwrap();
            assert_eq!(p.version, 1);
            for (c, m) in &p.messages {
                assert_eq!(m.content, format!("c{c}"));
            }
            (
                p.messages.iter().map(|m| m.0).collect::<Vec<_>>(),
                p.has_more,
            )
        }
    };
    assert_eq!(page(q(&|q| q.limit = 4)).await, (vec![0, 1, 2, 4], true));
    assert_eq!(
        page(q(&|q| q.after = Some(4))).await,
        (vec![5, 7, 8, 9], false)
    );
    assert_eq!(
        page(q(&|q| {
            q.after = Some(4);
            q.limit = 4
        }))
        .await,
        (vec![5, 7, 8, 9], false)
    );
    assert_eq!(
        page(q(&|q| {
            q.after = Some(4);
            q.limit = 3
        }))
        .await,
        (vec![5, 7, 8], true)
    );
    assert_eq!(
        page(q(&|q| {
            q.before = Some(5);
            q.order = Order::Desc;
            q.limit = 2
        }))
        .await,
        (vec![4, 2], true)
    );
    assert_eq!(
        page(q(&|q| q.order = Order::Desc)).await,
        (vec![9, 8, 7, 5, 4, 2, 1, 0], false)
    );
    assert_eq!(
        page(q(&|q| q.visibility = VisibilityFilter::Internal)).await,
        (vec![3, 6], false)
    );
    assert_eq!(
        page(q(&|q| q.visibility = VisibilityFilter::Any)).await,
        ((0..10).collect(), false)
    );
    assert_eq!(
        page(q(&|q| q.run_id = Some("ra".into()))).await,
        (vec![0, 2, 4, 8], false)
    );
    assert_eq!(
        page(q(&|q| {
            q.run_id = Some("ra".into());
            q.visibility = VisibilityFilter::Any
        }))
        .await,
        (vec![0, 2, 4, 6, 8], false)
    );
    assert_eq!(
        page(q(&|q| {
            q.run_id = Some("rb".into());
            q.order = Order::Desc;
            q.limit = 2
        }))
        .await,
        (vec![9, 7], true)
    );
    assert_eq!(
        page(q(&|q| q.run_id = Some("zz".into()))).await,
        (vec![], false)
    );
    assert_eq!(
        page(q(&|q| {
            q.after = Some(2);
            q.before = Some(6);
            q.visibility = VisibilityFilter::Any
        }))
        .await,
        (vec![3, 4, 5], false)
    );
    assert_eq!(page(q(&|q| { q.after = Some(9) })).await, (vec![], false));
    assert_eq!(page(q(&|q| { q.before = Some(0) })).await, (vec![], false));
    assert_eq!(
        page(q(&|q| { q.after = Some(u64::MAX) })).await,
        (vec![], false)
    );
    assert_eq!(
        page(q(&|q| {
            q.before = Some(u64::MAX);
            q.limit = 1
        }))
        .await,
        (vec![0], true)
    );
    // Cursors of appended messages continue the sequence.
    s.append(&id, &delta("r", vec![anon("c10")]), Expect::Any, None)
        .await
        .unwrap();
    let p = s.messages(&id, &q(&|q| q.after = Some(8))).await.unwrap();
    assert_eq!(p.messages.iter().map(|m| m.0).collect::<Vec<_>>(), [9, 10]);
    assert_eq!(p.version, 2);
    assert_err!(
        s.messages(&tid("missing"), &q(&|_| {})).await,
        StoreError::NotFound
    );
}

async fn list(s: &DynStore) {
    let mk = |id: &str, res: Option<&str>, parent: Option<&str>, n: usize| {
        let mut t = Thread::new(id);
        t.resource_id = res.map(Into::into);
        t.parent_thread_id = parent.map(Into::into);
        t.metadata = meta(json!({"name": id}));
        t.messages = (0..n).map(|i| anon(&i.to_string())).collect();
        t
    };
    for (id, res, parent, n) in [
        ("t1", Some("A"), None, 1),
        ("t2", Some("B"), None, 0),
        ("t3", Some("A"), Some("t1"), 2),
        ("t4", Some("A"), None, 0),
        ("t5", None, Some("t1"), 3),
    ] {
        s.create(&tid(id), mk(id, res, parent, n)).await.unwrap();
    }
    s.append(
        &tid("t3"),
        &delta("r", vec![anon("more")]),
        Expect::Any,
        None,
    )
    .await
    .unwrap();
    let ids = |p: &threadgate::store::ListPage| {
        p.threads.iter().map(|t| t.id.clone()).collect::<Vec<_>>()
    };
    let lq = |res: Option<&str>, parent: Option<&str>, after: Option<&str>, limit| ListQuery {
        resource_id: res.map(Into::into),
        parent_thread_id: parent.map(Into::into),
        after: after.map(|a| ListCursor { key: 0, id: tid(a) }),
        limit,
        ..Default::default()
    };
    let p = s.list(&lq(None, None, None, 2)).await.unwrap();
    assert_eq!(
        (ids(&p), p.has_more),
        (vec!["t1".to_owned(), "t2".into()], true)
    );
    let p = s.list(&lq(None, None, Some("t2"), 2)).await.unwrap();
    assert_eq!(
        (ids(&p), p.has_more),
        (vec!["t3".to_owned(), "t4".into()], true)
    );
    let p = s.list(&lq(None, None, Some("t4"), 2)).await.unwrap();
    assert_eq!((ids(&p), p.has_more), (vec!["t5".to_owned()], false));
    let p = s.list(&lq(None, None, None, 5)).await.unwrap();
    assert_eq!((ids(&p).len(), p.has_more), (5, false));
    let p = s.list(&lq(Some("A"), None, None, 2)).await.unwrap();
    assert_eq!(
        (ids(&p), p.has_more),
        (vec!["t1".to_owned(), "t3".into()], true)
    );
    let p = s.list(&lq(Some("A"), None, Some("t3"), 2)).await.unwrap();
    assert_eq!((ids(&p), p.has_more), (vec!["t4".to_owned()], false));
    let p = s.list(&lq(None, Some("t1"), None, 10)).await.unwrap();
    assert_eq!(
        (ids(&p), p.has_more),
        (vec!["t3".to_owned(), "t5".into()], false)
    );
    let p = s.list(&lq(Some("A"), Some("t1"), None, 10)).await.unwrap();
    assert_eq!(ids(&p), ["t3"]);
    let t3 = &p.threads[0];
    assert_eq!(t3.resource_id.as_deref(), Some("A"));
    assert_eq!(t3.parent_thread_id.as_deref(), Some("t1"));
    assert_eq!((t3.version, t3.message_count), (1, 3));
    assert_eq!(t3.metadata, meta(json!({"name": "t3"})));
    assert!(t3.updated_at >= t3.created_at && t3.created_at > 0);
    let p = s.list(&lq(Some("nobody"), None, None, 10)).await.unwrap();
    assert_eq!((ids(&p).len(), p.has_more), (0, false));
    // Byte-wise id order, whatever the database's collation.
    let odd = ["B_2", "a.1", "A-1", "_z", "a*b", "x>y", "Z~", "a~"];
    for id in odd {
        create_empty(s, id).await;
    }
    let mut want: Vec<String> = odd.iter().map(|s| s.to_string()).collect();
    want.extend(["t1", "t2", "t3", "t4", "t5"].map(String::from));
    want.sort();
    let mut got = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let p = s.list(&lq(None, None, after.as_deref(), 3)).await.unwrap();
        got.extend(ids(&p));
        after = got.last().cloned();
        if !p.has_more {
            break;
        }
    }
    assert_eq!(got, want);
}

/// Pages through a whole listing with `limit`, returning the summaries in the order given.
async fn list_all(
    s: &DynStore,
    base: &ListQuery,
    between_pages: &mut dyn FnMut(usize) -> Vec<String>,
) -> Vec<threadgate::store::ThreadSummary> {
    let mut out = Vec::new();
    let mut q = base.clone();
    for page_no in 0.. {
        let p = s.list(&q).await.expect("list");
        assert!(p.threads.len() <= q.limit);
        out.extend(p.threads.iter().cloned());
        if !p.has_more {
            break;
        }
        assert_eq!(
            p.threads.len(),
            q.limit,
            "a page with more after it is full"
        );
        q.after = q.cursor_after(p.threads.last().unwrap());
        for id in between_pages(page_no) {
            s.append(
                &tid(&id),
                &delta("r", vec![anon("touch")]),
                Expect::Any,
                None,
            )
            .await
            .unwrap();
        }
    }
    out
}

/// The `(key, id)` a listing sorts by.
fn sort_key(by: ListOrderBy, t: &threadgate::store::ThreadSummary) -> (i64, String) {
    (by.key(t.created_at, t.updated_at), t.id.clone())
}

/// Every ordering, both directions, with and without a filter, paged in several sizes, equals
/// the threads sorted by `(key, id)` (the oracle is computed from the summaries themselves).
async fn list_orders(s: &DynStore) {
    let ids = ["m", "c", "x", "a", "q", "b", "z", "k"];
    for (i, id) in ids.iter().enumerate() {
        let mut t = Thread::new(*id);
        t.resource_id = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
        s.create(&tid(id), t).await.unwrap();
        // Distinct creation times for some, ties for the others: both must order.
        if i % 3 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
    }
    // Writes in an order unrelated to ids or creation, so updated_at orders differently.
    for id in ["k", "a", "x", "m"] {
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        s.append(&tid(id), &delta("r", vec![anon("w")]), Expect::Any, None)
            .await
            .unwrap();
    }
    let everything = list_all(
        s,
        &ListQuery {
            limit: 100,
            ..Default::default()
        },
        &mut |_| vec![],
    )
    .await;
    assert_eq!(everything.len(), ids.len());
    let mut by_updated_desc = everything.clone();
    by_updated_desc.sort_by_key(|t| std::cmp::Reverse(sort_key(ListOrderBy::UpdatedAt, t)));
    assert_eq!(
        by_updated_desc[..4]
            .iter()
            .map(|t| t.id.as_str())
            .collect::<Vec<_>>(),
        ["m", "x", "a", "k"],
        "the most recently written first"
    );
    for by in [
        ListOrderBy::Id,
        ListOrderBy::CreatedAt,
        ListOrderBy::UpdatedAt,
    ] {
        for order in [Order::Asc, Order::Desc] {
            for resource in [None, Some("even")] {
                let mut want: Vec<_> = everything
                    .iter()
                    .filter(|t| resource.is_none_or(|r| t.resource_id.as_deref() == Some(r)))
                    .cloned()
                    .collect();
                want.sort_by_key(|t| sort_key(by, t));
                if order == Order::Desc {
                    want.reverse();
                }
                for limit in [1, 3, 100] {
                    let q = ListQuery {
                        resource_id: resource.map(Into::into),
                        order_by: by,
                        order,
                        limit,
                        ..Default::default()
                    };
                    let got = list_all(s, &q, &mut |_| vec![]).await;
                    assert_eq!(
                        got.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
                        want.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
                        "{by:?} {order:?} resource={resource:?} limit={limit}"
                    );
                }
            }
        }
    }
    // A cursor at any thread (in a run of equal keys too, where the store had ties)
    // continues strictly after it.
    for at in &everything {
        let q = ListQuery {
            order_by: ListOrderBy::CreatedAt,
            limit: 100,
            after: Some(ListCursor {
                key: at.created_at,
                id: tid(&at.id),
            }),
            ..Default::default()
        };
        let rest: Vec<_> = s.list(&q).await.unwrap().threads;
        let mut want: Vec<_> = everything
            .iter()
            .filter(|t| sort_key(ListOrderBy::CreatedAt, t) > sort_key(ListOrderBy::CreatedAt, at))
            .collect();
        want.sort_by_key(|t| sort_key(ListOrderBy::CreatedAt, t));
        assert_eq!(
            rest.iter().map(|t| &t.id).collect::<Vec<_>>(),
            want.iter().map(|t| &t.id).collect::<Vec<_>>(),
            "after {}",
            at.id
        );
    }
    // Deleted threads leave every ordering.
    s.delete(&tid("x"), Expect::Any).await.unwrap();
    for by in [
        ListOrderBy::Id,
        ListOrderBy::CreatedAt,
        ListOrderBy::UpdatedAt,
    ] {
        let q = ListQuery {
            order_by: by,
            order: Order::Desc,
            limit: 2,
            ..Default::default()
        };
        let got = list_all(s, &q, &mut |_| vec![]).await;
        assert_eq!(got.len(), ids.len() - 1, "{by:?}");
        assert!(got.iter().all(|t| t.id != "x"));
    }
}

/// Threads written to while a client pages: with a stable key (id, created_at) every thread
/// is returned exactly once; by updated_at every thread *not* written meanwhile is returned
/// exactly once, and a written one moves (ascending: never lost, and returned at most once
/// more per write; descending: never twice), with keys monotonic over the whole pass.
async fn list_paging_while_writing(s: &DynStore) {
    let n = 24;
    let ids: Vec<String> = (0..n).map(|i| format!("t{i:02}")).collect();
    for id in &ids {
        create_empty(s, id).await;
    }
    let mut round = 0usize;
    for by in [
        ListOrderBy::Id,
        ListOrderBy::CreatedAt,
        ListOrderBy::UpdatedAt,
    ] {
        for order in [Order::Asc, Order::Desc] {
            // Before each page after the first: write to two threads, one probably already
            // returned and one probably not (positions spread over the whole listing).
            let mut written: std::collections::BTreeMap<String, usize> = Default::default();
            let mut touch = |page: usize| {
                round += 1;
                let a = ids[(page * 5 + round) % n].clone();
                let b = ids[(page * 11 + round * 7 + 3) % n].clone();
                *written.entry(a.clone()).or_default() += 1;
                *written.entry(b.clone()).or_default() += 1;
                vec![a, b]
            };
            let q = ListQuery {
                order_by: by,
                order,
                limit: 4,
                ..Default::default()
            };
            let got = list_all(s, &q, &mut touch).await;
            let count = |id: &str| got.iter().filter(|t| t.id == id).count();
            let keys: Vec<(i64, String)> = got.iter().map(|t| sort_key(by, t)).collect();
            for pair in keys.windows(2) {
                match order {
                    Order::Asc => assert!(pair[0] < pair[1], "{by:?} asc: {pair:?}"),
                    Order::Desc => assert!(pair[0] > pair[1], "{by:?} desc: {pair:?}"),
                }
            }
            for id in &ids {
                let c = count(id);
                let w = written.get(id).copied().unwrap_or(0);
                if by != ListOrderBy::UpdatedAt || w == 0 {
                    assert_eq!(c, 1, "{by:?} {order:?}: {id} returned {c} times");
                } else if order == Order::Desc {
                    assert!(c <= 1, "{by:?} desc: written {id} returned {c} times");
                } else {
                    // Each write can move it past the cursor once more; it is never lost.
                    assert!(
                        (1..=1 + w).contains(&c),
                        "{by:?} asc: {id} written {w}x, returned {c}x"
                    );
                }
            }
            assert!(!written.is_empty());
        }
    }
    // Writes racing the listing itself (inside one page request too): pages stay strictly
    // ordered, and descending by updated_at never returns a thread twice.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (s, ids, stop) = (s.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 7;
                s.append(
                    &tid(&ids[i % ids.len()]),
                    &delta("r", vec![anon("race")]),
                    Expect::Any,
                    None,
                )
                .await
                .unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    for _ in 0..5 {
        let q = ListQuery {
            order_by: ListOrderBy::UpdatedAt,
            order: Order::Desc,
            limit: 5,
            ..Default::default()
        };
        let got = list_all(s, &q, &mut |_| vec![]).await;
        let keys: Vec<(i64, String)> = got
            .iter()
            .map(|t| sort_key(ListOrderBy::UpdatedAt, t))
            .collect();
        assert!(keys.windows(2).all(|p| p[0] > p[1]), "{keys:?}");
        let distinct: BTreeSet<&str> = got.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(distinct.len(), got.len());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
}

async fn tricky_ids(s: &DynStore) {
    let ids = ["user.42", "a*b", "x>y", "user_42", "a.b", "x-y"];
    for id in ids {
        let mut t = Thread::new(id);
        t.metadata = meta(json!({"owner": id}));
        s.create(&tid(id), t).await.unwrap();
        let d = delta("r", vec![user("m", &format!("for {id}"))]);
        assert_eq!(
            s.append(&tid(id), &d, Expect::Any, Some(&key("k", id)))
                .await
                .unwrap()
                .version,
            1
        );
    }
    for id in ids {
        let got = s.get(&tid(id)).await.unwrap();
        assert_eq!(got.thread.id, id);
        assert_eq!(contents(&got.thread.messages), [format!("for {id}")]);
        assert_eq!(got.thread.metadata, meta(json!({"owner": id})));
        assert_eq!(s.history(&tid(id), 0, 10).await.unwrap().entries.len(), 1);
    }
    s.delete(&tid("a*b"), Expect::Any).await.unwrap();
    s.append(
        &tid("user.42"),
        &delta("r", vec![anon("more")]),
        Expect::Any,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        s.get(&tid("user_42")).await.unwrap().thread.messages.len(),
        1
    );
    assert_eq!(s.get(&tid("a.b")).await.unwrap().version, 1);
    assert_err!(s.get(&tid("a*b")).await, StoreError::NotFound);
    let p = s
        .list(&ListQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut want: Vec<&str> = ids.iter().copied().filter(|i| *i != "a*b").collect();
    want.sort();
    assert_eq!(
        p.threads.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        want
    );
}

async fn nul_and_floats(s: &DynStore) {
    let id = tid("t");
    // Built from JSON text so the numbers are exactly what a client sends.
    let thread_text = r#"{
        "id": "t", "resource_id": "res\u00001", "parent_thread_id": "p\u0000",
        "messages": [{"id": "m\u00001", "role": "user", "content": "a\u0000b",
                      "metadata": {"run_id": "r\u0000", "x": 1e+16}}],
        "state": {"big": 1e+16, "tenth": 0.1, "int": 10000000000000000, "neg": -0.0,
                  "tiny": 5e-324, "third": 0.3333333333333333, "s": "\u0000"},
        "patches": [{"patch": {"ops": [{"op": "set", "path": ["f\u0000"], "value": 1.5e300}]}}],
        "metadata": {"k\u0000": "v\u0000", "f": 1e+16, "g": 0.1, "whole": 7.0}
    }"#;
    let thread: Thread = serde_json::from_str(thread_text).unwrap();
    s.create(&id, thread.clone()).await.unwrap();
    let d: ChangeSet = serde_json::from_str(
        r#"{"run_id": "r\u0000", "reason": "UserMessage", "patches": [
              {"patch": {"ops": [{"op": "set", "path": ["g"], "value": 2.5e-8}]}}],
            "messages": [{"id": "m\u00001", "role": "user", "content": "dup"},
                         {"id": "m\u00002", "role": "user", "content": "\u0000",
                          "metadata": {"run_id": "r\u0000"}}],
            "run_meta": {"agent_id": "a\u0000", "origin": "user", "status": "running"}}"#,
    )
    .unwrap();
    let k = key("key\u{0}", "fp");
    s.append(&id, &d, Expect::Any, Some(&k)).await.unwrap();
    assert!(
        s.append(&id, &d, Expect::Any, Some(&k))
            .await
            .unwrap()
            .replayed
    );
    s.patch_metadata(
        &id,
        meta(serde_json::from_str(r#"{"h": 1e-7, "k\u0000": "w\u0000"}"#).unwrap()),
        Expect::Any,
    )
    .await
    .unwrap();

    let got = s.get(&id).await.unwrap();
    let mut want = thread.clone();
    want.messages.push(d.messages[1].clone());
    want.patches.extend(d.patches.iter().cloned());
    want.metadata
        .insert("h".into(), serde_json::from_str("1e-7").unwrap());
    want.metadata.insert("k\u{0}".into(), json!("w\u{0}"));
    assert_eq!(text(&got.thread), text(&want));
    assert!(
        text(&got.thread.state).contains("1e+16"),
        "{}",
        text(&got.thread.state)
    );
    assert!(text(&got.thread.state).contains("10000000000000000"));
    assert!(text(&got.thread.metadata).contains("7.0"));
    let (state, _) = state_of(s, &id).await;
    let mut want_state = thread.state.clone();
    want_state["f\u{0}"] = serde_json::from_str("1.5e300").unwrap();
    want_state["g"] = serde_json::from_str("2.5e-8").unwrap();
    assert_eq!(text(&state), text(&want_state));

    let q = MessageQuery {
        limit: 10,
        run_id: Some("r\u{0}".into()),
        ..Default::default()
    };
    let p = s.messages(&id, &q).await.unwrap();
    assert_eq!(p.messages.iter().map(|m| m.0).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(text(&p.messages[0].1), text(&thread.messages[0]));
    let run = s.run(&id, "r\u{0}").await.unwrap();
    assert_eq!(run.meta.agent_id, "a\u{0}");
    let h = s.history(&id, 0, 10).await.unwrap();
    match &h.entries[0].change {
        Change::Delta(hd) => assert_eq!(text(hd), text(&d)),
        other => panic!("expected delta, got {other:?}"),
    }
    let l = s
        .list(&ListQuery {
            resource_id: Some("res\u{0}1".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(l.threads.len(), 1);
    assert_eq!(l.threads[0].parent_thread_id.as_deref(), Some("p\u{0}"));
    let l = s
        .list(&ListQuery {
            resource_id: Some("res".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(l.threads.is_empty());
}

async fn unknown_fields_survive(s: &DynStore) {
    let id = tid("t");
    let m1 = json!({"id": "m1", "role": "assistant", "content": "c", "future": {"x": [1, 2.5]},
                    "tool_calls": [], "metadata": {}, "name": "n"});
    let m2 = json!({"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call1", "name": "f", "arguments": {"q": 1e+16}}],
                    "metadata": {"run_id": "r", "step_index": 3, "trace": "abc"}, "extra": null});
    let mut t = Thread::new("t");
    t.messages.push(from(m1.clone()));
    s.create(&id, t).await.unwrap();
    let d: ChangeSet = from(json!({
        "run_id": "r", "reason": "ToolResultsCommitted", "messages": [m2.clone()], "patches": [],
        "actions": [{"state_type_name": "S", "base_path": "b", "scope": "run",
                     "call_id_override": null, "payload": {"p": 1}}],
        "delta_extension": {"v": 2}
    }));
    s.append(&id, &d, Expect::Any, None).await.unwrap();
    let got = s.get(&id).await.unwrap();
    let got: Vec<Value> = got
        .thread
        .messages
        .iter()
        .map(|m| serde_json::to_value(m).unwrap())
        .collect();
    assert_eq!(got, [m1.clone(), m2.clone()]);
    let page = all_messages(s, "t").await;
    assert_eq!(serde_json::to_value(&page[1].1).unwrap(), m2);
    let h = s.history(&id, 0, 10).await.unwrap();
    match &h.entries[0].change {
        Change::Delta(hd) => {
            let v = serde_json::to_value(hd).unwrap();
            assert_eq!(v["delta_extension"], json!({"v": 2}));
            assert_eq!(v["actions"][0]["payload"], json!({"p": 1}));
        }
        other => panic!("expected delta, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Instantiation: one test per backend per case
// ---------------------------------------------------------------------------------------

macro_rules! backend {
    ($backend:ident; $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let b = super::$backend().await;
                    super::$case(&b.store).await;
                }
            )*
        }
    };
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        backend!(memory; $($case),*);
        backend!(file; $($case),*);
        backend!(postgres; $($case),*);
    };
}

suite!(
    create_get_round_trip,
    create_rejects_invalid_thread,
    duplicate_create,
    concurrent_creates,
    append_versions,
    exact_conflict,
    concurrent_appends_any,
    concurrent_appends_exact,
    message_dedup,
    invalid_delta_changes_nothing,
    snapshot_clears_patches,
    idempotency,
    runs,
    history_after,
    history_bounded,
    apply_batch,
    apply_batch_mixed,
    apply_batch_runs_and_resets,
    apply_batch_idempotency,
    apply_batch_invalid,
    apply_batch_twice,
    concurrent_apply_batch,
    replace,
    patch_metadata,
    delete,
    messages_paging,
    list,
    list_orders,
    list_paging_while_writing,
    tricky_ids,
    nul_and_floats,
    unknown_fields_survive,
);
