//! Websocket sessions are recorded at `/start` (issue 17): listed as waiting for their client,
//! stoppable with the seed's `DELETE` (200 body), ended `client_never_connected` when the token
//! expires. (A client connecting takes the record over: `tests/e2e/transport.rs`.)

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use super::{api_with, Api};

async fn ws_start(a: &Api, agent: &str) -> String {
    let r = a
        .call(
            Method::POST,
            &format!("/v1/public/{agent}/start"),
            Some(&a.pk),
            Some(json!({"transport": "websocket"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body["token"].is_string(), "{}", r.body);
    r.body["sessionId"].as_str().unwrap().to_string()
}

/// The session `id` of `agent` as listed (first page, newest first).
async fn listed(a: &Api, agent: &str, id: &str, query: &str) -> Option<Value> {
    let r = a.get(&format!("/v1/agents/{agent}/sessions?{query}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sessionId"] == id)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_session_waits_is_stopped_and_expires() {
    let a = api_with(|c| c.websocket.token_ttl_seconds = 1.0).await;
    a.deploy("wsw", &[], json!({})).await;

    // Recorded at /start: found, listed as active and waiting, no instance started.
    let id = ws_start(&a, "wsw").await;
    let g = a.get(&format!("/v1/agents/wsw/sessions/{id}")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    assert_eq!(g.body["status"], "active");
    assert_eq!(g.body["endState"], "active");
    assert_eq!(g.body["waitingForClient"], true);
    assert_eq!(g.body["transport"], "websocket");
    assert!(g.body["coldStart"].is_null() && g.body["botStartSeconds"].is_null());
    let l = listed(&a, "wsw", &id, "status=active")
        .await
        .expect("listed");
    assert_eq!(l["waitingForClient"], true);
    assert_eq!(a.fake.starts(), 0, "no bot starts before its client");

    // Stopped before its client came: the seed's 200, ended before the agent started.
    let r = a.stop("wsw", &id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"status": "terminated", "session_id": id}));
    let g = a.get(&format!("/v1/agents/wsw/sessions/{id}")).await;
    assert_eq!(g.body["status"], "ended", "{}", g.body);
    assert_eq!(g.body["endReason"], "stopped_during_start");
    assert_eq!(g.body["endState"], "ended_before_agent_start");
    assert_eq!(g.body["waitingForClient"], false);
    // A second stop answers the same and changes nothing.
    let r = a.stop("wsw", &id).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, json!({"status": "terminated", "session_id": id}));
    let again = a.get(&format!("/v1/agents/wsw/sessions/{id}")).await;
    assert_eq!(again.body["endedAt"], g.body["endedAt"]);
    // Its token is gone: the expiry does not touch it.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let g = a.get(&format!("/v1/agents/wsw/sessions/{id}")).await;
    assert_eq!(g.body["endReason"], "stopped_during_start");

    // Never connected: ended client_never_connected once the token expires.
    let id = ws_start(&a, "wsw").await;
    let mut ended = Value::Null;
    for _ in 0..100 {
        let g = a.get(&format!("/v1/agents/wsw/sessions/{id}")).await;
        if g.body["status"] == "ended" {
            ended = g.body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ended["endReason"], "client_never_connected", "{ended}");
    assert_eq!(ended["endState"], "ended_before_agent_start");
    assert_eq!(ended["completionStatus"], "HTTP_ERROR");
    assert!(
        ended["endMessage"]
            .as_str()
            .unwrap()
            .contains("no websocket client connected"),
        "{ended}"
    );
    assert!(listed(&a, "wsw", &id, "endReason=client_never_connected")
        .await
        .is_some());
    assert!(listed(&a, "wsw", &id, "endState=ended_before_agent_start")
        .await
        .is_some());
    assert!(listed(&a, "wsw", &id, "status=active").await.is_none());
    let r = a.stop("wsw", &id).await;
    assert_eq!(r.status, StatusCode::OK);
    let g = a.get(&format!("/v1/agents/wsw/sessions/{id}")).await;
    assert_eq!(g.body["endReason"], "client_never_connected");
    assert_eq!(a.fake.starts(), 0);

    // Another org's key, or another agent's path, finds no such session to stop.
    a.deploy("wsx", &[], json!({})).await;
    let id = ws_start(&a, "wsw").await;
    let r = a.stop("wsx", &id).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let g = a.get(&format!("/v1/agents/wsw/sessions/{id}")).await;
    assert_eq!(g.body["waitingForClient"], true, "{}", g.body);
}

/// A server that restarts while a websocket session waits for its client (its token lived in
/// the old server's memory) ends that session `client_never_connected` when it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_websocket_session_ends_when_the_server_restarts() {
    use std::sync::Arc;

    use crate::config::Config;
    use crate::runtime::fake::FakeRuntime;
    use crate::serve::{app_state, open_store};

    let a = api_with(|_| {}).await;
    a.deploy("wsr", &[], json!({})).await;
    let id = ws_start(&a, "wsr").await;

    // The next server over the same data dir.
    let dir = a._dir.path();
    let mut config = Config::default();
    config.server.data_dir = dir.to_path_buf();
    let store = open_store(&config.store, dir).await.unwrap();
    let (logs, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let next = app_state(&config, dir, store, Arc::new(FakeRuntime::new()), logs).unwrap();
    next.sup.recover().await.unwrap();

    let g = a.get(&format!("/v1/agents/wsr/sessions/{id}")).await;
    assert_eq!(g.body["endReason"], "client_never_connected", "{}", g.body);
    assert_eq!(g.body["endState"], "ended_before_agent_start");
    assert!(g.body["endMessage"]
        .as_str()
        .unwrap()
        .contains("restarted before the websocket client connected"));
}
