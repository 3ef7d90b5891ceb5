//! The operator's surface: `/metrics` (parsed with Python's `prometheus_client`, its counters
//! moving as sessions start and end), `--log-format json` with request ids, and `cattery
//! backup` / `cattery restore` during a churn of sessions.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::common::{cattery_bin, pid_alive, py_env_dir, wait_for, Server};
use crate::lifecycle_util::session_pid;

/// The interpreter with `prometheus_client` (`scripts/setup-python.sh`: the `ops` env).
fn ops_python() -> PathBuf {
    let p = std::env::var_os("CATTERY_TEST_OPS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| py_env_dir().join("ops/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run scripts/setup-python.sh (it makes the `ops` env with prometheus_client)",
        p.display()
    );
    p
}

/// Parses an exposition with `prometheus_client`'s text parser; returns every sample as
/// (name, labels, value). Panics if the parser rejects it.
fn parse_exposition(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    use std::io::Write;
    let mut child = Command::new(ops_python())
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<(String, HashMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    v
}

struct Scrape(Vec<(String, HashMap<String, String>, f64)>);

impl Scrape {
    /// Sum of the samples named `name` whose labels include `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _, _)| n == name)
    }
}

async fn scrape(s: &Server, token: &str) -> Scrape {
    let r = s
        .http
        .get(format!("{}/metrics", s.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().await.unwrap();
    assert!(!text.contains("session_id"), "no session ids in labels");
    Scrape(parse_exposition(&text))
}

#[tokio::test]
async fn metrics_parse_and_move_with_sessions() {
    let s = Server::start(&["--metrics-token", "scrape-me"]).await;
    // The token is required.
    let r = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .get(format!("{}/metrics", s.base))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    s.deploy(
        "met",
        &[],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 2}}),
    )
    .await;
    s.wait_ready("met", Duration::from_secs(30)).await;
    let m = scrape(&s, "scrape-me").await;
    assert!(m.has("cattery_build_info"));
    let agent = [("agent", "met"), ("org", "default")];
    assert_eq!(m.sum("cattery_sessions_started_total", &agent), 0.0);
    assert_eq!(m.sum("cattery_pool_max_agents", &agent), 2.0);

    let a = s.start_ok("met").await;
    let b = s.start_ok("met").await;
    // At maxAgents: a 429, counted.
    let r = s.start_session("met", json!({})).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    let m = scrape(&s, "scrape-me").await;
    assert_eq!(m.sum("cattery_sessions_started_total", &agent), 2.0);
    assert_eq!(m.sum("cattery_session_start_seconds_count", &agent), 2.0);
    assert_eq!(m.sum("cattery_sessions_active", &agent), 2.0);
    assert_eq!(
        m.sum(
            "cattery_pool_instances",
            &[("agent", "met"), ("state", "busy")]
        ),
        2.0
    );
    assert_eq!(m.sum("cattery_sessions_at_capacity_total", &agent), 1.0);
    assert!(m.sum("cattery_instances", &[("state", "busy")]) >= 2.0);
    assert!(m.sum("cattery_store_operation_seconds_count", &[("op", "write")]) > 0.0);

    assert_eq!(s.stop("met", &a).await.status, 200);
    let m = scrape(&s, "scrape-me").await;
    assert_eq!(
        m.sum(
            "cattery_sessions_ended_total",
            &[("agent", "met"), ("reason", "stopped")]
        ),
        1.0
    );
    assert_eq!(m.sum("cattery_session_stop_seconds_count", &agent), 1.0);
    assert_eq!(m.sum("cattery_sessions_active", &agent), 1.0);

    assert_eq!(s.stop("met", &b).await.status, 200);
    let m = scrape(&s, "scrape-me").await;
    assert_eq!(m.sum("cattery_sessions_ended_total", &agent), 2.0);
    assert_eq!(m.sum("cattery_sessions_active", &agent), 0.0);
    assert_eq!(m.sum("cattery_log_lines_dropped_total", &[]), 0.0);
}

#[tokio::test]
async fn json_log_lines_parse_and_carry_request_ids() {
    let s = Server::start_with_env(
        &["--log-format", "json"],
        &[("CATTERY_LOG", "info,tower_http=debug")],
    )
    .await;
    let r = s
        .http
        .get(format!("{}/v1/agents", s.base))
        .bearer_auth(&s.sk)
        .header("x-request-id", "req-from-client-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-from-client-42");
    // Without one, the server makes one and answers it.
    let r = s
        .http
        .get(format!("{}/v1/agents/nope", s.base))
        .bearer_auth(&s.sk)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let made = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 36, "a uuid: {made}");

    let lines = wait_for(Duration::from_secs(10), "the request lines", || async {
        let log = s.log();
        (log.contains("req-from-client-42") && log.contains(&made)).then_some(log)
    })
    .await;
    let mut ids = HashSet::new();
    for line in lines.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if let Some(id) = v["span"]["request_id"].as_str() {
            ids.insert(id.to_string());
            assert_eq!(v["span"]["name"], "request");
            assert!(v["span"]["route"].is_string(), "the route template: {line}");
        }
    }
    assert!(ids.contains("req-from-client-42"), "{ids:?}");
    assert!(ids.contains(&made), "{ids:?}");
    // No key in any line.
    assert!(!lines.contains(&s.sk));
}

