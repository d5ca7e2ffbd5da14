//! Live events: every write of a thread, fanned out to its SSE subscribers in version order.
//!
//! Why a hub: a browser that loads a snapshot at version `V` and then follows the thread must
//! see `V+1, V+2, …` exactly once, across reconnects, replicas, folds and slow networks. The
//! usual bugs (a gap between "read" and "subscribe", doubled text after a reconnect, a slow
//! reader stalling everyone, one broker consumer per browser) all come from mixing those
//! concerns per connection. Here they are separated:
//!
//! * **One upstream per thread per process** (`topic`): a bounded broadcast channel shared
//!   by every local subscriber of the thread. Where its writes come from is the
//!   [`source::LiveSource`] chosen at start-up: in direct mode on a single-process store the
//!   write path publishes each committed write ([`Hub::publish`]), and on PostgreSQL one task
//!   per topic reads the history rows that every replica's commit announcements (`NOTIFY`)
//!   point to; in buffered mode one task per topic follows the thread's JetStream log (only
//!   what JetStream stored, in order), plus `flushed` notices.
//!   No NATS consumer exists per browser.
//! * **Per subscriber: attach first, then replay, then live** (`subscriber`), de-duplicated
//!   by version, with catch-ups served from the topic's recent items or, one page at a time,
//!   from the source's replay (the store's bounded history and, in buffered mode, the
//!   unfolded log). A position older than anything replayable gets `reset` — never a silent
//!   gap — and so does a position of an earlier life of the thread id, when the client says
//!   which life it followed (`incarnation`).
//! * **Slow consumers** fall behind in the bounded channel without holding anyone up; when one
//!   resumes it goes through the same catch-up. Memory per thread is bounded by the channel
//!   capacity, per subscriber by one replay page.
//! * **Outages**: a catch-up that cannot reach the store or NATS keeps the stream and its
//!   position and retries with back-off (an `EventSource` would give up on a 503 reconnect).
//! * **Tenancy**: a stream is opened for a caller's [`Scope`] (the HTTP layer has already
//!   checked that the thread is the caller's). A full save that moves the thread to another
//!   `resource_id` ends a scoped stream with `deleted`, as if the thread were gone, and a
//!   requested snapshot of a thread that is not the caller's is `NotFound`.
//! * **Limits**: at most `max_streams` streams per process and `max_streams_per_caller` per
//!   caller ([`Hub::admit`]); the permit is held by the stream and released when it ends.
//!
//! Keep-alive comments carry the version the subscriber has reached (`: keep-alive 42`).
//! Streams end when the shutdown token is cancelled, so graceful shutdown never waits on them;
//! upstream tasks run on the gateway's task tracker.

pub mod events;
pub mod source;
mod subscriber;
mod topic;

use crate::auth::Scope;
use crate::id::ThreadId;
use crate::store::{Change, Incarnation, StoreError, Write};
use crate::write::Result;
use bytes::Bytes;
use events::{Item, ResetEvent, SnapshotEvent, deleted_item, frame, write_item};
use futures::StreamExt;
use futures::stream::BoxStream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use source::LiveSource;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subscriber::Subscriber;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use topic::Topic;

