//! Configuration: every flag is also an environment variable `THREADGATE_<NAME>`, so the same
//! binary is configured by a command line, a container environment, or both.

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;

/// Every setting of the gateway.
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

    /// NATS server URL, or several comma-separated seed URLs of one cluster
    /// (`nats://n1:4222,nats://n2:4222`; `tls://` requires TLS). When set, writes are buffered
    /// in JetStream and folded into the store at run end, on flush, when idle, at start-up and
    /// at shutdown (buffered mode). A URL may carry `user:password@` or a `token@`.
    #[arg(long, env = "THREADGATE_NATS_URL")]
    pub nats_url: Option<String>,

    /// Replicas of the JetStream streams threadgate creates (1 for a single server, 3 in a
    /// three-node cluster). An existing stream with other settings is reported at start-up and
    /// left alone, never recreated.
    #[arg(long, env = "THREADGATE_NATS_REPLICAS", default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,

    /// NATS credentials file (a user JWT and its nkey seed, as `nsc` writes them).
    #[arg(long, env = "THREADGATE_NATS_CREDS", value_name = "FILE",
        conflicts_with_all = ["nats_nkey", "nats_user", "nats_token"])]
    pub nats_creds: Option<std::path::PathBuf>,

    /// File holding an nkey seed (`SU...`) to authenticate to NATS with.
    #[arg(long, env = "THREADGATE_NATS_NKEY", value_name = "FILE",
        conflicts_with_all = ["nats_user", "nats_token"])]
    pub nats_nkey: Option<std::path::PathBuf>,

    /// NATS user name (with `--nats-password`); or put `user:password@` in the URL.
    #[arg(
        long,
        env = "THREADGATE_NATS_USER",
        requires = "nats_password",
        conflicts_with = "nats_token"
    )]
    pub nats_user: Option<String>,

    /// NATS password (prefer the environment variable: flags show in `ps`).
    #[arg(
        long,
        env = "THREADGATE_NATS_PASSWORD",
        requires = "nats_user",
        hide_env_values = true
    )]
    pub nats_password: Option<Secret>,

    /// NATS authentication token (prefer the environment variable); or put `token@` in the URL.
    #[arg(long, env = "THREADGATE_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,

    /// PEM file of the CA(s) that sign the NATS servers' certificates; requires TLS.
    #[arg(long, env = "THREADGATE_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// PEM client certificate for NATS servers that verify clients (with `--nats-tls-key`).
    #[arg(
        long,
        env = "THREADGATE_NATS_TLS_CERT",
        value_name = "FILE",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `--nats-tls-cert`.
    #[arg(
        long,
        env = "THREADGATE_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<std::path::PathBuf>,

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

    /// Buffered mode: folded entries younger than this stay in the log, so a retried
    /// `Idempotency-Key` finds its original there (later ones are answered from the keys the
    /// store remembered).
    #[arg(long, env = "THREADGATE_KEEP_FOLDED", default_value = "2m", value_parser = humantime::parse_duration)]
    pub keep_folded: std::time::Duration,

    /// Bytes of thread state the buffered-mode head cache may hold (the head of each
    /// recently written thread, so appends need no read); a miss re-reads store and log.
    #[arg(long, env = "THREADGATE_HEAD_CACHE", default_value = "64MiB", value_parser = parse_size)]
    pub head_cache: usize,

    /// Bytes of rendered snapshot bodies kept for `GET /v1/threads/{id}` (each kept by thread
    /// with the version it reflects, so a poll of an unchanged thread is not rendered again).
    #[arg(long, env = "THREADGATE_SNAPSHOT_CACHE", default_value = "32MiB", value_parser = parse_size)]
    pub snapshot_cache: usize,

    /// How long start-up keeps retrying an unreachable PostgreSQL or NATS before giving up.
    #[arg(long, env = "THREADGATE_STARTUP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub startup_timeout: std::time::Duration,

    /// Upper bound on a graceful shutdown (draining requests, the final fold, background
    /// tasks); whatever is left buffered is folded by the next start-up.
    #[arg(long, env = "THREADGATE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: std::time::Duration,

    /// PostgreSQL connections per gateway process.
    #[arg(long, env = "THREADGATE_PG_MAX_CONNECTIONS", default_value_t = 10)]
    pub pg_max_connections: u32,

    /// How long a request waits for a PostgreSQL connection before answering 503.
    #[arg(long, env = "THREADGATE_PG_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub pg_acquire_timeout: std::time::Duration,

    /// Server-side limit on any one PostgreSQL statement (lock waits included).
    #[arg(long, env = "THREADGATE_PG_STATEMENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub pg_statement_timeout: std::time::Duration,

    /// A request head (request line and headers) must arrive completely within this long of
    /// the connection's accept, or of the first byte after a keep-alive pause; a client that
    /// dribbles it more slowly is disconnected. Honest clients send a head in one packet.
    #[arg(long, env = "THREADGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub header_read_timeout: std::time::Duration,

    /// A keep-alive connection with no request in progress is closed after this long (so is
    /// one whose response the client stops accepting). Never applies to an SSE stream in
    /// progress. Longer than the 60 s that load balancers and proxies commonly keep idle
    /// upstream connections, so the proxy, not the gateway, closes first.
    #[arg(long, env = "THREADGATE_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_timeout)]
    pub idle_timeout: std::time::Duration,

    /// A request body must arrive completely within this long of its head, else `408`.
    /// A 4 MiB body needs about 34 s at 1 Mbit/s.
    #[arg(long, env = "THREADGATE_BODY_READ_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub body_read_timeout: std::time::Duration,

    /// Client connections open at once (each SSE stream holds one). Further clients wait in
    /// the listen backlog until one closes, so the gateway never runs out of file descriptors;
    /// the open-files limit is raised to fit at start-up when the hard limit allows.
    #[arg(long, env = "THREADGATE_MAX_CONNECTIONS", default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Serve the viewer page and static/ files from this directory instead of the copies
    /// compiled into the binary (for editing the page without rebuilding).
    #[arg(long, env = "THREADGATE_STATIC_DIR")]
    pub static_dir: Option<std::path::PathBuf>,

    /// Log line format.
    #[arg(long, env = "THREADGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Static tokens file: one per line, `<token> admin` or `<token> resource:<resource_id>`
    /// (blank lines and `#` comments ignored). Turns authentication on.
    #[arg(long, env = "THREADGATE_AUTH_TOKENS", help_heading = "Authentication")]
    pub auth_tokens: Option<std::path::PathBuf>,

    /// HMAC secret for HS256 (HS384, HS512) JWTs, at least 32 bytes. Prefer the environment
    /// variable: a command line is visible to other users of the machine. Turns
    /// authentication on.
    #[arg(
        long,
        env = "THREADGATE_JWT_SECRET",
        hide_env_values = true,
        help_heading = "Authentication"
    )]
    pub jwt_secret: Option<crate::auth::Secret>,

    /// Public key for RS256/PS256/ES256/EdDSA JWTs: a PEM file, or a JWKS (JSON) file as
    /// identity providers publish them (a token's `kid` picks the key). Turns authentication
    /// on.
    #[arg(
        long,
        env = "THREADGATE_JWT_PUBLIC_KEY",
        help_heading = "Authentication"
    )]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Accepted JWT audience (`aud`); repeat the flag (or comma-separate the variable) for
    /// several. When set, tokens must carry one of them.
    #[arg(
        long,
        env = "THREADGATE_JWT_AUDIENCE",
        value_delimiter = ',',
        help_heading = "Authentication"
    )]
    pub jwt_audience: Vec<String>,

    /// Accepted JWT issuer (`iss`); repeatable. When set, tokens must carry one of them.
    #[arg(
        long,
        env = "THREADGATE_JWT_ISSUER",
        value_delimiter = ',',
        help_heading = "Authentication"
    )]
    pub jwt_issuer: Vec<String>,

    /// The JWT claim whose value is the caller's resource_id.
    #[arg(
        long,
        env = "THREADGATE_JWT_RESOURCE_CLAIM",
        default_value = "sub",
        help_heading = "Authentication"
    )]
    pub jwt_resource_claim: String,

    /// Clock skew allowed when checking a JWT's `exp` and `nbf`.
    #[arg(long, env = "THREADGATE_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration, help_heading = "Authentication")]
    pub jwt_leeway: std::time::Duration,

    /// Name of a cookie that may carry the token on read (GET) requests, for browsers.
    #[arg(long, env = "THREADGATE_AUTH_COOKIE", help_heading = "Authentication")]
    pub auth_cookie: Option<String>,

    /// Require an admin token for `/metrics` (default: open, like `/healthz`).
    #[arg(
        long,
        env = "THREADGATE_PROTECT_METRICS",
        help_heading = "Authentication"
    )]
    pub protect_metrics: bool,

    /// Require a token for `/openapi.json` (default: open).
    #[arg(
        long,
        env = "THREADGATE_PROTECT_OPENAPI",
        help_heading = "Authentication"
    )]
    pub protect_openapi: bool,

    /// Origin allowed to call the API from a browser (CORS), e.g. `https://app.example.com`;
    /// repeat the flag (or comma-separate the variable) for several, or `*` for any origin
    /// (then without cookies). Default: no cross-origin access.
    #[arg(
        long,
        env = "THREADGATE_CORS_ORIGIN",
        value_delimiter = ',',
        help_heading = "HTTP"
    )]
    pub cors_origin: Vec<String>,

    /// How long a request may take once it has fully arrived, before it is answered
    /// `503 timeout` (event streams and `POST .../flush` are exempt: see the README).
    #[arg(long, env = "THREADGATE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_timeout, help_heading = "HTTP")]
    pub request_timeout: std::time::Duration,

    /// Most messages in one delta (`400 limit_exceeded` above).
    #[arg(long, env = "THREADGATE_MAX_DELTA_MESSAGES", default_value_t = crate::model::limits::DEFAULT_MAX_DELTA_MESSAGES,
        value_parser = parse_positive, help_heading = "Limits")]
    pub max_delta_messages: usize,

    /// Most patch ops in one delta, summed over its patches, and most patches
    /// (`400 limit_exceeded` above).
    #[arg(long, env = "THREADGATE_MAX_DELTA_OPS", default_value_t = crate::model::limits::DEFAULT_MAX_DELTA_OPS,
        value_parser = parse_positive, help_heading = "Limits")]
    pub max_delta_ops: usize,

    /// Event streams open at once in this process (`429 too_many_streams` above). Keep it
    /// below `--max-connections`, so streams never take every connection from REST calls.
    #[arg(long, env = "THREADGATE_MAX_STREAMS", default_value_t = crate::live::DEFAULT_MAX_STREAMS,
        value_parser = parse_positive, help_heading = "Limits")]
    pub max_streams: usize,

    /// Event streams one caller may hold open at once (`429 too_many_streams` above): per
    /// resource_id for scoped credentials, per token for admin tokens (without authentication
    /// nobody is identified, and only `--max-streams` applies).
    #[arg(long, env = "THREADGATE_MAX_STREAMS_PER_CALLER", default_value_t = crate::live::DEFAULT_MAX_STREAMS_PER_CALLER,
        value_parser = parse_positive, help_heading = "Limits")]
    pub max_streams_per_caller: usize,

    /// A subcommand instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// A password or token: kept out of `Debug` output (and so out of logs).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

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

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands besides serving.
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

