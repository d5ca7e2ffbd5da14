//! One SSE client: attach first, then replay, then live, de-duplicated by version.
//!
//! The subscriber keeps `next`, the version it must emit next: a live item below `next` is
//! skipped, equal is emitted, above triggers a catch-up. A catch-up serves what the topic's
//! recent items hold, then one page at a time from the source ([`super::REPLAY_PAGE`]
//! writes), so a far-behind client never has a whole replay queued in memory: the next page
//! is read only once the previous one was written out. A position that cannot be continued
//! without a gap gets `reset` (or a fresh `snapshot` when the client asked for snapshots).

use super::events::{Item, Kind, ResetEvent, deleted_item, frame};
use super::topic::Subscription;
use super::{BURST, COALESCE_BYTES, Hub, REPLAY_PAGE, RETRY_MAX, RETRY_MIN, StreamPermit};
use crate::auth::Scope;
use crate::id::ThreadId;
use crate::store::StoreError;
use crate::write::{Error, Result};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// One SSE client's position and queue.
pub(super) struct Subscriber {
    pub hub: Arc<Hub>,
    pub id: ThreadId,
    pub sub: Subscription,
    /// The version this subscriber must emit next; everything below it was sent.
    pub next: u64,
    pub queue: VecDeque<Bytes>,
    flushed_sent: u64,
    /// A `flushed` notice ahead of the writes sent so far, held until they are.
    flushed_pending: Option<Arc<Item>>,
    /// Ends the stream once the queue is drained.
    pub done: bool,
    /// Send a fresh snapshot instead of `reset` (the client asked for snapshots).
    snapshot_on_reset: bool,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    /// After a failed catch-up: when to try again, and the current back-off.
    retry: Option<(tokio::time::Instant, Duration)>,
    /// A catch-up has more pages to read (and where the next one starts in the log).
    behind: Option<Option<u64>>,
    /// Whose stream this is: a full save moving the thread to another resource ends it.
    pub scope: Scope,
    /// Its place among the open streams, released when it ends.
    _permit: StreamPermit,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.hub.metrics.streams.dec();
    }
}

impl Subscriber {
    pub fn new(
        hub: Arc<Hub>,
        id: ThreadId,
        sub: Subscription,
        snapshot_on_reset: bool,
        scope: Scope,
        permit: StreamPermit,
    ) -> Self {
        hub.metrics.streams.inc();
        let keepalive = Box::pin(tokio::time::sleep(hub.config.keepalive));
        Subscriber {
            hub,
            id,
            sub,
            next: 1,
            queue: VecDeque::new(),
            flushed_sent: 0,
            flushed_pending: None,
            done: false,
            snapshot_on_reset,
            keepalive,
            retry: None,
            behind: None,
            scope,
            _permit: permit,
        }
    }

    fn emit(&mut self, item: &Item) {
        if self.done {
            return;
        }
        if let Some(resource) = &item.resource
            && !self.scope.admits(resource.as_deref())
        {
            // Moved to another resource: to this caller the thread is gone from here on.
            self.queue.push_back(deleted_item(0).frame);
            self.done = true;
            return;
        }
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
    pub fn take_recent(&mut self) -> bool {
        let (run, newest) = self.sub.topic.recent_from(self.next);
        for item in run {
            self.emit(&item);
        }
        newest.is_some_and(|n| self.next == n + 1)
    }

    /// Continues from `next` with one page from the replay sources. `Err` only for a backend
    /// failure or a thread that is gone; a position that cannot be continued is answered with
    /// `reset` (or a snapshot) here.
    pub async fn catch_up(&mut self) -> Result<()> {
        let resume = self.behind.take().flatten();
        if self.take_recent() {
            return Ok(());
        }
        let page = self
            .hub
            .replay(&self.id, self.next, REPLAY_PAGE, resume)
            .await?;
        let before = self.next;
        let mut gap = false;
        for item in &page.items {
            if item.version == self.next {
                self.emit(item);
            } else if item.version > self.next {
                gap = true;
                break;
            }
        }
        if self.done {
            return Ok(());
        }
        // A gap, a position the thread never had, or no progress although the head is ahead:
        // the sources cannot continue `next`.
        let beyond = before > page.head + 1;
        let stalled = self.next == before && self.next <= page.head;
        if gap || beyond || stalled {
            return self.reset(page.head).await;
        }
        self.take_recent();
        if self.next <= page.head {
            self.behind = Some(page.resume);
        }
        Ok(())
    }

    async fn reset(&mut self, head: u64) -> Result<()> {
        self.behind = None;
        if self.snapshot_on_reset {
            let (frame, version) = self.hub.snapshot(&self.id, &self.scope).await?;
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
    async fn catch_up_live(&mut self) {
        // Boxed: a rare path whose state would otherwise sit in every idle stream's future.
        match Box::pin(self.catch_up()).await {
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
                self.behind = None;
            }
        }
    }

    async fn on_item(&mut self, item: Result<Arc<Item>, broadcast::error::RecvError>) {
        let item = match item {
            Ok(item) => item,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.hub.metrics.lagged.inc();
                return self.catch_up_live().await;
            }
            Err(broadcast::error::RecvError::Closed) => {
                self.done = true;
                return;
            }
        };
        match item.kind {
            Kind::Write => {
                if item.version > self.next && self.behind.is_none() {
                    self.catch_up_live().await;
                    let settled = !self.done && self.retry.is_none() && self.behind.is_none();
                    if settled && item.version > self.next {
                        // The sources lack what the upstream already delivered: never a
                        // silent gap.
                        if let Err(e) = Box::pin(self.reset(item.version - 1)).await {
                            tracing::warn!(thread = %self.id, error = %e, "live reset failed");
                            self.done = true;
                        }
                    }
                }
                if !self.done && item.version == self.next {
                    if item.at > 0 {
                        let age = crate::store::now_ms().saturating_sub(item.at).max(0);
                        self.hub.metrics.delivery.observe(age as f64 / 1000.0);
                    }
                    self.emit(&item);
                }
            }
            Kind::Flushed => self.flush_notice(&item),
            Kind::Deleted => {
                self.queue.push_back(item.frame.clone());
                self.done = true;
            }
            Kind::Resync => self.catch_up_live().await,
        }
    }

    /// The next bytes to write, `None` to end the stream.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
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
            // Everything queued was written: read the next page of a catch-up.
            if self.behind.is_some() && self.retry.is_none() {
                self.catch_up_live().await;
                continue;
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
                    self.catch_up_live().await;
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

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
