//! One thread's complete record, and every store operation on it as a plain function.
//!
//! The memory and file backends share this code, so they cannot drift apart: the memory
//! store keeps records in a map; the file store does the same and writes each changed
//! record to its own file. Every mutating method validates before it changes anything, so an
//! error leaves the record exactly as it was.

use super::{
    Appended, Change, Expect, HISTORY_LIMIT, History, IDEMPOTENCY_KEYS_KEPT, IdempotencyKey,
    Incarnation, MessagePage, MessageQuery, Order, Prepared, Result, RunRecord, Snapshot, StateAt,
    StoreError, ThreadSummary, Write,
};
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread, plan_delta};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashSet, VecDeque};

/// One thread's complete record: what the memory and file backends keep per thread.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The thread (custom metadata only).
    pub thread: Thread,
    /// `thread.state` with every patch applied.
    pub current_state: Value,
    /// See [`Snapshot::version`].
    pub version: u64,
    /// See [`Snapshot::watermark`].
    pub watermark: u64,
    /// See [`Snapshot::incarnation`]; 0 in files written before incarnations existed.
    #[serde(default)]
    pub incarnation: Incarnation,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
    /// One record per run that sent `run_meta`.
    pub runs: Vec<RunRecord>,
    /// The last [`HISTORY_LIMIT`] writes.
    pub history: VecDeque<Write>,
    /// The last [`IDEMPOTENCY_KEYS_KEPT`] keys with the version each produced.
    pub idempotency: VecDeque<(IdempotencyKey, u64)>,
    /// Message ids present, for de-duplication; rebuilt on load.
    #[serde(skip)]
    ids: HashSet<String>,
}

impl Record {
    /// A new thread at version 0, validated by [`super::prepare_thread`].
    pub fn new(id: &ThreadId, mut thread: Thread, now: i64) -> Result<Self> {
        let current_state = super::prepare_thread(id, &mut thread)?;
        let mut r = Self::fresh(thread, current_state, 0, now, now);
        r.incarnation = Incarnation::new();
        Ok(r)
    }

    /// A record with no runs, history or remembered keys.
    fn fresh(
        thread: Thread,
        current_state: Value,
        version: u64,
        created_at: i64,
        updated_at: i64,
    ) -> Self {
        let mut r = Record {
            thread,
            current_state,
            version,
            watermark: version,
            incarnation: Incarnation::default(),
            created_at,
            updated_at,
            runs: Vec::new(),
            history: VecDeque::new(),
            idempotency: VecDeque::new(),
            ids: HashSet::new(),
        };
        r.rebuild_ids();
        r
    }

    /// Restores the derived fields after deserialising.
    pub fn rebuild_ids(&mut self) {
        self.ids = self
            .thread
            .messages
            .iter()
            .filter_map(|m| m.id.clone())
            .collect();
    }

    /// A record holding a stored snapshot (no history or runs): the base that a live view
    /// applies the buffered tail to.
    pub fn from_snapshot(snap: Snapshot) -> Result<Self> {
        let current_state = crate::model::rebuild_state(&snap.thread.state, &snap.thread.patches)
            .map_err(|(p, o, e)| {
            StoreError::Internal(format!(
                "stored thread does not rebuild at patches[{p}].patch.ops[{o}]: {e}"
            ))
        })?;
        let mut r = Self::fresh(
            snap.thread,
            current_state,
            snap.version,
            snap.created_at,
            snap.updated_at,
        );
        r.watermark = snap.watermark;
        r.incarnation = snap.incarnation;
        Ok(r)
    }

    /// The thread as a snapshot at its version.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            thread: self.thread.clone(),
            version: self.version,
            watermark: self.watermark,
            incarnation: self.incarnation,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// The current state and where it stands.
    pub fn state(&self) -> StateAt {
        StateAt {
            state: self.current_state.clone(),
            version: self.version,
            incarnation: self.incarnation,
        }
    }

