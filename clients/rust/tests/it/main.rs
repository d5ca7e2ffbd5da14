//! Integration tests of the client against real gateways started in-process (one test
//! binary; shared harness in [`harness`]).

mod conformance;
mod follow;
mod harness;
mod readme;
mod retry;
