//! In-process API tests: the router built as `cattery serve` builds it ([`crate::serve::app_state`])
//! over a real SQLite store in a temp dir and the fake runtime ([`crate::runtime::fake`]),
//! driven with `tower::ServiceExt::oneshot`. No binary, no socket of its own, no process.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::config::Config;
use crate::core::keys::issue_key;
use crate::model::KeyKind;
use crate::runtime::fake::FakeRuntime;
use crate::serve::{app_state, open_store, DEFAULT_ORG};

/// A router over a fresh store and a fake runtime, with a private and a public key.
struct Api {
    _dir: tempfile::TempDir,
    app: Router,
    /// What the router serves (its store and engine), for tests that set the scene.
    state: super::AppState,
    fake: FakeRuntime,
    sk: String,
    pk: String,
}

/// An answer: status and JSON body (`Value::Null` when the body is not JSON).
struct Answer {
    status: StatusCode,
    body: Value,
}

/// What the fake runtime's instances received by `/bot`, once something did (a start answers
/// once the session is handed over; its `/bot` request may still be on its way): up to 2 s.
async fn delivered(a: &Api) -> Vec<crate::runtime::fake::Delivered> {
    for _ in 0..100 {
        let got = a.fake.delivered();
        if !got.is_empty() {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.fake.delivered()
}

mod big_list;
mod cluster_internal;
mod daily;
mod fork_server;
mod limits;
mod local_redeploy;
mod webhooks;
mod whatsapp;
mod ws_waiting;

async fn api() -> Api {
    api_with(|_| {}).await
}

/// [`api`] with `tune` applied to the configuration.
async fn api_with(tune: impl FnOnce(&mut Config)) -> Api {
    api_on(None, tune).await
}

/// [`api_with`] over `store` when given (one that another [`Api`] shares, as two nodes share a
/// PostgreSQL database), else over a fresh SQLite store.
async fn api_on(
    store: Option<Arc<dyn crate::store::Store>>,
    tune: impl FnOnce(&mut Config),
) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.data_dir = dir.path().to_path_buf();
    config.sessions.stop_grace_seconds = 0.5;
    config.sessions.start_timeout_seconds = 5.0;
    tune(&mut config);
    let store = match store {
        Some(s) => {
            // What `open_store` does for a store it opens.
            s.ensure_org(DEFAULT_ORG).await.unwrap();
            s
        }
        None => open_store(&config.store, dir.path()).await.unwrap(),
    };
    let fake = FakeRuntime::new();
    let (logs, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let state = app_state(
        &config,
        dir.path(),
        store.clone(),
        Arc::new(fake.clone()),
        logs,
    )
    .unwrap();
    state.webhooks.load().await.unwrap();
    state.sup.recover().await.unwrap();
    let (_, sk) = issue_key(store.as_ref(), DEFAULT_ORG, KeyKind::Private, "sk")
        .await
        .unwrap();
    let (_, pk) = issue_key(store.as_ref(), DEFAULT_ORG, KeyKind::Public, "pk")
        .await
        .unwrap();
    Api {
        _dir: dir,
        app: super::router(state.clone()),
        state,
        fake,
        sk,
        pk,
    }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(serde_json::to_vec(&b).unwrap())
            }
            None => Body::empty(),
        };
        self.send(req.body(body).unwrap()).await
    }

    /// Sends `req` through the app; its status and JSON body (`Null` when not JSON).
    async fn send(&self, req: Request<Body>) -> Answer {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn get(&self, uri: &str) -> Answer {
        self.call(Method::GET, uri, Some(&self.sk), None).await
    }

    /// Creates agent `name` running the fake script `script` with `extra` fields; asserts 200.
    async fn deploy(&self, name: &str, script: &[&str], extra: Value) {
        let mut body = json!({
            "serviceName": name,
            "command": std::iter::once("fake").chain(script.iter().copied()).collect::<Vec<_>>(),
        });
        if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(x.clone());
        }
        let r = self
            .call(Method::POST, "/v1/agents", Some(&self.sk), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    async fn start(&self, name: &str) -> Answer {
        let uri = format!("/v1/public/{name}/start");
        self.call(Method::POST, &uri, Some(&self.pk), Some(json!({})))
            .await
    }

    /// Starts a session of `name`; asserts 200 and returns its id.
    async fn start_ok(&self, name: &str) -> String {
        let r = self.start(name).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["sessionId"].as_str().unwrap().to_string()
    }

    async fn stop(&self, name: &str, id: &str) -> Answer {
        let uri = format!("/v1/agents/{name}/sessions/{id}");
        self.call(Method::DELETE, &uri, Some(&self.sk), None).await
    }
}

/// Asserts the error body shape of this API: `{error, code}` with both strings.
fn assert_error(r: &Answer, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.body["code"], code, "{}", r.body);
    assert!(r.body["error"].is_string(), "{}", r.body);
}

