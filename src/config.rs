//! Configuration: every flag is also an environment variable `THREADGATE_<NAME>`, so the same
//! binary is configured by a command line, a container environment, or both.

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "threadgate",
    version,
    about = "HTTP REST + SSE gateway for AI-agent conversation threads"
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "THREADGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Snapshot store: `file:<dir>` (embedded default), `memory:` (lost on exit), or a
    /// `postgres://user@host:port/db` URL (migrations run at start-up).
    #[arg(long, env = "THREADGATE_STORE", default_value = "file:./data")]
    pub store: String,

    /// Largest accepted request body, e.g. `4MiB`, `512KiB`, `1000000`; larger bodies get 413.
    #[arg(long, env = "THREADGATE_MAX_BODY", default_value = "4MiB", value_parser = parse_size)]
    pub max_body: usize,

    /// NATS server URL. When set, writes are buffered in JetStream and folded into the store
    /// at run end, on flush, when idle, at start-up and at shutdown (buffered mode).
    #[arg(long, env = "THREADGATE_NATS_URL")]
    pub nats_url: Option<String>,

    /// Namespace for the JetStream streams and subjects (`[A-Za-z0-9_-]+`), so several
    /// deployments or test runs can share one NATS.
    #[arg(long, env = "THREADGATE_NATS_PREFIX", default_value = "threadgate")]
    pub nats_prefix: String,

    /// Buffered threads with no new entry for this long are folded into the store.
    #[arg(long, env = "THREADGATE_FOLD_IDLE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub fold_idle: std::time::Duration,

    /// Idle SSE streams get a keep-alive comment carrying the version they reached this often.
    #[arg(long, env = "THREADGATE_SSE_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub sse_keepalive: std::time::Duration,

    /// Live events buffered per thread for subscribers that fall behind; one that falls
    /// further is caught up from the store and the log (or sent `reset`) when it resumes.
    #[arg(long, env = "THREADGATE_SSE_BUFFER", default_value_t = crate::live::DEFAULT_CHANNEL_CAPACITY)]
    pub sse_buffer: usize,

    /// Serve the viewer page and static/ files from this directory instead of the copies
    /// compiled into the binary (for editing the page without rebuilding).
    #[arg(long, env = "THREADGATE_STATIC_DIR")]
    pub static_dir: Option<std::path::PathBuf>,

    /// Log line format.
    #[arg(long, env = "THREADGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print the OpenAPI document and exit (regenerate openapi/openapi.json with it).
    Openapi,
}

impl Config {
    /// The defaults with the given store, listening on a free loopback port: for tests.
    pub fn for_tests(store: &str) -> Self {
        Config::parse_from(["threadgate", "--listen", "127.0.0.1:0", "--store", store])
    }
}

/// Parses a byte size: a plain number, or one with a `KiB`/`MiB`/`GiB` (or `KB`/`MB`/`GB`,
/// decimal) suffix.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 4MiB"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2kb"), Ok(2000));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn defaults_are_the_embedded_setup() {
        let c = Config::parse_from(["threadgate"]);
        assert_eq!(c.store, "file:./data");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_body, 4 << 20);
        assert_eq!(c.sse_keepalive, std::time::Duration::from_secs(15));
    }
}
