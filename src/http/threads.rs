//! Thread handlers: each parses its input, calls one store operation, and shapes the answer.

use super::AppState;
use super::doc::{
    IdempotencyKeyParam, IfMatchParam, IfNoneMatchParam, RunPathParams, ThreadIdParam,
};
use super::error::{ApiError, Problem};
use super::extract::{
    IdempotencyHeader, IfMatch, IfNoneMatch, JsonBody, PathId, PathRunId, QueryParams,
};
use crate::auth::Caller;
use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Message, Thread, TrackedPatch};
use crate::store::{MessageQuery, Order, RunRecord, VisibilityFilter};
use crate::write::{FoldReport, View};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// Default page size for lists and message pages.
const DEFAULT_LIMIT: usize = 50;
/// Largest page a client may ask for; bounds the work and the response size of one request.
const MAX_LIMIT: usize = 200;

/// A thread snapshot: tirea's `Thread` plus the version it reflects.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ThreadView {
    /// The thread, in tirea's JSON form.
    #[serde(flatten)]
    pub thread: Thread,
    /// The thread version this snapshot reflects (also the `ETag`).
    pub version: u64,
    /// Which life of the thread id this is (16 hex digits): it changes when the thread is
    /// deleted and created again. Pass it as `incarnation` to the event stream.
    #[schema(value_type = String, pattern = "^[0-9a-f]{16}$")]
    pub incarnation: crate::store::Incarnation,
}

impl ThreadView {
    pub(crate) fn of(snap: &crate::store::Snapshot) -> Self {
        ThreadView {
            version: snap.version,
            incarnation: snap.incarnation,
            thread: snap.to_wire(),
        }
    }
}

/// Body of `POST /v1/threads`: every field optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateThread {
    /// Client-chosen id: any Unicode text of 1 to 128 bytes in UTF-8 without control characters
    /// and without `/ \ ? # %`, not `.` or `..`; a UUIDv7 is generated when absent.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^(?:[^\x00-\x1F\x7F-\x9F/\\?#%]*[^\x00-\x1F\x7F-\x9F/\\?#%.][^\x00-\x1F\x7F-\x9F/\\?#%]*|\.{3,})$"
    )]
    pub id: Option<String>,
    /// The owner (user, tenant) the thread belongs to; a scoped caller's own by default.
    pub resource_id: Option<String>,
    /// The thread this one was spawned from.
    pub parent_thread_id: Option<String>,
    /// The initial state: any JSON value (default `{}`).
    #[serde(default)]
    #[schema(value_type = Value)]
    pub state: Option<Value>,
    /// Custom metadata keys.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Extra>,
    /// Initial messages.
    pub messages: Option<Vec<Message>>,
    /// Initial patches, applied to `state` in order.
    pub patches: Option<Vec<TrackedPatch>>,
}

/// Body of `PUT /v1/threads/{id}`: a full tirea `Thread`; `id`, if sent, must match the path.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ReplaceThread {
    /// Must equal the id in the path when present (1 to 128 bytes in UTF-8, the id rule of
    /// the path).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^(?:[^\x00-\x1F\x7F-\x9F/\\?#%]*[^\x00-\x1F\x7F-\x9F/\\?#%.][^\x00-\x1F\x7F-\x9F/\\?#%]*|\.{3,})$"
    )]
    pub id: Option<String>,
    /// The owner; moving a thread to another owner is an admin's write.
    pub resource_id: Option<String>,
    /// The thread this one was spawned from.
    pub parent_thread_id: Option<String>,
    /// Every message of the thread (messages keep their cursors by position).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// The base state.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub state: Value,
    /// Patches applied to `state` in order.
    #[serde(default)]
    pub patches: Vec<TrackedPatch>,
    /// Custom metadata keys (the server's own keys are ignored).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: Extra,
}

/// The version a write produced.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionBody {
    /// The thread's version after the write.
    pub version: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
