#!/usr/bin/env bash
# What authentication and tenant scoping cost (a measurement, not a test: it never fails on
# numbers).
#
#   bench/auth.sh
#
# Runs the same requests without authentication, with an admin token, with a token scoped to
# the thread's resource_id, and with a scoped HS256 JWT, against the release binary, with wrk
# on loopback; prints a markdown table and writes it to bench/results-auth.md. The scoped
# requests pay for the tenancy check (the thread's owner: one key lookup in the store, which a
# 304 revalidation reuses for the version it needs anyway; nothing extra for buffered appends,
# whose cached head carries the owner), all of them for verifying the credential.
#
# Scenarios, in direct mode on the memory store and on PostgreSQL and in buffered mode over
# PostgreSQL: GET of a 50-message thread revalidated with If-None-Match (304: the cheapest
# request, so the largest relative cost) with 64 connections and with 1 (its latency is the
# per-request cost), and POST of a one-message delta. The machine is shared, so every
# scenario runs in BENCH_ROUNDS rounds of BENCH_ROUND, interleaved across the variants, and
# the table shows each one's median round.
#
# Knobs: BENCH_ROUND (5s), BENCH_ROUNDS (3), BENCH_CONNECTIONS (64), BENCH_THREADS (2),
# BENCH_PG_URL (postgres://postgres@127.0.0.1:5432/test), BENCH_NATS_URL
# (nats://127.0.0.1:4222), BENCH_SKIP_BUILD=1, BENCH_THREADGATE_BIN.
# Needs: cargo, curl, psql, python3, wrk.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

