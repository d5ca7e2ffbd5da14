//! The memory backend, and the record map the file backend builds on.
//!
//! Records live in an ordered map (ordered so listing pages by id) of per-thread slots; each
//! slot has its own async mutex, so writes to one thread are serialised (which is what makes
//! `Expect::Exact` a compare-and-set) while different threads proceed in parallel. A
//! [`Persist`] implementation decides what happens to a changed record: nothing (memory) or a
//! durable file write (file).
//!
//! Two ordered sets beside the map, `(created_at, id)` and `(updated_at, id)`, let a listing by
//! time walk only the page it returns instead of sorting every thread. They are changed under
//! the thread's slot lock together with the record, and a listing re-checks each entry's key
//! against the record it locks, so a stale entry (a thread written to meanwhile) is skipped:
//! the thread is met again at its new position.

use super::record::Record;
use super::{
    Appended, ChangeSet, Expect, History, IdempotencyKey, Incarnation, ListOrderBy, ListPage,
    ListQuery, MessagePage, MessageQuery, Order, Owner, Result, RunRecord, Snapshot, StateAt,
    Store, StoreError, Write, now_ms,
};
use crate::id::ThreadId;
use crate::model::{Extra, Thread};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
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

/// Index entries a listing takes per visit of the index lock: enough for a page, small enough
/// that writers are never held up for long.
const LIST_BATCH: usize = 256;

/// A position in a time index: `(timestamp, id)`.
type Key = (i64, ThreadId);

/// Every thread's slot by id, plus the time indexes used for listing.
#[derive(Default)]
struct Index {
    slots: BTreeMap<ThreadId, Slot>,
    by_created: BTreeSet<Key>,
    by_updated: BTreeSet<Key>,
}

impl Index {
    fn insert(&mut self, id: &ThreadId, slot: Slot, created_at: i64, updated_at: i64) {
        self.slots.insert(id.clone(), slot);
        self.by_created.insert((created_at, id.clone()));
        self.by_updated.insert((updated_at, id.clone()));
    }

    fn remove(&mut self, id: &ThreadId, created_at: i64, updated_at: i64) {
        self.slots.remove(id);
        self.by_created.remove(&(created_at, id.clone()));
        self.by_updated.remove(&(updated_at, id.clone()));
    }

    /// Up to `n` `(key, id, slot)` entries strictly after `from` in the listing's order.
    fn batch(&self, q: &ListQuery, from: Option<&Key>, n: usize) -> Vec<(i64, ThreadId, Slot)> {
        let slot = |id: &ThreadId| self.slots.get(id).cloned();
        let set = match q.order_by {
            ListOrderBy::Id => {
                let from = from.map(|(_, id)| id);
                let slots: Box<dyn Iterator<Item = (&ThreadId, &Slot)>> = match (q.order, from) {
                    (Order::Asc, Some(id)) => Box::new(
                        self.slots
                            .range::<ThreadId, _>((Bound::Excluded(id), Bound::Unbounded)),
                    ),
                    (Order::Desc, Some(id)) => Box::new(
                        self.slots
                            .range::<ThreadId, _>((Bound::Unbounded, Bound::Excluded(id)))
                            .rev(),
                    ),
                    (Order::Asc, None) => Box::new(self.slots.iter()),
                    (Order::Desc, None) => Box::new(self.slots.iter().rev()),
                };
                return slots
                    .take(n)
                    .map(|(id, s)| (0, id.clone(), s.clone()))
                    .collect();
            }
            ListOrderBy::CreatedAt => &self.by_created,
            ListOrderBy::UpdatedAt => &self.by_updated,
        };
        let entries: Box<dyn Iterator<Item = &Key>> = match (q.order, from) {
            (Order::Asc, Some(k)) => Box::new(set.range((Bound::Excluded(k), Bound::Unbounded))),
            (Order::Desc, Some(k)) => {
                Box::new(set.range((Bound::Unbounded, Bound::Excluded(k))).rev())
            }
            (Order::Asc, None) => Box::new(set.iter()),
            (Order::Desc, None) => Box::new(set.iter().rev()),
        };
        entries
            .filter_map(|(key, id)| Some((*key, id.clone(), slot(id)?)))
            .take(n)
            .collect()
    }
}

/// The records of every thread, with what persists them.
pub struct Records<P> {
    map: Arc<RwLock<Index>>,
    persist: Arc<P>,
}

