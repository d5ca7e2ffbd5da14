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

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    #[error("{field}: unknown patch op {op:?}")]
    UnknownOp { field: String, op: String },
    #[error("{field}: invalid {}: {message}", if field == "run_id" { "run id" } else { "thread id" })]
    InvalidId { field: String, message: String },
    #[error("{field}: {message}")]
    InvalidPatch { field: String, message: String },
    /// A size, depth or count the server bounds (see the README's limits).
    #[error("{field}: {message}")]
    LimitExceeded { field: String, message: String },
    #[error("query parameter {field}: {message}")]
    InvalidQuery { field: String, message: String },
    #[error("header {header}: {message}")]
    InvalidHeader {
        header: &'static str,
        message: String,
    },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("thread already exists")]
    AlreadyExists,
    #[error("If-Match: expected version {expected}, current version is {current}")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    #[error(
        "the write with this Idempotency-Key was accepted earlier and is no longer known; \
         it was not applied again"
    )]
    IdempotencyKeyExpired,
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0} is unavailable; retry later")]
    Unavailable(&'static str),
    /// A missing or refused credential (`401`, with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(crate::auth::AuthError),
    /// A valid credential that may not do this (`403`).
    #[error("{message}")]
    Forbidden {
        field: Option<String>,
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
    #[error("{0}")]
    FoldBlocked(String),
    #[error("internal error")]
    Internal(String),
}

/// RFC 9457 problem details plus our stable `code` and, where relevant, the field at fault
/// and the thread's current version.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable error code, e.g. `invalid_field`, `version_mismatch`.
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

impl ApiError {
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
