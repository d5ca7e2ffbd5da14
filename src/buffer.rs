//! Buffered writes: each thread's log in NATS JetStream, folded into the snapshot store.
//!
//! Every write is one message on the thread's subject `<prefix>.log.<encoded id>` carrying
//! its version in a header. Appends publish with JetStream's expected-last-subject-sequence,
//! so the version is a compare-and-set that holds across replicas, and answer once JetStream
//! has stored the message. A fold reads the subject with an ordered consumer (no acks, so no
//! max-ack-pending cap), applies the entries above the store's watermark in chunks through
//! [`Store::apply_batch`] (exactly once: the store skips what it already has), and only then
//! purges what it covered. Nothing here needs a durable consumer, so any number of folds and
//! recoveries on any number of replicas can overlap safely.
//!
//! Retention: the stream keeps messages for [`MAX_AGE`] at most (a safety net, never the
//! mechanism): idle tails are folded after `--fold-idle`, at run end, on flush, at start-up
//! and at shutdown. Folded messages younger than two minutes are kept a little longer, so
//! most `Idempotency-Key` retries find their original in the log; later ones (within
//! JetStream's duplicate window) are answered from the keys the store remembered when it
//! folded them.

use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread, plan_delta};
use crate::store::record::Record;
use crate::store::{
    Appended, Change, DynStore, Expect, Folded, IdempotencyKey, Snapshot, StoreError,
};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Safety-net retention of the log stream; folds happen long before this.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// JetStream's de-duplication window for `Idempotency-Key` retries: longer than a client's
/// retry loop, short enough that the server's memory of message ids stays small. A retry whose
/// original was already folded and trimmed is answered from the keys the store remembered.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// Folded messages younger than this stay in the log, so most retries find their original
/// there without asking the store.
const KEEP_FOLDED: Duration = Duration::from_secs(120);
/// Entries applied per store transaction during a fold: bounds transaction size and memory
/// for very long runs while keeping per-transaction overhead small.
const FOLD_CHUNK: usize = 1_000;
/// Compare-and-set retries when other writers keep winning the race for a thread.
const MAX_CAS_ATTEMPTS: usize = 32;
/// Retries of a head refresh that raced a concurrent fold.
const MAX_REFRESH_ATTEMPTS: usize = 8;
/// Idle per-thread locks are pruned once this many exist (pruning scans them all).
const PRUNE_LOCKS_ABOVE: usize = 1_024;
/// Longest back-off between failed fold attempts of one thread.
const MAX_FOLD_BACKOFF: Duration = Duration::from_secs(30);

const H_VERSION: &str = "Tg-Version";
const H_IDEM_KEY: &str = "Tg-Idem-Key";
const H_IDEM_FP: &str = "Tg-Idem-Fp";

/// What one log message carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Entry {
    Delta(ChangeSet),
    Replace(Thread),
    Metadata(Extra),
    /// The thread was deleted; nothing after it belongs to that thread.
    Deleted,
}

impl Entry {
    /// The store change this entry stands for (`None` for a tombstone).
    pub(crate) fn into_change(self) -> Option<Change> {
        match self {
            Entry::Delta(d) => Some(Change::Delta(d)),
            Entry::Replace(t) => Some(Change::Replace(t)),
            Entry::Metadata(m) => Some(Change::Metadata(m)),
            Entry::Deleted => None,
        }
    }
}

