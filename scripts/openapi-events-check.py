#!/usr/bin/env python3
"""Checks GET /v1/threads/{id}/events of a running gateway against the committed OpenAPI
document: the part schemathesis cannot test, because a stream in progress never ends.

Usage: openapi-events-check.py OPENAPI_JSON BASE_URL [--buffered] [--token TOKEN]

With --token (a gateway with authentication on), every request carries it as a bearer token,
and the check also asks without a credential (401) and with the token in the query.

Every answer must have a status the document lists for the operation, the content type it
gives for that status, a `Problem` body for errors, and every event's data must validate
against the event schema the document names for it (DeltaEvent, SnapshotEvent, ...). Reads
use short timeouts; a stream is read only until the events the case expects have arrived.
Run by scripts/test.sh with the Python of its schemathesis venv (jsonschema_rs comes with
schemathesis).
"""

import json
import sys
import time
import uuid

import jsonschema_rs
import requests

READ_TIMEOUT = 5.0  # seconds to wait for the next bytes of an answer
OP_PATH = "/v1/threads/{id}/events"

EVENT_SCHEMAS = {
    "delta": "DeltaEvent",
    "snapshot": "SnapshotEvent",
    "metadata": "MetadataEvent",
    "flushed": "FlushedEvent",
    "reset": "ResetEvent",
    "deleted": "DeletedEvent",
}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}", flush=True)


