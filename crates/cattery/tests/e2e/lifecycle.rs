//! Session lifecycle guarantees (issue 5, `docs/lifecycle.md`), part 1: one session at a time.
//! Each `lNN_` test is the case of the same number in `lifecycle-cases.md`, against the real
//! binary and the test agent. Timing bounds are generous: CI has 2 cores and runs tests in
//! parallel.

use crate::common;
use std::time::{Duration, Instant};

use crate::common::{pid_alive, wait_for, Server};
use crate::lifecycle_util::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// L01: the supervisor enforces `maxSessionDuration` itself (the agent ignores both the
/// header and the closed transport); a second session never lands in the overrunning process.
#[tokio::test(flavor = "multi_thread")]
async fn l01_max_session_duration_is_enforced_and_never_shared() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l01",
        &[
            "--ignore-transport-close",
            "--ignore-sigterm",
            "--last-words",
        ],
        json!({"maxSessionDuration": 60, "stopGraceSeconds": 2,
               "autoScaling": {"minAgents": 0, "maxAgents": 2}}),
    )
    .await;
    let t0 = Instant::now();
    let a = s.start_ok("l01").await;
    let ia = info_served(&s, "l01", &a).await;
    let pid_a = ia["pid"].as_i64().unwrap() as i32;
    let death = watch_death(pid_a, Duration::from_secs(120));

    tokio::time::sleep_until((t0 + Duration::from_secs(30)).into()).await;
    let b = s.start_ok("l01").await;
    let ib = info_served(&s, "l01", &b).await;
    assert_ne!(ia["pid"], ib["pid"], "B must not share A's process");
    assert_ne!(ia["pgid"], ib["pgid"], "B must not share A's process group");
    assert_eq!(ib["sessionsServed"], 1);
    assert_eq!(info(&s, "l01", &a).await["sessionsServed"], 1);

    let g = s.wait_ended("l01", &a, Duration::from_secs(90)).await;
    let dead_ms = death.await.unwrap().expect("A's process must die");
    assert_eq!(g["endReason"], "max_duration", "{g}");
    assert_eq!(g["exitSignal"], 9, "ignored SIGTERM, so SIGKILL: {g}");
    let lived =
        iso_to_ms(g["endedAt"].as_str().unwrap()) - iso_to_ms(g["createdAt"].as_str().unwrap());
    assert!(
        (60_000..=60_000 + 2_000 + 5_000).contains(&lived),
        "A lived {lived} ms; limit 60 s + grace 2 s"
    );
    assert!(dead_ms <= iso_to_ms(g["endedAt"].as_str().unwrap()) + 1000);
    assert!(!pid_alive(pid_a));

    // The log stream of A ends with the platform's termination record, after its last words.
    let logs = wait_log(&s, "l01", &a, "reason=max_duration").await;
    let last = logs.last().unwrap();
    assert_eq!(last.stream, "platform", "{logs:?}");
    assert!(last.log.contains("reason=max_duration"), "{last:?}");
    assert!(
        logs.iter().any(|l| l.log.contains("last words on stdout")),
        "SIGTERM first: {logs:?}"
    );
    assert!(logs
        .iter()
        .all(|l| l.session_id.as_deref() == Some(a.as_str())));

    // B runs on, in its own instance.
    assert!(s.session("l01", &b).await["endedAt"].is_null());
    assert_eq!(info(&s, "l01", &b).await["pid"], ib["pid"]);
    assert_eq!(s.stop("l01", &b).await.status, 200);
    assert!(s.agent_pids().is_empty(), "{:?}", s.agent_pids());
    assert_no_zombies(&s).await;
}

