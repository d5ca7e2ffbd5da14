//! Memory benchmark: run by `bench/memory.sh` (which builds it and the gateway in release
//! mode); see that script for the knobs. A measurement, never a test: it fails only when the
//! gateway answers something other than what is measured.
//!
//! The gateway runs as its own process (the release binary) in buffered mode with the
//! PostgreSQL store; its resident set is read from `/proc/<pid>/status`.
//! * **Many threads**: for each `--head-cache` setting, a fresh gateway; N threads are
//!   created and each gets one append that sets a ~10 KB state value; the gateway then idles
//!   (folds every thread, keeps the logs for `--keep-folded`). RSS is sampled after the
//!   appends and after the idle time, and the peak (`VmHWM`) reported. A bounded head cache
//!   holds RSS near its budget plus a fixed overhead whatever N is; a budget larger than the
//!   working set shows what an unbounded cache (the gateway before the bound) costs.
//! * **Long runs**: for each run length, a fresh gateway; one thread gets N buffered deltas
//!   (one ~100 B message each), then one `POST /flush` folds them all. The peak RSS is reset
//!   just before the flush (`/proc/<pid>/clear_refs`), so the reported fold peak is what the
//!   fold itself needed on top of the buffered head.

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use support::{PgSchema, Process, env_or};

#[path = "support/mod.rs"]
mod support;

struct Opts {
    bin: String,
    nats: String,
    pg: String,
    threads: usize,
    state_bytes: usize,
    head_caches: Vec<String>,
    idle: Duration,
    cpu: Duration,
    runs: Vec<usize>,
    concurrency: usize,
    out: String,
}

fn num(name: &str, v: &str) -> Result<usize> {
    v.trim()
        .replace('_', "")
        .parse()
        .with_context(|| format!("{name}: {v:?} is not a number"))
}

fn list(name: &str, default: &str) -> Vec<String> {
    env_or(name, default)
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Opts {
    fn from_env() -> Result<Self> {
        Ok(Opts {
            bin: env_or("BENCH_THREADGATE_BIN", "target/release/threadgate"),
            nats: env_or("BENCH_NATS_URL", "nats://127.0.0.1:4222"),
            pg: env_or("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/test"),
            threads: num("BENCH_THREADS", &env_or("BENCH_THREADS", "100000"))?,
            state_bytes: num("BENCH_STATE_BYTES", &env_or("BENCH_STATE_BYTES", "10000"))?,
            head_caches: list("BENCH_HEAD_CACHES", "16MiB,64MiB,4GiB"),
            idle: Duration::from_secs(
                num("BENCH_IDLE_SECS", &env_or("BENCH_IDLE_SECS", "20"))? as u64
            ),
            cpu: Duration::from_secs(num("BENCH_CPU_SECS", &env_or("BENCH_CPU_SECS", "60"))? as u64),
            runs: list("BENCH_RUNS", "10000,100000")
                .iter()
                .map(|v| num("BENCH_RUNS", v))
                .collect::<Result<_>>()?,
            concurrency: num("BENCH_CONCURRENCY", &env_or("BENCH_CONCURRENCY", "16"))?,
            out: env_or("BENCH_OUT", "bench/results-memory.md"),
        })
    }
}

/// Hang guard for one request (a 100,000-delta flush takes tens of seconds).
const REQUEST_DEADLINE: Duration = Duration::from_secs(600);

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(REQUEST_DEADLINE)
        .build()?)
}

async fn post(http: &reqwest::Client, url: String, body: String) -> Result<Value> {
    support::post(http, &url, body).await
}

async fn drop_streams(nats: &str, prefix: &str) {
    if let Ok(c) = async_nats::connect(nats).await {
        let js = async_nats::jetstream::new(c);
        for s in ["log", "dead", "events"] {
            let _ = js.delete_stream(format!("{prefix}_{s}")).await;
        }
    }
}

