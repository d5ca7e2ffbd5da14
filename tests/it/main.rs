//! Integration tests: one binary, one shared harness ([`harness`]), real PostgreSQL and real
//! HTTP. Behaviour suites run against every backend.

mod buffered;
mod cookbook;
mod crash;
mod file_store;
mod harness;
mod history;
mod http_api;
mod live;
mod outage;
mod pg;
mod proxy;
mod store_conformance;
