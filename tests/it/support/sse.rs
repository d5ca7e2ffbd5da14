//! A minimal Server-Sent Events client over reqwest's byte stream, strict about framing
//! (one `data:` line per event, numeric ids, frames never cut in the middle).

use crate::harness::Gateway;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;

/// Hang guard for one frame (never a speed assertion).
pub const WAIT: Duration = Duration::from_secs(60);

/// One SSE frame; keep-alive comments have `event == ":"` and the comment text as data.
#[derive(Debug, Clone, PartialEq)]
pub struct Ev {
    pub event: String,
    pub id: Option<u64>,
    pub data: Value,
}

/// A minimal SSE client over reqwest's byte stream.
pub struct Sse {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Sse {
    pub async fn open(gw: &Gateway, path: &str) -> Sse {
        Self::open_with(&gw.http, &gw.url(path), None).await
    }

    pub async fn open_with(http: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = http.get(url);
        if let Some(l) = last_event_id {
            req = req.header("last-event-id", l);
        }
        let res = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("stream answers")
            .expect("request reaches the gateway");
        let status = res.status();
        let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
        if status != StatusCode::OK {
            panic!(
                "GET {url}: {status} {}",
                res.text().await.unwrap_or_default()
            );
        }
        assert_eq!(ct, "text/event-stream");
        assert_eq!(res.headers()["cache-control"], "no-cache");
        Sse {
            body: res.bytes_stream().boxed(),
            buf: Vec::new(),
        }
    }

    /// The next frame (comments included); `None` when the stream ended.
    pub async fn frame(&mut self) -> Option<Ev> {
        tokio::time::timeout(WAIT, self.read_frame())
            .await
            .expect("a frame or the end of the stream within the hang guard")
    }

    pub async fn read_frame(&mut self) -> Option<Ev> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Some(parse(&String::from_utf8(block).expect("UTF-8 frames")));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => {
                    assert!(
                        self.buf.iter().all(|b| b.is_ascii_whitespace()),
                        "the stream ended inside a frame: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return None;
                }
            }
        }
    }

    /// The next event, skipping keep-alive comments.
    pub async fn event(&mut self) -> Option<Ev> {
        loop {
            match self.frame().await {
                Some(e) if e.event == ":" => continue,
                other => return other,
            }
        }
    }

    /// The next event that carries an id (skips `flushed` and comments).
    pub async fn write(&mut self) -> Ev {
        loop {
            let e = self.event().await.expect("the stream goes on");
            if e.event != "flushed" {
                return e;
            }
        }
    }

    /// Asserts the stream ends (after at most a few keep-alives).
    pub async fn expect_end(&mut self) {
        if let Some(e) = self.event().await {
            panic!("expected the end of the stream, got {e:?}");
        }
    }
}

pub fn parse(block: &str) -> Ev {
    let mut ev = Ev {
        event: "message".into(),
        id: None,
        data: Value::Null,
    };
    let mut data = String::new();
    let mut comment = None;
    for line in block.lines().filter(|l| !l.is_empty()) {
        if let Some(c) = line.strip_prefix(':') {
            comment = Some(c.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("id: ") {
            ev.id = Some(
                v.parse()
                    .unwrap_or_else(|_| panic!("numeric id in {block:?}")),
            );
        } else if let Some(v) = line.strip_prefix("event: ") {
            ev.event = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            assert!(data.is_empty(), "one data line per event: {block:?}");
            data.push_str(v);
        } else {
            panic!("unexpected SSE line {line:?}");
        }
    }
    if data.is_empty() {
        let comment = comment.unwrap_or_else(|| panic!("empty frame {block:?}"));
        return Ev {
            event: ":".into(),
            id: None,
            data: Value::String(comment),
        };
    }
    ev.data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("JSON data {data:?}: {e}"));
    ev
}
