//! Test support shared by the suites: polling until a condition holds, and callers with
//! credentials ([`tenants`]).

pub mod tenants;

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] re-checks.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns true; panics (naming the caller) when `within` has passed.
/// For conditions that become true by themselves (a sweeper fold, a reconnect), never as a
/// performance assertion.
#[track_caller]
pub fn eventually<F, Fut>(within: Duration, mut check: F) -> impl Future<Output = ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + within;
        loop {
            if check().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "condition at {caller} still false after {within:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}
