//! Session lifecycle guarantees (issue 5, `docs/lifecycle.md`), part 2: the warm pool,
//! capacity, start failures, redeploys, resource metrics and `agentProfile` limits.

use crate::common;
use std::time::{Duration, Instant};

use crate::common::{pid_alive, wait_for, Server};
use crate::lifecycle_util::*;
use serde_json::json;

/// L07: agents that end by themselves free their slot as soon as they are reaped; 20 loops of
/// connect/disconnect churn at `maxAgents` never see a 429 for the next start, never exceed
/// the cap, and return to zero processes and zero zombies each time.
#[tokio::test(flavor = "multi_thread")]
async fn l07_exits_free_their_slot_at_once_under_churn() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l07",
        &["--exit-after", "2", "--exit-code", "0"],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 5}}),
    )
    .await;
    for round in 0..20 {
        let starts =
            futures_util::future::join_all((0..5).map(|_| s.start_session("l07", json!({})))).await;
        let mut sids = Vec::new();
        for r in &starts {
            assert_eq!(r.status, 200, "round {round}: {:?}", r.body);
            sids.push(r.body["sessionId"].as_str().unwrap().to_string());
        }
        let a = s.agent("l07").await;
        assert!(a["activeSessionCount"].as_u64().unwrap() <= 5, "{a}");
        assert!(a["warmInstances"]["total"].as_u64().unwrap() <= 5, "{a}");
        for sid in &sids {
            let g = s.wait_ended("l07", sid, Duration::from_secs(20)).await;
            assert_eq!(g["endReason"], "completed", "{g}");
            assert_eq!(g["exitCode"], 0);
        }
        // Every exit has been reaped and recorded: the sixth start fits at once.
        let sixth = s.start_session("l07", json!({})).await;
        assert_eq!(sixth.status, 200, "round {round}: {:?}", sixth.body);
        assert_eq!(
            s.stop("l07", sixth.body["sessionId"].as_str().unwrap())
                .await
                .status,
            200
        );
        assert!(
            s.agent_pids().is_empty(),
            "round {round}: {:?}",
            s.agent_pids()
        );
        assert_no_zombies(&s).await;
    }
}

/// L08: one fresh process per session (distinct pids, memory does not carry over), and a
/// warm instance that turns not-ready is replaced so the reserve is restored.
#[tokio::test(flavor = "multi_thread")]
async fn l08_fresh_instance_per_session_and_not_ready_is_replaced() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l08",
        &["--rss-grow", "50"],
        json!({"autoScaling": {"minAgents": 1, "maxAgents": 1}}),
    )
    .await;
    let mut pids = Vec::new();
    for round in 0..5 {
        wait_warm_idle(&s, "l08", 1, Duration::from_secs(20)).await;
        let r = s.start_session("l08", json!({})).await;
        assert_eq!(r.status, 200, "round {round}: {:?}", r.body);
        assert_eq!(
            r.body["coldStart"], false,
            "round {round}: the reserved instance"
        );
        let sid = r.body["sessionId"].as_str().unwrap();
        let i = wait_for(Duration::from_secs(10), "the session's 50 MB", || async {
            let i = info_served(&s, "l08", sid).await;
            (i["rssBytes"].as_u64().unwrap() >= 50 << 20).then_some(i)
        })
        .await;
        assert_eq!(i["sessionsServed"], 1, "no reuse");
        let rss = i["rssBytes"].as_u64().unwrap();
        assert!(
            (50 << 20..150 << 20).contains(&rss),
            "round {round}: rss {rss}"
        );
        pids.push(i["pid"].as_i64().unwrap());
        assert_eq!(s.stop("l08", sid).await.status, 200);
    }
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "five sessions, five processes: {pids:?}");

    // The warm instance reports not-ready: it is drained and replaced.
    wait_warm_idle(&s, "l08", 1, Duration::from_secs(20)).await;
    let warm_pids = s.agent_pids();
    assert_eq!(warm_pids.len(), 1, "{warm_pids:?}");
    let old = warm_pids[0];
    let port: u16 = pid_env(old, "PORT").unwrap().parse().unwrap();
    let r = s
        .http
        .post(format!("http://127.0.0.1:{port}/control/not-ready"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_pid_gone(old, Duration::from_secs(15)).await;
    let w = wait_warm_idle(&s, "l08", 1, Duration::from_secs(20)).await;
    assert_eq!(w["total"], 1);
    let a = s.agent("l08").await;
    assert_eq!(a["ready"], true);
    assert_eq!(a["healthState"], "ready");
    let now = s.agent_pids();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], old);
    let r = s.start_session("l08", json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["coldStart"], false);
    assert_eq!(
        s.stop("l08", r.body["sessionId"].as_str().unwrap())
            .await
            .status,
        200
    );
}

