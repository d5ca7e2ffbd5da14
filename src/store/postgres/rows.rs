//! The row-level steps every write is made of (lock the thread row, insert messages and
//! patches, record history, remember keys, write the thread row back), each run inside the
//! caller's transaction.
//!
//! Deltas are set-based: [`apply_delta_rows`] only plans a delta against the locked head and
//! collects the rows it adds in [`Rows`]; [`Rows::write`] then inserts every collected
//! message, patch, run record and history entry of any number of deltas with one statement
//! (data-modifying CTEs over `UNNEST` arrays). A fold chunk of a thousand deltas therefore
//! costs a handful of round trips instead of four per delta, and a direct append one fewer
//! per kind of row it adds.

use super::codec::{KeyRow, db_err, enc, enc_opt, from_json, i, to_json, u};
use crate::model::{ChangeSet, Extra, Message, RunMeta, Thread, TrackedPatch, Visibility};
use crate::store::Incarnation;
use crate::store::{
    Appended, Change, HISTORY_LIMIT, IDEMPOTENCY_KEYS_KEPT, IdempotencyKey, Result, StoreError,
};
use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, Postgres, Row};
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
    pub incarnation: Incarnation,
    /// Length of the current state's JSON text as read (what caching it costs, roughly).
    pub state_len: usize,
}

#[derive(sqlx::FromRow)]
struct HeadRow {
    version: i64,
    watermark: i64,
    current_state: String,
    message_count: i64,
    patch_count: i64,
    incarnation: i64,
}