/// L02: a stop during startup is acted on at once (the agent gets SIGTERM while it still
/// imports; a container the stop catches before the engine started it is never started),
/// the start never delivers, and the slot is free again.
#[tokio::test(flavor = "multi_thread")]
async fn l02_stop_during_startup_is_immediate() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l02",
        &["--startup-delay", "20"],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 1}}),
    )
    .await;
    for round in 0..2 {
        let (start, (sid, del, del_took)) =
            tokio::join!(s.start_session("l02", json!({})), async {
                let sid = wait_active_session(&s, "l02").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let t = Instant::now();
                let r = s.stop("l02", &sid).await;
                (sid, r, t.elapsed())
            });
        assert_eq!(del.status, 200, "round {round}: {:?}", del.body);
        assert_eq!(del.body, json!({"status": "terminated", "session_id": sid}));
        assert!(
            del_took < Duration::from_secs(4),
            "DELETE waited {del_took:?}: it must not wait for readiness or the grace"
        );
        assert!(
            s.agent_pids().is_empty(),
            "process group gone when DELETE answers"
        );
        assert_err(&start, 409, "STOPPED_DURING_START");
        let g = s.session("l02", &sid).await;
        assert_eq!(g["endReason"], "stopped_during_start", "{g}");
        assert!(g["botStartSeconds"].is_null());
        assert_eq!(warm(&s, "l02").await["total"], 0, "slot released");
        let logs = wait_log(&s, "l02", &sid, "reason=stopped_during_start").await;
        assert!(
            !logs.iter().any(|l| l.log.contains("bot started")),
            "no session delivered after the stop: {logs:?}"
        );
        // An agent that was running (it logs its start first) got the SIGTERM while it still
        // imported. A container the stop caught before the engine started it never ran.
        if logs
            .iter()
            .any(|l| l.log.contains("starting, startup delay"))
        {
            assert!(
                logs.iter().any(|l| l.log.contains("received SIGTERM")),
                "{logs:?}"
            );
        } else {
            assert!(
                std::env::var("CATTERY_TEST_RUNTIME").as_deref() == Ok("docker"),
                "a process agent always runs before its stop: {logs:?}"
            );
        }
    }
    assert_no_zombies(&s).await;
}

/// L03 (DELETE variant): a quick hang-up on an agent whose shutdown hangs forever; the
/// platform kills the group at the end of the grace and the session leaves the active list.
#[tokio::test(flavor = "multi_thread")]
async fn l03_quick_hangup_with_hanging_shutdown_is_killed_after_grace() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l03",
        &[
            "--startup-delay",
            "2",
            "--hang-on-exit",
            "--ignore-transport-close",
        ],
        json!({"stopGraceSeconds": 2}),
    )
    .await;
    let t0 = Instant::now();
    let sid = s.start_ok("l03").await;
    tokio::time::sleep_until((t0 + Duration::from_millis(2500)).into()).await;
    let sent_ms = unix_ms();
    let t = Instant::now();
    assert_eq!(s.stop("l03", &sid).await.status, 200);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3 + 2),
        "DELETE took {took:?}; grace 2 s"
    );
    assert!(!active_sessions(&s, "l03").await.contains(&sid));
    assert!(s.agent_pids().is_empty());
    let g = s.session("l03", &sid).await;
    assert_eq!(g["endReason"], "stopped");
    assert_eq!(g["exitSignal"], 9, "{g}");
    let ended = iso_to_ms(g["endedAt"].as_str().unwrap());
    assert!(
        ended - sent_ms <= 2000 + 1000 + 500,
        "billing stops at the kill: {}",
        ended - sent_ms
    );
    let logs = wait_log(&s, "l03", &sid, "SIGKILL after").await;
    assert!(logs.iter().any(|l| l.log.contains("shutting down")));
}