/// At `maxAgents` with the reserve still starting (the refill after a session), a start
/// claims that instance instead of answering 429, and gets it as soon as it is ready.
#[tokio::test(flavor = "multi_thread")]
async fn start_claims_a_warm_instance_that_is_still_starting() {
    let s = Server::start(&[]).await;
    s.deploy(
        "claim",
        &["--startup-delay", "2"],
        json!({"autoScaling": {"minAgents": 1, "maxAgents": 1}}),
    )
    .await;
    wait_warm_idle(&s, "claim", 1, Duration::from_secs(20)).await;
    let first = s.start_ok("claim").await;
    assert_eq!(s.stop("claim", &first).await.status, 200);
    // The refill is starting now (2 s): the pool keeper starts it once the instance is gone,
    // which may be a moment after the stop's answer.
    let mut w = warm(&s, "claim").await;
    for _ in 0..100 {
        if w["starting"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        w = warm(&s, "claim").await;
    }
    assert_eq!(w["starting"], 1, "{w}");
    let t = Instant::now();
    let r = s.start_session("claim", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["coldStart"], true, "it was not ready yet");
    assert!(t.elapsed() < Duration::from_secs(10));
    let sid = r.body["sessionId"].as_str().unwrap();
    assert_eq!(info_served(&s, "claim", sid).await["sessionsServed"], 1);
    assert_eq!(s.agent_pids().len(), 1, "no extra instance above maxAgents");
    // Still at the cap: the next start is a 429 until this one ends.
    let r2 = s.start_session("claim", json!({})).await;
    assert_eq!(r2.status, 429, "{:?}", r2.body);
    assert_eq!(s.stop("claim", sid).await.status, 200);
}

/// L09 (default start timeout): a 15 s cold start returns once ready and reports it.
#[tokio::test(flavor = "multi_thread")]
async fn l09_slow_cold_start_returns_when_ready_and_reports_time_to_ready() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l09",
        &["--startup-delay", "15"],
        json!({"autoScaling": {"minAgents": 0}}),
    )
    .await;
    let t = Instant::now();
    let r = s.start_session("l09", json!({})).await;
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["coldStart"], true);
    let bss = r.body["botStartSeconds"].as_f64().unwrap();
    assert!((15.0..30.0).contains(&bss), "botStartSeconds {bss}");
    assert!(took.as_secs_f64() >= bss - 0.5);
    let sid = r.body["sessionId"].as_str().unwrap();
    let g = s.session("l09", sid).await;
    assert_eq!(g["coldStart"], true);
    assert_eq!(g["botStartSeconds"].as_f64().unwrap(), bss);
    assert_eq!(s.stop("l09", sid).await.status, 200);
}

