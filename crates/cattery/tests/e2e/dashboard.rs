//! The dashboard (issue 15, `docs/dashboard.md`) in a real browser: Debian's `chromium`,
//! headless, driven by `playwright-core` from npm (`dashboard.cjs` beside this file), against
//! the real binary and the test agent. This side starts the server, deploys an agent in two
//! orgs, and checks the session's process by pid; the script drives the page.
//!
//! Without node, chromium or playwright-core these tests say so and pass, unless
//! `CATTERY_REQUIRE_BROWSER` is set (`.ci/run` sets it and installs them), when they fail.
//! playwright-core is looked up in `$CATTERY_PLAYWRIGHT_DIR/node_modules` (default
//! `~/.cache/cattery/playwright`, where `.ci/run` installs it). Screenshots go to
//! `target/dashboard-screenshots/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::common::{
    cattery_bin, have_browser, pid_alive, playwright_dir, test_agent, wait_for, Server,
};

/// The pid of a session's test agent (`GET /info` through the session proxy).
async fn session_pid(s: &Server, agent: &str, sid: &str) -> i32 {
    let r = s
        .req(
            "GET",
            &format!("/v1/public/{agent}/sessions/{sid}/info"),
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["pid"].as_i64().expect("pid") as i32
}

/// Sign in (a wrong key refused), the agent ready, a session started from the page appears
/// in the live list without reload, its page, stopped with the button, terminated, its
/// process gone, its log lines shown; keys; sign out; another org's agents never shown.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_in_a_browser() {
    if !have_browser() {
        return;
    }
    // A node that left, for the Nodes page: this data dir's server ran first as `old-node`
    // and stopped cleanly.
    let mut s = Server::start(&["--node-id", "old-node"]).await;
    let st = s.terminate(Duration::from_secs(20));
    assert!(st.is_some_and(|st| st.success()), "{st:?}");
    s.args.clear();
    s.spawn().await;
    s.deploy("dash", &[], json!({"autoScaling": {"minAgents": 1}}))
        .await;
    let other_sk = s.key("private", "other");
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&other_sk),
            Some(json!({"serviceName": "elsewhere", "command": [test_agent()]})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    s.wait_ready("dash", Duration::from_secs(30)).await;
    // An agent deleted after a session: its sessions stay listable by its name.
    s.deploy("hubot", &[], json!({})).await;
    let deleted_sid = s.start_ok("hubot").await;
    assert_eq!(s.stop("hubot", &deleted_sid).await.status, 200);
    let r = s.req("DELETE", "/v1/agents/hubot", Some(&s.sk), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let shots = cattery_bin()
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/dashboard.cjs");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .env("NODE_PATH", playwright_dir().join("node_modules"))
        .env("CATTERY_URL", &s.base)
        .env("CATTERY_SK", &s.sk)
        .env("CATTERY_OTHER_SK", &other_sk)
        .env("CATTERY_AGENT", "dash")
        .env("CATTERY_OTHER_AGENT", "elsewhere")
        .env("CATTERY_DELETED_AGENT", "hubot")
        .env("CATTERY_DELETED_SESSION", &deleted_sid)
        .env("CATTERY_LEFT_NODE", "old-node")
        .env("CATTERY_COMMIT", env!("CATTERY_COMMIT"))
        .env("CATTERY_SCREENSHOTS", &shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(120), out.next_line())
            .await
            .expect("the browser script timed out")
            .unwrap()
    };

    // The session the page started runs in a live process.
    let line = next().await.expect("the browser script ended early");
    let sid = line.strip_prefix("SESSION ").expect(&line).to_string();
    let pid = session_pid(&s, "dash", &sid).await;
    assert!(pid_alive(pid), "the session's process {pid} runs");
    stdin.write_all(b"go\n").await.unwrap();

    // Stopped from the page: the process is gone, the end recorded.
    let line = next().await.expect("the browser script ended early");
    assert_eq!(line, format!("STOPPED {sid}"));
    wait_for(
        Duration::from_secs(5),
        "the stopped session's process to be gone",
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await;
    let ended = s.session("dash", &sid).await;
    assert_eq!(ended["endReason"], "stopped", "{ended:?}");
    stdin.write_all(b"go\n").await.unwrap();

    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .expect("the browser script timed out")
        .unwrap();
    assert!(
        status.success(),
        "the browser checks failed ({status}); screenshots in {}",
        shots.display()
    );
    assert!(shots.join("03-sessions-live.png").exists());
}

/// The dashboard keeps up with its user (`dashboard_ux.cjs`): the keyboard focus survives the
/// rows' refreshes, the agents page follows agents deployed and deleted while it is open, a
/// refused logs filter is told beside the filters, a crafted session link stays inside the
/// session's API path, a phone-sized window shows no page wider than the screen, and no request
/// of the page fails.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_keeps_up_with_the_user() {
    if !have_browser() {
        return;
    }
    let s = Server::start(&[]).await;
    s.deploy("dash", &[], json!({"autoScaling": {"minAgents": 1}}))
        .await;
    s.wait_ready("dash", Duration::from_secs(30)).await;
    let shots = cattery_bin()
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/dashboard_ux.cjs");
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .env("NODE_PATH", playwright_dir().join("node_modules"))
        .env("CATTERY_URL", &s.base)
        .env("CATTERY_SK", &s.sk)
        .env("CATTERY_AGENT", "dash")
        .env("CATTERY_TEST_AGENT", test_agent())
        .env("CATTERY_SCREENSHOTS", &shots)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser script timed out")
        .expect("run node");
    assert!(
        status.success(),
        "the browser checks failed ({status}); screenshots in {}",
        shots.display()
    );
}

