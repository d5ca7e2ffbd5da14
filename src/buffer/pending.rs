//! How much is buffered and not folded yet, for `/metrics`: the entries above each thread's
//! store watermark, and the age of the oldest of them.
//!
//! Computed by the idle sweeper while it walks the buffered threads anyway (every
//! `--fold-idle / 2`), never per scrape: a scrape reads two gauges. Per thread with unfolded
//! entries the pass costs one store lookup (the watermark) and one log read (the subject's
//! first entry). The age is that of the oldest entry still in the thread's log; the log also
//! keeps entries that are folded already for `--keep-folded` (for idempotent retries), so when
//! one of those comes first the age overstates the oldest unfolded entry's by at most that
//! long. A thread that cannot be read this pass is left out of it.

use super::Buffered;
use super::log::LogEntry;
use crate::id::ThreadId;
use crate::store::now_ms;

/// One sweeper pass's tally.
#[derive(Debug, Default)]
pub(super) struct PendingScan {
    entries: u64,
    oldest_at: Option<i64>,
}

impl PendingScan {
    /// Counts one buffered thread whose newest log entry is `last`.
    pub async fn observe(&mut self, b: &Buffered, id: &ThreadId, last: &LogEntry) {
        if last.is_tombstone() {
            return;
        }
        let Ok(watermark) = b.store.version(id).await else {
            return;
        };
        if last.version <= watermark {
            return;
        }
        self.entries += last.version - watermark;
        let first = match b.log.reader(id, None).await {
            Ok(mut reader) => reader.next_page(1).await.ok().flatten(),
            Err(_) => None,
        };
        let at = first
            .and_then(|p| p.first().map(|e| e.at))
            .unwrap_or(last.at);
        self.oldest_at = Some(self.oldest_at.map_or(at, |o| o.min(at)));
    }

    /// Buffered entries counted so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Sets the gauges.
    pub fn publish(self, b: &Buffered) {
        b.counters.pending_entries.set(self.entries as i64);
        let age = self
            .oldest_at
            .map_or(0.0, |at| (now_ms() - at).max(0) as f64 / 1000.0);
        b.counters.oldest_pending_seconds.set(age);
    }
}
