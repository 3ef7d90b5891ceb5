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
}
