//! Direct appends in one round trip.
//!
//! The locking append (`write::append`) costs five round trips: `BEGIN`, `SELECT ... FOR
//! UPDATE` of the thread row (its version and current state), a probe for the delta's
//! message ids, the write, `COMMIT`. An agent appending to its own thread through one gateway
//! gets the same answers every time, so the store remembers, per thread, the row as its last
//! append through this process left it (version, incarnation, counts, current state) and
//! tries the next append as one autocommitted statement that writes only if the row is still
//! that one ([`super::rows::Rows::write_if_head`], which says why that is safe). When it is
//! not (another replica or another kind of write moved the thread, a message id is already
//! stored, the idempotency key is known, the delta replaces the state), nothing was written
//! and the locking append decides, as before.
//!
//! The cache is bounded by bytes ([`HEAD_CACHE_BYTES`]: states are kept as parsed values,
//! weighed by their JSON text); a state larger than an eighth of it is not kept, so such a
//! thread's appends take the locking path.

use super::codec::to_json;
use super::rows::{Cas, Head, Rows, add_delta_rows};
use crate::id::ThreadId;
use crate::model::ChangeSet;
use crate::store::{Appended, Expect, IdempotencyKey, Incarnation, Result};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Arc;

/// Byte budget of the remembered heads: enough for thousands of agents' states at a few KB.
pub const HEAD_CACHE_BYTES: u64 = 64 << 20;

/// A thread row as this process's last write to it left it.
#[derive(Debug)]
pub(super) struct CachedHead {
    version: u64,
    incarnation: Incarnation,
    message_count: i64,
    patch_count: i64,
    state: Arc<Value>,
    /// The state's JSON text length: its weight in the cache.
    state_len: usize,
}

impl From<Head> for CachedHead {
    fn from(h: Head) -> Self {
        CachedHead {
            version: h.version,
            incarnation: h.incarnation,
            message_count: h.message_count,
            patch_count: h.patch_count,
            state: Arc::new(h.current_state),
            state_len: h.state_len,
        }
    }
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<ThreadId, Arc<CachedHead>> for Weight {
    fn weight(&self, id: &ThreadId, h: &Arc<CachedHead>) -> u64 {
        // The fixed part: the entry, the id, the Arc.
        h.state_len as u64 + id.as_str().len() as u64 + 96
    }
}

/// The remembered heads (see the module docs).
pub(super) struct Heads {
    cache: quick_cache::sync::Cache<ThreadId, Arc<CachedHead>, Weight>,
    largest: usize,
}

impl Default for Heads {
    fn default() -> Self {
        Heads {
            cache: quick_cache::sync::Cache::with_weighter(
                // Estimated entries: states of about 4 KB.
                (HEAD_CACHE_BYTES / 4096) as usize,
                HEAD_CACHE_BYTES,
                Weight,
            ),
            largest: (HEAD_CACHE_BYTES / 8) as usize,
        }
    }
}

impl std::fmt::Debug for Heads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heads")
            .field("threads", &self.cache.len())
            .field("bytes", &self.cache.weight())
            .finish()
    }
}

impl Heads {
    pub fn get(&self, id: &ThreadId) -> Option<Arc<CachedHead>> {
        self.cache.get(id)
    }

    /// Remembers `head` for `id` (forgets it when too large to keep).
    pub fn put(&self, id: &ThreadId, head: CachedHead) {
        if head.state_len > self.largest {
            self.cache.remove(id);
        } else {
            self.cache.insert(id.clone(), Arc::new(head));
        }
    }

    /// Forgets `id` (another kind of write moved it).
    pub fn forget(&self, id: &ThreadId) {
        self.cache.remove(id);
    }
}

/// Appends `delta` (normalised) in one statement if `head` is still the thread's row;
/// `None` when the locking append must decide (nothing was written then).
pub(super) async fn append(
    pool: &PgPool,
    id: &ThreadId,
    head: &CachedHead,
    mut delta: ChangeSet,
    expect: Expect,
    key: Option<&IdempotencyKey>,
    now: i64,
) -> Result<Option<(Appended, CachedHead)>> {
    if delta.snapshot.as_ref().is_some_and(|s| !s.is_null())
        || matches!(expect, Expect::Exact(v) if v != head.version)
    {
        return Ok(None);
    }
    delta.normalize();
    let touches_state = !delta.patches.is_empty();
    let none = Value::Null;
    let base = if touches_state { &*head.state } else { &none };
    // Checked against the remembered state: if it is stale the write below finds out, and a
    // refusal is left to the locking append, which checks against the row itself.
    let Ok(plan) = crate::model::plan_delta(base, &delta, |_| false) else {
        return Ok(None);
    };
    let version = head.version + 1;
    let mut next = Head {
        version,
        watermark: version,
        current_state: Value::Null,
        message_count: head.message_count,
        patch_count: head.patch_count,
        new_base_state: None,
        incarnation: head.incarnation,
        state_len: head.state_len,
    };
    let mut rows = Rows::at(now);
    add_delta_rows(
        &mut next,
        &mut HashSet::new(),
        &mut rows,
        delta,
        plan,
        version,
    )?;
    let state_text = touches_state
        .then(|| to_json(&next.current_state))
        .transpose()?;
    let cas = Cas {
        version,
        incarnation: head.incarnation,
        current_state: state_text.as_deref(),
        message_count: next.message_count,
        patch_count: next.patch_count,
        key,
    };
    let mut conn = pool.acquire().await.map_err(super::codec::db_err)?;
    if !rows.write_if_head(&mut conn, id.as_str(), &cas).await? {
        return Ok(None);
    }
    let state = if touches_state {
        Arc::new(next.current_state)
    } else {
        head.state.clone()
    };
    Ok(Some((
        Appended {
            version,
            replayed: false,
        },
        CachedHead {
            version,
            incarnation: head.incarnation,
            message_count: next.message_count,
            patch_count: next.patch_count,
            state,
            state_len: state_text.map_or(head.state_len, |t| t.len()),
        },
    )))
}
