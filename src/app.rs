//! Wiring: open the store, choose the write path and the live source once, bind, serve, and
//! shut down within a bound when the shutdown token is cancelled (SIGTERM or ctrl-c).
//!
//! Shutdown, in order, all within `--shutdown-timeout`: stop accepting and end SSE streams
//! (clients resume elsewhere with `Last-Event-ID`); let in-flight requests finish; fold what
//! this process can (buffered mode; whatever is left is folded by the next start-up's
//! recovery); wait for background tasks; close the store's connections.

use crate::auth::Authenticator;
use crate::buffer::{BufferConfig, Buffered};
use crate::config::{Config, LogFormat};
use crate::http::auth::Gate;
use crate::http::edge::{HttpMetrics, RequestTimeout};
use crate::http::{AppState, Edge, router};
use crate::live::source::{LiveSource, LogSource, StoreSource};
use crate::live::{Hub, LiveConfig};
use crate::store::{DynStore, PgOptions};
use crate::write::direct::DirectWrites;
use crate::write::{Threads, WritePath};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Share of the shutdown budget that in-flight requests get to finish.
const DRAIN_SHARE: u32 = 3;
/// First delay between start-up connection attempts (doubles up to [`RETRY_STARTUP_MAX`]).
const RETRY_STARTUP_MIN: Duration = Duration::from_millis(250);
/// Longest delay between start-up connection attempts.
const RETRY_STARTUP_MAX: Duration = Duration::from_secs(5);

/// A started gateway.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to shut down.
    pub shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Cancels the shutdown token and waits for the shutdown to complete.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server has shut down.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await??;
        Ok(())
    }
}

/// A start-up failure that waiting cannot cure (a refused credential, a certificate that does
/// not verify, a backend configured unlike the flags): [`retry_startup`] reports it at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

/// Whether `e` (or what caused it) is a TLS failure: an error of rustls wrapped in an I/O
/// error (a certificate that does not verify, an alert from the server).
pub fn tls_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps: look at it directly.
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Retries `connect` with back-off until it succeeds or `budget` has passed, logging each
/// failure: a backend that is briefly unreachable at start-up (a database still starting
/// next to the gateway) must not stop it. A [`Permanent`] error ends the retries at once.
pub async fn retry_startup<T, F, Fut>(
    what: &str,
    budget: Duration,
    mut connect: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + budget;
    let mut delay = RETRY_STARTUP_MIN;
    loop {
        let attempt = tokio::time::timeout_at(deadline, connect()).await;
        match attempt {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if e.is::<Permanent>() => return Err(e),
            Ok(Err(e)) if Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, retry_in = ?delay, "{what} is not reachable yet; retrying");
            }
            Ok(Err(e)) => {
                return Err(e.context(format!(
                    "{what} unreachable for {budget:?} (--startup-timeout)"
                )));
            }
            Err(_) => anyhow::bail!("{what} unreachable for {budget:?} (--startup-timeout)"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_STARTUP_MAX);
    }
}

/// The parts chosen at start-up.
struct Parts {
    store: DynStore,
    writes: Arc<dyn WritePath>,
    hub: Arc<Hub>,
}

/// Opens the backends and chooses the write path and the live source (the only place that
/// knows which mode is on).
async fn assemble(
    config: &Config,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    registry: &mut prometheus_client::registry::Registry,
) -> anyhow::Result<Parts> {
    let pg = PgOptions {
        max_connections: config.pg_max_connections,
        acquire_timeout: config.pg_acquire_timeout,
        statement_timeout: config.pg_statement_timeout,
        startup_timeout: config.startup_timeout,
        // Direct mode announces writes to the other replicas; buffered mode has the log.
        notify: config.nats_url.is_none(),
    };
    let store = crate::store::open(&config.store, &pg).await?;
    let live = LiveConfig {
        keepalive: config.sse_keepalive,
        channel_capacity: config.sse_buffer,
        max_streams: config.max_streams,
        max_streams_per_caller: config.max_streams_per_caller,
    };
    let parts = match &config.nats_url {
        Some(url) => {
            let buffer = BufferConfig {
                log: config.log_config(url),
                fold_idle: config.fold_idle,
                head_cache_bytes: config.head_cache as u64,
                keep_folded: config.keep_folded,
            };
            let buffered = Buffered::connect(&buffer, store.clone(), tasks.clone()).await?;
            buffered.register_metrics(registry);
            buffered.start(shutdown.clone());
            let source: Arc<dyn LiveSource> =
                Arc::new(LogSource::new(buffered.clone(), store.clone()));
            let hub = Hub::new(source, shutdown.clone(), tasks.clone(), live);
            Parts {
                store,
                writes: buffered,
                hub,
            }
        }
        None => {
            if let Some(changes) = store.changes() {
                changes.register(registry);
            }
            let source: Arc<dyn LiveSource> = Arc::new(StoreSource::new(store.clone()));
            let hub = Hub::new(source, shutdown.clone(), tasks.clone(), live);
            let writes = Arc::new(DirectWrites::new(store.clone(), hub.clone()));
            Parts { store, writes, hub }
        }
    };
    parts.hub.metrics.register(registry);
    Ok(parts)
}

