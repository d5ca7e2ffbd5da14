//! Buffered mode (NATS JetStream + a snapshot store): each fault of the reference crate's
//! buffered writer that issue 3 lists has a test here (or in `crash.rs`) that would catch it.

use crate::harness::{Backend, Gateway, NatsServer, delta_msg, enc, expect_problem, nats_url};
use crate::pg::PgSchema;
use crate::proxy::postgres_via_proxy;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use threadgate::config::Config;
use threadgate::id::ThreadId;

async fn gw(backend: Backend) -> Gateway {
    Gateway::start_buffered(backend, &nats_url(), |_| {}).await
}

fn texts(t: &Value) -> Vec<String> {
    t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

async fn flush(gw: &Gateway, id: &str) -> Value {
    let res = gw
        .post(&format!("/v1/threads/{}/flush", enc(id)), &json!({}))
        .await;
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "flush {id}: {body}");
    body
}

/// Faults 1 and 12: appends are buffered (the store view does not move, `view=live` does,
/// each saying which version it reflects); RunFinished folds before answering.
#[tokio::test]
async fn buffered_reads_and_run_end_fold() {
    for backend in [Backend::Memory, Backend::Postgres] {
        let gw = gw(backend).await;
        gw.create(json!({"id": "t", "state": {"n": 0}})).await;
        let inc = json!({"run_id": "r", "reason": "AssistantTurnCommitted",
            "messages": [{"role": "assistant", "content": "step"}],
            "patches": [{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]});
        for v in 1..=3 {
            assert_eq!(gw.append("t", inc.clone()).await, v);
        }
        let stored = gw.get_json("/v1/threads/t").await;
        assert_eq!(
            stored["version"], 0,
            "the store is not written during the run"
        );
        assert_eq!(texts(&stored).len(), 0);
        let live = gw.get_json("/v1/threads/t?view=live").await;
        assert_eq!(live["version"], 3);
        assert_eq!(texts(&live), vec!["step"; 3]);
        assert_eq!(
            gw.get_json("/v1/threads/t/state?view=live").await,
            json!({"state": {"n": 3}, "version": 3})
        );
        let page = gw
            .get_json("/v1/threads/t/messages?view=live&limit=2")
            .await;
        assert_eq!(page["version"], 3);
        assert_eq!(page["has_more"], true);
        let res = gw
            .http
            .get(gw.url("/v1/threads/t?view=live"))
            .header("if-none-match", "\"3\"")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED);

        let res = gw
            .post(
                "/v1/threads/t/deltas",
                &json!({"run_id": "r", "reason": "RunFinished", "messages": [], "patches": []}),
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.json::<Value>().await.unwrap(),
            json!({"version": 4, "flushed": true})
        );
        let stored = gw.get_json("/v1/threads/t").await;
        assert_eq!(
            stored["version"], 4,
            "RunFinished folded the run before answering"
        );
        assert_eq!(texts(&stored).len(), 3);
        assert_eq!(
            gw.get_json("/v1/threads/t/state").await["state"],
            json!({"n": 3})
        );
        gw.stop().await;
    }
}

/// Fault 2: any number of concurrent folds, recoveries and appends on one thread are safe.
#[tokio::test]
async fn concurrent_folds_and_recoveries() {
    let schema = PgSchema::create().await;
    let prefix = crate::harness::nats_prefix();
    let mk = |c: &mut Config| {
        c.nats_url = Some(nats_url());
        c.nats_prefix = prefix.clone();
    };
    let mut a_cfg = Config::for_tests(&schema.url());
    mk(&mut a_cfg);
    let a = Gateway::start_config(a_cfg, None, None).await;
    a.create(json!({"id": "t"})).await;
    let mut total = 0;
    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (http, base) = (a.http.clone(), a.base.clone());
            tasks.push(tokio::spawn(async move {
                let msg = delta_msg(
                    "r",
                    Some(&format!("m{round}-{i}")),
                    &format!("m{round}-{i}"),
                );
                let res = http
                    .post(format!("{base}/v1/threads/t/deltas"))
                    .json(&msg)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                let res = http
                    .post(format!("{base}/v1/threads/t/flush"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    res.status(),
                    StatusCode::OK,
                    "{}",
                    res.text().await.unwrap()
                );
            }));
        }
        // A second process starting up (recovery) while the folds run.
        let mut b_cfg = Config::for_tests(&schema.url());
        mk(&mut b_cfg);
        let b = Gateway::start_config(b_cfg, None, None)
            .await
            .shares_streams();
        let res = b.post("/v1/threads/t/flush", &json!({})).await;
        assert_eq!(res.status(), StatusCode::OK);
        for t in tasks {
            t.await.unwrap();
        }
        b.stop().await;
        total += 10;
    }
    flush(&a, "t").await;
    let t = a.get_json("/v1/threads/t").await;
    assert_eq!(t["version"], total);
    let mut got = texts(&t);
    got.sort();
    let mut want: Vec<String> = (0..5)
        .flat_map(|r| (0..10).map(move |i| format!("m{r}-{i}")))
        .collect();
    want.sort();
    assert_eq!(got, want, "every delta folded exactly once");
    a.stop().await;
    drop(schema);
}