/// Default interval of keep-alive comments on an idle stream.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// Default capacity of each thread's channel (events a subscriber may fall behind before it
/// is caught up from the replay sources).
pub const DEFAULT_CHANNEL_CAPACITY: usize = 256;
/// Backend replays running at once (reconnect storms must not swamp the store).
const MAX_CONCURRENT_REPLAYS: usize = 32;
/// Writes per catch-up page: what one subscriber may have queued from a replay.
const REPLAY_PAGE: usize = 64;
/// Queued frames are coalesced into writes of up to this size.
const COALESCE_BYTES: usize = 64 * 1024;
/// Live items handled per wake-up before yielding a write.
const BURST: usize = 64;
/// Default of `--max-streams`: three quarters of the default `--max-connections` (1,024), so
/// streams never hold every connection and REST calls still get through.
pub const DEFAULT_MAX_STREAMS: usize = 768;
/// Default of `--max-streams-per-caller`: a user with a few dozen tabs open, or an agent
/// following its sub-agents' threads.
pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 32;
/// Back-off between catch-up attempts while the store or NATS is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest back-off between catch-up attempts.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// How streams behave.
#[derive(Debug, Clone, Copy)]
pub struct LiveConfig {
    /// Keep-alive comment interval on an idle stream.
    pub keepalive: Duration,
    /// Per-thread channel capacity (and how many recent items a topic keeps for catch-ups).
    pub channel_capacity: usize,
    /// Streams open at once in this process.
    pub max_streams: usize,
    /// Streams one caller may hold open at once.
    pub max_streams_per_caller: usize,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            keepalive: DEFAULT_KEEPALIVE,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            max_streams: DEFAULT_MAX_STREAMS,
            max_streams_per_caller: DEFAULT_MAX_STREAMS_PER_CALLER,
        }
    }
}

/// Why a stream was refused (`429 too_many_streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooManyStreams {
    /// The caller already holds `limit` streams.
    #[error("this caller already has {limit} event streams open (--max-streams-per-caller)")]
    Caller {
        /// The per-caller limit.
        limit: usize,
    },
    /// The process already serves `limit` streams.
    #[error("the gateway already serves {limit} event streams (--max-streams)")]
    Total {
        /// The process-wide limit.
        limit: usize,
    },
}

/// Open streams, in total and per caller.
#[derive(Debug, Default)]
struct OpenStreams {
    total: usize,
    per_caller: HashMap<Arc<str>, usize>,
}

/// A place for one event stream, held while it is open.
pub struct StreamPermit {
    open: Arc<Mutex<OpenStreams>>,
    caller: Option<Arc<str>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(c) = &self.caller
            && let Some(n) = open.per_caller.get_mut(c)
        {
            *n -= 1;
            if *n == 0 {
                open.per_caller.remove(c);
            }
        }
    }
}

/// Buckets of the delivery latency: 1 ms to about 65 s.
fn delivery_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 17)
}

/// The hub's metrics (`/metrics`).
#[derive(Debug)]
pub struct LiveMetrics {
    /// Open SSE streams.
    pub streams: Gauge,
    /// Threads with at least one local subscriber (one upstream each).
    pub topics: Gauge,
    /// Write events sent to subscribers.
    pub events: Counter,
    /// Times a subscriber fell more than the channel capacity behind.
    pub lagged: Counter,
    /// Catch-ups that read the store or the log.
    pub replays: Counter,
    /// `reset` events sent.
    pub resets: Counter,
    /// From a write's acceptance to its event being handed to a live stream (writes that
    /// arrive live, not replays).
    pub delivery: Histogram,
    /// Streams refused by a limit, by `limit` (`caller`, `total`).
    pub rejected: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Default for LiveMetrics {
    fn default() -> Self {
        LiveMetrics {
            streams: Gauge::default(),
            topics: Gauge::default(),
            events: Counter::default(),
            lagged: Counter::default(),
            replays: Counter::default(),
            resets: Counter::default(),
            delivery: Histogram::new(delivery_buckets()),
            rejected: Family::default(),
        }
    }
}

impl LiveMetrics {
    /// Registers every metric.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "threadgate_sse_streams",
            "Open SSE streams",
            self.streams.clone(),
        );
        registry.register(
            "threadgate_sse_topics",
            "Threads followed by at least one local SSE stream (one upstream each)",
            self.topics.clone(),
        );
        for (name, help, counter) in [
            (
                "threadgate_sse_events",
                "Write events (delta, snapshot, metadata) sent to SSE streams",
                &self.events,
            ),
            (
                "threadgate_sse_lagged",
                "Times an SSE subscriber fell behind its thread's bounded channel",
                &self.lagged,
            ),
            (
                "threadgate_sse_replays",
                "SSE catch-ups served from the store or the log",
                &self.replays,
            ),
            (
                "threadgate_sse_resets",
                "SSE reset events sent (position older than what can be replayed)",
                &self.resets,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "threadgate_sse_delivery_seconds",
            "Time from a write's acceptance to its event being handed to a live SSE stream",
            self.delivery.clone(),
        );
        registry.register(
            "threadgate_sse_rejected",
            "SSE streams refused by --max-streams (limit=total) or --max-streams-per-caller \
             (limit=caller)",
            self.rejected.clone(),
        );
    }
}

