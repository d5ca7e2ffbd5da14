//! Following a thread live: the gateway's SSE stream (`GET /v1/threads/{id}/events`) as a
//! `Stream` of typed [`LiveEvent`]s.
//!
//! Every write event carries the version it produced, and the gateway continues a stream
//! after any version it is given (`after` / `Last-Event-ID`) with no gap and no duplicate,
//! from whichever replica, whether the writes are still buffered or already folded. So the
//! stream here only has to remember the last version it delivered and reconnect after it
//! when the connection drops, the gateway restarts, or the stream goes silent for longer than
//! the keep-alive interval allows: every version is delivered exactly once. `reset` (the
//! position can no longer be replayed) and `deleted` end the stream; so do errors that a
//! reconnect cannot fix (`404`, a `4xx`) and a gateway that stays away for
//! [`crate::ThreadgateStoreBuilder::follow_reconnects`] attempts.
//!
//! The SSE framing (lines, fields, multi-line data, comments) is parsed by the
//! `eventsource-stream` crate.

use crate::transport::{Answer, Ctx, error_chain, problem};
use crate::{Inner, ThreadgateStore};
use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tirea_contract::storage::ThreadStoreError;
use tirea_contract::{Thread, ThreadChangeSet, Version};

/// One event of a thread's live stream (or one entry of its history).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LiveEvent {
    /// A delta was appended, producing `version`.
    Delta {
        version: Version,
        delta: ThreadChangeSet,
    },
    /// The thread was saved whole (`save`, `PUT`), producing `version`: replace your copy.
    /// Its metadata holds the custom keys only.
    Snapshot { version: Version, thread: Thread },
    /// A metadata merge patch (`null` removes a key), producing `version`.
    Metadata {
        version: Version,
        metadata: Map<String, Value>,
    },
    /// Buffered mode: the gateway's store now holds every write up to `version`.
    Flushed { version: Version },
    /// The position is older than what the gateway can replay, or belongs to an earlier life
    /// of the thread (deleted and created again while the stream was away): reload the
    /// thread and follow again from its version. The stream ends after this event.
    Reset {
        /// The thread's current version.
        version: Version,
    },
    /// The thread was deleted. The stream ends after this event.
    Deleted,
}

impl LiveEvent {
    /// The version a write produced (`Delta`, `Snapshot`, `Metadata`); `None` for notices.
    pub fn version(&self) -> Option<Version> {
        match self {
            LiveEvent::Delta { version, .. }
            | LiveEvent::Snapshot { version, .. }
            | LiveEvent::Metadata { version, .. } => Some(*version),
            LiveEvent::Flushed { .. } | LiveEvent::Reset { .. } | LiveEvent::Deleted => None,
        }
    }
}

/// The stream [`ThreadgateStore::follow`] returns.
pub type LiveStream = Pin<Box<dyn Stream<Item = Result<LiveEvent, ThreadStoreError>> + Send>>;

impl ThreadgateStore {
    /// Follows `thread_id` live from the write after version `after` (the version of a
    /// thread you loaded, or of the last event you applied; 0 for everything the gateway
    /// still has). The stream yields every later write once, in version order, for as long
    /// as you poll it: it reconnects with `Last-Event-ID` across dropped connections and
    /// gateway restarts, and ends after [`LiveEvent::Reset`], [`LiveEvent::Deleted`] or an
    /// error (a missing thread is `NotFound`; a gateway away for longer than the reconnect
    /// budget is `Io`).
    pub fn follow(&self, thread_id: &str, after: Version) -> LiveStream {
        let follow = Follow {
            inner: self.inner.clone(),
            thread_id: thread_id.to_owned(),
            last: after,
            incarnation: None,
            events: None,
            failures: 0,
            drops: 0,
            done: false,
        };
        Box::pin(futures::stream::unfold(follow, |mut f| async move {
            f.next().await.map(|item| (item, f))
        }))
    }
}

/// Why an open stream stopped delivering.
#[derive(Debug)]
enum Transport {
    Http(reqwest::Error),
    Idle(Duration),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Http(e) => f.write_str(&error_chain(e)),
            Transport::Idle(d) => write!(f, "nothing received for {d:?}"),
        }
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<Transport>>> + Send>>;

