//! How values travel between Rust and PostgreSQL columns: JSON text, JSON-encoded client
//! strings, versions as `BIGINT`, driver errors as [`StoreError`], and the row types of the
//! queries (`#[derive(FromRow)]`, so a column is named once, not by tuple position).

use super::super::{Incarnation, Result, RunRecord, StoreError, ThreadSummary, Write, replay_of};
use crate::store::{Appended, IdempotencyKey};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The JSON-encoded form of a client string, for its own column (PostgreSQL text cannot
/// hold U+0000; the JSON escape can).
pub fn enc(s: &str) -> String {
    Value::from(s).to_string()
}

/// [`enc`] of an optional string.
pub fn enc_opt(s: Option<&str>) -> Option<String> {
    s.map(enc)
}

/// Inverse of [`enc`].
pub fn dec(s: &str) -> Result<String> {
    from_json(s)
}

/// Inverse of [`enc_opt`].
pub fn dec_opt(s: Option<String>) -> Result<Option<String>> {
    s.as_deref().map(dec).transpose()
}

/// A value as the JSON text a column keeps.
pub fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Internal(format!("encoding JSON: {e}")))
}

/// A column's JSON text as a value.
pub fn from_json<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Internal(format!("stored JSON does not decode: {e}")))
}

/// A stored counter or version (never negative) as the trait's `u64`.
pub fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A `u64` from the trait as a column value; values past `i64::MAX` cannot be stored.
pub fn i(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Internal(format!("{v} is out of range")))
}

/// An incarnation as its `BIGINT` column (the same 64 bits).
pub fn inc_col(v: Incarnation) -> i64 {
    v.0 as i64
}

/// Inverse of [`inc_col`].
pub fn inc(v: i64) -> Incarnation {
    Incarnation(v as u64)
}

/// Maps a driver error: unreachable database → `Unavailable` (a 503, retryable), missing
/// row → `NotFound`, anything else → `Internal`.
pub fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::RowNotFound => StoreError::NotFound,
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        // A connection closed before the server answered the TLS request: sqlx 0.8 reports
        // the missing byte as a protocol error ("unexpected response from SSLRequest: 0x00").
        E::Protocol(m) if m.contains("SSLRequest") => StoreError::Unavailable(e.to_string()),
        E::Database(d) => match d.code().as_deref() {
            // Class 08: connection exceptions; 57P01-03: admin/crash shutdown, cannot
            // connect now; 53300: too many connections; 57014: statement timeout or
            // cancellation (a database too slow to answer is, to the client, unavailable).
            Some(c)
                if c.starts_with("08")
                    || matches!(c, "57P01" | "57P02" | "57P03" | "53300" | "57014") =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Internal(e.to_string()),
        },
        _ => StoreError::Internal(e.to_string()),
    }
}

/// The thread row a snapshot is built from.
#[derive(sqlx::FromRow)]
pub struct ThreadRow {
    pub id: String,
    pub resource_id: Option<String>,
    pub parent_thread_id: Option<String>,
    pub version: i64,
    pub watermark: i64,
    pub incarnation: i64,
    pub state: String,
    pub metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A whole snapshot in one row: the thread row with its message and patch bodies in order.
#[derive(sqlx::FromRow)]
pub struct SnapshotRow {
    #[sqlx(flatten)]
    pub thread: ThreadRow,
    pub messages: Vec<String>,
    pub patches: Vec<String>,
}

/// The columns of a thread listing.
#[derive(sqlx::FromRow)]
pub struct SummaryRow {
    pub id: String,
    pub resource_id: Option<String>,
    pub parent_thread_id: Option<String>,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub message_count: i64,
    pub metadata: String,
}

impl SummaryRow {
    /// The listing entry.
    pub fn decode(self) -> Result<ThreadSummary> {
        Ok(ThreadSummary {
            id: self.id,
            resource_id: dec_opt(self.resource_id)?,
            parent_thread_id: dec_opt(self.parent_thread_id)?,
            version: u(self.version),
            created_at: self.created_at,
            updated_at: self.updated_at,
            message_count: u(self.message_count),
            metadata: from_json(&self.metadata)?,
        })
    }
}

/// A run row outer-joined to its thread: every column `NULL` when the thread exists but the
/// run does not.
#[derive(sqlx::FromRow)]
pub struct JoinedRunRow {
    pub run_id: Option<String>,
    pub parent_run_id: Option<String>,
    pub meta: Option<String>,
    pub version: Option<i64>,
    pub created_at: Option<i64>,
    pub updated_at: Option<i64>,
}

impl JoinedRunRow {
    /// The run's record, `None` for the all-`NULL` row of a thread without it.
    pub fn decode(self, thread_id: &str) -> Result<Option<RunRecord>> {
        let (Some(run_id), Some(meta), Some(version), Some(created_at), Some(updated_at)) = (
            self.run_id,
            self.meta,
            self.version,
            self.created_at,
            self.updated_at,
        ) else {
            return Ok(None);
        };
        Ok(Some(RunRecord {
            run_id: dec(&run_id)?,
            thread_id: thread_id.to_owned(),
            parent_run_id: dec_opt(self.parent_run_id)?,
            meta: from_json(&meta)?,
            version: u(version),
            created_at,
            updated_at,
        }))
    }
}

/// A history row outer-joined to its thread (the thread's version and oldest kept entry
/// come with every row; the history columns are `NULL` when nothing is after the cursor).
#[derive(sqlx::FromRow)]
pub struct JoinedHistoryRow {
    pub thread_version: i64,
    pub first_kept: Option<i64>,
    pub version: Option<i64>,
    pub at: Option<i64>,
    pub change: Option<String>,
}

impl JoinedHistoryRow {
    /// The write this row holds, if any.
    pub fn decode(self) -> Result<Option<Write>> {
        let (Some(version), Some(at), Some(change)) = (self.version, self.at, self.change) else {
            return Ok(None);
        };
        Ok(Some(Write {
            version: u(version),
            at,
            change: from_json(&change)?,
            idempotency: None,
        }))
    }
}

/// A message page row outer-joined to its thread.
#[derive(sqlx::FromRow)]
pub struct JoinedMessageRow {
    pub version: i64,
    pub cursor: Option<i64>,
    pub body: Option<String>,
}

/// A remembered idempotency key.
#[derive(sqlx::FromRow)]
pub struct KeyRow {
    pub fingerprint: String,
    pub version: i64,
}

impl KeyRow {
    /// The answer for a request with `key`: a replay, or a reuse error.
    pub fn answer(&self, key: &IdempotencyKey) -> Result<Appended> {
        replay_of(&self.fingerprint, key, u(self.version))
    }
}