/// One decoded log message.
#[derive(Debug, Clone)]
pub struct LogMsg {
    pub seq: u64,
    pub version: u64,
    pub entry: Entry,
    pub idempotency: Option<IdempotencyKey>,
    /// Unix milliseconds when JetStream stored it.
    pub at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("message log unavailable: {0}")]
    LogUnavailable(String),
    #[error("entry of {size} bytes exceeds the message log's limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("fold blocked: {0}")]
    FoldBlocked(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn log_err(e: impl std::fmt::Display) -> Error {
    Error::LogUnavailable(e.to_string())
}

#[derive(Debug, Clone)]
pub struct BufferConfig {
    pub url: String,
    /// Namespaces the stream and subjects: `[A-Za-z0-9_-]+`.
    pub prefix: String,
    /// Threads whose newest buffered entry is older than this are folded by the sweeper.
    pub fold_idle: Duration,
}

/// The head of a thread as this process last saw it.
#[derive(Debug, Clone)]
struct Head {
    /// The subject's last stream sequence (0 when empty): the compare-and-set position.
    seq: u64,
    version: u64,
    /// The current state with every buffered entry applied: validates the next delta.
    state: Value,
}

/// Counters exported at `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub appends: Counter,
    pub folds: Counter,
    pub folded_entries: Counter,
    pub fold_failures: Counter,
    pub dead_letters: Counter,
    pub cas_retries: Counter,
}

impl Counters {
    pub fn register(&self, registry: &mut Registry) {
        let c = |c: &Counter| c.clone();
        registry.register(
            "threadgate_buffered_appends",
            "Writes published to the log",
            c(&self.appends),
        );
        registry.register("threadgate_folds", "Completed folds", c(&self.folds));
        registry.register(
            "threadgate_folded_entries",
            "Log entries applied to the store by folds",
            c(&self.folded_entries),
        );
        registry.register(
            "threadgate_fold_failures",
            "Folds that failed and will be retried",
            c(&self.fold_failures),
        );
        registry.register(
            "threadgate_dead_letters",
            "Undecodable log messages set aside",
            c(&self.dead_letters),
        );
        registry.register(
            "threadgate_cas_retries",
            "Appends retried after losing a compare-and-set race",
            c(&self.cas_retries),
        );
    }
}

/// Why a fold stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FoldReport {
    /// The store's watermark after the fold.
    pub version: u64,
    /// Entries applied by this fold (others may have been applied by a concurrent fold).
    pub applied: u64,
}

pub struct Buffer {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    store: DynStore,
    heads: Mutex<HashMap<ThreadId, Head>>,
    /// Serialises folds of one thread within this process (other replicas are safe anyway).
    fold_locks: KeyedLocks,
    /// Serialises this process's writes to one thread, so local writers queue instead of
    /// racing each other's compare-and-set (only other replicas can make a publish retry).
    write_locks: KeyedLocks,
    /// Stream sequences already set aside by this process (count and copy each once).
    dead_seen: Mutex<std::collections::HashSet<u64>>,
    max_payload: usize,
    fold_idle: Duration,
    pub counters: Counters,
}

