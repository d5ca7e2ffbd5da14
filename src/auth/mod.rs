//! Authentication: a request's credential becomes the caller's [`Scope`], once per request,
//! for every route (the event stream included); tenancy is then enforced by the component that
//! knows threads ([`crate::write::Threads`]) with that scope.
//!
//! Why two kinds of credential: services and agents hold long-lived **static tokens** that an
//! operator hands out ([`tokens`]: a file, one token per line, each either `admin` or scoped to
//! one `resource_id`), while end users of a web frontend hold short-lived **JWTs** issued by
//! their identity provider ([`jwt`]: HS256 with a shared secret, or RS/PS/ES/EdDSA with a PEM
//! public key or a JWKS file). A JWT is always scoped: the claim named by
//! `--jwt-resource-claim` (default `sub`) is the caller's resource_id. Admin access comes from
//! static tokens only, so no identity provider can mint an administrator.
//!
//! What a scope means is decided here, in one place ([`Scope::admits`], [`Scope::claim`]): an
//! admin sees every thread; a scoped caller sees only threads whose `resource_id` is its own
//! (threads without one are admin-only), and may not create or move a thread to another
//! resource_id.
//!
//! Credentials never reach a log: tokens are compared as SHA-256 digests in constant time,
//! error messages never echo them, the tokens file's errors name lines, not contents, and the
//! HTTP layer strips `access_token` from the query before anything logs the URI.
//!
//! Where a credential comes from (the HTTP layer asks [`Authenticator::credential`]): the
//! `Authorization: Bearer` header on any request; on read requests (`GET`, `HEAD`) only, also
//! the `access_token` query parameter (browsers' `EventSource` cannot send headers) and a
//! cookie whose name is configured (`--auth-cookie`).

pub mod jwt;
pub mod tokens;

use axum::http::{HeaderMap, Method, header};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Longest resource_id a credential can be scoped to (and that a thread may carry): it sits in
/// indexed columns, so it is bounded like every other key (see `crate::model::limits`).
pub const MAX_RESOURCE_LEN: usize = crate::model::limits::MAX_KEY_LEN;

/// Longest credential accepted at all; anything longer is refused before any work (a JWT
/// with a few claims is well under 2 KB; 16 KiB leaves room for bulky identity providers).
pub const MAX_CREDENTIAL_LEN: usize = 16 * 1024;

/// What a caller may see and change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every thread: admin tokens, and every caller when authentication is off.
    Admin,
    /// Only threads whose `resource_id` is this.
    Resource(Arc<str>),
}

/// Why a scoped caller may not write a thread body as sent (answered `403`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resource_id {requested:?} is not yours: this credential is scoped to {own:?}")]
pub struct ForeignResource {
    /// The resource_id the body named.
    pub requested: String,
    /// The caller's own resource_id.
    pub own: String,
}

impl Scope {
    /// The resource_id a scoped caller is limited to (`None` for an admin).
    pub fn resource(&self) -> Option<&str> {
        match self {
            Scope::Admin => None,
            Scope::Resource(r) => Some(r),
        }
    }