/// Parses a count of at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses a positive duration such as `10s` or `1m30s`.
pub fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

impl Config {
    /// How buffered mode reaches NATS at `url`.
    pub fn log_config(&self, url: &str) -> crate::buffer::log::LogConfig {
        use crate::buffer::log::{NatsAuth, NatsTls};
        let auth = if let Some(creds) = &self.nats_creds {
            NatsAuth::Creds(creds.clone())
        } else if let Some(nkey) = &self.nats_nkey {
            NatsAuth::Nkey(nkey.clone())
        } else if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            }
        } else if let Some(token) = &self.nats_token {
            NatsAuth::Token(token.clone())
        } else {
            NatsAuth::None
        };
        crate::buffer::log::LogConfig {
            url: url.to_owned(),
            prefix: self.nats_prefix.clone(),
            startup_timeout: self.startup_timeout,
            replicas: self.nats_replicas as usize,
            auth,
            tls: NatsTls {
                ca: self.nats_tls_ca.clone(),
                client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            },
        }
    }

    /// The authentication settings.
    pub fn auth(&self) -> crate::auth::AuthConfig {
        crate::auth::AuthConfig {
            tokens_file: self.auth_tokens.clone(),
            jwt_secret: self.jwt_secret.clone(),
            jwt_public_key: self.jwt_public_key.clone(),
            jwt_audience: self.jwt_audience.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_resource_claim: self.jwt_resource_claim.clone(),
            jwt_leeway: self.jwt_leeway,
            cookie: self.auth_cookie.clone(),
        }
    }

    /// The per-delta limits.
    pub fn delta_limits(&self) -> crate::model::limits::DeltaLimits {
        crate::model::limits::DeltaLimits {
            messages: self.max_delta_messages,
            ops: self.max_delta_ops,
        }
    }

    /// The connection bounds the server loop enforces.
    pub fn serve_limits(&self) -> crate::http::serve::ServeLimits {
        crate::http::serve::ServeLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            body_read_timeout: self.body_read_timeout,
            max_connections: self.max_connections as usize,
            drain_timeout: self.shutdown_timeout / 3,
        }
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
        assert_eq!(c.header_read_timeout, std::time::Duration::from_secs(10));
        assert_eq!(c.idle_timeout, std::time::Duration::from_secs(75));
        assert_eq!(c.max_connections, 1024);
    }

    #[test]
    fn nats_credentials_come_from_one_source() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(
                ["threadgate", "--nats-url", "nats://x:4222"]
                    .iter()
                    .chain(args),
            )
        };
        assert!(parse(&["--nats-creds", "a", "--nats-token", "t"]).is_err());
        assert!(
            parse(&[
                "--nats-nkey",
                "a",
                "--nats-user",
                "u",
                "--nats-password",
                "p"
            ])
            .is_err()
        );
        assert!(
            parse(&["--nats-user", "u"]).is_err(),
            "a user needs a password"
        );
        assert!(
            parse(&["--nats-tls-cert", "c"]).is_err(),
            "a certificate needs its key"
        );
        assert!(parse(&["--nats-replicas", "0"]).is_err());
        assert!(parse(&["--nats-replicas", "6"]).is_err());
        let c = parse(&[
            "--nats-user",
            "u",
            "--nats-password",
            "p",
            "--nats-replicas",
            "3",
        ])
        .unwrap();
        let log = c.log_config("nats://x:4222");
        assert_eq!(log.replicas, 3);
        assert_eq!(
            log.auth,
            crate::buffer::log::NatsAuth::UserPassword {
                user: "u".into(),
                password: Secret::new("p")
            }
        );
        assert!(
            !format!("{c:?}").contains("\"p\""),
            "the password stays out of Debug"
        );
        assert_eq!(Config::parse_from(["threadgate"]).nats_replicas, 1);
    }

    #[test]
    fn connection_limits_are_validated() {
        assert!(Config::try_parse_from(["threadgate", "--idle-timeout", "0s"]).is_err());
        assert!(Config::try_parse_from(["threadgate", "--max-connections", "0"]).is_err());
        let c = Config::parse_from(["threadgate", "--header-read-timeout", "2s"]);
        assert_eq!(c.serve_limits().header_read_timeout.as_secs(), 2);
    }
}
