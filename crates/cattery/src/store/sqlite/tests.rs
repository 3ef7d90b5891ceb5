//! Tests of the SQLite store's own machinery (group commits, batching); the contract of
//! every method is in `store::conformance`.

use uuid::Uuid;

use super::SqliteStore;
use crate::model::{
    now_ms, AgentRecord, DeploymentRecord, DeploymentSpec, EndReason, InstanceRecord, LogLine,
    MetricSample, SessionEnd, SessionRecord,
};
use crate::store::prelude::*;
use crate::store::{LogFilter, SessionFilter, StoreError};

async fn store_with_agent() -> (tempfile::TempDir, SqliteStore, AgentRecord) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).await.unwrap();
    store.ensure_org("o").await.unwrap();
    let now = now_ms();
    let agent = AgentRecord {
        id: Uuid::new_v4(),
        org: "o".into(),
        name: "a".into(),
        region: "local".into(),
        min_agents: 0,
        max_agents: 1,
        desired_deployment_id: Uuid::new_v4(),
        created_ms: now,
        updated_ms: now,
        deleted_ms: None,
    };
    let dep = DeploymentRecord {
        id: agent.desired_deployment_id,
        agent_id: agent.id,
        spec: DeploymentSpec::default(),
        created_ms: now,
    };
    store.create_agent(&agent, &dep, None).await.unwrap();
    (dir, store, agent)
}

fn session(agent: &AgentRecord) -> SessionRecord {
    SessionRecord {
        id: Uuid::new_v4(),
        org: agent.org.clone(),
        agent_id: agent.id,
        deployment_id: agent.desired_deployment_id,
        created_ms: now_ms(),
        updated_ms: now_ms(),
        bot_start_ms: None,
        cold_start: Some(false),
        transport: None,
        end: None,
        samples: Vec::new(),
        node_id: "n1".into(),
        daily_room: None,
    }
}

