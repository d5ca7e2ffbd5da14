//! Where the hub gets a thread's writes from: chosen once at start-up, like the write path.
//!
//! * [`StoreSource`] (direct mode): replays come from the store's history; new writes are
//!   published into the hub by [`crate::write::direct::DirectWrites`] after each commit.
//! * [`LogSource`] (buffered mode): new writes come from following the thread's JetStream
//!   log (so every replica sees every replica's writes); replays merge the unfolded log with
//!   the store's history, reading the log first so a fold racing the replay cannot hide an
//!   entry (whatever it trims is in the store by then).

use crate::buffer::Buffered;
use crate::buffer::log::{Followed, Log, LogEntry, LogFollower};
use crate::id::ThreadId;
use crate::store::{DynStore, Incarnation, Snapshot, StoreError, Write};
use crate::write::{Result, WritePath};
use async_trait::async_trait;
use std::sync::Arc;

/// A page of writes for a catch-up.
#[derive(Debug, Default)]
pub struct ReplayPage {
    /// Writes from the requested version on, oldest first, at most the page size.
    pub writes: Vec<Write>,
    /// The thread's current version as far as the sources know.
    pub head: u64,
    /// Where a next page continues in the log (a stream sequence), if it came from there.
    pub resume: Option<u64>,
}

/// What a topic's feed reports.
#[derive(Debug)]
// Mostly writes, moved on at once: not worth an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum FeedEvent {
    /// A committed write.
    Write(Write),
    /// The thread was deleted.
    Deleted(u64),
    /// The store holds everything up to this version.
    Flushed(u64),
    /// Items may have been missed: subscribers catch up from the replay sources.
    Resync,
}

/// A running feed of one thread's events (one per topic per process).
pub struct Feed(LogFollower);

impl Feed {
    /// The next event; `None` ends the topic's upstream.
    pub async fn next(&mut self) -> Option<FeedEvent> {
        Some(match self.0.next().await? {
            Followed::Entry(LogEntry {
                version,
                body: crate::buffer::log::Body::Deleted,
                ..
            }) => FeedEvent::Deleted(version),
            Followed::Entry(e) => FeedEvent::Write(e.write()?),
            Followed::Flushed(v) => FeedEvent::Flushed(v),
            Followed::Resync => FeedEvent::Resync,
        })
    }

    /// Releases what the feed holds in the backends.
    pub async fn close(self) {
        self.0.close().await
    }
}

/// One mode's way of serving the hub (see the module docs).
#[async_trait]
pub trait LiveSource: Send + Sync + 'static {
    /// The thread's current version, cheaply; `NotFound` when it is gone.
    async fn head(&self, id: &ThreadId) -> Result<u64>;
    /// Which life of the thread id is current.
    async fn incarnation(&self, id: &ThreadId) -> Result<Incarnation>;
    /// The thread now, every accepted write included.
    async fn snapshot(&self, id: &ThreadId) -> Result<Snapshot>;
    /// Up to `limit` writes from version `next` on, as far as the sources keep them;
    /// `resume` is the previous page's.
    async fn replay(
        &self,
        id: &ThreadId,
        next: u64,
        limit: usize,
        resume: Option<u64>,
    ) -> Result<ReplayPage>;
    /// Starts the feed of a topic, or `None` when writes are published into the hub directly.
    async fn follow(&self, id: &ThreadId) -> Result<Option<Feed>>;
}

/// Direct mode's source: the store.
pub struct StoreSource {
    store: DynStore,
}

impl StoreSource {
    /// Replays from `store`.
    pub fn new(store: DynStore) -> Self {
        StoreSource { store }
    }
}

#[async_trait]
impl LiveSource for StoreSource {
    async fn head(&self, id: &ThreadId) -> Result<u64> {
        Ok(self.store.version(id).await?)
    }

    async fn incarnation(&self, id: &ThreadId) -> Result<Incarnation> {
        Ok(self.store.incarnation(id).await?)
    }

    async fn snapshot(&self, id: &ThreadId) -> Result<Snapshot> {
        Ok(self.store.get(id).await?)
    }

    async fn replay(
        &self,
        id: &ThreadId,
        next: u64,
        limit: usize,
        _: Option<u64>,
    ) -> Result<ReplayPage> {
        let h = self
            .store
            .history(id, next.saturating_sub(1), limit)
            .await?;
        Ok(ReplayPage {
            writes: h.entries,
            head: h.version,
            resume: None,
        })
    }

    async fn follow(&self, _: &ThreadId) -> Result<Option<Feed>> {
        Ok(None)
    }
}

/// Buffered mode's source: the log, the store, and the buffered write path's live view.
pub struct LogSource {
    log: Log,
    store: DynStore,
    writes: Arc<Buffered>,
}

impl LogSource {
    /// Serves the hub from `writes`' log and `store`.
    pub fn new(writes: Arc<Buffered>, store: DynStore) -> Self {
        LogSource {
            log: writes.log().clone(),
            store,
            writes,
        }
    }
}

#[async_trait]
impl LiveSource for LogSource {
    async fn head(&self, id: &ThreadId) -> Result<u64> {
        let last = self.log.last(id).await?;
        if last.as_ref().is_some_and(LogEntry::is_tombstone) {
            return Err(StoreError::NotFound.into());
        }
        let stored = self.store.version(id).await?;
        Ok(last.map_or(stored, |l| l.version.max(stored)))
    }

    async fn incarnation(&self, id: &ThreadId) -> Result<Incarnation> {
        Ok(self.store.incarnation(id).await?)
    }

    async fn snapshot(&self, id: &ThreadId) -> Result<Snapshot> {
        match self.writes.live(id).await? {
            Some(record) => Ok(record.snapshot()),
            None => Ok(self.store.get(id).await?),
        }
    }

    async fn replay(
        &self,
        id: &ThreadId,
        next: u64,
        limit: usize,
        resume: Option<u64>,
    ) -> Result<ReplayPage> {
        let head = self.head(id).await?;
        if next > head {
            return Ok(ReplayPage {
                head,
                ..Default::default()
            });
        }
        // The log first, then the store (see the module docs): what comes before the log's
        // entries from `next` on is in the store by the time it is read.
        let mut reader = self.log.reader(id, resume).await?;
        let mut from_log: Vec<LogEntry> = Vec::new();
        while let Some(page) = reader.next_page(limit).await? {
            if page.iter().any(LogEntry::is_tombstone) {
                return Err(StoreError::NotFound.into());
            }
            // Entries before `next` are read past and dropped: memory stays one page.
            from_log.extend(page.into_iter().filter(|e| e.version >= next));
            if from_log.len() >= limit {
                break;
            }
        }
        let log_first = from_log.first().map(|e| e.version);
        let mut writes = Vec::new();
        if log_first.is_none_or(|f| f > next) {
            let h = self.store.history(id, next - 1, limit).await?;
            writes.extend(
                h.entries
                    .into_iter()
                    .filter(|w| log_first.is_none_or(|f| w.version < f)),
            );
        }
        let mut resume = None;
        for e in from_log {
            if writes.len() >= limit {
                break;
            }
            resume = Some(e.seq + 1);
            writes.extend(e.write());
        }
        let head = head.max(writes.last().map_or(0, |w| w.version));
        Ok(ReplayPage {
            writes,
            head,
            resume,
        })
    }

    async fn follow(&self, id: &ThreadId) -> Result<Option<Feed>> {
        Ok(Some(Feed(self.log.follow(id, 0).await?)))
    }
}