    /// Whether this scope may see a thread with this `resource_id`. A thread without one is
    /// admin-only.
    pub fn admits(&self, resource_id: Option<&str>) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Resource(own) => resource_id == Some(&**own),
        }
    }

    /// Checks the `resource_id` of a thread body this caller creates or saves: a scoped caller
    /// may only name its own, and one left out is filled in with it (the thread must be its
    /// own). An admin may name anything.
    pub fn claim(&self, resource_id: &mut Option<String>) -> Result<(), ForeignResource> {
        let Scope::Resource(own) = self else {
            return Ok(());
        };
        match resource_id {
            None => {
                *resource_id = Some(own.to_string());
                Ok(())
            }
            Some(r) if **r == **own => Ok(()),
            Some(r) => Err(ForeignResource {
                requested: r.clone(),
                own: own.to_string(),
            }),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What it may see.
    pub scope: Scope,
    /// Who it is, for per-caller limits: the resource for a scoped caller (every credential
    /// of one tenant counts together), the token's line for an admin token; never the
    /// credential itself. `None` without authentication, where nobody is identified (behind a
    /// proxy every client would share one address), so only process-wide limits apply.
    pub key: Option<Arc<str>>,
}

impl Caller {
    /// A caller of a gateway without authentication: admin scope, not identified.
    pub fn anonymous() -> Self {
        Caller {
            scope: Scope::Admin,
            key: None,
        }
    }

    /// A caller scoped to one resource.
    pub fn scoped(resource: &str) -> Self {
        Caller {
            scope: Scope::Resource(resource.into()),
            key: Some(format!("resource {resource}").into()),
        }
    }
}

/// Why a request is not authenticated (answered `401` with `WWW-Authenticate: Bearer`). The
/// messages are for the client and never contain the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential at all.
    #[error("a bearer token is required (Authorization: Bearer <token>)")]
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`, or a credential too long or
    /// not visible ASCII.
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
    /// `access_token` or the cookie on a request that changes something.
    #[error(
        "the access_token query parameter and the auth cookie are accepted on GET requests \
         only; send Authorization: Bearer <token>"
    )]
    NotOnWrites,
    /// Not a known static token, and not a JWT (or JWTs are not configured).
    #[error("unknown token")]
    UnknownToken,
    /// A JWT past its `exp` (plus the leeway).
    #[error("the token has expired")]
    Expired,
    /// A JWT before its `nbf` (minus the leeway).
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    /// A JWT for another audience.
    #[error("the token's audience (aud) is not accepted")]
    WrongAudience,
    /// A JWT from another issuer.
    #[error("the token's issuer (iss) is not accepted")]
    WrongIssuer,
    /// A JWT whose signature no configured key verifies.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// A JWT without a claim it must have (`exp`, `aud`, `iss`, or the resource claim).
    #[error("the token lacks the {0:?} claim")]
    MissingClaim(String),
    /// Anything else wrong with a JWT (malformed, an algorithm not accepted).
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

impl AuthError {
    /// A short label for the `threadgate_auth_failures_total` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::NotOnWrites => "query_on_write",
            AuthError::UnknownToken => "unknown_token",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongAudience => "audience",
            AuthError::WrongIssuer => "issuer",
            AuthError::BadSignature => "signature",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::Invalid(_) => "invalid",
        }
    }

    /// The RFC 6750 `error` attribute of `WWW-Authenticate` (none when no credential came).
    pub fn bearer_error(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing => None,
            AuthError::Malformed(_) | AuthError::NotOnWrites => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }
}

/// The authentication settings (from [`crate::config::Config`]).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The static tokens file.
    pub tokens_file: Option<PathBuf>,
    /// The HMAC secret for HS256/HS384/HS512 JWTs.
    pub jwt_secret: Option<Secret>,
    /// A PEM public key, or a JWKS (or single JWK) JSON file.
    pub jwt_public_key: Option<PathBuf>,
    /// Accepted `aud` values (none: `aud` is not checked).
    pub jwt_audience: Vec<String>,
    /// Accepted `iss` values (none: `iss` is not checked).
    pub jwt_issuer: Vec<String>,
    /// The claim holding the caller's resource_id.
    pub jwt_resource_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub jwt_leeway: Duration,
    /// The cookie that may carry the token on read requests.
    pub cookie: Option<String>,
}

impl AuthConfig {
    /// Whether any credential is configured (authentication is on).
    pub fn enabled(&self) -> bool {
        self.tokens_file.is_some() || self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }
}

/// A secret from the configuration: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Where a credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer`.
    Header,
    /// `?access_token=`.
    Query,
    /// The configured cookie.
    Cookie,
}

/// Turns credentials into callers (see the module docs). Built once at start-up.
pub struct Authenticator {
    tokens: Option<tokens::TokenTable>,
    jwt: Option<jwt::JwtVerifier>,
    cookie: Option<String>,
}