/// Query of `GET /v1/threads/{id}/messages`.
pub struct MessageParams {
    /// Exclusive lower cursor bound.
    pub after: Option<u64>,
    /// Exclusive upper cursor bound.
    pub before: Option<u64>,
    /// 1..200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<usize>,
    /// `asc` (default: oldest first) or `desc`.
    pub order: Option<Order>,
    /// `all` (default: messages visible to everyone), `internal` (only internal ones) or
    /// `any` (both).
    pub visibility: Option<VisibilityFilter>,
    /// Only messages of this run.
    pub run_id: Option<String>,
    /// `store` (default) or `live` (merges the buffered tail).
    pub view: Option<View>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
/// The `view` query parameter of thread reads.
pub struct ViewParams {
    /// `store` (default): the folded snapshot; `live`: merges the buffered tail
    /// (read-your-writes). Either way `version` says which version the answer reflects.
    pub view: Option<View>,
}

/// The answer to an append.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AppendBody {
    /// The version the delta produced.
    pub version: u64,
    /// Buffered mode, `RunFinished` only: whether the run was folded into the store before
    /// this answer (if not, it stays durable in the log and is folded later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flushed: Option<bool>,
}

/// A message with its stable cursor (its 0-based position in the thread).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CursorMessage {
    /// The message's position in the thread, stable across writes.
    pub cursor: u64,
    /// The message, in tirea's JSON form.
    #[serde(flatten)]
    pub message: Message,
}

/// A page of a thread's messages.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessagePageBody {
    /// The messages, in the order asked for.
    pub messages: Vec<CursorMessage>,
    /// Whether more follow in that order.
    pub has_more: bool,
    /// Continue in the same order from here (`after` for asc, `before` for desc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u64>,
    /// Go back from here (`before` for asc, `after` for desc); present when the page did
    /// not start at the beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_cursor: Option<u64>,
    /// The thread version the page reflects.
    pub version: u64,
}

/// A thread's current state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StateBody {
    /// The current state (any JSON value).
    #[schema(value_type = Value)]
    pub state: Value,
    /// The thread version it reflects.
    pub version: u64,
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

fn with_etag(version: u64, body: impl IntoResponse) -> Response {
    ([(header::ETAG, etag(version))], body).into_response()
}

/// A page size from the query: default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`].
pub(super) fn limit(raw: Option<usize>) -> Result<usize, ApiError> {
    match raw.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::InvalidQuery {
            field: "limit".into(),
            message: format!("must be between 1 and {MAX_LIMIT}, got {n}"),
        }),
    }
}

fn body_id(raw: &str) -> Result<ThreadId, ApiError> {
    ThreadId::parse(raw).map_err(|e| ApiError::InvalidId {
        field: "id".into(),
        message: e.to_string(),
    })
}

/// Percent-encodes an id for a `Location` header.
fn location(id: &ThreadId) -> String {
    let mut out = String::from("/v1/threads/");
    for b in id.as_str().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Create a thread (id chosen by the client or generated).
#[utoipa::path(post, path = "/v1/threads", tag = "threads", request_body = CreateThread,
    responses((status = 201, description = "Created", body = ThreadView, headers(("Location" = String), ("ETag" = String))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json")))]
pub async fn create(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody { value: body, .. }: JsonBody<CreateThread>,
) -> Result<Response, ApiError> {
    let id = match &body.id {
        Some(raw) => body_id(raw)?,
        None => ThreadId::generate(),
    };
    let thread = Thread {
        id: id.to_string(),
        resource_id: body.resource_id,
        parent_thread_id: body.parent_thread_id,
        messages: body.messages.unwrap_or_default(),
        state: body
            .state
            .unwrap_or_else(|| Value::Object(Default::default())),
        patches: body.patches.unwrap_or_default(),
        metadata: body.metadata.unwrap_or_default(),
    };
    crate::model::limits::check_thread(&thread)?;
    let snap = app.threads.create(&caller.scope, &id, thread).await?;
    let view = ThreadView::of(&snap);
    Ok((
        StatusCode::CREATED,
        [
            (
                header::LOCATION,
                HeaderValue::from_str(&location(&id))
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            ),
            (header::ETAG, etag(view.version)),
        ],
        Json(view),
    )
        .into_response())
}

/// Read a thread's snapshot and the version it reflects.
#[utoipa::path(get, path = "/v1/threads/{id}", tag = "threads",
    params(ThreadIdParam, ViewParams, IfNoneMatchParam),
    responses((status = 200, body = ThreadView, headers(("ETag" = String))), (status = 304, description = "Not modified"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    QueryParams(p): QueryParams<ViewParams>,
    inm: IfNoneMatch,
) -> Result<Response, ApiError> {
    let view = p.view.unwrap_or_default();
    let stamp = app.threads.stamp(&caller.scope, &id, view).await?;
    if inm.matches(stamp.version) {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag(stamp.version))],
        )
            .into_response());
    }
    let (version, body) = app
        .snapshots
        .get(&app.threads, &caller.scope, &id, view, stamp)
        .await?;
    let json = HeaderValue::from_static("application/json");
    Ok(with_etag(version, ([(header::CONTENT_TYPE, json)], body)))
}

