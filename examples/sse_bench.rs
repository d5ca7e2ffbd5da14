//! Load generator for the live SSE stream (a measurement, not a test: it never fails on
//! numbers, only on lost or duplicated events). See `bench/sse/README.md`.
//!
//! Spawns the release `threadgate` binary (memory store; `--nats-url` for buffered mode), opens
//! SSE streams with reqwest over loopback and reports one scenario:
//!
//! * `idle`   — N idle subscribers: the gateway's RSS per connection (`/proc/<pid>/status`),
//!   then one append per thread to check every stream still delivers.
//! * `fanout` — N subscribers on one thread: append→delivery latency p50/p99.
//! * `many`   — T threads × S subscribers with appends at R/s: delivered events/s, latency.
//! * `storm`  — C clients on T threads drop at once and resume with `Last-Event-ID`, spread
//!   over a window, while appends go on: lost/duplicated events (by version), catch-up time.
//!
//! Every subscriber checks that the versions it receives are exactly 1, 2, 3, … (across
//! reconnects), so each scenario also reports gaps and duplicates.

use clap::{Parser, Subcommand};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
struct Args {
    /// The threadgate binary to measure.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/threadgate"))]
    bin: String,
    /// Buffered mode on this NATS (a fresh prefix per run); direct mode when absent.
    #[arg(long)]
    nats_url: Option<String>,
    /// Snapshot store of the gateway.
    #[arg(long, default_value = "memory:")]
    store: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    Idle {
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        #[arg(long, default_value_t = 1_000)]
        threads: usize,
    },
    Fanout {
        #[arg(long, default_value_t = 1_000)]
        subscribers: usize,
        /// Appends per second to the one thread.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    Many {
        #[arg(long, default_value_t = 1_000)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        per_thread: usize,
        /// Appends per second over all threads.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    Storm {
        #[arg(long, default_value_t = 5_000)]
        clients: usize,
        #[arg(long, default_value_t = 50)]
        threads: usize,
        /// Appends per second over all threads, throughout.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Reconnects are spread uniformly over this window.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        window: Duration,
    },
}

// ---------------------------------------------------------------------------------------
// The gateway process.

struct Gateway {
    child: tokio::process::Child,
    base: String,
    pid: u32,
}

