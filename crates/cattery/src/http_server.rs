//! The HTTP accept loop: HTTP/1.1 connections served by hyper with the limits that keep the API
//! answering while clients hold idle or slow connections (issue 16):
//!
//! - **header-read timeout**: a request head must arrive in full within this time after the
//!   connection opens or after the previous response ends (hyper's timer, so it is also the
//!   keep-alive idle timeout: an idle connection is closed when it runs out);
//! - **body-read timeout**: a request body that sends nothing for this long fails (the handler
//!   answers 400, the proxy 502); a body that keeps sending is never cut, so uploads streamed
//!   through the session proxy go on;
//! - **connection cap**: at most `max_connections` client connections at once, below the
//!   open-file limit so that instances, log files and the store keep their descriptors. At the
//!   cap, the oldest connection with no request in flight is closed to make room for a new one,
//!   so idle connections cannot lock `/health`, start and stop out; connections that are
//!   serving a request (a slow handler, a proxied stream) are never closed for this.
//! - `TCP_NODELAY` on every accepted socket (no Nagle stalls on streamed answers).
//! - **TLS** (`--tls-cert`/`--tls-key`, rustls): the handshake runs in the connection's own
//!   task, bounded by the header-read timeout, so a slow handshake never holds the accept loop.
//!
//! Upgraded connections (the websocket relay) leave hyper, and with it these timeouts and the
//! cap, as soon as the upgrade is done.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower::Service;

/// Limits of the HTTP server (`[server]` section of the configuration).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time allowed for a request head (also the keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// Longest silence inside a request body.
    pub body_read_timeout: Duration,
    /// Most client connections at once.
    pub max_connections: usize,
}

/// One live connection, as the accept loop sees it.
struct ConnEntry {
    /// Requests whose handling or response body is not finished.
    in_flight: Arc<AtomicUsize>,
    /// Told to close the connection when it is idle.
    close: Arc<Notify>,
}

/// Live connections by age (ids grow), for closing the oldest idle one at the cap.
#[derive(Default)]
struct Registry {
    next: u64,
    conns: BTreeMap<u64, ConnEntry>,
}

