//! Live events: every write of a thread, fanned out to its SSE subscribers in version order.
//!
//! Why a hub: a browser that loads a snapshot at version `V` and then follows the thread must
//! see `V+1, V+2, …` exactly once, across reconnects, replicas, folds and slow networks. The
//! usual bugs (a gap between "read" and "subscribe", doubled text after a reconnect, a slow
//! reader stalling everyone, one broker consumer per browser) all come from mixing those
//! concerns per connection. Here they are separated:
//!
//! * **One upstream per thread per process** (a `Topic`): a bounded `tokio::sync::broadcast`
//!   channel shared by every local subscriber of the thread, created with the first and removed
//!   with the last. In **direct** mode the [`crate::writer::Writer`] feeds it after each
//!   committed store write ([`Hub::publish`]). In **buffered** mode one task per topic reads
//!   the thread's JetStream log subject with an *ordered consumer* (only what JetStream stored,
//!   in order, resumed by sequence after a reconnect; a plain core-NATS subscription would also
//!   see publishes that JetStream rejected, e.g. the loser of a compare-and-set race between two
//!   replicas, under the winner's version), plus a core subscription to `<prefix>.ev.<id>` for
//!   `flushed` notices. No NATS consumer exists per browser; replays read the log without one
//!   only when the store and the topic's recent items cannot serve them.
//! * **Per subscriber: attach first, then replay, then live**, de-duplicated by version. The
//!   subscriber keeps `next` (the version it must emit next): a live item below `next` is
//!   skipped, equal is emitted, above triggers a catch-up from the replay sources (the topic's
//!   recent items, then the store's bounded history and, in buffered mode, the unfolded log —
//!   read log first, so a fold racing the replay cannot hide an entry). When `next` is older
//!   than anything replayable the subscriber gets `reset` (or a fresh `snapshot` if it asked for
//!   snapshots) — never a silent gap.
//! * **Slow consumers** fall behind in the bounded channel without holding anyone up; when one
//!   resumes, `RecvError::Lagged` sends it through the same catch-up (or `reset`). Memory per
//!   thread is bounded by the channel capacity, not by the slowest reader.
//! * **Outages**: a catch-up that cannot reach the store or NATS keeps the stream and its
//!   position and retries with back-off (an `EventSource` would give up on a 503 reconnect);
//!   after NATS reconnects, each upstream reopens its consumer after the last sequence it saw.
//!
//! SSE frames are built once per event and shared (`Bytes`) by all subscribers of a topic, so
//! the framing lives here rather than in the HTTP layer; keep-alive comments carry the version
//! the subscriber has reached (`: keep-alive 42`). Streams end when the shutdown token is
//! cancelled, so graceful shutdown never waits on them.

use crate::buffer::{Buffer, Entry, Error, LogMsg, decode};
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::{Change, DynStore, HISTORY_LIMIT, StoreError};
use async_nats::jetstream;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OnceCell, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// Default interval of keep-alive comments on an idle stream.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// Default capacity of each thread's channel (events a subscriber may fall behind before it
/// is caught up from the replay sources).
pub const DEFAULT_CHANNEL_CAPACITY: usize = 256;
/// Backend replays running at once (reconnect storms must not swamp the store).
const MAX_CONCURRENT_REPLAYS: usize = 32;
/// Queued frames are coalesced into writes of up to this size.
const COALESCE_BYTES: usize = 64 * 1024;
/// Live items handled per wake-up before yielding a write.
const BURST: usize = 64;
/// Back-off between catch-up attempts while the store or NATS is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often a topic's NATS upstream checks the connection (to reopen after a reconnect).
const UPSTREAM_CHECK: Duration = Duration::from_secs(1);
/// How long a topic's NATS upstream may take to start before subscribers get 503.
const UPSTREAM_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Log message header carrying the version (see [`crate::buffer`]).

#[derive(Debug, Clone, Copy)]
pub struct LiveConfig {
    /// Keep-alive comment interval on an idle stream.
    pub keepalive: Duration,
    /// Per-thread channel capacity (and how many recent items a topic keeps for catch-ups).
    pub channel_capacity: usize,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            keepalive: DEFAULT_KEEPALIVE,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
        }
    }
}

/// The hub's metrics (`/metrics`).
#[derive(Debug, Default)]
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
}

