//! HTTP hygiene around the routes: CORS, response compression, the request timeout, request
//! metrics and the tracing span of each request. All of it is tower-http or a few lines of
//! middleware; [`super::router`] puts the layers in order.
//!
//! - **CORS** ([`cors`], tower-http's `CorsLayer`): off unless `--cors-origin` names origins
//!   (then those, with credentials, so the auth cookie works cross-origin) or `*` (any origin,
//!   never with credentials: browsers refuse that combination, and bearer tokens need none).
//!   Preflights are answered for every path, `/static/threadgate.js` included (a module
//!   import is a CORS fetch); the headers a client reads (`ETag`, `Location`,
//!   `Last-Event-ID`, `Idempotent-Replayed`, `threadgate-mode`, `threadgate-stored-version`,
//!   `threadgate-incarnation`, `Retry-After`, `WWW-Authenticate`) are exposed.
//! - **Compression** ([`compression`], tower-http's `CompressionLayer`): gzip, brotli or zstd,
//!   as the client's `Accept-Encoding` prefers, for answers above [`COMPRESS_ABOVE`] bytes.
//!   Never for `text/event-stream`: an encoder holds small writes back until its buffer
//!   fills, which would delay events indefinitely.
//! - **Request timeout** ([`timeout`]): a request that has fully arrived (head and body) gets
//!   `--request-timeout` to be answered, else `503 timeout`; dropping the handler is safe (a
//!   client that disconnects does the same). Event streams are bounded only until they start
//!   (the stream itself runs until the client leaves), and `POST .../flush` is exempt: folding
//!   a long run legitimately takes long, and a fold that stops making progress already fails
//!   within 60 s of its last step.
//! - **Metrics** ([`HttpMetrics`]): requests by method, route template and status, and their
//!   latency (to the response head) by method and route; the route is the template (`/v1/threads/{id}`),
//!   never the path, so the number of series stays bounded.
//! - **Tracing** ([`RequestSpan`]): one `request` span per request with the method, the route
//!   template, the path (never the query, which can hold a token), and the `thread_id` and
//!   `run_id` the request is about, so every log line of a request names its thread.

use super::error::ApiError;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Answers smaller than this are sent as they are: compressing a few hundred bytes costs more
/// than it saves.
pub const COMPRESS_ABOVE: u16 = 1024;

/// How long browsers may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The request headers a browser may send cross-origin.
const ALLOWED_HEADERS: [HeaderName; 6] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("last-event-id"),
];

/// The response headers a cross-origin page may read.
const EXPOSED_HEADERS: [HeaderName; 9] = [
    header::ETAG,
    header::LOCATION,
    header::RETRY_AFTER,
    header::WWW_AUTHENTICATE,
    HeaderName::from_static("last-event-id"),
    HeaderName::from_static("idempotent-replayed"),
    HeaderName::from_static(super::events::MODE_HEADER),
    HeaderName::from_static(super::events::STORED_VERSION_HEADER),
    HeaderName::from_static(super::events::INCARNATION_HEADER),
];

/// The CORS layer for `--cors-origin`, or `None` when no origin is allowed. Refuses values
/// that are not origins (`https://host[:port]`), so a typo stops start-up instead of silently
/// blocking a frontend.
pub fn cors(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let base = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers(ALLOWED_HEADERS)
        .expose_headers(EXPOSED_HEADERS)
        .max_age(PREFLIGHT_MAX_AGE);
    if origins.iter().any(|o| o == "*") {
        anyhow::ensure!(
            origins.len() == 1,
            "--cors-origin: `*` allows every origin; do not list others beside it"
        );
        return Ok(Some(base.allow_origin(AllowOrigin::any())));
    }
    let mut list = Vec::new();
    for o in origins {
        let valid = (o.starts_with("https://") || o.starts_with("http://"))
            && !o.ends_with('/')
            && o.split("://")
                .nth(1)
                .is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', ' ']));
        anyhow::ensure!(
            valid,
            "--cors-origin {o:?} is not an origin: use scheme://host[:port], e.g. \
             https://app.example.com (no path, no trailing slash), or `*`"
        );
        list.push(HeaderValue::from_str(o)?);
    }
    Ok(Some(
        base.allow_origin(AllowOrigin::list(list))
            .allow_credentials(true),
    ))
}

/// The compression layer (see the module docs).
pub fn compression() -> CompressionLayer<impl Predicate> {
    CompressionLayer::new().compress_when(
        SizeAbove::new(COMPRESS_ABOVE)
            .and(NotForContentType::GRPC)
            .and(NotForContentType::IMAGES)
            .and(NotForContentType::SSE),
    )
}

/// The request timeout's setting.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeout(pub Duration);

