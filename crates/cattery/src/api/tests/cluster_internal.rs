//! Internal calls between nodes (`/internal/v1/...`, docs/cluster.md): only with the cluster
//! secret; an org's key, a wrong secret, or a node without a secret get 401.

use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use super::{api_with, Api};

const SECRET: &str = "an-internal-secret-of-at-least-32-chars";

/// An API whose node has the cluster secret [`SECRET`] (read from a file at start) and the
/// node timeout `timeout_s`, if given.
pub(super) async fn api_with_secret(timeout_s: Option<f64>) -> Api {
    let secret_dir = tempfile::tempdir().unwrap();
    let file = secret_dir.path().join("cluster.secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    api_with(|c| {
        c.cluster.cluster_secret_file = Some(file.clone());
        if let Some(t) = timeout_s {
            c.cluster.node_timeout_seconds = t;
        }
    })
    .await
}

async fn internal(
    api: &Api,
    path: &str,
    key: Option<&str>,
    secret: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(Method::POST).uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    if let Some(s) = secret {
        req = req.header("x-cattery-cluster-secret", s);
    }
    let resp = api
        .app
        .clone()
        .oneshot(req.body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_stop_takes_the_cluster_secret_and_nothing_else() {
    let api = api_with_secret(None).await;
    api.deploy("ia", &[], serde_json::json!({})).await;
    let sid = api.start_ok("ia").await;
    let path = format!("/internal/v1/sessions/{sid}/stop");
    for (key, secret) in [
        (Some(api.sk.as_str()), None),
        (Some(api.pk.as_str()), None),
        (None, Some("wrong")),
        (Some(api.sk.as_str()), Some(&SECRET[1..])),
    ] {
        let (st, body) = internal(&api, &path, key, secret).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["code"], "CLUSTER_UNAUTHORIZED", "{body}");
    }
    let s = api.get(&format!("/v1/agents/ia/sessions/{sid}")).await;
    assert!(s.body["endedAt"].is_null(), "{}", s.body);
    let (st, body) = internal(&api, &path, None, Some(SECRET)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "terminated");
    let s = api.get(&format!("/v1/agents/ia/sessions/{sid}")).await;
    assert_eq!(s.body["endReason"], "stopped", "{}", s.body);
    // Again: the same answer.
    let (st, _) = internal(&api, &path, None, Some(SECRET)).await;
    assert_eq!(st, StatusCode::OK);
    let unknown = format!("/internal/v1/sessions/{}/stop", uuid::Uuid::new_v4());
    let (st, _) = internal(&api, &unknown, None, Some(SECRET)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// An internal call that names its node's run (`x-cattery-node: <id> <start ms>`): a run
/// this node's store does not know is 403 `NODE_UNKNOWN` (another database); a header that
/// names no run at all is a 400 saying what it must be, not a claim about databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_call_naming_its_run_badly_is_told_so() {
    let api = api_with_secret(None).await;
    api.deploy("ia", &[], serde_json::json!({})).await;
    let sid = api.start_ok("ia").await;
    let call = |run: &'static str| {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("/internal/v1/sessions/{sid}/stop"))
            .header("x-cattery-cluster-secret", SECRET)
            .header(crate::core::cluster::NODE_HEADER, run)
            .body(axum::body::Body::empty())
            .unwrap();
        let app = api.app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    for run in ["", "n9", "n9 soon", " 12", "n9 12.5"] {
        let (st, body) = call(run).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{run:?}: {body}");
        assert_eq!(body["code"], "GENERIC_BAD_REQUEST", "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("x-cattery-node"),
            "{body}"
        );
    }
    let (st, body) = call("n9 1700000000000").await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "NODE_UNKNOWN", "{body}");
    let s = api.get(&format!("/v1/agents/ia/sessions/{sid}")).await;
    assert!(s.body["endedAt"].is_null(), "{}", s.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_secret_takes_no_internal_call() {
    let api = api_with(|_| {}).await;
    api.deploy("ia", &[], serde_json::json!({})).await;
    let sid = api.start_ok("ia").await;
    let path = format!("/internal/v1/sessions/{sid}/stop");
    for secret in [None, Some(""), Some(SECRET)] {
        let (st, body) = internal(&api, &path, Some(&api.sk), secret).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    }
    let s = api.get(&format!("/v1/agents/ia/sessions/{sid}")).await;
    assert!(s.body["endedAt"].is_null(), "{}", s.body);
}

/// A loopback HTTP server that answers every request with `name`; its URL.
async fn answering(name: &'static str) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

/// A loopback listener that takes connections and never answers (a frozen node); its URL.
async fn frozen() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = l.accept().await {
            held.push(c);
        }
    });
    url
}

/// A delivered session of agent `agent` recorded as node `n2`'s; its id.
pub(super) async fn session_of_n2(api: &Api, agent: &str) -> uuid::Uuid {
    let store = &api.state.store;
    let agent = store
        .get_agent(super::DEFAULT_ORG, agent)
        .await
        .unwrap()
        .unwrap();
    let now = crate::model::now_ms();
    let sid = uuid::Uuid::new_v4();
    store
        .insert_session(&crate::model::SessionRecord {
            id: sid,
            org: super::DEFAULT_ORG.into(),
            agent_id: agent.id,
            deployment_id: agent.desired_deployment_id,
            created_ms: now,
            updated_ms: now,
            bot_start_ms: Some(1),
            cold_start: Some(false),
            transport: None,
            end: None,
            samples: Vec::new(),
            node_id: "n2".into(),
            daily_room: None,
        })
        .await
        .unwrap();
    sid
}

/// Node `n2` at `url`, its heartbeat at `heartbeat_ms`.
pub(super) fn n2(url: &str, heartbeat_ms: i64) -> crate::store::NodeRecord {
    crate::store::NodeRecord {
        id: "n2".into(),
        advertise_url: Some(url.into()),
        version: "test".into(),
        started_ms: heartbeat_ms,
        heartbeat_ms,
        instances: 1,
        busy: 1,
        key_check: None,
        secret_check: None,
    }
}

/// A proxied request for a session of node n2 goes to n2's address from the node list this
/// node read in its last heartbeat period (no store read per request), to the store's when
/// that list has n2 dead, and answers 503 NODE_UNREACHABLE once an owner that took the
/// request and went silent misses the node timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_request_finds_its_owner_in_the_node_list_seen_and_gives_up_on_a_frozen_one() {
    let api = api_with_secret(Some(2.0)).await;
    api.deploy("px", &[], serde_json::json!({})).await;
    let store = api.state.store.clone();
    let now = crate::model::now_ms();
    let sid = session_of_n2(&api, "px").await;
    let (seen, stored) = (answering("seen").await, answering("stored").await);
    store.heartbeat(&n2(&stored, now)).await.unwrap();
    let proxied = || proxied(&api, "px", &sid, "hello");

    api.state.sup.remember_nodes(&[n2(&seen, now)]);
    assert_eq!(proxied().await, (StatusCode::OK, "seen".into()));
    // Seen dead: the store's list (alive, at another address) decides.
    api.state.sup.remember_nodes(&[n2(&seen, 0)]);
    assert_eq!(proxied().await, (StatusCode::OK, "stored".into()));

    // An owner that takes the request and never answers: 503 once its heartbeat is older
    // than the node timeout (2 s), not a request held for as long as the connection lasts.
    let silent = frozen().await;
    let now = crate::model::now_ms();
    store.heartbeat(&n2(&silent, now)).await.unwrap();
    api.state.sup.remember_nodes(&[n2(&silent, now)]);
    let t0 = std::time::Instant::now();
    let (st, body) = tokio::time::timeout(std::time::Duration::from_secs(8), proxied())
        .await
        .expect("the request ends once the owner is dead");
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("NODE_UNREACHABLE"), "{body}");
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
}

