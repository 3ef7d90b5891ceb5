//! `cattery-bench`: measures a release `cattery serve` against the machine's floor, and runs
//! load and fault soaks.
//!
//! ```text
//! cargo build --release -p cattery -p cattery-test-agent -p cattery-bench
//! target/release/cattery-bench --quick                  # about a minute on 2 cores
//! target/release/cattery-bench --json bench/results/x.json   # the full run, under 10 minutes
//! target/release/cattery-bench soak --cycles 2000       # load and fault run
//! target/release/cattery-bench soak --cycles 20000 --crash-sessions 100   # the trial's size
//! target/release/cattery-bench python --python <venv>/bin/python   # a real Pipecat bot
//! ```
//!
//! Every run starts its own `cattery serve` on a temporary data dir and a free loopback port,
//! creates keys with `cattery keys create`, deploys `cattery-test-agent` (tagged with
//! `CATTERY_BENCH_TAG=<uuid>` so its processes can be found in `/proc`), and drives it over
//! HTTP. Figures are min / p50 / p99 / max in milliseconds over the stated number of runs
//! (nearest-rank percentiles). The exit status is non-zero only on errors (5xx answers,
//! failed calls, leaks, lost records, a crash), never on timings; missed targets are
//! reported in the table and the JSON. See `docs/performance.md`.

mod bench;
mod containers;
mod floor;
mod live;
mod pybots;
mod report;
mod seed;
mod server;
mod soak;
mod stats;
mod sys;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use bench::{Ctx, Plan};
use report::Report;
use server::{Bins, Server};

#[derive(Parser)]
#[command(
    name = "cattery-bench",
    about = "Benchmark and soak harness for Cattery",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and fault run: start/stop cycles over cooperative, SIGTERM-ignoring,
    /// grandchild-spawning and self-exiting agents, then an audit for leaks and lost records.
    Soak(SoakArgs),
    /// The Docker runtime against the engine alone, same run: cold and warm start (warm next
    /// to the process runtime's), stop, churn and control-plane memory per live container.
    /// Needs an engine and the `cattery-test/agent` image (`scripts/docker-images.sh`).
    Containers(ContainerArgs),
    /// A real Pipecat bot (`examples/session-status` by default, run by the bundled Python
    /// runner), with the fork server and without it, same run: cold start (start request to
    /// session delivered), warm start, PSS per idle instance, and how many idle instances fit.
    Python(PythonArgs),
}

#[derive(Args, Clone)]
struct PythonArgs {
    /// Python with pipecat-ai, fastapi and uvicorn (`scripts/setup-python.sh` makes one).
    #[arg(long)]
    python: PathBuf,
    /// The bot directory (with `bot.py`).
    #[arg(long, default_value = "examples/session-status")]
    bot_dir: PathBuf,
    /// The short plan: 3 starts of each kind, 3 idle instances (a smoke check).
    #[arg(long)]
    quick: bool,
    /// Cold starts per mode.
    #[arg(long, default_value_t = 30)]
    cold_runs: usize,
    /// Warm starts per mode.
    #[arg(long, default_value_t = 30)]
    warm_runs: usize,
    /// Idle instances for the memory figure.
    #[arg(long, default_value_t = 20)]
    idle: usize,
    /// Also start this many live idle instances at once with the fork server (the issue's
    /// 1,000), measure memory and the time to get them all ready, then delete them all.
    #[arg(long, default_value_t = 0)]
    fleet: usize,
    /// Only the `--fleet` run (no cold, warm or PSS figures).
    #[arg(long)]
    fleet_only: bool,
    /// Longest wait for the `--fleet` instances to be ready, seconds.
    #[arg(long, default_value_t = 900.0)]
    fleet_timeout_seconds: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone)]
struct ContainerArgs {
    /// The image the agent runs.
    #[arg(long, default_value = "cattery-test/agent:latest")]
    image: String,
    /// Cold starts, and floor runs of the engine alone.
    #[arg(long, default_value_t = 20)]
    cold_runs: usize,
    /// Warm starts per runtime.
    #[arg(long, default_value_t = 50)]
    warm_runs: usize,
    /// Churn duration, seconds.
    #[arg(long, default_value_t = 20.0)]
    churn_seconds: f64,
    /// Churn workers.
    #[arg(long, default_value_t = 4)]
    churn_workers: usize,
    /// Live containers for the memory figure.
    #[arg(long, default_value_t = 20)]
    live: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone)]
