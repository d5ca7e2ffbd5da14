#!/usr/bin/env bash
# HTTP benchmark of the threadgate binary (a measurement, not a test: it never fails on numbers).
#
#   bench/http.sh
#
# Builds release binaries (threadgate and the axum hello-world baseline in bench/hello/), runs
# each scenario with wrk on loopback, prints a markdown table and writes it to
# bench/results-http.md. Scenarios:
#   baseline   axum hello world, GET /
#   memory     GET of a 50-message thread; the same GET with If-None-Match (304);
#              POST /deltas (one message each) to a thread that starts empty
#   postgres   the same three, plus POST /deltas to a thread that starts with 10,000 messages
# Every POST appends a message, so the "empty" thread grows during its run; the table says
# how large each append thread ended up.
#
# Knobs (environment): BENCH_DURATION (10s), BENCH_CONNECTIONS (64), BENCH_THREADS (2: wrk
# threads), BENCH_PG_URL (postgres://postgres@127.0.0.1:5432/test; a fresh schema is created
# in it and dropped afterwards), BENCH_SKIP_BUILD=1 (use the binaries already built),
# BENCH_THREADGATE_BIN (measure this threadgate binary instead of building target/release's).
# Needs: cargo, curl, psql, wrk (installed with apt-get when missing and running as root).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10s}
CONNS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
PG_BASE=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
OUT=bench/results-http.md
LUA=$ROOT/bench/wrk.lua

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# ---- tools -----------------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || die "wrk is not installed (apt-get install wrk)"
    log "installing wrk"
    { apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }; } >/dev/null \
        || die "could not install wrk"
fi
for tool in curl psql python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

# ---- state and cleanup -----------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/threadgate-bench.XXXXXX")
SERVER_PID=""
SCHEMA=""
cleanup() {
    local rc=$?
    set +e
    stop_server
    if [[ -n "$SCHEMA" ]]; then
        psql "$PG_BASE" -Xq -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 \
            || log "note: could not drop schema $SCHEMA"
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# start_server <name> <url-to-poll> <command...>
start_server() {
    local name=$1 probe=$2
    shift 2
    RUST_LOG=warn "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        curl -fsS -o /dev/null --max-time 1 "$probe" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$TMP/$name.log" >&2
    die "$name did not come up (log above)"
}

stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
    return 0
}

# ---- request helpers -------------------------------------------------------------------------
BASE=""
# api <method> <path> [body-file] -> prints the body; fails on a status >= 400
api() {
    local method=$1 path=$2 body=${3:-}
    local args=(-sS --fail-with-body --max-time 60 -X "$method" "$BASE$path")
    [[ -n "$body" ]] && args+=(-H 'Content-Type: application/json' --data-binary "@$body")
    curl "${args[@]}" || die "$method $path failed"
}

# messages_json <n> <prefix>: a JSON array of n short user messages
messages_json() {
    python3 -c 'import json,sys; n=int(sys.argv[1]); p=sys.argv[2]
print(json.dumps([{"role": "user" if i % 2 == 0 else "assistant", "content": f"{p} message {i}: " + "lorem ipsum dolor sit amet " * 3} for i in range(n)]))' "$1" "$2"
}

# delta_file <n> <prefix> -> path of a ChangeSet file appending n messages
delta_file() {
    local f="$TMP/delta-$1-$2.json"
    printf '{"run_id":"seed","reason":"AssistantTurnCommitted","messages":%s,"patches":[]}' \
        "$(messages_json "$1" "$2")" >"$f"
    echo "$f"
}

create_thread() { # id
    printf '{"id":"%s"}' "$1" >"$TMP/create.json"
    api POST /v1/threads "$TMP/create.json" >/dev/null
}

version_of() { # id -> current version
    api GET "/v1/threads/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])'
}

message_count() { # id
    api GET "/v1/threads/$1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["messages"]))'
}

SMALL_DELTA="$TMP/small-delta.json"
printf '%s' '{"run_id":"r1","reason":"AssistantTurnCommitted","messages":[{"role":"assistant","content":"hi"}],"patches":[]}' >"$SMALL_DELTA"

# seed <prefix> : creates the read thread (50 messages) and the append threads
seed() {
    create_thread bench-read
    api POST /v1/threads/bench-read/deltas "$(delta_file 50 read)" >/dev/null
    create_thread bench-append
    [[ $(message_count bench-read) == 50 ]] || die "the read thread does not hold 50 messages"
}

seed_big() { # 10,000 messages in 20 deltas of 500
    create_thread bench-append-10k
    local f
    f=$(delta_file 500 big)
    for _ in $(seq 1 20); do api POST /v1/threads/bench-append-10k/deltas "$f" >/dev/null; done
    [[ $(message_count bench-append-10k) == 10000 ]] || die "the big thread does not hold 10,000 messages"
}