/// Fault 3: ids with `.`, `*`, `>` work, and no id's fold touches another thread's data.
#[tokio::test]
async fn special_ids_stay_apart() {
    let gw = gw(Backend::Memory).await;
    let ids = ["a.b", "a", "*", ">", "a.*", "b"];
    for id in ids {
        gw.create(json!({"id": id})).await;
        for i in 0..3 {
            gw.append(id, delta_msg("r", None, &format!("{id}-{i}")))
                .await;
        }
    }
    // Folding `*` and `>` first must leave every other thread's tail alone.
    flush(&gw, "*").await;
    flush(&gw, ">").await;
    for id in ids {
        let live = gw
            .get_json(&format!("/v1/threads/{}?view=live", enc(id)))
            .await;
        assert_eq!(
            texts(&live),
            (0..3).map(|i| format!("{id}-{i}")).collect::<Vec<_>>(),
            "{id}"
        );
    }
    for id in ids {
        flush(&gw, id).await;
        let stored = gw.get_json(&format!("/v1/threads/{}", enc(id))).await;
        assert_eq!(
            texts(&stored),
            (0..3).map(|i| format!("{id}-{i}")).collect::<Vec<_>>(),
            "{id}"
        );
        assert_eq!(stored["version"], 3);
    }
    gw.stop().await;
}

/// Fault 4: an undecodable buffered message is set aside to the dead-letter subject, left in
/// the log, and the fold reports it instead of skipping data.
#[tokio::test]
async fn undecodable_messages_are_set_aside_not_deleted() {
    let prefix = crate::harness::nats_prefix();
    let p = prefix.clone();
    let gw = Gateway::start_with(Backend::Memory, move |c| {
        c.nats_url = Some(nats_url());
        c.nats_prefix = p;
    })
    .await;
    gw.create(json!({"id": "t"})).await;
    gw.append("t", delta_msg("r", None, "good")).await;
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let subject = format!("{prefix}.log.{}", ThreadId::parse("t").unwrap().encoded());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Tg-Version", "2");
    js.publish_with_headers(subject.clone(), headers, "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let res = gw.post("/v1/threads/t/flush", &json!({})).await;
    let p = expect_problem(res, StatusCode::INTERNAL_SERVER_ERROR, "fold_blocked").await;
    assert!(
        p["detail"].as_str().unwrap().contains("does not decode"),
        "{p}"
    );
    // Nothing was deleted: the bad message is still in the log, and a copy is in the
    // dead-letter stream.
    let log = js.get_stream(format!("{prefix}_log")).await.unwrap();
    let last = log.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(&last.payload[..], b"{not json");
    let mut dead = js.get_stream(format!("{prefix}_dead")).await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 1);
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("threadgate_dead_letters_total 1"),
        "{metrics}"
    );
    gw.stop().await;
}

