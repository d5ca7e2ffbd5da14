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
//!
//! **Tenancy** is enforced here, for the caller's [`Scope`] (see [`crate::auth`]): every
//! operation on a thread first checks that its `resource_id` is the caller's, and a thread
//! that is not answers `NotFound`, exactly like a missing one and after the same backend work
//! (one key lookup of the thread's owner in the store: [`Store::owner`]; nothing for an
//! admin). Writes check inside the write path, where the check can be exact: in direct mode
//! just before the store write, in buffered mode on the head that the compare-and-set publish
//! proves current (so a concurrent move to another resource can never let a write through).
//! Reads of a live view or a snapshot check the `resource_id` of what they return as well.
//! The store's owner is current in buffered mode too, because a write that moves a thread to
//! another resource is folded before it is answered (see [`crate::buffer`]). Lists are
//! filtered to the caller's resource.

pub mod direct;

use crate::auth::{ForeignResource, Scope};
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::record::Record;
use crate::store::{
    Appended, DynStore, Expect, IdempotencyKey, Incarnation, ListPage, ListQuery, MessagePage,
    MessageQuery, Owner, RunRecord, Snapshot, StateAt, Store, StoreError,
};
use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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
    /// A scoped caller named another resource_id in a thread it creates or saves.
    #[error(transparent)]
    Forbidden(#[from] ForeignResource),
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
/// store would, so both modes accept and refuse the same requests. Writes to an existing
/// thread take the caller's scope and answer `NotFound` for a thread that is not the scope's,
/// checked before anything else about the write (version, idempotency key).
#[async_trait]
pub trait WritePath: Send + Sync + 'static {
    /// Creates a thread at version 0 (`thread.metadata` with custom keys only).
    async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot>;
    /// Appends a delta as the next version.
    async fn append(
        &self,
        scope: &Scope,
        id: &ThreadId,
        delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome>;
    /// Replaces the whole thread; returns the new version.
    async fn replace(
        &self,
        scope: &Scope,
        id: &ThreadId,
        thread: Thread,
        expect: Expect,
    ) -> Result<u64>;
    /// Merges custom metadata keys (server keys already stripped); returns the new version.
    async fn patch_metadata(
        &self,
        scope: &Scope,
        id: &ThreadId,
        patch: Extra,
        expect: Expect,
    ) -> Result<u64>;
    /// Deletes the thread; nothing written before can bring it back.
    async fn delete(&self, scope: &Scope, id: &ThreadId, expect: Expect) -> Result<()>;
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

/// `NotFound` unless the thread's owner as the store has it is the scope's; no backend work
/// for an admin (`None`). A thread that is not the caller's and one that does not exist cost
/// the same: one key lookup, whose answer (with the stored version) is returned.
pub async fn guard(store: &dyn Store, scope: &Scope, id: &ThreadId) -> Result<Option<Owner>> {
    let Some(own) = scope.resource() else {
        return Ok(None);
    };
    let owner = store.owner(id).await?;
    if owner.resource_id.as_deref() != Some(own) {
        return Err(StoreError::NotFound.into());
    }
    Ok(Some(owner))
}

/// `NotFound` unless a thread read is the scope's (a move still buffered shows up here).
fn admitted(scope: &Scope, thread: &Thread) -> Result<()> {
    if scope.admits(thread.resource_id.as_deref()) {
        Ok(())
    } else {
        Err(StoreError::NotFound.into())
    }
}

/// Where a view of a thread stands (see [`Threads::stamp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The version the view reflects.
    pub version: u64,
    /// The incarnation, when the view is the store's snapshot at `version`.
    pub stored: Option<Incarnation>,
}

/// The thread operations the HTTP layer calls: writes through the chosen [`WritePath`],
/// reads from the store or the live view, each for a caller's [`Scope`].
pub struct Threads {
    store: DynStore,
    writes: Arc<dyn WritePath>,
    appends: Counter,
    append_seconds: Histogram,
}

impl Threads {
    /// Wraps the write path chosen at start-up.
    pub fn new(store: DynStore, writes: Arc<dyn WritePath>) -> Self {
        Threads {
            store,
            writes,
            appends: Counter::default(),
            // 0.25 ms to about 8 s.
            append_seconds: Histogram::new(exponential_buckets(0.00025, 2.0, 16)),
        }
    }

    /// Registers the append counter and latency.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "threadgate_appends",
            "Accepted delta appends",
            self.appends.clone(),
        );
        registry.register(
            "threadgate_append_duration_seconds",
            "Time to accept a delta append (direct: stored; buffered: stored by JetStream, \
             plus the bounded wait for the fold of a RunFinished)",
            self.append_seconds.clone(),
        );
    }

    /// `NotFound` unless the thread is the scope's (see [`guard`]); also for the operations
    /// that the HTTP layer runs elsewhere (history, the event stream).
    pub async fn guard(&self, scope: &Scope, id: &ThreadId) -> Result<()> {
        guard(&*self.store, scope, id).await.map(|_| ())
    }

    /// [`Threads::guard`], also naming the thread's current incarnation: the owner lookup a
    /// scoped caller's guard makes anyway, and one more for an admin (best effort: `None`
    /// when the store cannot say, e.g. a buffered thread whose store is away).
    pub async fn guard_incarnation(
        &self,
        scope: &Scope,
        id: &ThreadId,
    ) -> Result<Option<crate::store::Incarnation>> {
        Ok(match guard(&*self.store, scope, id).await? {
            Some(owner) => Some(owner.incarnation),
            None => self.store.owner(id).await.ok().map(|o| o.incarnation),
        })
    }

    /// The write path (for shutdown).
    pub fn writes(&self) -> &Arc<dyn WritePath> {
        &self.writes
    }

    /// See [`WritePath::create`]. A scoped caller's thread gets its resource_id (`Forbidden`
    /// when the body names another).
    pub async fn create(
        &self,
        scope: &Scope,
        id: &ThreadId,
        mut thread: Thread,
    ) -> Result<Snapshot> {
        scope.claim(&mut thread.resource_id)?;
        self.writes.create(id, thread).await
    }

    /// See [`WritePath::append`].
    pub async fn append(
        &self,
        scope: &Scope,
        id: &ThreadId,
        delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        let started = std::time::Instant::now();
        let out = self
            .writes
            .append(scope, id, delta, expect, idempotency)
            .await?;
        if !out.appended.replayed {
            self.appends.inc();
            self.append_seconds.observe(started.elapsed().as_secs_f64());
        }
        Ok(out)
    }

    /// See [`WritePath::replace`]. A scoped caller may not move the thread to another
    /// resource_id (`Forbidden`); one left out is its own.
    pub async fn replace(
        &self,
        scope: &Scope,
        id: &ThreadId,
        mut thread: Thread,
        expect: Expect,
    ) -> Result<u64> {
        scope.claim(&mut thread.resource_id)?;
        self.writes.replace(scope, id, thread, expect).await
    }

    /// See [`WritePath::patch_metadata`]; server-maintained keys are dropped first.
    pub async fn patch_metadata(
        &self,
        scope: &Scope,
        id: &ThreadId,
        mut patch: Extra,
        expect: Expect,
    ) -> Result<u64> {
        crate::store::strip_server_metadata(&mut patch);
        self.writes.patch_metadata(scope, id, patch, expect).await
    }

    /// See [`WritePath::delete`].
    pub async fn delete(&self, scope: &Scope, id: &ThreadId, expect: Expect) -> Result<()> {
        self.writes.delete(scope, id, expect).await
    }

    /// See [`WritePath::flush`].
    pub async fn flush(&self, scope: &Scope, id: &ThreadId) -> Result<FoldReport> {
        self.guard(scope, id).await?;
        self.writes.flush(id).await
    }

    /// The thread as the view sees it.
    pub async fn get(&self, scope: &Scope, id: &ThreadId, view: View) -> Result<Snapshot> {
        self.guard(scope, id).await?;
        let snap = match self.live(id, view).await? {
            Some(record) => record.snapshot(),
            None => self.store.get(id).await?,
        };
        admitted(scope, &snap.thread)?;
        Ok(snap)
    }

    /// The live record when the view asks for it and the mode has one.
    async fn live(&self, id: &ThreadId, view: View) -> Result<Option<Record>> {
        if view == View::Live {
            self.writes.live(id).await
        } else {
            Ok(None)
        }
    }

    /// The version the view has reached (cheap: for `If-None-Match`; one key lookup of the
    /// owner, which also checks the scope).
    pub async fn version(&self, scope: &Scope, id: &ThreadId, view: View) -> Result<u64> {
        Ok(self.stamp(scope, id, view).await?.version)
    }

    /// The version the view has reached and, when that is exactly the store's snapshot, which
    /// life of the thread it belongs to: enough to name a rendered snapshot in a cache.
    pub async fn stamp(&self, scope: &Scope, id: &ThreadId, view: View) -> Result<Stamp> {
        let owner = self.store.owner(id).await?;
        if scope
            .resource()
            .is_some_and(|own| owner.resource_id.as_deref() != Some(own))
        {
            return Err(StoreError::NotFound.into());
        }
        if view == View::Live
            && let Some(v) = self.writes.live_version(id).await?
        {
            // The live view of the buffered mode: never named by the store's stamp.
            return Ok(Stamp {
                version: v,
                stored: None,
            });
        }
        Ok(Stamp {
            version: owner.version,
            stored: Some(owner.incarnation),
        })
    }

    /// A page of messages as the view sees them.
    pub async fn messages(
        &self,
        scope: &Scope,
        id: &ThreadId,
        q: &MessageQuery,
        view: View,
    ) -> Result<MessagePage> {
        self.guard(scope, id).await?;
        if let Some(record) = self.live(id, view).await? {
            admitted(scope, &record.thread)?;
            return Ok(record.messages(q));
        }
        Ok(self.store.messages(id, q).await?)
    }

    /// The current state as the view sees it.
    pub async fn state(&self, scope: &Scope, id: &ThreadId, view: View) -> Result<StateAt> {
        self.guard(scope, id).await?;
        if let Some(record) = self.live(id, view).await? {
            admitted(scope, &record.thread)?;
            return Ok(record.state());
        }
        Ok(self.store.state(id).await?)
    }

    /// Which life of the thread id is current.
    pub async fn incarnation(&self, scope: &Scope, id: &ThreadId) -> Result<Incarnation> {
        self.guard(scope, id).await?;
        Ok(self.store.incarnation(id).await?)
    }

    /// A page of the thread list (always from the store). A scoped caller's list is filtered
    /// to its resource (a `resource_id` filter naming another resource finds nothing).
    pub async fn list(&self, scope: &Scope, q: &ListQuery) -> Result<ListPage> {
        let Some(own) = scope.resource() else {
            return Ok(self.store.list(q).await?);
        };
        if q.resource_id.as_deref().is_some_and(|r| r != own) {
            return Ok(ListPage {
                threads: Vec::new(),
                has_more: false,
            });
        }
        let q = ListQuery {
            resource_id: Some(own.to_owned()),
            ..q.clone()
        };
        Ok(self.store.list(&q).await?)
    }

    /// The thread's run records as the view sees them.
    pub async fn runs(&self, scope: &Scope, id: &ThreadId, view: View) -> Result<Vec<RunRecord>> {
        self.guard(scope, id).await?;
        let stored = self.store.runs(id).await?;
        if let Some(record) = self.live(id, view).await? {
            admitted(scope, &record.thread)?;
            return Ok(merge_runs(stored, record.runs));
        }
        Ok(stored)
    }

    /// One run record.
    pub async fn run(&self, scope: &Scope, id: &ThreadId, run_id: &str) -> Result<RunRecord> {
        self.guard(scope, id).await?;
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
