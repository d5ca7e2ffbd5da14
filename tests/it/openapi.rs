//! The committed OpenAPI document against the code: every reference resolves, and the formats
//! it gives for the path id and the headers accept exactly what the server accepts (checked
//! value by value over a corpus of valid and invalid inputs, against the real server).
//! schemathesis (scripts/test.sh) then tests the rest of the document against the binary.

use crate::harness::{Backend, Gateway, enc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use threadgate::id::{MAX_ID_LEN, ThreadId};

fn doc() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every `"$ref"` in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// The schema of parameter `name` (in `place`) of every operation that has it.
fn param_schemas<'a>(doc: &'a Value, name: &str, place: &str) -> Vec<(String, &'a Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["name"] == name && p["in"] == place {
                    out.push((format!("{method} {path}"), &p["schema"]));
                }
            }
        }
    }
    out
}

fn regex_of(schema: &Value) -> regex::Regex {
    regex::Regex::new(schema["pattern"].as_str().expect("a pattern")).unwrap()
}

#[test]
fn every_reference_resolves() {
    let doc = doc();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(doc.pointer(pointer).is_some(), "dangling {r}");
    }
    for name in ["View", "Order", "VisibilityFilter"] {
        assert!(doc["components"]["schemas"].get(name).is_some(), "{name}");
    }
    for path in ["/metrics", "/openapi.json", "/healthz", "/readyz"] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    for (op, s) in param_schemas(&doc, "limit", "query") {
        // History pages go up to the history kept per thread; every other page to 200.
        let max = if op.contains("/deltas") { 1_000 } else { 200 };
        assert_eq!(
            (s["minimum"].as_u64(), s["maximum"].as_u64()),
            (Some(1), Some(max)),
            "{op}"
        );
    }
}

/// Candidate ids: every single character up to U+00FF, some beyond, dots, and the length
/// limit in bytes and in characters.
fn id_corpus() -> Vec<String> {
    let mut ids: Vec<String> = (0u32..=0xFF)
        .chain([0x200B, 0x2028, 0xFEFF, 0xFFFD, 0xFFFF, 0x1F680, 0x10FFFF])
        .filter_map(char::from_u32)
        .map(|c| c.to_string())
        .collect();
    for s in [
        "",
        ".",
        "..",
        "...",
        "a.",
        ".a",
        "..a",
        "a/b",
        "user.42",
        "a*b",
        "x>y",
        "é",
        "café-1",
        "ana@example.com",
        "会话 7",
        "a b",
        "tab\there",
        "\"q\"",
        "[x]",
        "{y}",
        "a\\b",
        "50%",
        "#1",
        "q?",
        "~-_:@!$&'()+,;=",
    ] {
        ids.push(s.to_owned());
    }
    ids.push("a".repeat(MAX_ID_LEN));
    ids.push("a".repeat(MAX_ID_LEN + 1));
    // 64 two-byte characters are 128 bytes; 65 are 130 bytes but still fewer than 128
    // characters; 32 four-byte characters are 128 bytes.
    ids.push("é".repeat(MAX_ID_LEN / 2));
    ids.push("é".repeat(MAX_ID_LEN / 2 + 1));
    ids.push("🚀".repeat(MAX_ID_LEN / 4));
    ids.push("🚀".repeat(MAX_ID_LEN / 4 + 1));
    ids
}

#[test]
fn the_documented_id_format_is_the_id_rule() {
    let doc = doc();
    let mut schemas = param_schemas(&doc, "id", "path");
    assert!(
        schemas.len() >= 11,
        "every thread operation documents the id"
    );
    for body in ["CreateThread", "ReplaceThread"] {
        schemas.push((
            body.into(),
            &doc["components"]["schemas"][body]["properties"]["id"],
        ));
    }
    for (op, s) in schemas {
        let re = regex_of(s);
        let max = s["maxLength"].as_u64().unwrap() as usize;
        let min = s["minLength"].as_u64().unwrap() as usize;
        assert_eq!(max, MAX_ID_LEN, "{op}");
        for id in id_corpus() {
            // `maxLength` counts characters; the byte bound is in the description, since no
            // JSON Schema keyword can state it (see src/http/doc.rs).
            let documented = re.is_match(&id)
                && (min..=max).contains(&id.chars().count())
                && id.len() <= MAX_ID_LEN;
            assert_eq!(
                documented,
                ThreadId::parse(&id).is_ok(),
                "{op}: id {id:?} documented valid = {documented}"
            );
        }
    }
    let mut described = param_descriptions(&doc, "id", "path");
    for body in ["CreateThread", "ReplaceThread"] {
        described.push((
            body.into(),
            doc["components"]["schemas"][body]["properties"]["id"]["description"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        ));
    }
    for (op, d) in described {
        assert!(d.contains("128 bytes in UTF-8"), "{op}: {d}");
    }
}

/// The description of parameter `name` (in `place`) of every operation that has it.
fn param_descriptions(doc: &Value, name: &str, place: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["name"] == name && p["in"] == place {
                    let d = p["description"].as_str().unwrap_or("").to_owned();
                    out.push((format!("{method} {path}"), d));
                }
            }
        }
    }
    out
}

