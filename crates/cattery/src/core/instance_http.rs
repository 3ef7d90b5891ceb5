//! Talking to an instance over HTTP at its endpoint (the instance contract, `docs/instance-contract.md`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use ureq_proto::client::{
    state::RecvResponse, Call, RecvBodyResult, RecvResponseResult, SendRequestResult,
};
use ureq_proto::http::Request;

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
    /// The agent closed its websocket with 1011 (internal error): the Python runner's close
    /// when `bot()` raised. The close frame's reason.
    WsAgentError(String),
}

/// Most of a `/bot` answer body read for its error text (the rest is not read).
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Longest error text kept from a `/bot` answer (characters).
const ERROR_TEXT_MAX: usize = 1000;

/// The `error` (else `detail`, FastAPI's) string of a JSON error body, trimmed and bounded.
/// A `detail` list (FastAPI's validation error, e.g. the 422 of a `/bot` whose body is not a
/// JSON object) is told as `<loc>: <msg>` per item; the items' `input` (the body sent) is left
/// out.
pub fn error_of_body(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = match v.get("error").or_else(|| v.get("detail"))? {
        serde_json::Value::String(s) => s.trim().to_string(),
        serde_json::Value::Array(items) => validation_errors(items),
        _ => return None,
    };
    let text = text.as_str();
    if text.is_empty() {
        return None;
    }
    Some(match text.char_indices().nth(ERROR_TEXT_MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    })
}