struct Common {
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `cattery` binary (default: next to this one).
    #[arg(long)]
    cattery: Option<PathBuf>,
    /// The `cattery-test-agent` binary (default: next to this one).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Keep the temporary data dir (printed at the end).
    #[arg(long)]
    keep_data: bool,
    /// Run the server on this PostgreSQL database (`postgres://...`, an empty one) instead of
    /// SQLite in the data dir.
    #[arg(long)]
    database_url: Option<String>,
    /// Nodes on the one database (needs `--database-url`): the warm phase sends each start to
    /// a node in turn and its stop to the node that started it; the churn phase sends each
    /// start and each stop to any node, as a load balancer does (a stop that lands on a node
    /// that does not own the session is forwarded to its owner; see `--churn-stops`); the
    /// other phases use the first node. The nodes share a cluster secret and a secrets key.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// With `--nodes` above 1: where churn sends a session's stop. `any` (default): a node
    /// picked at random, like a load balancer without stickiness (about (n-1)/n of the stops
    /// are forwarded to the owner); `owner`: the node that started it (no forwarding).
    #[arg(long, default_value = "any", value_parser = ["any", "owner"])]
    churn_stops: String,
    /// The PostgreSQL server's postmaster pid: the churn phase then reports the database's CPU
    /// over its window (the postmaster, its live backends, and those that exited meanwhile).
    #[arg(long)]
    postgres_pid: Option<i32>,
}

impl Common {
    /// The server's store flags.
    fn store_args(&self) -> Vec<&str> {
        match &self.database_url {
            Some(u) => vec!["--database-url", u.as_str()],
            None => Vec::new(),
        }
    }
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The short plan: fewer runs, 5 s of churn, 100 concurrent sessions (about a minute).
    #[arg(long)]
    quick: bool,
    /// Only these phases (comma-separated: floor,live,warm,cold,stop,churn,concurrency,api).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Concurrent churn workers (default 8).
    #[arg(long)]
    churn_workers: Option<usize>,
    /// Churn duration, seconds (default 30, quick 5).
    #[arg(long)]
    churn_seconds: Option<f64>,
    /// Active sessions to reach in the concurrency phase (default 1000, quick 100).
    #[arg(long)]
    sessions: Option<usize>,
    /// Warm start rounds per concurrency instead of the plan's, as `C:ROUNDS` pairs
    /// (comma-separated; e.g. `8:200` for 1,600 starts at concurrency 8).
    #[arg(long, value_delimiter = ',', value_parser = parse_warm)]
    warm: Vec<(usize, usize)>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone)]