impl Authenticator {
    /// Loads the tokens file and the JWT keys; `Ok(None)` when authentication is off. A
    /// malformed tokens file or key stops start-up with an error that names the file and line.
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Option<Self>> {
        if !config.enabled() {
            return Ok(None);
        }
        let tokens = match &config.tokens_file {
            Some(path) => Some(tokens::TokenTable::load(path)?),
            None => None,
        };
        let jwt = jwt::JwtVerifier::from_config(config)?;
        if let Some(name) = &config.cookie {
            anyhow::ensure!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)),
                "--auth-cookie {name:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"
            );
        }
        Ok(Some(Authenticator {
            tokens,
            jwt,
            cookie: config.cookie.clone(),
        }))
    }

    /// Verifies a credential.
    pub fn authenticate(&self, credential: &str) -> Result<Caller, AuthError> {
        if credential.len() > MAX_CREDENTIAL_LEN {
            return Err(AuthError::Malformed("longer than 16 KiB"));
        }
        if let Some(caller) = self.tokens.as_ref().and_then(|t| t.find(credential)) {
            return Ok(caller);
        }
        match &self.jwt {
            Some(jwt) if jwt::looks_like_jwt(credential) => jwt.verify(credential),
            _ => Err(AuthError::UnknownToken),
        }
    }

    /// The request's credential and where it came from: the `Authorization` header first,
    /// then (read requests only) the `access_token` query value the caller took off the URI,
    /// then the configured cookie. `Ok(None)` when there is none.
    pub fn credential(
        &self,
        method: &Method,
        headers: &HeaderMap,
        query_token: Option<String>,
    ) -> Result<Option<(String, Source)>, AuthError> {
        if let Some(v) = headers.get(header::AUTHORIZATION) {
            let v = v
                .to_str()
                .map_err(|_| AuthError::Malformed("not visible ASCII"))?;
            let (scheme, token) = v.trim().split_once(' ').unwrap_or((v, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Malformed(
                    "the Authorization scheme must be Bearer",
                ));
            }
            let token = token.trim();
            if token.is_empty() {
                return Err(AuthError::Malformed("empty bearer token"));
            }
            return Ok(Some((token.to_owned(), Source::Header)));
        }
        let read = method == Method::GET || method == Method::HEAD;
        let cookie = self
            .cookie
            .as_deref()
            .and_then(|name| cookie(headers, name));
        match (query_token, cookie) {
            (None, None) => Ok(None),
            (Some(_), _) | (None, Some(_)) if !read => Err(AuthError::NotOnWrites),
            (Some(q), _) => Ok(Some((q, Source::Query))),
            (None, Some(c)) => Ok(Some((c, Source::Cookie))),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn scopes_admit_and_claim() {
        let alice = Scope::Resource("alice".into());
        assert!(alice.admits(Some("alice")));
        assert!(!alice.admits(Some("bob")));
        assert!(
            !alice.admits(None),
            "threads without a resource are admin-only"
        );
        assert!(Scope::Admin.admits(None));
        let mut none = None;
        alice.claim(&mut none).unwrap();
        assert_eq!(none.as_deref(), Some("alice"));
        let mut bob = Some("bob".to_owned());
        assert!(alice.claim(&mut bob).is_err());
        assert!(Scope::Admin.claim(&mut bob).is_ok());
    }

    fn auth(cookie: Option<&str>) -> Authenticator {
        Authenticator {
            tokens: None,
            jwt: None,
            cookie: cookie.map(str::to_owned),
        }
    }

    #[test]
    fn credentials_come_from_the_header_then_query_then_cookie() {
        let a = auth(Some("tg"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; tg=fromcookie"),
        );
        let got = a.credential(&Method::GET, &h, None).unwrap();
        assert_eq!(got, Some(("fromcookie".into(), Source::Cookie)));
        let got = a.credential(&Method::GET, &h, Some("q".into())).unwrap();
        assert_eq!(got, Some(("q".into(), Source::Query)));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  hdr "),
        );
        let got = a.credential(&Method::GET, &h, Some("q".into())).unwrap();
        assert_eq!(got, Some(("hdr".into(), Source::Header)));
        // Writes take the header only.
        h.remove(header::AUTHORIZATION);
        assert_eq!(
            a.credential(&Method::POST, &h, None),
            Err(AuthError::NotOnWrites)
        );
        assert_eq!(
            a.credential(&Method::POST, &HeaderMap::new(), Some("q".into())),
            Err(AuthError::NotOnWrites)
        );
        assert_eq!(
            a.credential(&Method::POST, &HeaderMap::new(), None),
            Ok(None)
        );
        // No cookie configured: the cookie is ignored.
        assert_eq!(auth(None).credential(&Method::GET, &h, None), Ok(None));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(matches!(
            a.credential(&Method::GET, &h, None),
            Err(AuthError::Malformed(_))
        ));
    }
}
