//! HTTP hygiene over real HTTP: CORS preflights and exposed headers, compression of JSON
//! (gzip, brotli, zstd) but never of the event stream, every limit with its clear `4xx`, the
//! request timeout, and the request, append, delivery and buffered metrics.

use crate::harness::{Backend, Gateway, expect_problem, nats_url};
use crate::pg::PgSchema;
use crate::support::eventually;
use crate::support::tenants::{ALICE, BOB, Caller, Mode, Sse, metric, start};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::io::Read;
use std::time::Duration;

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Preflights are answered for the API and the module, only for the allowed origins, with
/// the methods and headers a frontend sends; answers expose the headers it reads.
#[tokio::test]
async fn cors_preflight_and_exposed_headers() {
    let app = "https://app.example";
    let gw = start(Mode::Direct(Backend::Memory), |c| {
        c.cors_origin = vec![app.into(), "http://localhost:3000".into()];
    })
    .await;
    let preflight = |origin: &str, path: &str, method: &str, headers: &str| {
        gw.http
            .request(Method::OPTIONS, gw.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
    };
    let res = preflight(
        app,
        "/v1/threads/t/deltas",
        "POST",
        "authorization, content-type, idempotency-key, if-match",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "access-control-allow-origin"), Some(app));
    assert_eq!(
        header(&res, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(header(&res, "access-control-max-age"), Some("600"));
    let methods = header(&res, "access-control-allow-methods")
        .unwrap()
        .to_lowercase();
    for m in ["get", "post", "put", "patch", "delete"] {
        assert!(methods.contains(m), "{methods}");
    }
    let allowed = header(&res, "access-control-allow-headers")
        .unwrap()
        .to_lowercase();
    for h in [
        "authorization",
        "content-type",
        "idempotency-key",
        "if-match",
        "if-none-match",
        "last-event-id",
    ] {
        assert!(allowed.contains(h), "{allowed}");
    }
    // The event stream's reconnect header, and the module itself.
    let res = preflight(app, "/v1/threads/t/events", "GET", "last-event-id")
        .await
        .unwrap();
    assert_eq!(header(&res, "access-control-allow-origin"), Some(app));
    let module = gw
        .http
        .get(gw.url("/static/threadgate.js"))
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(module.status(), StatusCode::OK);
    assert_eq!(
        header(&module, "access-control-allow-origin"),
        Some("http://localhost:3000")
    );
    // Another origin gets no permission.
    let res = preflight(
        "https://evil.example",
        "/v1/threads",
        "POST",
        "authorization",
    )
    .await
    .unwrap();
    assert!(header(&res, "access-control-allow-origin").is_none());
    // Real answers, errors included, carry the permission and expose what clients read.
    let alice = Caller::new(&gw, Some(ALICE));
    alice
        .post_expect("/v1/threads", &json!({"id": "t"}), StatusCode::CREATED)
        .await;
    let res = alice
        .send(Method::GET, "/v1/threads/t", None, &[("origin", app)])
        .await;
    assert_eq!(header(&res, "access-control-allow-origin"), Some(app));
    let exposed = header(&res, "access-control-expose-headers")
        .unwrap()
        .to_lowercase();
    for h in [
        "etag",
        "location",
        "last-event-id",
        "idempotent-replayed",
        "threadgate-mode",
        "threadgate-stored-version",
        "www-authenticate",
        "retry-after",
    ] {
        assert!(exposed.contains(h), "{exposed}");
    }
    let res = Caller::new(&gw, None)
        .send(Method::GET, "/v1/threads", None, &[("origin", app)])
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&res, "access-control-allow-origin"), Some(app));
    gw.stop().await;

    // `*`: any origin, without credentials.
    let gw = Gateway::start_with(Backend::Memory, |c| c.cors_origin = vec!["*".into()]).await;
    let res = gw
        .http
        .request(Method::OPTIONS, gw.url("/v1/threads"))
        .header("origin", "https://anywhere.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "access-control-allow-origin"), Some("*"));
    assert!(header(&res, "access-control-allow-credentials").is_none());
    gw.stop().await;

    // Without --cors-origin, no permission at all.
    let gw = Gateway::start(Backend::Memory).await;
    let res = gw
        .http
        .request(Method::OPTIONS, gw.url("/v1/threads"))
        .header("origin", app)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(header(&res, "access-control-allow-origin").is_none());
    gw.stop().await;
}

fn decode(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(bytes, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(bytes).unwrap(),
        other => panic!("{other}"),
    }
    out
}

/// JSON answers are compressed as the client asks; the event stream never is, so an event
/// reaches a client that accepts compression as soon as it is written (a compressed stream
/// would hold it in the encoder's buffer, and this test would wait in vain).
#[tokio::test]
async fn compression_for_json_never_for_events() {
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.sse_keepalive = Duration::from_secs(3600);
    })
    .await;
    let text = "a long message ".repeat(1000);
    gw.create(json!({"id": "big", "messages": [{"role": "user", "content": text}]}))
        .await;
    let plain: Value = gw.get_json("/v1/threads/big").await;
    for encoding in ["gzip", "br", "zstd"] {
        let res = gw
            .http
            .get(gw.url("/v1/threads/big"))
            .header("accept-encoding", encoding)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "content-encoding"), Some(encoding));
        assert!(
            header(&res, "vary")
                .unwrap()
                .to_lowercase()
                .contains("accept-encoding")
        );
        let bytes = res.bytes().await.unwrap();
        assert!(
            bytes.len() < text.len() / 4,
            "{encoding}: {} bytes",
            bytes.len()
        );
        let body: Value = serde_json::from_slice(&decode(encoding, &bytes)).unwrap();
        assert_eq!(body, plain, "{encoding}");
    }
    // Small answers are sent as they are.
    let res = gw
        .http
        .get(gw.url("/healthz"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(header(&res, "content-encoding").is_none());

    // The stream, to a client that accepts every encoding.
    let res = gw
        .http
        .get(gw.url("/v1/threads/big/events"))
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(header(&res, "content-encoding").is_none());
    let mut sse = Sse::new(res);
    gw.append("big", crate::harness::delta_msg("r", None, "hi"))
        .await;
    let e = sse.event().await.expect("the event arrives");
    assert_eq!((e.event.as_str(), e.id), ("delta", Some(1)));
    gw.stop().await;
}

/// Keys at exactly the length limit, with characters that JSON escapes to six bytes, are
/// stored (indexes included) and read back; one byte more is `400 limit_exceeded`.
async fn keys_at_the_limit(gw: &Gateway) {
    let key = |c: char| std::iter::repeat_n(c, 256).collect::<String>();
    let at_limit = key('\u{1}');
    let thread = json!({"id": "k", "resource_id": at_limit, "parent_thread_id": key('"'),
        "messages": [{"id": key('\\'), "role": "user", "content": "x",
            "metadata": {"run_id": key('\u{2}')}}]});
    gw.create(thread).await;
    let delta = json!({"run_id": key('\u{3}'), "parent_run_id": key('a'), "reason": "RunFinished",
        "run_meta": {"agent_id": "a", "origin": "user", "status": "done"},
        "messages": [{"id": key('\u{4}'), "role": "assistant", "content": "y"}], "patches": []});
    gw.append("k", delta).await;
    gw.post("/v1/threads/k/flush", &json!(null)).await;
    let stored = gw.get_json("/v1/threads/k").await;
    assert_eq!(stored["resource_id"], at_limit);
    assert_eq!(stored["messages"].as_array().unwrap().len(), 2, "{stored}");
    let runs = gw.get_json("/v1/threads/k/runs").await;
    assert_eq!(runs[0]["run_id"], key('\u{3}'));
    let listed = gw
        .get_json(&format!("/v1/threads?resource_id={}", "%01".repeat(256)))
        .await;
    assert_eq!(listed["threads"][0]["id"], "k");
}

#[tokio::test]
async fn keys_at_the_limit_are_stored_on_every_backend() {
    for backend in [Backend::Memory, Backend::File, Backend::Postgres] {
        let gw = Gateway::start(backend).await;
        keys_at_the_limit(&gw).await;
        gw.stop().await;
    }
    let gw = Gateway::start_buffered(Backend::Postgres, &nats_url(), |_| {}).await;
    keys_at_the_limit(&gw).await;
    gw.stop().await;
}

/// Every per-request limit answers a clear 400 naming the field, and changes nothing.
#[tokio::test]
async fn limits_answer_clear_4xx() {
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.max_delta_messages = 3;
        c.max_delta_ops = 4;
    })
    .await;
    gw.create(json!({"id": "t"})).await;
    let msg = |i: usize| json!({"role": "user", "content": format!("m{i}")});
    let ops = |n: usize| {
        (0..n)
            .map(|i| json!({"op": "set", "path": [format!("k{i}")], "value": i}))
            .collect::<Vec<_>>()
    };
    let delta = |messages: Vec<Value>, patches: Vec<Value>| json!({"run_id": "r", "reason": "AssistantTurnCommitted", "messages": messages, "patches": patches});
    let over = [
        (delta((0..4).map(msg).collect(), vec![]), "messages"),
        (
            delta(vec![], vec![json!({"patch": {"ops": ops(5)}})]),
            "patches",
        ),
        (
            delta(
                vec![],
                vec![
                    json!({"patch": {"ops": ops(2)}}),
                    json!({"patch": {"ops": ops(3)}}),
                ],
            ),
            "patches",
        ),
        (
            delta(vec![], vec![json!({"patch": {"ops": []}}); 5]),
            "patches",
        ),
        (
            delta(
                vec![json!({"id": "i".repeat(257), "role": "user", "content": ""})],
                vec![],
            ),
            "messages[0].id",
        ),
        (
            json!({"run_id": "r".repeat(257), "reason": "RunFinished", "messages": [], "patches": []}),
            "run_id",
        ),
    ];
    for (body, field) in over {
        let res = gw.post("/v1/threads/t/deltas", &body).await;
        let problem = expect_problem(res, StatusCode::BAD_REQUEST, "limit_exceeded").await;
        assert_eq!(problem["field"], field, "{problem}");
    }
    let fits = delta(
        (0..3).map(msg).collect(),
        vec![
            json!({"patch": {"ops": ops(2)}}),
            json!({"patch": {"ops": ops(2)}}),
        ],
    );
    assert_eq!(
        gw.append("t", fits).await,
        1,
        "nothing before changed the thread"
    );
    for (body, field) in [
        (json!({"resource_id": "r".repeat(257)}), "resource_id"),
        (
            json!({"parent_thread_id": "p".repeat(257)}),
            "parent_thread_id",
        ),
        (
            json!({"messages": [{"id": "i".repeat(257), "role": "user", "content": ""}]}),
            "messages[0].id",
        ),
    ] {
        let res = gw.post("/v1/threads", &body).await;
        let problem = expect_problem(res, StatusCode::BAD_REQUEST, "limit_exceeded").await;
        assert_eq!(problem["field"], field);
        let res = gw.send(Method::PUT, "/v1/threads/t", Some(&body)).await;
        let problem = expect_problem(res, StatusCode::BAD_REQUEST, "limit_exceeded").await;
        assert_eq!(problem["field"], field);
    }
    // Idempotency-Key: 255 characters are fine, 256 are not.
    for (len, ok) in [(255, true), (256, false)] {
        let res = gw
            .http
            .post(gw.url("/v1/threads/t/deltas"))
            .header("idempotency-key", "k".repeat(len))
            .json(&delta(vec![], vec![]))
            .send()
            .await
            .unwrap();
        if ok {
            assert_eq!(res.status(), StatusCode::OK);
        } else {
            let problem = expect_problem(res, StatusCode::BAD_REQUEST, "invalid_header").await;
            assert_eq!(problem["field"], "Idempotency-Key");
        }
    }
    assert_eq!(gw.get_json("/v1/threads/t").await["version"], 2);
    gw.stop().await;
}

