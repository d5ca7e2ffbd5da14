//! Announcing writes to every replica, and hearing them: in direct mode every gateway's live
//! streams carry the writes every other gateway commits (see migrations/0005_notify.sql for
//! the channel and the payload).
//!
//! ## Announcing: after the commit, in batches ([`Announcer`])
//!
//! A `NOTIFY` inside a write transaction makes PostgreSQL take a database-wide lock at commit
//! and hold it through the commit's WAL flush, so every notifying commit waits for every other
//! one: measured here with pgbench at 16 clients, `BEGIN; INSERT …; SELECT 1; COMMIT` commits
//! 8,184 times a second, and 3,778 with `SELECT pg_notify(…)` in place of the `SELECT 1`. So the gateway's sessions switch the trigger of
//! migration 0005 off (`threadgate.notify=off`; a gateway of an older version, during a
//! rolling upgrade, still notifies through it) and the store hands each committed write to
//! this process's [`Announcer`] instead. Its task sends everything handed to it since its last
//! round as one autocommitted `SELECT pg_notify(...)` over an array: one serialised commit
//! per round, not per write, and none on a request's path.
//!
//! The announcement comes after the commit, so a listener never hears of a write it cannot
//! read. What it costs: a gateway that dies between a commit and its next round (a few
//! milliseconds) never announces those writes. To bound that, every listener also checks, at
//! each heartbeat, the versions of the threads its process follows ([`HEADS_CHECKED`] at most
//! per round) and announces whatever moved: a lost write announcement delays a live event by
//! at most one heartbeat, it never loses it (a lost delete announcement is not recovered this
//! way: the thread's followers end at their next resync or reconnect). If the task cannot keep up ([`MAX_PENDING`] threads
//! waiting) or a round fails, it sends one `r` instead of what it dropped: every listener then
//! resyncs all of its followers, as after a lost connection.
//!
//! ## Hearing
//!
//! One task per process holds one connection of its own (a pool of one, apart from the
//! request pool) with `LISTEN` on the schema's channel, and hands each notification to the
//! registry without waiting on anything (so sqlx's unbounded notification buffer never grows:
//! it is drained as fast as the socket delivers). It never ends before shutdown:
//!
//! * a lost connection is re-established (sqlx reconnects and listens again; if that fails the
//!   task starts over with a back-off up to [`RETRY_MAX`]), and then every watcher is told to
//!   resync, since notifications sent in between are gone for good;
//! * a connection that is silently dead (no FIN, no RST) is found by a heartbeat: every
//!   [`HEARTBEAT`] the task notifies its own channel through the request pool and expects to
//!   hear any notification within [`HEARTBEAT_MISSED`] heartbeats, else it reconnects;
//! * shutdown (the store's close) ends it at once.

use super::super::changes::Changes;
use crate::id::ThreadId;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Threads with an announcement waiting before the announcer gives up on them one by one and
/// sends a resync instead (a round takes a millisecond or so; this is seconds of writes).
pub const MAX_PENDING: usize = 65_536;
/// Payloads per `pg_notify` statement (each is at most ~150 bytes: far below any limit).
const ANNOUNCE_BATCH: usize = 1_000;
/// Deadline of one announcing round.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Followed threads whose versions a heartbeat checks (a bounded `= ANY` probe each round).
pub const HEADS_CHECKED: usize = 10_000;
/// How often the listener proves its connection by hearing its own notification.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Heartbeats that may go unheard before the connection counts as dead.
const HEARTBEAT_MISSED: u32 = 3;
/// Deadline of connecting and `LISTEN`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before connecting again after a failure (doubles up to [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between connection attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The channel of the schema holding the store's tables (the one `history` resolves to).
pub(super) async fn channel(pool: &PgPool) -> sqlx::Result<String> {
    sqlx::query_scalar(
        "SELECT 'threadgate_' || md5(n.nspname::text) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'history'::regclass",
    )
    .fetch_one(pool)
    .await
}

/// A notification's meaning.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Write(ThreadId, u64),
    Deleted(ThreadId, u64),
    Heartbeat,
    /// Announcements were dropped: resync every follower.
    Resync,
}

fn parse(payload: &str) -> Option<Notice> {
    match payload {
        "p" => return Some(Notice::Heartbeat),
        "r" => return Some(Notice::Resync),
        _ => {}
    }
    let (kind, rest) = payload.split_once(' ')?;
    let (version, id) = rest.split_once(' ')?;
    let version = version.parse().ok()?;
    let id = ThreadId::parse(id).ok()?;
    match kind {
        "w" => Some(Notice::Write(id, version)),
        "d" => Some(Notice::Deleted(id, version)),
        _ => None,
    }
}