/// The HTTP edge's settings: authentication (a malformed tokens file or key stops start-up
/// here, before any backend is opened), CORS, the request timeout and request metrics.
fn edge(
    config: &Config,
    registry: &mut prometheus_client::registry::Registry,
) -> anyhow::Result<Edge> {
    let auth = Authenticator::from_config(&config.auth())?;
    let loopback = config.listen.ip().is_loopback();
    match (&auth, loopback) {
        (None, true) => tracing::info!(
            "authentication is off: every caller may read and write every thread (set \
             --auth-tokens or a JWT key before exposing the gateway)"
        ),
        (None, false) => tracing::warn!(
            listen = %config.listen,
            "authentication is off on a non-loopback address: anyone who can reach it may \
             read and write every thread; set --auth-tokens or a JWT key"
        ),
        (Some(_), _) => tracing::info!("authentication is on"),
    }
    let gate = Gate {
        auth,
        protect_metrics: config.protect_metrics,
        protect_openapi: config.protect_openapi,
        failures: Default::default(),
    };
    gate.register_metrics(registry);
    let metrics = HttpMetrics::default();
    metrics.register(registry);
    Ok(Edge {
        gate: Arc::new(gate),
        cors: crate::http::edge::cors(&config.cors_origin)?,
        timeout: RequestTimeout(config.request_timeout),
        metrics: Arc::new(metrics),
    })
}

/// Opens the backends, binds the listener and starts serving in the background.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let edge = edge(config, &mut registry)?;
    let parts = match assemble(config, &shutdown, &tasks, &mut registry).await {
        Ok(parts) => parts,
        Err(e) => {
            shutdown.cancel();
            return Err(e);
        }
    };
    let threads = Arc::new(Threads::new(parts.store.clone(), parts.writes.clone()));
    threads.register_metrics(&mut registry);
    let state = AppState {
        threads,
        hub: parts.hub,
        snapshots: Arc::new(crate::http::snapshots::Snapshots::new(
            config.snapshot_cache as u64,
        )),
        metrics: Arc::new(registry),
        max_body: config.max_body,
        assets: crate::http::assets::Assets::new(config.static_dir.clone()),
        delta_limits: config.delta_limits(),
        edge: Arc::new(edge),
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let budget = config.shutdown_timeout;
    let token = shutdown.clone();
    let (store, writes) = (parts.store, parts.writes);
    let mut limits = config.serve_limits();
    limits.drain_timeout = budget / DRAIN_SHARE;
    let task = tokio::spawn(async move {
        let served = crate::http::serve::serve(listener, router(state), limits, token).await;
        let deadline = Instant::now() + budget - budget / DRAIN_SHARE;
        if tokio::time::timeout_at(deadline, writes.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "shutdown fold did not finish in time; the next start-up's recovery folds"
            );
        }
        tasks.close();
        if tokio::time::timeout_at(deadline, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tasks.len(),
                "background tasks still running at shutdown"
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), store.close()).await;
        served
    });
    let nats = config
        .nats_url
        .as_deref()
        .map(crate::buffer::log::redacted)
        .unwrap_or_default();
    tracing::info!(%addr, store = %redact(&config.store), %nats, "threadgate listening");
    Ok(Running {
        addr,
        shutdown,
        task,
    })
}

/// Runs until SIGTERM or ctrl-c.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let running = start(&config).await?;
    let token = running.shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    running.wait().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Hides a password in a store URL before it is logged.
fn redact(spec: &str) -> String {
    match (spec.find("://"), spec.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &spec[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &spec[..s + 3], &creds[..c], &spec[at..]),
                None => spec.to_owned(),
            }
        }
        _ => spec.to_owned(),
    }
}

/// Installs the global tracing subscriber (`RUST_LOG` filters, default `info`). Logs go to
/// stdout; text lines are coloured only when stdout is a terminal (and `NO_COLOR` is unset), so
/// a log file, a pipe or a container's log collector never gets ANSI escape codes.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
