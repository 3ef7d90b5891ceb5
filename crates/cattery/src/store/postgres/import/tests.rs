//! `cattery store copy`: the table lists against the SQLite schema, and a copy into
//! PostgreSQL (`CATTERY_TEST_DATABASE_URL`, see `store::postgres::tests`).

use super::*;
use crate::store::SessionStore;

/// Fails when a SQLite migration adds a table that the copy neither copies nor skips (with
/// its reason): add it to `COPIED` (and to the PostgreSQL schema) or to `SKIPPED`.
#[test]
fn every_sqlite_table_is_copied_or_deliberately_skipped() {
    let mut db = Connection::open_in_memory().unwrap();
    migrate::run_on(&mut db).unwrap();
    let tables = source_tables(&db).unwrap();
    let skipped: HashSet<&str> = SKIPPED.iter().map(|(t, _)| *t).collect();
    for t in &tables {
        assert!(
            COPIED.contains(&t.as_str()) || skipped.contains(t.as_str()),
            "SQLite table {t} is neither copied by `cattery store copy` (COPIED) nor listed as \
             deliberately skipped (SKIPPED)"
        );
    }
    for t in COPIED {
        assert!(tables.iter().any(|x| x == t), "{t} is not a SQLite table");
        assert!(!skipped.contains(t), "{t} both copied and skipped");
    }
    check_tables(&db).unwrap();
    db.execute_batch("CREATE TABLE later_feature (id TEXT)")
        .unwrap();
    let err = check_tables(&db).unwrap_err().to_string();
    assert!(err.contains("later_feature"), "{err}");
}

const ORG: &str = "acme";
const AGENT: &str = "11111111-1111-4111-8111-111111111111";
const DEP: &str = "22222222-2222-4222-8222-222222222222";
const ENDED: &str = "33333333-3333-4333-8333-333333333333";
const LIVE: &str = "44444444-4444-4444-8444-444444444444";
const WAITING: &str = "55555555-5555-4555-8555-555555555555";
const STOPPING: &str = "66666666-6666-4666-8666-666666666666";
const BUILD: &str = "77777777-7777-4777-8777-777777777777";
const KEY: &str = "88888888-8888-4888-8888-888888888888";
const HOOK: &str = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa";
const DELIVERY: &str = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb";

