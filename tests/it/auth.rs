//! Authentication end to end: JWTs (HS256 with a secret, RS256 with a PEM public key, ES256
//! and RS256 from a JWKS) with their `exp`/`nbf` leeway, audience, issuer, signature and claim
//! checks; a malformed tokens file stopping start-up; the `401` shape; which routes stay open;
//! the cookie; and, against the real binary, that no token ever reaches the log, that logs
//! carry no colour codes when not written to a terminal, and the start-up notices about
//! authentication being off.

use crate::harness::{Backend, Gateway};
use crate::support::tenants::{ADMIN, ALICE, Caller, TOKENS, tokens_file};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use threadgate::auth::Secret;

const SECRET: &str = "a-test-secret-that-is-32-bytes-long!";
const AUDIENCE: &str = "threadgate";
const ISSUER: &str = "https://idp.example";

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims for `sub` valid for ten minutes, for the test audience and issuer.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "aud": AUDIENCE, "iss": ISSUER, "exp": now() + 600, "iat": now()})
}

fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).unwrap()).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(fixture("ec-private.pem")).unwrap()).unwrap()
}

/// A gateway with the test tokens and JWTs (HS256) for the test audience and issuer.
async fn jwt_gateway(tweak: impl FnOnce(&mut threadgate::config::Config)) -> Gateway {
    let (_dir, path) = tokens_file();
    Gateway::start_with(Backend::Memory, move |c| {
        c.auth_tokens = Some(path);
        c.jwt_secret = Some(Secret(SECRET.into()));
        c.jwt_audience = vec![AUDIENCE.into()];
        c.jwt_issuer = vec![ISSUER.into()];
        tweak(c);
    })
    .await
}

