//! Keep-alive HTTP/1 connections from the session proxy to instances, driven by the request
//! that uses them instead of a task of their own.
//!
//! A pooled client (hyper's legacy `Client`) runs each connection as a separate task: a
//! proxied request then crosses tasks four times (request to the connection task, response
//! head back, each body chunk back), and on a multi-threaded runtime those wake-ups often
//! cross threads too. Here the proxied request polls its connection itself while it waits for
//! the response head, and the response body it hands to the server polls it while the body is
//! streamed back, so the whole exchange runs in the server connection's own task. Once the
//! body has ended the connection goes back to an idle list for the next request to the same
//! instance; one whose body was not read to its end is closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

type Conn = Connection<TokioIo<TcpStream>, Body>;

/// One connection: the request side and the connection's state machine.
struct Link {
    tx: SendRequest<Body>,
    conn: Pin<Box<Conn>>,
    idle_since: Instant,
}

/// Idle connections kept per instance.
const MAX_IDLE_PER_INSTANCE: usize = 16;
/// An idle connection unused this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often idle connections are swept (closed ones, old ones, those of ended instances).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

struct Idle {
    by_addr: HashMap<SocketAddr, Vec<Link>>,
    swept: Instant,
}

static IDLE: LazyLock<Mutex<Idle>> = LazyLock::new(|| {
    Mutex::new(Idle {
        by_addr: HashMap::new(),
        swept: Instant::now(),
    })
});

impl Link {
    /// Whether the connection can take a request: polled once (without a task to wake) to
    /// notice a close by the instance, and ready.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        self.conn.as_mut().poll(&mut cx).is_pending() && self.tx.is_ready()
    }
}

/// An idle connection to `addr` that can take a request, if any.
fn take(addr: SocketAddr) -> Option<Link> {
    let mut idle = IDLE.lock();
    let list = idle.by_addr.get_mut(&addr)?;
    let mut found = None;
    while let Some(mut l) = list.pop() {
        if l.usable() {
            found = Some(l);
            break;
        }
    }
    if list.is_empty() {
        idle.by_addr.remove(&addr);
    }
    found
}

/// Keeps a connection whose last exchange ended for the next request to `addr`.
fn put(addr: SocketAddr, mut link: Link) {
    link.idle_since = Instant::now();
    let mut idle = IDLE.lock();
    if idle.swept.elapsed() >= SWEEP_EVERY {
        idle.swept = Instant::now();
        idle.by_addr.retain(|_, list| {
            list.retain_mut(|l| l.idle_since.elapsed() < IDLE_TIMEOUT && l.usable());
            !list.is_empty()
        });
    }
    let list = idle.by_addr.entry(addr).or_default();
    if list.len() < MAX_IDLE_PER_INSTANCE {
        list.push(link);
    }
}

/// A new connection to `addr` (`TCP_NODELAY` set).
async fn connect(addr: SocketAddr) -> Result<Link, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Link {
        tx,
        conn: Box::pin(conn),
        idle_since: Instant::now(),
    })
}

/// Sends `req` (origin-form URI, `Host` set) to the instance at `addr` and returns its answer,
/// whose body keeps driving the connection. A request that an idle connection could not
/// take (it was closed meanwhile) is sent again on a new one. Errors: the instance cannot be
/// reached or did not answer (a message for the 502).
pub async fn send(addr: SocketAddr, req: Request<Body>) -> Result<Response<Body>, String> {
    let mut req = req;
    let mut reused = take(addr);
    loop {
        let fresh = reused.is_none();
        let link = match reused.take() {
            Some(l) => l,
            None => connect(addr).await?,
        };
        match exchange(link, req).await {
            Ok((resp, link)) => {
                let (parts, body) = resp.into_parts();
                let body = Body::new(Driven {
                    inner: body,
                    link: Some(link),
                    addr,
                });
                return Ok(Response::from_parts(parts, body));
            }
            Err((_, Some(back))) if !fresh => req = back,
            Err((e, _)) => return Err(e),
        }
    }
}

type Exchanged = Result<(Response<Incoming>, Link), (String, Option<Request<Body>>)>;

/// One request on `link`, polling the connection until the response head arrived. An error
/// gives the request back when it was never written.
async fn exchange(mut link: Link, req: Request<Body>) -> Exchanged {
    let mut answer = Box::pin(link.tx.try_send_request(req));
    let mut conn_done = false;
    let got = std::future::poll_fn(|cx| {
        if !conn_done {
            if let Poll::Ready(r) = link.conn.as_mut().poll(cx) {
                conn_done = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "instance connection failed");
                }
            }
        }
        match answer.as_mut().poll(cx) {
            Poll::Pending if conn_done => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => Poll::Ready(Some(r)),
        }
    })
    .await;
    drop(answer);
    match got {
        Some(Ok(resp)) => Ok((resp, link)),
        Some(Err(mut e)) => {
            let back = e.take_message();
            Err((e.into_error().to_string(), back))
        }
        None => Err(("the connection closed before an answer".into(), None)),
    }
}

/// A proxied response body that drives its connection, and gives the connection back for
/// the next request once it has ended.
struct Driven {
    inner: Incoming,
    link: Option<Link>,
    addr: SocketAddr,
}

impl HttpBody for Driven {
    type Data = axum::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(l) = &mut this.link {
            if l.conn.as_mut().poll(cx).is_ready() {
                this.link = None;
            }
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            if let Some(mut l) = this.link.take() {
                // Let the connection take the end of the message in, then keep it.
                if l.conn.as_mut().poll(cx).is_pending() {
                    put(this.addr, l);
                }
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
