//! The HTTP edge: routes, shared state, health endpoints and the OpenAPI document.
//!
//! Handlers are a few lines each: parse (extractors in [`extract`]), call one component,
//! shape the answer. All errors go through [`error::ApiError`].

pub mod assets;
pub mod auth;
pub mod doc;
pub mod edge;
pub mod error;
pub mod events;
pub mod extract;
pub mod history;
pub mod list;
pub mod serve;
pub mod snapshots;
pub mod threads;

use crate::live::Hub;
use crate::model::limits::DeltaLimits;
use crate::write::Threads;
use axum::Router;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use doc::CommonResponses;
use error::ApiError;
use serde::Serialize;
use std::sync::Arc;
use tower_http::trace::TraceLayer;
use utoipa::{OpenApi, ToSchema};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Thread reads and writes.
    pub threads: Arc<Threads>,
    /// Live streams.
    pub hub: Arc<Hub>,
    /// Rendered snapshot bodies, shared by every read of the same version.
    pub snapshots: Arc<snapshots::Snapshots>,
    /// Prometheus metrics served at `/metrics`.
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// The viewer page and browser module (`/`, `/static/...`).
    pub assets: assets::Assets,
    /// Per-delta limits.
    pub delta_limits: DeltaLimits,
    /// Authentication, CORS, the request timeout and request metrics.
    pub edge: Arc<Edge>,
}

/// The settings of the layers around the routes (see [`edge`] and [`auth`]).
pub struct Edge {
    /// Authentication.
    pub gate: Arc<auth::Gate>,
    /// CORS, when `--cors-origin` allows any origin.
    pub cors: Option<tower_http::cors::CorsLayer>,
    /// `--request-timeout`.
    pub timeout: edge::RequestTimeout,
    /// Request counts and latencies.
    pub metrics: Arc<edge::HttpMetrics>,
}

impl Edge {
    /// No authentication, no CORS, the default timeout (for tests and tools).
    pub fn open() -> Self {
        Edge {
            gate: Arc::new(auth::Gate::open()),
            cors: None,
            timeout: edge::RequestTimeout(std::time::Duration::from_secs(30)),
            metrics: Arc::default(),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "threadgate", description = "HTTP REST + SSE gateway for AI-agent conversation threads (tirea 0.5 wire format). \
Errors are `application/problem+json` (RFC 9457) with a stable `code`. Besides the answers listed per operation, \
any path answers `405 method_not_allowed` for a method it does not list (`#/components/responses/MethodNotAllowed`), \
and an unknown path `404 not_found`. \
Authentication: a gateway started with `--auth-tokens` or a JWT key (`--jwt-secret`, `--jwt-public-key`) needs a credential \
(see the security schemes) on every `/v1/` operation, and answers `401 unauthorized` without a valid one; without those flags \
no credential is needed and every caller may do everything. A credential scoped to a `resource_id` sees only the threads \
with that `resource_id` (any other thread answers `404`, exactly like a missing one), lists only those, and may not create \
or save a thread with another `resource_id` (`403`; one left out is filled in)."),
    paths(
        threads::create, list::list, threads::get, threads::replace, threads::patch_metadata,
        threads::delete, threads::append, threads::messages, threads::state, threads::runs,
        threads::run, threads::flush, history::history, events::events, healthz, readyz, metrics, openapi
    ),
    components(schemas(error::Problem, Health, crate::live::events::DeltaEvent, crate::live::events::SnapshotEvent,
        crate::live::events::MetadataEvent, crate::live::events::FlushedEvent, crate::live::events::ResetEvent, crate::live::events::DeletedEvent,
        crate::write::View, crate::store::ListOrderBy, crate::store::Order, crate::store::VisibilityFilter)),
    modifiers(&CommonResponses),
    tags((name = "threads"), (name = "runs"), (name = "ops"))
)]
/// The OpenAPI document, generated from the handlers and schemas (see [`openapi_json`]).
pub struct ApiDoc;

/// The OpenAPI document as served at `/openapi.json` and committed at `openapi/openapi.json`.
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    s.push('\n');
    s
}

/// The routes with their layers, outermost first: CORS (answers preflights before anything
/// else), the request span, request metrics, compression, authentication, the request timeout.
pub fn router(state: AppState) -> Router {
    use axum::routing::post;
    let edge = state.edge.clone();
    let routes = Router::new()
        .route("/v1/threads", get(list::list).post(threads::create))
        .route(
            "/v1/threads/{id}",
            get(threads::get)
                .put(threads::replace)
                .patch(threads::patch_metadata)
                .delete(threads::delete),
        )
        .route(
            "/v1/threads/{id}/deltas",
            post(threads::append).get(history::history),
        )
        .route("/v1/threads/{id}/flush", post(threads::flush))
        .route("/v1/threads/{id}/events", get(events::events))
        .route("/v1/threads/{id}/messages", get(threads::messages))
        .route("/v1/threads/{id}/state", get(threads::state))
        .route("/v1/threads/{id}/runs", get(threads::runs))
        .route("/v1/threads/{id}/runs/{run_id}", get(threads::run))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/", get(assets::index))
        .route("/static/{*path}", get(assets::file))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(edge.timeout, edge::timeout))
        .layer(from_fn_with_state(edge.gate.clone(), auth::authenticate))
        .layer(edge::compression())
        .layer(from_fn_with_state(edge.metrics.clone(), edge::track))
        .layer(TraceLayer::new_for_http().make_span_with(edge::RequestSpan))
        .with_state(state);
    match &edge.cors {
        Some(cors) => routes.layer(cors.clone()),
        None => routes,
    }
}

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or what is not ready.
    pub status: String,
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Health), (status = 503, body = error::Problem, content_type = "application/problem+json")))]
async fn readyz(
    axum::extract::State(app): axum::extract::State<AppState>,
) -> Result<axum::Json<Health>, ApiError> {
    app.threads.ready().await?;
    Ok(axum::Json(Health {
        status: "ready".into(),
    }))
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus metrics in the OpenMetrics text format",
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 500, body = error::Problem, content_type = "application/problem+json")))]
async fn metrics(
    axum::extract::State(app): axum::extract::State<AppState>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &app.metrics)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