/// A data dir whose database holds one of most things, written as the SQLite store writes them.
async fn data_dir_with_records(dir: &Path) {
    let s = crate::store::open(&Default::default(), dir, crate::store::OpenMode::Create)
        .await
        .unwrap();
    drop(s);
    let db = Connection::open(dir.join(DB_FILE)).unwrap();
    db.execute_batch(&format!(
        "INSERT INTO orgs VALUES ('{ORG}', 'Acme', 1000, '{{\"x\":1}}');
         INSERT INTO api_keys VALUES ('{KEY}', '{ORG}', 'private', 'k', x'0102', 'sk_ab', 1001,
             NULL, NULL);
         INSERT INTO agents VALUES ('{AGENT}', '{ORG}', 'bot', 'us-west', 0, 5, '{DEP}', 1002,
             1003, NULL);
         INSERT INTO deployments VALUES ('{DEP}', '{AGENT}', '{{}}', 1002);
         INSERT INTO secret_sets VALUES ('{ORG}', 'set', 'secret', 'us-west', NULL, 1004, 1004);
         INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, ended_ms,
             bot_start_ms, cold_start, completion_status, end_reason, exit_code, end_message,
             transport, samples, node_id)
             VALUES ('{ENDED}', '{ORG}', '{AGENT}', '{DEP}', 2000, 2100, 2100, 2001, 1,
             'HTTP_COMPLETE', 'completed', 0, 'bye', 'daily', '[{{\"t\":2,\"c\":3,\"m\":4}}]',
             'n1');
         INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms,
             bot_start_ms, cold_start, transport, node_id)
             VALUES ('{LIVE}', '{ORG}', '{AGENT}', '{DEP}', 3000, 3000, 3001, 0, 'daily', 'n1');
         INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms,
             transport, node_id)
             VALUES ('{WAITING}', '{ORG}', '{AGENT}', '{DEP}', 3100, 3100, 'websocket', 'n1');
         INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms,
             bot_start_ms, cold_start, stop_deadline_ms, node_id)
             VALUES ('{STOPPING}', '{ORG}', '{AGENT}', '{DEP}', 3200, 3200, 3201, 0, 9999, 'n1');
         INSERT INTO logs VALUES (5, '{ORG}', '{AGENT}', '{DEP}', '{ENDED}', NULL, 10, 'stdout',
             'hello');
         INSERT INTO logs VALUES (9, '{ORG}', '{AGENT}', '{DEP}', '{ENDED}', NULL, 11, 'stderr',
             'world');
         INSERT INTO builds (id, org, status, region, context_hash, dockerfile_path,
             context_size, created_ms, updated_ms, node_id)
             VALUES ('{BUILD}', '{ORG}', 'building', 'us-west', 'h', 'Dockerfile', 7, 4000,
             4000, 'n1');
         INSERT INTO instances VALUES ('99999999-9999-4999-8999-999999999999', '{AGENT}',
             '{DEP}', '{LIVE}', 'process', '{{}}', 3000, 'n1');
         INSERT INTO webhook_deliveries VALUES (3, '{DELIVERY}', '{HOOK}', '{ORG}',
             'session.ended', '{{}}', 2100, 'pending', 1, 2200, 500, 'boom', NULL);
         INSERT INTO nodes (id, version, started_ms, heartbeat_ms, instances, busy)
             VALUES ('n1', 'x', 1, 2, 1, 0);"
    ))
    .unwrap();
    let cipher = crate::core::secrets::SecretCipher::from_key(&KEY_BYTES);
    let v = cipher.seal(ORG, "set", "K", "v");
    db.execute(
        "INSERT INTO secrets VALUES (?1, 'set', 'K', ?2, ?3)",
        rusqlite::params![ORG, v.nonce, v.ciphertext],
    )
    .unwrap();
    let w = cipher.seal(ORG, &format!("webhook:{HOOK}"), "secret", "whsec_x");
    db.execute(
        "INSERT INTO webhook_endpoints VALUES (?1, ?2, 'http://h/', '[\"*\"]', 'd', ?3, ?4, 1005)",
        rusqlite::params![HOOK, ORG, w.nonce, w.ciphertext],
    )
    .unwrap();
}

/// The secrets key the test's values are sealed with.
const KEY_BYTES: [u8; 32] = [7u8; 32];

