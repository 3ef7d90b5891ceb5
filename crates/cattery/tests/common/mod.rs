//! Test harness: runs the real `cattery` binary on a free port with a temporary data dir,
//! creates keys with `cattery keys create`, and drives it over HTTP.
//!
//! Leak checks find an instance's processes by a tag: every agent deployed through
//! [`Server::deploy`] gets `CATTERY_TEST_TAG=<unique>` in its env, which every process of the
//! instance (grandchildren included) inherits; [`tagged_pids`] scans `/proc/*/environ` for it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod cluster;
#[allow(unused_imports)]
pub use cluster::{start_cluster, Cluster};

/// Path of the `cattery` binary under test.
pub fn cattery_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cattery"))
}

/// Path of `cattery-test-agent` (built on first use if missing).
pub fn test_agent() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = cattery_bin().with_file_name("cattery-test-agent");
        if !p.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "-p", "cattery-test-agent"])
                .status()
                .expect("run cargo build");
            assert!(st.success(), "building cattery-test-agent failed");
        }
        assert!(
            p.exists(),
            "cattery-test-agent not found at {}",
            p.display()
        );
        p
    })
    .clone()
}

/// A temporary directory other users may read (mode 0755): for bots and interpreters that
/// instances, which run under uids of their own, must reach (`tempfile::tempdir`'s mode
/// depends on the umask and the crate's version: set it).
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Where `scripts/setup-python.sh` puts its environments: `$CATTERY_PY_DIR`, else
/// `/var/cache/cattery-py` as root (instance uids must reach it, and `/root` is private), else
/// `~/.cache/cattery-py`.
pub fn py_env_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CATTERY_PY_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/cattery-py");
    }
    PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/cattery-py")
}

/// Writes `bytes` to a new file at `path` with mode 0600 (what the server asks of key files).
pub fn write_private(path: &std::path::Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The state letter of a process or thread from its `stat` file (`/proc/<pid>/stat`,
/// `/proc/<pid>/task/<tid>/stat`); `None` when it is gone.
fn proc_state(stat: &std::path::Path) -> Option<char> {
    let s = std::fs::read_to_string(stat).ok()?;
    s.rsplit_once(')')
        .map(|(_, r)| r.trim_start().chars().next().unwrap_or('Z'))
}

/// Whether a process is alive (not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    let st = proc_state(std::path::Path::new(&format!("/proc/{pid}/stat")));
    !matches!(st, Some('Z') | Some('X') | None)
}

/// Whether `pid` is a Python fork server (its cgroup is a `zygote-*` one): it imports an
/// agent's bot once and lives between sessions, so it is no instance process.
pub fn is_fork_server(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.lines().any(|l| l.contains("/zygote-")))
}

/// Live (non-zombie) pids whose environment has `CATTERY_TEST_TAG=<tag>`, fork servers aside
/// ([`is_fork_server`]; their instances, forked from them, carry the tag too).
pub fn tagged_pids(tag: &str) -> Vec<i32> {
    let mut out = tagged_pids_all(tag);
    out.retain(|p| !is_fork_server(*p));
    out
}

/// Live (non-zombie) pids whose environment has `CATTERY_TEST_TAG=<tag>`, fork servers included.
pub fn tagged_pids_all(tag: &str) -> Vec<i32> {
    let needle = format!("CATTERY_TEST_TAG={tag}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) && pid_alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if t0.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A websocket client of a session (`Server::ws_call`).
pub type WsClient =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A running `cattery serve`.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub sk: String,
    pub pk: String,
    pub http: reqwest::Client,
    pub args: Vec<String>,
    pub tag: String,
    /// Extra environment for the server process (e.g. `CATTERY_NO_CGROUPS=1`).
    pub env: Vec<(String, String)>,
    /// Open-files limit (soft and hard) of the server process, if set.
    pub nofile: Option<u64>,
    /// A descriptor the server process inherits (open, not close-on-exec) under the given
    /// number, as a shell or a service manager may leave one: `(descriptor here, number there)`.
    pub inherited_fd: Option<(std::os::fd::RawFd, i32)>,
}

/// A response: status and JSON body (Null when not JSON).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
}

