//! Per-org limits (`core::limits`, `[limits]`): past a limit a create answers 403
//! `ORG_LIMIT_REACHED` naming the limit and its value; removing one makes room again; another
//! org is unaffected.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use super::daily::org_private_key;
use super::{api_on, api_with, assert_error, Answer, Api};

/// Asserts the refusal of one more, naming `setting = limit`.
fn assert_limit(r: &Answer, setting: &str, limit: u32) {
    assert_error(r, StatusCode::FORBIDDEN, "ORG_LIMIT_REACHED");
    let msg = r.body["error"].as_str().unwrap();
    assert!(msg.contains(&format!("{setting} = {limit}")), "{msg}");
}

fn accepted(r: &Answer) {
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
}

async fn create_agent(a: &Api, key: &str, name: &str) -> Answer {
    let body = json!({"serviceName": name, "command": ["fake"]});
    a.call(Method::POST, "/v1/agents", Some(key), Some(body))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_per_org_is_enforced_per_org_and_deleting_makes_room() {
    let a = api_with(|c| c.limits.agents_per_org = 2).await;
    for n in ["a1", "a2"] {
        let r = create_agent(&a, &a.sk, n).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    assert_limit(&create_agent(&a, &a.sk, "a3").await, "agents_per_org", 2);
    // Nothing was made.
    assert_eq!(a.get("/v1/agents/a3").await.status, StatusCode::NOT_FOUND);
    // Another org has its own count.
    let other = org_private_key(&a, "other").await;
    for n in ["b1", "b2"] {
        let r = create_agent(&a, &other, n).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let r = a
        .call(Method::DELETE, "/v1/agents/a1", Some(&a.sk), None)
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = create_agent(&a, &a.sk, "a3").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_limit(&create_agent(&a, &a.sk, "a4").await, "agents_per_org", 2);
    // The CLI's form is limited the same way.
    let r = a
        .call(
            Method::POST,
            "/v1/organizations/default/services",
            Some(&a.sk),
            Some(json!({"serviceName": "a5", "command": ["fake"]})),
        )
        .await;
    assert_limit(&r, "agents_per_org", 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_per_org_counts_keys_not_revoked() {
    // The test server's org holds two keys already (`sk`, `pk`).
    let a = api_with(|c| c.limits.api_keys_per_org = 3).await;
    let create = |key: String| {
        let a = &a;
        async move {
            a.call(
                Method::POST,
                "/v1/organizations/default/apiKeys",
                Some(&key),
                Some(json!({"name": "ci", "type": "private"})),
            )
            .await
        }
    };
    let r = create(a.sk.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_limit(&create(a.sk.clone()).await, "api_keys_per_org", 3);
    let other = org_private_key(&a, "other").await;
    let r = a
        .call(
            Method::POST,
            "/v1/organizations/other/apiKeys",
            Some(&other),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/organizations/default/apiKeys/{id}"),
            Some(&a.sk),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = create(a.sk.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_sets_per_org_limits_new_sets_only() {
    let a = api_with(|c| c.limits.secret_sets_per_org = 1).await;
    let put = |key: String, set: &'static str| {
        let a = &a;
        async move {
            a.call(
                Method::PUT,
                &format!("/v1/secrets/{set}"),
                Some(&key),
                Some(json!({"secretKey": "K", "secretValue": "v"})),
            )
            .await
        }
    };
    accepted(&put(a.sk.clone(), "set-1").await);
    // Updating the set there is is not a new one.
    accepted(&put(a.sk.clone(), "set-1").await);
    assert_limit(&put(a.sk.clone(), "set-2").await, "secret_sets_per_org", 1);
    let other = org_private_key(&a, "other").await;
    accepted(&put(other, "set-2").await);
    let r = a
        .call(Method::DELETE, "/v1/secrets/set-1", Some(&a.sk), None)
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    accepted(&put(a.sk.clone(), "set-2").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_per_org_counts_open_streams() {
    let a = api_with(|c| c.limits.event_streams_per_org = 1).await;
    let open = |key: String| {
        let a = &a;
        async move { super::open_events(a, &key).await }
    };
    let first = open(a.sk.clone()).await;
    assert_eq!(first.status(), StatusCode::OK);
    let second = open(a.sk.clone()).await;
    let status = second.status();
    // (An open stream's body never ends: read it only once it is refused.)
    assert_eq!(status, StatusCode::FORBIDDEN);
    let bytes = axum::body::to_bytes(second.into_body(), usize::MAX)
        .await
        .unwrap();
    let r = Answer {
        status,
        body: serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
    };
    assert_limit(&r, "event_streams_per_org", 1);
    let other = org_private_key(&a, "other").await;
    assert_eq!(open(other).await.status(), StatusCode::OK);
    // Closing the first stream makes room (once its watcher has seen the client go).
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = open(a.sk.clone()).await;
        if r.status() == StatusCode::OK {
            break;
        }
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            std::time::Instant::now() < deadline,
            "the closed stream still counts"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Creates at the same moment through one node do not overshoot: the store counts and inserts
/// in one step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_through_one_node_stop_at_the_limit() {
    let a = api_with(|c| c.limits.agents_per_org = 3).await;
    let tries = (0..10).map(|i| {
        let a = &a;
        async move { create_agent(a, &a.sk, &format!("c{i}")).await.status }
    });
    let got = futures_util::future::join_all(tries).await;
    let ok = got.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = got.iter().filter(|s| **s == StatusCode::FORBIDDEN).count();
    assert_eq!((ok, refused), (3, 7), "{got:?}");
    assert_eq!(a.state.store.list_agents("default").await.unwrap().len(), 3);
}

/// Creates at the same moment through two nodes on one PostgreSQL database do not overshoot
/// either: each node has its own engine, and only the store's one step holds the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_through_two_nodes_stop_at_the_limit() {
    use std::sync::Arc;

    use crate::store::postgres::{tests::test_database_url, PgStore};
    use crate::store::Store;
    let Some(url) = test_database_url() else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let store = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        nodes.push(api_on(Some(store), |c| c.limits.agents_per_org = 3).await);
    }
    let tries = (0..16).map(|i| {
        let a = &nodes[i % 2];
        async move { create_agent(a, &a.sk, &format!("c{i}")).await.status }
    });
    let got = futures_util::future::join_all(tries).await;
    let ok = got.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = got.iter().filter(|s| **s == StatusCode::FORBIDDEN).count();
    assert_eq!((ok, refused), (3, 13), "{got:?}");
    let store = &nodes[0].state.store;
    assert_eq!(store.list_agents("default").await.unwrap().len(), 3);
    assert_limit(
        &create_agent(&nodes[1], &nodes[1].sk, "one-more").await,
        "agents_per_org",
        3,
    );
}
