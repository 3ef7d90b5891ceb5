//! Spare cgroup slots (`runtime/process/spare.rs`): a cold start after an idle moment takes a
//! spare (v1 cgroups with a parked process, made in the background) instead of migrating the
//! new process into fresh cgroups. Checked on real processes: the instance is one fresh
//! process in cgroups of its own, named by its instance id, with the agent's limits; stop
//! removes the tree and the cgroups; a restart re-adopts it; no spare outlives the server.
//! Skipped where there are no cgroup v1 controllers next to cgroup v2 (spares are off).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{pid_alive, wait_for, Server};
use crate::lifecycle_util::*;
use serde_json::json;

fn server_id(s: &Server) -> String {
    std::fs::read_to_string(s.data_dir().join("server-id"))
        .unwrap()
        .trim()
        .to_string()
}

/// `<v1 root>/<ctrl>/cattery/<server id>`.
fn v1_base(ctrl: &str, server_id: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(ctrl)
        .join("cattery")
        .join(server_id)
}

/// Names of the spare cgroups (memory controller) of a server.
fn spares(server_id: &str) -> HashSet<String> {
    std::fs::read_dir(v1_base("memory", server_id))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("spare-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether this machine uses spares: root, cgroup v2 (hybrid) and v1 controllers.
fn machine_has_spares() -> bool {
    let v1 = Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists();
    let v2 = Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists();
    if !(v1 && v2 && cfg!(target_arch = "x86_64")) {
        eprintln!("no cgroup v1 controllers next to cgroup v2 here: spares are off");
        return false;
    }
    true
}

async fn wait_spares(server_id: &str, n: usize) -> HashSet<String> {
    wait_for(Duration::from_secs(20), "spares ready", || async {
        let s = spares(server_id);
        (s.len() >= n).then_some(s)
    })
    .await
}

/// The v1 cgroup path (relative) of `pid` for controller `ctrl`, from `/proc/<pid>/cgroup`.
fn cgroup_of(pid: i32, ctrl: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, c, p) = (f.next()?, f.next()?, f.next()?);
            (c.split(',').any(|c| c == ctrl) || (ctrl.is_empty() && c.is_empty()))
                .then(|| p.to_string())
        })
        .unwrap_or_default()
}

/// Two sessions of an agent, on a fresh server: the first started the old way (which starts
/// the stock of spares), the second from a spare.
struct FromSpare {
    /// The server's id (its cgroups are under `cattery/<id>`).
    id: String,
    /// The first session (not from a spare).
    first: String,
    /// The spares ready before the second start.
    before: HashSet<String>,
    /// The spares ready once the stock was full again after it.
    after: HashSet<String>,
    /// The second session (from a spare).
    sid: String,
    /// Its main process.
    pid: i32,
    /// Its instance id.
    inst: String,
}

/// Starts a server, deploys agent `name` (`switches`, `profile`) and starts two sessions of
/// it, the second once the stock of spares is full and idle for a moment; returns once the
/// stock is full again. `None` where this machine uses no spares (the test is skipped).
async fn start_from_spare(
    name: &str,
    switches: &[&str],
    profile: &str,
) -> Option<(Server, FromSpare)> {
    if !machine_has_spares() {
        return None;
    }
    let s = Server::start(&[]).await;
    let id = server_id(&s);
    s.deploy(name, switches, json!({"agentProfile": profile}))
        .await;
    // The first start runs the old way and starts the stock.
    let first = s.start_ok(name).await;
    let before = wait_spares(&id, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sid = s.start_ok(name).await;
    let pid = session_pid(&s, name, &sid).await;
    let inst = pid_env(pid, "CATTERY_INSTANCE_ID").unwrap();
    let after = wait_spares(&id, 2).await;
    let t = FromSpare {
        id,
        first,
        before,
        after,
        sid,
        pid,
        inst,
    };
    Some((s, t))
}

/// A cold start after an idle moment takes a spare; the instance is in cgroups of its own
/// named by its instance id, with the agent's limits; the stock refills; a stop removes the
/// process tree and every cgroup; a clean exit leaves no spare.
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_start_after_idle_takes_a_spare_and_stop_removes_everything() {
    let Some((mut s, t)) = start_from_spare("spare", &["--spawn-child"], "agent-2x").await else {
        return;
    };
    // One spare was used (its cgroups are now the instance's) and one made in its place.
    let used: Vec<&String> = t.before.difference(&t.after).collect();
    assert_eq!(used.len(), 1, "before {:?} after {:?}", t.before, t.after);
    for ctrl in ["memory", "pids", "cpu"] {
        let base = v1_base(ctrl, &t.id);
        if !base.is_dir() {
            continue;
        }
        assert_eq!(
            cgroup_of(t.pid, ctrl),
            format!("/cattery/{}/{}", t.id, t.inst),
            "{ctrl} cgroup of the instance"
        );
        assert!(
            !base.join(used[0]).exists(),
            "{ctrl}: the spare was renamed"
        );
        let procs = std::fs::read_to_string(base.join(&t.inst).join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l.trim() == t.pid.to_string()),
            "{ctrl}: {procs}"
        );
    }
    assert!(
        cgroup_of(t.pid, "").ends_with(&format!("/cattery/{}/{}", t.id, t.inst)),
        "v2 cgroup: {}",
        cgroup_of(t.pid, "")
    );
    let mem = v1_base("memory", &t.id).join(&t.inst);
    let limit = std::fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (2u64 << 30).to_string());
    if let Ok(q) =
        std::fs::read_to_string(v1_base("cpu", &t.id).join(&t.inst).join("cpu.cfs_quota_us"))
    {
        assert_eq!(q.trim(), "100000");
    }
    // One fresh process tree: the main process leads its own session, its parent is the
    // server, and its child (`--spawn-child`) is in the same cgroups.
    assert_eq!(ppid(t.pid), Some(s.pid()));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", t.pid)).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    assert_eq!(f[3], t.pid.to_string(), "session leader");
    let members = wait_for(Duration::from_secs(5), "the agent's child", || async {
        let p = std::fs::read_to_string(mem.join("cgroup.procs")).unwrap_or_default();
        let v: Vec<i32> = p.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (v.len() >= 2).then_some(v)
    })
    .await;
    // Logs are captured as for any instance.
    wait_log(&s, "spare", &t.sid, "bot started").await;
    assert_eq!(s.stop("spare", &t.sid).await.status, 200);
    for p in &members {
        assert!(!pid_alive(*p), "{p} outlived the stop");
    }
    for ctrl in ["memory", "pids", "cpu"] {
        assert!(
            !v1_base(ctrl, &t.id).join(&t.inst).exists(),
            "{ctrl} cgroup left"
        );
    }
    assert!(!Path::new("/sys/fs/cgroup/unified/cattery")
        .join(&t.id)
        .join(&t.inst)
        .exists());
    assert_eq!(s.stop("spare", &t.first).await.status, 200);
    // A clean exit discards the spares and removes the server's cgroup directories.
    assert!(s.terminate(Duration::from_secs(20)).is_some());
    for ctrl in ["memory", "pids", "cpu"] {
        let b = v1_base(ctrl, &t.id);
        assert!(!b.exists(), "{} left after a clean exit", b.display());
    }
    assert!(!s.log().contains("ERROR"), "{}", s.log());
}