/// Runs the listener until `stop` (see the module docs).
pub(super) async fn listen(
    connect: PgConnectOptions,
    requests: PgPool,
    changes: Arc<Changes>,
    stop: CancellationToken,
) {
    let mut delay = RETRY_MIN;
    let mut known: Option<String> = None;
    loop {
        let channel = match &known {
            Some(c) => c.clone(),
            None => {
                let asked = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tokio::time::timeout(CONNECT_TIMEOUT, channel(&requests)) => r,
                };
                match asked {
                    Ok(Ok(c)) => {
                        known = Some(c.clone());
                        c
                    }
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        tracing::warn!(error = %why, retry_in = ?delay, "cannot name the notification channel");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(connect.clone());
        let opened = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, opened) => r,
        };
        let mut listener = match opened {
            Ok(Ok(l)) => l,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(error = %why, retry_in = ?delay, "cannot listen for other replicas' writes");
                pool.close().await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
                continue;
            }
        };
        delay = RETRY_MIN;
        changes.set_connected(true);
        // Whatever was committed while nobody listened is read by every watcher now.
        changes.resync();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    changes.set_connected(false);
                    return;
                }
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => {
                        heard = Instant::now();
                        match parse(n.payload()) {
                            Some(Notice::Write(id, v)) => changes.announce(&id, v),
                            Some(Notice::Deleted(id, v)) => changes.announce_deleted(&id, v),
                            Some(Notice::Heartbeat) => {}
                            Some(Notice::Resync) => changes.resync(),
                            None => tracing::warn!(payload = n.payload(), "unexpected notification"),
                        }
                    }
                    // Reconnected and listening again; what came in between is lost.
                    Ok(None) => {
                        tracing::warn!("the notification connection was lost and re-established; resyncing live streams");
                        heard = Instant::now();
                        changes.resync();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the notification connection failed; reconnecting");
                        break;
                    }
                },
                _ = heartbeat.tick() => {
                    if heard.elapsed() > HEARTBEAT * HEARTBEAT_MISSED {
                        tracing::warn!("no notification heard for {:?}; reconnecting", heard.elapsed());
                        break;
                    }
                    let (requests, channel) = (requests.clone(), channel.clone());
                    let followed = changes.followed(HEADS_CHECKED);
                    let changes = changes.clone();
                    tokio::spawn(async move {
                        let sent = sqlx::query("SELECT pg_notify($1, 'p')")
                            .bind(channel)
                            .execute(&requests);
                        let _ = tokio::time::timeout(HEARTBEAT, sent).await;
                        let checked = check_heads(&requests, &changes, followed);
                        let _ = tokio::time::timeout(HEARTBEAT, checked).await;
                    });
                }
            }
        }
        changes.set_connected(false);
        drop(listener);
        let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
    }
}

/// Announces the current version of each of `ids` (the listener's safety net, see the module
/// docs): a version already announced changes nothing.
async fn check_heads(pool: &PgPool, changes: &Changes, ids: Vec<ThreadId>) {
    if ids.is_empty() {
        return;
    }
    let names: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
    let heads: Vec<(String, i64)> =
        match sqlx::query_as("SELECT id, version FROM threads WHERE id = ANY($1)")
            .bind(&names)
            .fetch_all(pool)
            .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "checking followed threads' versions failed");
                return;
            }
        };
    for (id, version) in heads {
        if let Ok(id) = ThreadId::parse(&id) {
            changes.announce(&id, super::codec::u(version));
        }
    }
}

/// What waits to be announced for one thread: its last delete and the newest write after it.
#[derive(Debug, Default, Clone, Copy)]
struct Waiting {
    deleted: Option<u64>,
    written: Option<u64>,
}

#[derive(Debug, Default)]
struct Pending {
    threads: std::collections::HashMap<ThreadId, Waiting>,
    /// Something was dropped since the last round: send a resync.
    dropped: bool,
}

/// Announces this process's commits to every replica, in rounds (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Announcer {
    pending: std::sync::Mutex<Pending>,
    wake: tokio::sync::Notify,
}

