//! The server loop: accepts TCP connections and drives each with hyper's HTTP/1.1 connection
//! state machine, adding the connection hygiene that `axum::serve` lacks.
//!
//! `axum::serve` sets no timer, so hyper's header-read timeout never runs, keep-alive
//! connections are held forever, and accepting is unbounded: a few hundred clients that dribble
//! header bytes, or simply open sockets and go quiet, hold the gateway's file descriptors until
//! `accept` fails with `EMFILE`. This loop bounds all of that:
//!
//! - **header-read timeout**: a request head must arrive completely within
//!   [`ServeLimits::header_read_timeout`], counted from the accept (a fresh connection that
//!   sends nothing is cut off too) or from the first byte after a keep-alive pause. A dribbler
//!   cannot extend it: more bytes do not restart the clock.
//! - **idle timeout**: a keep-alive connection with no request in progress is closed after
//!   [`ServeLimits::idle_timeout`]. A request in progress, however long (an SSE stream, which
//!   has its own keep-alive comments), is never idle. The same bound applies to a response the
//!   client stops accepting: a write that makes no progress for that long closes the
//!   connection, so a client that stops reading cannot pin it either.
//! - **body-read timeout**: a request body must arrive completely within
//!   [`ServeLimits::body_read_timeout`] of its head; otherwise reading it fails with
//!   [`BodyReadTimeout`], which the JSON extractor answers with `408`.
//! - **connection cap**: at most [`ServeLimits::max_connections`] connections are open at once.
//!   The loop takes a slot *before* it accepts, so further clients wait in the kernel's listen
//!   backlog (they are not refused, and cost no descriptor of ours) until a slot frees. At
//!   start-up the soft `RLIMIT_NOFILE` is raised (up to the hard limit) to make room for the
//!   cap plus [`FD_RESERVE`]; when that is impossible a warning says so.
//!
//! Why hand-made and not hyper's `header_read_timeout`: in hyper 1.x that timer starts when a
//! connection becomes idle, not when the first byte of the next head arrives, so it is also the
//! keep-alive timeout and the two cannot differ (a 10 s header bound would close every polling
//! browser's connection after 10 s of quiet). So hyper's is switched off and one small
//! per-connection watchdog ([`Watch`]) keeps the deadline of the connection's current phase:
//! the I/O wrapper reports reads and stalled writes, the service wrapper reports requests
//! starting and their response bodies ending.
//!
//! Graceful shutdown: when the token is cancelled the loop stops accepting (the listener is
//! closed), connections with no request in progress are closed at once, the others finish
//! their response with `Connection: close` (open SSE streams are ended by the live hub on the
//! same token), and after [`ServeLimits::drain_timeout`] whatever is still open is dropped.
//!
//! HTTP/1.1 only, as before (axum's default features build no HTTP/2 either); a proxy or
//! browser in front speaks HTTP/1.1 to the gateway.

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// File descriptors kept free for everything other than client connections: the runtime, the
/// PostgreSQL pool, NATS, the file store's transient files, logs.
pub const FD_RESERVE: u64 = 256;

/// Pause after an `accept` error that is not about one connection (e.g. `EMFILE`), so the
/// loop does not spin while descriptors are short; connections closing meanwhile free them.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(250);

/// The bounds the server loop enforces on every connection.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// A request head must arrive completely within this long of the accept, or of the first
    /// byte after a keep-alive pause.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this long; so is one whose
    /// response the client has not accepted a byte of for this long.
    pub idle_timeout: Duration,
    /// A request body must arrive completely within this long of its head.
    pub body_read_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// At shutdown, how long requests in progress may take before their connections are
    /// dropped. In-flight work has its own deadlines (a `RunFinished` append waits at most
    /// 10 s for its fold); a connection still open after this is a client that stopped
    /// sending or reading.
    pub drain_timeout: Duration,
}

