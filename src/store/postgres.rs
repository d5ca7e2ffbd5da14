//! The PostgreSQL backend.
//!
//! Why it looks the way it does:
//!
//! * **JSON as text.** Every document (messages, patches, states, metadata, history) is the
//!   serde_json text of the value, in a `TEXT` column, never `jsonb`: `jsonb` turns `1e+16`
//!   into an integer and rejects U+0000, and both must round-trip exactly (WIRE.md).
//!   serde_json escapes U+0000 as `\u0000`, so its output is always valid PostgreSQL text.
//!   Client strings that get a column of their own (resource and parent ids, message and run
//!   ids, idempotency keys) are stored JSON-encoded for the same reason, and every lookup
//!   compares the encoded form (the encoding is injective).
//! * **A row per message and per patch.** An append inserts only the new rows and updates
//!   the thread row (counts, current state, version), so its cost does not grow with the
//!   length of the thread; message pages are index range scans on `(thread_id, cursor)`.
//!   The materialised current state is kept on the thread row so an append validates its
//!   patches without replaying the thread's patch list.
//! * **Row locks for compare-and-set.** Every write is one transaction that first locks the
//!   thread row (`SELECT ... FOR UPDATE`) and checks the expected version or watermark
//!   against the locked row, so concurrent writers to one thread are serialised by
//!   PostgreSQL and each gets a distinct, real, committed version; writers to different
//!   threads never wait for each other.
//! * **Snapshot reads.** A read that spans several statements runs in one
//!   `REPEATABLE READ READ ONLY` transaction (or is a single statement), so the version it
//!   reports matches the data it returns.

use super::{
    Appended, Change, Expect, Folded, HISTORY_LIMIT, History, HistoryEntry, IDEMPOTENCY_KEYS_KEPT,
    IdempotencyKey, ListOrderBy, ListPage, ListQuery, MessagePage, MessageQuery, Order, Prepared,
    Result, RunRecord, Snapshot, Store, StoreError, ThreadSummary, VisibilityFilter, now_ms,
};
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Message, RunMeta, Thread, TrackedPatch, Visibility};
use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, QueryBuilder};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

/// How long a request waits for a pooled connection: past this the database is effectively
/// unreachable and the client gets a quick 503 instead of a hung request.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections per gateway process: writes hold one only for a short transaction, and
/// several replicas must fit under PostgreSQL's default limit of 100.
const MAX_CONNECTIONS: u32 = 10;

/// The schema, embedded at compile time. `Migrator::run` takes a PostgreSQL advisory lock
/// (locking is on by default in sqlx 0.8), so replicas starting together migrate once.
static MIGRATOR: Migrator = sqlx::migrate!();

/// A thread's snapshot in PostgreSQL; see the module docs.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` (any libpq-style URL sqlx accepts, e.g. with
    /// `?options=-c%20search_path%3Dmy_schema`) and applies pending migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?;
        Self::connect_with(opts).await
    }

    /// Connects with explicit options and applies pending migrations.
    pub async fn connect_with(opts: PgConnectOptions) -> anyhow::Result<Self> {
        // Migrate on a connection of its own, closed afterwards: the migrator's advisory lock
        // is session-level, so a failed run must not hand a still-locked session to the pool.
        let mut conn = PgConnection::connect_with(&opts)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL migration failed: {e}"))?;
        conn.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
        Ok(PostgresStore { pool })
    }

    /// Closes the pool (graceful shutdown); later calls answer `Unavailable`.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(db_err)
    }

    /// A read-only transaction that sees one snapshot for all its statements.
    async fn begin_read(&self) -> Result<sqlx::Transaction<'static, Postgres>> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(db_err)
    }
}

// ---------------------------------------------------------------------------------------
// Encoding helpers
// ---------------------------------------------------------------------------------------

/// The JSON-encoded form of a client string, for its own column (PostgreSQL text cannot
/// hold U+0000; the JSON escape can).
fn enc(s: &str) -> String {
    Value::from(s).to_string()
}

fn enc_opt(s: Option<&str>) -> Option<String> {
    s.map(enc)
}

fn dec(s: &str) -> Result<String> {
    from_json(s)
}

fn dec_opt(s: Option<String>) -> Result<Option<String>> {
    s.as_deref().map(dec).transpose()
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Internal(format!("encoding JSON: {e}")))
}

fn from_json<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Internal(format!("stored JSON does not decode: {e}")))
}

