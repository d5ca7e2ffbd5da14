//! Test support shared by the suites: a seeded generator ([`rng`]), a client that retries
//! through crashes ([`retry`]), the in-memory oracle ([`oracle`]), a strict SSE client ([`sse`])
//! and a lenient one that resumes across outages ([`resume`]), certificates ([`tls`]), NATS
//! operator credentials ([`nats_jwt`]), a throwaway PostgreSQL cluster ([`pg_cluster`]), JSON
//! request helpers, callers with credentials ([`tenants`]), and polling until a condition holds ([`eventually`]).

pub mod nats_jwt;
pub mod oracle;
pub mod pg_cluster;
pub mod resume;
pub mod retry;
pub mod rng;
pub mod sse;
pub mod tenants;
pub mod tls;

use reqwest::StatusCode;
use serde_json::Value;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] re-checks.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns true; panics (naming the caller) when `within` has passed.
/// For conditions that become true by themselves (a sweeper fold, a reconnect), never as a
/// performance assertion.
#[track_caller]
pub fn eventually<F, Fut>(within: Duration, mut check: F) -> impl Future<Output = ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + within;
        loop {
            if check().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "condition at {caller} still false after {within:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// GET that must answer 200 with JSON.
pub async fn get_json(http: &reqwest::Client, base: &str, path: &str) -> Value {
    let res = http.get(format!("{base}{path}")).send().await.unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// POST that must answer 2xx with JSON.
pub async fn post_json(http: &reqwest::Client, base: &str, path: &str, body: &Value) -> Value {
    let res = http
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert!(status.is_success(), "POST {path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}
