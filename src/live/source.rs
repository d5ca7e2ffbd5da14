//! Where the hub gets a thread's writes from: chosen once at start-up, like the write path.
//!
//! * [`StoreSource`] (direct mode): replays come from the store's history. New writes come,
//!   for a store that several processes share (PostgreSQL), from the store's announcements
//!   of every replica's commits ([`crate::store::changes`], `LISTEN/NOTIFY`): each topic's
//!   feed reads the history rows it lacks, once per process however many subscribers follow
//!   the thread. For a store only this process writes (memory, file), they are published into
//!   the hub by [`crate::write::direct::DirectWrites`] after each commit. Either way each
//!   write reaches a topic by one path only, so nothing is delivered twice.
//! * [`LogSource`] (buffered mode): new writes come from following the thread's JetStream
//!   log (so every replica sees every replica's writes); replays merge the unfolded log with
//!   the store's history, reading the log first so a fold racing the replay cannot hide an
//!   entry (whatever it trims is in the store by then).

use crate::buffer::Buffered;
use crate::buffer::log::{Followed, Log, LogEntry, LogFollower};
use crate::id::ThreadId;
use crate::store::changes::{ChangeWatch, Changes};
use crate::store::{DynStore, Incarnation, Snapshot, StoreError, Write};
use crate::write::{Result, WritePath};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

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
pub struct Feed(FeedFrom);

// One per topic, held by its upstream task: the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum FeedFrom {
    /// Buffered mode: the thread's JetStream log.
    Log(LogFollower),
    /// Direct mode on a shared store: its announcements and history.
    Store(StoreFeed),
}

impl Feed {
    /// The next event; `None` ends the topic's upstream.
    pub async fn next(&mut self) -> Option<FeedEvent> {
        match &mut self.0 {
            FeedFrom::Store(f) => f.next().await,
            FeedFrom::Log(f) => Some(match f.next().await? {
                Followed::Entry(LogEntry {
                    version,
                    body: crate::buffer::log::Body::Deleted,
                    ..
                }) => FeedEvent::Deleted(version),
                Followed::Entry(e) => FeedEvent::Write(e.write()?),
                Followed::Flushed(v) => FeedEvent::Flushed(v),
                Followed::Resync => FeedEvent::Resync,
            }),
        }
    }

    /// Releases what the feed holds in the backends.
    pub async fn close(self) {
        match self.0 {
            FeedFrom::Log(f) => f.close().await,
            FeedFrom::Store(_) => {}
        }
    }
}

/// Writes read from the store's history per read (the feed hands them on one at a time).
const STORE_FEED_PAGE: usize = 64;
/// First wait before reading the history again after a failure (doubles up to
/// [`STORE_FEED_RETRY_MAX`]).
const STORE_FEED_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between history reads while the store is unreachable.
const STORE_FEED_RETRY_MAX: Duration = Duration::from_secs(5);

/// Direct mode's feed on a shared store: announcements say a version was committed (by any
/// replica); the feed reads the history rows after the last one it delivered, in order, a
/// page at a time. A gap (the history no longer reaches back) or a lost connection turns
/// into `Resync`, so subscribers catch up from the store themselves or get `reset`.
struct StoreFeed {
    store: DynStore,
    id: ThreadId,
    watch: ChangeWatch,
    /// The newest version delivered (or the head when the feed started).
    last: u64,
    /// The newest version announced.
    want: u64,
    epoch: u64,
    /// The life of the thread id being followed (`None`: it did not exist at the start).
    incarnation: Option<Incarnation>,
    pending: VecDeque<Write>,
    /// Re-read the incarnation before the next history read (after a resync).
    check_life: bool,
    retry: Duration,
}

impl StoreFeed {
    async fn start(store: DynStore, changes: &Arc<Changes>, id: &ThreadId) -> Result<StoreFeed> {
        // Watch first, then read the head: whatever commits after the read is announced.
        let mut watch = changes.watch(id);
        let epoch = watch.rx.borrow_and_update().epoch;
        let (last, incarnation) = match store.version(id).await {
            Ok(v) => (v, Some(store.incarnation(id).await?)),
            Err(StoreError::NotFound) => (0, None),
            Err(e) => return Err(e.into()),
        };
        Ok(StoreFeed {
            store,
            id: id.clone(),
            watch,
            last,
            want: last,
            epoch,
            incarnation,
            pending: VecDeque::new(),
            check_life: false,
            retry: STORE_FEED_RETRY_MIN,
        })
    }

