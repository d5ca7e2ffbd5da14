//! Direct mode across replicas (issue 12): two gateways on one PostgreSQL schema, no NATS.
//! A stream on one replica carries the writes made through the other (from `LISTEN/NOTIFY`
//! and the history), promptly, in order, with no gap and no repeat; deletes too; and when
//! the listening connection is killed, the replica reconnects, resyncs, and loses nothing.

use crate::harness::{Gateway, delta_msg, enc};
use crate::pg::PgSchema;
use crate::support::resume::{Event, Sse};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};
use threadgate::config::Config;

/// Hang guard for one event (never a speed assertion on its own).
const WAIT: Duration = Duration::from_secs(10);

fn config(schema: &PgSchema, name: &str) -> Config {
    let url = format!("{}&application_name={name}", schema.url());
    Config::for_tests(&url)
}

async fn stream(gw: &Gateway, id: &str, after: u64) -> Sse {
    let url = gw.url(&format!("/v1/threads/{}/events", enc(id)));
    Sse::open(&gw.http, &url, Some(after), WAIT).await.unwrap()
}

/// A pool on the schema, its notification channel, and a listener on that channel.
async fn listen(schema: &PgSchema) -> (sqlx::PgPool, String, sqlx::postgres::PgListener) {
    let pool = sqlx::PgPool::connect(&schema.url()).await.unwrap();
    let channel: String = sqlx::query_scalar("SELECT 'threadgate_' || md5(current_schema())")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(&channel).await.unwrap();
    (pool, channel, listener)
}

/// The next write event (a `delta`, `snapshot` or `metadata` with an id).
async fn next_write(sse: &mut Sse) -> Event {
    loop {
        let e = sse
            .next(WAIT)
            .await
            .expect("an event within the hang guard");
        if e.id.is_some() || e.event == "deleted" {
            return e;
        }
    }
}

#[tokio::test]
async fn a_stream_on_one_replica_carries_the_other_replicas_writes() {
    let schema = PgSchema::create().await;
    let a = Gateway::start_config(config(&schema, "tg-a"), None, None).await;
    let b = Gateway::start_config(config(&schema, "tg-b"), None, None).await;
    let id = "shared café";
    a.create(json!({"id": id})).await;
    let mut on_a = stream(&a, id, 0).await;
    let mut on_b = stream(&b, id, 0).await;

    // Writes through B (and a few through A), each awaited on both streams.
    const N: u64 = 40;
    let mut latencies = Vec::new();
    for v in 1..=N {
        let through = if v % 5 == 0 { &a } else { &b };
        assert_eq!(
            through
                .append(id, delta_msg("r", None, &format!("m{v}")))
                .await,
            v
        );
        let answered = Instant::now();
        for sse in [&mut on_a, &mut on_b] {
            let e = next_write(sse).await;
            assert_eq!(
                (e.event.as_str(), e.id),
                ("delta", Some(v)),
                "no gap, no repeat"
            );
            assert_eq!(e.data["delta"]["messages"][0]["content"], format!("m{v}"));
        }
        latencies.push(answered.elapsed());
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    eprintln!("cross-replica delivery after the append answered: median {median:?}, max {max:?}");
    assert!(
        median < Duration::from_secs(1),
        "writes through the other replica arrive within a second (median {median:?})"
    );

    // A full save and a metadata patch through B reach A's stream as what they are.
    let res = b
        .send(
            Method::PATCH,
            &format!("/v1/threads/{}", enc(id)),
            Some(&json!({"metadata": {"k": "v"}})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let e = next_write(&mut on_a).await;
    assert_eq!(e.id, Some(N + 1));
    assert_eq!(next_write(&mut on_b).await.id, Some(N + 1));

    // A stream resuming on A after a position B wrote is served from the history.
    let mut resumed = stream(&a, id, 3).await;
    for v in 4..=N + 1 {
        assert_eq!(next_write(&mut resumed).await.id, Some(v));
    }
    drop(resumed);

    // Deleted through B: A's stream says so and ends.
    let res = b
        .send(Method::DELETE, &format!("/v1/threads/{}", enc(id)), None)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(next_write(&mut on_a).await.event, "deleted");
    assert!(on_a.next(WAIT).await.is_none(), "the stream ends");
    assert_eq!(next_write(&mut on_b).await.event, "deleted");

    b.stop().await;
    a.stop().await;
    // Shutdown ended the listener with the pool: no session of either replica is left.
    let admin = sqlx::PgPool::connect(&crate::pg::base_url()).await.unwrap();
    crate::support::eventually(WAIT, || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('tg-a', 'tg-b')",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        left == 0
    })
    .await;
    admin.close().await;
    drop(schema);
}

/// Replica A loses its connections to PostgreSQL (a proxy between them is cut); writes
/// committed through B meanwhile are announced to nobody on A. When the connection is back,
/// A's listener reconnects and resyncs, and A's open stream gets those writes, in order, then
/// later ones as before.
#[tokio::test]
async fn a_lost_listener_connection_resyncs() {
    let schema = PgSchema::create().await;
    let (proxy, via) =
        crate::proxy::postgres_via_proxy(&format!("{}&application_name=tg-listen-a", schema.url()))
            .await;
    let a = Gateway::start_config(Config::for_tests(&via), None, None).await;
    let b = Gateway::start_config(config(&schema, "tg-listen-b"), None, None).await;
    a.create(json!({"id": "t"})).await;
    let mut on_a = stream(&a, "t", 0).await;
    assert_eq!(b.append("t", delta_msg("r", None, "before")).await, 1);
    assert_eq!(next_write(&mut on_a).await.id, Some(1));

    proxy.cut();
    // Committed while A cannot listen: these notifications never reach A.
    assert_eq!(b.append("t", delta_msg("r", None, "during 1")).await, 2);
    assert_eq!(b.append("t", delta_msg("r", None, "during 2")).await, 3);
    proxy.restore();
    for (v, text) in [(2, "during 1"), (3, "during 2")] {
        let e = next_write(&mut on_a).await;
        assert_eq!(e.id, Some(v));
        assert_eq!(e.data["delta"]["messages"][0]["content"], text);
    }
    assert_eq!(b.append("t", delta_msg("r", None, "after")).await, 4);
    assert_eq!(next_write(&mut on_a).await.id, Some(4));
    // A listens on one session again.
    let admin = sqlx::PgPool::connect(&crate::pg::base_url()).await.unwrap();
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'tg-listen-a' AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(listening, 1);
    admin.close().await;
    let metrics = a.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("threadgate_store_listener_connected 1"),
        "{metrics}"
    );
    let resyncs: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("threadgate_store_listener_resyncs_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the resync counter");
    assert!(
        resyncs >= 2.0,
        "at the first connect and after the cut: {resyncs}"
    );
    b.stop().await;
    a.stop().await;
    drop(schema);
}

/// Buffered mode follows the JetStream log, so its sessions turn the triggers off: a fold
/// commits history rows without a notification (notifications arrive in commit order, so the
/// first one heard after the fold must be the test's own marker).
#[tokio::test]
async fn buffered_mode_does_not_notify() {
    let schema = PgSchema::create().await;
    let mut c = config(&schema, "tg-buffered");
    c.nats_url = Some(crate::harness::nats_url());
    c.nats_prefix = crate::harness::nats_prefix();
    let gw = Gateway::start_config(c, None, None).await;
    let (pool, channel, mut listener) = listen(&schema).await;
    gw.create(json!({"id": "t"})).await;
    gw.append("t", delta_msg("r", None, "x")).await;
    let res = gw.post("/v1/threads/t/flush", &json!({})).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(gw.get_json("/v1/threads/t").await["version"], 1, "folded");
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(&channel)
        .execute(&pool)
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.payload(), "marker");
    drop(listener);
    pool.close().await;
    gw.stop().await;
    drop(schema);
}

