//! The listener that turns PostgreSQL notifications into [`Changes`] announcements, so that
//! in direct mode every gateway's live streams carry the writes every other gateway commits
//! (see migrations/0005_notify.sql for the trigger and the payload).
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
}

fn parse(payload: &str) -> Option<Notice> {
    if payload == "p" {
        return Some(Notice::Heartbeat);
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
                    tokio::spawn(async move {
                        let sent = sqlx::query("SELECT pg_notify($1, 'p')")
                            .bind(channel)
                            .execute(&requests);
                        let _ = tokio::time::timeout(HEARTBEAT, sent).await;
                    });
                }
            }
        }
        changes.set_connected(false);
        drop(listener);
        let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
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
        assert_eq!(parse("w x a"), None);
        assert_eq!(parse("q 1 a"), None);
        assert_eq!(parse("w 1 a/b"), None);
    }
}
