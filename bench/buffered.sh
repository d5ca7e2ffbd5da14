#!/usr/bin/env bash
# Buffered-mode benchmark (NATS JetStream + snapshot store): a measurement, not a test; it
# fails only when the gateway answers something other than what is measured.
#
#   bench/buffered.sh
#
# Builds the gateway and examples/buffered_bench.rs in release mode, then runs the bench,
# which starts the gateway binary as its own process on loopback and measures, in one run:
#   - raw JetStream publish + ack of the payload the gateway publishes for a delta, with
#     async-nats directly (plain, and with the gateway's headers + compare-and-set);
#   - HTTP append p50/p99 in buffered mode, memory store and PostgreSQL store
#     (target: p50 at most 2x raw);
#   - RunFinished latency p50/p99 for runs of 1, 10, 100 and 1,000 deltas with PostgreSQL
#     (target: p50 <= 20 ms for 100 deltas);
#   - fold throughput: N deltas buffered, then one POST /flush timed (memory and PostgreSQL).
# Prints a markdown table and writes it to bench/results-buffered.md.
#
# Knobs (environment):
#   BENCH_NATS_URL   (nats://127.0.0.1:4222; the bench uses streams of its own prefix and
#                    deletes them afterwards)
#   BENCH_PG_URL     (postgres://postgres@127.0.0.1:5432/test; a fresh schema is created in
#                    it and dropped afterwards)
#   BENCH_APPENDS    (5000: measured appends and raw publishes per series)
#   BENCH_WARMUP     (300)
#   BENCH_RUN_REPS   (30: runs per RunFinished size; a third of that for 1,000-delta runs)
#   BENCH_FOLD_N     (20000: deltas buffered before the timed flush; 100000 works too)
#   BENCH_OUT        (bench/results-buffered.md)
#   BENCH_SKIP_BUILD=1 to use the binaries already built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[bench] %s\n' "$*" >&2; }

if [[ "${BENCH_SKIP_BUILD:-}" != 1 ]]; then
    log "cargo build --release (threadgate, examples/buffered_bench)"
    cargo build --release --quiet --bin threadgate --example buffered_bench
fi
BIN=target/release/threadgate
BENCH=target/release/examples/buffered_bench
[[ -x $BIN && -x $BENCH ]] || { log "release binaries missing (run without BENCH_SKIP_BUILD)"; exit 1; }

export BENCH_THREADGATE_BIN="$PWD/$BIN"
# A bounded run: a hung service must not hang the bench forever.
timeout "${BENCH_TIMEOUT:-900}" "$BENCH"