/// The error a request body yields when it has not arrived within
/// [`ServeLimits::body_read_timeout`]; the JSON extractor turns it into `408`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyReadTimeout(pub Duration);

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains (see the module
/// docs). Returns once every connection is closed or the drain timed out.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let cap = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let cap_u32 = u32::try_from(cap).unwrap_or(u32::MAX);
    let cap = cap_u32 as usize;
    ensure_fd_budget(cap as u64);
    let slots = Arc::new(Semaphore::new(cap));
    // Cancelled when the drain times out: every connection still open is dropped.
    let force_close = CancellationToken::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the slot semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if !is_connection_error(&e) {
                        tracing::warn!(error = %e, "accept failed; retrying shortly");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        tracing::trace!(%peer, "connection accepted");
        tokio::spawn(serve_connection(
            stream,
            router.clone(),
            limits,
            shutdown.clone(),
            force_close.clone(),
            permit,
        ));
    }
    drop(listener);
    // Every connection holds a slot until it ends: having all of them back means all ended.
    match tokio::time::timeout(limits.drain_timeout, slots.acquire_many(cap_u32)).await {
        Ok(_) => {}
        Err(_) => {
            let open = cap - slots.available_permits();
            tracing::warn!(
                open,
                "connections still busy after the shutdown drain timeout; closing them"
            );
            force_close.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), slots.acquire_many(cap_u32)).await;
        }
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` (up to the hard limit) so that `cap` connections plus
/// [`FD_RESERVE`] fit; warns when they cannot.
fn ensure_fd_budget(cap: u64) {
    let wanted = cap.saturating_add(FD_RESERVE);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got >= wanted => {}
        Ok(got) => tracing::warn!(
            max_connections = cap,
            open_files_limit = got,
            "the open-files limit is too low for --max-connections plus {FD_RESERVE} other \
             descriptors; raise `ulimit -n` (hard limit) or lower --max-connections"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

/// Errors about one connection (it was reset before we took it): just go on accepting.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    HeaderRead,
    Idle,
    WriteStalled,
}

/// What the connection is waiting for while no request is in progress.
#[derive(Debug, Clone, Copy)]
enum Waiting {
    /// A request head whose first byte (or the accept) came at this instant.
    Head(Instant),
    /// Anything at all, since this instant (a keep-alive pause).
    Idle(Instant),
}

#[derive(Debug)]
struct WatchState {
    /// Requests handed to the router whose response body has not ended (or been dropped).
    in_flight: usize,
    /// Meaningful while `in_flight` is 0.
    waiting: Waiting,
    /// Since when a write has been refused for lack of room (the client is not reading).
    write_stalled_since: Option<Instant>,
}

/// One connection's phase, shared by its I/O wrapper, its service and its watchdog.
#[derive(Debug)]
struct Watch {
    state: Mutex<WatchState>,
    /// Woken when a deadline may have moved earlier.
    changed: Notify,
}

impl Watch {
    fn new() -> Self {
        Watch {
            state: Mutex::new(WatchState {
                in_flight: 0,
                waiting: Waiting::Head(Instant::now()),
                write_stalled_since: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // The state stays consistent even if a holder panicked: every update is one store.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The earliest deadline of the connection's current phase, if it has one.
    fn deadline(&self, limits: &ServeLimits) -> Option<(Instant, Expiry)> {
        let s = self.lock();
        let phase = (s.in_flight == 0).then(|| match s.waiting {
            Waiting::Head(t) => (t + limits.header_read_timeout, Expiry::HeaderRead),
            Waiting::Idle(t) => (t + limits.idle_timeout, Expiry::Idle),
        });
        let stall = s
            .write_stalled_since
            .map(|t| (t + limits.idle_timeout, Expiry::WriteStalled));
        match (phase, stall) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Bytes arrived: after a keep-alive pause, they start the next head's clock.
    fn on_read(&self) {
        let mut s = self.lock();
        if s.in_flight == 0
            && let Waiting::Idle(_) = s.waiting
        {
            s.waiting = Waiting::Head(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn on_write(&self, stalled: bool) {
        let mut s = self.lock();
        match (stalled, s.write_stalled_since) {
            (true, None) => {
                s.write_stalled_since = Some(Instant::now());
                drop(s);
                self.changed.notify_one();
            }
            (false, Some(_)) => s.write_stalled_since = None,
            _ => {}
        }
    }

    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.lock().in_flight += 1;
        self.changed.notify_one();
        InFlight(self.clone())
    }
}

/// A request in progress; dropping it (its response body ended or was dropped) may start the
/// keep-alive pause.
#[derive(Debug)]
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.waiting = Waiting::Idle(Instant::now());
            drop(s);
            self.0.changed.notify_one();
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
    force_close: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let watch = Arc::new(Watch::new());
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        watch: watch.clone(),
    });
    let service = WatchedService {
        router,
        watch: watch.clone(),
        body_read_timeout: limits.body_read_timeout,
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Off: its clock also runs during keep-alive pauses (see the module docs); ours does not.
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let deadline = watch.deadline(&limits);
        let expired = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = watch.changed.notified() => {}
            _ = expired => {
                if let Some((at, why)) = watch.deadline(&limits)
                    && at <= Instant::now()
                {
                    tracing::debug!(reason = ?why, "closing a connection past its deadline");
                    return;
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                if watch.in_flight() == 0 {
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
            _ = force_close.cancelled() => return,
        }
    }
}

/// The TCP stream, reporting reads and stalled writes to the connection's [`Watch`].
struct WatchedIo {
    inner: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            self.watch.on_read();
        }
        Poll::Ready(r)
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch.on_write(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch.on_write(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router as a hyper service: marks each request in flight until its response body ends,
/// and puts the body-read deadline on the request body.
#[derive(Clone)]
struct WatchedService {
    router: Router,
    watch: Arc<Watch>,
    body_read_timeout: Duration,
}

type ServiceFuture = Pin<
    Box<dyn Future<Output = Result<hyper::Response<WatchedBody>, std::convert::Infallible>> + Send>,
>;

impl hyper::service::Service<hyper::Request<Incoming>> for WatchedService {
    type Response = hyper::Response<WatchedBody>;
    type Error = std::convert::Infallible;
    type Future = ServiceFuture;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let guard = self.watch.begin_request();
        let timeout = self.body_read_timeout;
        let req = req.map(|body| {
            if http_body::Body::is_end_stream(&body) {
                Body::new(body)
            } else {
                Body::new(DeadlineBody {
                    inner: body,
                    deadline: Box::pin(tokio::time::sleep(timeout)),
                    timeout,
                })
            }
        });
        let mut router = self.router.clone();
        Box::pin(async move {
            let res = tower_service::Service::call(&mut router, req).await?;
            Ok(res.map(|inner| WatchedBody {
                inner,
                guard: Some(guard),
            }))
        })
    }
}

/// A request body that fails with [`BodyReadTimeout`] when it has not ended by its deadline.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Some(Err(BodyReadTimeout(self.timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends its request's in-flight mark when it ends or is dropped.
struct WatchedBody {
    inner: Body,
    guard: Option<InFlight>,
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if r.is_none() {
            self.guard = None;
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServeLimits {
        ServeLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 8,
            drain_timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn phases_and_their_deadlines() {
        let l = limits();
        let w = Arc::new(Watch::new());
        let t0 = Instant::now();
        // Fresh connection: waiting for a head since the accept.
        assert_eq!(
            w.deadline(&l),
            Some((t0 + l.header_read_timeout, Expiry::HeaderRead))
        );
        // Bytes of the first head do not extend it.
        tokio::time::advance(Duration::from_secs(3)).await;
        w.on_read();
        assert_eq!(w.deadline(&l).unwrap().0, t0 + l.header_read_timeout);
        // A request in progress has no deadline, however long it runs.
        let req = w.begin_request();
        assert_eq!(w.deadline(&l), None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(w.deadline(&l), None);
        // ...unless the client stops accepting the response.
        w.on_write(true);
        let stalled = Instant::now();
        assert_eq!(
            w.deadline(&l),
            Some((stalled + l.idle_timeout, Expiry::WriteStalled))
        );
        w.on_write(false);
        assert_eq!(w.deadline(&l), None);
        // Response done: keep-alive pause.
        drop(req);
        let idle = Instant::now();
        assert_eq!(w.deadline(&l), Some((idle + l.idle_timeout, Expiry::Idle)));
        // The next head's first byte starts the (shorter) header clock.
        tokio::time::advance(Duration::from_secs(30)).await;
        w.on_read();
        let head = Instant::now();
        assert_eq!(
            w.deadline(&l),
            Some((head + l.header_read_timeout, Expiry::HeaderRead))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_requests_keep_the_connection_busy() {
        let l = limits();
        let w = Arc::new(Watch::new());
        let a = w.begin_request();
        let b = w.begin_request();
        drop(a);
        assert_eq!(w.deadline(&l), None, "one request is still in progress");
        drop(b);
        assert_eq!(w.deadline(&l).unwrap().1, Expiry::Idle);
    }
}