impl LiveMetrics {
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
        registry.register(
            "threadgate_sse_events",
            "Write events (delta, snapshot, metadata) sent to SSE streams",
            self.events.clone(),
        );
        registry.register(
            "threadgate_sse_lagged",
            "Times an SSE subscriber fell behind its thread's bounded channel",
            self.lagged.clone(),
        );
        registry.register(
            "threadgate_sse_replays",
            "SSE catch-ups served from the store or the log",
            self.replays.clone(),
        );
        registry.register(
            "threadgate_sse_resets",
            "SSE reset events sent (position older than what can be replayed)",
            self.resets.clone(),
        );
    }
}

/// A committed write, as the direct-mode writer reports it to the hub.
#[derive(Debug, Clone, Copy)]
pub enum LiveChange<'a> {
    Delta(&'a ChangeSet),
    /// A full save; the thread as the client sent it (it is prepared like the store does).
    Replace(&'a Thread),
    /// A metadata merge patch (server keys already stripped).
    Metadata(&'a Extra),
}

/// `event: delta` — a ChangeSet appended at `version` (`id: <version>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeltaEvent {
    pub version: u64,
    /// The tirea ChangeSet exactly as applied.
    pub delta: ChangeSet,
}

/// `event: snapshot` — the whole thread at `version` (`id: <version>`): the first event with
/// `?snapshot=true`, and the event for a full save (`PUT`). Replace your state with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotEvent {
    pub version: u64,
    /// The thread. The server-maintained metadata keys (`created_at`, `updated_at`,
    /// `version`, `version_timestamp`) are present in a requested snapshot and absent in the
    /// snapshot of a full save, which carries the thread as saved.
    pub thread: Thread,
}

/// `event: metadata` — a metadata merge patch applied at `version` (`id: <version>`); a
/// `null` value removes the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetadataEvent {
    pub version: u64,
    #[schema(value_type = Object)]
    pub metadata: Extra,
}

/// `event: flushed` — buffered mode: the snapshot store now holds every write up to
/// `version`. No `id:` (it is not a write), and never ahead of the writes already sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlushedEvent {
    pub version: u64,
}

/// `event: reset` — the cursor is older than anything that can be replayed (or not a
/// position of this thread). Refetch the snapshot and reconnect with `after=<its version>`.
/// No `id:`; the stream ends after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResetEvent {
    /// The thread's current version.
    pub version: u64,
}

/// `event: deleted` — the thread was deleted; the stream ends. No `id:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeletedEvent {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A write at `version` (delta, snapshot, metadata).
    Write,
    /// The thread is gone; `version` is the tombstone's when known (buffered mode).
    Deleted,
    /// The store caught up to `version`.
    Flushed,
    /// The upstream may have missed items: catch up from the replay sources.
    Resync,
}

#[derive(Debug)]
struct Item {
    kind: Kind,
    version: u64,
    frame: Bytes,
}

/// One SSE frame: optional `id:`, `event:`, one `data:` line of compact JSON (which never
/// holds a raw line break).
fn frame(event: &str, id: Option<u64>, data: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(128);
    if let Some(id) = id {
        out.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut out, data).expect("event data serialises");
    out.extend_from_slice(b"\n\n");
    out.into()
}

fn write_item(id: &ThreadId, version: u64, change: LiveChange<'_>) -> Item {
    let frame = match change {
        LiveChange::Delta(d) => {
            let mut delta = d.clone();
            delta.normalize();
            frame("delta", Some(version), &DeltaEvent { version, delta })
        }
        LiveChange::Replace(t) => {
            let mut thread = t.clone();
            // Exactly what the store saves (idempotent for a thread taken from the history).
            let _ = crate::store::prepare_thread(id, &mut thread);
            frame(
                "snapshot",
                Some(version),
                &SnapshotEvent { version, thread },
            )
        }
        LiveChange::Metadata(m) => frame(
            "metadata",
            Some(version),
            &MetadataEvent {
                version,
                metadata: m.clone(),
            },
        ),
    };
    Item {
        kind: Kind::Write,
        version,
        frame,
    }
}

fn change_item(id: &ThreadId, version: u64, change: &Change) -> Item {
    let change = match change {
        Change::Delta(d) => LiveChange::Delta(d),
        Change::Replace(t) => LiveChange::Replace(t),
        Change::Metadata(m) => LiveChange::Metadata(m),
    };
    write_item(id, version, change)
}

/// A log entry as an item (a tombstone becomes `deleted`).
fn entry_item(id: &ThreadId, version: u64, entry: &Entry) -> Item {
    let change = match entry {
        Entry::Delta(d) => LiveChange::Delta(d),
        Entry::Replace(t) => LiveChange::Replace(t),
        Entry::Metadata(m) => LiveChange::Metadata(m),
        Entry::Deleted => return deleted_item(version),
    };
    write_item(id, version, change)
}

