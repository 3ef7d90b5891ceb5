//! A `cattery serve` child on a temporary data dir and a free loopback port, its keys, and a
//! keep-alive HTTP client that times and counts every call.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::sys;

/// The binaries the bench drives.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `cattery`.
    pub cattery: PathBuf,
    /// `cattery-test-agent`.
    pub agent: PathBuf,
}

impl Bins {
    /// Finds the binaries: the given paths, else next to this executable.
    pub fn find(cattery: Option<PathBuf>, agent: Option<PathBuf>) -> anyhow::Result<Bins> {
        let here = std::env::current_exe()?;
        let dir = here.parent().context("no executable directory")?;
        let b = Bins {
            cattery: cattery.unwrap_or_else(|| dir.join("cattery")),
            agent: agent.unwrap_or_else(|| dir.join("cattery-test-agent")),
        };
        for p in [&b.cattery, &b.agent] {
            if !p.is_file() {
                bail!(
                    "{} not found; build with `cargo build --release -p cattery -p cattery-test-agent -p cattery-bench`",
                    p.display()
                );
            }
        }
        Ok(b)
    }
}

/// Which key a call uses.
#[derive(Debug, Clone, Copy)]
pub enum Key {
    /// The private key (management API).
    Private,
    /// The public key (session start).
    Public,
    /// No key.
    None,
}

/// Counts of answers by class, over the server's whole life.
#[derive(Debug, Default)]
pub struct Counters {
    /// 2xx answers.
    pub ok: AtomicU64,
    /// 4xx answers.
    pub client_err: AtomicU64,
    /// 5xx answers.
    pub server_err: AtomicU64,
    /// Requests that got no answer (connection error, timeout).
    pub transport_err: AtomicU64,
}

impl Counters {
    /// `(2xx, 4xx, 5xx, no answer)`.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.client_err.load(Ordering::Relaxed),
            self.server_err.load(Ordering::Relaxed),
            self.transport_err.load(Ordering::Relaxed),
        )
    }
}

/// An answer: status, JSON body (Null when not JSON) and the round trip, ms.
#[derive(Debug, Clone)]
pub struct Resp {
    /// HTTP status; 0 when no answer came.
    pub status: u16,
    /// Body as JSON, `Null` when empty or not JSON; `{"transport_error": ...}` when no answer.
    pub body: Value,
    /// Time from sending the request to having read the whole answer, ms.
    pub ms: f64,
}