/// A node that refuses this node's cluster secret (the nodes' secret files differ): a request
/// proxied to it answers 503 `NODE_UNREACHABLE` saying so (not the owner's 401, which would
/// blame the caller's key), and a stop forwarded to it answers the same at once instead of
/// retrying until the stop's time is up. A bot's own 401 is passed on unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_refusing_this_nodes_cluster_secret_is_named_and_not_retried() {
    owner_refusal_is_named_and_not_retried(
        StatusCode::UNAUTHORIZED,
        "CLUSTER_UNAUTHORIZED",
        "refused this node's cluster secret",
    )
    .await;
}

/// The same for a node that does not find this node's run in its database (403
/// `NODE_UNKNOWN`: the two use different databases); a bot's own 403 is passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_on_another_database_is_named_and_not_retried() {
    owner_refusal_is_named_and_not_retried(
        StatusCode::FORBIDDEN,
        "NODE_UNKNOWN",
        "does not find this node in its database",
    )
    .await;
}

/// The owner of a session answers every internal call with `status` and `code`, and a bot
/// route of its own with `status` and another body: the proxied request and the forwarded
/// stop answer 503 saying `says`, the stop at once; the bot's answer is passed on.
async fn owner_refusal_is_named_and_not_retried(status: StatusCode, code: &str, says: &str) {
    let api = api_with_secret(Some(10.0)).await;
    api.state
        .sup
        .set_peers(std::sync::Arc::new(crate::core::cluster::HttpPeers::new(
            crate::core::cluster::ClusterSecret::new(SECRET).unwrap(),
            None,
        )));
    api.deploy("px", &[], serde_json::json!({})).await;
    let store = api.state.store.clone();
    let now = crate::model::now_ms();
    let sid = session_of_n2(&api, "px").await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let refusal = serde_json::json!({"error": "refused", "code": code});
    let app = axum::Router::new()
        .route(
            "/v1/public/px/sessions/{sid}/mine",
            axum::routing::get(move || async move {
                (
                    status,
                    axum::Json(serde_json::json!({"detail": "the bot's own"})),
                )
            }),
        )
        .fallback(move || async move { (status, axum::Json(refusal)) });
    tokio::spawn(async move { axum::serve(l, app).await });
    store.heartbeat(&n2(&url, now)).await.unwrap();
    let call = |method: &'static str, path: String| {
        let app = api.app.clone();
        let pk = api.pk.clone();
        let sk = api.sk.clone();
        async move {
            let key = if method == "DELETE" { sk } else { pk };
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {key}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let (st, body) = call("GET", format!("/v1/public/px/sessions/{sid}/hello")).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("NODE_UNREACHABLE"), "{body}");
    assert!(body.contains(says), "{body}");
    let (st, body) = call("GET", format!("/v1/public/px/sessions/{sid}/mine")).await;
    assert_eq!(
        (st, body.as_str()),
        (status, r#"{"detail":"the bot's own"}"#)
    );
    let t0 = std::time::Instant::now();
    let (st, body) = call("DELETE", format!("/v1/agents/px/sessions/{sid}")).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains(says), "{body}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
}

/// What a node hears from another node's real API through [`HttpPeers`] (the forwarded stop
/// and the cluster secret check at start read it): a session it owns is stopped, an unknown
/// one is `Unknown` (404), another secret is `Refused` (401), a run its store does not know
/// (a node on another database) is `Stranger` (403) and stops nothing. The secret check at
/// start takes `Unknown` for the nil session as "secret accepted" and a refusal as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answers_the_forwarded_stop_as_the_engine_reads_it() {
    use crate::core::cluster::{check_secret_with_peers, ClusterSecret, HttpPeers, NodeIdentity};
    use crate::core::session::{PeerStop, Peers};
    let api = api_with_secret(None).await;
    api.deploy("hp", &[], serde_json::json!({})).await;
    let sid = api.start_ok("hp").await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let app = api.app.clone();
    tokio::spawn(async move { axum::serve(l, app).await });
    // A node of an earlier version names no run: the secret is enough.
    let same = HttpPeers::new(ClusterSecret::new(SECRET).unwrap(), None);
    let other = HttpPeers::new(ClusterSecret::new(&SECRET.replace('a', "b")).unwrap(), None);
    // A node with the same secret on another database (a restored copy): its run is not in
    // this node's store.
    let stranger = HttpPeers::new(ClusterSecret::new(SECRET).unwrap(), Some("n2 12345".into()));
    let nil = uuid::Uuid::nil();
    assert!(matches!(same.stop(&url, nil).await, Ok(PeerStop::Unknown)));
    assert!(matches!(other.stop(&url, nil).await, Ok(PeerStop::Refused)));
    assert!(matches!(
        stranger.stop(&url, nil).await,
        Ok(PeerStop::Stranger)
    ));
    let sid: uuid::Uuid = sid.parse().unwrap();
    assert!(matches!(other.stop(&url, sid).await, Ok(PeerStop::Refused)));
    assert!(matches!(
        stranger.stop(&url, sid).await,
        Ok(PeerStop::Stranger)
    ));
    let s = api.get(&format!("/v1/agents/hp/sessions/{sid}")).await;
    assert!(
        s.body["endedAt"].is_null(),
        "a stranger stopped it: {}",
        s.body
    );
    // The same run once this node's store has it.
    let mut rec = n2(&url, crate::model::now_ms());
    rec.started_ms = 12345;
    api.state.store.heartbeat(&rec).await.unwrap();
    assert!(matches!(
        stranger.stop(&url, sid).await,
        Ok(PeerStop::Stopped)
    ));
    let s = api.get(&format!("/v1/agents/hp/sessions/{sid}")).await;
    assert_eq!(s.body["endReason"], "stopped", "{}", s.body);

    // The check at start, as a node "n-new" joining with either secret.
    let now = crate::model::now_ms();
    let nodes = [n2(&url, now)];
    let joining = |secret: &str| NodeIdentity {
        id: "n-new".into(),
        advertise_url: None,
        started_ms: now,
        timeout: std::time::Duration::from_secs(10),
        secret: Some(ClusterSecret::new(secret).unwrap()),
        key_check: None,
    };
    // Not in the peer's store yet (its first heartbeat is what makes it known): refused as
    // a node of another database.
    let e = check_secret_with_peers(&joining(SECRET), &nodes, now)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("does not find this node in its database"),
        "{e}"
    );
    let mut first = n2("", now);
    first.id = "n-new".into();
    api.state.store.heartbeat(&first).await.unwrap();
    check_secret_with_peers(&joining(SECRET), &nodes, now)
        .await
        .unwrap();
    let e = check_secret_with_peers(&joining(&SECRET.replace('a', "b")), &nodes, now)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("refused this node's cluster secret"),
        "{e}"
    );
}