/// Streams per caller and in total: the next one is `429 too_many_streams`; a closed stream
/// frees its place.
#[tokio::test]
async fn stream_limits() {
    let gw = start(Mode::Direct(Backend::Memory), |c| {
        c.max_streams = 3;
        c.max_streams_per_caller = 2;
        c.sse_keepalive = Duration::from_millis(100);
    })
    .await;
    let (alice, bob) = (Caller::new(&gw, Some(ALICE)), Caller::new(&gw, Some(BOB)));
    for (who, id) in [(&alice, "a"), (&bob, "b")] {
        who.post_expect("/v1/threads", &json!({"id": id}), StatusCode::CREATED)
            .await;
    }
    let first = alice.events("/v1/threads/a/events").await;
    let _second = alice.events("/v1/threads/a/events").await;
    let res = alice.get("/v1/threads/a/events").await;
    assert!(header(&res, "retry-after").is_some());
    let problem = expect_problem(res, StatusCode::TOO_MANY_REQUESTS, "too_many_streams").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("--max-streams-per-caller")
    );
    let _third = bob.events("/v1/threads/b/events").await;
    let res = bob.get("/v1/threads/b/events").await;
    let problem = expect_problem(res, StatusCode::TOO_MANY_REQUESTS, "too_many_streams").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("--max-streams)"),
        "{problem}"
    );
    // A refused stream did no backend work: even a missing thread is refused the same way.
    let res = bob.get("/v1/threads/nowhere/events").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(metric(&gw, "threadgate_sse_rejected_total{limit=\"caller\"}").await >= Some(1.0));
    assert!(metric(&gw, "threadgate_sse_rejected_total{limit=\"total\"}").await >= Some(2.0));
    // Alice closes one: once the gateway notices (at the next keep-alive), Alice may open one.
    drop(first);
    eventually(Duration::from_secs(20), || async {
        alice.get("/v1/threads/a/events?after=0").await.status() == StatusCode::OK
    })
    .await;
    gw.stop().await;
}

