//! The store conformance suite on PostgreSQL. Needs a database: `CATTERY_TEST_DATABASE_URL`
//! (`.ci/run` starts a scratch cluster with `scripts/postgres-ci.sh` and sets it). Without it
//! the tests say so and pass, unless `CATTERY_REQUIRE_POSTGRES=1` (CI), when they fail.

use std::sync::Arc;

use super::PgStore;
use crate::store::Store;

/// The test database's URL, or `None` (after saying why) when the tests must skip.
///
/// Panics: no URL while `CATTERY_REQUIRE_POSTGRES=1`.
pub(crate) fn test_database_url() -> Option<String> {
    match std::env::var("CATTERY_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("CATTERY_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "CATTERY_REQUIRE_POSTGRES=1 but CATTERY_TEST_DATABASE_URL is not set"
            );
            eprintln!(
                "skipped: no PostgreSQL (set CATTERY_TEST_DATABASE_URL, e.g. from `scripts/postgres-ci.sh start`)"
            );
            None
        }
    }
}

/// A fresh, empty store: a new schema in the test database.
pub(crate) async fn fresh_store(url: &str) -> PgStore {
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    PgStore::open(url, 4, Some(&schema)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let Some(url) = test_database_url() else {
        return;
    };
    crate::store::conformance::run_all(|| {
        let url = url.clone();
        async move {
            let store = fresh_store(&url).await;
            (
                Box::new(()) as Box<dyn std::any::Any + Send>,
                Arc::new(store) as Arc<dyn Store>,
            )
        }
    })
    .await;
}

/// Per-org limits hold across nodes: creates of one org through two stores on one database
/// (two nodes), at the same moment, admit exactly the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_limits_hold_across_two_nodes() {
    let Some(url) = test_database_url() else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let a = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
    let b = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
    crate::store::conformance::org_limits_across(&[&a, &b]).await;
}

/// The store's transactions run at READ COMMITTED whatever the database's default: with a
/// URL that asks for SERIALIZABLE, a transaction still says `read committed`, and the
/// per-org limits still admit exactly the limit through two nodes (at SERIALIZABLE the
/// concurrent creates failed with serialization errors; at REPEATABLE READ the count, taken
/// before the lock's wait, overshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_read_committed_whatever_the_default() {
    let Some(url) = test_database_url() else {
        return;
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}options[default_transaction_isolation]=serializable");
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let a = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
    let b = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
    let mut tx = a.pool.begin().await.unwrap();
    let level: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(level, "read committed");
    crate::store::conformance::org_limits_across(&[&a, &b]).await;
}

#[tokio::test]
async fn a_bad_url_is_invalid_and_an_unreachable_database_unavailable() {
    use crate::store::StoreError;
    let e = PgStore::open("mysql://x", 1, None).await.unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    // A port nobody listens on: refused at once, reported as unavailable, no password shown.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = PgStore::open(
        &format!("postgres://u:hunter2@127.0.0.1:{port}/db"),
        1,
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(!e.to_string().contains("hunter2"));
    // The reason, not the pool's "timed out".
    assert!(
        e.to_string().contains("cannot connect to the database"),
        "{e}"
    );
    assert!(!e.to_string().contains("timed out"), "{e}");
}

