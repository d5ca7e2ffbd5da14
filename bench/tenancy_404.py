#!/usr/bin/env python3
"""Is another tenant's thread told apart from a missing one by timing? (A measurement, not a
test: it fails only when an answer is not the expected status.)

    bench/tenancy_404.py [--bin target/release/threadgate] [--store memory|postgres]

Starts the gateway (release binary) with a tokens file, creates a thread owned by `user-2`
and one owned by `user-1`, then, with `user-1`'s scoped token over one keep-alive connection,
times in interleaved blocks:
  - GET of `user-2`'s thread (404: exists, other tenant),
  - GET of a thread that does not exist (404),
  - GET of `user-1`'s own thread (200, for scale).
The two 404 bodies are compared byte for byte, and their latency distributions (p50, p90,
p99) are printed side by side as a markdown table. Knobs: BENCH_SAMPLES (20000 per kind),
BENCH_PG_URL (postgres://postgres@127.0.0.1:5432/test; a fresh schema, dropped afterwards).
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

BLOCK = 250  # requests per kind before switching, so drift hits every kind alike
WARMUP = 2000


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/threadgate")
    ap.add_argument("--store", default="memory", choices=["memory", "postgres"])
    a = ap.parse_args()
    samples = int(os.environ.get("BENCH_SAMPLES", "20000"))
    pg = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/test")

    tmp = tempfile.mkdtemp(prefix="tenancy404-")
    tokens = os.path.join(tmp, "tokens.txt")
    with open(tokens, "w") as f:
        f.write("admin-token-0123456789 admin\nuser1-token-0123456789 resource:user-1\n")
    schema = None
    if a.store == "memory":
        store = "memory"
    else:
        schema = "bench_" + uuid.uuid4().hex
        subprocess.run(["psql", pg, "-qc", f"CREATE SCHEMA {schema}"], check=True)
        sep = "&" if "?" in pg else "?"
        store = f"{pg}{sep}options=-c%20search_path%3D{schema}"
    proc = subprocess.Popen(
        [a.bin, "--listen", "127.0.0.1:0", "--store", store, "--auth-tokens", tokens,
         "--log-format", "json"],
        stdout=subprocess.PIPE, env={**os.environ, "RUST_LOG": "warn,threadgate::app=info"},
        text=True)
    try:
        addr = None
        for line in proc.stdout:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if v.get("fields", {}).get("message") == "threadgate listening":
                addr = v["fields"]["addr"]
                break
        if not addr:
            sys.exit("the gateway did not start")
        host, port = addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)

        def req(method, path, token, body=None):
            h = {"authorization": f"Bearer {token}"}
            if body is not None:
                h["content-type"] = "application/json"
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, r.read()

        admin = "admin-token-0123456789"
        user1 = "user1-token-0123456789"
        for tid, owner in [("theirs", "user-2"), ("mine", "user-1")]:
            s, b = req("POST", "/v1/threads", admin, json.dumps({"id": tid, "resource_id": owner}))
            assert s == 201, (s, b)
            s, b = req("POST", f"/v1/threads/{tid}/deltas", admin, json.dumps({
                "run_id": "r", "reason": "UserMessage", "patches": [],
                "messages": [{"id": f"m{i}", "role": "user", "content": "hello " * 20}
                             for i in range(20)]}))
            assert s == 200, (s, b)
        kinds = {"other tenant's thread (404)": ("/v1/threads/theirs", 404),
                 "missing thread (404)": ("/v1/threads/absent", 404),
                 "own thread (200)": ("/v1/threads/mine", 200)}
        bodies = {}
        for path, status in kinds.values():
            for _ in range(WARMUP // len(kinds)):
                s, b = req("GET", path, user1)
                assert s == status, (path, s, b)
            bodies[path] = b
        assert bodies["/v1/threads/theirs"] == bodies["/v1/threads/absent"], "404 bodies differ"
        lat = {k: [] for k in kinds}
        while min(len(v) for v in lat.values()) < samples:
            for k, (path, status) in kinds.items():
                for _ in range(BLOCK):
                    t = time.perf_counter_ns()
                    s, _b = req("GET", path, user1)
                    lat[k].append((time.perf_counter_ns() - t) / 1e6)
                    assert s == status, (path, s)
        print(f"store: {a.store}; {samples} samples per kind, blocks of {BLOCK}, one keep-alive "
              f"connection, scoped token; 404 bodies byte-identical: yes\n")
        print("| request | p50 | p90 | p99 |")
        print("|---|---:|---:|---:|")
        for k, xs in lat.items():
            print(f"| {k} | {pct(xs, .5):.3f} ms | {pct(xs, .9):.3f} ms | {pct(xs, .99):.3f} ms |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if schema:
            subprocess.run(["psql", pg, "-qc", f"SET client_min_messages = warning; DROP SCHEMA {schema} CASCADE"], check=False)


if __name__ == "__main__":
    main()
