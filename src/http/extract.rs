//! Request extractors that parse at the boundary into typed values, and turn every
//! rejection into an [`ApiError`] that names the field, query parameter or header at fault.

use super::AppState;
use super::error::ApiError;
use super::serve::BodyReadTimeout;
use crate::id::ThreadId;
use crate::store::{Expect, IdempotencyKey};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderMap, header, request::Parts};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A JSON body parsed into `T`; keeps the raw bytes for idempotency fingerprints.
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// The body as it arrived.
    pub bytes: Bytes,
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.max_body;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| body_error(&e, limit))?;
        // Before parsing: nothing deeper than the limit is ever built, stored or echoed.
        let depth = crate::model::limits::body_depth(&bytes);
        if depth > crate::model::limits::MAX_BODY_DEPTH {
            return Err(ApiError::LimitExceeded {
                field: "body".into(),
                message: format!(
                    "JSON nests {depth} levels deep; the limit is {}",
                    crate::model::limits::MAX_BODY_DEPTH
                ),
            });
        }
        let value = parse_json(&bytes)?;
        Ok(JsonBody { value, bytes })
    }
}

/// Why reading a body failed: over the size limit (413), past the body-read deadline (408), or
/// the client went away or sent a malformed body (400).
fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return ApiError::PayloadTooLarge { limit };
        }
        if let Some(t) = c.downcast_ref::<BodyReadTimeout>() {
            return ApiError::RequestTimeout(t.0);
        }
        cause = c.source();
    }
    ApiError::InvalidField {
        field: "body".into(),
        message: format!("could not be read: {e}"),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses JSON, naming the field path of a type error and the op of an unknown patch op.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let field = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::BadJson(inner.to_string()));
            }
            let message = inner.to_string();
            if let Some(op) = unknown_op(&field, &message) {
                return Err(ApiError::UnknownOp { field, op });
            }
            let field = if field == "." {
                "body".to_owned()
            } else {
                field
            };
            Err(ApiError::InvalidField { field, message })
        }
    }
}

/// An unknown variant inside a patch's ops is an unknown op.
fn unknown_op(field: &str, message: &str) -> Option<String> {
    if !field.contains("ops[") {
        return None;
    }
    let rest = message.strip_prefix("unknown variant `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// The `{id}` path segment, validated by the one id rule.
pub struct PathId(pub ThreadId);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = path_param(parts, state, "id").await?;
        ThreadId::parse(&raw)
            .map(PathId)
            .map_err(|e| ApiError::InvalidId {
                field: "id".into(),
                message: e.to_string(),
            })
    }
}

/// The `{run_id}` path segment of `/v1/threads/{id}/runs/{run_id}` (any UTF-8 text: runs are
/// named by their agents; a name no run has is `404`).
pub struct PathRunId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathRunId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        path_param(parts, state, "run_id").await.map(PathRunId)
    }
}

/// One percent-decoded path parameter. When any parameter of the route is not UTF-8 once
/// decoded, the error is `400 invalid_id` naming that parameter (not necessarily `name`: the
/// route's parameters are decoded together, and the first invalid one is at fault).
async fn path_param<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    name: &'static str,
) -> Result<String, ApiError> {
    match axum::extract::RawPathParams::from_request_parts(parts, state).await {
        Ok(params) => params
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
            .ok_or_else(|| ApiError::Internal(format!("route without {{{name}}}"))),
        Err(_) => {
            let field = invalid_path_param(parts).unwrap_or(name);
            Err(ApiError::InvalidId {
                field: field.into(),
                message: "must be UTF-8 text once percent-decoded".into(),
            })
        }
    }
}

/// The first path parameter of the matched route whose segment is not UTF-8 once decoded.
fn invalid_path_param(parts: &Parts) -> Option<&'static str> {
    let pattern = parts.extensions.get::<axum::extract::MatchedPath>()?;
    let params = pattern
        .as_str()
        .split('/')
        .zip(parts.uri.path().split('/'))
        .filter_map(|(p, seg)| Some((p.strip_prefix('{')?.strip_suffix('}')?, seg)));
    for (param, seg) in params {
        if percent_encoding::percent_decode_str(seg)
            .decode_utf8()
            .is_err()
        {
            // The names the routes use, as 'static strings for the problem's `field`.
            return ["id", "run_id"].into_iter().find(|n| *n == param);
        }
    }
    None
}

/// Query parameters parsed into `T`, naming the parameter at fault.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_query(parts.uri.query().unwrap_or("")).map(QueryParams)
    }
}

