//! Closed-loop load: `writers` tasks each issue one operation after another for a fixed
//! time; every operation's latency is kept, so p50/p99 and throughput come from one run.

use anyhow::Result;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Latencies and throughput of one measured series.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Operations completed in the measured window.
    pub n: usize,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Operations per second over the window.
    pub rate: f64,
}

impl Stats {
    /// Stats of `samples` collected over `window`.
    pub fn of(mut samples: Vec<Duration>, window: Duration) -> Self {
        samples.sort();
        Stats {
            n: samples.len(),
            p50: pct(&samples, 50.0),
            p99: pct(&samples, 99.0),
            rate: samples.len() as f64 / window.as_secs_f64().max(1e-9),
        }
    }
}

/// Percentile of sorted samples (nearest rank).
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `op(writer, i)` from `writers` concurrent tasks: unmeasured for `warmup`, then
/// measured for `window`. The first error ends the run with that error.
pub async fn closed_loop<F, Fut>(
    writers: usize,
    warmup: Duration,
    window: Duration,
    op: F,
) -> Result<Stats>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now() + warmup;
    let end = start + window;
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut i = 0;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                op(w, i).await?;
                i += 1;
                if t >= start {
                    samples.push(t.elapsed());
                }
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Stats::of(all, window))
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Milliseconds as a plot value.
pub fn msf(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A count with thousands separators.
pub fn count(n: f64) -> String {
    let s = format!("{:.0}", n);
    let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}
