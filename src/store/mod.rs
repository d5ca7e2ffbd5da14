//! The snapshot store: one trait, three backends (memory, file, PostgreSQL).
//!
//! Every backend keeps, atomically with each thread, its **version** (0 at create, +1 per
//! accepted write) and its **watermark** (the highest log version folded in), so a
//! compare-and-set on either is a single atomic step and a fold can be replayed safely. Each
//! write is also kept in a bounded per-thread history so the live stream can replay from the
//! store. The backend is chosen once at start-up ([`open`]) and used as `Arc<dyn Store>`.

pub mod changes;
mod file;
mod memory;
mod postgres;
pub mod record;

pub use file::{FileStore, SET_ASIDE_DIR};
pub use memory::MemoryStore;
pub use postgres::{LISTENER_HEARTBEAT, PgOptions, PostgresStore};

use crate::id::ThreadId;
use crate::model::{ChangeSet, DeltaError, Extra, Message, RunMeta, Thread};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use utoipa::ToSchema;

/// How many past writes each thread keeps for replay; older ones answer `reset` on the live
/// stream. Big enough for a long run's tail, small enough that a file-store thread stays small.
pub const HISTORY_LIMIT: usize = 1_000;

/// How many idempotency keys each thread remembers; a client retries within seconds, so the
/// most recent keys are the ones that matter.
pub const IDEMPOTENCY_KEYS_KEPT: usize = 1_000;

/// Metadata keys the gateway maintains itself; clients cannot set them.
pub const SERVER_METADATA_KEYS: [&str; 4] =
    ["created_at", "updated_at", "version", "version_timestamp"];

/// Results of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such thread.
    #[error("thread not found")]
    NotFound,
    /// The thread has no such run.
    #[error("run not found")]
    RunNotFound,
    /// A thread with this id exists.
    #[error("thread already exists")]
    AlreadyExists,
    /// The version is not the expected one.
    #[error("version conflict: expected {expected}, actual {actual}")]
    VersionConflict {
        /// The version the write expected.
        expected: u64,
        /// The thread's version.
        actual: u64,
    },
    /// The delta does not apply.
    #[error("{0}")]
    InvalidDelta(#[from] DeltaError),
    /// A full thread whose patches do not rebuild on its state.
    #[error("{field}: {message}")]
    InvalidThread {
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The idempotency key came with another request body before.
    #[error("idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    /// The backend cannot be reached; the request can be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a bug or corrupt data); details for the log only.
    #[error("store failure: {0}")]
    Internal(String),
}

/// A write's precondition on the thread's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever the version is.
    Any,
    /// Only if the version is this one (a compare-and-set).
    Exact(u64),
}

impl Expect {
    /// `Err(VersionConflict)` unless `actual` satisfies the precondition.
    pub fn check(self, actual: u64) -> Result<()> {
        match self {
            Expect::Exact(expected) if expected != actual => {
                Err(StoreError::VersionConflict { expected, actual })
            }
            _ => Ok(()),
        }
    }
}

/// Tells apart the lives of a thread id: a thread deleted and created again starts at version
/// 0 once more, so a version alone cannot say which life it belongs to. Chosen at random at
/// create; shown to clients as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Incarnation(pub u64);

impl Incarnation {
    /// A fresh random incarnation (never 0, which marks records written before incarnations
    /// existed).
    pub fn new() -> Self {
        // The low 64 bits of a UUIDv7 are (62 bits of) randomness.
        let (_, random) = uuid::Uuid::now_v7().as_u64_pair();
        Incarnation(random.max(1))
    }

    /// Parses the 16-hex-digit form.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 16)
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .map(Incarnation)
    }
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for Incarnation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Incarnation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Incarnation::parse(&s).ok_or_else(|| serde::de::Error::custom("not 16 hex digits"))
    }
}

/// A thread as stored, with the position it reflects.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `metadata` holds only the client's custom keys; see [`Snapshot::to_wire`].
    pub thread: Thread,
    /// The version this snapshot reflects.
    pub version: u64,
    /// The highest log version folded in (equal to `version` for a store snapshot).
    pub watermark: u64,
    /// Which life of the thread id this is.
    pub incarnation: Incarnation,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last write.
    pub updated_at: i64,
}

