//! The soak: thousands of start/stop cycles over agents that misbehave in different ways, then
//! an audit: leaked processes, directories and cgroups, lost or duplicated session records,
//! sessions without an end, 5xx answers, zombies, and a clean server exit.
//!
//! With `--crash-sessions N` the crash test runs after the churn: N live sessions, a SIGKILL
//! of the server, a restart on the same data dir; every session must still be active (its
//! process the same), then stop with 200. Its sessions join the churn's audit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::report::{Report, Target};
use crate::server::Server;
use crate::sys;

/// Soak settings.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// Start/stop cycles in total.
    pub cycles: usize,
    /// Concurrent workers.
    pub concurrency: usize,
    /// Seed of the random mix (same seed, same sequence per worker).
    pub seed: u64,
    /// Sessions held live through a SIGKILL of the server (0: no crash test).
    pub crash_sessions: usize,
}

/// One kind of agent in the mix.
struct Kind {
    name: &'static str,
    switches: &'static [&'static str],
    grace_s: f64,
    /// End reasons that are fine for this kind.
    expected: &'static [&'static str],
}

/// The kinds the churn picks from (the last one of [`KINDS`] is the crash test's).
const CHURN_KINDS: usize = 4;

const KINDS: [Kind; 5] = [
    Kind {
        name: "soak-coop",
        switches: &[],
        grace_s: 5.0,
        expected: &["stopped"],
    },
    Kind {
        name: "soak-ignore",
        switches: &["--ignore-sigterm", "--ignore-transport-close"],
        grace_s: 0.1,
        expected: &["stopped"],
    },
    Kind {
        name: "soak-child",
        switches: &["--spawn-child"],
        grace_s: 2.0,
        expected: &["stopped"],
    },
    Kind {
        name: "soak-exit",
        switches: &["--exit-after", "0.05"],
        grace_s: 2.0,
        expected: &["stopped", "completed"],
    },
    Kind {
        name: "soak-crash",
        // A session outlives the `/bot` connection the crash breaks, as a real bot's does.
        switches: &["--ignore-transport-close"],
        grace_s: 5.0,
        expected: &["stopped"],
    },
];

/// Counts answers by operation and status.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<(String, u16), u64>>);

impl Tally {
    fn add(&self, op: &str, status: u16) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *g.entry((op.to_string(), status)).or_default() += 1;
    }
    fn snapshot(&self) -> BTreeMap<(String, u16), u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Runs the soak against `srv` and fills `report`. `srv` must be the only holder at the end
