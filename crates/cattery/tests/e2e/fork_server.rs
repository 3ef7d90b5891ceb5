//! The Python fork server (`runtime/process/zygote.rs`): instances of `local:` bots forked from
//! a per-agent process that imported the bot once, with every lifecycle rule unchanged. Needs
//! `scripts/setup-python.sh` (as `python_bots`).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{self, Server};
use crate::python_bots::{
    agent_logs, example, fixture_bot, python, server, session_logs, wait_bot_running,
};

/// Waits for a log line of `agent` containing `needle`; returns it.
async fn wait_log(s: &Server, agent: &str, needle: &str) -> String {
    common::wait_for(Duration::from_secs(30), needle, || async {
        agent_logs(s, agent)
            .await
            .into_iter()
            .find(|l| l.contains(needle))
    })
    .await
}

/// A running session's logs, once the runner's "Starting bot session" line is in them: the
/// instance's output reaches the log store a little after the bot answers, so one read right
/// after [`wait_bot_running`] may not have its lines yet. Every line the runner printed before
/// that one is in.
async fn started_session_logs(s: &Server, agent: &str, sid: &str) -> Vec<String> {
    common::wait_for(
        Duration::from_secs(10),
        "the bot's start in its logs",
        || async {
            let logs = session_logs(s, agent, sid).await;
            logs.iter()
                .any(|l| l.contains("Starting bot session"))
                .then_some(logs)
        },
    )
    .await
}

/// The fork servers of this server's agents (not the spare child each keeps forked ahead,
/// which waits in its cgroup too).
fn fork_servers(s: &Server) -> Vec<i32> {
    let all: Vec<i32> = common::tagged_pids_all(&s.tag)
        .into_iter()
        .filter(|p| common::is_fork_server(*p))
        .collect();
    all.iter()
        .copied()
        .filter(|p| !all.contains(&ppid_of(*p)))
        .collect()
}

/// `forkServer` of an agent's status (`GET /v1/agents/{name}`).
async fn fork_status(s: &Server, agent: &str) -> serde_json::Value {
    let r = s
        .req("GET", &format!("/v1/agents/{agent}"), Some(&s.sk), None)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["forkServer"].clone()
}

