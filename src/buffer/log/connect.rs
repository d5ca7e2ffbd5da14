//! Reaching NATS: seed URLs, credentials, TLS, the client's buffers and reconnects, and the
//! streams the log needs (checked against what exists, never silently changed).
//!
//! **Reconnects.** The client (async-nats) keeps one connection to one of the seed servers
//! (and the servers the cluster advertises) and, when it drops, reconnects forever: to
//! another server at once, then with a back-off growing to 4 s between attempts. The gateway
//! does not restart anything: its log followers notice the reconnect and resume after the
//! last entry they saw (see `follow.rs`), and every request has a deadline ([`NATS_TIMEOUT`]),
//! so while no server is reachable appends answer `503` after at most that long, and reads
//! keep working from the store. Connects, disconnects, lame-duck notices and slow-consumer
//! warnings are logged.
//!
//! **The client's buffer.** Requests made while the connection is down wait in the client's
//! command queue ([`CLIENT_CAPACITY`] commands), and are sent when it is back, unless their
//! deadline passed first: so a publish that timed out may still be stored later. Its
//! compare-and-set (expected last sequence) keeps it from landing out of place, and an
//! `Idempotency-Key` makes a client's retry safe either way. Messages delivered to a
//! subscription wait in a queue of [`SUBSCRIPTION_CAPACITY`] messages; the log followers pull
//! in bounded batches, so that bound is never approached.
//!
//! **Credentials** come from at most one source: a credentials file, an nkey seed file, a
//! user and password, or a token, given as flags or (user/password, token) in the URL. A
//! refused credential, a certificate that does not verify, or an unreadable key file is a
//! start-up error at once ([`crate::app::Permanent`]); an unreachable server is retried for
//! `--startup-timeout`.

use super::{DUPLICATE_WINDOW, LogConfig, MAX_AGE, NATS_TIMEOUT};
use crate::app::Permanent;
use crate::config::Secret;
use async_nats::jetstream::{self, ErrorCode, stream};
use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use std::path::{Path, PathBuf};

/// Commands (publishes, requests) the client queues, e.g. while reconnecting; async-nats's
/// default, stated here because the docs above rely on it.
pub const CLIENT_CAPACITY: usize = 2_048;
/// Messages queued per subscription before the client drops them as a slow consumer;
/// async-nats's default.
pub const SUBSCRIPTION_CAPACITY: usize = 64 * 1_024;

/// How the gateway authenticates to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A credentials file: a user JWT and its nkey seed.
    Creds(PathBuf),
    /// A file holding an nkey seed.
    Nkey(PathBuf),
    /// A user and password.
    UserPassword {
        /// The user name.
        user: String,
        /// Its password.
        password: Secret,
    },
    /// A token.
    Token(Secret),
}

/// TLS settings beyond the URL scheme (`tls://` requires TLS too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM file of the CA(s) to trust for the servers' certificates (in addition to the
    /// system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and its private key, for servers that verify clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    /// Whether any setting asks for TLS.
    pub fn wanted(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }
}

/// The seed servers, with credentials found in their URLs taken out.
#[derive(Debug)]
pub(super) struct Seeds {
    pub addrs: Vec<ServerAddr>,
    /// `user:password@` (or `token@`) of the URLs; all URLs must agree.
    pub auth: NatsAuth,
}

/// Parses comma-separated seed URLs (`nats://`, `tls://`, or `host:port`), taking credentials
/// out of them: async-nats does not use a URL's user info, so the gateway does.
pub(super) fn parse_seeds(urls: &str) -> anyhow::Result<Seeds> {
    let mut addrs = Vec::new();
    let mut auth: Option<NatsAuth> = None;
    for raw in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (scheme, rest) = match raw.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, raw),
        };
        let host_end = rest.find('/').unwrap_or(rest.len());
        let (userinfo, hostport) = match rest[..host_end].rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, &rest[..host_end]),
        };
        let url_auth = match userinfo {
            None => NatsAuth::None,
            Some(u) => {
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|c| c.into_owned())
                        .map_err(|_| anyhow::anyhow!("--nats-url: credentials are not UTF-8"))
                };
                match u.split_once(':') {
                    Some((user, password)) => NatsAuth::UserPassword {
                        user: decode(user)?,
                        password: Secret::new(decode(password)?),
                    },
                    None => NatsAuth::Token(Secret::new(decode(u)?)),
                }
            }
        };
        match &auth {
            Some(a) if *a != url_auth => {
                anyhow::bail!("--nats-url: the URLs carry different credentials")
            }
            _ => auth = Some(url_auth),
        }
        let clean = match scheme {
            Some(s) => format!("{s}://{hostport}"),
            None => hostport.to_owned(),
        };
        let addr: ServerAddr = clean
            .parse()
            .map_err(|e| anyhow::anyhow!("--nats-url: {clean:?} is not a NATS URL: {e}"))?;
        addrs.push(addr);
    }
    anyhow::ensure!(!addrs.is_empty(), "--nats-url names no server");
    Ok(Seeds {
        addrs,
        auth: auth.unwrap_or_default(),
    })
}