impl Gateway {
    async fn spawn(args: &Args) -> Gateway {
        let mut cmd = tokio::process::Command::new(&args.bin);
        cmd.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--store", &args.store])
            .env("RUST_LOG", "warn,threadgate::app=info")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(url) = &args.nats_url {
            let prefix = format!("bench{}", std::process::id());
            cmd.args(["--nats-url", url, "--nats-prefix", &prefix]);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (cargo build --release): {e}", args.bin));
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "threadgate listening" {
                    return v["fields"]["addr"].as_str().unwrap().to_owned();
                }
            }
            panic!("threadgate exited before listening");
        })
        .await
        .expect("threadgate listens within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Gateway {
            child,
            base: format!("http://{addr}"),
            pid,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

async fn create_threads(base: &str, n: usize) -> Vec<String> {
    let client = http();
    let ids: Vec<String> = (0..n).map(|i| format!("bench-{i}")).collect();
    futures::stream::iter(ids.clone())
        .for_each_concurrent(32, |id| {
            let client = client.clone();
            async move {
                let res = client
                    .post(format!("{base}/v1/threads"))
                    .json(&serde_json::json!({"id": id}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201, "create {id}");
            }
        })
        .await;
    ids
}

// ---------------------------------------------------------------------------------------
// Appends: each thread is appended by its own task, so its versions are 1, 2, 3, … and the
// send time of every version is known.

struct Appends {
    base: String,
    ids: Vec<String>,
    /// Per thread: the last version appended.
    versions: Vec<AtomicU64>,
    /// Per thread, per version: nanoseconds since `t0` just before the POST was sent.
    sent: Vec<Vec<AtomicU64>>,
    t0: Instant,
    failures: AtomicU64,
}

impl Appends {
    fn new(base: &str, ids: Vec<String>, max_per_thread: usize, t0: Instant) -> Arc<Self> {
        Arc::new(Appends {
            base: base.to_owned(),
            versions: ids.iter().map(|_| AtomicU64::new(0)).collect(),
            sent: ids
                .iter()
                .map(|_| (0..=max_per_thread).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            ids,
            t0,
            failures: AtomicU64::new(0),
        })
    }

    /// Appends at `rate` per second over all threads until `stop`.
    fn run(
        self: &Arc<Self>,
        rate: f64,
        stop: tokio_util::sync::CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let per_thread = Duration::from_secs_f64(self.ids.len() as f64 / rate);
        let client = http();
        (0..self.ids.len())
            .map(|t| {
                let (me, stop, client) = (self.clone(), stop.clone(), client.clone());
                tokio::spawn(async move {
                    // Spread the threads' phases over one period.
                    let offset = per_thread.mul_f64(t as f64 / me.ids.len() as f64);
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, per_thread);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tick.tick() => me.append(&client, t).await,
                        }
                    }
                })
            })
            .collect()
    }

    async fn append(&self, client: &reqwest::Client, t: usize) {
        let v = self.versions[t].load(Ordering::Relaxed) + 1;
        if v as usize >= self.sent[t].len() {
            return;
        }
        let body = serde_json::json!({"run_id": "bench", "reason": "AssistantTurnCommitted",
            "messages": [{"role": "assistant", "content": format!("step {v} of a benchmark run")}],
            "patches": []});
        self.sent[t][v as usize].store(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let res = client
            .post(format!("{}/v1/threads/{}/deltas", self.base, self.ids[t]))
            .json(&body)
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 200 => {
                let got: serde_json::Value = r.json().await.unwrap();
                assert_eq!(
                    got["version"], v,
                    "only this task appends to {}",
                    self.ids[t]
                );
                self.versions[t].store(v, Ordering::Relaxed);
            }
            _ => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn total(&self) -> u64 {
        self.versions
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .sum()
    }
}

// ---------------------------------------------------------------------------------------
// Subscribers.

#[derive(Default)]
struct Seen {
    /// (version, nanoseconds since t0 when the frame was parsed)
    deliveries: Vec<(u64, u64)>,
    last: u64,
    gaps: u64,
    duplicates: u64,
    resets: u64,
}

impl Seen {
    fn record(&mut self, version: u64, at: u64) {
        if version <= self.last {
            self.duplicates += 1;
            return;
        }
        if version != self.last + 1 {
            self.gaps += version - self.last - 1;
        }
        self.last = version;
        self.deliveries.push((version, at));
    }
}

/// Opens a stream; `Err` when the request fails (e.g. out of file descriptors).
async fn open(
    client: &reqwest::Client,
    url: &str,
    last_event_id: Option<u64>,
) -> Result<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>, String> {
    let mut req = client.get(url);
    if let Some(l) = last_event_id {
        req = req.header("last-event-id", l.to_string());
    }
    let res = req.send().await.map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("status {}", res.status()));
    }
    Ok(res.bytes_stream().boxed())
}

/// Reads frames until `until` says stop (checked after each frame) or the stream ends.
async fn read(
    body: &mut futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: &mut Vec<u8>,
    seen: &mut Seen,
    t0: Instant,
    mut until: impl FnMut(&Seen) -> bool,
) -> bool {
    loop {
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let at = t0.elapsed().as_nanos() as u64;
            let block: Vec<u8> = buf.drain(..pos + 2).collect();
            let mut id = None;
            let mut event = "";
            let text = std::str::from_utf8(&block).unwrap_or("");
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse::<u64>().ok();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = v;
                }
            }
            match (event, id) {
                ("reset", _) => seen.resets += 1,
                (_, Some(v)) => seen.record(v, at),
                _ => {}
            }
            if until(seen) {
                return true;
            }
        }
        match body.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            _ => return false,
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