/// `DELETE /v1/cluster/nodes/{id}` forgets a node that left, and one that is dead and owns
/// nothing; it keeps a live node (this one too) and a dead node that still owns a session,
/// with a 409 that says which; an unknown id is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_forgets_nodes_that_left_or_died_and_own_nothing() {
    let api = api_with_secret(Some(10.0)).await;
    api.deploy("fg", &[], serde_json::json!({})).await;
    let store = api.state.store.clone();
    let now = crate::model::now_ms();
    let mut left = n2("http://127.0.0.1:9", 0);
    left.id = "left".into();
    let mut fresh = n2("http://127.0.0.1:9", now);
    fresh.id = "fresh".into();
    // n2: dead for a minute, and it owns an open session.
    for n in [&left, &fresh, &n2("http://127.0.0.1:9", now - 60_000)] {
        store.heartbeat(n).await.unwrap();
    }
    let sid = session_of_n2(&api, "fg").await;
    let forget = |id: String| {
        let api = &api;
        async move {
            api.call(
                Method::DELETE,
                &format!("/v1/cluster/nodes/{id}"),
                Some(&api.sk),
                None,
            )
            .await
        }
    };
    let r = forget("nobody".into()).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (404, Some("NODE_NOT_FOUND")),
        "{}",
        r.body
    );
    for id in [api.state.node.id.clone(), "fresh".into()] {
        let r = forget(id).await;
        assert_eq!(
            (r.status.as_u16(), r.body["code"].as_str()),
            (409, Some("NODE_ALIVE")),
            "{}",
            r.body
        );
    }
    let r = forget("n2".into()).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (409, Some("NODE_OWNS_RECORDS")),
        "{}",
        r.body
    );
    assert!(
        r.body["error"].as_str().unwrap().contains("1 open session"),
        "{}",
        r.body
    );
    let r = forget("left".into()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        serde_json::json!({"id": "left", "state": "forgotten"})
    );
    // Once n2's session ended, it goes too.
    store
        .end_session(
            sid,
            &crate::model::SessionEnd {
                ended_ms: now,
                reason: crate::model::EndReason::Stopped,
                completion_status: "HTTP_COMPLETED".into(),
                exit_code: None,
                exit_signal: None,
                message: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(forget("n2".into()).await.status, StatusCode::OK);
    let listed = api.get("/v1/cluster/nodes").await;
    let ids: Vec<&str> = listed.body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&"left") && !ids.contains(&"n2"), "{ids:?}");
    assert!(ids.contains(&"fresh"), "{ids:?}");
}