struct SoakArgs {
    /// Start/stop cycles.
    #[arg(long, default_value_t = 2000)]
    cycles: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seed of the random mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Live sessions held through a SIGKILL of the server and its restart (the crash test:
    /// every one re-adopted, still active, then stopped); 0: no crash test.
    #[arg(long, default_value_t = 0)]
    crash_sessions: usize,
    #[command(flatten)]
    common: Common,
}

fn parse_warm(s: &str) -> Result<(usize, usize), String> {
    let (c, r) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not C:ROUNDS"))?;
    let c: usize = c.parse().map_err(|e| format!("{c:?}: {e}"))?;
    let r: usize = r.parse().map_err(|e| format!("{r:?}: {e}"))?;
    if c == 0 || r == 0 {
        return Err("concurrency and rounds must be at least 1".into());
    }
    Ok((c, r))
}

const PHASES: [&str; 8] = [
    "floor",
    "live",
    "warm",
    "cold",
    "stop",
    "churn",
    "concurrency",
    "api",
];

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(async move {
        match cli.cmd {
            Some(Cmd::Soak(a)) => run_soak(a).await,
            Some(Cmd::Containers(a)) => run_containers(a).await,
            Some(Cmd::Python(a)) => run_python(a).await,
            None => run_bench(cli.run).await,
        }
    });
    match res {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cattery-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

struct Setup {
    bins: Bins,
    dir: tempfile::TempDir,
    tag: String,
    report: Report,
}

fn setup(mode: &str, common: &Common) -> anyhow::Result<Setup> {
    let nofile = sys::raise_nofile();
    if cfg!(debug_assertions) {
        eprintln!("[bench] WARNING: debug build; timings are not representative (use --release)");
    }
    let bins = Bins::find(common.cattery.clone(), common.agent.clone())?;
    let dir = tempfile::Builder::new()
        .prefix("cattery-bench-")
        .tempdir()?;
    let tag = uuid::Uuid::new_v4().to_string();
    eprintln!(
        "[bench] {mode}: cattery {}, data dir {}, tag {tag}, open-file limit {nofile}",
        bins.cattery.display(),
        dir.path().display()
    );
    let report = Report::new(mode, sys::machine());
    Ok(Setup {
        bins,
        dir,
        tag,
        report,
    })
}

/// Final checks shared by both modes, output, and the verdict.
async fn finish(
    mut srv: Arc<Server>,
    mut report: Report,
    tag: &str,
    t0: Instant,
    common: &Common,
    dir: tempfile::TempDir,
) -> anyhow::Result<bool> {
    if let Some(s) = Arc::get_mut(&mut srv) {
        let (_, _, c5, tr) = s.counters.snapshot();
        if c5 > 0 {
            report.error(format!("{c5} answers were 5xx"));
        }
        if tr > 0 {
            report.error(format!("{tr} requests got no answer"));
        }
        for l in s.log_errors().into_iter().take(5) {
            report.error(format!("server log: {l}"));
        }
        match s.stop(Duration::from_secs(10)).await {
            Ok(st) if st.contains("exit status: 0") || st == "not running" => {}
            Ok(st) => report.error(format!("server exit: {st}")),
            Err(e) => report.error(format!("server stop: {e}")),
        }
    }
    drop(srv);
    let left = sys::pids_with_env("CATTERY_BENCH_TAG", tag);
    if !left.is_empty() {
        report.error(format!(
            "{} tagged processes outlived the server: {:?}",
            left.len(),
            left.iter()
                .map(|p| (p, sys::cmdline(*p)))
                .collect::<Vec<_>>()
        ));
        // Clean up after the failure: these carry this run's unique tag.
        for p in left {
            sys::signal(p, libc::SIGKILL);
        }
    }
    report.duration_s = t0.elapsed().as_secs_f64();
    report.finish();
    println!("{}", report.table());
    if let Some(p) = &common.json {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        eprintln!("[bench] wrote {}", p.display());
    }
    if common.keep_data {
        eprintln!("[bench] kept data dir {}", dir.keep().display());
    }
    Ok(report.errors.is_empty())
}

async fn run_bench(a: RunArgs) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let mut plan = if a.quick { Plan::quick() } else { Plan::full() };
    if let Some(w) = a.churn_workers {
        plan.churn_workers = w.max(1);
    }
    if let Some(s) = a.churn_seconds {
        plan.churn_seconds = s.max(0.5);
    }
    if let Some(n) = a.sessions {
        let n = n.max(1);
        plan.concurrency_checkpoints = [n / 10, n / 4, n / 2, n]
            .into_iter()
            .filter(|v| *v > 0)
            .collect();
        plan.concurrency_checkpoints.dedup();
    }
    if !a.warm.is_empty() {
        plan.warm = a.warm.clone();
    }
    for p in &a.only {
        anyhow::ensure!(
            PHASES.contains(&p.as_str()),
            "unknown phase {p:?}; phases: {PHASES:?}"
        );
    }
    anyhow::ensure!(
        a.common.nodes >= 1 && (a.common.nodes == 1 || a.common.database_url.is_some()),
        "--nodes above 1 needs --database-url (nodes share one database)"
    );
    let s = setup(plan.mode, &a.common)?;
    let mut store_args: Vec<String> = a
        .common
        .store_args()
        .into_iter()
        .map(str::to_string)
        .collect();
    if a.common.nodes > 1 {
        // One cluster: a shared cluster secret (forwarded stops) and secrets key; each node's
        // advertise URL is added at launch (its port).
        let secret = s.dir.path().join("cluster-secret");
        let key = s.dir.path().join("secrets-key");
        std::fs::write(&secret, "b".repeat(48))?;
        std::fs::write(&key, rand::random::<[u8; 32]>())?;
        for f in [&secret, &key] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))?;
        }
        for (flag, f) in [
            ("--cluster-secret-file", &secret),
            ("--secrets-key-file", &key),
        ] {
            store_args.push(flag.into());
            store_args.push(f.display().to_string());
        }
    }
    let store_args: Vec<&str> = store_args.iter().map(String::as_str).collect();
    let srv = Arc::new(Server::start(&s.bins, s.dir.path(), &store_args).await?);
    let mut nodes = vec![srv.clone()];
    for i in 2..=a.common.nodes {
        let dir = s.dir.path().join(format!("node-{i}"));
        let node = Server::start(&s.bins, &dir, &store_args).await?;
        nodes.push(Arc::new(node));
    }
    let mut ctx = Ctx {
        stops_to_owner: a.common.churn_stops == "owner",
        postgres_pid: a.common.postgres_pid,
        nodes,
        srv,
        bins: s.bins,
        tag: s.tag.clone(),
        plan,
        report: s.report,
    };
    for phase in PHASES {
        if !a.only.is_empty() && !a.only.iter().any(|p| p == phase) {
            continue;
        }
        let t = Instant::now();
        let r = match phase {
            "floor" => ctx.floor().await,
            "live" => ctx.live().await,
            "warm" => ctx.warm().await,
            "cold" => ctx.cold().await,
            "stop" => ctx.stop().await,
            "churn" => ctx.churn().await,
            "concurrency" => ctx.concurrency().await,
            _ => ctx.api().await,
        };
        eprintln!("[bench] {phase} took {:.1} s", t.elapsed().as_secs_f64());
        if let Err(e) = r {
            ctx.report.error(format!("phase {phase} failed: {e:#}"));
        }
    }
    // The other nodes stop first (drained by their drop); the first is stopped by `finish`.
    let Ctx {
        srv, report, nodes, ..
    } = ctx;
    drop(nodes);
    finish(srv, report, &s.tag, t0, &a.common, s.dir).await
}

