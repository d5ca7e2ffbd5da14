//! Folds: the thread's unfolded log entries into the store, exactly once, then a trim.
//!
//! A fold reads the log in pages up to the end it saw when it began, applies the entries
//! above the store's watermark of every few pages in one
//! [`crate::store::Store::apply_batch`] (which skips what is already applied, so overlapping
//! folds on any replicas are harmless), and only then purges what it covered, keeping the last two minutes for idempotent retries.
//! Every step of a fold has a deadline (each NATS request [`super::log::NATS_TIMEOUT`], each
//! batch's store transaction [`STEP_TIMEOUT`]): a fold that stops making progress (NATS or
//! the store unreachable) fails within seconds and releases its lock, keeping the batches it
//! committed, so the next trigger folds promptly once the backends answer. A fold that keeps
//! making progress is never cut short, however long the run it folds.

use super::Buffered;
use super::log::LogEntry;
use crate::id::ThreadId;
use crate::store::{Expect, StoreError, Write, now_ms};
use crate::write::{Error, FoldReport, Result};
use std::time::Duration;

/// Longest one batch of a fold may spend in the store; a batch transaction runs to
/// completion on its own even when the fold stops waiting for it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Log pages (each at most [`super::PAGE`] entries and 8 MB) a fold applies in one store
/// batch. The store keeps the history of the last `HISTORY_LIMIT` (1,000) versions only, so a
/// batch of several pages records only its last 1,000 history entries instead of writing
/// and then deleting every page's; four bounds a fold's memory to some 40 MB with the page
/// read ahead.
const FOLD_BATCH_PAGES: usize = 4;

impl Buffered {
    /// Folds the thread's buffered tail into the store, exactly once, then trims the log.
    pub async fn fold(&self, id: &ThreadId) -> Result<FoldReport> {
        let started = std::time::Instant::now();
        let lock = self.fold_locks.get(id);
        let folded = {
            // Held only by a fold that keeps making progress (see the module docs).
            let _guard = lock.lock().await;
            self.fold_locked(id).await
        };
        match &folded {
            Ok(r) => {
                self.counters.folds.inc();
                self.counters
                    .fold_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.counters.folded_entries.inc_by(r.applied);
                self.log.notify_flushed(id, r.version).await;
            }
            Err(Error::Store(StoreError::NotFound)) => {}
            Err(e) => {
                self.counters.fold_failures.inc();
                tracing::warn!(thread = %id, error = %e, "fold failed; the tail stays buffered");
            }
        }
        folded
    }

    async fn fold_locked(&self, id: &ThreadId) -> Result<FoldReport> {
        // The log's end and the store's watermark are independent: ask both at once.
        let (last, stored) = tokio::join!(self.log.last(id), self.store.version(id));
        let Some(last) = last? else {
            self.marks.forget(id);
            return Ok(FoldReport {
                version: stored?,
                applied: 0,
            });
        };
        if last.is_tombstone() {
            return self.finish_delete(id).await;
        }
        let watermark = match stored {
            Ok(w) => w,
            Err(StoreError::NotFound) => {
                // A thread that is gone: whatever is left can never be folded.
                self.marks.forget(id);
                self.log.purge(id, Some(last.seq + 1)).await?;
                return Err(StoreError::NotFound.into());
            }
            Err(e) => return Err(e.into()),
        };
        let now = now_ms();
        let keep = self.keep_folded.as_millis() as i64;
        let window_start = now - keep;
        let mut version = watermark;
        let mut applied = 0;
        let mut first_seq = None;
        // Entries this process folded before, with nothing of them due for trimming, are not
        // read again (see `Marks::resume`): a fold reads what is new, not the keep window.
        let (start, kept) = self.marks.resume(id, now);
        // The first entry to keep: a recent one (for retries), as (seq, when it was written).
        let mut keep_from = kept.map(|(seq, trim_at)| (seq, trim_at - keep));
        let mut reader = self.log.reader_to(id, Some(start), last.seq);
        // Up to FOLD_BATCH_PAGES pages go to the store in one batch, and the next page is read
        // while the store applies it: a long fold costs about the larger of reading and
        // applying, not their sum.
        let mut next = reader.next_page(super::PAGE).await?;
        loop {
            let mut batch: Vec<Write> = Vec::new();
            let mut pages = 0;
            while pages < FOLD_BATCH_PAGES {
                let Some(page) = next.take() else { break };
                pages += 1;
                first_seq.get_or_insert(page[0].seq);
                if keep_from.is_none() {
                    keep_from = page
                        .iter()
                        .find(|e| e.at >= window_start)
                        .map(|e| (e.seq, e.at));
                }
                if page.iter().any(LogEntry::is_tombstone) {
                    return self.finish_delete(id).await;
                }
                batch.extend(
                    page.into_iter()
                        .filter(|e| e.version > version && e.seq <= last.seq)
                        .filter_map(LogEntry::into_write),
                );
                if pages < FOLD_BATCH_PAGES {
                    next = reader.next_page(super::PAGE).await?;
                }
            }
            if pages == 0 {
                break;
            }
            if batch.is_empty() {
                next = reader.next_page(super::PAGE).await?;
                continue;
            }
            let count = batch.len() as u64;
            let applying = tokio::time::timeout(STEP_TIMEOUT, self.store.apply_batch(id, batch));
            let (applied_batch, read) = tokio::join!(applying, reader.next_page(super::PAGE));
            let Ok(applied_batch) = applied_batch else {
                return Err(StoreError::Unavailable(format!(
                    "a fold batch of thread {id} took longer than {STEP_TIMEOUT:?}"
                ))
                .into());
            };
            version = match applied_batch {
                Ok(v) => v,
                // An entry the store refuses (written by an older version beyond today's
                // limits): never skipped, never retried blindly; the fold is blocked.
                Err(StoreError::InvalidDelta(e)) => {
                    return Err(Error::FoldBlocked(format!(
                        "an entry of thread {id} no longer applies ({e}); it stays in the log"
                    )));
                }
                Err(StoreError::InvalidThread { field, message }) => {
                    return Err(Error::FoldBlocked(format!(
                        "an entry of thread {id} no longer applies ({field}: {message}); \
                         it stays in the log"
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            applied += count;
            next = read?;
        }
        // Trim what is folded (everything read up to `last`), keeping recent entries.
        let before = keep_from.map_or(last.seq + 1, |(seq, _)| seq);
        // Every entry below `before` was applied or was already at or below the watermark
        // (entries a concurrent fold trimmed under the reader were folded by it).
        if first_seq.is_some_and(|first| first < before) {
            self.log.purge(id, Some(before)).await?;
        }
        // What it kept is due for trimming when the newest entry leaves the window: then all
        // of it can go with one purge and no read (see `Buffered::trim_folded`).
        self.marks.folded(
            id,
            last.seq,
            keep_from.map(|(seq, _)| (seq, last.at.max(now - keep) + keep)),
        );
        Ok(FoldReport { version, applied })
    }

    /// The log ends in a tombstone: the thread is gone from the store and the log.
    async fn finish_delete(&self, id: &ThreadId) -> Result<FoldReport> {
        match self.store.delete(id, Expect::Any).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.log.purge(id, None).await?;
        self.remember(id, None);
        self.marks.forget(id);
        Err(StoreError::NotFound.into())
    }

    /// Folds every buffered thread (start-up recovery and shutdown).
    pub async fn fold_all(&self) -> Result<usize> {
        let threads = self.log.threads().await?;
        let mut folded = 0;
        for id in &threads {
            if self.fold(id).await.is_ok() {
                folded += 1;
            }
        }
        Ok(folded)
    }
}