def main():
    doc_path, base = sys.argv[1], sys.argv[2].rstrip("/")
    rest = sys.argv[3:]
    buffered = "--buffered" in rest
    token = rest[rest.index("--token") + 1] if "--token" in rest else None
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    doc = json.load(open(doc_path))
    op = doc["paths"][OP_PATH]["get"]
    responses = op["responses"]

    def validator(name):
        # The whole document as the root, so `#/components/...` references resolve.
        return jsonschema_rs.validator_for(
            {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        )

    validators = {event: validator(name) for event, name in EVENT_SCHEMAS.items()}
    problem = validator("Problem")

    def check_answer(label, res):
        status = str(res.status_code)
        if status not in responses:
            fail(f"{label}: undocumented status {status}")
            return False
        ct = res.headers.get("content-type", "").split(";")[0].strip()
        documented = list(responses[status].get("content", {}).keys())
        if documented and ct not in [d.split(";")[0] for d in documented]:
            fail(f"{label}: content type {ct!r} for {status}, documented {documented}")
        if res.status_code >= 400:
            body = res.json()
            errors = [e.message for e in problem.iter_errors(body)]
            if errors:
                fail(f"{label}: problem body {body} violates Problem: {errors}")
        return True

    def stream(label, path, headers=None, until=(), expect_end=False):
        """Opens the stream; reads events until each kind in `until` has been seen (or, with
        `expect_end`, until the server ends it). Returns the events as (event, id, data)."""
        url = base + path
        try:
            res = requests.get(url, headers={**auth, **(headers or {})}, stream=True, timeout=READ_TIMEOUT)
        except requests.RequestException as e:
            fail(f"{label}: request failed: {e}")
            return None, []
        with res:
            if not check_answer(label, res) or res.status_code != 200:
                return res.status_code, []
            events, current, wanted = [], {}, set(until)
            try:
                for raw in res.iter_lines(decode_unicode=True):
                    if raw is None:
                        continue
                    if raw == "":
                        if "event" in current:
                            ev = current["event"]
                            data = json.loads(current.get("data", "null"))
                            events.append((ev, current.get("id"), data))
                            v = validators.get(ev)
                            if v is None:
                                fail(f"{label}: undocumented event {ev!r}")
                            else:
                                errors = [e.message for e in v.iter_errors(data)]
                                if errors:
                                    fail(f"{label}: {ev} data {data} violates {EVENT_SCHEMAS[ev]}: {errors}")
                            wanted.discard(ev)
                            if not wanted and not expect_end:
                                break
                        current = {}
                        continue
                    if raw.startswith(":"):
                        continue
                    key, _, value = raw.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    current[key] = current[key] + "\n" + value if key == "data" and key in current else value
            except requests.RequestException as e:
                fail(f"{label}: stream broke or stalled before {sorted(wanted)}: {e}")
                return 200, events
            if wanted:
                fail(f"{label}: stream ended before {sorted(wanted)}; got {[e[0] for e in events]}")
            return 200, events

    http = requests.Session()
    http.headers.update(auth)
    tid = f"st-events-{uuid.uuid4().hex[:12]}"
    r = http.post(f"{base}/v1/threads", json={"id": tid, "state": [1, "any JSON"]}, timeout=READ_TIMEOUT)
    assert r.status_code == 201, r.text
    delta = {
        "run_id": "r1",
        "reason": "AssistantTurnCommitted",
        "messages": [{"role": "assistant", "content": "hi"}],
        "patches": [{"patch": {"ops": [{"op": "set", "path": [0], "value": None}]}}],
    }
    r = http.post(f"{base}/v1/threads/{tid}/deltas", json=delta, timeout=READ_TIMEOUT)
    assert r.status_code == 200, r.text

    p = f"/v1/threads/{tid}/events"
    print(f"checking {OP_PATH} on {base} (thread {tid})", flush=True)
    # Errors come before any event.
    for label, path, headers, status in [
        ("missing thread", "/v1/threads/no-such-thread-" + tid + "/events", None, 404),
        ("invalid id", "/v1/threads/%FF/events", None, 400),
        ("id too long", "/v1/threads/" + "a" * 129 + "/events", None, 400),
        ("after not a number", p + "?after=x", None, 400),
        ("after negative", p + "?after=-1", None, 400),
        ("unknown query parameter", p + "?bogus=1", None, 400),
        ("Last-Event-ID not a version", p, {"Last-Event-ID": "+1"}, 400),
    ] + ([("no credential", p, {"Authorization": "Bearer not-a-token"}, 401)] if token else []):
        got, _ = stream(label, path, headers)
        if got != status:
            fail(f"{label}: status {got}, expected {status}")
    # Streams: replay, snapshot first, reset, live delta, metadata, snapshot after PUT, deleted.
    stream("replay from 0", p + "?after=0", until=["delta"])
    stream("Last-Event-ID 0", p, {"Last-Event-ID": "0"}, until=["delta"])
    stream("snapshot first", p + "?snapshot=true", until=["snapshot"])
    stream("unreplayable position", p + "?after=999", until=["reset"], expect_end=True)
    if token:
        # EventSource's way: the token in the query, no header.
        url = f"{p}?after=0&access_token={token}"
        stream("token in the query", url, {"Authorization": None}, until=["delta"])

    # Live events: follow from the current version (so nothing written meanwhile is missed),
    # then write.
    import threading

    def head():
        return http.get(f"{base}/v1/threads/{tid}?view=live", timeout=READ_TIMEOUT).json()["version"]

    def later(fn, delay=0.5):
        t = threading.Timer(delay, fn)
        t.start()
        return t

    writes = [
        lambda: http.patch(f"{base}/v1/threads/{tid}", json={"title": "t"}, timeout=READ_TIMEOUT),
        lambda: http.put(f"{base}/v1/threads/{tid}", json={"state": "replaced"}, timeout=READ_TIMEOUT),
        lambda: http.post(
            f"{base}/v1/threads/{tid}/deltas",
            json={"run_id": "r1", "reason": "RunFinished", "messages": [], "patches": []},
            timeout=READ_TIMEOUT,
        ),
    ]
    v = head()
    t = later(lambda: [w() for w in writes])
    kinds = ["metadata", "snapshot", "delta"] + (["flushed"] if buffered else [])
    stream("live writes", f"{p}?after={v}", until=kinds)
    t.join()
    v = head()
    t = later(lambda: http.delete(f"{base}/v1/threads/{tid}", timeout=READ_TIMEOUT))
    stream("deleted while following", f"{p}?after={v}", until=["deleted"], expect_end=True)
    t.join()

    if failures:
        print(f"{OP_PATH}: {len(failures)} failure(s)", flush=True)
        sys.exit(1)
    print(f"{OP_PATH}: all checks passed", flush=True)


if __name__ == "__main__":
    main()