/// Create an agent, start a session, read it, stop it: the stop answers 200 `terminated`
/// only once the instance is gone, and the session reads as ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_start_get_stop() {
    let a = api().await;
    a.deploy("hello", &[], json!({})).await;
    let r = a.get("/v1/agents/hello").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["name"], "hello", "{}", r.body);

    let id = a.start_ok("hello").await;
    assert_eq!(a.fake.starts(), 1);
    let r = a.get(&format!("/v1/agents/hello/sessions/{id}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["sessionId"], id.as_str());
    assert_eq!(r.body["serviceName"], "hello");
    assert!(r.body["endedAt"].is_null(), "{}", r.body);

    let r = a.stop("hello", &id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"session_id": id, "status": "terminated"}));
    // The answer came after the terminate: nothing of the instance is left.
    assert!(a.fake.live().is_empty(), "{:?}", a.fake.events());
    assert!(a.fake.events().iter().any(|e| e.starts_with("gone ")));
    let r = a.get(&format!("/v1/agents/hello/sessions/{id}")).await;
    assert!(r.body["endedAt"].is_string(), "{}", r.body);
    assert!(r.body["endReason"].is_string(), "{}", r.body);
    // Stopping an ended session answers the same 200 again.
    let again = a.stop("hello", &id).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["status"], "terminated");
}

/// At `maxAgents` a start answers 429 with the rate-limit body; a stop makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_at_max_agents_is_429() {
    let a = api().await;
    a.deploy("cap", &[], json!({"autoScaling": {"maxAgents": 1}}))
        .await;
    let first = a.start_ok("cap").await;
    let r = a.start("cap").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.body["status"], 429);
    assert_eq!(r.body["code"], "429");
    assert!(r.body["message"].is_string() && r.body["error"].is_string());
    assert_eq!(a.fake.starts(), 1, "no instance started over the cap");
    assert_eq!(a.stop("cap", &first).await.status, StatusCode::OK);
    a.start_ok("cap").await;
}

