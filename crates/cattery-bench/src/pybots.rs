//! `cattery-bench python`: a real Pipecat bot (an `examples/` bot, run by the bundled Python
//! runner as a `local:` agent), with the fork server and without it, side by side in one run:
//! cold start (start request to session delivered), warm start, proportional memory (PSS,
//! `/proc/PID/smaps_rollup`) per idle instance, and how many idle instances fit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::report::{Report, Target};
use crate::server::{Bins, Server};
use crate::stats::summarize;
use crate::sys;

/// What to run.
pub struct PyPlan {
    /// Python with pipecat-ai, fastapi, uvicorn.
    pub python: PathBuf,
    /// The bot directory (with `bot.py`).
    pub bot_dir: PathBuf,
    /// Cold starts per mode.
    pub cold_runs: usize,
    /// Warm starts per mode.
    pub warm_runs: usize,
    /// Idle instances for the memory figure.
    pub idle: usize,
}

fn log(s: impl AsRef<str>) {
    eprintln!("[bench] {}", s.as_ref());
}

/// PSS of a process in bytes (`Pss:` of `/proc/PID/smaps_rollup`).
pub fn pss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Whether `pid` is a fork server (its cgroup is a `zygote-*` one).
fn is_fork_server(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.lines().any(|l| l.contains("/zygote-")))
}

/// `MemAvailable` and `MemTotal` in bytes.
fn meminfo() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (get("MemAvailable:"), get("MemTotal:"))
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

async fn deploy(
    srv: &Server,
    name: &str,
    bot_dir: &Path,
    min: u32,
    max: u32,
    tag: &str,
) -> anyhow::Result<()> {
    let body = json!({
        "serviceName": name,
        "image": format!("local:{}", bot_dir.display()),
        "autoScaling": {"minAgents": min, "maxAgents": max},
        "stopGraceSeconds": 2,
        "env": {"CATTERY_BENCH_TAG": tag, "CATTERY_BENCH_AGENT": name, "PIPECAT_LOG_LEVEL": "INFO"},
    });
    srv.create_agent(name, &body).await
}

/// Start round trips (ms) of `runs` sessions of `name`, each stopped after; `min` idle
/// instances are awaited before each start (warm starts) when `warm`.
async fn starts(
    srv: &Server,
    name: &str,
    runs: usize,
    warm: bool,
    report: &mut Report,
) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..runs {
        if warm {
            if let Err(e) = srv.wait_idle(name, 1, Duration::from_secs(60)).await {
                report.error(format!("{name}: {e:#}"));
                break;
            }
        }
        let r = srv.start_session(name).await;
        if !r.ok() {
            report.error(format!("start {name}: HTTP {} {}", r.status, r.body));
            continue;
        }
        if r.body["coldStart"].as_bool() == Some(warm) {
            log(format!(
                "{name}: a start was {}",
                if warm { "cold" } else { "warm" }
            ));
        }
        out.push(r.ms);
        if let Some(sid) = r.body["sessionId"].as_str() {
            let s = srv.stop_session(name, sid).await;
            if !s.ok() {
                report.error(format!("stop {name}: HTTP {} {}", s.status, s.body));
            }
        }
    }
    out
}

/// One mode (`on`/`off`) on a server of its own.
async fn run_mode(
    bins: &Bins,
    dir: &Path,
    tag: &str,
    plan: &PyPlan,
    mode: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let py = plan.python.display().to_string();
    let mut srv = Server::start(
        bins,
        &dir.join(format!("fork-{mode}")),
        &["--python", &py, "--python-fork-server", mode],
    )
    .await?;
    let sfx = format!("_fork_{mode}");
    let what = if mode == "on" {
        "fork server"
    } else {
        "spawned interpreter"
    };
    let group = "real Pipecat bot";

    // Cold: no warm pool; each start makes its instance. With the fork server, the first start
    // also starts the fork server (the bot's import): reported on its own.
    let cold = format!("cold-{mode}");
    deploy(&srv, &cold, &plan.bot_dir, 0, 4, tag).await?;
    if mode == "on" {
        let t0 = Instant::now();
        let first = starts(&srv, &cold, 1, false, report).await;
        if let Some(ms) = first.first() {
            report.scalar(
                "py_first_start_fork_on",
                group,
                "  first start of a deployment (fork server imports the bot)",
                *ms,
                "ms",
                None,
                None,
            );
        }
        log(format!(
            "first start: {:.0} ms",
            t0.elapsed().as_secs_f64() * 1000.0
        ));
    }
    log(format!("{what}: {} cold starts", plan.cold_runs));
    let rt = starts(&srv, &cold, plan.cold_runs, false, report).await;
    let f = report.figure(
        &format!("py_cold_start{sfx}"),
        group,
        &format!("cold start, start request to session delivered ({what})"),
        summarize(&rt),
    );
    if mode == "on" {
        f.targets.push((Target::le("p50", 50.0), None));
        f.floor = Some("py_cold_start_fork_off".into());
    }

    // Warm: one idle instance waiting.
    let warm = format!("warm-{mode}");
    deploy(&srv, &warm, &plan.bot_dir, 1, 4, tag).await?;
    let rt = starts(&srv, &warm, plan.warm_runs, true, report).await;
    report.figure(
        &format!("py_warm_start{sfx}"),
        group,
        &format!("warm start round trip ({what})"),
        summarize(&rt),
    );
    let _ = srv.undeploy(&warm).await;
    let _ = srv.undeploy(&cold).await;

    idle_memory(&srv, tag, plan, mode, report).await?;
    for l in srv.log_errors().into_iter().take(5) {
        report.error(format!("server log (fork {mode}): {l}"));
    }
    match srv.stop(Duration::from_secs(20)).await {
        Ok(st) if st.contains("exit status: 0") || st == "not running" => {}
        Ok(st) => report.error(format!("server exit (fork {mode}): {st}")),
        Err(e) => report.error(format!("server stop (fork {mode}): {e}")),
    }
    Ok(())
}

