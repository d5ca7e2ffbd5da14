//! Announcements of writes committed by *any* process sharing a store, for the live hub of
//! each one: the PostgreSQL store fills this from `LISTEN/NOTIFY` (see
//! `postgres/notify.rs`); memory and file stores have none (one process writes them, and it
//! publishes into its own hub).
//!
//! An announcement carries only a thread and a version, never the write: whoever follows the
//! thread reads the history rows it lacks. Announcements for threads nobody in this process
//! follows are dropped at once, so memory holds one small entry per followed thread (one per
//! live-hub topic), however many threads are written.

use crate::id::ThreadId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// What a watcher of one thread has been told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signal {
    /// The highest version announced as committed.
    pub version: u64,
    /// The thread was deleted (at `version`).
    pub deleted: bool,
    /// Bumped whenever announcements may have been missed (the listener lost its connection):
    /// the watcher re-reads what it may lack.
    pub epoch: u64,
}

/// The registry of followed threads (see the module docs). Cheap to share.
#[derive(Debug, Default)]
pub struct Changes {
    watched: Mutex<HashMap<ThreadId, watch::Sender<Signal>>>,
    epoch: AtomicU64,
    connected: AtomicBool,
    connected_gauge: Gauge,
    resyncs: Counter,
}

/// One follower's view of a thread's announcements; dropping it stops watching (with the
/// last watcher of the thread).
#[derive(Debug)]
pub struct ChangeWatch {
    /// Changes when something is announced for the thread.
    pub rx: watch::Receiver<Signal>,
    id: ThreadId,
    changes: Arc<Changes>,
}

impl Drop for ChangeWatch {
    fn drop(&mut self) {
        if let Ok(mut watched) = self.changes.watched.lock()
            && let Some(tx) = watched.get(&self.id)
            && tx.receiver_count() <= 1
        {
            watched.remove(&self.id);
        }
    }
}

impl Changes {
    /// Starts watching `id` (before reading its state, so nothing committed after that read
    /// goes unannounced).
    pub fn watch(self: &Arc<Self>, id: &ThreadId) -> ChangeWatch {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let rx = match self.watched.lock() {
            Ok(mut watched) => watched
                .entry(id.clone())
                .or_insert_with(|| {
                    watch::channel(Signal {
                        epoch,
                        ..Default::default()
                    })
                    .0
                })
                .subscribe(),
            // A poisoned lock: a watcher that never hears anything still ends with its topic.
            Err(_) => watch::channel(Signal::default()).1,
        };
        ChangeWatch {
            rx,
            id: id.clone(),
            changes: self.clone(),
        }
    }

    /// A write at `version` of `id` was committed. After a delete, the id's next life starts
    /// over at low versions.
    pub fn announce(&self, id: &ThreadId, version: u64) {
        self.update(id, |s| {
            if s.deleted {
                *s = Signal {
                    version,
                    deleted: false,
                    epoch: s.epoch,
                };
                true
            } else if version > s.version {
                s.version = version;
                true
            } else {
                false
            }
        });
    }

    /// `id` was deleted at `version`.
    pub fn announce_deleted(&self, id: &ThreadId, version: u64) {
        self.update(id, |s| {
            s.deleted = true;
            s.version = version;
            true
        });
    }

    fn update(&self, id: &ThreadId, f: impl FnOnce(&mut Signal) -> bool) {
        if let Ok(watched) = self.watched.lock()
            && let Some(tx) = watched.get(id)
        {
            tx.send_if_modified(f);
        }
    }

    /// Announcements may have been missed: every watcher re-reads.
    pub fn resync(&self) {
        self.resyncs.inc();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(watched) = self.watched.lock() {
            for tx in watched.values() {
                tx.send_modify(|s| s.epoch = epoch);
            }
        }
    }

    /// Records whether the source of announcements is connected.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.connected_gauge.set(connected as i64);
    }

    /// Registers the listener's metrics (`/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "threadgate_store_listener_connected",
            "1 while the connection that hears other replicas' writes (LISTEN) is up",
            self.connected_gauge.clone(),
        );
        registry.register(
            "threadgate_store_listener_resyncs",
            "Times live streams were resynced after announcements may have been missed",
            self.resyncs.clone(),
        );
    }

    /// Whether announcements are arriving (the listener is connected).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Up to `limit` of the threads watched right now.
    pub fn followed(&self, limit: usize) -> Vec<ThreadId> {
        self.watched
            .lock()
            .map(|w| w.keys().take(limit).cloned().collect())
            .unwrap_or_default()
    }

    /// Threads watched right now.
    pub fn watched(&self) -> usize {
        self.watched.lock().map(|w| w.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn announcements_reach_only_watchers_and_end_with_them() {
        let changes = Arc::new(Changes::default());
        let a = ThreadId::parse("a").unwrap();
        let b = ThreadId::parse("b").unwrap();
        let mut w = changes.watch(&a);
        changes.announce(&b, 7); // nobody watches b: dropped
        assert_eq!(changes.watched(), 1);
        changes.announce(&a, 3);
        changes.announce(&a, 2); // older: no change
        assert!(w.rx.has_changed().unwrap());
        assert_eq!(w.rx.borrow_and_update().version, 3);
        changes.announce(&a, 2);
        assert!(!w.rx.has_changed().unwrap());
        changes.announce_deleted(&a, 3);
        assert!(w.rx.borrow_and_update().deleted);
        changes.announce(&a, 1); // the next life
        assert_eq!(
            *w.rx.borrow_and_update(),
            Signal {
                version: 1,
                deleted: false,
                epoch: 0
            }
        );
        changes.resync();
        assert_eq!(w.rx.borrow_and_update().epoch, 1);
        let second = changes.watch(&a);
        drop(w);
        assert_eq!(changes.watched(), 1, "still watched by the second");
        drop(second);
        assert_eq!(changes.watched(), 0);
    }
}