/// 404 and 400 answers carry `{error, code}`, never a bare or text body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies() {
    let a = api().await;
    assert_error(
        &a.get("/v1/agents/nope").await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_error(
        &a.get("/v1/no/such/route").await,
        StatusCode::NOT_FOUND,
        "404",
    );
    let r = a.start("nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(r.body["error"].is_string() && r.body["code"].is_string());
    a.deploy("err", &[], json!({})).await;
    assert_error(
        &a.get("/v1/agents/err/sessions/not-a-uuid").await,
        StatusCode::BAD_REQUEST,
        "400",
    );
    let unknown = uuid::Uuid::new_v4();
    assert_error(
        &a.get(&format!("/v1/agents/err/sessions/{unknown}")).await,
        StatusCode::NOT_FOUND,
        "404",
    );
    let r = a
        .call(Method::POST, "/v1/agents", Some(&a.sk), Some(json!([1])))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let r = a
        .call(
            Method::POST,
            "/v1/agents",
            Some(&a.sk),
            Some(json!({"serviceName": "Bad Name!", "command": ["fake"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body["error"].is_string() && r.body["code"].is_string());
    let r = a.call(Method::GET, "/v1/agents", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(r.body["error"].is_string() && r.body["code"].is_string());
    let r = a.get("/v1/agents/err/sessions?status=sideways").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "400");
}

/// A NUL byte in a name, id or filter (path, query or a body's name field) is a 400 before
/// any store is asked: PostgreSQL refuses text holding one, which answered 503.
/// A JSON body over the API's limit is a 413 that says the limit, on any route that reads one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_a_413_naming_the_limit() {
    let a = api().await;
    let big = "x".repeat(super::MAX_REQUEST_BYTES);
    for (method, uri) in [
        (Method::POST, "/v1/agents"),
        (Method::PUT, "/v1/secrets/big"),
    ] {
        let r = a
            .call(method, uri, Some(&a.sk), Some(json!({"serviceName": big})))
            .await;
        assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "413");
        let msg = r.body["error"].as_str().unwrap();
        assert!(
            msg.contains(&format!("{} bytes", super::MAX_REQUEST_BYTES)),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn a_nul_byte_in_a_name_or_filter_is_a_400() {
    let a = api().await;
    a.deploy("bot", &[], json!({})).await;
    for uri in [
        "/v1/agents/b%00t",
        "/v1/agents/bot/logs?query=x%00",
        "/v1/agents/bot/sessions?status=%00",
        "/v1/builds?region=local%00",
        "/v1/secrets/a%00b",
        "/v1/organizations/default/services/b%00t",
    ] {
        assert_error(
            &a.get(uri).await,
            StatusCode::BAD_REQUEST,
            "GENERIC_BAD_REQUEST",
        );
    }
    for (uri, body) in [
        (
            "/v1/organizations/default/apiKeys",
            json!({"name": "ci\u{0}", "type": "private"}),
        ),
        (
            "/v1/webhooks",
            json!({"url": "http://127.0.0.1:9/hook", "description": "ops\u{0}"}),
        ),
    ] {
        let r = a.call(Method::POST, uri, Some(&a.sk), Some(body)).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    }
    // A set name no set can have is not found, as any missing set.
    let r = a
        .call(
            Method::POST,
            "/v1/agents",
            Some(&a.sk),
            Some(json!({"serviceName": "nul", "command": ["fake"], "secretSet": "a\u{0}b"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}

/// The session proxy never reaches the instance's reserved paths (`/bot`, `/ws`), however
/// the path is spelled: a percent-encoded `?` (`bot%3F`), dot segments, empty segments or an
/// encoded `bot` are refused with 404 like `bot` itself, and no second `POST /bot` arrives.
/// Other paths reach the instance as the client spelled them.
#[tokio::test]
async fn the_session_proxy_never_reaches_reserved_paths() {
    let a = api().await;
    a.deploy("bot", &[], json!({})).await;
    let sid = a.start_ok("bot").await;
    assert_eq!(a.fake.delivered().len(), 1);
    for p in [
        "bot",
        "bot%3F",
        "bot%3Fx=1",
        "%62ot",
        "./bot",
        "x/../bot",
        "/bot",
        "%2Fbot",
        "ws%3F",
        "bot%23",
        "bot/extra",
    ] {
        let r = a
            .call(
                Method::POST,
                &format!("/v1/public/bot/sessions/{sid}/{p}"),
                Some(&a.pk),
                Some(json!({"hijack": true})),
            )
            .await;
        assert_error(&r, StatusCode::NOT_FOUND, "404");
        assert!(
            r.body["error"].as_str().unwrap().contains("reserved"),
            "{p}: {}",
            r.body
        );
    }
    assert_eq!(a.fake.delivered().len(), 1, "a second POST /bot arrived");
    // A path with characters a URI must encode reaches the instance (its own 404 here).
    let r = a
        .call(
            Method::GET,
            &format!("/v1/public/bot/sessions/{sid}/a%20b%3Fc"),
            Some(&a.pk),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(r.body.is_null(), "the instance's own answer: {}", r.body);
}

/// An `image` no engine could pull is a 400 at create and at update (not a deployment that
/// fails later); references Docker accepts, with a registry, port, tag or digest, are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_reference_no_engine_can_pull_is_a_400() {
    let a = api().await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    for bad in [
        "Trial/BOT:1",
        "bot image",
        "bot:",
        "bot:-tag",
        "https://registry.example.com/bot",
        "bot@sha256:1234",
        "/bot",
        "bot//x",
    ] {
        let body = json!({"serviceName": "img", "image": bad});
        let r = a
            .call(Method::POST, "/v1/agents", Some(&a.sk), Some(body))
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
        let msg = r.body["error"].as_str().unwrap();
        assert!(msg.contains("not a valid image reference"), "{bad}: {msg}");
    }
    for good in [
        "bot".to_string(),
        "org/bot:1.2".to_string(),
        "registry.example.com:5000/team/org/bot:v1_2-3".to_string(),
        format!("ghcr.io/org/bot@{digest}"),
        format!("bot:latest@{digest}"),
    ] {
        let body = json!({"serviceName": "img-ok", "image": good});
        let r = a
            .call(Method::POST, "/v1/agents", Some(&a.sk), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{good}: {}", r.body);
        let r = a
            .call(Method::DELETE, "/v1/agents/img-ok", Some(&a.sk), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    a.deploy("img-upd", &[], json!({})).await;
    let body = json!({"image": "Org/Bot"});
    let r = a
        .call(Method::POST, "/v1/agents/img-upd", Some(&a.sk), Some(body))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");

    // An uppercase name is named as the fault, with one message on every route that takes
    // an image (the API's and the CLI's create and update).
    let lowercase = "image is not a valid image reference (repository name must be lowercase): \
                     give [registry/]name[:tag][@digest], the name in lowercase, or local:/path/to/bot";
    let services = "/v1/organizations/default/services";
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/agents",
            json!({"serviceName": "img", "image": "Trial/BOT:1"}),
        ),
        (
            Method::POST,
            "/v1/agents/img-upd",
            json!({"image": "Org/Bot"}),
        ),
        (
            Method::POST,
            services,
            json!({"serviceName": "img", "image": "Trial/BOT:1"}),
        ),
        (
            Method::PUT,
            services,
            json!({"serviceName": "img-upd", "image": "trial/Bot:V1"}),
        ),
    ] {
        let r = a.call(method, path, Some(&a.sk), Some(body)).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
        assert_eq!(r.body["error"], lowercase, "{path}");
    }
    // An uppercase tag is a tag; another fault keeps the parser's words.
    let body = json!({"serviceName": "img-tag", "image": "trial/bot:V1"});
    let r = a
        .call(Method::POST, "/v1/agents", Some(&a.sk), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let body = json!({"serviceName": "img", "image": "bot image"});
    let r = a
        .call(Method::POST, "/v1/agents", Some(&a.sk), Some(body))
        .await;
    let msg = r.body["error"].as_str().unwrap();
    assert!(!msg.contains("lowercase)"), "{msg}");
}

/// A deleted agent's running sessions go on (reference §A.3) and stay listable by its name
/// (and its logs readable) until an agent of that name is created again; one is stopped by id.
/// Once an agent of that name is created again, a session of the deleted one that still runs
/// is still reachable, and stoppable, by the name and its id (not listed with the new agent's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_agents_sessions_stay_listable() {
    let a = api().await;
    a.deploy("gone", &[], json!({})).await;
    let sid = a.start_ok("gone").await;
    let r = a
        .call(Method::DELETE, "/v1/agents/gone", Some(&a.sk), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = a.get("/v1/agents/gone/sessions?status=active").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["sessions"][0]["sessionId"],
        sid.as_str(),
        "{}",
        r.body
    );
    let r = a.get("/v1/agents/gone/logs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.stop("gone", &sid).await.status, StatusCode::OK);
    assert_error(
        &a.get("/v1/agents/never/sessions").await,
        StatusCode::NOT_FOUND,
        "404",
    );
    // A new agent of that name lists its own sessions only. A session of the deleted agent
    // that still runs stays reachable by the name and its id: else nothing could stop it
    // before its time limit (the CLI's `agent stop` would even say it stopped it).
    a.deploy("gone", &[], json!({})).await;
    let running = a.start_ok("gone").await;
    let r = a
        .call(Method::DELETE, "/v1/agents/gone", Some(&a.sk), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    a.deploy("gone", &[], json!({})).await;
    let r = a.get("/v1/agents/gone/sessions").await;
    assert_eq!(r.body["sessions"], json!([]), "{}", r.body);
    let path = format!("/v1/agents/gone/sessions/{running}");
    let r = a.get(&path).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["sessionId"], running.as_str(), "{}", r.body);
    assert!(r.body["endedAt"].is_null(), "{}", r.body);
    let proxied = format!("/v1/public/gone/sessions/{running}/x");
    let r = a.call(Method::GET, &proxied, Some(&a.pk), None).await;
    assert!(r.body.is_null(), "the instance's own answer: {}", r.body);
    // Another name does not reach it.
    let other = format!("/v1/agents/never/sessions/{running}");
    assert_error(&a.get(&other).await, StatusCode::NOT_FOUND, "404");
    assert_error(
        &a.stop("never", &running).await,
        StatusCode::NOT_FOUND,
        "404",
    );
    assert_eq!(a.fake.live().len(), 1, "the session runs on");
    assert_eq!(a.stop("gone", &running).await.status, StatusCode::OK);
    assert_eq!(a.fake.live().len(), 0, "the stop removed its instance");
    let r = a.get(&path).await;
    assert!(!r.body["endedAt"].is_null(), "{}", r.body);
}

/// A secret set too large for the kernel's exec (with the agent's own environment) is a 400
/// naming the set at deploy, not a deployment whose every start fails with E2BIG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_set_too_large_to_exec_is_refused_at_deploy() {
    let a = api().await;
    let value = "x".repeat(32_000);
    let n = crate::core::exec_check::exec_budget() / 32_000 + 2;
    let keys: Vec<String> = (0..n).map(|i| format!("K{i}")).collect();
    for chunk in keys.chunks(25) {
        let secrets: Vec<Value> = chunk
            .iter()
            .map(|k| json!({"secretKey": k, "secretValue": value}))
            .collect();
        let r = a
            .call(
                Method::PUT,
                "/v1/secrets/huge",
                Some(&a.sk),
                Some(json!({ "secrets": secrets })),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    }
    let body = json!({"serviceName": "big", "command": ["fake"], "secretSet": "huge"});
    let r = a
        .call(Method::POST, "/v1/agents", Some(&a.sk), Some(body))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let msg = r.body["error"].as_str().unwrap();
    assert!(
        msg.contains("secretSet huge") && msg.contains("ARG_MAX"),
        "{msg}"
    );
    // The same set, made small enough, deploys.
    for k in &keys[2..] {
        let r = a
            .call(
                Method::DELETE,
                &format!("/v1/secrets/huge/{k}"),
                Some(&a.sk),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let body = json!({"serviceName": "big", "command": ["fake"], "secretSet": "huge"});
    let r = a
        .call(Method::POST, "/v1/agents", Some(&a.sk), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// `status`, `startType`, `deploymentId`, `limit` and `offset` filter the session list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_list_filters() {
    let a = api().await;
    a.deploy("filt", &[], json!({})).await;
    let ended = a.start_ok("filt").await;
    assert_eq!(a.stop("filt", &ended).await.status, StatusCode::OK);
    let active = a.start_ok("filt").await;
    let ids = |r: &Answer| -> Vec<String> {
        r.body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_string())
            .collect()
    };
    let all = a.get("/v1/agents/filt/sessions").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(all.body["total_count"], 2);
    assert_eq!(
        ids(&all),
        vec![active.clone(), ended.clone()],
        "newest first"
    );
    let r = a.get("/v1/agents/filt/sessions?status=active").await;
    assert_eq!(
        (ids(&r), &r.body["total_count"]),
        (vec![active.clone()], &json!(1))
    );
    let r = a.get("/v1/agents/filt/sessions?status=ended").await;
    assert_eq!(ids(&r), vec![ended.clone()]);
    let r = a.get("/v1/agents/filt/sessions?startType=cold").await;
    assert_eq!(
        r.body["total_count"], 2,
        "both started an instance: {}",
        r.body
    );
    let r = a.get("/v1/agents/filt/sessions?startType=warm").await;
    assert_eq!(r.body["total_count"], 0, "{}", r.body);
    let r = a.get("/v1/agents/filt/sessions?limit=1&offset=1").await;
    assert_eq!(
        (ids(&r), &r.body["total_count"]),
        (vec![ended.clone()], &json!(2))
    );
    let dep = all.body["sessions"][0]["deploymentId"]
        .as_str()
        .unwrap()
        .to_string();
    let r = a
        .get(&format!("/v1/agents/filt/sessions?deploymentId={dep}"))
        .await;
    assert_eq!(r.body["total_count"], 2, "{}", r.body);
    let other = uuid::Uuid::new_v4();
    let r = a
        .get(&format!("/v1/agents/filt/sessions?deploymentId={other}"))
        .await;
    assert_eq!(r.body["total_count"], 0, "{}", r.body);
    let r = a.get("/v1/agents/filt/sessions?startTime=4102444800").await;
    assert_eq!(r.body["total_count"], 0, "nothing from 2100 on: {}", r.body);
    assert_eq!(a.stop("filt", &active).await.status, StatusCode::OK);
}

/// The served document is the generated one (whatever the store holds), needs no key, and
/// every documented operation is routed: a request to it never falls through to the
/// router's "no such route" or "method not allowed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_and_routed() {
    let a = api().await;
    let r = a.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body,
        serde_json::to_value(super::router::openapi()).unwrap()
    );
    let paths = r.body["paths"].as_object().unwrap();
    assert!(paths.len() >= 10, "{:?}", paths.keys());
    for (path, item) in paths {
        // Placeholders become plain segments; `{*path}`-like tails are not in the document.
        let uri = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = a.call(m, &uri, None, None).await;
            assert_ne!(r.body["error"], "no such route", "{method} {path}");
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        }
    }
}

/// Regions and properties keep their wire form (snake_case region keys; the schema form of
/// a properties update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_and_properties() {
    let a = api().await;
    let r = a.get("/v1/regions").await;
    let arch = crate::core::orgs::host_architecture();
    assert_eq!(
        r.body,
        json!({"regions": [{"code": "local", "display_name": "Local (this server)",
            "supported_architectures": [arch], "default_architecture": arch}]})
    );
    let r = a.get("/v1/properties").await;
    assert_eq!(r.body, json!({"properties": {"defaultRegion": "local"}}));
    let schema = json!({"properties": {"defaultRegion": {
        "type": "string",
        "description": "Region used for new agents and secret sets that name none",
        "readOnly": false, "currentValue": "local", "default": "local",
        "availableValues": ["local"]}}});
    assert_eq!(a.get("/v1/properties/schema").await.body, schema);
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"defaultRegion": "local"})),
        )
        .await;
    assert_eq!((r.status, r.body), (StatusCode::OK, schema));
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"defaultRegion": "mars"})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
}

/// `GET /metrics` is served (open without `--metrics-token`), and every answer carries a
/// request id: the client's own, else a new one.
#[tokio::test]
async fn metrics_are_served_and_request_ids_answered() {
    let a = api().await;
    let get = |uri: &str, id: Option<&str>| {
        let mut req = Request::builder().method(Method::GET).uri(uri);
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        a.app.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    let r = get("/health", Some("client-id-1")).await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-1");
    let r = get("/v1/agents", None).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["x-request-id"].len(), 36);
    let r = get("/metrics", None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("cattery_build_info{version="), "{text}");
}

/// Reads server-sent events from `body` until one named `event` whose data contains `needle`
/// arrives (its data is returned), or `None` after `wait`.
async fn next_event(
    body: &mut Body,
    buf: &mut String,
    event: &str,
    needle: &str,
    wait: std::time::Duration,
) -> Option<String> {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let name = block.lines().find_map(|l| l.strip_prefix("event: "));
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if name == Some(event) && data.contains(needle) {
                return Some(data);
            }
        }
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .ok()??;
        if let Ok(data) = frame.unwrap().into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
        }
    }
}

/// `GET /v1/sessions/events` with `key`; the answer as it comes (its body is the stream).
async fn open_events(a: &Api, key: &str) -> axum::response::Response {
    let req = Request::builder()
        .uri("/v1/sessions/events")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    a.app.clone().oneshot(req).await.unwrap()
}

/// A stream opened with the private key, read up to its `ready` event.
async fn events_after_ready(a: &Api) -> (Body, String) {
    let mut body = open_events(a, &a.sk).await.into_body();
    let mut buf = String::new();
    let wait = std::time::Duration::from_secs(10);
    assert!(next_event(&mut body, &mut buf, "ready", "", wait)
        .await
        .is_some());
    (body, buf)
}

/// `GET /v1/sessions/events`: `ready` first, then each session of the caller's org when it
/// starts and when it has ended; no key is a 401. (Another org's stream: the e2e test
/// `dashboard::session_events_are_scoped_to_the_org`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_events_stream() {
    use std::time::Duration;
    let a = api().await;
    a.deploy("live", &[], json!({})).await;
    let open = |key: String| {
        let a = &a;
        async move { open_events(a, &key).await }
    };
    let r = a.call(Method::GET, "/v1/sessions/events", None, None).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "401");
    let r = open(a.sk.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = r.into_body();
    let mut buf = String::new();
    let wait = Duration::from_secs(5);
    assert!(next_event(&mut body, &mut buf, "ready", "", wait)
        .await
        .is_some());
    let id = a.start_ok("live").await;
    let data = next_event(&mut body, &mut buf, "session", &id, wait)
        .await
        .expect("an event for the started session");
    let s: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(s["serviceName"], "live");
    assert_eq!(s["status"], "active");
    assert_eq!(a.stop("live", &id).await.status, StatusCode::OK);
    let data = next_event(&mut body, &mut buf, "session", "\"ended\"", wait)
        .await
        .expect("an event for the ended session");
    let s: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(s["sessionId"], id.as_str());
    assert_eq!(s["endReason"], "stopped");
}