fn deleted_item(version: u64) -> Item {
    Item {
        kind: Kind::Deleted,
        version,
        frame: frame("deleted", None, &DeletedEvent {}),
    }
}

fn signal(kind: Kind) -> Item {
    Item {
        kind,
        version: 0,
        frame: Bytes::new(),
    }
}

#[derive(Debug, Clone)]
enum Upstream {
    Starting,
    Ready,
    Failed(String),
}

/// One thread's fan-out within this process.
struct Topic {
    tx: broadcast::Sender<Arc<Item>>,
    /// The most recent writes seen by the upstream, by version: serves catch-ups (lag,
    /// reordering, reconnects near the head) without a backend read.
    recent: Mutex<BTreeMap<u64, Arc<Item>>>,
    ready: watch::Receiver<Upstream>,
    /// Stops the upstream task (buffered mode).
    stop: CancellationToken,
}

impl Topic {
    fn deliver(&self, item: Item, keep: usize) {
        let item = Arc::new(item);
        if item.kind == Kind::Write
            && let Ok(mut recent) = self.recent.lock()
        {
            recent.insert(item.version, item.clone());
            while recent.len() > keep {
                recent.pop_first();
            }
        }
        // No receiver is fine: the last subscriber may just have left.
        let _ = self.tx.send(item);
    }

    /// The contiguous run of recent writes starting at `next`, and the newest write the
    /// topic has delivered.
    fn recent_from(&self, next: u64) -> (Vec<Arc<Item>>, Option<u64>) {
        let Ok(recent) = self.recent.lock() else {
            return (Vec::new(), None);
        };
        let out = (next..)
            .zip(recent.range(next..))
            .take_while(|(want, (v, _))| *want == **v)
            .map(|(_, (_, item))| item.clone())
            .collect();
        (out, recent.last_key_value().map(|(&v, _)| v))
    }
}

/// A subscriber's attachment to a topic; leaving removes the topic with its last subscriber.
struct Subscription {
    hub: Arc<Hub>,
    id: ThreadId,
    topic: Arc<Topic>,
    rx: Option<broadcast::Receiver<Arc<Item>>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx.take();
        self.hub.release(&self.id, &self.topic);
    }
}

/// What the replay sources hold after a position.
struct Replay {
    /// Writes from `next` on, contiguous.
    items: Vec<Arc<Item>>,
    /// The thread's current version as far as the sources know.
    head: u64,
    /// False when `next` cannot be continued without a gap (older than what is kept, or not
    /// a position of this thread).
    complete: bool,
}

/// The process-wide live hub: one per gateway, shared by the writer and the SSE handler.
pub struct Hub {
    store: DynStore,
    buffer: Option<Arc<Buffer>>,
    shutdown: CancellationToken,
    config: LiveConfig,
    topics: Mutex<HashMap<ThreadId, Arc<Topic>>>,
    replays: Semaphore,
    /// Buffered mode: the JetStream stream holding the logs, and a handle on it.
    log_stream: Option<String>,
    log_handle: OnceCell<jetstream::stream::Stream>,
    pub metrics: LiveMetrics,
}

impl Hub {
    pub fn new(
        store: DynStore,
        buffer: Option<Arc<Buffer>>,
        shutdown: CancellationToken,
        config: LiveConfig,
    ) -> Arc<Self> {
        let log_stream = buffer.as_ref().map(|b| b.stream_name());
        Arc::new(Hub {
            store,
            buffer,
            shutdown,
            config: LiveConfig {
                keepalive: config.keepalive.max(Duration::from_millis(10)),
                channel_capacity: config.channel_capacity.max(1),
            },
            topics: Mutex::new(HashMap::new()),
            replays: Semaphore::new(MAX_CONCURRENT_REPLAYS),
            log_stream,
            log_handle: OnceCell::new(),
            metrics: LiveMetrics::default(),
        })
    }

    fn topic(&self, id: &ThreadId) -> Option<Arc<Topic>> {
        self.topics.lock().ok()?.get(id).cloned()
    }

    /// Direct mode: reports a committed write. Cheap when nobody follows the thread.
    pub fn publish(&self, id: &ThreadId, version: u64, change: LiveChange<'_>) {
        if let Some(topic) = self.topic(id) {
            topic.deliver(
                write_item(id, version, change),
                self.config.channel_capacity,
            );
        }
    }

    /// Direct mode: reports a deleted thread; its subscribers get `deleted` and end.
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

