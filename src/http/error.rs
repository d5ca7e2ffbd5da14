//! The one error type at the HTTP edge: every failure becomes an RFC 9457
//! `application/problem+json` body with a stable machine `code`.
//!
//! Client mistakes name the field, header or op at fault. Backend outages are 503 and say to
//! retry; unexpected failures are an opaque 500 (the detail goes to the log, not the client).

use crate::store::StoreError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Everything a request can fail with, each variant with one status and one stable `code`
/// (see [`ApiError::status`] and [`ApiError::code`]); `5xx` bodies never carry internals.
/// Fields named `field` say which part of the request was at fault (a JSON path such as
/// `patches[0].patch.ops[2]`, a query parameter or a header), `message` says why.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not the shape the route takes (`400 invalid_json`).
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    /// A field with a value the route refuses (`400 invalid_field`).
    #[error("{field}: {message}")]
    InvalidField {
        /// Where in the body.
        field: String,
        /// Why.
        message: String,
    },
    /// A patch op this server does not know (`400 unknown_op`).
    #[error("{field}: unknown patch op {op:?}")]
    UnknownOp {
        /// Where in the body.
        field: String,
        /// The op's name as sent.
        op: String,
    },
    /// A thread or run id that breaks the id rules (`400 invalid_id`).
    #[error("{field}: invalid {}: {message}", if field == "run_id" { "run id" } else { "thread id" })]
    InvalidId {
        /// Where the id was (path, body field).
        field: String,
        /// Which rule it breaks.
        message: String,
    },
    /// A patch that does not apply to the current state (`400 invalid_patch`).
    #[error("{field}: {message}")]
    InvalidPatch {
        /// The op at fault.
        field: String,
        /// Why it does not apply.
        message: String,
    },
    /// A size, depth or count the server bounds (see the README's limits).
    #[error("{field}: {message}")]
    LimitExceeded {
        /// What is too large.
        field: String,
        /// The limit.
        message: String,
    },
    /// A query parameter that does not parse (`400 invalid_query`).
    #[error("query parameter {field}: {message}")]
    InvalidQuery {
        /// The parameter.
        field: String,
        /// Why.
        message: String,
    },
    /// A header that does not parse (`400 invalid_header`).
    #[error("header {header}: {message}")]
    InvalidHeader {
        /// The header's name.
        header: &'static str,
        /// Why.
        message: String,
    },
    /// No such thread (or run), or not the caller's (`404 not_found`).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Creating a thread whose id exists (`409 already_exists`).
    #[error("thread already exists")]
    AlreadyExists,
    /// `If-Match` named another version (`412 version_mismatch`).
    #[error("If-Match: expected version {expected}, current version is {current}")]
    VersionMismatch {
        /// The version the request expected.
        expected: u64,
        /// The thread's version (omitted for a caller who may not see the thread).
        current: u64,
    },
    /// An `Idempotency-Key` reused with another body (`422 idempotency_key_reused`).
    #[error("Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    /// A retried `Idempotency-Key` whose original was accepted long ago and can no longer be
    /// named (`409 idempotency_key_expired`).
    #[error(
        "the write with this Idempotency-Key was accepted earlier and is no longer known; \
         it was not applied again"
    )]
    IdempotencyKeyExpired,
    /// The body did not arrive within `--body-read-timeout` (`408 request_timeout`).
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// A body over `--max-body` (`413 payload_too_large`).
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A body that is not `application/json` (`415 unsupported_media_type`).
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// A route that exists, with another method (`405 method_not_allowed`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A backend (the store, NATS) cannot be reached or did not answer in time
    /// (`503 unavailable`, with `Retry-After`); nothing was lost.
    #[error("{0} is unavailable; retry later")]
    Unavailable(&'static str),
    /// A missing or refused credential (`401`, with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(crate::auth::AuthError),
    /// A valid credential that may not do this (`403`).
    #[error("{message}")]
    Forbidden {
        /// The field naming another resource, when one does.
        field: Option<String>,
        /// Why.
        message: String,
    },
    /// An event stream over a stream limit (`429`).
    #[error("{0}; retry later")]
    TooManyStreams(crate::live::TooManyStreams),
    /// The request took longer than `--request-timeout` once it had arrived (`503`).
    #[error(
        "the request took longer than {0:?}; a write may or may not have been applied: retry \
         it (with the same Idempotency-Key for an append)"
    )]
    Timeout(std::time::Duration),
    /// A buffered entry that no longer applies stops its thread's fold
    /// (`500 fold_blocked`, naming the entry).
    #[error("{0}")]
    FoldBlocked(String),
    /// A bug or an unexpected backend answer (`500 internal`): logged, never shown.
    #[error("internal error")]
    Internal(String),
}

/// RFC 9457 problem details plus our stable `code` and, where relevant, the field at fault
/// and the thread's current version.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URN naming the kind of problem (`urn:threadgate:problem:<code>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for people (names the field at fault).
    pub detail: String,
    /// Stable machine-readable error code, e.g. `invalid_field`, `version_mismatch`.
    pub code: String,
    /// The part of the request at fault: a JSON path into the body, a query parameter or a
    /// header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// On `412`: the thread's current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