/// A session event stream ends when the server stops serving HTTP (`AppState::closing`), so
/// the graceful close of a draining node does not wait out its bound for a dashboard left
/// open (seen: 7 s more per stop of a node with one stream open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_events_stream_ends_when_the_server_closes() {
    use http_body_util::BodyExt;
    use std::time::Duration;
    let a = api().await;
    let (mut body, _) = events_after_ready(&a).await;
    let wait = Duration::from_secs(10);
    a.state.closing.cancel();
    // The body ends (no more frames); keep-alive comments may come before that.
    let ended = tokio::time::timeout(wait, async {
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream still runs after the server closed"
    );
}

/// An open event stream ends once its key is revoked (checked every `KEY_RECHECK`): before,
/// a revoked key went on hearing of the org's sessions for as long as its stream stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_events_stream_ends_when_its_key_is_revoked() {
    use http_body_util::BodyExt;
    use std::time::Duration;
    let a = api().await;
    let (mut body, _) = events_after_ready(&a).await;
    let me = a.call(Method::GET, "/v1/users", Some(&a.sk), None).await;
    let id = me.body["user"]["userId"].as_str().unwrap().to_string();
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/organizations/default/apiKeys/{id}"),
            Some(&a.sk),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream of a revoked key still runs");
    let r = open_events(&a, &a.sk).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// On several nodes: a session the stream heard of from another node's change, whose end