/// Reads a server-sent event stream for `wait`; returns what arrived.
async fn read_stream(r: &mut reqwest::Response, wait: Duration, until: &str) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + wait;
    while !text.contains(until) {
        match tokio::time::timeout_at(deadline, r.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            _ => break,
        }
    }
    text
}

/// The live session stream of the dashboard (`GET /v1/sessions/events`) tells an org of its
/// own sessions only.
#[tokio::test(flavor = "multi_thread")]
async fn session_events_are_scoped_to_the_org() {
    let s = Server::start(&[]).await;
    s.deploy("mine", &[], json!({})).await;
    let other_sk = s.key("private", "other");
    let http = reqwest::Client::new();
    let open = |key: String| {
        let req = http
            .get(format!("{}/v1/sessions/events", s.base))
            .bearer_auth(key);
        async move { req.send().await.unwrap() }
    };
    let mut own = open(s.sk.clone()).await;
    let mut other = open(other_sk).await;
    assert_eq!(own.status(), 200);
    assert_eq!(other.status(), 200);
    let wait = Duration::from_secs(10);
    assert!(read_stream(&mut own, wait, "event: ready")
        .await
        .contains("event: ready"));
    assert!(read_stream(&mut other, wait, "event: ready")
        .await
        .contains("event: ready"));

    let sid = s.start_ok("mine").await;
    assert_eq!(s.stop("mine", &sid).await.status, 200);
    let seen = read_stream(&mut own, wait, "\"ended\"").await;
    assert!(seen.contains(&sid) && seen.contains("\"ended\""), "{seen}");
    let leaked = read_stream(&mut other, Duration::from_secs(2), &sid).await;
    assert!(
        !leaked.contains(&sid),
        "another org saw the session: {leaked}"
    );
}

/// "Talk to a bot" (issue 15): the dashboard's Talk page, in headless chromium with a fake
/// microphone, calls the SmallWebRTC echo example (`examples/webrtc-echo`, a real Pipecat bot)
/// with Pipecat's JavaScript client: a `webrtc` session, its offer through the session proxy,
/// the call connected and the bot's audio received (inbound-rtp), then hung up. Needs
/// `scripts/setup-python.sh` too (for the bot).
#[tokio::test(flavor = "multi_thread")]
async fn talk_to_a_webrtc_bot_in_a_browser() {
    if !have_browser() {
        return;
    }
    let python = std::env::var_os("CATTERY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::common::py_env_dir().join("main/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-python.sh first",
        python.display()
    );
    let s = Server::start(&[
        "--python",
        python.to_str().unwrap(),
        "--stop-grace-seconds",
        "3",
    ])
    .await;
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/webrtc-echo")
        .canonicalize()
        .unwrap();
    s.deploy(
        "rtc-talk",
        &[],
        json!({"command": null, "image": format!("local:{}", example.display())}),
    )
    .await;
    let shots = cattery_bin()
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    // A websocket session whose client never connects: listed as waiting (issue 17).
    let w = s
        .start_session("rtc-talk", json!({"transport": "websocket"}))
        .await;
    assert_eq!(w.status, 200, "{:?}", w.body);
    let waiting = w.body["sessionId"].as_str().unwrap().to_string();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/talk.cjs");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .env("NODE_PATH", playwright_dir().join("node_modules"))
        .env("CATTERY_URL", &s.base)
        .env("CATTERY_SK", &s.sk)
        .env("CATTERY_AGENT", "rtc-talk")
        .env("CATTERY_WAITING_SESSION", &waiting)
        .env("CATTERY_SCREENSHOTS", &shots)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(150), out.next_line())
            .await
            .expect("the browser script timed out")
            .unwrap()
            .expect("the browser script ended early (screenshot 06-talk-failed.png)")
    };
    let line = next().await;
    let sid = line.strip_prefix("SESSION ").expect(&line).to_string();
    let g = s.session("rtc-talk", &sid).await;
    assert_eq!(g["transport"], "webrtc", "{g:?}");
    assert!(g["botStartSeconds"].is_number(), "delivered: {g:?}");
    let line = next().await;
    assert!(line.starts_with("PACKETS "), "{line}");
    eprintln!("talk: {line}");
    assert_eq!(next().await, "ENDED");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the browser script timed out")
        .unwrap();
    assert!(status.success(), "the talk checks failed ({status})");
    assert!(shots.join("06-talk-connected.png").exists());
    // Hanging up ends the call; the bot sees its peer leave and the session ends.
    let g = s
        .wait_ended("rtc-talk", &sid, Duration::from_secs(30))
        .await;
    assert_eq!(g["endReason"], "completed", "{g:?}");
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    assert!(shots.join("07-sessions-waiting-client.png").exists());
    assert_eq!(s.stop("rtc-talk", &waiting).await.status, 200);
}