impl Buffer {
    pub async fn connect(config: &BufferConfig, store: DynStore) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(
            !config.prefix.is_empty()
                && config
                    .prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "--nats-prefix must be letters, digits, `_` or `-`"
        );
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(&config.url)
            .await?;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_or_create_stream(stream::Config {
                name: format!("{}_log", config.prefix),
                subjects: vec![format!("{}.log.>", config.prefix)],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::New,
                max_age: MAX_AGE,
                duplicate_window: DUPLICATE_WINDOW,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the JetStream stream: {e}"))?;
        js.get_or_create_stream(stream::Config {
            name: format!("{}_dead", config.prefix),
            subjects: vec![format!("{}.dead.>", config.prefix)],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the dead-letter stream: {e}"))?;
        let max_payload = client.server_info().max_payload;
        Ok(Arc::new(Buffer {
            client,
            js,
            stream,
            prefix: config.prefix.clone(),
            store,
            heads: Mutex::new(HashMap::new()),
            fold_locks: KeyedLocks::default(),
            write_locks: KeyedLocks::default(),
            dead_seen: Mutex::new(Default::default()),
            max_payload,
            fold_idle: config.fold_idle,
            counters: Counters::default(),
        }))
    }

    /// The JetStream stream holding every thread's log.
    pub fn stream_name(&self) -> String {
        format!("{}_log", self.prefix)
    }

    pub fn subject(&self, id: &ThreadId) -> String {
        format!("{}.log.{}", self.prefix, id.encoded())
    }

    /// Core-NATS subject for notifications that are not log entries (`flushed`).
    pub fn event_subject(&self, id: &ThreadId) -> String {
        format!("{}.ev.{}", self.prefix, id.encoded())
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn cached(&self, id: &ThreadId) -> Option<Head> {
        self.heads.lock().ok()?.get(id).cloned()
    }

    fn remember(&self, id: &ThreadId, head: Option<Head>) {
        if let Ok(mut heads) = self.heads.lock() {
            match head {
                Some(h) => heads.insert(id.clone(), h),
                None => heads.remove(id),
            };
        }
    }

    /// Reads every message on the thread's subject, oldest first.
    pub async fn read_log(&self, id: &ThreadId) -> Result<Vec<LogMsg>> {
        self.read_log_from(id, None).await
    }

    /// Reads the thread's messages from stream sequence `start` on (all when `None`).
    async fn read_log_from(&self, id: &ThreadId, start: Option<u64>) -> Result<Vec<LogMsg>> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subject(id),
                deliver_policy: match start {
                    Some(start_sequence) => {
                        consumer::DeliverPolicy::ByStartSequence { start_sequence }
                    }
                    None => consumer::DeliverPolicy::All,
                },
                ..Default::default()
            })
            .await
            .map_err(log_err)?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(log_err)?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(log_err)?;
            let info = msg.info().map_err(log_err)?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let at = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
            match decode(msg.headers.as_ref(), &msg.payload) {
                Ok((version, entry, idempotency)) => out.push(LogMsg {
                    seq,
                    version,
                    entry,
                    idempotency,
                    at,
                }),
                Err(why) => {
                    self.dead_letter(id, seq, msg.headers.clone(), msg.payload.clone(), &why)
                        .await;
                    return Err(Error::FoldBlocked(format!(
                        "log message {seq} of thread {id} does not decode ({why}); it was copied \
                         to {}.dead.{} and left in place",
                        self.prefix,
                        id.encoded()
                    )));
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Copies an undecodable message to the dead-letter stream, counts and logs it.
    async fn dead_letter(
        &self,
        id: &ThreadId,
        seq: u64,
        headers: Option<HeaderMap>,
        payload: bytes::Bytes,
        why: &str,
    ) {
        let first_time = self
            .dead_seen
            .lock()
            .map(|mut seen| seen.insert(seq))
            .unwrap_or(true);
        if !first_time {
            return;
        }
        self.counters.dead_letters.inc();
        tracing::error!(thread = %id, seq, %why, "undecodable log message set aside");
        let mut h = headers.unwrap_or_default();
        h.insert("Tg-Original-Seq", seq.to_string().as_str());
        h.insert("Nats-Msg-Id", format!("dead-{seq}").as_str());
        let subject = format!("{}.dead.{}", self.prefix, id.encoded());
        if let Ok(ack) = self.js.publish_with_headers(subject, h, payload).await {
            let _ = ack.await;
        }
    }

    /// The thread's head: from the cache, or rebuilt from the store plus the log.
    async fn head(&self, id: &ThreadId, fresh: bool) -> Result<Head> {
        let cached = self.cached(id);
        if let Some(h) = &cached {
            if !fresh {
                return Ok(h.clone());
            }
            // Another writer moved on: read only what it appended since our position.
            if let Some(head) = self.advance(id, h).await? {
                self.remember(id, Some(head.clone()));
                return Ok(head);
            }
        }
        let head = self.refresh(id).await?;
        self.remember(id, Some(head.clone()));
        Ok(head)
    }

    /// The cached head moved forward by the entries published after it, or `None` when that
    /// does not give a consistent head (purged, deleted, out of order): then a full refresh.
    async fn advance(&self, id: &ThreadId, cached: &Head) -> Result<Option<Head>> {
        let log = self.read_log_from(id, Some(cached.seq + 1)).await?;
        let Some(last) = log.last() else {
            return Ok(None);
        };
        let mut head = cached.clone();
        for m in &log {
            if m.entry == Entry::Deleted || m.version != head.version + 1 {
                return Ok(None);
            }
            let Ok(state) = next_state(&head.state, &m.entry, id) else {
                return Ok(None);
            };
            head.state = state;
            head.version = m.version;
        }
        head.seq = last.seq;
        Ok(Some(head))
    }

    async fn refresh(&self, id: &ThreadId) -> Result<Head> {
        for _ in 0..MAX_REFRESH_ATTEMPTS {
            let log = self.read_log(id).await?;
            if matches!(log.last(), Some(m) if m.entry == Entry::Deleted) {
                return Err(StoreError::NotFound.into());
            }
            let (mut state, watermark) = self.store.state(id).await?;
            let last_seq = log.last().map_or(0, |m| m.seq);
            let tail: Vec<&LogMsg> = log.iter().filter(|m| m.version > watermark).collect();
            // The store moved past what we read (a fold committed in between): read again.
            if log.last().is_some_and(|m| m.version < watermark)
                || tail.first().is_some_and(|m| m.version != watermark + 1)
            {
                continue;
            }
            let mut version = watermark;
            for m in tail {
                state = next_state(&state, &m.entry, id)?;
                version = m.version;
            }
            return Ok(Head {
                seq: last_seq,
                version,
                state,
            });
        }
        Err(Error::LogUnavailable(format!(
            "thread {id}: could not read a consistent head"
        )))
    }

    /// Publishes `entry` as the thread's next version with a compare-and-set on the subject.
    /// `validate` computes the state after the entry from the state before it.
    pub async fn write(
        &self,
        id: &ThreadId,
        entry: Entry,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Appended> {
        if !self.is_connected() {
            return Err(Error::LogUnavailable("not connected to NATS".into()));
        }
        let payload: bytes::Bytes = serde_json::to_vec(&entry)
            .map_err(|e| Error::Store(StoreError::Internal(e.to_string())))?
            .into();
        // Headers and protocol framing need room too.
        let limit = self.max_payload.saturating_sub(1024);
        if payload.len() > limit {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit,
            });
        }
        let lock = self.write_locks.get(id);
        let _guard = lock.lock().await;
        let mut fresh = false;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let head = self.head(id, fresh).await?;
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
            let state = match next_state(&head.state, &entry, id) {
                Ok(s) => s,
                // A cached state may be stale: judge the entry against the real head.
                Err(_) if !fresh => {
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let version = head.version + 1;
            let mut publish = jetstream::context::Publish::build()
                .payload(payload.clone())
                .expected_last_subject_sequence(head.seq)
                .header(H_VERSION, version.to_string().as_str());
            if let Some(key) = idempotency {
                publish = publish
                    .message_id(format!("{}:{}", id.encoded(), key.key))
                    .header(H_IDEM_KEY, key.key.as_str())
                    .header(H_IDEM_FP, key.fingerprint.as_str());
            }
            let sent = self.js.send_publish(self.subject(id), publish).await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) if ack.duplicate => {
                    return self.replayed(id, ack.sequence, idempotency).await;
                }
                Ok(ack) => {
                    self.remember(
                        id,
                        Some(Head {
                            seq: ack.sequence,
                            version,
                            state,
                        }),
                    );
                    self.counters.appends.inc();
                    return Ok(Appended {
                        version,
                        replayed: false,
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    self.counters.cas_retries.inc();
                    fresh = true;
                }
                Err(e) => {
                    self.remember(id, None);
                    return Err(log_err(e));
                }
            }
        }
        Err(Error::LogUnavailable(format!(
            "thread {id}: too much write contention, retry"
        )))
    }

    /// The earlier write with this idempotency key still in the log (the duplicate window's
    /// worth is kept), answered as a replay.
    async fn find_key(&self, id: &ThreadId, key: &IdempotencyKey) -> Result<Option<Appended>> {
        let log = self.read_log(id).await?;
        let Some(first) = log
            .iter()
            .find(|m| m.idempotency.as_ref().is_some_and(|k| k.key == key.key))
        else {
            // Folded and trimmed: the store remembers the keys it folded.
            return Ok(self.store.idempotent(id, key).await?);
        };
        if first
            .idempotency
            .as_ref()
            .is_some_and(|k| k.fingerprint != key.fingerprint)
        {
            return Err(StoreError::IdempotencyKeyReused.into());
        }
        Ok(Some(Appended {
            version: first.version,
            replayed: true,
        }))
    }

    /// Answers a JetStream duplicate with the version the first request produced.
    async fn replayed(
        &self,
        id: &ThreadId,
        seq: u64,
        key: Option<&IdempotencyKey>,
    ) -> Result<Appended> {
        let original = match self.stream.get_raw_message(seq).await {
            Ok(m) => m,
            // Folded and trimmed while JetStream still remembers the message id: the store
            // remembers the keys it folded.
            Err(e) => {
                if let Some(key) = key
                    && let Some(replay) = self.store.idempotent(id, key).await?
                {
                    return Ok(replay);
                }
                return Err(log_err(e));
            }
        };
        let (version, _, first) = decode(Some(&original.headers), &original.payload)
            .map_err(|why| Error::FoldBlocked(format!("log message {seq}: {why}")))?;
        if let (Some(key), Some(first)) = (key, first)
            && key.fingerprint != first.fingerprint
        {
            return Err(StoreError::IdempotencyKeyReused.into());
        }
        Ok(Appended {
            version,
            replayed: true,
        })
    }

    /// Deletes a thread: a tombstone in the log (so racing appends see it), then the store,
    /// then the whole subject.
    pub async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()> {
        self.write(id, Entry::Deleted, expect, None).await?;
        match self.store.delete(id, Expect::Any).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.purge(id, None).await?;
        self.remember(id, None);
        Ok(())
    }

    /// Before a create: clears what a deleted thread of the same id left in the log.
    /// Returns whether the subject is now empty (so a fresh head can be cached).
    pub async fn prepare_create(&self, id: &ThreadId) -> Result<bool> {
        self.remember(id, None);
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(id))
            .await
        {
            Ok(last) => {
                let deleted = matches!(
                    decode(Some(&last.headers), &last.payload),
                    Ok((_, Entry::Deleted, _))
                );
                if deleted {
                    self.purge(id, None).await?;
                }
                Ok(deleted)
            }
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(true)
            }
            Err(e) => Err(log_err(e)),
        }
    }

    /// Caches the head of a thread just created on an empty subject, so its first appends
    /// need only NATS (not even the store).
    pub fn created(&self, id: &ThreadId, state: Value) {
        self.remember(
            id,
            Some(Head {
                seq: 0,
                version: 0,
                state,
            }),
        );
    }

    /// Removes the thread's messages with sequence below `before` (all when `None`).
    async fn purge(&self, id: &ThreadId, before: Option<u64>) -> Result<()> {
        let purge = self.stream.purge().filter(self.subject(id));
        match before {
            Some(seq) => purge.sequence(seq).await,
            None => purge.await,
        }
        .map(|_| ())
        .map_err(log_err)
    }

    /// Folds the thread's buffered tail into the store, exactly once, then trims the log.
    pub async fn fold(&self, id: &ThreadId) -> Result<FoldReport> {
        let lock = self.fold_locks.get(id);
        let _guard = lock.lock().await;
        let result = self.fold_locked(id).await;
        match &result {
            Ok(r) => {
                self.counters.folds.inc();
                self.counters.folded_entries.inc_by(r.applied);
                let _ = self
                    .client
                    .publish(
                        self.event_subject(id),
                        serde_json::to_vec(&serde_json::json!({"flushed": r.version}))
                            .unwrap_or_default()
                            .into(),
                    )
                    .await;
            }
            Err(Error::Store(StoreError::NotFound)) => {}
            Err(e) => {
                self.counters.fold_failures.inc();
                tracing::warn!(thread = %id, error = %e, "fold failed; the tail stays buffered");
            }
        }
        result
    }

    async fn fold_locked(&self, id: &ThreadId) -> Result<FoldReport> {
        let log = self.read_log(id).await?;
        if log.iter().any(|m| m.entry == Entry::Deleted) {
            match self.store.delete(id, Expect::Any).await {
                Ok(()) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
            self.purge(id, None).await?;
            self.remember(id, None);
            return Err(StoreError::NotFound.into());
        }
        let watermark = match self.store.version(id).await {
            Ok(w) => w,
            Err(StoreError::NotFound) => {
                // A thread that is gone: whatever is left can never be folded.
                if let Some(last) = log.last() {
                    self.purge(id, Some(last.seq + 1)).await?;
                }
                return Err(StoreError::NotFound.into());
            }
            Err(e) => return Err(e.into()),
        };
        let pending: Vec<&LogMsg> = log.iter().filter(|m| m.version > watermark).collect();
        let mut version = watermark;
        let mut applied = 0;
        for chunk in pending.chunks(FOLD_CHUNK) {
            let entries: Vec<Folded> = chunk
                .iter()
                .filter_map(|m| {
                    Some(Folded {
                        version: m.version,
                        change: m.entry.clone().into_change()?,
                        idempotency: m.idempotency.clone(),
                    })
                })
                .collect();
            version = self.store.apply_batch(id, &entries).await?;
            applied += entries.len() as u64;
        }
        // Trim what is folded, but keep recent messages so a retried
        // Idempotency-Key still finds its original.
        let window_start = now_ms() - KEEP_FOLDED.as_millis() as i64;
        let keep_from = log
            .iter()
            .find(|m| m.version > version || m.at >= window_start)
            .map(|m| m.seq);
        match keep_from {
            Some(seq) if log.first().is_some_and(|m| m.seq < seq) => {
                self.purge(id, Some(seq)).await?
            }
            None if !log.is_empty() => {
                self.purge(id, Some(log.last().map_or(0, |m| m.seq) + 1))
                    .await?
            }
            _ => {}
        }
        Ok(FoldReport { version, applied })
    }

    /// The ids of every thread with messages in the log.
    pub async fn buffered_threads(&self) -> Result<Vec<(ThreadId, u64)>> {
        let mut stream = self.stream.clone();
        let info = stream.info().await.map_err(log_err)?;
        if info.state.messages == 0 {
            return Ok(Vec::new());
        }
        let mut subjects = self
            .stream
            .info_with_subjects(format!("{}.log.>", self.prefix))
            .await
            .map_err(log_err)?;
        let mut out = Vec::new();
        let prefix = format!("{}.log.", self.prefix);
        while let Some(item) = subjects.next().await {
            let (subject, count) = item.map_err(log_err)?;
            if let Some(id) = subject.strip_prefix(&prefix).and_then(ThreadId::decode) {
                out.push((id, count as u64));
            }
        }
        Ok(out)
    }

    /// Folds every buffered thread (start-up recovery and shutdown).
    pub async fn fold_all(&self) -> Result<usize> {
        let threads = self.buffered_threads().await?;
        let mut folded = 0;
        for (id, _) in &threads {
            if self.fold(id).await.is_ok() {
                folded += 1;
            }
        }
        Ok(folded)
    }

    /// Folds threads whose newest entry is older than the idle age, until cancelled;
    /// failures back off per thread, doubling up to [`MAX_FOLD_BACKOFF`].
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let interval = (self.fold_idle / 2).max(Duration::from_millis(100));
        let mut backoff: HashMap<ThreadId, (tokio::time::Instant, Duration)> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let Ok(threads) = self.buffered_threads().await else {
                continue;
            };
            for (id, _) in threads {
                if backoff
                    .get(&id)
                    .is_some_and(|(until, _)| *until > tokio::time::Instant::now())
                {
                    continue;
                }
                let idle = match self
                    .stream
                    .get_last_raw_message_by_subject(&self.subject(&id))
                    .await
                {
                    Ok(m) => {
                        let at = m.time.unix_timestamp_nanos() / 1_000_000;
                        (now_ms() as i128 - at) >= self.fold_idle.as_millis() as i128
                    }
                    Err(_) => false,
                };
                if !idle {
                    continue;
                }
                match self.fold(&id).await {
                    Ok(_) | Err(Error::Store(StoreError::NotFound)) => {
                        backoff.remove(&id);
                    }
                    Err(_) => {
                        let next = backoff
                            .get(&id)
                            .map_or(interval, |(_, d)| (*d * 2).min(MAX_FOLD_BACKOFF));
                        backoff.insert(id, (tokio::time::Instant::now() + next, next));
                    }
                }
            }
        }
    }

    /// The thread with its buffered tail applied (read-your-writes).
    pub async fn live_record(&self, id: &ThreadId) -> Result<Record> {
        for _ in 0..MAX_REFRESH_ATTEMPTS {
            let log = self.read_log(id).await?;
            if log.iter().any(|m| m.entry == Entry::Deleted) {
                return Err(StoreError::NotFound.into());
            }
            let snap = self.store.get(id).await?;
            let tail: Vec<Folded> = log
                .iter()
                .filter(|m| m.version > snap.version)
                .filter_map(|m| {
                    Some(Folded {
                        version: m.version,
                        change: m.entry.clone().into_change()?,
                        idempotency: None,
                    })
                })
                .collect();
            if log.last().is_some_and(|m| m.version < snap.version)
                || tail.first().is_some_and(|m| m.version != snap.version + 1)
            {
                continue;
            }
            let mut record = Record::from_snapshot(snap)?;
            record.apply_batch(&tail, now_ms())?;
            return Ok(record);
        }
        Err(Error::LogUnavailable(format!(
            "thread {id}: could not read a consistent live view"
        )))
    }

    /// The version a thread has reached including its buffered tail.
    pub async fn head_version(&self, id: &ThreadId) -> Result<u64> {
        Ok(self.head(id, true).await?.version)
    }

    /// Whether NATS answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        if !self.is_connected() {
            return Err(Error::LogUnavailable("not connected to NATS".into()));
        }
        self.client.flush().await.map_err(log_err)
    }

    /// The snapshot the store has (the default read view).
    pub async fn stored(&self, id: &ThreadId) -> Result<Snapshot> {
        Ok(self.store.get(id).await?)
    }
}