/// this node then writes (a takeover's `lost` end, which no engine names), is told ended: the
/// feed's announcement of this node's own write reaches the stream for such a session. (It
/// was left out as "named by the engine already", and the stream's backstop skips sessions
/// of other nodes: the end was never told.) The feed is played by hand on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_events_tell_an_end_this_node_wrote_for_another_nodes_session() {
    use std::time::Duration;
    let a = api().await;
    a.deploy("remote", &[], json!({})).await;
    let sup = a.state.sup.clone();
    sup.set_change_feed();
    let (mut body, mut buf) = events_after_ready(&a).await;
    let wait = Duration::from_secs(10);
    let store = &a.state.store;
    let now = crate::model::now_ms();
    let sid = cluster_internal::session_of_n2(&a, "remote").await;
    sup.session_changed_through("n2", DEFAULT_ORG.into(), sid);
    next_event(&mut body, &mut buf, "session", &sid.to_string(), wait)
        .await
        .expect("an event for node n2's session");
    // This node takes n2 over and ends the session `lost`.
    let end = crate::core::session::lost_end(false, false, true, now + 1);
    assert!(store.end_session(sid, &end).await.unwrap());
    sup.session_changed_through(&a.state.node.id, DEFAULT_ORG.into(), sid);
    let data = next_event(&mut body, &mut buf, "session", "\"ended\"", wait)
        .await
        .expect("an event for the end this node wrote");
    let s: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(s["sessionId"], sid.to_string());
    assert_eq!(s["endReason"], "lost");
}

