//! The figures: floor, warm start, cold start overhead, stop, churn, concurrency, API latency.
//! Each phase deploys its own agent (tagged), measures, and deletes it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::future::join_all;
use rand::seq::IndexedRandom;
use serde_json::{json, Value};

use crate::floor;
use crate::report::{Report, Target};
use crate::server::{Bins, Server};
use crate::stats::summarize;
use crate::sys;

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `quick` or `full`.
    pub mode: &'static str,
    /// fork/exec runs (each variant).
    pub fork_runs: usize,
    /// Loopback HTTP round trips (floor and `/health`).
    pub http_runs: usize,
    /// Direct test agent start/exit runs.
    pub agent_direct_runs: usize,
    /// Warm start rounds per concurrency `(concurrency, rounds)`; samples = c x rounds.
    pub warm: Vec<(usize, usize)>,
    /// Cold start runs (agent with no startup delay).
    pub cold_runs: usize,
    /// Cold start runs of an agent with a 100 ms startup delay (method check).
    pub cold_delay_runs: usize,
    /// Stop runs, cooperative agent.
    pub stop_coop_runs: usize,
    /// Stop runs, agent ignoring SIGTERM.
    pub stop_ignore_runs: usize,
    /// Stop grace of the SIGTERM-ignoring agent, seconds.
    pub stop_ignore_grace_s: f64,
    /// Churn duration, seconds.
    pub churn_seconds: f64,
    /// Concurrent churn workers (each: start, then stop, in a loop).
    pub churn_workers: usize,
    /// Active sessions to reach, and the counts at which to measure on the way.
    pub concurrency_checkpoints: Vec<usize>,
    /// Stored session counts for API latency.
    pub api_sizes: Vec<u64>,
    /// `GET session` runs per size.
    pub api_get_runs: usize,
    /// Session proxy and direct load runs `(concurrency, requests per client)`.
    pub proxy: Vec<(usize, usize)>,
    /// Websocket runs: `(text echoes, 20 ms frames each way)`.
    pub relay: (usize, usize),
    /// List runs per size.
    pub api_list_runs: usize,
}

impl Plan {
    /// The quick plan (about a minute on 2 cores).
    pub fn quick() -> Self {
        Plan {
            mode: "quick",
            fork_runs: 200,
            http_runs: 500,
            agent_direct_runs: 10,
            warm: vec![(1, 30), (8, 8), (64, 2)],
            cold_runs: 20,
            cold_delay_runs: 0,
            stop_coop_runs: 20,
            stop_ignore_runs: 5,
            stop_ignore_grace_s: 0.2,
            churn_seconds: 5.0,
            churn_workers: 8,
            concurrency_checkpoints: vec![50, 100],
            api_sizes: vec![1_000, 100_000],
            api_get_runs: 100,
            api_list_runs: 30,
            proxy: vec![(1, 200), (8, 40), (64, 5)],
            relay: (100, 100),
        }
    }

    /// The full plan (under 10 minutes on 2 cores).
    pub fn full() -> Self {
        Plan {
            mode: "full",
            fork_runs: 1000,
            http_runs: 5000,
            agent_direct_runs: 50,
            warm: vec![(1, 300), (8, 60), (64, 10)],
            cold_runs: 200,
            cold_delay_runs: 30,
            stop_coop_runs: 200,
            stop_ignore_runs: 20,
            stop_ignore_grace_s: 0.2,
            churn_seconds: 30.0,
            churn_workers: 8,
            concurrency_checkpoints: vec![100, 250, 500, 1000],
            api_sizes: vec![1_000, 10_000, 100_000],
            api_get_runs: 500,
            api_list_runs: 200,
            proxy: vec![(1, 3000), (8, 500), (64, 60)],
            relay: (1000, 1500),
        }
    }
}

/// Everything a phase needs.
pub struct Ctx {
    /// The server (shared with spawned request tasks; unique again between phases).
    pub srv: Arc<Server>,
    /// Every node on the database, `srv` first (one unless `--nodes`).
    pub nodes: Vec<Arc<Server>>,
    /// Churn sends each stop to the node that started the session (`--churn-stops owner`),
    /// not to any node.
    pub stops_to_owner: bool,
    /// The PostgreSQL postmaster (`--postgres-pid`): its CPU is reported over the churn.
    pub postgres_pid: Option<i32>,
    /// Binaries.
    pub bins: Bins,
    /// This run's tag (`CATTERY_BENCH_TAG`).
    pub tag: String,
    /// The plan.
    pub plan: Plan,
    /// The report being filled.
    pub report: Report,
}