    /// The thread as a listing shows it.
    pub fn summary(&self) -> ThreadSummary {
        ThreadSummary {
            id: self.thread.id.clone(),
            resource_id: self.thread.resource_id.clone(),
            parent_thread_id: self.thread.parent_thread_id.clone(),
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            message_count: self.thread.messages.len() as u64,
            metadata: self.thread.metadata.clone(),
        }
    }

    /// Moves to the next version and records what the write did.
    fn bump(&mut self, change: Change, now: i64) -> u64 {
        self.version += 1;
        self.watermark = self.version;
        self.updated_at = now;
        self.history.push_back(Write {
            version: self.version,
            at: now,
            change,
            idempotency: None,
        });
        while self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.version
    }

    /// Appends a delta as the next version (see [`super::Store::append`]); nothing changes on
    /// error.
    pub fn append(
        &mut self,
        delta: &ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
        now: i64,
    ) -> Result<Appended> {
        if let Some(key) = idempotency
            && let Some(replay) = self.idempotent(key)?
        {
            return Ok(replay);
        }
        expect.check(self.version)?;
        let version = self.apply(delta, now)?;
        if let Some(key) = idempotency {
            self.remember(key, version);
        }
        Ok(Appended {
            version,
            replayed: false,
        })
    }

    /// Remembers `key` as the write at `version`, replacing any earlier entry for the same key,
    /// and forgets the oldest keys past [`IDEMPOTENCY_KEYS_KEPT`]. Versions only grow, so the
    /// queue stays ordered by version.
    /// The remembered write for `key`, if any (see [`super::Store::idempotent`]).
    pub fn idempotent(&self, key: &IdempotencyKey) -> Result<Option<Appended>> {
        self.idempotency
            .iter()
            .find(|(k, _)| k.key == key.key)
            .map(|(seen, version)| super::replay_of(&seen.fingerprint, key, *version))
            .transpose()
    }

    fn remember(&mut self, key: &IdempotencyKey, version: u64) {
        self.idempotency.retain(|(k, _)| k.key != key.key);
        self.idempotency.push_back((key.clone(), version));
        while self.idempotency.len() > IDEMPOTENCY_KEYS_KEPT {
            self.idempotency.pop_front();
        }
    }

    /// Applies one delta as the next version; nothing changes on error.
    fn apply(&mut self, delta: &ChangeSet, now: i64) -> Result<u64> {
        let mut delta = delta.clone();
        delta.normalize();
        let plan = plan_delta(&self.current_state, &delta, |id| self.ids.contains(id))?;
        if plan.replaces_state {
            if let Some(snapshot) = &delta.snapshot {
                self.thread.state = snapshot.clone();
            }
            self.thread.patches.clear();
        }
        for &i in &plan.new_messages {
            let m = delta.messages[i].clone();
            if let Some(id) = &m.id {
                self.ids.insert(id.clone());
            }
            self.thread.messages.push(m);
        }
        self.thread.patches.extend(delta.patches.iter().cloned());
        self.current_state = plan.new_current_state;
        let version = self.version + 1;
        if let Some(meta) = &delta.run_meta {
            match self.runs.iter_mut().find(|r| r.run_id == delta.run_id) {
                Some(run) => {
                    run.meta = meta.clone();
                    if delta.parent_run_id.is_some() {
                        run.parent_run_id = delta.parent_run_id.clone();
                    }
                    run.version = version;
                    run.updated_at = now;
                }
                None => self.runs.push(RunRecord {
                    run_id: delta.run_id.clone(),
                    thread_id: self.thread.id.clone(),
                    parent_run_id: delta.parent_run_id.clone(),
                    meta: meta.clone(),
                    version,
                    created_at: now,
                    updated_at: now,
                }),
            }
        }
        Ok(self.bump(Change::Delta(delta), now))
    }