/// Two nodes on one database: a key revoked through one is refused by the other (whose key
/// cache answered it a moment before) within 1 s, and an agent written through one is
/// announced on the other's change feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_through_one_node_reaches_the_other() {
    use crate::model::{ApiKeyRecord, KeyKind};
    use crate::store::{AgentStore, Change, ClusterStore, KeyStore};
    let Some(url) = test_database_url() else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let a = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
    let b = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
    let mut feed = b.watch_changes().await.unwrap().unwrap();
    a.ensure_org("o").await.unwrap();
    let rec = ApiKeyRecord {
        id: uuid::Uuid::new_v4(),
        org: "o".into(),
        kind: KeyKind::Private,
        name: "k".into(),
        prefix: "sk_abc".into(),
        created_ms: 1,
        revoked_ms: None,
        public_key: None,
    };
    let hash = vec![9u8; 32];
    a.insert_key(&rec, &hash, None).await.unwrap();
    // Seen (and kept) by b.
    assert!(b
        .find_key(&hash)
        .await
        .unwrap()
        .unwrap()
        .0
        .revoked_ms
        .is_none());
    assert!(b
        .find_key(&hash)
        .await
        .unwrap()
        .unwrap()
        .0
        .revoked_ms
        .is_none());
    let t0 = std::time::Instant::now();
    assert!(a.revoke_key("o", rec.id).await.unwrap());
    loop {
        if b.find_key(&hash)
            .await
            .unwrap()
            .unwrap()
            .0
            .revoked_ms
            .is_some()
        {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(1),
            "revocation not seen in 1 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // An agent written through a: b's feed names it.
    let (ag, dep) = {
        let id = uuid::Uuid::new_v4();
        let d = uuid::Uuid::new_v4();
        (
            crate::model::AgentRecord {
                id,
                org: "o".into(),
                name: "n".into(),
                region: "local".into(),
                min_agents: 0,
                max_agents: 1,
                desired_deployment_id: d,
                created_ms: 1,
                updated_ms: 1,
                deleted_ms: None,
            },
            crate::model::DeploymentRecord {
                id: d,
                agent_id: id,
                spec: crate::model::DeploymentSpec {
                    command: Some(vec!["/bin/true".into()]),
                    agent_profile: "agent-1x".into(),
                    ..Default::default()
                },
                created_ms: 1,
            },
        )
    };
    a.create_agent(&ag, &dep, None).await.unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        loop {
            if feed.recv().await.unwrap() == Change::Agent(ag.id) {
                break;
            }
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "the agent's change did not reach the other node in 1 s"
    );
}

/// A database a newer Cattery migrated (a migration this binary does not know is recorded)
/// still opens: in a rolling upgrade, a node of the previous version that restarts after the
/// first new node migrated must start (sqlx refuses such a database by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_a_newer_cattery_migrated_still_opens() {
    let Some(url) = test_database_url() else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let store = PgStore::open(&url, 2, Some(&schema)).await.unwrap();
    super::query_dyn(&format!(
        "INSERT INTO \"{schema}\"._sqlx_migrations \
         (version, description, success, checksum, execution_time) \
         VALUES (99999, 'a newer one', true, '\\x00'::bytea, 0)"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    drop(store);
    let again = PgStore::open(&url, 2, Some(&schema)).await.unwrap();
    assert!(crate::store::NodeStore::list_nodes(&again)
        .await
        .unwrap()
        .is_empty());
}

/// A node of the previous version claims a warm instance with the claim function of
/// `migrations/postgres/0008` (eleven arguments, no Daily room) on a database a newer node
/// migrated: in a rolling upgrade both versions claim from one pool, so the old function must
/// stay and promise an instance exactly as the new one does (docs/upgrade.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_versions_warm_claim_works_on_the_migrated_schema() {
    use crate::store::{InstanceStore, SessionStore, StoreError};
    let Some(url) = test_database_url() else {
        return;
    };
    let store = fresh_store(&url).await;
    let a = crate::store::conformance::with_agent(&store, "a", "x").await;
    let inst = crate::model::InstanceRecord {
        id: uuid::Uuid::new_v4(),
        agent_id: a.id,
        deployment_id: a.desired_deployment_id,
        session_id: None,
        runtime: "process".into(),
        placement: serde_json::json!({"pid": 42}),
        created_ms: 5,
        node_id: "old".into(),
    };
    store.put_instance(&inst).await.unwrap();
    // The previous version's call, as it sends it (store/postgres/instances.rs at 7e34ad0).
    let old_sid = uuid::Uuid::new_v4();
    let claimed: bool = sqlx::query_scalar(
        "SELECT cattery_insert_session_for_instance($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(old_sid)
    .bind(&a.org)
    .bind(a.id)
    .bind(a.desired_deployment_id)
    .bind(10_i64)
    .bind(10_i64)
    .bind(None::<i64>)
    .bind(Some(false))
    .bind(Some("webrtc"))
    .bind("old")
    .bind(inst.id)
    .fetch_one(store.pool())
    .await
    .expect("the previous version's claim function is still there");
    assert!(claimed);
    let got = store.get_session(old_sid).await.unwrap().unwrap();
    assert_eq!(got.daily_room, None);
    let rec = store.list_instances().await.unwrap().pop().unwrap();
    assert_eq!(rec.session_id, Some(old_sid));
    // The new claim finds the instance promised, as a second old claim would.
    let mut new = got.clone();
    new.id = uuid::Uuid::new_v4();
    new.node_id = "new".into();
    assert!(matches!(
        store.insert_session_for_instance(&new, inst.id).await,
        Err(StoreError::Conflict)
    ));
}