fn unix_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn sid_of(v: &Value) -> Option<String> {
    v.get("sessionId")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// CPU used by a process over `window`, in cores (1.0 = one core busy).
/// One churn worker: start then stop until `deadline`. With several nodes, each start and
/// each stop goes to a node picked at random (as a load balancer without stickiness), or the
/// stop to the node that started the session (`to_owner`). Returns the start and stop round
/// trips (ms), the stops that went to another node than the start, and the errors.
async fn churn_worker(
    nodes: Vec<Arc<Server>>,
    seed: u64,
    to_owner: bool,
    name: &'static str,
    deadline: Instant,
    cycles: Arc<AtomicU64>,
    colds: Arc<AtomicU64>,
) -> (Vec<f64>, Vec<f64>, u64, Vec<String>) {
    let (mut starts, mut stops, mut errs) = (Vec::new(), Vec::new(), Vec::new());
    let mut forwarded = 0;
    // xorshift64*: a fixed sequence per worker, the same for every build compared.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut pick = |n: usize| {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    };
    while Instant::now() < deadline {
        let a = pick(nodes.len());
        let r = nodes[a].start_session(name).await;
        let Some(sid) = sid_of(&r.body).filter(|_| r.ok()) else {
            errs.push(format!("churn start: HTTP {} {}", r.status, r.body));
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if r.body["coldStart"].as_bool() == Some(true) {
            colds.fetch_add(1, Ordering::Relaxed);
        }
        starts.push(r.ms);
        let b = if to_owner { a } else { pick(nodes.len()) };
        if b != a {
            forwarded += 1;
        }
        let s = nodes[b].stop_session(name, &sid).await;
        if s.ok() {
            stops.push(s.ms);
            cycles.fetch_add(1, Ordering::Relaxed);
        } else {
            errs.push(format!("churn stop: HTTP {} {}", s.status, s.body));
        }
    }
    (starts, stops, forwarded, errs)
}

async fn cpu_cores(pid: i32, window: Duration) -> f64 {
    let c0 = sys::cpu_seconds(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let c1 = sys::cpu_seconds(pid).unwrap_or(c0);
    (c1 - c0) / t0.elapsed().as_secs_f64()
}

impl Ctx {
    fn p50_of(v: &[f64]) -> Option<f64> {
        summarize(v).map(|s| s.p50)
    }

    /// Stops sessions concurrently (at most `par` at a time); returns their round trips.
    async fn stop_many(&mut self, name: &str, ids: &[String], par: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for chunk in ids.chunks(par.max(1)) {
            let futs = chunk.iter().map(|id| {
                let srv = self.srv.clone();
                let (name, id) = (name.to_string(), id.clone());
                tokio::spawn(async move { srv.stop_session(&name, &id).await })
            });
            for r in join_all(futs).await {
                match r {
                    Ok(r) if r.ok() => out.push(r.ms),
                    Ok(r) => self
                        .report
                        .error(format!("stop in {name}: HTTP {} {}", r.status, r.body)),
                    Err(e) => self.report.error(format!("stop task failed: {e}")),
                }
            }
        }
        out
    }

    /// Stops sessions, each through the node that started it (`(node index, id)`).
    async fn stop_on_nodes(&mut self, name: &str, ids: &[(usize, String)]) {
        let futs = ids.iter().map(|(node, id)| {
            let srv = self.nodes[*node].clone();
            let (name, id) = (name.to_string(), id.clone());
            tokio::spawn(async move { srv.stop_session(&name, &id).await })
        });
        for r in join_all(futs).await {
            match r {
                Ok(r) if r.ok() => {}
                Ok(r) => self
                    .report
                    .error(format!("stop in {name}: HTTP {} {}", r.status, r.body)),
                Err(e) => self.report.error(format!("stop task failed: {e}")),
            }
        }
    }

    /// Waits until the agent has at least `idle` ready warm instances over all nodes and none
    /// starting (one node: [`Server::wait_idle`]). Each node's status counts the cluster's
    /// idle instances, but only its own starting ones (another node's instance that still
    /// starts counts as idle there: docs/cluster.md), so: no node has one starting, and every
    /// node sees `idle`.
    async fn wait_idle_all(&self, name: &str, idle: u64, timeout: Duration) -> anyhow::Result<()> {
        if self.nodes.len() == 1 {
            return self.srv.wait_idle(name, idle, timeout).await;
        }
        let t0 = Instant::now();
        loop {
            let (mut starting, mut ready) = (0, u64::MAX);
            for n in &self.nodes {
                match n.pool(name).await {
                    Some((s, i, _, _)) => {
                        starting += s;
                        ready = ready.min(i);
                    }
                    None => ready = 0,
                }
            }
            if ready >= idle && starting == 0 {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                anyhow::bail!(
                    "agent {name}: warm pools not at {idle} idle within {timeout:?} ({ready} idle, {starting} starting)"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Deletes an agent and waits (up to 30 s) until none of its processes is left.
    pub(crate) async fn retire(&mut self, name: &str) {
        let r = self.srv.undeploy(name).await;
        if !r.ok() {
            self.report.error(format!(
                "deleting agent {name}: HTTP {} {}",
                r.status, r.body
            ));
        }
        let t0 = Instant::now();
        loop {
            let left: Vec<i32> = sys::pids_with_env("CATTERY_BENCH_AGENT", name)
                .into_iter()
                .filter(|p| {
                    sys::env_var(*p, "CATTERY_BENCH_TAG").as_deref() == Some(self.tag.as_str())
                })
                .collect();
            if left.is_empty() {
                return;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                self.report.error(format!(
                    "agent {name}: {} processes still alive 30 s after it was deleted: {:?}",
                    left.len(),
                    left.iter()
                        .map(|p| (p, sys::cmdline(*p)))
                        .collect::<Vec<_>>()
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // ----------------------------------------------------------------------------------
    // Floor
    // ----------------------------------------------------------------------------------

    /// fork/exec, loopback HTTP (bare hyper and Cattery's `/health`), the agent on its own.
    pub async fn floor(&mut self) -> anyhow::Result<()> {
        let n = self.plan.fork_runs;
        log(format!("floor: fork/exec x{n} (two variants)"));
        let spawn = tokio::task::spawn_blocking(move || {
            (floor::fork_exec(n, false), floor::fork_exec(n, true))
        })
        .await?;
        let f = self.report.figure(
            "floor_fork_exec",
            "floor",
            "fork/exec/wait /bin/true (posix_spawn)",
            summarize(&spawn.0),
        );
        f.note = Some("std::process::Command spawn + wait of /bin/true".into());
        let f = self.report.figure(
            "floor_fork_exec_preexec",
            "floor",
            "fork/exec/wait /bin/true (fork + setsid via pre_exec)",
            summarize(&spawn.1),
        );
        f.note = Some(
            "with a pre_exec setsid() hook, which forces fork(); Cattery's runtime spawned this \
             way until it moved to clone(CLONE_VM | CLONE_VFORK) (runtime/process/spawn.rs)"
                .into(),
        );

        let port = floor::start_floor_server()?;
        let n = self.plan.http_runs;
        log(format!("floor: loopback HTTP x{n}"));
        let bare = floor::http_round_trips(
            &crate::server::client(),
            &format!("http://127.0.0.1:{port}/"),
            n,
            50,
        )
        .await;
        let f = self.report.figure(
            "floor_http",
            "floor",
            "loopback HTTP round trip (keep-alive, bare hyper)",
            summarize(&bare),
        );
        f.note = Some("reqwest keep-alive client to a minimal hyper server in the bench".into());
        let health =
            floor::http_round_trips(&self.srv.http, &format!("{}/health", self.srv.base), n, 50)
                .await;
        let f = self.report.figure(
            "floor_health",
            "floor",
            "cattery GET /health (no auth, no store)",
            summarize(&health),
        );
        f.floor = Some("floor_http".into());

        let n = self.plan.agent_direct_runs;
        log(format!("floor: test agent run directly x{n}"));
        let agent = self.bins.agent.clone();
        let (ready, exit) =
            tokio::task::spawn_blocking(move || floor::agent_direct(&agent, n)).await?;
        let f = self.report.figure(
            "floor_agent_ready",
            "floor",
            "test agent spawn to accepting (no platform)",
            summarize(&ready),
        );
        f.floor = Some("floor_fork_exec".into());
        f.note =
            Some("spawned by the bench with PORT set; polled by connect() every 0.2 ms".into());
        self.report.figure(
            "floor_agent_exit",
            "floor",
            "test agent SIGTERM to reaped (no platform)",
            summarize(&exit),
        );
        Ok(())
    }

    // ----------------------------------------------------------------------------------
    // Warm start
    // ----------------------------------------------------------------------------------

    /// Warm starts at each planned concurrency: a pool of exactly `c` ready instances, `c`
    /// simultaneous starts, then stops and a full refill before the next round.
    pub async fn warm(&mut self) -> anyhow::Result<()> {
        for (c, rounds) in self.plan.warm.clone() {
            let name = format!("warm-c{c}");
            log(format!("warm start: concurrency {c}, {rounds} rounds"));
            self.srv
                .deploy(&name, &[], c as u32, (c * 2 + 8) as u32, 1.0, &self.tag)
                .await?;
            let mut lat = Vec::new();
            let mut server_side = Vec::new();
            let mut cold = 0usize;
            for _ in 0..rounds {
                if let Err(e) = self
                    .wait_idle_all(&name, c as u64, Duration::from_secs(60))
                    .await
                {
                    self.report.error(e.to_string());
                    break;
                }
                // Open `c` keep-alive connections so no start pays a TCP handshake.
                let warmups = (0..c).map(|i| {
                    let srv = self.nodes[i % self.nodes.len()].clone();
                    tokio::spawn(async move {
                        srv.call(
                            reqwest::Method::GET,
                            "/health",
                            crate::server::Key::None,
                            None,
                        )
                        .await
                    })
                });
                join_all(warmups).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                let starts = (0..c).map(|i| {
                    let node = i % self.nodes.len();
                    let srv = self.nodes[node].clone();
                    let name = name.clone();
                    tokio::spawn(async move { (node, srv.start_session(&name).await) })
                });
                let mut ids = Vec::new();
                for r in join_all(starts).await {
                    let (node, r) = r?;
                    if !r.ok() {
                        self.report
                            .error(format!("warm start {name}: HTTP {} {}", r.status, r.body));
                        continue;
                    }
                    if let Some(id) = sid_of(&r.body) {
                        ids.push((node, id));
                    }
                    if r.body["coldStart"].as_bool() == Some(false) {
                        lat.push(r.ms);
                        if let Some(s) = r.body["botStartSeconds"].as_f64() {
                            server_side.push(s * 1000.0);
                        }
                    } else {
                        cold += 1;
                    }
                }
                self.stop_on_nodes(&name, &ids).await;
            }
            let key = format!("warm_start_c{c}");
            let f = self.report.figure(
                &key,
                "warm start",
                &format!("warm start, concurrency {c}"),
                summarize(&lat),
            );
            f.floor = Some("floor_http".into());
            f.note = Some(format!(
                "POST /v1/public/{{agent}}/start round trip, pool of {c} ready; {cold} starts found no warm instance and were excluded"
            ));
            if c == 8 {
                f.targets.push((Target::le("p50", 2.0), None));
                f.targets.push((Target::le("p99", 10.0), None));
            }
            let f = self.report.figure(
                &format!("warm_start_c{c}_server"),
                "warm start",
                &format!("  server-side botStartSeconds, concurrency {c}"),
                summarize(&server_side),
            );
            f.note = Some("the server's own request-to-delivered time (ms resolution)".into());
            self.retire(&name).await;
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------
    // Cold start
    // ----------------------------------------------------------------------------------

    /// Cold starts (no warm pool): client round trip minus the agent's own time to ready.
    pub async fn cold(&mut self) -> anyhow::Result<()> {
        let runs = self.plan.cold_runs;
        self.cold_variant("cold", &[], runs, "").await?;
        let runs = self.plan.cold_delay_runs;
        if runs > 0 {
            self.cold_variant(
                "cold-delay",
                &["--startup-delay", "0.1"],
                runs,
                ", agent with 100 ms startup delay",
            )
            .await?;
        }
        Ok(())
    }

    async fn cold_variant(
        &mut self,
        name: &str,
        switches: &[&str],
        runs: usize,
        what: &str,
    ) -> anyhow::Result<()> {
        log(format!("cold start{what}: {runs} runs"));
        self.srv
            .deploy(name, switches, 0, 4, 1.0, &self.tag)
            .await?;
        let (mut rt, mut own, mut over, mut pre, mut post, mut server_over) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut not_cold = 0;
        for _ in 0..runs {
            let t0 = unix_ms_f64();
            let r = self.srv.start_session(name).await;
            if !r.ok() {
                self.report
                    .error(format!("cold start {name}: HTTP {} {}", r.status, r.body));
                continue;
            }
            let Some(sid) = sid_of(&r.body) else { continue };
            if r.body["coldStart"].as_bool() != Some(true) {
                not_cold += 1;
            }
            // The agent's own times, from its /info (found by our env tag). "Delivered" means
            // the /bot request was sent; the agent may not have read it yet, so retry a little.
            let mut info = None;
            for _ in 0..50 {
                info = self.instance_info(name, &sid).await;
                if info.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            match info {
                Some(v) => {
                    let started = v["startedAtUnixMs"].as_f64().unwrap_or(f64::NAN);
                    let ready = v["readyAtUnixMs"].as_f64().unwrap_or(f64::NAN);
                    let own_ms = ready - started;
                    rt.push(r.ms);
                    own.push(own_ms);
                    over.push(r.ms - own_ms);
                    pre.push(started - t0);
                    post.push(t0 + r.ms - ready);
                    if let Some(s) = r.body["botStartSeconds"].as_f64() {
                        server_over.push(s * 1000.0 - own_ms);
                    }
                }
                None => self.report.error(format!(
                    "cold start {name}: could not find the instance of {sid}"
                )),
            }
            let s = self.srv.stop_session(name, &sid).await;
            if !s.ok() {
                self.report.error(format!(
                    "stop after cold start: HTTP {} {}",
                    s.status, s.body
                ));
            }
        }
        let sfx = if name == "cold" { "" } else { "_delay" };
        self.report.figure(
            &format!("cold_start{sfx}_rt"),
            "cold start",
            &format!("cold start round trip{what}"),
            summarize(&rt),
        );
        let f = self.report.figure(
            &format!("cold_start{sfx}_agent_own"),
            "cold start",
            "  agent's own time to ready (readyAt - startedAt)",
            summarize(&own),
        );
        f.note = Some("from the agent's GET /info, ms resolution".into());
        let f = self.report.figure(
            &format!("cold_start{sfx}_overhead"),
            "cold start",
            &format!("cold start overhead (round trip - own){what}"),
            summarize(&over),
        );
        f.floor = Some("floor_fork_exec_preexec".into());
        if name == "cold" {
            f.targets.push((Target::le("p50", 20.0), None));
        }
        f.note = Some(format!(
            "client round trip minus the agent's own readyAt-startedAt; {not_cold} starts were not cold"
        ));
        self.report.figure(
            &format!("cold_start{sfx}_pre"),
            "cold start",
            "  request sent to agent main() (API, store, spawn, exec)",
            summarize(&pre),
        );
        self.report.figure(
            &format!("cold_start{sfx}_post"),
            "cold start",
            "  agent ready to answer received (ready poll, /bot, store)",
            summarize(&post),
        );
        self.report.figure(
            &format!("cold_start{sfx}_server_overhead"),
            "cold start",
            "  server-side botStartSeconds - own",
            summarize(&server_over),
        );
        self.retire(name).await;
        Ok(())
    }

    /// `GET /info` of the instance of agent `name` that serves session `sid`, if found.
    async fn instance_info(&self, name: &str, sid: &str) -> Option<Value> {
        for pid in sys::pids_with_env("CATTERY_BENCH_AGENT", name) {
            if sys::env_var(pid, "CATTERY_BENCH_TAG").as_deref() != Some(self.tag.as_str()) {
                continue;
            }
            let Some(port) = sys::env_var(pid, "PORT") else {
                continue;
            };
            let Ok(resp) = self
                .srv
                .http
                .get(format!("http://127.0.0.1:{port}/info"))
                .send()
                .await
            else {
                continue;
            };
            if let Ok(v) = resp.json::<Value>().await {
                if v["sessionId"].as_str() == Some(sid) {
                    return Some(v);
                }
            }
        }
        None
    }

    // ----------------------------------------------------------------------------------
    // Stop
    // ----------------------------------------------------------------------------------

    /// `DELETE` round trips: a cooperative agent, and one that ignores SIGTERM.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let coop = self
            .stop_variant("stop-coop", &[], 5.0, self.plan.stop_coop_runs)
            .await?;
        let f = self.report.figure(
            "stop_coop",
            "stop",
            "stop, cooperative agent (exits on SIGTERM)",
            summarize(&coop),
        );
        f.floor = Some("floor_agent_exit".into());
        f.targets.push((Target::le("p50", 20.0), None));
        f.note = Some("DELETE round trip of a delivered warm session, 20 ms after delivery".into());
        let grace = self.plan.stop_ignore_grace_s;
        let ign = self
            .stop_variant(
                "stop-ignore",
                &["--ignore-sigterm", "--ignore-transport-close"],
                grace,
                self.plan.stop_ignore_runs,
            )
            .await?;
        self.report.figure(
            "stop_ignore",
            "stop",
            &format!("stop, agent ignoring SIGTERM (grace {grace} s)"),
            summarize(&ign),
        );
        let extra: Vec<f64> = ign.iter().map(|v| v - grace * 1000.0).collect();
        let f = self.report.figure(
            "stop_ignore_minus_grace",
            "stop",
            "  stop minus grace (the constant)",
            summarize(&extra),
        );
        f.note = Some(
            "agent with --ignore-sigterm --ignore-transport-close: SIGKILL, reap and cleanup after the grace ran out"
                .into(),
        );
        Ok(())
    }

    async fn stop_variant(
        &mut self,
        name: &str,
        switches: &[&str],
        grace: f64,
        runs: usize,
    ) -> anyhow::Result<Vec<f64>> {
        log(format!("stop {name}: {runs} runs"));
        self.srv
            .deploy(name, switches, 1, 8, grace, &self.tag)
            .await?;
        let mut out = Vec::new();
        for _ in 0..runs {
            if let Err(e) = self.srv.wait_idle(name, 1, Duration::from_secs(30)).await {
                self.report.error(e.to_string());
                break;
            }
            let r = self.srv.start_session(name).await;
            let Some(sid) = sid_of(&r.body).filter(|_| r.ok()) else {
                self.report
                    .error(format!("start {name}: HTTP {} {}", r.status, r.body));
                continue;
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
            let s = self.srv.stop_session(name, &sid).await;
            if s.ok() && s.body["status"] == "terminated" {
                out.push(s.ms);
            } else {
                self.report
                    .error(format!("stop {name}: HTTP {} {}", s.status, s.body));
            }
        }
        self.retire(name).await;
        Ok(out)
    }

    // ----------------------------------------------------------------------------------
    // Churn
    // ----------------------------------------------------------------------------------

    /// The churn's CPU per cycle: the control plane's, and its reaped children's (seconds
    /// over the run, `n` cycles).
    fn report_cpu_per_cycle(&mut self, server_s: f64, children_s: f64, n: u64) {
        if n == 0 {
            return;
        }
        self.report.scalar(
            "churn_server_cpu_per_cycle",
            "churn",
            "churn: control-plane CPU per cycle (load-independent)",
            server_s * 1000.0 / n as f64,
            "ms",
            None,
            Some("CPU time of cattery serve (user + system) divided by cycles".into()),
        );
        self.report.scalar(
            "churn_children_cpu_per_cycle",
            "churn",
            "churn: CPU of the server's reaped children per cycle (agents, spare processes)",
            children_s * 1000.0 / n as f64,
            "ms",
            None,
            Some(
                "cutime + cstime of cattery serve over the run divided by cycles (children \
                 reaped after the run are not counted)"
                    .into(),
            ),
        );
    }

    /// Start-then-stop cycles from several workers for a fixed time, warm pool refilling.
    pub async fn churn(&mut self) -> anyhow::Result<()> {
        let workers = self.plan.churn_workers;
        let secs = self.plan.churn_seconds;
        let name = "churn";
        let min = (workers * 2) as u32;
        log(format!(
            "churn: {workers} workers for {secs} s (warm pool {min})"
        ));
        self.srv
            .deploy(name, &[], min, 10_000, 1.0, &self.tag)
            .await?;
        self.wait_idle_all(name, u64::from(min), Duration::from_secs(60))
            .await?;
        let cycles = Arc::new(AtomicU64::new(0));
        let colds = Arc::new(AtomicU64::new(0));
        let cpu_all = |nodes: &[Arc<Server>]| {
            nodes
                .iter()
                .map(|n| sys::cpu_seconds(n.pid).unwrap_or(0.0))
                .sum::<f64>()
        };
        // The nodes with their instances (live and reaped), and the database's processes.
        let tree_all = |nodes: &[Arc<Server>]| {
            nodes
                .iter()
                .map(|n| sys::tree_cpu_seconds(n.pid))
                .sum::<f64>()
        };
        let pg = self.postgres_pid;
        let pg_cpu = || pg.map(sys::tree_cpu_seconds);
        let cpu0 = cpu_all(&self.nodes);
        let tree0 = tree_all(&self.nodes);
        let pg0 = pg_cpu();
        let (busy0, total0) = sys::system_ticks();
        let children0 = children_cpu(&self.nodes);
        let self0 = sys::cpu_seconds(std::process::id() as i32).unwrap_or(0.0);
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(secs);
        let tasks = (0..workers).map(|w| {
            tokio::spawn(churn_worker(
                self.nodes.clone(),
                w as u64 + 1,
                self.stops_to_owner,
                name,
                deadline,
                cycles.clone(),
                colds.clone(),
            ))
        });
        let results = join_all(tasks).await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = (cpu_all(&self.nodes) - cpu0) / wall;
        let agents_cpu = (tree_all(&self.nodes) - tree0) / wall - cpu;
        let pg_cores = pg_cpu().zip(pg0).map(|(b, a)| (b - a) / wall);
        let (busy1, total1) = sys::system_ticks();
        let machine_busy = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64;
        let children_cpu = children_cpu(&self.nodes) - children0;
        let bench_cpu =
            (sys::cpu_seconds(std::process::id() as i32).unwrap_or(self0) - self0) / wall;
        let (mut starts, mut stops, mut forwarded) = (Vec::new(), Vec::new(), 0);
        for r in results {
            let (s, t, f, e) = r?;
            starts.extend(s);
            stops.extend(t);
            forwarded += f;
            for e in e.into_iter().take(5) {
                self.report.error(e);
            }
        }
        let n = cycles.load(Ordering::Relaxed);
        let rate = n as f64 / wall;
        let cold = colds.load(Ordering::Relaxed);
        self.report.figure(
            "churn_start",
            "churn",
            "churn: start round trip",
            summarize(&starts),
        );
        self.report.figure(
            "churn_stop",
            "churn",
            "churn: stop round trip",
            summarize(&stops),
        );
        self.report.scalar(
            "churn_rate",
            "churn",
            &format!("churn: start+stop cycles per second ({workers} workers, {secs} s)"),
            rate,
            "cycles/s",
            Some(Target::ge("value", 300.0)),
            Some(format!(
                "{n} cycles in {wall:.1} s; {cold} starts were cold"
            )),
        );
        self.report.scalar(
            "churn_cold_fraction",
            "churn",
            "churn: fraction of starts that found no warm instance",
            if n > 0 { cold as f64 / n as f64 } else { 0.0 },
            "",
            None,
            None,
        );
        self.report_churn_breakdown(
            [cpu, bench_cpu, agents_cpu, machine_busy],
            pg_cores,
            wall,
            children_cpu,
            forwarded,
            n,
        );
        self.retire(name).await;
        Ok(())
    }

    /// The churn's CPU by process (the nodes, the bench, the nodes' instances, PostgreSQL, the
    /// whole machine: cores over the `wall` seconds of `n` cycles; `children_cpu`: CPU
    /// seconds of the processes the nodes reaped) and,
    /// with several nodes, the fraction of stops sent to another node than the start.
    fn report_churn_breakdown(
        &mut self,
        [cpu, bench_cpu, agents_cpu, machine_busy]: [f64; 4],
        pg_cores: Option<f64>,
        wall: f64,
        children_cpu: f64,
        forwarded: u64,
        n: u64,
    ) {
        self.report.scalar(
            "churn_server_cpu",
            "churn",
            "churn: control-plane CPU",
            cpu,
            "cores",
            None,
            None,
        );
        self.report_cpu_per_cycle(cpu * wall, children_cpu, n);
        self.report.scalar(
            "churn_bench_cpu",
            "churn",
            "churn: bench (client) CPU",
            bench_cpu,
            "cores",
            None,
            None,
        );
        self.report.scalar(
            "churn_agents_cpu",
            "churn",
            "churn: the nodes' instances' CPU (test agents, live and exited)",
            agents_cpu,
            "cores",
            None,
            None,
        );
        if let Some(c) = pg_cores {
            self.report.scalar(
                "churn_postgres_cpu",
                "churn",
                "churn: PostgreSQL's CPU (postmaster and backends)",
                c,
                "cores",
                None,
                None,
            );
        }
        self.report.scalar(
            "churn_machine_busy",
            "churn",
            "churn: the whole machine's CPU busy (all cores; 1.0 = saturated)",
            machine_busy,
            "",
            None,
            Some(format!("{} cores", sys::machine().cpus)),
        );
        if self.nodes.len() > 1 {
            self.report.scalar(
                "churn_stops_forwarded",
                "churn",
                "churn: fraction of stops sent to another node than the start",
                if n > 0 {
                    forwarded as f64 / n as f64
                } else {
                    0.0
                },
                "",
                None,
                Some(
                    if self.stops_to_owner {
                        "each stop to the node that started the session"
                    } else {
                        "each start and each stop to a node picked at random"
                    }
                    .into(),
                ),
            );
        }
    }

    // ----------------------------------------------------------------------------------
    // Concurrency
    // ----------------------------------------------------------------------------------

    /// Ramps up to the last checkpoint of active sessions and measures at each checkpoint.
    pub async fn concurrency(&mut self) -> anyhow::Result<()> {
        let cps = self.plan.concurrency_checkpoints.clone();
        let target = *cps.last().unwrap_or(&100);
        let name = "conc";
        let pool = 8u32;
        log(format!("concurrency: ramp to {target} active sessions"));
        self.srv
            .deploy(name, &[], pool, target as u32 + 64, 5.0, &self.tag)
            .await?;
        self.srv
            .wait_idle(name, u64::from(pool), Duration::from_secs(60))
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss0 = self.srv.rss();
        let mut rows = Vec::new();
        let mut active: Vec<String> = Vec::new();
        let mut ramp_lat: Vec<f64> = Vec::new();
        let mut failures = 0usize;
        rows.push(self.checkpoint(name, &active, &[], rss0).await);
        let t_ramp = Instant::now();
        'ramp: for cp in cps {
            let mut bucket = Vec::new();
            while active.len() < cp {
                let k = (cp - active.len()).min(8);
                let starts = (0..k).map(|_| {
                    let srv = self.srv.clone();
                    tokio::spawn(async move { srv.start_session(name).await })
                });
                for r in join_all(starts).await {
                    let r = r?;
                    match sid_of(&r.body).filter(|_| r.ok()) {
                        Some(id) => {
                            bucket.push(r.ms);
                            active.push(id);
                        }
                        None => {
                            failures += 1;
                            self.report.error(format!(
                                "concurrency: start #{} failed: HTTP {} {}",
                                active.len() + 1,
                                r.status,
                                r.body
                            ));
                            if failures >= 5 {
                                break 'ramp;
                            }
                        }
                    }
                }
            }
            ramp_lat.extend_from_slice(&bucket);
            let row = self.checkpoint(name, &active, &bucket, rss0).await;
            rows.push(row);
        }
        let ramp_s = t_ramp.elapsed().as_secs_f64();
        let reached = active.len();
        let rss = self.srv.rss();
        let last = rows.last().cloned().unwrap_or(Value::Null);
        self.report.scalar(
            "concurrency_reached",
            "concurrency",
            "simultaneously active sessions reached",
            reached as f64,
            "sessions",
            Some(Target::ge("value", target as f64)),
            Some(format!("ramp took {ramp_s:.1} s, 8 starts at a time")),
        );
        self.report.scalar(
            "concurrency_rss",
            "concurrency",
            &format!("control-plane RSS at {reached} active sessions"),
            rss as f64 / 1048576.0,
            "MiB",
            rss_target(target),
            sys::rss_split_bytes(self.srv.pid).map(|(a, f)| {
                format!(
                    "VmRSS: {:.1} MiB anonymous (heap, stacks) + {:.1} MiB mapped files (the binary's code; SQLite's mmap of cattery.db)",
                    a as f64 / 1048576.0,
                    f as f64 / 1048576.0
                )
            }),
        );
        if reached > 0 {
            self.report.scalar(
                "concurrency_rss_per_session",
                "concurrency",
                "control-plane RSS per active session ((RSS - RSS at 0) / n)",
                (rss.saturating_sub(rss0)) as f64 / reached as f64 / 1024.0,
                "KiB",
                None,
                None,
            );
        }
        if let Some(c) = last["cpu_idle_pct"].as_f64() {
            self.report.scalar(
                "concurrency_idle_cpu",
                "concurrency",
                &format!("control-plane CPU with {reached} idle sessions"),
                c,
                "% of 1 core",
                None,
                None,
            );
        }
        self.report.figure(
            "concurrency_ramp_start",
            "concurrency",
            "ramp start round trip (8 at a time, warm or cold)",
            summarize(&ramp_lat),
        );
        self.mass_stop(name, &active).await;
        self.report
            .tables
            .insert("concurrency_scaling".into(), Value::Array(rows));
        self.retire(name).await;
        Ok(())
    }

    /// Stops `active` 16 at a time and reports the round trips and the rate.
    async fn mass_stop(&mut self, name: &'static str, active: &[String]) {
        let n = active.len();
        log(format!("concurrency: stopping {n} sessions"));
        let t = Instant::now();
        let stops = self.stop_many(name, active, 16).await;
        let secs = t.elapsed().as_secs_f64();
        self.report.figure(
            "concurrency_mass_stop",
            "concurrency",
            &format!("stop round trip, {n} sessions 16 at a time"),
            summarize(&stops),
        );
        if secs > 0.0 {
            self.report.scalar(
                "concurrency_mass_stop_rate",
                "concurrency",
                &format!("mass stop of {n} sessions, 16 at a time"),
                n as f64 / secs,
                "stops/s",
                None,
                None,
            );
        }
    }

    /// Measures at a checkpoint: RSS, CPU while idle, warm start and stop, GET and list.
    async fn checkpoint(
        &mut self,
        name: &str,
        active: &[String],
        bucket: &[f64],
        rss0: u64,
    ) -> Value {
        let n = active.len();
        log(format!("concurrency: checkpoint at {n} active"));
        if let Err(e) = self.srv.wait_idle(name, 8, Duration::from_secs(120)).await {
            self.report.error(e.to_string());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = self.srv.pid;
        let rss = self.srv.rss();
        let split = sys::rss_split_bytes(pid);
        let cpu = cpu_cores(pid, Duration::from_secs(2)).await * 100.0;
        let procs = sys::pids_with_env("CATTERY_BENCH_AGENT", name).len();
        let mut gets = Vec::new();
        let mut lists = Vec::new();
        if !active.is_empty() {
            let mut rng = rand::rng();
            for _ in 0..20 {
                let id = active.choose(&mut rng).expect("non-empty");
                let r = self
                    .srv
                    .get(&format!("/v1/agents/{name}/sessions/{id}"))
                    .await;
                if r.ok() {
                    gets.push(r.ms);
                }
            }
            for _ in 0..10 {
                let r = self.srv.get(&format!("/v1/agents/{name}/sessions")).await;
                if r.ok() {
                    lists.push(r.ms);
                }
            }
        }
        // Warm starts on the pool of 8, then their stops (active count unchanged).
        let mut warm = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..8 {
            let r = self.srv.start_session(name).await;
            if let Some(id) = sid_of(&r.body).filter(|_| r.ok()) {
                if r.body["coldStart"].as_bool() == Some(false) {
                    warm.push(r.ms);
                }
                ids.push(id);
            } else {
                self.report
                    .error(format!("checkpoint start: HTTP {} {}", r.status, r.body));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut stops = Vec::new();
        for id in &ids {
            let r = self.srv.stop_session(name, id).await;
            if r.ok() {
                stops.push(r.ms);
            } else {
                self.report
                    .error(format!("checkpoint stop: HTTP {} {}", r.status, r.body));
            }
        }
        json!({
            "active": n,
            "rss_mib": rss as f64 / 1048576.0,
            "rss_anon_mib": split.map(|(a, _)| a as f64 / 1048576.0),
            "rss_file_mib": split.map(|(_, f)| f as f64 / 1048576.0),
            "rss_per_session_kib": if n > 0 { Value::from(rss.saturating_sub(rss0) as f64 / n as f64 / 1024.0) } else { Value::Null },
            "threads": sys::threads(pid),
            "fds": sys::open_fds(pid),
            "agent_procs": procs,
            "cpu_idle_pct": cpu,
            "ramp_start_p50_ms": Self::p50_of(bucket),
            "warm_start_p50_ms": Self::p50_of(&warm),
            "stop_p50_ms": Self::p50_of(&stops),
            "get_p50_ms": Self::p50_of(&gets),
            "list_p50_ms": Self::p50_of(&lists),
        })
    }

    // ----------------------------------------------------------------------------------
    // API latency at stored-session counts
    // ----------------------------------------------------------------------------------

    /// `GET` session and list latency with 1,000 ... 100,000 stored sessions (seeded into the
    /// store while the server is stopped). The phase stops and restarts the first server, so
    /// the node list lets go of it meanwhile.
    pub async fn api(&mut self) -> anyhow::Result<()> {
        let others: Vec<Arc<Server>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .skip(1)
            .collect();
        let r = self.api_seeded().await;
        self.nodes = std::iter::once(self.srv.clone()).chain(others).collect();
        r
    }

    async fn api_seeded(&mut self) -> anyhow::Result<()> {
        let name = "api";
        self.srv.deploy(name, &[], 0, 1, 1.0, &self.tag).await?;
        let a = self.srv.get(&format!("/v1/agents/{name}")).await;
        let agent_id = a.body["id"].as_str().context("agent id")?.to_string();
        let dep_id = a.body["desiredDeploymentId"]
            .as_str()
            .context("deployment id")?
            .to_string();
        let org = a.body["organizationId"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let mut rows = Vec::new();
        for size in self.plan.api_sizes.clone() {
            log(format!("api: seeding to {size} stored sessions"));
            let srv = Arc::get_mut(&mut self.srv).context("server still shared")?;
            srv.stop(Duration::from_secs(2)).await?;
            let t = Instant::now();
            let (stored, ids) = crate::seed::seed_sessions(
                &srv.data_dir.join("cattery.db"),
                &org,
                &agent_id,
                &dep_id,
                size,
            )
            .await?;
            let seed_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            srv.restart().await?;
            let restart_s = t.elapsed().as_secs_f64();
            let mut rng = rand::rng();
            let srv = self.srv.clone();
            let mut gets = Vec::new();
            for i in 0..self.plan.api_get_runs + 20 {
                let id = ids.choose(&mut rng).context("no ids")?;
                let r = srv.get(&format!("/v1/agents/{name}/sessions/{id}")).await;
                if !r.ok() {
                    self.report
                        .error(format!("GET session: HTTP {} {}", r.status, r.body));
                } else if i >= 20 {
                    gets.push(r.ms);
                }
            }
            let mut lists: HashMap<&str, Vec<f64>> = HashMap::new();
            let variants = [
                ("list", "limit=10".to_string()),
                ("list_100", "limit=100".to_string()),
                ("list_deep", format!("limit=10&offset={}", stored / 2)),
                ("list_active", "limit=10&status=active".to_string()),
            ];
            for (k, q) in &variants {
                let runs = if *k == "list" {
                    self.plan.api_list_runs
                } else {
                    self.plan.api_list_runs / 2
                };
                for i in 0..runs + 5 {
                    let r = srv.get(&format!("/v1/agents/{name}/sessions?{q}")).await;
                    if !r.ok() {
                        self.report
                            .error(format!("list sessions: HTTP {} {}", r.status, r.body));
                    } else if i >= 5 {
                        lists.entry(k).or_default().push(r.ms);
                    }
                }
            }
            let label = if size >= 1000 {
                format!("{}k", size / 1000)
            } else {
                size.to_string()
            };
            let f = self.report.figure(
                &format!("api_get_{label}"),
                "api",
                &format!("GET session, {stored} stored"),
                summarize(&gets),
            );
            f.floor = Some("floor_http".into());
            let f = self.report.figure(
                &format!("api_list_{label}"),
                "api",
                &format!("list sessions (limit 10), {stored} stored"),
                summarize(lists.get("list").map(Vec::as_slice).unwrap_or(&[])),
            );
            f.floor = Some("floor_http".into());
            let p = |k: &str| lists.get(k).and_then(|v| Self::p50_of(v));
            rows.push(json!({
                "stored": stored,
                "seed_s": seed_s,
                "restart_s": restart_s,
                "get_p50_ms": Self::p50_of(&gets),
                "get_p99_ms": summarize(&gets).map(|s| s.p99),
                "list10_p50_ms": p("list"),
                "list100_p50_ms": p("list_100"),
                "list_deep_p50_ms": p("list_deep"),
                "list_active_p50_ms": p("list_active"),
            }));
        }
        self.report
            .tables
            .insert("api_scaling".into(), Value::Array(rows));
        self.retire(name).await;
        Ok(())
    }
}

/// The RSS target for `sessions` active sessions, MiB: issue 14's 2,000 sessions at most
/// 100 MB; below that, 1,000 at most 150 MB.
fn rss_target(sessions: usize) -> Option<Target> {
    if sessions >= 2000 {
        Some(Target::le("value", 100e6 / 1048576.0))
    } else {
        (sessions >= 1000).then(|| Target::le("value", 150.0))
    }
}

/// CPU seconds of the reaped children of every node.
fn children_cpu(nodes: &[Arc<Server>]) -> f64 {
    nodes
        .iter()
        .map(|n| sys::reaped_children_cpu_seconds(n.pid).unwrap_or(0.0))
        .sum()
}