/// Replace a thread as a whole (a full save).
#[utoipa::path(put, path = "/v1/threads/{id}", tag = "threads", request_body = ReplaceThread,
    params(ThreadIdParam, IfMatchParam),
    responses((status = 200, body = VersionBody), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 412, body = Problem, content_type = "application/problem+json")))]
pub async fn replace(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    IfMatch(expect): IfMatch,
    JsonBody { value: body, .. }: JsonBody<ReplaceThread>,
) -> Result<Response, ApiError> {
    if let Some(raw) = &body.id
        && body_id(raw)? != id
    {
        return Err(ApiError::InvalidField {
            field: "id".into(),
            message: "does not match the id in the path".into(),
        });
    }
    let thread = Thread {
        id: id.to_string(),
        resource_id: body.resource_id,
        parent_thread_id: body.parent_thread_id,
        messages: body.messages,
        state: body.state,
        patches: body.patches,
        metadata: body.metadata,
    };
    crate::model::limits::check_thread(&thread)?;
    let version = app
        .threads
        .replace(&caller.scope, &id, thread, expect)
        .await?;
    Ok(with_etag(version, Json(VersionBody { version })))
}

/// Merge-patch a thread's custom metadata.
#[utoipa::path(patch, path = "/v1/threads/{id}", tag = "threads",
    request_body(content = Object, description = "JSON merge patch of custom metadata keys; null removes a key"),
    params(ThreadIdParam, IfMatchParam),
    responses((status = 200, body = VersionBody), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"), (status = 412, body = Problem, content_type = "application/problem+json")))]
pub async fn patch_metadata(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    IfMatch(expect): IfMatch,
    JsonBody { value: patch, .. }: JsonBody<Extra>,
) -> Result<Response, ApiError> {
    let version = app
        .threads
        .patch_metadata(&caller.scope, &id, patch, expect)
        .await?;
    Ok(with_etag(version, Json(VersionBody { version })))
}

/// Delete a thread with everything it has.
#[utoipa::path(delete, path = "/v1/threads/{id}", tag = "threads",
    params(ThreadIdParam, IfMatchParam),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json")))]
pub async fn delete(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    IfMatch(expect): IfMatch,
) -> Result<StatusCode, ApiError> {
    app.threads.delete(&caller.scope, &id, expect).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Append a delta (a tirea ChangeSet) as the thread's next version.
#[utoipa::path(post, path = "/v1/threads/{id}/deltas", tag = "threads", request_body = ChangeSet,
    params(ThreadIdParam, IfMatchParam, IdempotencyKeyParam),
    responses((status = 200, body = AppendBody, headers(("ETag" = String), ("Idempotent-Replayed" = String))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
pub async fn append(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    IfMatch(expect): IfMatch,
    idem: IdempotencyHeader,
    JsonBody {
        value: delta,
        bytes,
    }: JsonBody<ChangeSet>,
) -> Result<Response, ApiError> {
    super::edge::record_run_id(&delta.run_id);
    crate::model::limits::check_delta(&delta, &app.delta_limits)?;
    let key = idem.with_body(&bytes);
    let out = app
        .threads
        .append(&caller.scope, &id, delta, expect, key.as_ref())
        .await?;
    let body = AppendBody {
        version: out.appended.version,
        flushed: out.flushed,
    };
    let mut res = with_etag(body.version, Json(body));
    if out.appended.replayed {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// Page through a thread's messages.
#[utoipa::path(get, path = "/v1/threads/{id}/messages", tag = "threads",
    params(ThreadIdParam, MessageParams),
    responses((status = 200, body = MessagePageBody), (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn messages(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    QueryParams(p): QueryParams<MessageParams>,
) -> Result<Response, ApiError> {
    let q = MessageQuery {
        after: p.after,
        before: p.before,
        limit: limit(p.limit)?,
        order: p.order.unwrap_or_default(),
        visibility: p.visibility.unwrap_or_default(),
        run_id: p.run_id,
    };
    let page = app
        .threads
        .messages(&caller.scope, &id, &q, p.view.unwrap_or_default())
        .await?;
    let next_cursor = page
        .has_more
        .then(|| page.messages.last().map(|m| m.0))
        .flatten();
    let started_inside = match q.order {
        Order::Asc => q.after.is_some(),
        Order::Desc => q.before.is_some(),
    };
    let prev_cursor = started_inside
        .then(|| page.messages.first().map(|m| m.0))
        .flatten();
    let body = MessagePageBody {
        messages: page
            .messages
            .into_iter()
            .map(|(cursor, message)| CursorMessage { cursor, message })
            .collect(),
        has_more: page.has_more,
        next_cursor,
        prev_cursor,
        version: page.version,
    };
    Ok(with_etag(body.version, Json(body)))
}

/// Read a thread's current state.
#[utoipa::path(get, path = "/v1/threads/{id}/state", tag = "threads", params(ThreadIdParam, ViewParams),
    responses((status = 200, body = StateBody), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn state(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    QueryParams(p): QueryParams<ViewParams>,
) -> Result<Response, ApiError> {
    let st = app
        .threads
        .state(&caller.scope, &id, p.view.unwrap_or_default())
        .await?;
    Ok(with_etag(
        st.version,
        Json(StateBody {
            state: st.state,
            version: st.version,
        }),
    ))
}

/// List a thread's run records.
#[utoipa::path(get, path = "/v1/threads/{id}/runs", tag = "runs", params(ThreadIdParam, ViewParams),
    responses((status = 200, body = Vec<RunRecord>), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn runs(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    QueryParams(p): QueryParams<ViewParams>,
) -> Result<Json<Vec<RunRecord>>, ApiError> {
    Ok(Json(
        app.threads
            .runs(&caller.scope, &id, p.view.unwrap_or_default())
            .await?,
    ))
}

/// Read one run record.
#[utoipa::path(get, path = "/v1/threads/{id}/runs/{run_id}", tag = "runs",
    params(RunPathParams),
    responses((status = 200, body = RunRecord), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn run(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    PathRunId(run_id): PathRunId,
) -> Result<Json<RunRecord>, ApiError> {
    Ok(Json(app.threads.run(&caller.scope, &id, &run_id).await?))
}

/// Fold a thread's buffered writes into the store now.
#[utoipa::path(post, path = "/v1/threads/{id}/flush", tag = "threads", params(ThreadIdParam),
    responses((status = 200, body = FoldReport, description = "The store now reflects `version`"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 500, body = Problem, content_type = "application/problem+json", description = "fold_blocked: an undecodable log entry"),
        (status = 503, body = Problem, content_type = "application/problem+json")))]
pub async fn flush(
    State(app): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<FoldReport>, ApiError> {
    Ok(Json(app.threads.flush(&caller.scope, &id).await?))
}