impl Resp {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A running `cattery serve`.
pub struct Server {
    child: Option<Child>,
    /// Its pid.
    pub pid: i32,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// Private key (`sk_...`).
    pub sk: String,
    /// Public key (`pk_...`).
    pub pk: String,
    /// Keep-alive client shared by every call.
    pub http: reqwest::Client,
    /// Answer counts.
    pub counters: Arc<Counters>,
    bins: Bins,
    extra_args: Vec<String>,
    log_path: PathBuf,
}

/// A keep-alive client that never uses a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        // Never reuse a connection idle for the server's keep-alive timeout (10 s): the server
        // may close it as the request goes out (a reset, not a retry).
        .pool_idle_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("building an HTTP client")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn create_key(bins: &Bins, dir: &Path, kind: &str, extra: &[String]) -> anyhow::Result<String> {
    // The server's store: its `--database-url`, if any.
    let db = extra
        .iter()
        .position(|a| a == "--database-url")
        .and_then(|i| extra.get(i..i + 2))
        .unwrap_or_default();
    let out = Command::new(&bins.cattery)
        .args(["keys", "create", "--type", kind, "--data-dir"])
        .arg(dir)
        .args(db)
        .env_remove("CATTERY_DATA_DIR")
        .stderr(Stdio::inherit())
        .output()
        .context("running cattery keys create")?;
    if !out.status.success() {
        bail!("cattery keys create --type {kind} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Server {
    /// Starts `cattery serve` in `data_dir` with `extra_args`, then creates its keys.
    pub async fn start(bins: &Bins, data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let mut s = Server {
            child: None,
            pid: 0,
            base: String::new(),
            data_dir: data_dir.to_path_buf(),
            sk: String::new(),
            pk: String::new(),
            http: client(),
            counters: Arc::new(Counters::default()),
            bins: bins.clone(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            log_path: data_dir.join("bench-server.log"),
        };
        s.launch().await?;
        // Keys go into the database the server created (`keys create` works while it runs).
        s.sk = create_key(bins, data_dir, "private", &s.extra_args)?;
        s.pk = create_key(bins, data_dir, "public", &s.extra_args)?;
        Ok(s)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let port = free_port()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = Command::new(&self.bins.cattery);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .args(
                // A node of a cluster: where the other nodes reach it.
                self.extra_args
                    .iter()
                    .any(|a| a == "--cluster-secret-file")
                    .then(|| {
                        [
                            "--advertise-url".to_string(),
                            format!("http://127.0.0.1:{port}"),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CATTERY_") && k != "CATTERY_LOG" {
                cmd.env_remove(&k);
            }
        }
        let child = cmd.spawn().context("starting cattery serve")?;
        self.pid = child.id() as i32;
        self.child = Some(child);
        self.base = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!(
                        "cattery serve exited at start ({st}); log: {}",
                        self.log_tail()
                    );
                }
            }
            if let Ok(r) = self
                .http
                .get(format!("{}/health", self.base))
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("cattery serve did not answer /health within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Lines of the server's log that report errors (`ERROR` level or a panic).
    pub fn log_errors(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
            .map(str::to_string)
            .collect()
    }

    /// The server's id (names its cgroup subtree).
    pub fn server_id(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server-id"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Stops the server: SIGTERM (drain), a second SIGTERM after `patience` (stop sessions
    /// now), SIGKILL to its pid only after 60 s more. Returns its exit status as text.
    pub async fn stop(&mut self, patience: Duration) -> anyhow::Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("not running".into());
        };
        sys::signal(self.pid, libc::SIGTERM);
        let t0 = Instant::now();
        let mut second = false;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st.to_string());
            }
            if !second && t0.elapsed() > patience {
                second = true;
                sys::signal(self.pid, libc::SIGTERM);
            }
            if t0.elapsed() > patience + Duration::from_secs(60) {
                let _ = child.kill();
                let st = child.wait()?;
                bail!("cattery serve did not exit within 60 s of a second SIGTERM ({st})");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs the server (a crash: no drain, its instances live on), then starts it again
    /// on the same data dir (new port).
    pub async fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        self.launch().await
    }

    /// Starts the server again on the same data dir (new port).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.stop(Duration::from_secs(2)).await?;
        }
        self.launch().await
    }

    /// One call: `method path` with an optional JSON body; times the whole round trip.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Key,
        body: Option<&Value>,
    ) -> Resp {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        match key {
            Key::Private => req = req.bearer_auth(&self.sk),
            Key::Public => req = req.bearer_auth(&self.pk),
            Key::None => {}
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let t0 = Instant::now();
        let res = async {
            let r = req.send().await?;
            let status = r.status().as_u16();
            let bytes = r.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        }
        .await;
        let ms = crate::stats::ms(t0.elapsed());
        match res {
            Ok((status, bytes)) => {
                let c = &self.counters;
                match status {
                    200..=299 => c.ok.fetch_add(1, Ordering::Relaxed),
                    500..=599 => c.server_err.fetch_add(1, Ordering::Relaxed),
                    _ => c.client_err.fetch_add(1, Ordering::Relaxed),
                };
                Resp {
                    status,
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    ms,
                }
            }
            Err(e) => {
                self.counters.transport_err.fetch_add(1, Ordering::Relaxed);
                Resp {
                    status: 0,
                    body: json!({ "transport_error": e.to_string() }),
                    ms,
                }
            }
        }
    }

    /// `GET path` with the private key.
    pub async fn get(&self, path: &str) -> Resp {
        self.call(reqwest::Method::GET, path, Key::Private, None)
            .await
    }

    /// Deploys `cattery-test-agent` with `switches` as agent `name`, tagged with
    /// `CATTERY_BENCH_TAG=<tag>` (and `CATTERY_BENCH_AGENT=<name>`).
    #[allow(clippy::too_many_arguments)]
    pub async fn deploy(
        &self,
        name: &str,
        switches: &[&str],
        min: u32,
        max: u32,
        grace_s: f64,
        tag: &str,
    ) -> anyhow::Result<()> {
        let mut command = vec![self.bins.agent.display().to_string()];
        command.extend(switches.iter().map(|s| s.to_string()));
        let body = json!({
            "serviceName": name,
            "command": command,
            "autoScaling": {"minAgents": min, "maxAgents": max},
            "stopGraceSeconds": grace_s,
            "env": {"CATTERY_BENCH_TAG": tag, "CATTERY_BENCH_AGENT": name},
        });
        self.create_agent(name, &body).await
    }

    /// `POST /v1/agents` with `body`; an error unless 2xx.
    pub async fn create_agent(&self, name: &str, body: &Value) -> anyhow::Result<()> {
        let r = self
            .call(
                reqwest::Method::POST,
                "/v1/agents",
                Key::Private,
                Some(body),
            )
            .await;
        if !r.ok() {
            bail!("deploying {name} failed: HTTP {} {}", r.status, r.body);
        }
        Ok(())
    }

    /// Deletes an agent (idle instances go; running sessions go on).
    pub async fn undeploy(&self, name: &str) -> Resp {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/agents/{name}"),
            Key::Private,
            None,
        )
        .await
    }

    /// `warmInstances` of an agent: `(starting, idle, busy, total)`.
    pub async fn pool(&self, name: &str) -> Option<(u64, u64, u64, u64)> {
        let r = self.get(&format!("/v1/agents/{name}")).await;
        let w = r.body.get("warmInstances")?;
        let n = |k: &str| w.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some((n("starting"), n("idle"), n("busy"), n("total")))
    }

    /// Waits until the agent has at least `idle` ready warm instances and none starting.
    pub async fn wait_idle(&self, name: &str, idle: u64, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some((starting, i, _, _)) = self.pool(name).await {
                if i >= idle && starting == 0 {
                    return Ok(());
                }
            }
            if t0.elapsed() > timeout {
                bail!(
                    "agent {name}: warm pool not at {idle} idle within {timeout:?} ({:?})",
                    self.pool(name).await
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `POST /v1/public/{name}/start` with an empty body.
    pub async fn start_session(&self, name: &str) -> Resp {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/public/{name}/start"),
            Key::Public,
            Some(&json!({})),
        )
        .await
    }

    /// `DELETE /v1/agents/{name}/sessions/{id}`.
    pub async fn stop_session(&self, name: &str, id: &str) -> Resp {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/agents/{name}/sessions/{id}"),
            Key::Private,
            None,
        )
        .await
    }

    /// Number of active sessions of an agent (`status=active` total).
    pub async fn active_count(&self, name: &str) -> Option<u64> {
        let r = self
            .get(&format!("/v1/agents/{name}/sessions?status=active&limit=1"))
            .await;
        r.body.get("total_count").and_then(Value::as_u64)
    }

    /// Every session record of an agent (paged 1,000 at a time, newest first).
    pub async fn all_sessions(&self, name: &str) -> anyhow::Result<(u64, Vec<Value>)> {
        let mut out = Vec::new();
        let mut total = 0;
        loop {
            let r = self
                .get(&format!(
                    "/v1/agents/{name}/sessions?limit=1000&offset={}",
                    out.len()
                ))
                .await;
            if !r.ok() {
                bail!("listing sessions of {name}: HTTP {} {}", r.status, r.body);
            }
            total = r.body["total_count"].as_u64().unwrap_or(total);
            let page = r.body["sessions"].as_array().cloned().unwrap_or_default();
            let n = page.len();
            out.extend(page);
            if n == 0 || out.len() as u64 >= total {
                break;
            }
        }
        Ok((total, out))
    }

    /// Server RSS, bytes.
    pub fn rss(&self) -> u64 {
        sys::rss_bytes(self.pid).unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Last resort: our own child only, by pid.
            sys::signal(self.pid, libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(200));
            sys::signal(self.pid, libc::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