/// Locks the thread row for the rest of the transaction; `NotFound` when there is none.
pub(super) async fn lock_head(conn: &mut PgConnection, id: &str) -> Result<Head> {
    let row: Option<HeadRow> = sqlx::query_as(
        "SELECT version, watermark, current_state, message_count, patch_count, incarnation \
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
        incarnation: super::codec::inc(row.incarnation),
        state_len: row.current_state.len(),
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
    let mut rows = Rows::default();
    for (n, m) in messages.iter().enumerate() {
        rows.message(first_cursor + n as i64, m)?;
    }
    let added = rows.msg_cursor.len() as i64;
    rows.write(conn, id).await?;
    Ok(added)
}

/// Inserts patches at consecutive sequence numbers from `first_seq`, in one statement.
pub(super) async fn insert_patches(
    conn: &mut PgConnection,
    id: &str,
    first_seq: i64,
    patches: &[TrackedPatch],
) -> Result<i64> {
    let mut rows = Rows::default();
    for (n, p) in patches.iter().enumerate() {
        rows.patch(first_seq + n as i64, p)?;
    }
    let added = rows.patch_seq.len() as i64;
    rows.write(conn, id).await?;
    Ok(added)
}

/// The rows that one or more writes add to a thread's child tables, collected so that
/// [`Rows::write`] inserts them all with one statement. History versions must be collected
/// in ascending, contiguous order (every write records exactly one entry).
#[derive(Default)]
pub(super) struct Rows {
    msg_cursor: Vec<i64>,
    msg_id: Vec<Option<String>>,
    msg_run: Vec<Option<String>>,
    msg_internal: Vec<bool>,
    msg_body: Vec<String>,
    patch_seq: Vec<i64>,
    patch_body: Vec<String>,
    /// One row per run (a single upsert cannot touch a row twice): the last delta's record,
    /// with the last `parent_run_id` any of them named.
    runs: Vec<RunUpsert>,
    run_index: HashMap<String, usize>,
    hist_version: Vec<i64>,
    hist_change: Vec<String>,
    /// When the rows were made (unix ms): history `at`, run `created_at`/`updated_at`.
    now: i64,
}

struct RunUpsert {
    run_id: String,
    parent: Option<String>,
    meta: String,
    version: i64,
}

impl Rows {
    /// Rows made at `now` (unix ms).
    pub(super) fn at(now: i64) -> Self {
        Rows {
            now,
            ..Rows::default()
        }
    }

    fn message(&mut self, cursor: i64, m: &Message) -> Result<()> {
        self.msg_cursor.push(cursor);
        self.msg_id.push(enc_opt(m.id.as_deref()));
        self.msg_run.push(enc_opt(m.run_id()));
        self.msg_internal.push(m.visibility == Visibility::Internal);
        self.msg_body.push(to_json(m)?);
        Ok(())
    }

    fn patch(&mut self, seq: i64, p: &TrackedPatch) -> Result<()> {
        self.patch_seq.push(seq);
        self.patch_body.push(to_json(p)?);
        Ok(())
    }

    /// Forgets the patches collected so far: a delta replaced the state, and its own
    /// `DELETE` removes those already stored.
    fn drop_patches(&mut self) {
        self.patch_seq.clear();
        self.patch_body.clear();
    }

    fn run(&mut self, delta: &ChangeSet, meta: &RunMeta, version: u64) -> Result<()> {
        let row = RunUpsert {
            run_id: enc(&delta.run_id),
            parent: enc_opt(delta.parent_run_id.as_deref()),
            meta: to_json(meta)?,
            version: i(version)?,
        };
        match self.run_index.get(&row.run_id) {
            Some(&n) => {
                let earlier = &mut self.runs[n];
                earlier.parent = row.parent.or(earlier.parent.take());
                earlier.meta = row.meta;
                earlier.version = row.version;
            }
            None => {
                self.run_index.insert(row.run_id.clone(), self.runs.len());
                self.runs.push(row);
            }
        }
        Ok(())
    }

    /// Collects the history entry of the write that made `version`.
    pub(super) fn history(&mut self, version: u64, change: &Change) -> Result<()> {
        self.hist_version.push(i(version)?);
        self.hist_change.push(to_json(change)?);
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.msg_cursor.is_empty()
            && self.patch_seq.is_empty()
            && self.runs.is_empty()
            && self.hist_version.is_empty()
    }

    /// Inserts everything collected with one statement and empties the collection. History
    /// keeps the last [`HISTORY_LIMIT`] versions: versions are contiguous and every write
    /// records one entry, so the entries that fall out are exactly the range just below the
    /// new ones (a bounded range, never `version <= x`, which would walk every dead index
    /// entry below it on each write), and a batch longer than the window inserts only its
    /// last [`HISTORY_LIMIT`] entries.
    pub(super) async fn write(&mut self, conn: &mut PgConnection, id: &str) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        self.flush(conn, id, None).await
    }

    /// [`Rows::write`], and the thread row after them (version and watermark become
    /// `version`) in the same
    /// statement: a direct append or a fold chunk is one round trip besides its reads.
    pub(super) async fn write_with_head(
        &mut self,
        conn: &mut PgConnection,
        id: &str,
        head: &Head,
        version: u64,
    ) -> Result<()> {
        self.flush(conn, id, Some((head, version))).await
    }

    async fn flush(
        &mut self,
        conn: &mut PgConnection,
        id: &str,
        head: Option<(&Head, u64)>,
    ) -> Result<()> {
        let now = self.now;
        let cols = std::mem::take(self).into_columns();
        self.now = now;
        let sql = if head.is_some() {
            WRITE_ROWS_AND_HEAD
        } else {
            WRITE_ROWS
        };
        let mut q = cols.bind(sqlx::query(sql), id);
        if let Some((head, version)) = head {
            q = q
                .bind(i(version)?)
                .bind(head.new_base_state.as_ref().map(to_json).transpose()?)
                .bind(to_json(&head.current_state)?)
                .bind(head.message_count)
                .bind(head.patch_count);
        }
        q.execute(&mut *conn).await.map_err(db_err)?;
        Ok(())
    }

    /// Writes one delta's rows and the thread row in one autocommitted statement, but only
    /// if the thread row is still `cas` says (same version and incarnation), none of the
    /// delta's message ids is stored yet and its idempotency key (if any) is unknown; true
    /// when it wrote. See [`CAS_APPEND`] for why one statement is safe.
    pub(super) async fn write_if_head(
        self,
        conn: &mut PgConnection,
        id: &str,
        cas: &Cas<'_>,
    ) -> Result<bool> {
        let cols = self.into_columns();
        let (key, fingerprint) = match cas.key {
            Some(k) => (Some(enc(&k.key)), Some(k.fingerprint.as_str())),
            None => (None, None),
        };
        let row = cols
            .bind(sqlx::query(CAS_APPEND), id)
            .bind(i(cas.version)?)
            .bind(cas.current_state)
            .bind(cas.message_count)
            .bind(cas.patch_count)
            .bind(super::codec::inc_col(cas.incarnation))
            .bind(key)
            .bind(fingerprint)
            .bind(IDEMPOTENCY_KEYS_KEPT as i64 - 1)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
        let wrote: i64 = row.try_get(0).map_err(db_err)?;
        Ok(wrote == 1)
    }

    /// The collected rows as the statements' array parameters.
    fn into_columns(mut self) -> Columns {
        let keep = HISTORY_LIMIT as i64;
        let (drop_above, drop_upto, hist_from) =
            match (self.hist_version.first(), self.hist_version.last()) {
                (Some(&first), Some(&last)) => (
                    first - 1 - keep,
                    last - keep,
                    (self.hist_version.len() as i64 - keep).max(0) as usize,
                ),
                _ => (0, 0, 0),
            };
        let mut runs = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in std::mem::take(&mut self.runs) {
            runs.0.push(r.run_id);
            runs.1.push(r.parent);
            runs.2.push(r.meta);
            runs.3.push(r.version);
        }
        self.hist_version.drain(..hist_from);
        self.hist_change.drain(..hist_from);
        Columns {
            rows: self,
            runs,
            drop_above,
            drop_upto,
        }
    }
}