/// A thread's writes after a position (see [`Hub::writes_after`]).
#[derive(Debug)]
pub struct WritesAfter {
    /// The writes from the position on, oldest first (empty when not `complete`).
    pub writes: Vec<Write>,
    /// The thread's current version as far as the sources know.
    pub head: u64,
    /// False when the position cannot be continued without a gap.
    pub complete: bool,
}

/// Where a stream starts (see [`Hub::open`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Position {
    /// Continue after this version.
    pub cursor: Option<u64>,
    /// Start with a snapshot (without a cursor), and answer an unreplayable cursor with one.
    pub snapshot: bool,
    /// The life of the thread id the cursor belongs to.
    pub incarnation: Option<Incarnation>,
}

/// A replay page as framed items.
struct Replay {
    items: Vec<Arc<Item>>,
    head: u64,
    resume: Option<u64>,
}

/// The process-wide live hub: one per gateway.
pub struct Hub {
    source: Arc<dyn LiveSource>,
    shutdown: CancellationToken,
    config: LiveConfig,
    topics: Mutex<HashMap<ThreadId, Arc<Topic>>>,
    replays: Semaphore,
    tasks: TaskTracker,
    open: Arc<Mutex<OpenStreams>>,
    /// Exported at `/metrics`.
    pub metrics: LiveMetrics,
}

impl Hub {
    /// A hub serving from `source`; streams end with `shutdown`, upstreams run on `tasks`.
    pub fn new(
        source: Arc<dyn LiveSource>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        config: LiveConfig,
    ) -> Arc<Self> {
        Arc::new(Hub {
            source,
            shutdown,
            config: LiveConfig {
                keepalive: config.keepalive.max(Duration::from_millis(10)),
                channel_capacity: config.channel_capacity.max(1),
                max_streams: config.max_streams.max(1),
                max_streams_per_caller: config.max_streams_per_caller.max(1),
            },
            topics: Mutex::new(HashMap::new()),
            replays: Semaphore::new(MAX_CONCURRENT_REPLAYS),
            tasks,
            open: Arc::default(),
            metrics: LiveMetrics::default(),
        })
    }