/// A thread's current state (base state with every patch applied) and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct StateAt {
    /// The current state.
    pub state: Value,
    /// The version it reflects.
    pub version: u64,
    /// Which life of the thread id this is.
    pub incarnation: Incarnation,
}

impl Snapshot {
    /// The tirea `Thread` with the server-maintained metadata keys filled in.
    pub fn to_wire(&self) -> Thread {
        let mut t = self.thread.clone();
        let m = &mut t.metadata;
        m.insert("created_at".into(), self.created_at.into());
        m.insert("updated_at".into(), self.updated_at.into());
        m.insert("version".into(), self.version.into());
        m.insert("version_timestamp".into(), self.updated_at.into());
        t
    }
}

/// Whose a thread is, as the store has it (see [`Store::owner`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The thread's `resource_id`.
    pub resource_id: Option<String>,
    /// The version the store holds.
    pub version: u64,
    /// Which life of the id that version belongs to (versions restart at a re-create).
    pub incarnation: Incarnation,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The version the delta produced (for a replay, the version it produced the first time).
    pub version: u64,
    /// True when an earlier request with the same idempotency key already appended it.
    pub replayed: bool,
}

/// A client's idempotency key plus a fingerprint of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyKey {
    /// The client's key.
    pub key: String,
    /// Hex SHA-256 of the request body: the same key with another body is rejected.
    pub fingerprint: String,
}

/// One accepted write at its version: the single representation of a write wherever it
/// travels (a store's history, a log entry being folded, a live event, a replay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Write {
    /// The version the write produced.
    pub version: u64,
    /// Unix milliseconds when it was accepted (0 when unknown).
    #[serde(default)]
    pub at: i64,
    /// What it did.
    pub change: Change,
    /// The idempotency key it came with (remembered when a fold applies it; not kept in
    /// history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencyKey>,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Change {
    /// A delta was appended.
    Delta(ChangeSet),
    /// A full replace; the body is the thread as saved (custom metadata only).
    Replace(Thread),
    /// A metadata merge patch.
    Metadata(Extra),
}

/// The writes after a version, as far as they are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// The kept writes after the requested version, oldest first.
    pub entries: Vec<Write>,
    /// The oldest version still kept (`None` when nothing is kept). Replay after `V` is
    /// complete only when `V + 1 >= first_kept` or there is nothing after `V`.
    pub first_kept: Option<u64>,
    /// The thread's current version.
    pub version: u64,
}

/// What a thread listing is sorted by. Ties (equal timestamps) are broken by id, so every
/// order is total and a keyset cursor never skips or repeats a thread whose key is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListOrderBy {
    /// The thread id (byte-wise). Stable: ids never change.
    #[default]
    Id,
    /// Creation time, then id. Stable: a thread's creation time never changes.
    CreatedAt,
    /// Time of the last write the store holds, then id. A thread written to while a client
    /// pages moves to its new position: it may then be seen again (ascending) or not at all
    /// (descending) in that pass; every other thread is seen exactly once.
    UpdatedAt,
}

impl ListOrderBy {
    /// The wire name (`id`, `created_at`, `updated_at`).
    pub fn as_str(self) -> &'static str {
        match self {
            ListOrderBy::Id => "id",
            ListOrderBy::CreatedAt => "created_at",
            ListOrderBy::UpdatedAt => "updated_at",
        }
    }

    /// A thread's sort key besides its id (0 for id order, which has none).
    pub fn key(self, created_at: i64, updated_at: i64) -> i64 {
        match self {
            ListOrderBy::Id => 0,
            ListOrderBy::CreatedAt => created_at,
            ListOrderBy::UpdatedAt => updated_at,
        }
    }
}

/// A position in a listing: the sort key and id of the last thread already returned (the
/// key is 0 for id order). The next page starts strictly after it in the listing's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    /// The sort key's value (`created_at`/`updated_at` in unix ms; 0 when ordering by id).
    pub key: i64,
    /// The thread id (the tie-breaker).
    pub id: ThreadId,
}

/// Which threads a listing returns, in which order, from where.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListQuery {
    /// Only threads of this owner.
    pub resource_id: Option<String>,
    /// Only sub-threads of this thread.
    pub parent_thread_id: Option<String>,
    /// What the page is sorted by.
    pub order_by: ListOrderBy,
    /// Ascending or descending.
    pub order: Order,
    /// Keyset paging: only threads strictly after this position in the listing's order.
    pub after: Option<ListCursor>,
    /// At most this many threads.
    pub limit: usize,
}

