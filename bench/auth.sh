#!/usr/bin/env bash
# What authentication and tenant scoping cost (a measurement, not a test: it never fails on
# numbers).
#
#   bench/auth.sh
#
# Runs the same requests without authentication, with an admin token, with a token scoped to
# the thread's resource_id, and with a scoped HS256 JWT, against the release binary, with wrk
# on loopback; prints a markdown table and writes it to bench/results-auth.md. The scoped
# requests pay for the tenancy check (the thread's owner: one key lookup in direct mode; the
# log's end plus one key lookup for buffered reads; nothing extra for buffered appends, whose
# cached head carries the owner), the admin and JWT ones for verifying the credential.
#
# Scenarios: direct mode on the memory store and on PostgreSQL, GET of a 50-message thread
# revalidated with If-None-Match (304: the cheapest request, so the largest relative cost)
# and POST of a one-message delta; buffered mode over PostgreSQL, the same two.
#
# Knobs: BENCH_DURATION (10s), BENCH_CONNECTIONS (64), BENCH_THREADS (2),
# BENCH_PG_URL (postgres://postgres@127.0.0.1:5432/test), BENCH_NATS_URL
# (nats://127.0.0.1:4222), BENCH_SKIP_BUILD=1, BENCH_THREADGATE_BIN.
# Needs: cargo, curl, psql, python3, wrk.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10s}
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
    for s in "${SCHEMAS[@]}"; do psql "$PG_BASE" -Xq -c "DROP SCHEMA IF EXISTS $s CASCADE" >/dev/null 2>&1; done
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT

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

seed() {
    api POST /v1/threads '{"id":"read","resource_id":"bench-tenant"}' >/dev/null
    local msgs
    msgs=$(python3 -c 'import json; print(json.dumps([{"role":"user","content":"message %d " % i + "lorem ipsum " * 8} for i in range(50)]))')
    api POST /v1/threads/read/deltas "{\"run_id\":\"seed\",\"reason\":\"AssistantTurnCommitted\",\"messages\":$msgs,\"patches\":[]}" >/dev/null
    api POST /v1/threads '{"id":"append","resource_id":"bench-tenant"}' >/dev/null
}

ROWS=()
measure() { # scenario token method path expect [inm]
    local scenario=$1 token=$2 method=$3 path=$4 expect=$5 inm=${6:-} body=""
    [[ $method == POST ]] && body=$DELTA
    local args=(-s -o /dev/null -w '%{http_code}' --max-time 30 -X "$method" "$BASE$path")
    [[ -n "$token" ]] && args+=(-H "Authorization: Bearer $token")
    [[ -n "$body" ]] && args+=(-H 'Content-Type: application/json' --data-binary "@$body")
    [[ -n "$inm" ]] && args+=(-H "If-None-Match: $inm")
    local got
    got=$(curl "${args[@]}") || true
    [[ "$got" == "$expect" ]] || die "$scenario: expected HTTP $expect, got $got"
    log "$scenario"
    local out line _t n rps p50 p99 se ke
    out=$(BENCH_METHOD=$method BENCH_BODY_FILE=$body BENCH_INM=$inm BENCH_TOKEN=$token \
        timeout 120 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --timeout 10s -s "$LUA" "$BASE$path") \
        || die "$scenario: wrk failed: $out"
    line=$(grep '^BENCH_RESULT ' <<<"$out") || die "$scenario: no result: $out"
    read -r _t n rps p50 p99 se ke <<<"$line"
    local errors=0
    [[ $se != 0 || $ke != 0 ]] && errors="$se HTTP ≥400, $ke socket"
    ROWS+=("| $scenario | $(printf '%.0f' "$rps") | $p50 ms | $p99 ms | $errors |")
    log "  $(printf '%.0f' "$rps") req/s, p50 $p50 ms, p99 $p99 ms"
}

# Each request kind four ways: no auth (a gateway without --auth-tokens), admin, scoped, JWT.
four_ways() { # label path expect method [inm]
    local label=$1 path=$2 expect=$3 method=$4 inm=${5:-}
    measure "$label, admin token" "$ADMIN" "$method" "$path" "$expect" "$inm"
    measure "$label, scoped token" "$SCOPED" "$method" "$path" "$expect" "$inm"
    measure "$label, scoped JWT (HS256)" "$JWT" "$method" "$path" "$expect" "$inm"
}

if [[ "${BENCH_SKIP_BUILD:-}" != 1 && -z "${BENCH_THREADGATE_BIN:-}" ]]; then
    log "cargo build --release"
    cargo build --release --quiet --bin threadgate
fi
TG=${BENCH_THREADGATE_BIN:-$ROOT/target/release/threadgate}
[[ -x $TG ]] || die "no release binary at $TG"

pg_url() { # a fresh schema
    local s="bench_auth_$(date +%s%N | tail -c 10)_$$"
    SCHEMAS+=("$s")
    psql "$PG_BASE" -Xq -v ON_ERROR_STOP=1 -c "CREATE SCHEMA $s" >/dev/null
    local sep='?'
    [[ $PG_BASE == *\?* ]] && sep='&'
    echo "$PG_BASE${sep}options=-c%20search_path%3D$s"
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
    local etag
    etag="\"$(curl -s "$BASE/v1/threads/read" -H "Authorization: Bearer $ADMIN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')\""
    measure "$label: GET 304, no auth" "" GET /v1/threads/read 304 "$etag"
    measure "$label: POST delta, no auth" "" POST /v1/threads/append/deltas 200
    stop_server
    start_server "$label" "$@"
    seed
    four_ways "$label: GET 304" /v1/threads/read 304 GET "$etag"
    four_ways "$label: POST delta" /v1/threads/append/deltas 200 POST
    stop_server
}

run_mode "direct memory" --store memory:
run_mode "direct postgres" --store "$(pg_url)"
run_mode "buffered postgres" --store "$(pg_url)" --nats-url "$NATS" --nats-prefix "benchauth$$" --fold-idle 1h

{
    echo "# threadgate authentication and tenancy cost"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
    echo "$(nproc) cores, wrk -t$THREADS -c$CONNS -d$DURATION on loopback (client and server share the cores),"
    echo "release build, RUST_LOG=warn, \`bench/auth.sh\`. The thread read is scoped to the token's resource;"
    echo "\"no auth\" is the same binary without credential flags (every caller is an admin)."
    echo
    echo "| scenario | requests/s | p50 | p99 | errors |"
    echo "|---|---:|---:|---:|---|"
    printf '%s\n' "${ROWS[@]}"
} >"$TMP/results.md"
cp "$TMP/results.md" "$OUT"
cat "$OUT"
log "written to $OUT"
