//! Meta's WhatsApp webhook: the verification handshake (the org's public key as verify
//! token) and call events (a session per call, events forwarded to the instance's
//! `/whatsapp` with `x-daily-session-id`, an ended call's events refused).

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{api, assert_error, Answer};

/// A GET answered as status, content type and raw body.
async fn get_raw(a: &super::Api, uri: &str) -> (StatusCode, String, String) {
    let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, ct, String::from_utf8_lossy(&bytes).into_owned())
}

fn as_answer((status, _, body): (StatusCode, String, String)) -> Answer {
    Answer {
        status,
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
    }
}

fn call_event(event: &str, id: &str) -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "waba-1", "changes": [{
        "field": "calls", "value": {"messaging_product": "whatsapp", "calls": [{
            "id": id, "event": event, "from": "15550001111", "to": "15550002222",
            "timestamp": "1700000000", "direction": "USER_INITIATED",
            "session": {"sdp": "v=0", "sdp_type": "offer"}}]}}]}]})
}

/// A POST with a stand-in for Meta's signature header (the agent has no app secret).
async fn post_event(a: &super::Api, org: &str, agent: &str, body: &Value) -> Answer {
    let raw = serde_json::to_vec(body).unwrap();
    post_signed(a, org, agent, &raw, Some("sha256=abc")).await
}

