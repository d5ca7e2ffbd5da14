//! PostgreSQL test harness: every test gets a fresh schema of its own in the shared test
//! database, so tests run in parallel and re-runs never see old data.
//!
//! The server comes from `THREADGATE_TEST_PG_URL` (default [`DEFAULT_URL`]). When it cannot
//! be reached the tests fail with a clear message: they never skip silently.

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::str::FromStr;
use threadgate::store::PostgresStore;

/// The development machine's PostgreSQL (trust auth).
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long dropping a schema waits for locks before giving up (a stuck test must not hang
/// the whole run; a leftover schema is only clutter).
const DROP_LOCK_TIMEOUT: &str = "5s";

/// The test server's URL.
pub fn base_url() -> String {
    std::env::var("THREADGATE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A URL for the test database whose sessions use `schema` as their `search_path`; it is
/// what `PostgresStore::connect` (and so `threadgate --store <url>`) accepts.
pub fn url_for_schema(schema: &str) -> String {
    let base = base_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

fn base_options() -> PgConnectOptions {
    let url = base_url();
    PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("THREADGATE_TEST_PG_URL={url:?} is not a valid URL: {e}"))
}

async fn admin_connection() -> PgConnection {
    let url = base_url();
    PgConnection::connect_with(&base_options())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {url} ({e}); start it or set THREADGATE_TEST_PG_URL"
            )
        })
}

/// A schema created for one test; dropped (with everything in it) when this is dropped.
pub struct PgSchema {
    pub name: String,
}

impl PgSchema {
    /// Creates a uniquely named empty schema in the test database.
    pub async fn create() -> Self {
        let name = format!("tg_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = admin_connection().await;
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create schema {name}: {e}"));
        let _ = conn.close().await;
        PgSchema { name }
    }

    /// Connection options whose sessions work inside this schema.
    pub fn options(&self) -> PgConnectOptions {
        base_options().options([("search_path", self.name.as_str())])
    }

    /// The URL form of [`PgSchema::options`], for a gateway process.
    pub fn url(&self) -> String {
        url_for_schema(&self.name)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on; a short-lived
        // runtime on its own thread does the async work.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect_with(&base_options()).await.ok()?;
                sqlx::query(&format!("SET lock_timeout = '{DROP_LOCK_TIMEOUT}'"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("note: could not drop test schema {}", self.name);
        }
    }
}

/// A store on a fresh schema (migrated), and the guard that drops the schema afterwards.
/// Keep the guard alive as long as the store; drop the store first.
pub async fn fresh_store() -> (PostgresStore, PgSchema) {
    let schema = PgSchema::create().await;
    let store = PostgresStore::connect_with(schema.options(), &Default::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot open a PostgresStore on schema {}: {e:#}",
                schema.name
            )
        });
    (store, schema)
}

#[tokio::test]
async fn connect_by_url_uses_the_schema() {
    use threadgate::id::ThreadId;
    use threadgate::model::Thread;
    use threadgate::store::Store;

    let schema = PgSchema::create().await;
    let store = PostgresStore::connect(&schema.url())
        .await
        .unwrap_or_else(|e| panic!("connect({}) failed: {e:#}", schema.url()));
    let id = ThreadId::parse("via-url").unwrap();
    store.create(&id, Thread::new("via-url")).await.unwrap();
    // Connecting again runs the migrator again: it must find everything applied.
    let again = PostgresStore::connect(&schema.url()).await.unwrap();
    assert_eq!(again.version(&id).await.unwrap(), 0);

    // The tables live in the test schema, not in `public`.
    let mut conn = admin_connection().await;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables \
         WHERE table_schema = $1 AND table_name IN ('threads', '_sqlx_migrations')",
    )
    .bind(&schema.name)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(n, 2);
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}.threads", schema.name))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    drop((store, again));
}

#[tokio::test]
async fn concurrent_start_up_migrates_once() {
    let schema = PgSchema::create().await;
    let opts = schema.options();
    let pool = threadgate::store::PgOptions::default();
    let (a, b) = tokio::join!(
        PostgresStore::connect_with(opts.clone(), &pool),
        PostgresStore::connect_with(opts, &pool)
    );
    a.expect("first store");
    b.expect("second store");
}