/// FastAPI's validation `detail` items as `body: Input should be a valid dictionary; ...`.
fn validation_errors(items: &[serde_json::Value]) -> String {
    let told: Vec<String> = items
        .iter()
        .filter_map(|item| {
            let msg = item.get("msg")?.as_str()?.trim();
            let loc: Vec<String> = item
                .get("loc")
                .and_then(|l| l.as_array())
                .map(|l| {
                    l.iter()
                        .map(|p| match p {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(if loc.is_empty() {
                msg.to_string()
            } else {
                format!("{}: {msg}", loc.join("."))
            })
        })
        .collect();
    told.join("; ")
}

/// A future resolving at a session's natural end.
pub type OutcomeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = BotOutcome> + Send>>;

/// Why the platform ends a relayed session, sent to its relay before the instance is
/// stopped: the websocket close code and reason the relay closes its client with.
pub type RelayStop = tokio::sync::oneshot::Receiver<(u16, &'static str)>;

/// How a session reaches its instance: called with the instance's address, the session
/// headers (`x-daily-session-id`, ...) and the channel on which the platform's stop of the
/// session arrives ([`RelayStop`]); resolves once the session is delivered, to a future that
/// resolves at the session's natural end (or once it has closed its client after a stop).
/// Errors: the instance refused it.
pub type Deliver = Box<
    dyn FnOnce(
            SocketAddr,
            Vec<(String, String)>,
            RelayStop,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<OutcomeFuture, String>> + Send>,
        > + Send,
>;

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

// The requests to an instance (`/readyz`, `/bot`) are HTTP/1.1 exchanges on a plain
// `TcpStream`, framed by `ureq-proto` (sans-IO: request head and body out, response head and
// body in, keep-alive rules). A `/bot` request stays unanswered for the whole session, so
// what it holds meanwhile is held once per live session: here the socket and the call's
// small state; the read buffer is allocated only when the answer arrives. (A hyper client
// connection held about 27 KiB per session: its dispatch channel, 8 KiB write and 8 KiB
// read buffers, and a task.)

/// Longest response head read from an instance (bytes).
const HEAD_LIMIT: usize = 64 * 1024;

/// What a read of an answer got: the status, up to the limit of its body, and whether the
/// connection can carry another request.
struct Answer {
    status: u16,
    body: Vec<u8>,
    reusable: bool,
}

fn proto_err(e: ureq_proto::Error) -> String {
    e.to_string()
}

/// Writes `req` with `body` (its `content-length` set here) on `stream`. Returns once the
/// whole request is written, with the call waiting for the answer.
async fn send(
    stream: &mut TcpStream,
    req: Request<()>,
    body: &[u8],
) -> Result<Call<RecvResponse>, String> {
    let mut call = Call::new(req).map_err(proto_err)?;
    if !body.is_empty() || call.method() == ureq_proto::http::Method::POST {
        call.header("content-length", body.len().to_string())
            .map_err(proto_err)?;
    }
    let mut call = call.proceed();
    let mut out = vec![0u8; 1024];
    let mut used = 0;
    while !call.can_proceed() {
        if used == out.len() {
            out.resize(out.len() * 2, 0);
        }
        match call.write(&mut out[used..]) {
            Ok(n) => used += n,
            // A header line longer than what is left: grow and go on.
            Err(ureq_proto::Error::OutputOverflow) if out.len() < HEAD_LIMIT => {
                out.resize(out.len() * 2, 0)
            }
            Err(e) => return Err(proto_err(e)),
        }
    }
    out.truncate(used);
    let call = match call.proceed().map_err(proto_err)? {
        Some(SendRequestResult::RecvResponse(c)) => c,
        Some(SendRequestResult::SendBody(mut c)) => {
            out.extend_from_slice(body);
            c.consume_direct_write(body.len()).map_err(proto_err)?;
            c.proceed().ok_or("request body not complete")?
        }
        Some(SendRequestResult::Await100(_)) | None => {
            return Err("unexpected request state".into())
        }
    };
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    Ok(call)
}

/// Reads more of an answer into `buf` (allocated only now: an idle wait holds no buffer).
/// Returns the bytes read, 0 at the end of the stream.
async fn read_more(stream: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        buf.reserve(4096);
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Reads the answer to `call`: its head, then its body up to `body_limit` bytes (a longer
/// body is cut there, and the connection not reused). Errors: the connection closed or broke
/// before a complete head. A body cut short by the connection is kept as far as it came.
async fn receive(
    stream: &TcpStream,
    mut call: Call<RecvResponse>,
    body_limit: usize,
) -> Result<Answer, String> {
    let closed = || "connection closed before message completed".to_string();
    let mut buf = Vec::new();
    let status = loop {
        let (used, resp) = call.try_response(&buf, false).map_err(proto_err)?;
        buf.drain(..used);
        if let Some(r) = resp {
            break r.status().as_u16();
        }
        if used == 0 {
            if buf.len() >= HEAD_LIMIT {
                return Err("response head too large".into());
            }
            if read_more(stream, &mut buf)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err(closed());
            }
        }
    };
    let mut answer = Answer {
        status,
        body: Vec::new(),
        reusable: false,
    };
    let mut body = match call.proceed() {
        Some(RecvResponseResult::RecvBody(b)) => b,
        Some(RecvResponseResult::Cleanup(c)) => {
            answer.reusable = !c.must_close_connection() && buf.is_empty();
            return Ok(answer);
        }
        Some(RecvResponseResult::Redirect(_)) | None => return Ok(answer),
    };
    let close_delimited = body.body_mode() == ureq_proto::BodyMode::CloseDelimited;
    loop {
        if !buf.is_empty() && answer.body.len() < body_limit {
            let start = answer.body.len();
            answer.body.resize(body_limit.min(start + buf.len()), 0);
            let (i, o) = body
                .read(&buf, &mut answer.body[start..])
                .map_err(proto_err)?;
            buf.drain(..i);
            answer.body.truncate(start + o);
        }
        if body.can_proceed() && !close_delimited {
            break;
        }
        if answer.body.len() >= body_limit {
            return Ok(answer);
        }
        match read_more(stream, &mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return Ok(answer),
        }
    }
    if let Some(RecvBodyResult::Cleanup(c)) = body.proceed() {
        answer.reusable = !c.must_close_connection() && buf.is_empty();
    }
    Ok(answer)
}

fn request(method: &str, addr: SocketAddr, path: &str) -> ureq_proto::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
}

/// How long after its last answer a kept connection may carry the session's `/bot`: well
/// below any server's idle keep-alive timeout (uvicorn's default is 5 s), so the agent never
/// closes it as idle just as the request goes out.
pub const REUSE_WITHIN: Duration = Duration::from_secs(1);

/// An open keep-alive connection to an instance, and when it last answered.
pub struct Conn {
    stream: TcpStream,
    answered: std::time::Instant,
}

impl Conn {
    /// Whether the connection can carry a request now: answered within [`REUSE_WITHIN`],
    /// not closed by the agent, nothing unread on it.
    fn usable(&self) -> bool {
        self.answered.elapsed() < REUSE_WITHIN
            && matches!(self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// `GET path` on the instance; returns the status, or `None` when it does not answer within
/// `timeout` (connection refused included).
pub async fn get_status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    get_status_keep(addr, path, timeout).await.0
}

/// Most of a `GET` answer body read (the rest is not read, and the connection not kept).
const GET_BODY_LIMIT: usize = 16 * 1024;

/// [`get_status`], also returning the connection when it can carry another request.
pub async fn get_status_keep(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> (Option<u16>, Option<Conn>) {
    let fut = async {
        let mut stream = connect(addr).await.ok()?;
        let req = request("GET", addr, path).body(()).ok()?;
        let call = send(&mut stream, req, &[]).await.ok()?;
        let answer = receive(&stream, call, GET_BODY_LIMIT).await.ok()?;
        Some((answer, stream))
    };
    match tokio::time::timeout(timeout, fut).await.ok().flatten() {
        Some((answer, stream)) => {
            let conn = answer.reusable.then(|| Conn {
                stream,
                answered: std::time::Instant::now(),
            });
            (Some(answer.status), conn)
        }
        None => (None, None),
    }
}

/// Delivers a session: sends `POST /bot` on `conn` (the connection of the `/readyz` answer
/// that found the instance ready) when it answered within [`REUSE_WITHIN`] and is still
/// open, else on a new connection. Returns once the request is written, with a future that
/// resolves when the agent answers (the session's natural end). Reusing the connection saves
/// a TCP handshake and the agent's `accept` on the start's path.
///
/// Errors: the instance does not accept a connection, or a header is not valid HTTP.
pub async fn post_bot(
    addr: SocketAddr,
    headers: Vec<(String, String)>,
    body: Bytes,
    conn: Option<Conn>,
) -> Result<impl std::future::Future<Output = BotOutcome> + Send + 'static, String> {
    let mut b = request("POST", addr, "/bot").header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(k, v);
    }
    let req = b.body(()).map_err(|e| e.to_string())?;
    let mut stream = match conn.filter(Conn::usable) {
        Some(c) => c.stream,
        None => connect(addr).await.map_err(|e| e.to_string())?,
    };
    let call = send(&mut stream, req, &body).await?;
    Ok(async move {
        match receive(&stream, call, ERROR_BODY_LIMIT).await {
            Ok(a) => {
                let error = (!(200..300).contains(&a.status))
                    .then(|| error_of_body(&a.body))
                    .flatten();
                BotOutcome::Answered(a.status, error)
            }
            Err(e) => BotOutcome::Broken(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A listener on a free port of the loopback address, and that address.
    async fn listen() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// A one-connection server: reads one request head (and a `content-length` body), answers
    /// `answer` and, with `close`, closes; returns what it received.
    async fn serve_once(
        answer: &'static [u8],
        close: bool,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let (l, addr) = listen().await;
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            s.write_all(answer).await.unwrap();
            if !close {
                // Keep the connection open until the client is done with it.
                let _ = s.read(&mut buf).await;
            }
            got
        });
        (addr, h)
    }

    /// Posts an empty `/bot` request to a [`serve_once`] server answering `answer`; returns
    /// the server's address and the outcome.
    async fn post_empty_bot(answer: &'static [u8], close: bool) -> (SocketAddr, BotOutcome) {
        let (addr, _h) = serve_once(answer, close).await;
        let out = post_bot(addr, vec![], Bytes::new(), None)
            .await
            .unwrap()
            .await;
        (addr, out)
    }

    #[tokio::test]
    async fn bot_request_and_its_answers() {
        // A 2xx answer with a content-length body; the request carries the session headers.
        let (addr, h) = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", true).await;
        let headers = vec![("x-daily-session-id".to_string(), "s1".to_string())];
        let out = post_bot(addr, headers, Bytes::from_static(b"{\"a\":1}"), None)
            .await
            .unwrap()
            .await;
        assert!(matches!(out, BotOutcome::Answered(200, None)), "{out:?}");
        let req = String::from_utf8(h.await.unwrap()).unwrap();
        assert!(req.starts_with("POST /bot HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("host: {addr}\r\n")), "{req}");
        assert!(req.contains("content-type: application/json\r\n"), "{req}");
        assert!(req.contains("x-daily-session-id: s1\r\n"), "{req}");
        assert!(req.contains("content-length: 7\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n{\"a\":1}"), "{req}");

        // An error answer: the `error` of its body, whether chunked or delimited by the close
        // of the connection.
        let errors: [(&[u8], bool, u16, &str); 2] = [
            (
                b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n6\r\n{\"erro\r\n9\r\nr\":\"boom\"\r\n1\r\n}\r\n0\r\n\r\n",
                false,
                500,
                "boom",
            ),
            (
                b"HTTP/1.1 422 Unprocessable\r\n\r\n{\"detail\":\"bad\"}",
                true,
                422,
                "bad",
            ),
        ];
        for (answer, close, status, error) in errors {
            let (_, out) = post_empty_bot(answer, close).await;
            assert!(
                matches!(&out, BotOutcome::Answered(s, Some(e)) if *s == status && e == error),
                "{out:?}"
            );
        }

        // The connection closes before an answer: broken.
        let (addr, out) = post_empty_bot(b"", true).await;
        assert!(matches!(out, BotOutcome::Broken(_)), "{out:?}");

        // A header that is not valid HTTP is refused before anything is sent.
        let bad = vec![("x-bad".to_string(), "a\r\nb".to_string())];
        assert!(post_bot(addr, bad, Bytes::new(), None).await.is_err());
    }

    #[tokio::test]
    async fn the_readyz_connection_carries_the_bot_request() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready")
                .await
                .unwrap();
            got.clear();
            while !String::from_utf8_lossy(&got).contains("\r\n\r\n{}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the /bot request comes on the same connection");
                got.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&got).starts_with("POST /bot "));
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
        });
        let (status, conn) = get_status_keep(addr, "/readyz", Duration::from_secs(5)).await;
        assert_eq!(status, Some(200));
        let conn = conn.expect("a keep-alive answer leaves the connection usable");
        let out = post_bot(addr, vec![], Bytes::from_static(b"{}"), Some(conn))
            .await
            .unwrap()
            .await;
        assert!(matches!(out, BotOutcome::Answered(204, None)), "{out:?}");
        server.await.unwrap();

        // `Connection: close` leaves nothing to reuse; no answer in time is `None`.
        let (addr, _h) = serve_once(
            b"HTTP/1.1 503 Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            true,
        )
        .await;
        let (status, conn) = get_status_keep(addr, "/readyz", Duration::from_secs(5)).await;
        assert_eq!(status, Some(503));
        assert!(conn.is_none());
        let (_silent, addr) = listen().await;
        assert_eq!(
            get_status(addr, "/readyz", Duration::from_millis(200)).await,
            None
        );
    }
}
