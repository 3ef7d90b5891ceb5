//! The builds API in process (`api::builds`, `core::builds`): upload URLs and their
//! single-use tokens, the size cap, create, the cache by `contextHash`, status, list filters
//! and logs. The build here fails fast (its context has no `bot.py`), so no Python runs; the
//! successful path is the end-to-end test `builds::official_cli_deploys_without_an_image`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use md5::Digest as _;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{api_with, assert_error, Api};

/// A gzipped tar of `files`.
fn context(files: &[(&str, &str)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (name, text) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Posts `bytes` to `url` as the CLI does: a multipart form with the upload fields, then
/// `file`.
async fn post_upload(a: &Api, url: &str, fields: &Value, bytes: &[u8]) -> (StatusCode, Value) {
    let boundary = "cattery-test-boundary";
    let mut body = Vec::new();
    for (k, v) in fields.as_object().unwrap() {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{}\r\n",
                v.as_str().unwrap()
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"context.tar.gz\"\r\nContent-Type: application/gzip\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let path = url.split_once("://").unwrap().1;
    let path = &path[path.find('/').unwrap()..];
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", "cattery.test:7870")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// An upload form's `token` field is read before any token is checked, on a route without a
/// body limit: one longer than a token can be is refused (400) as it arrives, never held
/// whole (a 300 MB field once took 650 MB of the server's memory, with no key at all).
#[tokio::test]
async fn an_upload_forms_token_field_is_bounded() {
    let a = api_with(|_| {}).await;
    let u = upload_url(&a).await;
    let url = u["uploadUrl"].as_str().unwrap();
    let long = "a".repeat(64 * 1024);
    let (st, body) = post_upload(&a, url, &json!({"token": long}), b"x").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("token field is longer"),
        "{body}"
    );
    // The right token still works: nothing was spent.
    let ctx = context(&[("README", "x\n")]);
    let (st, body) = post_upload(&a, url, &u["uploadFields"], &ctx).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
}

async fn upload_url(a: &Api) -> Value {
    let r = a
        .call(
            Method::POST,
            "/v1/organizations/default/builds/upload-url",
            Some(&a.sk),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body
}

async fn wait_terminal(a: &Api, id: &str) -> Value {
    for _ in 0..100 {
        let r = a
            .get(&format!("/v1/organizations/default/builds/{id}"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let b = r.body["build"].clone();
        if ["success", "failed", "timeout"].contains(&b["status"].as_str().unwrap()) {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("build {id} did not end");
}

#[tokio::test]
async fn upload_build_status_cache_and_logs() {
    let a = api_with(|c| c.runtime.build_max_context_mb = 1).await;
    let ctx = context(&[
        ("Dockerfile", "FROM dailyco/pipecat-base:latest\n"),
        ("README", "no bot here\n"),
    ]);
    let want_hash = hex::encode(md5::Md5::digest(&ctx))[..16].to_string();

    // An upload URL on this server, with a single-use token in its fields.
    let u = upload_url(&a).await;
    let url = u["uploadUrl"].as_str().unwrap();
    assert!(
        url.ends_with(&format!(
            "/v1/builds/uploads/{}",
            u["uploadId"].as_str().unwrap()
        )),
        "{u}"
    );
    assert!(u["expiresAt"].as_str().unwrap().ends_with('Z'));
    // Creating a build before the upload is a 400.
    let early = a
        .call(
            Method::POST,
            "/v1/builds",
            Some(&a.sk),
            Some(json!({"uploadId": u["uploadId"]})),
        )
        .await;
    assert_error(&early, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    // A wrong token is refused without spending the right one.
    let (st, body) = post_upload(&a, url, &json!({"token": "nope"}), &ctx).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
    let (st, body) = post_upload(&a, url, &u["uploadFields"], &ctx).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    // Single use.
    let (st, _) = post_upload(&a, url, &u["uploadFields"], &ctx).await;
    assert_eq!(st, StatusCode::CONFLICT);

    let r = a
        .call(
            Method::POST,
            "/v1/organizations/default/builds",
            Some(&a.sk),
            Some(json!({"uploadId": u["uploadId"], "dockerfilePath": "Dockerfile"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["cached"], false);
    assert_eq!(r.body["contextHash"], want_hash.as_str());
    let id = r.body["build"]["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["build"]["region"], "local");
    // The upload was taken.
    let again = a
        .call(
            Method::POST,
            "/v1/builds",
            Some(&a.sk),
            Some(json!({"uploadId": u["uploadId"]})),
        )
        .await;
    assert_error(&again, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");

    let b = wait_terminal(&a, &id).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["errorMessage"].as_str().unwrap().contains("no bot.py"),
        "{b}"
    );
    assert_eq!(b["contextHash"], want_hash.as_str());
    assert!(b.get("imageUri").is_none(), "{b}");
    let logs = a
        .get(&format!(
            "/v1/organizations/default/builds/{id}/logs?limit=500"
        ))
        .await;
    assert_eq!(logs.status, StatusCode::OK);
    let text = logs.body["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        text.contains("Unpacked 2 files") && text.contains("Build failed"),
        "{text}"
    );
    let one = a.get(&format!("/v1/builds/{id}/logs?limit=1")).await;
    assert_eq!(one.body["logs"].as_array().unwrap().len(), 1);

    // The CLI's cache lookup finds no successful build; the failed one is listed.
    let hit = a
        .get(&format!(
            "/v1/organizations/default/builds?contextHash={want_hash}&status=success&limit=1"
        ))
        .await;
    assert_eq!(hit.body["builds"], json!([]), "{}", hit.body);
    let all = a.get(&format!("/v1/builds?contextHash={want_hash}")).await;
    assert_eq!(all.body["total"], 1);
    assert_eq!(all.body["builds"][0]["id"], id.as_str());
    assert_error(
        &a.get("/v1/builds?status=sleeping").await,
        StatusCode::BAD_REQUEST,
        "GENERIC_BAD_REQUEST",
    );
}

/// Uploads `ctx` through a new upload URL; returns the upload id.
async fn upload(a: &Api, ctx: &[u8]) -> Value {
    let u = upload_url(a).await;
    let (st, body) =
        post_upload(a, u["uploadUrl"].as_str().unwrap(), &u["uploadFields"], ctx).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    u["uploadId"].clone()
}

/// A `dockerfilePath` outside the context (absolute, with `..`, with a NUL byte) is a 400 at
/// the request: the server never looks at a host path for it, and the upload stays usable.
#[tokio::test]
async fn a_dockerfile_path_outside_the_context_is_refused() {
    let a = api_with(|c| c.runtime.build_max_context_mb = 1).await;
    let ctx = context(&[("Dockerfile", "FROM dailyco/pipecat-base:latest\n")]);
    let up = upload(&a, &ctx).await;
    for bad in [
        "/etc/passwd",
        "../../../etc/passwd",
        "a/../../x",
        "Docker\u{0}file",
    ] {
        let r = a
            .call(
                Method::POST,
                "/v1/builds",
                Some(&a.sk),
                Some(json!({"uploadId": up, "dockerfilePath": bad})),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
        assert!(
            r.body["error"].as_str().unwrap().contains("dockerfilePath"),
            "{bad}: {}",
            r.body
        );
    }
    let r = a
        .call(
            Method::POST,
            "/v1/builds",
            Some(&a.sk),
            Some(json!({"uploadId": up, "dockerfilePath": "./Dockerfile"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

#[tokio::test]
async fn failed_builds_are_rebuilt_and_not_deployable() {
    let a = api_with(|c| c.runtime.build_max_context_mb = 1).await;
    let ctx = context(&[("Dockerfile", "FROM dailyco/pipecat-base:latest\n")]);
    let up = upload(&a, &ctx).await;
    let r = a
        .call(
            Method::POST,
            "/v1/builds",
            Some(&a.sk),
            Some(json!({"uploadId": up})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["build"]["id"].as_str().unwrap().to_string();
    assert_eq!(wait_terminal(&a, &id).await["status"], "failed");

    // The same bytes again: a failed build is not reused.
    let u2 = upload_url(&a).await;
    let (st, _) = post_upload(
        &a,
        u2["uploadUrl"].as_str().unwrap(),
        &u2["uploadFields"],
        &ctx,
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let r2 = a
        .call(
            Method::POST,
            "/v1/builds",
            Some(&a.sk),
            Some(json!({"uploadId": u2["uploadId"]})),
        )
        .await;
    assert_eq!(r2.status, StatusCode::CREATED, "{}", r2.body);
    assert_ne!(r2.body["build"]["id"], id.as_str());
    wait_terminal(&a, r2.body["build"]["id"].as_str().unwrap()).await;

    // A failed build cannot be deployed: Pipecat Cloud's 400.
    let dep = a
        .call(
            Method::POST,
            "/v1/agents",
            Some(&a.sk),
            Some(json!({"serviceName": "from-build", "buildId": id})),
        )
        .await;
    assert_error(&dep, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    assert!(
        dep.body["error"].as_str().unwrap().contains("not ready"),
        "{}",
        dep.body
    );
    let dep = a
        .call(Method::POST, "/v1/agents", Some(&a.sk), Some(json!({"serviceName": "from-build", "buildId": "0b6c8a3e-0000-4000-8000-000000000000"})))
        .await;
    assert!(
        dep.body["error"].as_str().unwrap().contains("not found"),
        "{}",
        dep.body
    );
    let dep = a
        .call(
            Method::POST,
            "/v1/agents",
            Some(&a.sk),
            Some(json!({"serviceName": "from-build", "buildId": id, "image": "x:1"})),
        )
        .await;
    assert!(
        dep.body["error"].as_str().unwrap().contains("not both"),
        "{}",
        dep.body
    );

    // Unknown ids are 404; no key, 401.
    assert_eq!(
        a.get("/v1/builds/not-a-uuid").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.call(Method::GET, "/v1/builds", None, None).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Over the cap (1 MiB here): 413, and the URL is spent.
    let u3 = upload_url(&a).await;
    let big = vec![7u8; 1024 * 1024 + 10];
    let (st, body) = post_upload(
        &a,
        u3["uploadUrl"].as_str().unwrap(),
        &u3["uploadFields"],
        &big,
    )
    .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["code"], "413");
}

/// A successful local build of org `org`, recorded as the builder would leave it (its
/// directory with `bot.py`, its virtualenv's Python); returns its id.
async fn successful_build(a: &Api, org: &str) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    let dir = a.state.builds.dir().join(id.to_string());
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::create_dir_all(dir.join("venv/bin")).unwrap();
    std::fs::write(dir.join("app/bot.py"), "print('hi')\n").unwrap();
    std::fs::write(dir.join("venv/bin/python"), "").unwrap();
    a.state.store.ensure_org(org).await.unwrap();
    let now = crate::model::now_ms();
    let b = crate::store::BuildRecord {
        id,
        org: org.into(),
        status: crate::store::BuildStatus::Success,
        region: "local".into(),
        context_hash: "0123456789abcdef".into(),
        dockerfile_path: "Dockerfile".into(),
        artifact: Some(format!("local:{}", dir.join("app").display())),
        python: Some(dir.join("venv/bin/python").display().to_string()),
        builder: Some("venv".into()),
        error_message: None,
        context_size: 1,
        created_ms: now,
        started_ms: Some(now),
        completed_ms: Some(now),
        updated_ms: now,
        node_id: a.state.node.id.clone(),
    };
    a.state.store.insert_build(&b, None).await.unwrap();
    id
}

/// An org runs only its own builds: a deployment that names another org's build (by its
/// `buildId`, its Docker image under any spelling, its `local:` directory directly or
/// through a link, its Python, a working directory or a program in it) is refused exactly as
/// an unknown build is, 400 `build <id> not found`, on create and on update; the build's own
/// org deploys it in each of these ways.
#[tokio::test]
async fn another_orgs_build_is_refused_as_an_unknown_one() {
    let a = api_with(|c| c.runtime.build_max_context_mb = 1).await;
    let other_sk = super::daily::org_private_key(&a, "other").await;
    let theirs = successful_build(&a, "other").await;
    let unknown = uuid::Uuid::new_v4();
    let builds = a.state.builds.dir().to_path_buf();
    // A directory without a record stands for an unknown build (made on another node, or
    // whose record is gone), so that a link can point at it as at another org's build.
    std::fs::create_dir_all(builds.join(unknown.to_string()).join("app")).unwrap();
    for id in [theirs, unknown] {
        let link = a._dir.path().join(format!("link-{id}"));
        std::os::unix::fs::symlink(builds.join(id.to_string()), link).unwrap();
    }
    let naming = |id: uuid::Uuid| {
        let d = builds.join(id.to_string());
        let app = d.join("app").display().to_string();
        let python = d.join("venv/bin/python").display().to_string();
        vec![
            json!({"buildId": id}),
            json!({"image": format!("cattery-build:{id}")}),
            json!({"image": format!("docker.io/library/cattery-build:{id}")}),
            json!({"image": format!("local:{app}")}),
            json!({"image": format!("local:{}/app", a._dir.path().join(format!("link-{id}")).display())}),
            json!({"command": ["fake"], "python": python}),
            json!({"command": ["fake", "/tmp/../".to_string() + &app[1..] + "/bot.py"]}),
            json!({"command": ["fake"], "workingDir": app}),
        ]
    };
    let with_name = |name: &str, mut body: Value| {
        body["serviceName"] = json!(name);
        body
    };
    a.deploy("mine", &["ready"], json!({})).await;
    for (i, (theirs_body, unknown_body)) in
        naming(theirs).into_iter().zip(naming(unknown)).enumerate()
    {
        let name = format!("b{i}");
        let mut answers = Vec::new();
        for (body, id) in [(theirs_body.clone(), theirs), (unknown_body, unknown)] {
            let created = a
                .call(
                    Method::POST,
                    "/v1/agents",
                    Some(&a.sk),
                    Some(with_name(&name, body.clone())),
                )
                .await;
            let updated = a
                .call(
                    Method::POST,
                    "/v1/agents/mine",
                    Some(&a.sk),
                    Some(body.clone()),
                )
                .await;
            for r in [&created, &updated] {
                assert_error(r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
                let msg = r.body["error"]
                    .as_str()
                    .unwrap()
                    .replace(&id.to_string(), "<id>");
                answers.push(msg);
            }
        }
        // The same answers, whether the build is another org's or none at all.
        assert_eq!(answers[..2], answers[2..], "{theirs_body}");
        assert_eq!(answers[0], "build <id> not found", "{theirs_body}");
        // Its own org deploys it.
        let r = a
            .call(
                Method::POST,
                "/v1/agents",
                Some(&other_sk),
                Some(with_name(&name, theirs_body.clone())),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{theirs_body}: {}", r.body);
    }
    // Nothing under the builds directory that is no build: uploads, the directory itself.
    for dir in [builds.join("uploads"), builds.clone()] {
        let body = json!({"serviceName": "u", "image": format!("local:{}", dir.display())});
        let r = a
            .call(Method::POST, "/v1/agents", Some(&other_sk), Some(body))
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    }
}
