//! `GET /v1/threads/{id}/events`: the thread's live stream as Server-Sent Events.
//!
//! The handler only parses the position and asks the [`crate::live::Hub`] for the stream; 404
//! and 503 are answered before any event.
//!
//! Position: `after` and `Last-Event-ID` both mean "I have everything up to here", so when both
//! are sent the later one wins. That is what makes a browser's `EventSource` resume
//! correctly: its automatic reconnect repeats the original URL (with the `after=` the page
//! opened it with) and adds `Last-Event-ID` with the last id it received; letting the query
//! win would replay everything since the page loaded and double the text.

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::{MAX_VERSION, PathId, QueryParams};
use crate::auth::Caller;
use crate::live::Position;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
/// Query of `GET /v1/threads/{id}/events`.
pub struct EventsParams {
    /// Continue after this version (the `version` of a snapshot you loaded, or the last event
    /// `id` you applied). With `Last-Event-ID` too, the later of the two is used (a browser's
    /// reconnect keeps the URL and adds the header). Without either, the stream starts at the
    /// current head (or with a snapshot, see `snapshot`). At most 9223372036854775807.
    #[param(maximum = 9223372036854775807_u64)]
    pub after: Option<u64>,
    /// `true`: without a position, the first event is a `snapshot` of the thread (live view)
    /// with `id: <its version>`; with a position that can no longer be replayed, a fresh
    /// `snapshot` is sent instead of `reset` and the stream goes on.
    pub snapshot: Option<bool>,
    /// The `incarnation` of the snapshot the position came from: if the thread was deleted
    /// and created again since, the stream answers `reset` instead of continuing into the
    /// new thread's versions.
    #[param(value_type = Option<String>, pattern = "^[0-9a-f]{16}$")]
    pub incarnation: Option<crate::store::Incarnation>,
}

/// Response header naming the write mode (`direct` or `buffered`), so a client knows whether
/// `flushed` events will come and whether "not yet folded" means anything.
pub const MODE_HEADER: &str = "threadgate-mode";
/// Response header (buffered mode): the version the snapshot store held when the stream was
/// attached; later folds arrive as `flushed` events.
pub const STORED_VERSION_HEADER: &str = "threadgate-stored-version";

/// Response header: the `incarnation` of the thread the stream was attached to, for a
/// client that resumes with `Last-Event-ID` only to send back as `?incarnation=`.
pub const INCARNATION_HEADER: &str = "threadgate-incarnation";

/// The `Last-Event-ID` header a browser's `EventSource` sends when it reconnects.
pub struct LastEventId(pub Option<u64>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for LastEventId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_last_event_id(parts.headers.get("last-event-id")).map(LastEventId)
    }
}

/// A `Last-Event-ID` value: a version (decimal digits, at most [`MAX_VERSION`]); empty or
/// absent means none.
pub fn parse_last_event_id(value: Option<&HeaderValue>) -> Result<Option<u64>, ApiError> {
    let Some(v) = value else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("\u{0}").trim();
    if s.is_empty() {
        return Ok(None);
    }
    // Digits only: `str::parse` would also take a sign, which no event id has.
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())
        .flatten()
        .filter(|v| *v <= MAX_VERSION)
        .map(Some)
        .ok_or_else(|| ApiError::InvalidHeader {
            header: "Last-Event-ID",
            message: "must be a version (an event id sent by this stream)".into(),
        })
}

/// The stream's position from `after` and `Last-Event-ID`: the later of the two (see the
/// module docs); an `after` above [`MAX_VERSION`] is `400 invalid_query`.
pub fn position(after: Option<u64>, last_event_id: Option<u64>) -> Result<Option<u64>, ApiError> {
    if after.is_some_and(|a| a > MAX_VERSION) {
        return Err(ApiError::InvalidQuery {
            field: "after".into(),
            message: format!("must be a version, at most {MAX_VERSION}"),
        });
    }
    Ok(match (after, last_event_id) {
        (Some(a), Some(l)) => Some(a.max(l)),
        (a, l) => a.or(l),
    })
}

/// The stream's description in the OpenAPI document.
const STREAM_DOC: &str = "A `text/event-stream`. Every event that a write produced carries \
`id: <version>`, so the browser's automatic reconnect (which sends `Last-Event-ID`) resumes \
exactly after the last event received, with no gap and no duplicate, whichever replica serves \
it and whether the versions are still buffered or already folded. Events (data is one JSON \
object): `delta` (DeltaEvent), `snapshot` (SnapshotEvent: first event with `?snapshot=true`, \
and after a full save), `metadata` (MetadataEvent), `flushed` (FlushedEvent, buffered mode, \
no id), `reset` (ResetEvent, no id: the position is older than what can be replayed; refetch \
the snapshot and reconnect; the stream ends), `deleted` (DeletedEvent, no id; the stream ends). \
Idle streams get a comment `: keep-alive <version>` (every 15 s by default) carrying the \
version the stream has reached. The stream follows the thread across runs until the thread is \
deleted, the client leaves, or the server shuts down.";

/// Follow a thread live over Server-Sent Events (each event's `id` is its version).
#[utoipa::path(get, path = "/v1/threads/{id}/events", tag = "threads",
    params(super::doc::ThreadIdParam, EventsParams, super::doc::LastEventIdParam),
    responses(
        (status = 200, description = STREAM_DOC, content_type = "text/event-stream", body = String,
            headers(("threadgate-mode" = String, description = "`direct` or `buffered`"),
                ("threadgate-stored-version" = Option<u64>, description = "Buffered mode: the version the snapshot store held when the stream was attached (later folds arrive as `flushed` events)"),
                ("threadgate-incarnation" = Option<String>, description = "The thread's incarnation when the stream was attached (16 hex digits): send it back as `?incarnation=` when resuming, so a thread deleted and created again meanwhile answers `reset`"))),
        (status = 400, description = "Malformed `after` (invalid_query) or `Last-Event-ID` (invalid_header)", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
pub async fn events(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    QueryParams(p): QueryParams<EventsParams>,
    LastEventId(last): LastEventId,
) -> Result<Response, ApiError> {
    let cursor = position(p.after, last)?;
    // Admission first: a refused stream costs no backend work.
    let permit = app.hub.admit(caller.key.clone())?;
    let incarnation = app.threads.guard_incarnation(&caller.scope, &id).await?;
    let position = Position {
        cursor,
        snapshot: p.snapshot.unwrap_or(false),
        incarnation: p.incarnation,
    };
    let stream = app
        .hub
        .open(id.clone(), position, caller.scope, permit)
        .await?;
    // Read after the stream is attached: a fold that commits later is announced by a
    // `flushed` event, one that committed earlier is in this version, so a client that
    // takes the larger never shows a buffered count that is too high for long.
    let stored = app.threads.stored_behind(&id).await;
    let mode = app.threads.mode();
    let mut res = (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // Reverse proxies (nginx) must pass events through as they come.
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    let headers = res.headers_mut();
    headers.insert(MODE_HEADER, HeaderValue::from_static(mode));
    if let Some(v) = stored {
        headers.insert(STORED_VERSION_HEADER, HeaderValue::from(v));
    }
    if let Some(i) = incarnation
        && let Ok(v) = HeaderValue::from_str(&i.to_string())
    {
        headers.insert(INCARNATION_HEADER, v);
    }
    Ok(res)
}
