//! Session API proxy and the websocket transport, against the real binary and test agent.

use crate::common;
use std::time::Duration;

use crate::common::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread")]
async fn session_proxy_forwards_and_404s_after_end() {
    let s = Server::start(&[]).await;
    s.deploy("proxied", &[], json!({})).await;
    let sid = s.start_ok("proxied").await;
    let base = format!("{}/v1/public/proxied/sessions/{sid}", s.base);

    let r = s
        .http
        .get(format!("{base}/status/deep?x=1&y=two"))
        .bearer_auth(&s.pk)
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/status/deep");
    assert_eq!(v["query"], "x=1&y=two");
    assert_eq!(v["headers"]["x-daily-session-id"], sid.as_str());
    assert_eq!(v["headers"]["x-custom"], "kept");
    assert!(
        v["headers"].get("authorization").is_none(),
        "authorization must not be forwarded"
    );

    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let r = s
            .http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{base}/api/thing"),
            )
            .bearer_auth(&s.pk)
            .body("{\"k\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["method"], method);
        assert_eq!(v["body"], "{\"k\":1}");
    }
    let r = s
        .http
        .head(format!("{base}/x"))
        .bearer_auth(&s.pk)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{base}/x"))
        .bearer_auth(&s.pk)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Auth and unknown sessions.
    let r = s
        .http
        .get(format!("{base}/x"))
        .bearer_auth(&s.sk)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let unknown = uuid::Uuid::new_v4();
    let r = s
        .req(
            "GET",
            &format!("/v1/public/proxied/sessions/{unknown}/x"),
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(r.body["error"].is_string());
    let r = s
        .req(
            "GET",
            "/v1/public/proxied/sessions/nope/x",
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(r.status, 400);
    // A running session named under another agent of the org is not found.
    s.deploy("proxied-other", &[], json!({})).await;
    let r = s
        .req(
            "GET",
            &format!("/v1/public/proxied-other/sessions/{sid}/x"),
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(r.status, 404);

    assert_eq!(s.stop("proxied", &sid).await.status, 200);
    let r = s
        .req(
            "GET",
            &format!("/v1/public/proxied/sessions/{sid}/status"),
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["code"], "404");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_waits_for_a_starting_instance() {
    let s = Server::start(&[]).await;
    s.deploy("slowproxy", &["--startup-delay", "1"], json!({}))
        .await;
    // Start in the background, find the session while it is still starting, and proxy to it.
    let s2 = &s;
    let start = async move { s2.start_session("slowproxy", json!({})).await };
    let probe = async {
        let sid = common::wait_for(Duration::from_secs(10), "session to appear", || async {
            s.latest_session("slowproxy").await["sessionId"]
                .as_str()
                .map(str::to_string)
        })
        .await;
        s.req(
            "GET",
            &format!("/v1/public/slowproxy/sessions/{sid}/hello"),
            Some(&s.pk),
            None,
        )
        .await
    };
    let (started, proxied) = tokio::join!(start, probe);
    assert_eq!(started.status, 200);
    assert_eq!(proxied.status, 200, "{:?}", proxied.body);
    assert_eq!(proxied.body["path"], "/hello");
}

/// The `wsUrl` of a websocket `/start` answer with its token as `?token=`.
fn token_url(a: &serde_json::Value) -> String {
    format!(
        "{}?token={}",
        a["wsUrl"].as_str().unwrap(),
        a["token"].as_str().unwrap()
    )
}

async fn ws_start(s: &Server, agent: &str, body: serde_json::Value) -> serde_json::Value {
    let r = s
        .start_session(agent, json!({"transport": "websocket", "body": body}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_transport_relays_and_ends_on_client_close() {
    let s = Server::start(&[]).await;
    s.deploy("wsagent", &[], json!({})).await;
    let a = ws_start(&s, "wsagent", json!({"lang": "en"})).await;
    for k in ["sessionId", "token", "wsUrl", "body"] {
        assert!(a[k].is_string(), "start answer lacks {k}: {a}");
    }
    let sid = a["sessionId"].as_str().unwrap().to_string();
    // No bot started at /start.
    assert!(s.agent_pids().is_empty());
    // Recorded at /start, waiting for its client (issue 17).
    let g = s
        .req(
            "GET",
            &format!("/v1/agents/wsagent/sessions/{sid}"),
            Some(&s.sk),
            None,
        )
        .await;
    assert_eq!(g.status, 200, "recorded from /start: {:?}", g.body);
    assert_eq!(g.body["waitingForClient"], true, "{:?}", g.body);
    assert!(g.body["endedAt"].is_null());
    let created = g.body["createdAt"].clone();

    let url = token_url(&a);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws connect");
    // The agent streams 320-byte audio frames and echoes what we send.
    ws.send(Message::Text("hello agent".into())).await.unwrap();
    let mut saw_audio = false;
    let mut saw_echo = false;
    let t0 = std::time::Instant::now();
    while !(saw_audio && saw_echo) && t0.elapsed() < Duration::from_secs(10) {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.len() == 320 => saw_audio = true,
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "hello agent" => saw_echo = true,
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_audio && saw_echo);
    let g = s.session("wsagent", &sid).await;
    assert!(g["endedAt"].is_null());
    assert_eq!(g["transport"], "websocket");
    // The same record, delivered: no longer waiting, an instance assigned.
    assert_eq!(g["waitingForClient"], false, "{g:?}");
    assert_eq!(g["createdAt"], created);
    assert!(
        g["botStartSeconds"].is_number() && g["coldStart"].is_boolean(),
        "{g:?}"
    );
    let l = s
        .req("GET", "/v1/agents/wsagent/sessions", Some(&s.sk), None)
        .await;
    assert_eq!(
        l.body["total_count"], 1,
        "one session, not two: {:?}",
        l.body
    );

    // The token was single use.
    let again = tokio_tungstenite::connect_async(url.as_str()).await;
    assert!(again.is_err(), "a replayed token must be refused");
    let bad = format!("{}?token=nope", a["wsUrl"].as_str().unwrap());
    assert!(tokio_tungstenite::connect_async(bad.as_str())
        .await
        .is_err());
    assert!(
        tokio_tungstenite::connect_async(a["wsUrl"].as_str().unwrap())
            .await
            .is_err(),
        "token required"
    );

    ws.close(None).await.unwrap();
    let g = s.wait_ended("wsagent", &sid, Duration::from_secs(15)).await;
    assert_eq!(g["endReason"], "client_disconnected");
    assert_eq!(g["completionStatus"], "WS_CONNECTION_CLOSED");
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_stop_and_agent_close() {
    let s = Server::start(&[]).await;
    s.deploy("wsstop", &["--ignore-transport-close"], json!({}))
        .await;
    s.deploy(
        "wsshort",
        &["--bot-seconds", "1"],
        json!({"websocketAuth": "none"}),
    )
    .await;

    // Stop through the API closes the client's socket.
    let a = ws_start(&s, "wsstop", json!({})).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    let url = format!(
        "{}/{}",
        a["wsUrl"].as_str().unwrap(),
        a["token"].as_str().unwrap()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let st = s.stop("wsstop", &sid).await;
    assert_eq!(st.status, 200);
    assert_eq!(st.body["status"], "terminated");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "client socket must close after a stop");
    assert!(s.agent_pids().is_empty());

    // websocketAuth none: no token; the agent ends the session after 1 s.
    let url = format!("ws://127.0.0.1:{}/ws/generic/wsshort.default", s.port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let mut got_close = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if m.is_close() {
            got_close = true;
            break;
        }
    }
    assert!(got_close);
    let sess = s.latest_session("wsshort").await;
    let sid = sess["sessionId"].as_str().unwrap();
    let g = s.wait_ended("wsshort", sid, Duration::from_secs(15)).await;
    assert_eq!(g["endReason"], "completed");
    assert_eq!(g["completionStatus"], "WS_CONNECTION_CLOSED");
}

/// L04: a client that half-closes (FIN without a close frame) or just vanishes must not keep
/// the session alive: it ends within close-handshake timeout + idle timeout + stop grace.
#[tokio::test(flavor = "multi_thread")]
async fn l04_half_closed_and_vanished_websocket_clients() {
    let s = Server::start(&[
        "--ws-idle-timeout-seconds",
        "2",
        "--stop-grace-seconds",
        "1",
    ])
    .await;
    s.deploy(
        "halfclose",
        &["--ignore-transport-close", "--ignore-sigterm"],
        json!({}),
    )
    .await;

    // Variant 1: TCP FIN without a close frame while the agent is writing audio.
    let a = ws_start(&s, "halfclose", json!({})).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    let url = token_url(&a);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let t0 = std::time::Instant::now();
    match ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => {
            use tokio::io::AsyncWriteExt;
            tcp.shutdown().await.unwrap();
        }
        _ => unreachable!(),
    }
    let g = s
        .wait_ended("halfclose", &sid, Duration::from_secs(15))
        .await;
    assert_eq!(g["endReason"], "client_disconnected");
    assert!(
        t0.elapsed() < Duration::from_secs(2 + 2 + 1 + 3),
        "took {:?}",
        t0.elapsed()
    );
    s.wait_no_agent_pids(Duration::from_secs(5)).await;
    drop(ws);

    // Variant 2: the client just goes silent (no FIN, no frames, no pongs).
    let a = ws_start(&s, "halfclose", json!({})).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    let url = token_url(&a);
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    // The session exists once the relay is set up (the upgrade answers before that).
    common::wait_for(Duration::from_secs(15), "ws session record", || async {
        let r = s
            .req(
                "GET",
                &format!("/v1/agents/halfclose/sessions/{sid}"),
                Some(&s.sk),
                None,
            )
            .await;
        (r.status == 200 && r.body["botStartSeconds"].is_number()).then_some(())
    })
    .await;
    let t0 = std::time::Instant::now();
    // Keep the socket open but never read or write it again.
    let g = s
        .wait_ended("halfclose", &sid, Duration::from_secs(20))
        .await;
    assert_eq!(g["endReason"], "client_disconnected");
    assert!(
        t0.elapsed() < Duration::from_secs(2 + 2 + 1 + 5),
        "took {:?}",
        t0.elapsed()
    );
    s.wait_no_agent_pids(Duration::from_secs(5)).await;
    drop(ws);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_websocket_token_is_refused() {
    let s = Server::start(&["--ws-token-ttl-seconds", "1"]).await;
    s.deploy("wsexpire", &[], json!({})).await;
    let a = ws_start(&s, "wsexpire", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let url = token_url(&a);
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("an expired token must get 403 at the handshake, got {other:?}"),
    }
    assert!(
        s.agent_pids().is_empty(),
        "no bot may start for a refused token"
    );
}

/// A websocket session is recorded at `/start` (issue 17): listed as waiting for its client,
/// stopped with the seed's `DELETE` (after which its token is refused), ended
/// `client_never_connected` when its token expires; no bot starts for either.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_session_recorded_from_start() {
    let s = Server::start(&["--ws-token-ttl-seconds", "2"]).await;
    s.deploy("wsrec", &[], json!({})).await;
    let a = ws_start(&s, "wsrec", json!({})).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    let l = s
        .req(
            "GET",
            "/v1/agents/wsrec/sessions?status=active",
            Some(&s.sk),
            None,
        )
        .await;
    assert_eq!(l.status, 200);
    assert_eq!(
        l.body["sessions"][0]["sessionId"],
        sid.as_str(),
        "{:?}",
        l.body
    );
    assert_eq!(l.body["sessions"][0]["waitingForClient"], true);

    let st = s.stop("wsrec", &sid).await;
    assert_eq!(st.status, 200);
    assert_eq!(st.body, json!({"status": "terminated", "session_id": sid}));
    let g = s.session("wsrec", &sid).await;
    assert_eq!(g["endReason"], "stopped_during_start", "{g:?}");
    assert_eq!(g["endState"], "ended_before_agent_start");
    match tokio_tungstenite::connect_async(token_url(&a).as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("a stopped session's token must be refused, got {other:?}"),
    }

    let a = ws_start(&s, "wsrec", json!({})).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    let g = s.wait_ended("wsrec", &sid, Duration::from_secs(10)).await;
    assert_eq!(g["endReason"], "client_never_connected", "{g:?}");
    assert_eq!(g["endState"], "ended_before_agent_start");
    assert_eq!(g["waitingForClient"], false);
    let l = s
        .req(
            "GET",
            "/v1/agents/wsrec/sessions?endReason=client_never_connected",
            Some(&s.sk),
            None,
        )
        .await;
    assert_eq!(l.body["total_count"], 1, "{:?}", l.body);
    assert!(s.agent_pids().is_empty(), "no bot started for either");
}

/// Reads a websocket client's stream until the server's close frame: its code, or a panic
/// naming what came instead (an error such as a reset without a close frame, or the end).
async fn close_code<S>(ws: &mut S) -> u16
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return u16::from(f.code),
            Ok(Some(Ok(Message::Close(None)))) => panic!("a close frame without a code"),
            Ok(Some(Ok(_))) => {}
            other => panic!("the connection ended without a close frame: {other:?}"),
        }
    }
}

/// A websocket session the platform ends gets its client a close frame before the
/// connection goes (before, a `DELETE` or the drain dropped the TCP connection: 1006 at the
/// client): 1000 after a `DELETE`, 1001 (going away) in the drain. A client that does not
/// answer the close does not hold the stop up beyond the close handshake's bound.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_client_gets_a_close_frame_when_the_platform_ends_its_session() {
    let mut s = Server::start(&["--stop-grace-seconds", "1", "--drain-timeout-seconds", "1"]).await;
    s.deploy("wsclose", &["--ignore-transport-close"], json!({}))
        .await;

    // DELETE: 1000, and the close handshake completes (the client's answer is read).
    let a = ws_start(&s, "wsclose", json!({})).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    let (mut ws, _) = tokio_tungstenite::connect_async(token_url(&a).as_str())
        .await
        .unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "hello" => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("no echo: {other:?}"),
        }
    }
    let reader = tokio::spawn(async move { close_code(&mut ws).await });
    assert_eq!(s.stop("wsclose", &sid).await.status, 200);
    assert_eq!(reader.await.unwrap(), 1000);
    let g = s.session("wsclose", &sid).await;
    assert_eq!(g["endReason"], "stopped", "{g}");
    assert!(s.agent_pids().is_empty());

    // A client that never reads again: the stop still answers, within the bound of the close
    // handshake (3 s at most) and the agent's own exit on SIGTERM, with slack for a shared CI
    // machine.
    let a = ws_start(&s, "wsclose", json!({})).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    let (silent, _) = tokio_tungstenite::connect_async(token_url(&a).as_str())
        .await
        .unwrap();
    common::wait_for(Duration::from_secs(15), "session delivered", || async {
        let g = s.session("wsclose", &sid).await;
        g["botStartSeconds"].is_number().then_some(())
    })
    .await;
    let t0 = std::time::Instant::now();
    assert_eq!(s.stop("wsclose", &sid).await.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());
    drop(silent);

    // The drain: 1001.
    let a = ws_start(&s, "wsclose", json!({})).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(token_url(&a).as_str())
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let sid = a["sessionId"].as_str().unwrap().to_string();
    common::wait_for(Duration::from_secs(15), "session delivered", || async {
        let g = s.session("wsclose", &sid).await;
        g["botStartSeconds"].is_number().then_some(())
    })
    .await;
    let reader = tokio::spawn(async move { close_code(&mut ws).await });
    s.signal(15);
    assert_eq!(reader.await.unwrap(), 1001);
    assert!(s.terminate(Duration::from_secs(30)).is_some());
}