/// Values the header formats must decide on, valid and not.
const HEADER_CORPUS: &[&str] = &[
    "\"0\"",
    "\"1\"",
    "\"17\"",
    "*",
    "W/\"1\"",
    "\"+1\"",
    "\"01\"",
    "1",
    "\"1\", \"2\"",
    "\"\"",
    "\"-1\"",
    "abc",
    "0",
    "+1",
    "007",
    "18446744073709551615",
    "9223372036854775807",
    "\"9223372036854775807\"",
    "k",
    "key with spaces",
    "~!@#",
];

#[tokio::test]
async fn the_documented_header_formats_are_what_the_server_accepts() {
    let doc = doc();
    let gw = Gateway::start(Backend::Memory).await;
    gw.create(json!({"id": "t"})).await;
    let if_match = regex_of(
        param_schemas(&doc, "If-Match", "header")
            .first()
            .expect("If-Match documented")
            .1,
    );
    let last_event_id = regex_of(param_schemas(&doc, "Last-Event-ID", "header")[0].1);
    let idem = param_schemas(&doc, "Idempotency-Key", "header")[0]
        .1
        .clone();
    let idem_re = regex_of(&idem);
    let long_key = "k".repeat(idem["maxLength"].as_u64().unwrap() as usize + 1);
    for value in HEADER_CORPUS
        .iter()
        .copied()
        .chain([long_key.as_str(), "*".repeat(255).as_str()])
    {
        // If-Match on a metadata PATCH: 400 exactly when the document says the format is wrong
        // (a valid tag of another version is 412).
        let res = gw
            .http
            .request(Method::PATCH, gw.url("/v1/threads/t"))
            .header("if-match", value)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status() == StatusCode::BAD_REQUEST,
            !if_match.is_match(value),
            "If-Match {value:?}: {}",
            res.status()
        );
        // Last-Event-ID on the stream (an unreplayable position ends it with `reset`).
        let res = gw
            .http
            .get(gw.url(&format!("/v1/threads/{}/events", enc("t"))))
            .header("last-event-id", value)
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status() == StatusCode::BAD_REQUEST,
            !last_event_id.is_match(value),
            "Last-Event-ID {value:?}: {}",
            res.status()
        );
        drop(res);
        // Idempotency-Key on an append.
        let res = gw
            .http
            .post(gw.url("/v1/threads/t/deltas"))
            .header("idempotency-key", value)
            .json(&json!({"run_id": "r", "reason": "UserMessage", "messages": [], "patches": []}))
            .send()
            .await
            .unwrap();
        let documented = idem_re.is_match(value) && value.len() <= 255;
        assert_eq!(
            res.status() == StatusCode::BAD_REQUEST,
            !documented,
            "Idempotency-Key {value:?}: {}",
            res.status()
        );
    }
    // Beyond the int64 range the document gives, versions are refused rather than overflowing
    // (`Last-Event-ID: 18446744073709551615` used to panic the stream's handler).
    for (header, value) in [
        ("if-match", "\"9223372036854775808\""),
        ("if-match", "\"18446744073709551615\""),
        ("last-event-id", "9223372036854775808"),
        ("last-event-id", "18446744073709551615"),
    ] {
        let path = if header == "if-match" {
            "/v1/threads/t"
        } else {
            "/v1/threads/t/events"
        };
        let method = if header == "if-match" {
            Method::DELETE
        } else {
            Method::GET
        };
        let res = gw
            .http
            .request(method, gw.url(path))
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{header}: {value}");
    }
    for after in ["9223372036854775808", "18446744073709551615"] {
        let res = gw.get(&format!("/v1/threads/t/events?after={after}")).await;
        let p = crate::harness::expect_problem(res, StatusCode::BAD_REQUEST, "invalid_query").await;
        assert_eq!(p["field"], "after");
    }
    // The largest version is a position the thread never had: `reset`, and the stream ends.
    let res = gw
        .get("/v1/threads/t/events?after=9223372036854775807")
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.text().await.unwrap().contains("event: reset"));
    gw.stop().await;
}

/// `state` is any JSON value, in and out, as documented.
#[tokio::test]
async fn state_is_any_json_value() {
    let gw = Gateway::start(Backend::Memory).await;
    for (i, state) in [json!([1, "two"]), json!("text"), json!(3.5), json!(true)]
        .into_iter()
        .enumerate()
    {
        let id = format!("s{i}");
        gw.create(json!({"id": id, "state": state})).await;
        assert_eq!(
            gw.get_json(&format!("/v1/threads/{id}/state")).await["state"],
            state
        );
        assert_eq!(
            gw.get_json(&format!("/v1/threads/{id}")).await["state"],
            state
        );
    }
    // Every field of a create is optional, including state and metadata.
    let created = gw.create(json!({})).await;
    assert_eq!(created["state"], json!({}));
    gw.stop().await;
}
