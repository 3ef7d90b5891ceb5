//! Internal calls between nodes (`/internal/v1/...`, docs/cluster.md): only with the cluster
//! secret; an org's key, a wrong secret, or a node without a secret get 401.

use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use super::{api_with, Api};

const SECRET: &str = "an-internal-secret-of-at-least-32-chars";

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
    let secret_dir = tempfile::tempdir().unwrap();
    let file = secret_dir.path().join("cluster.secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let api = api_with(|c| c.cluster.cluster_secret_file = Some(file.clone())).await;
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