fn instance(agent: &AgentRecord) -> InstanceRecord {
    InstanceRecord {
        id: Uuid::new_v4(),
        agent_id: agent.id,
        deployment_id: agent.desired_deployment_id,
        session_id: None,
        runtime: "process".into(),
        placement: serde_json::json!({"pid": 1234, "pid_start": 5678, "port": 20001, "cgroup": null, "dir": "/tmp/x"}),
        created_ms: now_ms(),
        node_id: "n1".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commits_keep_each_write_apart() {
    let (_dir, store, agent) = store_with_agent().await;
    let dup = session(&agent);
    store.insert_session(&dup).await.unwrap();
    let mut handles = Vec::new();
    for i in 0..200 {
        let st = store.clone();
        let s = if i % 10 == 0 {
            dup.clone()
        } else {
            session(&agent)
        };
        handles.push(tokio::spawn(async move {
            let r = st.insert_session(&s).await;
            let r2 = st.mark_delivered(s.id, i).await;
            (s.id, r, r2)
        }));
    }
    let (mut ok, mut conflict) = (0, 0);
    for h in handles {
        let (id, r, r2) = h.await.unwrap();
        r2.unwrap();
        match r {
            Ok(()) => {
                ok += 1;
                let got = store.get_session(id).await.unwrap().unwrap();
                assert!(got.bot_start_ms.is_some());
            }
            Err(StoreError::Conflict) => conflict += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, conflict), (180, 20));
    let (total, _) = store
        .list_sessions(
            agent.id,
            &SessionFilter {
                limit: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(total, 181);
}

#[tokio::test]
async fn log_lines_in_any_batch_size_keep_their_order() {
    let (_dir, store, agent) = store_with_agent().await;
    let mut n = 0i64;
    for batch in [1usize, 3, 128, 200, 7, 300] {
        let lines: Vec<LogLine> = (0..batch)
            .map(|_| {
                n += 1;
                LogLine {
                    org: "o".into(),
                    agent_id: agent.id,
                    deployment_id: None,
                    session_id: None,
                    instance_id: None,
                    ts_ns: n,
                    stream: "stdout",
                    line: format!("line {n}"),
                }
            })
            .collect();
        store.append_logs(&lines).await.unwrap();
    }
    let (total, got) = store
        .query_logs(
            agent.id,
            &LogFilter {
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(total, n);
    let want: Vec<String> = (1..=n).map(|i| format!("line {i}")).collect();
    assert_eq!(got.into_iter().map(|l| l.line).collect::<Vec<_>>(), want);
}

#[tokio::test]
async fn combined_session_and_instance_writes() {
    let (_dir, store, agent) = store_with_agent().await;
    let inst = instance(&agent);
    store.put_instance(&inst).await.unwrap();
    let s = session(&agent);
    store
        .insert_session_for_instance(&s, inst.id)
        .await
        .unwrap();
    let got = store.get_session(s.id).await.unwrap().unwrap();
    assert_eq!(got.cold_start, Some(false));
    assert!(got.end.is_none());
    let recs = store.list_instances().await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].session_id, Some(s.id));

    // A failing statement rolls the whole list back and leaves the connection usable.
    let other = instance(&agent);
    store.put_instance(&other).await.unwrap();
    let err = store.insert_session_for_instance(&s, other.id).await;
    assert!(matches!(err, Err(StoreError::Conflict)), "{err:?}");
    let recs = store.list_instances().await.unwrap();
    let o = recs.iter().find(|r| r.id == other.id).unwrap();
    assert_eq!(
        o.session_id, None,
        "the instance is not promised to a failed insert"
    );
    // An instance without a record stays without one.
    let s2 = session(&agent);
    store
        .insert_session_for_instance(&s2, Uuid::new_v4())
        .await
        .unwrap();
    assert_eq!(store.list_instances().await.unwrap().len(), 2);

    // The end: first wins, metrics are kept, the instance record goes.
    let end = SessionEnd {
        ended_ms: now_ms(),
        reason: EndReason::Stopped,
        completion_status: "HTTP_ERROR".into(),
        exit_code: None,
        exit_signal: Some(15),
        message: Some("m".into()),
    };
    let samples = vec![MetricSample {
        t: 1_700_000_000,
        cpu_millicores: 250,
        memory_bytes: 1 << 20,
    }];
    assert!(store
        .end_instance(inst.id, Some((s.id, &end, &samples[..])))
        .await
        .unwrap());
    let later = SessionEnd {
        reason: EndReason::Error,
        ..end.clone()
    };
    assert!(!store
        .end_instance(inst.id, Some((s.id, &later, &[])))
        .await
        .unwrap());
    let got = store.get_session(s.id).await.unwrap().unwrap();
    let e = got.end.unwrap();
    assert_eq!(e.reason, EndReason::Stopped);
    assert_eq!(e.exit_signal, Some(15));
    assert_eq!(got.samples, samples);
    let recs = store.list_instances().await.unwrap();
    assert!(recs.iter().all(|r| r.id != inst.id));
    assert!(!store.end_instance(other.id, None).await.unwrap());
    assert!(store.list_instances().await.unwrap().is_empty());
    // Plain writes still work on the write connection afterwards.
    store.mark_delivered(s2.id, 3).await.unwrap();
    let got = store.get_session(s2.id).await.unwrap().unwrap();
    assert_eq!(got.bot_start_ms, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    crate::store::conformance::run_all(|| async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let guard: Box<dyn std::any::Any + Send> = Box::new(dir);
        (
            guard,
            std::sync::Arc::new(store) as std::sync::Arc<dyn crate::store::Store>,
        )
    })
    .await;
}

/// A database made by an earlier version (schema 1, migrated by sqlx) is brought up to date:
/// its version is read from sqlx's ledger, its instances keep their placement and its
/// sessions their samples.
#[tokio::test]
async fn upgrades_a_database_of_schema_1() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = rusqlite::Connection::open(dir.path().join("cattery.db")).unwrap();
        db.execute_batch(include_str!("../../../migrations/0001_init.sql"))
            .unwrap();
        db.execute_batch(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
                 installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
                 checksum BLOB NOT NULL, execution_time BIGINT NOT NULL);
             INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                 VALUES (1, 'init', TRUE, x'00', 1);
             INSERT INTO orgs (name, verbose_name, created_ms) VALUES ('o', 'o', 1);
             INSERT INTO agents VALUES ('6f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b', 'o', 'a', 'local',
                 0, 1, '7f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b', 1, 1, NULL);
             INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, metrics)
                 VALUES ('8f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b', 'o',
                 '6f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b', '7f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b', 1, 1,
                 '{\"sampleCount\": 1, \"timeseries\": [{\"t\": 5, \"c\": 10, \"m\": 100}]}');
             INSERT INTO instances (id, agent_id, deployment_id, session_id, pid, pid_start, port,
                 cgroup, dir, created_ms) VALUES ('9f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b',
                 '6f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b', '7f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b',
                 '8f1c1d3c-4a0b-4f7e-9a55-0c1d2e3f4a5b', 42, 4242, 20001, NULL, '/tmp/x', 7);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(dir.path()).await.unwrap();
    let inst = store.list_instances().await.unwrap().pop().unwrap();
    assert_eq!(inst.runtime, "process");
    assert_eq!(
        inst.placement,
        serde_json::json!({"pid": 42, "pid_start": 4242, "port": 20001, "cgroup": null, "dir": "/tmp/x"})
    );
    let sid = inst.session_id.unwrap();
    let s = store.get_session(sid).await.unwrap().unwrap();
    assert_eq!(
        s.samples,
        [MetricSample {
            t: 5,
            cpu_millicores: 10,
            memory_bytes: 100
        }]
    );
    drop(store);
    // Opening again applies nothing twice.
    let store = SqliteStore::open(dir.path()).await.unwrap();
    assert_eq!(store.list_instances().await.unwrap().len(), 1);
    drop(store);
    // The binary that made it would now refuse it (it reads sqlx's ledger only).
    assert_eq!(
        sqlx_ledger_unknown_to_schema_1(&dir.path().join("cattery.db")),
        [super::migrate::LATEST]
    );
}

/// The versions in sqlx's ledger that a Cattery of schema 1 does not know: its sqlx migrator
/// (which knows migration 1 alone) refuses a database whose ledger names any, before it
/// changes anything ("migration N was previously applied but is missing in the resolved
/// migrations"), and runs on one whose ledger names none (or creates the ledger and applies
/// migration 1 when there is none).
fn sqlx_ledger_unknown_to_schema_1(db: &std::path::Path) -> Vec<i64> {
    let db = rusqlite::Connection::open(db).unwrap();
    let mut st = db
        .prepare("SELECT version FROM _sqlx_migrations WHERE success AND version <> 1")
        .unwrap();
    let versions = st.query_map([], |r| r.get(0)).unwrap();
    versions.collect::<Result<_, _>>().unwrap()
}

/// A database this binary made is refused by a Cattery of schema 1 (a downgrade): its sqlx
/// ledger names a version that Cattery does not know. Without it, that Cattery would apply
/// its migration 1 over the tables and fail with "table orgs already exists".
#[tokio::test]
async fn a_cattery_of_schema_1_refuses_a_new_database() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).await.unwrap());
    let db = dir.path().join("cattery.db");
    assert_eq!(
        sqlx_ledger_unknown_to_schema_1(&db),
        [super::migrate::LATEST]
    );
    // Opening again adds nothing.
    drop(SqliteStore::open(dir.path()).await.unwrap());
    assert_eq!(
        sqlx_ledger_unknown_to_schema_1(&db),
        [super::migrate::LATEST]
    );
}

