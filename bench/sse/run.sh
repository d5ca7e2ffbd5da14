#!/usr/bin/env bash
# Live SSE benchmark (a measurement, not a test: it fails only on lost or duplicated events).
#
#   bench/sse/run.sh [direct|buffered|all]          (default: direct)
#
# Builds the release threadgate binary and the load generator (examples/sse_bench.rs), raises
# the open-file limit, and runs the four scenarios of issue 4 against a spawned gateway on
# loopback (memory store; buffered mode uses the NATS at BENCH_NATS_URL, default
# nats://127.0.0.1:4222, with a fresh prefix that is deleted afterwards). Each scenario is
# bounded (≤ ~30 s). Output goes to stdout; see bench/sse/README.md for what each line means.
#
# Knobs (environment): BENCH_NATS_URL, BENCH_SKIP_BUILD=1 (use the binaries already built).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODE=${1:-direct}
NATS=${BENCH_NATS_URL:-nats://127.0.0.1:4222}

if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    cargo build --release --quiet --bin threadgate --example sse_bench
fi
# Copies, so a concurrent rebuild cannot swap a binary under a running scenario.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cp target/release/threadgate "$TMP/threadgate"
cp target/release/examples/sse_bench "$TMP/sse_bench"

# 10,000 streams need 10,000 descriptors in the gateway and as many in the load generator.
ulimit -n "$(ulimit -Hn)"
if (( $(ulimit -n) < 12000 )); then
    echo "open-file limit $(ulimit -n) is below 12000; the idle scenario will be short of streams" >&2
fi

run() {
    local label=$1; shift
    echo "== $label"
    "$TMP/sse_bench" --bin "$TMP/threadgate" "$@"
    echo
}

scenarios() {
    local -a mode=("$@")
    run "idle: 10,000 subscribers on 1,000 threads ${mode[*]}" "${mode[@]}" idle --subscribers 10000 --threads 1000
    run "fanout: 1,000 subscribers on one thread, 20 appends/s for 10 s ${mode[*]}" "${mode[@]}" fanout --subscribers 1000 --rate 20 --duration 10s
    run "many: 1,000 threads x 5 subscribers, 500 appends/s for 20 s ${mode[*]}" "${mode[@]}" many --threads 1000 --per-thread 5 --rate 500 --duration 20s
    run "storm: 5,000 clients on 50 threads resume with Last-Event-ID within 10 s, 200 appends/s ${mode[*]}" "${mode[@]}" storm --clients 5000 --threads 50 --rate 200 --window 10s
}

case "$MODE" in
    direct) scenarios ;;
    buffered) scenarios --nats-url "$NATS" ;;
    all) scenarios; scenarios --nats-url "$NATS" ;;
    *) echo "usage: $0 [direct|buffered|all]" >&2; exit 2 ;;
esac