/// The memory backend: records in memory only, lost on exit.
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
        let mut index = Index::default();
        for (id, r) in loaded {
            let (created, updated) = (r.created_at, r.updated_at);
            index.insert(&id, Arc::new(Mutex::new(Some(r))), created, updated);
        }
        Records {
            map: Arc::new(RwLock::new(index)),
            persist: Arc::new(persist),
        }
    }

    fn slot(&self, id: &ThreadId) -> Result<Slot> {
        self.map
            .read()
            .map_err(|_| poisoned())?
            .slots
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
    /// it is durable. Persisting and installing the new record (and moving its index entry)
    /// happen together in one task that owns the lock, so a caller that stops waiting can
    /// never leave the file, the record and the index apart.
    async fn write<T>(&self, id: &ThreadId, f: impl FnOnce(&mut Record) -> Result<T>) -> Result<T> {
        let slot = self.slot(id)?;
        let mut guard = slot.lock_owned().await;
        let record = guard.as_mut().ok_or(StoreError::NotFound)?;
        let before = record.updated_at;
        if !P::DURABLE {
            let out = f(record)?;
            touched(&self.map, id, before, record.updated_at)?;
            return Ok(out);
        }
        let mut next = record.clone();
        let out = f(&mut next)?;
        let (persist, key, map) = (self.persist.clone(), id.clone(), self.map.clone());
        blocking(move || {
            persist.save(&key, &next)?;
            let after = next.updated_at;
            *guard = Some(next);
            touched(&map, &key, before, after)
        })
        .await?;
        Ok(out)
    }
}

/// Moves a thread's `by_updated` entry after a write (called under its slot lock).
fn touched(map: &RwLock<Index>, id: &ThreadId, before: i64, after: i64) -> Result<()> {
    if before != after {
        let mut index = map.write().map_err(|_| poisoned())?;
        index.by_updated.remove(&(before, id.clone()));
        index.by_updated.insert((after, id.clone()));
    }
    Ok(())
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
        let (created, updated) = (record.created_at, record.updated_at);
        let slot: Slot = Arc::new(Mutex::new(None));
        let mut guard = slot.clone().lock_owned().await;
        {
            let mut map = self.map.write().map_err(|_| poisoned())?;
            if map.slots.contains_key(id) {
                return Err(StoreError::AlreadyExists);
            }
            map.insert(id, slot, created, updated);
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
                map.write()
                    .map_err(|_| poisoned())?
                    .remove(&key, created, updated);
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

    async fn owner(&self, id: &ThreadId) -> Result<Owner> {
        self.read(id, |r| {
            Ok(Owner {
                resource_id: r.thread.resource_id.clone(),
                version: r.version,
                incarnation: r.incarnation,
            })
        })
        .await
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        let mut threads = Vec::new();
        let mut from: Option<Key> = q.after.as_ref().map(|c| (c.key, c.id.clone()));
        'walk: loop {
            let batch =
                self.map
                    .read()
                    .map_err(|_| poisoned())?
                    .batch(q, from.as_ref(), LIST_BATCH);
            let exhausted = batch.len() < LIST_BATCH;
            for (key, id, slot) in batch {
                from = Some((key, id));
                let guard = slot.lock().await;
                let Some(r) = guard.as_ref() else { continue };
                // A thread written to since the batch was taken sits elsewhere now.
                if q.order_by.key(r.created_at, r.updated_at) != key
                    || !q.admits(
                        r.thread.resource_id.as_deref(),
                        r.thread.parent_thread_id.as_deref(),
                    )
                {
                    continue;
                }
                threads.push(r.summary());
                if threads.len() > q.limit {
                    break 'walk;
                }
            }
            if exhausted {
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
        let (created, updated) = (record.created_at, record.updated_at);
        let (persist, key, map) = (self.persist.clone(), id.clone(), self.map.clone());
        // Remove the file, the record and the index entries together (see `write`).
        let mut remove = move || {
            if P::DURABLE {
                persist.remove(&key)?;
            }
            *guard = None;
            let mut map = map.write().map_err(|_| poisoned())?;
            if map.slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                map.remove(&key, created, updated);
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

    async fn apply_batch(&self, id: &ThreadId, entries: Vec<Write>) -> Result<u64> {
        self.write(id, |r| r.apply_batch(&entries, now_ms())).await
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
