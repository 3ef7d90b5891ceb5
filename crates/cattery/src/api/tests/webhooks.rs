//! Outbound webhooks through the API, in process: endpoints (create, list, get, secret,
//! delete, bad input), deployment and session events delivered to a receiver on loopback,
//! signed in the Standard Webhooks format, and the delivery log; Daily dial-in.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::post;
use axum::Router;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::{api_with, assert_error};

/// A webhook receiver on loopback: every request's headers and body.
#[derive(Clone, Default)]
pub(super) struct Receiver {
    pub got: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    pub url: String,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let r = Receiver::default();
        let got = r.got.clone();
        let app = Router::new().route(
            "/hook",
            post(move |h: HeaderMap, body: String| {
                let got = got.clone();
                async move {
                    got.lock().push((h, body));
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hook?token=tok-in-url-4242",
            l.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Receiver { url, ..r }
    }

    /// The bodies received so far, parsed.
    pub fn events(&self) -> Vec<Value> {
        self.got
            .lock()
            .iter()
            .map(|(_, b)| serde_json::from_str(b).unwrap())
            .collect()
    }

    /// Waits (bounded) until `f` holds for the events received.
    pub async fn wait(&self, what: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..300 {
            let ev = self.events();
            if f(&ev) {
                return ev;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: got {:?}", self.events());
    }

    /// Every request verifies with `secret`.
    pub fn verify_all(&self, secret: &str) {
        let wh = standardwebhooks::Webhook::new(secret).unwrap();
        for (h, b) in self.got.lock().iter() {
            wh.verify(b.as_bytes(), h)
                .unwrap_or_else(|e| panic!("{e}: {h:?} {b}"));
            assert!(h["webhook-id"].to_str().unwrap().starts_with("msg_"));
            assert_eq!(h["content-type"], "application/json");
        }
    }
}

fn of_type<'a>(ev: &'a [Value], t: &str) -> Vec<&'a Value> {
    ev.iter().filter(|e| e["event_type"] == t).collect()
}

/// Bad endpoints are 400s that never quote the URL; endpoints need a private key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_endpoints_refuse_bad_input() {
    let rx = Receiver::start().await;
    let a = api_with(|_| {}).await;
    let hooks = |body: Value| a.call(Method::POST, "/v1/webhooks", Some(&a.sk), Some(body));
    for (bad, why) in [
        (json!({"url": "ftp://x/"}), "url:"),
        (json!({"url": "not a url"}), "url:"),
        (json!({"url": rx.url, "events": []}), "events:"),
        (
            json!({"url": rx.url, "events": ["build.succeeded"]}),
            "unknown event type",
        ),
        (json!({"url": rx.url, "secret": "nope"}), "secret:"),
    ] {
        let r = hooks(bad.clone()).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
        let msg = r.body["error"].as_str().unwrap();
        assert!(msg.contains(why), "{bad}: {msg}");
        assert!(!msg.contains("tok-in-url"), "the URL is not quoted: {msg}");
    }
    let r = a
        .call(
            Method::POST,
            "/v1/webhooks",
            None,
            Some(json!({"url": rx.url})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&a.pk),
            Some(json!({"url": rx.url})),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "a public key manages no webhooks"
    );
}

/// An endpoint's life: created with its secret, listed, its events (deployments ready and
/// failed, a session started then ended) delivered signed, the log, deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_endpoints_events_signatures_and_log() {
    let rx = Receiver::start().await;
    let a = api_with(|_| {}).await;
    let r = a
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&a.sk),
            Some(json!({"url": rx.url, "description": "ops"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let secret = r.body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(r.body["events"].as_array().unwrap().len(), 4);
    let list = a.get("/v1/webhooks").await;
    assert_eq!(list.body["webhooks"][0]["id"], id.as_str(), "{}", list.body);
    assert!(list.body["webhooks"][0].get("secret").is_none());
    let got = a.get(&format!("/v1/webhooks/{id}/secret")).await;
    assert_eq!(got.body["secret"], secret.as_str());
    assert_eq!(
        a.get("/v1/webhooks/00000000-0000-0000-0000-000000000000")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.get("/v1/webhooks/zzz").await.status,
        StatusCode::BAD_REQUEST
    );

    a.deploy("hooked", &[], json!({})).await;
    a.deploy(
        "broken",
        &["fail-start"],
        json!({"autoScaling": {"minAgents": 1}}),
    )
    .await;
    let sid = a.start_ok("hooked").await;
    assert_eq!(a.stop("hooked", &sid).await.status, StatusCode::OK);
    let ev = rx
        .wait("deployment and session events", |ev| {
            of_type(ev, "session.ended").len() == 1 && of_type(ev, "deployment.failed").len() == 1
        })
        .await;
    rx.verify_all(&secret);
    let ready = of_type(&ev, "deployment.ready");
    assert_eq!(ready.len(), 1, "{ev:?}");
    assert_eq!(ready[0]["data"]["service_name"], "hooked");
    assert_eq!(ready[0]["org"], "default");
    let failed = of_type(&ev, "deployment.failed");
    assert_eq!(failed[0]["data"]["service_name"], "broken");
    assert!(failed[0]["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("failed starts"));
    let sessions: Vec<&Value> = ev
        .iter()
        .filter(|e| e["data"]["session_id"] == sid.as_str())
        .collect();
    assert_eq!(sessions.len(), 2, "{ev:?}");
    assert_eq!(sessions[0]["event_type"], "session.started");
    assert_eq!(sessions[0]["data"]["service"], "hooked");
    // Pipecat Cloud's fields: the region, and `transport` only when the start named one.
    assert_eq!(sessions[0]["data"]["region"], "local", "{}", sessions[0]);
    assert!(
        sessions[0]["data"].get("transport").is_none(),
        "{}",
        sessions[0]
    );
    assert_eq!(sessions[1]["event_type"], "session.ended");
    assert_eq!(sessions[1]["data"]["end_state"], "terminated");
    assert_eq!(sessions[1]["data"]["end_reason"], "stopped");
    assert!(sessions[1]["created_at"].as_str().unwrap().ends_with('Z'));

    // The log: every event delivered once, newest first.
    let log = a.get(&format!("/v1/webhooks/{id}/deliveries")).await;
    let ds = log.body["deliveries"].as_array().unwrap();
    assert_eq!(ds.len(), ev.len(), "{}", log.body);
    assert!(ds
        .iter()
        .all(|d| d["state"] == "delivered" && d["lastStatus"] == 204));
    let ended: Vec<&Value> = ds
        .iter()
        .filter(|d| d["eventType"] == "session.ended")
        .collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0]["payload"], *sessions[1]);
    assert!(ended[0]["webhookId"].as_str().unwrap().starts_with("msg_"));

    started_names_its_transport(&a, &rx).await;

    // Deleted: nothing more arrives.
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/webhooks/{id}"),
            Some(&a.sk),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let n = rx.events().len();
    let sid = a.start_ok("hooked").await;
    a.stop("hooked", &sid).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.events().len(), n);
    assert_eq!(
        a.get(&format!("/v1/webhooks/{id}/deliveries")).await.status,
        StatusCode::NOT_FOUND
    );
}

/// A start that names its transport: its `session.started` says which.
async fn started_names_its_transport(a: &super::Api, rx: &Receiver) {
    let r = a
        .call(
            Method::POST,
            "/v1/public/hooked/start",
            Some(&a.pk),
            Some(json!({"transport": "daily", "createDailyRoom": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let daily_sid = r.body["sessionId"].as_str().unwrap().to_string();
    let ev = rx
        .wait("session.started of the daily start", |ev| {
            of_type(ev, "session.started")
                .iter()
                .any(|e| e["data"]["session_id"] == daily_sid.as_str())
        })
        .await;
    let started = of_type(&ev, "session.started");
    let daily = started
        .iter()
        .find(|e| e["data"]["session_id"] == daily_sid.as_str())
        .unwrap();
    assert_eq!(daily["data"]["transport"], "daily", "{daily}");
    a.stop("hooked", &daily_sid).await;
    rx.wait("session.ended of the daily start", |ev| {
        of_type(ev, "session.ended")
            .iter()
            .any(|e| e["data"]["session_id"] == daily_sid.as_str())
    })
    .await;
}

/// A websocket session that never gets its client still reports its end: stopped before the
/// client connected, and never connected before its token expired, each a `session.ended`
/// (no `session.started`: no bot ran), as every other recorded end does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_without_a_client_report_their_end() {
    let rx = Receiver::start().await;
    let a = api_with(|c| c.websocket.token_ttl_seconds = 1.0).await;
    let r = a
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&a.sk),
            Some(json!({"url": rx.url, "events": ["session.started", "session.ended"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_string();
    a.deploy("wshook", &[], json!({})).await;
    let ws_start = || async {
        let r = a
            .call(
                Method::POST,
                "/v1/public/wshook/start",
                Some(&a.pk),
                Some(json!({"transport": "websocket"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["sessionId"].as_str().unwrap().to_string()
    };
    let stopped = ws_start().await;
    assert_eq!(a.stop("wshook", &stopped).await.status, StatusCode::OK);
    let expired = ws_start().await;
    let ev = rx
        .wait("both ends", |ev| of_type(ev, "session.ended").len() == 2)
        .await;
    rx.verify_all(&secret);
    let end_of = |sid: &str| {
        of_type(&ev, "session.ended")
            .into_iter()
            .find(|e| e["data"]["session_id"] == sid)
            .cloned()
            .unwrap_or_else(|| panic!("no session.ended of {sid}: {ev:?}"))
    };
    let s = end_of(&stopped);
    assert_eq!(s["data"]["end_reason"], "stopped_during_start", "{s}");
    assert_eq!(s["data"]["end_state"], "ended_before_agent_start", "{s}");
    assert_eq!(s["data"]["service_name"], "wshook", "{s}");
    assert!(s["data"]["service_id"].is_string(), "{s}");
    assert!(s["data"]["deployment_id"].is_null(), "{s}");
    let e = end_of(&expired);
    assert_eq!(e["data"]["end_reason"], "client_never_connected", "{e}");
    assert!(of_type(&ev, "session.started").is_empty(), "{ev:?}");
}