/// L09 (short start timeout): a distinct `504 START_TIMEOUT` and no orphan instance.
#[tokio::test(flavor = "multi_thread")]
async fn l09_start_timeout_is_a_distinct_error_and_leaves_no_orphan() {
    let s = Server::start(&["--start-timeout-seconds", "5"]).await;
    s.deploy(
        "l09t",
        &["--startup-delay", "15"],
        json!({"autoScaling": {"minAgents": 0}}),
    )
    .await;
    let t = Instant::now();
    let r = s.start_session("l09t", json!({})).await;
    let took = t.elapsed();
    assert_err(&r, 504, "START_TIMEOUT");
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_secs(12),
        "answered after {took:?}"
    );
    assert!(
        s.agent_pids().is_empty(),
        "orphan left: {:?}",
        s.agent_pids()
    );
    assert_eq!(warm(&s, "l09t").await["total"], 0);
    let sess = s.latest_session("l09t").await;
    assert_eq!(sess["endReason"], "start_failed", "{sess}");
    assert!(sess["botStartSeconds"].is_null());
    assert!(!sess["endedAt"].is_null());
}

/// L10: distinct states for a crash loop, a slow start and a healthy agent; a start on the
/// crash-looping agent fails fast with a specific error (not 429, not a hang).
#[tokio::test(flavor = "multi_thread")]
async fn l10_crash_loop_starting_and_ready_are_distinct() {
    let s = Server::start(&[]).await;
    let warm1 = json!({"autoScaling": {"minAgents": 1, "maxAgents": 3}});
    s.deploy("l10-x", &["--exit-on-start", "1"], warm1.clone())
        .await;
    s.deploy("l10-y", &["--startup-delay", "10"], warm1.clone())
        .await;
    s.deploy("l10-z", &[], warm1.clone()).await;
    let list = s.req("GET", "/v1/agents", Some(&s.sk), None).await;
    assert_eq!(
        list.body["services"].as_array().unwrap().len(),
        3,
        "no deploy dropped"
    );
    let y = wait_for(Duration::from_secs(5), "Y starting", || async {
        let a = s.agent("l10-y").await;
        (a["healthState"] == "starting").then_some(a)
    })
    .await;
    assert_eq!(y["warmInstances"]["starting"], 1);
    assert_eq!(y["currentRevision"]["health"]["state"], "waiting");

    let x = wait_for(Duration::from_secs(20), "X crash_loop", || async {
        let a = s.agent("l10-x").await;
        (a["healthState"] == "crash_loop").then_some(a)
    })
    .await;
    let h = &x["currentRevision"]["health"];
    assert_eq!(h["reason"], "CrashLoopBackOff", "{x}");
    assert_eq!(h["lastExitCode"], 1, "{x}");
    assert!(
        h["message"]
            .as_str()
            .unwrap()
            .contains("fatal: crash on start"),
        "{x}"
    );
    assert!(h["restartCount"].as_u64().unwrap() >= 2);
    assert_eq!(x["ready"], false);
    let z = s.wait_ready("l10-z", Duration::from_secs(20)).await;
    assert_eq!(z["healthState"], "ready");

    for _ in 0..3 {
        let t = Instant::now();
        let r = s.start_session("l10-x", json!({})).await;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "fail fast, took {:?}",
            t.elapsed()
        );
        assert_eq!(r.status, 503, "{:?}", r.body);
        let code = r.body["code"].as_str().unwrap();
        assert!(
            code == "AGENT_CRASH_LOOP" || code == "INSTANCE_EXITED",
            "{:?}",
            r.body
        );
        // The exit, but not the output: that is in the agent's status (above), private.
        let e = r.body["error"].as_str().unwrap();
        assert!(e.contains("exit code 1"), "{:?}", r.body);
        assert!(!e.contains("crash on start"), "{:?}", r.body);
    }

    // Scaled to zero, the first failure is reported as such, then as a crash loop.
    s.deploy(
        "l10-x0",
        &["--exit-on-start", "3"],
        json!({"autoScaling": {"minAgents": 0}}),
    )
    .await;
    let r = s.start_session("l10-x0", json!({})).await;
    assert_err(&r, 503, "INSTANCE_EXITED");
    assert!(
        r.body["error"].as_str().unwrap().contains("exit code 3"),
        "{:?}",
        r.body
    );
    // The instance's output (a bot may print its secrets) is not in an answer that goes to
    // public-key callers; the session's record (private) has it.
    assert!(
        !r.body.to_string().contains("fatal: crash on start"),
        "{:?}",
        r.body
    );
    let sess = s.latest_session("l10-x0").await;
    let ended = sess["endMessage"].as_str().unwrap_or_default();
    assert!(ended.contains("fatal: crash on start"), "{sess}");
    let r = s.start_session("l10-x0", json!({})).await;
    assert_eq!(r.status, 503);
    let r = s.start_session("l10-x0", json!({})).await;
    assert_err(&r, 503, "AGENT_CRASH_LOOP");
    assert!(
        !r.body.to_string().contains("fatal: crash on start"),
        "{:?}",
        r.body
    );
    assert_eq!(s.agent("l10-x0").await["healthState"], "crash_loop");
}