/// `/` redirects to `/dashboard`; the page and its assets are served from the binary with a
/// policy that allows this origin only and no framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_is_served() {
    let a = api().await;
    let get = |uri: &'static str| {
        let app = a.app.clone();
        async move {
            app.oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
                .await
                .unwrap()
        }
    };
    let r = get("/").await;
    assert!(r.status().is_redirection(), "{}", r.status());
    assert_eq!(r.headers()["location"], "/dashboard");
    for (uri, ty) in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let r = get(uri).await;
        assert_eq!(r.status(), StatusCode::OK, "{uri}");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(ty), "{uri}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(h["x-frame-options"], "DENY");
    }
}

/// `endReason` filters an agent's session list; an unknown reason is a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_list_by_end_reason() {
    let a = api().await;
    a.deploy("why", &[], json!({})).await;
    let stopped = a.start_ok("why").await;
    let running = a.start_ok("why").await;
    assert_eq!(a.stop("why", &stopped).await.status, StatusCode::OK);
    let r = a.get("/v1/agents/why/sessions?endReason=stopped").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["total_count"], 1, "{}", r.body);
    assert_eq!(r.body["sessions"][0]["sessionId"], stopped.as_str());
    let r = a.get("/v1/agents/why/sessions?endReason=completed").await;
    assert_eq!(r.body["total_count"], 0, "{}", r.body);
    let r = a.get("/v1/agents/why/sessions").await;
    assert_eq!(r.body["total_count"], 2, "{}", r.body);
    let r = a.get("/v1/agents/why/sessions?endReason=bored").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "400");
    assert!(r.body["error"].as_str().unwrap().contains("endReason"));
    assert_eq!(a.stop("why", &running).await.status, StatusCode::OK);
}