/// The seed URLs with credentials removed, for logs.
pub fn redacted(urls: &str) -> String {
    match parse_seeds(urls) {
        Ok(seeds) => seeds
            .addrs
            .iter()
            .map(|a| format!("{}://{}:{}", a.scheme(), a.host(), a.port()))
            .collect::<Vec<_>>()
            .join(","),
        Err(_) => "(invalid)".into(),
    }
}

fn readable(what: &str, path: &Path) -> anyhow::Result<()> {
    std::fs::metadata(path)
        .and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a file"))
            }
        })
        .map_err(|e| {
            anyhow::Error::new(Permanent(format!(
                "{what} {}: cannot read it: {e}",
                path.display()
            )))
        })
}

/// Client options for `config` (credentials and TLS files are read and checked here).
async fn options(config: &LogConfig, url_auth: &NatsAuth) -> anyhow::Result<ConnectOptions> {
    let mut opts = ConnectOptions::new()
        .name("threadgate")
        .connection_timeout(NATS_TIMEOUT)
        .request_timeout(Some(NATS_TIMEOUT))
        .client_capacity(CLIENT_CAPACITY)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("NATS connected"),
                Event::Disconnected => {
                    tracing::warn!(
                        "NATS connection lost; reconnecting (appends answer 503 until back)"
                    )
                }
                Event::LameDuckMode => {
                    tracing::warn!("the NATS server is entering lame-duck mode; moving to another")
                }
                other => tracing::warn!(event = %other, "NATS client event"),
            }
        });
    let auth = match (&config.auth, url_auth) {
        (a, NatsAuth::None) => a.clone(),
        (NatsAuth::None, u) => u.clone(),
        _ => anyhow::bail!(Permanent(
            "NATS credentials given twice: in --nats-url and in a --nats-* flag".into()
        )),
    };
    opts = match auth {
        NatsAuth::None => opts,
        NatsAuth::Creds(path) => {
            readable("--nats-creds", &path)?;
            opts.credentials_file(&path).await.map_err(|e| {
                Permanent(format!(
                    "--nats-creds {}: not a NATS credentials file: {e}",
                    path.display()
                ))
            })?
        }
        NatsAuth::Nkey(path) => {
            readable("--nats-nkey", &path)?;
            let seed = std::fs::read_to_string(&path).unwrap_or_default();
            let seed = seed
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with('S'))
                .unwrap_or_default()
                .to_owned();
            if let Err(e) = nkeys::KeyPair::from_seed(&seed) {
                anyhow::bail!(Permanent(format!(
                    "--nats-nkey {}: no nkey seed in it ({e})",
                    path.display()
                )));
            }
            opts.nkey(seed)
        }
        NatsAuth::UserPassword { user, password } => {
            opts.user_and_password(user, password.expose().to_owned())
        }
        NatsAuth::Token(token) => opts.token(token.expose().to_owned()),
    };
    if let Some(ca) = &config.tls.ca {
        readable("--nats-tls-ca", ca)?;
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls.client {
        readable("--nats-tls-cert", cert)?;
        readable("--nats-tls-key", key)?;
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls.wanted() {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// Connects (retrying an unreachable server for `startup_timeout`; a refused credential or
/// a failed TLS handshake ends start-up at once).
pub(super) async fn connect(config: &LogConfig) -> anyhow::Result<async_nats::Client> {
    let seeds = parse_seeds(&config.url).map_err(|e| Permanent(e.to_string()))?;
    crate::app::retry_startup("NATS", config.startup_timeout, || async {
        let opts = options(config, &seeds.auth).await?;
        opts.connect(seeds.addrs.clone()).await.map_err(|e| {
            let what = match e.kind() {
                ConnectErrorKind::AuthorizationViolation => {
                    "NATS refused the credentials (authorization violation): check \
                     --nats-creds, --nats-nkey, --nats-user/--nats-password, --nats-token or \
                     the URL's user info"
                }
                ConnectErrorKind::Authentication => {
                    "NATS authentication failed: the nkey or credentials file could not sign \
                     the server's challenge"
                }
                ConnectErrorKind::Tls => {
                    "TLS with NATS failed (certificate not trusted, wrong host name, or a \
                     client certificate the server refused): check --nats-tls-ca, \
                     --nats-tls-cert and --nats-tls-key"
                }
                ConnectErrorKind::ServerParse => "--nats-url is not a NATS URL",
                // A refused certificate surfaces as an I/O error carrying rustls's error.
                _ if crate::app::tls_refused(&e) => {
                    "TLS with NATS failed (certificate not trusted, wrong host name, or a \
                     client certificate the server refused): check --nats-tls-ca, \
                     --nats-tls-cert and --nats-tls-key"
                }
                _ => return anyhow::anyhow!("cannot connect to NATS: {e}"),
            };
            anyhow::Error::new(Permanent(format!("{what} ({e})")))
        })
    })
    .await
}

/// The settings of a stream threadgate creates.
pub(super) fn stream_config(
    name: String,
    subjects: String,
    replicas: usize,
    log: bool,
) -> stream::Config {
    if log {
        stream::Config {
            name,
            subjects: vec![subjects],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            max_age: MAX_AGE,
            duplicate_window: DUPLICATE_WINDOW,
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        }
    } else {
        stream::Config {
            name,
            subjects: vec![subjects],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        }
    }
}

/// The settings of `have` that differ from `want`, as `setting: found (wanted)` lines. Only
/// what threadgate sets is compared (a server may fill in the rest).
pub fn differences(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |name: &str, have: String, want: String| {
        if have != want {
            out.push(format!("{name}: {have} (wanted {want})"));
        }
    };
    check(
        "replicas",
        have.num_replicas.max(1).to_string(),
        want.num_replicas.max(1).to_string(),
    );
    check(
        "subjects",
        format!("{:?}", have.subjects),
        format!("{:?}", want.subjects),
    );
    check(
        "retention",
        format!("{:?}", have.retention),
        format!("{:?}", want.retention),
    );
    check(
        "storage",
        format!("{:?}", have.storage),
        format!("{:?}", want.storage),
    );
    check(
        "discard",
        format!("{:?}", have.discard),
        format!("{:?}", want.discard),
    );
    check(
        "max_age",
        format!("{:?}", have.max_age),
        format!("{:?}", want.max_age),
    );
    if want.duplicate_window != std::time::Duration::ZERO {
        check(
            "duplicate_window",
            format!("{:?}", have.duplicate_window),
            format!("{:?}", want.duplicate_window),
        );
    }
    check(
        "allow_direct",
        have.allow_direct.to_string(),
        want.allow_direct.to_string(),
    );
    out
}

/// Gets the stream, creating it when it does not exist; an existing stream with other
/// settings is an error naming each difference (it holds unfolded writes: the gateway never
/// changes or recreates it).
pub(super) async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
    what: &str,
) -> anyhow::Result<stream::Stream> {
    let name = want.name.clone();
    let mut stream = js.get_or_create_stream(want.clone()).await.map_err(|e| {
        let msg = format!("cannot create the JetStream {what} stream {name}: {e}");
        // "replicas > 1 not supported in non-clustered mode": waiting does not cure it.
        let unsupported = matches!(
            e.kind(),
            jetstream::context::CreateStreamErrorKind::JetStream(ref j)
                if j.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
        );
        if unsupported {
            anyhow::Error::new(Permanent(format!(
                "{msg}: --nats-replicas above 1 needs a NATS cluster"
            )))
        } else {
            anyhow::anyhow!(msg)
        }
    })?;
    let have = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the JetStream stream {name}: {e}"))?
        .config
        .clone();
    let diff = differences(&have, &want);
    if !diff.is_empty() {
        let replicas_hint = if have.num_replicas.max(1) != want.num_replicas.max(1) {
            format!(
                " To change the replicas of a running stream: `nats stream edit {name} \
                 --replicas {}`.",
                want.num_replicas
            )
        } else {
            String::new()
        };
        anyhow::bail!(Permanent(format!(
            "the JetStream stream {name} exists with other settings than this gateway's:\n  \
             {}\nthreadgate never changes or recreates an existing stream (it may hold \
             writes not yet folded): start with flags that match it (--nats-replicas, \
             --nats-prefix), or change the stream with the nats CLI.{replicas_hint}",
            diff.join("\n  ")
        )));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_take_credentials_out_of_urls() {
        let s =
            parse_seeds("nats://al%40ice:p%3Aw@n1:4222, nats://al%40ice:p%3Aw@n2:4223").unwrap();
        assert_eq!(s.addrs.len(), 2);
        assert_eq!(
            s.auth,
            NatsAuth::UserPassword {
                user: "al@ice".into(),
                password: Secret::new("p:w")
            }
        );
        assert_eq!(s.addrs[1].host(), "n2");
        assert_eq!(s.addrs[1].port(), 4223);
        let s = parse_seeds("tls://tok@n1:4222").unwrap();
        assert_eq!(s.auth, NatsAuth::Token(Secret::new("tok")));
        assert!(s.addrs[0].tls_required());
        assert_eq!(parse_seeds("n1:4222").unwrap().auth, NatsAuth::None);
        assert!(parse_seeds("nats://a:b@n1:1,nats://c:d@n2:1").is_err());
        assert!(parse_seeds(" , ").is_err());
        let shown = redacted("nats://u:secret@n1:4222,nats://u:secret@n2:4222");
        assert_eq!(shown, "nats://n1:4222,nats://n2:4222");
    }

    #[test]
    fn differences_name_each_setting() {
        let want = stream_config("p_log".into(), "p.log.>".into(), 3, true);
        assert!(differences(&want, &want).is_empty());
        let mut have = want.clone();
        have.num_replicas = 1;
        have.max_age = std::time::Duration::from_secs(60);
        let d = differences(&have, &want);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("replicas: 1 (wanted 3)"), "{d:?}");
    }
}