/// The store checkpoints the WAL into the database file by itself (on a connection of its
/// own, several times a second): a copy of the database file alone, without its WAL, holds what was
/// committed a little earlier, under a steady stream of writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_checkpointed_into_the_database_file_under_writes() {
    let (dir, store, agent) = store_with_agent().await;
    let first = session(&agent);
    store.insert_session(&first).await.unwrap();
    let db = dir.path().join(super::DB_FILE);
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("copy.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // Keep writing meanwhile: each group commit may restart the WAL after a checkpoint.
        for _ in 0..20 {
            store.insert_session(&session(&agent)).await.unwrap();
        }
        std::fs::copy(&db, &copy).unwrap();
        let c = rusqlite::Connection::open(&copy).unwrap();
        let n: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sessions WHERE id = ?1",
                [first.id.to_string()],
                |r| r.get(0),
            )
            .unwrap_or(0);
        if n == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not checkpointed in 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Only the write connection checkpoints: a read connection never does, not even when it is
/// the last one to close (a checkpoint on a second connection racing the writer's restart of
/// the WAL is SQLite's "WAL-reset bug" before 3.51.3).
#[test]
fn read_connections_never_checkpoint_on_close() {
    use super::conn::{Conn, Mode};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let mut w = Conn::open(&path, Mode::Write, "-1024").unwrap();
    w.exec("CREATE TABLE t(x)", &[]).unwrap();
    w.exec("INSERT INTO t VALUES (1)", &[]).unwrap();
    let mut r = Conn::open(&path, Mode::Read, "-1024").unwrap();
    assert!(r
        .inner()
        .db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE)
        .unwrap());
    assert!(!w
        .inner()
        .db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE)
        .unwrap());
    let wal = dir.path().join("t.db-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    // The writer goes first: the reader is then the last connection, and closing it leaves
    // the WAL as it was (no checkpoint, no deletion).
    drop(w);
    assert_eq!(r.query_int("SELECT COUNT(*) FROM t", &[]).unwrap(), 1);
    drop(r);
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
}

