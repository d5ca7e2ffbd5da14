//! A lenient Server-Sent Events reader for tests that follow streams across replicas and
//! outages: frames are split on blank lines, keep-alive comments are skipped, and the end of
//! the stream (or a broken connection) is `None`, so a caller can resume with `Last-Event-ID`
//! as a browser's `EventSource` does.

use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;
use std::time::Duration;

/// One event.
#[derive(Debug, Clone)]
pub struct Event {
    /// `event:` (`message` when absent).
    pub event: String,
    /// `id:` as a version.
    pub id: Option<u64>,
    /// `data:` as JSON (`Null` when absent).
    pub data: Value,
}

/// An open stream.
pub struct Sse {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl Sse {
    /// Opens `url` (with `Last-Event-ID` when given); `Err` carries the status and body of a
    /// non-200 answer, or the transport error.
    pub async fn open(
        http: &reqwest::Client,
        url: &str,
        last_event_id: Option<u64>,
        within: Duration,
    ) -> Result<Sse, String> {
        let mut req = http.get(url);
        if let Some(v) = last_event_id {
            req = req.header("last-event-id", v.to_string());
        }
        let res = match tokio::time::timeout(within, req.send()).await {
            Err(_) => return Err(format!("GET {url}: no answer within {within:?}")),
            Ok(Err(e)) => return Err(format!("GET {url}: {e}")),
            Ok(Ok(res)) => res,
        };
        if res.status() != reqwest::StatusCode::OK {
            let status = res.status();
            return Err(format!(
                "GET {url}: {status} {}",
                res.text().await.unwrap_or_default()
            ));
        }
        Ok(Sse {
            body: res.bytes_stream().boxed(),
            buf: Vec::new(),
        })
    }

    /// The next event (comments skipped); `None` when the stream ended or broke, or nothing
    /// came within `within` (a stream that goes silent is treated as ended).
    pub async fn next(&mut self, within: Duration) -> Option<Event> {
        tokio::time::timeout(within, self.read())
            .await
            .ok()
            .flatten()
    }

    async fn read(&mut self) -> Option<Event> {
        loop {
            while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                if let Some(e) = parse(&String::from_utf8_lossy(&block)) {
                    return Some(e);
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// One frame as an event; `None` for a comment-only frame.
fn parse(block: &str) -> Option<Event> {
    let mut event = None;
    let mut id = None;
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if event.is_none() && id.is_none() && data.is_empty() {
        return None;
    }
    Some(Event {
        event: event.unwrap_or_else(|| "message".into()),
        id,
        data: serde_json::from_str(&data).unwrap_or(Value::Null),
    })
}
