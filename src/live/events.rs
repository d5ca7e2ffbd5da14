//! The SSE events of a thread's stream and their framing.
//!
//! Frames are built once per event and shared (`Bytes`) by every subscriber of a topic, which
//! is why the framing lives here rather than in the HTTP layer.

use crate::id::ThreadId;
use crate::model::{ChangeSet, Extra, Thread};
use crate::store::{Change, Incarnation, Write};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// `event: delta` — a ChangeSet appended at `version` (`id: <version>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeltaEvent {
    /// The version the delta produced.
    pub version: u64,
    /// The tirea ChangeSet exactly as applied.
    pub delta: ChangeSet,
}

/// `event: snapshot` — the whole thread at `version` (`id: <version>`): the first event with
/// `?snapshot=true`, and the event for a full save (`PUT`). Replace your state with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotEvent {
    /// The version the snapshot reflects.
    pub version: u64,
    /// The thread, as `GET /v1/threads/{id}` shows it without `version`.
    pub thread: SnapshotThread,
}

/// The thread of a `snapshot` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotThread {
    /// The thread. The server-maintained metadata keys (`created_at`, `updated_at`,
    /// `version`, `version_timestamp`) are present in a requested snapshot and absent in the
    /// snapshot of a full save, which carries the thread as saved.
    #[serde(flatten)]
    pub thread: Thread,
    /// Which life of the thread id this is (requested snapshots only): pass it back as
    /// `incarnation` when reconnecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^[0-9a-f]{16}$")]
    pub incarnation: Option<Incarnation>,
}

/// `event: metadata` — a metadata merge patch applied at `version` (`id: <version>`); a
/// `null` value removes the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetadataEvent {
    /// The version the patch produced.
    pub version: u64,
    /// The merge patch.
    #[schema(value_type = Object)]
    pub metadata: Extra,
}

/// `event: flushed` — buffered mode: the snapshot store now holds every write up to
/// `version`. No `id:` (it is not a write), and never ahead of the writes already sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlushedEvent {
    /// Every write up to this version is in the store.
    pub version: u64,
}

/// `event: reset` — the cursor is older than anything that can be replayed, not a position
/// of this thread, or of an earlier life of its id. Refetch the snapshot and reconnect with
/// `after=<its version>`. No `id:`; the stream ends after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResetEvent {
    /// The thread's current version.
    pub version: u64,
}

/// `event: deleted` — the thread was deleted; the stream ends. No `id:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeletedEvent {}

/// What a queued item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A write at `version` (delta, snapshot, metadata).
    Write,
    /// The thread is gone.
    Deleted,
    /// The store caught up to `version`.
    Flushed,
    /// The upstream may have missed items: catch up from the replay sources.
    Resync,
}

/// One event of a topic, framed once.
#[derive(Debug)]
pub(super) struct Item {
    pub kind: Kind,
    pub version: u64,
    pub frame: Bytes,
    /// For a full save: the thread's `resource_id` after it (a scoped subscriber whose
    /// resource it is not sees the thread as deleted from then on).
    pub resource: Option<Option<Arc<str>>>,
    /// When the write was accepted (unix ms; 0 when unknown), for the delivery latency.
    pub at: i64,
}

/// One SSE frame: optional `id:`, `event:`, one `data:` line of compact JSON (which never
/// holds a raw line break).
pub(super) fn frame(event: &str, id: Option<u64>, data: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(128);
    if let Some(id) = id {
        out.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut out, data).expect("event data serialises");
    out.extend_from_slice(b"\n\n");
    out.into()
}

/// A write as the event it produces.
pub(super) fn write_item(id: &ThreadId, write: &Write) -> Item {
    let version = write.version;
    let resource = match &write.change {
        Change::Replace(t) => Some(t.resource_id.as_deref().map(Arc::from)),
        _ => None,
    };
    let frame = match &write.change {
        Change::Delta(d) => {
            let mut delta = d.clone();
            delta.normalize();
            frame("delta", Some(version), &DeltaEvent { version, delta })
        }
        Change::Replace(t) => {
            let mut thread = t.clone();
            // Exactly what the store saves (idempotent for a prepared thread).
            let _ = crate::store::prepare_thread(id, &mut thread);
            frame(
                "snapshot",
                Some(version),
                &SnapshotEvent {
                    version,
                    thread: SnapshotThread {
                        thread,
                        incarnation: None,
                    },
                },
            )
        }
        Change::Metadata(m) => frame(
            "metadata",
            Some(version),
            &MetadataEvent {
                version,
                metadata: m.clone(),
            },
        ),
    };
    Item {
        kind: Kind::Write,
        version,
        frame,
        resource,
        at: write.at,
    }
}

/// The event that ends a deleted thread's streams.
pub(super) fn deleted_item(version: u64) -> Item {
    Item {
        kind: Kind::Deleted,
        version,
        frame: frame("deleted", None, &DeletedEvent {}),
        resource: None,
        at: 0,
    }
}

/// A `flushed` notice.
pub(super) fn flushed_item(version: u64) -> Item {
    Item {
        kind: Kind::Flushed,
        version,
        frame: frame("flushed", None, &FlushedEvent { version }),
        resource: None,
        at: 0,
    }
}

/// An internal signal (no frame).
pub(super) fn signal(kind: Kind) -> Item {
    Item {
        kind,
        version: 0,
        frame: Bytes::new(),
        resource: None,
        at: 0,
    }
}
