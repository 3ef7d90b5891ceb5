//! Helpers shared by the `lifecycle*.rs` tests (issue 5, `docs/lifecycle.md`): instance
//! introspection through the session proxy and `/proc`, zombies, logs, raw deploys.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::common::{pid_alive, test_agent, wait_for, Resp, Server};

/// `GET /v1/public/{agent}/sessions/{sid}/info` through the session proxy (the test agent's
/// `{"pid","pgid","childPid","rssBytes",...}`); panics unless 200.
pub async fn info(s: &Server, agent: &str, sid: &str) -> Value {
    let r = s
        .req(
            "GET",
            &format!("/v1/public/{agent}/sessions/{sid}/info"),
            Some(&s.pk),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "info of {sid}: {:?}", r.body);
    r.body
}

/// `info` once the agent has taken the session (`sessionsServed` 1). A start answers once
/// the session is sent to the instance; the agent may still be reading it.
pub async fn info_served(s: &Server, agent: &str, sid: &str) -> Value {
    wait_for(
        Duration::from_secs(5),
        "the agent to take its session",
        || async {
            let i = info(s, agent, sid).await;
            (i["sessionsServed"] != 0).then_some(i)
        },
    )
    .await
}

/// The main pid of a live session's instance.
pub async fn session_pid(s: &Server, agent: &str, sid: &str) -> i32 {
    info(s, agent, sid).await["pid"].as_i64().unwrap() as i32
}

/// State letter of `/proc/<pid>/stat` (`R`, `S`, `Z`...), `None` when the pid does not exist.
pub fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Parent pid from `/proc/<pid>/stat`.
pub fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Zombie children of `parent` (state `Z`, not yet reaped).
pub fn zombie_children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if proc_state(pid) == Some('Z') && ppid(pid) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Waits (up to 5 s, a zombie may exist for the instant between exit and reap) until the
/// server has no unreaped children.
pub async fn assert_no_zombies(s: &Server) {
    let server = s.pid();
    wait_for(
        Duration::from_secs(5),
        "zombie children to be reaped",
        || async move { zombie_children(server).is_empty().then_some(()) },
    )
    .await;
}

