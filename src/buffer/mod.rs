//! Buffered writes (`--nats-url`): every write is an entry in the thread's JetStream log,
//! folded into the snapshot store later.
//!
//! * [`log`]: the log itself (subjects, encoding, bounded reads, following, trimming).
//! * [`write`](self#writes): appends publish with JetStream's expected-last-subject-sequence, so
//!   the version is a compare-and-set that holds across replicas, and answer once JetStream
//!   has stored the entry. Each process caches the head of recently written threads (their
//!   last sequence, version and state) in a cache bounded in bytes (`--head-cache`); a miss
//!   re-reads the store and the log.
//! * [`fold`](self#folds): a fold applies the entries above the store's watermark in pages
//!   through [`crate::store::Store::apply_batch`] (exactly once: the store skips what it
//!   already has), and only then trims what it covered. Folds run at run end, on flush, for
//!   idle threads, at start-up (recovery) and at shutdown; nothing needs a durable consumer,
//!   so any number of folds on any number of replicas can overlap safely.
//!
//! A full save that moves a thread to another `resource_id` is folded before it is answered,
//! like a `RunFinished`: scoped reads are checked against the owner the store holds, which so
//! changes with the move (writes check the cached head, which a compare-and-set keeps exact).
//!
//! Retention: the stream keeps messages for [`log::MAX_AGE`] at most (a safety net, never
//! the mechanism). Folded entries younger than two minutes are kept a little longer, so most
//! `Idempotency-Key` retries find their original in the log; later ones (within JetStream's
//! duplicate window) are answered from the keys the store remembered when it folded them.

mod fold;
pub mod log;
mod pending;
mod sweep;
mod write;

use crate::auth::Scope;
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::record::Record;
use crate::store::{DynStore, Expect, IdempotencyKey, Incarnation, Snapshot};
use crate::write::{AppendOutcome, FoldReport, Result, WritePath};
use async_trait::async_trait;
use log::{Log, LogConfig};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default byte budget of the head cache.
pub const DEFAULT_HEAD_CACHE_BYTES: u64 = 64 << 20;
/// Idle per-thread locks are pruned once this many exist (pruning scans them all).
const PRUNE_LOCKS_ABOVE: usize = 1_024;
/// Entries per page of a log read: bounds the memory of every read and the size of each
/// fold transaction, while keeping per-transaction overhead small.
pub const PAGE: usize = 1_000;

/// What buffered mode needs besides the store.
#[derive(Debug, Clone)]
pub struct BufferConfig {
    /// How to reach NATS.
    pub log: LogConfig,
    /// Threads whose newest entry is older than this are folded by the sweeper.
    pub fold_idle: Duration,
    /// Bytes of thread state the head cache may hold (roughly: JSON text size).
    pub head_cache_bytes: u64,
    /// Folded entries younger than this stay in the log, so most `Idempotency-Key` retries
    /// find their original there without asking the store.
    pub keep_folded: Duration,
}

/// Counters exported at `/metrics`.
#[derive(Debug)]
pub struct Counters {
    /// Writes published to the log.
    pub appends: Counter,
    /// Completed folds.
    pub folds: Counter,
    /// Entries folds applied.
    pub folded_entries: Counter,
    /// Folds that failed (retried later).
    pub fold_failures: Counter,
    /// Threads whose kept entries were trimmed without a fold (see `sweep.rs`).
    pub trims: Counter,
    /// Appends retried after losing a compare-and-set.
    pub cas_retries: Counter,
    /// How long completed folds took.
    pub fold_seconds: Histogram,
    /// Log entries above their thread's store watermark (see the `pending` module).
    pub pending_entries: Gauge,
    /// Age of the oldest of them, in seconds.
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            appends: Counter::default(),
            folds: Counter::default(),
            folded_entries: Counter::default(),
            fold_failures: Counter::default(),
            trims: Counter::default(),
            cas_retries: Counter::default(),
            // 1 ms to about 65 s.
            fold_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            pending_entries: Gauge::default(),
            oldest_pending_seconds: Gauge::default(),
        }
    }
}