fn latency_report(appends: &Appends, thread_of: &[usize], seen: &[Seen]) -> (usize, String) {
    let mut lat: Vec<u64> = Vec::new();
    for (s, &t) in seen.iter().zip(thread_of) {
        for &(v, at) in &s.deliveries {
            let sent = appends.sent[t][v as usize].load(Ordering::Relaxed);
            if sent > 0 {
                lat.push(at.saturating_sub(sent));
            }
        }
    }
    lat.sort_unstable();
    let n = lat.len();
    (
        n,
        format!(
            "append→delivery latency over {n} deliveries: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0)
        ),
    )
}

fn integrity(seen: &[Seen], thread_of: &[usize], appends: &Appends) -> String {
    let gaps: u64 = seen.iter().map(|s| s.gaps).sum();
    let dups: u64 = seen.iter().map(|s| s.duplicates).sum();
    let resets: u64 = seen.iter().map(|s| s.resets).sum();
    let short: usize = seen
        .iter()
        .zip(thread_of)
        .filter(|(s, t)| s.last != appends.versions[**t].load(Ordering::Relaxed))
        .count();
    format!(
        "integrity: {gaps} lost, {dups} duplicated, {resets} resets, {short} subscribers not at the final version"
    )
}

// ---------------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mode = if args.nats_url.is_some() {
        "buffered"
    } else {
        "direct"
    };
    let gw = Gateway::spawn(&args).await;
    println!(
        "gateway {} ({mode} mode, store {}), pid {}",
        gw.base, args.store, gw.pid
    );
    match &args.scenario {
        Scenario::Idle {
            subscribers,
            threads,
        } => idle(&gw, *subscribers, *threads).await,
        Scenario::Fanout {
            subscribers,
            rate,
            duration,
        } => many(&gw, 1, *subscribers, *rate, *duration).await,
        Scenario::Many {
            threads,
            per_thread,
            rate,
            duration,
        } => many(&gw, *threads, *per_thread, *rate, *duration).await,
        Scenario::Storm {
            clients,
            threads,
            rate,
            window,
        } => storm(&gw, *clients, *threads, *rate, *window).await,
    }
    let metrics = http()
        .get(format!("{}/metrics", gw.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let live: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("threadgate_sse_"))
        .collect();
    println!("gateway metrics: {}", live.join(", "));
    gw.stop().await;
    if let Some(url) = &args.nats_url {
        // Leave the shared NATS as it was.
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let prefix = format!("bench{}", std::process::id());
        for s in ["log", "dead"] {
            let _ = js.delete_stream(format!("{prefix}_{s}")).await;
        }
    }
}

async fn idle(gw: &Gateway, subscribers: usize, threads: usize) {
    let ids = create_threads(&gw.base, threads).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = gw.rss_kib();
    let t0 = Instant::now();
    let appends = Appends::new(&gw.base, ids.clone(), 4, t0);
    let client = http();
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let thread_of: Vec<usize> = (0..subscribers).map(|i| i % threads).collect();
    for &t in &thread_of {
        let (client, connected, failed) = (client.clone(), connected.clone(), failed.clone());
        let url = format!("{}/v1/threads/{}/events?after=0", gw.base, ids[t]);
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            match open(&client, &url, None).await {
                Ok(mut body) => {
                    connected.fetch_add(1, Ordering::Relaxed);
                    let mut buf = Vec::new();
                    read(&mut body, &mut buf, &mut seen, t0, |s| s.last >= 1).await;
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen
        }));
        // Pace the connects a little so the accept queue never overflows.
        if tasks.len() % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < subscribers {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_time = start.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = gw.rss_kib();
    let n = connected.load(Ordering::Relaxed);
    println!(
        "idle: {n} streams open ({} failed) in {:.1} s; gateway RSS {:.1} MiB before, {:.1} MiB with the streams: {:.1} KiB per stream",
        failed.load(Ordering::Relaxed),
        connect_time.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / n.max(1) as f64
    );
    // Every stream still delivers: one append per thread.
    let c = http();
    futures::stream::iter(0..threads)
        .for_each_concurrent(32, |t| {
            let (appends, c) = (appends.clone(), c.clone());
            async move { appends.append(&c, t).await }
        })
        .await;
    let mut seen = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(s)) => seen.push(s),
            _ => seen.push(Seen::default()),
        }
    }
    let delivered = seen.iter().filter(|s| s.last >= 1).count();
    println!("idle: after one append per thread, {delivered} of {n} streams delivered it");
    println!("{}", latency_report(&appends, &thread_of, &seen).1);
}

