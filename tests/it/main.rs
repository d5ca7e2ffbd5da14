//! Integration tests: one binary, one shared harness ([`harness`]), real PostgreSQL and real
//! HTTP. Behaviour suites run against every backend.

mod auth;
mod buffered;
mod cancellation;
mod cluster;
mod connections;
mod cookbook;
mod crash;
mod deadlines;
mod direct_replicas;
mod edge;
mod file_store;
mod harness;
mod history;
mod http_api;
mod incarnation;
mod limits;
mod live;
mod nats_connect;
mod openapi;
mod outage;
mod pg;
mod pg_tls;
mod properties;
mod proxy;
mod store_conformance;
mod support;
mod tenancy;
mod unicode_ids;
mod viewer;