/// The head of a thread as this process last saw it.
#[derive(Debug, Clone)]
struct Head {
    /// The subject's last stream sequence (0 when empty): the compare-and-set position.
    seq: u64,
    version: u64,
    incarnation: Incarnation,
    /// The thread's `resource_id` with every buffered entry applied: the owner a scoped
    /// write is checked against (the compare-and-set publish proves it current).
    resource_id: Option<String>,
    /// The current state with every buffered entry applied: validates the next delta.
    state: Value,
    /// Approximate bytes held, for the cache's budget.
    weight: u64,
}

/// Weighs cached heads by their approximate size.
#[derive(Clone)]
struct HeadWeight;

impl quick_cache::Weighter<ThreadId, Arc<Head>> for HeadWeight {
    fn weight(&self, id: &ThreadId, head: &Arc<Head>) -> u64 {
        head.weight + id.as_str().len() as u64 + 64
    }
}

type HeadCache = quick_cache::sync::Cache<ThreadId, Arc<Head>, HeadWeight>;

/// The buffered write path (see the module docs).
pub struct Buffered {
    log: Log,
    store: DynStore,
    heads: HeadCache,
    /// Serialises folds of one thread within this process (other replicas are safe anyway).
    fold_locks: KeyedLocks,
    /// What this process's folds covered, so the sweeper skips idle threads.
    marks: sweep::Marks,
    /// Serialises this process's writes to one thread, so local writers queue instead of
    /// racing each other's compare-and-set (only other replicas can make a publish retry).
    write_locks: KeyedLocks,
    fold_idle: Duration,
    keep_folded: Duration,
    counters: Counters,
    /// Where background work (recovery, sweeper, run-end folds) runs, so shutdown can wait.
    tasks: TaskTracker,
    /// This value's own handle, for tasks it spawns.
    me: std::sync::Weak<Buffered>,
}

impl Buffered {
    /// Connects to NATS (creating the streams if needed).
    pub async fn connect(
        config: &BufferConfig,
        store: DynStore,
        tasks: TaskTracker,
    ) -> anyhow::Result<Arc<Self>> {
        let log = Log::connect(&config.log).await?;
        let capacity = config.head_cache_bytes.max(1);
        let heads = HeadCache::with_weighter(
            (capacity / 4096).clamp(16, 1 << 20) as usize,
            capacity,
            HeadWeight,
        );
        Ok(Arc::new_cyclic(|me| Buffered {
            log,
            store,
            heads,
            fold_locks: KeyedLocks::default(),
            marks: sweep::Marks::default(),
            write_locks: KeyedLocks::default(),
            fold_idle: config.fold_idle,
            keep_folded: config.keep_folded,
            counters: Counters::default(),
            tasks,
            me: me.clone(),
        }))
    }

    /// A handle on this value for spawned tasks.
    fn handle(&self) -> std::sync::Weak<Buffered> {
        self.me.clone()
    }