impl ApiError {
    /// The HTTP status this error answers.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            BadJson(_)
            | InvalidField { .. }
            | UnknownOp { .. }
            | InvalidId { .. }
            | InvalidPatch { .. }
            | LimitExceeded { .. }
            | InvalidQuery { .. }
            | InvalidHeader { .. } => StatusCode::BAD_REQUEST,
            NotFound(_) => StatusCode::NOT_FOUND,
            AlreadyExists => StatusCode::CONFLICT,
            VersionMismatch { .. } => StatusCode::PRECONDITION_FAILED,
            IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            IdempotencyKeyExpired => StatusCode::CONFLICT,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Unavailable(_) | Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Forbidden { .. } => StatusCode::FORBIDDEN,
            TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            FoldBlocked(_) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code of the problem body.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            BadJson(_) => "invalid_json",
            InvalidField { .. } => "invalid_field",
            UnknownOp { .. } => "unknown_op",
            InvalidId { .. } => "invalid_id",
            InvalidPatch { .. } => "invalid_patch",
            LimitExceeded { .. } => "limit_exceeded",
            InvalidQuery { .. } => "invalid_query",
            InvalidHeader { .. } => "invalid_header",
            NotFound(_) => "not_found",
            AlreadyExists => "already_exists",
            VersionMismatch { .. } => "version_mismatch",
            IdempotencyKeyReused => "idempotency_key_reused",
            IdempotencyKeyExpired => "idempotency_key_expired",
            RequestTimeout(_) => "request_timeout",
            PayloadTooLarge { .. } => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            MethodNotAllowed => "method_not_allowed",
            Unavailable(_) => "unavailable",
            Unauthorized(_) => "unauthorized",
            Forbidden { .. } => "forbidden",
            TooManyStreams(_) => "too_many_streams",
            Timeout(_) => "timeout",
            FoldBlocked(_) => "fold_blocked",
            Internal(_) => "internal",
        }
    }

    fn field(&self) -> Option<String> {
        use ApiError::*;
        match self {
            InvalidField { field, .. }
            | UnknownOp { field, .. }
            | InvalidId { field, .. }
            | InvalidPatch { field, .. }
            | LimitExceeded { field, .. }
            | InvalidQuery { field, .. } => Some(field.clone()),
            InvalidHeader { header, .. } => Some(header.to_string()),
            Forbidden { field, .. } => field.clone(),
            _ => None,
        }
    }

    /// The problem body (opaque for `5xx`).
    pub fn problem(&self) -> Problem {
        let status = self.status();
        Problem {
            kind: format!("urn:threadgate:problem:{}", self.code()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            code: self.code().to_owned(),
            field: self.field(),
            current_version: match self {
                ApiError::VersionMismatch { current, .. } => Some(*current),
                _ => None,
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("thread"),
            StoreError::RunNotFound => ApiError::NotFound("run"),
            StoreError::AlreadyExists => ApiError::AlreadyExists,
            StoreError::VersionConflict { expected, actual } => ApiError::VersionMismatch {
                expected,
                current: actual,
            },
            StoreError::InvalidDelta(d) => ApiError::InvalidPatch {
                field: d.field(),
                message: d.reason(),
            },
            StoreError::InvalidThread { field, message } => {
                ApiError::InvalidPatch { field, message }
            }
            StoreError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            StoreError::Unavailable(why) => {
                tracing::warn!(%why, "store unavailable");
                ApiError::Unavailable("the snapshot store")
            }
            StoreError::Internal(why) => ApiError::Internal(why),
        }
    }
}

impl From<crate::write::Error> for ApiError {
    fn from(e: crate::write::Error) -> Self {
        use crate::write::Error;
        match e {
            Error::Store(e) => e.into(),
            Error::LogUnavailable(why) => {
                tracing::warn!(%why, "message log unavailable");
                ApiError::Unavailable("the message log (NATS)")
            }
            Error::TooLarge { limit, .. } => ApiError::PayloadTooLarge { limit },
            Error::FoldBlocked(why) => ApiError::FoldBlocked(why),
            Error::IdempotencyKeyExpired => ApiError::IdempotencyKeyExpired,
            Error::Forbidden(f) => ApiError::Forbidden {
                field: Some("resource_id".into()),
                message: f.to_string(),
            },
        }
    }
}

impl From<crate::model::limits::LimitError> for ApiError {
    fn from(e: crate::model::limits::LimitError) -> Self {
        ApiError::LimitExceeded {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<crate::live::TooManyStreams> for ApiError {
    fn from(e: crate::live::TooManyStreams) -> Self {
        ApiError::TooManyStreams(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(why) = &self {
            tracing::error!(%why, "internal error");
        }
        let problem = self.problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut res = (self.status(), body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::Unavailable(_) | ApiError::Timeout(_) => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::TooManyStreams(_) => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            }
            ApiError::Unauthorized(e) => super::auth::challenge(&mut res, e),
            _ => {}
        }
        res
    }
}
