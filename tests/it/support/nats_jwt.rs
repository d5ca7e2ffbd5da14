//! NATS decentralised auth for tests, made at test time with the `nkeys` crate: an operator,
//! a system account and an application account with JetStream enabled, preloaded into a
//! server's memory resolver; a user of the application account as a credentials file.
//!
//! A NATS JWT is `base64url(header).base64url(claims).base64url(ed25519 signature)`, the
//! signature by the issuer's nkey over the first two parts.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Value, json};

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = b64(json!({"typ": "JWT", "alg": "ed25519-nkey"})
        .to_string()
        .as_bytes());
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "jti": uuid::Uuid::now_v7().simple().to_string().to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = b64(claims.to_string().as_bytes());
    let input = format!("{header}.{payload}");
    let sig = issuer.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64(&sig))
}

fn account(operator: &KeyPair, key: &KeyPair, name: &str, jetstream: bool) -> String {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[k] = json!(-1);
        }
    }
    jwt(
        operator,
        &key.public_key(),
        name,
        json!({"limits": limits, "default_permissions": {"pub": {}, "sub": {}},
               "type": "account", "version": 2}),
    )
}

/// A user's credentials file, in the format `nsc` writes.
fn creds(account: &KeyPair, user: &KeyPair) -> String {
    let token = jwt(
        account,
        &user.public_key(),
        "gateway",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
               "type": "user", "version": 2}),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

/// An operator set-up: what the server's configuration needs, and credentials.
pub struct Operator {
    /// Lines for the server's configuration file.
    pub server_conf: String,
    /// A user of the JetStream-enabled account.
    pub creds: String,
    /// A user signed by an account the server does not know.
    pub stranger_creds: String,
}

impl Operator {
    pub fn new() -> Operator {
        let operator = KeyPair::new_operator();
        let op_jwt = jwt(
            &operator,
            &operator.public_key(),
            "test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let sys = KeyPair::new_account();
        let app = KeyPair::new_account();
        let server_conf = format!(
            "operator: {op_jwt}\nsystem_account: {sys_pub}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys_pub}: {sys_jwt}\n  {app_pub}: {app_jwt}\n}}\n",
            sys_pub = sys.public_key(),
            sys_jwt = account(&operator, &sys, "SYS", false),
            app_pub = app.public_key(),
            app_jwt = account(&operator, &app, "APP", true),
        );
        let stranger = KeyPair::new_account();
        Operator {
            server_conf,
            creds: creds(&app, &KeyPair::new_user()),
            stranger_creds: creds(&stranger, &KeyPair::new_user()),
        }
    }
}
