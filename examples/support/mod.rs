//! What the benchmark examples share: starting the gateway binary as its own process on a
//! free port, a throwaway PostgreSQL schema, and environment knobs. Included by each
//! example with `#[path = "support/mod.rs"] mod support;` (a folder without `main.rs` is
//! not an example of its own).

#![allow(dead_code)] // each example uses what it needs

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sqlx::Connection;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long the gateway may take to listen (migrations on a busy machine included).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a SIGTERM may take before the process is left to `kill_on_drop`.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// The gateway's log filter unless a caller asks for more: quiet, but it says where it listens.
const DEFAULT_LOG: &str = "warn,threadgate::app=info";
/// Log lines kept per process for [`Process::wait_log`] (oldest dropped first).
const LOG_KEEP: usize = 10_000;

/// An environment knob, or its default.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A gateway process on a free loopback port; killed when dropped.
pub struct Process {
    /// The child (stdout drained in the background).
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Its process id.
    pub pid: u32,
    /// Its latest JSON log lines (at most [`LOG_KEEP`]).
    pub log: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Value>>>,
}

impl Process {
    /// Starts `bin --listen 127.0.0.1:0 --log-format json <args>` and waits until it says
    /// where it listens.
    pub async fn start(bin: &str, args: &[&str]) -> Result<Self> {
        Self::start_logged(bin, args, DEFAULT_LOG).await
    }

    /// [`Process::start`] with the log filter `rust_log` (`RUST_LOG` syntax).
    pub async fn start_logged(bin: &str, args: &[&str], rust_log: &str) -> Result<Self> {
        let mut child = tokio::process::Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {bin} (build it first)"))?;
        let pid = child.id().context("no pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let addr = tokio::time::timeout(START_DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "threadgate listening" {
                    return Ok(v["fields"]["addr"].as_str().unwrap_or_default().to_owned());
                }
            }
            bail!("threadgate exited before listening")
        })
        .await
        .with_context(|| format!("threadgate did not listen within {START_DEADLINE:?}"))??;
        let log = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let keep = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let mut log = keep.lock().unwrap();
                    if log.len() == LOG_KEEP {
                        log.pop_front();
                    }
                    log.push_back(v);
                }
            }
        });
        Ok(Process {
            child,
            base: format!("http://{addr}"),
            pid,
            log,
        })
    }

    /// Waits (up to `deadline`) for a log line whose message is `message`; returns its fields.
    pub async fn wait_log(&self, message: &str, deadline: Duration) -> Result<Value> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["fields"]["message"] == message)
                .map(|v| v["fields"].clone());
            if let Some(fields) = found {
                return Ok(fields);
            }
            ensure!(
                tokio::time::Instant::now() < until,
                "no log line {message:?} within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// SIGKILL: no shutdown work at all (what a crash leaves behind).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// [`Process::start`] in buffered mode: `store`, NATS at `nats` under `prefix`, then
    /// `extra` flags.
    pub async fn buffered(
        bin: &str,
        store: &str,
        nats: &str,
        prefix: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec![
            "--store",
            store,
            "--nats-url",
            nats,
            "--nats-prefix",
            prefix,
        ];
        args.extend_from_slice(extra);
        Self::start(bin, &args).await
    }

    /// `VmRSS` and `VmHWM` (peak) in MiB, from `/proc/<pid>/status`.
    pub fn rss(&self) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |name: &str| -> Result<f64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing"))?;
            let kb: f64 = line
                .split_whitespace()
                .nth(1)
                .context("no value")?
                .parse()?;
            Ok(kb / 1024.0)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Resets `VmHWM` to the current RSS (Linux `clear_refs` value 5).
    pub fn reset_peak(&self) -> Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5")
            .context("resetting the peak RSS (/proc/<pid>/clear_refs)")
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(STOP_DEADLINE, self.child.wait()).await;
    }
}

/// A fresh PostgreSQL schema for one gateway; [`PgSchema::drop`] removes it.
pub struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    /// Creates `bench_<uuid>` in the database at `base`.
    pub async fn create(base: &str) -> Result<Self> {
        let name = format!("bench_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(base)
            .await
            .with_context(|| format!("PostgreSQL at {base}"))?;
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await?;
        Ok(PgSchema {
            base: base.to_owned(),
            name,
        })
    }

    /// The store URL that puts the gateway in this schema.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-c%20search_path%3D{}", self.base, self.name)
    }

    /// Drops the schema and everything in it (best effort).
    pub async fn drop(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.base).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
                .execute(&mut conn)
                .await;
        }
    }
}

/// POSTs a JSON body; the answer's JSON, or an error naming the status and body.
pub async fn post(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> Result<Value> {
    let res = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = res.status();
    let bytes = res.bytes().await?;
    ensure!(
        status.is_success(),
        "POST {url}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(serde_json::from_slice(&bytes)?)
}
