//! The wire form of a log entry: a JSON payload (the write, or the tombstone) plus `Tg-*`
//! headers (its version, and the idempotency key it came with). Nothing outside this module
//! builds or parses either.

use crate::model::{ChangeSet, Extra, Thread};
use crate::store::{Change, IdempotencyKey, Write};
use crate::write::{Error, Result};
use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};

pub(super) const H_VERSION: &str = "Tg-Version";
pub(super) const H_IDEM_KEY: &str = "Tg-Idem-Key";
pub(super) const H_IDEM_FP: &str = "Tg-Idem-Fp";

/// The payload of a log message (the same tags as [`Change`], plus the tombstone).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
enum Payload {
    Delta(ChangeSet),
    Replace(Thread),
    Metadata(Extra),
    Deleted,
}

/// What a log entry records.
#[derive(Debug, Clone, PartialEq)]
// Nearly every entry is a write: boxing it would cost an allocation per entry read.
#[allow(clippy::large_enum_variant)]
pub enum Body {
    /// A write.
    Write(Change),
    /// The thread was deleted at this version; nothing after it belongs to that thread.
    Deleted,
}

/// One decoded log message.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// Its stream sequence: the compare-and-set position and the trim position.
    pub seq: u64,
    /// The thread version it produced.
    pub version: u64,
    /// Unix milliseconds when JetStream stored it.
    pub at: i64,
    /// What it records.
    pub body: Body,
    /// The idempotency key it was written with.
    pub idempotency: Option<IdempotencyKey>,
}

impl LogEntry {
    /// True for a delete's tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.body == Body::Deleted
    }

    /// The write it records (`None` for a tombstone), consuming the entry (no copy).
    pub fn into_write(self) -> Option<Write> {
        match self.body {
            Body::Write(change) => Some(Write {
                version: self.version,
                at: self.at,
                change,
                idempotency: self.idempotency,
            }),
            Body::Deleted => None,
        }
    }

    /// The write it records (`None` for a tombstone).
    pub fn write(&self) -> Option<Write> {
        match &self.body {
            Body::Write(change) => Some(Write {
                version: self.version,
                at: self.at,
                change: change.clone(),
                idempotency: self.idempotency.clone(),
            }),
            Body::Deleted => None,
        }
    }
}

/// The notice a fold publishes on the thread's event subject.
#[derive(Serialize, Deserialize)]
pub(super) struct FlushedNotice {
    pub flushed: u64,
}

/// The payload of a write, borrowed for encoding.
#[derive(Serialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
enum PayloadRef<'a> {
    Delta(&'a ChangeSet),
    Replace(&'a Thread),
    Metadata(&'a Extra),
}

/// Decodes a log message: its version header, body and idempotency key.
pub(super) fn decode(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> std::result::Result<(u64, Body, Option<IdempotencyKey>), String> {
    let headers = headers.ok_or("no headers")?;
    let version = headers
        .get(H_VERSION)
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or("no valid Tg-Version header")?;
    let body = match serde_json::from_slice(payload).map_err(|e| e.to_string())? {
        Payload::Delta(d) => Body::Write(Change::Delta(d)),
        Payload::Replace(t) => Body::Write(Change::Replace(t)),
        Payload::Metadata(m) => Body::Write(Change::Metadata(m)),
        Payload::Deleted => Body::Deleted,
    };
    let idempotency = match (headers.get(H_IDEM_KEY), headers.get(H_IDEM_FP)) {
        (Some(k), Some(f)) => Some(IdempotencyKey {
            key: k.as_str().to_owned(),
            fingerprint: f.as_str().to_owned(),
        }),
        _ => None,
    };
    Ok((version, body, idempotency))
}

/// Encodes a write (or a tombstone, for `None`) as a payload.
pub fn encode(change: Option<&Change>) -> Result<bytes::Bytes> {
    let payload = match change {
        Some(Change::Delta(d)) => serde_json::to_vec(&PayloadRef::Delta(d)),
        Some(Change::Replace(t)) => serde_json::to_vec(&PayloadRef::Replace(t)),
        Some(Change::Metadata(m)) => serde_json::to_vec(&PayloadRef::Metadata(m)),
        None => serde_json::to_vec(&Payload::Deleted),
    };
    payload
        .map(Into::into)
        .map_err(|e| Error::Store(crate::store::StoreError::Internal(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let delta: ChangeSet = serde_json::from_value(serde_json::json!({
            "run_id": "r", "reason": "RunFinished", "messages": [], "patches": []
        }))
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert(H_VERSION, "7");
        for change in [
            Some(Change::Delta(delta)),
            Some(Change::Metadata(Extra::new())),
            Some(Change::Replace(Thread::new("t"))),
            None,
        ] {
            let bytes = encode(change.as_ref()).unwrap();
            let (version, body, key) = decode(Some(&h), &bytes).unwrap();
            assert_eq!(version, 7);
            assert_eq!(key, None);
            match (change, body) {
                (Some(c), Body::Write(b)) => assert_eq!(c, b),
                (None, Body::Deleted) => {}
                (c, b) => panic!("{c:?} came back as {b:?}"),
            }
        }
        assert!(decode(None, b"{}").is_err());
        assert!(decode(Some(&h), b"{\"kind\":\"nope\"}").is_err());
    }
}