    /// Attaches to the thread's topic, creating it (and its upstream) if needed.
    async fn subscribe(self: &Arc<Self>, id: &ThreadId) -> Result<Subscription, Error> {
        let (topic, rx, start) = {
            let mut topics = self
                .topics
                .lock()
                .map_err(|_| Error::Store(StoreError::Internal("hub lock poisoned".into())))?;
            match topics.get(id) {
                Some(t) => (t.clone(), t.tx.subscribe(), None),
                None => {
                    let (tx, rx) = broadcast::channel(self.config.channel_capacity);
                    let initial = if self.buffer.is_some() {
                        Upstream::Starting
                    } else {
                        Upstream::Ready
                    };
                    let (ready_tx, ready) = watch::channel(initial);
                    let topic = Arc::new(Topic {
                        tx,
                        recent: Mutex::new(BTreeMap::new()),
                        ready,
                        stop: self.shutdown.child_token(),
                    });
                    topics.insert(id.clone(), topic.clone());
                    self.metrics.topics.set(topics.len() as i64);
                    (topic, rx, Some(ready_tx))
                }
            }
        };
        let sub = Subscription {
            hub: self.clone(),
            id: id.clone(),
            topic: topic.clone(),
            rx: Some(rx),
        };
        if let (Some(ready_tx), Some(buffer)) = (start, &self.buffer) {
            tokio::spawn(self.clone().upstream(
                buffer.clone(),
                id.clone(),
                topic.clone(),
                ready_tx,
            ));
        }
        let mut ready = topic.ready.clone();
        loop {
            let state = ready.borrow_and_update().clone();
            match state {
                Upstream::Ready => return Ok(sub),
                Upstream::Failed(why) => return Err(Error::LogUnavailable(why)),
                Upstream::Starting => {
                    if ready.changed().await.is_err() {
                        return Err(Error::LogUnavailable("live upstream stopped".into()));
                    }
                }
            }
        }
    }

    fn release(&self, id: &ThreadId, topic: &Arc<Topic>) {
        let Ok(mut topics) = self.topics.lock() else {
            return;
        };
        if topic.tx.receiver_count() == 0 {
            if topics.get(id).is_some_and(|t| Arc::ptr_eq(t, topic)) {
                topics.remove(id);
                self.metrics.topics.set(topics.len() as i64);
            }
            topic.stop.cancel();
        }
    }

    fn forget(&self, id: &ThreadId, topic: &Arc<Topic>) {
        if let Ok(mut topics) = self.topics.lock()
            && topics.get(id).is_some_and(|t| Arc::ptr_eq(t, topic))
        {
            topics.remove(id);
            self.metrics.topics.set(topics.len() as i64);
        }
    }