/// `GET /v1/threads` with a bearer token: the status, and the `WWW-Authenticate` and problem
/// detail of a refusal.
async fn list_with(gw: &Gateway, token: &str) -> (StatusCode, String, Value) {
    let res = gw
        .http
        .get(gw.url("/v1/threads"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let challenge = res
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = res.json().await.unwrap();
    (status, challenge, body)
}

async fn refused(gw: &Gateway, token: &str, says: &str) {
    let (status, challenge, body) = list_with(gw, token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "unauthorized");
    assert!(
        body["detail"].as_str().unwrap().contains(says),
        "{body} should say {says:?}"
    );
    assert!(
        challenge.starts_with("Bearer realm=\"threadgate\", error=\"invalid_token\""),
        "{challenge}"
    );
    assert!(!challenge.contains(token) && !body.to_string().contains(token));
}

/// A JWT caller is scoped to its `sub`, and every claim check refuses what it should.
#[tokio::test]
async fn jwt_claims_are_checked() {
    let gw = jwt_gateway(|_| {}).await;
    let admin = Caller::new(&gw, Some(ADMIN));
    admin
        .post_expect(
            "/v1/threads",
            &json!({"id": "mine", "resource_id": "user-7"}),
            reqwest::StatusCode::CREATED,
        )
        .await;
    admin
        .post_expect(
            "/v1/threads",
            &json!({"id": "theirs", "resource_id": "user-8"}),
            reqwest::StatusCode::CREATED,
        )
        .await;
    let token = hs256(&claims("user-7"), SECRET);
    let (status, _, body) = list_with(&gw, &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["threads"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["threads"][0]["id"], "mine");
    let user = Caller::new(&gw, Some(&token));
    assert_eq!(
        user.get("/v1/threads/theirs").await.status(),
        StatusCode::NOT_FOUND
    );

    // exp and nbf, with the 30 s leeway.
    let mut c = claims("user-7");
    c["exp"] = json!(now() - 10);
    assert_eq!(list_with(&gw, &hs256(&c, SECRET)).await.0, StatusCode::OK);
    c["exp"] = json!(now() - 120);
    refused(&gw, &hs256(&c, SECRET), "expired").await;
    let mut c = claims("user-7");
    c["nbf"] = json!(now() + 10);
    assert_eq!(list_with(&gw, &hs256(&c, SECRET)).await.0, StatusCode::OK);
    c["nbf"] = json!(now() + 120);
    refused(&gw, &hs256(&c, SECRET), "not valid yet").await;
    let mut c = claims("user-7");
    c.as_object_mut().unwrap().remove("exp");
    refused(&gw, &hs256(&c, SECRET), "exp").await;
    // Audience and issuer.
    let mut c = claims("user-7");
    c["aud"] = json!("another-app");
    refused(&gw, &hs256(&c, SECRET), "audience").await;
    c.as_object_mut().unwrap().remove("aud");
    refused(&gw, &hs256(&c, SECRET), "aud").await;
    let mut c = claims("user-7");
    c["aud"] = json!(["another-app", AUDIENCE]);
    assert_eq!(list_with(&gw, &hs256(&c, SECRET)).await.0, StatusCode::OK);
    let mut c = claims("user-7");
    c["iss"] = json!("https://evil.example");
    refused(&gw, &hs256(&c, SECRET), "issuer").await;
    // The signature, the resource claim, the algorithm.
    refused(
        &gw,
        &hs256(&claims("user-7"), "another-secret-that-is-32-bytes-long"),
        "signature",
    )
    .await;
    let mut c = claims("user-7");
    c.as_object_mut().unwrap().remove("sub");
    refused(&gw, &hs256(&c, SECRET), "sub").await;
    let mut tampered = hs256(&claims("user-7"), SECRET);
    tampered.push('x');
    refused(&gw, &tampered, "signature").await;
    // `alg: none` (header {"alg":"none"}) with the claims of a valid token.
    let valid = hs256(&claims("user-7"), SECRET);
    let payload = valid.split('.').nth(1).unwrap();
    refused(
        &gw,
        &format!("eyJhbGciOiJub25lIn0.{payload}."),
        "invalid token",
    )
    .await;
    // Neither a JWT nor a known token.
    let (status, _, body) = list_with(&gw, "not-a-known-token-at-all").await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unknown token"))
    );
    // Refusals are counted by reason.
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    for reason in [
        "expired",
        "not_yet_valid",
        "audience",
        "issuer",
        "signature",
        "unknown_token",
    ] {
        assert!(
            metrics.contains(&format!(
                "threadgate_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "{reason} in\n{metrics}"
        );
    }
    gw.stop().await;
}

/// `--jwt-resource-claim` names the claim holding the resource_id.
#[tokio::test]
async fn the_resource_claim_is_configurable() {
    let gw = jwt_gateway(|c| c.jwt_resource_claim = "tenant".into()).await;
    let mut c = claims("someone");
    c["tenant"] = json!("acme");
    let token = hs256(&c, SECRET);
    let created = Caller::new(&gw, Some(&token))
        .post_expect("/v1/threads", &json!({"id": "x"}), StatusCode::CREATED)
        .await;
    assert_eq!(created["resource_id"], "acme");
    refused(&gw, &hs256(&claims("someone"), SECRET), "tenant").await;
    gw.stop().await;
}

/// RS256 with a PEM public key, and the algorithm-confusion attack on it refused.
#[tokio::test]
async fn rs256_with_a_pem_public_key() {
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.jwt_public_key = Some(fixture("rsa-public.pem"));
        c.jwt_audience = vec![AUDIENCE.into()];
    })
    .await;
    let token = signed(Algorithm::RS256, None, &rsa_key(), &claims("user-1"));
    assert_eq!(list_with(&gw, &token).await.0, StatusCode::OK);
    let ps = signed(Algorithm::PS256, None, &rsa_key(), &claims("user-1"));
    assert_eq!(list_with(&gw, &ps).await.0, StatusCode::OK);
    // HS256 "signed" with the public key as the secret must not verify against it.
    let public = std::fs::read_to_string(fixture("rsa-public.pem")).unwrap();
    let confused = hs256(&claims("user-1"), &public);
    refused(&gw, &confused, "algorithm").await;
    // Signed by another key.
    let other = signed(Algorithm::ES256, None, &ec_key(), &claims("user-1"));
    refused(&gw, &other, "algorithm").await;
    gw.stop().await;
}

/// A JWKS file with an EC and an RSA key: the token's `kid` picks the key.
#[tokio::test]
async fn jwks_keys_are_picked_by_kid() {
    let dir = tempfile::tempdir().unwrap();
    let mut ec = Jwk::from_encoding_key(&ec_key(), Algorithm::ES256).unwrap();
    ec.common.key_id = Some("ec-1".into());
    let mut rsa = Jwk::from_encoding_key(&rsa_key(), Algorithm::RS256).unwrap();
    rsa.common.key_id = Some("rsa-1".into());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_vec(&JwkSet {
            keys: vec![ec, rsa],
        })
        .unwrap(),
    )
    .unwrap();
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.jwt_public_key = Some(jwks);
    })
    .await;
    let es = signed(Algorithm::ES256, Some("ec-1"), &ec_key(), &claims("u"));
    assert_eq!(list_with(&gw, &es).await.0, StatusCode::OK);
    let rs = signed(Algorithm::RS256, Some("rsa-1"), &rsa_key(), &claims("u"));
    assert_eq!(list_with(&gw, &rs).await.0, StatusCode::OK);
    // The RSA key's JWK says RS256: a PS256 token under its kid is refused.
    let ps = signed(Algorithm::PS256, Some("rsa-1"), &rsa_key(), &claims("u"));
    refused(&gw, &ps, "algorithm").await;
    // A kid pointing at the other key's algorithm family is refused too.
    let wrong = signed(Algorithm::ES256, Some("rsa-1"), &ec_key(), &claims("u"));
    refused(&gw, &wrong, "algorithm").await;
    gw.stop().await;
}