/// The bundled SQLite has the WAL-reset bug fixed (3.51.3 and later).
#[test]
fn bundled_sqlite_has_the_wal_reset_fix() {
    assert!(
        rusqlite::version_number() >= 3_051_003,
        "SQLite {}",
        rusqlite::version()
    );
}

/// Under a steady stream of writes, with reads between them, the writer restarts the WAL
/// from the top once it grew past its restart size: the WAL file stays small instead of
/// growing by every page written (it reached 650 MB in these 4 s when it never restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_restarted_under_a_steady_stream_of_writes() {
    let (dir, store, agent) = store_with_agent().await;
    let wal = dir.path().join(format!("{}-wal", super::DB_FILE));
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < std::time::Duration::from_secs(4) {
        let s = session(&agent);
        store.insert_session(&s).await.unwrap();
        store.get_session(s.id).await.unwrap();
        n += 1;
    }
    // Without the restart the WAL grew to 650 MB in these 4 s. With it, the file is cut back
    // to the size limit at each restart; between two, it grows by what the writes add while
    // the checkpoint waits for its turn: on a machine busy with other tests (2 cores) seen at
    // 82 MB, and at 174 MB with two builds running beside the whole suite. Four times the
    // limit (256 MiB) still tells the two apart.
    let size = std::fs::metadata(&wal).unwrap().len();
    assert!(
        size <= 4 * super::conn::WAL_SIZE_LIMIT as u64,
        "WAL grew to {size} bytes over {n} writes"
    );
}

/// No connection maps the database file: in WAL mode a mapped connection unmaps and maps the
/// whole file again at its first read after another connection's commit, which under steady
/// writes is every API request's key check (docs/performance.md, "A quiet machine").
#[test]
fn connections_do_not_map_the_database_file() {
    use super::conn::{Conn, Mode};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    for mode in [Mode::Write, Mode::Read, Mode::Checkpoint] {
        let mut c = Conn::open(&path, mode, "-1024").unwrap();
        assert_eq!(c.query_int("PRAGMA mmap_size", &[]).unwrap(), 0);
    }
}

/// A write that reads before it writes (the capacity reservation: count, then insert) waits
/// for another connection's write lock, as every write does, instead of failing at once with
/// "database is locked": another process may write to the same file (`cattery keys create`
/// while the server runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_reads_first_waits_for_another_writer() {
    let (dir, store, agent) = store_with_agent().await;
    let other = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        other.execute_batch("COMMIT").unwrap();
    });
    let reserved = store.reserve_slot(agent.id, 1, Uuid::new_v4(), "n").await;
    holder.join().unwrap();
    assert!(reserved.unwrap(), "the reservation");
    assert_eq!(store.slots_held(agent.id).await.unwrap(), 1);
}

/// A management write is durable past a machine crash or a power loss when it answers: its
/// commit runs at `synchronous = FULL` (2), which makes SQLite fsync the WAL at the commit.
/// The group commits of the session path stay at `NORMAL` (1), before and after one.
#[tokio::test]
async fn management_commits_wait_for_the_disk_and_group_commits_do_not() {
    let (_dir, store, agent) = store_with_agent().await;
    let level = |c: &mut super::conn::Conn| {
        c.query_row("PRAGMA synchronous", &[], |r| r.int(0))
            .map(Option::flatten)
    };
    assert_eq!(store.write(move |c| level(c)).await.unwrap(), Some(1));
    assert_eq!(store.write_tx(move |c| level(c)).await.unwrap(), Some(2));
    assert_eq!(store.write(move |c| level(c)).await.unwrap(), Some(1));
    // A failed management write leaves the level as it was too.
    let failed = store
        .write_tx(move |c| {
            c.exec("INSERT INTO no_such_table VALUES (1)", &[])?;
            level(c)
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(store.write(move |c| level(c)).await.unwrap(), Some(1));
    let s = session(&agent);
    store.insert_session(&s).await.unwrap();
    assert!(store.get_session(s.id).await.unwrap().is_some());
}