/// Writes a key file as the nodes accept it (mode 0600).
fn write_key(path: &Path, key: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, key).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A fresh schema's name in the test database.
fn fresh_schema() -> String {
    format!("t_{}", Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_data_dir_is_copied_whole_once_and_open_sessions_end_as_after_a_restart() {
    let Some(url) = super::super::tests::test_database_url() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    data_dir_with_records(&dir).await;
    let source = Source::DataDir {
        dir: dir.clone(),
        key_file: None,
    };
    let schema = fresh_schema();

    // Sealed values without the key that opens them: refused before anything is written.
    let err = copy_into(&source, &url, Some(&schema)).await.unwrap_err();
    assert!(format!("{err:#}").contains("no secrets key"), "{err:#}");
    // Another key than the one the values are sealed with: refused.
    write_key(&dir.join(KEY_FILE), &[8u8; 32]);
    let err = copy_into(&source, &url, Some(&schema)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("does not open the database's secret values"),
        "{err:#}"
    );
    write_key(&dir.join(KEY_FILE), &KEY_BYTES);

    // A server holds the data dir: refused.
    {
        let f = std::fs::File::create(dir.join("serve.lock")).unwrap();
        let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let err = copy_into(&source, &url, Some(&schema)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("a cattery serve is using"),
            "{err:#}"
        );
    }

    let before = crate::model::now_ms();
    let r = copy_into(&source, &url, Some(&schema)).await.unwrap();
    assert_eq!(r.schema, migrate::LATEST);
    assert_eq!(
        r.sealed, 2,
        "the secret and the webhook endpoint's signing secret"
    );
    assert_eq!(r.key_file.as_deref(), Some(dir.join(KEY_FILE).as_path()));
    assert_eq!((r.ended_sessions, r.failed_builds), (3, 1));
    let count = |t: &str| r.tables.iter().find(|(n, _)| *n == t).unwrap().1;
    assert_eq!(
        (count("sessions"), count("logs"), count("api_keys")),
        (4, 2, 1)
    );

    let pg = PgStore::open(&url, 2, Some(&schema)).await.unwrap();
    let pool = pg.pool();
    // Skipped: nothing of the old server's processes.
    for t in ["instances", "capacity_slots", "nodes", "ws_tokens"] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {t}")))
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{t}");
    }
    sessions_as_copied(&pg, before).await;
    rows_as_copied(pool, before).await;

    // A second copy into the now non-empty database: refused, nothing changed.
    let total = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM sessions) + (SELECT COUNT(*) FROM logs) \
             + (SELECT COUNT(*) FROM api_keys) + (SELECT COUNT(*) FROM orgs)",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        n
    };
    let n0 = total().await;
    let err = copy_into(&source, &url, Some(&schema)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("already holds records"),
        "{err:#}"
    );
    assert_eq!(total().await, n0);
}

/// A failure during the copy (here a value the PostgreSQL schema cannot take) leaves the
/// target as it was: no record, so a corrected copy can go into it.
#[tokio::test]
async fn a_copy_that_fails_writes_nothing() {
    let Some(url) = super::super::tests::test_database_url() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    data_dir_with_records(&dir).await;
    write_key(&dir.join(KEY_FILE), &KEY_BYTES);
    let db = Connection::open(dir.join(DB_FILE)).unwrap();
    db.execute_batch("UPDATE builds SET id = 'not a uuid'")
        .unwrap();
    drop(db);
    let schema = fresh_schema();
    let source = Source::DataDir {
        dir: dir.clone(),
        key_file: None,
    };
    let err = copy_into(&source, &url, Some(&schema)).await.unwrap_err();
    assert!(format!("{err:#}").contains("bad uuid"), "{err:#}");
    let pg = PgStore::open(&url, 1, Some(&schema)).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orgs")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(n, 0, "the failed copy left records");
}