    /// Buffered mode: feeds one topic from the thread's log (ordered consumer) and its
    /// `flushed` notices, until the topic's last subscriber leaves or shutdown. After NATS
    /// reconnects, the consumer is reopened after the last sequence seen and subscribers
    /// catch up (an ephemeral consumer does not survive a server restart).
    async fn upstream(
        self: Arc<Self>,
        buffer: Arc<Buffer>,
        id: ThreadId,
        topic: Arc<Topic>,
        ready: watch::Sender<Upstream>,
    ) {
        let stream_name = self.log_stream.clone().unwrap_or_default();
        let js = jetstream::new(buffer.client().clone());
        let subject = buffer.subject(&id);
        let setup = async {
            let notices = buffer
                .client()
                .subscribe(buffer.event_subject(&id))
                .await
                .map_err(|e| e.to_string())?;
            let (name, messages) = open_consumer(&js, &stream_name, &subject, 0).await?;
            Ok::<_, String>((notices, name, messages))
        };
        let started = tokio::select! {
            _ = topic.stop.cancelled() => return,
            r = tokio::time::timeout(UPSTREAM_START_TIMEOUT, setup) => r,
        };
        let (mut notices, mut consumer_name, mut messages) = match started {
            Ok(Ok(s)) => s,
            other => {
                let why = match other {
                    Ok(Err(why)) => why,
                    _ => "timed out starting the live upstream".to_owned(),
                };
                tracing::warn!(thread = %id, %why, "live upstream did not start");
                self.forget(&id, &topic);
                let _ = ready.send(Upstream::Failed(why));
                return;
            }
        };
        let _ = ready.send(Upstream::Ready);
        let keep = self.config.channel_capacity;
        let mut last_resync: Option<tokio::time::Instant> = None;
        let mut notices_open = true;
        let mut last_seq = 0;
        // Counts (re)connections: a change means the server may have lost our consumer.
        let stats = buffer.client().statistics();
        let mut connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
        let mut reopen = false;
        let mut check = tokio::time::interval(UPSTREAM_CHECK);
        loop {
            if reopen {
                match open_consumer(&js, &stream_name, &subject, last_seq).await {
                    Ok((name, m)) => {
                        consumer_name = name;
                        messages = m;
                        reopen = false;
                        topic.deliver(signal(Kind::Resync), keep);
                    }
                    Err(why) => {
                        tracing::warn!(thread = %id, %why, "live upstream could not reopen; retrying")
                    }
                }
            }
            tokio::select! {
                _ = topic.stop.cancelled() => break,
                _ = check.tick() => {
                    let now = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
                    if now != connects && buffer.is_connected() {
                        connects = now;
                        reopen = true;
                    }
                }
                msg = messages.next(), if !reopen => match msg {
                    Some(Ok(msg)) => {
                        if let Ok(info) = msg.info() {
                            last_seq = last_seq.max(info.stream_sequence);
                        }
                        match decode(msg.headers.as_ref(), &msg.payload).map(|(v, e, _)| (v, e)) {
                            Ok((version, entry)) => {
                                let item = entry_item(&id, version, &entry);
                                if item.kind == Kind::Deleted {
                                    // A recreated thread of the same id gets a fresh topic.
                                    self.forget(&id, &topic);
                                    topic.deliver(item, keep);
                                    break;
                                }
                                topic.deliver(item, keep);
                            }
                            Err(why) => {
                                tracing::warn!(thread = %id, %why, "undecodable log message skipped by the live upstream");
                                topic.deliver(signal(Kind::Resync), keep);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(thread = %id, error = %e, "live upstream error");
                        if last_resync.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                            last_resync = Some(tokio::time::Instant::now());
                            topic.deliver(signal(Kind::Resync), keep);
                        }
                    }
                    None => reopen = true,
                },
                notice = notices.next(), if notices_open => match notice {
                    Some(n) => {
                        if let Some(v) = serde_json::from_slice::<serde_json::Value>(&n.payload)
                            .ok()
                            .and_then(|v| v["flushed"].as_u64())
                        {
                            topic.deliver(
                                Item {
                                    kind: Kind::Flushed,
                                    version: v,
                                    frame: frame("flushed", None, &FlushedEvent { version: v }),
                                },
                                keep,
                            );
                        }
                    }
                    // Only on client shutdown; the log still feeds the topic.
                    None => notices_open = false,
                },
            }
        }
        drop(messages);
        // The ephemeral consumer would expire on its own; removing it now keeps NATS tidy.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            js.delete_consumer_from_stream(&consumer_name, &stream_name),
        )
        .await;
    }

    async fn log_handle(&self) -> Result<&jetstream::stream::Stream, Error> {
        let (Some(buffer), Some(name)) = (&self.buffer, &self.log_stream) else {
            return Err(Error::LogUnavailable("not in buffered mode".into()));
        };
        self.log_handle
            .get_or_try_init(|| async {
                jetstream::new(buffer.client().clone())
                    .get_stream(name)
                    .await
                    .map_err(|e| Error::LogUnavailable(e.to_string()))
            })
            .await
    }

