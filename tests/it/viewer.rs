//! The viewer page and the browser module (static/): how they are served, what the gateway
//! tells them, and the JavaScript tests under tests/browser/ run with Node against the real
//! gateway:
//!
//! * `crosscheck.mjs` feeds the same seeded random deltas to threadgate.js and to the gateway
//!   (direct and buffered) and compares every decision and the resulting threads;
//! * `viewer.mjs` drives the page in a real headless Chromium (Debian's `chromium`, through
//!   `playwright-core`) against the real binary, killing and restarting it mid-run.
//!
//! `scripts/test.sh` installs Chromium and playwright-core when missing and exports where they
//! are (`THREADGATE_TEST_CHROMIUM`, `THREADGATE_TEST_NODE_MODULES`); without them the browser
//! tests fail with a message saying so, never skip.

use crate::harness::{
    Backend, Gateway, delta_msg, drop_streams, expect_problem, nats_prefix, nats_url,
};
use crate::pg::PgSchema;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use threadgate::http::assets::CONTENT_SECURITY_POLICY;

/// Hang guards for the Node processes (never speed assertions).
const CROSSCHECK_DEADLINE: Duration = Duration::from_secs(180);
const BROWSER_DEADLINE: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn page_and_module_are_served_with_a_strict_csp() {
    let gw = Gateway::start(Backend::Memory).await;
    let res = gw.get("/").await;
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "text/html");
    assert_eq!(h["content-security-policy"], CONTENT_SECURITY_POLICY);
    assert_eq!(h["x-content-type-options"], "nosniff");
    let html = res.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/static/viewer.js"></script>"#));
    // Nothing a strict CSP would refuse: no inline script, style or handler.
    let lower = html.to_ascii_lowercase();
    assert_eq!(
        lower.matches("<script").count(),
        lower.matches("<script type=\"module\" src=").count()
    );
    for refused in ["<style", " style=", " onclick=", " onload=", "javascript:"] {
        assert!(!lower.contains(refused), "index.html holds {refused}");
    }
    for js in ["viewer.js", "threadgate.js"] {
        let src = std::fs::read_to_string(repo().join("static").join(js)).unwrap();
        for refused in ["eval(", "new Function", "innerHTML", ".style."] {
            assert!(!src.contains(refused), "{js} uses {refused}");
        }
    }
    let js = gw.get("/static/threadgate.js").await;
    assert_eq!(js.status(), StatusCode::OK);
    assert_eq!(js.headers()["content-type"], "text/javascript");
    assert_eq!(js.headers()["cache-control"], "no-cache");
    let etag = js.headers()["etag"].to_str().unwrap().to_owned();
    let body = js.text().await.unwrap();
    assert_eq!(
        body,
        std::fs::read_to_string(repo().join("static/threadgate.js")).unwrap()
    );
    let again = gw
        .http
        .get(gw.url("/static/threadgate.js"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(
        gw.get("/static/viewer.css").await.headers()["content-type"],
        "text/css"
    );
    for missing in [
        "/static/nope.js",
        "/static/../Cargo.toml",
        "/static/.hidden",
        "/static/%2e%2e/Cargo.toml",
    ] {
        expect_problem(gw.get(missing).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn static_dir_serves_the_files_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<p>edited</p>").unwrap();
    std::fs::write(dir.path().join("extra.js"), "export const x = 1;").unwrap();
    let path = dir.path().to_path_buf();
    let gw = Gateway::start_with(Backend::Memory, |c| c.static_dir = Some(path)).await;
    let res = gw.get("/").await;
    assert_eq!(
        res.headers()["content-security-policy"],
        CONTENT_SECURITY_POLICY
    );
    assert_eq!(res.text().await.unwrap(), "<p>edited</p>");
    let res = gw.get("/static/extra.js").await;
    assert_eq!(res.headers()["content-type"], "text/javascript");
    assert_eq!(res.text().await.unwrap(), "export const x = 1;");
    // A file the directory lacks is missing, even if the binary embeds one of that name.
    expect_problem(
        gw.get("/static/threadgate.js").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    gw.stop().await;
}

/// The first bytes of an event stream: its headers (the body is left unread).
async fn stream_headers(gw: &Gateway, path: &str) -> reqwest::header::HeaderMap {
    let res = gw.get(path).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.headers().clone()
}

#[tokio::test]
async fn event_streams_say_the_write_mode_and_what_the_store_holds() {
    let direct = Gateway::start(Backend::Memory).await;
    direct.create(json!({"id": "t"})).await;
    let h = stream_headers(&direct, "/v1/threads/t/events").await;
    assert_eq!(h["threadgate-mode"], "direct");
    assert!(h.get("threadgate-stored-version").is_none());
    direct.stop().await;

    let gw = Gateway::start_buffered(Backend::Memory, &nats_url(), |_| {}).await;
    gw.create(json!({"id": "t"})).await;
    for n in 0..3 {
        gw.append("t", delta_msg("r", None, &format!("m{n}"))).await;
    }
    let h = stream_headers(&gw, "/v1/threads/t/events?after=0").await;
    assert_eq!(h["threadgate-mode"], "buffered");
    assert_eq!(h["threadgate-stored-version"], "0", "nothing folded yet");
    let res = gw.post("/v1/threads/t/flush", &json!({})).await;
    assert_eq!(res.status(), StatusCode::OK);
    let h = stream_headers(&gw, "/v1/threads/t/events?after=0").await;
    assert_eq!(h["threadgate-stored-version"], "3");
    gw.stop().await;
}

#[tokio::test]
async fn live_runs_include_the_buffered_tail() {
    let gw = Gateway::start_buffered(Backend::Memory, &nats_url(), |_| {}).await;
    gw.create(json!({"id": "t"})).await;
    let with_meta = |status: &str, tokens: u64| {
        json!({"run_id": "r1", "parent_run_id": "p0", "reason": "AssistantTurnCommitted",
            "run_meta": {"agent_id": "a", "origin": "user", "status": status,
                "input_tokens": tokens, "output_tokens": 1},
            "messages": [], "patches": []})
    };
    gw.append("t", with_meta("running", 10)).await;
    assert_eq!(
        gw.get_json("/v1/threads/t/runs").await,
        json!([]),
        "the store has no run yet"
    );
    let live = gw.get_json("/v1/threads/t/runs?view=live").await;
    assert_eq!(live[0]["run_id"], "r1");
    assert_eq!(live[0]["meta"]["status"], "running");
    assert_eq!(live[0]["version"], 1);
    gw.post("/v1/threads/t/flush", &json!({})).await;
    let stored: Value = gw.get_json("/v1/threads/t/runs").await;
    assert_eq!(stored[0]["meta"]["input_tokens"], 10);
    // A later buffered update of a stored run: the newer record, the stored creation time and
    // parent, even though this delta does not repeat the parent.
    let mut later = with_meta("done", 99);
    later.as_object_mut().unwrap().remove("parent_run_id");
    gw.append("t", later).await;
    let live = gw.get_json("/v1/threads/t/runs?view=live").await;
    assert_eq!(live.as_array().unwrap().len(), 1);
    assert_eq!(live[0]["meta"]["status"], "done");
    assert_eq!(live[0]["meta"]["input_tokens"], 99);
    assert_eq!(live[0]["version"], 2);
    assert_eq!(live[0]["created_at"], stored[0]["created_at"]);
    assert_eq!(live[0]["parent_run_id"], "p0");
    assert_eq!(
        gw.get_json("/v1/threads/t/runs").await[0]["meta"]["status"],
        "running"
    );
    gw.stop().await;
}

/// Runs `node <script> <args>` from the repository root with a deadline; panics with its
/// output unless it exits 0. Returns its stdout.
async fn node(script: &str, args: &[String], deadline: Duration) -> String {
    let bin = std::env::var("THREADGATE_TEST_NODE").unwrap_or_else(|_| "node".into());
    let child = tokio::process::Command::new(&bin)
        .arg(repo().join("tests/browser").join(script))
        .args(args)
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin} (Node 18+ is needed; set THREADGATE_TEST_NODE): {e}")
        });
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {deadline:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

async fn crosscheck(gw: Gateway, seeds: &str, steps: u32) {
    let out = node(
        "crosscheck.mjs",
        &[
            "--base".into(),
            gw.base.clone(),
            "--seeds".into(),
            seeds.into(),
            "--steps".into(),
            steps.to_string(),
        ],
        CROSSCHECK_DEADLINE,
    )
    .await;
    assert!(out.contains("0 disagreements"), "{out}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threadgate_js_applies_deltas_like_the_gateway_direct() {
    crosscheck(Gateway::start(Backend::Memory).await, "1,2,3", 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threadgate_js_applies_deltas_like_the_gateway_buffered() {
    let gw = Gateway::start_buffered(Backend::Postgres, &nats_url(), |_| {}).await;
    crosscheck(gw, "4,5", 150).await;
}

/// Where the test command put Chromium and playwright-core; `screenshot`: this run may
/// refresh the README's screenshot when `THREADGATE_TEST_SCREENSHOT` names a file.
fn browser_args(screenshot: bool) -> Vec<String> {
    let chromium =
        std::env::var("THREADGATE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let modules = std::env::var("THREADGATE_TEST_NODE_MODULES").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/threadgate-test/node/node_modules")
    });
    assert!(
        std::path::Path::new(&chromium).exists(),
        "Chromium not found at {chromium}: run scripts/test.sh (it installs it) or set THREADGATE_TEST_CHROMIUM"
    );
    assert!(
        std::path::Path::new(&modules)
            .join("playwright-core")
            .exists(),
        "playwright-core not found in {modules}: run scripts/test.sh (it installs it) or set THREADGATE_TEST_NODE_MODULES"
    );
    let mut args = vec![
        "--bin".into(),
        env!("CARGO_BIN_EXE_threadgate").into(),
        "--chromium".into(),
        chromium,
        "--modules".into(),
        modules,
    ];
    if let (true, Ok(shot)) = (screenshot, std::env::var("THREADGATE_TEST_SCREENSHOT")) {
        args.extend(["--shot".into(), shot]);
    }
    args
}

#[tokio::test]
async fn viewer_in_chromium_direct() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = browser_args(false);
    args.extend(["--store".into(), format!("file:{}", dir.path().display())]);
    let out = node("viewer.mjs", &args, BROWSER_DEADLINE).await;
    assert!(out.contains("reset and reload"), "{out}");
}

#[tokio::test]
async fn viewer_in_chromium_buffered() {
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let mut args = browser_args(true);
    args.extend([
        "--store".into(),
        schema.url(),
        "--nats-url".into(),
        nats_url(),
        "--nats-prefix".into(),
        prefix.clone(),
    ]);
    node("viewer.mjs", &args, BROWSER_DEADLINE).await;
    drop_streams(&nats_url(), &prefix).await;
}
