//! File-store specifics: crash-safe writes, directory locking, safe file names.

use serde_json::json;
use threadgate::id::ThreadId;
use threadgate::model::{ChangeSet, Thread};
use threadgate::store::{Expect, FileStore, Store};

fn delta(text: &str) -> ChangeSet {
    serde_json::from_value(json!({"run_id": "r", "reason": "AssistantTurnCommitted",
        "messages": [{"role": "assistant", "content": text}], "patches": []}))
    .unwrap()
}

#[tokio::test]
async fn torn_temp_files_are_ignored_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let id = ThreadId::parse("a*b").unwrap();
    {
        let store = FileStore::open(dir.path()).await.unwrap();
        store.create(&id, Thread::new("a*b")).await.unwrap();
        store
            .append(&id, &delta("kept"), Expect::Any, None)
            .await
            .unwrap();
    }
    // A crash mid-write leaves a partial temp file beside the intact thread file.
    let torn = dir.path().join(format!(".tmp-{}-999-0", id.encoded()));
    std::fs::write(
        &torn,
        br#"{"thread": {"id": "a*b", "messages": [{"role": "assis"#,
    )
    .unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let snap = store.get(&id).await.unwrap();
    assert_eq!(snap.version, 1);
    assert_eq!(snap.thread.messages.len(), 1);
    assert_eq!(snap.thread.messages[0].content, "kept");
    assert!(!torn.exists(), "the torn temp file is cleaned up");
    // And the store keeps working after recovery.
    assert_eq!(
        store
            .append(&id, &delta("more"), Expect::Any, None)
            .await
            .unwrap()
            .version,
        2
    );
}

#[tokio::test]
async fn files_stay_inside_the_data_dir_with_safe_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("data")).await.unwrap();
    for raw in ["user.42", "x>y", "a*b", "..a", "~"] {
        let id = ThreadId::parse(raw).unwrap();
        store.create(&id, Thread::new(raw)).await.unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names.len(), 5);
    for n in &names {
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{n}"
        );
    }
    let outside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(outside.len(), 1, "nothing written outside the data dir");
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = FileStore::open(dir.path()).await.unwrap();
    let second = FileStore::open(dir.path()).await;
    let err = second.err().expect("second open is refused").to_string();
    assert!(err.contains("in use"), "{err}");
}

#[tokio::test]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = ThreadId::parse("t").unwrap();
    {
        let store = FileStore::open(dir.path()).await.unwrap();
        store.create(&id, Thread::new("t")).await.unwrap();
        for i in 0..5 {
            store
                .append(&id, &delta(&format!("m{i}")), Expect::Any, None)
                .await
                .unwrap();
        }
        store
            .delete(&ThreadId::parse("t").unwrap(), Expect::Exact(5))
            .await
            .unwrap();
        store.create(&id, Thread::new("t")).await.unwrap();
        store
            .append(&id, &delta("fresh"), Expect::Any, None)
            .await
            .unwrap();
    }
    let store = FileStore::open(dir.path()).await.unwrap();
    let snap = store.get(&id).await.unwrap();
    assert_eq!(snap.version, 1);
    assert_eq!(snap.thread.messages[0].content, "fresh");
    assert_eq!(store.history(&id, 0, 10).await.unwrap().entries.len(), 1);
}
