//! Pieces of the OpenAPI document shared by many operations, kept in one place so the document
//! says the same thing everywhere and matches what the extractors enforce: the path and header
//! parameters with their formats, and the error answers every operation of a kind can give.
//!
//! The error answers are added by [`CommonResponses`] rather than repeated per handler: which
//! of them an operation can give follows from its shape (a `{id}` in the path, a request body,
//! query parameters, a store behind it), so deriving them cannot forget one.

use utoipa::IntoParams;
use utoipa::openapi::path::Operation;
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};

/// The `{id}` path parameter. Its pattern is the id rule of `crate::id` (no control character
/// U+0000..U+001F or U+007F..U+009F, none of `/ \ ? # %`, and not `.` or `..`) without
/// look-around or `\u` escapes, so every regex dialect (ECMA-262 with or without the `u` flag,
/// Python's `re`, Rust's `regex`) reads it alike: some character is not a dot, or there are at
/// least three dots. The bound is 128 bytes of UTF-8, which no JSON Schema keyword can say
/// (`maxLength` counts characters): `maxLength` is 128, exact for ASCII, and the description
/// states the byte bound. `tests/it/openapi.rs` checks the committed document's patterns
/// against `ThreadId::parse`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // only its documentation is used; `PathId` parses the value
pub struct ThreadIdParam {
    /// Thread id: any Unicode text of 1 to 128 bytes in UTF-8 without control characters and
    /// without `/ \ ? # %`, not `.` or `..` (percent-encode it in the URL).
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = r"^(?:[^\x00-\x1F\x7F-\x9F/\\?#%]*[^\x00-\x1F\x7F-\x9F/\\?#%.][^\x00-\x1F\x7F-\x9F/\\?#%]*|\.{3,})$"
    )]
    pub id: String,
}

/// The `{id}` and `{run_id}` path parameters.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct RunPathParams {
    /// Thread id: any Unicode text of 1 to 128 bytes in UTF-8 without control characters and
    /// without `/ \ ? # %`, not `.` or `..` (percent-encode it in the URL).
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = r"^(?:[^\x00-\x1F\x7F-\x9F/\\?#%]*[^\x00-\x1F\x7F-\x9F/\\?#%.][^\x00-\x1F\x7F-\x9F/\\?#%]*|\.{3,})$"
    )]
    pub id: String,
    /// The run id the agent used (`run_id` of its deltas); UTF-8 text.
    #[param(min_length = 1)]
    pub run_id: String,
}

/// The `If-Match` precondition of writes.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IfMatchParam {
    /// Expected current version as a strong entity tag, exactly as sent in `ETag` (`"3"`), or
    /// `*`. Strong comparison: a weak tag (`W/"3"`), a bare or signed number, a list, or a
    /// version above 9223372036854775807 is `400 invalid_header`; a different version is
    /// `412 version_mismatch`.
    #[param(rename = "If-Match", value_type = String, required = false, pattern = r#"^(?:\*|"(?:0|[1-9][0-9]{0,18})")$"#)]
    pub if_match: Option<String>,
}

/// The `If-None-Match` revalidation header of snapshot reads.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IfNoneMatchParam {
    /// Entity tags the client holds (weak comparison: `"3"` and `W/"3"` both match version 3),
    /// or `*`; a match answers `304`.
    #[param(rename = "If-None-Match", value_type = String, required = false)]
    pub if_none_match: Option<String>,
}

/// The `Idempotency-Key` of appends.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IdempotencyKeyParam {
    /// A retry with the same key (and the same body) appends nothing and answers the first
    /// result with `Idempotent-Replayed: true`; the same key with another body is `422`.
    #[param(rename = "Idempotency-Key", value_type = String, required = false, min_length = 1, max_length = 255, pattern = r"^[!-~](?:[ -~]{0,253}[!-~])?$")]
    pub idempotency_key: Option<String>,
}

/// The `Last-Event-ID` header of the event stream.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct LastEventIdParam {
    /// The last event id received (sent by `EventSource` on reconnect); the later of this and
    /// `after` is used. At most 9223372036854775807.
    #[param(rename = "Last-Event-ID", value_type = String, required = false, max_length = 19, pattern = r"^[0-9]{0,19}$")]
    pub last_event_id: Option<String>,
}

/// Adds the error answers an operation can give by its shape, where its annotation does not
/// already describe them:
///
/// - every `/v1/` operation: `500 internal` (opaque) and `503 unavailable` (the store or NATS
///   is unreachable; retry);
/// - with a `{id}` path parameter: `400` (`invalid_id`; `invalid_query`, `invalid_header`)
///   and `404 not_found`;
/// - with query parameters: `400 invalid_query`;
/// - with a request body: `400` (`invalid_json`, `invalid_field`, ...), `408
///   request_timeout`, `413 payload_too_large`, `415 unsupported_media_type`.
///
/// It also registers `405 method_not_allowed` as a reusable response: any path answers it for
/// a method it does not list.
pub struct CommonResponses;

const ERRORS: [(&str, &str); 7] = [
    (
        "400",
        "Bad request: `invalid_id`, `invalid_query`, `invalid_header`, or for a body \
         `invalid_json`, `invalid_field`, `unknown_op`, `invalid_patch`; `field` names what is \
         at fault",
    ),
    ("404", "`not_found`: no such thread (or run)"),
    (
        "408",
        "`request_timeout`: the request body did not arrive within the body-read timeout",
    ),
    (
        "413",
        "`payload_too_large`: the body is larger than the configured limit",
    ),
    (
        "415",
        "`unsupported_media_type`: the body must be `application/json`",
    ),
    (
        "500",
        "`internal` (opaque; the detail is in the server log), or `fold_blocked`",
    ),
    (
        "503",
        "`unavailable`: the snapshot store or NATS is unreachable; nothing was changed, retry \
         (`Retry-After`)",
    ),
];

fn problem_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

fn add(op: &mut Operation, code: &str) {
    let description = ERRORS
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, d)| *d)
        .unwrap_or("error");
    op.responses
        .responses
        .entry(code.to_owned())
        .or_insert_with(|| problem_response(description).into());
}

impl utoipa::Modify for CommonResponses {
    fn modify(&self, doc: &mut OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                use utoipa::openapi::path::ParameterIn;
                let params = op.parameters.as_deref().unwrap_or_default();
                let has_query = params
                    .iter()
                    .any(|p| matches!(p.parameter_in, ParameterIn::Query));
                let has_header = params
                    .iter()
                    .any(|p| matches!(p.parameter_in, ParameterIn::Header));
                if path.contains("{id}") {
                    add(op, "400");
                    add(op, "404");
                }
                if has_query || has_header {
                    add(op, "400");
                }
                if op.request_body.is_some() {
                    for code in ["400", "408", "413", "415"] {
                        add(op, code);
                    }
                }
                add(op, "500");
                add(op, "503");
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        components.responses.insert(
            "MethodNotAllowed".to_owned(),
            problem_response(
                "`method_not_allowed`: any path answers 405 for a method it does not list",
            )
            .into(),
        );
    }
}
