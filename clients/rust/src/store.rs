//! tirea-contract's storage traits over the gateway's REST API.
//!
//! Each method is one or a few requests; the notes on the trait implementations say where
//! the gateway's API shapes the semantics (listing, runs, the delta history).

use crate::follow::LiveEvent;
use crate::transport::{Ctx, Request, Sent, Verify, parse, problem};
use crate::{Inner, ThreadgateStore};
use async_trait::async_trait;
use futures::FutureExt;
use reqwest::header::{HeaderName, HeaderValue, IF_MATCH};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io;
use tirea_contract::storage::{
    MessagePage, MessageQuery, MessageWithCursor, RunPage, RunQuery, RunReader, RunRecord,
    RunStoreError, SortOrder, ThreadHead, ThreadListPage, ThreadListQuery, ThreadReader,
    ThreadStoreError, ThreadSync, ThreadWriter, VersionPrecondition, paginate_runs_in_memory,
};
use tirea_contract::{Committed, RunMeta, Thread, ThreadChangeSet, Version, Visibility};

type Result<T, E = ThreadStoreError> = std::result::Result<T, E>;

/// Largest page of the gateway's thread listing and message pages.
const MAX_PAGE: usize = 200;
/// Largest page of the gateway's history (`GET .../deltas`).
const HISTORY_PAGE: usize = 1_000;
/// How often `save` retries when the thread is created or deleted by someone else between
/// its replace and its create; more than that is a livelock worth reporting.
const SAVE_RACES: usize = 3;
/// Metadata keys the gateway maintains itself (it ignores them on input).
const SERVER_METADATA_KEYS: [&str; 4] =
    ["created_at", "updated_at", "version", "version_timestamp"];

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

#[derive(Deserialize)]
struct VersionBody {
    version: u64,
}

#[derive(Deserialize)]
struct WireMessagePage {
    messages: Vec<MessageWithCursor>,
    has_more: bool,
}

#[derive(Deserialize)]
struct WireSummary {
    id: String,
}

#[derive(Deserialize)]
struct WireList {
    threads: Vec<WireSummary>,
    has_more: bool,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct WireRun {
    run_id: String,
    thread_id: String,
    parent_run_id: Option<String>,
    meta: RunMeta,
    created_at: i64,
    updated_at: i64,
}

impl From<WireRun> for RunRecord {
    fn from(r: WireRun) -> RunRecord {
        let m = r.meta;
        RunRecord {
            run_id: r.run_id,
            thread_id: r.thread_id,
            agent_id: m.agent_id,
            parent_run_id: r.parent_run_id,
            parent_thread_id: m.parent_thread_id,
            origin: m.origin,
            status: m.status,
            termination_code: m.termination_code,
            termination_detail: m.termination_detail,
            created_at: r.created_at.max(0) as u64,
            updated_at: r.updated_at.max(0) as u64,
            source_mailbox_entry_id: m.source_mailbox_entry_id,
            metadata: None,
            input_tokens: m.input_tokens,
            output_tokens: m.output_tokens,
        }
    }
}

/// One entry of `GET /v1/threads/{id}/deltas`.
#[derive(Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum WireEntry {
    Delta {
        version: u64,
        delta: ThreadChangeSet,
    },
    Snapshot {
        version: u64,
        thread: Thread,
    },
    Metadata {
        version: u64,
        metadata: serde_json::Map<String, Value>,
    },
}

impl From<WireEntry> for LiveEvent {
    fn from(e: WireEntry) -> LiveEvent {
        match e {
            WireEntry::Delta { version, delta } => LiveEvent::Delta { version, delta },
            WireEntry::Snapshot { version, thread } => LiveEvent::Snapshot { version, thread },
            WireEntry::Metadata { version, metadata } => LiveEvent::Metadata { version, metadata },
        }
    }
}

#[derive(Deserialize)]
struct WireHistory {
    entries: Vec<WireEntry>,
    version: u64,
    complete: bool,
    has_more: bool,
}

/// The thread id as a path segment; the gateway judges everything but what would not reach
/// it intact: emptiness (which would name another route) and ASCII tab, line feed and carriage
/// return, which URL building drops (WHATWG URL rules; `tab\there` would name `tabhere`) and
/// which no valid id holds.
pub(crate) fn path_id(id: &str) -> Result<&str> {
    if id.is_empty() {
        return Err(ThreadStoreError::InvalidId("the id is empty".into()));
    }
    if id.contains(['\t', '\n', '\r']) {
        return Err(ThreadStoreError::InvalidId(
            "control characters are not allowed in an id".into(),
        ));
    }
    Ok(id)
}