    /// The thread's current version, cheaply (no log scan): the store's version and, in
    /// buffered mode, the version of the last log message. `NotFound` when it is gone.
    async fn head(&self, id: &ThreadId) -> Result<u64, Error> {
        let Some(buffer) = &self.buffer else {
            return Ok(self.store.version(id).await?);
        };
        let last = match self
            .log_handle()
            .await?
            .get_last_raw_message_by_subject(&buffer.subject(id))
            .await
        {
            Ok(m) => Some(
                decode(Some(&m.headers), &m.payload)
                    .map(|(v, e, _)| (v, e))
                    .map_err(|why| Error::FoldBlocked(format!("thread {id}: {why}")))?,
            ),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                None
            }
            Err(e) => return Err(Error::LogUnavailable(e.to_string())),
        };
        if matches!(last, Some((_, Entry::Deleted))) {
            return Err(StoreError::NotFound.into());
        }
        let stored = self.store.version(id).await?;
        Ok(last.map_or(stored, |(v, _)| v.max(stored)))
    }

    /// The thread now (buffered mode: with its buffered tail), as a `snapshot` frame.
    async fn snapshot(&self, id: &ThreadId) -> Result<(Bytes, u64), Error> {
        let snap = match &self.buffer {
            None => self.store.get(id).await?,
            Some(b) => b.live_record(id).await?.snapshot(),
        };
        let version = snap.version;
        let data = SnapshotEvent {
            version,
            thread: snap.to_wire(),
        };
        Ok((frame("snapshot", Some(version), &data), version))
    }

    /// Everything the replay sources hold from `next` on.
    async fn replay(&self, id: &ThreadId, next: u64) -> Result<Replay, Error> {
        self.metrics.replays.inc();
        let found = self.changes_after(id, next.saturating_sub(1)).await?;
        Ok(Replay {
            items: found
                .changes
                .iter()
                .map(|(v, c)| Arc::new(change_item(id, *v, c)))
                .collect(),
            head: found.head,
            complete: found.complete,
        })
    }

    /// The thread's writes after version `after`, oldest first, from the replay sources: the
    /// store's bounded history and, in buffered mode, the unfolded log. This is what SSE
    /// catch-ups replay and what `GET /v1/threads/{id}/deltas` serves. `NotFound` when the
    /// thread is gone.
    pub async fn changes_after(&self, id: &ThreadId, after: u64) -> Result<Changes, Error> {
        let _permit = self.replays.acquire().await;
        let next = after.saturating_add(1);
        let Some(buffer) = &self.buffer else {
            let h = self.store.history(id, after, HISTORY_LIMIT).await?;
            let changes = h
                .entries
                .into_iter()
                .map(|e| (e.version, e.change))
                .collect();
            return Ok(Changes::new(changes, h.version, next));
        };
        // Nothing to replay (the usual case for a reconnect at the head): no log scan.
        let head = self.head(id).await?;
        if next > head {
            return Ok(Changes {
                changes: Vec::new(),
                head,
                complete: next == head + 1,
            });
        }
        // The log first, then the store: an entry a concurrent fold moves out of the log is
        // in the store by the time it is purged.
        let log: Vec<LogMsg> = buffer.read_log(id).await?;
        if log.iter().any(|m| m.entry == Entry::Deleted) {
            return Err(StoreError::NotFound.into());
        }
        let log_first = log.first().map(|m| m.version);
        let mut changes = Vec::new();
        let mut head = head;
        if log_first.is_none_or(|f| f > next) {
            let h = self.store.history(id, after, HISTORY_LIMIT).await?;
            head = head.max(h.version);
            changes.extend(
                h.entries
                    .into_iter()
                    .filter(|e| log_first.is_none_or(|f| e.version < f))
                    .map(|e| (e.version, e.change)),
            );
        }
        changes.extend(
            log.into_iter()
                .filter(|m| m.version >= next)
                .filter_map(|m| Some((m.version, m.entry.into_change()?))),
        );
        Ok(Changes::new(changes, head, next))
    }

    /// Opens a subscriber's stream: attach, position it (cursor, snapshot, or the head),
    /// replay, then follow live. Errors (404, 503) happen here, before any event.
    pub async fn open(
        self: &Arc<Self>,
        id: ThreadId,
        cursor: Option<u64>,
        snapshot: bool,
    ) -> Result<BoxStream<'static, Result<Bytes, Infallible>>, Error> {
        let sub = self.subscribe(&id).await?;
        self.metrics.streams.inc();
        let keepalive = self.config.keepalive;
        let mut client = Subscriber {
            hub: self.clone(),
            id: id.clone(),
            sub,
            next: 1,
            queue: VecDeque::new(),
            flushed_sent: 0,
            flushed_pending: None,
            done: false,
            snapshot_on_reset: snapshot,
            keepalive: Box::pin(tokio::time::sleep(keepalive)),
            retry: None,
        };
        match cursor {
            Some(after) => {
                client.next = after.saturating_add(1);
                client.catch_up(None).await?;
            }
            None if snapshot => {
                let (frame, version) = self.snapshot(&id).await?;
                client.queue.push_back(frame);
                client.next = version + 1;
                client.take_recent();
            }
            None => {
                client.next = self.head(&id).await? + 1;
                client.take_recent();
            }
        }
        Ok(futures::stream::unfold(client, |mut c| async move {
            c.next_chunk().await.map(|b| (Ok(b), c))
        })
        .boxed())
    }
}