/// L17: a redeploy sends new sessions to the new deployment, lets the old session run on in
/// its original process, and replaces the old warm instance.
#[tokio::test(flavor = "multi_thread")]
async fn l17_redeploy_keeps_running_sessions_and_replaces_warm_instances() {
    let s = Server::start(&[]).await;
    let v1 = s
        .deploy(
            "l17",
            &["--print-env", "VERSION"],
            json!({"env": {"VERSION": "v1"}, "autoScaling": {"minAgents": 1, "maxAgents": 5}}),
        )
        .await;
    let dep1 = v1["desiredDeploymentId"].as_str().unwrap().to_string();
    wait_warm_idle(&s, "l17", 1, Duration::from_secs(20)).await;
    let s1 = s.start_ok("l17").await;
    let pid1 = session_pid(&s, "l17", &s1).await;
    assert_eq!(pid_env(pid1, "VERSION").as_deref(), Some("v1"));
    // The reserve is refilled with a v1 instance.
    wait_warm_idle(&s, "l17", 1, Duration::from_secs(20)).await;
    let warm_v1: Vec<i32> = s.agent_pids().into_iter().filter(|p| *p != pid1).collect();
    assert_eq!(warm_v1.len(), 1);
    assert_eq!(pid_env(warm_v1[0], "VERSION").as_deref(), Some("v1"));

    let r = s
        .req(
            "POST",
            "/v1/agents/l17",
            Some(&s.sk),
            Some(json!({"env": {"VERSION": "v2", "CATTERY_TEST_TAG": s.tag}})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let dep2 = r.body["desiredDeploymentId"].as_str().unwrap().to_string();
    assert_ne!(dep1, dep2);

    // The v1 reserve is replaced by a v2 one; the busy v1 instance is untouched.
    wait_pid_gone(warm_v1[0], Duration::from_secs(15)).await;
    wait_for(Duration::from_secs(20), "a v2 warm instance", || async {
        let w = warm(&s, "l17").await;
        let v2 = s
            .agent_pids()
            .into_iter()
            .filter(|p| pid_env(*p, "VERSION").as_deref() == Some("v2"))
            .count();
        (w["idle"] == 1 && v2 == 1).then_some(())
    })
    .await;
    assert!(pid_alive(pid1));

    let r = s.start_session("l17", json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["coldStart"], false, "the v2 reserve");
    let s2 = r.body["sessionId"].as_str().unwrap().to_string();
    let pid2 = session_pid(&s, "l17", &s2).await;
    assert_eq!(pid_env(pid2, "VERSION").as_deref(), Some("v2"));
    assert_eq!(s.session("l17", &s1).await["deploymentId"], dep1.as_str());
    assert_eq!(s.session("l17", &s2).await["deploymentId"], dep2.as_str());
    let l1 = wait_log(&s, "l17", &s1, "env VERSION=").await;
    assert!(l1.iter().any(|l| l.log.contains("env VERSION=v1")));
    let l2 = wait_log(&s, "l17", &s2, "env VERSION=").await;
    assert!(l2.iter().any(|l| l.log.contains("env VERSION=v2")));

    // The v1 session runs on in its original process.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let g = s.session("l17", &s1).await;
    assert!(g["endedAt"].is_null(), "{g}");
    let i = info(&s, "l17", &s1).await;
    assert_eq!(i["pid"].as_i64().unwrap() as i32, pid1);
    assert_eq!(i["sessionsServed"], 1);
    assert_eq!(s.stop("l17", &s1).await.status, 200);
    assert_eq!(s.stop("l17", &s2).await.status, 200);
}

/// A burst of parallel starts above `maxAgents` admits exactly `maxAgents` and answers 429
/// at once to the rest.
#[tokio::test(flavor = "multi_thread")]
async fn burst_of_parallel_starts_admits_exactly_max_agents() {
    let s = Server::start(&[]).await;
    s.deploy(
        "burst",
        &["--startup-delay", "1"],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 3}}),
    )
    .await;
    let rs = futures_util::future::join_all((0..10).map(|_| async {
        let t = Instant::now();
        let r = s.start_session("burst", json!({})).await;
        (r, t.elapsed())
    }))
    .await;
    let ok: Vec<_> = rs.iter().filter(|(r, _)| r.status == 200).collect();
    let busy: Vec<_> = rs.iter().filter(|(r, _)| r.status == 429).collect();
    assert_eq!(ok.len(), 3, "{rs:?}");
    assert_eq!(busy.len(), 7, "{rs:?}");
    for (r, took) in &busy {
        assert_eq!(r.body["code"], "429");
        assert!(r.body["error"].is_string() && r.body["message"].is_string());
        assert!(
            *took < Duration::from_secs(1),
            "429 at once, not after {took:?}"
        );
    }
    assert_eq!(s.agent("burst").await["activeSessionCount"], 3);
    for (r, _) in ok {
        assert_eq!(
            s.stop("burst", r.body["sessionId"].as_str().unwrap())
                .await
                .status,
            200
        );
    }
    assert!(s.agent_pids().is_empty());
}