impl Server {
    /// Starts a server with extra `serve` flags.
    pub async fn start(extra: &[&str]) -> Server {
        Self::start_with_env(extra, &[]).await
    }

    /// Starts a server with extra `serve` flags and extra environment variables.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_limited(extra, env, None).await
    }

    /// Starts a server with extra flags, environment, and an open-files limit (soft and hard).
    pub async fn start_limited(
        extra: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Server {
        Self::unstarted(extra, env, nofile).start_now().await
    }

    /// A server set up but not started yet: set its fields, then `start_now`.
    pub fn unstarted(extra: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        Server {
            child: None,
            port,
            base: format!("http://127.0.0.1:{port}"),
            sk: String::new(),
            pk: String::new(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(32)
                // Never reuse a connection idle for the server's keep-alive timeout (10 s): the
                // server may close it as the request goes out (a reset, not a retry).
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            tag: uuid::Uuid::new_v4().to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nofile,
            inherited_fd: None,
            dir,
        }
    }

    /// Starts a server made by `unstarted` and makes its default org's keys.
    pub async fn start_now(mut self) -> Server {
        self.spawn().await;
        self.sk = self.key("private", "default");
        self.pk = self.key("public", "default");
        self
    }

    /// Data dir path.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// (Re)starts the server process on the same port and data dir.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut cmd = Command::new(cattery_bin());
        if let Some((fd, to)) = self.inherited_fd {
            use std::os::unix::process::CommandExt;
            // SAFETY: dup2 and fcntl are async-signal-safe; the closure holds two integers.
            unsafe {
                cmd.pre_exec(move || {
                    if fd == to {
                        libc::fcntl(fd, libc::F_SETFD, 0);
                    } else if libc::dup2(fd, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let l = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and reads a struct copied into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.args)
            .env("CATTERY_LOG", "info,cattery=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn cattery serve");
        self.child = Some(child);
        // Until /health answers; a server that exits meanwhile fails at once, with its log.
        let url = format!("{}/health", self.base);
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || t0.elapsed() > Duration::from_secs(30) {
                let log =
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "cattery serve did not answer /health ({}); its log ends:\n{}",
                    exited.map_or_else(
                        || "timed out after 30 s".to_string(),
                        |st| format!("exited: {st}")
                    ),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `cattery keys create` and returns the key.
    pub fn key(&self, kind: &str, org: &str) -> String {
        let out = Command::new(cattery_bin())
            .args(["keys", "create", "--type", kind, "--org", org, "--data-dir"])
            .arg(self.dir.path())
            // The server's environment: `CATTERY_DATABASE_URL` names its store.
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let k = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(!k.contains('\n'), "keys create printed more than the key");
        k
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Server pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: i32) {
        unsafe_kill(self.pid(), sig);
    }

    /// Stops the server with SIGSTOP and waits until every one of its threads is stopped: the
    /// signal is delivered asynchronously, and a thread still running for a moment could
    /// otherwise serve a request sent right after it.
    pub async fn freeze(&self) {
        const SIGSTOP: i32 = 19;
        self.signal(SIGSTOP);
        let all_stopped = || {
            let Ok(rd) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
                return false;
            };
            rd.flatten()
                .all(|t| matches!(proc_state(&t.path().join("stat")), Some('T' | 't')))
        };
        let began = Instant::now();
        while !all_stopped() {
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "the server's threads did not stop"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Kills the server with SIGKILL and reaps it (agents keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id() as i32, 15);
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if t0.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Any request with a key.
    pub async fn req(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let url = format!("{}{}", self.base, path);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, url).timeout(Duration::from_secs(120));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        Self::resp(r).await
    }

    /// A request with a raw body.
    pub async fn raw(&self, method: &str, path: &str, key: Option<&str>, body: Vec<u8>) -> Resp {
        let url = format!("{}{}", self.base, path);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self
            .http
            .request(m, url)
            .body(body)
            .header("content-type", "application/json");
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        Self::resp(rb.send().await.expect("request")).await
    }

    /// An answer as a [`Resp`]: status, content type, JSON body (`Null` when not JSON).
    pub async fn resp(r: reqwest::Response) -> Resp {
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = r.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            body,
            content_type,
        }
    }

    /// Deploys the test agent with switches and extra fields; panics unless 200.
    /// With `CATTERY_TEST_RUNTIME=docker`, the agent is the `cattery-test/agent` image instead
    /// (switches in `CATTERY_TEST_AGENT_ARGS`): the same test then runs against containers.
    pub async fn deploy(&self, name: &str, switches: &[&str], extra: Value) -> Value {
        let mut cmd = vec![test_agent().display().to_string()];
        cmd.extend(switches.iter().map(|s| s.to_string()));
        let mut body =
            json!({"serviceName": name, "command": cmd, "env": {"CATTERY_TEST_TAG": self.tag}});
        if std::env::var("CATTERY_TEST_RUNTIME").as_deref() == Ok("docker") {
            body["command"] = Value::Null;
            body["image"] = json!("cattery-test/agent:latest");
            body["env"]["CATTERY_TEST_AGENT_ARGS"] = json!(switches.join(" "));
        }
        if let Value::Object(m) = extra {
            for (k, v) in m {
                if k == "env" {
                    for (ek, ev) in v.as_object().unwrap() {
                        body["env"][ek] = ev.clone();
                    }
                } else {
                    body[k] = v;
                }
            }
        }
        let r = self
            .req("POST", "/v1/agents", Some(&self.sk), Some(body))
            .await;
        assert_eq!(r.status, 200, "deploy {name}: {:?}", r.body);
        r.body
    }

    /// `POST /v1/public/{agent}/start`.
    pub async fn start_session(&self, agent: &str, body: Value) -> Resp {
        self.req(
            "POST",
            &format!("/v1/public/{agent}/start"),
            Some(&self.pk),
            Some(body),
        )
        .await
    }

    /// Starts a session and returns its id; panics unless 200.
    pub async fn start_ok(&self, agent: &str) -> String {
        let r = self.start_session(agent, json!({})).await;
        assert_eq!(r.status, 200, "start {agent}: {:?}", r.body);
        r.body["sessionId"].as_str().unwrap().to_string()
    }

    /// A detach upgrade under a live websocket call (`--on-stop detach`): SIGTERMs this
    /// server, waits until it says it relays its calls, starts the next server on the data
    /// dir and checks that it re-adopted session `sid`. Returns the old process, which goes on
    /// relaying the call.
    pub async fn detach_relaying_and_restart(&mut self, sid: &str) -> Child {
        self.signal(15);
        wait_for(Duration::from_secs(20), "old server relaying", || async {
            self.log()
                .contains("relaying the websocket calls")
                .then_some(())
        })
        .await;
        let old = self.child.take().expect("old server");
        self.spawn().await;
        assert!(
            self.log().contains("re-adopted a running session") && self.log().contains(sid),
            "{}",
            self.log()
        );
        old
    }

    /// Starts a websocket session of `agent` and connects its client (the start's `wsUrl`
    /// with its token); returns the session id and the client. Panics unless both work.
    pub async fn ws_call(&self, agent: &str) -> (String, WsClient) {
        let r = self
            .start_session(agent, json!({"transport": "websocket"}))
            .await;
        assert_eq!(r.status, 200, "start {agent}: {:?}", r.body);
        let url = format!(
            "{}?token={}",
            r.body["wsUrl"].as_str().unwrap(),
            r.body["token"].as_str().unwrap()
        );
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("ws connect");
        (r.body["sessionId"].as_str().unwrap().to_string(), ws)
    }

    /// `DELETE .../sessions/{id}`.
    pub async fn stop(&self, agent: &str, sid: &str) -> Resp {
        self.req(
            "DELETE",
            &format!("/v1/agents/{agent}/sessions/{sid}"),
            Some(&self.sk),
            None,
        )
        .await
    }

    /// `GET .../sessions/{id}` body; panics unless 200.
    pub async fn session(&self, agent: &str, sid: &str) -> Value {
        let r = self
            .req(
                "GET",
                &format!("/v1/agents/{agent}/sessions/{sid}"),
                Some(&self.sk),
                None,
            )
            .await;
        if r.status != 200 {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "get session {sid}: {} {:?}\nserver log tail:\n{}",
                r.status,
                r.body,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        r.body
    }

    /// The newest session of `agent`: the first of `GET /v1/agents/{agent}/sessions` (newest
    /// first), `null` when it has none; panics unless the list answers 200.
    pub async fn latest_session(&self, agent: &str) -> Value {
        let r = self
            .req(
                "GET",
                &format!("/v1/agents/{agent}/sessions"),
                Some(&self.sk),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "list {agent}'s sessions: {:?}", r.body);
        r.body["sessions"][0].clone()
    }

    /// Waits until a session has ended and returns it.
    pub async fn wait_ended(&self, agent: &str, sid: &str, timeout: Duration) -> Value {
        wait_for(timeout, "session end", || async {
            let s = self.session(agent, sid).await;
            (!s["endedAt"].is_null()).then_some(s)
        })
        .await
    }

    /// `GET /v1/agents/{name}` body.
    pub async fn agent(&self, name: &str) -> Value {
        self.req("GET", &format!("/v1/agents/{name}"), Some(&self.sk), None)
            .await
            .body
    }

    /// Waits until the agent reports `ready: true`.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Value {
        wait_for(timeout, "agent ready", || async {
            let a = self.agent(name).await;
            (a["ready"] == true).then_some(a)
        })
        .await
    }

    /// Live processes of this server's test agents.
    pub fn agent_pids(&self) -> Vec<i32> {
        tagged_pids(&self.tag)
    }

    /// Waits until no process of this server's agents is alive.
    pub async fn wait_no_agent_pids(&self, timeout: Duration) {
        wait_for(timeout, "agent processes to be gone", || async {
            self.agent_pids().is_empty().then_some(())
        })
        .await
    }

    /// Agent log lines (`GET .../logs`) oldest first, as text.
    pub fn log_lines_for(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Sends signal `sig` to `pid` (by pid only).
pub fn unsafe_kill(pid: i32, sig: i32) {
    if let Ok(s) = nix::sys::signal::Signal::try_from(sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Drain quickly: SIGTERM twice stops every session now.
            let pid = self.pid();
            unsafe_kill(pid, 15);
            std::thread::sleep(Duration::from_millis(50));
            unsafe_kill(pid, 15);
            let _ = self.terminate(Duration::from_secs(20));
        }
        // Belt and braces: kill whatever an agent of this test left (by tag, never by name).
        for pid in tagged_pids_all(&self.tag) {
            unsafe_kill(pid, 9);
        }
        // And the containers of this server (Docker runtime) a killed server left, by label.
        if self.log().contains("connected to the Docker engine") {
            if let Ok(id) = std::fs::read_to_string(self.dir.path().join("server-id")) {
                let f = format!("label=org.cattery.server={}", id.trim());
                let docker = "/usr/bin/docker";
                if let Ok(out) = Command::new(docker)
                    .args(["ps", "-a", "-q", "--filter", &f])
                    .output()
                {
                    let ids = String::from_utf8_lossy(&out.stdout).into_owned();
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    if !ids.is_empty() {
                        let _ = Command::new(docker)
                            .args(["rm", "-f", "-v"])
                            .args(&ids)
                            .output();
                    }
                }
            }
        }
    }
}

/// Debian's chromium, for the browser tests.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Where playwright-core is installed (`scripts/setup-playwright.sh`).
pub fn playwright_dir() -> PathBuf {
    std::env::var_os("CATTERY_PLAYWRIGHT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/cattery/playwright")
        })
}

/// Whether node, chromium and playwright-core are there; otherwise skips (or fails under
/// `CATTERY_REQUIRE_BROWSER`).
pub fn have_browser() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = if !node {
        Some("node is not installed".to_string())
    } else if !Path::new(CHROMIUM).exists() {
        Some(format!("{CHROMIUM} is not installed"))
    } else if !playwright_dir()
        .join("node_modules/playwright-core")
        .exists()
    {
        Some(format!(
            "playwright-core is not installed in {}",
            playwright_dir().display()
        ))
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var_os("CATTERY_REQUIRE_BROWSER").is_some() => {
            panic!("CATTERY_REQUIRE_BROWSER is set, but {why} (.ci/run installs it)")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}
