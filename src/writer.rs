//! The write path and the read views, behind one API for the HTTP layer.
//!
//! **Direct** mode (no NATS): every write goes straight to the snapshot store.
//! **Buffered** mode (`--nats-url`): writes go to the thread's JetStream log
//! ([`crate::buffer`]) and are folded into the store at run end, on flush, when idle, at
//! start-up and at shutdown. Reads default to the store's snapshot (which says the version
//! it reflects); `view=live` merges the buffered tail.
//!
//! Live events: in direct mode every committed store write is reported to the
//! [`crate::live::Hub`] here; in buffered mode the hub reads the log from NATS itself, so any
//! replica's writes reach every replica's subscribers.

use crate::buffer::{Buffer, Entry, Error, FoldReport, Result};
use crate::id::ThreadId;
use crate::live::{Hub, LiveChange};
use crate::model::{ChangeSet, Extra, Reason, Thread};
use crate::store::{
    Appended, DynStore, Expect, IdempotencyKey, ListPage, ListQuery, MessagePage, MessageQuery,
    RunRecord, Snapshot, StoreError,
};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use utoipa::ToSchema;

/// How long a `RunFinished` append waits for its fold before answering anyway (the entry is
/// durable in the log either way; the sweeper retries the fold).
const FOLD_ON_FINISH_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub appended: Appended,
    /// For a `RunFinished` in buffered mode: whether the fold completed before answering.
    pub flushed: Option<bool>,
}

pub struct Writer {
    store: DynStore,
    buffer: Option<Arc<Buffer>>,
    appends: Counter,
    hub: Arc<Hub>,
}