/// A request that takes longer than `--request-timeout` once it has arrived is answered
/// `503 timeout` (here an append waiting on a row another transaction holds).
#[tokio::test]
async fn slow_requests_time_out() {
    use sqlx::Connection;
    let schema = PgSchema::create().await;
    let options = schema.options();
    let mut config = threadgate::config::Config::for_tests(&schema.url());
    config.request_timeout = Duration::from_secs(1);
    let gw = Gateway::start_config(config, None, Some(schema)).await;
    gw.create(json!({"id": "t"})).await;
    let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM threads WHERE id = 't' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let res = gw
        .post(
            "/v1/threads/t/deltas",
            &crate::harness::delta_msg("r", None, "x"),
        )
        .await;
    assert_eq!(header(&res, "retry-after"), Some("1"));
    let problem = expect_problem(res, StatusCode::SERVICE_UNAVAILABLE, "timeout").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    // Reads are not held up by the lock, and nothing is lost once it is released.
    assert_eq!(gw.get_json("/v1/threads/t").await["version"], 0);
    tx.rollback().await.unwrap();
    let v = gw
        .append("t", crate::harness::delta_msg("r", None, "y"))
        .await;
    assert!(v >= 1);
    gw.stop().await;
}

/// Request metrics by route template and status, and the append and delivery latencies.
#[tokio::test]
async fn request_metrics_by_route() {
    let gw = Gateway::start(Backend::Memory).await;
    gw.create(json!({"id": "m"})).await;
    let res = gw
        .http
        .get(gw.url("/v1/threads/m/events"))
        .send()
        .await
        .unwrap();
    let mut sse = Sse::new(res);
    gw.append("m", crate::harness::delta_msg("r", None, "x"))
        .await;
    sse.event().await.unwrap();
    gw.get("/v1/threads/m").await;
    gw.get("/v1/threads/missing").await;
    gw.get("/no/such/route").await;
    let m = |s: &'static str| metric(&gw, s);
    assert_eq!(
        m("threadgate_http_requests_total{method=\"GET\",route=\"/v1/threads/{id}\",status=\"200\"}").await,
        Some(1.0)
    );
    assert_eq!(
        m("threadgate_http_requests_total{method=\"GET\",route=\"/v1/threads/{id}\",status=\"404\"}").await,
        Some(1.0)
    );
    assert_eq!(
        m("threadgate_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        m("threadgate_http_requests_total{method=\"POST\",route=\"/v1/threads/{id}/deltas\",status=\"200\"}").await,
        Some(1.0)
    );
    assert!(
        m("threadgate_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/threads/{id}\"}")
            .await
            >= Some(2.0)
    );
    assert_eq!(
        m("threadgate_append_duration_seconds_count").await,
        Some(1.0)
    );
    assert_eq!(m("threadgate_sse_delivery_seconds_count").await, Some(1.0));
    gw.stop().await;
}

/// Buffered mode: the sweeper reports the entries not folded yet and the oldest one's age,
/// and both return to 0 once the idle thread is folded.
#[tokio::test]
async fn buffered_pending_metrics() {
    let gw = Gateway::start_buffered(Backend::Memory, &nats_url(), |c| {
        c.fold_idle = Duration::from_secs(3);
    })
    .await;
    gw.create(json!({"id": "p"})).await;
    for i in 0..3 {
        gw.append("p", crate::harness::delta_msg("r", None, &format!("{i}")))
            .await;
    }
    eventually(Duration::from_secs(20), || async {
        metric(&gw, "threadgate_buffered_pending_entries").await == Some(3.0)
            && metric(&gw, "threadgate_buffered_oldest_pending_seconds").await > Some(0.0)
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        metric(&gw, "threadgate_buffered_pending_entries").await == Some(0.0)
            && metric(&gw, "threadgate_buffered_oldest_pending_seconds").await == Some(0.0)
    })
    .await;
    assert!(metric(&gw, "threadgate_fold_duration_seconds_count").await >= Some(1.0));
    assert_eq!(gw.get_json("/v1/threads/p").await["version"], 3);
    gw.stop().await;
}
