//! The PostgreSQL store (`--database-url`): for several Cattery nodes sharing one database
//! (docs/cluster.md), or an operator who keeps state in PostgreSQL. Driven through sqlx's
//! connection pool; the schema is `migrations/postgres/`, embedded and applied at open (under
//! sqlx's advisory lock, so nodes starting together migrate once). One file per aggregate
//! implements its trait.
//!
//! Each method is one statement or one transaction (READ COMMITTED; the writes that must not
//! race name their rows, e.g. the bound secret set is read `FOR SHARE`).
//!
//! Faults: a database that cannot be reached (down, restarting, network) makes calls fail
//! with [`StoreError::Unavailable`] after at most [`ACQUIRE_TIMEOUT`]; a connection broken by a
//! restart fails its next statement (also `Unavailable`) and is closed by the pool, so the
//! store heals by itself once the database answers again. A full disk (`53100`) is [`StoreError::Full`].

mod agents;
mod instances;
mod keys;
mod logs;
mod nodes;
mod secrets;
mod sessions;
mod webhooks;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::{StoreError, StoreResult};

/// Longest wait for a connection (the database down: the call fails with `Unavailable`).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default pool size per node (`--database-pool-size`).
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// PostgreSQL-backed [`super::Store`]. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

/// The embedded migrations of `migrations/postgres/`.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl PgStore {
    /// Connects to `url` (a `postgres://` URL) with a pool of `pool_size` connections and
    /// brings the schema up to date. With `schema`, every connection works in that schema
    /// (created if missing): tests give each store a fresh one in one database.
    ///
    /// Errors: a bad URL (`Invalid`), the database cannot be reached (`Unavailable`), or a
    /// migration fails (`Invalid`).
    pub async fn open(url: &str, pool_size: u32, schema: Option<&str>) -> StoreResult<Self> {
        // The URL may hold a password: never put it in an error.
        let bad = || StoreError::Invalid("the database URL is not a valid postgres:// URL".into());
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad());
        }
        let mut opts = PgConnectOptions::from_str(url)
            .map_err(|_| bad())?
            .application_name("cattery");
        if let Some(schema) = schema {
            use sqlx::ConnectOptions;
            let mut c = opts.clone().connect().await?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&mut c)
                .await?;
            opts = opts.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before each use (a round trip on every call of the warm start's path):
            // a connection broken by a database restart fails its next statement instead, is
            // closed by the pool, and the call answers 503 like any other while it heals.
            .test_before_acquire(false)
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
            e => StoreError::Invalid(format!("migration failed: {e}")),
        })?;
        Ok(PgStore { pool })
    }

    /// The pool (for the cluster's own tables, see `core::cluster`).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // unique_violation
                Some("23505") => StoreError::Conflict,
                // foreign_key_violation: the caller named something that is not there.
                Some("23503") => StoreError::NotFound,
                // disk_full, insufficient_resources class
                Some("53100") => StoreError::Full(format!("postgres: {e}")),
                // data_corrupted, index_corrupted
                Some("XX001" | "XX002") => StoreError::Invalid(format!("postgres: {e}")),
                _ => StoreError::Unavailable(format!("postgres: {e}")),
            },
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. } => {
                StoreError::Invalid(format!("postgres: {e}"))
            }
            _ => StoreError::Unavailable(format!("postgres: {e}")),
        }
    }
}

/// A JSON text column read back.
fn json_of<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("bad {what}: {e}")))
}

#[cfg(test)]
pub(crate) mod tests;