/// Announcements are sent after the commit, so a replica that dies in between never sends
/// them. A write made through a store that announces nothing (such a replica) still reaches a
/// stream on a gateway, at that gateway's next heartbeat check of the threads it follows; and
/// the write transactions themselves notify nothing (only the announcer's rounds do).
#[tokio::test]
async fn a_write_nobody_announced_reaches_streams_at_the_next_heartbeat() {
    use threadgate::id::ThreadId;
    use threadgate::store::{Expect, Store};

    let schema = PgSchema::create().await;
    let a = Gateway::start_config(config(&schema, "tg-hb"), None, None).await;
    let id = "unannounced";
    a.create(json!({"id": id})).await;
    let mut on_a = stream(&a, id, 0).await;
    assert_eq!(a.append(id, delta_msg("r", None, "m1")).await, 1);
    assert_eq!(next_write(&mut on_a).await.id, Some(1));
    // Let A's feed settle: what comes next can only come from an announcement or a check.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let silent = threadgate::store::PostgresStore::connect_with(
        schema.options(),
        &threadgate::store::PgOptions {
            notify: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (pool, channel, mut listener) = listen(&schema).await;
    let delta: threadgate::model::ChangeSet =
        serde_json::from_value(delta_msg("r", None, "m2")).unwrap();
    let tid = ThreadId::parse(id).unwrap();
    let made = silent
        .append(&tid, &delta, Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(made.version, 2);
    // Notifications arrive in commit order: the write's own transaction sent none.
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(&channel)
        .execute(&pool)
        .await
        .unwrap();
    loop {
        let n = tokio::time::timeout(WAIT, listener.recv())
            .await
            .unwrap()
            .unwrap();
        match n.payload() {
            "marker" => break,
            "p" => continue, // A's listener heartbeat
            other => panic!("the write transaction notified: {other}"),
        }
    }
    drop(listener);
    pool.close().await;
    let heard = Instant::now();
    let beat = threadgate::store::LISTENER_HEARTBEAT;
    let e = on_a
        .next(beat * 3)
        .await
        .expect("the write arrives at a heartbeat");
    assert_eq!((e.event.as_str(), e.id), ("delta", Some(2)));
    assert_eq!(e.data["delta"]["messages"][0]["content"], "m2");
    eprintln!("unannounced write delivered after {:?}", heard.elapsed());
    silent.close().await;
    a.stop().await;
    drop(schema);
}