/// L03 (transport variant): the client hangs up right after connecting; the agent ignores
/// the closed transport and hangs on SIGTERM; the session still ends within grace + 1 s.
#[tokio::test(flavor = "multi_thread")]
async fn l03_quick_hangup_of_the_transport_ends_a_hanging_session() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l03ws",
        &[
            "--startup-delay",
            "2",
            "--hang-on-exit",
            "--ignore-transport-close",
        ],
        json!({"stopGraceSeconds": 2}),
    )
    .await;
    let a = s
        .start_session("l03ws", json!({"transport": "websocket"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let sid = a.body["sessionId"].as_str().unwrap().to_string();
    let url = format!(
        "{}?token={}",
        a.body["wsUrl"].as_str().unwrap(),
        a.body["token"].as_str().unwrap()
    );
    let t0 = Instant::now();
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws connect");
    tokio::time::sleep_until((t0 + Duration::from_millis(2500)).into()).await;
    let dropped_ms = unix_ms();
    drop(ws);
    let g = s.wait_ended("l03ws", &sid, Duration::from_secs(20)).await;
    assert_eq!(g["endReason"], "client_disconnected", "{g}");
    let ended = iso_to_ms(g["endedAt"].as_str().unwrap());
    assert!(
        ended - dropped_ms <= 2000 + 1000 + 1500,
        "ended {} ms after the hang-up",
        ended - dropped_ms
    );
    assert!(s.agent_pids().is_empty());
}

/// L05: the agent reports the session's end (`/bot` answered) but its process does not exit;
/// the platform kills it after the grace and never returns it to the warm pool.
#[tokio::test(flavor = "multi_thread")]
async fn l05_session_end_without_process_exit_is_killed_not_reused() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l05",
        &["--bot-seconds", "3", "--hang-on-exit"],
        json!({"stopGraceSeconds": 2, "autoScaling": {"minAgents": 1, "maxAgents": 1}}),
    )
    .await;
    wait_warm_idle(&s, "l05", 1, Duration::from_secs(20)).await;
    let r = s.start_session("l05", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["coldStart"], false);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let pid = session_pid(&s, "l05", &sid).await;
    let g = s.wait_ended("l05", &sid, Duration::from_secs(20)).await;
    assert_eq!(g["endReason"], "completed", "{g}");
    assert_eq!(g["completionStatus"], "HTTP_COMPLETED");
    assert_eq!(g["exitSignal"], 9, "killed after the grace: {g}");
    let lived =
        iso_to_ms(g["endedAt"].as_str().unwrap()) - iso_to_ms(g["createdAt"].as_str().unwrap());
    assert!(
        (4_900..=3_000 + 2_000 + 4_000).contains(&lived),
        "lived {lived} ms"
    );
    assert!(!pid_alive(pid));
    // A fresh instance replaces it.
    wait_warm_idle(&s, "l05", 1, Duration::from_secs(20)).await;
    let next = s.start_ok("l05").await;
    let info2 = info_served(&s, "l05", &next).await;
    assert_ne!(info2["pid"].as_i64().unwrap() as i32, pid);
    assert_eq!(info2["sessionsServed"], 1);
    assert_eq!(s.stop("l05", &next).await.status, 200);
}

/// Stop a wrapper (`sh -c "agent ...; true"`) whose agent binds a port and spawns a
/// `setsid` grandchild: every process goes, the port is free, the next start works.
async fn wrapper_grandchild_and_port_die_with_the_session(s: &Server, name: &str) {
    let port = common::free_port();
    let script = format!("{} --bind-port {port} --spawn-child; true", agent_bin());
    deploy_cmd(s, name, vec!["sh".into(), "-c".into(), script], json!({})).await;
    for round in 0..2 {
        let sid = s.start_ok(name).await;
        let i = info(s, name, &sid).await;
        let child = i["childPid"].as_i64().unwrap() as i32;
        let pids = s.agent_pids();
        assert!(pids.len() >= 3, "wrapper, agent and grandchild: {pids:?}");
        assert!(pids.contains(&child));
        assert!(!port_free(port), "the agent holds {port}");
        let r = s.stop(name, &sid).await;
        assert_eq!(r.status, 200);
        assert!(
            s.agent_pids().is_empty(),
            "round {round}: leaked {:?}",
            s.agent_pids()
        );
        assert!(!pid_alive(child));
        assert!(port_free(port), "port {port} is still held");
    }
    assert_no_zombies(s).await;
}

/// L06: stop signals the whole instance (cgroup), not one pid.
#[tokio::test(flavor = "multi_thread")]
async fn l06_killing_the_wrapper_kills_the_real_bot_and_frees_its_port() {
    let s = Server::start(&[]).await;
    wrapper_grandchild_and_port_die_with_the_session(&s, "l06").await;
}

