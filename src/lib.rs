//! threadgate: an HTTP REST + SSE gateway for AI-agent conversation threads.
//!
//! The binary in `main.rs` only parses configuration and calls [`app::run`]; everything else
//! lives here so tests can start the whole gateway in-process on port 0.

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