/// (the server is stopped to check for a clean exit).
pub async fn run(
    srv: &mut Arc<Server>,
    tag: &str,
    plan: &SoakPlan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let pool = 4u32;
    for k in &KINDS[..CHURN_KINDS] {
        srv.deploy(k.name, k.switches, pool, 1000, k.grace_s, tag)
            .await?;
    }
    let crash = &KINDS[CHURN_KINDS];
    srv.deploy(crash.name, crash.switches, 0, 1000, crash.grace_s, tag)
        .await?;
    for k in &KINDS[..CHURN_KINDS] {
        srv.wait_idle(k.name, u64::from(pool), Duration::from_secs(60))
            .await?;
    }
    eprintln!(
        "[bench] soak: {} cycles, {} workers, 4 agent kinds",
        plan.cycles, plan.concurrency
    );
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let workers = (0..plan.concurrency).map(|w| {
        let seed = plan.seed.wrapping_add(w as u64);
        tokio::spawn(worker(
            srv.clone(),
            next.clone(),
            tally.clone(),
            plan.cycles,
            seed,
        ))
    });
    let mut started: Vec<(usize, String)> = Vec::new();
    for r in join_all(workers).await {
        let (s, e) = r?;
        started.extend(s);
        for e in e {
            report.error(e);
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    eprintln!(
        "[bench] soak: {} sessions started in {wall:.1} s; auditing",
        started.len()
    );

    // Duplicated ids in the answers.
    let mut seen = HashSet::new();
    let dup_answers = started
        .iter()
        .filter(|(_, id)| !seen.insert(id.clone()))
        .count();

    wait_all_ended(srv, report).await;
    let crashed = if plan.crash_sessions > 0 {
        crash_test(srv, tag, plan.crash_sessions, &tally, report).await?
    } else {
        Vec::new()
    };
    let crash_started = crashed.len();
    started.extend(crashed.into_iter().map(|id| (CHURN_KINDS, id)));
    let rec = audit_records(srv, &started, report).await?;
    let left = audit_leftovers(srv, tag, report).await;
    let (ok, c4, c5, tr) = srv.counters.snapshot();

    // A clean exit, and nothing of ours left after it.
    let exit = match Arc::get_mut(srv) {
        Some(s) => s.stop(Duration::from_secs(10)).await?,
        None => "still shared".into(),
    };
    let after_exit = sys::pids_with_env("CATTERY_BENCH_TAG", tag).len();
    let f = Figures {
        started: started.len() - crash_started,
        wall,
        dup_answers,
        rec,
        left,
        counters: (ok, c4, c5, tr),
        after_exit,
        exit,
    };
    report_tables(report, &tally, &f.rec.reasons);
    report_scalars(report, plan, &f);
    report_failures(report, plan, &f);
    Ok(())
}

/// One soak worker: start, hold, stop (sometimes a double stop) until `total` cycles are
/// taken. Returns the sessions it started (kind index, id) and its first errors.
async fn worker(
    srv: Arc<Server>,
    next: Arc<AtomicUsize>,
    tally: Arc<Tally>,
    total: usize,
    seed: u64,
) -> (Vec<(usize, String)>, Vec<String>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut started: Vec<(usize, String)> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    while next.fetch_add(1, Ordering::Relaxed) < total {
        let ki = rng.random_range(0..CHURN_KINDS);
        let k = &KINDS[ki];
        let r = srv.start_session(k.name).await;
        tally.add("start", r.status);
        let Some(id) = r.body["sessionId"].as_str().filter(|_| r.ok()) else {
            if errors.len() < 10 {
                errors.push(format!("start {}: HTTP {} {}", k.name, r.status, r.body));
            }
            continue;
        };
        let id = id.to_string();
        started.push((ki, id.clone()));
        let roll: f64 = rng.random();
        if k.name == "soak-exit" && roll < 0.4 {
            // Let it end on its own.
            continue;
        }
        let hold = if k.name == "soak-exit" {
            rng.random_range(0..100)
        } else {
            rng.random_range(0..30)
        };
        tokio::time::sleep(Duration::from_millis(hold)).await;
        if roll > 0.95 {
            // Fault: look at it, then two stops racing each other.
            let g = srv
                .get(&format!("/v1/agents/{}/sessions/{id}", k.name))
                .await;
            tally.add("get", g.status);
            let (a, b) = tokio::join!(srv.stop_session(k.name, &id), srv.stop_session(k.name, &id));
            for s in [a, b] {
                tally.add("stop", s.status);
                if !s.ok() && errors.len() < 10 {
                    errors.push(format!(
                        "double stop {}: HTTP {} {}",
                        k.name, s.status, s.body
                    ));
                }
            }
        } else {
            let s = srv.stop_session(k.name, &id).await;
            tally.add("stop", s.status);
            if !s.ok() && errors.len() < 10 {
                errors.push(format!("stop {}: HTTP {} {}", k.name, s.status, s.body));
            }
        }
    }
    (started, errors)
}

/// The crash test: `n` live sessions, a SIGKILL of the server, a restart; every session must
/// be re-adopted (still active, its process still there) and stoppable. Returns the sessions
/// started (their records and leftovers are audited with the churn's).
async fn crash_test(
    srv: &mut Arc<Server>,
    tag: &str,
    n: usize,
    tally: &Tally,
    report: &mut Report,
) -> anyhow::Result<Vec<String>> {
    let name = KINDS[CHURN_KINDS].name;
    let t0 = Instant::now();
    let starts = join_all((0..n).map(|_| srv.start_session(name))).await;
    let mut ids = Vec::new();
    for r in starts {
        tally.add("crash start", r.status);
        match r.body["sessionId"].as_str().filter(|_| r.ok()) {
            Some(id) => ids.push(id.to_string()),
            None => report.error(format!("crash test start: HTTP {} {}", r.status, r.body)),
        }
    }
    let live_before = agent_pids(tag, name);
    let Some(s) = Arc::get_mut(srv) else {
        anyhow::bail!("the server is still shared; cannot crash it");
    };
    s.crash_and_restart().await?;
    let restarted = t0.elapsed().as_secs_f64();
    let live_after = agent_pids(tag, name);
    if live_after.len() < ids.len() || live_after != live_before {
        report.error(format!(
            "crash test: {} agent processes before the SIGKILL, {} after the restart",
            live_before.len(),
            live_after.len()
        ));
    }
    let mut not_active = 0;
    for id in &ids {
        let g = srv.get(&format!("/v1/agents/{name}/sessions/{id}")).await;
        tally.add("crash get", g.status);
        if !g.ok() || !g.body["endedAt"].is_null() {
            not_active += 1;
            if not_active <= 5 {
                report.error(format!(
                    "crash test: session {id} not re-adopted: HTTP {} {}",
                    g.status, g.body
                ));
            }
        }
    }
    let stops = join_all(ids.iter().map(|id| srv.stop_session(name, id))).await;
    let mut stop_failed = 0;
    for s in stops {
        tally.add("crash stop", s.status);
        if !s.ok() {
            stop_failed += 1;
            if stop_failed <= 5 {
                report.error(format!("crash test stop: HTTP {} {}", s.status, s.body));
            }
        }
    }
    eprintln!(
        "[bench] crash test: {} sessions, server SIGKILLed and restarted at {restarted:.1} s, {not_active} not re-adopted, {stop_failed} stops failed, {:.1} s in all",
        ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let z = Some(Target::le("value", 0.0));
    report.scalar(
        "crash_sessions",
        "soak",
        "sessions held through a SIGKILL of the server",
        ids.len() as f64,
        "sessions",
        Some(Target::ge("value", n as f64)),
        None,
    );
    report.scalar(
        "crash_not_readopted",
        "soak",
        "sessions not re-adopted after the restart",
        not_active as f64,
        "",
        z.clone(),
        None,
    );
    report.scalar(
        "crash_stop_failed",
        "soak",
        "stops of re-adopted sessions that failed",
        stop_failed as f64,
        "",
        z,
        None,
    );
    Ok(ids)
}

/// The pids of `agent`'s processes of this run.
fn agent_pids(tag: &str, agent: &str) -> Vec<i32> {
    let mine = sys::pids_with_env("CATTERY_BENCH_AGENT", agent);
    let mut v: Vec<i32> = sys::pids_with_env("CATTERY_BENCH_TAG", tag)
        .into_iter()
        .filter(|p| mine.contains(p))
        .collect();
    v.sort_unstable();
    v
}

/// Waits (up to 60 s) until every session has ended (the exit-after ones on their own).
async fn wait_all_ended(srv: &Server, report: &mut Report) {
    let t = Instant::now();
    loop {
        let mut active = 0;
        for k in &KINDS {
            active += srv.active_count(k.name).await.unwrap_or(u64::MAX / 8);
        }
        if active == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            report.error(format!(
                "{active} sessions still active 60 s after the soak"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the session records say after the soak.
struct RecordAudit {
    missing: usize,
    dup_records: usize,
    unended: usize,
    extra: usize,
    count_mismatch: usize,
    unexpected: u64,
    reasons: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Records: each started session exactly once, every one ended, end reasons as expected.
async fn audit_records(
    srv: &Server,
    started: &[(usize, String)],
    report: &mut Report,
) -> anyhow::Result<RecordAudit> {
    let (mut missing, mut dup_records, mut unended, mut extra, mut count_mismatch) =
        (0, 0, 0, 0, 0);
    let mut reasons: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut unexpected = 0u64;
    for (ki, k) in KINDS.iter().enumerate() {
        let (total, records) = srv.all_sessions(k.name).await?;
        if total as usize != records.len() {
            count_mismatch += 1;
            report.error(format!(
                "{}: total_count {total} but {} records listed",
                k.name,
                records.len()
            ));
        }
        let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
        for r in &records {
            if let Some(id) = r["sessionId"].as_str() {
                by_id.entry(id.to_string()).or_default().push(r);
            }
        }
        dup_records += by_id.values().filter(|v| v.len() > 1).count();
        let mine: HashSet<&String> = started
            .iter()
            .filter(|(i, _)| *i == ki)
            .map(|(_, id)| id)
            .collect();
        missing += mine
            .iter()
            .filter(|id| !by_id.contains_key(id.as_str()))
            .count();
        extra += by_id.keys().filter(|id| !mine.contains(id)).count();
        for r in &records {
            if r["endedAt"].is_null() {
                unended += 1;
                continue;
            }
            let reason = r["endReason"].as_str().unwrap_or("?").to_string();
            if !k.expected.contains(&reason.as_str()) {
                unexpected += 1;
                if unexpected <= 5 {
                    report.error(format!(
                        "{}: session {} ended with {reason}: {}",
                        k.name, r["sessionId"], r["endMessage"]
                    ));
                }
            }
            let m = reasons.entry(k.name.to_string()).or_default();
            *m.entry(reason).or_default() += 1;
            if r["exitSignal"].as_i64() == Some(libc::SIGKILL as i64) {
                *m.entry("sigkill".into()).or_default() += 1;
            }
        }
    }
    Ok(RecordAudit {
        missing,
        dup_records,
        unended,
        extra,
        count_mismatch,
        unexpected,
        reasons,
    })
}

/// What is left of the instances once the agents are deleted.
struct Leftovers {
    leaked: usize,
    dirs: usize,
    cgroups: usize,
    zombies: usize,
    log_errors: usize,
}

/// Processes: delete the agents (warm instances go), then nothing tagged may be left; nor
/// instance directories, cgroups or zombies.
async fn audit_leftovers(srv: &Server, tag: &str, report: &mut Report) -> Leftovers {
    for k in &KINDS {
        let r = srv.undeploy(k.name).await;
        if !r.ok() {
            report.error(format!("deleting {}: HTTP {}", k.name, r.status));
        }
    }
    let t = Instant::now();
    let mut leaked = sys::pids_with_env("CATTERY_BENCH_TAG", tag);
    while !leaked.is_empty() && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        leaked = sys::pids_with_env("CATTERY_BENCH_TAG", tag);
    }
    if !leaked.is_empty() {
        report.error(format!(
            "{} leaked processes: {:?}",
            leaked.len(),
            leaked
                .iter()
                .map(|p| (p, sys::cmdline(*p)))
                .collect::<Vec<_>>()
        ));
    }
    // Directories and cgroups go right after the processes (cleanup runs in order), so
    // give the server a moment before counting leftovers.
    let cg_base = sys::cgroup_base(&srv.server_id());
    let count_left = || {
        (
            sys::dir_entries(&srv.data_dir.join("instances")),
            cg_base
                .as_ref()
                .map(|b| sys::cgroup_children(b).len())
                .unwrap_or(0),
        )
    };
    let t = Instant::now();
    let (mut dirs, mut cgroups) = count_left();
    while (dirs > 0 || cgroups > 0) && t.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (dirs, cgroups) = count_left();
    }
    let zombies = sys::zombie_children(srv.pid).len();
    let log_errors = srv.log_errors();
    for l in log_errors.iter().take(5) {
        report.error(format!("server log: {l}"));
    }
    Leftovers {
        leaked: leaked.len(),
        dirs,
        cgroups,
        zombies,
        log_errors: log_errors.len(),
    }
}

/// Everything the soak measured.
struct Figures {
    started: usize,
    wall: f64,
    dup_answers: usize,
    rec: RecordAudit,
    left: Leftovers,
    /// 2xx, 4xx, 5xx, no answer.
    counters: (u64, u64, u64, u64),
    after_exit: usize,
    exit: String,
}

fn report_tables(
    report: &mut Report,
    tally: &Tally,
    reasons: &BTreeMap<String, BTreeMap<String, u64>>,
) {
    let tally_rows: Vec<Value> = tally
        .snapshot()
        .into_iter()
        .map(|((op, st), n)| json!({"op": op, "status": st, "count": n}))
        .collect();
    report
        .tables
        .insert("soak_answers".into(), Value::Array(tally_rows));
    report.tables.insert(
        "soak_end_reasons".into(),
        Value::Array(
            reasons
                .iter()
                .map(|(k, m)| {
                    let mut o = serde_json::Map::new();
                    o.insert("agent".into(), json!(k));
                    for r in [
                        "stopped",
                        "completed",
                        "error",
                        "lost",
                        "start_failed",
                        "sigkill",
                    ] {
                        o.insert(r.into(), json!(m.get(r).copied().unwrap_or(0)));
                    }
                    Value::Object(o)
                })
                .collect(),
        ),
    );
}

fn report_scalars(report: &mut Report, plan: &SoakPlan, f: &Figures) {
    let (ok, c4, c5, tr) = f.counters;
    let (wall, after_exit) = (f.wall, f.after_exit);
    let z = |v: f64| Some(Target::le("value", v));
    let g = "soak";
    report.scalar(
        "soak_cycles",
        g,
        "sessions started",
        f.started as f64,
        "sessions",
        Some(Target::ge("value", plan.cycles as f64)),
        Some(format!("{} workers, {wall:.1} s", plan.concurrency)),
    );
    report.scalar(
        "soak_rate",
        g,
        "cycles per second",
        f.started as f64 / wall,
        "cycles/s",
        None,
        None,
    );
    report.scalar(
        "soak_5xx",
        g,
        "5xx answers",
        c5 as f64,
        "",
        z(0.0),
        Some(format!("2xx {ok}, 4xx {c4}, no answer {tr}")),
    );
    report.scalar("soak_4xx", g, "4xx answers", c4 as f64, "", z(0.0), None);
    report.scalar(
        "soak_no_answer",
        g,
        "requests without an answer",
        tr as f64,
        "",
        z(0.0),
        None,
    );
    report.scalar(
        "soak_leaked_processes",
        g,
        "leaked processes (tagged, after agents deleted)",
        f.left.leaked as f64,
        "",
        z(0.0),
        None,
    );
    report.scalar(
        "soak_leaked_after_exit",
        g,
        "tagged processes after the server exited",
        after_exit as f64,
        "",
        z(0.0),
        None,
    );
    report_leftover_scalars(report, f);
}

/// The audit figures: leftovers, records, log errors (all must be 0 but `extra`).
fn report_leftover_scalars(report: &mut Report, f: &Figures) {
    let z = |v: f64| Some(Target::le("value", v));
    let g = "soak";
    let (dirs, cgroups, zombies) = (f.left.dirs, f.left.cgroups, f.left.zombies);
    let (missing, unended) = (f.rec.missing, f.rec.unended);
    let lost = missing + unended;
    let duplicated = f.rec.dup_records + f.dup_answers;
    report.scalar(
        "soak_leaked_dirs",
        g,
        "leftover instance directories",
        dirs as f64,
        "",
        z(0.0),
        None,
    );
    report.scalar(
        "soak_leaked_cgroups",
        g,
        "leftover instance cgroups",
        cgroups as f64,
        "",
        z(0.0),
        None,
    );
    report.scalar(
        "soak_zombies",
        g,
        "zombie children of the server",
        zombies as f64,
        "",
        z(0.0),
        None,
    );
    report.scalar(
        "soak_lost",
        g,
        "lost records (missing or never ended)",
        lost as f64,
        "",
        z(0.0),
        Some(format!("{missing} missing, {unended} without an end")),
    );
    report.scalar(
        "soak_duplicated",
        g,
        "duplicated records or ids",
        duplicated as f64,
        "",
        z(0.0),
        None,
    );
    report.scalar(
        "soak_unexpected_end",
        g,
        "sessions with an unexpected end reason",
        f.rec.unexpected as f64,
        "",
        z(0.0),
        None,
    );
    report.scalar(
        "soak_extra_records",
        g,
        "records of failed starts",
        f.rec.extra as f64,
        "",
        None,
        None,
    );
    report.scalar(
        "soak_server_log_errors",
        g,
        "ERROR lines in the server log",
        f.left.log_errors as f64,
        "",
        z(0.0),
        None,
    );
}

fn report_failures(report: &mut Report, plan: &SoakPlan, f: &Figures) {
    let (_, c4, c5, tr) = f.counters;
    let (dirs, cgroups, zombies, after_exit) =
        (f.left.dirs, f.left.cgroups, f.left.zombies, f.after_exit);
    let lost = f.rec.missing + f.rec.unended;
    let duplicated = f.rec.dup_records + f.dup_answers;
    let count_mismatch = f.rec.count_mismatch;
    let exit = &f.exit;
    for (cond, what) in [
        (c5 > 0, format!("{c5} 5xx answers")),
        (c4 > 0, format!("{c4} 4xx answers")),
        (tr > 0, format!("{tr} requests without an answer")),
        (
            after_exit > 0,
            format!("{after_exit} tagged processes after the server exited"),
        ),
        (dirs > 0, format!("{dirs} leftover instance directories")),
        (cgroups > 0, format!("{cgroups} leftover instance cgroups")),
        (
            zombies > 0,
            format!("{zombies} zombie children of the server"),
        ),
        (lost > 0, format!("{lost} lost session records")),
        (
            duplicated > 0,
            format!("{duplicated} duplicated session records or ids"),
        ),
        (
            count_mismatch > 0,
            format!("{count_mismatch} agents with a wrong total_count"),
        ),
        (
            f.started < plan.cycles,
            format!("only {} of {} cycles started", f.started, plan.cycles),
        ),
        (
            !exit.contains("exit status: 0"),
            format!("server exit: {exit}"),
        ),
    ] {
        if cond {
            report.error(what);
        }
    }
}
