//! The idle sweeper: folds threads whose newest entry is older than `--fold-idle`, and trims
//! folded entries once they leave the `--keep-folded` window.
//!
//! Idle threads must cost (nearly) nothing, however many there are. After a fold the log
//! keeps the thread's recent entries for idempotent retries, so its subject stays listed for
//! up to `--keep-folded`; folding it again at every pass would read the log and open a store
//! transaction only to apply nothing. So each process remembers, per thread it folded, the
//! log position the fold covered and when the first kept entry leaves the window ([`Marks`]).
//! A pass lists every subject with its entry count in one request; a thread whose count has
//! not changed since a pass confirmed its mark is skipped without any request until its
//! kept entries are due for trimming (then one fold trims them and the subject, emptied,
//! leaves the listing). A changed count costs one `last` lookup, and only a thread with
//! entries past its mark is folded.
//!
//! An unchanged count does not strictly prove that nothing was appended (another replica
//! could append one entry and trim one in between), so a mark is confirmed again with a
//! lookup every [`CONFIRM_EVERY`] passes: such a thread is folded at most that many passes
//! late, never lost (and the replica that appended folds it on its own schedule anyway).
//! Marks live in a cache bounded in bytes; a thread that falls out of it costs one no-op fold.
//!
//! Most passes need no listing at all. The log's last sequence changes with every append
//! (writes and tombstones) and never with a trim, so when it is what the last full pass saw,
//! that pass left nothing waiting (no thread short of its idle age, no failed fold, nothing
//! pending) and no kept entries are due for trimming, nothing can have changed: the pass is
//! one stream-info request. Trims may run late (the keep window is a minimum), so entries
//! due for trimming alone call a full pass at most every [`TRIM_EVERY`]. Confirmations count
//! full passes only, so a quiet spell does not end in a burst of them.

use super::Buffered;
use super::log::Body;
use super::pending::PendingScan;
use crate::id::ThreadId;
use crate::store::now_ms;
use crate::write::Error;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest back-off between failed fold attempts of one thread.
const MAX_FOLD_BACKOFF: Duration = Duration::from_secs(30);
/// A skipped thread's mark is confirmed with a lookup this often (in passes): bounds how
/// late a fold can be when an unchanged entry count hides another replica's append.
pub const CONFIRM_EVERY: u64 = 10;
/// How often entries due for trimming alone call a full pass (or `--keep-folded`, if
/// shorter): kept entries may outlive the window by this much, and threads idle in their
/// keep window cost one listing per this period instead of one per pass.
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// Bytes the fold marks may hold: about 100 bytes a thread, so some 160,000 threads.
const MARKS_BYTES: u64 = 16 << 20;

/// What this process knows about a thread it folded.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The last log sequence the fold covered.
    seq: u64,
    /// When (Unix ms) the newest entry the fold kept for retries (the one at `seq`) leaves
    /// the keep window, so that every kept entry can be trimmed; `None` when it kept nothing.
    trim_at: Option<i64>,
    /// The log sequence of that first kept entry (`None` when the fold kept nothing).
    keep_seq: Option<u64>,
    /// The subject's entry count when a pass confirmed `seq` as its last entry.
    count: Option<u64>,
    /// The pass that confirmed it.
    confirmed: u64,
}

/// Weighs marks by their id's length.
#[derive(Clone)]
struct MarkWeight;

impl quick_cache::Weighter<ThreadId, Mark> for MarkWeight {
    fn weight(&self, id: &ThreadId, _: &Mark) -> u64 {
        id.as_str().len() as u64 + 72
    }
}

/// Per-thread fold marks, bounded in bytes (see the module docs).
pub(super) struct Marks(quick_cache::sync::Cache<ThreadId, Mark, MarkWeight>);

impl Default for Marks {
    fn default() -> Self {
        Marks(quick_cache::sync::Cache::with_weighter(
            (MARKS_BYTES / 100) as usize,
            MARKS_BYTES,
            MarkWeight,
        ))
    }
}

impl Marks {
    /// A fold covered the log up to `seq`; it kept the entries from `kept.0` on, due for
    /// trimming at `kept.1` (`None` when it kept nothing).
    pub fn folded(&self, id: &ThreadId, seq: u64, kept: Option<(u64, i64)>) {
        let mark = Mark {
            seq,
            trim_at: kept.map(|(_, at)| at),
            keep_seq: kept.map(|(seq, _)| seq),
            count: None,
            confirmed: 0,
        };
        self.0.insert(id.clone(), mark);
    }

    /// The thread is gone (or its log is empty).
    pub fn forget(&self, id: &ThreadId) {
        self.0.remove(id);
    }

    fn get(&self, id: &ThreadId) -> Option<Mark> {
        self.0.get(id)
    }

    /// Where a fold of `id` at `now` (Unix ms) may start reading, and what it keeps from
    /// before there: when this process folded the thread up to sequence `S` and whatever it
    /// kept is still inside the keep window, every entry up to `S` is folded and none is due
    /// for trimming, so the fold reads from `S + 1` and keeps `(first kept seq, its trim
    /// time)` as it was. Otherwise (no mark, or kept entries due) it reads the whole log.
    pub fn resume(&self, id: &ThreadId, now: i64) -> (u64, Option<(u64, i64)>) {
        match self.get(id) {
            Some(m) => match (m.keep_seq, m.trim_at) {
                (None, _) => (m.seq + 1, None),
                (Some(seq), Some(at)) if now < at => (m.seq + 1, Some((seq, at))),
                _ => (1, None),
            },
            None => (1, None),
        }
    }