# ---- measuring -------------------------------------------------------------------------------
ROWS=()
# measure <scenario> <url> <expected status> [method body-file inm]
measure() {
    local scenario=$1 url=$2 expect=$3 method=${4:-GET} body=${5:-} inm=${6:-}
    # One request first: the scenario must answer what it claims to measure.
    local curl_args=(-s -o /dev/null -w '%{http_code}' --max-time 30 -X "$method" "$url")
    [[ -n "$body" ]] && curl_args+=(-H 'Content-Type: application/json' --data-binary "@$body")
    [[ -n "$inm" ]] && curl_args+=(-H "If-None-Match: $inm")
    local got
    got=$(curl "${curl_args[@]}") || true
    [[ "$got" == "$expect" ]] || die "$scenario: expected HTTP $expect, got $got"

    log "$scenario: wrk -t$THREADS -c$CONNS -d$DURATION"
    local out
    out=$(BENCH_METHOD=$method BENCH_BODY_FILE=$body BENCH_INM=$inm \
        timeout 120 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --timeout 10s -s "$LUA" "$url") \
        || die "$scenario: wrk failed: $out"
    local line
    line=$(grep '^BENCH_RESULT ' <<<"$out") || die "$scenario: no result from wrk: $out"
    local _tag n rps p50 p99 st_err sock_err
    read -r _tag n rps p50 p99 st_err sock_err <<<"$line"
    local errors="0"
    if [[ $st_err != 0 || $sock_err != 0 ]]; then errors="$st_err HTTP ≥400, $sock_err socket"; fi
    ROWS+=("| $scenario | $(printf '%.0f' "$rps") | $p50 ms | $p99 ms | $errors |")
    log "  $(printf '%.0f' "$rps") req/s, p50 $p50 ms, p99 $p99 ms ($n requests, errors: $errors)"
}

# ---- build -----------------------------------------------------------------------------------
if [[ "${BENCH_SKIP_BUILD:-}" != 1 ]]; then
    if [[ -z "${BENCH_THREADGATE_BIN:-}" ]]; then
        log "cargo build --release (threadgate)"
        cargo build --release --quiet --bin threadgate
    fi
    log "cargo build --release (bench/hello)"
    cargo build --release --quiet --manifest-path bench/hello/Cargo.toml
fi
TG=${BENCH_THREADGATE_BIN:-$ROOT/target/release/threadgate}
HELLO=$ROOT/bench/hello/target/release/threadgate-bench-hello
[[ -x $TG && -x $HELLO ]] || die "release binaries missing (run without BENCH_SKIP_BUILD)"

# ---- baseline ----------------------------------------------------------------------------------
port=$(free_port)
start_server hello "http://127.0.0.1:$port/" "$HELLO" "127.0.0.1:$port"
measure "baseline: axum hello world, GET /" "http://127.0.0.1:$port/" 200
stop_server

NOTES=()

# ---- memory store ------------------------------------------------------------------------------
port=$(free_port)
BASE="http://127.0.0.1:$port"
start_server threadgate-memory "$BASE/healthz" "$TG" --listen "127.0.0.1:$port" --store memory:
seed
etag="\"$(version_of bench-read)\""
measure "memory: GET thread (50 messages)" "$BASE/v1/threads/bench-read" 200
measure "memory: GET thread, If-None-Match (304)" "$BASE/v1/threads/bench-read" 304 GET "" "$etag"
measure "memory: POST delta (thread starts empty)" "$BASE/v1/threads/bench-append/deltas" 200 POST "$SMALL_DELTA"
NOTES+=("memory append thread ended with $(message_count bench-append) messages")
stop_server

# ---- postgres store ----------------------------------------------------------------------------
psql "$PG_BASE" -XqAt -c 'SELECT 1' >/dev/null 2>&1 || die "PostgreSQL is not reachable at $PG_BASE (set BENCH_PG_URL)"
SCHEMA="bench_$(date +%s)_$$"
psql "$PG_BASE" -Xq -v ON_ERROR_STOP=1 -c "CREATE SCHEMA $SCHEMA" >/dev/null
sep='?'; [[ $PG_BASE == *\?* ]] && sep='&'
PG_URL="$PG_BASE${sep}options=-c%20search_path%3D$SCHEMA"
port=$(free_port)
BASE="http://127.0.0.1:$port"
start_server threadgate-postgres "$BASE/healthz" "$TG" --listen "127.0.0.1:$port" --store "$PG_URL"
seed
log "seeding a 10,000-message thread"
seed_big
etag="\"$(version_of bench-read)\""
measure "postgres: GET thread (50 messages)" "$BASE/v1/threads/bench-read" 200
measure "postgres: GET thread, If-None-Match (304)" "$BASE/v1/threads/bench-read" 304 GET "" "$etag"
measure "postgres: POST delta (thread starts empty)" "$BASE/v1/threads/bench-append/deltas" 200 POST "$SMALL_DELTA"
NOTES+=("postgres append thread (started empty) ended with $(message_count bench-append) messages")
measure "postgres: POST delta (thread starts with 10,000 messages)" "$BASE/v1/threads/bench-append-10k/deltas" 200 POST "$SMALL_DELTA"
NOTES+=("postgres append thread (started with 10,000) ended with $(message_count bench-append-10k) messages")
stop_server

# ---- report ------------------------------------------------------------------------------------
{
    echo "# threadgate HTTP benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (+ uncommitted src changes)'),"
    echo "$(nproc) cores, wrk -t$THREADS -c$CONNS -d$DURATION on loopback (client and server share the cores),"
    echo "release builds, RUST_LOG=warn, PostgreSQL $(psql "$PG_BASE" -XqAt -c 'SHOW server_version' 2>/dev/null | cut -d' ' -f1) on the same machine."
    [[ -n "${BENCH_THREADGATE_BIN:-}" ]] && echo "threadgate binary: $BENCH_THREADGATE_BIN (not built from this tree by this run)."
    echo "Latency percentiles are wrk's (measured per connection, no coordinated-omission correction)."
    echo
    echo "| scenario | requests/s | p50 | p99 | errors |"
    echo "|---|---:|---:|---:|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    for n in "${NOTES[@]}"; do echo "- $n"; done
} >"$TMP/results.md"
cp "$TMP/results.md" "$OUT"
cat "$OUT"
log "written to $OUT"
