//! Integration tests: one binary, one shared harness ([`harness`]), real PostgreSQL and real
//! HTTP. Behaviour suites run against every backend.

mod buffered;
mod cookbook;
mod file_store;
mod harness;
mod http_api;
mod outage;
mod pg;
mod proxy;
mod store_conformance;
