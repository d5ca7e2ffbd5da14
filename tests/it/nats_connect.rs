//! Reaching NATS the ways a managed or clustered deployment needs (issue 12): seed URLs,
//! user/password and tokens (flags or the URL), nkey seed files, credentials files (operator
//! mode, with JWTs made at test time), TLS with a private CA and a client certificate. Each
//! against a nats-server of the test's own; a refused credential or certificate is a clear
//! start-up error at once, never a 30-second retry; and an existing stream with other settings
//! is reported, never recreated.

use crate::harness::{Backend, Gateway, NatsServer, delta_msg, nats_prefix, nats_url};
use crate::support::nats_jwt::Operator;
use crate::support::tls::Pki;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use threadgate::config::{Config, Secret};

/// Start-up must fail well within this (the retry budget below is far longer).
const QUICK: Duration = Duration::from_secs(10);

fn config(url: &str) -> Config {
    let mut c = Config::for_tests("memory:");
    c.nats_url = Some(url.to_owned());
    c.nats_prefix = nats_prefix();
    // A wrong credential must not be retried until this runs out.
    c.startup_timeout = Duration::from_secs(60);
    c
}

/// Starts a gateway with `config`, appends through it and reads the append back.
async fn works(config: Config) {
    let gw = Gateway::start_config(config, None, None).await;
    gw.create(serde_json::json!({"id": "t"})).await;
    assert_eq!(gw.append("t", delta_msg("r", None, "hello")).await, 1);
    let t = gw.get_json("/v1/threads/t?view=live").await;
    assert_eq!(t["messages"][0]["content"], "hello");
    gw.stop().await;
}

/// Start-up fails quickly with an error containing every one of `needles`.
async fn refused(config: Config, needles: &[&str]) -> String {
    let started = Instant::now();
    let err = match threadgate::app::start(&config).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("the gateway started although it should not have");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(
        started.elapsed() < QUICK,
        "start-up failed only after {:?}: {err}",
        started.elapsed()
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    err
}

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn user_password_and_nkey() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_conf(&format!(
        "authorization {{ users = [ {{user: alice, password: \"p@ss:word\"}}, {{nkey: {}}} ] }}",
        user.public_key()
    ))
    .await;
    let port = server.port;
    let dir = tempfile::tempdir().unwrap();

    // In the URL (percent-encoded), several seeds (one of them down), and as flags.
    let down = crate::harness::free_port();
    works(config(&format!(
        "nats://alice:p%40ss%3Aword@127.0.0.1:{port}, nats://alice:p%40ss%3Aword@127.0.0.1:{down}"
    )))
    .await;
    let mut c = config(&server.url());
    c.nats_user = Some("alice".into());
    c.nats_password = Some(Secret::new("p@ss:word"));
    works(c).await;
    let mut c = config(&server.url());
    c.nats_nkey = Some(file(&dir, "user.nk", &user.seed().unwrap()));
    works(c).await;

    // Refused: a wrong password, another nkey, none at all; the password never shows.
    let mut c = config(&server.url());
    c.nats_user = Some("alice".into());
    c.nats_password = Some(Secret::new("wrong-pw"));
    let err = refused(c, &["authorization violation", "--nats-user"]).await;
    assert!(!err.contains("wrong-pw"), "{err}");
    let mut c = config(&server.url());
    let stranger = nkeys::KeyPair::new_user();
    c.nats_nkey = Some(file(&dir, "other.nk", &stranger.seed().unwrap()));
    refused(c, &["authorization violation"]).await;
    refused(config(&server.url()), &["authorization violation"]).await;
    // A file without a seed, and a missing file, are named.
    let mut c = config(&server.url());
    c.nats_nkey = Some(file(&dir, "junk.nk", "not a seed"));
    refused(c, &["--nats-nkey", "junk.nk"]).await;
    let mut c = config(&server.url());
    c.nats_nkey = Some(dir.path().join("missing.nk"));
    refused(c, &["--nats-nkey", "missing.nk", "cannot read"]).await;
    // Credentials twice (URL and flag) are refused rather than guessed between.
    let mut c = config(&format!("nats://alice:p%40ss%3Aword@127.0.0.1:{port}"));
    c.nats_token = Some(Secret::new("x"));
    refused(c, &["credentials given twice"]).await;
}