/// Runs `cattery backup` or `cattery restore`; returns (success, stdout + stderr).
fn cattery(args: &[&str]) -> (bool, String) {
    cattery_env(args, &[])
}

/// Runs `cattery restore --force` of backup `bk` into data dir `data`; panics if it fails.
fn restore_forced(data: &str, bk: &std::path::Path) {
    let (ok, text) = cattery(&[
        "restore",
        "--data-dir",
        data,
        "--force",
        bk.to_str().unwrap(),
    ]);
    assert!(ok, "restore failed: {text}");
}

/// [`cattery`] with these environment variables set.
fn cattery_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let mut cmd = Command::new(cattery_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn backup_during_churn_holds_every_ended_session_and_restores() {
    let s = Server::start(&[]).await;
    s.deploy(
        "churn",
        &[],
        json!({"autoScaling": {"minAgents": 2, "maxAgents": 6}}),
    )
    .await;
    s.wait_ready("churn", Duration::from_secs(30)).await;
    let s = Arc::new(s);
    let ended: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (s, ended, stop) = (s.clone(), ended.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            // Bounded: at most 60 sessions per worker.
            for _ in 0..60 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let r = s.start_session("churn", json!({})).await;
                if r.status != 200 {
                    continue;
                }
                let sid = r.body["sessionId"].as_str().unwrap().to_string();
                // A DELETE answered 200 means the end is recorded.
                if s.stop("churn", &sid).await.status == 200 {
                    ended.lock().push(sid);
                }
            }
        }));
    }
    wait_for(Duration::from_secs(60), "20 sessions ended", || async {
        (ended.lock().len() >= 20).then_some(())
    })
    .await;
    let before: Vec<String> = ended.lock().clone();
    let out = tempfile::tempdir().unwrap();
    let bk = out.path().join("bk");
    let data = s.data_dir().to_str().unwrap().to_string();
    let (ok, text) = cattery(&["backup", "--data-dir", &data, bk.to_str().unwrap()]);
    assert!(ok, "backup failed: {text}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    // The copy opens and holds every session that had ended before the backup started.
    let db = rusqlite::Connection::open(bk.join("cattery.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    for sid in &before {
        let ended_ms: Option<i64> = db
            .query_row("SELECT ended_ms FROM sessions WHERE id = ?1", [sid], |r| {
                r.get(0)
            })
            .unwrap_or_else(|e| panic!("session {sid} missing from the backup: {e}"));
        assert!(ended_ms.is_some(), "session {sid} has no end in the backup");
    }
    drop(db);
    assert!(bk.join("secrets.key").is_file());
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(bk.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], 1);

    // Restore: refused while the server runs, then into its data dir once stopped.
    let (ok, text) = cattery(&[
        "restore",
        "--data-dir",
        &data,
        "--force",
        bk.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("stop it"), "{text}");
    let mut s = Arc::into_inner(s).expect("workers are done");
    assert!(s.terminate(Duration::from_secs(30)).is_some());
    let (ok, text) = cattery(&["restore", "--data-dir", &data, bk.to_str().unwrap()]);
    assert!(!ok && text.contains("--force"), "{text}");
    restore_forced(&data, &bk);
    s.spawn().await;
    s.wait_ready("churn", Duration::from_secs(30)).await;
    for sid in &before {
        let v = s.session("churn", sid).await;
        assert!(!v["endedAt"].is_null(), "{v}");
    }
}

/// A restore after a stop with `--on-stop detach` (the upgrade unit of docs/upgrade.md),
/// from a backup taken while an instance was warm, when that instance took a session after
/// the backup: the restored database still records it as warm, but it is busy with a session
/// the database no longer knows. The next server must not put it back into the warm pool,
/// where the next start would be delivered into the same process as a second session: it is
/// removed, and the next start gets a process of its own.
#[tokio::test(flavor = "multi_thread")]
async fn restore_after_a_detach_never_hands_out_a_warm_instance_that_took_a_session() {
    let mut s = Server::start(&["--on-stop", "detach"]).await;
    s.deploy(
        "warm",
        &["--ignore-transport-close"],
        json!({"autoScaling": {"minAgents": 1, "maxAgents": 3}, "stopGraceSeconds": 1}),
    )
    .await;
    wait_for(Duration::from_secs(30), "a warm idle instance", || async {
        (s.agent("warm").await["warmInstances"]["idle"] == 1).then_some(())
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let bk = out.path().join("bk");
    let data = s.data_dir().to_str().unwrap().to_string();
    let (ok, text) = cattery(&["backup", "--data-dir", &data, bk.to_str().unwrap()]);
    assert!(ok, "backup failed: {text}");
    // The warm instance takes a session after the backup.
    let sid = s.start_ok("warm").await;
    assert_eq!(s.session("warm", &sid).await["coldStart"], false);
    let pid = session_pid(&s, "warm", &sid).await;

    let st = s
        .terminate(Duration::from_secs(30))
        .expect("the server exits");
    assert!(st.success(), "detach exits 0: {st:?}");
    assert!(pid_alive(pid), "a detach leaves the instance running");
    restore_forced(&data, &bk);
    s.spawn().await;

    // The instance of the session the restored database does not hold is removed, not
    // re-adopted as warm; the next start runs in another process.
    wait_for(
        Duration::from_secs(30),
        "the stray instance removed",
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await;
    s.wait_ready("warm", Duration::from_secs(30)).await;
    let next = s.start_ok("warm").await;
    assert_ne!(session_pid(&s, "warm", &next).await, pid);
    assert_eq!(s.stop("warm", &next).await.status, 200);
}

/// Stores one (dummy) sealed secret value in the SQLite store of `data`.
async fn put_a_sealed_secret(data: &std::path::Path) {
    use cattery::store::{SealedValue, SecretSetKind, SecretSetRecord};
    let store = cattery::store::open(
        &Default::default(),
        data,
        cattery::store::OpenMode::Existing,
    )
    .await
    .unwrap();
    let set = SecretSetRecord {
        org: "default".into(),
        name: "s".into(),
        kind: SecretSetKind::Secret,
        region: "local".into(),
        host: None,
        created_ms: 1,
        updated_ms: 1,
        keys: Vec::new(),
    };
    let v = SealedValue {
        key: "K".into(),
        nonce: vec![0; 24],
        ciphertext: vec![0; 20],
    };
    store
        .upsert_secret_set(&set, &[v], false, None)
        .await
        .unwrap();
}

/// `cattery backup` and `restore` read the server's `--config`: its data dir and its
/// `[cluster] secrets_key_file` (copied into the backup; at restore, a configured key that is
/// not the backup's is refused and never overwritten), and a PostgreSQL store is refused with
/// what to use instead.
#[tokio::test]
async fn backup_and_restore_read_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, key) = (tmp.path().join("data"), tmp.path().join("secrets.key"));
    std::fs::write(&key, [9u8; 32]).unwrap();
    let cfg = tmp.path().join("cattery.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\ndata_dir = {:?}\n[cluster]\nsecrets_key_file = {:?}\n",
            data.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    // A server's store in the config's data dir.
    std::fs::create_dir_all(&data).unwrap();
    let store = cattery::store::open(&Default::default(), &data, cattery::store::OpenMode::Create)
        .await
        .unwrap();
    store.ensure_org("default").await.unwrap();
    drop(store);

    let bk = tmp.path().join("bk");
    let (ok, text) = cattery(&["backup", "--config", cfg_s, bk.to_str().unwrap()]);
    assert!(ok, "backup failed: {text}");
    assert!(text.contains(&data.display().to_string()), "{text}");
    assert_eq!(std::fs::read(bk.join("secrets.key")).unwrap(), [9u8; 32]);

    // Restore into the (stopped) data dir: the configured key is the backup's.
    let restore = || {
        cattery(&[
            "restore",
            "--config",
            cfg_s,
            "--force",
            bk.to_str().unwrap(),
        ])
    };
    let (ok, text) = restore();
    assert!(ok, "restore failed: {text}");
    assert!(
        !data.join("secrets.key").exists(),
        "the key lives in its own file"
    );
    // Another key in the configured file: refused, the file untouched.
    std::fs::write(&key, [1u8; 32]).unwrap();
    let (ok, text) = restore();
    assert!(!ok && text.contains("not the one in"), "{text}");
    assert_eq!(std::fs::read(&key).unwrap(), [1u8; 32]);

    // The key file from the environment, as `serve` reads it, without a config file.
    let bk3 = tmp.path().join("bk3");
    let (ok, text) = cattery_env(
        &[
            "backup",
            "--data-dir",
            data.to_str().unwrap(),
            bk3.to_str().unwrap(),
        ],
        &[("CATTERY_SECRETS_KEY_FILE", &key)],
    );
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(bk3.join("secrets.key")).unwrap(), [1u8; 32]);
    // Sealed values and no key found: refused (such a backup could never be opened).
    put_a_sealed_secret(&data).await;
    let bk4 = tmp.path().join("bk4");
    let (ok, text) = cattery(&[
        "backup",
        "--data-dir",
        data.to_str().unwrap(),
        bk4.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("no secrets key"), "{text}");
    assert!(!bk4.exists(), "nothing half-made");

    // A PostgreSQL store (from the file or the environment): refused, naming what to use.
    let pg_cfg = tmp.path().join("pg.toml");
    std::fs::write(
        &pg_cfg,
        "[store]\ndatabase_url = \"postgres://cattery@db.example/cattery\"\n",
    )
    .unwrap();
    let out2 = tmp.path().join("bk2");
    for args in [
        vec![
            "backup",
            "--config",
            pg_cfg.to_str().unwrap(),
            out2.to_str().unwrap(),
        ],
        vec![
            "restore",
            "--config",
            pg_cfg.to_str().unwrap(),
            bk.to_str().unwrap(),
        ],
    ] {
        let (ok, text) = cattery(&args);
        assert!(!ok && text.contains("pg_dump"), "{text}");
        assert!(
            !text.contains("db.example"),
            "no database URL in the message: {text}"
        );
    }
    assert!(!out2.exists());
}

/// A `--listen` port among the ports instances are given (from 20000 up to the start of the
/// kernel's ephemeral range) is warned about when the server starts; the ephemeral ports every
/// other test's server listens on are not.
#[tokio::test]
async fn a_listen_port_among_instance_ports_is_warned_about_at_start() {
    const WARNING: &str = "is among the ports instances are given";
    let plain = Server::start(&[]).await;
    assert!(!plain.log().contains(WARNING), "{}", plain.log());
    drop(plain);

    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let lo: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    assert!(lo > 20_100, "the ephemeral range starts at {lo}");
    // A port near the top of the instance ports, free now (instances pick theirs at random).
    let port = (lo - 100..lo)
        .rev()
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut child = Command::new(cattery_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let health = format!("http://127.0.0.1:{port}/health");
    let t0 = std::time::Instant::now();
    let mut up = false;
    while !up && t0.elapsed() < Duration::from_secs(30) {
        up = reqwest::get(&health)
            .await
            .is_ok_and(|r| r.status().is_success());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: kill(2) on the pid of our own child, not yet waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(up, "the server did not answer on {port}: {text}");
    assert!(text.contains(WARNING), "no warning for {port}: {text}");
    assert!(text.contains(&format!("--listen port {port}")), "{text}");
}

/// The commit the binary was built from is shown where an operator looks: `cattery
/// --version`, the start log line, the node list and `cattery_build_info`; so nodes of one
/// Cargo version built from different commits (a rolling upgrade) can be told apart.
#[tokio::test]
async fn the_commit_is_shown_by_version_log_node_list_and_metrics() {
    let commit = env!("CATTERY_COMMIT");
    if commit.is_empty() {
        // A source tarball (no `.git`, no CATTERY_COMMIT at build time): nothing to show.
        assert!(!std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.git")).exists());
        return;
    }
    assert!(
        commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{commit:?}"
    );
    // The build script's commit is the checkout's HEAD (when git answers here).
    if let Ok(out) = Command::new("git").args(["rev-parse", "HEAD"]).output() {
        if out.status.success() {
            let head = String::from_utf8_lossy(&out.stdout);
            assert!(head.trim().starts_with(commit), "{head} vs {commit}");
        }
    }
    let out = Command::new(cattery_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        printed.trim(),
        format!("cattery {version} (commit {commit})")
    );

    let s = Server::start(&["--metrics-token", "scrape-me"]).await;
    let log = s.log();
    let listening = log
        .lines()
        .find(|l| l.contains("cattery listening"))
        .expect("the start line");
    assert!(listening.contains(commit), "{listening}");
    let nodes = wait_for(Duration::from_secs(10), "this node listed", || async {
        let r = s.req("GET", "/v1/cluster/nodes", Some(&s.sk), None).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["nodes"]
            .as_array()
            .filter(|n| !n.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(nodes[0]["version"], version, "{nodes:?}");
    assert_eq!(nodes[0]["commit"], commit, "{nodes:?}");
    let m = scrape(&s, "scrape-me").await;
    assert_eq!(
        m.sum(
            "cattery_build_info",
            &[("version", version), ("commit", commit)]
        ),
        1.0
    );
}
