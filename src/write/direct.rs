//! Direct mode: every write goes straight to the snapshot store, then to this process's live
//! hub (after the commit, so a stream never shows a write the store could still refuse). A
//! store that other processes share (PostgreSQL) announces every commit to every replica's
//! hub itself ([`crate::store::Store::changes`]); then nothing is published here, so each
//! write reaches the hub by one path only.
//!
//! A write to an existing thread first checks the thread's owner against the caller's scope
//! ([`super::guard`]: one key lookup, none for an admin). A move of the thread to another
//! resource that commits between that check and the write lets the write land in the moved
//! thread, as if it had come just before the move; the writer learns nothing of the new owner
//! but the version its write produced.

use super::{AppendOutcome, FoldReport, Result, WritePath, guard};
use crate::auth::Scope;
use crate::id::ThreadId;
use crate::live::Hub;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::record::Record;
use crate::store::{Change, DynStore, Expect, IdempotencyKey, Snapshot, Write, now_ms};
use async_trait::async_trait;
use std::sync::Arc;

/// The direct write path.
pub struct DirectWrites {
    store: DynStore,
    /// Where committed writes are published; `None` when the store announces them.
    hub: Option<Arc<Hub>>,
}

impl DirectWrites {
    /// Writes to `store` and reports each committed write to `hub` (unless the store
    /// announces its commits to every replica's hub itself).
    pub fn new(store: DynStore, hub: Arc<Hub>) -> Self {
        let hub = store.changes().is_none().then_some(hub);
        DirectWrites { store, hub }
    }

    fn committed(&self, id: &ThreadId, version: u64, change: Change) {
        let Some(hub) = &self.hub else { return };
        hub.publish(
            id,
            &Write {
                version,
                at: now_ms(),
                change,
                idempotency: None,
            },
        );
    }
}

#[async_trait]
impl WritePath for DirectWrites {
    async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot> {
        Ok(self.store.create(id, thread).await?)
    }

    async fn append(
        &self,
        scope: &Scope,
        id: &ThreadId,
        mut delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        guard(&*self.store, scope, id).await?;
        delta.normalize();
        let appended = self.store.append(id, &delta, expect, idempotency).await?;
        if !appended.replayed {
            self.committed(id, appended.version, Change::Delta(delta));
        }
        Ok(AppendOutcome {
            appended,
            flushed: None,
        })
    }

    async fn replace(
        &self,
        scope: &Scope,
        id: &ThreadId,
        mut thread: Thread,
        expect: Expect,
    ) -> Result<u64> {
        guard(&*self.store, scope, id).await?;
        // Prepared here exactly as the store prepares it, so the event shows what was saved.
        crate::store::prepare_thread(id, &mut thread)?;
        let version = self.store.replace(id, thread.clone(), expect).await?;
        self.committed(id, version, Change::Replace(thread));
        Ok(version)
    }

    async fn patch_metadata(
        &self,
        scope: &Scope,
        id: &ThreadId,
        patch: Extra,
        expect: Expect,
    ) -> Result<u64> {
        guard(&*self.store, scope, id).await?;
        let version = self.store.patch_metadata(id, patch.clone(), expect).await?;
        self.committed(id, version, Change::Metadata(patch));
        Ok(version)
    }

    async fn delete(&self, scope: &Scope, id: &ThreadId, expect: Expect) -> Result<()> {
        guard(&*self.store, scope, id).await?;
        self.store.delete(id, expect).await?;
        if let Some(hub) = &self.hub {
            hub.publish_deleted(id);
        }
        Ok(())
    }

    async fn flush(&self, id: &ThreadId) -> Result<FoldReport> {
        Ok(FoldReport {
            version: self.store.version(id).await?,
            applied: 0,
        })
    }

    async fn live(&self, _: &ThreadId) -> Result<Option<Record>> {
        Ok(None)
    }

    async fn live_version(&self, _: &ThreadId) -> Result<Option<u64>> {
        Ok(None)
    }

    async fn ready(&self) -> Result<()> {
        Ok(())
    }

    fn mode(&self) -> &'static str {
        "direct"
    }

    async fn stored_behind(&self, _: &ThreadId) -> Option<u64> {
        None
    }
}
