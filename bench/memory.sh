#!/usr/bin/env bash
# Memory benchmark (buffered mode, PostgreSQL store): a measurement, not a test; it fails only
# when the gateway answers something other than what is measured.
#
#   bench/memory.sh
#
# Builds the gateway and examples/memory_bench.rs in release mode, then measures the gateway
# process's resident set (/proc/<pid>/status):
#   - N threads (100,000) created and given one append each that sets a ~10 KB state value,
#     then idle: RSS after the appends, after the idle time, and the peak, and the CPU the
#     gateway, NATS and PostgreSQL use per minute while idle (BENCH_CPU_SECS), once per
#     --head-cache setting (a bounded cache keeps RSS near its budget plus a fixed overhead;
#     4GiB, more than the working set, shows what an unbounded cache costs);
#   - one thread with 10,000 and 100,000 buffered deltas folded by one POST /flush: peak RSS
#     during the fold (reset just before it), which must not grow with the run's length.
# Prints a markdown table and writes it to bench/results-memory.md.
#
# Knobs (environment):
#   BENCH_NATS_URL (nats://127.0.0.1:4222; streams of its own prefix, deleted afterwards)
#   BENCH_PG_URL   (postgres://postgres@127.0.0.1:5432/test; a fresh schema per gateway)
#   BENCH_THREADS (100000)  BENCH_STATE_BYTES (10000)  BENCH_HEAD_CACHES (16MiB,64MiB,4GiB)
#   BENCH_IDLE_SECS (20)    BENCH_CPU_SECS (60)  BENCH_RUNS (10000,100000)  BENCH_CONCURRENCY (16)
#   BENCH_OUT (bench/results-memory.md)   BENCH_SKIP_BUILD=1 to use the binaries already built.
#   BENCH_THREADGATE_BIN: another gateway binary (e.g. one built from an older commit, with
#   BENCH_HEAD_CACHES=none, which passes no --head-cache flag).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${BENCH_SKIP_BUILD:-}" != 1 ]]; then
    echo "[bench] cargo build --release (threadgate, examples/memory_bench)" >&2
    cargo build --release --quiet --bin threadgate --example memory_bench
fi
BIN=target/release/threadgate
BENCH=target/release/examples/memory_bench
[[ -x $BIN && -x $BENCH ]] || { echo "[bench] release binaries missing" >&2; exit 1; }
export BENCH_THREADGATE_BIN="${BENCH_THREADGATE_BIN:-$PWD/$BIN}"
timeout "${BENCH_TIMEOUT:-3600}" "$BENCH"