CONNS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
PG_BASE=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
NATS=${BENCH_NATS_URL:-nats://127.0.0.1:4222}
OUT=bench/results-auth.md
LUA=$ROOT/bench/auth.lua
SECRET="bench-secret-of-at-least-thirty-two-bytes"
ADMIN="bench-admin-token-0123456789"
SCOPED="bench-scoped-token-0123456789"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in curl psql python3 wrk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required (apt-get install wrk postgresql-client)"
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/threadgate-bench-auth.XXXXXX")
SERVER_PID=""
SCHEMAS=()
cleanup() {
    local rc=$?
    set +e
    stop_server
    drop_streams "benchauth$$"
    for s in "${SCHEMAS[@]}"; do psql "$PG_BASE" -Xq -c "DROP SCHEMA IF EXISTS $s CASCADE" >/dev/null 2>&1; done
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT

# Deletes a prefix's JetStream streams with two plain NATS publishes (no client needed).
drop_streams() {
    local hostport=${NATS#nats://}
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/${0%:*}/${0##*:}" || exit 1
        IFS= read -r -t 3 _ <&3
        printf "CONNECT {\"verbose\":false}\r\nPUB \$JS.API.STREAM.DELETE.%s_log 0\r\n\r\nPUB \$JS.API.STREAM.DELETE.%s_dead 0\r\n\r\nPING\r\n" "$1" "$1" >&3
        IFS= read -r -t 3 _ <&3' "$hostport" "$1" 2>/dev/null || true
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

printf '%s admin\n%s resource:bench-tenant\n' "$ADMIN" "$SCOPED" >"$TMP/tokens.txt"
chmod 600 "$TMP/tokens.txt"
JWT=$(python3 - "$SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b64(json.dumps({"sub": "bench-tenant", "exp": int(time.time()) + 86400}).encode())
s = b64(hmac.new(sys.argv[1].encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())
print(f"{h}.{p}.{s}")
PY
)

start_server() { # name args...
    local name=$1
    shift
    local port
    port=$(free_port)
    BASE="http://127.0.0.1:$port"
    THREADGATE_JWT_SECRET=$SECRET RUST_LOG=warn "$TG" --listen "127.0.0.1:$port" \
        --auth-tokens "$TMP/tokens.txt" "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        curl -fsS -o /dev/null --max-time 1 "$BASE/readyz" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$TMP/$name.log" >&2
    die "$name did not come up"
}

stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
    return 0
}

api() { # method path [body]
    local args=(-sS --fail-with-body --max-time 60 -X "$1" "$BASE$2" -H "Authorization: Bearer $ADMIN")
    [[ -n "${3:-}" ]] && args+=(-H 'Content-Type: application/json' --data-binary "$3")
    curl "${args[@]}" || die "$1 $2 failed"
}

DELTA="$TMP/delta.json"
printf '%s' '{"run_id":"r1","reason":"AssistantTurnCommitted","messages":[{"role":"assistant","content":"hi"}],"patches":[]}' >"$DELTA"

seed() { # once per store (the gateways of a mode share it)
    [[ $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ADMIN" "$BASE/v1/threads/read") == 200 ]] && return 0
    api POST /v1/threads '{"id":"read","resource_id":"bench-tenant"}' >/dev/null
    local msgs
    msgs=$(python3 -c 'import json; print(json.dumps([{"role":"user","content":"message %d " % i + "lorem ipsum " * 8} for i in range(50)]))')
    api POST /v1/threads/read/deltas "{\"run_id\":\"seed\",\"reason\":\"AssistantTurnCommitted\",\"messages\":$msgs,\"patches\":[]}" >/dev/null
    api POST /v1/threads '{"id":"append","resource_id":"bench-tenant"}' >/dev/null
}

if [[ "${BENCH_SKIP_BUILD:-}" != 1 && -z "${BENCH_THREADGATE_BIN:-}" ]]; then
    log "cargo build --release"
    cargo build --release --quiet --bin threadgate
fi
TG=${BENCH_THREADGATE_BIN:-$ROOT/target/release/threadgate}
[[ -x $TG ]] || die "no release binary at $TG"

new_schema() { # a fresh schema; sets PG_URL (not in a subshell, so cleanup drops it)
    local s
    s="bench_auth_$(date +%s%N | tail -c 10)_$$"
    SCHEMAS+=("$s")
    psql "$PG_BASE" -Xq -v ON_ERROR_STOP=1 -c "CREATE SCHEMA $s" >/dev/null
    local sep='?'
    [[ $PG_BASE == *\?* ]] && sep='&'
    PG_URL="$PG_BASE${sep}options=-c%20search_path%3D$s"
}

RAW="$TMP/raw.txt"
: >"$RAW"
# run <label> <token> <method> <path> <expect> <inm> <connections>: one 5 s round, appended to
# RAW as "label<TAB>req/s<TAB>p50<TAB>p99<TAB>errors".
run() {
    local label=$1 token=$2 method=$3 path=$4 expect=$5 inm=$6 conns=$7 body=""
    [[ $method == POST ]] && body=$DELTA
    local args=(-s -o /dev/null -w '%{http_code}' --max-time 30 -X "$method" "$BASE$path")
    [[ -n "$token" ]] && args+=(-H "Authorization: Bearer $token")
    [[ -n "$body" ]] && args+=(-H 'Content-Type: application/json' --data-binary "@$body")
    [[ -n "$inm" ]] && args+=(-H "If-None-Match: $inm")
    local got
    got=$(curl "${args[@]}") || true
    [[ "$got" == "$expect" ]] || die "$label: expected HTTP $expect, got $got"
    local threads=$THREADS
    ((conns < threads)) && threads=$conns
    local out line _t n rps p50 p99 se ke
    out=$(BENCH_METHOD=$method BENCH_BODY_FILE=$body BENCH_INM=$inm BENCH_TOKEN=$token \
        timeout 60 wrk -t"$threads" -c"$conns" -d"$ROUND" --timeout 10s -s "$LUA" "$BASE$path") \
        || die "$label: wrk failed: $out"
    line=$(grep '^BENCH_RESULT ' <<<"$out") || die "$label: no result: $out"
    read -r _t n rps p50 p99 se ke <<<"$line"
    printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$rps" "$p50" "$p99" "$((se + ke))" >>"$RAW"
    log "  $label: $(printf '%.0f' "$rps") req/s, p50 $p50 ms"
}

ROUND=${BENCH_ROUND:-5s}
ROUNDS=${BENCH_ROUNDS:-3}

etag_of() { # thread -> its ETag as the store view has it now
    printf '"%s"' "$(curl -s "$BASE/v1/threads/$1" -H "Authorization: Bearer $ADMIN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')"
}

# Rounds interleaved, so a burst of load from elsewhere on the machine hits every variant.
rounds() { # label-prefix method path expect conns variant...   (variant = name=token)
    local prefix=$1 method=$2 path=$3 expect=$4 conns=$5
    shift 5
    local inm=""
    [[ $expect == 304 ]] && inm=$(etag_of read)
    for _ in $(seq 1 "$ROUNDS"); do
        for v in "$@"; do
            run "$prefix, ${v%%=*}" "${v#*=}" "$method" "$path" "$expect" "$inm" "$conns"
        done
    done
}

run_mode() { # label store-args...
    local label=$1
    shift
    # Without authentication: the same binary, no credential flags.
    local port
    port=$(free_port)
    BASE="http://127.0.0.1:$port"
    RUST_LOG=warn "$TG" --listen "127.0.0.1:$port" "$@" >"$TMP/noauth.log" 2>&1 </dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 300); do curl -fsS -o /dev/null --max-time 1 "$BASE/readyz" 2>/dev/null && break; sleep 0.1; done
    seed
    log "$label, no auth"
    rounds "$label: GET 304, $CONNS connections" GET /v1/threads/read 304 "$CONNS" "no auth="
    rounds "$label: POST delta, $CONNS connections" POST /v1/threads/append/deltas 200 "$CONNS" "no auth="
    rounds "$label: GET 304, 1 connection" GET /v1/threads/read 304 1 "no auth="
    stop_server
    start_server "$label" "$@"
    seed
    log "$label, with authentication"
    rounds "$label: GET 304, $CONNS connections" GET /v1/threads/read 304 "$CONNS" \
        "admin token=$ADMIN" "scoped token=$SCOPED" "scoped JWT=$JWT"
    rounds "$label: POST delta, $CONNS connections" POST /v1/threads/append/deltas 200 "$CONNS" \
        "admin token=$ADMIN" "scoped token=$SCOPED" "scoped JWT=$JWT"
    rounds "$label: GET 304, 1 connection" GET /v1/threads/read 304 1 \
        "admin token=$ADMIN" "scoped token=$SCOPED" "scoped JWT=$JWT"
    stop_server
}

run_mode "direct memory" --store memory:
new_schema
run_mode "direct postgres" --store "$PG_URL"
new_schema
run_mode "buffered postgres" --store "$PG_URL" --nats-url "$NATS" --nats-prefix "benchauth$$" --fold-idle 1h

# The median round of each scenario.
TABLE=$(python3 - "$RAW" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, rps, p50, p99, errors = line.rstrip("\n").split("\t")
    rows.setdefault(label, []).append((float(rps), float(p50), float(p99), int(errors)))
for label, rs in rows.items():
    rps = statistics.median(r[0] for r in rs)
    p50 = statistics.median(r[1] for r in rs)
    p99 = statistics.median(r[2] for r in rs)
    err = sum(r[3] for r in rs)
    print(f"| {label} | {rps:.0f} | {p50:.3f} ms | {p99:.3f} ms | {err} |")
PY
)

{
    echo "# threadgate authentication and tenancy cost"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
    echo "$(nproc) cores, wrk -t$THREADS on loopback (client and server share the cores),"
    echo "release build, RUST_LOG=warn, \`bench/auth.sh\`. The thread read is scoped to the token's resource;"
    echo "\"no auth\" is the same binary without credential flags (every caller is an admin)."
    echo "Each row is the median of $ROUNDS interleaved rounds of $ROUND (wrk's latencies: per connection,"
    echo "no coordinated-omission correction); the machine is shared, so compare rows of one mode only."
    echo
    echo "| scenario | requests/s | p50 | p99 | errors |"
    echo "|---|---:|---:|---:|---|"
    echo "$TABLE"
} >"$TMP/results.md"
cp "$TMP/results.md" "$OUT"
cat "$OUT"
log "written to $OUT"
