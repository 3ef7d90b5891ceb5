//! Telephony websockets (`/ws/twilio`, `/ws/telnyx`, ... and `/ws/generic?serviceHost=`)
//! against the real binary and test agent, which echoes text frames and streams 320-byte
//! audio frames: a Twilio media-stream client naming the agent in its `start` message's
//! custom parameters, a Telnyx client naming it in the query, every frame relayed both ways
//! with the opening messages first, token mode refusing a missing or replayed token, and a
//! connection that never names its agent closed.

use std::time::{Duration, Instant};

use crate::common::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn twilio_start(host: Option<&str>, token: Option<&str>) -> String {
    let mut params = json!({"caller": "+15550001111"});
    if let Some(h) = host {
        params["_pipecatCloudServiceHost"] = json!(h);
    }
    if let Some(t) = token {
        params["_pipecatCloudToken"] = json!(t);
    }
    json!({"event": "start", "sequenceNumber": "1", "streamSid": "MZ0001",
           "start": {"streamSid": "MZ0001", "callSid": "CA0001", "accountSid": "AC0001",
                     "tracks": ["inbound"], "customParameters": params,
                     "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
    .to_string()
}

const CONNECTED: &str = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
const MEDIA: &str = r#"{"event":"media","sequenceNumber":"2","streamSid":"MZ0001","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"//////////8="}}"#;

/// Sends `frames`, then reads until each came back (in order) and audio arrived.
async fn relayed_both_ways(ws: &mut Ws, frames: &[String]) {
    for f in frames {
        ws.send(Message::Text(f.as_str().into())).await.unwrap();
    }
    let mut echoed = Vec::new();
    let mut audio = 0;
    let t0 = Instant::now();
    while (echoed.len() < frames.len() || audio < 3) && t0.elapsed() < Duration::from_secs(20) {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => echoed.push(t.as_str().to_string()),
            Ok(Some(Ok(Message::Binary(b)))) if b.len() == 320 => audio += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        echoed, frames,
        "every frame, the opening ones first, in order"
    );
    assert!(audio >= 3, "audio from the agent: {audio}");
}

async fn connect(s: &Server, path: &str) -> Result<Ws, String> {
    let url = format!("ws://127.0.0.1:{}{path}", s.port);
    tokio_tungstenite::connect_async(url.as_str())
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// The `(status, body)` of a refused handshake.
async fn refused(s: &Server, path: &str) -> (u16, serde_json::Value) {
    let url = format!("ws://127.0.0.1:{}{path}", s.port);
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r.body().as_deref().unwrap_or_default();
            (r.status().as_u16(), serde_json::from_slice(body).unwrap())
        }
        other => panic!("{path}: expected a refused handshake, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_and_telnyx_media_streams_reach_the_agent() {
    let s = Server::start(&[]).await;
    s.deploy("phone", &[], json!({"websocketAuth": "none"}))
        .await;

    // Twilio: no query string; the agent is named in the start message.
    let mut ws = connect(&s, "/ws/twilio").await.unwrap();
    let frames = vec![
        CONNECTED.to_string(),
        twilio_start(Some("phone.default"), None),
        MEDIA.to_string(),
    ];
    relayed_both_ways(&mut ws, &frames).await;
    let sess = s.latest_session("phone").await;
    let sid = sess["sessionId"].as_str().unwrap();
    assert_eq!(sess["transport"], "websocket");
    ws.close(None).await.unwrap();
    let g = s.wait_ended("phone", sid, Duration::from_secs(15)).await;
    assert_eq!(g["endState"], "completed", "{g}");

    // Telnyx: the agent in the query.
    let mut ws = connect(&s, "/ws/telnyx?serviceHost=phone.default")
        .await
        .unwrap();
    let frames = vec![
        r#"{"event":"connected","version":"1.0.0"}"#.to_string(),
        r#"{"event":"start","sequence_number":"1","start":{"call_control_id":"v3:1","media_format":{"encoding":"PCMU","sample_rate":8000,"channels":1}},"stream_id":"s1"}"#.to_string(),
        r#"{"event":"media","sequence_number":"2","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"//////8="},"stream_id":"s1"}"#.to_string(),
    ];
    relayed_both_ways(&mut ws, &frames).await;
    ws.close(None).await.unwrap();

    // Other providers need the query; unknown endpoints are 404s.
    assert!(connect(&s, "/ws/plivo").await.unwrap_err().contains("400"));
    assert!(connect(&s, "/ws/skype?serviceHost=phone.default")
        .await
        .unwrap_err()
        .contains("404"));

    // A connection that never names its agent is closed after a few seconds.
    let mut ws = connect(&s, "/ws/twilio").await.unwrap();
    ws.send(Message::Text(CONNECTED.into())).await.unwrap();
    let t0 = Instant::now();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.unwrap().code), 1008);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn token_mode_refuses_missing_and_replayed_tokens() {
    let s = Server::start(&[]).await;
    s.deploy("tokphone", &[], json!({})).await;
    // The refusal says how to get past it; an unknown agent gets the very same answer.
    let (status, body) = refused(&s, "/ws/twilio?serviceHost=tokphone.default").await;
    assert_eq!(status, 403);
    assert_eq!(body["code"], "403", "{body}");
    let msg = body["error"].as_str().unwrap();
    for hint in [
        "?token=",
        "_pipecatCloudToken",
        "websocketAuth to none",
        "docs/daily.md",
    ] {
        assert!(msg.contains(hint), "{hint}: {msg}");
    }
    let unknown = refused(&s, "/ws/twilio?serviceHost=nosuchphone.default").await;
    assert_eq!(unknown, (status, body));
    // Twilio naming the agent without a token: the close reason says the same, shortly.
    let mut ws = connect(&s, "/ws/twilio").await.unwrap();
    ws.send(Message::Text(
        twilio_start(Some("tokphone.default"), None).into(),
    ))
    .await
    .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => {
            assert_eq!(u16::from(f.code), 1008);
            assert!(f.reason.contains("_pipecatCloudToken"), "{}", f.reason);
            assert!(f.reason.contains("websocketAuth none"), "{}", f.reason);
        }
        other => panic!("a start without a token must close the socket: {other:?}"),
    }
    let start = |body: serde_json::Value| {
        let s = &s;
        async move {
            let r = s.start_session("tokphone", body).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body["token"].as_str().unwrap().to_string()
        }
    };
    let t = start(json!({"transport": "websocket"})).await;
    let path = format!("/ws/exotel?serviceHost=tokphone.default&token={t}");
    let mut ws = connect(&s, &path).await.unwrap();
    relayed_both_ways(&mut ws, &[r#"{"event":"connected"}"#.to_string()]).await;
    ws.close(None).await.unwrap();
    let e = connect(&s, &path).await.unwrap_err();
    assert!(e.contains("403"), "a replayed token: {e}");

    // Twilio's parameter form carries the token too; without one the socket is closed.
    let t = start(json!({"transport": "websocket"})).await;
    let mut ws = connect(&s, "/ws/twilio").await.unwrap();
    let frames = vec![
        CONNECTED.to_string(),
        twilio_start(Some("tokphone.default"), Some(&t)),
    ];
    relayed_both_ways(&mut ws, &frames).await;
    ws.close(None).await.unwrap();
    let mut ws = connect(&s, "/ws/twilio").await.unwrap();
    ws.send(Message::Text(
        twilio_start(Some("tokphone.default"), Some(&t)).into(),
    ))
    .await
    .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => assert_eq!(u16::from(f.code), 1008),
        other => panic!("a replayed token must close the socket: {other:?}"),
    }
}

/// A real Pipecat bot using pipecat's `parse_telephony_websocket` and `TwilioFrameSerializer`
/// behind `/ws/twilio`: it reads the relayed `connected`/`start` (stream and call ids, custom
/// parameters), and the caller's μ-law audio comes back as Twilio `media` messages.
#[tokio::test(flavor = "multi_thread")]
async fn twilio_media_stream_with_a_real_pipecat_bot() {
    let py = crate::common::py_env_dir().join("main/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup-python.sh",
        py.display()
    );
    let s = Server::start(&["--python", py.to_str().unwrap()]).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/bots/twilio-echo");
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(json!({"serviceName": "pipephone", "websocketAuth": "none",
                        "image": format!("local:{}", dir.display())})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut ws = connect(&s, "/ws/twilio").await.unwrap();
    ws.send(Message::Text(CONNECTED.into())).await.unwrap();
    ws.send(Message::Text(
        twilio_start(Some("pipephone.default"), None).into(),
    ))
    .await
    .unwrap();
    // 20 ms of μ-law (160 bytes) per media message, for a second.
    let payload = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0x55u8; 160]);
    let mut back = 0;
    let t0 = Instant::now();
    let mut sent = 0;
    while back < 5 && t0.elapsed() < Duration::from_secs(90) {
        if sent < 250 {
            let m = json!({"event": "media", "streamSid": "MZ0001",
                           "media": {"track": "inbound", "payload": payload}});
            ws.send(Message::Text(m.to_string().into())).await.unwrap();
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_millis(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["event"] == "media" {
                    assert_eq!(v["streamSid"], "MZ0001", "{v}");
                    assert!(v["media"]["payload"]
                        .as_str()
                        .is_some_and(|p| !p.is_empty()));
                    back += 1;
                }
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        back >= 5,
        "audio came back from the bot: {back} media messages (sent {sent})"
    );
    let sess = s.latest_session("pipephone").await;
    let sid = sess["sessionId"].as_str().unwrap();
    let r = s
        .req(
            "GET",
            &format!("/v1/public/pipephone/sessions/{sid}/call"),
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(r.body["transport_type"], "twilio", "{:?}", r.body);
    assert_eq!(r.body["call_data"]["stream_id"], "MZ0001");
    assert_eq!(r.body["call_data"]["call_id"], "CA0001");
    assert_eq!(
        r.body["call_data"]["body"]["caller"], "+15550001111",
        "{:?}",
        r.body
    );
    assert!(r.body["audio_in"].as_u64().unwrap() > 0);
    ws.close(None).await.unwrap();
    s.wait_ended("pipephone", sid, Duration::from_secs(20))
        .await;
}

/// A telephony bot that raises (here: pipecat's serializer without Twilio credentials) is an
/// agent error, as a `/bot` that raises is: the runner closes the call with 1011, the caller
/// gets that close, and the session ends `error` / `agent_error` saying why, not `completed`.
#[tokio::test(flavor = "multi_thread")]
async fn a_telephony_bot_that_raises_is_an_agent_error() {
    let py = crate::common::py_env_dir().join("main/bin/python");
    assert!(py.exists(), "{} missing", py.display());
    let s = Server::start(&["--python", py.to_str().unwrap()]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bot.py"),
        "from pipecat.runner.utils import parse_telephony_websocket\n\n\
         async def bot(args):\n    \
             await parse_telephony_websocket(args.websocket)\n    \
             raise RuntimeError('no TWILIO_ACCOUNT_SID')\n",
    )
    .unwrap();
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(json!({"serviceName": "raiser", "websocketAuth": "none",
                        "image": format!("local:{}", dir.path().display())})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut ws = connect(&s, "/ws/twilio").await.unwrap();
    ws.send(Message::Text(CONNECTED.into())).await.unwrap();
    ws.send(Message::Text(
        twilio_start(Some("raiser.default"), None).into(),
    ))
    .await
    .unwrap();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected the bot's close, got {other:?}"),
        }
    };
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(1011));
    let sess = s.latest_session("raiser").await;
    let sid = sess["sessionId"].as_str().unwrap();
    let g = s.wait_ended("raiser", sid, Duration::from_secs(20)).await;
    assert_eq!(g["endReason"], "error", "{g}");
    assert_eq!(g["endState"], "agent_error", "{g}");
    assert!(
        g["endMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("1011"),
        "{g}"
    );
}