/// The sessions after the copy: the ended one as it was, the open ones ended as after a
/// restart, all in their arrival order.
async fn sessions_as_copied(pg: &PgStore, before: i64) {
    let pool = pg.pool();
    // The ended session exactly as it was.
    let s = pg
        .get_session(Uuid::parse_str(ENDED).unwrap())
        .await
        .unwrap()
        .unwrap();
    let end = s.end.as_ref().unwrap();
    assert_eq!(
        (s.created_ms, s.updated_ms, end.ended_ms),
        (2000, 2100, 2100)
    );
    assert_eq!(end.reason.as_str(), "completed");
    assert_eq!(end.message.as_deref(), Some("bye"));
    assert_eq!((s.cold_start, s.bot_start_ms), (Some(true), Some(2001)));
    assert_eq!(s.samples.len(), 1);
    assert_eq!(s.node_id, "n1");
    // The open ones as a restart ends them.
    for (id, reason, msg) in [
        (
            LIVE,
            "lost",
            "the instance was gone when the control plane restarted",
        ),
        (
            WAITING,
            "client_never_connected",
            "the server restarted before the websocket client connected (its token is gone)",
        ),
        (
            STOPPING,
            "stopped",
            "the instance was gone when the control plane restarted during its stop",
        ),
    ] {
        let s = pg
            .get_session(Uuid::parse_str(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        let e = s.end.as_ref().unwrap_or_else(|| panic!("{id} left open"));
        assert_eq!(e.reason.as_str(), reason, "{id}");
        assert_eq!(e.message.as_deref(), Some(msg), "{id}");
        assert_eq!(e.completion_status, "HTTP_ERROR");
        assert!(e.ended_ms >= before && s.updated_ms == e.ended_ms, "{id}");
    }
    // Sessions keep their arrival order in PostgreSQL's own `seq`.
    let order: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM sessions ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap();
    let want: Vec<Uuid> = [ENDED, LIVE, WAITING, STOPPING]
        .iter()
        .map(|s| Uuid::parse_str(s).unwrap())
        .collect();
    assert_eq!(order, want);
}

/// Log lines, keys, sealed values, org properties and builds after the copy.
async fn rows_as_copied(pool: &sqlx::PgPool, before: i64) {
    // Log lines keep their seq, and new ones follow them.
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM logs ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(seqs, [5, 9]);
    let next: i64 = sqlx::query_scalar(
        "INSERT INTO logs (org, agent_id, ts_ns, stream, line) \
         VALUES ('acme', $1, 12, 'stdout', 'new') RETURNING seq",
    )
    .bind(Uuid::parse_str(AGENT).unwrap())
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(next > 9, "{next}");
    // Keys, sealed values, org properties, builds.
    let (hash, kind): (Vec<u8>, String) =
        sqlx::query_as("SELECT key_hash, kind FROM api_keys WHERE id = $1")
            .bind(Uuid::parse_str(KEY).unwrap())
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((hash, kind.as_str()), (vec![1u8, 2], "private"));
    // A queued webhook delivery stays queued, with its seq; new ones follow it.
    let d: (i64, String, i64, i64) = sqlx::query_as(
        "SELECT seq, state, attempts, next_attempt_ms FROM webhook_deliveries WHERE id = $1",
    )
    .bind(Uuid::parse_str(DELIVERY).unwrap())
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(d, (3, "pending".to_string(), 1, 2200));
    let next: i64 =
        sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('webhook_deliveries', 'seq'))")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(next > 3, "{next}");
    // The sealed value as it was, and the key opens it.
    let (nonce, ciphertext): (Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT nonce, ciphertext FROM secrets")
            .fetch_one(pool)
            .await
            .unwrap();
    let v = crate::store::SealedValue {
        key: "K".into(),
        nonce,
        ciphertext,
    };
    let cipher = crate::core::secrets::SecretCipher::from_key(&KEY_BYTES);
    assert_eq!(cipher.open(ORG, "set", &v).as_deref(), Ok("v"));
    let props: String = sqlx::query_scalar("SELECT properties FROM orgs WHERE name = 'acme'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(props, "{\"x\":1}");
    let (status, msg, completed): (String, Option<String>, Option<i64>) =
        sqlx::query_as("SELECT status, error_message, completed_ms FROM builds")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert_eq!(
        msg.as_deref(),
        Some(crate::core::builds::STOPPED_DURING_BUILD)
    );
    assert!(completed.unwrap() >= before);
}

/// A backup of a database from before the migrations this binary knows (schema 1, migrated by
/// sqlx then): migrated in memory and copied; the backup itself is left as it was.
#[tokio::test]
async fn a_backup_of_an_older_schema_is_migrated_in_memory_and_left_as_it_was() {
    let Some(url) = super::super::tests::test_database_url() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bk = tmp.path().join("backup");
    std::fs::create_dir_all(&bk).unwrap();
    let db = Connection::open(bk.join(DB_FILE)).unwrap();
    db.execute_batch(include_str!("../../../../migrations/0001_init.sql"))
        .unwrap();
    db.execute_batch(&format!(
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
             installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
             checksum BLOB NOT NULL, execution_time BIGINT NOT NULL);
         INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (1, 'init', TRUE, x'00', 1);
         INSERT INTO orgs (name, verbose_name, created_ms) VALUES ('{ORG}', '{ORG}', 1);
         INSERT INTO agents VALUES ('{AGENT}', '{ORG}', 'a', 'local', 0, 1, '{DEP}', 1, 1, NULL);
         INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, metrics)
             VALUES ('{LIVE}', '{ORG}', '{AGENT}', '{DEP}', 1, 1,
             '{{\"timeseries\": [{{\"t\": 5, \"c\": 10, \"m\": 100}}]}}');"
    ))
    .unwrap();
    drop(db);
    let bytes = std::fs::read(bk.join(DB_FILE)).unwrap();
    let schema = fresh_schema();
    let r = copy_into(&Source::Backup(bk.clone()), &url, Some(&schema))
        .await
        .unwrap();
    assert!(r.schema < migrate::LATEST, "{r:?}");
    assert_eq!(
        (r.ended_sessions, r.sealed, r.key_file.is_none()),
        (1, 0, true)
    );
    assert_eq!(
        std::fs::read(bk.join(DB_FILE)).unwrap(),
        bytes,
        "the backup changed"
    );
    let pg = PgStore::open(&url, 1, Some(&schema)).await.unwrap();
    let s = pg
        .get_session(Uuid::parse_str(LIVE).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.samples.len(), 1, "{s:?}");
    let e = s.end.unwrap();
    assert_eq!(e.reason.as_str(), "lost");
    assert_eq!(
        e.message.as_deref(),
        Some("the control plane restarted before the session was delivered")
    );
}

/// The key is checked against every kind of sealed value, not only secret sets' values: a
/// database whose only sealed value is a webhook endpoint's signing secret (or an org's
/// sealed `dailyApiKey`) refuses another key and takes its own. (Only the `secrets` table was
/// tried, so another key passed, making a database whose webhooks the nodes cannot sign for.)
#[test]
fn the_key_is_checked_against_webhook_secrets_and_org_properties_too() {
    let tmp = tempfile::tempdir().unwrap();
    let (right, wrong) = (tmp.path().join("right.key"), tmp.path().join("wrong.key"));
    write_key(&right, &KEY_BYTES);
    write_key(&wrong, &[9u8; 32]);
    let cipher = crate::core::secrets::SecretCipher::from_key(&KEY_BYTES);

    let mut db = Connection::open_in_memory().unwrap();
    migrate::run_on(&mut db).unwrap();
    let v = cipher.seal(ORG, &format!("webhook:{HOOK}"), "secret", "whsec_x");
    db.execute(
        "INSERT INTO webhook_endpoints VALUES (?1, ?2, 'http://h/', '[\"*\"]', 'd', ?3, ?4, 1)",
        rusqlite::params![HOOK, ORG, v.nonce, v.ciphertext],
    )
    .unwrap();
    check_key(&db, &right).unwrap();
    let err = check_key(&db, &wrong).unwrap_err().to_string();
    assert!(err.contains("webhook signing secrets"), "{err}");

    let mut db = Connection::open_in_memory().unwrap();
    migrate::run_on(&mut db).unwrap();
    let props = serde_json::json!({
        crate::core::orgs::DAILY_API_KEY: crate::core::orgs::sealed_property(
            ORG,
            crate::core::orgs::DAILY_API_KEY,
            "daily-key",
            &cipher,
        )
    });
    db.execute(
        "INSERT INTO orgs VALUES (?1, 'Acme', 1, ?2)",
        rusqlite::params![ORG, props.to_string()],
    )
    .unwrap();
    check_key(&db, &right).unwrap();
    let err = check_key(&db, &wrong).unwrap_err().to_string();
    assert!(err.contains("sealed org properties"), "{err}");
}
