#!/usr/bin/env bash
# The test command: makes sure PostgreSQL and NATS (JetStream) are reachable, then runs every
# test of the workspace (the gateway and the client crates under clients/).
#
#   scripts/test.sh [extra args for cargo nextest run]     e.g. scripts/test.sh pg::
#
# Services:
#   THREADGATE_TEST_PG_URL    used as given when set; otherwise the machine's PostgreSQL at
#                             127.0.0.1:5432 (database `test`, user `postgres`) when it answers,
#                             else a throwaway cluster started here (initdb + pg_ctl).
#   THREADGATE_TEST_NATS_URL  used as given when set; otherwise the machine's nats-server at
#                             127.0.0.1:4222 when it answers with JetStream on, else a throwaway
#                             nats-server started here.
#   THREADGATE_TEST_NATS_BIN  always exported (path of nats-server) for tests that start and
#                             kill their own server.
#   THREADGATE_FORCE_OWN_SERVICES=1   skip the probes and start both services here, as on a
#                             fresh machine where they are installed but not running.
# A service that cannot be had is an error, never a skip. Whatever this script started is
# stopped, and its temporary directories removed, when it exits.
#
# With CI=true it first runs `cargo fmt --check` and `cargo clippy --all-targets -- -D warnings`;
# their failure fails the run (the tests still run, so one CI log shows everything).
#
# Other knobs: THREADGATE_TEST_TIMEOUT_PER_TEST (default 300s: a test still running then is
# killed and reported by name, so a hang cannot eat CI's time).

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# runuser, nats-server and friends live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '[test.sh] %s\n' "$*" >&2; }
die() { printf '[test.sh] ERROR: %s\n' "$*" >&2; exit 1; }

WORK_DIR=""
PG_DIR=""
PG_CTL=""
PG_USER_PREFIX=()
NATS_PID=""

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$NATS_PID" ]] && kill -0 "$NATS_PID" 2>/dev/null; then
        log "stopping the nats-server started here (pid $NATS_PID)"
        kill "$NATS_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$NATS_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$NATS_PID" 2>/dev/null
        wait "$NATS_PID" 2>/dev/null
    fi
    if [[ -n "$PG_DIR" && -f "$PG_DIR/data/postmaster.pid" ]]; then
        log "stopping the PostgreSQL cluster started here"
        (cd "$PG_DIR" && "${PG_USER_PREFIX[@]}" "$PG_CTL" -D "$PG_DIR/data" -m immediate -w -t 30 stop >/dev/null 2>&1)
    fi
    [[ -n "$PG_DIR" ]] && rm -rf "$PG_DIR"
    [[ -n "$WORK_DIR" ]] && rm -rf "$WORK_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/threadgate-test.XXXXXX")

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        if command -v ss >/dev/null 2>&1; then
            [[ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]] && { echo "$p"; return; }
        elif ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"; return
        fi
    done
    die "found no free TCP port"
}

force_own() { [[ "${THREADGATE_FORCE_OWN_SERVICES:-}" == 1 || "${THREADGATE_FORCE_OWN_SERVICES:-}" == true ]]; }

# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------

pg_bin() { # name -> path of a PostgreSQL server binary (newest installed major version)
    local name=$1 d
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$d/$name" ]] && { echo "$d/$name"; return; }
    done
    return 1
}

pg_up() { # host port -> 0 when the server accepts connections
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$1" -p "$2" -t 3
    else
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
    fi
}