/// An instance started from a spare is re-adopted after the server is SIGKILLed: found in
/// its renamed cgroups, stoppable, its cgroups removed; the spares of the killed server
/// (their parked processes died with it) are removed by the next run.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_from_a_spare_is_readopted_and_dead_spares_are_swept() {
    let Some((mut s, t)) =
        start_from_spare("spare2", &["--ignore-transport-close"], "agent-1x").await
    else {
        return;
    };
    assert_eq!(t.before.difference(&t.after).count(), 1, "a spare was used");
    s.kill9();
    // The parked processes die with the server; their cgroups stay until the next run.
    for name in &t.after {
        let d = v1_base("memory", &t.id).join(name);
        wait_for(Duration::from_secs(5), "parked process gone", || async {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .map(|p| p.trim().is_empty())
                .unwrap_or(true)
                .then_some(())
        })
        .await;
    }
    assert!(pid_alive(t.pid), "the instance outlives the control plane");
    s.spawn().await;
    assert_eq!(session_pid(&s, "spare2", &t.sid).await, t.pid);
    let now = spares(&t.id);
    assert!(
        now.is_disjoint(&t.after),
        "spares of the killed run are swept: {:?} {now:?}",
        t.after
    );
    let mem = v1_base("memory", &t.id).join(&t.inst);
    assert!(mem.is_dir());
    assert_eq!(s.stop("spare2", &t.sid).await.status, 200);
    assert!(!pid_alive(t.pid));
    for ctrl in ["memory", "pids", "cpu"] {
        assert!(
            !v1_base(ctrl, &t.id).join(&t.inst).exists(),
            "{ctrl} cgroup left"
        );
    }
    let _ = s.stop("spare2", &t.first).await;
    assert!(s.terminate(Duration::from_secs(20)).is_some());
    assert!(spares(&t.id).is_empty());
}

/// A spare whose parked process died (killed here, by its pid, with the stock full) is found
/// unusable when a start claims it: the spare is discarded (its cgroups removed) and the start
/// is made again the plain way, in cgroups named by its instance id; the session runs and its
/// stop removes everything.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_that_claims_a_dead_spare_is_made_again_the_plain_way() {
    if !machine_has_spares() {
        return;
    }
    let s = Server::start(&[]).await;
    let id = server_id(&s);
    s.deploy("deadspare", &[], json!({})).await;
    // The first start runs the old way and starts the stock.
    let first = s.start_ok("deadspare").await;
    let ready = wait_spares(&id, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for name in &ready {
        let procs = std::fs::read_to_string(v1_base("memory", &id).join(name).join("cgroup.procs"))
            .unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: a signal to a parked process of this test's own server.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_for(Duration::from_secs(5), "parked process gone", || async {
                (!pid_alive(pid)).then_some(())
            })
            .await;
        }
    }
    let sid = s.start_ok("deadspare").await;
    let pid = session_pid(&s, "deadspare", &sid).await;
    let inst = pid_env(pid, "CATTERY_INSTANCE_ID").unwrap();
    assert_eq!(
        cgroup_of(pid, "memory"),
        format!("/cattery/{id}/{inst}"),
        "the instance's own cgroup"
    );
    // The claimed spare was discarded: one of the two is gone (the other is still stocked).
    let left: HashSet<String> = spares(&id).intersection(&ready).cloned().collect();
    assert!(left.len() < ready.len(), "ready {ready:?}, left {left:?}");
    wait_log(&s, "deadspare", &sid, "bot started").await;
    assert_eq!(s.stop("deadspare", &sid).await.status, 200);
    assert!(!pid_alive(pid));
    assert!(!v1_base("memory", &id).join(&inst).exists());
    assert_eq!(s.stop("deadspare", &first).await.status, 200);
    assert!(!s.log().contains("ERROR"), "{}", s.log());
}
