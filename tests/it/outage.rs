//! Backend outages: a 503 problem, nothing lost, service resumes when the backend returns.

use crate::harness::{Gateway, delta_msg, expect_problem};
use crate::pg::PgSchema;
use crate::proxy::postgres_via_proxy;
use reqwest::StatusCode;
use serde_json::json;
use threadgate::config::Config;

#[tokio::test]
async fn postgres_outage_is_503_and_loses_nothing() {
    let schema = PgSchema::create().await;
    let (proxy, via) = postgres_via_proxy(&schema.url()).await;
    let gw = Gateway::start_config(Config::for_tests(&via), None, Some(schema)).await;

    gw.create(json!({"id": "t"})).await;
    assert_eq!(
        gw.append("t", delta_msg("r", Some("m1"), "before")).await,
        1
    );

    proxy.cut();
    let res = gw
        .post(
            "/v1/threads/t/deltas",
            &delta_msg("r", Some("m2"), "during"),
        )
        .await;
    let p = expect_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert!(
        !p["detail"].as_str().unwrap().contains("sqlx"),
        "5xx details stay opaque: {p}"
    );
    expect_problem(
        gw.get("/v1/threads/t").await,
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
    assert_eq!(
        gw.get_json("/healthz").await["status"],
        "ok",
        "liveness does not depend on the store"
    );

    proxy.restore();
    assert_eq!(gw.get_json("/readyz").await["status"], "ready");
    let t = gw.get_json("/v1/threads/t").await;
    assert_eq!(t["version"], 1, "the failed append did not half-apply");
    assert_eq!(t["messages"].as_array().unwrap().len(), 1);
    // The client retries the rejected append: it lands once.
    assert_eq!(
        gw.append("t", delta_msg("r", Some("m2"), "during")).await,
        2
    );
    let t = gw.get_json("/v1/threads/t").await;
    let texts: Vec<_> = t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(texts, vec![json!("before"), json!("during")]);
    gw.stop().await;
}
