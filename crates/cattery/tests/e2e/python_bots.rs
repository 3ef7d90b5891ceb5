//! Real, unchanged Pipecat bots (`examples/`) deployed as `local:` agents on the real binary,
//! run through the bundled Python runner. Needs `scripts/setup-python.sh` (run by `.ci/run`).

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::Server;
use serde_json::json;

/// The Python with pipecat-ai, pipecatcloud, fastapi and uvicorn.
pub(crate) fn python() -> PathBuf {
    let p = std::env::var_os("CATTERY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::py_env_dir().join("main/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-python.sh first",
        p.display()
    );
    p
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub(crate) fn example(name: &str) -> String {
    format!("local:{}", repo().join("examples").join(name).display())
}

/// Runs a Python script from the repo with arguments; panics with its output unless it exits 0.
async fn run_script(what: &str, script: &str, args: Vec<String>) {
    let script = repo().join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the session-status bot's own `/status` route, reached through the session
/// proxy, reports `running: true`; returns that status.
pub(crate) async fn wait_bot_running(s: &Server, agent: &str, sid: &str) -> serde_json::Value {
    common::wait_for(Duration::from_secs(20), "bot /status running", || async {
        let path = format!("/v1/public/{agent}/sessions/{sid}/status");
        let r = s.req("GET", &path, Some(&s.pk), None).await;
        (r.status == 200 && r.body["running"] == true).then_some(r.body)
    })
    .await
}

pub(crate) async fn server() -> Server {
    let py = python();
    Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--stop-grace-seconds",
        "3",
    ])
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn session_status_bot_runs_unchanged_with_its_session_api() {
    let s = server().await;
    s.deploy(
        "status-bot",
        &[],
        json!({"command": null, "image": example("session-status")}),
    )
    .await;
    let r = s
        .start_session(
            "status-bot",
            json!({"body": {"duration_secs": 60, "tick_secs": 0.05}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.body, s.log());
    let sid = r.body["sessionId"].as_str().unwrap().to_string();

    // The bot's own route, through the session proxy.
    let st = common::wait_for(
        Duration::from_secs(20),
        "bot /status with frames",
        || async {
            let r = s
                .req(
                    "GET",
                    &format!("/v1/public/status-bot/sessions/{sid}/status"),
                    Some(&s.pk),
                    None,
                )
                .await;
            (r.status == 200 && r.body["frames_processed"].as_u64().unwrap_or(0) > 0)
                .then_some(r.body)
        },
    )
    .await;
    assert_eq!(st["running"], true);
    assert_eq!(st["session_id"], sid.as_str());

    // Stop: the whole Python tree goes.
    let stop = s.stop("status-bot", &sid).await;
    assert_eq!(
        stop.body,
        json!({"status": "terminated", "session_id": sid})
    );
    assert!(
        s.agent_pids().is_empty(),
        "python processes survived the stop"
    );
    let g = s.session("status-bot", &sid).await;
    assert_eq!(g["endReason"], "stopped");

    // Natural end, and a bot that raises: recorded, not swallowed.
    let a = s
        .start_session("status-bot", json!({"body": {"duration_secs": 0.5}}))
        .await
        .body["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let ga = s
        .wait_ended("status-bot", &a, Duration::from_secs(30))
        .await;
    assert_eq!(ga["endReason"], "completed", "{ga}");
    assert_eq!(ga["completionStatus"], "HTTP_COMPLETED");
    let b = s
        .start_session("status-bot", json!({"body": {"fail": true}}))
        .await
        .body["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let gb = s
        .wait_ended("status-bot", &b, Duration::from_secs(30))
        .await;
    assert_eq!(gb["endReason"], "error", "{gb}");
    assert_eq!(gb["completionStatus"], "500");
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn session_status_bot_is_cancelled_at_max_session_duration() {
    let s = server().await;
    s.deploy(
        "capped-bot",
        &[],
        json!({"command": null, "image": example("session-status"), "maxSessionDuration": 60}),
    )
    .await;
    // Checked here: the header reaches the runner (its own budget) and the platform enforces
    // the cap; a full 60 s wait is left to the lifecycle suite.
    let sid = s.start_ok("capped-bot").await;
    let st = wait_bot_running(&s, "capped-bot", &sid).await;
    assert_eq!(st["session_id"], sid.as_str());
    assert_eq!(s.stop("capped-bot", &sid).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn ws_echo_bot_over_the_websocket_transport() {
    let s = server().await;
    s.deploy(
        "ws-echo",
        &[],
        json!({"command": null, "image": example("ws-echo")}),
    )
    .await;
    let a = s
        .start_session(
            "ws-echo",
            json!({"transport": "websocket", "body": {"hello": 1}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let url = format!(
        "{}?token={}",
        a.body["wsUrl"].as_str().unwrap(),
        a.body["token"].as_str().unwrap()
    );
    let sid = a.body["sessionId"].as_str().unwrap().to_string();
    run_script(
        "ws-echo client",
        "examples/ws-echo/client.py",
        vec![url, "--seconds".into(), "2".into()],
    )
    .await;
    let g = s.wait_ended("ws-echo", &sid, Duration::from_secs(30)).await;
    assert_eq!(g["completionStatus"], "WS_CONNECTION_CLOSED");
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webrtc_echo_bot_signals_through_the_session_proxy() {
    let s = server().await;
    s.deploy(
        "rtc-echo",
        &[],
        json!({"command": null, "image": example("webrtc-echo")}),
    )
    .await;
    let r = s
        .start_session("rtc-echo", json!({"transport": "webrtc"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let offer = format!("{}/v1/public/rtc-echo/sessions/{sid}/api/offer", s.base);
    let auth = format!("Authorization: Bearer {}", s.pk);
    let args = vec![
        offer,
        "--seconds".into(),
        "3".into(),
        "--header".into(),
        auth,
    ];
    run_script("webrtc client", "examples/webrtc-echo/client.py", args).await;
    assert_eq!(s.stop("rtc-echo", &sid).await.status, 200);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bundled_runner_smoke_test() {
    let py = python().display().to_string();
    run_script(
        "runner smoke test",
        "crates/cattery/runner/smoke_test.py",
        vec!["--python".into(), py],
    )
    .await;
}

/// Starts a session with the official SDK (`pipecatcloud.session.Session`) pointed at Cattery
/// through `PIPECAT_API_HOST`; returns what `start()` returned.
async fn sdk_start(s: &Server, agent: &str, data: serde_json::Value) -> serde_json::Value {
    let code = r#"
import asyncio, json, os, sys
from pipecatcloud.session import Session, SessionParams
async def main():
    s = Session(agent_name=sys.argv[1], api_key=os.environ["CATTERY_TEST_PK"],
                params=SessionParams(data=json.loads(sys.argv[2]), use_daily=False))
    print(json.dumps(await s.start()))
asyncio.run(main())
"#;
    let (agent, data, host, pk) = (
        agent.to_string(),
        data.to_string(),
        s.base.clone(),
        s.pk.clone(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(["-c", code, &agent, &data])
            .env("PIPECAT_API_HOST", host)
            .env("CATTERY_TEST_PK", pk)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "SDK start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("SDK printed JSON")
}

/// Log lines of an agent, oldest first; `filter` adds query parameters (`sessionId=...&`).
async fn log_lines(s: &Server, agent: &str, filter: &str) -> Vec<String> {
    let r = s
        .req(
            "GET",
            &format!("/v1/agents/{agent}/logs?{filter}limit=1000&order=asc"),
            Some(&s.sk),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["log"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Logs of an agent for one session, oldest first.
pub(crate) async fn session_logs(s: &Server, agent: &str, sid: &str) -> Vec<String> {
    log_lines(s, agent, &format!("sessionId={sid}&")).await
}

/// Every log line of an agent, oldest first.
pub(crate) async fn agent_logs(s: &Server, agent: &str) -> Vec<String> {
    log_lines(s, agent, "").await
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdk_starts_an_example_bot() {
    let s = server().await;
    s.deploy(
        "sdk-bot",
        &[],
        json!({"command": null, "image": example("session-status")}),
    )
    .await;
    let started = sdk_start(&s, "sdk-bot", json!({"duration_secs": 60})).await;
    let sid = started["sessionId"]
        .as_str()
        .expect("sessionId from the SDK")
        .to_string();
    let st = wait_bot_running(&s, "sdk-bot", &sid).await;
    assert_eq!(st["session_id"], sid.as_str());
    assert_eq!(s.stop("sdk-bot", &sid).await.status, 200);
    assert!(s.agent_pids().is_empty());
}

pub(crate) fn fixture_bot(dir: &std::path::Path, source: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("bot.py"), source).unwrap();
    format!("local:{}", dir.display())
}

#[tokio::test(flavor = "multi_thread")]
async fn not_ready_bot_never_gets_a_session_and_raising_bot_leaves_its_traceback() {
    let py = python();
    let s = Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--start-timeout-seconds",
        "4",
    ])
    .await;
    let tmp = common::open_tempdir();
    let never = fixture_bot(
        &tmp.path().join("never-ready"),
        "def readyz():\n    return False\n\nasync def bot(args):\n    print('GOT A SESSION', flush=True)\n",
    );
    s.deploy("never-ready", &[], json!({"command": null, "image": never}))
        .await;
    let r = s.start_session("never-ready", json!({})).await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(r.body["code"], "START_TIMEOUT");
    // Its readyz() said False: the message says so, not that /readyz went unanswered.
    assert_eq!(
        r.body["error"],
        "instance did not answer /readyz with 200 within 4 s (its last answer was 503)"
    );
    let sess = s.latest_session("never-ready").await;
    let sid = sess["sessionId"].as_str().unwrap();
    assert_eq!(
        s.session("never-ready", sid).await["endReason"],
        "start_failed"
    );
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    let all = s
        .req(
            "GET",
            "/v1/agents/never-ready/logs?limit=1000",
            Some(&s.sk),
            None,
        )
        .await;
    assert!(
        !all.body.to_string().contains("GOT A SESSION"),
        "a not-ready bot got a session"
    );
    // Why it was not ready is in the session's logs (the runner logs each change of the
    // /readyz answer; its access lines are dropped).
    assert!(
        session_logs(&s, "never-ready", sid)
            .await
            .iter()
            .any(|l| l.contains(r#"/readyz answers 503 (not ready"#)
                && l.contains(r#"{"status":"not ready"}"#)),
        "no /readyz answer in the session's logs"
    );

    let raiser = fixture_bot(
        &tmp.path().join("raiser"),
        "async def bot(args):\n    raise ValueError('the bot blew up on purpose')\n",
    );
    s.deploy("raiser", &[], json!({"command": null, "image": raiser}))
        .await;
    let sid = s.start_ok("raiser").await;
    let g = s.wait_ended("raiser", &sid, Duration::from_secs(30)).await;
    assert_eq!(g["endReason"], "error");
    assert_eq!(g["completionStatus"], "500");
    // The end message names the exception (issue 17).
    assert_eq!(
        g["endMessage"],
        "the agent answered /bot with HTTP 500: ValueError: the bot blew up on purpose",
        "{g}"
    );
    let logs = common::wait_for(
        Duration::from_secs(10),
        "traceback in the session's logs",
        || async {
            let l = session_logs(&s, "raiser", &sid).await;
            (l.iter().any(|x| x.contains("Traceback"))
                && l.iter().any(|x| x.contains("the bot blew up on purpose")))
            .then_some(l)
        },
    )
    .await;
    assert!(logs.iter().any(|l| l.contains("ValueError")));
}

/// A bot that cannot be imported (here a syntax error) fails its first start with a message
/// that says so (the runner's exit code 3), not only "exit code 3"; the traceback stays out of
/// the public answer and is in the agent's status.
#[tokio::test(flavor = "multi_thread")]
async fn a_bot_that_cannot_be_imported_says_so_at_its_first_start() {
    let s = server().await;
    let tmp = common::open_tempdir();
    let broken = fixture_bot(
        &tmp.path().join("broken"),
        "async def bot(runner_args:\n    pass\n",
    );
    s.deploy("broken", &[], json!({"command": null, "image": broken}))
        .await;
    let r = s.start_session("broken", json!({})).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.body["code"], "INSTANCE_EXITED", "{:?}", r.body);
    assert_eq!(
        r.body["error"],
        "instance exited before it was ready (exit code 3): the Python runner could not load \
         bot.py (an error while importing it, or no bot function); the traceback is in the \
         agent's status and logs"
    );
    assert!(!r.body.to_string().contains("SyntaxError"), "{:?}", r.body);
    let a = s.req("GET", "/v1/agents/broken", Some(&s.sk), None).await;
    let msg = a.body["currentRevision"]["health"]["message"].to_string();
    assert!(msg.contains("SyntaxError"), "{msg}");
}

/// A live call survives a SIGKILL of the control plane: the restarted server re-adopts the
/// instance, and when `bot()` ends the runner (whose `/bot` request went away) exits with code 0
/// and writes it to `$CATTERY_EXIT_STATUS_FILE`, so the end is recorded as completed.
#[tokio::test(flavor = "multi_thread")]
async fn python_session_survives_a_control_plane_sigkill_and_completes() {
    let mut s = server().await;
    s.deploy(
        "survivor",
        &[],
        json!({"command": null, "image": example("session-status")}),
    )
    .await;
    let r = s
        .start_session("survivor", json!({"body": {"duration_secs": 4}}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    wait_bot_running(&s, "survivor", &sid).await;
    s.kill9();
    s.spawn().await;
    let g = s.session("survivor", &sid).await;
    assert!(
        g["endedAt"].is_null(),
        "the session must still be live after the restart: {g}"
    );
    let st = s
        .req(
            "GET",
            &format!("/v1/public/survivor/sessions/{sid}/status"),
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(
        st.body["running"], true,
        "bot() goes on through the restart: {:?}",
        st.body
    );
    let g = s
        .wait_ended("survivor", &sid, Duration::from_secs(30))
        .await;
    assert_eq!(g["endReason"], "completed", "{g}");
    assert_eq!(g["exitCode"], 0, "{g}");
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

/// A temporary directory with mode `mode`.
fn dir_with_mode(mode: u32) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    d
}

/// Writes at `path` an executable script that runs the Python at `target`.
fn write_python_wrapper(path: &Path, target: &Path) {
    std::fs::write(
        path,
        format!("#!/bin/sh\nexec {} \"$@\"\n", target.display()),
    )
    .unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Deploys agent `name`, the `session-status` example run by `python`, which must not be
/// ready; the message of its first error.
async fn not_ready_with_python(s: &Server, name: &str, python: &Path) -> String {
    let spec = json!({"command": null, "image": example("session-status"), "python": python});
    let a = s.deploy(name, &[], spec).await;
    assert_eq!(a["ready"], false, "{a}");
    a["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A `local:` agent whose Python the instances' own uids cannot reach (here in a `0700`
/// directory, as a pyenv under `/root` is) is reported at deploy time with the interpreter's
/// path and the ways to choose another one.
#[tokio::test(flavor = "multi_thread")]
async fn local_agent_with_a_python_instances_cannot_reach_says_which_and_how_to_change_it() {
    if unsafe { libc::geteuid() } != 0 {
        return; // Instances get uids of their own only when the server runs as root.
    }
    let s = server().await;
    let private = dir_with_mode(0o700);
    let py = private.path().join("python");
    write_python_wrapper(&py, &python());
    let msg = not_ready_with_python(&s, "hidden-python", &py).await;
    let shown = py.display().to_string();
    assert!(
        msg.contains(&format!("cannot reach the program {shown}")),
        "{msg}"
    );
    assert!(msg.contains("does not let other users through"), "{msg}");
    assert!(
        msg.contains(&format!("the bot's Python is {shown}")),
        "{msg}"
    );
    assert!(msg.contains("`.venv`") && msg.contains("--python"), "{msg}");

    // A venv's `python` is a link to the Python it was made with: the message names where it
    // leads, which is where the blocking directory is.
    let public = dir_with_mode(0o755);
    let venv_python = public.path().join("python");
    std::os::unix::fs::symlink(&py, &venv_python).unwrap();
    let msg = not_ready_with_python(&s, "linked-python", &venv_python).await;
    let target = std::fs::canonicalize(&py).unwrap();
    assert!(
        msg.contains(&format!(
            "cannot reach the program {} (a link to {}): ",
            venv_python.display(),
            target.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("/usr/bin/python3 -m venv .venv"), "{msg}");
}

/// A `local:` agent whose Python lacks the runner's dependencies is reported at deploy time.
#[tokio::test(flavor = "multi_thread")]
async fn local_agent_without_runner_dependencies_is_not_ready_at_deploy() {
    let s = server().await;
    let tmp = common::open_tempdir();
    let venv = tmp.path().join("empty-venv");
    let st = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(st.success());
    // The agent's interpreter is a wrapper, so the test can "fix the environment" in place.
    let py = tmp.path().join("python");
    let write_wrapper = |target: &Path| write_python_wrapper(&py, target);
    write_wrapper(&venv.join("bin/python"));
    let spec = json!({"command": null, "image": example("session-status"), "python": py});
    let a = s.deploy("bare-python", &[], spec.clone()).await;
    assert_eq!(a["ready"], false, "{a}");
    let msg = a["errors"][0]["message"].as_str().unwrap_or("");
    assert!(msg.contains("fastapi"), "{a}");
    let r = s.start_session("bare-python", json!({})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["code"], "PCC-1001");

    // Fixed environment, same spec: deploying again checks again and the agent becomes ready
    // (no forceRedeploy needed).
    write_wrapper(&python());
    let r = s
        .req("POST", "/v1/agents/bare-python", Some(&s.sk), Some(spec))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.body["warning"]
            .as_str()
            .is_some_and(|w| w.contains("checked again")),
        "{:?}",
        r.body
    );
    let a = s.wait_ready("bare-python", Duration::from_secs(20)).await;
    assert!(a["errors"].as_array().is_none_or(|e| e.is_empty()), "{a}");
    let sid = s.start_ok("bare-python").await;
    assert_eq!(s.stop("bare-python", &sid).await.status, 200);
}

/// The deploy-time check of a `local:` bot's Python runs the org's code (the interpreter it
/// names, and what that imports at start: a `.pth` file of a package it chose), so it runs as
/// an instance would: not as root, without the server's environment, and nothing it leaves
/// running outlives it. Before, a tenant who could place an executable anywhere other users
/// reach (an instance writing to the host's `/run/lock`, a build's virtualenv) ran it as root.
#[tokio::test(flavor = "multi_thread")]
async fn the_deploy_time_check_of_a_bots_python_runs_unprivileged() {
    if unsafe { libc::geteuid() } != 0 {
        return; // Instances get uids of their own only when the server runs as root.
    }
    let py = python();
    let s = Server::start_with_env(
        &["--python", py.to_str().unwrap()],
        &[("CATTERY_TEST_SERVER_ONLY", "server-env-value")],
    )
    .await;
    let tmp = common::open_tempdir();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let marker = format!("left-by-the-check-{}", s.tag);
    let wrapper = tmp.path().join("python");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{{ id -u; env; }} > {out}/ran 2>&1\nsetsid /bin/sh -c 'sleep 300; : {marker}' >/dev/null 2>&1 &\nexec {py} \"$@\"\n",
            out = out.display(),
            py = py.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // No warm instance: what runs the wrapper is the deploy-time check alone.
    let spec = json!({"command": null, "image": example("session-status"), "python": wrapper,
                      "autoScaling": {"minAgents": 0}});
    let a = s.deploy("checked-python", &[], spec).await;
    let ran = std::fs::read_to_string(out.join("ran")).expect("the check ran the wrapper");
    let uid: u32 = ran.lines().next().unwrap().trim().parse().unwrap();
    assert!(
        (2_000_000_000..=2_000_065_535).contains(&uid),
        "the check ran as uid {uid}: {a}"
    );
    assert!(
        !ran.contains("server-env-value"),
        "the server's environment: {ran}"
    );
    common::wait_for(Duration::from_secs(10), "nothing left by the check", || {
        let m = marker.clone();
        async move { cmdlines_with(&m).is_empty().then_some(()) }
    })
    .await;
    assert!(a["errors"].as_array().is_none_or(|e| e.is_empty()), "{a}");
}

/// Pids whose command line contains `needle`.
fn cmdlines_with(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Echoes text frames until `bye`, then returns (the runner closes the socket with 1000).
const WS_BYE_BOT: &str = r#"
async def bot(args):
    ws = args.websocket
    while True:
        text = await ws.receive_text()
        if text == "bye":
            return
        await ws.send_text(text)
"#;

/// A websocket call that ends normally after a detach upgrade is recorded `completed`: the
/// runner exits 0 once `bot()` has returned and writes the code to
/// `$CATTERY_EXIT_STATUS_FILE`, which the new server (no longer the instance's parent) reads.
/// Before, the runner kept running after a `/ws` session, and the end was recorded `error`,
/// "the instance exited (exit status unknown)".
#[tokio::test(flavor = "multi_thread")]
async fn python_websocket_call_ending_after_a_detach_upgrade_is_completed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let py = python();
    let mut s = Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--stop-grace-seconds",
        "3",
        "--on-stop",
        "detach",
    ])
    .await;
    let tmp = common::open_tempdir();
    let bot = fixture_bot(&tmp.path().join("ws-bye"), WS_BYE_BOT);
    s.deploy("ws-bye", &[], json!({"command": null, "image": bot}))
        .await;
    let (sid, mut ws) = s.ws_call("ws-bye").await;
    async fn echo(ws: &mut common::WsClient, text: &str) {
        ws.send(Message::Text(text.into())).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), text),
            other => panic!("no echo of {text}: {other:?}"),
        }
    }
    echo(&mut ws, "before").await;

    let mut old = s.detach_relaying_and_restart(&sid).await;
    echo(&mut ws, "after").await;
    ws.send(Message::Text("bye".into())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the bot's close: {other:?}"),
    }
    let g = s.wait_ended("ws-bye", &sid, Duration::from_secs(30)).await;
    assert_eq!(g["endReason"], "completed", "{g}");
    let t0 = std::time::Instant::now();
    while old.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the old server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}