/// `GET /v1/public/{agent}/sessions/{sid}/{route}` through this node's session proxy, with
/// the public key: its status and body.
async fn proxied(api: &Api, agent: &str, sid: &uuid::Uuid, route: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .uri(format!("/v1/public/{agent}/sessions/{sid}/{route}"))
        .header("authorization", format!("Bearer {}", api.pk))
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = api.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// [`proxied`] `status`, its body read as JSON.
async fn proxied_status(api: &Api, agent: &str, sid: &uuid::Uuid) -> (StatusCode, Value) {
    let (status, body) = proxied(api, agent, sid, "status").await;
    (status, serde_json::from_str(&body).unwrap())
}

/// A proxied request for a session of a node that died a moment ago (still alive in the node
/// list, its port closed) answers 503 NODE_UNREACHABLE, as for a node declared dead: the
/// connection was refused, so nothing reached it. Before, 502 with the code "502".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_request_to_an_owner_that_refuses_the_connection_answers_503() {
    let api = api_with_secret(None).await;
    api.deploy("pr", &[], serde_json::json!({})).await;
    let sid = session_of_n2(&api, "pr").await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let now = crate::model::now_ms();
    api.state.store.heartbeat(&n2(&closed, now)).await.unwrap();
    api.state.sup.remember_nodes(&[n2(&closed, now)]);
    let (status, body) = proxied_status(&api, "pr", &sid).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "NODE_UNREACHABLE", "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("n2") && msg.contains("nothing was sent"),
        "{msg}"
    );
}

/// A proxied request whose owner takes the connection and closes it without an answer (a node
/// killed while the request was on its way, over a pooled connection) answers 502 with a
/// message that names what happened and what comes next. Before, the message ended with
/// hyper's own "client error (SendRequest)", which said neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_request_whose_owner_closes_the_connection_says_what_happened() {
    let api = api_with_secret(None).await;
    api.deploy("pc", &[], serde_json::json!({})).await;
    let sid = session_of_n2(&api, "pc").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            drop(conn);
        }
    });
    let now = crate::model::now_ms();
    api.state.store.heartbeat(&n2(&url, now)).await.unwrap();
    api.state.sup.remember_nodes(&[n2(&url, now)]);
    let (status, body) = proxied_status(&api, "pc", &sid).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("n2"), "{msg}");
    assert!(msg.contains("connection closed"), "{msg}");
    assert!(msg.contains("--node-timeout"), "{msg}");
}