/// Meta's signature of `body` with app secret `secret`.
fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A POST of `raw` with signature header `sig`.
async fn post_signed(
    a: &super::Api,
    org: &str,
    agent: &str,
    raw: &[u8],
    sig: Option<&str>,
) -> Answer {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("/v1/public/webhooks/{org}/{agent}/whatsapp"))
        .header("content-type", "application/json");
    if let Some(sig) = sig {
        req = req.header("x-hub-signature-256", sig);
    }
    a.send(req.body(Body::from(raw.to_vec())).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_verification_takes_the_orgs_public_key() {
    let a = api().await;
    a.deploy("wa", &[], json!({})).await;
    let url =
        |org: &str, agent: &str, q: &str| format!("/v1/public/webhooks/{org}/{agent}/whatsapp?{q}");
    let ok = format!(
        "hub.mode=subscribe&hub.verify_token={}&hub.challenge=1158201444",
        a.pk
    );
    let (status, ct, body) = get_raw(&a, &url("default", "wa", &ok)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "1158201444"));
    assert!(ct.starts_with("text/plain"), "{ct}");

    // A wrong token, the private key, and an unknown org answer alike: 403.
    let wrong = "hub.mode=subscribe&hub.verify_token=pk_nope&hub.challenge=1";
    let private = format!(
        "hub.mode=subscribe&hub.verify_token={}&hub.challenge=1",
        a.sk
    );
    for uri in [
        url("default", "wa", wrong),
        url("default", "wa", &private),
        url("nope", "wa", &ok),
    ] {
        assert_error(
            &as_answer(get_raw(&a, &uri).await),
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        );
    }
    // The right key for an agent that does not exist.
    assert_error(
        &as_answer(get_raw(&a, &url("default", "nobody", &ok)).await),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    // Missing or wrong parameters.
    let no_challenge = format!("hub.mode=subscribe&hub.verify_token={}", a.pk);
    let bad_mode = format!(
        "hub.mode=unsubscribe&hub.verify_token={}&hub.challenge=1",
        a.pk
    );
    for q in ["", "hub.mode=subscribe", &no_challenge, &bad_mode] {
        assert_error(
            &as_answer(get_raw(&a, &url("default", "wa", q)).await),
            StatusCode::BAD_REQUEST,
            "GENERIC_BAD_REQUEST",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_call_gets_a_session_and_its_events() {
    let a = api().await;
    a.deploy("wa", &[], json!({})).await;

    // Not a WhatsApp payload; unknown org or agent; a payload about no call.
    let r = post_event(&a, "default", "wa", &json!({"object": "page", "entry": []})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let connect = call_event("connect", "wacid.AAA");
    for (org, agent) in [("nope", "wa"), ("default", "nobody")] {
        let r = post_event(&a, org, agent, &connect).await;
        assert_error(&r, StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    let messages = json!({"object": "whatsapp_business_account", "entry": [{"changes": [{
        "field": "messages", "value": {"messages": [{"id": "m1"}]}}]}]});
    let r = post_event(&a, "default", "wa", &messages).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "ignored");
    // A terminate for a call never seen starts nothing.
    let r = post_event(&a, "default", "wa", &call_event("terminate", "wacid.ZZZ")).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(a.fake.starts(), 0);
    assert!(a.fake.whatsapp().is_empty());

    // A new call: one session (a webrtc start), the event forwarded with its session id.
    let r = post_event(&a, "default", "wa", &connect).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "success", "{}", r.body);
    assert_eq!(a.fake.starts(), 1);
    // `/bot` is written before the start answers; the instance records it when it reads it.
    let bot = super::delivered(&a).await;
    assert_eq!(bot.len(), 1);
    assert_eq!(bot[0].headers["x-daily-transport-type"], "webrtc");
    let sid = bot[0].headers["x-daily-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let seen = a.fake.whatsapp();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-daily-session-id"], sid.as_str());
    assert_eq!(seen[0].headers["x-hub-signature-256"], "sha256=abc");
    assert_eq!(
        serde_json::from_str::<Value>(&seen[0].body).unwrap(),
        connect
    );
    let s = a.get(&format!("/v1/agents/wa/sessions/{sid}")).await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.body);
    assert_eq!(s.body["transport"], "webrtc", "{}", s.body);

    // Meta re-sends the connect: no second session. The terminate reaches the same one.
    let r = post_event(&a, "default", "wa", &connect).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let terminate = call_event("terminate", "wacid.AAA");
    let r = post_event(&a, "default", "wa", &terminate).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.starts(), 1);
    let seen = a.fake.whatsapp();
    assert_eq!(seen.len(), 3);
    assert!(seen
        .iter()
        .all(|d| d.headers["x-daily-session-id"] == sid.as_str()));

    // Once the session has ended, the call maps to nothing live.
    assert_eq!(a.stop("wa", &sid).await.status, StatusCode::OK);
    let r = post_event(&a, "default", "wa", &terminate).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NOT_FOUND");
    let r = post_event(&a, "default", "wa", &connect).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(a.fake.starts(), 1);
    assert_eq!(a.fake.whatsapp().len(), 3);

    // Another call is another session.
    let r = post_event(&a, "default", "wa", &call_event("connect", "wacid.BBB")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.starts(), 2);
    let last = a.fake.whatsapp().pop().unwrap();
    assert_ne!(last.headers["x-daily-session-id"], sid.as_str());
}

/// An agent whose secret set holds `WHATSAPP_APP_SECRET` takes only events Meta signed with
/// it: anything else starts nothing and reaches no instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_events_are_checked_against_the_agents_app_secret() {
    let a = api().await;
    let secrets = json!({"secrets": [
        {"secretKey": "WHATSAPP_APP_SECRET", "secretValue": "meta-app-secret"},
        {"secretKey": "WHATSAPP_TOKEN", "secretValue": "t"}]});
    let r = a
        .call(
            Method::PUT,
            "/v1/secrets/wa-secrets",
            Some(&a.sk),
            Some(secrets),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    a.deploy("wa", &[], json!({"secretSet": "wa-secrets"}))
        .await;
    let raw = serde_json::to_vec(&call_event("connect", "wacid.S")).unwrap();
    let unknown = post_signed(&a, "default", "nobody", &raw, None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "NOT_FOUND");
    let wrong = sign("another-secret", &raw);
    for sig in [None, Some("sha256=abc"), Some(wrong.as_str())] {
        let r = post_signed(&a, "default", "wa", &raw, sig).await;
        assert_eq!(
            (r.status, &r.body),
            (unknown.status, &unknown.body),
            "{sig:?}"
        );
    }
    assert_eq!(a.fake.starts(), 0);
    assert!(a.fake.whatsapp().is_empty());

    let good = sign("meta-app-secret", &raw);
    let r = post_signed(&a, "default", "wa", &raw, Some(&good)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.starts(), 1);
    let seen = a.fake.whatsapp();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-hub-signature-256"], good.as_str());
    assert_eq!(seen[0].body.as_bytes(), raw.as_slice());
}

/// Meta re-sending a connect while the first one's session is still starting: one session,
/// every copy forwarded to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connects_of_a_call_start_one_session() {
    let a = api().await;
    a.deploy("wa", &["start-ms=300"], json!({"maxAgents": 10}))
        .await;
    let connect = call_event("connect", "wacid.RACE");
    let answers =
        futures_util::future::join_all((0..4).map(|_| post_event(&a, "default", "wa", &connect)))
            .await;
    for r in &answers {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    assert_eq!(a.fake.starts(), 1, "{:?}", a.fake.events());
    assert_eq!(super::delivered(&a).await.len(), 1);
    let seen = a.fake.whatsapp();
    assert_eq!(seen.len(), 4);
    let sid = &seen[0].headers["x-daily-session-id"];
    assert!(seen.iter().all(|d| d.headers["x-daily-session-id"] == sid));
}

/// Two copies of one `connect` at two nodes at once: both find no session and start the same
/// one. Node n2's record lands between this node's look and its start (played by a hook and
/// a stand-in for n2): this node's start finds the id taken, undoes itself (no instance, no
/// capacity slot) and passes the event to n2, whose answer is Meta's. It answered 409
/// CONFLICT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_another_node_started_meanwhile_goes_to_its_session() {
    connect_raced_by_another_node("wacid.TWIN", false).await;
}

/// The same race when the other node's start also holds the agent's one capacity slot
/// (`maxAgents: 1`): this node's start fails at capacity, not on the session's id, and the
/// event still goes to the other node's session. It answered 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_another_node_started_meanwhile_goes_to_it_at_capacity() {
    connect_raced_by_another_node("wacid.FULL", true).await;
}

