//! The write path, chosen once at start-up, and the one component the HTTP layer talks to.
//!
//! Two implementations of [`WritePath`] own everything that differs between the modes:
//!
//! * [`direct::DirectWrites`] (no NATS): every write goes straight to the snapshot store and is
//!   then handed to the live hub of this process.
//! * [`crate::buffer::Buffered`] (`--nats-url`): every write is published to the thread's
//!   JetStream log and folded into the store later (run end, flush, idle, start-up,
//!   shutdown); the live hub reads the log itself, so any replica's writes reach every
//!   replica's streams.
//!
//! [`Threads`] wraps the chosen path with the store for reads: a read names the [`View`] it
//! wants (the store's snapshot, or the live view with accepted-but-unfolded writes applied)
//! and never which mode is on. Errors are [`Error`]; their HTTP form lives in `src/http/`.

pub mod direct;

use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::record::Record;
use crate::store::{
    Appended, DynStore, Expect, IdempotencyKey, Incarnation, ListPage, ListQuery, MessagePage,
    MessageQuery, RunRecord, Snapshot, StateAt, StoreError,
};
use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// Why a write or a read of the backends failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot store said no (or is unreachable).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The message log (NATS) cannot be reached, or did not answer in time.
    #[error("message log unavailable: {0}")]
    LogUnavailable(String),
    /// An entry larger than the message log accepts.
    #[error("entry of {size} bytes exceeds the message log's limit of {limit} bytes")]
    TooLarge {
        /// The entry's size in bytes.
        size: usize,
        /// The log's limit in bytes.
        limit: usize,
    },
    /// A log entry that cannot be decoded or applied stops the thread's fold.
    #[error("fold blocked: {0}")]
    FoldBlocked(String),
    /// A retried `Idempotency-Key` whose original write was accepted but can no longer be
    /// identified (its log entry was trimmed and the store has forgotten the key).
    #[error("the write with this Idempotency-Key was accepted earlier and is no longer known")]
    IdempotencyKeyExpired,
}

/// Results of the write path and the live hub.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which position a read reflects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// The snapshot store (the folded state).
    #[default]
    Store,
    /// The store plus the buffered tail: read-your-writes.
    Live,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The version it produced, and whether it was a replay of an earlier request.
    pub appended: Appended,
    /// For a `RunFinished` in buffered mode: whether the fold completed before answering.
    pub flushed: Option<bool>,
}

/// What a fold did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FoldReport {
    /// The store's watermark after the fold.
    pub version: u64,
    /// Entries applied by this fold (others may have been applied by a concurrent fold).
    pub applied: u64,
}

/// One way of accepting writes (see the module docs). Every method validates exactly like the
/// store would, so both modes accept and refuse the same requests.
#[async_trait]
pub trait WritePath: Send + Sync + 'static {
    /// Creates a thread at version 0 (`thread.metadata` with custom keys only).
    async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot>;
    /// Appends a delta as the next version.
    async fn append(
        &self,
        id: &ThreadId,
        delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome>;
    /// Replaces the whole thread; returns the new version.
    async fn replace(&self, id: &ThreadId, thread: Thread, expect: Expect) -> Result<u64>;
    /// Merges custom metadata keys (server keys already stripped); returns the new version.
    async fn patch_metadata(&self, id: &ThreadId, patch: Extra, expect: Expect) -> Result<u64>;
    /// Deletes the thread; nothing written before can bring it back.
    async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()>;
    /// Brings the store up to every accepted write of the thread.
    async fn flush(&self, id: &ThreadId) -> Result<FoldReport>;
    /// The thread with accepted writes the store does not have yet applied, or `None` when
    /// the store always has every accepted write.
    async fn live(&self, id: &ThreadId) -> Result<Option<Record>>;
    /// The version the live view has reached, or `None` as for [`WritePath::live`].
    async fn live_version(&self, id: &ThreadId) -> Result<Option<u64>>;
    /// Whether every backend of this path answers (for `/readyz`).
    async fn ready(&self) -> Result<()>;
    /// Leaves as little as possible for the next start-up (buffered mode folds); the caller
    /// bounds how long it may take.
    async fn shutdown(&self) {}
    /// The path's name for clients (`direct` or `buffered`).
    fn mode(&self) -> &'static str;
    /// The store's version when it may lag behind accepted writes (`None` when it never
    /// does).
    async fn stored_behind(&self, id: &ThreadId) -> Option<u64>;
}

/// The thread operations the HTTP layer calls: writes through the chosen [`WritePath`],
/// reads from the store or the live view.
pub struct Threads {
    store: DynStore,
    writes: Arc<dyn WritePath>,
    appends: Counter,
}

impl Threads {
    /// Wraps the write path chosen at start-up.
    pub fn new(store: DynStore, writes: Arc<dyn WritePath>) -> Self {
        Threads {
            store,
            writes,
            appends: Counter::default(),
        }
    }