impl Announcer {
    /// `id` was written at `version` (called after the commit).
    pub fn written(&self, id: &ThreadId, version: u64) {
        self.add(id, |w| {
            w.written = Some(w.written.map_or(version, |v| v.max(version)))
        });
    }

    /// `id` was deleted at `version` (called after the commit).
    pub fn deleted(&self, id: &ThreadId, version: u64) {
        self.add(id, |w| {
            *w = Waiting {
                deleted: Some(version),
                written: None,
            }
        });
    }

    fn add(&self, id: &ThreadId, f: impl FnOnce(&mut Waiting)) {
        if let Ok(mut p) = self.pending.lock() {
            if let Some(w) = p.threads.get_mut(id) {
                f(w);
            } else if p.threads.len() < MAX_PENDING {
                f(p.threads.entry(id.clone()).or_default());
            } else {
                p.dropped = true;
            }
        }
        self.wake.notify_one();
    }

    /// Everything waiting, as payloads in the order they must be heard.
    fn take(&self) -> Vec<String> {
        let taken = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return Vec::new(),
        };
        let mut payloads = Vec::with_capacity(taken.threads.len() + 1);
        for (id, w) in taken.threads {
            if let Some(v) = w.deleted {
                payloads.push(format!("d {v} {}", id.as_str()));
            }
            if let Some(v) = w.written {
                payloads.push(format!("w {v} {}", id.as_str()));
            }
        }
        if taken.dropped {
            payloads.push("r".to_owned());
        }
        payloads
    }

    /// Sends rounds until `stop`, then one last round for what is still waiting.
    pub async fn run(self: Arc<Self>, pool: PgPool, stop: CancellationToken) {
        let mut channel: Option<String> = None;
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = self.wake.notified() => false,
            };
            let payloads = self.take();
            if !payloads.is_empty() {
                let round = self.round(&pool, &mut channel, &payloads);
                match tokio::time::timeout(ANNOUNCE_TIMEOUT, round).await {
                    Ok(Ok(())) => {}
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        tracing::warn!(error = %why, dropped = payloads.len(), "announcing writes to other replicas failed; they will resync");
                        if let Ok(mut p) = self.pending.lock() {
                            p.dropped = true;
                        }
                        if !stopping {
                            // Not in a tight loop against a database that is down.
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = tokio::time::sleep(RETRY_MIN) => {}
                            }
                            self.wake.notify_one();
                        }
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    async fn round(
        &self,
        pool: &PgPool,
        channel: &mut Option<String>,
        payloads: &[String],
    ) -> sqlx::Result<()> {
        let name = match channel {
            Some(c) => c.clone(),
            None => channel.insert(self::channel(pool).await?).clone(),
        };
        for chunk in payloads.chunks(ANNOUNCE_BATCH) {
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS u(p)")
                .bind(&name)
                .bind(chunk)
                .execute(pool)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        let id = |s| ThreadId::parse(s).unwrap();
        assert_eq!(parse("w 7 a b c"), Some(Notice::Write(id("a b c"), 7)));
        assert_eq!(parse("d 3 café"), Some(Notice::Deleted(id("café"), 3)));
        assert_eq!(parse("p"), Some(Notice::Heartbeat));
        assert_eq!(parse("r"), Some(Notice::Resync));
        assert_eq!(parse("w x a"), None);
        assert_eq!(parse("q 1 a"), None);
        assert_eq!(parse("w 1 a/b"), None);
    }
}

#[cfg(test)]
mod announcer_tests {
    use super::*;

    #[test]
    fn a_delete_then_a_write_are_both_announced_in_order_and_writes_coalesce() {
        let a = Announcer::default();
        let id = ThreadId::parse("t").unwrap();
        a.written(&id, 3);
        a.written(&id, 5);
        a.written(&id, 4);
        a.deleted(&id, 6);
        a.written(&id, 1);
        assert_eq!(a.take(), vec!["d 6 t".to_owned(), "w 1 t".to_owned()]);
        assert!(a.take().is_empty());
        a.written(&id, 2);
        assert_eq!(a.take(), vec!["w 2 t".to_owned()]);
    }

    #[test]
    fn past_the_bound_it_sends_a_resync_instead() {
        let a = Announcer::default();
        for n in 0..MAX_PENDING + 10 {
            a.written(&ThreadId::parse(&format!("t{n}")).unwrap(), 1);
        }
        let sent = a.take();
        assert_eq!(sent.len(), MAX_PENDING + 1);
        assert_eq!(sent.last().map(String::as_str), Some("r"));
    }
}
