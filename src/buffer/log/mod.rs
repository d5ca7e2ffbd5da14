//! Each thread's log in NATS JetStream: subjects, encoding, reading, following and trimming.
//!
//! This is the only code that knows how a log entry looks on the wire (a JSON payload plus
//! `Tg-*` headers), what subject a thread's log lives on, and what a tombstone is. Everything
//! else (the buffered write path, folds, the live hub) goes through [`Log`].
//!
//! **Every read knows its end before it starts.** A read first asks for the subject's newest
//! message (one request), then fetches forward until it has seen that sequence. A fold that
//! trims the log under a reader cannot make it wait for messages that no longer exist: a fetch
//! that comes back empty before the end means the rest was trimmed, and a trimmed range is by
//! construction already in the store. Every request has a deadline ([`NATS_TIMEOUT`]); pages
//! are bounded in count and bytes, so no read holds a whole log in memory.
//!
//! `codec` is the wire form, `reader` the bounded read, `follow` the live follower.

mod codec;
mod connect;
mod follow;
mod reader;

pub use codec::{Body, LogEntry, encode};
pub use connect::{
    CLIENT_CAPACITY, NatsAuth, NatsTls, SUBSCRIPTION_CAPACITY, differences, redacted,
};
pub use follow::{Followed, LogFollower};
pub use reader::LogReader;

use crate::id::ThreadId;
use crate::store::{Change, IdempotencyKey, Incarnation};
use crate::write::{Error, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::response::Response;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use codec::{FlushedNotice, H_IDEM_FP, H_IDEM_KEY, H_VERSION, decode};
use futures::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Deadline of any one request to NATS (publish, get, consumer create, fetch).
pub const NATS_TIMEOUT: Duration = Duration::from_secs(5);
/// Safety-net retention of the log stream; folds happen long before this.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// JetStream's de-duplication window for `Idempotency-Key` retries: longer than a client's
/// retry loop, short enough that the server's memory of message ids stays small.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// Undecodable messages remembered as already set aside (so each is copied once).
const DEAD_SEEN: usize = 4_096;

/// A publish that JetStream took.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// The stream sequence it got (for a duplicate: the original's).
    pub seq: u64,
    /// True when JetStream had the message id already: nothing new was stored.
    pub duplicate: bool,
}

/// Why a publish did not go through.
#[derive(Debug)]
pub enum PublishFailure {
    /// Another writer appended to the subject first (the compare-and-set lost).
    Conflict,
    /// Any other failure.
    Error(Error),
}

/// How to reach NATS and name things there.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// NATS server URL(s), comma-separated seeds of one cluster; user info in them is used as
    /// credentials.
    pub url: String,
    /// Namespaces the stream and subjects: `[A-Za-z0-9_-]+`.
    pub prefix: String,
    /// How long start-up keeps retrying an unreachable server.
    pub startup_timeout: Duration,
    /// Replicas of the streams the gateway creates (an existing stream must match).
    pub replicas: usize,
    /// Credentials (besides any in the URL; at most one source).
    pub auth: NatsAuth,
    /// TLS settings.
    pub tls: NatsTls,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "threadgate".into(),
            startup_timeout: Duration::from_secs(30),
            replicas: 1,
            auth: NatsAuth::None,
            tls: NatsTls::default(),
        }
    }
}

/// The JetStream log of every thread (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Log {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: Arc<str>,
    max_payload: usize,
    dead_seen: Arc<quick_cache::sync::Cache<u64, ()>>,
    dead_letters: prometheus_client::metrics::counter::Counter,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::LogUnavailable(format!("{what}: {e}"))
}

/// Runs a NATS request with [`NATS_TIMEOUT`].
async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(NATS_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| unavailable(what, e)),
        Err(_) => Err(unavailable(what, "timed out")),
    }
}