/// What [`Rows::write_if_head`] expects of the thread row, and what it writes into it.
pub(super) struct Cas<'a> {
    /// The version the write makes (the row must be at the one before).
    pub version: u64,
    pub incarnation: Incarnation,
    /// The new current state as JSON text, or `None` to leave it as it is.
    pub current_state: Option<&'a str>,
    pub message_count: i64,
    pub patch_count: i64,
    pub key: Option<&'a IdempotencyKey>,
}

/// [`Rows`] as the parameters $1–$17 of the statements below (the runs as columns, the
/// history window to drop).
struct Columns {
    rows: Rows,
    runs: (Vec<String>, Vec<Option<String>>, Vec<String>, Vec<i64>),
    drop_above: i64,
    drop_upto: i64,
}

impl Columns {
    /// Binds $1 (the thread) to $17 onto `q`.
    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, Postgres, PgArguments>,
        id: &'q str,
    ) -> sqlx::query::Query<'q, Postgres, PgArguments> {
        let r = &self.rows;
        q.bind(id)
            .bind(&r.msg_cursor)
            .bind(&r.msg_id)
            .bind(&r.msg_run)
            .bind(&r.msg_internal)
            .bind(&r.msg_body)
            .bind(&r.patch_seq)
            .bind(&r.patch_body)
            .bind(r.now)
            .bind(&self.runs.0)
            .bind(&self.runs.1)
            .bind(&self.runs.2)
            .bind(&self.runs.3)
            .bind(&r.hist_version)
            .bind(&r.hist_change)
            .bind(self.drop_above)
            .bind(self.drop_upto)
    }
}

/// The rows of [`Rows`] as data-modifying CTEs over `UNNEST` arrays ($1 thread, $2–$6
/// messages, $7–$8 patches, $9 now, $10–$13 runs, $14–$15 history); `$gate` is joined to
/// every insert (`""`, or `"t, "` to insert only if the CTE `t` returned a row).
macro_rules! rows_ctes {
    ($gate:literal) => {
        concat!(
            "m AS (INSERT INTO messages (thread_id, cursor, msg_id, run_id, internal, body) \
               SELECT $1, c, m, r, i, b FROM ",
            $gate,
            "UNNEST($2::bigint[], $3::text[], $4::text[], $5::bool[], $6::text[]) \
                    AS u(c, m, r, i, b)), \
             p AS (INSERT INTO patches (thread_id, seq, body) \
               SELECT $1, s, b FROM ",
            $gate,
            "UNNEST($7::bigint[], $8::text[]) AS u(s, b)), \
             r AS (INSERT INTO runs \
                 (thread_id, run_id, parent_run_id, meta, version, created_at, updated_at) \
               SELECT $1, ri, rp, rm, rv, $9, $9 FROM ",
            $gate,
            "UNNEST($10::text[], $11::text[], $12::text[], $13::bigint[]) \
                    AS u(ri, rp, rm, rv) \
               ON CONFLICT (thread_id, run_id) DO UPDATE SET \
                 parent_run_id = COALESCE(EXCLUDED.parent_run_id, runs.parent_run_id), \
                 meta = EXCLUDED.meta, version = EXCLUDED.version, \
                 updated_at = EXCLUDED.updated_at), \
             h AS (INSERT INTO history (thread_id, version, at, change) \
               SELECT $1, v, $9, c FROM ",
            $gate,
            "UNNEST($14::bigint[], $15::text[]) AS u(v, c))"
        )
    };
}

/// The history entries that fall out of the window ($16, $17]: the main statement.
macro_rules! trim_history {
    () => {
        " DELETE FROM history WHERE thread_id = $1 AND version > $16 AND version <= $17"
    };
}

/// [`Rows::write`]'s statement.
const WRITE_ROWS: &str = concat!("WITH ", rows_ctes!(""), trim_history!());

/// [`Rows::write_with_head`]'s statement: also the thread row ($18 version, $19 new base
/// state or NULL, $20 current state, $21 message count, $22 patch count).
const WRITE_ROWS_AND_HEAD: &str = concat!(
    "WITH ",
    rows_ctes!(""),
    ", t AS (UPDATE threads SET version = $18, watermark = $18, state = COALESCE($19, state), \
       current_state = $20, message_count = $21, patch_count = $22, updated_at = $9 \
       WHERE id = $1)",
    trim_history!()
);

