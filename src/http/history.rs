//! `GET /v1/threads/{id}/deltas`: a thread's past writes after a version, as JSON pages.
//!
//! The live stream replays the same writes, but a client that only wants to catch up (a
//! tirea `ThreadSync::load_deltas`, a batch job) should not have to hold an SSE connection
//! open. Both read the same replay sources through [`crate::live::Hub::writes_after`] (the
//! store's bounded history and, in buffered mode, the unfolded log), so they never disagree
//! on what happened at a version.

use super::AppState;
use super::doc::ThreadIdParam;
use super::error::{ApiError, Problem};
use super::extract::{PathId, QueryParams};
use crate::auth::Caller;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::Change;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Default number of writes per page.
const DEFAULT_LIMIT: usize = 100;
/// Largest page: the store keeps at most this many writes per thread, so one page can hold
/// everything it has, and the answer stays bounded.
const MAX_LIMIT: usize = crate::store::HISTORY_LIMIT;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
/// Query of `GET /v1/threads/{id}/deltas`.
pub struct HistoryParams {
    /// Writes after this version (default 0: from the start).
    pub after: Option<u64>,
    /// 1..1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// One past write, shaped like the live stream's event of the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HistoryEntry {
    /// A delta appended at `version`.
    Delta {
        /// The version it produced.
        version: u64,
        /// The tirea ChangeSet exactly as applied.
        delta: ChangeSet,
    },
    /// A full save (`PUT`) at `version`: the whole thread as saved (custom metadata only).
    Snapshot {
        /// The version it produced.
        version: u64,
        /// The thread as saved.
        thread: Thread,
    },
    /// A metadata merge patch at `version` (`null` removes a key).
    Metadata {
        /// The version it produced.
        version: u64,
        /// The merge patch.
        #[schema(value_type = Object)]
        metadata: Extra,
    },
}

/// A page of a thread's history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryPage {
    /// Writes `after + 1`, `after + 2`, … in order, at most `limit`; empty when `complete`
    /// is false.
    pub entries: Vec<HistoryEntry>,
    /// The thread's current version.
    pub version: u64,
    /// False when the writes after `after` cannot be listed without a gap: `after` is older
    /// than the history kept (the last 1,000 writes plus, in buffered mode, everything not
    /// yet folded) or newer than the thread. Reload the snapshot and continue from its
    /// version.
    pub complete: bool,
    /// More writes follow: ask again with `after` = the last entry's version.
    pub has_more: bool,
}

/// Page through a thread's past writes, oldest first.
#[utoipa::path(get, path = "/v1/threads/{id}/deltas", tag = "threads",
    params(ThreadIdParam, HistoryParams),
    responses((status = 200, body = HistoryPage, description = "The writes after `after`, oldest first (includes what is still buffered)"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
pub async fn history(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    QueryParams(p): QueryParams<HistoryParams>,
) -> Result<Json<HistoryPage>, ApiError> {
    let limit = match p.limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => n,
        n => {
            return Err(ApiError::InvalidQuery {
                field: "limit".into(),
                message: format!("must be between 1 and {MAX_LIMIT}, got {n}"),
            });
        }
    };
    let after = p.after.unwrap_or(0);
    app.threads.guard(&caller.scope, &id).await?;
    let found = app
        .hub
        .writes_after(&id, after, limit, &caller.scope)
        .await?;
    let entries: Vec<HistoryEntry> = found
        .writes
        .into_iter()
        .map(|w| entry(&id, w.version, w.change))
        .collect();
    let reached = match entries.last() {
        Some(HistoryEntry::Delta { version, .. })
        | Some(HistoryEntry::Snapshot { version, .. })
        | Some(HistoryEntry::Metadata { version, .. }) => *version,
        None => after,
    };
    Ok(Json(HistoryPage {
        entries,
        version: found.head,
        complete: found.complete,
        has_more: found.complete && reached < found.head,
    }))
}

/// A stored change as the client sees it, normalized exactly as the live stream sends it.
fn entry(id: &crate::id::ThreadId, version: u64, change: Change) -> HistoryEntry {
    match change {
        Change::Delta(mut delta) => {
            delta.normalize();
            HistoryEntry::Delta { version, delta }
        }
        Change::Replace(mut thread) => {
            // Idempotent for a thread taken from the history: what the store saved.
            let _ = crate::store::prepare_thread(id, &mut thread);
            HistoryEntry::Snapshot { version, thread }
        }
        Change::Metadata(metadata) => HistoryEntry::Metadata { version, metadata },
    }
}
