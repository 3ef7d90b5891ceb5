//! Cattery itself in a container (`deploy/docker/Dockerfile`, `scripts/cattery-image.sh`): the
//! image starts, answers `/health` and the API, and runs an agent through the host's Docker
//! engine (its socket mounted). The image is `$CATTERY_TEST_SELF_IMAGE` (CI builds it from the
//! debug binary), else built here from the binary under test. Without an engine or the base
//! image the test says so and passes, unless `CATTERY_REQUIRE_DOCKER` is set.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{cattery_bin, free_port, wait_for};

const AGENT_IMAGE: &str = "cattery-test/agent:latest";
const ROOTFS_IMAGE: &str = "cattery-test/rootfs:bookworm";

fn docker(args: &[&str]) -> Option<String> {
    let out = Command::new("/usr/bin/docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The image to run, or `None` (skipped) when it cannot be had here.
fn self_image() -> Option<String> {
    let required = std::env::var_os("CATTERY_REQUIRE_DOCKER").is_some();
    let skip = |why: String| {
        assert!(!required, "CATTERY_REQUIRE_DOCKER is set, but {why}");
        eprintln!("SKIPPED: {why}");
        None
    };
    if docker(&["info", "--format", "{{.ServerVersion}}"]).is_none() {
        return skip("no Docker engine answers".into());
    }
    if docker(&["image", "inspect", "--format", "{{.Id}}", AGENT_IMAGE]).is_none() {
        return skip(format!(
            "image {AGENT_IMAGE} is missing (scripts/docker-images.sh)"
        ));
    }
    if let Some(img) = std::env::var("CATTERY_TEST_SELF_IMAGE")
        .ok()
        .filter(|s| !s.is_empty())
    {
        assert!(
            docker(&["image", "inspect", "--format", "{{.Id}}", &img]).is_some(),
            "CATTERY_TEST_SELF_IMAGE={img} does not exist"
        );
        return Some(img);
    }
    if docker(&["image", "inspect", "--format", "{{.Id}}", ROOTFS_IMAGE]).is_none() {
        return skip(format!(
            "image {ROOTFS_IMAGE} is missing (scripts/docker-images.sh rootfs)"
        ));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cattery-image.sh");
    let out = Command::new(script)
        .args([
            "--bin",
            cattery_bin().to_str().unwrap(),
            "--tag",
            "cattery-test/self:latest",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some("cattery-test/self:latest".into())
}

/// Removes the Cattery container and any agent container of its server on drop.
struct Running {
    id: String,
    data: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.id]);
        if let Ok(sid) = std::fs::read_to_string(self.data.path().join("server-id")) {
            let f = format!("label=org.cattery.server={}", sid.trim());
            for c in docker(&["ps", "-aq", "--filter", &f])
                .unwrap_or_default()
                .split_whitespace()
            {
                let _ = docker(&["rm", "-f", c]);
            }
        }
    }
}

#[tokio::test]
async fn cattery_image_serves_and_runs_agents_through_the_host_engine() {
    let Some(image) = self_image() else { return };
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mount = format!("{}:/var/lib/cattery", data.path().display());
    let listen = format!("127.0.0.1:{port}");
    let id = docker(&[
        "run",
        "-d",
        "--init",
        "--network",
        "host",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-v",
        &mount,
        &image,
        "serve",
        "--listen",
        &listen,
    ])
    .expect("docker run the cattery image");
    let c = Running { id, data };
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    wait_for(
        Duration::from_secs(60),
        "the container's /health",
        || async {
            let r = http.get(format!("{base}/health")).send().await.ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    let sk = docker(&[
        "exec", &c.id, "cattery", "keys", "create", "--type", "private",
    ])
    .expect("keys create in the container");
    let pk = docker(&[
        "exec", &c.id, "cattery", "keys", "create", "--type", "public",
    ])
    .unwrap();
    let api = |m: reqwest::Method, path: &str, key: &str, body: Option<Value>| {
        let mut rb = http.request(m, format!("{base}{path}")).bearer_auth(key);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        async move {
            let r = rb.send().await.unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (st, _) = api(reqwest::Method::GET, "/v1/agents", &sk, None).await;
    assert_eq!(st, 200);
    // The Docker runtime reaches the host's engine: an image agent deploys, starts and stops.
    let (st, body) = api(
        reqwest::Method::POST,
        "/v1/agents",
        &sk,
        Some(json!({"serviceName": "boxed", "image": AGENT_IMAGE,
                    "autoScaling": {"minAgents": 0, "maxAgents": 1}})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = api(
        reqwest::Method::POST,
        "/v1/public/boxed/start",
        &pk,
        Some(json!({})),
    )
    .await;
    let logs = || docker(&["logs", &c.id]).unwrap_or_default();
    assert_eq!(st, 200, "{body}\n{}", logs());
    let sid = body["sessionId"].as_str().unwrap().to_string();
    let (st, body) = api(
        reqwest::Method::DELETE,
        &format!("/v1/agents/boxed/sessions/{sid}"),
        &sk,
        None,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // A clean stop: SIGTERM drains and exits 0.
    docker(&["stop", "-t", "30", &c.id]).unwrap();
    let code = docker(&["inspect", "--format", "{{.State.ExitCode}}", &c.id]).unwrap();
    assert_eq!(code, "0", "{}", logs());
    // Its log is JSON (the image sets --log-format json).
    let all = Command::new("/usr/bin/docker")
        .args(["logs", &c.id])
        .output()
        .unwrap();
    assert!(
        all.stdout.is_empty(),
        "with JSON logs nothing else is written: {}",
        String::from_utf8_lossy(&all.stdout)
    );
    let err = String::from_utf8_lossy(&all.stderr);
    assert!(err.lines().count() > 0);
    for line in err.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}
