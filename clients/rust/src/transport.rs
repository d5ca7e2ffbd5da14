//! One request to the gateway: URL building, headers, bounded retries with back-off, and the
//! mapping of `application/problem+json` answers onto tirea's [`ThreadStoreError`].
//!
//! Retrying is only safe when a repeated request cannot do the work twice. Reads and deletes
//! are safe as they are, appends carry an `Idempotency-Key`, and creates and saves pass a
//! `verify` check that runs before any retry following an attempt that may have been applied
//! (the request was sent but no answer came back, or the answer was a `503`): if the gateway
//! already holds what the request would have written, the request is done.

use crate::Inner;
use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use std::io;
use std::time::Duration;
use tirea_contract::storage::ThreadStoreError;

/// One request, kept so it can be sent again.
pub(crate) struct Request<'a> {
    pub method: Method,
    /// Path segments after the base URL (each percent-encoded as needed).
    pub path: &'a [&'a str],
    pub query: Vec<(&'static str, String)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A JSON body.
    pub body: Option<Bytes>,
}

impl<'a> Request<'a> {
    pub fn new(method: Method, path: &'a [&'a str]) -> Self {
        Request {
            method,
            path,
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn query(mut self, name: &'static str, value: impl ToString) -> Self {
        self.query.push((name, value.to_string()));
        self
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn json(mut self, body: Vec<u8>) -> Self {
        self.body = Some(Bytes::from(body));
        self
    }
}

/// A complete answer.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// How a request ended.
pub(crate) enum Sent {
    /// The gateway answered (any status the caller has to interpret).
    Answer(Answer),
    /// An earlier attempt's answer was lost, and `verify` found its work done.
    Applied,
}

/// Checks whether the request's work is already done at the gateway.
pub(crate) type Verify<'a> =
    &'a (dyn Fn() -> BoxFuture<'a, Result<bool, ThreadStoreError>> + Send + Sync);

/// What an error answer is about, to fill in [`ThreadStoreError`]'s fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub thread_id: &'a str,
    /// The version a precondition expected (for `412`).
    pub expected: Option<u64>,
}

/// The gateway's RFC 9457 problem body (the fields the client uses).
#[derive(Debug, Default, Deserialize)]
struct Problem {
    code: Option<String>,
    detail: Option<String>,
    current_version: Option<u64>,
}

/// Answers worth another attempt: the gateway (or a proxy in front of it) is briefly away.
fn retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// A `Retry-After` given in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