/// 1,000 sessions live at once on the fake runtime: the event stream tells each of them, once
/// started, and each end. (Prints how long that took: a figure for docs/dashboard.md, not a
/// check.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_events_with_1000_live() {
    use std::collections::HashSet;
    use std::time::{Duration, Instant};
    const N: usize = 1000;
    let a = api().await;
    a.deploy("many", &[], json!({"autoScaling": {"maxAgents": N}}))
        .await;
    let req = Request::builder()
        .uri("/v1/sessions/events")
        .header("authorization", format!("Bearer {}", a.sk))
        .body(Body::empty())
        .unwrap();
    let mut body = a.app.clone().oneshot(req).await.unwrap().into_body();
    let mut buf = String::new();
    let wait = Duration::from_secs(60);
    assert!(next_event(&mut body, &mut buf, "ready", "", wait)
        .await
        .is_some());
    let t0 = Instant::now();
    let ids: Vec<String> = futures_util::future::join_all((0..N).map(|_| a.start_ok("many"))).await;
    let started = t0.elapsed();
    let mut seen = HashSet::new();
    while seen.len() < N {
        let data = next_event(&mut body, &mut buf, "session", "\"active\"", wait)
            .await
            .expect("an event for every started session");
        let s: Value = serde_json::from_str(&data).unwrap();
        seen.insert(s["sessionId"].as_str().unwrap().to_string());
    }
    let told = t0.elapsed();
    assert!(ids.iter().all(|id| seen.contains(id)));
    futures_util::future::join_all(ids.iter().map(|id| a.stop("many", id))).await;
    let mut ended = HashSet::new();
    while ended.len() < N {
        let data = next_event(&mut body, &mut buf, "session", "\"ended\"", wait)
            .await
            .expect("an event for every ended session");
        let s: Value = serde_json::from_str(&data).unwrap();
        ended.insert(s["sessionId"].as_str().unwrap().to_string());
    }
    eprintln!(
        "{N} sessions: started in {started:?}, all told by {told:?}, all ends told by {:?}",
        t0.elapsed()
    );
}

/// One raw request through `app`: status and headers.
async fn raw(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn preflight<'a>(origin: &'a str, method: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("origin", origin),
        ("access-control-request-method", method),
        (
            "access-control-request-headers",
            "authorization,content-type",
        ),
    ]
}

