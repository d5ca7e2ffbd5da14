//! The behaviour checks tirea's own stores are held to, run through `ThreadgateStore` against
//! a real gateway (direct mode over memory and PostgreSQL, buffered mode over NATS and
//! PostgreSQL) and through tirea's `MemoryStore`, with the same calls: every outcome and every
//! loaded thread must be equal, field by field.

use crate::harness::{Gateway, Mode};
use serde_json::{Value, json};
use std::sync::Arc;
use threadgate_client::{ThreadReader, ThreadSync, ThreadWriter, ThreadgateStore};
use tirea_contract::storage::{
    MessageQuery, RunQuery, SortOrder, ThreadHead, ThreadListQuery, ThreadStoreError,
    VersionPrecondition,
};
use tirea_contract::storage::{RunOrigin, RunStatus};
use tirea_contract::{
    CheckpointReason, Message, MessageMetadata, RunMeta, Thread, ThreadChangeSet, Visibility,
};
use tirea_state::{Op, Patch, TrackedPatch, path};

/// The keys the gateway maintains in a thread's metadata (tirea's in-process stores leave
/// them to the caller); compared separately.
const SERVER_KEYS: [&str; 4] = ["created_at", "updated_at", "version", "version_timestamp"];

fn msg(id: Option<&str>, m: Message) -> Arc<Message> {
    Arc::new(Message {
        id: id.map(str::to_owned),
        ..m
    })
}

fn in_run(m: Message, run: &str, step: u32) -> Message {
    Message {
        metadata: Some(MessageMetadata {
            run_id: Some(run.into()),
            step_index: Some(step),
        }),
        ..m
    }
}

fn set(path: tirea_state::Path, value: Value) -> TrackedPatch {
    TrackedPatch::new(Patch::new().with_op(Op::set(path, value)))
}

fn delta(run: &str, reason: CheckpointReason, messages: Vec<Arc<Message>>) -> ThreadChangeSet {
    ThreadChangeSet::from_parts(run, None, reason, messages, vec![], vec![], None)
}

fn meta(status: RunStatus, tokens: u64) -> RunMeta {
    RunMeta {
        agent_id: "helper".into(),
        origin: RunOrigin::User,
        status,
        parent_thread_id: None,
        termination_code: None,
        termination_detail: None,
        source_mailbox_entry_id: None,
        input_tokens: tokens,
        output_tokens: tokens / 2,
    }
}

fn thread(id: &str, resource: Option<&str>) -> Thread {
    let mut t = Thread::with_initial_state(id, json!({"count": 0, "ratio": 0.1}));
    t.resource_id = resource.map(str::to_owned);
    t.metadata
        .extra
        .insert("title".into(), json!(format!("Thread {id}")));
    t
}

/// An outcome both stores can be compared on.
fn err(e: &ThreadStoreError) -> Value {
    match e {
        ThreadStoreError::NotFound(id) => json!({"err": "NotFound", "id": id}),
        ThreadStoreError::VersionConflict { expected, actual } => {
            json!({"err": "VersionConflict", "expected": expected, "actual": actual})
        }
        ThreadStoreError::AlreadyExists => json!({"err": "AlreadyExists"}),
        ThreadStoreError::InvalidId(_) => json!({"err": "InvalidId"}),
        ThreadStoreError::Serialization(_) => json!({"err": "Serialization"}),
        ThreadStoreError::Io(e) => json!({"err": "Io", "detail": e.to_string()}),
    }
}

fn outcome<T: serde::Serialize>(r: Result<T, ThreadStoreError>) -> Value {
    match r {
        Ok(v) => json!({"ok": serde_json::to_value(v).unwrap()}),
        Err(e) => err(&e),
    }
}

/// A loaded thread: its version and content, the server-maintained metadata aside.
fn head(r: Result<Option<ThreadHead>, ThreadStoreError>) -> Value {
    match r {
        Ok(Some(h)) => {
            let mut t = serde_json::to_value(&h.thread).unwrap();
            let meta = t["metadata"].as_object_mut().unwrap();
            // Where the gateway fills them in, they tell the truth.
            if let Some(v) = meta.get("version") {
                assert_eq!(v, &json!(h.version), "metadata.version is the head version");
            }
            for k in SERVER_KEYS {
                meta.remove(k);
            }
            json!({"version": h.version, "thread": t})
        }
        Ok(None) => json!({"ok": null}),
        Err(e) => err(&e),
    }
}