/// A stored counter or version (never negative) as the trait's `u64`.
fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A `u64` from the trait as a column value; values past `i64::MAX` cannot be stored.
fn i(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Internal(format!("{v} is out of range")))
}

/// Maps a driver error: unreachable database → `Unavailable` (a 503, retryable), missing
/// row → `NotFound`, anything else → `Internal`.
fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::RowNotFound => StoreError::NotFound,
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        E::Database(d) => match d.code().as_deref() {
            // Class 08: connection exceptions; 57P01-03: admin/crash shutdown, cannot
            // connect now; 53300: too many connections. All are transient.
            Some(c)
                if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "53300") =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Internal(e.to_string()),
        },
        _ => StoreError::Internal(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------
// Write helpers (all run inside the caller's transaction)
// ---------------------------------------------------------------------------------------

/// The locked thread row, as far as a delta needs it.
struct Head {
    version: u64,
    watermark: u64,
    current_state: Value,
    message_count: i64,
    patch_count: i64,
    /// The new base state, when a snapshot delta replaced it.
    new_base_state: Option<Value>,
}

/// Locks the thread row for the rest of the transaction; `NotFound` when there is none.
async fn lock_head(conn: &mut PgConnection, id: &str) -> Result<Head> {
    let row: Option<(i64, i64, String, i64, i64)> = sqlx::query_as(
        "SELECT version, watermark, current_state, message_count, patch_count \
         FROM threads WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    let (version, watermark, current_state, message_count, patch_count) =
        row.ok_or(StoreError::NotFound)?;
    Ok(Head {
        version: u(version),
        watermark: u(watermark),
        current_state: from_json(&current_state)?,
        message_count,
        patch_count,
        new_base_state: None,
    })
}

/// Locks the thread row and returns its version; `NotFound` when there is none.
async fn lock_version(conn: &mut PgConnection, id: &str) -> Result<u64> {
    let v: Option<i64> = sqlx::query_scalar("SELECT version FROM threads WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
    v.map(u).ok_or(StoreError::NotFound)
}

/// Inserts messages at consecutive cursors from `first_cursor`, in one statement.
async fn insert_messages<'a>(
    conn: &mut PgConnection,
    id: &str,
    first_cursor: i64,
    messages: impl IntoIterator<Item = &'a Message>,
) -> Result<i64> {
    let (mut cursors, mut ids, mut runs, mut internal, mut bodies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (n, m) in messages.into_iter().enumerate() {
        cursors.push(first_cursor + n as i64);
        ids.push(enc_opt(m.id.as_deref()));
        runs.push(enc_opt(m.run_id()));
        internal.push(m.visibility == Visibility::Internal);
        bodies.push(to_json(m)?);
    }
    if cursors.is_empty() {
        return Ok(0);
    }
    sqlx::query(
        "INSERT INTO messages (thread_id, cursor, msg_id, run_id, internal, body) \
         SELECT $1, c, m, r, i, b \
         FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::bool[], $6::text[]) \
              AS u(c, m, r, i, b)",
    )
    .bind(id)
    .bind(&cursors)
    .bind(&ids)
    .bind(&runs)
    .bind(&internal)
    .bind(&bodies)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(cursors.len() as i64)
}

/// Inserts patches at consecutive sequence numbers from `first_seq`, in one statement.
async fn insert_patches(
    conn: &mut PgConnection,
    id: &str,
    first_seq: i64,
    patches: &[TrackedPatch],
) -> Result<i64> {
    if patches.is_empty() {
        return Ok(0);
    }
    let seqs: Vec<i64> = (0..patches.len() as i64).map(|n| first_seq + n).collect();
    let bodies = patches.iter().map(to_json).collect::<Result<Vec<_>>>()?;
    sqlx::query(
        "INSERT INTO patches (thread_id, seq, body) \
         SELECT $1, s, b FROM UNNEST($2::bigint[], $3::text[]) AS u(s, b)",
    )
    .bind(id)
    .bind(&seqs)
    .bind(&bodies)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(seqs.len() as i64)
}

/// Records a write in the history and drops what falls out of the kept window.
async fn record_history(
    conn: &mut PgConnection,
    id: &str,
    version: u64,
    at: i64,
    change: &Change,
) -> Result<()> {
    sqlx::query("INSERT INTO history (thread_id, version, at, change) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(i(version)?)
        .bind(at)
        .bind(to_json(change)?)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    // Versions are contiguous and every write records one entry, so dropping exactly the
    // version that falls out keeps exactly HISTORY_LIMIT entries. (`version <= $2` would
    // walk every dead index entry below it on each write: quadratic in a long fold.)
    let oldest_dropped = i(version)? - HISTORY_LIMIT as i64;
    if oldest_dropped > 0 {
        sqlx::query("DELETE FROM history WHERE thread_id = $1 AND version = $2")
            .bind(id)
            .bind(oldest_dropped)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

/// Which of the deltas' message ids the thread already holds.
/// The write remembered for an idempotency key on this thread, if any.
async fn remembered(
    conn: &mut PgConnection,
    id: &str,
    key: &IdempotencyKey,
) -> Result<Option<Appended>> {
    let seen: Option<(String, i64)> = sqlx::query_as(
        "SELECT fingerprint, version FROM idempotency WHERE thread_id = $1 AND key = $2",
    )
    .bind(id)
    .bind(enc(&key.key))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    seen.map(|(fingerprint, version)| super::replay_of(&fingerprint, key, u(version)))
        .transpose()
}

async fn existing_ids<'a>(
    conn: &mut PgConnection,
    id: &str,
    deltas: impl IntoIterator<Item = &'a ChangeSet>,
) -> Result<HashSet<String>> {
    let wanted: Vec<String> = deltas
        .into_iter()
        .flat_map(|d| d.messages.iter())
        .filter_map(|m| m.id.as_deref().map(enc))
        .collect();
    if wanted.is_empty() {
        return Ok(HashSet::new());
    }
    // One index probe per wanted id on (thread_id, msg_id): `msg_id = ANY($2)` may be planned
    // as a filter over every row of the thread when statistics are stale.
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT w.id FROM unnest($2::text[]) AS w(id) WHERE EXISTS \
         (SELECT 1 FROM messages m WHERE m.thread_id = $1 AND m.msg_id = w.id)",
    )
    .bind(id)
    .bind(&wanted)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    found.iter().map(|s| dec(s)).collect()
}

/// Applies one delta as `version` (rows only; the caller writes the thread row). Validates
/// before writing anything, so an `InvalidDelta` leaves the transaction untouched.
async fn apply_delta_rows(
    conn: &mut PgConnection,
    id: &str,
    head: &mut Head,
    existing: &mut HashSet<String>,
    delta: &ChangeSet,
    version: u64,
    now: i64,
) -> Result<()> {
    let mut delta = delta.clone();
    delta.normalize();
    let plan = crate::model::plan_delta(&head.current_state, &delta, |mid| existing.contains(mid))?;
    if plan.replaces_state {
        sqlx::query("DELETE FROM patches WHERE thread_id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        head.patch_count = 0;
        if let Some(snapshot) = &delta.snapshot {
            head.new_base_state = Some(snapshot.clone());
        }
    }
    let new: Vec<&Message> = plan
        .new_messages
        .iter()
        .map(|&n| &delta.messages[n])
        .collect();
    for m in &new {
        if let Some(mid) = &m.id {
            existing.insert(mid.clone());
        }
    }
    head.message_count += insert_messages(conn, id, head.message_count, new).await?;
    head.patch_count += insert_patches(conn, id, head.patch_count, &delta.patches).await?;
    head.current_state = plan.new_current_state;
    if let Some(meta) = &delta.run_meta {
        upsert_run(conn, id, &delta, meta, version, now).await?;
    }
    record_history(conn, id, version, now, &Change::Delta(delta)).await
}

/// Creates or updates the run's record: `created_at` is kept, the rest follows the delta
/// (a delta without `parent_run_id` keeps the recorded one).
async fn upsert_run(
    conn: &mut PgConnection,
    id: &str,
    delta: &ChangeSet,
    meta: &RunMeta,
    version: u64,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO runs (thread_id, run_id, parent_run_id, meta, version, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6) \
         ON CONFLICT (thread_id, run_id) DO UPDATE SET \
           parent_run_id = COALESCE(EXCLUDED.parent_run_id, runs.parent_run_id), \
           meta = EXCLUDED.meta, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at",
    )
    .bind(id)
    .bind(enc(&delta.run_id))
    .bind(enc_opt(delta.parent_run_id.as_deref()))
    .bind(to_json(meta)?)
    .bind(i(version)?)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Writes the thread row after one or more deltas: version and watermark become `version`.
async fn write_head(
    conn: &mut PgConnection,
    id: &str,
    head: &Head,
    version: u64,
    now: i64,
) -> Result<()> {
    let base = head.new_base_state.as_ref().map(to_json).transpose()?;
    sqlx::query(
        "UPDATE threads SET version = $2, watermark = $2, state = COALESCE($3, state), \
         current_state = $4, message_count = $5, patch_count = $6, updated_at = $7 WHERE id = $1",
    )
    .bind(id)
    .bind(i(version)?)
    .bind(base)
    .bind(to_json(&head.current_state)?)
    .bind(head.message_count)
    .bind(head.patch_count)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Writes a full thread's rows (create and replace): every message and patch at its
/// position.
async fn insert_thread_rows(conn: &mut PgConnection, id: &str, thread: &Thread) -> Result<()> {
    insert_messages(conn, id, 0, &thread.messages).await?;
    insert_patches(conn, id, 0, &thread.patches).await?;
    Ok(())
}

/// Replaces a thread's message and patch rows with a full (prepared) thread's; the caller
/// writes the thread row.
async fn replace_thread_rows(conn: &mut PgConnection, id: &str, thread: &Thread) -> Result<()> {
    for table in ["messages", "patches"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE thread_id = $1"))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    insert_thread_rows(conn, id, thread).await
}

/// The custom metadata of a thread whose row the transaction holds.
async fn load_metadata(conn: &mut PgConnection, id: &str) -> Result<Extra> {
    let metadata: String = sqlx::query_scalar("SELECT metadata FROM threads WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
    from_json(&metadata)
}

/// Remembers idempotency keys at their versions (a key already remembered moves to the new
/// version), then keeps only the [`IDEMPOTENCY_KEYS_KEPT`] most recent ones. Each version
/// carries at most one key, so trimming by version keeps exactly that many.
async fn remember_keys(
    conn: &mut PgConnection,
    id: &str,
    keys: &[(&IdempotencyKey, u64)],
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    // One row per key (the last one wins): a single upsert cannot touch a row twice.
    let mut latest: HashMap<&str, (&IdempotencyKey, u64)> = HashMap::new();
    for &(k, v) in keys {
        latest.insert(k.key.as_str(), (k, v));
    }
    let (mut names, mut fingerprints, mut versions) = (Vec::new(), Vec::new(), Vec::new());
    for (k, v) in latest.into_values() {
        names.push(enc(&k.key));
        fingerprints.push(k.fingerprint.clone());
        versions.push(i(v)?);
    }
    sqlx::query(
        "INSERT INTO idempotency (thread_id, key, fingerprint, version)          SELECT $1, k, f, v FROM UNNEST($2::text[], $3::text[], $4::bigint[]) AS u(k, f, v)          ON CONFLICT (thread_id, key) DO UPDATE SET            fingerprint = EXCLUDED.fingerprint, version = EXCLUDED.version",
    )
    .bind(id)
    .bind(&names)
    .bind(&fingerprints)
    .bind(&versions)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    trim_keys(conn, id).await
}

/// Keeps the [`IDEMPOTENCY_KEYS_KEPT`] most recent keys (one key per version at most).
async fn trim_keys(conn: &mut PgConnection, id: &str) -> Result<()> {
    sqlx::query(
        "DELETE FROM idempotency WHERE thread_id = $1 AND version <= \
         (SELECT version FROM idempotency WHERE thread_id = $1 \
          ORDER BY version DESC OFFSET $2 LIMIT 1)",
    )
    .bind(id)
    .bind(IDEMPOTENCY_KEYS_KEPT as i64)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Read helpers
// ---------------------------------------------------------------------------------------

type ThreadRow = (
    String,         // id
    Option<String>, // resource_id (encoded)
    Option<String>, // parent_thread_id (encoded)
    i64,            // version
    i64,            // watermark
    String,         // state
    String,         // metadata
    i64,            // created_at
    i64,            // updated_at
);

type RunRow = (String, Option<String>, String, i64, i64, i64);

/// The keyset condition and `ORDER BY` of a thread listing (see migrations/0002): rows
/// strictly after the cursor in `(key, id)` order, compared as a row so that one index range
/// scan on `(key, id)` (or `(resource_id, key, id)`) serves it. Ids compare byte-wise ("C").
fn push_list_order(sql: &mut QueryBuilder<'_, Postgres>, q: &ListQuery) {
    let (cmp, dir) = match q.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let column = match q.order_by {
        ListOrderBy::Id => None,
        ListOrderBy::CreatedAt => Some("created_at"),
        ListOrderBy::UpdatedAt => Some("updated_at"),
    };
    if let Some(after) = &q.after {
        let id = after.id.as_str().to_owned();
        match column {
            None => {
                sql.push(format_args!(" AND id {cmp} "))
                    .push_bind(id)
                    .push(" COLLATE \"C\"");
            }
            Some(col) => {
                sql.push(format_args!(" AND ({col}, id) {cmp} ("))
                    .push_bind(after.key)
                    .push(", ")
                    .push_bind(id)
                    .push(" COLLATE \"C\")");
            }
        }
    }
    match column {
        None => sql.push(format_args!(" ORDER BY id {dir}")),
        Some(col) => sql.push(format_args!(" ORDER BY {col} {dir}, id {dir}")),
    };
}

fn run_record(
    thread_id: &str,
    (run_id, parent, meta, version, created_at, updated_at): RunRow,
) -> Result<RunRecord> {
    Ok(RunRecord {
        run_id: dec(&run_id)?,
        thread_id: thread_id.to_owned(),
        parent_run_id: dec_opt(parent)?,
        meta: from_json(&meta)?,
        version: u(version),
        created_at,
        updated_at,
    })
}

/// A run row outer-joined to its thread: `(run_id, parent_run_id, meta, version, created_at,
/// updated_at)`, all `NULL` when the thread exists but the run does not.
type JoinedRunRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

#[async_trait]
impl Store for PostgresStore {
    async fn create(&self, id: &ThreadId, mut thread: Thread) -> Result<Snapshot> {
        let current = super::prepare_thread(id, &mut thread)?;
        let now = now_ms();
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO threads (id, resource_id, parent_thread_id, version, watermark, state, \
               current_state, metadata, message_count, patch_count, created_at, updated_at) \
             VALUES ($1, $2, $3, 0, 0, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(enc_opt(thread.resource_id.as_deref()))
        .bind(enc_opt(thread.parent_thread_id.as_deref()))
        .bind(to_json(&thread.state)?)
        .bind(to_json(&current)?)
        .bind(to_json(&thread.metadata)?)
        .bind(thread.messages.len() as i64)
        .bind(thread.patches.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists);
        }
        insert_thread_rows(&mut tx, id.as_str(), &thread).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(Snapshot {
            thread,
            version: 0,
            watermark: 0,
            created_at: now,
            updated_at: now,
        })
    }

    async fn get(&self, id: &ThreadId) -> Result<Snapshot> {
        let mut tx = self.begin_read().await?;
        let row: Option<ThreadRow> = sqlx::query_as(
            "SELECT id, resource_id, parent_thread_id, version, watermark, state, metadata, \
             created_at, updated_at FROM threads WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let (
            tid,
            resource_id,
            parent_thread_id,
            version,
            watermark,
            state,
            metadata,
            created_at,
            updated_at,
        ) = row.ok_or(StoreError::NotFound)?;
        let messages: Vec<String> =
            sqlx::query_scalar("SELECT body FROM messages WHERE thread_id = $1 ORDER BY cursor")
                .bind(id.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
        let patches: Vec<String> =
            sqlx::query_scalar("SELECT body FROM patches WHERE thread_id = $1 ORDER BY seq")
                .bind(id.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(Snapshot {
            thread: Thread {
                id: tid,
                resource_id: dec_opt(resource_id)?,
                parent_thread_id: dec_opt(parent_thread_id)?,
                messages: messages
                    .iter()
                    .map(|m| from_json(m))
                    .collect::<Result<_>>()?,
                state: from_json(&state)?,
                patches: patches
                    .iter()
                    .map(|p| from_json(p))
                    .collect::<Result<_>>()?,
                metadata: from_json(&metadata)?,
            },
            version: u(version),
            watermark: u(watermark),
            created_at,
            updated_at,
        })
    }

    async fn version(&self, id: &ThreadId) -> Result<u64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT version FROM threads WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        v.map(u).ok_or(StoreError::NotFound)
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        let mut sql = QueryBuilder::<Postgres>::new(
            "SELECT id, resource_id, parent_thread_id, version, created_at, updated_at, \
             message_count, metadata FROM threads WHERE true",
        );
        if let Some(r) = &q.resource_id {
            sql.push(" AND resource_id = ").push_bind(enc(r));
        }
        if let Some(p) = &q.parent_thread_id {
            sql.push(" AND parent_thread_id = ").push_bind(enc(p));
        }
        push_list_order(&mut sql, q);
        sql.push(" LIMIT ")
            .push_bind(i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX));
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            String,
            Option<String>,
            Option<String>,
            i64,
            i64,
            i64,
            i64,
            String,
        )> = sql
            .build_query_as()
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let has_more = rows.len() > q.limit;
        let threads = rows
            .into_iter()
            .take(q.limit)
            .map(
                |(id, resource_id, parent, version, created_at, updated_at, count, metadata)| {
                    Ok(ThreadSummary {
                        id,
                        resource_id: dec_opt(resource_id)?,
                        parent_thread_id: dec_opt(parent)?,
                        version: u(version),
                        created_at,
                        updated_at,
                        message_count: u(count),
                        metadata: from_json(&metadata)?,
                    })
                },
            )
            .collect::<Result<_>>()?;
        Ok(ListPage { threads, has_more })
    }

    async fn replace(&self, id: &ThreadId, mut thread: Thread, expect: Expect) -> Result<u64> {
        let current = super::prepare_thread(id, &mut thread)?;
        let now = now_ms();
        let mut tx = self.begin().await?;
        let old = lock_version(&mut tx, id.as_str()).await?;
        expect.check(old)?;
        let version = old + 1;
        replace_thread_rows(&mut tx, id.as_str(), &thread).await?;
        sqlx::query(
            "UPDATE threads SET resource_id = $2, parent_thread_id = $3, version = $4, \
             watermark = $4, state = $5, current_state = $6, metadata = $7, message_count = $8, \
             patch_count = $9, updated_at = $10 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(enc_opt(thread.resource_id.as_deref()))
        .bind(enc_opt(thread.parent_thread_id.as_deref()))
        .bind(i(version)?)
        .bind(to_json(&thread.state)?)
        .bind(to_json(&current)?)
        .bind(to_json(&thread.metadata)?)
        .bind(thread.messages.len() as i64)
        .bind(thread.patches.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        record_history(&mut tx, id.as_str(), version, now, &Change::Replace(thread)).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(version)
    }

    async fn patch_metadata(&self, id: &ThreadId, mut patch: Extra, expect: Expect) -> Result<u64> {
        super::strip_server_metadata(&mut patch);
        let now = now_ms();
        let mut tx = self.begin().await?;
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT version, metadata FROM threads WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        let (old, metadata) = row.ok_or(StoreError::NotFound)?;
        expect.check(u(old))?;
        let mut metadata: Extra = from_json(&metadata)?;
        super::merge_metadata(&mut metadata, &patch);
        let version = u(old) + 1;
        sqlx::query(
            "UPDATE threads SET metadata = $2, version = $3, watermark = $3, updated_at = $4 \
             WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(to_json(&metadata)?)
        .bind(i(version)?)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        record_history(&mut tx, id.as_str(), version, now, &Change::Metadata(patch)).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(version)
    }

    async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()> {
        let mut tx = self.begin().await?;
        expect.check(lock_version(&mut tx, id.as_str()).await?)?;
        sqlx::query("DELETE FROM threads WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn append(
        &self,
        id: &ThreadId,
        delta: &ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Appended> {
        let tid = id.as_str();
        let mut tx = self.begin().await?;
        let mut head = lock_head(&mut tx, tid).await?;
        if let Some(key) = idempotency
            && let Some(replay) = remembered(&mut tx, tid, key).await?
        {
            return Ok(replay);
        }
        expect.check(head.version)?;
        let version = head.version + 1;
        let now = now_ms();
        let mut existing = existing_ids(&mut tx, tid, [delta]).await?;
        apply_delta_rows(&mut tx, tid, &mut head, &mut existing, delta, version, now).await?;
        if let Some(key) = idempotency {
            sqlx::query(
                "INSERT INTO idempotency (thread_id, key, fingerprint, version) VALUES ($1, $2, $3, $4)",
            )
            .bind(tid)
            .bind(enc(&key.key))
            .bind(&key.fingerprint)
            .bind(i(version)?)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            trim_keys(&mut tx, tid).await?;
        }
        write_head(&mut tx, tid, &head, version, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(Appended {
            version,
            replayed: false,
        })
    }

    async fn idempotent(&self, id: &ThreadId, key: &IdempotencyKey) -> Result<Option<Appended>> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        match remembered(&mut conn, id.as_str(), key).await? {
            Some(replay) => Ok(Some(replay)),
            // Unknown key: a missing thread is still NotFound.
            None => self.version(id).await.map(|_| None),
        }
    }

    async fn apply_batch(&self, id: &ThreadId, entries: &[Folded]) -> Result<u64> {
        let tid = id.as_str();
        let mut tx = self.begin().await?;
        let mut head = lock_head(&mut tx, tid).await?;
        let prepared = super::prepare_batch(id, entries, head.watermark)?;
        if prepared.is_empty() {
            return Ok(head.watermark);
        }
        let now = now_ms();
        let mut existing = existing_ids(
            &mut tx,
            tid,
            prepared.iter().filter_map(|(_, p)| match p {
                Prepared::Delta(d) => Some(*d),
                _ => None,
            }),
        )
        .await?;
        // Set by a replace: the encoded (resource_id, parent_thread_id).
        let mut identity: Option<(Option<String>, Option<String>)> = None;
        // The metadata once a replace or a merge changed it (written back at the end).
        let mut metadata: Option<Extra> = None;
        let mut keys = Vec::new();
        let mut version = head.watermark;
        for (entry, change) in prepared {
            version = entry.version;
            match change {
                Prepared::Delta(delta) => {
                    apply_delta_rows(&mut tx, tid, &mut head, &mut existing, delta, version, now)
                        .await?;
                }
                Prepared::Replace(thread, state) => {
                    replace_thread_rows(&mut tx, tid, &thread).await?;
                    head.message_count = thread.messages.len() as i64;
                    head.patch_count = thread.patches.len() as i64;
                    head.current_state = state;
                    head.new_base_state = Some(thread.state.clone());
                    existing = thread
                        .messages
                        .iter()
                        .filter_map(|m| m.id.clone())
                        .collect();
                    identity = Some((
                        enc_opt(thread.resource_id.as_deref()),
                        enc_opt(thread.parent_thread_id.as_deref()),
                    ));
                    metadata = Some(thread.metadata.clone());
                    record_history(&mut tx, tid, version, now, &Change::Replace(thread)).await?;
                }
                Prepared::Metadata(patch) => {
                    let current = match &mut metadata {
                        Some(m) => m,
                        None => metadata.insert(load_metadata(&mut tx, tid).await?),
                    };
                    super::merge_metadata(current, &patch);
                    record_history(&mut tx, tid, version, now, &Change::Metadata(patch)).await?;
                }
            }
            if let Some(key) = &entry.idempotency {
                keys.push((key, version));
            }
        }
        remember_keys(&mut tx, tid, &keys).await?;
        write_head(&mut tx, tid, &head, version, now).await?;
        if identity.is_some() || metadata.is_some() {
            let (resource_id, parent_thread_id) = identity.clone().unwrap_or_default();
            let metadata = metadata.as_ref().map(to_json).transpose()?;
            sqlx::query(
                "UPDATE threads SET \
                   resource_id = CASE WHEN $2 THEN $3 ELSE resource_id END, \
                   parent_thread_id = CASE WHEN $2 THEN $4 ELSE parent_thread_id END, \
                   metadata = COALESCE($5, metadata) WHERE id = $1",
            )
            .bind(tid)
            .bind(identity.is_some())
            .bind(resource_id)
            .bind(parent_thread_id)
            .bind(metadata)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(version)
    }

    async fn messages(&self, id: &ThreadId, q: &MessageQuery) -> Result<MessagePage> {
        let dir = match q.order {
            Order::Asc => "ASC",
            Order::Desc => "DESC",
        };
        // One statement, so the version matches the page; a missing thread yields no row,
        // a thread without matching messages one row with NULLs.
        let mut sql = QueryBuilder::<Postgres>::new(
            "SELECT t.version, m.cursor, m.body FROM threads t LEFT JOIN LATERAL \
             (SELECT cursor, body FROM messages WHERE thread_id = t.id",
        );
        if let Some(after) = q.after {
            sql.push(" AND cursor > ")
                .push_bind(i64::try_from(after).unwrap_or(i64::MAX));
        }
        if let Some(before) = q.before {
            sql.push(" AND cursor < ")
                .push_bind(i64::try_from(before).unwrap_or(i64::MAX));
        }
        match q.visibility {
            VisibilityFilter::All => {
                sql.push(" AND NOT internal");
            }
            VisibilityFilter::Internal => {
                sql.push(" AND internal");
            }
            VisibilityFilter::Any => {}
        }
        if let Some(run) = &q.run_id {
            sql.push(" AND run_id = ").push_bind(enc(run));
        }
        sql.push(format_args!(" ORDER BY cursor {dir} LIMIT "))
            .push_bind(i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX))
            .push(") m ON true WHERE t.id = ")
            .push_bind(id.as_str().to_owned())
            .push(format_args!(" ORDER BY m.cursor {dir}"));
        let rows: Vec<(i64, Option<i64>, Option<String>)> = sql
            .build_query_as()
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let version = rows.first().map(|r| u(r.0)).ok_or(StoreError::NotFound)?;
        let mut messages = Vec::with_capacity(rows.len());
        for (_, cursor, body) in rows {
            if let (Some(cursor), Some(body)) = (cursor, body) {
                messages.push((u(cursor), from_json::<Message>(&body)?));
            }
        }
        let has_more = messages.len() > q.limit;
        messages.truncate(q.limit);
        Ok(MessagePage {
            messages,
            has_more,
            version,
        })
    }

    async fn state(&self, id: &ThreadId) -> Result<(Value, u64)> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT current_state, version FROM threads WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        let (state, version) = row.ok_or(StoreError::NotFound)?;
        Ok((from_json(&state)?, u(version)))
    }

    async fn history(&self, id: &ThreadId, after: u64, limit: usize) -> Result<History> {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(i64, Option<i64>, Option<i64>, Option<i64>, Option<String>)> =
            sqlx::query_as(
                "SELECT t.version, \
               (SELECT min(version) FROM history WHERE thread_id = t.id), \
               h.version, h.at, h.change \
             FROM threads t LEFT JOIN LATERAL \
               (SELECT version, at, change FROM history \
                WHERE thread_id = t.id AND version > $2 ORDER BY version LIMIT $3) h ON true \
             WHERE t.id = $1 ORDER BY h.version",
            )
            .bind(id.as_str())
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let (version, first_kept) = rows
            .first()
            .map(|r| (u(r.0), r.1.map(u)))
            .ok_or(StoreError::NotFound)?;
        let mut entries = Vec::with_capacity(rows.len());
        for (_, _, v, at, change) in rows {
            if let (Some(v), Some(at), Some(change)) = (v, at, change) {
                entries.push(HistoryEntry {
                    version: u(v),
                    at,
                    change: from_json(&change)?,
                });
            }
        }
        Ok(History {
            entries,
            first_kept,
            version,
        })
    }

    async fn runs(&self, id: &ThreadId) -> Result<Vec<RunRecord>> {
        let rows: Vec<JoinedRunRow> = sqlx::query_as(
            "SELECT r.run_id, r.parent_run_id, r.meta, r.version, r.created_at, r.updated_at \
                 FROM threads t LEFT JOIN runs r ON r.thread_id = t.id WHERE t.id = $1",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        if rows.is_empty() {
            return Err(StoreError::NotFound);
        }
        let mut runs = Vec::with_capacity(rows.len());
        for row in rows {
            if let (Some(run_id), parent, Some(meta), Some(v), Some(c), Some(up)) = row {
                runs.push(run_record(id.as_str(), (run_id, parent, meta, v, c, up))?);
            }
        }
        // Sorted here on the decoded ids so the order is the same as the other backends'.
        runs.sort_by(|a, b| (a.created_at, &a.run_id).cmp(&(b.created_at, &b.run_id)));
        Ok(runs)
    }

    async fn run(&self, id: &ThreadId, run_id: &str) -> Result<RunRecord> {
        let row: Option<JoinedRunRow> = sqlx::query_as(
            "SELECT r.run_id, r.parent_run_id, r.meta, r.version, r.created_at, r.updated_at \
                 FROM threads t LEFT JOIN runs r ON r.thread_id = t.id AND r.run_id = $2 \
                 WHERE t.id = $1",
        )
        .bind(id.as_str())
        .bind(enc(run_id))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        match row.ok_or(StoreError::NotFound)? {
            (Some(run_id), parent, Some(meta), Some(v), Some(c), Some(up)) => {
                run_record(id.as_str(), (run_id, parent, meta, v, c, up))
            }
            _ => Err(StoreError::RunNotFound),
        }
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }
}
