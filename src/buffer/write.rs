//! Writes in buffered mode: the cached head, the compare-and-set publish, idempotent
//! retries, deletes, and the live view (store plus unfolded tail).
//!
//! A head read from the store and the log must describe one moment. The log's end is read
//! first, then the store, then the log up to that end: entries at or below the store's
//! watermark are skipped, the rest must continue it without a gap and reach the end's
//! version. A fold that trims the log in between shows up as a gap (read again); anything
//! appended after the end makes the next compare-and-set fail (read again).

use super::log::{Body, LogEntry, PublishFailure};
use super::{Buffered, Head, PAGE, approx_size};
use crate::auth::Scope;
use crate::id::ThreadId;
use crate::model::{ChangeSet, Reason, Thread, plan_delta};
use crate::store::record::Record;
use crate::store::{Appended, Change, Expect, IdempotencyKey, Snapshot, StoreError};
use crate::write::{AppendOutcome, Error, Result};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Compare-and-set retries when other replicas keep winning the race for a thread.
const MAX_CAS_ATTEMPTS: usize = 32;
/// Retries of a consistent read that raced a concurrent fold.
const MAX_REFRESH_ATTEMPTS: usize = 8;
/// How long a `RunFinished` append waits for its fold before answering anyway (the entry is
/// durable in the log either way; the sweeper retries the fold).
const FOLD_ON_FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The state after `change`, validating that it applies (the delta is normalised).
fn next_state(state: &Value, change: &Change, id: &ThreadId) -> Result<Value> {
    Ok(match change {
        Change::Delta(delta) => {
            plan_delta(state, delta, |_| false)
                .map_err(StoreError::from)?
                .new_current_state
        }
        Change::Replace(thread) => {
            let mut t = thread.clone();
            crate::store::prepare_thread(id, &mut t)?
        }
        Change::Metadata(_) => state.clone(),
    })
}

/// The thread's `resource_id` after `change` (a full save sets it; other writes keep it).
fn owner_after(before: &Option<String>, change: &Change) -> Option<String> {
    match change {
        Change::Replace(thread) => thread.resource_id.clone(),
        _ => before.clone(),
    }
}

/// The head's new weight after `change` produced `state`: exact after a state replacement,
/// otherwise grown by the values the ops wrote (an over-estimate, which only evicts sooner).
fn weigh(before: u64, change: &Change, state: &Value) -> u64 {
    match change {
        Change::Replace(_) => approx_size(state),
        Change::Delta(d) if d.snapshot.as_ref().is_some_and(|s| !s.is_null()) => approx_size(state),
        Change::Delta(d) => {
            before
                + d.patches
                    .iter()
                    .flat_map(|p| &p.patch.ops)
                    .map(|op| 32 + op.value().map_or(0, approx_size))
                    .sum::<u64>()
        }
        Change::Metadata(_) => before,
    }
}

