//! The row-level steps every write is made of (lock the thread row, insert messages and
//! patches, record history, remember keys, write the thread row back), each run inside the
//! caller's transaction.

use super::codec::{KeyRow, db_err, enc, enc_opt, from_json, i, to_json, u};
use crate::model::{ChangeSet, Extra, Message, RunMeta, Thread, TrackedPatch, Visibility};
use crate::store::{
    Appended, Change, HISTORY_LIMIT, IDEMPOTENCY_KEYS_KEPT, IdempotencyKey, Result, StoreError,
};
use serde_json::Value;
use sqlx::PgConnection;
use std::collections::{HashMap, HashSet};

/// The locked thread row, as far as a delta needs it.
pub(super) struct Head {
    pub version: u64,
    pub watermark: u64,
    pub current_state: Value,
    pub message_count: i64,
    pub patch_count: i64,
    /// The new base state, when a snapshot delta replaced it.
    pub new_base_state: Option<Value>,
}

#[derive(sqlx::FromRow)]
struct HeadRow {
    version: i64,
    watermark: i64,
    current_state: String,
    message_count: i64,
    patch_count: i64,
}

/// Locks the thread row for the rest of the transaction; `NotFound` when there is none.
pub(super) async fn lock_head(conn: &mut PgConnection, id: &str) -> Result<Head> {
    let row: Option<HeadRow> = sqlx::query_as(
        "SELECT version, watermark, current_state, message_count, patch_count \
         FROM threads WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    let row = row.ok_or(StoreError::NotFound)?;
    Ok(Head {
        version: u(row.version),
        watermark: u(row.watermark),
        current_state: from_json(&row.current_state)?,
        message_count: row.message_count,
        patch_count: row.patch_count,
        new_base_state: None,
    })
}

/// Locks the thread row and returns its version; `NotFound` when there is none.
pub(super) async fn lock_version(conn: &mut PgConnection, id: &str) -> Result<u64> {
    let v: Option<i64> = sqlx::query_scalar("SELECT version FROM threads WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
    v.map(u).ok_or(StoreError::NotFound)
}

/// Inserts messages at consecutive cursors from `first_cursor`, in one statement.
pub(super) async fn insert_messages(
    conn: &mut PgConnection,
    id: &str,
    first_cursor: i64,
    messages: &[&Message],
) -> Result<i64> {
    let (mut cursors, mut ids, mut runs, mut internal, mut bodies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (n, m) in messages.iter().enumerate() {
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
pub(super) async fn insert_patches(
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
pub(super) async fn record_history(
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

/// The write remembered for an idempotency key on this thread, if any.
pub async fn remembered(
    conn: &mut PgConnection,
    id: &str,
    key: &IdempotencyKey,
) -> Result<Option<Appended>> {
    let seen: Option<KeyRow> = sqlx::query_as(
        "SELECT fingerprint, version FROM idempotency WHERE thread_id = $1 AND key = $2",
    )
    .bind(id)
    .bind(enc(&key.key))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    seen.map(|row| row.answer(key)).transpose()
}

/// Which of the deltas' message ids the thread already holds.
pub(super) async fn existing_ids<'a>(
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
    found.iter().map(|s| super::codec::dec(s)).collect()
}

/// Applies one delta as `version` (rows only; the caller writes the thread row). Validates
/// before writing anything, so an `InvalidDelta` leaves the transaction untouched.
pub(super) async fn apply_delta_rows(
    conn: &mut PgConnection,
    id: &str,
    head: &mut Head,
    existing: &mut HashSet<String>,
    mut delta: ChangeSet,
    version: u64,
    now: i64,
) -> Result<()> {
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
    head.message_count += insert_messages(conn, id, head.message_count, &new).await?;
    head.patch_count += insert_patches(conn, id, head.patch_count, &delta.patches).await?;
    head.current_state = plan.new_current_state;
    if let Some(meta) = &delta.run_meta {
        upsert_run(conn, id, &delta, meta, version, now).await?;
    }
    record_history(conn, id, version, now, &Change::Delta(delta)).await
}

/// Creates or updates the run's record: `created_at` is kept, the rest follows the delta
/// (a delta without `parent_run_id` keeps the recorded one).
pub(super) async fn upsert_run(
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
pub(super) async fn write_head(
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
pub(super) async fn insert_thread_rows(
    conn: &mut PgConnection,
    id: &str,
    thread: &Thread,
) -> Result<()> {
    let messages: Vec<&Message> = thread.messages.iter().collect();
    insert_messages(conn, id, 0, &messages).await?;
    insert_patches(conn, id, 0, &thread.patches).await?;
    Ok(())
}

/// Replaces a thread's message and patch rows with a full (prepared) thread's; the caller
/// writes the thread row.
pub(super) async fn replace_thread_rows(
    conn: &mut PgConnection,
    id: &str,
    thread: &Thread,
) -> Result<()> {
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
pub(super) async fn load_metadata(conn: &mut PgConnection, id: &str) -> Result<Extra> {
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
pub(super) async fn remember_keys(
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
        "INSERT INTO idempotency (thread_id, key, fingerprint, version) \
         SELECT $1, k, f, v FROM UNNEST($2::text[], $3::text[], $4::bigint[]) AS u(k, f, v) \
         ON CONFLICT (thread_id, key) DO UPDATE SET \
           fingerprint = EXCLUDED.fingerprint, version = EXCLUDED.version",
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
pub(super) async fn trim_keys(conn: &mut PgConnection, id: &str) -> Result<()> {
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