    /// The log, for the live hub.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Starts start-up recovery and the idle sweeper; both end with `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let b = self.clone();
        let stop = shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                folded = b.fold_all() => match folded {
                    Ok(n) => tracing::info!(threads = n, "start-up recovery folded buffered threads"),
                    Err(e) => tracing::warn!(error = %e, "start-up recovery failed; the sweeper retries"),
                },
            }
        });
        self.tasks.spawn(self.clone().sweep(shutdown));
    }

    /// Registers the counters.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.counters;
        for (name, help, counter) in [
            (
                "threadgate_buffered_appends",
                "Writes published to the log",
                &c.appends,
            ),
            ("threadgate_folds", "Completed folds", &c.folds),
            (
                "threadgate_folded_entries",
                "Log entries applied to the store by folds",
                &c.folded_entries,
            ),
            (
                "threadgate_fold_failures",
                "Folds that failed and will be retried",
                &c.fold_failures,
            ),
            (
                "threadgate_log_trims",
                "Folded threads whose kept entries were trimmed (one purge, no fold)",
                &c.trims,
            ),
            (
                "threadgate_cas_retries",
                "Appends retried after losing a compare-and-set race",
                &c.cas_retries,
            ),
            (
                "threadgate_dead_letters",
                "Undecodable log messages set aside",
                self.log.dead_letters(),
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "threadgate_fold_duration_seconds",
            "How long completed folds took",
            c.fold_seconds.clone(),
        );
        registry.register(
            "threadgate_buffered_pending_entries",
            "Log entries not folded into the store yet (as of the last idle sweep)",
            c.pending_entries.clone(),
        );
        registry.register(
            "threadgate_buffered_oldest_pending_seconds",
            "Age of the oldest log entry of a thread with unfolded entries (as of the last \
             idle sweep; may overstate by up to --keep-folded)",
            c.oldest_pending_seconds.clone(),
        );
    }

    fn cached(&self, id: &ThreadId) -> Option<Arc<Head>> {
        self.heads.get(id)
    }

    /// Caches `head` and hands it back shared.
    fn remember_head(&self, id: &ThreadId, head: Head) -> Arc<Head> {
        let head = Arc::new(head);
        self.heads.insert(id.clone(), head.clone());
        head
    }

    fn remember(&self, id: &ThreadId, head: Option<Head>) {
        match head {
            Some(h) => self.heads.insert(id.clone(), Arc::new(h)),
            None => {
                self.heads.remove(id);
            }
        }
    }
}

#[async_trait]
impl WritePath for Buffered {
    async fn create(&self, id: &ThreadId, thread: Thread) -> Result<Snapshot> {
        self.create_thread(id, thread).await
    }

    async fn append(
        &self,
        scope: &Scope,
        id: &ThreadId,
        delta: ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        self.append_delta(scope, id, delta, expect, idempotency)
            .await
    }

    async fn replace(
        &self,
        scope: &Scope,
        id: &ThreadId,
        thread: Thread,
        expect: Expect,
    ) -> Result<u64> {
        self.replace_thread(scope, id, thread, expect).await
    }

    async fn patch_metadata(
        &self,
        scope: &Scope,
        id: &ThreadId,
        patch: Extra,
        expect: Expect,
    ) -> Result<u64> {
        let change = crate::store::Change::Metadata(patch);
        Ok(self
            .write(scope, id, Some(change), expect, None)
            .await?
            .version)
    }

    async fn delete(&self, scope: &Scope, id: &ThreadId, expect: Expect) -> Result<()> {
        self.delete_thread(scope, id, expect).await
    }

    async fn flush(&self, id: &ThreadId) -> Result<FoldReport> {
        self.fold(id).await
    }

    async fn live(&self, id: &ThreadId) -> Result<Option<Record>> {
        self.live_record(id).await.map(Some)
    }

    async fn live_version(&self, id: &ThreadId) -> Result<Option<u64>> {
        Ok(Some(self.head(id, true).await?.version))
    }

    async fn ready(&self) -> Result<()> {
        self.log.ping().await
    }

    fn mode(&self) -> &'static str {
        "buffered"
    }

    async fn stored_behind(&self, id: &ThreadId) -> Option<u64> {
        self.store.version(id).await.ok()
    }

    async fn shutdown(&self) {
        match self.fold_all().await {
            Ok(n) => tracing::info!(threads = n, "folded buffered threads at shutdown"),
            Err(e) => tracing::warn!(error = %e, "shutdown fold failed; recovery will fold"),
        }
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

/// Roughly how many bytes a value holds (its JSON text size plus per-node overhead);
/// iterative, so safe on any value.
fn approx_size(v: &Value) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total += 16;
        match v {
            Value::String(s) => total += s.len() as u64,
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => {
                for (k, v) in map {
                    total += k.len() as u64 + 8;
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    total
}