/// Answers `503 timeout` when the handler has not answered within the timeout of the request
/// having arrived (see the module docs).
pub async fn timeout(State(limit): State<RequestTimeout>, req: Request, next: Next) -> Response {
    let exempt = req.method() == Method::POST
        && req
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|m| m.as_str() == "/v1/threads/{id}/flush");
    if exempt {
        return next.run(req).await;
    }
    let arrived = Arc::new(Notify::new());
    let req = req.map(|body| {
        if http_body::Body::is_end_stream(&body) {
            arrived.notify_one();
            body
        } else {
            Body::new(Arrival {
                inner: body,
                arrived: Some(arrived.clone()),
            })
        }
    });
    let answer = next.run(req);
    tokio::pin!(answer);
    let clock = async {
        arrived.notified().await;
        tokio::time::sleep(limit.0).await;
    };
    tokio::select! {
        res = &mut answer => res,
        _ = clock => ApiError::Timeout(limit.0).into_response(),
    }
}

/// A request body that says when it has been read to the end.
struct Arrival {
    inner: Body,
    arrived: Option<Arc<Notify>>,
}

impl http_body::Body for Arrival {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended && let Some(n) = self.arrived.take() {
            n.notify_one();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

/// Labels of the request latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

/// Request metrics by route template.
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    seconds: Family<RouteLabels, Histogram>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl HttpMetrics {
    /// Registers `threadgate_http_requests_total` and `threadgate_http_request_duration_seconds`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "threadgate_http_requests",
            "HTTP requests by method, route template and status",
            self.requests.clone(),
        );
        registry.register(
            "threadgate_http_request_duration_seconds",
            "Time to the response head (for an event stream: until it starts), by method and \
             route template",
            self.seconds.clone(),
        );
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Counts and times every request by route template (`unmatched` for unknown paths).
pub async fn track(State(metrics): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let started = Instant::now();
    let res = next.run(req).await;
    metrics
        .seconds
        .get_or_create(&RouteLabels {
            method,
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

/// The `request` span of each request (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestSpan;

impl<B> tower_http::trace::MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, req: &axum::http::Request<B>) -> tracing::Span {
        let path = req.uri().path();
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |m| m.as_str());
        let (thread_id, run_id) = ids_in_path(path);
        tracing::info_span!(
            "request",
            method = %req.method(),
            route,
            path,
            thread_id = thread_id.as_deref(),
            run_id = run_id.as_deref(),
        )
    }
}

/// The thread id and run id a `/v1/threads/{id}[/runs/{run_id}]` path names (decoded).
fn ids_in_path(path: &str) -> (Option<String>, Option<String>) {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
    };
    let Some(rest) = path.strip_prefix("/v1/threads/") else {
        return (None, None);
    };
    let mut segs = rest.split('/');
    let thread = segs.next().filter(|s| !s.is_empty()).and_then(decode);
    let run = match (segs.next(), segs.next()) {
        (Some("runs"), Some(r)) if !r.is_empty() => decode(r),
        _ => None,
    };
    (thread, run)
}

/// Records the run a request is about in its span, once the body says (appends).
pub fn record_run_id(run_id: &str) {
    tracing::Span::current().record("run_id", run_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timeout answers a slow request with `503 timeout`, but never cuts a flush.
    #[tokio::test(start_paused = true)]
    async fn flush_is_exempt_from_the_request_timeout() {
        use axum::routing::{get, post};
        use tower_service::Service;
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(120)).await;
            "done"
        };
        let mut app = axum::Router::new()
            .route("/v1/threads/{id}", get(slow))
            .route("/v1/threads/{id}/flush", post(slow))
            .layer(axum::middleware::from_fn_with_state(
                RequestTimeout(Duration::from_secs(30)),
                timeout,
            ));
        let req = |method: &str, uri: &str| {
            axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap()
        };
        let res = app.call(req("GET", "/v1/threads/t")).await.unwrap();
        assert_eq!(res.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        let res = app.call(req("POST", "/v1/threads/t/flush")).await.unwrap();
        assert_eq!(res.status(), axum::http::StatusCode::OK);
    }

    #[test]
    fn origins_are_checked() {
        assert!(cors(&[]).unwrap().is_none());
        assert!(cors(&["*".into()]).unwrap().is_some());
        assert!(
            cors(&[
                "https://app.example.com".into(),
                "http://localhost:3000".into()
            ])
            .unwrap()
            .is_some()
        );
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://a.b/path",
            "https://",
        ] {
            assert!(cors(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(cors(&["*".into(), "https://a.b".into()]).is_err());
    }

    #[test]
    fn spans_name_the_thread_and_run() {
        assert_eq!(
            ids_in_path("/v1/threads/a%2Ab/runs/r%201"),
            (Some("a*b".into()), Some("r 1".into()))
        );
        assert_eq!(
            ids_in_path("/v1/threads/t/events"),
            (Some("t".into()), None)
        );
        assert_eq!(ids_in_path("/v1/threads"), (None, None));
        assert_eq!(ids_in_path("/healthz"), (None, None));
    }
}