fn run_record(r: &tirea_contract::storage::RunRecord) -> Value {
    let mut v = serde_json::to_value(r).unwrap();
    for k in ["created_at", "updated_at"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

/// Runs one script of calls and records every outcome, labelled. `settle` runs before the
/// run-record checks (buffered mode: run records are kept by the store, so they appear once
/// the thread is folded).
async fn script(store: &dyn ThreadSync, settle: impl AsyncFn(&[&str])) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    macro_rules! rec {
        ($label:expr, $v:expr) => {
            out.push(($label.to_string(), $v))
        };
    }
    use CheckpointReason::*;

    // create
    let mut t1 = thread("t1", Some("r1"));
    t1.messages
        .push(msg(Some("sys"), Message::system("You help.")));
    rec!(
        "create t1",
        outcome(store.create(&t1).await.map(|c| c.version))
    );
    rec!(
        "create t1 again",
        outcome(store.create(&t1).await.map(|c| c.version))
    );
    for (id, res) in [
        ("t2", "r1"),
        ("t3", "r2"),
        ("t4", "r1"),
        ("t5", "r1"),
        ("t6", "r1"),
        ("a.7", "r1"),
    ] {
        let mut t = thread(id, Some(res));
        if id == "t2" {
            t.parent_thread_id = Some("t1".into());
        }
        rec!(
            format!("create {id}"),
            outcome(store.create(&t).await.map(|c| c.version))
        );
    }

    // append, with and without a precondition
    let a = delta(
        "run-1",
        UserMessage,
        vec![msg(
            Some("u1"),
            in_run(Message::user("Hi there"), "run-1", 0),
        )],
    );
    rec!(
        "append A",
        outcome(
            store
                .append("t1", &a, VersionPrecondition::Any)
                .await
                .map(|c| c.version)
        )
    );
    let mut b = delta(
        "run-1",
        AssistantTurnCommitted,
        vec![msg(
            Some("a1"),
            in_run(Message::assistant("Hello!"), "run-1", 0),
        )],
    )
    .with_run_meta(meta(RunStatus::Running, 10));
    b.patches = vec![
        set(path!("count"), json!(1)),
        set(path!("mood"), json!("glad")),
    ];
    rec!(
        "append B exact 1",
        outcome(
            store
                .append("t1", &b, VersionPrecondition::Exact(1))
                .await
                .map(|c| c.version)
        )
    );
    let stale = delta(
        "run-1",
        AssistantTurnCommitted,
        vec![msg(Some("x1"), Message::assistant("lost"))],
    );
    rec!(
        "append stale exact 1",
        outcome(
            store
                .append("t1", &stale, VersionPrecondition::Exact(1))
                .await
                .map(|c| c.version)
        )
    );
    rec!(
        "append future exact 9",
        outcome(
            store
                .append("t1", &stale, VersionPrecondition::Exact(9))
                .await
                .map(|c| c.version)
        )
    );
    rec!(
        "append to missing",
        outcome(
            store
                .append("nope", &a, VersionPrecondition::Any)
                .await
                .map(|c| c.version)
        )
    );
    let mut internal = Message::internal_system("reminder");
    internal = in_run(internal, "run-1", 1);
    let mut d = delta(
        "run-1",
        ToolResultsCommitted,
        vec![
            msg(Some("i1"), internal),
            msg(None, in_run(Message::tool("call-1", "42"), "run-1", 1)),
        ],
    );
    d.patches = vec![TrackedPatch::new(
        Patch::new().with_op(Op::increment(path!("count"), 2)),
    )];
    rec!(
        "append D",
        outcome(
            store
                .append("t1", &d, VersionPrecondition::Exact(2))
                .await
                .map(|c| c.version)
        )
    );
    let mut e = delta(
        "run-1",
        RunFinished,
        vec![msg(
            Some("a2"),
            in_run(Message::assistant("Done."), "run-1", 2),
        )],
    )
    .with_run_meta(meta(RunStatus::Done, 30));
    e.snapshot = Some(json!({"count": 10, "ratio": 1e16, "deep": {"list": [1, 2.5, "three"]}}));
    rec!(
        "append E (snapshot)",
        outcome(
            store
                .append("t1", &e, VersionPrecondition::Any)
                .await
                .map(|c| c.version)
        )
    );
    // A message id already in the thread is skipped; one without an id is appended.
    let f = delta(
        "run-2",
        UserMessage,
        vec![
            msg(Some("u1"), Message::user("Hi there")),
            msg(None, in_run(Message::user("again"), "run-2", 0)),
        ],
    );
    rec!(
        "append F (duplicate id)",
        outcome(
            store
                .append("t1", &f, VersionPrecondition::Any)
                .await
                .map(|c| c.version)
        )
    );
    let running = delta(
        "run-3",
        UserMessage,
        vec![msg(Some("t2u"), Message::user("sub-task"))],
    )
    .with_run_meta(meta(RunStatus::Running, 5));
    rec!(
        "append t2 running",
        outcome(
            store
                .append("t2", &running, VersionPrecondition::Any)
                .await
                .map(|c| c.version)
        )
    );

    // load
    rec!("load t1", head(store.load("t1").await));
    rec!("load t2", head(store.load("t2").await));
    rec!("load missing", head(store.load("nope").await));
    rec!("message_count t1", outcome(store.message_count("t1").await));
    rec!(
        "message_count missing",
        outcome(store.message_count("nope").await)
    );

    // message pages with cursors
    let queries: Vec<(&str, MessageQuery)> = vec![
        ("default", MessageQuery::default()),
        (
            "limit 2",
            MessageQuery {
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "after 1 limit 2",
            MessageQuery {
                after: Some(1),
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "after 4 limit 2 (exactly the rest)",
            MessageQuery {
                after: Some(4),
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "after -1",
            MessageQuery {
                after: Some(-1),
                ..Default::default()
            },
        ),
        (
            "before 4 desc limit 2",
            MessageQuery {
                before: Some(4),
                order: SortOrder::Desc,
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "desc",
            MessageQuery {
                order: SortOrder::Desc,
                ..Default::default()
            },
        ),
        (
            "after 0 before 5",
            MessageQuery {
                after: Some(0),
                before: Some(5),
                ..Default::default()
            },
        ),
        (
            "before 0",
            MessageQuery {
                before: Some(0),
                ..Default::default()
            },
        ),
        (
            "before -3",
            MessageQuery {
                before: Some(-3),
                ..Default::default()
            },
        ),
        (
            "after 99",
            MessageQuery {
                after: Some(99),
                ..Default::default()
            },
        ),
        (
            "all visibilities",
            MessageQuery {
                visibility: None,
                ..Default::default()
            },
        ),
        (
            "internal only",
            MessageQuery {
                visibility: Some(Visibility::Internal),
                ..Default::default()
            },
        ),
        (
            "run-1",
            MessageQuery {
                run_id: Some("run-1".into()),
                visibility: None,
                ..Default::default()
            },
        ),
        (
            "run-1 desc limit 1",
            MessageQuery {
                run_id: Some("run-1".into()),
                order: SortOrder::Desc,
                limit: 1,
                ..Default::default()
            },
        ),
        (
            "limit 0 clamps to 1",
            MessageQuery {
                limit: 0,
                ..Default::default()
            },
        ),
        (
            "limit 500 clamps to 200",
            MessageQuery {
                limit: 500,
                ..Default::default()
            },
        ),
    ];
    for (label, q) in &queries {
        rec!(
            format!("messages {label}"),
            outcome(store.load_messages("t1", q).await)
        );
    }
    rec!(
        "messages of missing",
        outcome(store.load_messages("nope", &MessageQuery::default()).await)
    );
    // Paging through with next_cursor reaches every message once.
    let mut seen = Vec::new();
    let mut q = MessageQuery {
        limit: 2,
        visibility: None,
        ..Default::default()
    };
    loop {
        let page = store.load_messages("t1", &q).await.unwrap();
        seen.extend(page.messages.iter().map(|m| m.cursor));
        if !page.has_more {
            break;
        }
        q.after = page.next_cursor;
    }
    rec!("paged cursors", json!(seen));

    // list, paged by offset
    let lists: Vec<(&str, ThreadListQuery)> = vec![
        ("default", ThreadListQuery::default()),
        (
            "limit 2",
            ThreadListQuery {
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "offset 2 limit 2",
            ThreadListQuery {
                offset: 2,
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "offset 5 limit 2 (exactly the rest)",
            ThreadListQuery {
                offset: 5,
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "offset 6 limit 2",
            ThreadListQuery {
                offset: 6,
                limit: 2,
                ..Default::default()
            },
        ),
        (
            "offset 99",
            ThreadListQuery {
                offset: 99,
                ..Default::default()
            },
        ),
        (
            "resource r1 limit 3",
            ThreadListQuery {
                resource_id: Some("r1".into()),
                limit: 3,
                ..Default::default()
            },
        ),
        (
            "resource r2",
            ThreadListQuery {
                resource_id: Some("r2".into()),
                ..Default::default()
            },
        ),
        (
            "parent t1",
            ThreadListQuery {
                parent_thread_id: Some("t1".into()),
                ..Default::default()
            },
        ),
        (
            "no match",
            ThreadListQuery {
                resource_id: Some("nobody".into()),
                ..Default::default()
            },
        ),
    ];
    for (label, q) in &lists {
        rec!(
            format!("list {label}"),
            outcome(store.list_threads(q).await)
        );
    }
    rec!("list()", outcome(store.list().await));

    // deltas after a version
    for after in [0, 2, 4, 5] {
        rec!(
            format!("load_deltas t1 after {after}"),
            outcome(store.load_deltas("t1", after).await)
        );
    }
    rec!(
        "load_deltas missing",
        outcome(store.load_deltas("nope", 0).await)
    );

    // run records
    settle(&["t1", "t2"]).await;
    let runs = store
        .list_runs(&RunQuery {
            thread_id: Some("t1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    rec!(
        "runs of t1",
        json!({"total": runs.total, "has_more": runs.has_more, "items": runs.items.iter().map(run_record).collect::<Vec<_>>()})
    );
    let running = store
        .list_runs(&RunQuery {
            thread_id: Some("t2".into()),
            status: Some(RunStatus::Running),
            ..Default::default()
        })
        .await
        .unwrap();
    rec!(
        "running runs of t2",
        json!(running.items.iter().map(run_record).collect::<Vec<_>>())
    );
    rec!(
        "active run of t1",
        json!(
            store
                .active_run_for_thread("t1")
                .await
                .unwrap()
                .as_ref()
                .map(run_record)
        )
    );
    rec!(
        "active run of t2",
        json!(
            store
                .active_run_for_thread("t2")
                .await
                .unwrap()
                .as_ref()
                .map(run_record)
        )
    );

    // save: replace an existing thread, and upsert a new one
    let mut t3 = store.load("t3").await.unwrap().unwrap().thread;
    t3.messages.push(msg(Some("s1"), Message::user("saved")));
    t3.state = json!({"count": 3});
    t3.patches = vec![set(path!("saved"), json!(true))];
    t3.metadata.extra.insert("title".into(), json!("Renamed"));
    rec!("save t3", outcome(store.save(&t3).await));
    rec!("load t3 after save", head(store.load("t3").await));
    let mut fresh = thread("t8", Some("r2"));
    fresh
        .messages
        .push(msg(Some("n1"), Message::assistant("new")));
    rec!("save new t8", outcome(store.save(&fresh).await));
    rec!("load t8", head(store.load("t8").await));
    rec!("save t8 again", outcome(store.save(&fresh).await));
    rec!("load t8 again", head(store.load("t8").await));
    rec!(
        "append after save",
        outcome(
            store
                .append("t3", &a, VersionPrecondition::Exact(1))
                .await
                .map(|c| c.version)
        )
    );
    rec!("load t3 after append", head(store.load("t3").await));

    // delete
    rec!("delete t2", outcome(store.delete("t2").await));
    rec!("load deleted t2", head(store.load("t2").await));
    rec!("delete t2 again", outcome(store.delete("t2").await));
    rec!(
        "append to deleted",
        outcome(
            store
                .append("t2", &a, VersionPrecondition::Any)
                .await
                .map(|c| c.version)
        )
    );
    rec!(
        "list after delete",
        outcome(store.list_threads(&ThreadListQuery::default()).await)
    );
    rec!(
        "create t2 again",
        outcome(store.create(&thread("t2", None)).await.map(|c| c.version))
    );
    rec!("load recreated t2", head(store.load("t2").await));

    rec!("load t1 at the end", head(store.load("t1").await));
    out
}

/// Compares two loaded threads field by field, naming the field that differs.
fn assert_same_thread(label: &str, gateway: &Value, tirea: &Value) {
    assert_eq!(gateway["version"], tirea["version"], "{label}: version");
    let (g, t) = (&gateway["thread"], &tirea["thread"]);
    for field in [
        "id",
        "resource_id",
        "parent_thread_id",
        "state",
        "patches",
        "metadata",
    ] {
        assert_eq!(g[field], t[field], "{label}: field {field}");
    }
    let (gm, tm) = (
        g["messages"].as_array().unwrap(),
        t["messages"].as_array().unwrap(),
    );
    assert_eq!(gm.len(), tm.len(), "{label}: message count");
    for (i, (a, b)) in gm.iter().zip(tm).enumerate() {
        assert_eq!(a, b, "{label}: messages[{i}]");
    }
    assert_eq!(gateway, tirea, "{label}");
}

async fn same_as_tirea(mode: Mode) {
    let gw = Gateway::start(mode).await;
    let client = gw.client();
    let tirea = tirea_store_adapters::MemoryStore::new();

    let flush_client = client.clone();
    let settle = async |ids: &[&str]| {
        if mode == Mode::Buffered {
            for id in ids {
                flush_client.flush(id).await.expect("flush");
            }
        }
    };
    let theirs = script(&tirea, async |_: &[&str]| {}).await;
    let ours = script(&client as &dyn ThreadSync, settle).await;
    assert_eq!(ours.len(), theirs.len());

    for ((label, g), (_, t)) in ours.iter().zip(&theirs) {
        if g.get("thread").is_some() || t.get("thread").is_some() {
            assert_same_thread(label, g, t);
        } else {
            assert_eq!(g, t, "{label} ({mode:?})");
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn same_as_tirea_memory_store_direct_memory() {
    same_as_tirea(Mode::Memory).await;
}

#[tokio::test]
async fn same_as_tirea_memory_store_direct_postgres() {
    same_as_tirea(Mode::Postgres).await;
}

#[tokio::test]
async fn same_as_tirea_memory_store_buffered() {
    same_as_tirea(Mode::Buffered).await;
}

/// Behaviour only the gateway has: ids it refuses, deltas whose patches do not apply, and the
/// history after a full save.
#[tokio::test]
async fn gateway_rules_map_onto_tirea_errors() {
    let gw = Gateway::start(Mode::Memory).await;
    let store = gw.client();
    for bad in ["tab\there", "../etc", "", "a/b"] {
        let e = store.create(&Thread::new(bad)).await.unwrap_err();
        assert!(
            matches!(e, ThreadStoreError::InvalidId(_)),
            "create {bad:?}: {e:?}"
        );
        let e = store.load(bad).await.unwrap_err();
        assert!(
            matches!(e, ThreadStoreError::InvalidId(_)),
            "load {bad:?}: {e:?}"
        );
    }
    // Any other Unicode text is an id, and reaches the gateway intact.
    for good in ["café ✓", "ana@example.com", "会话 7"] {
        store.create(&thread(good, None)).await.unwrap();
        let loaded = store.load(good).await.unwrap().expect("created");
        assert_eq!(loaded.thread.id, good);
    }
    store.create(&thread("x", None)).await.unwrap();
    // `count` is a number: appending to it is not a valid patch, and changes nothing.
    let mut bad = delta("r", CheckpointReason::AssistantTurnCommitted, vec![]);
    bad.patches = vec![TrackedPatch::new(
        Patch::new().with_op(Op::append(path!("count"), json!(1))),
    )];
    let e = store
        .append("x", &bad, VersionPrecondition::Any)
        .await
        .unwrap_err();
    match e {
        ThreadStoreError::Serialization(detail) => {
            assert!(detail.contains("patches[0]"), "names the op: {detail}")
        }
        other => panic!("expected Serialization, got {other:?}"),
    }
    assert_eq!(store.load("x").await.unwrap().unwrap().version, 0);

    // The history after a full save cannot be given as ChangeSets: reload instead.
    let ok = delta(
        "r",
        CheckpointReason::UserMessage,
        vec![msg(Some("m"), Message::user("one"))],
    );
    store
        .append("x", &ok, VersionPrecondition::Any)
        .await
        .unwrap();
    let mut t = store.load("x").await.unwrap().unwrap().thread;
    t.state = json!({"count": 5});
    store.save(&t).await.unwrap();
    store
        .append(
            "x",
            &delta("r", CheckpointReason::RunFinished, vec![]),
            VersionPrecondition::Any,
        )
        .await
        .unwrap();
    let e = store.load_deltas("x", 0).await.unwrap_err();
    assert!(
        matches!(
            e,
            ThreadStoreError::VersionConflict {
                expected: 0,
                actual: 3
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        store.load_deltas("x", 2).await.unwrap().len(),
        1,
        "after the save is fine"
    );
    let history = store.history("x", 0).await.unwrap();
    let versions: Vec<_> = history.iter().map(|e| e.version().unwrap()).collect();
    assert_eq!(versions, [1, 2, 3]);
    assert!(matches!(
        history[1],
        threadgate_client::LiveEvent::Snapshot { .. }
    ));
    let e = store.load_deltas("x", 7).await.unwrap_err();
    assert!(
        matches!(
            e,
            ThreadStoreError::VersionConflict {
                expected: 7,
                actual: 3
            }
        ),
        "{e:?}"
    );

    // Runs are kept per thread.
    let e = store.load_run("anything").await.unwrap_err();
    assert!(
        matches!(e, ThreadStoreError::Io(ref io) if io.kind() == std::io::ErrorKind::Unsupported),
        "{e:?}"
    );
    let e = store.list_runs(&RunQuery::default()).await.unwrap_err();
    assert!(
        matches!(e, ThreadStoreError::Io(ref io) if io.kind() == std::io::ErrorKind::Unsupported),
        "{e:?}"
    );
    gw.stop().await;
}

/// Usable wherever tirea wants `Arc<dyn ThreadStore>`.
#[tokio::test]
async fn usable_as_dyn_thread_store() {
    let gw = Gateway::start(Mode::Memory).await;
    let store: Arc<dyn tirea_contract::storage::ThreadStore> = Arc::new(gw.client());
    let created = store.create(&thread("dyn", None)).await.unwrap();
    assert_eq!(created.version, 0);
    assert_eq!(store.load_thread("dyn").await.unwrap().unwrap().id, "dyn");
    let client: &ThreadgateStore = &gw.client();
    assert!(client.base_url().starts_with("http://127.0.0.1:"));
    gw.stop().await;
}

/// More threads than one gateway page (200): offsets, totals and `has_more` still match
/// tirea's, at the page boundaries too.
#[tokio::test]
async fn listing_walks_every_gateway_page() {
    let gw = Gateway::start(Mode::Memory).await;
    let ours = gw.client();
    let theirs = tirea_store_adapters::MemoryStore::new();
    for i in 0..205 {
        let t = thread(
            &format!("p{i:03}"),
            Some(if i % 2 == 0 { "even" } else { "odd" }),
        );
        ours.create(&t).await.unwrap();
        theirs.create(&t).await.unwrap();
    }
    let cases = [
        (0, 200, None),
        (150, 100, None),
        (199, 5, None),
        (200, 5, None),
        (204, 50, None),
        (205, 1, None),
        (5, 200, None),
        (90, 20, Some("even")),
        (100, 3, Some("odd")),
    ];
    for (offset, limit, resource) in cases {
        let q = ThreadListQuery {
            offset,
            limit,
            resource_id: resource.map(str::to_owned),
            parent_thread_id: None,
        };
        let label = format!("offset {offset} limit {limit} resource {resource:?}");
        let a = outcome(ours.list_threads(&q).await);
        let b = outcome(theirs.list_threads(&q).await);
        assert_eq!(a, b, "{label}");
    }
    gw.stop().await;
}

/// The builder's token goes out as a bearer token (read off the wire: the gateway has no
/// authentication of its own yet), and is not shown by `Debug`.
#[tokio::test]
async fn token_is_sent_as_bearer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = conn.read(&mut buf).await.unwrap();
        conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_lowercase()
    });
    let store = ThreadgateStore::builder(format!("http://{addr}"))
        .token("s3cret")
        .build()
        .unwrap();
    assert!(!format!("{store:?}").contains("s3cret"));
    assert!(store.load("x").await.unwrap().is_none());
    let request = server.await.unwrap();
    assert!(
        request.starts_with("get /v1/threads/x?view=live "),
        "{request}"
    );
    assert!(
        request.contains("\r\nauthorization: bearer s3cret\r\n"),
        "{request}"
    );
}