fn to_json(value: &impl serde::Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| ThreadStoreError::Serialization(e.to_string()))
}

/// The `Idempotency-Key` of an append: a digest of the thread, the precondition and the exact
/// body, so a retry of the same call carries the same key and a different append a different
/// one. (Two byte-identical deltas appended with [`VersionPrecondition::Any`] within the
/// gateway's de-duplication window count as one; tirea's deltas carry fresh message ids.)
fn idempotency_key(thread_id: &str, precondition: VersionPrecondition, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"threadgate-client append v1\n");
    h.update(thread_id.as_bytes());
    match precondition {
        VersionPrecondition::Any => h.update(b"\nany\n"),
        VersionPrecondition::Exact(v) => h.update(format!("\nexact {v}\n").as_bytes()),
    }
    h.update(body);
    format!("tgc1-{}", hex::encode(h.finalize()))
}

/// A thread as a comparable JSON value, without the metadata the gateway maintains.
fn content(thread: &Thread) -> Value {
    let mut v = serde_json::to_value(thread).unwrap_or(Value::Null);
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in SERVER_METADATA_KEYS {
            meta.remove(k);
        }
    }
    v
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what.to_owned())
}

/// Why a run cannot be found by its id alone.
const RUNS_PER_THREAD: &str = "threadgate keeps run records per thread: look runs up with \
    a thread (RunQuery::thread_id, active_run_for_thread, ThreadgateStore::load_thread_run)";

