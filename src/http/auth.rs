//! The authentication layer: one middleware in front of every route (the event stream
//! included) turns the request's credential into a [`Caller`] for the handlers, or answers
//! `401` (problem+json, `WWW-Authenticate: Bearer`) before any handler runs.
//!
//! Which routes need a credential is decided here by route template: `/healthz`, `/readyz`,
//! the viewer page `/` and `/static/...` never do (the page loads before it has a token, and
//! probes carry none); `/metrics` (admin tokens only) and `/openapi.json` (any valid
//! credential) do when `--protect-metrics` / `--protect-openapi` say so; everything else does,
//! unknown paths included. With authentication off every caller is an admin.
//!
//! The `access_token` query parameter is removed from the request URI here, on every request
//! and before any handler or log sees it, so a token that came in the query never reaches a
//! log line, an error message or a query-parameter parser.

use super::error::ApiError;
use crate::auth::{AuthError, Authenticator, Caller, Scope};
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::Arc;

/// The query parameter that may carry a token on read requests.
pub const ACCESS_TOKEN_PARAM: &str = "access_token";

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Nothing: probes, the viewer page and its files.
    Open,
    /// Any valid credential.
    Authenticated,
    /// An admin credential.
    Admin,
}

/// The authentication settings of the HTTP edge.
pub struct Gate {
    /// `None` when authentication is off.
    pub auth: Option<Authenticator>,
    /// `/metrics` needs an admin credential.
    pub protect_metrics: bool,
    /// `/openapi.json` needs a credential.
    pub protect_openapi: bool,
    /// Refused credentials, by `reason` (see [`AuthError::reason`]).
    pub failures: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Gate {
    /// A gate without authentication (every caller is an admin).
    pub fn open() -> Self {
        Gate {
            auth: None,
            protect_metrics: false,
            protect_openapi: false,
            failures: Family::default(),
        }
    }

    /// Registers `threadgate_auth_failures_total`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "threadgate_auth_failures",
            "Requests refused with 401 (or 403 for a non-admin on /metrics), by reason",
            self.failures.clone(),
        );
    }

    fn access(&self, route: Option<&str>) -> Access {
        match route {
            Some("/healthz" | "/readyz" | "/" | "/static/{*path}") => Access::Open,
            Some("/metrics") if self.protect_metrics => Access::Admin,
            Some("/metrics") => Access::Open,
            Some("/openapi.json") if self.protect_openapi => Access::Authenticated,
            Some("/openapi.json") => Access::Open,
            _ => Access::Authenticated,
        }
    }

    fn refuse(&self, e: AuthError) -> Response {
        self.failures.get_or_create(&[("reason", e.reason())]).inc();
        ApiError::Unauthorized(e).into_response()
    }
}

/// The middleware (see the module docs).
pub async fn authenticate(State(gate): State<Arc<Gate>>, mut req: Request, next: Next) -> Response {
    let query_token = match take_access_token(req.uri_mut()) {
        Ok(t) => t,
        Err(e) => return gate.refuse(e),
    };
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str());
    let access = gate.access(route);
    let Some(auth) = &gate.auth else {
        req.extensions_mut().insert(Caller::anonymous());
        return next.run(req).await;
    };
    if access == Access::Open {
        return next.run(req).await;
    }
    let verified = auth
        .credential(req.method(), req.headers(), query_token)
        .and_then(|c| c.ok_or(AuthError::Missing))
        .and_then(|(credential, _)| auth.authenticate(&credential));
    let caller = match verified {
        Ok(c) => c,
        Err(e) => return gate.refuse(e),
    };
    if access == Access::Admin && caller.scope != Scope::Admin {
        gate.failures
            .get_or_create(&[("reason", "not_admin")])
            .inc();
        return ApiError::Forbidden {
            field: None,
            message: "this endpoint needs an admin token".into(),
        }
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Removes every `access_token` parameter from the URI's query and returns its value
/// (percent-decoded); two of them are refused as ambiguous.
fn take_access_token(uri: &mut Uri) -> Result<Option<String>, AuthError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    let mut token = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let raw_key = pair.split('=').next().unwrap_or("");
        let is_token = form_urlencoded::parse(raw_key.as_bytes())
            .next()
            .is_some_and(|(k, _)| k == ACCESS_TOKEN_PARAM);
        if !is_token {
            kept.push(pair);
            continue;
        }
        if token.is_some() {
            return Err(AuthError::Malformed("more than one access_token parameter"));
        }
        let value = form_urlencoded::parse(pair.as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        token = Some(value);
    }
    if token.is_none() {
        return Ok(None);
    }
    let mut parts = uri.clone().into_parts();
    let path = uri.path();
    let rebuilt = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    parts.path_and_query = Some(
        rebuilt
            .parse()
            .map_err(|_| AuthError::Malformed("the request URI"))?,
    );
    *uri = Uri::from_parts(parts).map_err(|_| AuthError::Malformed("the request URI"))?;
    Ok(token.filter(|t| !t.is_empty()))
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::Internal("no caller: the authentication layer is missing".into())
        })
    }
}

/// The `WWW-Authenticate` value of a `401` (RFC 6750 §3).
pub fn www_authenticate(e: &AuthError) -> HeaderValue {
    let value = match e.bearer_error() {
        None => "Bearer realm=\"threadgate\"".to_owned(),
        Some(code) => format!(
            "Bearer realm=\"threadgate\", error=\"{code}\", error_description=\"{}\"",
            e.to_string().replace(['"', '\\'], "'")
        ),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

/// Sets `WWW-Authenticate` on a response (used by [`ApiError`]'s conversion).
pub fn challenge(res: &mut Response, e: &AuthError) {
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, www_authenticate(e));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(uri: &str) -> (Result<Option<String>, AuthError>, String) {
        let mut u: Uri = uri.parse().unwrap();
        let t = take_access_token(&mut u);
        (t, u.to_string())
    }

    #[test]
    fn the_access_token_leaves_the_uri() {
        assert_eq!(
            take("/v1/threads/a/events?after=3&access_token=abc%2Bd&x=1"),
            (
                Ok(Some("abc+d".into())),
                "/v1/threads/a/events?after=3&x=1".into()
            )
        );
        assert_eq!(
            take("/v1/threads?access_token=t"),
            (Ok(Some("t".into())), "/v1/threads".into())
        );
        assert_eq!(
            take("/v1/threads?limit=2"),
            (Ok(None), "/v1/threads?limit=2".into())
        );
        assert_eq!(take("/v1/threads"), (Ok(None), "/v1/threads".into()));
        // Percent-encoded parameter names count too.
        assert_eq!(take("/x?access%5Ftoken=t").1, "/x");
        assert!(take("/x?access_token=a&access_token=b").0.is_err());
    }

    #[test]
    fn challenges_follow_rfc_6750() {
        assert_eq!(
            www_authenticate(&AuthError::Missing),
            "Bearer realm=\"threadgate\""
        );
        let v = www_authenticate(&AuthError::MissingClaim("sub".into()));
        let v = v.to_str().unwrap();
        assert!(v.contains("error=\"invalid_token\""), "{v}");
        assert!(v.contains("lacks the 'sub' claim"), "{v}");
    }
}