/// Fault 6: a full save goes through the log like any write: nothing newer is purged.
#[tokio::test]
async fn full_save_keeps_newer_deltas() {
    let gw = gw(Backend::Postgres).await;
    gw.create(json!({"id": "t"})).await;
    gw.append("t", delta_msg("r", None, "before")).await;
    let put = gw
        .http
        .put(gw.url("/v1/threads/t"))
        .header("if-match", "\"1\"")
        .json(&json!({"messages": [{"role": "user", "content": "saved"}], "state": {"s": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(put.json::<Value>().await.unwrap()["version"], 2);
    gw.append("t", delta_msg("r", None, "after")).await;
    flush(&gw, "t").await;
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(texts(&t), vec!["saved", "after"]);
    assert_eq!(t["state"], json!({"s": 1}));
    assert_eq!(t["version"], 3);
    gw.stop().await;
}

/// Fault 7: the version is real and If-Match is a compare-and-set across replicas.
#[tokio::test]
async fn if_match_races_across_replicas() {
    let schema = PgSchema::create().await;
    let prefix = crate::harness::nats_prefix();
    let start = || {
        let mut c = Config::for_tests(&schema.url());
        c.nats_url = Some(nats_url());
        c.nats_prefix = prefix.clone();
        Gateway::start_config(c, None, None)
    };
    let (a, b) = (start().await, start().await);
    a.create(json!({"id": "t"})).await;
    for v in 0..20u64 {
        let send = |gw: &Gateway, who: &str| {
            gw.http
                .post(gw.url("/v1/threads/t/deltas"))
                .header("if-match", format!("\"{v}\""))
                .json(&delta_msg("r", None, &format!("{who}{v}")))
                .send()
        };
        let (ra, rb) = tokio::join!(send(&a, "a"), send(&b, "b"));
        let (sa, sb) = (ra.unwrap().status(), rb.unwrap().status());
        let ok = [sa, sb].iter().filter(|s| **s == StatusCode::OK).count();
        let lost = [sa, sb]
            .iter()
            .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
            .count();
        assert_eq!((ok, lost), (1, 1), "round {v}: {sa} / {sb}");
    }
    // Without If-Match both replicas' appends land, with distinct real versions.
    let (va, vb) = tokio::join!(
        a.append("t", delta_msg("r", None, "x")),
        b.append("t", delta_msg("r", None, "y"))
    );
    let mut vs = [va, vb];
    vs.sort();
    assert_eq!(vs, [21, 22]);
    flush(&b, "t").await;
    assert_eq!(a.get_json("/v1/threads/t").await["version"], 22);
    a.stop().await;
    b.stop().await;
}

/// Fault 9: run_meta on the buffered path writes run records.
#[tokio::test]
async fn run_records_survive_buffering() {
    let gw = gw(Backend::Postgres).await;
    gw.create(json!({"id": "t"})).await;
    let meta = |status: &str| json!({"agent_id": "a", "origin": "subagent", "status": status, "input_tokens": 3, "output_tokens": 4});
    gw.append("t", json!({"run_id": "run-9", "reason": "AssistantTurnCommitted", "run_meta": meta("running"), "messages": [], "patches": []})).await;
    gw.append("t", json!({"run_id": "run-9", "reason": "RunFinished", "run_meta": meta("done"), "messages": [], "patches": []})).await;
    let run = gw.get_json("/v1/threads/t/runs/run-9").await;
    assert_eq!(run["meta"]["status"], "done");
    assert_eq!(run["meta"]["origin"], "subagent");
    assert_eq!(run["version"], 2);
    gw.stop().await;
}

/// Fault 10: a deleted thread never comes back from a late fold.
#[tokio::test]
async fn deleted_threads_stay_deleted() {
    let gw = gw(Backend::Postgres).await;
    gw.create(json!({"id": "t"})).await;
    for i in 0..5 {
        gw.append("t", delta_msg("r", None, &format!("m{i}"))).await;
    }
    let del = gw
        .http
        .delete(gw.url("/v1/threads/t"))
        .header("if-match", "\"5\"")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    expect_problem(
        gw.post("/v1/threads/t/flush", &json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        gw.get("/v1/threads/t").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        gw.get("/v1/threads/t?view=live").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        gw.post("/v1/threads/t/deltas", &delta_msg("r", None, "late"))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // The same id starts empty: nothing of the old thread leaks in.
    gw.create(json!({"id": "t"})).await;
    gw.append("t", delta_msg("r", None, "new")).await;
    flush(&gw, "t").await;
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(texts(&t), vec!["new"]);
    assert_eq!(t["version"], 1);
    gw.stop().await;
}

/// Fault 11: idle tails are folded by the sweeper, long before any retention limit.
#[tokio::test]
async fn idle_threads_are_folded() {
    let gw = Gateway::start_buffered(Backend::Memory, &nats_url(), |c| {
        c.fold_idle = Duration::from_millis(300)
    })
    .await;
    gw.create(json!({"id": "idle"})).await;
    gw.append("idle", delta_msg("r", None, "abandoned run"))
        .await;
    let mut folded = false;
    for _ in 0..100 {
        if gw.get_json("/v1/threads/idle").await["version"] == 1 {
            folded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(folded, "the idle sweeper folded the abandoned run");
    gw.stop().await;
}

/// Completed folds so far, from `/metrics`.
async fn folds(gw: &Gateway) -> u64 {
    metric(gw, "threadgate_folds_total").await
}

/// A counter from `/metrics`.
async fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = gw.get("/metrics").await.text().await.unwrap();
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Idle threads cost no folds: a folded thread whose entries are kept for retries is not
/// folded again at every sweep; once its kept entries leave the window they are trimmed by
/// one purge, without a fold (which empties its subject); a later append to it is still
/// folded by the sweeper.
#[tokio::test]
async fn folded_idle_threads_are_not_folded_again() {
    let prefix = crate::harness::nats_prefix();
    let p = prefix.clone();
    let gw = Gateway::start_with(Backend::Memory, move |c| {
        c.nats_url = Some(nats_url());
        c.nats_prefix = p;
        c.fold_idle = Duration::from_millis(200);
        c.keep_folded = Duration::from_secs(3);
    })
    .await;
    let ids: Vec<String> = (0..5).map(|i| format!("idle-{i}")).collect();
    for id in &ids {
        gw.create(json!({ "id": id })).await;
        gw.append(id, delta_msg("r", None, "once")).await;
        flush(&gw, id).await;
    }
    let after_flush = folds(&gw).await;
    // About twenty sweeper passes (every 100 ms) while the entries are kept for retries.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        folds(&gw).await,
        after_flush,
        "no fold of a thread with nothing new while its entries are kept"
    );
    assert_eq!(metric(&gw, "threadgate_log_trims_total").await, 0);
    // Once the kept entries leave the window: one trim each and no fold, then nothing.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        metric(&gw, "threadgate_log_trims_total").await,
        ids.len() as u64,
        "one trim per thread"
    );
    assert_eq!(folds(&gw).await, after_flush, "a trim is not a fold");
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let log = js.get_stream(format!("{prefix}_log")).await.unwrap();
    for id in &ids {
        let subject = format!("{prefix}.log.{}", ThreadId::parse(id).unwrap().encoded());
        assert!(
            log.get_last_raw_message_by_subject(&subject).await.is_err(),
            "{id}: the kept entries are gone"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        metric(&gw, "threadgate_log_trims_total").await,
        ids.len() as u64,
        "an emptied subject costs nothing"
    );
    assert_eq!(folds(&gw).await, after_flush);
    // New entries are still folded by the sweeper.
    gw.append(&ids[0], delta_msg("r", None, "later")).await;
    let mut folded = false;
    for _ in 0..50 {
        if gw.get_json(&format!("/v1/threads/{}", ids[0])).await["version"] == 2 {
            folded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(folded, "the sweeper folded the new entry");
    gw.stop().await;
}

/// Idempotency-Key maps to JetStream de-duplication: a retry never appends twice.
#[tokio::test]
async fn idempotent_retries_in_buffered_mode() {
    let gw = gw(Backend::Memory).await;
    gw.create(json!({"id": "t"})).await;
    let send = |body: Value| {
        gw.http
            .post(gw.url("/v1/threads/t/deltas"))
            .header("idempotency-key", "k")
            .json(&body)
            .send()
    };
    let first = send(delta_msg("r", None, "once")).await.unwrap();
    assert_eq!(first.json::<Value>().await.unwrap()["version"], 1);
    gw.append("t", delta_msg("r", None, "other")).await;
    let retry = send(delta_msg("r", None, "once")).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["version"], 1);
    let reused = send(delta_msg("r", None, "changed")).await.unwrap();
    expect_problem(
        reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    // Also after the fold.
    flush(&gw, "t").await;
    let retry = send(delta_msg("r", None, "once")).await.unwrap();
    assert_eq!(retry.json::<Value>().await.unwrap()["version"], 1);
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(texts(&t), vec!["once", "other"]);
    gw.stop().await;
}

/// A delta whose patch does not apply to the live state (store + buffered tail) is a 400.
#[tokio::test]
async fn validation_sees_the_buffered_tail() {
    let gw = gw(Backend::Memory).await;
    gw.create(json!({"id": "t"})).await;
    gw.append(
        "t",
        json!({"run_id": "r", "reason": "AssistantTurnCommitted", "messages": [],
        "patches": [{"patch": {"ops": [{"op": "set", "path": ["list"], "value": []}]}}]}),
    )
    .await;
    let ok = json!({"run_id": "r", "reason": "AssistantTurnCommitted", "messages": [],
        "patches": [{"patch": {"ops": [{"op": "insert", "path": ["list"], "index": 0, "value": 1}]}}]});
    assert_eq!(gw.append("t", ok).await, 2);
    let bad = json!({"run_id": "r", "reason": "AssistantTurnCommitted", "messages": [],
        "patches": [{"patch": {"ops": [{"op": "increment", "path": ["list"], "amount": 1}]}}]});
    expect_problem(
        gw.post("/v1/threads/t/deltas", &bad).await,
        StatusCode::BAD_REQUEST,
        "invalid_patch",
    )
    .await;
    assert_eq!(gw.get_json("/v1/threads/t?view=live").await["version"], 2);
    gw.stop().await;
}

/// NATS down: appends answer 503, reads keep working from the store, writes resume after.
#[tokio::test]
async fn nats_outage_is_503_and_recovers() {
    let mut nats = NatsServer::start().await;
    let gw = Gateway::start_buffered(Backend::Memory, &nats.url(), |_| {}).await;
    gw.create(json!({"id": "t"})).await;
    gw.append("t", delta_msg("r", None, "before")).await;
    flush(&gw, "t").await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = gw
        .post("/v1/threads/t/deltas", &delta_msg("r", None, "during"))
        .await;
    let p = expect_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert!(p["detail"].as_str().unwrap().contains("NATS"), "{p}");
    assert_eq!(
        texts(&gw.get_json("/v1/threads/t").await),
        vec!["before"],
        "reads keep working"
    );
    expect_problem(
        gw.get("/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    )
    .await;
    nats.restart().await;
    let mut resumed = false;
    for _ in 0..100 {
        if gw
            .post("/v1/threads/t/deltas", &delta_msg("r", None, "after"))
            .await
            .status()
            == StatusCode::OK
        {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "writes resume once NATS is back");
    flush(&gw, "t").await;
    assert_eq!(
        texts(&gw.get_json("/v1/threads/t").await),
        vec!["before", "after"]
    );
    gw.stop().await;
}

/// PostgreSQL down during a fold: the tail stays buffered, the fold is retried, nothing lost.
#[tokio::test]
async fn store_outage_during_fold_loses_nothing() {
    let schema = PgSchema::create().await;
    let (proxy, via) = postgres_via_proxy(&schema.url()).await;
    let mut config = Config::for_tests(&via);
    config.nats_url = Some(nats_url());
    config.nats_prefix = crate::harness::nats_prefix();
    config.fold_idle = Duration::from_millis(200);
    let gw = Gateway::start_config(config, None, Some(schema)).await;
    gw.create(json!({"id": "t"})).await;
    proxy.cut();
    // Appends only need NATS: they succeed during the store outage.
    for i in 0..3 {
        assert_eq!(
            gw.append("t", delta_msg("r", None, &format!("m{i}"))).await,
            i + 1
        );
    }
    let res = gw
        .post(
            "/v1/threads/t/deltas",
            &json!({"run_id": "r", "reason": "RunFinished", "messages": [], "patches": []}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap()["flushed"],
        false,
        "the fold could not run"
    );
    expect_problem(
        gw.post("/v1/threads/t/flush", &json!({})).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    )
    .await;
    expect_problem(
        gw.get("/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    )
    .await;
    proxy.restore();
    // The sweeper retries with back-off and folds the tail once the store is back.
    let mut folded = None;
    for _ in 0..200 {
        let t = gw.get_json("/v1/threads/t").await;
        if t["version"] == 4 {
            folded = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = folded.expect("the tail was folded after the outage");
    assert_eq!(texts(&t), vec!["m0", "m1", "m2"]);
    gw.stop().await;
}

/// A retry whose original was folded and trimmed from the log (as happens two minutes after
/// a fold) is answered from the keys the store remembered: same version, nothing appended,
/// also with a stale If-Match; another body with the key is still refused.
#[tokio::test]
async fn idempotent_retry_after_the_log_was_trimmed() {
    let prefix = crate::harness::nats_prefix();
    let p = prefix.clone();
    let gw = Gateway::start_with(Backend::Postgres, move |c| {
        c.nats_url = Some(nats_url());
        c.nats_prefix = p;
    })
    .await;
    gw.create(json!({"id": "t"})).await;
    let send = |body: Value, if_match: Option<&'static str>| {
        let mut req = gw
            .http
            .post(gw.url("/v1/threads/t/deltas"))
            .header("idempotency-key", "k-trim");
        if let Some(m) = if_match {
            req = req.header("if-match", m);
        }
        req.json(&body).send()
    };
    let first = send(delta_msg("r", None, "once"), Some("\"0\""))
        .await
        .unwrap();
    assert_eq!(first.json::<Value>().await.unwrap()["version"], 1);
    gw.append("t", delta_msg("r", None, "other")).await;
    flush(&gw, "t").await;
    // Trim the subject the way the fold does once its keep window has passed.
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let subject = format!("{prefix}.log.{}", ThreadId::parse("t").unwrap().encoded());
    let log = js.get_stream(format!("{prefix}_log")).await.unwrap();
    log.purge().filter(subject.clone()).await.unwrap();
    assert!(
        log.get_last_raw_message_by_subject(&subject).await.is_err(),
        "the log is empty"
    );

    for if_match in [None, Some("\"0\"")] {
        let retry = send(delta_msg("r", None, "once"), if_match).await.unwrap();
        assert_eq!(
            retry.status(),
            StatusCode::OK,
            "retry with If-Match {if_match:?}"
        );
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.json::<Value>().await.unwrap()["version"], 1);
    }
    let reused = send(delta_msg("r", None, "changed"), None).await.unwrap();
    expect_problem(
        reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    flush(&gw, "t").await;
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(texts(&t), vec!["once", "other"]);
    assert_eq!(t["version"], 2);
    gw.stop().await;
}

/// The consumers on a prefix's log stream.
async fn log_consumers(prefix: &str) -> usize {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut log = js.get_stream(format!("{prefix}_log")).await.unwrap();
    log.info().await.unwrap().state.consumer_count
}

/// A fold reads what is new, not the entries kept for retries that this process folded
/// before (issue 11: a fold re-read up to two minutes of folded log every time). Observable on
/// NATS: a read of more than a few entries creates a consumer on the log stream, a read of
/// one entry does not; so after a 20-entry fold, folds of one new entry each add none.
#[tokio::test]
async fn a_fold_does_not_read_the_kept_entries_again() {
    let prefix = crate::harness::nats_prefix();
    let p = prefix.clone();
    let gw = Gateway::start_with(Backend::Memory, move |c| {
        c.nats_url = Some(nats_url());
        c.nats_prefix = p;
        c.fold_idle = Duration::from_secs(3600);
    })
    .await;
    gw.create(json!({"id": "t"})).await;
    for i in 0..20 {
        gw.append("t", delta_msg("r", Some(&format!("a{i}")), "kept"))
            .await;
    }
    assert_eq!(flush(&gw, "t").await["applied"], 20);
    let consumers = log_consumers(&prefix).await;
    for round in 0..3u64 {
        gw.append("t", delta_msg("r", Some(&format!("b{round}")), "new"))
            .await;
        let report = flush(&gw, "t").await;
        assert_eq!(
            (report["applied"].as_u64(), report["version"].as_u64()),
            (Some(1), Some(21 + round)),
            "{report}"
        );
    }
    assert_eq!(
        log_consumers(&prefix).await,
        consumers,
        "folds of one new entry read only that entry (no consumer over the kept ones)"
    );
    // Everything is in the store, once, in order.
    let thread = gw.get_json("/v1/threads/t?view=store").await;
    let ids: Vec<&str> = thread["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let mut want: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    want.extend((0..3).map(|i| format!("b{i}")));
    assert_eq!(ids, want);
    gw.stop().await;
}