/// An ordered consumer on one thread's subject: new messages only, or from after `after_seq`.
async fn open_consumer(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    after_seq: u64,
) -> Result<(String, jetstream::consumer::pull::Ordered), String> {
    use jetstream::consumer::DeliverPolicy;
    let deliver_policy = match after_seq {
        0 => DeliverPolicy::New,
        seq => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
    };
    let consumer = js
        .create_consumer_on_stream(
            jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy,
                ..Default::default()
            },
            stream,
        )
        .await
        .map_err(|e| e.to_string())?;
    let name = consumer.cached_info().name.clone();
    let messages = consumer.messages().await.map_err(|e| e.to_string())?;
    Ok((name, messages))
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A thread's writes after a position, as the replay sources hold them.
#[derive(Debug)]
pub struct Changes {
    /// `(version, change)`, oldest first, from the position on.
    pub changes: Vec<(u64, Change)>,
    /// The thread's current version as far as the sources know.
    pub head: u64,
    /// False when the position cannot be continued without a gap (older than what is kept,
    /// or not a position of this thread).
    pub complete: bool,
}

impl Changes {
    fn new(changes: Vec<(u64, Change)>, head: u64, next: u64) -> Changes {
        let contiguous = changes
            .iter()
            .enumerate()
            .all(|(i, (v, _))| *v == next + i as u64);
        let head = head.max(changes.last().map_or(0, |(v, _)| *v));
        let complete = if changes.is_empty() {
            next == head + 1
        } else {
            contiguous
        };
        Changes {
            changes,
            head,
            complete,
        }
    }
}

/// One SSE client.
struct Subscriber {
    hub: Arc<Hub>,
    id: ThreadId,
    sub: Subscription,
    /// The version this subscriber must emit next; everything below it was sent.
    next: u64,
    queue: VecDeque<Bytes>,
    flushed_sent: u64,
    /// A `flushed` notice ahead of the writes sent so far, held until they are.
    flushed_pending: Option<Arc<Item>>,
    /// Ends the stream once the queue is drained.
    done: bool,
    /// Send a fresh snapshot instead of `reset` (the client asked for snapshots).
    snapshot_on_reset: bool,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    /// After a failed catch-up: when to try again, and the current back-off.
    retry: Option<(tokio::time::Instant, Duration)>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.hub.metrics.streams.dec();
    }
}

impl Subscriber {
    fn emit(&mut self, item: &Item) {
        self.hub.metrics.events.inc();
        self.queue.push_back(item.frame.clone());
        self.next = item.version + 1;
        if let Some(f) = &self.flushed_pending
            && f.version < self.next
        {
            let f = f.clone();
            self.flushed_pending = None;
            self.flush_notice(&f);
        }
    }

    fn flush_notice(&mut self, item: &Arc<Item>) {
        if item.version <= self.flushed_sent {
            return;
        }
        if item.version < self.next {
            self.flushed_sent = item.version;
            self.queue.push_back(item.frame.clone());
        } else if self
            .flushed_pending
            .as_ref()
            .is_none_or(|p| p.version < item.version)
        {
            self.flushed_pending = Some(item.clone());
        }
    }

    /// Emits the topic's recent writes that continue from `next`. True when that reached
    /// the newest write the topic has delivered: everything newer comes through the channel
    /// (this subscriber was attached before it was delivered), so no backend read is needed.
    fn take_recent(&mut self) -> bool {
        let (run, newest) = self.sub.topic.recent_from(self.next);
        for item in run {
            self.emit(&item);
        }
        newest.is_some_and(|n| self.next == n + 1)
    }

    /// Continues from `next` out of the replay sources. `Err` only for a backend failure or
    /// a thread that is gone; a position that cannot be continued is answered with `reset`
    /// (or a snapshot) here.
    async fn catch_up(&mut self, upto: Option<u64>) -> Result<(), Error> {
        if self.take_recent() || upto.is_some_and(|u| self.next > u) {
            return Ok(());
        }
        let replay = self.hub.replay(&self.id, self.next).await?;
        for item in &replay.items {
            if item.version == self.next {
                self.emit(item);
            }
        }
        self.take_recent();
        if !replay.complete || upto.is_some_and(|u| self.next <= u) {
            self.reset(replay.head.max(upto.unwrap_or(0))).await?;
        }
        Ok(())
    }

    async fn reset(&mut self, head: u64) -> Result<(), Error> {
        if self.snapshot_on_reset {
            let (frame, version) = self.hub.snapshot(&self.id).await?;
            self.queue.push_back(frame);
            self.next = version + 1;
            self.take_recent();
        } else {
            self.queue
                .push_back(frame("reset", None, &ResetEvent { version: head }));
            self.hub.metrics.resets.inc();
            self.done = true;
        }
        Ok(())
    }

