//! The shared harness: start the real gateway on port 0 against a chosen backend (memory,
//! a file store in a temp dir, or PostgreSQL in a fresh schema) and talk to it over HTTP.

use crate::pg::PgSchema;
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use threadgate::app::Running;
use threadgate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    File,
    Postgres,
}

pub struct Gateway {
    pub base: String,
    pub http: reqwest::Client,
    running: Option<Running>,
    /// `(url, prefix)` in buffered mode: the prefix's streams are deleted at `stop`, unless
    /// [`Gateway::shares_streams`] said another gateway goes on using them.
    nats: Option<(String, String)>,
    _dir: Option<TempDir>,
    _schema: Option<PgSchema>,
}

impl Gateway {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts with a configuration tweak (e.g. a smaller body limit).
    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let (store, dir, schema) = match backend {
            Backend::Memory => ("memory:".to_owned(), None, None),
            Backend::File => {
                let dir = tempfile::tempdir().expect("temp dir");
                (format!("file:{}", dir.path().display()), Some(dir), None)
            }
            Backend::Postgres => {
                let schema = PgSchema::create().await;
                (schema.url(), None, Some(schema))
            }
        };
        let mut config = Config::for_tests(&store);
        tweak(&mut config);
        Self::start_config(config, dir, schema).await
    }

    /// Starts with a PostgreSQL store reached through `url` (e.g. via a proxy), in `schema`.
    pub async fn start_config(
        config: Config,
        dir: Option<TempDir>,
        schema: Option<PgSchema>,
    ) -> Self {
        let running = threadgate::app::start(&config)
            .await
            .unwrap_or_else(|e| panic!("gateway did not start with {}: {e:#}", config.store));
        Gateway {
            base: format!("http://{}", running.addr),
            http: reqwest::Client::new(),
            running: Some(running),
            nats: config
                .nats_url
                .clone()
                .map(|u| (u, config.nats_prefix.clone())),
            _dir: dir,
            _schema: schema,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Response {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.expect("request reaches the gateway")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.send(Method::POST, path, Some(body)).await
    }

    /// GET that must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert_eq!(res.status(), StatusCode::OK, "GET {path}");
        res.json().await.expect("JSON body")
    }

    /// Creates a thread from `body` and returns the created thread view.
    pub async fn create(&self, body: Value) -> Value {
        let res = self.post("/v1/threads", &body).await;
        let status = res.status();
        let text = res.text().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "create {body}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Appends a delta and returns the version it produced.
    pub async fn append(&self, id: &str, delta: Value) -> u64 {
        let res = self
            .post(&format!("/v1/threads/{}/deltas", enc(id)), &delta)
            .await;
        let status = res.status();
        let text = res.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "append to {id}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["version"].as_u64().expect("version in append answer")
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean shutdown");
        }
        if let Some((url, prefix)) = self.nats.take() {
            drop_streams(&url, &prefix).await;
        }
    }
}

/// Percent-encodes an id for a URL path segment.
pub fn enc(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A minimal assistant-turn delta with one message.
pub fn delta_msg(run: &str, id: Option<&str>, text: &str) -> Value {
    let mut m = serde_json::json!({"role": "assistant", "content": text});
    if let Some(id) = id {
        m["id"] = id.into();
    }
    serde_json::json!({"run_id": run, "reason": "AssistantTurnCommitted", "messages": [m], "patches": []})
}

/// Asserts an RFC 9457 problem answer with the given status and code; returns the body.
pub async fn expect_problem(res: Response, status: StatusCode, code: &str) -> Value {
    let got = res.status();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: Value = res.json().await.expect("problem body is JSON");
    assert_eq!(got, status, "status for {body}");
    assert_eq!(ct, "application/problem+json", "content type for {body}");
    assert_eq!(body["code"], code, "code in {body}");
    assert_eq!(body["status"], status.as_u16());
    body
}

/// Generates one `#[tokio::test]` per backend for an `async fn(Gateway)` case.
#[macro_export]
macro_rules! each_backend {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use $crate::harness::{Backend, Gateway};
                #[tokio::test]
                async fn memory() { super::$case(Gateway::start(Backend::Memory).await).await }
                #[tokio::test]
                async fn file() { super::$case(Gateway::start(Backend::File).await).await }
                #[tokio::test]
                async fn postgres() { super::$case(Gateway::start(Backend::Postgres).await).await }
            }
        )*
    };
}

