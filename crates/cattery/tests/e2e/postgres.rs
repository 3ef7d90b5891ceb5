//! The PostgreSQL store on the real binary (issue 12, `docs/cluster.md`): a server on a
//! scratch PostgreSQL cluster of the test's own (initdb + pg_ctl, so it can stop and start it
//! without disturbing other tests). Without PostgreSQL's binaries these tests say so and pass,
//! unless `CATTERY_REQUIRE_POSTGRES=1` (CI), when they fail instead.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{free_port, wait_for, Server};
use serde_json::{json, Value};

/// A scratch PostgreSQL cluster in a temp dir, stopped (immediately) when dropped.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
}

/// PostgreSQL's binaries (`CATTERY_PG_BIN`, else Debian's), or `None` after saying why.
///
/// Panics: none found while `CATTERY_REQUIRE_POSTGRES=1`.
fn pg_bin() -> Option<PathBuf> {
    let found = std::env::var_os("CATTERY_PG_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("bin")),
        )
        .find(|b| b.join("initdb").is_file() && b.join("pg_ctl").is_file());
    if found.is_none() {
        assert!(
            std::env::var("CATTERY_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "CATTERY_REQUIRE_POSTGRES=1 but no PostgreSQL binaries (scripts/postgres-ci.sh start)"
        );
        eprintln!("SKIPPED: no PostgreSQL binaries (scripts/postgres-ci.sh start installs them)");
    }
    found
}

/// Runs a PostgreSQL tool as `postgres` when we are root (PostgreSQL refuses root).
fn pg_cmd(bin: &std::path::Path, tool: &str) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

impl PgCluster {
    /// A fresh cluster, started; `None` when PostgreSQL is not installed (see [`pg_bin`]).
    pub fn start() -> Option<PgCluster> {
        let bin = pg_bin()?;
        let dir = tempfile::tempdir().unwrap();
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid)).unwrap();
        }
        let out = pg_cmd(&bin, "initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        let c = PgCluster {
            bin,
            dir,
            port: free_port(),
        };
        c.pg_start();
        Some(c)
    }

    /// `postgres://` URL of the cluster's default database.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// `postgres://` URL of database `db` of the cluster.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server (again), on the same port; waits until it accepts connections.
    pub fn pg_start(&self) {
        let data = self.dir.path().join("data");
        let out = pg_cmd(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "30", "start", "-o"])
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
                self.port,
                data.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {out:?}\n{}",
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// Runs `psql` on the default database with `args`; panics if it fails.
    pub fn psql(&self, args: &[&str]) {
        let out = pg_cmd(&self.bin, "psql")
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-d", &self.url()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {args:?}: {out:?}");
    }

    /// Copies database `from` into the existing, empty database `to`, as a restore of a
    /// `pg_dump` does.
    pub fn copy_database(&self, from: &str, to: &str) {
        let dump = pg_cmd(&self.bin, "pg_dump")
            .args(["-d", &self.url_of(from)])
            .output()
            .unwrap();
        assert!(dump.status.success(), "pg_dump: {dump:?}");
        let mut restore = pg_cmd(&self.bin, "psql")
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-d"])
            .arg(self.url_of(to))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut restore.stdin.take().unwrap(), &dump.stdout).unwrap();
        assert!(restore.wait().unwrap().success(), "psql restore");
    }

    /// Stops the server (`fast`: clients are disconnected, committed work is kept).
    pub fn pg_stop(&self) {
        let out = pg_cmd(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_cmd(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A server whose store is `pg`.
async fn server_on(pg: &PgCluster, extra: &[&str]) -> Server {
    Server::start_with_env(extra, &[("CATTERY_DATABASE_URL", &pg.url())]).await
}

/// The basics on PostgreSQL: keys from `cattery keys create --database-url`, an agent, a
/// session started and stopped; after a restart of the server everything is still there.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_on_postgres_keeps_its_records_across_a_restart() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut s = server_on(&pg, &[]).await;
    s.deploy("pgbasic", &[], json!({})).await;
    s.wait_ready("pgbasic", Duration::from_secs(20)).await;
    let sid = s.start_ok("pgbasic").await;
    let r = s.stop("pgbasic", &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    s.terminate(Duration::from_secs(20));
    // Nothing of it was in the data dir's SQLite file.
    assert!(!s.data_dir().join("cattery.db").exists());
    s.spawn().await;
    let got = s.session("pgbasic", &sid).await;
    assert!(!got["endedAt"].is_null(), "{got}");
    assert_eq!(s.agent("pgbasic").await["name"], "pgbasic");
}

/// One client's view of the load: every answer's status, and the sessions it started.
#[derive(Default)]
struct Seen {
    statuses: Vec<(u16, Value)>,
    started: Vec<String>,
    stopped: Vec<String>,
}

/// A client that starts a session, then stops it, over and over until `until`.
async fn churn(
    http: reqwest::Client,
    base: String,
    pk: String,
    sk: String,
    until: Instant,
) -> Seen {
    let mut seen = Seen::default();
    let send = |req: reqwest::RequestBuilder| async move {
        match req.timeout(Duration::from_secs(30)).send().await {
            Ok(r) => {
                let st = r.status().as_u16();
                (st, r.json::<Value>().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({"transport_error": e.to_string()})),
        }
    };
    while Instant::now() < until {
        let (st, b) = send(
            http.post(format!("{base}/v1/public/pgload/start"))
                .bearer_auth(&pk)
                .json(&json!({})),
        )
        .await;
        seen.statuses.push((st, b.clone()));
        if st != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let sid = b["sessionId"].as_str().unwrap().to_string();
        seen.started.push(sid.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Stop until it answers (a 503 while the database is down is retried).
        loop {
            let (st, b) = send(
                http.delete(format!("{base}/v1/agents/pgload/sessions/{sid}"))
                    .bearer_auth(&sk),
            )
            .await;
            seen.statuses.push((st, b));
            if st == 200 {
                seen.stopped.push(sid.clone());
                break;
            }
            if st != 503 || Instant::now() > until + Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    seen
}

/// PostgreSQL stopped for 5 s under a steady churn of starts and stops: while it is down the
/// API answers 503 `{error, code}` (never another 5xx, never a hang); once it is back the
/// server serves again by itself; every session that was started (200) is recorded, every
/// one that was stopped (200) is ended, and no instance is left running without a record.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_answers_503_and_heals_with_nothing_lost() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut s = server_on(&pg, &[]).await;
    s.deploy(
        "pgload",
        &[],
        json!({"autoScaling": {"minAgents": 2, "maxAgents": 20}}),
    )
    .await;
    s.wait_ready("pgload", Duration::from_secs(20)).await;
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(14);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(churn(
                s.http.clone(),
                s.base.clone(),
                s.pk.clone(),
                s.sk.clone(),
                until,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.pg_stop();
    let down_at = t0.elapsed();
    // One start sent as soon as the database is down: it fails within the store's 2 s
    // connection timeout, well inside the outage. (The churning clients may all be in stops
    // then, which answer without the database; a start they send in the outage's last 2 s
    // can wait for the database to come back and succeed.)
    let probe = tokio::spawn(churn(
        s.http.clone(),
        s.base.clone(),
        s.pk.clone(),
        s.sk.clone(),
        Instant::now() + Duration::from_millis(1),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg.pg_start();
    let up_at = t0.elapsed();
    let mut all = Seen::default();
    for c in clients.into_iter().chain(std::iter::once(probe)) {
        let seen = c.await.unwrap();
        all.statuses.extend(seen.statuses);
        all.started.extend(seen.started);
        all.stopped.extend(seen.stopped);
    }
    eprintln!(
        "database down {down_at:?}..{up_at:?}; {} answers, {} sessions started, {} stopped",
        all.statuses.len(),
        all.started.len(),
        all.stopped.len()
    );
    let mut unavailable = 0;
    for (st, b) in &all.statuses {
        match st {
            200 => {}
            503 => {
                assert!(b["error"].is_string() && b["code"].is_string(), "{b}");
                unavailable += 1;
            }
            _ => panic!("unexpected answer {st}: {b}"),
        }
    }
    eprintln!("{unavailable} answers were 503");
    assert!(unavailable > 0, "no 503 while the database was down");
    // Full service again, by itself.
    let sid = wait_for(
        Duration::from_secs(15),
        "a start after the outage",
        || async {
            let r = s.start_session("pgload", json!({})).await;
            (r.status == 200).then(|| r.body["sessionId"].as_str().unwrap().to_string())
        },
    )
    .await;
    assert_eq!(s.stop("pgload", &sid).await.status, 200);
    assert!(
        all.started.len() > 4,
        "too few sessions before and after the outage"
    );
    // Nothing lost: every started session is recorded, every stopped one has ended.
    for sid in &all.started {
        let r = s
            .req(
                "GET",
                &format!("/v1/agents/pgload/sessions/{sid}"),
                Some(&s.sk),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "session {sid} lost: {:?}", r.body);
        if all.stopped.contains(sid) {
            assert!(!r.body["endedAt"].is_null(), "stopped but open: {}", r.body);
        } else {
            // A stop still retrying at the end: stop it now.
            assert_eq!(s.stop("pgload", sid).await.status, 200);
        }
    }
    // No instance without a record: after a drain, nothing of the agent runs, and after a
    // restart no session is left open.
    s.terminate(Duration::from_secs(30));
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    s.spawn().await;
    for sid in &all.started {
        let g = s.session("pgload", sid).await;
        assert!(!g["endedAt"].is_null(), "open after the drain: {g}");
    }
}

/// Nodes on one database: a node heartbeats and lists itself in `GET /v1/cluster/nodes`
/// (default org only); a second node with another id joins while the first one lives; both
/// nodes open secrets sealed by the other through `--secrets-key-file`.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_heartbeats_and_a_second_node_joins_while_it_lives() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let keydir = tempfile::tempdir().unwrap();
    let keyfile = keydir.path().join("secrets.key");
    crate::common::write_private(&keyfile, &[7u8; 32]);
    let keyfile = keyfile.to_str().unwrap().to_string();
    let port = free_port();
    let advertise = format!("http://127.0.0.1:{port}");
    let mut a = Server::start_with_env(
        &[
            "--node-id",
            "node-a",
            "--advertise-url",
            &advertise,
            "--node-timeout",
            "2",
            "--secrets-key-file",
            &keyfile,
        ],
        &[("CATTERY_DATABASE_URL", &pg.url())],
    )
    .await;
    assert!(!a.data_dir().join("secrets.key").exists());
    let nodes = wait_for(Duration::from_secs(5), "node a listed", || async {
        let r = a.req("GET", "/v1/cluster/nodes", Some(&a.sk), None).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let n = r.body["nodes"].as_array().unwrap().clone();
        (!n.is_empty()).then_some(n)
    })
    .await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["id"], "node-a");
    assert_eq!(nodes[0]["advertiseUrl"], advertise.as_str());
    assert_eq!(nodes[0]["alive"], true);
    assert_eq!(nodes[0]["self"], true);
    assert!(nodes[0]["heartbeatAgeMs"].as_i64().unwrap() < 2000);
    // Operators only.
    let other = a.key("private", "other");
    let r = a.req("GET", "/v1/cluster/nodes", Some(&other), None).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(r.body["code"].is_string());
    let r = a.req("GET", "/v1/cluster/nodes", Some(&a.pk), None).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    // A secret sealed on node a.
    let r = a
        .req(
            "PUT",
            "/v1/secrets/shared",
            Some(&a.sk),
            Some(json!({"secrets": [{"secretKey": "K", "secretValue": "v"}]})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);

    // Node b on the same database while a lives: it joins (sessions record their owner
    // node, docs/cluster.md), and each lists both nodes alive.
    let mut b0 = Server::start_with_env(
        &[
            "--node-id",
            "node-b",
            "--node-timeout",
            "2",
            "--secrets-key-file",
            &keyfile,
        ],
        &[("CATTERY_DATABASE_URL", &pg.url())],
    )
    .await;
    wait_for(Duration::from_secs(5), "both nodes alive", || async {
        let r = a.req("GET", "/v1/cluster/nodes", Some(&a.sk), None).await;
        let n = r.body["nodes"].as_array().cloned().unwrap_or_default();
        (n.len() == 2 && n.iter().all(|x| x["alive"] == true)).then_some(())
    })
    .await;
    // b has neither an advertise URL nor the cluster secret while a lives: it says so.
    let log = b0.log();
    assert!(
        log.contains("1 other live node(s) share this database, but this node has no --advertise-url and no --cluster-secret-file"),
        "{log}"
    );
    let st = b0.terminate(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "b's clean stop: {st:?}");

    // Once a has stopped cleanly (drained), it has left: b starts at once, even with a node
    // timeout far longer than the time since a's last heartbeat, lists a as left, and opens
    // a's secret with the shared key (a deployment binding it starts).
    let st = a.terminate(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "a clean stop: {st:?}");
    let b = Server::start_with_env(
        &[
            "--node-id",
            "node-b",
            "--node-timeout",
            "60",
            "--secrets-key-file",
            &keyfile,
        ],
        &[("CATTERY_DATABASE_URL", &pg.url())],
    )
    .await;
    let r = b.req("GET", "/v1/cluster/nodes", Some(&b.sk), None).await;
    let nodes = r.body["nodes"].as_array().unwrap();
    let by_id = |id: &str| nodes.iter().find(|n| n["id"] == id).unwrap().clone();
    assert_eq!(by_id("node-a")["alive"], false, "{nodes:?}");
    assert_eq!(by_id("node-a")["state"], "left", "{nodes:?}");
    assert!(by_id("node-a")["heartbeatAgeMs"].is_null(), "{nodes:?}");
    assert_eq!(by_id("node-b")["self"], true, "{nodes:?}");
    assert_eq!(by_id("node-b")["state"], "alive", "{nodes:?}");
    b.deploy(
        "sealed",
        &["--print-env", "K"],
        json!({"secretSet": "shared"}),
    )
    .await;
    b.wait_ready("sealed", Duration::from_secs(20)).await;
    let sid = b.start_ok("sealed").await;
    assert_eq!(b.stop("sealed", &sid).await.status, 200);
}