impl ListQuery {
    /// Whether a thread passes the resource and parent filters.
    pub fn admits(&self, resource_id: Option<&str>, parent_thread_id: Option<&str>) -> bool {
        self.resource_id
            .as_deref()
            .is_none_or(|r| resource_id == Some(r))
            && self
                .parent_thread_id
                .as_deref()
                .is_none_or(|p| parent_thread_id == Some(p))
    }

    /// The cursor that continues after `t` in this listing.
    pub fn cursor_after(&self, t: &ThreadSummary) -> Option<ListCursor> {
        Some(ListCursor {
            key: self.order_by.key(t.created_at, t.updated_at),
            id: ThreadId::parse(&t.id).ok()?,
        })
    }
}

/// A thread as a listing shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ThreadSummary {
    /// The thread's id.
    pub id: String,
    /// Its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Its parent thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_thread_id: Option<String>,
    /// Its version.
    pub version: u64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last write the store holds.
    pub updated_at: i64,
    /// How many messages it has.
    pub message_count: u64,
    /// Its custom metadata.
    #[schema(value_type = Object)]
    pub metadata: Extra,
}

/// A page of the thread list.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    /// The threads, in the order asked for.
    pub threads: Vec<ThreadSummary>,
    /// More threads follow.
    pub has_more: bool,
}

/// A sort direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Smallest first.
    #[default]
    Asc,
    /// Largest first.
    Desc,
}

/// Which messages a read returns, by visibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VisibilityFilter {
    /// Only messages visible to everyone (the default).
    #[default]
    All,
    /// Only internal messages.
    Internal,
    /// Both.
    Any,
}

impl VisibilityFilter {
    /// Whether a message passes this filter.
    pub fn admits(self, m: &Message) -> bool {
        use crate::model::Visibility;
        match self {
            VisibilityFilter::All => m.visibility == Visibility::All,
            VisibilityFilter::Internal => m.visibility == Visibility::Internal,
            VisibilityFilter::Any => true,
        }
    }
}

/// Which messages a page returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageQuery {
    /// Exclusive lower cursor bound.
    pub after: Option<u64>,
    /// Exclusive upper cursor bound.
    pub before: Option<u64>,
    /// At most this many messages.
    pub limit: usize,
    /// By cursor, ascending or descending.
    pub order: Order,
    /// Which visibilities pass.
    pub visibility: VisibilityFilter,
    /// Only messages of this run.
    pub run_id: Option<String>,
}

impl MessageQuery {
    /// Whether a message at `cursor` passes every filter (bounds included).
    pub fn admits(&self, cursor: u64, m: &Message) -> bool {
        self.after.is_none_or(|a| cursor > a)
            && self.before.is_none_or(|b| cursor < b)
            && self.visibility.admits(m)
            && self.run_id.as_deref().is_none_or(|r| m.run_id() == Some(r))
    }
}

/// A page of messages.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagePage {
    /// `(cursor, message)` in the requested order.
    pub messages: Vec<(u64, Message)>,
    /// More messages follow in this order.
    pub has_more: bool,
    /// The thread version the page reflects.
    pub version: u64,
}

/// A run's record, created or updated by each delta that carries `run_meta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunRecord {
    /// The run's id.
    pub run_id: String,
    /// The thread it wrote to.
    pub thread_id: String,
    /// The run that started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// Its metadata as its last delta reported it.
    pub meta: RunMeta,
    /// The thread version of the last delta that updated this record.
    pub version: u64,
    /// Unix milliseconds of its first delta.
    pub created_at: i64,
    /// Unix milliseconds of its last delta.
    pub updated_at: i64,
}