/// Resource metrics: sampled every `--metrics-interval-ms`, served live and kept after the end
/// (`resourceMetrics` with p50/p90/p95/p99 and the time series).
#[tokio::test(flavor = "multi_thread")]
async fn resource_metrics_are_sampled_and_kept() {
    let s = Server::start(&["--metrics-interval-ms", "200"]).await;
    s.deploy("metrics", &["--rss-grow", "30"], json!({})).await;
    let sid = s.start_ok("metrics").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let g = s.session("metrics", &sid).await;
    let m = &g["resourceMetrics"];
    assert!(m.is_object(), "{g}");
    let n = m["sampleCount"].as_u64().unwrap();
    assert!(n >= 5, "2 s at 200 ms: {n} samples");
    for k in ["id", "sessionId", "eventTs", "createdAt"] {
        assert!(!m[k].is_null(), "{k} missing: {m}");
    }
    for q in ["P50", "P90", "P95", "P99"] {
        assert!(m[format!("cpuMillicores{q}")].is_u64(), "{m}");
        assert!(m[format!("memoryBytes{q}")].is_u64(), "{m}");
    }
    let p = |k: &str| m[k].as_u64().unwrap();
    assert!(
        p("memoryBytesP50") <= p("memoryBytesP90") && p("memoryBytesP90") <= p("memoryBytesP95")
    );
    assert!(p("memoryBytesP95") <= p("memoryBytesP99"));
    assert!(
        p("memoryBytesP99") >= 30 << 20,
        "the agent holds 30 MB: {m}"
    );
    let ts = m["timeseries"].as_array().unwrap();
    assert_eq!(ts.len() as u64, n);
    for e in ts {
        assert!(e["t"].is_i64() && e["c"].is_u64() && e["m"].is_u64(), "{e}");
    }
    assert_eq!(s.stop("metrics", &sid).await.status, 200);
    let after = s.session("metrics", &sid).await;
    let m2 = &after["resourceMetrics"];
    assert!(
        m2["sampleCount"].as_u64().unwrap() >= n,
        "kept after the end: {after}"
    );

    // The default interval (5 s) is the documented one.
    let help = std::process::Command::new(common::cattery_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("metrics-interval-ms") && help.contains("5000"),
        "{help}"
    );
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/lifecycle.md"
    ))
    .unwrap();
    assert!(
        doc.contains("every 5 s"),
        "docs/lifecycle.md documents the 5 s default"
    );
}

