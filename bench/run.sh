#!/usr/bin/env bash
# The whole benchmark harness in one command: writes BENCHMARKS.md, bench/results.json and the
# SVG plots in bench/plots/ (a measurement, not a test: it fails only when something answers
# other than what is measured, never on a timing).
#
#   bench/run.sh            full run (about 20 minutes on 2 cores, after the builds)
#   bench/run.sh --smoke    every section with tiny sizes, in well under a minute (CI runs this;
#                           its numbers mean nothing, and it writes under target/bench-smoke/)
#   bench/run.sh --only writes,runs      some sections only (writes, runs, recovery, reads,
#                           live, idle, growth)
#
# Builds the gateway (release; debug with --smoke) and the harness in bench/harness/ (its own
# crate: it depends on the reference crate tirea-store-adapters 0.5.0 and on plotters, which
# the gateway never does), then runs `threadgate-bench run`. Needs NATS with JetStream and
# PostgreSQL: BENCH_NATS_URL (nats://127.0.0.1:4222) and BENCH_PG_URL
# (postgres://postgres@127.0.0.1:5432/test); every gateway gets a fresh schema and stream
# prefix, all deleted afterwards. BENCH_SKIP_BUILD=1 uses the binaries already built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[bench] %s\n' "$*" >&2; }

smoke=0
for a in "$@"; do [[ $a == --smoke ]] && smoke=1; done

if [[ $smoke == 1 ]]; then
    profile=debug
    out=(--md target/bench-smoke/BENCHMARKS.md --json target/bench-smoke/results.json
         --plots target/bench-smoke/plots --plot-link plots)
    build_flags=()
else
    profile=release
    out=()
    build_flags=(--release)
fi

if [[ "${BENCH_SKIP_BUILD:-}" != 1 ]]; then
    log "cargo build ${build_flags[*]} --bin threadgate"
    cargo build "${build_flags[@]}" --quiet --bin threadgate
    log "cargo build ${build_flags[*]} (bench/harness)"
    cargo build "${build_flags[@]}" --quiet --manifest-path bench/harness/Cargo.toml
fi

# Tens of thousands of event streams need as many descriptors on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec timeout "${BENCH_TIMEOUT:-3600}" "bench/harness/target/$profile/threadgate-bench" run \
    --bin "target/$profile/threadgate" "${out[@]}" "$@"