async fn many(gw: &Gateway, threads: usize, per_thread: usize, rate: f64, duration: Duration) {
    let ids = create_threads(&gw.base, threads).await;
    let t0 = Instant::now();
    let max = (rate * duration.as_secs_f64() / threads as f64 * 1.5) as usize + 16;
    let appends = Appends::new(&gw.base, ids.clone(), max, t0);
    let client = http();
    let subscribers = threads * per_thread;
    let thread_of: Vec<usize> = (0..subscribers).map(|i| i % threads).collect();
    let connected = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for &t in &thread_of {
        let (client, connected, done, appends) = (
            client.clone(),
            connected.clone(),
            done.clone(),
            appends.clone(),
        );
        let url = format!("{}/v1/threads/{}/events?after=0", gw.base, ids[t]);
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut body = open(&client, &url, None).await.expect("stream opens");
            connected.fetch_add(1, Ordering::Relaxed);
            let mut buf = Vec::new();
            let target = move |s: &Seen| {
                done.load(Ordering::Relaxed)
                    && s.last >= appends.versions[t].load(Ordering::Relaxed)
            };
            let mut target = target;
            loop {
                // Wake up now and then to notice the end even when idle.
                let r = tokio::time::timeout(
                    Duration::from_millis(500),
                    read(&mut body, &mut buf, &mut seen, t0, &mut target),
                )
                .await;
                match r {
                    Ok(_) => break,
                    Err(_) if target(&seen) => break,
                    Err(_) => {}
                }
            }
            seen
        }));
    }
    while connected.load(Ordering::Relaxed) < subscribers {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{subscribers} subscribers on {threads} thread(s); appending {rate}/s for {:.0} s",
        duration.as_secs_f64()
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let start = Instant::now();
    let writers = appends.run(rate, stop.clone());
    tokio::time::sleep(duration).await;
    stop.cancel();
    for w in writers {
        let _ = w.await;
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("subscribers catch up")
                .unwrap(),
        );
    }
    let (n, lat) = latency_report(&appends, &thread_of, &seen);
    println!(
        "appended {} deltas ({} failed) in {:.1} s = {:.0}/s; delivered {n} events = {:.0} events/s",
        appends.total(),
        appends.failures.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        appends.total() as f64 / elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!("{lat}");
    println!("{}", integrity(&seen, &thread_of, &appends));
    println!(
        "gateway RSS at the end: {:.1} MiB",
        gw.rss_kib() as f64 / 1024.0
    );
}