/// A malformed tokens file (or key) stops start-up with an error naming the line, never the
/// token.
#[tokio::test]
async fn malformed_credentials_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("tokens.txt");
    std::fs::write(
        &bad,
        "# ok\nsecret-token-000000000001 admin\nsecret-token-000000000002 resource\n",
    )
    .unwrap();
    let mut config = threadgate::config::Config::for_tests("memory:");
    config.auth_tokens = Some(bad.clone());
    let err = format!("{:#}", threadgate::app::start(&config).await.err().unwrap());
    assert!(
        err.contains("line 3") && err.contains("tokens.txt"),
        "{err}"
    );
    assert!(!err.contains("secret-token"), "{err}");
    let mut config = threadgate::config::Config::for_tests("memory:");
    config.jwt_secret = Some(Secret("too-short".into()));
    let err = format!("{:#}", threadgate::app::start(&config).await.err().unwrap());
    assert!(
        err.contains("--jwt-secret must be at least 32 bytes"),
        "{err}"
    );
    let mut config = threadgate::config::Config::for_tests("memory:");
    config.jwt_public_key = Some(fixture("rsa-private.pem"));
    let err = format!("{:#}", threadgate::app::start(&config).await.err().unwrap());
    assert!(err.contains("private key"), "{err}");

    // The binary exits with an error naming the line.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_threadgate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory:",
            "--auth-tokens",
        ])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(!stderr.contains("secret-token"), "{stderr}");
}