impl Buffered {
    /// Creates the thread in the store; clears what a deleted thread of the same id left in
    /// the log first, so it can never surface in the new one.
    pub(super) async fn create_thread(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot> {
        match self.store.version(id).await {
            Ok(_) => return Err(StoreError::AlreadyExists.into()),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.remember(id, None);
        let empty = match self.log.last(id).await? {
            None => true,
            Some(last) if last.is_tombstone() => {
                self.log.purge(id, None).await?;
                true
            }
            Some(_) => false,
        };
        let snap = self.store.create(id, thread).await?;
        if empty
            && let Ok(state) = crate::model::rebuild_state(&snap.thread.state, &snap.thread.patches)
        {
            // The first appends need only NATS, not even the store.
            let weight = approx_size(&state);
            self.remember(
                id,
                Some(Head {
                    seq: 0,
                    version: 0,
                    incarnation: snap.incarnation,
                    resource_id: snap.thread.resource_id.clone(),
                    state,
                    weight,
                }),
            );
        }
        Ok(snap)
    }

    /// Appends a delta; a `RunFinished` waits (bounded) for its run's fold.
    pub(super) async fn append_delta(
        &self,
        scope: &Scope,
        id: &ThreadId,
        mut delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        delta.normalize();
        let finished = delta.reason == Reason::RunFinished;
        let appended = self
            .write(scope, id, Some(Change::Delta(delta)), expect, idempotency)
            .await?;
        let flushed = if finished {
            Some(self.fold_through(id, appended.version).await)
        } else {
            None
        };
        Ok(AppendOutcome { appended, flushed })
    }

    /// Folds the thread, waiting at most [`FOLD_ON_FINISH_TIMEOUT`]; whether the store then
    /// holds `version`. The fold is tracked and not awaited directly, so one that outlives the
    /// wait still completes instead of being dropped mid-page (the sweeper retries a failure).
    async fn fold_through(&self, id: &ThreadId, version: u64) -> bool {
        let (b, fold_id) = (self.handle(), id.clone());
        let fold = self.tasks.spawn(async move {
            match b.upgrade() {
                Some(b) => b.fold(&fold_id).await.ok(),
                None => None,
            }
        });
        let fold = tokio::time::timeout(FOLD_ON_FINISH_TIMEOUT, fold).await;
        matches!(fold, Ok(Ok(Some(r))) if r.version >= version)
    }

    /// A full save. One that moves the thread to another resource_id is folded before it is
    /// answered (bounded like a `RunFinished`), so the store, which scoped reads are checked
    /// against, names the new owner at once.
    pub(super) async fn replace_thread(
        &self,
        scope: &Scope,
        id: &ThreadId,
        thread: Thread,
        expect: Expect,
    ) -> Result<u64> {
        let to = thread.resource_id.clone();
        let version = self
            .write(scope, id, Some(Change::Replace(thread)), expect, None)
            .await?
            .version;
        match self.store.owner(id).await {
            Ok(stored) if stored.resource_id == to => {}
            _ => {
                self.fold_through(id, version).await;
            }
        }
        Ok(version)
    }

    /// Deletes a thread: a tombstone in the log (so racing appends see it), then the store,
    /// then the whole subject.
    pub(super) async fn delete_thread(
        &self,
        scope: &Scope,
        id: &ThreadId,
        expect: Expect,
    ) -> Result<()> {
        self.write(scope, id, None, expect, None).await?;
        match self.store.delete(id, Expect::Any).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.log.purge(id, None).await?;
        self.remember(id, None);
        Ok(())
    }

    /// The thread's head: from the cache, or rebuilt from the store plus the log.
    /// Shared, never copied: an append reads the cached state to validate its delta.
    pub(super) async fn head(&self, id: &ThreadId, fresh: bool) -> Result<Arc<Head>> {
        if let Some(h) = self.cached(id) {
            if !fresh {
                return Ok(h);
            }
            // Another writer moved on: read only what it appended since our position.
            if let Some(head) = self.advance(id, &h).await? {
                return Ok(self.remember_head(id, head));
            }
        }
        let head = self.refresh(id).await?;
        Ok(self.remember_head(id, head))
    }

    /// The cached head moved forward by the entries published after it, or `None` when that
    /// does not give a consistent head (trimmed, deleted, out of order): then a full refresh.
    async fn advance(&self, id: &ThreadId, cached: &Head) -> Result<Option<Head>> {
        let Some(last) = self.log.last(id).await? else {
            return Ok(None);
        };
        if last.seq == cached.seq {
            return Ok(Some(cached.clone()));
        }
        if last.is_tombstone() || last.seq < cached.seq {
            return Ok(None);
        }
        let mut head = cached.clone();
        let mut reader = self.log.reader(id, Some(cached.seq + 1)).await?;
        while let Some(page) = reader.next_page(PAGE).await? {
            for e in page {
                let Body::Write(change) = &e.body else {
                    return Ok(None);
                };
                if e.version != head.version + 1 {
                    return Ok(None);
                }
                let Ok(state) = next_state(&head.state, change, id) else {
                    return Ok(None);
                };
                head.resource_id = owner_after(&head.resource_id, change);
                head.weight = weigh(head.weight, change, &state);
                head.state = state;
                head.version = e.version;
                head.seq = e.seq;
            }
        }
        Ok((head.seq == last.seq).then_some(head))
    }

    /// Reads the head from the store and the log (see the module docs for the order).
    async fn refresh(&self, id: &ThreadId) -> Result<Head> {
        for _ in 0..MAX_REFRESH_ATTEMPTS {
            let last = self.log.last(id).await?;
            if last.as_ref().is_some_and(LogEntry::is_tombstone) {
                return Err(StoreError::NotFound.into());
            }
            let stored = self.store.state(id).await?;
            // Read after the state: a fold that commits in between moved only entries the log
            // walk below applies again (or, trimmed, shows up as a gap and a retry).
            let resource_id = self.store.owner(id).await?.resource_id;
            let target = last.as_ref().map_or(0, |l| l.version).max(stored.version);
            let mut head = Head {
                seq: 0,
                version: stored.version,
                incarnation: stored.incarnation,
                resource_id,
                weight: approx_size(&stored.state),
                state: stored.state,
            };
            let mut consistent = true;
            if let Some(last) = &last {
                let mut reader = self.log.reader(id, None).await?;
                'pages: while let Some(page) = reader.next_page(PAGE).await? {
                    for e in page {
                        if e.seq > last.seq {
                            break 'pages;
                        }
                        if e.version <= stored.version {
                            continue;
                        }
                        let Body::Write(change) = &e.body else {
                            return Err(StoreError::NotFound.into());
                        };
                        if e.version != head.version + 1 {
                            consistent = false;
                            break 'pages;
                        }
                        let state = next_state(&head.state, change, id)?;
                        head.resource_id = owner_after(&head.resource_id, change);
                        head.weight = weigh(head.weight, change, &state);
                        head.state = state;
                        head.version = e.version;
                    }
                }
                head.seq = last.seq;
            }
            // The store moved past what the log still had (a fold committed in between):
            // read again.
            if consistent && head.version == target {
                return Ok(head);
            }
        }
        Err(Error::LogUnavailable(format!(
            "thread {id}: could not read a consistent head"
        )))
    }

    /// Publishes `change` (a tombstone when `None`) as the thread's next version with a
    /// compare-and-set on the subject. A thread that is not the scope's is `NotFound`, judged on
    /// a fresh head before it is refused (so a stale cache never refuses wrongly) and on the
    /// head the compare-and-set proves current before it is accepted.
    pub(super) async fn write(
        &self,
        scope: &Scope,
        id: &ThreadId,
        change: Option<Change>,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Appended> {
        if !self.log.is_connected() {
            return Err(Error::LogUnavailable("not connected to NATS".into()));
        }
        let payload = super::log::Log::encode(change.as_ref())?;
        if payload.len() > self.log.max_entry() {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: self.log.max_entry(),
            });
        }
        let lock = self.write_locks.get(id);
        let _guard = lock.lock().await;
        let mut fresh = false;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let head = self.head(id, fresh).await?;
            if !scope.admits(head.resource_id.as_deref()) {
                if !fresh {
                    fresh = true;
                    continue;
                }
                return Err(StoreError::NotFound.into());
            }
            if let Err(e) = expect.check(head.version) {
                if fresh {
                    // A retry of a write that already landed moved the version itself: the
                    // key, not the precondition, decides (as in direct mode).
                    if let Some(key) = idempotency
                        && let Some(first) = self.find_key(id, key).await?
                    {
                        return Ok(first);
                    }
                    return Err(e.into());
                }
                fresh = true;
                continue;
            }
            let state = match &change {
                Some(c) => match next_state(&head.state, c, id) {
                    Ok(s) => Some(s),
                    // A cached state may be stale: judge the entry against the real head.
                    Err(_) if !fresh => {
                        fresh = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let version = head.version + 1;
            let key = idempotency.map(|k| (k, head.incarnation));
            match self
                .log
                .publish(id, payload.clone(), version, head.seq, key)
                .await
            {
                Ok(p) if p.duplicate => return self.replayed(id, p.seq, idempotency).await,
                Ok(p) => {
                    self.counters.appends.inc();
                    match (state, &change) {
                        (Some(state), Some(change)) => self.remember(
                            id,
                            Some(Head {
                                seq: p.seq,
                                version,
                                incarnation: head.incarnation,
                                resource_id: owner_after(&head.resource_id, change),
                                weight: weigh(head.weight, change, &state),
                                state,
                            }),
                        ),
                        _ => self.remember(id, None),
                    }
                    return Ok(Appended {
                        version,
                        replayed: false,
                    });
                }
                Err(PublishFailure::Conflict) => {
                    self.counters.cas_retries.inc();
                    fresh = true;
                }
                Err(PublishFailure::Error(e)) => {
                    // Whether it was stored is unknown: the next write re-reads the head.
                    self.remember(id, None);
                    return Err(e);
                }
            }
        }
        Err(Error::LogUnavailable(format!(
            "thread {id}: too much write contention, retry"
        )))
    }

    /// The earlier write with this idempotency key, from the log or (once folded and
    /// trimmed) from the keys the store remembered.
    async fn find_key(&self, id: &ThreadId, key: &IdempotencyKey) -> Result<Option<Appended>> {
        let mut reader = self.log.reader(id, None).await?;
        while let Some(page) = reader.next_page(PAGE).await? {
            if let Some(first) = page
                .iter()
                .find(|e| e.idempotency.as_ref().is_some_and(|k| k.key == key.key))
            {
                return Ok(Some(answer(first, key)?));
            }
        }
        Ok(self.store.idempotent(id, key).await?)
    }

    /// Answers a JetStream duplicate with the version the first request produced.
    async fn replayed(
        &self,
        id: &ThreadId,
        seq: u64,
        key: Option<&IdempotencyKey>,
    ) -> Result<Appended> {
        if let Some(original) = self.log.get(id, seq).await? {
            return match key {
                Some(key) => answer(&original, key),
                None => Ok(Appended {
                    version: original.version,
                    replayed: true,
                }),
            };
        }
        // Folded and trimmed while JetStream still remembers the message id: the store
        // remembers the keys it folded (the last IDEMPOTENCY_KEYS_KEPT of the thread).
        if let Some(key) = key
            && let Some(replay) = self.store.idempotent(id, key).await?
        {
            return Ok(replay);
        }
        Err(Error::IdempotencyKeyExpired)
    }

    /// The thread with its buffered tail applied (read-your-writes).
    pub(super) async fn live_record(&self, id: &ThreadId) -> Result<Record> {
        for _ in 0..MAX_REFRESH_ATTEMPTS {
            let last = self.log.last(id).await?;
            if last.as_ref().is_some_and(LogEntry::is_tombstone) {
                return Err(StoreError::NotFound.into());
            }
            let snap = self.store.get(id).await?;
            let target = last.as_ref().map_or(0, |l| l.version).max(snap.version);
            let mut record = Record::from_snapshot(snap)?;
            if let Some(last) = &last {
                let mut reader = self.log.reader(id, None).await?;
                while let Some(page) = reader.next_page(PAGE).await? {
                    let tail: Vec<_> = page
                        .iter()
                        .filter(|e| e.seq <= last.seq && e.version > record.version)
                        .filter_map(LogEntry::write)
                        .map(|mut w| {
                            w.idempotency = None;
                            w
                        })
                        .collect();
                    if tail
                        .first()
                        .is_some_and(|w| w.version != record.version + 1)
                    {
                        break;
                    }
                    record.apply_batch(&tail, crate::store::now_ms())?;
                }
            }
            if record.version == target {
                return Ok(record);
            }
        }
        Err(Error::LogUnavailable(format!(
            "thread {id}: could not read a consistent live view"
        )))
    }
}

/// A replay of the entry an idempotency key first came with, or a reuse error.
fn answer(original: &LogEntry, key: &IdempotencyKey) -> Result<Appended> {
    if original
        .idempotency
        .as_ref()
        .is_some_and(|k| k.fingerprint != key.fingerprint)
    {
        return Err(StoreError::IdempotencyKeyReused.into());
    }
    Ok(Appended {
        version: original.version,
        replayed: true,
    })
}
