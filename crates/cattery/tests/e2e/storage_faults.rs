//! Storage faults on the real binary: the data dir on a small tmpfs that the test mounts (as
//! root) and fills. While the disk is full, writes answer 503 `STORAGE_FULL` (JSON, at once,
//! nothing reported done unless committed) and running sessions go on; once space is back
//! the store heals by itself; after a restart every write that answered 2xx is there. The
//! other faults (read-only file system, I/O errors) take the same path in the store
//! (`STORAGE_UNAVAILABLE`); a read-only remount cannot be tested here, as Linux refuses it
//! while the server holds its files open for writing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{Resp, Server};
use serde_json::{json, Value};

/// A tmpfs mounted on a temp dir; unmounted (lazily, so a leftover process cannot block it)
/// when dropped, also when the test fails.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// Outside the tmpfs: the server's log with `CATTERY_TEST_LOG_OUTSIDE` set.
    logs: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts `size` (e.g. `8m`); `None` when this machine does not allow it (not root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs {
            dir: Some(dir),
            path,
            logs: tempfile::tempdir().unwrap(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        drop(self.dir.take());
    }
}

/// A server whose data dir is on `fs` (the harness's own temp dir is replaced), with its log
/// (its stderr) on the same full disk, as an operator's `2>>` might put it.
async fn server_in(fs: &Tmpfs) -> Server {
    let mut s = Server::start(&[]).await;
    s.terminate(Duration::from_secs(10));
    // Same port and settings, data dir on the tmpfs.
    s.dir = tempfile::Builder::new().tempdir_in(&fs.path).unwrap();
    if std::env::var_os("CATTERY_TEST_LOG_OUTSIDE").is_some() {
        // For debugging: a log that survives the full disk.
        let log = fs.logs.path().join("server.log");
        std::fs::File::create(&log).unwrap();
        std::os::unix::fs::symlink(&log, s.dir.path().join("server.log")).unwrap();
    }
    s.spawn().await;
    s.sk = s.key("private", "default");
    s.pk = s.key("public", "default");
    s
}

/// Fills the file system of `dir` with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // The rest, byte by byte in small pieces.
    while f.write_all(&chunk[..512]).is_ok() {}
    let _ = f.sync_all();
    p
}

/// Writes that answered 2xx, to audit after a restart.
#[derive(Default)]
struct Acked {
    agents: Vec<String>,
    secret_sets: Vec<String>,
    sessions: Vec<(String, String)>,
}

fn create_agent_body(s: &Server, name: &str) -> Value {
    // A few KB of environment, so each write needs fresh pages.
    let env: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("PAD_{i}"), json!("x".repeat(1000))))
        .chain([("CATTERY_TEST_TAG".to_string(), json!(s.tag))])
        .collect();
    json!({"serviceName": name, "command": [common::test_agent().display().to_string()], "env": env})
}

/// Checks a refusal: 503, JSON `{error, code}` with the code, no driver text.
fn assert_refused(r: &Resp, code: &str, what: &str) {
    assert_eq!(r.status, 503, "{what}: {r:?}");
    assert!(
        r.content_type.starts_with("application/json"),
        "{what}: {r:?}"
    );
    assert_eq!(r.body["code"], code, "{what}: {r:?}");
    let msg = r.body["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(!msg.is_empty(), "{what}: {r:?}");
    assert!(
        !msg.contains("sqlite") && !msg.contains("database"),
        "driver text leaked: {r:?}"
    );
}

/// Tries writes of each kind while the fault lasts; every 2xx is recorded in `acked`, every
/// other answer must be a quick 503 with `code`. Returns how many were refused.
async fn writes_during_fault(s: &Server, acked: &mut Acked, code: &str, round: usize) -> usize {
    struct ShowLog<'a>(&'a Server);
    impl Drop for ShowLog<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let log = self.0.log();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| !l.contains("storage full: writes fail"))
                    .collect();
                let start = lines.len().saturating_sub(40);
                eprintln!("server log (end):\n{}", lines[start..].join("\n"));
            }
        }
    }
    let _show = ShowLog(s);
    let mut refused = 0;
    for i in 0..12 {
        let name = format!("during-{round}-{i}");
        let t0 = Instant::now();
        let r = s
            .req(
                "POST",
                "/v1/agents",
                Some(&s.sk),
                Some(create_agent_body(s, &name)),
            )
            .await;
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "answered at once: {r:?}"
        );
        if r.status == 200 {
            acked.agents.push(name);
        } else {
            assert_refused(&r, code, "create agent");
            refused += 1;
        }
        let set = format!("set-{round}-{i}");
        let r = s
            .req(
                "PUT",
                &format!("/v1/secrets/{set}"),
                Some(&s.sk),
                Some(json!({"secrets": [{"secretKey": "K", "secretValue": "v".repeat(2000)}]})),
            )
            .await;
        if r.status / 100 == 2 {
            acked.secret_sets.push(set);
        } else {
            assert_refused(&r, code, "put secrets");
            refused += 1;
        }
        let r = s.start_session("base", json!({})).await;
        if r.status == 200 {
            let sid = r.body["sessionId"].as_str().unwrap().to_string();
            acked.sessions.push(("base".into(), sid));
        } else {
            // A cold start can also fail earlier, at its instance's files on the same disk.
            let c = r.body["code"].as_str().unwrap_or_default().to_string();
            let c = if c == "SPAWN_FAILED" {
                code
            } else {
                c.as_str()
            };
            assert_refused(&r, c, "start");
            refused += 1;
        }
    }
    refused
}