impl Log {
    /// Connects (retrying an unreachable server for `startup_timeout`) and creates the log
    /// and dead-letter streams if they do not exist; an existing stream with other settings
    /// (replicas included) is a start-up error naming each difference. See `connect.rs` for
    /// credentials, TLS, reconnects and the client's buffers.
    pub async fn connect(config: &LogConfig) -> anyhow::Result<Log> {
        anyhow::ensure!(
            !config.prefix.is_empty()
                && config
                    .prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "--nats-prefix must be letters, digits, `_` or `-`"
        );
        let client = connect::connect(config).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(NATS_TIMEOUT);
        let prefix = config.prefix.as_str();
        let replicas = config.replicas.max(1);
        // A cluster may still be electing its JetStream leader when the gateway starts next
        // to it: retried like the connect.
        let stream = crate::app::retry_startup("JetStream", config.startup_timeout, || {
            connect::ensure_stream(
                &js,
                connect::stream_config(
                    format!("{prefix}_log"),
                    format!("{prefix}.log.>"),
                    replicas,
                    true,
                ),
                "log",
            )
        })
        .await?;
        crate::app::retry_startup("JetStream", config.startup_timeout, || {
            connect::ensure_stream(
                &js,
                connect::stream_config(
                    format!("{prefix}_dead"),
                    format!("{prefix}.dead.>"),
                    replicas,
                    false,
                ),
                "dead-letter",
            )
        })
        .await?;
        let max_payload = client.server_info().max_payload;
        Ok(Log {
            client,
            js,
            stream,
            prefix: prefix.into(),
            max_payload,
            dead_seen: Arc::new(quick_cache::sync::Cache::new(DEAD_SEEN)),
            dead_letters: Default::default(),
        })
    }

    /// Counts undecodable messages set aside (exported at `/metrics`).
    pub fn dead_letters(&self) -> &prometheus_client::metrics::counter::Counter {
        &self.dead_letters
    }

    /// The JetStream stream holding every thread's log.
    pub fn stream_name(&self) -> String {
        format!("{}_log", self.prefix)
    }

    /// The subject of the thread's log.
    pub fn subject(&self, id: &ThreadId) -> String {
        format!("{}.log.{}", self.prefix, id.encoded())
    }

    /// Core-NATS subject for notices that are not log entries (`flushed`).
    fn event_subject(&self, id: &ThreadId) -> String {
        format!("{}.ev.{}", self.prefix, id.encoded())
    }

    /// The largest payload the log takes (headers and framing need some of the server's).
    pub fn max_entry(&self) -> usize {
        self.max_payload.saturating_sub(1024)
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether NATS answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        if !self.is_connected() {
            return Err(Error::LogUnavailable("not connected to NATS".into()));
        }
        timed("flush", self.client.flush()).await
    }

    /// Encodes a write (or a tombstone) as a payload (see [`codec::encode`]).
    pub fn encode(change: Option<&Change>) -> Result<bytes::Bytes> {
        encode(change)
    }

    /// Publishes an encoded entry as `version`, only if the subject's last sequence is still
    /// `expected_seq` (0: empty). With a key, the message id makes a retry a duplicate within
    /// [`DUPLICATE_WINDOW`]; the incarnation keeps a re-created thread's ids apart.
    pub async fn publish(
        &self,
        id: &ThreadId,
        payload: bytes::Bytes,
        version: u64,
        expected_seq: u64,
        key: Option<(&IdempotencyKey, Incarnation)>,
    ) -> std::result::Result<Published, PublishFailure> {
        if payload.len() > self.max_entry() {
            return Err(PublishFailure::Error(Error::TooLarge {
                size: payload.len(),
                limit: self.max_entry(),
            }));
        }
        let mut publish = jetstream::context::Publish::build()
            .payload(payload)
            .expected_last_subject_sequence(expected_seq)
            .header(H_VERSION, version.to_string().as_str());
        if let Some((key, incarnation)) = key {
            publish = publish
                .message_id(format!("{}:{incarnation}:{}", id.encoded(), key.key))
                .header(H_IDEM_KEY, key.key.as_str())
                .header(H_IDEM_FP, key.fingerprint.as_str());
        }
        let sent = async { self.js.send_publish(self.subject(id), publish).await?.await };
        match tokio::time::timeout(NATS_TIMEOUT, sent).await {
            Ok(Ok(ack)) => Ok(Published {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(PublishFailure::Conflict)
            }
            Ok(Err(e)) => Err(PublishFailure::Error(unavailable("publish", e))),
            // The message may or may not have been stored: the caller re-reads the head.
            Err(_) => Err(PublishFailure::Error(unavailable("publish", "timed out"))),
        }
    }

    /// The newest entry of the thread's log, if any.
    pub async fn last(&self, id: &ThreadId) -> Result<Option<LogEntry>> {
        let got = tokio::time::timeout(
            NATS_TIMEOUT,
            self.stream
                .get_last_raw_message_by_subject(&self.subject(id)),
        )
        .await
        .map_err(|_| unavailable("last entry", "timed out"))?;
        match got {
            Ok(m) => self.decode_raw(id, &m).await.map(Some),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("last entry", e)),
        }
    }