/// The probes, the viewer and its files stay open; `/metrics` and `/openapi.json` are open by
/// default and closed on request; unknown paths need a token too.
#[tokio::test]
async fn open_and_protected_routes() {
    let gw = crate::support::tenants::start(
        crate::support::tenants::Mode::Direct(Backend::Memory),
        |_| {},
    )
    .await;
    let anonymous = Caller::new(&gw, None);
    for path in [
        "/healthz",
        "/readyz",
        "/",
        "/static/threadgate.js",
        "/metrics",
        "/openapi.json",
    ] {
        assert_eq!(anonymous.get(path).await.status(), StatusCode::OK, "{path}");
    }
    for path in ["/v1/threads", "/v1/threads/x/events", "/nowhere"] {
        let res = anonymous.get(path).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            res.headers()["www-authenticate"],
            "Bearer realm=\"threadgate\""
        );
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    // A bad Authorization scheme names the problem.
    let res = gw
        .http
        .get(gw.url("/v1/threads"))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(
        res.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_request")
    );
    gw.stop().await;

    let gw = crate::support::tenants::start(
        crate::support::tenants::Mode::Direct(Backend::Memory),
        |c| {
            c.protect_metrics = true;
            c.protect_openapi = true;
            c.auth_cookie = Some("tg_token".into());
        },
    )
    .await;
    let (anonymous, alice, admin) = (
        Caller::new(&gw, None),
        Caller::new(&gw, Some(ALICE)),
        Caller::new(&gw, Some(ADMIN)),
    );
    assert_eq!(
        anonymous.get("/metrics").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        anonymous.get("/openapi.json").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(alice.get("/metrics").await.status(), StatusCode::FORBIDDEN);
    assert_eq!(alice.get("/openapi.json").await.status(), StatusCode::OK);
    assert_eq!(admin.get("/metrics").await.status(), StatusCode::OK);
    assert_eq!(anonymous.get("/healthz").await.status(), StatusCode::OK);
    // The cookie carries the token on reads, never on writes.
    let with_cookie =
        |req: reqwest::RequestBuilder| req.header("cookie", format!("other=1; tg_token={ALICE}"));
    let res = with_cookie(gw.http.get(gw.url("/v1/threads")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = with_cookie(gw.http.post(gw.url("/v1/threads")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    gw.stop().await;
}

/// The real binary, text logs into a pipe: the lines so far, and where it listens.
struct TextProcess {
    child: tokio::process::Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl TextProcess {
    async fn spawn(args: &[&str], env: &[(&str, &str)]) -> TextProcess {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_threadgate"))
            .args(["--log-format", "text", "--store", "memory:"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let found = log
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains("threadgate listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .map(str::to_owned);
            if let Some(a) = found {
                break a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no listening line: {}",
                log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let port = addr.rsplit(':').next().unwrap();
        TextProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// With every log target on debug, requests carrying tokens in the header, the query and a
/// cookie (accepted and refused) leave no trace of the tokens in the log, and the text log
/// written into a pipe has no ANSI colour codes.
#[tokio::test]
async fn tokens_never_reach_the_log_and_pipes_get_no_colours() {
    let (_dir, tokens) = tokens_file();
    let query_secret = "query-secret-0123456789";
    let mut p = TextProcess::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--auth-cookie",
            "tg",
            "--jwt-secret",
            SECRET,
        ],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let http = reqwest::Client::new();
    let jwt = hs256(&claims("alice"), SECRET);
    let expired = hs256(&json!({"sub": "alice", "exp": now() - 3600}), SECRET);
    for (path, bearer, cookie) in [
        (format!("/v1/threads?access_token={ALICE}"), None, None),
        (
            format!("/v1/threads/x/events?access_token={query_secret}&after=1"),
            None,
            None,
        ),
        ("/v1/threads".to_owned(), Some(ADMIN), None),
        ("/v1/threads".to_owned(), Some(jwt.as_str()), None),
        ("/v1/threads".to_owned(), Some(expired.as_str()), None),
        ("/v1/threads".to_owned(), Some(query_secret), None),
        ("/v1/threads".to_owned(), None, Some(format!("tg={ALICE}"))),
    ] {
        let mut req = http.get(format!("{}{path}", p.base));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.unwrap();
    }
    // A request about a thread and a run: its span names both.
    let res = http
        .post(format!("{}/v1/threads", p.base))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = http
        .post(format!("{}/v1/threads/x/deltas", p.base))
        .bearer_auth(ADMIN)
        .json(&crate::harness::delta_msg("run-7", None, "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = http
        .post(format!("{}/v1/threads?access_token={query_secret}", p.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // Let the last request's log lines arrive, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.child.kill().await.unwrap();
    let log = p.log();
    assert!(log.contains("request"), "debug logging was on:\n{log}");
    assert!(
        log.contains("/v1/threads/x/events"),
        "requests were logged:\n{log}"
    );
    assert!(
        log.contains(r#"path="/v1/threads/x/deltas" thread_id="x" run_id="run-7""#),
        "spans name the thread and the run:\n{log}"
    );
    for secret in [
        ALICE,
        ADMIN,
        query_secret,
        jwt.as_str(),
        expired.as_str(),
        SECRET,
    ] {
        assert!(!log.contains(secret), "the log shows a credential:\n{log}");
    }
    for line in TOKENS.lines() {
        if let Some(token) = line.split_whitespace().next().filter(|t| t.len() >= 16) {
            assert!(!log.contains(token), "the log shows a token");
        }
    }
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a piped log:\n{log}"
    );
    assert!(log.contains("authentication is on"), "{log}");
}

/// Without authentication: one notice on loopback, a warning on any other address.
#[tokio::test]
async fn authentication_off_is_announced() {
    let mut p = TextProcess::spawn(&["--listen", "127.0.0.1:0"], &[]).await;
    p.child.kill().await.unwrap();
    let log = p.log();
    assert_eq!(log.matches("authentication is off").count(), 1, "{log}");
    assert!(!log.contains("non-loopback"), "{log}");
    let mut p = TextProcess::spawn(&["--listen", "0.0.0.0:0"], &[]).await;
    p.child.kill().await.unwrap();
    let log = p.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("non-loopback")),
        "{log}"
    );
}