impl Registry {
    /// Tells the oldest connection with no request in flight to close. Returns whether one was
    /// found.
    fn evict_oldest_idle(&mut self) -> bool {
        let victim = self
            .conns
            .iter()
            .find(|(_, c)| c.in_flight.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.conns.remove(&id)) {
            Some(c) => {
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Decrements a connection's in-flight count when dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped.
struct TrackedBody {
    inner: Body,
    _guard: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails when no frame arrives for `timeout` (the timer restarts after each
/// frame). Unlike tower-http's `TimeoutBody` it keeps the body's size hint, so a proxied request
/// keeps its `content-length`.
struct ReadTimeoutBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ReadTimeoutBody {
    fn new(timeout: Duration, inner: Incoming) -> Self {
        ReadTimeoutBody {
            inner,
            timeout,
            sleep: None,
        }
    }
}

impl hyper::body::Body for ReadTimeoutBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.sleep = None;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let t = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                        "no request body data for {} s",
                        t.as_secs_f64()
                    )
                    .into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection: plain TCP, or TLS over it.
type ClientIo =
    Either<tokio::net::TcpStream, tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// The connection as served: `stream` itself, or after a TLS handshake bounded by `limit`
/// (`None` when the handshake fails or times out).
async fn handshake(
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: Duration,
) -> Option<ClientIo> {
    let Some(acceptor) = tls else {
        return Some(Either::Left(stream));
    };
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(Either::Right(s)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// The soft open-files limit of this process.
pub fn nofile_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0 {
        l.rlim_cur
    } else {
        1024
    }
}

/// How long a connection that has not begun a request when the server stops may take to begin
/// one: its client may have sent it already (hyper would otherwise close the connection
/// unread, and the client could not tell whether the request was handled).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// What every connection's task shares with the accept loop.
struct Shared {
    app: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    registry: Arc<Mutex<Registry>>,
    stopping: CancellationToken,
    http: Arc<hyper::server::conn::http1::Builder>,
}

/// Serves one accepted connection on a task of its own, holding `permit` until it closes.
/// Once the server stops, it finishes the request under way and closes; one that has not
/// begun a request yet gets [`FIRST_REQUEST_GRACE`] to begin one.
fn spawn_connection(
    stream: tokio::net::TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    shared: &Shared,
) {
    let _ = stream.set_nodelay(true);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let close = Arc::new(Notify::new());
    let begun = Arc::new(Notify::new());
    let id = {
        let mut r = shared.registry.lock();
        let id = r.next;
        r.next += 1;
        r.conns.insert(
            id,
            ConnEntry {
                in_flight: in_flight.clone(),
                close: close.clone(),
            },
        );
        id
    };
    let svc = {
        let app = shared.app.clone();
        let in_flight = in_flight.clone();
        let begun = begun.clone();
        let body_timeout = shared.limits.body_read_timeout;
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlight::enter(&in_flight);
            begun.notify_one();
            let req = req.map(|b| ReadTimeoutBody::new(body_timeout, b));
            let mut app = app.clone();
            async move {
                let resp = app
                    .call(req)
                    .await
                    .unwrap_or_else(|e: Infallible| match e {});
                Ok::<_, Infallible>(resp.map(|inner| TrackedBody {
                    inner,
                    _guard: guard,
                }))
            }
        })
    };
    let (registry, stopping, http, tls) = (
        shared.registry.clone(),
        shared.stopping.clone(),
        shared.http.clone(),
        shared.tls.clone(),
    );
    let header_read_timeout = shared.limits.header_read_timeout;
    tokio::spawn(async move {
        let _permit = permit;
        let Some(io) = handshake(stream, tls, header_read_timeout).await else {
            registry.lock().conns.remove(&id);
            return;
        };
        let conn = http.serve_connection(TokioIo::new(io), svc).with_upgrades();
        let mut conn = std::pin::pin!(conn);
        // Whether a request has begun on it (a later stop closes it after that request).
        let mut served = false;
        let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut draining = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                () = close.notified() => {
                    // Evicted at the cap: nothing of ours is running on it.
                    if in_flight.load(Ordering::Acquire) == 0 {
                        break;
                    }
                }
                () = begun.notified(), if !served => {
                    served = true;
                    if grace.take().is_some() {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                () = stopping.cancelled(), if !draining && grace.is_none() => {
                    if served {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        grace = Some(Box::pin(tokio::time::sleep(FIRST_REQUEST_GRACE)));
                    }
                }
                () = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                    grace = None;
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        registry.lock().conns.remove(&id);
    });
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` resolves; then stops
/// accepting, lets connections finish their current request, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let registry = Arc::new(Mutex::new(Registry::default()));
    let stopping = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let shared = Shared {
        app,
        limits,
        tls,
        registry: registry.clone(),
        stopping: stopping.clone(),
        http: Arc::new(http),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    'accept: loop {
        // A free slot first: at the cap, make one by closing the oldest idle connection (again
        // every 50 ms while every connection is busy).
        let permit = loop {
            if let Ok(p) = permits.clone().try_acquire_owned() {
                break p;
            }
            registry.lock().evict_oldest_idle();
            tokio::select! {
                p = permits.clone().acquire_owned() => break p.expect("semaphore never closed"),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = &mut shutdown => break 'accept,
            }
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors (or another transient error): free one and retry soon,
                    // rather than sleeping for a second as connections pile up.
                    tracing::warn!(error = %e, "accept failed");
                    registry.lock().evict_oldest_idle();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break 'accept,
        };
        spawn_connection(stream, permit, &shared);
    }
    // Connections the kernel completed meanwhile wait in the listener's backlog, their
    // requests maybe sent: serve them as well rather than reset them with the listener. Taken
    // by plain non-blocking accepts until the backlog is empty (the runtime's readiness may
    // not have seen the latest ones yet).
    stopping.cancel();
    if let Ok(backlog) = listener.into_std() {
        while let Ok((stream, _)) = backlog.accept() {
            let stream = stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream));
            let (Ok(stream), Ok(permit)) = (stream, permits.clone().try_acquire_owned()) else {
                break;
            };
            spawn_connection(stream, permit, &shared);
        }
    }
    // Shutting down: finish current requests, close idle connections.
    let all = limits.max_connections.max(1);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        permits.acquire_many(u32::try_from(all).unwrap_or(u32::MAX)),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Requests already sent when the server is told to stop are answered, not dropped with
    /// their connection: those of connections the kernel completed but the server had not
    /// accepted yet, and those of accepted connections whose request was not read yet (a
    /// SIGTERM under load, docs/upgrade.md).
    #[tokio::test]
    async fn requests_sent_before_the_stop_are_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..20 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
                .await
                .unwrap();
            clients.push(c);
        }
        let app = Router::new().route("/x", axum::routing::get(|| async { "ok" }));
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 100,
        };
        // Told to stop before it accepted anything.
        serve(listener, app, limits, None, async {}).await;
        for (i, mut c) in clients.into_iter().enumerate() {
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
            let got = String::from_utf8_lossy(&got);
            assert!(
                got.starts_with("HTTP/1.1 200"),
                "request {i} was not answered: {got:?}"
            );
        }
    }
}