    /// Takes a place for one more stream of `caller` (see [`LiveConfig`]'s limits; a caller
    /// that is not identified counts toward the total only); the stream holds the permit until
    /// it ends.
    pub fn admit(
        &self,
        caller: Option<Arc<str>>,
    ) -> std::result::Result<StreamPermit, TooManyStreams> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let held = caller
            .as_ref()
            .map_or(0, |c| open.per_caller.get(c).copied().unwrap_or(0));
        let refused = if open.total >= self.config.max_streams {
            Some(TooManyStreams::Total {
                limit: self.config.max_streams,
            })
        } else if held >= self.config.max_streams_per_caller {
            Some(TooManyStreams::Caller {
                limit: self.config.max_streams_per_caller,
            })
        } else {
            None
        };
        if let Some(why) = refused {
            let label = match why {
                TooManyStreams::Caller { .. } => "caller",
                TooManyStreams::Total { .. } => "total",
            };
            self.metrics
                .rejected
                .get_or_create(&[("limit", label)])
                .inc();
            return Err(why);
        }
        open.total += 1;
        if let Some(c) = &caller {
            *open.per_caller.entry(c.clone()).or_default() += 1;
        }
        Ok(StreamPermit {
            open: self.open.clone(),
            caller,
        })
    }

    fn topic(&self, id: &ThreadId) -> Option<Arc<Topic>> {
        self.topics.lock().ok()?.get(id).cloned()
    }

    /// Reports a write committed by this process (direct mode). Cheap when nobody follows
    /// the thread.
    pub fn publish(&self, id: &ThreadId, write: &Write) {
        if let Some(topic) = self.topic(id) {
            topic.deliver(write_item(id, write), self.config.channel_capacity);
        }
    }

    /// Reports a deleted thread (direct mode); its subscribers get `deleted` and end.
    pub fn publish_deleted(&self, id: &ThreadId) {
        let topic = self.topics.lock().ok().and_then(|mut t| {
            let removed = t.remove(id);
            self.metrics.topics.set(t.len() as i64);
            removed
        });
        if let Some(topic) = topic {
            topic.deliver(deleted_item(0), self.config.channel_capacity);
        }
    }

    /// One page of what the replay sources hold from `next` on, framed.
    async fn replay(
        &self,
        id: &ThreadId,
        next: u64,
        limit: usize,
        resume: Option<u64>,
    ) -> Result<Replay> {
        let _permit = self.replays.acquire().await;
        self.metrics.replays.inc();
        let page = self.source.replay(id, next, limit, resume).await?;
        Ok(Replay {
            items: page
                .writes
                .iter()
                .map(|w| Arc::new(write_item(id, w)))
                .collect(),
            head: page.head,
            resume: page.resume,
        })
    }

    /// Up to `limit` of the thread's writes after version `after`, from the same sources a
    /// stream's catch-up replays (so `GET /v1/threads/{id}/deltas` and the stream never
    /// disagree on what happened at a version). `complete` is false when `after` cannot be
    /// continued without a gap (older than what is kept, or beyond the thread's head).
    ///
    /// For a scoped caller, a page that holds a full save moving the thread to another
    /// resource_id (not folded yet, so the store still names the caller) is `NotFound`: what
    /// follows it is not the caller's.
    pub async fn writes_after(
        &self,
        id: &ThreadId,
        after: u64,
        limit: usize,
        scope: &Scope,
    ) -> Result<WritesAfter> {
        let _permit = self.replays.acquire().await;
        let next = after.saturating_add(1);
        let page = self.source.replay(id, next, limit, None).await?;
        let moved_away = page.writes.iter().any(|w| match &w.change {
            Change::Replace(t) => !scope.admits(t.resource_id.as_deref()),
            _ => false,
        });
        if moved_away {
            return Err(StoreError::NotFound.into());
        }
        let contiguous = (next..)
            .zip(&page.writes)
            .all(|(want, w)| w.version == want);
        let complete = match page.writes.last() {
            Some(_) => contiguous,
            None => next == page.head + 1,
        };
        Ok(WritesAfter {
            head: page.head.max(page.writes.last().map_or(0, |w| w.version)),
            writes: if complete { page.writes } else { Vec::new() },
            complete,
        })
    }

    /// The thread now, as a `snapshot` frame; `NotFound` when it is not the scope's (a move
    /// not folded yet).
    async fn snapshot(&self, id: &ThreadId, scope: &Scope) -> Result<(Bytes, u64)> {
        let snap = self.source.snapshot(id).await?;
        if !scope.admits(snap.thread.resource_id.as_deref()) {
            return Err(StoreError::NotFound.into());
        }
        let version = snap.version;
        let data = SnapshotEvent {
            version,
            thread: events::SnapshotThread {
                thread: snap.to_wire(),
                incarnation: Some(snap.incarnation),
            },
        };
        Ok((frame("snapshot", Some(version), &data), version))
    }

    /// Opens a subscriber's stream: attach, position it (cursor, snapshot, or the head),
    /// replay, then follow live. Errors (404, 503) happen here, before any event. With
    /// `incarnation`, a position of another life of the thread id is answered with `reset`.
    /// The stream is the `scope`'s (see the module docs) and holds `permit` until it ends.
    pub async fn open(
        self: &Arc<Self>,
        id: ThreadId,
        position: Position,
        scope: Scope,
        permit: StreamPermit,
    ) -> Result<BoxStream<'static, std::result::Result<Bytes, Infallible>>> {
        let Position {
            cursor,
            snapshot,
            incarnation,
        } = position;
        let sub = self.subscribe(&id).await?;
        let mut client = Subscriber::new(self.clone(), id.clone(), sub, snapshot, scope, permit);
        let stale = match incarnation {
            Some(seen) => self.source.incarnation(&id).await? != seen,
            None => false,
        };
        match cursor {
            Some(_) if stale => {
                let head = self.source.head(&id).await?;
                client
                    .queue
                    .push_back(frame("reset", None, &ResetEvent { version: head }));
                self.metrics.resets.inc();
                client.done = true;
            }
            Some(after) => {
                client.next = after.saturating_add(1);
                client.catch_up().await?;
            }
            None if snapshot => {
                let (frame, version) = self.snapshot(&id, &client.scope).await?;
                client.queue.push_back(frame);
                client.next = version + 1;
                client.take_recent();
            }
            None => {
                client.next = self.source.head(&id).await? + 1;
                client.take_recent();
            }
        }
        Ok(futures::stream::unfold(client, |mut c| async move {
            c.next_chunk().await.map(|b| (Ok(b), c))
        })
        .boxed())
    }
}

