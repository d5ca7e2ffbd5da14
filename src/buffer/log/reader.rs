//! A bounded, paged read of one thread's log that knows its end before it starts (see the
//! parent module's docs).

use super::codec::{LogEntry, decode};
use super::{Log, NATS_TIMEOUT, timed, unavailable};
use crate::id::ThreadId;
use crate::write::Result;
use async_nats::jetstream::consumer;
use futures::StreamExt;
use std::time::Duration;

/// Messages a read fetches one by one (one request each) before it creates a consumer: most
/// reads (the entries after a cached head, a short unfolded tail) end within these.
pub(super) const SINGLE_READS: usize = 4;
/// A read whose whole sequence range is at most this long fetches everything one by one:
/// creating a consumer costs more than this many single requests.
pub(super) const SINGLE_READ_RANGE: u64 = 16;
/// Most bytes one page of a read holds (besides its count bound).
pub(super) const PAGE_BYTES: usize = 8 << 20;
/// How long one pull waits for messages that are not there (only when the log was trimmed
/// under the reader: otherwise the read stops at its known end first).
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// A reader's consumer is removed by the server this long after its last fetch, so an
/// abandoned read leaves nothing behind.
const READER_IDLE: Duration = Duration::from_secs(10);

/// A bounded, paged read of one thread's log (see [`Log::reader`]).
pub struct LogReader {
    pub(super) log: Log,
    pub(super) id: ThreadId,
    /// The next stream sequence to read.
    pub(super) next: u64,
    /// The newest sequence when the read began: the read ends there.
    pub(super) end: u64,
    pub(super) consumer: Option<consumer::PullConsumer>,
    /// Messages still to be read one by one before a consumer is created.
    pub(super) singles_left: usize,
    pub(super) done: bool,
}

impl LogReader {
    /// The next page of at most `max` entries (and about `PAGE_BYTES`), oldest first;
    /// `None` once the end is reached or the rest was trimmed.
    pub async fn next_page(&mut self, max: usize) -> Result<Option<Vec<LogEntry>>> {
        if self.done {
            return Ok(None);
        }
        let max = max.max(1);
        let mut page = Vec::new();
        if self.consumer.is_none() {
            // Short reads (the common case) need no consumer: one request per message, for
            // the first few messages of the read.
            while self.singles_left > 0 && page.len() < max && self.next <= self.end {
                self.singles_left -= 1;
                match self.log.next_from(&self.id, self.next).await? {
                    Some(e) if e.seq <= self.end => {
                        self.next = e.seq + 1;
                        page.push(e);
                    }
                    // Nothing up to the end is left: trimmed under us, so already folded.
                    _ => self.next = self.end + 1,
                }
            }
            if self.next > self.end {
                self.done = true;
                return Ok((!page.is_empty()).then_some(page));
            }
            if !page.is_empty() {
                return Ok(Some(page));
            }
            self.consumer = Some(self.create_consumer().await?);
        }
        let Some(consumer) = &self.consumer else {
            return Ok(None);
        };
        // Not a no-wait fetch: NATS 2.9 leaves one unanswered when the subject was purged
        // under the consumer. A pull that expires ends on its own; in the normal case the
        // read stops at the end it knows long before that.
        let fetch = consumer
            .batch()
            .max_messages(max)
            .max_bytes(PAGE_BYTES.max(self.log.max_payload + 65_536))
            .expires(FETCH_EXPIRES)
            .messages();
        let mut batch = timed("fetch", fetch).await?;
        loop {
            let msg = match tokio::time::timeout(NATS_TIMEOUT, batch.next()).await {
                Ok(Some(Ok(msg))) => msg,
                // The pull ended early (its byte budget): the next page continues.
                Ok(Some(Err(_))) if !page.is_empty() => break,
                Ok(Some(Err(e))) => return Err(unavailable("fetch", e)),
                Ok(None) => break,
                Err(_) => return Err(unavailable("fetch", "timed out")),
            };
            let info = msg.info().map_err(|e| unavailable("fetch", e))?;
            let seq = info.stream_sequence;
            let at = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
            match decode(msg.headers.as_ref(), &msg.payload) {
                Ok((version, body, idempotency)) => page.push(LogEntry {
                    seq,
                    version,
                    at,
                    body,
                    idempotency,
                }),
                Err(why) => {
                    let (headers, payload) = (msg.headers.clone(), msg.payload.clone());
                    return Err(self
                        .log
                        .set_aside(&self.id, seq, headers, payload, why)
                        .await);
                }
            }
            self.next = seq + 1;
            if seq >= self.end {
                break;
            }
        }
        if self.next > self.end {
            self.done = true;
        } else if page.is_empty() {
            // A fetch that finds nothing before the end: the rest was trimmed (folded) under
            // us, which one request confirms; anything else is an inconsistent read.
            if let Some(e) = self.log.next_from(&self.id, self.next).await?
                && e.seq <= self.end
            {
                return Err(unavailable(
                    "fetch",
                    format!("entry {} was not delivered", e.seq),
                ));
            }
            self.done = true;
        }
        page.retain(|e| e.seq <= self.end);
        Ok((!page.is_empty()).then_some(page))
    }

    /// Reads every remaining entry into memory: only for reads known to be short.
    pub async fn collect(mut self, max: usize) -> Result<Vec<LogEntry>> {
        let mut out = Vec::new();
        while let Some(page) = self.next_page(max).await? {
            out.extend(page);
        }
        Ok(out)
    }

    async fn create_consumer(&self) -> Result<consumer::PullConsumer> {
        let config = consumer::pull::Config {
            filter_subject: self.log.subject(&self.id),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: self.next,
            },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: READER_IDLE,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        timed("create reader", self.log.stream.create_consumer(config)).await
    }
}