/// Waits until a write succeeds again (the store heals by itself); returns how long it took.
async fn wait_healed(s: &Server, acked: &mut Acked, tag: &str) -> Duration {
    let t0 = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let name = format!("healed-{tag}-{n}");
        let r = s
            .req(
                "POST",
                "/v1/agents",
                Some(&s.sk),
                Some(create_agent_body(s, &name)),
            )
            .await;
        if r.status == 200 {
            acked.agents.push(name);
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the store did not heal: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After a restart every acknowledged write is there.
async fn audit(s: &Server, acked: &Acked) {
    for a in &acked.agents {
        let r = s
            .req("GET", &format!("/v1/agents/{a}"), Some(&s.sk), None)
            .await;
        assert_eq!(r.status, 200, "acknowledged agent {a} is gone: {r:?}");
    }
    for set in &acked.secret_sets {
        let r = s
            .req("GET", &format!("/v1/secrets/{set}"), Some(&s.sk), None)
            .await;
        assert_eq!(
            r.status, 200,
            "acknowledged secret set {set} is gone: {r:?}"
        );
    }
    for (agent, sid) in &acked.sessions {
        let r = s
            .req(
                "GET",
                &format!("/v1/agents/{agent}/sessions/{sid}"),
                Some(&s.sk),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "acknowledged session {sid} is gone: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_writes_keeps_sessions_and_heals_by_itself() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let mut s = server_in(&fs).await;
    let mut acked = Acked::default();
    s.deploy("base", &[], json!({})).await;
    acked.agents.push("base".into());
    // One start/stop works; one session keeps running through the fault.
    let sid = s.start_ok("base").await;
    assert_eq!(s.stop("base", &sid).await.status, 200);
    let running = s.start_ok("base").await;
    acked.sessions.push(("base".into(), sid));
    acked.sessions.push(("base".into(), running.clone()));

    let filler = fill(&fs.path);
    let refused = writes_during_fault(&s, &mut acked, "STORAGE_FULL", 0).await;
    assert!(refused > 0, "a full disk refused no write");
    // Reads and the running session go on.
    let g = s.session("base", &running).await;
    assert!(g["endedAt"].is_null() || g.get("endedAt").is_none(), "{g}");
    assert!(g["completionStatus"].is_null(), "still running: {g}");
    let r = s.req("GET", "/v1/agents", Some(&s.sk), None).await;
    assert_eq!(r.status, 200);

    std::fs::remove_file(&filler).unwrap();
    let took = wait_healed(&s, &mut acked, "a").await;
    assert!(took < Duration::from_secs(5), "healed after {took:?}");
    // Everything works again, the running session included.
    let sid2 = s.start_ok("base").await;
    assert_eq!(s.stop("base", &sid2).await.status, 200);
    acked.sessions.push(("base".into(), sid2));
    assert_eq!(s.stop("base", &running).await.status, 200);

    // A second episode with a stop during it, then a restart and the audit.
    let stopped_full = s.start_ok("base").await;
    let filler = fill(&fs.path);
    writes_during_fault(&s, &mut acked, "STORAGE_FULL", 1).await;
    stop_during_full_disk(&s, &stopped_full).await;
    std::fs::remove_file(&filler).unwrap();
    wait_healed(&s, &mut acked, "b").await;
    stop_recorded_after_healing(&s, &stopped_full).await;
    // A SIGKILL, not a drain: what was acknowledged must be on disk already.
    s.kill9();
    s.spawn().await;
    audit(&s, &acked).await;
    let g = s.session("base", &running).await;
    assert_eq!(g["endReason"], "stopped", "{g}");
    // The end written after the disk healed survived the restart (not `lost`).
    let g = s.session("base", &stopped_full).await;
    assert_eq!(g["endReason"], "stopped", "{g}");
}

/// A stop while the disk is full: the instance goes, but the stop is not reported done
/// unless its end was committed (a 503 `STORAGE_FULL` after a bounded wait), and the session
/// is never recorded `lost` meanwhile.
async fn stop_during_full_disk(s: &Server, sid: &str) {
    let t0 = Instant::now();
    let r = s.stop("base", sid).await;
    let took = t0.elapsed();
    eprintln!(
        "a stop during a full disk: HTTP {} after {took:?}",
        r.status
    );
    if r.status != 200 {
        assert_refused(&r, "STORAGE_FULL", "a stop during a full disk");
        assert!(took < Duration::from_secs(15), "the stop took {took:?}");
        // A second stop waits for the same end: the same answer, never `lost`.
        let r = s.stop("base", sid).await;
        if r.status != 200 {
            assert_refused(&r, "STORAGE_FULL", "a second stop during a full disk");
        }
    }
    let g = s.session("base", sid).await;
    assert_ne!(g["endReason"], "lost", "{g}");
}

/// Once the store heals, the kept end is written by itself: a `GET` sees it and a `DELETE`
/// answers 200.
async fn stop_recorded_after_healing(s: &Server, sid: &str) {
    let t0 = Instant::now();
    loop {
        let g = s.session("base", sid).await;
        if g["endReason"] == "stopped" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the end of the stop was not recorded after healing: {g}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.stop("base", sid).await.status, 200);
}
