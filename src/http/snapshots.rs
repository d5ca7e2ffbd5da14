//! Rendered snapshots: `GET /v1/threads/{id}` serialises a thread once per version and
//! shares the bytes.
//!
//! A snapshot read is the gateway's most frequent request (frontends poll it), and rendering
//! it (cloning the thread out of the store, serialising every message) costs far more than
//! the key lookup that names it. So the JSON body of the store's snapshot is kept by thread
//! id with the version and incarnation it reflects; a read that finds the same pair, which
//! the owner lookup every read does anyway provides ([`Threads::stamp`]), answers the stored
//! bytes. The pair names one snapshot exactly across replicas: any write moves the version,
//! and a re-created thread has a new incarnation. Only the store's view is kept (a buffered
//! thread's live view changes with every append, and is rendered each time). The cache is
//! bounded in bytes (`--snapshot-cache`); a body larger than an eighth of it is never kept.

use super::threads::ThreadView;
use crate::auth::Scope;
use crate::id::ThreadId;
use crate::store::Incarnation;
use crate::write::{Result, Stamp, Threads, View};
use bytes::Bytes;
use std::sync::Arc;

/// Default byte budget of the rendered-snapshot cache.
pub const DEFAULT_SNAPSHOT_CACHE_BYTES: u64 = 32 << 20;

/// One rendered snapshot.
#[derive(Debug)]
struct Rendered {
    version: u64,
    incarnation: Incarnation,
    body: Bytes,
}

/// Weighs rendered snapshots by their size.
#[derive(Clone)]
struct BodyWeight;

impl quick_cache::Weighter<ThreadId, Arc<Rendered>> for BodyWeight {
    fn weight(&self, id: &ThreadId, r: &Arc<Rendered>) -> u64 {
        r.body.len() as u64 + id.as_str().len() as u64 + 64
    }
}

/// The rendered-snapshot cache (see the module docs).
pub struct Snapshots {
    cache: quick_cache::sync::Cache<ThreadId, Arc<Rendered>, BodyWeight>,
    /// Bodies larger than this are rendered on every read instead of crowding out others.
    largest: u64,
}

impl Snapshots {
    /// A cache of at most `bytes` of rendered snapshots (0 turns it off).
    pub fn new(bytes: u64) -> Self {
        Snapshots {
            cache: quick_cache::sync::Cache::with_weighter(
                (bytes / 8192).clamp(16, 1 << 20) as usize,
                bytes.max(1),
                BodyWeight,
            ),
            largest: bytes / 8,
        }
    }

    /// The JSON body of the thread as `view` sees it, and the version it reflects; `stamp` is
    /// where the caller's lookup found the view ([`Threads::stamp`], which checked the scope).
    pub async fn get(
        &self,
        threads: &Threads,
        scope: &Scope,
        id: &ThreadId,
        view: View,
        stamp: Stamp,
    ) -> Result<(u64, Bytes)> {
        if let Some(incarnation) = stamp.stored
            && let Some(hit) = self.cache.get(id)
            && hit.version == stamp.version
            && hit.incarnation == incarnation
        {
            return Ok((hit.version, hit.body.clone()));
        }
        let snap = threads.get(scope, id, view).await?;
        let rendered = ThreadView::of(&snap);
        let body = Bytes::from(serde_json::to_vec(&rendered).map_err(|e| {
            crate::store::StoreError::Internal(format!("rendering thread {id}: {e}"))
        })?);
        // Keep it only when it is the store's snapshot the stamp named (a newer one is kept
        // by the read that finds its stamp).
        if stamp.stored == Some(snap.incarnation)
            && snap.version == stamp.version
            && (body.len() as u64) <= self.largest
        {
            let rendered = Rendered {
                version: snap.version,
                incarnation: snap.incarnation,
                body: body.clone(),
            };
            self.cache.insert(id.clone(), Arc::new(rendered));
        }
        Ok((snap.version, body))
    }
}