/// The real uid of a process.
fn uid_of(pid: i32) -> u32 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Parent pid of a process.
fn ppid_of(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const TREE_BOT: &str = r#"
import asyncio, os, signal, subprocess

async def bot(args):
    # Deaf to SIGTERM: only the SIGKILL after the stop grace ends it, with its child.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "600"])
    print(f"PIDS {os.getpid()} {child.pid}", flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
"#;

/// An example bot's sessions are forks of the agent's fork server: they serve the bot's own
/// routes through the session proxy, stop within the grace, and a deaf bot is killed after it
/// with its whole tree. A redeploy starts a new fork server and retires the old one.
#[tokio::test(flavor = "multi_thread")]
async fn forked_sessions_deliver_serve_routes_stop_and_die_whole() {
    let mut s = server().await;
    // A grace long enough for the runner's own shutdown on a loaded machine (it once took
    // over the server's 3 s while the whole suite and builds shared the two cores); the deaf
    // bot below keeps the 3 s.
    s.deploy(
        "forked",
        &[],
        json!({"command": null, "image": example("session-status"), "stopGraceSeconds": 20}),
    )
    .await;
    let r = s
        .start_session("forked", json!({"body": {"duration_secs": 60}}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let st = wait_bot_running(&s, "forked", &sid).await;
    assert_eq!(st["session_id"], sid.as_str());
    let logs = started_session_logs(&s, "forked", &sid).await;
    assert!(
        logs.iter()
            .any(|l| l.contains("forked from the fork server")),
        "{logs:?}"
    );
    let zygotes = fork_servers(&s);
    assert_eq!(zygotes.len(), 1, "one fork server per agent");
    let pids = s.agent_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(ppid_of(pids[0]), zygotes[0], "the instance is a fork");
    // Cooperative stop: the runner exits by itself within the grace (code 0, no SIGKILL).
    assert_eq!(s.stop("forked", &sid).await.status, 200);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    let g = s.wait_ended("forked", &sid, Duration::from_secs(10)).await;
    assert_eq!(g["exitCode"], 0, "{g}");

    // A second session of the same deployment: the same fork server.
    let sid2 = s.start_ok("forked").await;
    wait_bot_running(&s, "forked", &sid2).await;
    assert_eq!(fork_servers(&s), zygotes);
    assert_eq!(s.stop("forked", &sid2).await.status, 200);

    // A deaf bot and its child: SIGKILLed together once the grace is over.
    let tmp = common::open_tempdir();
    let tree = fixture_bot(&tmp.path().join("tree"), TREE_BOT);
    s.deploy("tree", &[], json!({"command": null, "image": tree}))
        .await;
    let sid3 = s.start_ok("tree").await;
    let line = wait_log(&s, "tree", "PIDS ").await;
    let f: Vec<i32> = line
        .split("PIDS ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(common::pid_alive(f[0]) && common::pid_alive(f[1]));
    assert!(!fork_servers(&s).contains(&f[0]));
    let t0 = Instant::now();
    assert_eq!(s.stop("tree", &sid3).await.status, 200);
    common::wait_for(Duration::from_secs(15), "the tree to be gone", || async {
        (!common::pid_alive(f[0]) && !common::pid_alive(f[1])).then_some(())
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(20),
        "killed after the 3 s grace: {took:?}"
    );

    // A redeploy (changed env): a new fork server; the old one is retired.
    let r = s
        .req(
            "POST",
            "/v1/agents/forked",
            Some(&s.sk),
            Some(json!({"env": {"X_REDEPLOYED": "1", "CATTERY_TEST_TAG": s.tag}})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid4 = s.start_ok("forked").await;
    wait_bot_running(&s, "forked", &sid4).await;
    common::wait_for(
        Duration::from_secs(10),
        "the old fork server to exit",
        || async { (!common::pid_alive(zygotes[0])).then_some(()) },
    )
    .await;
    assert_eq!(s.stop("forked", &sid4).await.status, 200);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    // The retired fork server's cgroups went with it: one set per live fork server is left.
    let live = fork_servers(&s).len();
    for (base, dirs) in zygote_cgroups(&s) {
        assert_eq!(dirs.len(), live, "{}: {dirs:?}", base.display());
    }

    // A clean stop retires every fork server with its cgroups; a restart sweeps what an
    // earlier run left (a v1 cgroup here).
    assert!(s.terminate(Duration::from_secs(20)).is_some());
    for (base, dirs) in zygote_cgroups(&s) {
        assert!(dirs.is_empty(), "{}: {dirs:?}", base.display());
    }
    let planted: Vec<_> = zygote_cgroups(&s)
        .into_iter()
        .filter(|(base, _)| !base.starts_with("/sys/fs/cgroup/unified"))
        .map(|(base, _)| base.join("zygote-00000000deadbeef"))
        .collect();
    for d in &planted {
        std::fs::create_dir(d).unwrap();
    }
    s.spawn().await;
    for d in &planted {
        assert!(!d.exists(), "{} was not swept", d.display());
    }
}

/// The `zygote-*` cgroups under each cgroup base of this server (v2, and the v1 controllers
/// in use), by base.
fn zygote_cgroups(s: &Server) -> Vec<(std::path::PathBuf, Vec<String>)> {
    let id = std::fs::read_to_string(s.data_dir().join("server-id")).unwrap();
    [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
    ]
    .iter()
    .map(|root| std::path::Path::new(root).join("cattery").join(id.trim()))
    .filter(|base| base.is_dir())
    .map(|base| {
        let dirs = std::fs::read_dir(&base)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("zygote-"))
            .collect();
        (base, dirs)
    })
    .collect()
}

/// A bot that starts a thread at import is not forked: its sessions are spawned as before,
/// and the agent's logs say why. `--python-fork-server off` spawns every instance.
#[tokio::test(flavor = "multi_thread")]
async fn a_bot_unsafe_to_fork_is_spawned_with_the_reason_and_off_turns_forking_off() {
    let s = server().await;
    let tmp = common::open_tempdir();
    let threaded = fixture_bot(
        &tmp.path().join("threaded"),
        "import threading, time\n\
         threading.Thread(target=lambda: time.sleep(3600), name='import-time-worker', daemon=True).start()\n\
         async def bot(args):\n    print('THREADED BOT RAN', flush=True)\n",
    );
    s.deploy("threaded", &[], json!({"command": null, "image": threaded}))
        .await;
    let sid = s.start_ok("threaded").await;
    let g = s
        .wait_ended("threaded", &sid, Duration::from_secs(30))
        .await;
    assert_eq!(g["endReason"], "completed", "{g}");
    wait_log(&s, "threaded", "THREADED BOT RAN").await;
    let why = wait_log(&s, "threaded", "spawned, not forked").await;
    assert!(
        why.contains(
            "not safe to fork: 2 threads alive after importing bot.py (import-time-worker)"
        ),
        "{why}"
    );
    assert!(fork_servers(&s).is_empty());
    assert!(s.log().contains("not safe to fork"));
    // The reason is in the agent's status, as the official clients read it.
    let fork = fork_status(&s, "threaded").await;
    assert_eq!(fork["state"], "fallback", "{fork}");
    assert_eq!(
        fork["reason"],
        "the bot is not safe to fork: 2 threads alive after importing bot.py (import-time-worker)",
        "{fork}"
    );

    // A bot whose import fails: the fork server never becomes ready, its instances are
    // spawned (and fail the same way), and the status says why with the bot's own error.
    let broken = fixture_bot(
        &tmp.path().join("broken"),
        "raise RuntimeError('IMPORT BOOM')\nasync def bot(args):\n    pass\n",
    );
    s.deploy("broken", &[], json!({"command": null, "image": broken}))
        .await;
    let r = s.start_session("broken", json!({})).await;
    assert_ne!(r.status, 200, "{:?}", r.body);
    let fork = fork_status(&s, "broken").await;
    assert_eq!(fork["state"], "fallback", "{fork}");
    let reason = fork["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("the fork server failed") && reason.contains("IMPORT BOOM"),
        "{fork}"
    );
    // A start before the retry keeps the same reason in the status.
    let r = s.start_session("broken", json!({})).await;
    assert_ne!(r.status, 200, "{:?}", r.body);
    let fork = fork_status(&s, "broken").await;
    let reason = fork["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("IMPORT BOOM") && reason.contains("tried again"),
        "{fork}"
    );
    // The bot's output (which may print its secrets) is the org's: not in the server's log.
    assert!(s.log().contains("the fork server failed"));
    assert!(!s.log().contains("IMPORT BOOM"), "{}", s.log());
    // An agent that forks reports its fork server ready, with its pid.
    s.deploy(
        "forking",
        &[],
        json!({"command": null, "image": example("session-status")}),
    )
    .await;
    let sid = s.start_ok("forking").await;
    wait_bot_running(&s, "forking", &sid).await;
    let fork = fork_status(&s, "forking").await;
    assert_eq!(fork["state"], "ready", "{fork}");
    assert_eq!(
        fork["pid"].as_i64(),
        fork_servers(&s).first().map(|p| *p as i64)
    );
    assert_eq!(s.stop("forking", &sid).await.status, 200);
    drop(s);

    let py = python();
    let off = Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--python-fork-server",
        "off",
    ])
    .await;
    off.deploy(
        "plain",
        &[],
        json!({"command": null, "image": example("session-status")}),
    )
    .await;
    let sid = off.start_ok("plain").await;
    wait_bot_running(&off, "plain", &sid).await;
    assert!(fork_servers(&off).is_empty());
    let logs = started_session_logs(&off, "plain", &sid).await;
    assert!(!logs.iter().any(|l| l.contains("forked")), "{logs:?}");
    assert_eq!(fork_status(&off, "plain").await["state"], "off");
    assert_eq!(off.stop("plain", &sid).await.status, 200);
}

const PEER_BOT: &str = r#"
import asyncio, os

async def bot(args):
    body = args.body or {}
    print(f"IDS {os.getpid()} {os.getuid()}", flush=True)
    peer = body.get("peer")
    if not peer:
        for d in ("/tmp", "/dev/shm"):
            with open(f"{d}/cattery-fork-peer-{os.getpid()}", "w") as f:
                f.write("left by the peer")
        print("TMP WRITTEN", flush=True)
        await asyncio.sleep(60)
        return
    seen = [d for d in ("/tmp", "/dev/shm") if os.path.exists(f"{d}/cattery-fork-peer-{peer}")]
    print(f"TMP SEEN {seen}" if seen else "TMP NONE", flush=True)
    try:
        open(f"/proc/{peer}/environ", "rb").read()
        print("ENVIRON READ", flush=True)
    except Exception as e:
        print(f"ENVIRON {type(e).__name__}", flush=True)
    try:
        os.kill(int(peer), 0)
        print("KILL OK", flush=True)
    except Exception as e:
        print(f"KILL {type(e).__name__}", flush=True)
"#;

/// As root with instance uids: each agent's fork server runs under an unprivileged uid of its
/// own, and an instance of one agent can neither read another agent's instance's environment
/// (its secrets) nor signal it, nor see what it left in `/tmp` or `/dev/shm` (each fork
/// server's namespace, which its forks share, has its own; the host gets none of it).
#[tokio::test(flavor = "multi_thread")]
async fn fork_servers_are_unprivileged_and_agents_cannot_reach_each_other() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (instance uids)");
        return;
    }
    let s = server().await;
    let tmp = common::open_tempdir();
    for name in ["peer-a", "peer-b"] {
        let dir = tmp.path().join(name);
        let img = fixture_bot(&dir, PEER_BOT);
        use std::os::unix::fs::PermissionsExt;
        for d in [tmp.path(), dir.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(dir.join("bot.py"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        s.deploy(
            name,
            &[],
            json!({"command": null, "image": img, "env": {"SECRET_OF": name}}),
        )
        .await;
    }
    let sid_b = s.start_ok("peer-b").await;
    let ids_b = wait_log(&s, "peer-b", "IDS ").await;
    let b: Vec<u32> = ids_b
        .split("IDS ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    let r = s
        .start_session("peer-a", json!({"body": {"peer": b[0]}}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_log(&s, "peer-b", "TMP WRITTEN").await;
    let environ = wait_log(&s, "peer-a", "ENVIRON ").await;
    let kill = wait_log(&s, "peer-a", "KILL ").await;
    let tmp_seen = wait_log(&s, "peer-a", "TMP ").await;
    let on_host: Vec<String> = ["/tmp", "/dev/shm"]
        .iter()
        .map(|d| format!("{d}/cattery-fork-peer-{}", b[0]))
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect();
    assert!(tmp_seen.contains("TMP NONE"), "{tmp_seen}");
    assert!(
        on_host.is_empty(),
        "a forked instance's files reached the host: {on_host:?}"
    );
    // Refused, or (with the private /proc) not even listed.
    assert!(
        environ.contains("ENVIRON PermissionError")
            || environ.contains("ENVIRON FileNotFoundError"),
        "{environ}"
    );
    assert!(kill.contains("KILL PermissionError"), "{kill}");
    let ids_a = wait_log(&s, "peer-a", "IDS ").await;
    let uid_a: u32 = ids_a
        .split("IDS ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(uid_a, 0);
    assert_ne!(b[1], 0);
    assert_ne!(uid_a, b[1], "agents never share a uid");
    let zygotes = fork_servers(&s);
    assert_eq!(zygotes.len(), 2, "{zygotes:?}");
    for z in zygotes {
        assert_ne!(uid_of(z), 0, "a fork server never runs as root");
    }
    assert_eq!(s.stop("peer-b", &sid_b).await.status, 200);
}

/// A bot whose import never ends.
const HANG_BOT: &str =
    "import time\nwhile True:\n    time.sleep(0.05)\n\nasync def bot(args):\n    pass\n";

/// A bot whose import never ends. Its start is bounded by the start timeout (8 s here): 504
/// `START_TIMEOUT` once it is over, not after the fork server's own 120 s import limit and a
/// fallback spawn with a fresh timeout. A stop while the fork server imports answers without
/// waiting for it (409 `STOPPED_DURING_START` for the start). The fork server goes on
/// importing for the starts that follow (`starting` in the status); no instance is made.
#[tokio::test(flavor = "multi_thread")]
async fn a_fork_server_still_importing_holds_neither_the_start_timeout_nor_a_stop() {
    let py = python();
    let s = Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--stop-grace-seconds",
        "3",
        "--start-timeout-seconds",
        "8",
    ])
    .await;
    let tmp = common::open_tempdir();
    let hang = fixture_bot(&tmp.path().join("hang"), HANG_BOT);
    s.deploy("hang", &[], json!({"command": null, "image": hang}))
        .await;
    let t0 = Instant::now();
    let r = s.start_session("hang", json!({})).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(r.body["code"], "START_TIMEOUT");
    assert!(
        r.body["error"]
            .as_str()
            .is_some_and(|m| m.contains("its fork server was still importing the bot")),
        "{:?}",
        r.body
    );
    // Generous: before, the fork server's 120 s import limit came first.
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert_eq!(fork_status(&s, "hang").await["state"], "starting");
    let importing = fork_servers(&s);
    assert_eq!(importing.len(), 1, "{importing:?}");

    let (started, (stop, took)) = tokio::join!(s.start_session("hang", json!({})), async {
        let sid = common::wait_for(Duration::from_secs(20), "the start's session", || async {
            let path = "/v1/agents/hang/sessions?status=active";
            let r = s.req("GET", path, Some(&s.sk), None).await;
            r.body["sessions"][0]["sessionId"]
                .as_str()
                .map(String::from)
        })
        .await;
        let t0 = Instant::now();
        (s.stop("hang", &sid).await, t0.elapsed())
    });
    assert_eq!(stop.status, 200, "{:?}", stop.body);
    // Generous again: before, the stop waited for the import's 120 s.
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(started.status, 409, "{:?}", started.body);
    assert_eq!(started.body["code"], "STOPPED_DURING_START");
    assert!(s.agent_pids().is_empty(), "{:?}", s.agent_pids());
    assert_eq!(fork_servers(&s), importing, "the fork server imports on");
    assert_eq!(fork_status(&s, "hang").await["state"], "starting");
}

/// A bot that serves its `VERSION` on a route of its own, and keeps its session for 120 s.
fn version_bot(version: &str) -> String {
    format!(
        r#"
import asyncio
from pipecatcloud_system import app

VERSION = "{version}"

@app.get("/version")
async def version():
    return {{"version": VERSION}}

async def bot(args):
    await asyncio.sleep(120)
"#
    )
}

/// The `VERSION` a session's bot serves, through the session proxy.
async fn version_of(s: &Server, agent: &str, sid: &str) -> String {
    common::wait_for(Duration::from_secs(20), "the bot's /version", || async {
        let path = format!("/v1/public/{agent}/sessions/{sid}/version");
        let r = s.req("GET", &path, Some(&s.pk), None).await;
        (r.status == 200).then(|| r.body["version"].as_str().unwrap_or("?").to_string())
    })
    .await
}

/// A redeploy is new code, also when nothing else changed (`forceRedeploy`, the CLI's
/// `deploy --force`, after an edit of bot.py): a new fork server imports the edited bot and
/// the old one is retired, while the old deployment's session runs on with its own code.
#[tokio::test(flavor = "multi_thread")]
async fn a_forced_redeploy_forks_the_edited_bot_from_a_new_fork_server() {
    let s = server().await;
    let tmp = common::open_tempdir();
    let dir = tmp.path().join("versioned");
    let img = fixture_bot(&dir, &version_bot("v1"));
    s.deploy("versioned", &[], json!({"command": null, "image": img}))
        .await;
    let sid1 = s.start_ok("versioned").await;
    assert_eq!(version_of(&s, "versioned", &sid1).await, "v1");
    let fork1 = fork_status(&s, "versioned").await;
    assert_eq!(fork1["state"], "ready", "{fork1}");
    let z1 = fork1["pid"].as_i64().unwrap() as i32;

    std::fs::write(dir.join("bot.py"), version_bot("v2")).unwrap();
    let r = s
        .req(
            "POST",
            "/v1/agents/versioned",
            Some(&s.sk),
            Some(json!({"forceRedeploy": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid2 = s.start_ok("versioned").await;
    assert_eq!(version_of(&s, "versioned", &sid2).await, "v2");
    let fork2 = fork_status(&s, "versioned").await;
    assert_eq!(fork2["state"], "ready", "{fork2}");
    assert_ne!(fork2["pid"].as_i64(), Some(z1 as i64), "a new fork server");
    common::wait_for(
        Duration::from_secs(10),
        "the old fork server to exit",
        || async { (!common::pid_alive(z1)).then_some(()) },
    )
    .await;
    assert_eq!(
        version_of(&s, "versioned", &sid1).await,
        "v1",
        "the old deployment's session runs on"
    );
    assert_eq!(s.stop("versioned", &sid1).await.status, 200);
    assert_eq!(s.stop("versioned", &sid2).await.status, 200);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
}

/// A redeploy of a `local:` bot edited in place so that it cannot be imported: the previous
/// deployment serves during the rollout, and since the bot's directory now holds the broken
/// code, its cold starts are forked from the fork server that imported the previous bot.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_forks_the_previous_deployment_from_its_own_fork_server() {
    let s = server().await;
    let tmp = common::open_tempdir();
    let dir = tmp.path().join("rolling");
    let img = fixture_bot(&dir, &version_bot("v1"));
    let scaling = json!({"minAgents": 1, "maxAgents": 3});
    s.deploy(
        "rolling",
        &[],
        json!({"command": null, "image": img, "autoScaling": scaling}),
    )
    .await;
    s.wait_ready("rolling", Duration::from_secs(60)).await;

    let broken = format!("import no_such_module_here\n{}", version_bot("v2"));
    std::fs::write(dir.join("bot.py"), broken).unwrap();
    let r = s
        .req(
            "POST",
            "/v1/agents/rolling",
            Some(&s.sk),
            Some(json!({"forceRedeploy": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    common::wait_for(Duration::from_secs(60), "v2 crash-looping", || async {
        (s.agent("rolling").await["healthState"] == "crash_loop").then_some(())
    })
    .await;

    let mut sids = Vec::new();
    for i in 0..2 {
        let r = s.start_session("rolling", json!({})).await;
        assert_eq!(r.status, 200, "start {i} during the rollout: {:?}", r.body);
        assert_eq!(r.body["coldStart"], i > 0, "{:?}", r.body);
        let sid = r.body["sessionId"].as_str().unwrap().to_string();
        assert_eq!(version_of(&s, "rolling", &sid).await, "v1");
        sids.push(sid);
    }
    for sid in &sids {
        assert_eq!(s.stop("rolling", sid).await.status, 200);
    }
}
