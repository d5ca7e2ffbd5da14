//! The reference: `tirea-store-adapters` 0.5.0 `NatsBufferedThreadWriter` over its own
//! `PostgresStore`, in a fresh PostgreSQL schema, fed the same delta JSON as the gateway
//! (threadgate accepts the tirea wire format unchanged).

use crate::ctx::Ctx;
use crate::support::PgSchema;
use anyhow::{Context, Result};
use serde_json::Value;
use std::sync::Arc;
use tirea_contract::storage::{ThreadReader, ThreadWriter, VersionPrecondition};
use tirea_contract::{Thread, ThreadChangeSet};
use tirea_store_adapters::{NatsBufferedThreadWriter, PostgresStore};

/// The reference crate's stream name: fixed, not configurable (so it is deleted before and
/// after every section that uses it).
pub const STREAM: &str = "THREAD_DELTAS";

/// Connections of the reference's pool: the gateway's default `--pg-max-connections`.
const POOL: u32 = 16;

/// A reference writer with its store.
pub struct Reference {
    /// The buffered writer under test.
    pub writer: Arc<NatsBufferedThreadWriter>,
    store: Arc<PostgresStore>,
    schema: PgSchema,
}

impl Reference {
    /// A writer over a fresh schema (the JetStream stream is created if missing).
    pub async fn new(ctx: &Ctx) -> Result<Self> {
        let schema = PgSchema::create(&ctx.pg).await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(POOL)
            .connect(&schema.url())
            .await?;
        let store = Arc::new(PostgresStore::new(pool));
        store.ensure_table().await?;
        let writer = Arc::new(
            NatsBufferedThreadWriter::new(store.clone(), ctx.js.clone())
                .await
                .map_err(|e| anyhow::anyhow!("reference writer: {e}"))?,
        );
        Ok(Reference {
            writer,
            store,
            schema,
        })
    }

    /// A second writer on the same store and stream (what a restart creates).
    pub async fn restart(&self, ctx: &Ctx) -> Result<NatsBufferedThreadWriter> {
        NatsBufferedThreadWriter::new(self.store.clone(), ctx.js.clone())
            .await
            .map_err(|e| anyhow::anyhow!("reference writer: {e}"))
    }

    /// Creates an empty thread.
    pub async fn create(&self, id: &str) -> Result<()> {
        self.writer.create(&Thread::new(id)).await?;
        Ok(())
    }

    /// Appends one delta (no version precondition, as an agent loop does).
    pub async fn append(&self, id: &str, delta: &ThreadChangeSet) -> Result<()> {
        self.writer
            .append(id, delta, VersionPrecondition::Any)
            .await
            .with_context(|| format!("reference append to {id}"))?;
        Ok(())
    }

    /// Messages of the thread in the store.
    pub async fn messages(&self, id: &str) -> Result<usize> {
        Ok(self
            .store
            .load(id)
            .await?
            .map_or(0, |head| head.thread.messages.len()))
    }

    /// Drops the schema.
    pub async fn drop(self) {
        self.schema.drop().await;
    }
}

/// The reference's form of a delta.
pub fn changeset(delta: &Value) -> Result<ThreadChangeSet> {
    serde_json::from_value(delta.clone()).context("delta is not a tirea ThreadChangeSet")
}