/// A `connect` of call `call` that finds no session, and, just before its start, another
/// node (n2) records the call's session (and takes the agent's one slot when `slot`).
async fn connect_raced_by_another_node(call: &str, slot: bool) {
    use std::sync::{Arc, Mutex};
    let a = super::cluster_internal::api_with_secret(None).await;
    a.deploy("wa", &[], json!({"autoScaling": {"maxAgents": 1}}))
        .await;
    // Node n2: records what reaches it, answers as the instance would.
    let heard: Arc<Mutex<Vec<(String, axum::http::HeaderMap, String)>>> = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let log = heard.clone();
    let n2 = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let body = String::from_utf8_lossy(&body).into_owned();
            log.lock()
                .unwrap()
                .push((parts.uri.to_string(), parts.headers, body));
            axum::Json(json!({"status": "success", "from": "n2"}))
        }
    });
    tokio::spawn(async move { axum::serve(l, n2).await });
    let now = crate::model::now_ms();
    let store = a.state.store.clone();
    store
        .heartbeat(&super::cluster_internal::n2(&url, now))
        .await
        .unwrap();
    a.state
        .sup
        .remember_nodes(&[super::cluster_internal::n2(&url, now)]);

    let agent = store.get_agent("default", "wa").await.unwrap().unwrap();
    let sid = crate::core::whatsapp::session_of_call("default", "wa", call);
    let rec = crate::model::SessionRecord {
        id: sid,
        org: "default".into(),
        agent_id: agent.id,
        deployment_id: agent.desired_deployment_id,
        created_ms: now,
        updated_ms: now,
        bot_start_ms: None,
        cold_start: Some(true),
        transport: Some("webrtc".into()),
        end: None,
        samples: Vec::new(),
        node_id: "n2".into(),
        daily_room: None,
    };
    let n2_store = store.clone();
    let n2_instance = uuid::Uuid::new_v4();
    let agent_id = agent.id;
    crate::core::whatsapp::test_hooks::before_start(
        sid,
        Box::pin(async move {
            if slot {
                assert!(n2_store
                    .reserve_slot(agent_id, 1, n2_instance, "n2")
                    .await
                    .unwrap());
            }
            n2_store.insert_session(&rec).await.unwrap();
        }),
    );
    let connect = call_event("connect", call);
    let r = post_event(&a, "default", "wa", &connect).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"status": "success", "from": "n2"}));
    let heard = heard.lock().unwrap().clone();
    assert_eq!(heard.len(), 1);
    let (path, headers, body) = &heard[0];
    assert_eq!(path, "/v1/public/webhooks/default/wa/whatsapp");
    assert_eq!(headers["x-hub-signature-256"], "sha256=abc");
    assert!(headers.contains_key("x-cattery-cluster-secret"));
    assert_eq!(serde_json::from_str::<Value>(body).unwrap(), connect);

    // Nothing of this node's start is left: no instance, no session here, no slot held (the
    // agent's one slot starts another call).
    assert_eq!(a.fake.starts(), 0, "{:?}", a.fake.events());
    assert!(!a.state.sup.serves(sid));
    let s = store.get_session(sid).await.unwrap().unwrap();
    assert_eq!((s.node_id.as_str(), s.end.is_none()), ("n2", true));
    if slot {
        // Only n2's slot is held; once it is free, this node starts the next call.
        assert_eq!(store.slots_held(agent.id).await.unwrap(), 1);
        store.release_slot(n2_instance).await.unwrap();
    }
    assert_eq!(store.slots_held(agent.id).await.unwrap(), 0);
    let r = post_event(&a, "default", "wa", &call_event("connect", "wacid.NEXT")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.starts(), 1);
}

