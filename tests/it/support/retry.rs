//! A client that survives gateway crashes and restarts: it retries a request (connection
//! failures and 503s) against the next replica until it is answered, with the same body and
//! headers every time, so an `Idempotency-Key` makes the retries safe.

use crate::harness::enc;
use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long a client keeps retrying one request through crashes before the test fails.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(120);
/// Per-attempt timeout (a RunFinished waits for its fold).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// An answer that was neither a connection failure nor a 503.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub replayed: bool,
    pub body: Value,
    /// Failed attempts before this answer.
    pub retries: u32,
}

/// The gateways' base URLs, swapped when one restarts; clients read them at every attempt.
#[derive(Clone)]
pub struct Targets {
    bases: Arc<Vec<RwLock<String>>>,
    /// The client every attempt uses.
    pub http: reqwest::Client,
}

impl Targets {
    pub fn new(bases: Vec<String>) -> Self {
        Targets {
            bases: Arc::new(bases.into_iter().map(RwLock::new).collect()),
            http: reqwest::Client::new(),
        }
    }

    pub fn base(&self, i: usize) -> String {
        self.bases[i % self.bases.len()].read().unwrap().clone()
    }

    pub fn set(&self, i: usize, base: String) {
        *self.bases[i].write().unwrap() = base;
    }

    /// Sends one request until it gets an answer that is neither a connection failure nor a
    /// 503 (both retryable), starting at replica `first` and moving to the next one after
    /// each failure. Every attempt carries the same body and headers, so an
    /// `Idempotency-Key` makes the retries safe.
    pub async fn send(
        &self,
        first: usize,
        method: Method,
        path: &str,
        body: Option<&Bytes>,
        headers: &[(&str, String)],
    ) -> Answer {
        let started = Instant::now();
        let mut replica = first;
        let mut retries = 0;
        loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base(replica)))
                .timeout(ATTEMPT_TIMEOUT);
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.clone());
            }
            let failure = match req.send().await {
                Ok(res) if res.status() != StatusCode::SERVICE_UNAVAILABLE => {
                    let status = res.status();
                    let replayed = res.headers().contains_key("idempotent-replayed");
                    match res.bytes().await {
                        Ok(bytes) => {
                            let body = if bytes.is_empty() {
                                Value::Null
                            } else {
                                serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                                    Value::String(String::from_utf8_lossy(&bytes).into())
                                })
                            };
                            return Answer {
                                status,
                                replayed,
                                body,
                                retries,
                            };
                        }
                        Err(e) => format!("body of {status}: {e}"),
                    }
                }
                Ok(res) => format!("503: {}", res.text().await.unwrap_or_default()),
                Err(e) => format!("{e}"),
            };
            retries += 1;
            assert!(
                started.elapsed() < RETRY_DEADLINE,
                "{method} {path}: no answer within {RETRY_DEADLINE:?}; last failure: {failure}"
            );
            replica += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One attempt, no retry: `None` on a connection failure or a 503.
    pub async fn try_once(&self, replica: usize, method: Method, path: &str) -> Option<Answer> {
        let res = self
            .http
            .request(method, format!("{}{path}", self.base(replica)))
            .timeout(ATTEMPT_TIMEOUT)
            .send()
            .await
            .ok()?;
        let status = res.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        let body = res.json().await.ok()?;
        Some(Answer {
            status,
            replayed: false,
            body,
            retries: 0,
        })
    }
}

/// An append with an `Idempotency-Key`, retried through crashes until it is answered.
pub async fn append_retrying(
    t: &Targets,
    first: usize,
    id: &str,
    key: &str,
    delta: &Value,
    if_match: Option<u64>,
) -> Answer {
    let body = Bytes::from(serde_json::to_vec(delta).unwrap());
    let mut headers = vec![("idempotency-key", key.to_owned())];
    if let Some(v) = if_match {
        headers.push(("if-match", format!("\"{v}\"")));
    }
    t.send(
        first,
        Method::POST,
        &format!("/v1/threads/{}/deltas", enc(id)),
        Some(&body),
        &headers,
    )
    .await
}
