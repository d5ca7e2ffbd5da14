//! threadgate benchmark harness: `bench/run.sh` builds and runs it.
//!
//! It measures the threadgate release binary (each gateway its own process, on loopback) side
//! by side with the reference crate `tirea-store-adapters` 0.5.0 (`NatsBufferedThreadWriter`
//! over its `PostgresStore`) and with raw JetStream publish + ack (the floor), all on the same
//! NATS and PostgreSQL in one run, then writes `BENCHMARKS.md`, `bench/results.json` and SVG
//! plots under `bench/plots/`. It is a measurement, never a test: it fails only when something
//! answers other than what is measured (a lost delta, a refused append), never on a timing.
//! `--smoke` runs every section with tiny sizes in seconds, so CI keeps it compiling and
//! running without asserting numbers.

mod ceiling;
mod ctx;
mod gw;
mod live;
mod load;
mod reads;
mod reference;
mod report;
mod results;
mod runs;
mod writes;

#[path = "../../../examples/support/mod.rs"]
mod support;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "threadgate benchmark harness (see bench/run.sh)")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure and write the report.
    Run(ctx::RunArgs),
    /// Re-render the report from a results file, without measuring.
    Report {
        /// The results of an earlier run (its `--json`).
        #[arg(long, default_value = "bench/results.json")]
        from: PathBuf,
        #[command(flatten)]
        out: ctx::OutArgs,
    },
    /// The hello-world ceiling: the cheapest axum route (run as a child process).
    ServeHello,
    /// The one-query ceiling: one trivial sqlx query per request (run as a child process).
    ServeQuery {
        /// PostgreSQL to query.
        #[arg(long)]
        pg: String,
    },
    /// The durable-write ceiling: one single-row INSERT (its own committed transaction) per
    /// request (run as a child process).
    ServeInsert {
        /// PostgreSQL to write to (a schema of its own: it creates a table there).
        #[arg(long)]
        pg: String,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match args.cmd {
        Cmd::Run(run) => rt.block_on(ctx::run(run)),
        Cmd::Report { from, out } => {
            let results: results::Results = serde_json::from_slice(
                &std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?,
            )?;
            out.write(&results)
        }
        Cmd::ServeHello => rt.block_on(ceiling::serve_hello()),
        Cmd::ServeQuery { pg } => rt.block_on(ceiling::serve_query(&pg)),
        Cmd::ServeInsert { pg } => rt.block_on(ceiling::serve_insert(&pg)),
    }
}
