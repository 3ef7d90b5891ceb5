//! Outbound webhooks against the real server: a receiver on loopback verifies every
//! Standard Webhooks signature; each session's events arrive in order; a receiver that is
//! down for 10 s gets every event afterwards; events queued when the server is SIGKILLed are
//! delivered after its restart. The endpoint URL's credential never reaches the log.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::common::{free_port, wait_for, Server};

/// A receiver on a fixed loopback port that can be taken down and brought back.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    stop: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Receiver {
    fn new() -> Receiver {
        Receiver {
            port: free_port(),
            got: Arc::default(),
            stop: None,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook?token=url-secret-7788", self.port)
    }

    async fn up(&mut self) {
        let got = self.got.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |h: HeaderMap, body: String| {
                let got = got.clone();
                async move {
                    got.lock().push((h, body));
                    StatusCode::OK
                }
            }),
        );
        let l = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        self.stop = Some((tx, task));
    }

    async fn down(&mut self) {
        if let Some((tx, task)) = self.stop.take() {
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    fn events(&self) -> Vec<Value> {
        self.got
            .lock()
            .iter()
            .map(|(_, b)| serde_json::from_str(b).unwrap())
            .collect()
    }

    fn verify_all(&self, secret: &str) {
        let wh = standardwebhooks::Webhook::new(secret).unwrap();
        for (h, b) in self.got.lock().iter() {
            wh.verify(b.as_bytes(), h)
                .unwrap_or_else(|e| panic!("signature: {e}: {h:?}"));
        }
    }

    /// Waits until every session in `sids` has its `session.started` and `session.ended`.
    async fn wait_sessions(&self, sids: &[String], timeout: Duration) -> Vec<Value> {
        wait_for(timeout, "every session's events", || {
            let ev = self.events();
            let done = sids.iter().all(|s| {
                ev.iter()
                    .filter(|e| e["data"]["session_id"] == s.as_str())
                    .count()
                    >= 2
            });
            async move { done.then_some(ev) }
        })
        .await
    }
}

/// Each session's events: exactly one `session.started`, then one `session.ended`.
fn assert_in_order(ev: &[Value], sids: &[String]) {
    for s in sids {
        let mine: Vec<&str> = ev
            .iter()
            .filter(|e| e["data"]["session_id"] == s.as_str())
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(mine, ["session.started", "session.ended"], "session {s}");
    }
}

async fn create_endpoint(s: &Server, url: &str) -> (String, String) {
    let r = s
        .req(
            "POST",
            "/v1/webhooks",
            Some(&s.sk),
            Some(json!({"url": url})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["secret"].as_str().unwrap().to_string(),
    )
}

async fn start_stop(s: &Server, agent: &str) -> String {
    let sid = s.start_ok(agent).await;
    assert_eq!(s.stop(agent, &sid).await.status, 200);
    sid
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_are_signed_ordered_and_survive_a_receiver_outage() {
    let mut rx = Receiver::new();
    rx.up().await;
    let s = Server::start(&[]).await;
    let (id, secret) = create_endpoint(&s, &rx.url()).await;
    s.deploy("hooked", &[], json!({})).await;
    let mut sids = Vec::new();
    for _ in 0..3 {
        sids.push(start_stop(&s, "hooked").await);
    }
    let ev = rx.wait_sessions(&sids, Duration::from_secs(30)).await;
    assert_in_order(&ev, &sids);
    let ended = ev
        .iter()
        .find(|e| e["event_type"] == "session.ended")
        .unwrap();
    assert_eq!(ended["data"]["end_state"], "terminated", "{ended}");
    assert_eq!(ended["data"]["end_reason"], "stopped");
    assert!(
        ev.iter().any(|e| e["event_type"] == "deployment.ready"),
        "{ev:?}"
    );

    // Down for 10 s: the events of two sessions wait, then all arrive, in order.
    rx.down().await;
    let mut later = Vec::new();
    for _ in 0..2 {
        later.push(start_stop(&s, "hooked").await);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = s
        .req(
            "GET",
            &format!("/v1/webhooks/{id}/deliveries"),
            Some(&s.sk),
            None,
        )
        .await;
    let pending: Vec<&Value> = log.body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "pending")
        .collect();
    assert_eq!(pending.len(), 4, "{}", log.body);
    assert!(
        pending
            .iter()
            .any(|d| d["attempts"].as_i64().unwrap() >= 2 && d["lastError"].as_str().is_some()),
        "retried while down: {}",
        log.body
    );
    rx.up().await;
    let ev = rx.wait_sessions(&later, Duration::from_secs(40)).await;
    sids.extend(later);
    assert_in_order(&ev, &sids);
    rx.verify_all(&secret);
    let log = s
        .req(
            "GET",
            &format!("/v1/webhooks/{id}/deliveries"),
            Some(&s.sk),
            None,
        )
        .await;
    assert!(
        log.body["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "delivered"),
        "{}",
        log.body
    );
    assert!(
        !s.log().contains("url-secret-7788"),
        "the endpoint URL's credential is never logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_events_queued_at_a_sigkill_are_delivered_after_the_restart() {
    let mut rx = Receiver::new();
    let mut s = Server::start(&[]).await;
    let (id, secret) = create_endpoint(&s, &rx.url()).await;
    s.deploy("hooked", &[], json!({})).await;
    let sids = vec![
        start_stop(&s, "hooked").await,
        start_stop(&s, "hooked").await,
    ];
    // Queued (and tried: the receiver is down) before the kill.
    wait_for(Duration::from_secs(20), "queued deliveries tried", || {
        let s = &s;
        let id = id.clone();
        async move {
            let log = s
                .req(
                    "GET",
                    &format!("/v1/webhooks/{id}/deliveries"),
                    Some(&s.sk),
                    None,
                )
                .await;
            let ds = log.body["deliveries"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            (ds.len() == 5 && ds.iter().any(|d| d["attempts"].as_i64() >= Some(1))).then_some(())
        }
    })
    .await;
    s.kill9();
    rx.up().await;
    s.spawn().await;
    let ev = rx.wait_sessions(&sids, Duration::from_secs(30)).await;
    assert_in_order(&ev, &sids);
    assert_eq!(
        ev.iter()
            .filter(|e| e["event_type"] == "deployment.ready")
            .count(),
        1,
        "{ev:?}"
    );
    rx.verify_all(&secret);
}
