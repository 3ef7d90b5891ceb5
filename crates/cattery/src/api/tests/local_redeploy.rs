//! A `local:` bot's directory is its code: a deploy of an edited directory makes a new
//! deployment, a deploy of an unchanged one keeps the current deployment (`nothing changed`).

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use super::{api, Answer, Api};

/// `activeDeploymentId` and `warning` of an answer that must be 200.
fn deployment_of(r: &Answer) -> (String, Option<String>) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let id = r.body["activeDeploymentId"].as_str().unwrap().to_string();
    (id, r.body["warning"].as_str().map(str::to_string))
}

/// What `pipecat cloud deploy <name> local:<dir>` sends for an existing agent.
async fn cli_deploy(a: &Api, body: &Value) -> Answer {
    let uri = "/v1/organizations/default/services";
    a.call(Method::PUT, uri, Some(&a.sk), Some(body.clone()))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_local_bot_is_a_new_deployment_and_an_unchanged_one_is_not() {
    let a = api().await;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("broken");
    std::fs::create_dir_all(dir.join(".venv/bin")).unwrap();
    std::fs::write(dir.join("bot.py"), "async def bot(args): pass\n").unwrap();
    let body = json!({
        "serviceName": "broken",
        "image": format!("local:{}", dir.display()),
        "autoScaling": {"minAgents": 1, "maxAgents": 5},
    });
    let created = a
        .call(Method::POST, "/v1/agents", Some(&a.sk), Some(body.clone()))
        .await;
    let (first, _) = deployment_of(&created);

    // Unchanged: the deployment is kept, and the answer says so.
    let (id, warning) = deployment_of(&cli_deploy(&a, &body).await);
    assert_eq!(id, first);
    assert!(warning.unwrap_or_default().contains("nothing changed"));
    // A new environment or cache in the directory is no new code.
    std::fs::write(dir.join(".venv/bin/python"), "").unwrap();
    std::fs::create_dir_all(dir.join("__pycache__")).unwrap();
    std::fs::write(dir.join("__pycache__/bot.cpython-311.pyc"), "x").unwrap();
    assert_eq!(deployment_of(&cli_deploy(&a, &body).await).0, first);

    // Edited: a new deployment, without forceRedeploy.
    std::fs::write(dir.join("bot.py"), "async def bot(args): print('new')\n").unwrap();
    let (second, warning) = deployment_of(&cli_deploy(&a, &body).await);
    assert_ne!(second, first, "the edit made a new deployment");
    assert_eq!(warning, None);
    // And it is kept by the next deploy of the same directory.
    assert_eq!(deployment_of(&cli_deploy(&a, &body).await).0, second);

    // A new file counts too, through the documented update path as well.
    std::fs::write(dir.join("helpers.py"), "X = 1\n").unwrap();
    let update = json!({"image": format!("local:{}", dir.display())});
    let r = a
        .call(Method::POST, "/v1/agents/broken", Some(&a.sk), Some(update))
        .await;
    let (third, _) = deployment_of(&r);
    assert_ne!(third, second);

    // A change of scaling alone keeps the deployment (and does not read the directory).
    std::fs::write(dir.join("helpers.py"), "X = 22\n").unwrap();
    let scale = json!({"autoScaling": {"minAgents": 0, "maxAgents": 5}});
    let r = a
        .call(Method::POST, "/v1/agents/broken", Some(&a.sk), Some(scale))
        .await;
    assert_eq!(deployment_of(&r).0, third);
    // The next deploy naming the directory sees the edit.
    assert_ne!(deployment_of(&cli_deploy(&a, &body).await).0, third);

    let deps = a.get("/v1/agents/broken/deployments").await;
    assert_eq!(deps.status, StatusCode::OK, "{}", deps.body);
    // The fingerprint is the server's own: no deployment on the wire carries it.
    assert!(
        !deps.body.to_string().contains("ingerprint"),
        "{}",
        deps.body
    );
}