/// The snapshot store (see the module docs); every backend passes the same conformance suite.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a thread at version 0. `thread.metadata` holds custom keys only.
    async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot>;
    /// The thread with the version it reflects.
    async fn get(&self, id: &ThreadId) -> Result<Snapshot>;
    /// The current version alone: cheap, for `If-None-Match` revalidation.
    async fn version(&self, id: &ThreadId) -> Result<u64>;
    /// Which life of the thread id is current.
    async fn incarnation(&self, id: &ThreadId) -> Result<Incarnation>;
    /// The thread's `resource_id` (its owner, for tenant scoping) and version: cheap, one key
    /// lookup.
    async fn owner(&self, id: &ThreadId) -> Result<Owner>;
    /// A page of the thread list.
    async fn list(&self, q: &ListQuery) -> Result<ListPage>;
    /// Full replace (messages keep their cursors by position). Returns the new version.
    async fn replace(&self, id: &ThreadId, thread: Thread, expect: Expect) -> Result<u64>;
    /// JSON merge patch of the custom metadata keys (`null` removes a key).
    async fn patch_metadata(&self, id: &ThreadId, patch: Extra, expect: Expect) -> Result<u64>;
    /// Deletes the thread with everything it has (messages, runs, history, keys).
    async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()>;
    /// Applies one delta as the next version.
    async fn append(
        &self,
        id: &ThreadId,
        delta: &ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Appended>;
    /// The write an idempotency key was remembered with: `Appended { replayed: true }` with
    /// its version, `IdempotencyKeyReused` for another fingerprint, `None` if unknown.
    async fn idempotent(&self, id: &ThreadId, key: &IdempotencyKey) -> Result<Option<Appended>>;
    /// Folds log entries in order, all in one atomic step. Entries at or below the watermark
    /// are skipped (so folding the same entries again is a no-op); the rest must continue it
    /// without a gap (`v == watermark + 1`, then `+ 1` each), else `StoreError::Internal`.
    ///
    /// Each entry applies exactly like the direct write it stands for:
    /// * `Change::Delta` like [`Store::append`] (validated, message ids de-duplicated, runs
    ///   updated);
    /// * `Change::Replace(thread)` like [`Store::replace`]: validated by [`prepare_thread`],
    ///   the whole thread is replaced and messages keep cursor = position;
    /// * `Change::Metadata(patch)` merges like [`Store::patch_metadata`].
    ///
    /// Each entry is recorded in the history at its own version (with the change as stored,
    /// e.g. server metadata keys dropped). An entry's idempotency key is remembered at its
    /// version, so a later `append` with the same key answers `replayed` with that version,
    /// and one with another fingerprint `IdempotencyKeyReused`. A fold never rejects or skips
    /// an entry because of its key: the log is authoritative, and if a key is already
    /// remembered (at an older version) the folded entry's version replaces it.
    ///
    /// Version and watermark become the last version applied; returns the watermark after the
    /// call. A missing thread is `NotFound` (a deleted thread never comes back), and an entry
    /// that fails validation fails the whole batch with nothing changed.
    async fn apply_batch(&self, id: &ThreadId, entries: Vec<Write>) -> Result<u64>;
    /// A page of the thread's messages with the version it reflects.
    async fn messages(&self, id: &ThreadId, q: &MessageQuery) -> Result<MessagePage>;
    /// The current state (base state with every patch applied), its version and incarnation.
    async fn state(&self, id: &ThreadId) -> Result<StateAt>;
    /// Writes with versions greater than `after`, oldest first, at most `limit`.
    async fn history(&self, id: &ThreadId, after: u64, limit: usize) -> Result<History>;
    /// The thread's run records, oldest first.
    async fn runs(&self, id: &ThreadId) -> Result<Vec<RunRecord>>;
    /// One run record (`RunNotFound` when the thread has no such run).
    async fn run(&self, id: &ThreadId, run_id: &str) -> Result<RunRecord>;
    /// Succeeds when the backend can serve requests (for `/readyz`).
    async fn ping(&self) -> Result<()>;
    /// Releases the backend's connections at shutdown; later calls answer `Unavailable`.
    async fn close(&self) {}
    /// Announcements of the writes every process sharing this store commits, for the live
    /// hub in direct mode; `None` for a store only this process writes (memory, file), whose
    /// writes the write path publishes into the hub itself.
    fn changes(&self) -> Option<Arc<changes::Changes>> {
        None
    }
}

/// The store chosen at start-up.
pub type DynStore = Arc<dyn Store>;

