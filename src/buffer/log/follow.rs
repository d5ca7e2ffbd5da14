//! Following one thread's log for the live hub.

use super::Log;
use super::codec::{FlushedNotice, LogEntry, decode};
use crate::id::ThreadId;
use async_nats::jetstream::consumer;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// What a follower reports.
#[derive(Debug)]
// Mostly entries, moved on at once: not worth an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Followed {
    /// A new entry on the thread's subject.
    Entry(LogEntry),
    /// A fold put every write up to this version into the store.
    Flushed(u64),
    /// The follower may have missed entries (reconnect, undecodable message).
    Resync,
}

/// How often a follower checks whether the client reconnected (its consumer may be gone).
pub(super) const FOLLOW_CHECK: Duration = Duration::from_secs(1);

/// Follows one thread's log for the live hub (see [`Log::follow`]): an ordered consumer
/// (what JetStream stored, in order; a plain subscription would also see publishes that lost
/// a compare-and-set) reopened after the last sequence seen whenever the client reconnects,
/// plus the thread's `flushed` notices.
pub struct LogFollower {
    pub(super) log: Log,
    pub(super) id: ThreadId,
    pub(super) consumer: String,
    pub(super) messages: consumer::pull::Ordered,
    pub(super) notices: async_nats::Subscriber,
    pub(super) notices_open: bool,
    pub(super) last_seq: u64,
    pub(super) stats: Arc<async_nats::Statistics>,
    pub(super) connects: u64,
    pub(super) reopen: bool,
    pub(super) last_resync: Option<tokio::time::Instant>,
    pub(super) check: tokio::time::Interval,
}

impl LogFollower {
    /// The next event; `None` never comes while the follower is healthy (it reconnects).
    pub async fn next(&mut self) -> Option<Followed> {
        loop {
            if self.reopen {
                match self.log.open_follow(&self.id, self.last_seq).await {
                    Ok((name, messages)) => {
                        self.consumer = name;
                        self.messages = messages;
                        self.reopen = false;
                        return Some(Followed::Resync);
                    }
                    Err(e) => {
                        tracing::warn!(thread = %self.id, error = %e, "live follower could not reopen; retrying");
                        self.check.tick().await;
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = self.check.tick() => {
                    let now = self.stats.connects.load(std::sync::atomic::Ordering::Relaxed);
                    if now != self.connects && self.log.is_connected() {
                        self.connects = now;
                        self.reopen = true;
                    }
                }
                msg = self.messages.next() => match msg {
                    Some(Ok(msg)) => {
                        let Ok(info) = msg.info() else { continue };
                        let seq = info.stream_sequence;
                        self.last_seq = self.last_seq.max(seq);
                        let at = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
                        match decode(msg.headers.as_ref(), &msg.payload) {
                            Ok((version, body, idempotency)) => {
                                return Some(Followed::Entry(LogEntry { seq, version, at, body, idempotency }));
                            }
                            Err(why) => {
                                tracing::warn!(thread = %self.id, %why, "undecodable log message skipped by the live follower");
                                return Some(Followed::Resync);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(thread = %self.id, error = %e, "live follower error");
                        if self.last_resync.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                            self.last_resync = Some(tokio::time::Instant::now());
                            return Some(Followed::Resync);
                        }
                    }
                    None => self.reopen = true,
                },
                notice = self.notices.next(), if self.notices_open => match notice {
                    Some(n) => {
                        if let Ok(notice) = serde_json::from_slice::<FlushedNotice>(&n.payload) {
                            return Some(Followed::Flushed(notice.flushed));
                        }
                    }
                    // Only on client shutdown; the log still feeds the follower.
                    None => self.notices_open = false,
                },
            }
        }
    }

    /// Removes the follower's consumer now (it would expire on its own).
    pub async fn close(self) {
        let LogFollower {
            log,
            consumer,
            messages,
            ..
        } = self;
        drop(messages);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            log.js
                .delete_consumer_from_stream(&consumer, &*log.stream_name()),
        )
        .await;
    }
}
