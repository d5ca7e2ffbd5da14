//! Gateways with authentication on, callers with credentials, and a small SSE reader that can
//! send them: shared by the tenancy, auth and edge suites.

use crate::harness::{Backend, Gateway, nats_url};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use std::time::Duration;
use tempfile::TempDir;
use threadgate::config::Config;

/// The admin token of [`TOKENS`].
pub const ADMIN: &str = "admin-token-0123456789abcdef";
/// Alice's token (resource `alice`).
pub const ALICE: &str = "alice-token-0123456789abcdef";
/// Bob's token (resource `bob`).
pub const BOB: &str = "bob-token-0123456789abcdef00";

/// The tokens file of these suites.
pub const TOKENS: &str = "# tokens of the test suites\n\
admin-token-0123456789abcdef admin\n\
\n\
alice-token-0123456789abcdef resource:alice\n\
bob-token-0123456789abcdef00   resource:bob\n";

/// Hang guard for one SSE frame (never a speed assertion).
pub const WAIT: Duration = Duration::from_secs(30);

/// A temp dir holding `tokens.txt` ([`TOKENS`]); the gateway reads it at start-up.
pub fn tokens_file() -> (TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.txt");
    std::fs::write(&path, TOKENS).unwrap();
    (dir, path)
}

/// Where a suite's gateway keeps its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Direct mode on a backend.
    Direct(Backend),
    /// Buffered mode (the shared NATS) over a backend.
    Buffered(Backend),
}

/// Starts a gateway with [`TOKENS`] and a configuration tweak.
pub async fn start(mode: Mode, tweak: impl FnOnce(&mut Config)) -> Gateway {
    let (_dir, path) = tokens_file();
    let auth = move |c: &mut Config| {
        c.auth_tokens = Some(path);
        tweak(c);
    };
    match mode {
        Mode::Direct(b) => Gateway::start_with(b, auth).await,
        Mode::Buffered(b) => Gateway::start_buffered(b, &nats_url(), auth).await,
    }
}

/// A caller: requests to a gateway with its token (or none).
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    pub gw: &'a Gateway,
    pub token: Option<&'a str>,
}

impl<'a> Caller<'a> {
    pub fn new(gw: &'a Gateway, token: Option<&'a str>) -> Self {
        Caller { gw, token }
    }

    /// A request builder with the token as a bearer token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.gw.http.request(method, self.gw.url(path));
        match self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut req = self.request(method, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.expect("request reaches the gateway")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.send(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.send(Method::POST, path, Some(body), &[]).await
    }

    /// GET that must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        let status = res.status();
        let text = res.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// POST that must answer `want`, returning the JSON body.
    pub async fn post_expect(&self, path: &str, body: &Value, want: StatusCode) -> Value {
        let res = self.post(path, body).await;
        let status = res.status();
        let text = res.text().await.unwrap();
        assert_eq!(status, want, "POST {path} {body}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Opens the event stream at `path` (which must answer 200).
    pub async fn events(&self, path: &str) -> Sse {
        let res = tokio::time::timeout(WAIT, self.request(Method::GET, path).send())
            .await
            .expect("the stream answers")
            .expect("the request reaches the gateway");
        assert_eq!(res.status(), StatusCode::OK, "GET {path}");
        Sse::new(res)
    }
}

/// One SSE frame (`event == ":"` for a comment).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub event: String,
    pub id: Option<u64>,
    pub data: Value,
}

/// A minimal SSE reader over a response body.
pub struct Sse {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Sse {
    pub fn new(res: Response) -> Sse {
        Sse {
            body: res.bytes_stream().boxed(),
            buf: Vec::new(),
        }
    }

    /// The next frame, comments included; `None` at the end of the stream.
    pub async fn frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                    return Some(parse(&String::from_utf8(block).unwrap()));
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                    _ => return None,
                }
            }
        })
        .await
        .expect("a frame or the end of the stream within the hang guard")
    }

    /// The next event that is not a comment or a `flushed` notice.
    pub async fn event(&mut self) -> Option<Frame> {
        loop {
            match self.frame().await {
                Some(f) if f.event == ":" || f.event == "flushed" => continue,
                other => return other,
            }
        }
    }
}

fn parse(block: &str) -> Frame {
    let mut f = Frame {
        event: "message".into(),
        id: None,
        data: Value::Null,
    };
    for line in block.lines() {
        if let Some(c) = line.strip_prefix(':') {
            f.event = ":".into();
            f.data = Value::String(c.trim().to_owned());
        } else if let Some(e) = line.strip_prefix("event: ") {
            f.event = e.to_owned();
        } else if let Some(i) = line.strip_prefix("id: ") {
            f.id = i.parse().ok();
        } else if let Some(d) = line.strip_prefix("data: ") {
            f.data = serde_json::from_str(d).unwrap();
        }
    }
    f
}

/// The value of metric line `name` (with its labels, as printed) at `/metrics`, if present.
pub async fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let text = gw
        .http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