    /// The entry at stream sequence `seq`, if it is still there.
    pub async fn get(&self, id: &ThreadId, seq: u64) -> Result<Option<LogEntry>> {
        let got = tokio::time::timeout(NATS_TIMEOUT, self.stream.get_raw_message(seq))
            .await
            .map_err(|_| unavailable("get entry", "timed out"))?;
        match got {
            Ok(m) => self.decode_raw(id, &m).await.map(Some),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("get entry", e)),
        }
    }

    /// The first entry of the thread's log at or after stream sequence `seq`, asked of the
    /// stream's leader (a direct get could be answered by a lagging replica).
    async fn next_from(&self, id: &ThreadId, seq: u64) -> Result<Option<LogEntry>> {
        #[derive(Deserialize)]
        struct Got {
            message: stream::RawMessage,
        }
        let request = serde_json::json!({ "seq": seq, "next_by_subj": self.subject(id) });
        let subject = format!("STREAM.MSG.GET.{}", self.stream_name());
        let got: Response<Got> = timed("next entry", self.js.request(subject, &request)).await?;
        match got {
            Response::Ok(Got { message }) => {
                let m =
                    StreamMessage::try_from(message).map_err(|e| unavailable("next entry", e))?;
                self.decode_raw(id, &m).await.map(Some)
            }
            Response::Err { error } if error.error_code() == ErrorCode::NO_MESSAGE_FOUND => {
                Ok(None)
            }
            Response::Err { error } => Err(unavailable("next entry", error)),
        }
    }

    /// A reader of the thread's entries from stream sequence `from` (the start when `None`)
    /// up to the newest entry at the time of this call.
    pub async fn reader(&self, id: &ThreadId, from: Option<u64>) -> Result<LogReader> {
        let end = self.last(id).await?.map_or(0, |e| e.seq);
        Ok(self.reader_to(id, from, end))
    }

    /// [`Log::reader`] for a caller that already knows the newest sequence, `end` (0 when
    /// the log is empty): the read ends there, and costs no request to find it.
    pub fn reader_to(&self, id: &ThreadId, from: Option<u64>, end: u64) -> LogReader {
        let next = from.unwrap_or(1).max(1);
        LogReader {
            log: self.clone(),
            id: id.clone(),
            next,
            end,
            consumer: None,
            singles_left: if end.saturating_sub(next) < reader::SINGLE_READ_RANGE {
                reader::SINGLE_READ_RANGE as usize
            } else {
                reader::SINGLE_READS
            },
            done: end == 0 || next > end,
        }
    }

    /// Removes the thread's messages with sequence below `before` (all when `None`).
    pub async fn purge(&self, id: &ThreadId, before: Option<u64>) -> Result<()> {
        let purge = self.stream.purge().filter(self.subject(id));
        let purged = async {
            match before {
                Some(seq) => purge.sequence(seq).await,
                None => purge.await,
            }
        };
        timed("purge", purged).await.map(|_| ())
    }

    /// Tells every replica's followers of the thread that the store holds everything up to
    /// `version` (best effort: a lost notice only delays a `flushed` event).
    pub async fn notify_flushed(&self, id: &ThreadId, version: u64) {
        let Ok(payload) = serde_json::to_vec(&FlushedNotice { flushed: version }) else {
            return;
        };
        let _ = tokio::time::timeout(
            NATS_TIMEOUT,
            self.client.publish(self.event_subject(id), payload.into()),
        )
        .await;
    }

    /// The ids of every thread with messages in the log.
    pub async fn threads(&self) -> Result<Vec<ThreadId>> {
        Ok(self
            .subjects()
            .await?
            .1
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// The log's last sequence: it changes whenever any thread's entry (a write or a
    /// tombstone) is appended, and never when entries are trimmed. One request.
    pub async fn last_seq(&self) -> Result<u64> {
        let mut stream = self.stream.clone();
        let info = timed("stream info", stream.info()).await?;
        Ok(info.state.last_sequence)
    }

    /// Every thread with entries in the log, with how many entries its subject holds (one
    /// listing, however many threads: what the idle sweeper compares between passes), and
    /// the log's last sequence before the listing (see [`Log::last_seq`]).
    pub async fn subjects(&self) -> Result<(u64, Vec<(ThreadId, u64)>)> {
        let listed = async {
            let mut stream = self.stream.clone();
            let info = stream.info().await.map_err(|e| e.to_string())?;
            let last_seq = info.state.last_sequence;
            if info.state.messages == 0 {
                return Ok((last_seq, Vec::new()));
            }
            let mut subjects = self
                .stream
                .info_with_subjects(format!("{}.log.>", self.prefix))
                .await
                .map_err(|e| e.to_string())?;
            let prefix = format!("{}.log.", self.prefix);
            let mut out = Vec::new();
            while let Some(item) = subjects.next().await {
                let (subject, count) = item.map_err(|e| e.to_string())?;
                if let Some(id) = subject.strip_prefix(&prefix).and_then(ThreadId::decode) {
                    out.push((id, count as u64));
                }
            }
            Ok::<_, String>((last_seq, out))
        };
        // Listing many subjects takes several round trips: a longer, still bounded wait.
        match tokio::time::timeout(NATS_TIMEOUT * 6, listed).await {
            Ok(r) => r.map_err(|e| unavailable("list subjects", e)),
            Err(_) => Err(unavailable("list subjects", "timed out")),
        }
    }

    /// Follows the thread's new entries (those after stream sequence `after_seq`; new ones only
    /// when 0) and its `flushed` notices.
    pub async fn follow(&self, id: &ThreadId, after_seq: u64) -> Result<LogFollower> {
        let notices = timed("subscribe", self.client.subscribe(self.event_subject(id))).await?;
        let (consumer, messages) = self.open_follow(id, after_seq).await?;
        let stats = self.client.statistics();
        let connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
        Ok(LogFollower {
            log: self.clone(),
            id: id.clone(),
            consumer,
            messages,
            notices,
            notices_open: true,
            last_seq: after_seq,
            stats,
            connects,
            reopen: false,
            last_resync: None,
            check: tokio::time::interval(follow::FOLLOW_CHECK),
        })
    }

    async fn open_follow(
        &self,
        id: &ThreadId,
        after_seq: u64,
    ) -> Result<(String, consumer::pull::Ordered)> {
        let deliver_policy = match after_seq {
            0 => consumer::DeliverPolicy::New,
            seq => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
        };
        let opened = async {
            let consumer = self
                .js
                .create_consumer_on_stream(
                    consumer::pull::OrderedConfig {
                        filter_subject: self.subject(id),
                        deliver_policy,
                        ..Default::default()
                    },
                    &*self.stream_name(),
                )
                .await
                .map_err(|e| e.to_string())?;
            let name = consumer.cached_info().name.clone();
            let messages = consumer.messages().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((name, messages))
        };
        timed("follow", opened).await
    }

    /// Decodes a message got by sequence; an undecodable one is set aside and stops the caller.
    async fn decode_raw(&self, id: &ThreadId, m: &StreamMessage) -> Result<LogEntry> {
        let at = (m.time.unix_timestamp_nanos() / 1_000_000) as i64;
        match decode(Some(&m.headers), &m.payload) {
            Ok((version, body, idempotency)) => Ok(LogEntry {
                seq: m.sequence,
                version,
                at,
                body,
                idempotency,
            }),
            Err(why) => Err(self
                .set_aside(
                    id,
                    m.sequence,
                    Some(m.headers.clone()),
                    m.payload.clone(),
                    why,
                )
                .await),
        }
    }

    /// Copies an undecodable message to the dead-letter stream (once), counts and logs it, and
    /// returns the error that blocks the thread's fold. The message stays in the log.
    async fn set_aside(
        &self,
        id: &ThreadId,
        seq: u64,
        headers: Option<HeaderMap>,
        payload: bytes::Bytes,
        why: String,
    ) -> Error {
        let subject = format!("{}.dead.{}", self.prefix, id.encoded());
        if self.dead_seen.get(&seq).is_none() {
            self.dead_seen.insert(seq, ());
            self.dead_letters.inc();
            tracing::error!(thread = %id, seq, %why, "undecodable log message set aside");
            let mut h = headers.unwrap_or_default();
            h.insert("Tg-Original-Seq", seq.to_string().as_str());
            h.insert("Nats-Msg-Id", format!("dead-{seq}").as_str());
            let copied = async {
                self.js
                    .publish_with_headers(subject.clone(), h, payload)
                    .await?
                    .await
            };
            let _ = tokio::time::timeout(NATS_TIMEOUT, copied).await;
        }
        Error::FoldBlocked(format!(
            "log message {seq} of thread {id} does not decode ({why}); it was copied to \
             {subject} and left in place"
        ))
    }
}