/// CORS with the defaults: any origin on the public routes (preflight and the call itself),
/// none on the private ones.
#[tokio::test]
async fn cors_defaults_allow_public_routes_only() {
    let a = api().await;
    a.deploy("bot", &[], json!({})).await;
    let app = super::cors::wrap(a.app.clone(), &crate::web::WebConfig::default());
    let page = "http://127.0.0.1:9";
    let (st, h, _) = raw(
        &app,
        Method::OPTIONS,
        "/v1/public/bot/start",
        &preflight(page, "POST"),
        None,
    )
    .await;
    assert!(st.is_success(), "preflight answered {st}");
    assert_eq!(h["access-control-allow-origin"], "*");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let bearer = format!("Bearer {}", a.pk);
    let (st, h, body) = raw(
        &app,
        Method::POST,
        "/v1/public/bot/start",
        &[
            ("origin", page),
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        Some(json!({})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(h["access-control-allow-origin"], "*");
    // The session proxy is public too.
    let (st, h, _) = raw(
        &app,
        Method::OPTIONS,
        "/v1/public/bot/sessions/00000000-0000-0000-0000-000000000000/api/x",
        &preflight(page, "PUT"),
        None,
    )
    .await;
    assert!(st.is_success());
    assert_eq!(h["access-control-allow-origin"], "*");
    // Private routes: no Allow-Origin, so a browser refuses the call.
    for (method, uri) in [(Method::OPTIONS, "/v1/agents"), (Method::GET, "/v1/agents")] {
        let sk = format!("Bearer {}", a.sk);
        let mut hs = preflight(page, "GET").to_vec();
        hs.push(("authorization", &sk));
        let (_, h, _) = raw(&app, method.clone(), uri, &hs, None).await;
        assert!(
            !h.contains_key("access-control-allow-origin"),
            "{method} {uri}: {h:?}"
        );
    }
}

/// CORS with configured origins: only those, on both kinds of route; a websocket handshake
/// from another origin is refused.
#[tokio::test]
async fn cors_configured_origins() {
    let a = api().await;
    let web = crate::web::WebConfig {
        cors_public_origins: vec!["https://app.example".into()],
        cors_private_origins: vec!["https://admin.example".into()],
        ..crate::web::WebConfig::default()
    };
    let app = super::cors::wrap(a.app.clone(), &web);
    let origin_of = |h: &axum::http::HeaderMap| {
        h.get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let start = "/v1/public/bot/start";
    let (_, h, _) = raw(
        &app,
        Method::OPTIONS,
        start,
        &preflight("https://app.example", "POST"),
        None,
    )
    .await;
    assert_eq!(origin_of(&h).as_deref(), Some("https://app.example"));
    let (_, h, _) = raw(
        &app,
        Method::OPTIONS,
        start,
        &preflight("https://evil.example", "POST"),
        None,
    )
    .await;
    assert_eq!(origin_of(&h), None);
    let (_, h, _) = raw(
        &app,
        Method::OPTIONS,
        "/v1/agents",
        &preflight("https://admin.example", "GET"),
        None,
    )
    .await;
    assert_eq!(origin_of(&h).as_deref(), Some("https://admin.example"));
    let (_, h, _) = raw(
        &app,
        Method::OPTIONS,
        "/v1/agents",
        &preflight("https://app.example", "GET"),
        None,
    )
    .await;
    assert_eq!(origin_of(&h), None);
    let ws = [
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let mut evil = ws.to_vec();
    evil.push(("origin", "https://evil.example"));
    let (st, _, body) = raw(&app, Method::GET, "/ws/generic/bot.default", &evil, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("origin"), "{body}");
    let mut good = ws.to_vec();
    good.push(("origin", "https://app.example"));
    let (st, _, body) = raw(&app, Method::GET, "/ws/generic/bot.default", &good, None).await;
    assert!(
        !body["error"].as_str().unwrap_or("").contains("origin"),
        "{st} {body}"
    );
}

/// The websocket URL from `/start` follows the proxy's headers and `--public-url`.
#[tokio::test]
async fn ws_url_follows_forwarded_proto() {
    let a = api().await;
    a.deploy("bot", &[], json!({})).await;
    let bearer = format!("Bearer {}", a.pk);
    let start = |extra: Vec<(&'static str, &'static str)>| {
        let app = a.app.clone();
        let bearer = bearer.clone();
        async move {
            let mut hs = vec![
                ("authorization", bearer.as_str()),
                ("host", "10.1.2.3:7870"),
                ("content-type", "application/json"),
            ];
            hs.extend(extra);
            let (st, _, body) = raw(
                &app,
                Method::POST,
                "/v1/public/bot/start",
                &hs,
                Some(json!({"transport": "websocket"})),
            )
            .await;
            assert_eq!(st, StatusCode::OK, "{body}");
            body["wsUrl"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(
        start(vec![]).await,
        "ws://10.1.2.3:7870/ws/generic/bot.default"
    );
    assert_eq!(
        start(vec![("x-forwarded-proto", "https")]).await,
        "wss://10.1.2.3:7870/ws/generic/bot.default"
    );
    assert_eq!(
        start(vec![("forwarded", "proto=https;host=voice.example")]).await,
        "wss://voice.example/ws/generic/bot.default"
    );
}

/// Deployments report the architecture instances really run on, not a fixed `arm`.
#[tokio::test]
async fn node_type_is_the_host_architecture() {
    let a = api().await;
    a.deploy("bot", &[], json!({})).await;
    let r = a.get("/v1/agents/bot/deployments").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let arch = crate::core::orgs::host_architecture();
    assert_eq!(
        r.body["deployments"][0]["manifest"]["spec"]["dailyNodeType"], arch,
        "{}",
        r.body
    );
    if cfg!(target_arch = "x86_64") {
        assert_eq!(arch, "amd64");
    }
}

/// An `OPTIONS` without `Origin` is no preflight: it reaches its route as before (a JSON 405
/// on the API's own routes).
#[tokio::test]
async fn options_without_origin_is_not_taken_for_a_preflight() {
    let a = api().await;
    let app = super::cors::wrap(a.app.clone(), &crate::web::WebConfig::default());
    let (st, _, body) = raw(&app, Method::OPTIONS, "/v1/public/bot/start", &[], None).await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert_eq!(body["code"], "405", "{body}");
}

mod builds;

/// An error answered to the official CLI (its `User-Agent`) has its `error` escaped for rich's
/// markup, which the CLI prints it through (`api::cli_text`); any other client gets it as is.
#[tokio::test]
async fn an_error_for_the_cli_is_escaped_for_its_markup() {
    let a = api().await;
    let send = |agent: Option<&'static str>| {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/v1/agents")
            .header("authorization", format!("Bearer {}", a.sk))
            .header("content-type", "application/json");
        if let Some(ua) = agent {
            req = req.header("user-agent", ua);
        }
        let body = json!({"serviceName": "x[runner]y", "image": "i:1"});
        a.send(req.body(Body::from(body.to_string())).unwrap())
    };
    // The refusal quotes the names' pattern, whose `[a-z0-9]` rich would take for a tag.
    let plain = send(Some("curl/8.0")).await;
    assert_error(&plain, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let text = plain.body["error"].as_str().unwrap();
    assert!(text.contains("^[a-z0-9]([-a-z0-9]*[a-z0-9])$"), "{text}");
    let cli = send(Some("PipecatCloudCLI/1.4.0")).await;
    assert_error(&cli, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    assert_eq!(
        cli.body["error"].as_str().unwrap(),
        text.replace("[a-z0-9]", "\\[a-z0-9]")
    );
    assert_eq!(cli.body["code"], plain.body["code"]);
    let pcc = send(Some("PipecatCloudCLI/0.7.2")).await;
    assert_eq!(pcc.body, cli.body);
}
