//! The memory backend, and the record map the file backend builds on.
//!
//! Records live in an ordered map (ordered so listing pages by id) of per-thread slots; each
//! slot has its own async mutex, so writes to one thread are serialised (which is what makes
//! `Expect::Exact` a compare-and-set) while different threads proceed in parallel. A
//! [`Persist`] implementation decides what happens to a changed record: nothing (memory) or a
//! durable file write (file).

use super::record::Record;
use super::{
    Appended, ChangeSet, Expect, History, IdempotencyKey, Incarnation, ListPage, ListQuery,
    MessagePage, MessageQuery, Result, RunRecord, Snapshot, StateAt, Store, StoreError, Write,
    now_ms,
};
use crate::id::ThreadId;
use crate::model::{Extra, Thread};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::Mutex;

/// What a backend does with a record after a successful change. Methods are blocking and
/// run on the blocking pool when [`Persist::DURABLE`].
pub trait Persist: Send + Sync + 'static {
    /// False when nothing is written: the store then skips the copy and the blocking call.
    const DURABLE: bool;
    /// Writes a new record; fails with `AlreadyExists` if one is there (also across processes).
    fn create(&self, id: &ThreadId, record: &Record) -> Result<()>;
    fn save(&self, id: &ThreadId, record: &Record) -> Result<()>;
    fn remove(&self, id: &ThreadId) -> Result<()>;
}

/// The memory backend persists nothing.
pub struct Volatile;

impl Persist for Volatile {
    const DURABLE: bool = false;
    fn create(&self, _: &ThreadId, _: &Record) -> Result<()> {
        Ok(())
    }
    fn save(&self, _: &ThreadId, _: &Record) -> Result<()> {
        Ok(())
    }
    fn remove(&self, _: &ThreadId) -> Result<()> {
        Ok(())
    }
}

/// `None` while a create is being persisted, or after a delete.
type Slot = Arc<Mutex<Option<Record>>>;

/// The records of every thread, with what persists them.
pub struct Records<P> {
    map: Arc<RwLock<BTreeMap<ThreadId, Slot>>>,
    persist: Arc<P>,
}

pub type MemoryStore = Records<Volatile>;