/// `agentProfile` limits through the v1 cgroups where the machine has them.
#[tokio::test(flavor = "multi_thread")]
async fn agent_profile_limits_are_applied_through_cgroups() {
    let mem_root = std::path::Path::new("/sys/fs/cgroup/memory");
    if !mem_root.join("memory.limit_in_bytes").exists() && !mem_root.join("cgroup.procs").exists() {
        eprintln!("no cgroup v1 memory controller here: nothing to check");
        return;
    }
    let s = Server::start(&[]).await;
    let server_id = std::fs::read_to_string(s.data_dir().join("server-id")).unwrap();
    let server_id = server_id.trim();
    for (name, profile, mem, quota) in [
        ("p1x", "agent-1x", 1u64 << 30, 50_000u64),
        ("p2x", "agent-2x", 2u64 << 30, 100_000u64),
    ] {
        s.deploy(name, &[], json!({"agentProfile": profile})).await;
        let sid = s.start_ok(name).await;
        let pid = session_pid(&s, name, &sid).await;
        let inst = pid_env(pid, "CATTERY_INSTANCE_ID").unwrap();
        let dir = mem_root.join("cattery").join(server_id).join(&inst);
        let limit: u64 = std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(limit, mem, "{profile}");
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "agent in its memory cgroup"
        );
        let cpu = std::path::Path::new("/sys/fs/cgroup/cpu/cattery")
            .join(server_id)
            .join(&inst);
        if let Ok(q) = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")) {
            assert_eq!(q.trim().parse::<u64>().unwrap(), quota, "{profile}");
        }
        let pids = std::path::Path::new("/sys/fs/cgroup/pids/cattery")
            .join(server_id)
            .join(&inst);
        if let Ok(p) = std::fs::read_to_string(pids.join("pids.max")) {
            assert_ne!(p.trim(), "max", "{profile} has a pids limit");
        }
        assert_eq!(s.stop(name, &sid).await.status, 200);
        assert!(!dir.exists(), "cgroup removed with the instance");
    }
}