# Checks that $1 (a URL) answers a query; creates database `test` when only it is missing.
pg_usable() {
    local url=$1
    command -v psql >/dev/null 2>&1 || return 0 # cannot check further; the tests will tell
    if psql "$url" -XqAt -c 'SELECT 1' >/dev/null 2>&1; then return 0; fi
    local admin=${url%/*}/postgres
    if psql "$admin" -XqAt -c 'SELECT 1' >/dev/null 2>&1; then
        log "database 'test' is missing at ${url%/*}; creating it"
        psql "$admin" -Xq -c 'CREATE DATABASE test' >/dev/null 2>&1 || true
        psql "$url" -XqAt -c 'SELECT 1' >/dev/null 2>&1 && return 0
    fi
    return 1
}

start_own_pg() {
    local initdb port
    initdb=$(pg_bin initdb) || die "PostgreSQL is not running and initdb was not found (install postgresql, or set THREADGATE_TEST_PG_URL)"
    PG_CTL=$(pg_bin pg_ctl) || die "pg_ctl not found beside $initdb"
    PG_DIR=$(mktemp -d /tmp/threadgate-pg.XXXXXX) # /tmp: the postgres user must reach it
    chmod 0755 "$PG_DIR"
    if [[ $(id -u) == 0 ]]; then
        # initdb refuses to run as root: the cluster belongs to the `postgres` user.
        id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' user to own a throwaway cluster"
        chown postgres: "$PG_DIR"
        PG_USER_PREFIX=(runuser -u postgres --)
    fi
    port=$(free_port)
    log "starting a throwaway PostgreSQL cluster on 127.0.0.1:$port ($PG_DIR)"
    (cd "$PG_DIR" && "${PG_USER_PREFIX[@]}" "$initdb" -D "$PG_DIR/data" -U postgres -A trust -E UTF8 \
        --locale=C --no-sync >"$PG_DIR/initdb.log" 2>&1) \
        || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed (log above)"; }
    # Durability is pointless for a throwaway cluster; speed is not.
    (cd "$PG_DIR" && "${PG_USER_PREFIX[@]}" "$PG_CTL" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null 2>&1) \
        || { cat "$PG_DIR/server.log" >&2 2>/dev/null; die "the throwaway PostgreSQL did not start (log above)"; }
    for _ in $(seq 1 100); do pg_up 127.0.0.1 "$port" && break; sleep 0.1; done
    pg_up 127.0.0.1 "$port" || die "the throwaway PostgreSQL on port $port does not accept connections"
    local createdb
    if createdb=$(pg_bin createdb); then
        "$createdb" -h 127.0.0.1 -p "$port" -U postgres test || die "could not create database 'test'"
    else
        psql "postgres://postgres@127.0.0.1:$port/postgres" -Xq -c 'CREATE DATABASE test' \
            || die "could not create database 'test'"
    fi
    THREADGATE_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/test"
}

if [[ -z "${THREADGATE_TEST_PG_URL:-}" ]]; then
    default_pg="postgres://postgres@127.0.0.1:5432/test"
    if ! force_own && pg_up 127.0.0.1 5432 && pg_usable "$default_pg"; then
        THREADGATE_TEST_PG_URL=$default_pg
    else
        force_own || log "no usable PostgreSQL at 127.0.0.1:5432"
        start_own_pg
    fi
fi
export THREADGATE_TEST_PG_URL
log "PostgreSQL: $THREADGATE_TEST_PG_URL"

# ---------------------------------------------------------------------------------------------
# NATS (JetStream)
# ---------------------------------------------------------------------------------------------

# The INFO line a NATS server sends on connect, or failure.
nats_info() {
    timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" && IFS= read -r -t 3 line <&3 && printf "%s\n" "$line"' "$1" "$2" 2>/dev/null
}
nats_js_up() { nats_info "$1" "$2" | grep -q '"jetstream":true'; }

if [[ -z "${THREADGATE_TEST_NATS_BIN:-}" ]]; then
    if command -v nats-server >/dev/null 2>&1; then
        THREADGATE_TEST_NATS_BIN=$(command -v nats-server)
    elif [[ -x /usr/sbin/nats-server ]]; then
        THREADGATE_TEST_NATS_BIN=/usr/sbin/nats-server
    else
        die "nats-server not found (apt-get install nats-server, or set THREADGATE_TEST_NATS_BIN); tests start their own servers with it"
    fi
fi
[[ -x "$THREADGATE_TEST_NATS_BIN" ]] || die "THREADGATE_TEST_NATS_BIN=$THREADGATE_TEST_NATS_BIN is not executable"
export THREADGATE_TEST_NATS_BIN

start_own_nats() {
    local port dir
    port=$(free_port)
    dir="$WORK_DIR/nats"
    mkdir -p "$dir/js"
    log "starting a throwaway nats-server (JetStream) on 127.0.0.1:$port"
    "$THREADGATE_TEST_NATS_BIN" -a 127.0.0.1 -p "$port" -js -sd "$dir/js" -l "$dir/server.log" </dev/null >/dev/null 2>&1 &
    NATS_PID=$!
    for _ in $(seq 1 100); do
        kill -0 "$NATS_PID" 2>/dev/null || break
        nats_js_up 127.0.0.1 "$port" && break
        sleep 0.1
    done
    if ! nats_js_up 127.0.0.1 "$port"; then
        cat "$dir/server.log" >&2 2>/dev/null
        die "the throwaway nats-server did not come up on port $port (log above)"
    fi
    THREADGATE_TEST_NATS_URL="nats://127.0.0.1:$port"
}

if [[ -z "${THREADGATE_TEST_NATS_URL:-}" ]]; then
    if ! force_own && nats_js_up 127.0.0.1 4222; then
        THREADGATE_TEST_NATS_URL="nats://127.0.0.1:4222"
    else
        force_own || log "no NATS server with JetStream at 127.0.0.1:4222"
        start_own_nats
    fi
fi
export THREADGATE_TEST_NATS_URL
log "NATS: $THREADGATE_TEST_NATS_URL (nats-server binary: $THREADGATE_TEST_NATS_BIN)"

# ---------------------------------------------------------------------------------------------
# Lints (CI only), then the tests
# ---------------------------------------------------------------------------------------------

status=0

if [[ "${CI:-}" == true || "${CI:-}" == 1 ]]; then
    log "cargo fmt --check"
    cargo fmt --all --check || { log "FAILED: cargo fmt --check (run 'cargo fmt')"; status=1; }
    log "cargo clippy --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets --locked -- -D warnings || { log "FAILED: cargo clippy"; status=1; }
fi

if cargo nextest --version >/dev/null 2>&1; then
    # Lowest-priority nextest configuration (a repository .config/nextest.toml overrides it):
    # a test that runs for too long is killed and named instead of hanging the run.
    per_test=${THREADGATE_TEST_TIMEOUT_PER_TEST:-300}
    per_test=${per_test%s}
    cat >"$WORK_DIR/nextest.toml" <<EOF
[profile.default]
slow-timeout = { period = "60s", terminate-after = $(( (per_test + 59) / 60 )) }
EOF
    log "cargo nextest run --workspace --all-targets --no-fail-fast $*"
    cargo nextest run --tool-config-file "threadgate-test:$WORK_DIR/nextest.toml" \
        --workspace --all-targets --no-fail-fast "$@" || status=1
else
    log "cargo-nextest is not installed; using cargo test"
    cargo test --workspace --all-targets --no-fail-fast "$@" || status=1
fi

# Doctests of every workspace member (nextest does not run them): only when some doc comment
# or crate README holds a code block.
if grep -rqE '^\s*//[/!].*```' src clients/*/src || grep -qE '^```rust' clients/*/README.md; then
    log "cargo test --workspace --doc"
    cargo test --workspace --doc --no-fail-fast || status=1
fi

if [[ $status == 0 ]]; then log "all passed"; else log "FAILED (see above)"; fi
exit "$status"