/// CPU time (user + system) of every process whose name is `comm` (or of `pid`), in clock
/// ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: Option<u32>, comm: &str) -> u64 {
    let ticks = |pid: &str| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    if let Some(pid) = pid {
        return ticks(&pid.to_string()).unwrap_or(0);
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter_map(|pid| ticks(&pid))
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds per minute used by the gateway, NATS and PostgreSQL while nothing is sent.
struct IdleCpu {
    gateway: f64,
    nats: f64,
    postgres: f64,
}

async fn idle_cpu(gw: &Process, over: Duration) -> IdleCpu {
    let sample = || {
        (
            cpu_ticks(Some(gw.pid), ""),
            cpu_ticks(None, "nats-server"),
            cpu_ticks(None, "postgres"),
        )
    };
    let before = sample();
    tokio::time::sleep(over).await;
    let after = sample();
    let per_minute =
        |a: u64, b: u64| (b.saturating_sub(a)) as f64 / clock_ticks() * 60.0 / over.as_secs_f64();
    IdleCpu {
        gateway: per_minute(before.0, after.0),
        nats: per_minute(before.1, after.1),
        postgres: per_minute(before.2, after.2),
    }
}

struct ManyRow {
    head_cache: String,
    threads: usize,
    took: Duration,
    after_appends: f64,
    after_idle: f64,
    peak: f64,
    cpu: IdleCpu,
}

async fn many_threads(o: &Opts, head_cache: &str) -> Result<ManyRow> {
    let schema = PgSchema::create(&o.pg).await?;
    let prefix = format!("mem{}", uuid::Uuid::now_v7().simple());
    // `none`: no `--head-cache` flag, for a gateway built before the flag existed (its cache
    // was unbounded), so the same harness measures before and after.
    let mut extra = vec!["--fold-idle", "2s"];
    if head_cache != "none" {
        extra.extend(["--head-cache", head_cache]);
    }
    let gw = Process::buffered(&o.bin, &schema.url(), &o.nats, &prefix, &extra).await?;
    let http = client()?;
    let blob = "x".repeat(o.state_bytes);
    let t = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(0..o.threads)
        .map(|i| {
            let (http, base, blob) = (&http, &gw.base, &blob);
            async move {
                let id = format!("t{i}");
                post(http, format!("{base}/v1/threads"), json!({"id": id}).to_string()).await?;
                let delta = json!({"run_id": "r", "reason": "RunFinished", "messages": [],
                    "patches": [{"patch": {"ops": [{"op": "set", "path": ["blob"], "value": blob}]}}]});
                post(
                    http,
                    format!("{base}/v1/threads/{id}/deltas"),
                    delta.to_string(),
                )
                .await?;
                Ok(())
            }
        })
        .buffer_unordered(o.concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let took = t.elapsed();
    let (after_appends, _) = gw.rss()?;
    tokio::time::sleep(o.idle).await;
    let (after_idle, _) = gw.rss()?;
    let cpu = idle_cpu(&gw, o.cpu).await;
    let (_, peak) = gw.rss()?;
    eprintln!(
        "[memory] idle CPU s/min: gateway {:.2}, nats-server {:.2}, postgres {:.2}",
        cpu.gateway, cpu.nats, cpu.postgres
    );
    eprintln!(
        "[memory] head cache {head_cache}: {} threads in {:.1} s, RSS {after_appends:.0} MiB after \
         appends, {after_idle:.0} MiB after {} s idle, peak {peak:.0} MiB",
        o.threads,
        took.as_secs_f64(),
        o.idle.as_secs()
    );
    gw.stop().await;
    schema.drop().await;
    drop_streams(&o.nats, &prefix).await;
    Ok(ManyRow {
        head_cache: head_cache.to_owned(),
        threads: o.threads,
        took,
        after_appends,
        after_idle,
        peak,
        cpu,
    })
}

struct RunRow {
    deltas: usize,
    before_flush: f64,
    fold_peak: f64,
    after: f64,
    flush: Duration,
}

async fn long_run(o: &Opts, n: usize) -> Result<RunRow> {
    let schema = PgSchema::create(&o.pg).await?;
    let prefix = format!("mem{}", uuid::Uuid::now_v7().simple());
    let gw = Process::buffered(
        &o.bin,
        &schema.url(),
        &o.nats,
        &prefix,
        &["--fold-idle", "1h"],
    )
    .await?;
    let http = client()?;
    post(
        &http,
        format!("{}/v1/threads", gw.base),
        r#"{"id":"run"}"#.into(),
    )
    .await?;
    let url = format!("{}/v1/threads/run/deltas", gw.base);
    for i in 0..n {
        let delta = json!({"run_id": "r", "reason": "AssistantTurnCommitted",
            "messages": [{"id": format!("m{i}"), "role": "assistant",
                "content": format!("step {i:>6}: the quick brown fox jumps over the lazy dog, twice over")}],
            "patches": []});
        post(&http, url.clone(), delta.to_string()).await?;
    }
    let (before_flush, _) = gw.rss()?;
    gw.reset_peak()?;
    let t = Instant::now();
    let report = post(
        &http,
        format!("{}/v1/threads/run/flush", gw.base),
        "{}".into(),
    )
    .await?;
    let flush = t.elapsed();
    ensure!(
        report["applied"] == n as u64,
        "flush of {n} deltas answered {report}"
    );
    let (after, fold_peak) = gw.rss()?;
    eprintln!(
        "[memory] {n}-delta run: RSS {before_flush:.0} MiB before the flush, fold peak \
         {fold_peak:.0} MiB, {after:.0} MiB after; flush took {:.1} s",
        flush.as_secs_f64()
    );
    gw.stop().await;
    schema.drop().await;
    drop_streams(&o.nats, &prefix).await;
    Ok(RunRow {
        deltas: n,
        before_flush,
        fold_peak,
        after,
        flush,
    })
}

fn stamp() -> String {
    let sh = |cmd: &str| {
        std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{} · {} · {} cores · commit {}{}",
        sh("date -u '+%Y-%m-%d %H:%M UTC'"),
        sh("uname -sr"),
        sh("nproc"),
        sh("git rev-parse --short HEAD"),
        if sh("git status --porcelain --untracked-files=no").is_empty() {
            ""
        } else {
            " (dirty)"
        }
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Opts::from_env()?;
    let mut out = String::new();
    writeln!(out, "# Memory benchmark\n")?;
    writeln!(out, "`bench/memory.sh` · {}\n", stamp())?;
    writeln!(
        out,
        "Buffered mode, PostgreSQL store, gateway as its own release process; RSS from \
         `/proc/<pid>/status`.\n"
    )?;
    writeln!(
        out,
        "## {} threads, one append each setting a {} B state value, then {} s idle\n",
        o.threads,
        o.state_bytes,
        o.idle.as_secs()
    )?;
    writeln!(
        out,
        "Idle CPU: user + system seconds per minute of the gateway, of every `nats-server` \
         and of every `postgres` process on the machine, over {} s after the idle time \
         (nothing is sent; with `--fold-idle 2s` the sweeper passes every second, and \
         folded logs are kept for `--keep-folded`, 2 min, then trimmed once).\n",
        o.cpu.as_secs()
    )?;
    writeln!(
        out,
        "| `--head-cache` | threads | create+append took | RSS after appends | RSS after idle | peak RSS | idle CPU s/min: gateway / nats-server / postgres |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    for hc in &o.head_caches {
        let r = many_threads(&o, hc).await?;
        writeln!(
            out,
            "| {} | {} | {:.1} s | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.2} / {:.2} / {:.2} |",
            r.head_cache,
            r.threads,
            r.took.as_secs_f64(),
            r.after_appends,
            r.after_idle,
            r.peak,
            r.cpu.gateway,
            r.cpu.nats,
            r.cpu.postgres
        )?;
    }
    writeln!(
        out,
        "\n## One thread, N buffered deltas (~100 B message each), then one flush\n"
    )?;
    writeln!(
        out,
        "| deltas | RSS before the flush | peak RSS during the fold | RSS after | flush took |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|")?;
    for &n in &o.runs {
        let r = long_run(&o, n).await?;
        writeln!(
            out,
            "| {} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.1} s |",
            r.deltas,
            r.before_flush,
            r.fold_peak,
            r.after,
            r.flush.as_secs_f64()
        )?;
    }
    print!("{out}");
    std::fs::write(&o.out, &out).with_context(|| format!("writing {}", o.out))?;
    Ok(())
}