/// [`Rows::write_if_head`]'s statement, autocommitted on its own: the thread row moves to
/// version $18 only if it is at $18 − 1 in incarnation $22, no message id of the delta ($3)
/// is stored and the idempotency key $23 (or NULL) is unknown; every insert and delete joins
/// that update's result, so nothing is written unless it happened. ($19 current state or
/// NULL to keep it, $20–$21 counts, $24 the key's fingerprint, $25 keys kept − 1.)
///
/// Why the checks hold without a `SELECT ... FOR UPDATE` first: every write to a thread
/// moves its version, in the same transaction as its rows. If another write commits after
/// this statement's snapshot, the `UPDATE` waits for its row lock, re-checks its `WHERE`
/// against the newer row (READ COMMITTED), finds another version and writes nothing. If
/// none did, the snapshot the `NOT EXISTS` probes read is the thread as of version $18 − 1,
/// which is what the caller validated the delta against.
const CAS_APPEND: &str = concat!(
    "WITH t AS (UPDATE threads SET version = $18, watermark = $18, \
       current_state = COALESCE($19, current_state), message_count = $20, patch_count = $21, \
       updated_at = $9 \
     WHERE id = $1 AND version = $18 - 1 AND incarnation = $22 \
       AND NOT EXISTS (SELECT 1 FROM unnest($3::text[]) AS w(id) WHERE EXISTS \
         (SELECT 1 FROM messages x WHERE x.thread_id = $1 AND x.msg_id = w.id)) \
       AND NOT EXISTS (SELECT 1 FROM idempotency k WHERE k.thread_id = $1 AND k.key = $23) \
     RETURNING 1 AS one), ",
    rows_ctes!("t, "),
    ", k AS (INSERT INTO idempotency (thread_id, key, fingerprint, version) \
       SELECT $1, $23, $24, $18 FROM t WHERE $23::text IS NOT NULL), \
     kt AS (DELETE FROM idempotency USING t WHERE $23::text IS NOT NULL \
       AND thread_id = $1 AND version <= (SELECT version FROM idempotency \
         WHERE thread_id = $1 ORDER BY version DESC OFFSET $25 LIMIT 1)), \
     ht AS (DELETE FROM history USING t \
       WHERE thread_id = $1 AND version > $16 AND version <= $17) \
     SELECT count(*) FROM t"
);

/// Records a write in the history and drops what falls out of the kept window.
pub(super) async fn record_history(
    conn: &mut PgConnection,
    id: &str,
    version: u64,
    at: i64,
    change: &Change,
) -> Result<()> {
    let mut rows = Rows::at(at);
    rows.history(version, change)?;
    rows.write(conn, id).await
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

/// Applies one delta as `version` to `head`, collecting the rows it adds in `rows` (the
/// caller writes them, and then the thread row). Validates before changing anything, so an
/// `InvalidDelta` leaves the transaction and `rows` untouched. The only statement it may run
/// itself is the `DELETE` of the stored patches when the delta replaces the state.
pub(super) async fn apply_delta_rows(
    conn: &mut PgConnection,
    id: &str,
    head: &mut Head,
    existing: &mut HashSet<String>,
    rows: &mut Rows,
    mut delta: ChangeSet,
    version: u64,
) -> Result<()> {
    delta.normalize();
    let plan = crate::model::plan_delta(&head.current_state, &delta, |mid| existing.contains(mid))?;
    if plan.replaces_state {
        sqlx::query("DELETE FROM patches WHERE thread_id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        rows.drop_patches();
        head.patch_count = 0;
        if let Some(snapshot) = &delta.snapshot {
            head.new_base_state = Some(snapshot.clone());
        }
    }
    add_delta_rows(head, existing, rows, delta, plan, version)
}

/// The part of [`apply_delta_rows`] after validation and the patch `DELETE`: collects the
/// delta's rows as `plan` says and moves `head` on (the new current state included).
pub(super) fn add_delta_rows(
    head: &mut Head,
    existing: &mut HashSet<String>,
    rows: &mut Rows,
    delta: ChangeSet,
    plan: crate::model::DeltaPlan,
    version: u64,
) -> Result<()> {
    for &n in &plan.new_messages {
        let m = &delta.messages[n];
        if let Some(mid) = &m.id {
            existing.insert(mid.clone());
        }
        rows.message(head.message_count, m)?;
        head.message_count += 1;
    }
    for p in &delta.patches {
        rows.patch(head.patch_count, p)?;
        head.patch_count += 1;
    }
    head.current_state = plan.new_current_state;
    if let Some(meta) = &delta.run_meta {
        rows.run(&delta, meta, version)?;
    }
    rows.history(version, &Change::Delta(delta))
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