/// The fallback without cgroups (process group + subreaper + env-tag scan) still removes a
/// `setsid` grandchild, on stop and on the agent's own exit.
#[tokio::test(flavor = "multi_thread")]
async fn fallback_without_cgroups_still_kills_grandchildren() {
    let s = Server::start_with_env(&[], &[("CATTERY_NO_CGROUPS", "1")]).await;
    s.deploy("nocg", &["--spawn-child"], json!({})).await;
    let sid = s.start_ok("nocg").await;
    let i = info(&s, "nocg", &sid).await;
    let pid = i["pid"].as_i64().unwrap() as i32;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        !cg.contains("cattery"),
        "fallback must not use cgroups: {cg}"
    );
    assert_eq!(s.stop("nocg", &sid).await.status, 200);
    assert!(s.agent_pids().is_empty(), "leaked {:?}", s.agent_pids());

    // Natural end: the agent exits by itself and its grandchild goes with it.
    s.deploy(
        "nocg-exit",
        &["--spawn-child", "--exit-after", "1"],
        json!({}),
    )
    .await;
    let sid = s.start_ok("nocg-exit").await;
    let child = info(&s, "nocg-exit", &sid).await["childPid"]
        .as_i64()
        .unwrap() as i32;
    let g = s
        .wait_ended("nocg-exit", &sid, Duration::from_secs(15))
        .await;
    assert_eq!(g["endReason"], "completed");
    assert!(!pid_alive(child), "grandchild outlived its session");
    assert!(s.agent_pids().is_empty());

    wrapper_grandchild_and_port_die_with_the_session(&s, "nocg-wrap").await;
}

/// L13: DELETE is idempotent for ended sessions, 404 for unknown ones, 400 for malformed
/// ids, and an agent-name mismatch never stops another agent's session.
#[tokio::test(flavor = "multi_thread")]
async fn l13_delete_of_ended_unknown_and_mismatched_sessions() {
    let s = Server::start(&[]).await;
    s.deploy("l13", &["--exit-after", "1"], json!({})).await;
    s.deploy("l13-other", &[], json!({})).await;
    let sid = s.start_ok("l13").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let g = s.wait_ended("l13", &sid, Duration::from_secs(10)).await;
    assert_eq!(g["endReason"], "completed");
    for _ in 0..2 {
        let r = s.stop("l13", &sid).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body, json!({"status": "terminated", "session_id": sid}));
    }
    let again = s.session("l13", &sid).await;
    assert_eq!(again["endReason"], g["endReason"]);
    assert_eq!(again["endedAt"], g["endedAt"]);
    assert_eq!(again["completionStatus"], g["completionStatus"]);

    let unknown = uuid::Uuid::new_v4().to_string();
    assert_err(&s.stop("l13", &unknown).await, 404, "404");
    assert_err(&s.stop("l13", "not-a-uuid").await, 400, "400");

    let live = s.start_ok("l13-other").await;
    let pid = session_pid(&s, "l13-other", &live).await;
    assert_err(&s.stop("l13", &live).await, 404, "404");
    assert_eq!(s.stop("no-such-agent", &live).await.status, 404);
    assert!(s.session("l13-other", &live).await["endedAt"].is_null());
    // Its agent still answers, as the same process. Under the Docker runtime the pid is the
    // container's own (another pid namespace), so the host's /proc is asked only otherwise.
    assert_eq!(
        session_pid(&s, "l13-other", &live).await,
        pid,
        "a mismatched DELETE must not stop it"
    );
    if std::env::var("CATTERY_TEST_RUNTIME").as_deref() != Ok("docker") {
        assert!(pid_alive(pid), "a mismatched DELETE must not stop it");
    }
    assert_eq!(s.stop("l13-other", &live).await.status, 200);
}