/// Opens the backend named by a `--store` value: `memory:`, `file:<dir>` or a
/// `postgres://` URL.
pub async fn open(spec: &str, pg: &PgOptions) -> anyhow::Result<DynStore> {
    if spec == "memory:" || spec == "memory" {
        Ok(Arc::new(MemoryStore::new()))
    } else if let Some(dir) = spec.strip_prefix("file:") {
        Ok(Arc::new(FileStore::open(dir).await?))
    } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect_opts(spec, pg).await?))
    } else {
        anyhow::bail!("unknown store {spec:?}: use `memory:`, `file:<dir>` or a `postgres://` URL")
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Drops the server-maintained keys from client-supplied metadata: a thread read with GET
/// can be sent back with PUT unchanged, and the server's values win.
pub fn strip_server_metadata(meta: &mut Extra) {
    for k in SERVER_METADATA_KEYS {
        meta.remove(k);
    }
}

/// Applies a JSON merge patch of custom metadata keys (`null` removes a key). The patch
/// must already have had its server keys stripped.
pub(crate) fn merge_metadata(metadata: &mut Extra, patch: &Extra) {
    for (k, v) in patch {
        if v.is_null() {
            metadata.remove(k);
        } else {
            metadata.insert(k.clone(), v.clone());
        }
    }
}

/// Validates a full thread for create or replace and returns its current state: server
/// metadata keys are dropped, message ids must be unique, and the patches must rebuild on
/// the state. Every backend calls this, so all of them accept and reject the same threads.
pub fn prepare_thread(id: &ThreadId, thread: &mut Thread) -> Result<Value> {
    thread.id = id.as_str().to_owned();
    thread.normalize();
    strip_server_metadata(&mut thread.metadata);
    let depth = crate::model::limits::depth(&thread.state);
    if depth > crate::model::limits::MAX_STATE_DEPTH {
        return Err(StoreError::InvalidThread {
            field: "state".into(),
            message: format!(
                "nests {depth} levels deep; the limit is {}",
                crate::model::limits::MAX_STATE_DEPTH
            ),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for (i, m) in thread.messages.iter().enumerate() {
        if let Some(mid) = &m.id
            && !seen.insert(mid.as_str())
        {
            return Err(StoreError::InvalidThread {
                field: format!("messages[{i}].id"),
                message: format!("duplicate message id {mid:?}"),
            });
        }
    }
    crate::model::rebuild_state(&thread.state, &thread.patches).map_err(|(p, o, e)| {
        StoreError::InvalidThread {
            field: format!("patches[{p}].patch.ops[{o}]"),
            message: e.to_string(),
        }
    })
}

/// The answer for a remembered key: a replay of `version`, or a reuse error.
pub(crate) fn replay_of(fingerprint: &str, key: &IdempotencyKey, version: u64) -> Result<Appended> {
    if fingerprint != key.fingerprint {
        return Err(StoreError::IdempotencyKeyReused);
    }
    Ok(Appended {
        version,
        replayed: true,
    })
}

/// A folded log entry checked and ready to apply.
pub(crate) enum Prepared<'a> {
    Delta(&'a ChangeSet),
    /// The prepared thread and its current state.
    Replace(Thread, Value),
    /// The patch with server keys dropped.
    Metadata(Extra),
}

/// The entries of a batch above `watermark`, each checked before anything is written: the
/// versions must continue the watermark without a gap and full threads must validate. Every
/// backend calls this, so all of them reject the same batches with the same error.
pub(crate) fn prepare_batch<'a>(
    id: &ThreadId,
    entries: &'a [Write],
    watermark: u64,
) -> Result<Vec<(&'a Write, Prepared<'a>)>> {
    let pending = entries.iter().filter(|e| e.version > watermark);
    let mut out = Vec::new();
    for (n, entry) in pending.enumerate() {
        let want = watermark + 1 + n as u64;
        if entry.version != want {
            return Err(StoreError::Internal(format!(
                "gap in folded log: expected version {want}, got {}",
                entry.version
            )));
        }
        let prepared = match &entry.change {
            Change::Delta(delta) => Prepared::Delta(delta),
            Change::Replace(thread) => {
                let mut thread = thread.clone();
                let state = prepare_thread(id, &mut thread)?;
                Prepared::Replace(thread, state)
            }
            Change::Metadata(patch) => {
                let mut patch = patch.clone();
                strip_server_metadata(&mut patch);
                Prepared::Metadata(patch)
            }
        };
        out.push((entry, prepared));
    }
    Ok(out)
}
