//! Writes: every function runs inside the caller's transaction (see [`super::Tx`]), locks the
//! thread row first (`SELECT ... FOR UPDATE`), checks the expected version or watermark
//! against the locked row, then inserts only the rows the write adds.

use super::codec::{KeyRow, db_err, enc, enc_opt, from_json, i, inc_col, to_json, u};
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Message, RunMeta, Thread, TrackedPatch, Visibility};
use crate::store::{
    Appended, Change, Expect, HISTORY_LIMIT, IDEMPOTENCY_KEYS_KEPT, IdempotencyKey, Incarnation,
    Prepared, Result, Snapshot, StoreError, Write,
};
use serde_json::Value;
use sqlx::PgConnection;
use std::collections::{HashMap, HashSet};

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

#[derive(sqlx::FromRow)]
struct HeadRow {
    version: i64,
    watermark: i64,
    current_state: String,
    message_count: i64,
    patch_count: i64,
}

/// Locks the thread row for the rest of the transaction; `NotFound` when there is none.
async fn lock_head(conn: &mut PgConnection, id: &str) -> Result<Head> {
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
async fn lock_version(conn: &mut PgConnection, id: &str) -> Result<u64> {
    let v: Option<i64> = sqlx::query_scalar("SELECT version FROM threads WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
    v.map(u).ok_or(StoreError::NotFound)
}

/// Inserts messages at consecutive cursors from `first_cursor`, in one statement.
async fn insert_messages(
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
    found.iter().map(|s| super::codec::dec(s)).collect()
}

/// Applies one delta as `version` (rows only; the caller writes the thread row). Validates
/// before writing anything, so an `InvalidDelta` leaves the transaction untouched.
async fn apply_delta_rows(
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
    let messages: Vec<&Message> = thread.messages.iter().collect();
    insert_messages(conn, id, 0, &messages).await?;
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

/// [`crate::store::Store::create`] on a prepared thread.
pub async fn create(
    conn: &mut PgConnection,
    id: ThreadId,
    thread: Thread,
    current: Value,
    now: i64,
) -> Result<Snapshot> {
    let incarnation = Incarnation::new();
    let inserted = sqlx::query(
        "INSERT INTO threads (id, resource_id, parent_thread_id, version, watermark, state, \
           current_state, metadata, message_count, patch_count, created_at, updated_at, \
           incarnation) \
         VALUES ($1, $2, $3, 0, 0, $4, $5, $6, $7, $8, $9, $9, $10) ON CONFLICT (id) DO NOTHING",
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
    .bind(inc_col(incarnation))
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    if inserted.rows_affected() == 0 {
        return Err(StoreError::AlreadyExists);
    }
    insert_thread_rows(conn, id.as_str(), &thread).await?;
    Ok(Snapshot {
        thread,
        version: 0,
        watermark: 0,
        incarnation,
        created_at: now,
        updated_at: now,
    })
}

/// [`crate::store::Store::replace`] with a prepared thread and its current state.
pub async fn replace(
    conn: &mut PgConnection,
    id: ThreadId,
    thread: Thread,
    current: Value,
    expect: Expect,
    now: i64,
) -> Result<u64> {
    let old = lock_version(conn, id.as_str()).await?;
    expect.check(old)?;
    let version = old + 1;
    replace_thread_rows(conn, id.as_str(), &thread).await?;
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
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    record_history(conn, id.as_str(), version, now, &Change::Replace(thread)).await?;
    Ok(version)
}

#[derive(sqlx::FromRow)]
struct MetadataRow {
    version: i64,
    metadata: String,
}

/// [`crate::store::Store::patch_metadata`] with server keys already stripped.
pub async fn patch_metadata(
    conn: &mut PgConnection,
    id: ThreadId,
    patch: Extra,
    expect: Expect,
    now: i64,
) -> Result<u64> {
    let row: Option<MetadataRow> =
        sqlx::query_as("SELECT version, metadata FROM threads WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
    let row = row.ok_or(StoreError::NotFound)?;
    expect.check(u(row.version))?;
    let mut metadata: Extra = from_json(&row.metadata)?;
    crate::store::merge_metadata(&mut metadata, &patch);
    let version = u(row.version) + 1;
    sqlx::query(
        "UPDATE threads SET metadata = $2, version = $3, watermark = $3, updated_at = $4 \
         WHERE id = $1",
    )
    .bind(id.as_str())
    .bind(to_json(&metadata)?)
    .bind(i(version)?)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    record_history(conn, id.as_str(), version, now, &Change::Metadata(patch)).await?;
    Ok(version)
}

/// [`crate::store::Store::delete`]: every child row goes with the thread (cascade).
pub async fn delete(conn: &mut PgConnection, id: ThreadId, expect: Expect) -> Result<()> {
    expect.check(lock_version(conn, id.as_str()).await?)?;
    sqlx::query("DELETE FROM threads WHERE id = $1")
        .bind(id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// [`crate::store::Store::append`].
pub async fn append(
    conn: &mut PgConnection,
    id: ThreadId,
    delta: ChangeSet,
    expect: Expect,
    idempotency: Option<IdempotencyKey>,
    now: i64,
) -> Result<Appended> {
    let tid = id.as_str();
    let mut head = lock_head(conn, tid).await?;
    if let Some(key) = &idempotency
        && let Some(replay) = remembered(conn, tid, key).await?
    {
        return Ok(replay);
    }
    expect.check(head.version)?;
    let version = head.version + 1;
    let mut existing = existing_ids(conn, tid, [&delta]).await?;
    apply_delta_rows(conn, tid, &mut head, &mut existing, delta, version, now).await?;
    if let Some(key) = &idempotency {
        sqlx::query(
            "INSERT INTO idempotency (thread_id, key, fingerprint, version) VALUES ($1, $2, $3, $4)",
        )
        .bind(tid)
        .bind(enc(&key.key))
        .bind(&key.fingerprint)
        .bind(i(version)?)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        trim_keys(conn, tid).await?;
    }
    write_head(conn, tid, &head, version, now).await?;
    Ok(Appended {
        version,
        replayed: false,
    })
}

/// [`crate::store::Store::apply_batch`].
pub async fn apply_batch(
    conn: &mut PgConnection,
    id: ThreadId,
    entries: Vec<Write>,
    now: i64,
) -> Result<u64> {
    let tid = id.as_str();
    let mut head = lock_head(conn, tid).await?;
    let prepared = crate::store::prepare_batch(&id, &entries, head.watermark)?;
    if prepared.is_empty() {
        return Ok(head.watermark);
    }
    let mut existing = existing_ids(
        conn,
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
                apply_delta_rows(
                    conn,
                    tid,
                    &mut head,
                    &mut existing,
                    delta.clone(),
                    version,
                    now,
                )
                .await?;
            }
            Prepared::Replace(thread, state) => {
                replace_thread_rows(conn, tid, &thread).await?;
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
                record_history(conn, tid, version, now, &Change::Replace(thread)).await?;
            }
            Prepared::Metadata(patch) => {
                let current = match &mut metadata {
                    Some(m) => m,
                    None => metadata.insert(load_metadata(conn, tid).await?),
                };
                crate::store::merge_metadata(current, &patch);
                record_history(conn, tid, version, now, &Change::Metadata(patch)).await?;
            }
        }
        if let Some(key) = &entry.idempotency {
            keys.push((key, version));
        }
    }
    remember_keys(conn, tid, &keys).await?;
    write_head(conn, tid, &head, version, now).await?;
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
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    }
    Ok(version)
}
