//! The HTTP server under idle and slow connections (issue 16): header-read and body-read
//! timeouts, the connection cap below the open-file limit, the answers hyper gives before
//! routing, and websocket relays that outlive the timeouts.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::Server;

/// Raises this test process's soft open-files limit to its hard limit (it holds thousands of
/// sockets).
fn raise_own_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

/// `n` connections to the server, each sending `prefix` (nothing: an idle connection).
async fn open(s: &Server, n: usize, prefix: &[u8]) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        if !prefix.is_empty() {
            c.write_all(prefix).await.unwrap();
        }
        v.push(c);
    }
    v
}

/// Whether the server has closed `c` (end of file or reset); whatever it answered first is
/// drained.
fn closed(c: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Waits until every connection of `conns` is closed by the server, or panics after `budget`.
async fn wait_all_closed(conns: &[TcpStream], budget: Duration, what: &str) {
    let t0 = Instant::now();
    loop {
        let open = conns.iter().filter(|c| !closed(c)).count();
        if open == 0 {
            return;
        }
        assert!(
            t0.elapsed() < budget,
            "{open} of {} {what} connections still open after {budget:?}",
            conns.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /health` on a new connection; returns how long it took. Panics unless 200.
async fn timed_health(s: &Server) -> Duration {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let r = http
        .get(format!("{}/health", s.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("/health answers");
    assert_eq!(r.status(), 200);
    t0.elapsed()
}

/// `/health` (budget 1 s), then a start and a stop (budget 5 s each, as loaded CI machines go).
async fn api_answers(s: &Server, agent: &str) {
    for _ in 0..3 {
        let t = timed_health(s).await;
        assert!(t < Duration::from_secs(1), "/health took {t:?}");
    }
    let t0 = Instant::now();
    let sid = s.start_ok(agent).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "start took {:?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    let r = s.stop(agent, &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t0.elapsed()
    );
}

fn slow_body_head(s: &Server) -> Vec<u8> {
    format!(
        "POST /v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"serviceName\"",
        s.sk
    )
    .into_bytes()
}

fn chunked_head(s: &Server) -> Vec<u8> {
    format!(
        "POST /v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n",
        s.sk
    )
    .into_bytes()
}

const SLOW_HEAD: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slow_connections_at_a_1024_file_limit() {
    raise_own_nofile();
    let s = Server::start_limited(&[], &[], Some(1024)).await;
    s.deploy("conns", &[], json!({})).await;
    let idle = open(&s, 1100, b"").await;
    let slow_head = open(&s, 50, SLOW_HEAD).await;
    let slow_body = open(&s, 50, &slow_body_head(&s)).await;
    let chunked = open(&s, 1, &chunked_head(&s)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    api_answers(&s, "conns").await;

    // Every one of them is closed in the end: idle and slow heads by the header-read timeout
    // (or to make room at the cap), slow bodies and the endless chunked body by the body-read
    // timeout (10 s by default).
    let budget = Duration::from_secs(40);
    wait_all_closed(&slow_body, budget, "slow-body").await;
    wait_all_closed(&chunked, budget, "endless chunked body").await;
    wait_all_closed(&slow_head, budget, "slow-header").await;
    wait_all_closed(&idle, budget, "idle").await;
    api_answers(&s, "conns").await;
    let log = std::fs::read_to_string(s.dir.path().join("server.log")).unwrap();
    let failures = log.matches("accept failed").count();
    assert!(failures < 5, "accept failed {failures} times:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_idle_and_five_hundred_slow_connections() {
    raise_own_nofile();
    let s = Server::start(&[]).await;
    s.deploy("conns", &[], json!({})).await;
    let _idle = open(&s, 2000, b"").await;
    let _slow_head = open(&s, 250, SLOW_HEAD).await;
    let _slow_body = open(&s, 249, &slow_body_head(&s)).await;
    let _chunked = open(&s, 1, &chunked_head(&s)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    api_answers(&s, "conns").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn short_timeouts_close_idle_connections_but_not_websocket_relays() {
    let s = Server::start(&[
        "--header-read-timeout-seconds",
        "1",
        "--body-read-timeout-seconds",
        "1",
    ])
    .await;
    s.deploy("wslong", &[], json!({})).await;
    let idle = open(&s, 20, b"").await;
    let slow_head = open(&s, 5, SLOW_HEAD).await;
    let t0 = Instant::now();
    wait_all_closed(&idle, Duration::from_secs(10), "idle").await;
    wait_all_closed(&slow_head, Duration::from_secs(10), "slow-header").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "closed too soon"
    );

    // A slow body gets the API's own answer.
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    c.write_all(&slow_body_head(&s)).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .expect("slow body answered or closed")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\""), "{answer}");

    // A websocket relay idle for longer than both timeouts goes on.
    let r = s
        .start_session("wslong", json!({"transport": "websocket", "body": {}}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let url = format!(
        "{}?token={}",
        r.body["wsUrl"].as_str().unwrap(),
        r.body["token"].as_str().unwrap()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws connect");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(Message::Text("still here".into())).await.unwrap();
    let t0 = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "still here" => break,
            Ok(Some(Ok(_))) if t0.elapsed() < Duration::from_secs(10) => {}
            other => panic!("relay cut: {other:?}"),
        }
    }
    ws.close(None).await.ok();
}

/// Sends raw bytes on a new connection and returns everything the server sent before closing.
async fn raw(s: &Server, req: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    c.write_all(req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .expect("server closes the connection")
        .ok();
    out
}

/// Requests hyper rejects before any routing get its own bare answers (a status line and no
/// body; documented in docs/compatibility.md), and the connection is closed.
#[tokio::test(flavor = "multi_thread")]
async fn rejected_before_routing() {
    let s = Server::start(&[]).await;
    let garbage = raw(&s, b"GARBAGE\r\n\r\n").await;
    let garbage = String::from_utf8_lossy(&garbage);
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    assert!(garbage.contains("content-length: 0"), "{garbage}");

    let bad_utf8 = raw(&s, b"GET /v1/agents/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let bad_utf8 = String::from_utf8_lossy(&bad_utf8);
    assert!(bad_utf8.starts_with("HTTP/1.1 400"), "{bad_utf8}");

    let mut many = b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let too_many = raw(&s, &many).await;
    let too_many = String::from_utf8_lossy(&too_many);
    assert!(too_many.starts_with("HTTP/1.1 431"), "{too_many}");

    // Percent-encoded invalid UTF-8 reaches the router: JSON like every other error.
    let r = s.req("GET", "/v1/agents/%FF", Some(&s.sk), None).await;
    assert_eq!(r.status, 400);
    assert!(r.body["code"].is_string(), "{:?}", r.body);
}
