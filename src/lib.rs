//! threadgate: an HTTP REST + SSE gateway for AI-agent conversation threads.
//!
//! The binary in `main.rs` only parses configuration and calls [`app::run`]; everything else
//! lives here so tests can start the whole gateway in-process on port 0.
//!
//! # A short tour
//!
//! One idea ties the gateway together: every thread has a **version** (0 at create, +1 per
//! accepted write). Snapshots say which version they reflect, every live event carries its
//! version as its SSE `id`, and `If-Match` on a version is a compare-and-set. The wire shapes
//! (tirea 0.5 threads, change sets and patches) are in [`model`] and `docs/wire.md`.
//!
//! [`app::start`] chooses the mode once: a [`write::WritePath`] and a
//! [`live::source::LiveSource`]. Nothing after that asks which mode is on.
//!
//! ## The path of an append
//!
//! `POST /v1/threads/{id}/deltas` → [`http::threads::append`] parses the id, `If-Match`,
//! `Idempotency-Key` and the body (depth-checked before parsing, see [`model::limits`]) →
//! [`write::Threads::append`] → the chosen write path:
//!
//! * **direct** ([`write::direct::DirectWrites`]): [`store::Store::append`] validates the
//!   delta against the thread's current state and commits it as the next version (memory and
//!   file stores under the thread's lock; PostgreSQL in one transaction that locks the thread
//!   row); then the committed [`store::Write`] is handed to this process's [`live::Hub`].
//! * **buffered** ([`buffer::Buffered`]): the delta is validated against the thread's cached
//!   head (its state with every buffered entry applied) and published to the thread's
//!   JetStream subject with an expected-last-sequence, which makes the version a
//!   compare-and-set across replicas ([`buffer::log::Log::publish`]). The answer goes out
//!   once JetStream stored it; the store is not touched. The entry reaches the store when a
//!   fold applies it (run end, flush, idle sweeper, start-up recovery, shutdown), exactly
//!   once: the store keeps a watermark atomically with the thread and skips what it has.
//!
//! ## The path of a live event
//!
//! `GET /v1/threads/{id}/events` → [`http::events::events`] → [`live::Hub::open`]: the
//! subscriber attaches to its thread's topic first (one per thread per process), is
//! positioned (after its cursor, at a snapshot, or at the head), catches up one page at a
//! time from the source's replay, then follows the topic, de-duplicating by version.
//!
//! * **direct**: the topic is fed by the write path after each commit
//!   ([`live::Hub::publish`]); replays read the store's bounded history
//!   ([`live::source::StoreSource`]).
//! * **buffered**: one task per topic follows the thread's JetStream subject
//!   ([`buffer::log::LogFollower`]), so a write accepted by any replica reaches every
//!   replica's streams; replays read the unfolded log first, then the store's history
//!   ([`live::source::LogSource`]).
//!
//! Errors cross the layers as [`store::StoreError`] and [`write::Error`]; the HTTP edge
//! turns them into `application/problem+json` answers in [`http::error`].
#![warn(missing_docs)]

pub mod app;
pub mod auth;
pub mod buffer;
pub mod config;
pub mod http;
pub mod id;
pub mod live;
pub mod model;
pub mod store;
pub mod write;
