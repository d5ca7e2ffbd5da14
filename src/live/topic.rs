//! One thread's fan-out within this process: a bounded broadcast channel shared by every
//! local subscriber, created with the first and removed with the last, and (in buffered
//! mode) the one upstream task that feeds it from the log.

use super::Hub;
use super::events::{Item, Kind, deleted_item, flushed_item, signal, write_item};
use super::source::FeedEvent;
use crate::id::ThreadId;
use crate::write::{Error, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// How long a topic's upstream may take to start before subscribers get 503.
const UPSTREAM_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a topic's upstream stands.
#[derive(Debug, Clone)]
pub(super) enum Upstream {
    Starting,
    Ready,
    Failed(String),
}

/// One thread's fan-out.
pub(super) struct Topic {
    pub tx: broadcast::Sender<Arc<Item>>,
    /// The most recent writes seen by the upstream, by version: serves catch-ups (lag,
    /// reordering, reconnects near the head) without a backend read.
    recent: Mutex<BTreeMap<u64, Arc<Item>>>,
    pub ready: watch::Receiver<Upstream>,
    /// Stops the upstream task.
    pub stop: CancellationToken,
}

impl Topic {
    /// A new topic, its first receiver, and the sender of its readiness.
    pub fn new(
        capacity: usize,
        stop: CancellationToken,
        initial: Upstream,
    ) -> (
        Arc<Topic>,
        broadcast::Receiver<Arc<Item>>,
        watch::Sender<Upstream>,
    ) {
        let (tx, rx) = broadcast::channel(capacity);
        let (ready_tx, ready) = watch::channel(initial);
        let topic = Arc::new(Topic {
            tx,
            recent: Mutex::new(BTreeMap::new()),
            ready,
            stop,
        });
        (topic, rx, ready_tx)
    }

    /// Hands an item to every subscriber (and keeps a write among the recent ones).
    pub fn deliver(&self, item: Item, keep: usize) {
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
    pub fn recent_from(&self, next: u64) -> (Vec<Arc<Item>>, Option<u64>) {
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
pub(super) struct Subscription {
    pub hub: Arc<Hub>,
    pub id: ThreadId,
    pub topic: Arc<Topic>,
    pub rx: Option<broadcast::Receiver<Arc<Item>>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx.take();
        self.hub.release(&self.id, &self.topic);
    }
}

impl Hub {
    /// Feeds one topic from the source's feed until its last subscriber leaves or shutdown.
    pub(super) async fn upstream(
        self: Arc<Self>,
        id: ThreadId,
        topic: Arc<Topic>,
        ready: watch::Sender<Upstream>,
    ) {
        let started = tokio::select! {
            _ = topic.stop.cancelled() => return,
            r = tokio::time::timeout(UPSTREAM_START_TIMEOUT, self.source.follow(&id)) => r,
        };
        let mut feed = match started {
            Ok(Ok(Some(feed))) => feed,
            // Nothing to follow: the write path publishes into the hub.
            Ok(Ok(None)) => {
                let _ = ready.send(Upstream::Ready);
                return;
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
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
        loop {
            let event = tokio::select! {
                _ = topic.stop.cancelled() => break,
                e = feed.next() => e,
            };
            match event {
                Some(FeedEvent::Write(w)) => topic.deliver(write_item(&id, &w), keep),
                Some(FeedEvent::Deleted(v)) => {
                    // A recreated thread of the same id gets a fresh topic.
                    self.forget(&id, &topic);
                    topic.deliver(deleted_item(v), keep);
                    break;
                }
                Some(FeedEvent::Flushed(v)) => topic.deliver(flushed_item(v), keep),
                Some(FeedEvent::Resync) => topic.deliver(signal(Kind::Resync), keep),
                None => {
                    topic.deliver(signal(Kind::Resync), keep);
                    break;
                }
            }
        }
        feed.close().await;
    }

    /// Attaches to the thread's topic, creating it (and its upstream) if needed.
    pub(super) async fn subscribe(self: &Arc<Self>, id: &ThreadId) -> Result<Subscription> {
        let (topic, rx, start) = {
            let mut topics = self
                .topics
                .lock()
                .map_err(|_| Error::LogUnavailable("hub lock poisoned".into()))?;
            match topics.get(id) {
                Some(t) => (t.clone(), t.tx.subscribe(), None),
                None => {
                    let (topic, rx, ready) = Topic::new(
                        self.config.channel_capacity,
                        self.shutdown.child_token(),
                        Upstream::Starting,
                    );
                    topics.insert(id.clone(), topic.clone());
                    self.metrics.topics.set(topics.len() as i64);
                    (topic, rx, Some(ready))
                }
            }
        };
        let sub = Subscription {
            hub: self.clone(),
            id: id.clone(),
            topic: topic.clone(),
            rx: Some(rx),
        };
        if let Some(ready) = start {
            self.tasks
                .spawn(self.clone().upstream(id.clone(), topic.clone(), ready));
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

    /// Drops a subscriber's hold on a topic; the last one out stops the upstream.
    pub(super) fn release(&self, id: &ThreadId, topic: &Arc<Topic>) {
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

    /// Removes a topic from the map (its subscribers keep their handles until they end).
    pub(super) fn forget(&self, id: &ThreadId, topic: &Arc<Topic>) {
        if let Ok(mut topics) = self.topics.lock()
            && topics.get(id).is_some_and(|t| Arc::ptr_eq(t, topic))
        {
            topics.remove(id);
            self.metrics.topics.set(topics.len() as i64);
        }
    }
}