/// Parses a query string into `T`, naming the parameter at fault.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(query));
    serde_path_to_error::deserialize(de).map_err(|e| ApiError::InvalidQuery {
        field: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

fn form_urlencoded_parse(q: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(q.as_bytes())
}

/// The largest version a client may name (in `If-Match`, `Last-Event-ID`, `after`): versions
/// are stored as PostgreSQL `BIGINT` and documented as `int64`, so none is ever larger, and
/// `version + 1` never overflows.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// A version as this server writes it in an entity tag: decimal digits, no sign, no leading
/// zero (so `"01"` and `"+1"` are tags this server never issued), at most [`MAX_VERSION`].
fn canonical_version(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical
        .then(|| s.parse().ok())
        .flatten()
        .filter(|v| *v <= MAX_VERSION)
}

/// Weak comparison (`If-None-Match`, RFC 9110 §13.1.2): `"7"`, `W/"7"`, or (leniently) a bare
/// `7` all mean version 7.
fn parse_weak_version_tag(tag: &str) -> Option<u64> {
    let t = tag.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    let t = t
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(t);
    canonical_version(t)
}

/// Strong comparison (`If-Match`, RFC 9110 §13.1.1): exactly one strong tag `"7"` as sent in
/// `ETag`. A weak tag can never match strongly, and this server compares one version.
fn parse_strong_version_tag(tag: &str) -> Option<u64> {
    canonical_version(tag.strip_prefix('"')?.strip_suffix('"')?)
}

/// `If-Match: "<version>"` as a write precondition (`*` or absent: any version). Anything but
/// one strong tag holding a version, or `*`, is `400 invalid_header`: `W/"1"`, `"+1"`, a bare
/// `1` and lists would otherwise be a precondition the server cannot evaluate as the client
/// meant it.
pub struct IfMatch(pub Expect);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_if_match(&parts.headers).map(IfMatch)
    }
}

/// The write precondition of a request's `If-Match` header(s) (see [`IfMatch`]).
pub fn parse_if_match(headers: &HeaderMap) -> Result<Expect, ApiError> {
    let mut values = headers.get_all(header::IF_MATCH).iter();
    let Some(v) = values.next() else {
        return Ok(Expect::Any);
    };
    let bad = || ApiError::InvalidHeader {
        header: "If-Match",
        message: "must be one strong entity tag holding a version, as sent in ETag \
                  (e.g. \"3\"), or *; weak tags (W/), lists and unquoted values are not \
                  accepted"
            .into(),
    };
    if values.next().is_some() {
        return Err(bad());
    }
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s == "*" {
        return Ok(Expect::Any);
    }
    parse_strong_version_tag(s)
        .map(Expect::Exact)
        .ok_or_else(bad)
}

/// `If-None-Match`: the versions the client already has (`*` matches any).
pub struct IfNoneMatch(Option<Vec<Option<u64>>>);

impl IfNoneMatch {
    /// True when the client's copy is current, so the answer is 304.
    pub fn matches(&self, version: u64) -> bool {
        self.0
            .as_ref()
            .is_some_and(|tags| tags.iter().any(|t| t.is_none_or(|v| v == version)))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(v) = parts.headers.get(header::IF_NONE_MATCH) else {
            return Ok(IfNoneMatch(None));
        };
        let s = v.to_str().map_err(|_| ApiError::InvalidHeader {
            header: "If-None-Match",
            message: "must be ASCII".into(),
        })?;
        // Tags we did not issue (not a version) simply never match.
        let tags = s
            .split(',')
            .map(|t| {
                if t.trim() == "*" {
                    None
                } else {
                    Some(parse_weak_version_tag(t).unwrap_or(u64::MAX))
                }
            })
            .collect();
        Ok(IfNoneMatch(Some(tags)))
    }
}

/// The `Idempotency-Key` header, if sent.
pub struct IdempotencyHeader(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(v) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyHeader(None));
        };
        match v.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= MAX_IDEMPOTENCY_KEY_LEN => {
                Ok(IdempotencyHeader(Some(s.to_owned())))
            }
            _ => Err(ApiError::InvalidHeader {
                header: "Idempotency-Key",
                message: format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
            }),
        }
    }
}

impl IdempotencyHeader {
    /// The key with a fingerprint of the request body it came with.
    pub fn with_body(self, body: &[u8]) -> Option<IdempotencyKey> {
        self.0.map(|key| IdempotencyKey {
            key,
            fingerprint: hex::encode(Sha256::digest(body)),
        })
    }
}