/// An instance killed by the kernel for going over its `agentProfile` memory limit ends
/// `out_of_memory`, with a message naming the profile and its limit (issue 16, item 6).
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_over_its_memory_limit_ends_out_of_memory() {
    let mem_root = std::path::Path::new("/sys/fs/cgroup/memory");
    if !mem_root.join("cgroup.procs").exists() {
        eprintln!("no cgroup v1 memory controller here: nothing to check");
        return;
    }
    let s = Server::start(&[]).await;
    // agent-1x holds 1 GiB: the agent touches 1.25 GiB at session start.
    s.deploy(
        "oom",
        &["--rss-grow", "1280"],
        json!({"agentProfile": "agent-1x"}),
    )
    .await;
    let sid = s.start_ok("oom").await;
    let g = s.wait_ended("oom", &sid, Duration::from_secs(60)).await;
    assert_eq!(g["endReason"], "out_of_memory", "{g}");
    let msg = g.to_string();
    assert!(
        msg.contains("out of memory") && msg.contains("agent-1x") && msg.contains("1024 MiB"),
        "{g}"
    );
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

/// `resources` (`deploy --resources`) are the instance's limits: 128Mi of memory, and an
/// agent touching 256 MiB ends `out_of_memory` naming them.
#[tokio::test(flavor = "multi_thread")]
async fn explicit_resources_are_the_memory_limit() {
    let mem_root = std::path::Path::new("/sys/fs/cgroup/memory");
    if !mem_root.join("cgroup.procs").exists() {
        eprintln!("no cgroup v1 memory controller here: nothing to check");
        return;
    }
    let s = Server::start(&[]).await;
    s.deploy(
        "sized",
        &["--rss-grow", "256"],
        json!({"resources": {"cpu": "500m", "memory": "128Mi"}}),
    )
    .await;
    let sid = s.start_ok("sized").await;
    let g = s.wait_ended("sized", &sid, Duration::from_secs(60)).await;
    assert_eq!(g["endReason"], "out_of_memory", "{g}");
    let msg = g.to_string();
    assert!(
        msg.contains("resources.memory 128Mi") && msg.contains("128 MiB"),
        "{g}"
    );
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

/// A redeploy whose instances crash at start does not take the agent down: the previous
/// deployment serves every start meanwhile (its warm instance, then cold starts), the agent is
/// `available` but not `ready`, and the new deployment's failure is what the status reports.
/// The next redeploy that gets ready serves from then on.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_redeploy_leaves_the_previous_deployment_serving() {
    let s = Server::start(&[]).await;
    let v1 = s
        .deploy(
            "roll",
            &[],
            json!({"env": {"VERSION": "v1"}, "autoScaling": {"minAgents": 1, "maxAgents": 4}}),
        )
        .await;
    let dep1 = v1["desiredDeploymentId"].as_str().unwrap().to_string();
    wait_warm_idle(&s, "roll", 1, Duration::from_secs(20)).await;
    let redeploy = |switches: Vec<&str>, version: &str| {
        let mut cmd = vec![agent_bin()];
        cmd.extend(switches.iter().map(|s| s.to_string()));
        json!({"command": cmd, "env": {"VERSION": version, "CATTERY_TEST_TAG": s.tag}})
    };
    let r = s
        .req(
            "POST",
            "/v1/agents/roll",
            Some(&s.sk),
            Some(redeploy(vec!["--exit-on-start", "3"], "v2")),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let dep2 = r.body["desiredDeploymentId"].as_str().unwrap().to_string();
    assert_ne!(dep1, dep2);

    // The new deployment fails its starts until it backs off as a crash loop.
    let a = wait_for(Duration::from_secs(30), "v2 crash-looping", || async {
        let a = s.agent("roll").await;
        (a["healthState"] == "crash_loop").then_some(a)
    })
    .await;
    assert_eq!(a["ready"], false, "{a}");
    assert_eq!(a["available"], true, "the previous deployment serves: {a}");
    assert_eq!(a["previousRevision"]["deploymentID"], dep1.as_str(), "{a}");

    // Every start meanwhile runs v1: first its warm instance, then cold starts.
    let mut sids = Vec::new();
    for i in 0..3 {
        let r = s.start_session("roll", json!({})).await;
        assert_eq!(
            r.status, 200,
            "start {i} during a broken rollout: {:?}",
            r.body
        );
        assert_eq!(r.body["coldStart"], i > 0, "{:?}", r.body);
        let sid = r.body["sessionId"].as_str().unwrap().to_string();
        assert_eq!(s.session("roll", &sid).await["deploymentId"], dep1.as_str());
        let pid = session_pid(&s, "roll", &sid).await;
        assert_eq!(pid_env(pid, "VERSION").as_deref(), Some("v1"));
        sids.push(sid);
    }
    for sid in &sids {
        assert_eq!(s.stop("roll", sid).await.status, 200);
    }

    // A fixed redeploy gets ready and serves from then on.
    let r = s
        .req(
            "POST",
            "/v1/agents/roll",
            Some(&s.sk),
            Some(redeploy(vec![], "v3")),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let dep3 = r.body["desiredDeploymentId"].as_str().unwrap().to_string();
    s.wait_ready("roll", Duration::from_secs(30)).await;
    let sid = s.start_ok("roll").await;
    assert_eq!(s.session("roll", &sid).await["deploymentId"], dep3.as_str());
    assert_eq!(s.stop("roll", &sid).await.status, 200);
}
