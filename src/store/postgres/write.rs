//! Writes: every function runs inside the caller's transaction (see the parent module's
//! `in_task!`), locks the thread row first, checks the expected version or watermark against
//! the locked row, then inserts only the rows the write adds ([`super::rows`]).

use super::codec::{db_err, enc, enc_opt, from_json, i, inc_col, to_json, u};
use super::rows::{
    Head, Rows, apply_delta_rows, existing_ids, insert_thread_rows, load_metadata, lock_head,
    lock_version, record_history, remember_keys, remembered, replace_thread_rows, trim_keys,
};
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::{
    Appended, Change, Expect, IdempotencyKey, Incarnation, Result, Snapshot, StoreError, Write,
};
use serde_json::Value;
use sqlx::PgConnection;

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

/// [`crate::store::Store::delete`]: every child row goes with the thread (cascade). Returns
/// the version it had.
pub async fn delete(conn: &mut PgConnection, id: ThreadId, expect: Expect) -> Result<u64> {
    let version = lock_version(conn, id.as_str()).await?;
    expect.check(version)?;
    sqlx::query("DELETE FROM threads WHERE id = $1")
        .bind(id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(version)
}

/// [`crate::store::Store::append`], and the thread row it left (none for a replay).
pub async fn append(
    conn: &mut PgConnection,
    id: ThreadId,
    delta: ChangeSet,
    expect: Expect,
    idempotency: Option<IdempotencyKey>,
    now: i64,
) -> Result<(Appended, Option<Head>)> {
    let tid = id.as_str();
    let mut head = lock_head(conn, tid).await?;
    if let Some(key) = &idempotency
        && let Some(replay) = remembered(conn, tid, key).await?
    {
        return Ok((replay, None));
    }
    expect.check(head.version)?;
    let version = head.version + 1;
    let mut existing = existing_ids(conn, tid, [&delta]).await?;
    let mut rows = Rows::at(now);
    apply_delta_rows(
        conn,
        tid,
        &mut head,
        &mut existing,
        &mut rows,
        delta,
        version,
    )
    .await?;
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
    rows.write_with_head(conn, tid, &head, version).await?;
    head.version = version;
    head.watermark = version;
    Ok((
        Appended {
            version,
            replayed: false,
        },
        Some(head),
    ))
}

/// [`crate::store::Store::apply_batch`]: takes the entries by value, so every delta moves
/// into its rows without a copy. Entries are checked as they are applied; any failure rolls
/// the whole transaction back, so the batch is still all or nothing.
pub async fn apply_batch(
    conn: &mut PgConnection,
    id: ThreadId,
    entries: Vec<Write>,
    now: i64,
) -> Result<u64> {
    let tid = id.as_str();
    let mut head = lock_head(conn, tid).await?;
    let watermark = head.watermark;
    let pending: Vec<Write> = entries
        .into_iter()
        .filter(|e| e.version > watermark)
        .collect();
    if pending.is_empty() {
        return Ok(watermark);
    }
    let mut existing = existing_ids(
        conn,
        tid,
        pending.iter().filter_map(|e| match &e.change {
            Change::Delta(d) => Some(d),
            _ => None,
        }),
    )
    .await?;
    // Set by a replace: the encoded (resource_id, parent_thread_id).
    let mut identity: Option<(Option<String>, Option<String>)> = None;
    // The metadata once a replace or a merge changed it (written back at the end).
    let mut metadata: Option<Extra> = None;
    let mut keys = Vec::new();
    let mut version = watermark;
    // The rows of the deltas since the last full save, written by one statement.
    let mut rows = Rows::at(now);
    for (n, entry) in pending.into_iter().enumerate() {
        let want = watermark + 1 + n as u64;
        if entry.version != want {
            return Err(StoreError::Internal(format!(
                "gap in folded log: expected version {want}, got {}",
                entry.version
            )));
        }
        version = entry.version;
        match entry.change {
            Change::Delta(delta) => {
                apply_delta_rows(
                    conn,
                    tid,
                    &mut head,
                    &mut existing,
                    &mut rows,
                    delta,
                    version,
                )
                .await?;
            }
            Change::Replace(mut thread) => {
                let state = crate::store::prepare_thread(&id, &mut thread)?;
                // Earlier rows first: the save replaces them.
                rows.write(conn, tid).await?;
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
                rows.history(version, &Change::Replace(thread))?;
            }
            Change::Metadata(mut patch) => {
                crate::store::strip_server_metadata(&mut patch);
                let current = match &mut metadata {
                    Some(m) => m,
                    None => metadata.insert(load_metadata(conn, tid).await?),
                };
                crate::store::merge_metadata(current, &patch);
                rows.history(version, &Change::Metadata(patch))?;
            }
        }
        if let Some(key) = entry.idempotency {
            keys.push((key, version));
        }
    }
    let keys: Vec<(&IdempotencyKey, u64)> = keys.iter().map(|(k, v)| (k, *v)).collect();
    remember_keys(conn, tid, &keys).await?;
    rows.write_with_head(conn, tid, &head, version).await?;
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
