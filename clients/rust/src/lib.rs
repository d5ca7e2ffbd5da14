//! A [tirea 0.5](https://crates.io/crates/tirea-contract) thread store that keeps threads in a
//! threadgate gateway, over its REST and SSE API.
//!
//! [`ThreadgateStore`] implements tirea-contract's [`ThreadReader`], [`ThreadWriter`] and
//! [`ThreadSync`] (so it is a [`ThreadStore`], usable as `Arc<dyn ThreadStore>`) and the read
//! side of the run records ([`RunReader`]). An agent moves its threads into threadgate by
//! changing the line that builds its store:
//!
//! ```no_run
//! use std::sync::Arc;
//! use tirea_contract::storage::ThreadStore;
//! use threadgate_client::ThreadgateStore;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // was: let store: Arc<dyn ThreadStore> = Arc::new(tirea_store_adapters::MemoryStore::new());
//! let store: Arc<dyn ThreadStore> = Arc::new(ThreadgateStore::new("http://localhost:8080")?);
//! # Ok(()) }
//! ```
//!
//! What the gateway adds, and how the client uses it:
//!
//! * **Safe retries.** Every [`append`](ThreadWriter::append) carries an `Idempotency-Key`
//!   derived from the delta and its precondition, so a retry after a lost answer is answered
//!   with the version of the first attempt instead of appending twice. `503` answers and
//!   connection failures are retried with bounded, jittered exponential back-off, then
//!   surface as [`ThreadStoreError::Io`]. A retried `create` or `save` whose first attempt may
//!   have been applied first checks whether it was.
//! * **Errors** map onto [`ThreadStoreError`]: `404` → `NotFound`, `412` → `VersionConflict`
//!   with both versions, `409` → `AlreadyExists` (but `409 idempotency_key_expired` → `Io`:
//!   the write was accepted long ago), `invalid_id` → `InvalidId`, other `400`s →
//!   `Serialization` with the problem's detail.
//! * **Read-your-writes.** Reads use the gateway's live view, so in buffered mode a load
//!   right after an append sees it before it is folded into the store.
//! * **Live events.** [`ThreadgateStore::follow`] streams a thread's writes as typed
//!   [`LiveEvent`]s, resuming with `Last-Event-ID` after a disconnect, so every version is seen
//!   exactly once, across gateway restarts.
//!
//! Where the semantics differ from tirea's in-process stores, see the notes on each method
//! of the trait implementations (listing walks the gateway's keyset pages to compute the
//! offset and total; runs are looked up per thread).

// The crate README's example is compiled as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;

mod follow;
mod store;
mod transport;

pub use follow::{LiveEvent, LiveStream};
pub use tirea_contract::storage::{
    RunReader, ThreadReader, ThreadStore, ThreadStoreError, ThreadSync, ThreadWriter,
};

use reqwest::Url;
use reqwest::header::HeaderValue;
use std::sync::Arc;
use std::time::Duration;