    /// Registers the append counter.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "threadgate_appends",
            "Accepted delta appends",
            self.appends.clone(),
        );
    }

    /// The write path (for shutdown).
    pub fn writes(&self) -> &Arc<dyn WritePath> {
        &self.writes
    }

    /// See [`WritePath::create`].
    pub async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot> {
        self.writes.create(id, thread).await
    }

    /// See [`WritePath::append`].
    pub async fn append(
        &self,
        id: &ThreadId,
        delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        let out = self.writes.append(id, delta, expect, idempotency).await?;
        if !out.appended.replayed {
            self.appends.inc();
        }
        Ok(out)
    }

    /// See [`WritePath::replace`].
    pub async fn replace(&self, id: &ThreadId, thread: Thread, expect: Expect) -> Result<u64> {
        self.writes.replace(id, thread, expect).await
    }

    /// See [`WritePath::patch_metadata`]; server-maintained keys are dropped first.
    pub async fn patch_metadata(
        &self,
        id: &ThreadId,
        mut patch: Extra,
        expect: Expect,
    ) -> Result<u64> {
        crate::store::strip_server_metadata(&mut patch);
        self.writes.patch_metadata(id, patch, expect).await
    }

    /// See [`WritePath::delete`].
    pub async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()> {
        self.writes.delete(id, expect).await
    }

    /// See [`WritePath::flush`].
    pub async fn flush(&self, id: &ThreadId) -> Result<FoldReport> {
        self.writes.flush(id).await
    }

    /// The thread as the view sees it.
    pub async fn get(&self, id: &ThreadId, view: View) -> Result<Snapshot> {
        if view == View::Live
            && let Some(record) = self.writes.live(id).await?
        {
            return Ok(record.snapshot());
        }
        Ok(self.store.get(id).await?)
    }

    /// The version the view has reached (cheap: for `If-None-Match`).
    pub async fn version(&self, id: &ThreadId, view: View) -> Result<u64> {
        if view == View::Live
            && let Some(v) = self.writes.live_version(id).await?
        {
            return Ok(v);
        }
        Ok(self.store.version(id).await?)
    }

    /// A page of messages as the view sees them.
    pub async fn messages(
        &self,
        id: &ThreadId,
        q: &MessageQuery,
        view: View,
    ) -> Result<MessagePage> {
        if view == View::Live
            && let Some(record) = self.writes.live(id).await?
        {
            return Ok(record.messages(q));
        }
        Ok(self.store.messages(id, q).await?)
    }

    /// The current state as the view sees it.
    pub async fn state(&self, id: &ThreadId, view: View) -> Result<StateAt> {
        if view == View::Live
            && let Some(record) = self.writes.live(id).await?
        {
            return Ok(record.state());
        }
        Ok(self.store.state(id).await?)
    }

    /// Which life of the thread id is current.
    pub async fn incarnation(&self, id: &ThreadId) -> Result<Incarnation> {
        Ok(self.store.incarnation(id).await?)
    }

    /// A page of the thread list (always from the store).
    pub async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        Ok(self.store.list(q).await?)
    }

    /// The thread's run records as the view sees them.
    pub async fn runs(&self, id: &ThreadId, view: View) -> Result<Vec<RunRecord>> {
        let stored = self.store.runs(id).await?;
        if view == View::Live
            && let Some(record) = self.writes.live(id).await?
        {
            return Ok(merge_runs(stored, record.runs));
        }
        Ok(stored)
    }

    /// One run record.
    pub async fn run(&self, id: &ThreadId, run_id: &str) -> Result<RunRecord> {
        Ok(self.store.run(id, run_id).await?)
    }

    /// See [`WritePath::mode`].
    pub fn mode(&self) -> &'static str {
        self.writes.mode()
    }

    /// See [`WritePath::stored_behind`].
    pub async fn stored_behind(&self, id: &ThreadId) -> Option<u64> {
        self.writes.stored_behind(id).await
    }

    /// Store and (in buffered mode) NATS reachability, for `/readyz`.
    pub async fn ready(&self) -> Result<()> {
        self.store.ping().await?;
        self.writes.ready().await
    }
}

/// The store's run records updated by those of the buffered tail (a live record knows only
/// the runs its tail touched): per run, the newer version wins, keeping the stored
/// `created_at` and a stored `parent_run_id` the tail did not repeat. A run first seen in the
/// tail has the read's time as `created_at`.
fn merge_runs(stored: Vec<RunRecord>, tail: Vec<RunRecord>) -> Vec<RunRecord> {
    let mut runs = stored;
    for t in tail {
        match runs.iter_mut().find(|r| r.run_id == t.run_id) {
            Some(r) if t.version > r.version => {
                let (created_at, parent) = (r.created_at, r.parent_run_id.take());
                *r = t;
                r.created_at = created_at;
                r.parent_run_id = r.parent_run_id.take().or(parent);
            }
            Some(_) => {}
            None => runs.push(t),
        }
    }
    runs.sort_by(|a, b| (a.created_at, &a.run_id).cmp(&(b.created_at, &b.run_id)));
    runs
}