impl MemoryStore {
    pub fn new() -> Self {
        Records::with(Volatile, BTreeMap::new())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Persist> Records<P> {
    pub(crate) fn with(persist: P, loaded: BTreeMap<ThreadId, Record>) -> Self {
        let map = loaded
            .into_iter()
            .map(|(id, r)| (id, Arc::new(Mutex::new(Some(r)))))
            .collect();
        Records {
            map: Arc::new(RwLock::new(map)),
            persist: Arc::new(persist),
        }
    }

    fn slot(&self, id: &ThreadId) -> Result<Slot> {
        self.map
            .read()
            .map_err(|_| poisoned())?
            .get(id)
            .cloned()
            .ok_or(StoreError::NotFound)
    }

    async fn read<T>(&self, id: &ThreadId, f: impl FnOnce(&Record) -> Result<T>) -> Result<T> {
        let slot = self.slot(id)?;
        let guard = slot.lock().await;
        f(guard.as_ref().ok_or(StoreError::NotFound)?)
    }

    /// Runs `f` on the record under its lock, then persists; the change is visible only once
    /// it is durable. Persisting and installing the new record happen together in one task
    /// that owns the lock, so a caller that stops waiting can never leave the file and the
    /// record apart.
    async fn write<T>(&self, id: &ThreadId, f: impl FnOnce(&mut Record) -> Result<T>) -> Result<T> {
        let slot = self.slot(id)?;
        let mut guard = slot.lock_owned().await;
        let record = guard.as_mut().ok_or(StoreError::NotFound)?;
        if !P::DURABLE {
            return f(record);
        }
        let mut next = record.clone();
        let out = f(&mut next)?;
        let (persist, key) = (self.persist.clone(), id.clone());
        blocking(move || {
            persist.save(&key, &next)?;
            *guard = Some(next);
            Ok(())
        })
        .await?;
        Ok(out)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
}

fn poisoned() -> StoreError {
    StoreError::Internal("store lock poisoned".into())
}

#[async_trait]
impl<P: Persist> Store for Records<P> {
    async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot> {
        let record = Record::new(id, thread, now_ms())?;
        let slot: Slot = Arc::new(Mutex::new(None));
        let mut guard = slot.clone().lock_owned().await;
        {
            let mut map = self.map.write().map_err(|_| poisoned())?;
            if map.contains_key(id) {
                return Err(StoreError::AlreadyExists);
            }
            map.insert(id.clone(), slot);
        }
        let snapshot = record.snapshot();
        if !P::DURABLE {
            *guard = Some(record);
            return Ok(snapshot);
        }
        // Persist, then install or withdraw the slot, in one task (see `write`).
        let (persist, key, map) = (self.persist.clone(), id.clone(), self.map.clone());
        blocking(move || match persist.create(&key, &record) {
            Ok(()) => {
                *guard = Some(record);
                Ok(snapshot)
            }
            Err(e) => {
                map.write().map_err(|_| poisoned())?.remove(&key);
                Err(e)
            }
        })
        .await
    }

    async fn get(&self, id: &ThreadId) -> Result<Snapshot> {
        self.read(id, |r| Ok(r.snapshot())).await
    }

    async fn version(&self, id: &ThreadId) -> Result<u64> {
        self.read(id, |r| Ok(r.version)).await
    }

    async fn incarnation(&self, id: &ThreadId) -> Result<Incarnation> {
        self.read(id, |r| Ok(r.incarnation)).await
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        let slots: Vec<Slot> = {
            let map = self.map.read().map_err(|_| poisoned())?;
            match &q.after {
                Some(after) => map
                    .range((
                        std::ops::Bound::Excluded(after.clone()),
                        std::ops::Bound::Unbounded,
                    ))
                    .map(|(_, s)| s.clone())
                    .collect(),
                None => map.values().cloned().collect(),
            }
        };
        let mut threads = Vec::new();
        for slot in slots {
            let guard = slot.lock().await;
            let Some(r) = guard.as_ref() else { continue };
            let t = &r.thread;
            if q.resource_id
                .as_ref()
                .is_some_and(|x| t.resource_id.as_ref() != Some(x))
                || q.parent_thread_id
                    .as_ref()
                    .is_some_and(|x| t.parent_thread_id.as_ref() != Some(x))
            {
                continue;
            }
            threads.push(r.summary());
            if threads.len() > q.limit {
                break;
            }
        }
        let has_more = threads.len() > q.limit;
        threads.truncate(q.limit);
        Ok(ListPage { threads, has_more })
    }

    async fn replace(&self, id: &ThreadId, thread: Thread, expect: Expect) -> Result<u64> {
        self.write(id, |r| r.replace(thread, expect, now_ms()))
            .await
    }

    async fn patch_metadata(&self, id: &ThreadId, patch: Extra, expect: Expect) -> Result<u64> {
        self.write(id, |r| r.patch_metadata(patch, expect, now_ms()))
            .await
    }

    async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()> {
        let slot = self.slot(id)?;
        let mut guard = slot.clone().lock_owned().await;
        let record = guard.as_ref().ok_or(StoreError::NotFound)?;
        expect.check(record.version)?;
        let (persist, key, map) = (self.persist.clone(), id.clone(), self.map.clone());
        let mut remove = move || {
            if P::DURABLE {
                persist.remove(&key)?;
            }
            *guard = None;
            let mut map = map.write().map_err(|_| poisoned())?;
            if map.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                map.remove(&key);
            }
            Ok(())
        };
        if P::DURABLE {
            blocking(remove).await
        } else {
            remove()
        }
    }

    async fn append(
        &self,
        id: &ThreadId,
        delta: &ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Appended> {
        self.write(id, |r| r.append(delta, expect, idempotency, now_ms()))
            .await
    }

    async fn idempotent(&self, id: &ThreadId, key: &IdempotencyKey) -> Result<Option<Appended>> {
        self.read(id, |r| r.idempotent(key)).await
    }

    async fn apply_batch(&self, id: &ThreadId, entries: &[Write]) -> Result<u64> {
        self.write(id, |r| r.apply_batch(entries, now_ms())).await
    }

    async fn messages(&self, id: &ThreadId, q: &MessageQuery) -> Result<MessagePage> {
        self.read(id, |r| Ok(r.messages(q))).await
    }

    async fn state(&self, id: &ThreadId) -> Result<StateAt> {
        self.read(id, |r| Ok(r.state())).await
    }

    async fn history(&self, id: &ThreadId, after: u64, limit: usize) -> Result<History> {
        self.read(id, |r| Ok(r.history(after, limit))).await
    }

    async fn runs(&self, id: &ThreadId) -> Result<Vec<RunRecord>> {
        self.read(id, |r| {
            let mut runs = r.runs.clone();
            runs.sort_by(|a, b| (a.created_at, &a.run_id).cmp(&(b.created_at, &b.run_id)));
            Ok(runs)
        })
        .await
    }

    async fn run(&self, id: &ThreadId, run_id: &str) -> Result<RunRecord> {
        self.read(id, |r| {
            r.runs
                .iter()
                .find(|x| x.run_id == run_id)
                .cloned()
                .ok_or(StoreError::RunNotFound)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