/// L14: under the cap every start is served: a 200 always means an instance is assigned.
#[tokio::test(flavor = "multi_thread")]
async fn l14_every_start_under_the_cap_gets_an_instance() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l14",
        &[],
        json!({"autoScaling": {"minAgents": 1, "maxAgents": 5}}),
    )
    .await;
    wait_warm_idle(&s, "l14", 1, Duration::from_secs(20)).await;
    let a = s.start_session("l14", json!({})).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["coldStart"], false, "A takes the reserved instance");
    let (b, c) = tokio::join!(
        s.start_session("l14", json!({})),
        s.start_session("l14", json!({}))
    );
    let mut pids = Vec::new();
    for r in [&a, &b, &c] {
        assert_eq!(r.status, 200, "{:?}", r.body);
        let sid = r.body["sessionId"].as_str().unwrap();
        // Assigned: the instance answers through the session proxy right away.
        let i = info_served(&s, "l14", sid).await;
        assert_eq!(i["sessionId"], sid);
        pids.push(i["pid"].as_i64().unwrap());
    }
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three sessions, three instances");
    assert_eq!(s.agent("l14").await["activeSessionCount"], 3);
    assert_eq!(active_sessions(&s, "l14").await.len(), 3);
    for r in [a, b, c] {
        assert_eq!(
            s.stop("l14", r.body["sessionId"].as_str().unwrap())
                .await
                .status,
            200
        );
    }
}

/// L15: a scaled-to-zero agent wakes on start: the start returns only once an instance is
/// assigned, and the status goes scaled_to_zero -> starting -> ready.
#[tokio::test(flavor = "multi_thread")]
async fn l15_scaled_to_zero_agent_wakes_on_start() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l15",
        &["--startup-delay", "2"],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 2}}),
    )
    .await;
    let first = s.start_ok("l15").await;
    assert_eq!(s.stop("l15", &first).await.status, 200);
    let a = wait_for(Duration::from_secs(10), "scale to zero", || async {
        let a = s.agent("l15").await;
        (a["healthState"] == "scaled_to_zero" && a["warmInstances"]["total"] == 0).then_some(a)
    })
    .await;
    assert_eq!(a["ready"], true, "ready stays true when scaled to zero");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut seen: Vec<String> = Vec::new();
    let (r, ()) = tokio::join!(s.start_session("l15", json!({})), async {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(1500) {
            let st = s.agent("l15").await["healthState"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if seen.last() != Some(&st) {
                seen.push(st);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["coldStart"], true);
    assert!(r.body["botStartSeconds"].as_f64().unwrap() >= 2.0);
    assert!(
        seen.contains(&"starting".to_string()),
        "states seen: {seen:?}"
    );
    let sid = r.body["sessionId"].as_str().unwrap();
    assert_eq!(
        info_served(&s, "l15", sid).await["sessionId"],
        sid,
        "assigned and running"
    );
    let a = s.agent("l15").await;
    assert_eq!(a["healthState"], "ready");
    assert_eq!(a["activeSessionCount"], 1);
    assert_eq!(s.stop("l15", sid).await.status, 200);
}

/// L18 (DELETE variants): stops at 1 s, 3 s and 4.9 s into a 5 s startup each reach a
/// terminal state with a reason, write the end record, release the slot, and no instance
/// becomes ready afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn l18_stop_during_initialization_at_1_3_and_4_9_seconds() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l18",
        &["--startup-delay", "5"],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 1}}),
    )
    .await;
    for delay_ms in [1000u64, 3000, 4900] {
        let t0 = Instant::now();
        let (start, (sid, del)) = tokio::join!(s.start_session("l18", json!({})), async {
            let sid = wait_active_session(&s, "l18").await;
            tokio::time::sleep_until((t0 + Duration::from_millis(delay_ms)).into()).await;
            (sid.clone(), s.stop("l18", &sid).await)
        });
        assert_eq!(del.status, 200, "at {delay_ms} ms: {:?}", del.body);
        let g = s.session("l18", &sid).await;
        if start.status == 200 {
            // Only possible when the instance was ready and delivered before the DELETE.
            assert_eq!(g["endReason"], "stopped", "at {delay_ms} ms: {g}");
        } else {
            assert_err(&start, 409, "STOPPED_DURING_START");
            assert_eq!(
                g["endReason"], "stopped_during_start",
                "at {delay_ms} ms: {g}"
            );
            assert!(g["botStartSeconds"].is_null());
        }
        assert!(!g["endedAt"].is_null());
        assert_eq!(
            warm(&s, "l18").await["total"],
            0,
            "slot released at {delay_ms} ms"
        );
        assert!(s.agent_pids().is_empty());
        wait_log(&s, "l18", &sid, "[cattery] session").await;
        let logs = session_logs(&s, "l18", &sid).await;
        assert!(
            logs.iter()
                .any(|l| l.stream == "platform" && l.log.contains("ended at")),
            "{logs:?}"
        );
    }
    // Nothing becomes ready afterwards for the stopped sessions.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(s.agent_pids().is_empty());
    let w = warm(&s, "l18").await;
    assert_eq!(w["total"], 0, "{w}");
    assert!(active_sessions(&s, "l18").await.is_empty());
}

