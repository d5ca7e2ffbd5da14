//! Integration tests: one binary, one shared harness.