impl Inner {
    async fn load(&self, thread_id: &str) -> Result<Option<ThreadHead>> {
        let path = ["v1", "threads", path_id(thread_id)?];
        let req = Request::new(Method::GET, &path).query("view", "live");
        let answer = self.call(&req).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if answer.status != StatusCode::OK {
            return Err(problem(&answer, ctx(thread_id)));
        }
        let mut value: Value = parse(&answer)?;
        let version = value
            .as_object_mut()
            .and_then(|o| o.remove("version"))
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                ThreadStoreError::Serialization("threadgate sent a thread without a version".into())
            })?;
        let thread: Thread = serde_json::from_value(value)
            .map_err(|e| ThreadStoreError::Serialization(e.to_string()))?;
        Ok(Some(ThreadHead { thread, version }))
    }

    /// Whether the gateway holds `thread` (its content; at `version` if given).
    async fn holds(&self, thread: &Thread, version: Option<u64>) -> Result<bool> {
        Ok(match self.load(&thread.id).await? {
            Some(head) => {
                version.is_none_or(|v| v == head.version)
                    && content(&head.thread) == content(thread)
            }
            None => false,
        })
    }

    async fn create(&self, thread: &Thread) -> Result<Committed> {
        let req = Request::new(Method::POST, &["v1", "threads"]).json(to_json(thread)?);
        let verify = || self.holds(thread, Some(0)).boxed();
        match self.send(&req, Some(&verify as Verify<'_>)).await? {
            Sent::Applied => Ok(Committed { version: 0 }),
            Sent::Answer(a) if a.status == StatusCode::CREATED => Ok(Committed {
                version: parse::<VersionBody>(&a)?.version,
            }),
            Sent::Answer(a) => Err(problem(&a, ctx(&thread.id))),
        }
    }

    async fn runs(&self, thread_id: &str) -> Result<Option<Vec<RunRecord>>> {
        let path = ["v1", "threads", path_id(thread_id)?, "runs"];
        let answer = self.call(&Request::new(Method::GET, &path)).await?;
        match answer.status {
            StatusCode::OK => Ok(Some(
                parse::<Vec<WireRun>>(&answer)?
                    .into_iter()
                    .map(RunRecord::from)
                    .collect(),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(problem(&answer, ctx(thread_id))),
        }
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage> {
        let Some(thread_id) = &query.thread_id else {
            return Err(ThreadStoreError::Io(unsupported(RUNS_PER_THREAD)));
        };
        let records = self.runs(thread_id).await?.unwrap_or_default();
        Ok(paginate_runs_in_memory(&records, query))
    }

    async fn active_run(&self, thread_id: &str) -> Result<Option<RunRecord>> {
        Ok(self
            .runs(thread_id)
            .await?
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !r.status.is_terminal())
            .max_by(|a, b| {
                (a.created_at, a.updated_at, &a.run_id).cmp(&(
                    b.created_at,
                    b.updated_at,
                    &b.run_id,
                ))
            }))
    }

    /// Every history page after `after`, and the thread's version as of the last page;
    /// `Err(VersionConflict)` when the position cannot be continued.
    async fn history(&self, thread_id: &str, after: Version) -> Result<(Vec<LiveEvent>, u64)> {
        let path = ["v1", "threads", path_id(thread_id)?, "deltas"];
        let mut out = Vec::new();
        let mut at = after;
        loop {
            let req = Request::new(Method::GET, &path)
                .query("after", at)
                .query("limit", HISTORY_PAGE);
            let answer = self.call(&req).await?;
            if answer.status != StatusCode::OK {
                return Err(problem(&answer, ctx(thread_id)));
            }
            let page: WireHistory = parse(&answer)?;
            if !page.complete {
                return Err(ThreadStoreError::VersionConflict {
                    expected: after,
                    actual: page.version,
                });
            }
            let before = out.len();
            out.extend(page.entries.into_iter().map(LiveEvent::from));
            if let Some(v) = out.last().and_then(LiveEvent::version) {
                at = v;
            }
            if !page.has_more || out.len() == before {
                return Ok((out, page.version));
            }
        }
    }
}

fn ctx(thread_id: &str) -> Ctx<'_> {
    Ctx {
        thread_id,
        expected: None,
    }
}

impl ThreadgateStore {
    /// Every write after `after` as the live stream would send it (deltas, full saves as
    /// `Snapshot`, metadata changes as `Metadata`), from the gateway's history: the last
    /// 1,000 writes plus, in buffered mode, everything not yet folded. A position older than
    /// that (or newer than the thread) is `Err(VersionConflict { expected: after, actual:
    /// <current version> })`: reload the thread and continue from its version.
    pub async fn history(&self, thread_id: &str, after: Version) -> Result<Vec<LiveEvent>> {
        Ok(self.inner.history(thread_id, after).await?.0)
    }

    /// Folds the thread's buffered writes into the gateway's store now (buffered mode; in
    /// direct mode the store is always caught up) and returns the version the store holds.
    /// Retried like any request: a fold is idempotent.
    pub async fn flush(&self, thread_id: &str) -> Result<Version> {
        let path = ["v1", "threads", path_id(thread_id)?, "flush"];
        let req = Request::new(Method::POST, &path).json(b"{}".to_vec());
        let answer = self.inner.call(&req).await?;
        if answer.status != StatusCode::OK {
            return Err(problem(&answer, ctx(thread_id)));
        }
        Ok(parse::<VersionBody>(&answer)?.version)
    }

    /// One run record of a thread (`None` when the thread or the run does not exist).
    pub async fn load_thread_run(
        &self,
        thread_id: &str,
        run_id: &str,
    ) -> Result<Option<RunRecord>> {
        let path = ["v1", "threads", path_id(thread_id)?, "runs", run_id];
        let answer = self.inner.call(&Request::new(Method::GET, &path)).await?;
        match answer.status {
            StatusCode::OK => Ok(Some(parse::<WireRun>(&answer)?.into())),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(problem(&answer, ctx(thread_id))),
        }
    }
}

/// Reads use the gateway's live view (`view=live`): in buffered mode they include what is
/// still buffered, so a load right after an append sees it.
#[async_trait]
impl ThreadReader for ThreadgateStore {
    async fn load(&self, thread_id: &str) -> Result<Option<ThreadHead>> {
        self.inner.load(thread_id).await
    }

    /// One `GET .../messages` page. Cursors are message positions, as in tirea's stores;
    /// `visibility: None` asks for every message.
    async fn load_messages(&self, thread_id: &str, query: &MessageQuery) -> Result<MessagePage> {
        let path = ["v1", "threads", path_id(thread_id)?, "messages"];
        let mut req = Request::new(Method::GET, &path)
            .query("limit", query.limit.clamp(1, MAX_PAGE))
            .query(
                "order",
                match query.order {
                    SortOrder::Asc => "asc",
                    SortOrder::Desc => "desc",
                },
            )
            .query(
                "visibility",
                match query.visibility {
                    None => "any",
                    Some(Visibility::All) => "all",
                    Some(Visibility::Internal) => "internal",
                },
            )
            .query("view", "live");
        // tirea's cursors are i64: a negative `after` is the start, a negative `before` an
        // empty range.
        if let Some(after) = query.after.filter(|a| *a >= 0) {
            req = req.query("after", after);
        }
        if let Some(before) = query.before {
            req = req.query("before", before.max(0));
        }
        if let Some(run_id) = &query.run_id {
            req = req.query("run_id", run_id);
        }
        let answer = self.inner.call(&req).await?;
        if answer.status != StatusCode::OK {
            return Err(problem(&answer, ctx(thread_id)));
        }
        let page: WireMessagePage = parse(&answer)?;
        Ok(MessagePage {
            next_cursor: page.messages.last().map(|m| m.cursor),
            prev_cursor: page.messages.first().map(|m| m.cursor),
            messages: page.messages,
            has_more: page.has_more,
        })
    }

    /// tirea lists by offset with a total; the gateway pages by id (keyset, byte order, as
    /// tirea's stores sort). So this walks the gateway's pages of 200 from the start, keeping
    /// only the requested window: `total / 200` requests, memory for one page.
    async fn list_threads(&self, query: &ThreadListQuery) -> Result<ThreadListPage> {
        let limit = query.limit.clamp(1, MAX_PAGE);
        let path = ["v1", "threads"];
        let (mut total, mut items, mut cursor) = (0usize, Vec::new(), None::<String>);
        loop {
            let mut req = Request::new(Method::GET, &path).query("limit", MAX_PAGE);
            if let Some(r) = &query.resource_id {
                req = req.query("resource_id", r);
            }
            if let Some(p) = &query.parent_thread_id {
                req = req.query("parent_thread_id", p);
            }
            if let Some(c) = &cursor {
                req = req.query("cursor", c);
            }
            let answer = self.inner.call(&req).await?;
            if answer.status != StatusCode::OK {
                return Err(problem(&answer, ctx("")));
            }
            let page: WireList = parse(&answer)?;
            for t in page.threads {
                if total >= query.offset && items.len() < limit {
                    items.push(t.id);
                }
                total += 1;
            }
            match page.next_cursor {
                Some(next) if page.has_more => cursor = Some(next),
                _ => break,
            }
        }
        Ok(ThreadListPage {
            items,
            total,
            has_more: total.saturating_sub(query.offset) > limit,
        })
    }

    /// One request for the last message's cursor (cursors are positions).
    async fn message_count(&self, thread_id: &str) -> Result<usize> {
        let query = MessageQuery {
            limit: 1,
            order: SortOrder::Desc,
            visibility: None,
            ..MessageQuery::default()
        };
        let page = self.load_messages(thread_id, &query).await?;
        Ok(page.messages.first().map_or(0, |m| m.cursor as usize + 1))
    }

    /// Unsupported (`Io` of kind `Unsupported`): the gateway keeps runs per thread. Use
    /// [`ThreadgateStore::load_thread_run`].
    async fn load_run(&self, _run_id: &str) -> Result<Option<RunRecord>> {
        Err(ThreadStoreError::Io(unsupported(RUNS_PER_THREAD)))
    }

    /// The runs of `query.thread_id` (required; without it `Io` of kind `Unsupported`),
    /// filtered and paged like tirea's stores do. In buffered mode a run's record appears
    /// when its deltas are folded (at the latest when the run finishes).
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage> {
        self.inner.list_runs(query).await
    }

    async fn active_run_for_thread(&self, thread_id: &str) -> Result<Option<RunRecord>> {
        self.inner.active_run(thread_id).await
    }
}

#[async_trait]
impl ThreadWriter for ThreadgateStore {
    /// `POST /v1/threads`. A retry after a lost answer that finds the thread created with
    /// this content at version 0 counts as success.
    async fn create(&self, thread: &Thread) -> Result<Committed> {
        self.inner.create(thread).await
    }

    /// `POST /v1/threads/{id}/deltas` with `If-Match` for [`VersionPrecondition::Exact`] and an
    /// `Idempotency-Key` digest of the call, so retries never append twice; the answer's
    /// version is the committed one.
    async fn append(
        &self,
        thread_id: &str,
        delta: &ThreadChangeSet,
        precondition: VersionPrecondition,
    ) -> Result<Committed> {
        let path = ["v1", "threads", path_id(thread_id)?, "deltas"];
        let body = to_json(delta)?;
        let key = idempotency_key(thread_id, precondition, &body);
        let mut req = Request::new(Method::POST, &path)
            .header(
                IDEMPOTENCY_KEY.clone(),
                HeaderValue::from_str(&key).expect("hex is a valid header"),
            )
            .json(body);
        if let VersionPrecondition::Exact(v) = precondition {
            req = req.header(
                IF_MATCH,
                HeaderValue::from_str(&format!("\"{v}\"")).expect("digits are a valid header"),
            );
        }
        let answer = self.inner.call(&req).await?;
        if answer.status != StatusCode::OK {
            let expected = match precondition {
                VersionPrecondition::Exact(v) => Some(v),
                VersionPrecondition::Any => None,
            };
            return Err(problem(
                &answer,
                Ctx {
                    thread_id,
                    expected,
                },
            ));
        }
        Ok(Committed {
            version: parse::<VersionBody>(&answer)?.version,
        })
    }

    /// `DELETE /v1/threads/{id}`; deleting a thread that does not exist succeeds, as in
    /// tirea's stores (so a retried delete is harmless too).
    async fn delete(&self, thread_id: &str) -> Result<()> {
        let path = ["v1", "threads", path_id(thread_id)?];
        let answer = self
            .inner
            .call(&Request::new(Method::DELETE, &path))
            .await?;
        match answer.status {
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(problem(&answer, ctx(thread_id))),
        }
    }

    /// Upsert: `PUT /v1/threads/{id}` (the next version), or a create (version 0) when the
    /// thread does not exist. A retry after a lost answer that finds the thread already
    /// holding this content does not write it again.
    async fn save(&self, thread: &Thread) -> Result<()> {
        let path = ["v1", "threads", path_id(&thread.id)?];
        let body = to_json(thread)?;
        let verify = || self.inner.holds(thread, None).boxed();
        for _ in 0..SAVE_RACES {
            let req = Request::new(Method::PUT, &path).json(body.clone());
            match self.inner.send(&req, Some(&verify as Verify<'_>)).await? {
                Sent::Applied => return Ok(()),
                Sent::Answer(a) if a.status.is_success() => return Ok(()),
                Sent::Answer(a) if a.status == StatusCode::NOT_FOUND => {
                    match self.inner.create(thread).await {
                        Ok(_) => return Ok(()),
                        // Created by someone else in between: replace it.
                        Err(ThreadStoreError::AlreadyExists) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Sent::Answer(a) => return Err(problem(&a, ctx(&thread.id))),
            }
        }
        Err(ThreadStoreError::Io(io::Error::other(format!(
            "threadgate: save of {:?} kept racing with creates and deletes",
            thread.id
        ))))
    }
}

/// `load_deltas` reads `GET /v1/threads/{id}/deltas` (the gateway's last 1,000 writes plus,
/// in buffered mode, everything not yet folded). It answers `Err(VersionConflict { expected:
/// after_version, actual: <current version> })` when the deltas after `after_version` cannot
/// be listed as ChangeSets: the position is older than that history or newer than the
/// thread, or a full save or metadata change lies in between (see
/// [`ThreadgateStore::history`] for those). Reload the thread then, and continue from its
/// version.
#[async_trait]
impl ThreadSync for ThreadgateStore {
    async fn load_deltas(
        &self,
        thread_id: &str,
        after_version: Version,
    ) -> Result<Vec<ThreadChangeSet>> {
        let (entries, head) = self.inner.history(thread_id, after_version).await?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            match e {
                LiveEvent::Delta { delta, .. } => out.push(delta),
                _ => {
                    return Err(ThreadStoreError::VersionConflict {
                        expected: after_version,
                        actual: head,
                    });
                }
            }
        }
        Ok(out)
    }
}

fn run_error(e: ThreadStoreError) -> RunStoreError {
    RunStoreError::Backend(e.to_string())
}

/// The read side of tirea's run store, over the same per-thread run records (written by the
/// gateway from the deltas' `run_meta`; there is no `RunWriter`).
#[async_trait]
impl RunReader for ThreadgateStore {
    /// Unsupported (`Backend` error): the gateway keeps runs per thread.
    async fn load_run(&self, _run_id: &str) -> Result<Option<RunRecord>, RunStoreError> {
        Err(RunStoreError::Backend(RUNS_PER_THREAD.to_owned()))
    }

    /// Requires `query.thread_id`, like [`ThreadReader::list_runs`].
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, RunStoreError> {
        self.inner.list_runs(query).await.map_err(run_error)
    }

    async fn load_current_run(&self, thread_id: &str) -> Result<Option<RunRecord>, RunStoreError> {
        self.inner.active_run(thread_id).await.map_err(run_error)
    }
}

#[cfg(test)]
mod tests {
    use super::idempotency_key;
    use tirea_contract::storage::VersionPrecondition::{Any, Exact};

    #[test]
    fn idempotency_keys_follow_the_call() {
        let k = idempotency_key("t", Any, b"{}");
        assert_eq!(
            k,
            idempotency_key("t", Any, b"{}"),
            "a retry sends the same key"
        );
        assert!(k.len() <= 255 && k.is_ascii());
        for other in [
            idempotency_key("u", Any, b"{}"),
            idempotency_key("t", Exact(0), b"{}"),
            idempotency_key("t", Exact(1), b"{}"),
            idempotency_key("t", Any, b"{ }"),
        ] {
            assert_ne!(k, other);
        }
    }
}
