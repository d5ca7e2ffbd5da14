//! Clients that hang up mid-request (issue 7 F): a write, once started, runs to completion on
//! its own, and no pooled PostgreSQL connection is ever handed on inside a transaction.

use crate::harness::Process;
use crate::pg::PgSchema;
use crate::support::eventually;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Appends aborted by their clients.
const ABORTED: usize = 300;
/// How long the aborted appends may take to finish on their own (a hang guard).
const SETTLE: Duration = Duration::from_secs(20);

/// Sends a whole append request and resets the connection at once (what a closed tab or a
/// proxy timeout does), without reading the answer.
async fn append_and_hang_up(addr: std::net::SocketAddr, i: usize) {
    let body = json!({"run_id": "r", "reason": "AssistantTurnCommitted", "patches": [],
        "messages": [{"id": format!("m{i}"), "role": "assistant", "content": format!("step {i}")}]})
    .to_string();
    let request = format!(
        "POST /v1/threads/t/deltas HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         idempotency-key: k{i}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    // A few milliseconds for the request to reach the handler, then RST.
    tokio::time::sleep(Duration::from_millis((i % 5) as u64)).await;
    // A zero linger never blocks the drop (that deprecation warns about positive ones).
    #[allow(deprecated)]
    conn.set_linger(Some(Duration::ZERO)).unwrap();
    drop(conn);
}

#[tokio::test]
async fn aborted_appends_leave_no_connection_in_a_transaction() {
    let schema = PgSchema::create().await;
    let app = format!("tg-abort-{}", uuid::Uuid::now_v7().simple());
    let url = format!("{}&application_name={app}", schema.url());
    let mut gw = Process::spawn(&["--store", &url]).await;
    let http = reqwest::Client::new();
    let base = gw.base();
    let res = http
        .post(format!("{base}/v1/threads"))
        .json(&json!({"id": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);

    futures::future::join_all((0..ABORTED).map(|i| append_and_hang_up(gw.addr, i))).await;
    // Every write that started finishes on its own; then the pool is at rest. (A write still
    // running shows as `idle in transaction` between its statements, so wait for the queue
    // to drain; a connection handed back inside a transaction would stay so for ever.)
    let admin = tokio::sync::Mutex::new(
        sqlx::PgConnection::connect(&crate::pg::base_url())
            .await
            .unwrap(),
    );
    let stuck = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND state LIKE 'idle in transaction%'",
        )
        .bind(&app)
        .fetch_one(&mut *admin.lock().await)
        .await
        .unwrap()
    };
    eventually(SETTLE, || async { stuck().await == 0 }).await;
    let mut admin = admin.into_inner();
    let sessions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&app)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(sessions > 0, "the gateway's sessions are visible as {app}");

    // The clients retry with the same keys: each message lands exactly once.
    for i in 0..ABORTED {
        let body = json!({"run_id": "r", "reason": "AssistantTurnCommitted", "patches": [],
            "messages": [{"id": format!("m{i}"), "role": "assistant", "content": format!("step {i}")}]});
        let res = http
            .post(format!("{base}/v1/threads/t/deltas"))
            .header("idempotency-key", format!("k{i}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "retry {i}");
    }
    let t: Value = http
        .get(format!("{base}/v1/threads/t"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<&str> = t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), ABORTED, "each message exactly once");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), ABORTED);
    assert_eq!(t["version"], ABORTED as u64);
    for warning in [
        "already a transaction in progress",
        "no transaction in progress",
    ] {
        assert_eq!(
            gw.log_lines_with(warning),
            Vec::<String>::new(),
            "{warning}"
        );
    }
    gw.terminate().await;
    drop(schema);
}