impl Inner {
    /// The URL of `path` (segments) with `query`.
    pub(crate) fn url(&self, path: &[&str], query: &[(&'static str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.extend(path);
        }
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        url
    }

    /// The delay before retry number `retry` (1-based): exponential, capped, jittered down
    /// by up to half; a server's `Retry-After` is honoured up to the cap.
    pub(crate) fn backoff(&self, retry: u32, server: Option<Duration>) -> Duration {
        let exp = self
            .backoff_min
            .saturating_mul(1u32 << (retry.saturating_sub(1)).min(16));
        let base = server.unwrap_or(exp).min(self.backoff_max);
        base.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    fn request(&self, req: &Request<'_>) -> reqwest::RequestBuilder {
        let mut rb = self
            .http
            .request(req.method.clone(), self.url(req.path, &req.query))
            .timeout(self.timeout)
            .header(ACCEPT, "application/json");
        if let Some(auth) = &self.authorization {
            rb = rb.header(AUTHORIZATION, auth.clone());
        }
        for (k, v) in &req.headers {
            rb = rb.header(k.clone(), v.clone());
        }
        if let Some(body) = &req.body {
            rb = rb
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        rb
    }

    async fn attempt(&self, req: &Request<'_>) -> Result<(Answer, HeaderMap), reqwest::Error> {
        let res = self.request(req).send().await?;
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.bytes().await?;
        Ok((Answer { status, body }, headers))
    }

    /// Sends `req` with bounded retries. `verify`, if given, runs before a retry that follows
    /// an attempt which may have been applied; when it says the work is done, so is this.
    pub(crate) async fn send(
        &self,
        req: &Request<'_>,
        verify: Option<Verify<'_>>,
    ) -> Result<Sent, ThreadStoreError> {
        let mut maybe_applied = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // A check that cannot reach the gateway either decides nothing: the attempt
            // below (and its own failure) does.
            if maybe_applied
                && let Some(verify) = verify
                && matches!(verify().await, Ok(true))
            {
                return Ok(Sent::Applied);
            }
            let server_delay = match self.attempt(req).await {
                Ok((answer, headers)) if retryable(answer.status) => {
                    if attempt > self.retries {
                        return Err(self.unavailable(req, &answer, attempt));
                    }
                    // A 503 says nothing was lost, not that nothing was applied (a publish
                    // whose acknowledgement timed out may still have been stored).
                    maybe_applied = true;
                    retry_after(&headers)
                }
                Ok((answer, _)) => return Ok(Sent::Answer(answer)),
                Err(e) => {
                    if attempt > self.retries {
                        return Err(self.transport_error(req, &e, attempt));
                    }
                    // A refused connection never carried the request; anything later may have.
                    maybe_applied |= !e.is_connect();
                    None
                }
            };
            tokio::time::sleep(self.backoff(attempt, server_delay)).await;
        }
    }

    /// [`Inner::send`] without a `verify` check: for requests that are safe to repeat.
    pub(crate) async fn call(&self, req: &Request<'_>) -> Result<Answer, ThreadStoreError> {
        match self.send(req, None).await? {
            Sent::Answer(a) => Ok(a),
            Sent::Applied => unreachable!("no verify check was given"),
        }
    }

    fn what(&self, req: &Request<'_>) -> String {
        format!("{} {}", req.method, self.url(req.path, &req.query))
    }

    fn transport_error(
        &self,
        req: &Request<'_>,
        e: &reqwest::Error,
        attempts: u32,
    ) -> ThreadStoreError {
        let kind = if e.is_timeout() {
            io::ErrorKind::TimedOut
        } else if e.is_connect() {
            io::ErrorKind::ConnectionRefused
        } else {
            io::ErrorKind::Other
        };
        ThreadStoreError::Io(io::Error::new(
            kind,
            format!(
                "threadgate: {} failed after {attempts} attempt(s): {}",
                self.what(req),
                error_chain(e)
            ),
        ))
    }

    fn unavailable(&self, req: &Request<'_>, answer: &Answer, attempts: u32) -> ThreadStoreError {
        let p: Problem = serde_json::from_slice(&answer.body).unwrap_or_default();
        ThreadStoreError::Io(io::Error::other(format!(
            "threadgate: {} answered {} after {attempts} attempt(s): {}",
            self.what(req),
            answer.status,
            p.detail.as_deref().unwrap_or("unavailable")
        )))
    }
}

/// An error and its causes, one after the other (reqwest's own message is terse).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The error an unexpected answer stands for.
pub(crate) fn problem(answer: &Answer, ctx: Ctx<'_>) -> ThreadStoreError {
    let p: Problem = serde_json::from_slice(&answer.body).unwrap_or_default();
    let detail = p
        .detail
        .clone()
        .unwrap_or_else(|| format!("HTTP {}", answer.status));
    match answer.status {
        StatusCode::NOT_FOUND => ThreadStoreError::NotFound(ctx.thread_id.to_owned()),
        // A retried append whose original was accepted long ago and is no longer known: the
        // delta is in the thread, at a version the gateway can no longer name.
        StatusCode::CONFLICT if p.code.as_deref() == Some("idempotency_key_expired") => {
            ThreadStoreError::Io(io::Error::other(format!(
                "threadgate: the append was accepted earlier, its version is no longer known: \
                 {detail}"
            )))
        }
        StatusCode::CONFLICT => ThreadStoreError::AlreadyExists,
        StatusCode::PRECONDITION_FAILED => ThreadStoreError::VersionConflict {
            expected: ctx.expected.unwrap_or_default(),
            actual: p.current_version.unwrap_or_default(),
        },
        StatusCode::BAD_REQUEST if p.code.as_deref() == Some("invalid_id") => {
            ThreadStoreError::InvalidId(detail)
        }
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNSUPPORTED_MEDIA_TYPE
        | StatusCode::UNPROCESSABLE_ENTITY => ThreadStoreError::Serialization(detail),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ThreadStoreError::Io(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("threadgate: {}: {detail}", answer.status),
        )),
        status => ThreadStoreError::Io(io::Error::other(format!(
            "threadgate answered {status}: {detail}"
        ))),
    }
}

/// Parses a JSON answer body.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    answer: &Answer,
) -> Result<T, ThreadStoreError> {
    serde_json::from_slice(&answer.body).map_err(|e| {
        ThreadStoreError::Serialization(format!("unexpected answer from threadgate: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use crate::{ConfigError, ThreadgateStore};
    use std::time::Duration;

    fn store(base: &str) -> ThreadgateStore {
        ThreadgateStore::builder(base)
            .backoff(Duration::from_millis(100), Duration::from_secs(2))
            .build()
            .unwrap()
    }

    #[test]
    fn urls_keep_the_base_path_and_encode_ids() {
        for (base, want) in [
            (
                "http://h:8080",
                "http://h:8080/v1/threads/a%20b%2Fc%3F%25/deltas?after=3",
            ),
            (
                "http://h:8080/",
                "http://h:8080/v1/threads/a%20b%2Fc%3F%25/deltas?after=3",
            ),
            (
                "https://h/tg/",
                "https://h/tg/v1/threads/a%20b%2Fc%3F%25/deltas?after=3",
            ),
        ] {
            let url = store(base).inner.url(
                &["v1", "threads", "a b/c?%", "deltas"],
                &[("after", "3".into())],
            );
            assert_eq!(url.as_str(), want, "{base}");
        }
        // Ids the gateway accepts stay readable.
        let url = store("http://h")
            .inner
            .url(&["v1", "threads", "user.42*x>y"], &[]);
        assert_eq!(url.path(), "/v1/threads/user.42*x%3Ey");
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for bad in [
            "localhost:8080",
            "ftp://h",
            "http://h/?q=1",
            "http://h/#f",
            "not a url",
        ] {
            assert!(
                matches!(ThreadgateStore::new(bad), Err(ConfigError::BaseUrl { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            ThreadgateStore::builder("http://h").token("a\nb").build(),
            Err(ConfigError::Token)
        ));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let s = store("http://h");
        for _ in 0..100 {
            for (retry, base) in [
                (1, 100),
                (2, 200),
                (3, 400),
                (5, 1600),
                (6, 2000),
                (30, 2000),
            ] {
                let d = s.inner.backoff(retry, None).as_millis() as u64;
                assert!(d >= base / 2 && d <= base, "retry {retry}: {d} ms");
            }
            // A server's Retry-After is honoured up to the cap.
            let d = s.inner.backoff(1, Some(Duration::from_secs(1))).as_millis();
            assert!((500..=1000).contains(&d), "{d}");
            let d = s
                .inner
                .backoff(1, Some(Duration::from_secs(60)))
                .as_millis();
            assert!((1000..=2000).contains(&d), "{d}");
        }
    }

    #[test]
    fn conflicts_map_by_their_code() {
        use super::{Answer, Ctx, problem};
        use reqwest::StatusCode;
        use tirea_contract::storage::ThreadStoreError;
        let conflict = |code: &str| Answer {
            status: StatusCode::CONFLICT,
            body: format!(r#"{{"code":"{code}","detail":"gone"}}"#).into(),
        };
        let ctx = || Ctx {
            thread_id: "t",
            expected: None,
        };
        let expired = problem(&conflict("idempotency_key_expired"), ctx());
        assert!(
            matches!(&expired, ThreadStoreError::Io(e) if e.to_string().contains("gone")),
            "{expired:?}"
        );
        let exists = problem(&conflict("already_exists"), ctx());
        assert!(
            matches!(exists, ThreadStoreError::AlreadyExists),
            "{exists:?}"
        );
    }
}