    async fn next(&mut self) -> Option<FeedEvent> {
        loop {
            if let Some(w) = self.pending.pop_front() {
                return Some(FeedEvent::Write(w));
            }
            if self.check_life || self.want > self.last {
                match self.read().await {
                    Ok(Some(event)) => return Some(event),
                    Ok(None) => self.retry = STORE_FEED_RETRY_MIN,
                    Err(e) => {
                        tracing::warn!(thread = %self.id, error = %e, retry_in = ?self.retry, "live feed cannot read the history");
                        tokio::time::sleep(self.retry).await;
                        self.retry = (self.retry * 2).min(STORE_FEED_RETRY_MAX);
                    }
                }
                continue;
            }
            if self.watch.rx.changed().await.is_err() {
                return None;
            }
            let signal = *self.watch.rx.borrow_and_update();
            if signal.deleted {
                return Some(FeedEvent::Deleted(signal.version));
            }
            self.want = self.want.max(signal.version);
            if signal.epoch != self.epoch {
                // Announcements may have been lost: re-read, and let subscribers check too.
                self.epoch = signal.epoch;
                self.check_life = true;
                return Some(FeedEvent::Resync);
            }
        }
    }

    /// One read of what the feed lacks: writes are queued; an event to report instead (the
    /// thread gone, a gap) is returned.
    async fn read(&mut self) -> Result<Option<FeedEvent>> {
        if self.check_life {
            let now = match self.store.incarnation(&self.id).await {
                Ok(i) => Some(i),
                Err(StoreError::NotFound) => None,
                Err(e) => return Err(e.into()),
            };
            if now != self.incarnation {
                // Deleted (and maybe created again) while announcements were lost.
                return Ok(Some(FeedEvent::Deleted(self.last)));
            }
            self.check_life = false;
            // Whatever was committed meanwhile.
            self.want = self.want.max(self.last + 1);
        }
        let h = match self
            .store
            .history(&self.id, self.last, STORE_FEED_PAGE)
            .await
        {
            Ok(h) => h,
            Err(StoreError::NotFound) => return Ok(Some(FeedEvent::Deleted(self.last))),
            Err(e) => return Err(e.into()),
        };
        if h.version < self.last {
            // Versions went back: another life of the id.
            return Ok(Some(FeedEvent::Deleted(self.last)));
        }
        let continues = match h.entries.first() {
            Some(first) => first.version == self.last + 1,
            None => h.version == self.last,
        };
        if !continues {
            // Older than the history keeps: subscribers find the gap and reset.
            self.last = h.version;
            self.want = h.version;
            return Ok(Some(FeedEvent::Resync));
        }
        if let Some(newest) = h.entries.last() {
            self.last = newest.version;
        }
        self.pending.extend(h.entries);
        // Read on while the store is ahead; never wait for more than it has (an announced
        // version is committed and visible, so this only forgets what is already read).
        self.want = h.version.max(self.last);
        Ok(None)
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

/// Direct mode's source: the store (and its announcements, when it has them).
pub struct StoreSource {
    store: DynStore,
    changes: Option<Arc<Changes>>,
}

impl StoreSource {
    /// Replays from `store`; follows its announcements when other processes share it.
    pub fn new(store: DynStore) -> Self {
        let changes = store.changes();
        StoreSource { store, changes }
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

    async fn follow(&self, id: &ThreadId) -> Result<Option<Feed>> {
        match &self.changes {
            Some(changes) => {
                let feed = StoreFeed::start(self.store.clone(), changes, id).await?;
                Ok(Some(Feed(FeedFrom::Store(feed))))
            }
            None => Ok(None),
        }
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
        Ok(Some(Feed(FeedFrom::Log(self.log.follow(id, 0).await?))))
    }
}