    fn confirm(&self, id: &ThreadId, mut mark: Mark, count: u64, pass: u64) {
        mark.count = Some(count);
        mark.confirmed = pass;
        self.0.insert(id.clone(), mark);
    }
}

impl Buffered {
    /// Trims a thread this process folded up to log sequence `seq` once everything it kept is
    /// out of the keep window: one purge below `seq + 1`, nothing read (every entry there is
    /// folded). Does nothing when a fold moved the mark since the caller looked.
    async fn trim_folded(&self, id: &ThreadId, seq: u64) -> crate::write::Result<()> {
        let lock = self.fold_locks.get(id);
        let _guard = lock.lock().await;
        let due = self
            .marks
            .get(id)
            .is_some_and(|m| m.seq == seq && m.trim_at.is_some_and(|t| now_ms() >= t));
        if due {
            self.log.purge(id, Some(seq + 1)).await?;
            self.marks.folded(id, seq, None);
            self.counters.trims.inc();
        }
        Ok(())
    }

    /// Folds threads whose newest entry is older than the idle age, until cancelled;
    /// failures back off per thread, doubling up to [`MAX_FOLD_BACKOFF`].
    pub(super) async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let interval = (self.fold_idle / 2).max(Duration::from_millis(100));
        let mut backoff: HashMap<ThreadId, (tokio::time::Instant, Duration)> = HashMap::new();
        // Full passes so far (confirmations count these).
        let mut pass = 0u64;
        // What the last full pass saw and left, for skipping quiet passes (module docs).
        let mut quiet: Option<Quiet> = None;
        let trim_every = TRIM_EVERY.min(self.keep_folded).as_millis() as i64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Some(q) = &quiet
                && q.may_skip(now_ms(), trim_every)
                && self.log.last_seq().await.is_ok_and(|seq| seq == q.seq)
            {
                continue;
            }
            quiet = None;
            pass += 1;
            let started = now_ms();
            let Ok((seq, subjects)) = self.log.subjects().await else {
                continue;
            };
            // Whether anything is left for a later pass, and the earliest trim that is due.
            let mut waiting = false;
            let mut next_trim: Option<i64> = None;
            let listed: HashSet<&ThreadId> = subjects.iter().map(|(id, _)| id).collect();
            backoff.retain(|id, _| listed.contains(id));
            let mut pending = PendingScan::default();
            for (id, count) in &subjects {
                if shutdown.is_cancelled() {
                    return;
                }
                let mark = self.marks.get(id);
                let now = now_ms();
                let trim_due = mark.is_some_and(|m| m.trim_at.is_some_and(|t| now >= t));
                if let Some(t) = mark.and_then(|m| m.trim_at)
                    && !trim_due
                {
                    next_trim = Some(next_trim.map_or(t, |n| n.min(t)));
                }
                if let Some(m) = mark
                    && !trim_due
                    && m.count == Some(*count)
                    && pass - m.confirmed < CONFIRM_EVERY
                {
                    continue;
                }
                let last = self.log.last(id).await;
                // Nothing new since this process folded it: at most a trim to do.
                let mut trim_only = false;
                if let (Ok(Some(l)), Some(m)) = (&last, mark)
                    && l.seq == m.seq
                {
                    if !trim_due {
                        self.marks.confirm(id, m, *count, pass);
                        continue;
                    }
                    trim_only = true;
                }
                if trim_only && let Some(m) = mark {
                    // Everything up to the mark is folded and out of the window: one purge.
                    if let Err(e) = self.trim_folded(id, m.seq).await {
                        tracing::debug!(thread = %id, error = %e, "trim failed; retried next pass");
                        waiting = true;
                    }
                    continue;
                }
                if let Ok(Some(last)) = &last {
                    pending.observe(&self, id, last).await;
                }
                if backoff
                    .get(id)
                    .is_some_and(|(until, _)| *until > tokio::time::Instant::now())
                {
                    waiting = true;
                    continue;
                }
                let idle = match last {
                    Ok(Some(last)) => {
                        now - last.at >= self.fold_idle.as_millis() as i64
                            || last.body == Body::Deleted
                            || trim_only
                    }
                    _ => false,
                };
                if !idle {
                    waiting = true;
                    continue;
                }
                match self.fold(id).await {
                    Ok(_) | Err(Error::Store(crate::store::StoreError::NotFound)) => {
                        backoff.remove(id);
                        // The entries this fold kept are due for trimming later.
                        if let Some(t) = self.marks.get(id).and_then(|m| m.trim_at) {
                            next_trim = Some(next_trim.map_or(t, |n| n.min(t)));
                        }
                    }
                    Err(_) => {
                        waiting = true;
                        let next = backoff
                            .get(id)
                            .map_or(interval, |(_, d)| (*d * 2).min(MAX_FOLD_BACKOFF));
                        backoff.insert(id.clone(), (tokio::time::Instant::now() + next, next));
                    }
                }
            }
            waiting |= pending.entries() > 0;
            pending.publish(&self);
            if !waiting {
                quiet = Some(Quiet {
                    seq,
                    next_trim,
                    started,
                });
            }
        }
    }
}

/// A full pass that left nothing waiting: the log's last sequence it saw, the earliest
/// time kept entries are due for trimming, and when it started (Unix ms).
struct Quiet {
    seq: u64,
    next_trim: Option<i64>,
    started: i64,
}

impl Quiet {
    /// Whether a pass at `now` may be skipped if the log's last sequence is still `seq`:
    /// yes unless kept entries are due for trimming and the last full pass is `trim_every`
    /// milliseconds old.
    fn may_skip(&self, now: i64, trim_every: i64) -> bool {
        match self.next_trim {
            Some(t) if now >= t => now - self.started < trim_every,
            _ => true,
        }
    }
}
