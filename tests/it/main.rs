//! Integration tests: one binary, one shared harness ([`harness`]), real PostgreSQL and real
//! HTTP. Behaviour suites run against every backend.

mod cookbook;
mod harness;
mod http_api;
mod pg;
mod store_conformance;
