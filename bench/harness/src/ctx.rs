//! What every section shares: the options, the services (NATS, PostgreSQL) and the sizes of
//! a full run or a smoke run; and the driver that runs the sections and writes the report.

use crate::results::{Meta, Results, Section};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `harness run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Tiny sizes and windows: checks the harness end to end in seconds; numbers mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// The threadgate binary to measure.
    #[arg(long, default_value = "target/release/threadgate")]
    pub bin: String,
    /// NATS with JetStream (the harness uses streams of its own prefix, plus the reference
    /// crate's fixed `THREAD_DELTAS` stream, and deletes them afterwards).
    #[arg(long, env = "BENCH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// PostgreSQL database: every gateway and the reference crate get a fresh schema in it.
    #[arg(
        long,
        env = "BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub pg: String,
    /// Run only these sections (comma-separated ids): writes, runs, recovery, reads, live,
    /// idle, growth.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    #[command(flatten)]
    pub out: OutArgs,
}

/// Where the report goes.
#[derive(clap::Args)]
pub struct OutArgs {
    /// The markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub md: PathBuf,
    /// The results as JSON (re-render with `harness report`).
    #[arg(long, default_value = "bench/results.json")]
    pub json: PathBuf,
    /// The SVG plots' directory.
    #[arg(long, default_value = "bench/plots")]
    pub plots: PathBuf,
    /// How the markdown links to the plots' directory.
    #[arg(long, default_value = "bench/plots")]
    pub plot_link: String,
}

impl OutArgs {
    /// Writes the JSON, the markdown and the plots.
    pub fn write(&self, results: &Results) -> Result<()> {
        if let Some(dir) = self.json.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.json, serde_json::to_vec_pretty(results)?)?;
        crate::report::write(results, &self.md, &self.plots, &self.plot_link)
    }
}

/// The run's shared state.
pub struct Ctx {
    /// The gateway binary.
    pub bin: String,
    /// NATS URL.
    pub nats: String,
    /// PostgreSQL base URL.
    pub pg: String,
    /// Smoke sizes.
    pub smoke: bool,
    /// A prefix unique to this run (streams, schemas).
    pub prefix: String,
    /// JetStream (async-nats 0.38, the reference crate's version).
    pub js: async_nats::jetstream::Context,
}

impl Ctx {
    /// `full` in a full run, `smoke` in a smoke run.
    pub fn pick<T>(&self, full: T, smoke: T) -> T {
        if self.smoke { smoke } else { full }
    }

    /// Warm-up before a measured window.
    pub fn warmup(&self) -> Duration {
        self.pick(Duration::from_secs(1), Duration::from_millis(100))
    }

    /// A measured window of closed-loop load.
    pub fn window(&self) -> Duration {
        self.pick(Duration::from_secs(5), Duration::from_millis(300))
    }

    /// A fresh unique name under this run's prefix.
    pub fn unique(&self, what: &str) -> String {
        format!("{}{what}{}", self.prefix, uuid::Uuid::now_v7().simple())
    }
}

/// One section: its id and how to measure it.
type Measure =
    for<'a> fn(
        &'a Ctx,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Section>> + 'a>>;

/// Every section, in report order.
fn sections() -> Vec<(&'static str, Measure)> {
    vec![
        ("writes", |c| Box::pin(crate::writes::appends(c))),
        ("runs", |c| Box::pin(crate::runs::run_finished(c))),
        ("recovery", |c| Box::pin(crate::runs::recovery(c))),
        ("reads", |c| Box::pin(crate::reads::reads(c))),
        ("live", |c| Box::pin(crate::live::fanout(c))),
        ("idle", |c| Box::pin(crate::live::idle(c))),
        ("growth", |c| Box::pin(crate::writes::growth(c))),
    ]
}

/// `harness run`: every (selected) section, then the report.
pub async fn run(args: RunArgs) -> Result<()> {
    raise_file_limit();
    let nc = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("NATS at {}", args.nats))?;
    let nats_version = nc.server_info().version.clone();
    let ctx = Ctx {
        bin: args.bin.clone(),
        nats: args.nats.clone(),
        pg: args.pg.clone(),
        smoke: args.smoke,
        prefix: format!("hb{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
        js: async_nats::jetstream::new(nc),
    };
    let meta = meta(&ctx, &nats_version).await;
    let mut results = Results {
        meta,
        sections: Vec::new(),
    };
    let mut failed = Vec::new();
    for (id, measure) in sections() {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == id) {
            continue;
        }
        eprintln!("[bench] section {id}");
        let started = std::time::Instant::now();
        match measure(&ctx).await {
            Ok(section) => results.sections.push(section),
            Err(e) => {
                eprintln!("[bench] section {id} failed: {e:#}");
                failed.push(format!("{id}: {e:#}"));
            }
        }
        eprintln!(
            "[bench] section {id} took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        cleanup(&ctx).await;
    }
    args.out.write(&results)?;
    eprintln!("[bench] wrote {}", args.out.md.display());
    anyhow::ensure!(failed.is_empty(), "sections failed: {}", failed.join("; "));
    Ok(())
}

/// Deletes the streams this run created (the reference crate's fixed stream included).
pub async fn cleanup(ctx: &Ctx) {
    let _ = ctx.js.delete_stream(crate::reference::STREAM).await;
    let Ok(names) = stream_names(ctx).await else {
        return;
    };
    for name in names.into_iter().filter(|n| n.starts_with(&ctx.prefix)) {
        let _ = ctx.js.delete_stream(&name).await;
    }
}

async fn stream_names(ctx: &Ctx) -> Result<Vec<String>> {
    use futures::TryStreamExt;
    Ok(ctx.js.stream_names().try_collect().await?)
}

/// Many connections need many descriptors: raise the soft limit to the hard one, and the hard
/// one too when allowed (root); children (gateways) inherit it.
fn raise_file_limit() {
    const WANT: u64 = 200_000;
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, WANT, WANT);
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard.min(WANT), hard);
    }
}

/// The stamp: date, commit, machine and versions.
async fn meta(ctx: &Ctx, nats_version: &str) -> Meta {
    let sh = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mut versions = BTreeMap::new();
    versions.insert("threadgate".into(), sh(&ctx.bin, &["--version"]));
    versions.insert("rustc".into(), sh("rustc", &["--version"]));
    versions.insert("nats-server".into(), nats_version.to_owned());
    versions.insert("PostgreSQL".into(), pg_version(&ctx.pg).await);
    versions.insert(
        "reference".into(),
        "tirea-store-adapters 0.5.0 (NatsBufferedThreadWriter over PostgresStore), async-nats 0.38"
            .into(),
    );
    versions.insert("kernel".into(), sh("uname", &["-sr"]));
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    versions.insert("memory".into(), mem);
    Meta {
        date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: sh(
            "git",
            &["describe", "--always", "--dirty", "--exclude", "*"],
        ),
        machine,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        versions,
        smoke: ctx.smoke,
        command: if ctx.smoke {
            "bench/run.sh --smoke".into()
        } else {
            "bench/run.sh".into()
        },
    }
}

async fn pg_version(base: &str) -> String {
    use sqlx::Connection;
    async {
        let mut conn = sqlx::PgConnection::connect(base).await.ok()?;
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&mut conn)
            .await
            .ok()
    }
    .await
    .unwrap_or_else(|| "?".into())
}