impl Writer {
    pub fn new(store: DynStore, buffer: Option<Arc<Buffer>>, hub: Arc<Hub>) -> Self {
        Writer {
            store,
            buffer,
            appends: Counter::default(),
            hub,
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "threadgate_appends",
            "Accepted delta appends",
            self.appends.clone(),
        );
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn buffer(&self) -> Option<&Arc<Buffer>> {
        self.buffer.as_ref()
    }

    pub async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot> {
        let Some(b) = &self.buffer else {
            return Ok(self.store.create(id, thread).await?);
        };
        // A duplicate create must not touch the existing thread's buffered tail.
        let empty = match self.store.version(id).await {
            Ok(_) => return Err(StoreError::AlreadyExists.into()),
            Err(StoreError::NotFound) => b.prepare_create(id).await?,
            Err(e) => return Err(e.into()),
        };
        let snap = self.store.create(id, thread).await?;
        if empty
            && let Ok(state) = crate::model::rebuild_state(&snap.thread.state, &snap.thread.patches)
        {
            b.created(id, state);
        }
        Ok(snap)
    }

    pub async fn append(
        &self,
        id: &ThreadId,
        delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        let Some(b) = &self.buffer else {
            let appended = self.store.append(id, &delta, expect, idempotency).await?;
            if !appended.replayed {
                self.hub
                    .publish(id, appended.version, LiveChange::Delta(&delta));
            }
            self.appends.inc();
            return Ok(AppendOutcome {
                appended,
                flushed: None,
            });
        };
        let finished = delta.reason == Reason::RunFinished;
        let appended = b
            .write(id, Entry::Delta(delta), expect, idempotency)
            .await?;
        self.appends.inc();
        let flushed = if finished {
            // Spawned, so a fold that outlives the wait still completes instead of being
            // dropped mid-chunk.
            let (b, fold_id) = (b.clone(), id.clone());
            let fold = tokio::spawn(async move { b.fold(&fold_id).await });
            let fold = tokio::time::timeout(FOLD_ON_FINISH_TIMEOUT, fold).await;
            Some(matches!(fold, Ok(Ok(Ok(r))) if r.version >= appended.version))
        } else {
            None
        };
        Ok(AppendOutcome { appended, flushed })
    }

    pub async fn replace(&self, id: &ThreadId, thread: Thread, expect: Expect) -> Result<u64> {
        match &self.buffer {
            None => {
                let saved = thread.clone();
                let version = self.store.replace(id, thread, expect).await?;
                self.hub.publish(id, version, LiveChange::Replace(&saved));
                Ok(version)
            }
            Some(b) => Ok(b
                .write(id, Entry::Replace(thread), expect, None)
                .await?
                .version),
        }
    }

    pub async fn patch_metadata(
        &self,
        id: &ThreadId,
        mut patch: Extra,
        expect: Expect,
    ) -> Result<u64> {
        crate::store::strip_server_metadata(&mut patch);
        match &self.buffer {
            None => {
                let version = self.store.patch_metadata(id, patch.clone(), expect).await?;
                self.hub.publish(id, version, LiveChange::Metadata(&patch));
                Ok(version)
            }
            Some(b) => Ok(b
                .write(id, Entry::Metadata(patch), expect, None)
                .await?
                .version),
        }
    }

    pub async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()> {
        match &self.buffer {
            None => {
                self.store.delete(id, expect).await?;
                self.hub.publish_deleted(id);
                Ok(())
            }
            Some(b) => b.delete(id, expect).await,
        }
    }

    /// Folds the buffered tail now; in direct mode the store is always caught up.
    pub async fn flush(&self, id: &ThreadId) -> Result<FoldReport> {
        match &self.buffer {
            None => Ok(FoldReport {
                version: self.store.version(id).await?,
                applied: 0,
            }),
            Some(b) => b.fold(id).await,
        }
    }

    pub async fn get(&self, id: &ThreadId, view: View) -> Result<Snapshot> {
        match (&self.buffer, view) {
            (Some(b), View::Live) => Ok(b.live_record(id).await?.snapshot()),
            _ => Ok(self.store.get(id).await?),
        }
    }

    pub async fn version(&self, id: &ThreadId, view: View) -> Result<u64> {
        match (&self.buffer, view) {
            (Some(b), View::Live) => b.head_version(id).await,
            _ => Ok(self.store.version(id).await?),
        }
    }

    pub async fn messages(
        &self,
        id: &ThreadId,
        q: &MessageQuery,
        view: View,
    ) -> Result<MessagePage> {
        match (&self.buffer, view) {
            (Some(b), View::Live) => Ok(b.live_record(id).await?.messages(q)),
            _ => Ok(self.store.messages(id, q).await?),
        }
    }

    pub async fn state(&self, id: &ThreadId, view: View) -> Result<(Value, u64)> {
        match (&self.buffer, view) {
            (Some(b), View::Live) => {
                let r = b.live_record(id).await?;
                Ok((r.current_state.clone(), r.version))
            }
            _ => Ok(self.store.state(id).await?),
        }
    }

    pub async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        Ok(self.store.list(q).await?)
    }

    pub async fn runs(&self, id: &ThreadId, view: View) -> Result<Vec<RunRecord>> {
        let stored = self.store.runs(id).await?;
        match (&self.buffer, view) {
            (Some(b), View::Live) => Ok(merge_runs(stored, b.live_record(id).await?.runs)),
            _ => Ok(stored),
        }
    }

    pub async fn run(&self, id: &ThreadId, run_id: &str) -> Result<RunRecord> {
        Ok(self.store.run(id, run_id).await?)
    }

    /// Store and (in buffered mode) NATS reachability, for `/readyz`.
    pub async fn ready(&self) -> Result<()> {
        self.store.ping().await?;
        if let Some(b) = &self.buffer {
            b.ping().await?;
        }
        Ok(())
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

impl From<Error> for crate::http::error::ApiError {
    fn from(e: Error) -> Self {
        use crate::http::error::ApiError;
        match e {
            Error::Store(e) => e.into(),
            Error::LogUnavailable(why) => {
                tracing::warn!(%why, "message log unavailable");
                ApiError::Unavailable("the message log (NATS)")
            }
            Error::TooLarge { limit, .. } => ApiError::PayloadTooLarge { limit },
            Error::FoldBlocked(why) => ApiError::FoldBlocked(why),
        }
    }
}
