//! A real gateway per test, started in-process from the `threadgate` library on a free port:
//! direct mode over the memory store or PostgreSQL (a fresh schema each), or buffered mode
//! (NATS JetStream at `THREADGATE_TEST_NATS_URL` under a prefix of its own, over PostgreSQL).
//! Schemas are dropped and streams deleted when the test is done.

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use threadgate::app::Running;
use threadgate::config::Config;
use threadgate_client::ThreadgateStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The machine's PostgreSQL, unless `THREADGATE_TEST_PG_URL` says otherwise.
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The machine's NATS, unless `THREADGATE_TEST_NATS_URL` says otherwise.
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Direct writes to the in-memory store.
    Memory,
    /// Direct writes to PostgreSQL.
    Postgres,
    /// Writes buffered in NATS JetStream, folded into PostgreSQL.
    Buffered,
}

pub struct Gateway {
    pub addr: SocketAddr,
    config: Config,
    running: Option<Running>,
    _schema: Option<Schema>,
}

impl Gateway {
    pub async fn start(mode: Mode) -> Gateway {
        Self::start_with(mode, |_| {}).await
    }

    /// Starts with a configuration tweak (e.g. another NATS server).
    pub async fn start_with(mode: Mode, tweak: impl FnOnce(&mut Config)) -> Gateway {
        let schema = match mode {
            Mode::Memory => None,
            Mode::Postgres | Mode::Buffered => Some(Schema::create().await),
        };
        let store = schema
            .as_ref()
            .map_or_else(|| "memory:".to_owned(), Schema::url);
        let mut config = Config::for_tests(&store);
        if mode == Mode::Buffered {
            config.nats_url = Some(
                std::env::var("THREADGATE_TEST_NATS_URL")
                    .unwrap_or_else(|_| DEFAULT_NATS_URL.into()),
            );
            config.nats_prefix = format!("c{}", uuid::Uuid::now_v7().simple());
        }
        tweak(&mut config);
        let running = threadgate::app::start(&config)
            .await
            .unwrap_or_else(|e| panic!("gateway ({mode:?}) did not start: {e:#}"));
        Gateway {
            addr: running.addr,
            config,
            running: Some(running),
            _schema: schema,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with short back-off, so retries in tests take milliseconds.
    pub fn client(&self) -> ThreadgateStore {
        client_for(&self.base())
    }

    /// Shuts the gateway down gracefully (open streams end, buffered mode folds) and starts
    /// it again on the same address and store.
    pub async fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean shutdown");
        }
        let mut config = self.config.clone();
        config.listen = self.addr;
        let running = threadgate::app::start(&config)
            .await
            .unwrap_or_else(|e| panic!("gateway did not restart on {}: {e:#}", self.addr));
        self.running = Some(running);
    }

    /// Stops the gateway and, in buffered mode, deletes its streams.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean shutdown");
        }
        if let Some(url) = &self.config.nats_url
            && let Ok(client) = async_nats::connect(url).await
        {
            let js = async_nats::jetstream::new(client);
            for suffix in ["log", "dead"] {
                let _ = js
                    .delete_stream(format!("{}_{suffix}", self.config.nats_prefix))
                    .await;
            }
        }
    }
}

/// A client of `base` with test-sized back-off.
pub fn client_for(base: &str) -> ThreadgateStore {
    ThreadgateStore::builder(base)
        .timeout(Duration::from_secs(20))
        .backoff(Duration::from_millis(10), Duration::from_millis(200))
        .build()
        .expect("client builds")
}

fn pg_options() -> PgConnectOptions {
    let url = std::env::var("THREADGATE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into());
    PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("THREADGATE_TEST_PG_URL={url:?} is not a valid URL: {e}"))
}

/// A PostgreSQL schema of the test's own, dropped with everything in it at the end.
pub struct Schema {
    name: String,
}

impl Schema {
    pub async fn create() -> Schema {
        let name = format!("tgc_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect_with(&pg_options())
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL is not reachable ({e}); start it or set THREADGATE_TEST_PG_URL")
            });
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create schema {name}: {e}"));
        let _ = conn.close().await;
        Schema { name }
    }

    /// The store URL a gateway works in this schema with.
    pub fn url(&self) -> String {
        let base =
            std::env::var("THREADGATE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into());
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-c%20search_path%3D{}", self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block: a runtime of its own.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect_with(&pg_options()).await.ok()?;
                sqlx::query("SET lock_timeout = '5s'")
                    .execute(&mut conn)
                    .await
                    .ok()?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
    }
}

/// A TCP proxy in front of the gateway that can lose answers: while armed, it forwards the
/// request, lets the gateway answer it, and then closes the client's connection instead of
/// passing the answer on — what a client sees when a connection dies at the worst moment.
/// It can also stall: swallow everything the gateway sends while keeping the connections
/// open, as a dead network path does.
pub struct LossyProxy {
    pub addr: SocketAddr,
    /// Answers still to be lost.
    lose: Arc<AtomicUsize>,
    /// Answers lost so far.
    lost: Arc<AtomicUsize>,
    stalled: Arc<AtomicBool>,
}

impl LossyProxy {
    pub async fn start(target: SocketAddr) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lose = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let stalled = Arc::new(AtomicBool::new(false));
        let (lose2, lost2, stalled2) = (lose.clone(), lost.clone(), stalled.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (mut client_r, mut client_w) = inbound.into_split();
                let (mut server_r, mut server_w) = outbound.into_split();
                let upstream = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
                });
                let (lose, lost, stalled) = (lose2.clone(), lost2.clone(), stalled2.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if stalled.load(Ordering::SeqCst) {
                            continue;
                        }
                        let take = lose
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if take {
                            // The gateway answered; the client never hears it.
                            lost.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if client_w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    upstream.abort();
                    // Dropping both halves closes the client's connection.
                });
            }
        });
        LossyProxy {
            addr,
            lose,
            lost,
            stalled,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Loses the next `n` answers.
    pub fn lose_next(&self, n: usize) {
        self.lose.store(n, Ordering::SeqCst);
    }

    pub fn lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }

    /// Swallows (`true`) or passes on (`false`) what the gateway sends.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}

/// A nats-server of the test's own (for tests that stop it), on a free port.
pub struct NatsServer {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("tgc-nats-{}", uuid::Uuid::now_v7().simple()));
        let mut s = NatsServer {
            port,
            dir,
            child: None,
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and store directory; waits until it accepts.
    pub async fn restart(&mut self) {
        let bin = std::env::var("THREADGATE_TEST_NATS_BIN")
            .unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let child = std::process::Command::new(&bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (set THREADGATE_TEST_NATS_BIN): {e}"));
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server did not start on port {}", self.port);
    }

    /// Kills the server and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