/// PSS per idle instance of `plan.idle` ready instances, and how many would fit.
async fn idle_memory(
    srv: &Server,
    tag: &str,
    plan: &PyPlan,
    mode: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let sfx = format!("_fork_{mode}");
    let what = if mode == "on" {
        "fork server"
    } else {
        "spawned interpreter"
    };
    let group = "real Pipecat bot";
    // Idle memory: `idle` ready instances.
    let idle = format!("idle-{mode}");
    let rss0 = srv.rss();
    deploy(
        srv,
        &idle,
        &plan.bot_dir,
        plan.idle as u32,
        plan.idle as u32,
        tag,
    )
    .await?;
    srv.wait_idle(&idle, plan.idle as u64, Duration::from_secs(300))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = sys::pids_with_env("CATTERY_BENCH_AGENT", &idle);
    let (zygotes, instances): (Vec<i32>, Vec<i32>) =
        pids.into_iter().partition(|p| is_fork_server(*p));
    let pss: Vec<f64> = instances
        .iter()
        .filter_map(|p| pss_bytes(*p))
        .map(|b| b as f64 / 1_048_576.0)
        .collect();
    let per_server = (srv.rss().saturating_sub(rss0)) as f64 / plan.idle.max(1) as f64;
    if let Some(s) = summarize(&pss) {
        let f = report.figure(
            &format!("py_idle_pss{sfx}"),
            group,
            &format!(
                "PSS per idle instance, MiB ({} instances, {what})",
                pss.len()
            ),
            Some(s),
        );
        f.unit = "MiB";
        if mode == "on" {
            f.targets.push((Target::le("p50", 20.0), None));
            f.floor = Some("py_idle_pss_fork_off".into());
        }
        let mean = pss.iter().sum::<f64>() / pss.len() as f64;
        let zpss: f64 = zygotes
            .iter()
            .filter_map(|p| pss_bytes(*p))
            .map(|b| b as f64 / 1_048_576.0)
            .sum();
        if mode == "on" {
            report.scalar(
                "py_fork_server_pss",
                group,
                "  the fork server's own PSS, MiB",
                zpss,
                "MiB",
                None,
                None,
            );
        }
        let (avail, total) = meminfo();
        let per = mean * 1_048_576.0 + per_server;
        report.scalar(
            &format!("py_idle_fit{sfx}"),
            group,
            &format!("idle instances that fit in this machine's memory ({what}; estimate)"),
            (total as f64 * 0.9 / per).floor(),
            "instances",
            if mode == "on" {
                Some(Target::ge("value", 1000.0))
            } else {
                None
            },
            Some(format!(
                "90 % of MemTotal {:.1} GiB / (mean PSS {mean:.1} MiB + server RSS {:.2} MiB per instance); MemAvailable now {:.1} GiB",
                total as f64 / 1_073_741_824.0,
                per_server / 1_048_576.0,
                avail as f64 / 1_073_741_824.0
            )),
        );
    } else {
        report.error(format!("{idle}: no instance processes found"));
    }
    let _ = srv.undeploy(&idle).await;
    let t0 = Instant::now();
    while !sys::pids_with_env("CATTERY_BENCH_AGENT", &idle)
        .into_iter()
        .filter(|p| !is_fork_server(*p))
        .collect::<Vec<_>>()
        .is_empty()
        && t0.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs both modes, spawned first.
pub async fn run(bins: &Bins, dir: &Path, tag: &str, plan: &PyPlan, report: &mut Report) {
    report.scalar(
        "py_load_start",
        "real Pipecat bot",
        "machine load (1-min average) at the start",
        load1(),
        "",
        None,
        None,
    );
    for mode in ["off", "on"] {
        if let Err(e) = run_mode(bins, dir, tag, plan, mode, report).await {
            report.error(format!("python bench (fork {mode}): {e:#}"));
        }
    }
    report.scalar(
        "py_load_end",
        "real Pipecat bot",
        "machine load (1-min average) at the end",
        load1(),
        "",
        None,
        None,
    );
}

/// `--fleet N`: N live idle instances of the bot at once, forked from the fork server, on a
/// server of their own. Reports the time until all N were ready, the instances' total PSS,
/// `MemAvailable` before and with them, and the control plane's RSS, fds and threads; then
/// deletes the agent and checks that no process of it is left. Bounded: `timeout` for the N
/// to become ready, 5 min for them to go.
pub async fn fleet(
    bins: &Bins,
    dir: &Path,
    tag: &str,
    plan: &PyPlan,
    n: usize,
    timeout: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    let py = plan.python.display().to_string();
    let mut srv = Server::start(
        bins,
        &dir.join("fleet"),
        &["--python", &py, "--python-fork-server", "on"],
    )
    .await?;
    let name = "fleet";
    let before = (meminfo().0, srv.rss());
    log(format!(
        "fleet: {n} idle instances; MemAvailable {:.2} GiB, load {:.1}",
        gib(before.0),
        load1()
    ));
    let t0 = Instant::now();
    deploy(&srv, name, &plan.bot_dir, n as u32, n as u32, tag).await?;
    let (reached, peak_starting) = fleet_wait(&srv, name, n, timeout, report).await;
    let took = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet_measure(&srv, name, n, reached, took, peak_starting, before, report).await;
    fleet_teardown(&mut srv, name, tag, report).await;
    Ok(())
}

fn gib(b: u64) -> f64 {
    b as f64 / 1_073_741_824.0
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

const FLEET: &str = "real Pipecat bot: many idle instances";

/// Waits until `n` instances of `name` are idle and none starts; `(reached, peak starting)`.
async fn fleet_wait(
    srv: &Server,
    name: &str,
    n: usize,
    timeout: Duration,
    report: &mut Report,
) -> (bool, u64) {
    let t0 = Instant::now();
    let mut last_log = Instant::now();
    let mut peak = 0;
    loop {
        let p = srv.pool(name).await;
        if let Some((starting, idle, _, _)) = p {
            peak = peak.max(starting);
            if idle >= n as u64 && starting == 0 {
                return (true, peak);
            }
        }
        if last_log.elapsed() > Duration::from_secs(10) {
            last_log = Instant::now();
            // An agent that cannot run (say, an interpreter the instances' uid cannot reach:
            // pass `--instance-uids off` to the server through a wrapper) never fills up.
            let errors = srv.get(&format!("/v1/agents/{name}")).await.body["errors"].clone();
            if errors.as_array().is_some_and(|e| !e.is_empty()) {
                report.error(format!("fleet: the agent cannot run: {errors}"));
                return (false, peak);
            }
            log(format!(
                "fleet: {:.0} s: (starting, idle, busy, total) = {p:?}, MemAvailable {:.2} GiB",
                t0.elapsed().as_secs_f64(),
                gib(meminfo().0)
            ));
        }
        if t0.elapsed() > timeout {
            report.error(format!(
                "fleet: {n} idle instances not ready within {timeout:?}: {p:?}"
            ));
            return (false, peak);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The fleet's figures: processes, PSS, `MemAvailable` (`before`: with the server's RSS, before
/// the deploy), the control plane's RSS, fds and threads.
#[allow(clippy::too_many_arguments)]
async fn fleet_measure(
    srv: &Server,
    name: &str,
    n: usize,
    reached: bool,
    took: f64,
    peak_starting: u64,
    before: (u64, u64),
    report: &mut Report,
) {
    let pids = sys::pids_with_env("CATTERY_BENCH_AGENT", name);
    let (zygotes, instances): (Vec<i32>, Vec<i32>) =
        pids.into_iter().partition(|p| is_fork_server(*p));
    let pss: Vec<u64> = instances.iter().filter_map(|p| pss_bytes(*p)).collect();
    let zpss: u64 = zygotes.iter().filter_map(|p| pss_bytes(*p)).sum();
    let total_pss = pss.iter().sum::<u64>() + zpss;
    let (avail1, total) = meminfo();
    let status = srv.get(&format!("/v1/agents/{name}")).await;
    log(format!(
        "fleet: {} instance processes ({} fork server processes), ready={reached} after {took:.1} s; forkServer {}",
        instances.len(),
        zygotes.len(),
        status.body["forkServer"]
    ));
    let mean = (!pss.is_empty()).then(|| mib(pss.iter().sum::<u64>()) / pss.len() as f64);
    let rows: [(&str, &str, f64, &'static str, Option<Target>); 10] = [
        (
            "py_fleet_ready",
            "live idle instances, all ready at once (fork server)",
            if reached { n as f64 } else { 0.0 },
            "instances",
            Some(Target::ge("value", 1000.0)),
        ),
        (
            "py_fleet_processes",
            "  instance processes found (by their environment)",
            instances.len() as f64,
            "processes",
            None,
        ),
        (
            "py_fleet_time_to_ready",
            "  time from the deploy to all of them ready",
            took,
            "s",
            None,
        ),
        (
            "py_fleet_peak_starting",
            "  most instances starting at once (as the API reported them)",
            peak_starting as f64,
            "instances",
            None,
        ),
        (
            "py_fleet_pss_total",
            "  total PSS of the instances and the fork server",
            gib(total_pss),
            "GiB",
            None,
        ),
        (
            "py_fleet_pss_mean",
            "  mean PSS per instance",
            mean.unwrap_or(f64::NAN),
            "MiB",
            Some(Target::le("value", 20.0)),
        ),
        (
            "py_fleet_memavailable_before",
            "  MemAvailable before the deploy",
            gib(before.0),
            "GiB",
            None,
        ),
        (
            "py_fleet_memavailable_with",
            "  MemAvailable with all of them running",
            gib(avail1),
            "GiB",
            None,
        ),
        (
            "py_fleet_memavailable_drop_per_instance",
            "  MemAvailable drop per instance",
            mib(before.0.saturating_sub(avail1)) / n.max(1) as f64,
            "MiB",
            None,
        ),
        (
            "py_fleet_server_rss",
            "  control-plane RSS with all of them",
            mib(srv.rss()),
            "MiB",
            None,
        ),
    ];
    for (id, what, v, unit, t) in rows {
        report.scalar(id, FLEET, what, v, unit, t, None);
    }
    report.scalar(
        "py_fleet_server_fds",
        FLEET,
        "  control-plane open fds",
        sys::open_fds(srv.pid).unwrap_or(0) as f64,
        "fds",
        None,
        Some(format!(
            "threads {}; control-plane RSS before the deploy {:.1} MiB; MemTotal {:.1} GiB",
            sys::threads(srv.pid).unwrap_or(0),
            mib(before.1),
            gib(total)
        )),
    );
}

/// Deletes the fleet's agent, waits (up to 5 min) for its last instance process, stops the
/// server and checks that nothing tagged is left.
async fn fleet_teardown(srv: &mut Server, name: &str, tag: &str, report: &mut Report) {
    let t1 = Instant::now();
    let r = srv.undeploy(name).await;
    if !r.ok() {
        report.error(format!("fleet: delete: HTTP {} {}", r.status, r.body));
    }
    let left = loop {
        let left: Vec<i32> = sys::pids_with_env("CATTERY_BENCH_AGENT", name)
            .into_iter()
            .filter(|p| !is_fork_server(*p))
            .collect();
        if left.is_empty() || t1.elapsed() > Duration::from_secs(300) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    report.scalar(
        "py_fleet_stop_all",
        FLEET,
        "  time from the delete to the last instance process gone",
        t1.elapsed().as_secs_f64(),
        "s",
        None,
        None,
    );
    if !left.is_empty() {
        report.error(format!(
            "fleet: {} instance processes left 300 s after the delete",
            left.len()
        ));
    }
    for l in srv.log_errors().into_iter().take(5) {
        report.error(format!("server log (fleet): {l}"));
    }
    match srv.stop(Duration::from_secs(60)).await {
        Ok(st) if st.contains("exit status: 0") || st == "not running" => {}
        Ok(st) => report.error(format!("server exit (fleet): {st}")),
        Err(e) => report.error(format!("server stop (fleet): {e}")),
    }
    let after = sys::pids_with_env("CATTERY_BENCH_TAG", tag);
    if !after.is_empty() {
        report.error(format!(
            "fleet: {} tagged processes left after the server stopped",
            after.len()
        ));
    }
    log(format!(
        "fleet: done; MemAvailable {:.2} GiB",
        gib(meminfo().0)
    ));
}