#[cfg(test)]
mod tests {
    /// An idle stream's state is what 10,000 open streams multiply: the rare catch-up path is
    /// boxed so it does not sit in every stream's future.
    #[tokio::test]
    async fn an_idle_stream_is_small() {
        let store: crate::store::DynStore = std::sync::Arc::new(crate::store::MemoryStore::new());
        let hub = super::Hub::new(
            std::sync::Arc::new(super::source::StoreSource::new(store)),
            tokio_util::sync::CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
            super::LiveConfig::default(),
        );
        let id = crate::id::ThreadId::parse("x").unwrap();
        let sub = hub.subscribe(&id).await.unwrap();
        let permit = hub.admit(None).unwrap();
        let scope = crate::auth::Scope::Resource("r".into());
        let mut c = super::Subscriber::new(hub.clone(), id, sub, false, scope, permit);
        assert!(
            std::mem::size_of_val(&c) < 512,
            "{}",
            std::mem::size_of_val(&c)
        );
        let next = c.next_chunk();
        assert!(
            std::mem::size_of_val(&next) < 1024,
            "{}",
            std::mem::size_of_val(&next)
        );
    }

    #[test]
    fn streams_are_limited_per_caller_and_in_total() {
        let store: crate::store::DynStore = std::sync::Arc::new(crate::store::MemoryStore::new());
        let config = super::LiveConfig {
            max_streams: 3,
            max_streams_per_caller: 2,
            ..Default::default()
        };
        let hub = super::Hub::new(
            std::sync::Arc::new(super::source::StoreSource::new(store)),
            tokio_util::sync::CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
            config,
        );
        let key = |k: &str| Some(std::sync::Arc::<str>::from(k));
        let a1 = hub.admit(key("a")).unwrap();
        let _a2 = hub.admit(key("a")).unwrap();
        assert_eq!(
            hub.admit(key("a")).err(),
            Some(super::TooManyStreams::Caller { limit: 2 })
        );
        let _b1 = hub.admit(key("b")).unwrap();
        assert_eq!(
            hub.admit(key("c")).err(),
            Some(super::TooManyStreams::Total { limit: 3 })
        );
        drop(a1);
        let anonymous = hub.admit(None).unwrap();
        assert_eq!(
            hub.admit(None).err(),
            Some(super::TooManyStreams::Total { limit: 3 })
        );
        drop(anonymous);
        let _c1 = hub.admit(key("c")).unwrap();
        assert_eq!(hub.open.lock().unwrap().per_caller.len(), 3);
        assert_eq!(hub.open.lock().unwrap().total, 3);
    }
}
