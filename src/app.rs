//! Wiring: open the backend chosen by the configuration, bind, serve, and shut down
//! gracefully when the shutdown token is cancelled (SIGTERM or ctrl-c in the binary).

use crate::buffer::{Buffer, BufferConfig};
use crate::config::{Config, LogFormat};
use crate::live::{Hub, LiveConfig};
use crate::writer::Writer;
use std::sync::Arc;
use std::time::Duration;

/// How long shutdown waits for the final fold; whatever is left is folded by the next
/// start-up's recovery, so a slow store never blocks a restart for long.
const SHUTDOWN_FOLD_TIMEOUT: Duration = Duration::from_secs(20);
use crate::http::{AppState, router};
use std::net::SocketAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A started gateway.
pub struct Running {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Cancels the shutdown token and waits for in-flight requests to finish.
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

/// Opens the store, binds the listener and starts serving in the background.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let store = crate::store::open(&config.store).await?;
    let shutdown = CancellationToken::new();
    let buffer = match &config.nats_url {
        Some(url) => {
            let cfg = BufferConfig {
                url: url.clone(),
                prefix: config.nats_prefix.clone(),
                fold_idle: config.fold_idle,
            };
            let buffer = Buffer::connect(&cfg, store.clone()).await?;
            // Recovery: fold whatever earlier processes left buffered, without delaying start-up.
            let b = buffer.clone();
            tokio::spawn(async move {
                match b.fold_all().await {
                    Ok(n) => {
                        tracing::info!(threads = n, "start-up recovery folded buffered threads")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "start-up recovery failed; the sweeper retries")
                    }
                }
            });
            tokio::spawn(buffer.clone().sweep(shutdown.clone()));
            Some(buffer)
        }
        None => None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    if let Some(b) = &buffer {
        b.counters.register(&mut registry);
    }
    let hub = Hub::new(
        store.clone(),
        buffer.clone(),
        shutdown.clone(),
        LiveConfig {
            keepalive: config.sse_keepalive,
            channel_capacity: config.sse_buffer,
        },
    );
    hub.metrics.register(&mut registry);
    let writer = Arc::new(Writer::new(store, buffer.clone(), hub));
    writer.register_metrics(&mut registry);
    let state = AppState {
        writer,
        metrics: Arc::new(registry),
        max_body: config.max_body,
        assets: crate::http::assets::Assets::new(config.static_dir.clone()),
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router(state))
            .with_graceful_shutdown(token.cancelled_owned())
            .await;
        if let Some(b) = buffer {
            // Leave nothing buffered that this process could have folded.
            match tokio::time::timeout(SHUTDOWN_FOLD_TIMEOUT, b.fold_all()).await {
                Ok(Ok(n)) => tracing::info!(threads = n, "folded buffered threads at shutdown"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "shutdown fold failed; recovery will fold")
                }
                Err(_) => tracing::warn!("shutdown fold timed out; recovery will fold"),
            }
        }
        served
    });
    tracing::info!(%addr, store = %redact(&config.store), "threadgate listening");
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

/// Installs the global tracing subscriber (`RUST_LOG` filters, default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