/// L18 (transport variant): the websocket client drops 2 s into a 5 s startup; the start is
/// cancelled (`client_disconnected`), no session is delivered, the slot is released.
#[tokio::test(flavor = "multi_thread")]
async fn l18_transport_drop_during_initialization() {
    let s = Server::start(&[]).await;
    s.deploy(
        "l18ws",
        &["--startup-delay", "5"],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 1}}),
    )
    .await;
    let a = s
        .start_session("l18ws", json!({"transport": "websocket"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let sid = a.body["sessionId"].as_str().unwrap().to_string();
    let url = format!(
        "{}?token={}",
        a.body["wsUrl"].as_str().unwrap(),
        a.body["token"].as_str().unwrap()
    );
    let t0 = Instant::now();
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws connect");
    ws.send(Message::Text("early audio".into())).await.unwrap();
    tokio::time::sleep_until((t0 + Duration::from_secs(2)).into()).await;
    drop(ws);
    let g = s.wait_ended("l18ws", &sid, Duration::from_secs(20)).await;
    assert_eq!(g["endReason"], "client_disconnected", "{g}");
    assert!(g["botStartSeconds"].is_null(), "never delivered: {g}");
    // The caller hung up before the agent had the session: ended before the agent started,
    // and listed so by the CLI's `--end-state` filter (not as a completed call).
    assert_eq!(g["endState"], "ended_before_agent_start", "{g}");
    for (state, listed) in [("ended_before_agent_start", true), ("completed", false)] {
        let r = s
            .req(
                "GET",
                &format!("/v1/agents/l18ws/sessions?endState={state}"),
                Some(&s.sk),
                None,
            )
            .await;
        let ids: Vec<&str> = r.body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x["sessionId"].as_str())
            .collect();
        assert_eq!(ids.contains(&sid.as_str()), listed, "{state}: {:?}", r.body);
    }
    let lived =
        iso_to_ms(g["endedAt"].as_str().unwrap()) - iso_to_ms(g["createdAt"].as_str().unwrap());
    assert!(
        lived < 4500,
        "cancelled before the instance was ready, not after ({lived} ms)"
    );
    assert!(s.agent_pids().is_empty());
    assert_eq!(warm(&s, "l18ws").await["total"], 0);
    let logs = wait_log(&s, "l18ws", &sid, "reason=client_disconnected").await;
    assert!(
        !logs.iter().any(|l| l.log.contains("bot started")),
        "{logs:?}"
    );

    // The websocket transport still works end to end afterwards (early frames included).
    let a = s
        .start_session("l18ws", json!({"transport": "websocket"}))
        .await;
    let url = format!(
        "{}?token={}",
        a.body["wsUrl"].as_str().unwrap(),
        a.body["token"].as_str().unwrap()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws connect");
    ws.send(Message::Text("sent while starting".into()))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if t.as_str() == "sent while starting" {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(echoed, "a frame sent during startup reaches the agent");
    ws.close(None).await.unwrap();
    let sid2 = a.body["sessionId"].as_str().unwrap();
    let g = s.wait_ended("l18ws", sid2, Duration::from_secs(15)).await;
    assert_eq!(g["endReason"], "client_disconnected");
}

/// N start/stop cycles with agents that ignore SIGTERM and spawn `setsid` grandchildren leave
/// zero processes, zero zombies, zero cgroups and zero instance directories behind.
#[tokio::test(flavor = "multi_thread")]
async fn start_stop_cycles_with_stubborn_agents_leave_nothing_behind() {
    let s = Server::start(&[]).await;
    s.deploy(
        "cycles",
        &[
            "--ignore-sigterm",
            "--ignore-transport-close",
            "--spawn-child",
        ],
        json!({"stopGraceSeconds": 0.5, "autoScaling": {"minAgents": 0, "maxAgents": 2}}),
    )
    .await;
    for round in 0..10 {
        let sid = s.start_ok("cycles").await;
        let child = info(&s, "cycles", &sid).await["childPid"].as_i64().unwrap() as i32;
        assert!(s.agent_pids().len() >= 2, "agent and grandchild");
        assert_eq!(s.stop("cycles", &sid).await.status, 200);
        assert!(
            s.agent_pids().is_empty(),
            "round {round}: {:?}",
            s.agent_pids()
        );
        assert!(!pid_alive(child));
        let g = s.session("cycles", &sid).await;
        assert_eq!(g["endReason"], "stopped");
        assert_eq!(g["exitSignal"], 9);
    }
    assert_no_zombies(&s).await;
    let left: Vec<_> = std::fs::read_dir(s.data_dir().join("instances"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "instance dirs left: {left:?}");
    let server_id = std::fs::read_to_string(s.data_dir().join("server-id")).unwrap();
    for root in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
    ] {
        let base = std::path::Path::new(root)
            .join("cattery")
            .join(server_id.trim());
        if let Ok(rd) = std::fs::read_dir(&base) {
            // The stock of spare cgroup slots (`runtime/process/spare.rs`, v1 only) lives
            // next to the instances' cgroups while the server runs: at most two, each holding
            // only its parked process (none of an instance). Nothing else may be left.
            let (spares, dirs): (Vec<_>, Vec<_>) = rd
                .flatten()
                .filter(|e| e.path().is_dir())
                .partition(|e| e.file_name().to_string_lossy().starts_with("spare-"));
            let dirs: Vec<_> = dirs.iter().map(|e| e.file_name()).collect();
            assert!(
                dirs.is_empty(),
                "cgroups left under {}: {dirs:?}",
                base.display()
            );
            assert!(
                spares.len() <= 2,
                "spares under {}: {}",
                base.display(),
                spares.len()
            );
            for e in &spares {
                let procs =
                    std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                assert!(
                    procs.lines().count() <= 1,
                    "{}: {procs}",
                    e.path().display()
                );
                for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    assert!(
                        !s.agent_pids().contains(&p),
                        "an agent process in a spare cgroup: {p}"
                    );
                }
            }
        }
    }
}

/// One terminal state: DELETEs racing the agent's own exit all answer 200, and exactly one
/// end is recorded and never changes afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn stops_racing_a_natural_end_record_exactly_one_end() {
    let s = Server::start(&[]).await;
    s.deploy("race", &["--exit-after", "1"], json!({})).await;
    for delay_ms in [900u64, 1000, 1100] {
        let sid = s.start_ok("race").await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let (a, b, c) = tokio::join!(
            s.stop("race", &sid),
            s.stop("race", &sid),
            s.stop("race", &sid)
        );
        for r in [a, b, c] {
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.body["status"], "terminated");
        }
        let g = s.session("race", &sid).await;
        let reason = g["endReason"].as_str().unwrap().to_string();
        assert!(reason == "completed" || reason == "stopped", "{g}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let g2: Value = s.session("race", &sid).await;
        assert_eq!(g2["endReason"], g["endReason"]);
        assert_eq!(g2["endedAt"], g["endedAt"]);
        let logs = wait_log(&s, "race", &sid, "ended at").await;
        let ends = logs
            .iter()
            .filter(|l| l.stream == "platform" && l.log.contains("ended at"))
            .count();
        assert_eq!(ends, 1, "one end record: {logs:?}");
    }
    assert!(s.agent_pids().is_empty());
}
