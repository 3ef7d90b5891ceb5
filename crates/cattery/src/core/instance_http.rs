//! Talking to an instance over HTTP at its endpoint (the instance contract, `docs/instance-contract.md`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;

/// Result of the `/bot` request, once the agent answers (at the end of the session).
#[derive(Debug, Clone)]
pub enum BotOutcome {
    /// The agent answered with this HTTP status, and for an error, the `error` of its JSON
    /// body (the runner puts the bot's exception there).
    Answered(u16, Option<String>),
    /// The connection failed or broke before an answer.
    Broken(String),
    /// A websocket session ended; `by_client` when the client side closed or went away.
    WsClosed {
        /// Whether the client (not the agent) ended it.
        by_client: bool,
    },
}

/// Most of a `/bot` answer body read for its error text (the rest is not read).
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Longest error text kept from a `/bot` answer (characters).
const ERROR_TEXT_MAX: usize = 1000;

/// The `error` (else `detail`, FastAPI's) string of a JSON error body, trimmed and bounded.
pub fn error_of_body(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = v
        .get("error")
        .or_else(|| v.get("detail"))
        .and_then(|e| e.as_str())?
        .trim();
    if text.is_empty() {
        return None;
    }
    Some(match text.char_indices().nth(ERROR_TEXT_MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    })
}

/// A future resolving at a session's natural end.
pub type OutcomeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = BotOutcome> + Send>>;

/// How a session reaches its instance: called with the instance's address and the
/// session headers (`x-daily-session-id`, ...); resolves once the session is delivered, to a
/// future that resolves at the session's natural end. Errors: the instance refused it.
pub type Deliver = Box<
    dyn FnOnce(
            SocketAddr,
            Vec<(String, String)>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<OutcomeFuture, String>> + Send>,
        > + Send,
>;

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn handshake(addr: SocketAddr) -> Result<Sender, String> {
    let stream = connect(addr).await.map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// How long after its last answer a kept connection may carry the session's `/bot`: well
/// below any server's idle keep-alive timeout (uvicorn's default is 5 s), so the agent never
/// closes it as idle just as the request goes out.
pub const REUSE_WITHIN: Duration = Duration::from_secs(1);

/// An open keep-alive connection to an instance, and when it last answered.
pub struct Conn {
    sender: Sender,
    answered: std::time::Instant,
}

/// `GET path` on the instance; returns the status, or `None` when it does not answer within
/// `timeout` (connection refused included).
pub async fn get_status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    get_status_keep(addr, path, timeout).await.0
}

/// [`get_status`], also returning the connection when it can carry another request.
pub async fn get_status_keep(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> (Option<u16>, Option<Conn>) {
    let fut = async {
        let mut sender = handshake(addr).await.ok()?;
        let req = Request::get(path)
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        Some((status, sender))
    };
    match tokio::time::timeout(timeout, fut).await.ok().flatten() {
        Some((status, sender)) => {
            let conn = (!sender.is_closed()).then(|| Conn {
                sender,
                answered: std::time::Instant::now(),
            });
            (Some(status), conn)
        }
        None => (None, None),
    }
}

/// Delivers a session: sends `POST /bot` on `conn` (the connection of the `/readyz` answer
/// that found the instance ready) when it answered within [`REUSE_WITHIN`] and is still
/// open, else on a new connection. Returns once the request is on its way, with a future that
/// resolves when the agent answers (the session's natural end). Reusing the connection saves
/// a TCP handshake and the agent's `accept` on the start's path.
///
/// Errors: the instance does not accept a connection.
pub async fn post_bot(
    addr: SocketAddr,
    headers: Vec<(String, String)>,
    body: Bytes,
    conn: Option<Conn>,
) -> Result<impl std::future::Future<Output = BotOutcome> + Send + 'static, String> {
    let reusable = conn
        .filter(|c| c.answered.elapsed() < REUSE_WITHIN && c.sender.is_ready())
        .map(|c| c.sender);
    let mut sender = match reusable {
        Some(s) => s,
        None => handshake(addr).await?,
    };
    let mut b = Request::post("/bot")
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(k, v);
    }
    let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req);
    Ok(async move {
        match resp.await {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = http_body_util::Limited::new(r.into_body(), ERROR_BODY_LIMIT)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let error = (!(200..300).contains(&status))
                    .then(|| error_of_body(&body))
                    .flatten();
                BotOutcome::Answered(status, error)
            }
            Err(e) => BotOutcome::Broken(e.to_string()),
        }
    })
}