async fn run_soak(a: SoakArgs) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let mut s = setup("soak", &a.common)?;
    let mut srv = Arc::new(Server::start(&s.bins, s.dir.path(), &a.common.store_args()).await?);
    let plan = soak::SoakPlan {
        cycles: a.cycles,
        concurrency: a.concurrency.max(1),
        seed: a.seed,
        crash_sessions: a.crash_sessions,
    };
    if let Err(e) = soak::run(&mut srv, &s.tag, &plan, &mut s.report).await {
        s.report.error(format!("soak failed: {e:#}"));
    }
    finish(srv, s.report, &s.tag, t0, &a.common, s.dir).await
}

async fn run_containers(a: ContainerArgs) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let mut s = setup("containers", &a.common)?;
    let srv = Arc::new(Server::start(&s.bins, s.dir.path(), &["--runtime", "auto"]).await?);
    let plan = containers::ContainerPlan {
        image: a.image.clone(),
        cold_runs: a.cold_runs.max(1),
        warm_runs: a.warm_runs.max(1),
        churn_seconds: a.churn_seconds.max(1.0),
        churn_workers: a.churn_workers.max(1),
        live: a.live.max(1),
    };
    containers::run(&srv, &s.tag, &plan, &mut s.report).await;
    finish(srv, s.report, &s.tag, t0, &a.common, s.dir).await
}

async fn run_python(a: PythonArgs) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let mut s = setup("python", &a.common)?;
    let bot_dir = std::fs::canonicalize(&a.bot_dir)?;
    let plan = pybots::PyPlan {
        python: a.python.clone(),
        bot_dir,
        cold_runs: if a.quick { 3 } else { a.cold_runs.max(1) },
        warm_runs: if a.quick { 3 } else { a.warm_runs.max(1) },
        idle: if a.quick { 3 } else { a.idle.max(1) },
    };
    if !a.fleet_only {
        pybots::run(&s.bins, s.dir.path(), &s.tag, &plan, &mut s.report).await;
    }
    if a.fleet > 0 {
        let timeout = Duration::from_secs_f64(a.fleet_timeout_seconds.max(1.0));
        let ran = pybots::fleet(
            &s.bins,
            s.dir.path(),
            &s.tag,
            &plan,
            a.fleet,
            timeout,
            &mut s.report,
        )
        .await;
        if let Err(e) = ran {
            s.report.error(format!("fleet: {e:#}"));
        }
    }
    // Every server of this run is stopped; the shared checks and the output.
    let srv = Arc::new(Server::start(&s.bins, &s.dir.path().join("final"), &[]).await?);
    finish(srv, s.report, &s.tag, t0, &a.common, s.dir).await
}