/// Value of env var `key` of process `pid`.
pub fn pid_env(pid: i32, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{key}=");
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Waits until `pid` is gone (or a zombie).
pub async fn wait_pid_gone(pid: i32, timeout: Duration) {
    wait_for(timeout, &format!("pid {pid} to be gone"), || async move {
        (!pid_alive(pid)).then_some(())
    })
    .await;
}

/// Deploys an arbitrary command (with the server's leak-check tag in its env).
pub async fn deploy_cmd(s: &Server, name: &str, cmd: Vec<String>, extra: Value) -> Value {
    let mut body = json!({"serviceName": name, "command": cmd, "env": {"CATTERY_TEST_TAG": s.tag}});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
    let r = s.req("POST", "/v1/agents", Some(&s.sk), Some(body)).await;
    assert_eq!(r.status, 200, "deploy {name}: {:?}", r.body);
    r.body
}

/// The test agent's path as a string.
pub fn agent_bin() -> String {
    test_agent().display().to_string()
}

/// Ids of an agent's active sessions.
pub async fn active_sessions(s: &Server, agent: &str) -> Vec<String> {
    let r = s
        .req(
            "GET",
            &format!("/v1/agents/{agent}/sessions?status=active&limit=1000"),
            Some(&s.sk),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["sessionId"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until the agent has an active session (a start in flight) and returns its id.
pub async fn wait_active_session(s: &Server, agent: &str) -> String {
    wait_for(Duration::from_secs(10), "an active session", || async {
        active_sessions(s, agent).await.into_iter().next()
    })
    .await
}

/// One log record of the logs API.
#[derive(Debug, Clone)]
pub struct LogRec {
    pub log: String,
    pub stream: String,
    pub timestamp: String,
    pub session_id: Option<String>,
}

/// A session's log records, oldest first (`GET /v1/agents/{agent}/logs?sessionId=`).
pub async fn session_logs(s: &Server, agent: &str, sid: &str) -> Vec<LogRec> {
    let r = s
        .req(
            "GET",
            &format!("/v1/agents/{agent}/logs?sessionId={sid}&order=asc&limit=10000"),
            Some(&s.sk),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "logs: {:?}", r.body);
    r.body["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LogRec {
            log: l["log"].as_str().unwrap_or_default().to_string(),
            stream: l["stream"].as_str().unwrap_or_default().to_string(),
            timestamp: l["timestamp"].as_str().unwrap_or_default().to_string(),
            session_id: l["sessionId"].as_str().map(str::to_string),
        })
        .collect()
}

/// Waits until a session's logs contain a line with `needle` (log writing is asynchronous).
pub async fn wait_log(s: &Server, agent: &str, sid: &str, needle: &str) -> Vec<LogRec> {
    wait_for(
        Duration::from_secs(10),
        &format!("log line {needle:?}"),
        || async {
            let l = session_logs(s, agent, sid).await;
            l.iter().any(|r| r.log.contains(needle)).then_some(l)
        },
    )
    .await
}

/// `GET /v1/agents/{name}` `warmInstances` counters.
pub async fn warm(s: &Server, agent: &str) -> Value {
    s.agent(agent).await["warmInstances"].clone()
}

/// Waits until the agent reports `idle` ready warm instances (and nothing starting).
pub async fn wait_warm_idle(s: &Server, agent: &str, idle: u64, timeout: Duration) -> Value {
    wait_for(
        timeout,
        &format!("{idle} idle warm instance(s)"),
        || async {
            let w = warm(s, agent).await;
            (w["idle"] == idle && w["starting"] == 0).then_some(w)
        },
    )
    .await
}

/// Waits until the agent has no instance at all (capacity fully released).
pub async fn wait_no_instances(s: &Server, agent: &str, timeout: Duration) {
    wait_for(timeout, "no instances left", || async {
        (warm(s, agent).await["total"] == 0).then_some(())
    })
    .await
}

/// Unix time in ms now.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Parses an ISO-8601 UTC time (`...Z`) into Unix ms.
pub fn iso_to_ms(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad time {s:?}: {e}"))
        .timestamp_millis()
}

/// Directory of a live instance (captured output), found through its main pid's env.
pub fn instance_dir(s: &Server, pid: i32) -> PathBuf {
    let id = pid_env(pid, "CATTERY_INSTANCE_ID").expect("CATTERY_INSTANCE_ID of the agent");
    s.data_dir().join("instances").join(id)
}

/// Polls `pid` every millisecond on a thread; resolves to the Unix ms at which it was first
/// seen gone (or a zombie).
pub fn watch_death(pid: i32, timeout: Duration) -> tokio::task::JoinHandle<Option<i64>> {
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if !pid_alive(pid) {
                return Some(unix_ms());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    })
}

/// Waits for a line containing `needle` in an instance's captured stdout and returns the
/// test agent's own timestamp of it (Unix ms; the line starts with `<ISO time>Z | `).
pub async fn wait_stdout_line(dir: PathBuf, needle: &'static str, timeout: Duration) -> i64 {
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(text) = std::fs::read_to_string(dir.join("stdout.log")) {
                if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                    let ts = line.split(" | ").next().unwrap().trim();
                    return iso_to_ms(ts);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("no {needle:?} in {}", dir.display());
    })
    .await
    .unwrap()
}

/// Asserts an error body `{error, code}` with this status and code.
pub fn assert_err(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {:?}", r.body);
    assert!(r.body["error"].is_string(), "error missing: {:?}", r.body);
    assert_eq!(r.body["code"], code, "body: {:?}", r.body);
}

/// Whether a TCP port on loopback can be bound (nothing holds it).
pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Waits for the server process to exit by itself; returns how long it took.
pub async fn wait_server_exit(s: &mut Server, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    let c = s.child.as_mut().expect("server running");
    loop {
        if let Ok(Some(_)) = c.try_wait() {
            s.child = None;
            return t0.elapsed();
        }
        if t0.elapsed() > timeout {
            panic!("server did not exit within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
