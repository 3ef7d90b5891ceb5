//! The Docker runtime (issue 11, `docs/docker.md`) end to end: the real binary against the real
//! engine and the locally built test images (`scripts/docker-images.sh`). Without an engine
//! (or without the images) these tests say so and pass, unless `CATTERY_REQUIRE_DOCKER` is
//! set (CI sets it), when they fail instead.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{wait_for, Server};
use crate::lifecycle_util::*;
use serde_json::{json, Value};

pub(crate) const AGENT_IMAGE: &str = "cattery-test/agent:latest";
const BOT_IMAGE: &str = "cattery-test/bot:latest";

pub(crate) fn docker(args: &[&str]) -> Option<String> {
    let out = Command::new("/usr/bin/docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the engine and `images` are there; otherwise skips (or fails under
/// `CATTERY_REQUIRE_DOCKER`).
pub(crate) fn have_docker(images: &[&str]) -> bool {
    let required = std::env::var_os("CATTERY_REQUIRE_DOCKER").is_some();
    let missing = if docker(&["info", "--format", "{{.ServerVersion}}"]).is_none() {
        Some("no Docker engine answers (scripts/docker-ci.sh start)".to_string())
    } else {
        images
            .iter()
            .find(|i| docker(&["image", "inspect", "--format", "{{.Id}}", i]).is_none())
            .map(|i| format!("image {i} is missing (scripts/docker-images.sh)"))
    };
    match missing {
        None => true,
        Some(why) if required => panic!("CATTERY_REQUIRE_DOCKER is set, but {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

pub(crate) fn server_id(s: &Server) -> String {
    std::fs::read_to_string(s.data_dir().join("server-id"))
        .unwrap()
        .trim()
        .to_string()
}

/// Ids of every container (running or not) of this server, by label.
pub(crate) fn containers(s: &Server) -> Vec<String> {
    let f = format!("label=org.cattery.server={}", server_id(s));
    docker(&["ps", "-a", "-q", "--no-trunc", "--filter", &f])
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

pub(crate) async fn wait_containers(s: &Server, n: usize, timeout: Duration) -> Vec<String> {
    wait_for(timeout, &format!("{n} container(s)"), || async {
        let c = containers(s);
        (c.len() == n).then_some(c)
    })
    .await
}

pub(crate) fn inspect(id: &str) -> Value {
    let out = docker(&["inspect", id]).unwrap_or_else(|| "[null]".into());
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

/// Deploys the test agent image; `args` are its switches.
pub(crate) async fn deploy_image(s: &Server, name: &str, args: &str, extra: Value) {
    let mut body = json!({"command": null, "image": AGENT_IMAGE,
                          "env": {"CATTERY_TEST_AGENT_ARGS": args}});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
    s.deploy(name, &[], body).await;
}

/// A line longer than the engine's 16 KiB log buffer, which the engine keeps in parts that
/// share one timestamp, is captured whole, as is every line after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_longer_than_the_engines_buffer_is_captured_whole() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&[]).await;
    let big = format!("{}{}", "a".repeat(20_000), "b".repeat(20_000));
    let args = "--print-env BIG --print-env AFTER --ignore-transport-close";
    deploy_image(
        &s,
        "long",
        args,
        json!({"env": {"CATTERY_TEST_AGENT_ARGS": args, "BIG": big, "AFTER": "the-next-line"}}),
    )
    .await;
    s.wait_ready("long", Duration::from_secs(60)).await;
    let sid = s.start_ok("long").await;
    let logs = wait_log(&s, "long", &sid, "env AFTER=the-next-line").await;
    // The line's text, in the parts the engine and the server cut it into.
    let mut text = String::new();
    for r in &logs {
        if let Some((_, v)) = r.log.split_once("env BIG=") {
            text.push_str(v);
        } else if !r.log.is_empty() && r.log.chars().all(|c| c == 'a' || c == 'b') {
            text.push_str(&r.log);
        }
    }
    let count = |c: char| text.chars().filter(|x| *x == c).count();
    assert_eq!(
        (count('a'), count('b')),
        (20_000, 20_000),
        "the long line's parts"
    );
    assert_eq!(s.stop("long", &sid).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn image_agent_runs_in_a_hardened_container_and_stop_removes_it() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&["--stop-grace-seconds", "3"]).await;
    deploy_image(&s, "img", "--print-env SECRET_ISH --last-words --ignore-transport-close", json!({
        "env": {"CATTERY_TEST_AGENT_ARGS": "--print-env SECRET_ISH --last-words --ignore-transport-close", "SECRET_ISH": "v1"}
    }))
    .await;
    // A process agent on the same server at the same time.
    s.deploy("proc", &[], json!({})).await;
    let a = s.wait_ready("img", Duration::from_secs(60)).await;
    assert_eq!(a["errors"], json!([]), "{a}");

    let sid = s.start_ok("img").await;
    let i = info_served(&s, "img", &sid).await;
    assert_eq!(i["sessionsServed"], 1);
    let c = containers(&s);
    assert_eq!(c.len(), 1, "one container for the session");
    let ins = inspect(&c[0]);
    let hc = &ins["HostConfig"];
    assert_eq!(hc["Init"], true, "{hc}");
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["CapDrop"], json!(["ALL"]));
    assert_eq!(hc["SecurityOpt"], json!(["no-new-privileges:true"]));
    assert_eq!(hc["Memory"], 1024_i64 * 1024 * 1024, "agent-1x memory");
    assert_eq!(hc["NanoCpus"], 500_000_000_i64, "agent-1x cpu");
    assert!(hc["PidsLimit"].as_i64().unwrap() > 0);
    assert!(
        hc["Binds"].is_null() && ins["Mounts"] == json!([]),
        "no host mounts"
    );
    let bindings = &hc["PortBindings"]["8080/tcp"];
    assert_eq!(bindings[0]["HostIp"], "127.0.0.1", "{bindings}");
    let labels = &ins["Config"]["Labels"];
    assert_eq!(labels["org.cattery.server"], server_id(&s).as_str());
    assert!(labels["org.cattery.instance"].is_string());
    assert!(labels["org.cattery.deployment"].is_string());
    let env: Vec<String> = serde_json::from_value(ins["Config"]["Env"].clone()).unwrap();
    assert!(env.contains(&"PORT=8080".to_string()), "{env:?}");
    assert!(env.contains(&"SECRET_ISH=v1".to_string()), "{env:?}");
    assert!(
        env.contains(&format!("CATTERY_SESSION_ID={sid}")),
        "{env:?}"
    );

    let p = s.start_ok("proc").await;
    info_served(&s, "proc", &p).await;

    // Logs reach the store with the session's attribution.
    wait_log(&s, "img", &sid, "env SECRET_ISH=v1").await;
    // 200 only after the container is gone.
    let r = s.stop("img", &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"status": "terminated", "session_id": sid}));
    assert_eq!(
        containers(&s),
        Vec::<String>::new(),
        "container left after 200"
    );
    let g = s.session("img", &sid).await;
    assert_eq!(g["endReason"], "stopped", "{g}");
    // The last words of the stopped container are kept.
    wait_log(&s, "img", &sid, "last words on stderr").await;
    // A second stop is idempotent.
    let r2 = s.stop("img", &sid).await;
    assert!(r2.status < 500, "{:?}", r2.body);
    s.stop("proc", &p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ignoring_container_is_killed_after_the_grace() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&[]).await;
    deploy_image(
        &s,
        "stubborn",
        "--ignore-sigterm --ignore-transport-close",
        json!({"stopGraceSeconds": 2}),
    )
    .await;
    let sid = s.start_ok("stubborn").await;
    info_served(&s, "stubborn", &sid).await;
    let t0 = Instant::now();
    let r = s.stop("stubborn", &sid).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(15),
        "stop took {took:?} with a 2 s grace"
    );
    assert!(containers(&s).is_empty());
    let g = s.session("stubborn", &sid).await;
    assert_eq!(g["exitSignal"], 9, "{g}");
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_of_containers_serves_and_refills() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&[]).await;
    deploy_image(
        &s,
        "warm",
        "",
        json!({"autoScaling": {"minAgents": 2, "maxAgents": 3}}),
    )
    .await;
    wait_warm_idle(&s, "warm", 2, Duration::from_secs(60)).await;
    assert_eq!(containers(&s).len(), 2);
    let t0 = Instant::now();
    let sid = s.start_ok("warm").await;
    let warm_start = t0.elapsed();
    info_served(&s, "warm", &sid).await;
    // The pool refills next to the busy container.
    wait_warm_idle(&s, "warm", 2, Duration::from_secs(60)).await;
    assert_eq!(containers(&s).len(), 3);
    let r = s.stop("warm", &sid).await;
    assert_eq!(r.status, 200);
    wait_containers(&s, 2, Duration::from_secs(30)).await;
    eprintln!("warm start from the container pool: {warm_start:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_at_start_fails_the_session_and_leaves_nothing() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&[]).await;
    deploy_image(&s, "crash", "--exit-on-start 3", json!({})).await;
    let r = s.start_session("crash", json!({})).await;
    assert!(r.status >= 400, "{:?}", r.body);
    wait_containers(&s, 0, Duration::from_secs(30)).await;
    let a = s.agent("crash").await;
    let msg = a.to_string();
    assert!(
        msg.contains("crash on start") || msg.contains("exit code 3"),
        "{a}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_memory_container_ends_with_out_of_memory() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&[]).await;
    deploy_image(&s, "hog", "--rss-grow 1400", json!({})).await;
    let sid = s.start_ok("hog").await;
    let g = s.wait_ended("hog", &sid, Duration::from_secs(60)).await;
    assert_eq!(g["endReason"], "out_of_memory", "{g}");
    wait_containers(&s, 0, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_session_duration_ends_a_container_session() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&[]).await;
    deploy_image(
        &s,
        "long",
        "--ignore-transport-close",
        json!({"maxSessionDuration": 60, "stopGraceSeconds": 1}),
    )
    .await;
    let sid = s.start_ok("long").await;
    let g = s.wait_ended("long", &sid, Duration::from_secs(100)).await;
    assert_eq!(g["endReason"], "max_duration", "{g}");
    wait_containers(&s, 0, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_readopts_containers_and_sweeps_unrecorded_ones() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let mut s = Server::start(&[]).await;
    deploy_image(&s, "survivor", "--ignore-transport-close", json!({})).await;
    let sid = s.start_ok("survivor").await;
    let before = info_served(&s, "survivor", &sid).await;
    let c = containers(&s);
    assert_eq!(c.len(), 1);
    // The record names the runtime that made the instance, not the server's `auto`.
    let db = rusqlite::Connection::open(s.data_dir().join("cattery.db")).unwrap();
    let kinds: Vec<String> = db
        .prepare("SELECT runtime FROM instances")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(kinds, vec!["docker".to_string()], "instance records");
    drop(db);
    // A second session whose container ends while no server runs.
    deploy_image(&s, "quitter", "--ignore-transport-close", json!({})).await;
    let quitter = s.start_ok("quitter").await;
    let qc = wait_containers(&s, 2, Duration::from_secs(30))
        .await
        .into_iter()
        .find(|x| !c.contains(x))
        .unwrap();
    s.kill9();
    docker(&["kill", "--signal", "TERM", &qc]).expect("docker kill");
    let code: i64 = docker(&["wait", &qc]).unwrap().trim().parse().unwrap();
    // A container of this server that no record explains (as if started just before a crash).
    let label = format!("org.cattery.server={}", server_id(&s));
    let stray = docker(&[
        "create",
        "--label",
        &label,
        "--label",
        "org.cattery.instance=00000000-0000-0000-0000-000000000001",
        AGENT_IMAGE,
    ])
    .expect("docker create");
    s.spawn().await;
    wait_containers(&s, 1, Duration::from_secs(30)).await;
    assert!(
        inspect(stray.trim()).is_null(),
        "the unrecorded container is removed"
    );
    assert_eq!(containers(&s), c, "the session's container is kept");
    let again = info(&s, "survivor", &sid).await;
    assert_eq!(
        again["startedAtUnixMs"], before["startedAtUnixMs"],
        "same container"
    );
    // The quitter's session is recorded as its container ended (Docker kept that), not lost.
    let q = s
        .wait_ended("quitter", &quitter, Duration::from_secs(10))
        .await;
    let msg = q["endMessage"].as_str().unwrap_or_default();
    assert!(
        msg.contains("exited while no control plane watched it"),
        "{q}"
    );
    if (129..=192).contains(&code) {
        assert_eq!(q["exitSignal"], code - 128, "{q}");
        assert_eq!(q["endReason"], "error", "{q}");
    } else {
        assert_eq!(q["exitCode"], code, "{q}");
        let reason = if code == 0 { "completed" } else { "error" };
        assert_eq!(q["endReason"], reason, "{q}");
    }
    assert!(inspect(&qc).is_null(), "the ended container is removed");
    let r = s.stop("survivor", &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(containers(&s).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_image_is_a_deploy_error_with_pipecat_cloud_code() {
    if !have_docker(&[]) {
        return;
    }
    let s = Server::start(&["--image-pull-policy", "never"]).await;
    s.deploy(
        "ghost",
        &[],
        json!({"command": null, "image": "cattery-test/no-such:1"}),
    )
    .await;
    let a = s.agent("ghost").await;
    assert_eq!(a["ready"], false, "{a}");
    assert_eq!(a["errors"][0]["code"], "PCC_IMAGE_NOT_FOUND", "{a}");
    let r = s.start_session("ghost", json!({})).await;
    assert!(r.status >= 400);
}

/// An image with nothing to run (no `CMD`, no `ENTRYPOINT`) is a deploy error that says so,
/// not an agent that reports ready and then fails every start.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_without_a_command_is_a_deploy_error() {
    if !have_docker(&["cattery-test/rootfs:bookworm"]) {
        return;
    }
    let s = Server::start(&[]).await;
    s.deploy(
        "no-cmd",
        &[],
        json!({"command": null, "image": "cattery-test/rootfs:bookworm"}),
    )
    .await;
    let a = s.agent("no-cmd").await;
    assert_eq!(a["ready"], false, "{a}");
    assert_eq!(a["errors"][0]["code"], "PCC_UNKNOWN_ERROR", "{a}");
    let m = a["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(m.contains("no command to run"), "{a}");
    let r = s.start_session("no-cmd", json!({})).await;
    assert!((400..500).contains(&r.status), "{:?}", r.body);
}

/// Needs no engine: a server pointed at none still runs process agents.
#[tokio::test(flavor = "multi_thread")]
async fn without_an_engine_image_agents_get_a_deploy_error_and_the_rest_works() {
    let s = Server::start(&["--docker-host", "unix:///nonexistent/docker.sock"]).await;
    s.deploy("img", &[], json!({"command": null, "image": "org/bot:0.3"}))
        .await;
    let a = s.agent("img").await;
    assert_eq!(a["ready"], false, "{a}");
    let msg = a["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("no reachable Docker engine"), "{a}");
    s.deploy("proc", &[], json!({})).await;
    let sid = s.start_ok("proc").await;
    info_served(&s, "proc", &sid).await;
    assert_eq!(s.stop("proc", &sid).await.status, 200);
}

/// A real pipecat bot image (`FROM` the base image's layout), started, its own route reached
/// through the session proxy, stopped, container gone.
#[tokio::test(flavor = "multi_thread")]
async fn pipecat_bot_image_serves_through_the_session_proxy() {
    if !have_docker(&[BOT_IMAGE]) {
        return;
    }
    let s = Server::start(&["--stop-grace-seconds", "5"]).await;
    s.deploy("bot", &[], json!({"command": null, "image": BOT_IMAGE}))
        .await;
    let r = s
        .start_session(
            "bot",
            json!({"body": {"duration_secs": 60, "tick_secs": 0.05}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.body, s.log());
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let st = wait_for(
        Duration::from_secs(30),
        "bot /status with frames",
        || async {
            let r = s
                .req(
                    "GET",
                    &format!("/v1/public/bot/sessions/{sid}/status"),
                    Some(&s.pk),
                    None,
                )
                .await;
            (r.status == 200 && r.body["frames_processed"].as_u64().unwrap_or(0) > 0)
                .then_some(r.body)
        },
    )
    .await;
    assert_eq!(st["session_id"], sid.as_str());
    let stop = s.stop("bot", &sid).await;
    assert_eq!(
        stop.body,
        json!({"status": "terminated", "session_id": sid})
    );
    assert!(
        containers(&s).is_empty(),
        "docker ps -a by label after the stop"
    );
    let g = s.session("bot", &sid).await;
    assert_eq!(g["endReason"], "stopped", "{g}");
}

/// Image pull secrets `good-pull` and `bad-pull` (a wrong password) for the registry `reg` on
/// `srv`.
async fn put_pull_secrets(srv: &Server, reg: &str, user: &str, pass: &str) {
    use base64::Engine;
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    for (name, value) in [
        ("good-pull", b64(format!("{user}:{pass}"))),
        ("bad-pull", b64(format!("{user}:wrong"))),
    ] {
        let r = srv
            .req(
                "PUT",
                &format!("/v1/secrets/{name}"),
                Some(&srv.sk),
                Some(json!({
                "isImagePullSecret": true, "host": format!("http://{reg}"), "secretValue": value})),
            )
            .await;
        assert!(r.status == 200 || r.status == 202, "{:?}", r.body);
    }
}

/// Authenticated pulls from the local registry of `scripts/docker-registry.sh` (its settings in
/// `CATTERY_TEST_REGISTRY*`, with `cattery-test/agent` pushed as `org/agent:0.3`): the
/// `imagePullSecretSet` credentials pull the image; wrong or missing ones are
/// `PCC_IMAGE_PULL_UNAUTHORIZED`, an unknown tag `PCC_IMAGE_NOT_FOUND`.
#[tokio::test(flavor = "multi_thread")]
async fn image_pull_secret_set_gives_the_registry_credentials() {
    let Ok(reg) = std::env::var("CATTERY_TEST_REGISTRY") else {
        eprintln!("SKIPPED: CATTERY_TEST_REGISTRY is unset (scripts/docker-registry.sh start --push cattery-test/agent:latest=org/agent:0.3)");
        return;
    };
    if !have_docker(&[]) {
        return;
    }
    let user = std::env::var("CATTERY_TEST_REGISTRY_USER").unwrap();
    let pass = std::env::var("CATTERY_TEST_REGISTRY_PASSWORD").unwrap();
    let s = Server::start(&["--image-pull-policy", "always"]).await;
    put_pull_secrets(&s, &reg, &user, &pass).await;
    let image = format!("{reg}/org/agent:0.3");
    let cases = [
        (
            "no-creds",
            image.clone(),
            None,
            "PCC_IMAGE_PULL_UNAUTHORIZED",
        ),
        (
            "bad-creds",
            image.clone(),
            Some("bad-pull"),
            "PCC_IMAGE_PULL_UNAUTHORIZED",
        ),
        (
            "no-tag",
            format!("{reg}/org/agent:0.9"),
            Some("good-pull"),
            "PCC_IMAGE_NOT_FOUND",
        ),
    ];
    for (name, img, set, code) in cases {
        s.deploy(
            name,
            &[],
            json!({"command": null, "image": img, "imagePullSecretSet": set}),
        )
        .await;
        let a = s.agent(name).await;
        assert_eq!(a["ready"], false, "{a}");
        assert_eq!(a["errors"][0]["code"], code, "{name}: {a}");
    }
    s.deploy(
        "pulled",
        &[],
        json!({"command": null, "image": image, "imagePullSecretSet": "good-pull"}),
    )
    .await;
    let a = s.wait_ready("pulled", Duration::from_secs(60)).await;
    assert_eq!(a["errors"], json!([]), "{a}");
    let sid = s.start_ok("pulled").await;
    info_served(&s, "pulled", &sid).await;
    assert_eq!(s.stop("pulled", &sid).await.status, 200);
    assert!(containers(&s).is_empty());

    // The image is on the engine now. Under the default pull policy (`missing`) a deploy of
    // it still proves with the registry that it may pull it: a copy pulled with one agent's
    // credentials serves no deployment without them.
    let m = Server::start(&[]).await;
    put_pull_secrets(&m, &reg, &user, &pass).await;
    for (name, set) in [
        ("cached-no-creds", None),
        ("cached-bad-creds", Some("bad-pull")),
    ] {
        m.deploy(
            name,
            &[],
            json!({"command": null, "image": image, "imagePullSecretSet": set}),
        )
        .await;
        let a = m.agent(name).await;
        assert_eq!(a["ready"], false, "{name}: {a}");
        assert_eq!(
            a["errors"][0]["code"], "PCC_IMAGE_PULL_UNAUTHORIZED",
            "{name}: {a}"
        );
        assert!(m.start_session(name, json!({})).await.status >= 400);
    }
    m.deploy(
        "cached-good",
        &[],
        json!({"command": null, "image": image, "imagePullSecretSet": "good-pull"}),
    )
    .await;
    let a = m.wait_ready("cached-good", Duration::from_secs(60)).await;
    assert_eq!(a["errors"], json!([]), "{a}");
}

/// Lifecycle cases in containers: stop during start, an exit of its own (code kept), the cap
/// (429 at `maxAgents`), and a drain on SIGTERM that leaves no container behind.
#[tokio::test(flavor = "multi_thread")]
async fn container_lifecycle_stop_during_start_own_exit_cap_and_drain() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let mut s = Server::start(&["--drain-timeout-seconds", "2"]).await;
    deploy_image(&s, "slow", "--startup-delay 5", json!({})).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/public/slow/start", s.base);
    let pk = s.pk.clone();
    let start = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(pk)
            .json(&json!({}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let sid = wait_active_session(&s, "slow").await;
    let t0 = Instant::now();
    let r = s.stop("slow", &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "stop during start waited for the start"
    );
    assert!(containers(&s).is_empty());
    assert_ne!(start.await.unwrap().unwrap_or(0), 200);
    assert_eq!(
        s.session("slow", &sid).await["endReason"],
        "stopped_during_start"
    );

    deploy_image(&s, "quits", "--exit-after 0.5 --exit-code 7", json!({})).await;
    let q = s.start_ok("quits").await;
    let g = s.wait_ended("quits", &q, Duration::from_secs(30)).await;
    assert_eq!(g["endReason"], "error", "{g}");
    assert_eq!(g["exitCode"], 7, "{g}");

    deploy_image(
        &s,
        "capped",
        "--ignore-transport-close",
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 1}}),
    )
    .await;
    let c1 = s.start_ok("capped").await;
    let r2 = s.start_session("capped", json!({})).await;
    assert_eq!(r2.status, 429, "{:?}", r2.body);
    info_served(&s, "capped", &c1).await;

    s.signal(libc::SIGTERM);
    wait_server_exit(&mut s, Duration::from_secs(30)).await;
    assert!(containers(&s).is_empty(), "containers left after the drain");
}

/// The image id is fixed at deploy: moving the tag later changes nothing for the deployment.
#[tokio::test(flavor = "multi_thread")]
async fn a_moved_tag_does_not_change_a_deployment() {
    if !have_docker(&[AGENT_IMAGE, "cattery-test/rootfs:bookworm"]) {
        return;
    }
    let tag = format!("cattery-test/moving:{}", uuid::Uuid::new_v4().simple());
    let agent_id = docker(&["image", "inspect", "--format", "{{.Id}}", AGENT_IMAGE]).unwrap();
    docker(&["tag", AGENT_IMAGE, &tag]).unwrap();
    let s = Server::start(&[]).await;
    s.deploy("moving", &[], json!({"command": null, "image": tag}))
        .await;
    docker(&["tag", "cattery-test/rootfs:bookworm", &tag]).unwrap();
    let sid = s.start_ok("moving").await;
    info_served(&s, "moving", &sid).await;
    let c = containers(&s);
    let running = inspect(&c[0])["Image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    docker(&["rmi", &tag]);
    assert_eq!(
        running,
        agent_id.trim(),
        "the container runs the image resolved at deploy"
    );
    assert_eq!(s.stop("moving", &sid).await.status, 200);
}

/// Runs an official CLI (`pipecat` or `pcc`) against `s` with the default org's CLI token,
/// its own HOME and config in `home`, and none of the caller's `PIPECAT_*`/`PCC_*` settings;
/// returns whether it succeeded and its stdout and stderr.
fn run_cli(program: &Path, s: &Server, home: &Path, args: &[&str]) -> (bool, String) {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("PIPECAT_") || k.starts_with("PCC_") {
            c.env_remove(k);
        }
    }
    let out = c
        .args(args)
        .current_dir(home)
        .env("HOME", home)
        .env("PIPECAT_API_HOST", &s.base)
        .env("PIPECAT_TOKEN", s.key("token", "default"))
        .env("PIPECAT_ORG", "default")
        .env("PIPECAT_CONFIG_PATH", home.join("creds.toml"))
        .env("NO_COLOR", "1")
        .env("COLUMNS", "250")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The official CLI (`pipecat cloud deploy`, pipecatcloud 1.x from `scripts/setup-python.sh`)
/// deploys an image agent from `pcc-deploy.toml`, which becomes ready and serves a session.
#[tokio::test(flavor = "multi_thread")]
async fn official_cli_deploys_an_image_agent() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let pipecat = common::py_env_dir().join("main/bin/pipecat");
    if !pipecat.exists() {
        eprintln!(
            "SKIPPED: {} is missing (scripts/setup-python.sh)",
            pipecat.display()
        );
        return;
    }
    let s = Server::start(&[]).await;
    let home = common::open_tempdir();
    std::fs::write(
        home.path().join("pcc-deploy.toml"),
        format!("agent_name = \"cli-image\"\nimage = \"{AGENT_IMAGE}\"\n\n[scaling]\nmin_agents = 1\nmax_agents = 2\n"),
    )
    .unwrap();
    let (ok, text) = run_cli(&pipecat, &s, home.path(), &["cloud", "deploy", "--yes"]);
    assert!(ok, "{text}");
    let a = s.wait_ready("cli-image", Duration::from_secs(60)).await;
    assert_eq!(a["image"], AGENT_IMAGE, "{a}");
    wait_warm_idle(&s, "cli-image", 1, Duration::from_secs(60)).await;
    assert_eq!(containers(&s).len(), 1, "the warm container");
    let sid = s.start_ok("cli-image").await;
    info_served(&s, "cli-image", &sid).await;
    assert_eq!(s.stop("cli-image", &sid).await.status, 200);
}

/// The legacy CLI (`pcc`, pipecatcloud 0.7.2) stores registry credentials with
/// `pcc secrets image-pull-secret` and deploys an image from the authenticated local registry
/// with `pcc deploy NAME IMAGE --credentials SET`; the agent becomes ready, `agent status`
/// says so, and a session runs in the pulled image. A deploy with wrong credentials shows
/// Pipecat Cloud's code in `agent status`.
#[tokio::test(flavor = "multi_thread")]
async fn legacy_cli_deploys_a_registry_image_with_credentials() {
    let Ok(reg) = std::env::var("CATTERY_TEST_REGISTRY") else {
        eprintln!("SKIPPED: CATTERY_TEST_REGISTRY is unset (scripts/docker-registry.sh start --push cattery-test/agent:latest=org/agent:0.3)");
        return;
    };
    if !have_docker(&[]) {
        return;
    }
    let pcc = common::py_env_dir().join("pcc/bin/pcc");
    if !pcc.exists() {
        eprintln!(
            "SKIPPED: {} is missing (scripts/setup-python.sh)",
            pcc.display()
        );
        return;
    }
    let user = std::env::var("CATTERY_TEST_REGISTRY_USER").unwrap();
    let pass = std::env::var("CATTERY_TEST_REGISTRY_PASSWORD").unwrap();
    let s = Server::start(&["--image-pull-policy", "always"]).await;
    let home = common::open_tempdir();
    let run = |args: &[&str]| run_cli(&pcc, &s, home.path(), args);
    let host = format!("http://{reg}");
    for (set, creds) in [
        ("reg-good", format!("{user}:{pass}")),
        ("reg-bad", format!("{user}:wrong")),
    ] {
        let (ok, text) = run(&["secrets", "image-pull-secret", set, &host, &creds, "--skip"]);
        assert!(ok, "image-pull-secret {set}: {text}");
    }
    let image = format!("{reg}/org/agent:0.3");
    let (ok, text) = run(&[
        "deploy",
        "pcc-image",
        &image,
        "--credentials",
        "reg-good",
        "--force",
    ]);
    assert!(ok, "pcc deploy: {text}");
    let a = s.wait_ready("pcc-image", Duration::from_secs(60)).await;
    assert_eq!(a["imagePullSecretSet"], "reg-good", "{a}");
    let (ok, text) = run(&["agent", "status", "pcc-image"]);
    assert!(ok && text.contains("Ready"), "agent status: {text}");
    let sid = s.start_ok("pcc-image").await;
    info_served(&s, "pcc-image", &sid).await;
    assert_eq!(s.stop("pcc-image", &sid).await.status, 200);

    let (_, text) = run(&[
        "deploy",
        "pcc-denied",
        &image,
        "--credentials",
        "reg-bad",
        "--force",
    ]);
    let a = s.agent("pcc-denied").await;
    assert_eq!(a["ready"], false, "{a}\n{text}");
    assert_eq!(a["errors"][0]["code"], "PCC_IMAGE_PULL_UNAUTHORIZED", "{a}");
    let (_, text) = run(&["agent", "status", "pcc-denied"]);
    assert!(
        text.contains("PCC_IMAGE_PULL_UNAUTHORIZED") || text.contains("unauthorized"),
        "agent status shows the image error: {text}"
    );
    assert!(containers(&s).is_empty());
}
