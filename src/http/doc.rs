//! Pieces of the OpenAPI document shared by many operations, kept in one place so the document
//! says the same thing everywhere and matches what the extractors enforce: the path and header
//! parameters with their formats, and the error answers every operation of a kind can give.
//!
//! The error answers are added by [`CommonResponses`] rather than repeated per handler: which
//! of them an operation can give follows from its shape (a `{id}` in the path, a request body,
//! query parameters, a store behind it), so deriving them cannot forget one.

use utoipa::IntoParams;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{SecurityRequirement, SecurityScheme};
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
///
/// And it describes authentication: the security schemes (a bearer token in
/// `Authorization`; on `GET` also `access_token` in the query or the auth cookie), which
/// operations need one (every `/v1/` operation: `401 unauthorized` without a valid one;
/// `/metrics` and `/openapi.json` only when so configured; the probes never), and the `403`
/// of the writes that name a `resource_id` and the `429` of the event stream.
pub struct CommonResponses;

/// The name the OpenAPI document gives the auth cookie (the gateway's is `--auth-cookie`).
pub const DOC_COOKIE_NAME: &str = "threadgate_token";

const ERRORS: [(&str, &str); 10] = [
    (
        "401",
        "`unauthorized`: no credential, or one that is not valid (unknown token, expired or \
         not yet valid JWT, wrong audience, issuer or signature); `WWW-Authenticate: Bearer` \
         says which. Only when the gateway runs with authentication",
    ),
    (
        "403",
        "`forbidden`: the credential may not do this (a scoped credential naming another \
         `resource_id`, or a non-admin token on an admin endpoint)",
    ),
    (
        "429",
        "`too_many_streams`: the caller (`--max-streams-per-caller`) or the gateway \
         (`--max-streams`) has as many event streams open as allowed; retry later \
         (`Retry-After`)",
    ),
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
         (`Retry-After`). Or `timeout`: the request took longer than `--request-timeout`; a \
         write may have been applied, retry it (an append with the same `Idempotency-Key`)",
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

/// The credentials an operation accepts: a bearer token always; on reads also the query
/// parameter and the cookie.
fn credentials(read: bool) -> Vec<SecurityRequirement> {
    let mut out = vec![SecurityRequirement::new("bearer", Vec::<String>::new())];
    if read {
        out.push(SecurityRequirement::new(
            "access_token",
            Vec::<String>::new(),
        ));
        out.push(SecurityRequirement::new("cookie", Vec::<String>::new()));
    }
    out
}

fn security_schemes(components: &mut utoipa::openapi::Components) {
    use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("static token or JWT")
                .description(Some(
                    "`Authorization: Bearer <token>`: a static token from `--auth-tokens` \
                     (`admin`, or scoped to one `resource_id`), or a JWT verified with \
                     `--jwt-secret` / `--jwt-public-key` whose `--jwt-resource-claim` (default \
                     `sub`) is the caller's resource_id. A scoped caller sees only threads \
                     whose `resource_id` is its own; any other thread is `404`.",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        "access_token",
        SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
            super::auth::ACCESS_TOKEN_PARAM,
            "The token as a query parameter, on GET requests only (for `EventSource`, which \
             cannot send headers). It ends up in the access logs of proxies: prefer \
             short-lived tokens.",
        ))),
    );
    components.add_security_scheme(
        "cookie",
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
            DOC_COOKIE_NAME,
            "The token in a cookie, on GET requests only; the gateway's cookie name is \
             `--auth-cookie` (this document calls it `threadgate_token`).",
        ))),
    );
}

impl utoipa::Modify for CommonResponses {
    fn modify(&self, doc: &mut OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            match path.as_str() {
                "/healthz" | "/readyz" => {
                    for op in [&mut item.get].into_iter().flatten() {
                        op.security = Some(vec![SecurityRequirement::default()]);
                    }
                    continue;
                }
                "/metrics" | "/openapi.json" => {
                    for op in [&mut item.get].into_iter().flatten() {
                        // Open by default; a credential when configured.
                        let mut any = vec![SecurityRequirement::default()];
                        any.extend(credentials(true));
                        op.security = Some(any);
                        add(op, "401");
                        if path == "/metrics" {
                            add(op, "403");
                        }
                    }
                    continue;
                }
                p if !p.starts_with("/v1/") => continue,
                _ => {}
            }
            let ops = [
                (&mut item.get, true),
                (&mut item.put, false),
                (&mut item.post, false),
                (&mut item.delete, false),
                (&mut item.patch, false),
            ];
            for (op, read) in ops {
                let Some(op) = op else { continue };
                op.security = Some(credentials(read));
                add(op, "401");
                if path.ends_with("/events") {
                    add(op, "429");
                }
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
        for (path, method) in [("/v1/threads", "post"), ("/v1/threads/{id}", "put")] {
            let op = doc.paths.paths.get_mut(path).and_then(|item| match method {
                "post" => item.post.as_mut(),
                _ => item.put.as_mut(),
            });
            if let Some(op) = op {
                add(op, "403");
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        security_schemes(components);
        components.responses.insert(
            "MethodNotAllowed".to_owned(),
            problem_response(
                "`method_not_allowed`: any path answers 405 for a method it does not list",
            )
            .into(),
        );
    }
}