/// One async mutex per thread id, dropped when nobody holds or waits for it.
#[derive(Default)]
struct KeyedLocks(Mutex<HashMap<ThreadId, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    fn get(&self, id: &ThreadId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > PRUNE_LOCKS_ABOVE {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(id.clone()).or_default().clone()
    }
}

/// The state after `entry`, validating that it applies.
fn next_state(state: &Value, entry: &Entry, id: &ThreadId) -> Result<Value> {
    Ok(match entry {
        Entry::Delta(delta) => {
            let mut delta = delta.clone();
            delta.normalize();
            plan_delta(state, &delta, |_| false)
                .map_err(StoreError::from)?
                .new_current_state
        }
        Entry::Replace(thread) => {
            let mut t = thread.clone();
            crate::store::prepare_thread(id, &mut t)?
        }
        Entry::Metadata(_) | Entry::Deleted => state.clone(),
    })
}

/// Decodes a log message: its version header, entry and idempotency key.
pub fn decode(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> std::result::Result<(u64, Entry, Option<IdempotencyKey>), String> {
    let headers = headers.ok_or("no headers")?;
    let version = headers
        .get(H_VERSION)
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or("no valid Tg-Version header")?;
    let entry: Entry = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let idempotency = match (headers.get(H_IDEM_KEY), headers.get(H_IDEM_FP)) {
        (Some(k), Some(f)) => Some(IdempotencyKey {
            key: k.as_str().to_owned(),
            fingerprint: f.as_str().to_owned(),
        }),
        _ => None,
    };
    Ok((version, entry, idempotency))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