/// A redeploy with a new `WHATSAPP_APP_SECRET` while a call is live: the call's events are
/// still checked against the secret of the deployment its session runs (signed with the old
/// one: forwarded; with the new one: refused), a new call's against the new deployment's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_calls_events_are_checked_against_its_own_deployments_app_secret() {
    let a = api().await;
    let put_secret = |value: &'static str| {
        let body = json!({"secrets": [
            {"secretKey": "WHATSAPP_APP_SECRET", "secretValue": value}]});
        a.call(
            Method::PUT,
            "/v1/secrets/wa-secrets",
            Some(&a.sk),
            Some(body),
        )
    };
    let r = put_secret("old-secret").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    a.deploy("wa", &[], json!({"secretSet": "wa-secrets"}))
        .await;
    let raw = serde_json::to_vec(&call_event("connect", "wacid.LIVE")).unwrap();
    let r = post_signed(&a, "default", "wa", &raw, Some(&sign("old-secret", &raw))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.starts(), 1);

    let store = a.state.store.clone();
    let before = store.get_agent("default", "wa").await.unwrap().unwrap();
    let r = put_secret("new-secret").await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = a
        .call(
            Method::POST,
            "/v1/agents/wa",
            Some(&a.sk),
            Some(json!({"secretSet": "wa-secrets", "command": ["fake", "start-ms=1"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let after = store.get_agent("default", "wa").await.unwrap().unwrap();
    assert_ne!(before.desired_deployment_id, after.desired_deployment_id);

    // The live call's next event: its deployment's (old) secret.
    let ringing = serde_json::to_vec(&call_event("ringing", "wacid.LIVE")).unwrap();
    let r = post_signed(
        &a,
        "default",
        "wa",
        &ringing,
        Some(&sign("new-secret", &ringing)),
    )
    .await;
    assert_error(&r, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(a.fake.whatsapp().len(), 1);
    let r = post_signed(
        &a,
        "default",
        "wa",
        &ringing,
        Some(&sign("old-secret", &ringing)),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.whatsapp().len(), 2);

    // A new call: the new deployment's secret.
    let raw = serde_json::to_vec(&call_event("connect", "wacid.NEW")).unwrap();
    let r = post_signed(&a, "default", "wa", &raw, Some(&sign("old-secret", &raw))).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(a.fake.starts(), 1);
    let r = post_signed(&a, "default", "wa", &raw, Some(&sign("new-secret", &raw))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.starts(), 2);
    assert_eq!(a.fake.whatsapp().len(), 3);
}