    /// A catch-up in the middle of the stream: a gone thread ends it with `deleted`; a backend
    /// failure keeps the stream (and its position) and retries with back-off, so a browser is
    /// not cut off by a short outage (an `EventSource` gives up on a non-200 reconnect).
    async fn catch_up_live(&mut self, upto: Option<u64>) {
        // Boxed: a rare path whose state would otherwise sit in every idle stream's future.
        match Box::pin(self.catch_up(upto)).await {
            Ok(()) => self.retry = None,
            Err(Error::Store(StoreError::NotFound)) => {
                self.queue.push_back(deleted_item(0).frame);
                self.done = true;
            }
            Err(e) => {
                let delay = self
                    .retry
                    .map_or(RETRY_MIN, |(_, d)| (d * 2).min(RETRY_MAX));
                tracing::warn!(thread = %self.id, error = %e, retry_in = ?delay, "live catch-up failed");
                self.retry = Some((tokio::time::Instant::now() + delay, delay));
            }
        }
    }

    async fn on_item(&mut self, item: Result<Arc<Item>, broadcast::error::RecvError>) {
        let item = match item {
            Ok(item) => item,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.hub.metrics.lagged.inc();
                return self.catch_up_live(None).await;
            }
            Err(broadcast::error::RecvError::Closed) => {
                self.done = true;
                return;
            }
        };
        match item.kind {
            Kind::Write => {
                if item.version > self.next {
                    self.catch_up_live(Some(item.version - 1)).await;
                }
                if !self.done && item.version == self.next {
                    self.emit(&item);
                }
            }
            Kind::Flushed => self.flush_notice(&item),
            Kind::Deleted => {
                self.queue.push_back(item.frame.clone());
                self.done = true;
            }
            Kind::Resync => self.catch_up_live(None).await,
        }
    }

    /// The next bytes to write, `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.hub.shutdown.is_cancelled() {
                return None;
            }
            if let Some(chunk) = self.drain() {
                let period = self.hub.config.keepalive;
                self.keepalive
                    .as_mut()
                    .reset(tokio::time::Instant::now() + period);
                return Some(chunk);
            }
            if self.done {
                return None;
            }
            let rx = self.sub.rx.as_mut()?;
            tokio::select! {
                biased;
                _ = self.hub.shutdown.cancelled() => return None,
                item = rx.recv() => {
                    self.on_item(item).await;
                    // Take what else is ready, so a burst goes out in one write.
                    for _ in 0..BURST {
                        if self.done {
                            break;
                        }
                        let Some(rx) = self.sub.rx.as_mut() else { break };
                        match rx.try_recv() {
                            Ok(item) => self.on_item(Ok(item)).await,
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                self.on_item(Err(broadcast::error::RecvError::Lagged(n))).await
                            }
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until(self.retry.map(|(at, _)| at)), if self.retry.is_some() => {
                    self.catch_up_live(None).await;
                }
                _ = self.keepalive.as_mut() => {
                    let period = self.hub.config.keepalive;
                    self.keepalive.as_mut().reset(tokio::time::Instant::now() + period);
                    let at = self.next.saturating_sub(1);
                    return Some(Bytes::from(format!(": keep-alive {at}\n\n")));
                }
            }
        }
    }

    fn drain(&mut self) -> Option<Bytes> {
        let first = self.queue.pop_front()?;
        if self.queue.is_empty() {
            return Some(first);
        }
        let mut buf = BytesMut::from(&first[..]);
        while let Some(f) = self.queue.front() {
            if buf.len() + f.len() > COALESCE_BYTES {
                break;
            }
            buf.extend_from_slice(f);
            self.queue.pop_front();
        }
        Some(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    /// An idle stream's state is what 10,000 open streams multiply: the rare catch-up path is
    /// boxed so it does not sit in every stream's future.
    #[tokio::test]
    async fn an_idle_stream_is_small() {
        let hub = super::Hub::new(
            std::sync::Arc::new(crate::store::MemoryStore::new()),
            None,
            tokio_util::sync::CancellationToken::new(),
            super::LiveConfig::default(),
        );
        let id = crate::id::ThreadId::parse("x").unwrap();
        let sub = hub.subscribe(&id).await.unwrap();
        let mut c = super::Subscriber {
            hub: hub.clone(),
            id,
            sub,
            next: 1,
            queue: Default::default(),
            flushed_sent: 0,
            flushed_pending: None,
            done: false,
            snapshot_on_reset: false,
            keepalive: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(1))),
            retry: None,
        };
        assert!(std::mem::size_of_val(&c) < 512);
        let next = c.next_chunk();
        assert!(
            std::mem::size_of_val(&next) < 1024,
            "{}",
            std::mem::size_of_val(&next)
        );
    }
}
