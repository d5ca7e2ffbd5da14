//! The gateway under test: its processes (see `examples/support`) and a small HTTP client.

use crate::ctx::Ctx;
use crate::support::{PgSchema, Process};
use anyhow::{Result, ensure};
use serde_json::{Value, json};
use std::time::Duration;

/// Which gateway set-up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Every append written to the store.
    Direct,
    /// Appends buffered in JetStream, folded at run end (idle folds off during a measurement).
    Buffered,
}

/// A running gateway and the schema it owns (if any).
pub struct Gateway {
    /// The process.
    pub process: Process,
    /// Its PostgreSQL schema.
    pub schema: Option<PgSchema>,
    /// A client for it.
    pub client: Client,
}

impl Gateway {
    /// Starts a gateway: `pg` picks a fresh PostgreSQL schema (else the memory store);
    /// `prefix` is its NATS prefix in buffered mode; `extra` more flags.
    pub async fn start(
        ctx: &Ctx,
        mode: Mode,
        pg: bool,
        prefix: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let schema = if pg {
            Some(PgSchema::create(&ctx.pg).await?)
        } else {
            None
        };
        let gw = Self::start_on(ctx, mode, schema.as_ref(), prefix, extra, DEFAULT_LOG).await?;
        Ok(Gateway { schema, ..gw })
    }

    /// Starts a gateway on an existing schema (a restart), with the log filter `log`.
    pub async fn start_on(
        ctx: &Ctx,
        mode: Mode,
        schema: Option<&PgSchema>,
        prefix: &str,
        extra: &[&str],
        log: &str,
    ) -> Result<Self> {
        let store = schema.map_or_else(|| "memory:".to_owned(), |s| s.url());
        let mut args = vec!["--store", store.as_str()];
        if mode == Mode::Buffered {
            args.extend(["--nats-url", &ctx.nats, "--nats-prefix", prefix]);
            args.extend(["--fold-idle", "1h"]);
        }
        args.extend_from_slice(extra);
        let process = Process::start_logged(&ctx.bin, &args, log).await?;
        let client = Client::new(&process.base);
        Ok(Gateway {
            process,
            schema: None,
            client,
        })
    }

    /// Stops the process and drops its schema.
    pub async fn stop(self) {
        self.process.stop().await;
        if let Some(s) = self.schema {
            s.drop().await;
        }
    }
}

/// The default gateway log filter (quiet; it still says where it listens).
pub const DEFAULT_LOG: &str = "warn,threadgate::app=info";

/// A pooled HTTP client bound to one gateway.
#[derive(Clone)]
pub struct Client {
    /// The reqwest client.
    pub http: reqwest::Client,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl Client {
    /// A client for `base` with room for many idle connections.
    pub fn new(base: &str) -> Self {
        Client {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .timeout(Duration::from_secs(120))
                .build()
                .expect("reqwest client"),
            base: base.to_owned(),
        }
    }

    /// POSTs JSON; the 2xx answer's JSON.
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> Result<Value> {
        crate::support::post(&self.http, &format!("{}{path}", self.base), body).await
    }

    /// Creates a thread (with a base state when given).
    pub async fn create(&self, id: &str, state: Option<&Value>) -> Result<()> {
        let mut body = json!({ "id": id });
        if let Some(s) = state {
            body["state"] = s.clone();
        }
        self.post("/v1/threads", body.to_string()).await.map(|_| ())
    }

    /// Appends one delta; the new version.
    pub async fn append(&self, id: &str, delta: impl Into<reqwest::Body>) -> Result<u64> {
        let a = self
            .post(&format!("/v1/threads/{id}/deltas"), delta)
            .await?;
        a["version"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("append answered {a}"))
    }

    /// `POST /flush` (buffered mode): folds what the log holds; the answer.
    pub async fn flush(&self, id: &str) -> Result<Value> {
        self.post(&format!("/v1/threads/{id}/flush"), "{}").await
    }

    /// `GET path`; status, ETag and body length.
    pub async fn get(&self, path: &str, etag: Option<&str>) -> Result<(u16, Option<String>)> {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(e) = etag {
            req = req.header("if-none-match", e);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let tag = res
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        res.bytes().await?;
        ensure!(status == 200 || status == 304, "GET {path}: {status}");
        Ok((status, tag))
    }
}

/// One small delta: an assistant message of about 100 characters.
pub fn delta(run: &str, i: usize, reason: &str) -> Value {
    json!({
        "run_id": run,
        "reason": reason,
        "messages": [message(run, i)],
        "patches": [],
    })
}

/// One ~100-character assistant message.
pub fn message(run: &str, i: usize) -> Value {
    json!({"id": format!("{run}-{i}"), "role": "assistant",
        "content": format!("step {i:>6}: the quick brown fox jumps over the lazy dog, twice over, for a ~100 B payload")})
}