/// The real `threadgate` binary, started as a user would.
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    /// Every log line the process wrote so far (JSON).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    /// Starts the binary with `args` (plus a free port and JSON logs) and waits until it
    /// listens. Its log keeps draining in the background so it never blocks on a full pipe.
    pub async fn spawn(args: &[&str]) -> Process {
        Self::spawn_in(None, &[], args).await
    }

    /// [`Process::spawn`] in working directory `dir` (relative paths in `args` resolve
    /// there), with extra environment variables.
    pub async fn spawn_in(
        dir: Option<&std::path::Path>,
        env: &[(String, String)],
        args: &[&str],
    ) -> Process {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_threadgate"));
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("threadgate binary starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "threadgate listening" {
                    return v["fields"]["addr"].as_str().unwrap().parse().unwrap();
                }
            }
            panic!("threadgate exited before listening");
        })
        .await
        .expect("threadgate listens within 30 s");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep.lock().unwrap().push(line);
            }
        });
        Process { child, addr, log }
    }

    /// The log lines so far that contain `text`.
    pub fn log_lines_with(&self, text: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .cloned()
            .collect()
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends SIGTERM and asserts a clean exit within 10 s.
    pub async fn terminate(&mut self) {
        let pid = self.child.id().expect("still running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), self.child.wait())
            .await
            .expect("exits within 10 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "clean exit after SIGTERM: {status}");
    }
}

/// The shared NATS server for tests (`THREADGATE_TEST_NATS_URL`, default the local one).
pub fn nats_url() -> String {
    std::env::var("THREADGATE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A stream/subject prefix of a test's own, so tests share one NATS without seeing each other.
pub fn nats_prefix() -> String {
    format!("t{}", uuid::Uuid::now_v7().simple())
}

/// A nats-server of a test's own (for tests that stop it), on a free port with a temp store.
pub struct NatsServer {
    pub port: u16,
    dir: TempDir,
    child: Option<std::process::Child>,
    /// More command-line arguments (a configuration file, cluster routes).
    args: Vec<String>,
}

/// A TCP port on 127.0.0.1 that nothing listens on (right now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_args(Vec::new()).await
    }

    /// Starts with a configuration file holding `conf` (authorization, TLS, ...); the port,
    /// JetStream and its store directory come from the command line.
    pub async fn start_conf(conf: &str) -> NatsServer {
        let mut s = Self::unstarted(Vec::new());
        let path = s.dir.path().join("server.conf");
        std::fs::write(&path, conf).unwrap();
        s.args = vec!["-c".into(), path.display().to_string()];
        s.restart().await;
        s
    }

    /// Starts with more command-line arguments.
    pub async fn start_args(args: Vec<String>) -> NatsServer {
        let mut s = Self::unstarted(args);
        s.restart().await;
        s
    }

    fn unstarted(args: Vec<String>) -> NatsServer {
        NatsServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            args,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and store directory; waits until it accepts.
    pub async fn restart(&mut self) {
        let bin = std::env::var("THREADGATE_TEST_NATS_BIN")
            .unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let child = std::process::Command::new(&bin)
            .args(&self.args)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (set THREADGATE_TEST_NATS_BIN): {e}"));
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("nats-server did not start on port {}", self.port);
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A JetStream cluster of nats-servers of a test's own, joined by routes on loopback; each
/// node can be killed and restarted on its port and store directory.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes named `n1`, `n2`, ... in cluster `tg`.
    pub async fn start(n: usize) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, cport) in cluster_ports.iter().enumerate() {
            let args = vec![
                "--name".into(),
                format!("n{}", i + 1),
                "--cluster_name".into(),
                "tg".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{cport}"),
                "--routes".into(),
                routes.clone(),
            ];
            nodes.push(NatsServer::unstarted(args));
        }
        for node in &mut nodes {
            node.restart().await;
        }
        NatsCluster { nodes }
    }

    /// Every node's URL, comma-separated (the gateway's seed list).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node named `name` (`n1`, ...).
    pub fn node(&mut self, name: &str) -> &mut NatsServer {
        let i: usize = name.trim_start_matches('n').parse().expect("a node name");
        &mut self.nodes[i - 1]
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Gateway {
    /// A gateway in buffered mode on `nats` (URL) with its own prefix, over `backend`.
    pub async fn start_buffered(
        backend: Backend,
        nats: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let nats = nats.to_owned();
        Self::start_with(backend, move |c| {
            c.nats_url = Some(nats);
            c.nats_prefix = nats_prefix();
            tweak(c);
        })
        .await
    }

    /// Keeps the prefix's streams at `stop`: another gateway of the test still uses them.
    pub fn shares_streams(mut self) -> Self {
        self.nats = None;
        self
    }
}

/// Deletes a test prefix's JetStream streams (they would otherwise be kept for days on the
/// shared server). Best effort: another gateway of the same test may still use them, and
/// then the test deletes them when it stops that one.
pub async fn drop_streams(url: &str, prefix: &str) {
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    for suffix in ["log", "dead"] {
        let _ = js.delete_stream(format!("{prefix}_{suffix}")).await;
    }
}