#[tokio::test]
async fn token() {
    let server = NatsServer::start_conf("authorization { token: \"s3cr3t-t0ken\" }").await;
    works(config(&format!(
        "nats://s3cr3t-t0ken@127.0.0.1:{}",
        server.port
    )))
    .await;
    let mut c = config(&server.url());
    c.nats_token = Some(Secret::new("s3cr3t-t0ken"));
    works(c).await;
    let mut c = config(&server.url());
    c.nats_token = Some(Secret::new("guess"));
    refused(c, &["authorization violation"]).await;
}

/// Operator mode (JWTs) behind TLS that verifies clients: a credentials file, the private CA
/// and a client certificate connect; a certificate from another CA, a missing client
/// certificate, or a user of an unknown account are refused at once.
#[tokio::test]
async fn credentials_file_over_tls() {
    let pki = Pki::new("nats");
    let operator = Operator::new();
    let server = NatsServer::start_conf(&format!(
        "{}\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
        operator.server_conf,
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display(),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let creds = file(&dir, "gw.creds", &operator.creds);
    let with_tls = |url: &str, ca: &PathBuf, client: bool| {
        let mut c = config(url);
        c.nats_creds = Some(creds.clone());
        c.nats_tls_ca = Some(ca.clone());
        if client {
            c.nats_tls_cert = Some(pki.client_cert.clone());
            c.nats_tls_key = Some(pki.client_key.clone());
        }
        c
    };
    works(with_tls(&server.url(), &pki.ca, true)).await;
    // `tls://` asks for TLS by itself.
    works(with_tls(
        &format!("tls://127.0.0.1:{}", server.port),
        &pki.ca,
        true,
    ))
    .await;

    let other = Pki::new("other");
    refused(with_tls(&server.url(), &other.ca, true), &["TLS"]).await;
    refused(with_tls(&server.url(), &pki.ca, false), &["TLS"]).await;
    let mut c = with_tls(&server.url(), &pki.ca, true);
    c.nats_creds = Some(file(&dir, "stranger.creds", &operator.stranger_creds));
    refused(c, &["authorization violation"]).await;
    let mut c = with_tls(&server.url(), &pki.ca, true);
    c.nats_creds = Some(file(&dir, "junk.creds", "nothing here"));
    refused(c, &["--nats-creds", "junk.creds"]).await;
}

/// The real binary with a refused credential: exits at once, non-zero, saying why, and never
/// printing the secret.
#[tokio::test]
async fn binary_reports_a_refused_credential() {
    let server = NatsServer::start_conf("authorization { token: \"right\" }").await;
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_threadgate"))
        .args(["--listen", "127.0.0.1:0", "--store", "memory:"])
        .args(["--nats-url", &server.url(), "--nats-prefix", &nats_prefix()])
        .env("THREADGATE_NATS_TOKEN", "the-wrong-token")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(QUICK, run)
        .await
        .expect("exits at once")
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("NATS refused the credentials"), "{text}");
    assert!(!text.contains("the-wrong-token"), "{text}");
}

/// An existing stream with other settings is reported at start-up, naming each difference,
/// and left as it was; a stream with replicas on a single server is refused at once.
#[tokio::test]
async fn stream_settings_are_checked_never_changed() {
    let prefix = nats_prefix();
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.nats_url = Some(nats_url());
        c.nats_prefix = prefix.clone();
    })
    .await;
    gw.create(serde_json::json!({"id": "kept"})).await;
    gw.append("kept", delta_msg("r", None, "x")).await;
    gw.shares_streams().stop().await;

    let mut c = config(&nats_url());
    c.nats_prefix = prefix.clone();
    c.nats_replicas = 3;
    refused(
        c,
        &[
            &format!("{prefix}_log exists with other settings"),
            "replicas: 1 (wanted 3)",
            "--nats-replicas",
            "nats stream edit",
        ],
    )
    .await;
    // Changed behind the gateway's back: named too.
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let mut stream = js.get_stream(format!("{prefix}_log")).await.unwrap();
    let mut cfg = stream.info().await.unwrap().config.clone();
    cfg.max_age = Duration::from_secs(3600);
    js.update_stream(&cfg).await.unwrap();
    let mut c = config(&nats_url());
    c.nats_prefix = prefix.clone();
    refused(c, &["max_age: 3600s (wanted 604800s)"]).await;
    // Nothing was recreated: the buffered write is still there.
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 1);
    crate::harness::drop_streams(&nats_url(), &prefix).await;

    let mut c = config(&nats_url());
    c.nats_replicas = 3;
    let prefix = c.nats_prefix.clone();
    refused(c, &["needs a NATS cluster"]).await;
    crate::harness::drop_streams(&nats_url(), &prefix).await;
}
