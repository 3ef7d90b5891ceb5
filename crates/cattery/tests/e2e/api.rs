//! The core contract over HTTP against the real binary: auth, agents, sessions, the stop seed.

use crate::common;
use std::time::Duration;

use crate::common::{pid_alive, Server};
use serde_json::{json, Value};

const SESSION_KEYS: &[&str] = &[
    "sessionId",
    "serviceId",
    "organizationId",
    "deploymentId",
    "createdAt",
    "updatedAt",
    "endedAt",
    "botStartSeconds",
    "coldStart",
    "completionStatus",
    "endReason",
];

fn assert_error_body(r: &common::Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {:?}", r.body);
    assert!(
        r.content_type.starts_with("application/json"),
        "content-type {}",
        r.content_type
    );
    assert!(r.body["error"].is_string(), "error missing: {:?}", r.body);
    assert_eq!(r.body["code"], code, "body: {:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_authentication() {
    let s = Server::start(&[]).await;
    let h = s.req("GET", "/health", None, None).await;
    assert_eq!(h.status, 200);

    assert_error_body(&s.req("GET", "/v1/agents", None, None).await, 401, "401");
    assert_error_body(
        &s.req("GET", "/v1/agents", Some("sk_nope"), None).await,
        401,
        "401",
    );
    // Wrong kind: a public key on the private API, a private key on start.
    assert_error_body(
        &s.req("GET", "/v1/agents", Some(&s.pk), None).await,
        401,
        "401",
    );
    s.deploy("auth-agent", &[], json!({})).await;
    let r = s
        .req(
            "POST",
            "/v1/public/auth-agent/start",
            Some(&s.sk),
            Some(json!({})),
        )
        .await;
    assert_error_body(&r, 401, "401");
    assert_eq!(
        s.req("GET", "/v1/agents", Some(&s.sk), None).await.status,
        200
    );

    // Keys: pk_/sk_ prefixes, hashes only, revocation works at once.
    assert!(s.pk.starts_with("pk_") && s.sk.starts_with("sk_"));
    let db = std::fs::read(s.data_dir().join("cattery.db")).unwrap();
    let sk_bytes = s.sk.as_bytes();
    assert!(
        !db.windows(sk_bytes.len()).any(|w| w == sk_bytes),
        "key stored in clear"
    );
    let extra = s.key("private", "default");
    assert_eq!(
        s.req("GET", "/v1/agents", Some(&extra), None).await.status,
        200
    );
    let list = std::process::Command::new(common::cattery_bin())
        .args(["keys", "list", "--data-dir"])
        .arg(s.data_dir())
        .output()
        .unwrap();
    let listing = String::from_utf8(list.stdout).unwrap();
    let id = listing
        .lines()
        .find(|l| {
            extra.starts_with(l.split('\t').nth(3).unwrap().trim_end_matches("..."))
                && l.contains("private")
        })
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_string();
    let st = std::process::Command::new(common::cattery_bin())
        .args(["keys", "revoke", &id, "--data-dir"])
        .arg(s.data_dir())
        .status()
        .unwrap();
    assert!(st.success());
    assert_error_body(
        &s.req("GET", "/v1/agents", Some(&extra), None).await,
        401,
        "401",
    );
    // Revoking it again has nothing to do: said, and a failure, as for an unknown id.
    let again = std::process::Command::new(common::cattery_bin())
        .args(["keys", "revoke", &id, "--data-dir"])
        .arg(s.data_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{err}");
    assert!(
        err.contains(&format!("key {id} is already revoked")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_crud_validation_and_org_scoping() {
    let s = Server::start(&[]).await;
    let a = s
        .deploy(
            "crud-agent",
            &[],
            json!({"autoScaling": {"minAgents": 0, "maxAgents": 3}}),
        )
        .await;
    for k in [
        "name",
        "ready",
        "available",
        "desiredDeploymentId",
        "activeDeploymentId",
        "reconciledDeploymentId",
        "autoScaling",
        "deployment",
        "createdAt",
        "updatedAt",
    ] {
        assert!(a.get(k).is_some(), "missing {k} in {a}");
    }
    assert_eq!(
        a["autoScaling"],
        json!({"minReplicas": 0, "maxReplicas": 3})
    );
    assert_eq!(
        a["ready"], true,
        "valid command, minAgents 0: ready while scaled to zero"
    );
    assert_eq!(a["maxSessionDuration"], 7200);
    let dep1 = a["desiredDeploymentId"].as_str().unwrap().to_string();

    // List: {"services": [...]} with the six keys the CLI indexes.
    let l = s.req("GET", "/v1/agents", Some(&s.sk), None).await;
    let item = &l.body["services"][0];
    for k in [
        "name",
        "region",
        "id",
        "activeDeploymentId",
        "createdAt",
        "updatedAt",
    ] {
        assert!(item.get(k).is_some(), "list item lacks {k}");
    }

    // Scaling-only update keeps the deployment; maxSessionDuration makes a new one.
    let u = s
        .req(
            "POST",
            "/v1/agents/crud-agent",
            Some(&s.sk),
            Some(json!({"autoScaling": {"maxAgents": 4}})),
        )
        .await;
    assert_eq!(u.status, 200);
    assert_eq!(u.body["desiredDeploymentId"], dep1.as_str());
    assert_eq!(u.body["autoScaling"]["maxReplicas"], 4);
    let u = s
        .req(
            "POST",
            "/v1/agents/crud-agent",
            Some(&s.sk),
            Some(json!({"maxSessionDuration": 300})),
        )
        .await;
    assert_eq!(u.status, 200);
    assert_ne!(u.body["desiredDeploymentId"], dep1.as_str());
    assert_eq!(u.body["maxSessionDuration"], 300);
    assert_eq!(
        u.body["autoScaling"]["maxReplicas"], 4,
        "absent fields keep their value"
    );

    refuses_invalid_agents(&s).await;
    // Another org sees nothing of ours.
    let other = s.key("private", "other-org");
    assert_eq!(
        s.req("GET", "/v1/agents/crud-agent", Some(&other), None)
            .await
            .status,
        404
    );
    let l = s.req("GET", "/v1/agents", Some(&other), None).await;
    assert_eq!(l.body["services"], json!([]));

    // Delete: non-empty body; then 404 everywhere; start 404.
    let d = s
        .req("DELETE", "/v1/agents/crud-agent", Some(&s.sk), None)
        .await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body, json!({"status": "OK"}));
    assert_error_body(
        &s.req("GET", "/v1/agents/crud-agent", Some(&s.sk), None)
            .await,
        404,
        "NOT_FOUND",
    );
    assert_error_body(
        &s.req("DELETE", "/v1/agents/crud-agent", Some(&s.sk), None)
            .await,
        404,
        "NOT_FOUND",
    );
    assert_error_body(&s.start_session("crud-agent", json!({})).await, 404, "404");
    assert_error_body(
        &s.start_session("never-existed", json!({})).await,
        404,
        "404",
    );
}

/// Invalid agents get 4xx with {error, code}, never 5xx.
async fn refuses_invalid_agents(s: &Server) {
    // Validation: 4xx with {error, code}, never 5xx.
    let bad: Vec<Value> = vec![
        json!({"serviceName": "A", "command": ["/bin/true"]}),
        json!({"serviceName": "a", "command": ["/bin/true"]}),
        json!({"serviceName": "x".repeat(55), "command": ["/bin/true"]}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "maxSessionDuration": 59}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "maxSessionDuration": 14401}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "autoScaling": {"minAgents": 3, "maxAgents": 2}}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "autoScaling": {"maxAgents": 0}}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "autoScaling": {"minAgents": -1}}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "agentProfile": "agent-9x"}),
        json!({"serviceName": "ok-name", "command": "not-an-array"}),
        json!({"serviceName": 7, "command": ["/bin/true"]}),
        json!({"serviceName": "ok-name"}),
        json!({"command": ["/bin/true"]}),
        json!({"serviceName": "crud-agent", "command": ["/bin/true"]}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "maxSessionDuration": "long"}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "stopGraceSeconds": -1}),
        json!([1, 2, 3]),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "env": {"PORT": "1"}}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "env": {"CATTERY_INSTANCE_ID": "x"}}),
        json!({"serviceName": "ok-name", "command": ["/bin/true"], "env": {"1BAD": "x"}}),
    ];
    for b in bad {
        let r = s
            .req("POST", "/v1/agents", Some(&s.sk), Some(b.clone()))
            .await;
        assert_eq!(r.status, 400, "{b} -> {:?}", r.body);
        assert!(
            r.body["error"].is_string() && r.body["code"].is_string(),
            "{b} -> {:?}",
            r.body
        );
    }
    let r = s
        .raw("POST", "/v1/agents", Some(&s.sk), b"{not json".to_vec())
        .await;
    assert_error_body(&r, 400, "GENERIC_BAD_REQUEST");
    let r = s
        .raw("POST", "/v1/agents/crud-agent", Some(&s.sk), b"[".to_vec())
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_command_is_not_ready_and_start_fails_fast() {
    let s = Server::start(&[]).await;
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(json!({"serviceName": "ghost", "command": ["/no/such/program"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["ready"], false);
    assert!(!r.body["errors"].as_array().unwrap().is_empty());
    let t0 = std::time::Instant::now();
    assert_error_body(&s.start_session("ghost", json!({})).await, 400, "PCC-1001");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_list_get_stop_the_seed_contract() {
    let s = Server::start(&[]).await;
    s.deploy("seed", &["--spawn-child"], json!({})).await;
    let r = s
        .start_session("seed", json!({"body": {"hello": "world"}}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    assert_eq!(r.body["coldStart"], true);

    // The instance is a process tree: the agent and its setsid grandchild.
    let pids = common::wait_for(Duration::from_secs(5), "agent + grandchild", || async {
        let p = s.agent_pids();
        (p.len() >= 2).then_some(p)
    })
    .await;

    let g = s.session("seed", &sid).await;
    for k in SESSION_KEYS {
        assert!(g.get(*k).is_some(), "session lacks {k}: {g}");
    }
    assert_eq!(g["sessionId"], sid.as_str());
    assert!(g["endedAt"].is_null());
    assert!(g["botStartSeconds"].as_f64().unwrap() >= 0.0);
    let l = s
        .req("GET", "/v1/agents/seed/sessions", Some(&s.sk), None)
        .await;
    assert_eq!(l.status, 200);
    assert_eq!(l.body["total_count"], 1);
    for k in SESSION_KEYS {
        assert!(
            l.body["sessions"][0].get(*k).is_some(),
            "list item lacks {k}"
        );
    }
    let active = s
        .req(
            "GET",
            "/v1/agents/seed/sessions?status=active",
            Some(&s.sk),
            None,
        )
        .await;
    assert_eq!(active.body["total_count"], 1);

    // Stop: exact body, and only after the whole tree is gone.
    let st = s.stop("seed", &sid).await;
    assert_eq!(st.status, 200);
    assert_eq!(st.body, json!({"status": "terminated", "session_id": sid}));
    for p in &pids {
        assert!(!pid_alive(*p), "pid {p} survived the stop");
    }
    assert!(s.agent_pids().is_empty());
    let g = s.session("seed", &sid).await;
    assert_eq!(g["endReason"], "stopped");
    assert!(!g["endedAt"].is_null());
    let ended_at = g["endedAt"].clone();

    // Second stop: same 200, record unchanged.
    let st2 = s.stop("seed", &sid).await;
    assert_eq!(st2.status, 200);
    assert_eq!(st2.body, json!({"status": "terminated", "session_id": sid}));
    let g2 = s.session("seed", &sid).await;
    assert_eq!(g2["endedAt"], ended_at);
    assert_eq!(g2["endReason"], "stopped");

    // 400 / 404 cases.
    assert_error_body(&s.stop("seed", "not-a-uuid").await, 400, "400");
    assert_error_body(
        &s.stop("seed", &uuid::Uuid::new_v4().to_string()).await,
        404,
        "404",
    );
    s.deploy("seed-two", &[], json!({})).await;
    assert_error_body(&s.stop("seed-two", &sid).await, 404, "404");
    assert_error_body(&s.stop("nobody", &sid).await, 404, "404");
    let other = s.key("private", "another");
    assert_eq!(
        s.req(
            "DELETE",
            &format!("/v1/agents/seed/sessions/{sid}"),
            Some(&other),
            None
        )
        .await
        .status,
        404
    );
    assert_eq!(
        s.req(
            "GET",
            &format!("/v1/agents/seed/sessions/{sid}"),
            Some(&other),
            None
        )
        .await
        .status,
        404
    );
    assert_error_body(
        &s.req(
            "GET",
            "/v1/agents/seed/sessions?limit=abc",
            Some(&s.sk),
            None,
        )
        .await,
        400,
        "400",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_that_end_on_their_own() {
    let s = Server::start(&[]).await;
    s.deploy("natural", &["--bot-seconds", "0.5"], json!({}))
        .await;
    s.deploy(
        "exit3",
        &["--exit-after", "0.5", "--exit-code", "3"],
        json!({}),
    )
    .await;
    s.deploy(
        "exit0",
        &["--exit-after", "0.5", "--exit-code", "0"],
        json!({}),
    )
    .await;
    let a = s.start_ok("natural").await;
    let b = s.start_ok("exit3").await;
    let c = s.start_ok("exit0").await;
    let ga = s.wait_ended("natural", &a, Duration::from_secs(20)).await;
    assert_eq!(ga["completionStatus"], "HTTP_COMPLETED");
    assert_eq!(ga["endReason"], "completed");
    let gb = s.wait_ended("exit3", &b, Duration::from_secs(20)).await;
    assert_eq!(gb["endReason"], "error");
    assert_eq!(gb["completionStatus"], "HTTP_ERROR");
    assert_eq!(gb["exitCode"], 3);
    let gc = s.wait_ended("exit0", &c, Duration::from_secs(20)).await;
    assert_eq!(gc["endReason"], "completed");
    assert_eq!(gc["exitCode"], 0);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    // An ended session's DELETE: 200, reason unchanged.
    assert_eq!(s.stop("exit3", &b).await.status, 200);
    assert_eq!(s.session("exit3", &b).await["endReason"], "error");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_errors_400_413_429() {
    let s = Server::start(&[]).await;
    s.deploy("cap", &[], json!({"autoScaling": {"maxAgents": 1}}))
        .await;
    let a = s.start_ok("cap").await;
    let r = s.start_session("cap", json!({})).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.body["status"], 429);
    assert_eq!(r.body["code"], "429");
    assert!(r.body["message"].is_string() && r.body["error"].is_string());

    let big = "x".repeat(1024 * 1024 + 10);
    let r = s.start_session("cap", json!({"body": {"blob": big}})).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert!(r.body["error"].is_string());
    // A request far over the limit: 413, or the server closes the connection after answering
    // 413 before the client finished sending (both are fine HTTP behaviour).
    let huge = vec![b'x'; 3 * 1024 * 1024];
    // Its own client: the server may close this connection, which must not poison the
    // shared pool used by the requests below.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/public/cap/start", s.base))
        .bearer_auth(&s.pk)
        .body(huge)
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }

    let r = s
        .start_session("cap", json!({"createDailyRoom": true}))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("Daily"));
    let r = s
        .start_session("cap", json!({"transport": "carrier-pigeon"}))
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .raw(
            "POST",
            "/v1/public/cap/start",
            Some(&s.pk),
            b"{\"body\":".to_vec(),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .start_session("cap", json!({"createDailyRoom": "yes"}))
        .await;
    assert_eq!(r.status, 400);

    assert_eq!(s.stop("cap", &a).await.status, 200);
    // The slot is free again.
    let b = s.start_ok("cap").await;
    assert_eq!(s.stop("cap", &b).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_agents_keys_and_sessions() {
    let mut s = Server::start(&[]).await;
    s.deploy(
        "durable",
        &["--bot-seconds", "0.2"],
        json!({"maxSessionDuration": 120}),
    )
    .await;
    let sid = s.start_ok("durable").await;
    s.wait_ended("durable", &sid, Duration::from_secs(20)).await;
    let before = s.session("durable", &sid).await;
    assert!(s.terminate(Duration::from_secs(20)).unwrap().success());
    s.spawn().await;
    let a = s.agent("durable").await;
    assert_eq!(a["name"], "durable");
    assert_eq!(a["maxSessionDuration"], 120);
    let after = s.session("durable", &sid).await;
    assert_eq!(before["endedAt"], after["endedAt"]);
    assert_eq!(after["endReason"], "completed");
    // Keys still work, the agent still starts sessions.
    let sid2 = s.start_ok("durable").await;
    s.wait_ended("durable", &sid2, Duration::from_secs(20))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_and_unknown_routes() {
    let s = Server::start(&[]).await;
    let r = s.req("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(r.status, 200);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = r.body["paths"].as_object().unwrap();
    for p in [
        "/v1/agents",
        "/v1/agents/{agent_name}",
        "/v1/agents/{agent_name}/sessions",
        "/v1/agents/{agent_name}/sessions/{session_id}",
        "/v1/public/{agent_name}/start",
        "/v1/public/{agent_name}/sessions/{session_id}/{path}",
        "/ws/generic/{service}",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    assert!(paths["/v1/agents/{agent_name}/sessions/{session_id}"]
        .get("delete")
        .is_some());
    assert_error_body(
        &s.req("GET", "/v1/nothing-here", Some(&s.sk), None).await,
        404,
        "404",
    );
    let r = s.req("PATCH", "/v1/agents", Some(&s.sk), None).await;
    assert_eq!(r.status, 405);
    assert!(r.body["error"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn relative_data_dir_one_server_per_data_dir_and_keys_need_a_real_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut first = std::process::Command::new(common::cattery_bin())
        .args([
            "serve",
            "--data-dir",
            "./rel",
            "--listen",
            &format!("localhost:{port}"),
        ])
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    common::wait_for(Duration::from_secs(30), "server", || async {
        http.get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let data = tmp.path().join("rel");
    let key = |kind: &str| {
        let out = std::process::Command::new(common::cattery_bin())
            .args(["keys", "create", "--type", kind, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (sk, pk) = (key("private"), key("public"));
    a_key_made_with_the_config_file_works(tmp.path(), &data, port).await;
    let agent = common::test_agent().display().to_string();
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/agents"))
        .bearer_auth(&sk)
        .json(&json!({"serviceName": "rel", "command": [agent, "--print-env", "TMPDIR"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/public/rel/start"))
        .bearer_auth(&pk)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a relative --data-dir must still start instances"
    );
    let sid = r.json::<Value>().await.unwrap()["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let line = common::wait_for(Duration::from_secs(10), "env line in the logs", || async {
        let l: Value = http
            .get(format!(
                "http://127.0.0.1:{port}/v1/agents/rel/logs?sessionId={sid}&query=TMPDIR"
            ))
            .bearer_auth(&sk)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        l["logs"][0]["log"].as_str().map(str::to_string)
    })
    .await;
    let tmpdir = line.split("TMPDIR=").nth(1).unwrap().trim();
    assert!(tmpdir.starts_with('/'), "TMPDIR must be absolute: {line}");

    // A second server on the same data dir is refused, and the first keeps its instances.
    let out = std::process::Command::new(common::cattery_bin())
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another cattery serve"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g: Value = http
        .get(format!(
            "http://127.0.0.1:{port}/v1/agents/rel/sessions/{sid}"
        ))
        .bearer_auth(&sk)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        g["endedAt"].is_null(),
        "the first server's session must survive: {g}"
    );

    // keys commands never create a data dir.
    let missing = tmp.path().join("typo");
    let out = std::process::Command::new(common::cattery_bin())
        .args(["keys", "create", "--type", "private", "--data-dir"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!missing.exists());

    // Two SIGTERMs (apart, so they are not merged): stop every session now and exit.
    common::unsafe_kill(first.id() as i32, 15);
    std::thread::sleep(Duration::from_millis(200));
    common::unsafe_kill(first.id() as i32, 15);
    let _ = first.wait();
}

/// The keys commands also read the server's config file (its data dir), as `serve` does: a
/// key made with `--config` (a file naming `data`) works against the server on `port`.
async fn a_key_made_with_the_config_file_works(
    dir: &std::path::Path,
    data: &std::path::Path,
    port: u16,
) {
    let http = reqwest::Client::new();
    let cfg = dir.join("cattery.toml");
    std::fs::write(
        &cfg,
        format!("[server]\ndata_dir = {:?}\n", data.display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new(common::cattery_bin())
        .args([
            "keys",
            "create",
            "--type",
            "private",
            "--name",
            "by-config",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_config = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let r = http
        .get(format!("http://127.0.0.1:{port}/v1/agents"))
        .bearer_auth(&by_config)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a key made with --config must work");
}

#[tokio::test(flavor = "multi_thread")]
async fn edge_inputs_get_clear_4xx() {
    let s = Server::start(&[]).await;
    // Unknown fields are ignored and named in `warning`.
    let a = s
        .deploy(
            "typos",
            &[],
            json!({"autoscaling": {"minAgents": 2}, "maxSessionDurationx": 5}),
        )
        .await;
    let w = a["warning"].as_str().unwrap_or("");
    assert!(
        w.contains("autoscaling") && w.contains("maxSessionDurationx"),
        "warning: {w}"
    );
    // A top-level array is not an object.
    let r = s
        .raw(
            "POST",
            "/v1/public/typos/start",
            Some(&s.pk),
            b"[1]".to_vec(),
        )
        .await;
    assert_error_body(&r, 400, "GENERIC_BAD_REQUEST");
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("expected a JSON object"),
        "{:?}",
        r.body
    );
    // Text that is not JSON at all is named so (not "expected an object").
    let r = s
        .raw(
            "PUT",
            "/v1/secrets/not-json",
            Some(&s.sk),
            b"not json".to_vec(),
        )
        .await;
    assert_error_body(&r, 400, "GENERIC_BAD_REQUEST");
    let e = r.body["error"].as_str().unwrap();
    assert!(
        e.starts_with("invalid JSON body: expected ident") && !e.contains("object"),
        "{e}"
    );
    // Reserved instance paths are not proxied.
    let sid = s.start_ok("typos").await;
    for p in ["bot", "ws", "bot/extra"] {
        let r = s
            .req(
                "POST",
                &format!("/v1/public/typos/sessions/{sid}/{p}"),
                Some(&s.pk),
                Some(json!({})),
            )
            .await;
        assert_error_body(&r, 404, "404");
    }
    assert_eq!(s.stop("typos", &sid).await.status, 200);
    // A plain request to the websocket endpoint gets a JSON error.
    let r = s.req("GET", "/ws/generic/typos.default", None, None).await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"].is_string());
    // Stopping an announced websocket session before its client connects revokes its token.
    let r = s
        .start_session("typos", json!({"transport": "websocket"}))
        .await;
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let st = s.stop("typos", &sid).await;
    assert_eq!(st.status, 200);
    assert_eq!(st.body["status"], "terminated");
    let url = format!(
        "{}?token={}",
        r.body["wsUrl"].as_str().unwrap(),
        r.body["token"].as_str().unwrap()
    );
    assert!(tokio_tungstenite::connect_async(url.as_str())
        .await
        .is_err());
}

/// A path segment that is not valid UTF-8 once percent-decoded gets the same `{error, code}`
/// 400 as every other bad input, on every kind of route (axum's own answer is `text/plain`).
#[tokio::test(flavor = "multi_thread")]
async fn bad_percent_encoding_in_paths_is_a_json_400() {
    let s = Server::start(&[]).await;
    s.deploy("pct", &[], json!({})).await;
    let sid = "00000000-0000-0000-0000-000000000000";
    let cases: Vec<(&str, String, &str)> = vec![
        ("GET", "/v1/agents/%FF".into(), s.sk.as_str()),
        ("GET", "/v1/agents/%FF/sessions".into(), s.sk.as_str()),
        (
            "DELETE",
            "/v1/agents/pct/sessions/%FF".into(),
            s.sk.as_str(),
        ),
        ("GET", "/v1/secrets/%FF".into(), s.sk.as_str()),
        ("POST", "/v1/public/%FF/start".into(), s.pk.as_str()),
        (
            "GET",
            format!("/v1/public/pct/sessions/{sid}/%FF"),
            s.pk.as_str(),
        ),
    ];
    for (m, path, key) in cases {
        let r = s.raw(m, &path, Some(key), b"{}".to_vec()).await;
        assert_eq!(r.status, 400, "{m} {path}: {:?}", r.body);
        assert!(
            r.content_type.starts_with("application/json"),
            "{m} {path}: {}",
            r.content_type
        );
        assert!(
            r.body["error"].is_string() && r.body["code"].is_string(),
            "{m} {path}: {:?}",
            r.body
        );
    }
}

/// Agent specs that would fail later are refused or flagged at once: a relative `local:`
/// directory is a 400; `image` next to `command` is accepted with a warning (the command runs).
#[tokio::test(flavor = "multi_thread")]
async fn relative_local_dirs_are_refused_and_ignored_images_are_flagged() {
    let s = Server::start(&[]).await;
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(json!({"serviceName": "rel", "image": "local:bots/mine"})),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("absolute"),
        "{:?}",
        r.body
    );
    let a = s
        .deploy("both", &[], json!({"image": "local:/nowhere"}))
        .await;
    assert!(
        a["warning"]
            .as_str()
            .is_some_and(|w| w.contains("image ignored")),
        "{a}"
    );
}

/// What exec would refuse at every start is refused at create and update, as a 400 naming
/// the field (issue 16 item 5): a relative program path without `workingDir`, a NUL byte in
/// an argument or an `env` value or name, an argument or variable over the kernel's
/// per-string limit, arguments plus `env` over `ARG_MAX`, and `..` in `workingDir`,
/// `command` or `local:` paths. Accepted absolute paths are made canonical.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_refuses_what_exec_would_refuse() {
    let s = Server::start(&[]).await;
    let big = "x".repeat(200_000);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"command": ["bin/bot"]}), "command[0]"),
        (json!({"command": ["./bot", "a"]}), "command[0]"),
        (json!({"command": ["/bin/../bin/true"]}), "command[0]"),
        (
            json!({"command": ["../bot"], "workingDir": "/srv"}),
            "command[0]",
        ),
        (json!({"command": ["/bin/true", "a\u{0}b"]}), "command[1]"),
        (json!({"command": ["/bin/true", big]}), "command[1]"),
        (
            json!({"command": ["/bin/true"], "env": {"K": "a\u{0}b"}}),
            "env.K",
        ),
        (
            json!({"command": ["/bin/true"], "env": {"K\u{0}": "v"}}),
            "env",
        ),
        (
            json!({"command": ["/bin/true"], "env": {"K": big}}),
            "env.K",
        ),
        (
            json!({"command": ["/bin/true"], "workingDir": "/tmp/../etc"}),
            "workingDir",
        ),
        (
            json!({"command": ["/bin/true"], "workingDir": "tmp"}),
            "workingDir",
        ),
        (json!({"image": "local:/tmp/../etc"}), "image"),
    ];
    for (body, field) in &cases {
        let mut b = body.clone();
        b["serviceName"] = json!("refused");
        let r = s.req("POST", "/v1/agents", Some(&s.sk), Some(b)).await;
        assert_error_body(&r, 400, "GENERIC_BAD_REQUEST");
        let msg = r.body["error"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: {msg}");
    }
    // Arguments plus environment over ARG_MAX (empty arguments cost 1 byte and a pointer
    // each), when the request can carry that many.
    // SAFETY: sysconf has no preconditions.
    let arg_max = unsafe { libc::sysconf(libc::_SC_ARG_MAX) } as usize;
    let n = arg_max / (1 + std::mem::size_of::<usize>()) + 1;
    if n * 3 < 1024 * 1024 {
        let mut cmd = vec![String::new(); n];
        cmd[0] = "/bin/true".into();
        let r = s
            .req(
                "POST",
                "/v1/agents",
                Some(&s.sk),
                Some(json!({"serviceName": "refused", "command": cmd})),
            )
            .await;
        assert_error_body(&r, 400, "GENERIC_BAD_REQUEST");
        assert!(
            r.body["error"].as_str().unwrap().contains("ARG_MAX"),
            "{:?}",
            r.body
        );
    }
    assert_eq!(
        s.req("GET", "/v1/agents/refused", Some(&s.sk), None)
            .await
            .status,
        404
    );

    // Update: the same refusals; the agent keeps its deployment.
    let a = s.deploy("kept", &[], json!({})).await;
    for (body, field) in &cases {
        let r = s
            .req("POST", "/v1/agents/kept", Some(&s.sk), Some(body.clone()))
            .await;
        assert_error_body(&r, 400, "GENERIC_BAD_REQUEST");
        assert!(
            r.body["error"].as_str().unwrap().contains(field),
            "{body}: {:?}",
            r.body
        );
    }
    let now = s.agent("kept").await;
    assert_eq!(now["deployment"]["id"], a["deployment"]["id"]);

    // Canonical paths; a path relative to workingDir still works.
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(
                json!({"serviceName": "canon", "command": ["/usr//bin/./env", "a//b"],
                        "workingDir": "/tmp//"}),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["command"], json!(["/usr/bin/env", "a//b"]));
    assert_eq!(r.body["workingDir"], "/tmp");
    let r = s
        .req(
            "POST",
            "/v1/agents/canon",
            Some(&s.sk),
            Some(json!({"command": null, "image": "local:/srv//bot/"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["image"], "local:/srv/bot");
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(json!({"serviceName": "relwd", "command": ["./true"], "workingDir": "/bin"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["errors"], json!([]), "{:?}", r.body);
}