async fn storm(gw: &Gateway, clients: usize, threads: usize, rate: f64, window: Duration) {
    let ids = create_threads(&gw.base, threads).await;
    let t0 = Instant::now();
    let warmup = Duration::from_secs(3);
    let settle = Duration::from_secs(3);
    let total = warmup + window + settle;
    let max = (rate * total.as_secs_f64() / threads as f64 * 1.5) as usize + 16;
    let appends = Appends::new(&gw.base, ids.clone(), max, t0);
    let client = http();
    let thread_of: Vec<usize> = (0..clients).map(|i| i % threads).collect();
    let connected = Arc::new(AtomicUsize::new(0));
    let storm_flag = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, &t) in thread_of.iter().enumerate() {
        let (client, connected, storm_flag, done, appends) = (
            client.clone(),
            connected.clone(),
            storm_flag.clone(),
            done.clone(),
            appends.clone(),
        );
        let url = format!("{}/v1/threads/{}/events?after=0", gw.base, ids[t]);
        // Each client's reconnect time within the window (deterministic spread).
        let delay = window.mul_f64(((i * 7919) % clients) as f64 / clients as f64);
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut buf = Vec::new();
            let mut body = open(&client, &url, None).await.expect("stream opens");
            connected.fetch_add(1, Ordering::Relaxed);
            // Phase 1: follow until the storm.
            loop {
                let r = tokio::time::timeout(
                    Duration::from_millis(200),
                    read(&mut body, &mut buf, &mut seen, t0, |_| {
                        storm_flag.load(Ordering::Relaxed)
                    }),
                )
                .await;
                if storm_flag.load(Ordering::Relaxed) || matches!(r, Ok(false)) {
                    break;
                }
            }
            drop(body); // the connection drops (everyone at once)…
            buf.clear(); // …and with it whatever was half received
            tokio::time::sleep(delay).await;
            let reconnect_at = Instant::now();
            let head = appends.versions[t].load(Ordering::Relaxed);
            let missed = head.saturating_sub(seen.last);
            let mut body = loop {
                match open(&client, &url, Some(seen.last)).await {
                    Ok(b) => break b,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let mut caught_up = if seen.last >= head {
                Some(reconnect_at.elapsed())
            } else {
                None
            };
            let mut target = |s: &Seen| {
                if caught_up.is_none() && s.last >= head {
                    caught_up = Some(reconnect_at.elapsed());
                }
                done.load(Ordering::Relaxed)
                    && s.last >= appends.versions[t].load(Ordering::Relaxed)
            };
            loop {
                let r = tokio::time::timeout(
                    Duration::from_millis(500),
                    read(&mut body, &mut buf, &mut seen, t0, &mut target),
                )
                .await;
                match r {
                    Ok(_) => break,
                    Err(_) if target(&seen) => break,
                    Err(_) => {}
                }
            }
            (seen, missed, caught_up.unwrap_or(Duration::MAX))
        }));
    }
    while connected.load(Ordering::Relaxed) < clients {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{clients} clients on {threads} threads; appends at {rate}/s; storm after {:.0} s, reconnects spread over {:.0} s",
        warmup.as_secs_f64(),
        window.as_secs_f64()
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let writers = appends.run(rate, stop.clone());
    tokio::time::sleep(warmup).await;
    let storm_start = Instant::now();
    storm_flag.store(true, Ordering::Relaxed);
    tokio::time::sleep(window + settle).await;
    stop.cancel();
    for w in writers {
        let _ = w.await;
    }
    done.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    let mut missed = Vec::new();
    let mut catch_up = Vec::new();
    for task in tasks {
        let (s, m, c) = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("clients finish")
            .unwrap();
        seen.push(s);
        missed.push(m);
        catch_up.push(c.as_nanos().min(u64::MAX as u128) as u64);
    }
    let _ = storm_start;
    let last_delivery = seen
        .iter()
        .filter_map(|s| s.deliveries.last().map(|d| d.1))
        .max()
        .unwrap_or(0);
    let last_sent = appends
        .sent
        .iter()
        .flat_map(|v| v.iter().map(|a| a.load(Ordering::Relaxed)))
        .max()
        .unwrap_or(0);
    let all_done = last_delivery.saturating_sub(last_sent) as f64 / 1e6;
    catch_up.sort_unstable();
    let missed_total: u64 = missed.iter().sum();
    println!(
        "appended {} deltas ({} failed); clients missed {missed_total} events while disconnected (all replayed on resume)",
        appends.total(),
        appends.failures.load(Ordering::Relaxed)
    );
    println!(
        "catch-up after reconnect (request sent → the head at reconnect time received): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the last append reached all {clients} clients {:.1} ms after it was sent",
        percentile(&catch_up, 0.5),
        percentile(&catch_up, 0.99),
        percentile(&catch_up, 1.0),
        all_done
    );
    println!("{}", integrity(&seen, &thread_of, &appends));
    println!(
        "({}; it includes the time the clients were disconnected)",
        latency_report(&appends, &thread_of, &seen).1
    );
}