/// Ends the byte stream with [`Transport::Idle`] when it is silent for `idle` (the gateway
/// sends keep-alive comments, so silence means a dead connection).
fn with_idle_timeout(
    bytes: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, Transport>> + Send {
    futures::stream::unfold((Box::pin(bytes), false), move |(mut s, ended)| async move {
        if ended {
            return None;
        }
        match tokio::time::timeout(idle, s.next()).await {
            Ok(Some(Ok(b))) => Some((Ok(b), (s, false))),
            Ok(Some(Err(e))) => Some((Err(Transport::Http(e)), (s, true))),
            Ok(None) => None,
            Err(_) => Some((Err(Transport::Idle(idle)), (s, true))),
        }
    })
}

/// The outcome of opening the stream.
enum Open {
    /// The stream, and the thread's incarnation the gateway named.
    Stream(Events, Option<String>),
    /// Worth another attempt (after the server's `Retry-After`, if any).
    Retry(String, Option<Duration>),
    Fatal(ThreadStoreError),
}

#[derive(Deserialize)]
struct WriteData<T> {
    version: Version,
    #[serde(flatten)]
    body: T,
}

#[derive(Deserialize)]
struct DeltaBody {
    delta: ThreadChangeSet,
}

#[derive(Deserialize)]
struct SnapshotBody {
    thread: Thread,
}

#[derive(Deserialize)]
struct MetadataBody {
    metadata: Map<String, Value>,
}

#[derive(Deserialize)]
struct VersionData {
    version: Version,
}

struct Follow {
    inner: Arc<Inner>,
    thread_id: String,
    /// The last write version delivered: the position to resume after.
    last: Version,
    /// The thread's life the stream follows (the gateway's `threadgate-incarnation` from the
    /// first connection), sent back on every reconnect: a thread deleted and created again
    /// while the stream was away then answers `reset`, not the new thread's versions.
    incarnation: Option<String>,
    events: Option<Events>,
    /// Consecutive failed attempts to open the stream.
    failures: u32,
    /// Consecutive connections that ended without delivering an event (paces reconnects to
    /// a gateway that accepts and then drops streams).
    drops: u32,
    done: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Result<LiveEvent, ThreadStoreError>> {
        loop {
            if self.done {
                return None;
            }
            let Some(events) = self.events.as_mut() else {
                match open(
                    &self.inner,
                    &self.thread_id,
                    self.last,
                    self.incarnation.as_deref(),
                )
                .await
                {
                    Open::Stream(s, incarnation) => {
                        self.events = Some(s);
                        if self.incarnation.is_none() {
                            self.incarnation = incarnation;
                        }
                        self.failures = 0;
                    }
                    Open::Fatal(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    Open::Retry(why, server_delay) => {
                        self.failures += 1;
                        if self.failures > self.inner.follow_reconnects {
                            self.done = true;
                            return Some(Err(ThreadStoreError::Io(io::Error::other(format!(
                                "threadgate: following {:?} failed {} times in a row: {why}",
                                self.thread_id, self.failures
                            )))));
                        }
                        tokio::time::sleep(self.inner.backoff(self.failures, server_delay)).await;
                    }
                }
                continue;
            };
            match events.next().await {
                Some(Ok(event)) => match self.decode(event) {
                    Ok(Some(event)) => {
                        self.drops = 0;
                        return Some(Ok(event));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
                // A dropped or silent connection, or the gateway shutting down: resume after
                // the last version delivered.
                Some(Err(_)) | None => {
                    self.events = None;
                    if self.drops > 0 {
                        tokio::time::sleep(self.inner.backoff(self.drops, None)).await;
                    }
                    self.drops += 1;
                }
            }
        }
    }

    /// The typed event, `None` for one to skip (an unknown kind, or a write already
    /// delivered).
    fn decode(&mut self, event: Event) -> Result<Option<LiveEvent>, ThreadStoreError> {
        fn data<T: serde::de::DeserializeOwned>(e: &Event) -> Result<T, ThreadStoreError> {
            serde_json::from_str(&e.data).map_err(|err| {
                ThreadStoreError::Serialization(format!(
                    "threadgate sent an undecodable {:?} event: {err}",
                    e.event
                ))
            })
        }
        let live = match event.event.as_str() {
            "delta" => {
                let d: WriteData<DeltaBody> = data(&event)?;
                LiveEvent::Delta {
                    version: d.version,
                    delta: d.body.delta,
                }
            }
            "snapshot" => {
                let d: WriteData<SnapshotBody> = data(&event)?;
                LiveEvent::Snapshot {
                    version: d.version,
                    thread: d.body.thread,
                }
            }
            "metadata" => {
                let d: WriteData<MetadataBody> = data(&event)?;
                LiveEvent::Metadata {
                    version: d.version,
                    metadata: d.body.metadata,
                }
            }
            "flushed" => LiveEvent::Flushed {
                version: data::<VersionData>(&event)?.version,
            },
            "reset" => {
                self.done = true;
                LiveEvent::Reset {
                    version: data::<VersionData>(&event)?.version,
                }
            }
            "deleted" => {
                self.done = true;
                LiveEvent::Deleted
            }
            // A kind this client does not know (a newer gateway): skip it.
            _ => return Ok(None),
        };
        if let Some(v) = live.version() {
            if v <= self.last {
                return Ok(None);
            }
            self.last = v;
        }
        Ok(Some(live))
    }
}

/// Opens the stream after `last` (no `&Follow` held across an await: it is not `Sync`).
async fn open(inner: &Inner, thread_id: &str, last: Version, incarnation: Option<&str>) -> Open {
    let ctx = Ctx {
        thread_id,
        expected: None,
    };
    if let Err(e) = crate::store::path_id(thread_id) {
        return Open::Fatal(e);
    }
    let mut query = vec![("after", last.to_string())];
    if let Some(i) = incarnation {
        query.push(("incarnation", i.to_owned()));
    }
    let url = inner.url(&["v1", "threads", thread_id, "events"], &query);
    let mut req = inner
        .http
        .get(url)
        .header(ACCEPT, "text/event-stream")
        .header(
            "last-event-id",
            HeaderValue::from_str(&last.to_string()).expect("digits are a valid header"),
        );
    if let Some(auth) = &inner.authorization {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let res = match tokio::time::timeout(inner.timeout, req.send()).await {
        Err(_) => return Open::Retry("timed out opening the stream".into(), None),
        Ok(Err(e)) => return Open::Retry(error_chain(&e), None),
        Ok(Ok(res)) => res,
    };
    let status = res.status();
    if status == StatusCode::OK {
        let incarnation = res
            .headers()
            .get("threadgate-incarnation")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned);
        let bytes = with_idle_timeout(res.bytes_stream(), inner.follow_idle_timeout);
        return Open::Stream(Box::pin(bytes.eventsource()), incarnation);
    }
    let server_delay = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs);
    let body = match tokio::time::timeout(inner.timeout, res.bytes()).await {
        Ok(Ok(b)) => b,
        _ => Bytes::new(),
    };
    let answer = Answer { status, body };
    if matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    ) {
        return Open::Retry(problem(&answer, ctx).to_string(), server_delay);
    }
    Open::Fatal(problem(&answer, ctx))
}