    /// Folds log entries above the watermark (see [`super::Store::apply_batch`]); all or
    /// nothing.
    pub fn apply_batch(&mut self, entries: &[Write], now: i64) -> Result<u64> {
        let id =
            ThreadId::parse(&self.thread.id).map_err(|e| StoreError::Internal(e.to_string()))?;
        let prepared = super::prepare_batch(&id, entries, self.watermark)?;
        if prepared.is_empty() {
            return Ok(self.watermark);
        }
        let mut next = self.clone();
        for (entry, change) in prepared {
            next.version = entry.version - 1;
            match change {
                Prepared::Delta(delta) => next.apply(delta, now)?,
                Prepared::Replace(thread, state) => next.set_thread(thread, state, now),
                Prepared::Metadata(patch) => next.merge_metadata(patch, now),
            };
            if let Some(key) = &entry.idempotency {
                next.remember(key, entry.version);
            }
        }
        *self = next;
        Ok(self.watermark)
    }

    /// Validates a full thread for this record and returns it with its current state.
    fn prepare(&self, mut thread: Thread) -> Result<(Thread, Value)> {
        let id =
            ThreadId::parse(&self.thread.id).map_err(|e| StoreError::Internal(e.to_string()))?;
        let state = super::prepare_thread(&id, &mut thread)?;
        Ok((thread, state))
    }

    /// Replaces the whole thread (already prepared) as the next version.
    fn set_thread(&mut self, thread: Thread, state: Value, now: i64) -> u64 {
        self.current_state = state;
        self.thread = thread.clone();
        self.rebuild_ids();
        self.bump(Change::Replace(thread), now)
    }

    /// Merges a metadata patch as the next version.
    fn merge_metadata(&mut self, mut patch: Extra, now: i64) -> u64 {
        super::strip_server_metadata(&mut patch);
        super::merge_metadata(&mut self.thread.metadata, &patch);
        self.bump(Change::Metadata(patch), now)
    }

    /// Replaces the whole thread as the next version (see [`super::Store::replace`]).
    pub fn replace(&mut self, thread: Thread, expect: Expect, now: i64) -> Result<u64> {
        let (thread, state) = self.prepare(thread)?;
        expect.check(self.version)?;
        Ok(self.set_thread(thread, state, now))
    }

    /// Merges metadata keys as the next version (see [`super::Store::patch_metadata`]).
    pub fn patch_metadata(&mut self, patch: Extra, expect: Expect, now: i64) -> Result<u64> {
        expect.check(self.version)?;
        Ok(self.merge_metadata(patch, now))
    }

    /// A page of messages (see [`super::Store::messages`]).
    pub fn messages(&self, q: &MessageQuery) -> MessagePage {
        let all = &self.thread.messages;
        let lo = q
            .after
            .map_or(0, |a| a.saturating_add(1))
            .min(all.len() as u64) as usize;
        let hi = q
            .before
            .map_or(all.len() as u64, |b| b.min(all.len() as u64)) as usize;
        let window = all.get(lo..hi.max(lo)).unwrap_or_default();
        let admitted = window
            .iter()
            .enumerate()
            .map(|(i, m)| ((lo + i) as u64, m))
            .filter(|(c, m)| q.admits(*c, m));
        let mut page: Vec<(u64, _)> = match q.order {
            Order::Asc => admitted
                .take(q.limit + 1)
                .map(|(c, m)| (c, m.clone()))
                .collect(),
            Order::Desc => {
                let all: Vec<_> = admitted.collect();
                all.into_iter()
                    .rev()
                    .take(q.limit + 1)
                    .map(|(c, m)| (c, m.clone()))
                    .collect()
            }
        };
        let has_more = page.len() > q.limit;
        page.truncate(q.limit);
        MessagePage {
            messages: page,
            has_more,
            version: self.version,
        }
    }

    /// The kept writes after `after`, at most `limit` (see [`super::Store::history`]).
    pub fn history(&self, after: u64, limit: usize) -> History {
        History {
            entries: self
                .history
                .iter()
                .filter(|e| e.version > after)
                .take(limit)
                .cloned()
                .collect(),
            first_kept: self.history.front().map(|e| e.version),
            version: self.version,
        }
    }
}