/// A rolling upgrade (or a rollback): a replica of an older version starts on a schema that
/// a newer version has migrated further, and keeps working.
#[tokio::test]
async fn starts_on_a_schema_migrated_by_a_newer_version() {
    use threadgate::id::ThreadId;
    use threadgate::model::Thread;
    use threadgate::store::Store;

    let (store, schema) = fresh_store().await;
    drop(store);
    let mut conn = admin_connection().await;
    sqlx::query(&format!(
        "INSERT INTO {}._sqlx_migrations (version, description, success, checksum, \
         execution_time) VALUES (99999, 'from a newer version', true, '\\x00'::bytea, 1)",
        schema.name
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let store = PostgresStore::connect_with(schema.options(), &Default::default())
        .await
        .expect("an older version starts on a newer schema");
    let id = ThreadId::parse("after-upgrade").unwrap();
    store
        .create(&id, Thread::new("after-upgrade"))
        .await
        .unwrap();
    assert_eq!(store.version(&id).await.unwrap(), 0);
    drop(store);
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    use threadgate::id::ThreadId;
    use threadgate::store::{Store, StoreError};

    let (store, _schema) = fresh_store().await;
    // Closing the pool is what an outage looks like from the store's side: no connection.
    store.close().await;
    let id = ThreadId::parse("t").unwrap();
    let err = store.version(&id).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
}

/// A thread too large for the one-statement snapshot read (PostgreSQL's 1 GB cap on a value)
/// is read with `get_paged`: both reads must give the same snapshot, so the fallback returns
/// exactly what a normal read does. (A real 1 GB thread is too heavy for CI; the fallback is
/// chosen on SQLSTATE 54000, checked by hand as the README's "Limits" section describes.)
#[tokio::test]
async fn paged_snapshot_read_matches_the_one_statement_read() {
    use serde_json::json;
    use threadgate::id::ThreadId;
    use threadgate::model::{ChangeSet, Thread};
    use threadgate::store::{Expect, Store};

    let (store, _schema) = fresh_store().await;
    let id = ThreadId::parse("paged").unwrap();
    let mut thread: Thread = serde_json::from_value(json!({
        "id": "paged", "resource_id": "r", "state": {"n": 0, "list": []},
        "messages": [], "patches": [], "metadata": {"title": "t"}
    }))
    .unwrap();
    thread.messages.clear();
    store.create(&id, thread).await.unwrap();
    for i in 0..5 {
        let delta: ChangeSet = serde_json::from_value(json!({
            "run_id": "r", "reason": "AssistantTurnCommitted",
            "messages": [{"id": format!("m{i}"), "role": "assistant", "content": format!("step {i}")}],
            "patches": [{"patch": {"ops": [{"op": "set", "path": ["n"], "value": i}]}}]
        }))
        .unwrap();
        store.append(&id, &delta, Expect::Any, None).await.unwrap();
    }
    let one = store.get(&id).await.unwrap();
    let paged = store.get_paged(&id).await.unwrap();
    let (a, b) = (
        serde_json::to_value(&one.thread).unwrap(),
        serde_json::to_value(&paged.thread).unwrap(),
    );
    assert_eq!(a["messages"].as_array().unwrap().len(), 5);
    assert_eq!(a["patches"].as_array().unwrap().len(), 5);
    assert_eq!(a, b);
    assert_eq!(
        (one.version, one.watermark, one.created_at, one.updated_at),
        (
            paged.version,
            paged.watermark,
            paged.created_at,
            paged.updated_at
        )
    );
    assert!(matches!(
        store.get_paged(&ThreadId::parse("missing").unwrap()).await,
        Err(threadgate::store::StoreError::NotFound)
    ));
}

fn pg_delta(v: serde_json::Value) -> threadgate::model::ChangeSet {
    serde_json::from_value(v).unwrap()
}

/// Appends after the first through one store are single statements (`heads.rs`); every way
/// the remembered row can be wrong (another replica wrote, a message id is already stored, an
/// idempotency key is known, a patch does not apply, the thread was deleted and created
/// again) falls back to the locking append and gives the same answer it would have.
#[tokio::test]
async fn one_statement_appends_fall_back_whenever_the_remembered_row_is_stale() {
    use serde_json::json;
    use threadgate::id::ThreadId;
    use threadgate::model::Thread;
    use threadgate::store::{Expect, IdempotencyKey, Store, StoreError};

    let (a, schema) = fresh_store().await;
    let b = PostgresStore::connect_with(schema.options(), &Default::default())
        .await
        .unwrap();
    let id = ThreadId::parse("cas").unwrap();
    let thread = |state| -> Thread {
        serde_json::from_value(json!({"id": "cas", "state": state, "messages": [], "patches": []}))
            .unwrap()
    };
    a.create(&id, thread(json!({"n": 0}))).await.unwrap();
    let step = |i: u64, mid: &str| {
        pg_delta(json!({
            "run_id": "r", "reason": "AssistantTurnCommitted",
            "messages": [{"id": mid, "role": "assistant", "content": format!("step {i}")}],
            "patches": [{"patch": {"ops": [{"op": "set", "path": ["n"], "value": i}]}}]
        }))
    };
    for i in 1..=3 {
        let done = a
            .append(&id, &step(i, &format!("m{i}")), Expect::Any, None)
            .await;
        assert_eq!(done.unwrap().version, i);
    }
    assert_eq!(
        a.one_statement_appends(),
        2,
        "the first append locks, then one statement"
    );

    // Another replica writes: A's remembered row is stale, A falls back (and learns it).
    assert_eq!(
        b.append(&id, &step(4, "m4"), Expect::Any, None)
            .await
            .unwrap()
            .version,
        4
    );
    assert_eq!(
        a.append(&id, &step(5, "m5"), Expect::Any, None)
            .await
            .unwrap()
            .version,
        5
    );
    assert_eq!(a.one_statement_appends(), 2);
    assert_eq!(
        a.append(&id, &step(6, "m6"), Expect::Any, None)
            .await
            .unwrap()
            .version,
        6
    );
    assert_eq!(a.one_statement_appends(), 3);

    // A message id already stored: skipped, as by the locking append.
    assert_eq!(
        a.append(&id, &step(7, "m2"), Expect::Any, None)
            .await
            .unwrap()
            .version,
        7
    );
    assert_eq!(a.one_statement_appends(), 3);
    // A compare-and-set on a stale version is refused with the row's real version.
    assert!(matches!(
        a.append(&id, &step(8, "m8"), Expect::Exact(6), None).await,
        Err(StoreError::VersionConflict {
            expected: 6,
            actual: 7
        })
    ));
    assert_eq!(
        a.append(&id, &step(8, "m8"), Expect::Exact(7), None)
            .await
            .unwrap()
            .version,
        8
    );
    assert_eq!(a.one_statement_appends(), 4);

    // Idempotency keys: a new key in one statement, the same key again is a replay.
    let key = IdempotencyKey {
        key: "k".into(),
        fingerprint: "f".into(),
    };
    let first = a
        .append(&id, &step(9, "m9"), Expect::Any, Some(&key))
        .await
        .unwrap();
    assert_eq!((first.version, first.replayed), (9, false));
    assert_eq!(a.one_statement_appends(), 5);
    let again = a
        .append(&id, &step(9, "m9"), Expect::Any, Some(&key))
        .await
        .unwrap();
    assert_eq!((again.version, again.replayed), (9, true));

    // A patch that does not apply to the state is refused and changes nothing.
    let bad = pg_delta(json!({
        "run_id": "r", "reason": "AssistantTurnCommitted", "messages": [],
        "patches": [{"patch": {"ops": [{"op": "append", "path": ["n"], "value": 1}]}}]
    }));
    assert!(matches!(
        a.append(&id, &bad, Expect::Any, None).await,
        Err(StoreError::InvalidDelta(_))
    ));

    let snap = a.get(&id).await.unwrap();
    assert_eq!(snap.version, 9);
    let ids: Vec<_> = snap
        .thread
        .messages
        .iter()
        .map(|m| m.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5", "m6", "m8", "m9"]);
    assert_eq!(snap.thread.patches.len(), 9);
    assert_eq!(a.state(&id).await.unwrap().state, json!({"n": 9}));
    let history = a.history(&id, 0, 100).await.unwrap();
    assert_eq!(history.entries.len(), 9);

    // Deleted and created again (by the other replica) up to the same version: the
    // remembered row has the old incarnation and must not be written over.
    b.delete(&id, Expect::Any).await.unwrap();
    b.create(&id, thread(json!({"n": "new"}))).await.unwrap();
    for i in 1..=9 {
        b.append(
            &id,
            &pg_delta(json!({"run_id": "r2", "reason": "AssistantTurnCommitted",
            "messages": [{"role": "user", "content": format!("new {i}")}], "patches": []})),
            Expect::Any,
            None,
        )
        .await
        .unwrap();
    }
    let messages_only = pg_delta(json!({"run_id": "r", "reason": "AssistantTurnCommitted",
        "messages": [{"id": "m10", "role": "assistant", "content": "after"}], "patches": []}));
    assert_eq!(
        a.append(&id, &messages_only, Expect::Any, None)
            .await
            .unwrap()
            .version,
        10
    );
    assert_eq!(
        a.one_statement_appends(),
        5,
        "the incarnation differs: locking append"
    );
    assert_eq!(a.state(&id).await.unwrap().state, json!({"n": "new"}));
    assert_eq!(a.get(&id).await.unwrap().thread.messages.len(), 10);
    b.close().await;
    a.close().await;
}