/// Per-attempt deadline of a request (connect, send, and read the whole answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for opening a TCP connection, when the store builds its own HTTP client.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries after the first attempt of a request (so at most 5 attempts): about 1.5 s of
/// back-off in total, enough to ride out a connection reset or a brief 503.
pub const DEFAULT_RETRIES: u32 = 4;
/// First back-off delay; it doubles per retry up to [`DEFAULT_BACKOFF_MAX`].
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest back-off delay (also the cap on a server's `Retry-After`).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Consecutive failed reconnects after which [`ThreadgateStore::follow`] gives up: about 35 s
/// of back-off, longer than a gateway restart takes.
pub const DEFAULT_FOLLOW_RECONNECTS: u32 = 20;
/// A live stream that delivers nothing for this long is reconnected: three of the gateway's
/// default 15 s keep-alive intervals, so a dead connection is noticed without false alarms.
pub const DEFAULT_FOLLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// A configuration the store cannot be built from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The base URL does not parse, or is not `http(s)://host[:port][/prefix]`.
    #[error("invalid base URL {url:?}: {reason}")]
    BaseUrl { url: String, reason: String },
    /// The token cannot be sent in an HTTP header.
    #[error("the token contains characters that cannot be sent in a header")]
    Token,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A tirea thread store backed by a threadgate gateway. Cheap to clone (one shared
/// connection pool).
#[derive(Clone)]
pub struct ThreadgateStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ThreadgateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadgateStore")
            .field("base", &self.inner.base.as_str())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The gateway's base URL; request paths are appended to its path.
    base: Url,
    http: reqwest::Client,
    /// `Bearer <token>`, marked sensitive so it never shows in debug output.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    retries: u32,
    backoff_min: Duration,
    backoff_max: Duration,
    follow_reconnects: u32,
    follow_idle_timeout: Duration,
}

impl ThreadgateStore {
    /// A store for the gateway at `base_url` (e.g. `http://localhost:8080`) with the default
    /// timeouts and retries. Use [`ThreadgateStore::builder`] to change them.
    pub fn new(base_url: impl AsRef<str>) -> Result<Self, ConfigError> {
        Self::builder(base_url).build()
    }

    /// A builder for a store at `base_url`.
    pub fn builder(base_url: impl AsRef<str>) -> ThreadgateStoreBuilder {
        ThreadgateStoreBuilder {
            base_url: base_url.as_ref().to_owned(),
            token: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            follow_reconnects: DEFAULT_FOLLOW_RECONNECTS,
            follow_idle_timeout: DEFAULT_FOLLOW_IDLE_TIMEOUT,
            client: None,
        }
    }

    /// The gateway's base URL.
    pub fn base_url(&self) -> &str {
        self.inner.base.as_str()
    }
}

/// Configures a [`ThreadgateStore`]; see [`ThreadgateStore::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ThreadgateStoreBuilder {
    base_url: String,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    retries: u32,
    backoff_min: Duration,
    backoff_max: Duration,
    follow_reconnects: u32,
    follow_idle_timeout: Duration,
    client: Option<reqwest::Client>,
}

impl ThreadgateStoreBuilder {
    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Deadline of one attempt of a request, from connecting until the answer is read
    /// (default [`DEFAULT_TIMEOUT`]). For [`ThreadgateStore::follow`] it bounds opening the
    /// stream; the open stream is watched by [`Self::follow_idle_timeout`] instead.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Deadline for opening a connection (default [`DEFAULT_CONNECT_TIMEOUT`]). Ignored with
    /// [`Self::client`]: configure that client instead.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many times a request is retried after a connection failure, a timeout or a
    /// `502`/`503`/`504` answer (default [`DEFAULT_RETRIES`]; 0 disables retries).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Back-off between retries: `min` doubling per retry up to `max`, each delay jittered
    /// down by up to half (defaults [`DEFAULT_BACKOFF_MIN`], [`DEFAULT_BACKOFF_MAX`]).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Consecutive failed reconnects after which a [`ThreadgateStore::follow`] stream ends
    /// with an error (default [`DEFAULT_FOLLOW_RECONNECTS`]). A connection that opens resets
    /// the count.
    pub fn follow_reconnects(mut self, reconnects: u32) -> Self {
        self.follow_reconnects = reconnects;
        self
    }

    /// A live stream silent for this long (no event, no keep-alive) is reconnected (default
    /// [`DEFAULT_FOLLOW_IDLE_TIMEOUT`]; keep it above the gateway's `--sse-keepalive`).
    pub fn follow_idle_timeout(mut self, timeout: Duration) -> Self {
        self.follow_idle_timeout = timeout;
        self
    }

    /// Uses `client` (and its connection pool, proxy and TLS settings) instead of building
    /// one. Its own total timeout, if it has one, also limits each request.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Builds the store. Nothing is sent until the first call.
    pub fn build(self) -> Result<ThreadgateStore, ConfigError> {
        let bad = |reason: &str| ConfigError::BaseUrl {
            url: self.base_url.clone(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(&self.base_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(bad("it must name a host"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("it must not have a query or fragment"));
        }
        // Paths are appended segment by segment; a trailing slash would add an empty one.
        if let Ok(mut segments) = base.path_segments_mut() {
            segments.pop_if_empty();
        }
        let authorization = match &self.token {
            Some(token) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| ConfigError::Token)?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = match self.client {
            Some(c) => c,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .user_agent(concat!("threadgate-client/", env!("CARGO_PKG_VERSION")))
                .build()?,
        };
        Ok(ThreadgateStore {
            inner: Arc::new(Inner {
                base,
                http,
                authorization,
                timeout: self.timeout,
                retries: self.retries,
                backoff_min: self.backoff_min,
                backoff_max: self.backoff_max,
                follow_reconnects: self.follow_reconnects,
                follow_idle_timeout: self.follow_idle_timeout,
            }),
        })
    }
}
