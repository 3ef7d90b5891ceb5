//! The PostgreSQL store (`--database-url`): for several Cattery nodes sharing one database
//! (docs/cluster.md), or an operator who keeps state in PostgreSQL. Driven through sqlx's
//! connection pool; the schema is `migrations/postgres/`, embedded and applied at open (under
//! sqlx's advisory lock, so nodes starting together migrate once). One file per aggregate
//! implements its trait.
//!
//! Each method is one statement or one transaction (READ COMMITTED; the writes that must not
//! race name their rows, e.g. the bound secret set is read `FOR SHARE`, and a create under a
//! per-org limit takes an advisory lock on its org and kind before it counts).
//!
//! Faults: a database that cannot be reached (down, restarting, network) makes calls fail
//! with [`StoreError::Unavailable`] after at most [`ACQUIRE_TIMEOUT`]; a connection broken by a
//! restart fails its next statement (also `Unavailable`) and is closed by the pool, unless it
//! sat idle for [`PING_IF_IDLE_FOR`] (then a ping finds it broken first), so the store heals
//! by itself once the database answers again. A full disk (`53100`) is [`StoreError::Full`].

mod agents;
mod builds;
mod cluster;
pub mod import;
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
use sqlx::{PgConnection, PgPool};

use super::{StoreError, StoreResult};

/// Longest wait for a connection (the database down: the call fails with `Unavailable`).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// A pooled connection idle for this long is pinged before use (see `open`).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);
/// Default pool size per node (`--database-pool-size`).
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// PostgreSQL-backed [`super::Store`]. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    keys: std::sync::Arc<KeyCache>,
}

/// Longest time a found API key is answered from memory (docs/cluster.md).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Live API keys found recently, so a request's key check costs no round trip. Used only
/// while this store's change feed listens ([`super::ClusterStore::watch_changes`]): any key
/// written anywhere (a revocation through another node or `cattery keys revoke`) clears it
/// when its notification arrives, and an entry is never older than [`KEY_CACHE_TTL`] either.
#[derive(Default)]
pub(crate) struct KeyCache {
    enabled: std::sync::atomic::AtomicBool,
    /// Entries by key hash, and the generation (bumped by every clear).
    map: parking_lot::Mutex<(u64, std::collections::HashMap<Vec<u8>, CachedKey>)>,
}

type CachedKey = (std::time::Instant, crate::model::ApiKeyRecord, Vec<u8>);

impl KeyCache {
    /// Entries beyond this clear the cache (bounded memory).
    const MAX: usize = 10_000;

    /// A live key found less than [`KEY_CACHE_TTL`] ago.
    fn get(&self, hash: &[u8]) -> Option<(crate::model::ApiKeyRecord, Vec<u8>)> {
        use std::sync::atomic::Ordering;
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let m = self.map.lock();
        m.1.get(hash)
            .filter(|(at, _, _)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(_, r, h)| (r.clone(), h.clone()))
    }

    /// The generation before a read from the database.
    fn generation(&self) -> u64 {
        self.map.lock().0
    }

    /// Keeps a live key read at generation `gen`, unless a clear came meanwhile.
    fn put(&self, gen: u64, hash: &[u8], rec: &crate::model::ApiKeyRecord, stored: &[u8]) {
        use std::sync::atomic::Ordering;
        if !self.enabled.load(Ordering::SeqCst) || rec.revoked_ms.is_some() {
            return;
        }
        let mut m = self.map.lock();
        if m.0 != gen {
            return;
        }
        if m.1.len() >= Self::MAX {
            m.1.clear();
        }
        m.1.insert(
            hash.to_vec(),
            (std::time::Instant::now(), rec.clone(), stored.to_vec()),
        );
    }

    /// Forgets every entry.
    pub(crate) fn clear(&self) {
        let mut m = self.map.lock();
        m.0 += 1;
        m.1.clear();
    }

    /// Turns the cache on (the change feed listens) or off (it lost its connection).
    pub(crate) fn enable(&self, on: bool) {
        self.enabled.store(on, std::sync::atomic::Ordering::SeqCst);
        self.clear();
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

/// The embedded migrations of `migrations/postgres/`. Migrations a newer Cattery applied
/// are not held against this one (sqlx refuses them by default): they are additive, and in a
/// rolling upgrade a node of the previous version that restarts after the first new node
/// migrated must still start (docs/cluster.md, "Rolling upgrade").
fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("migrations/postgres");
    m.set_ignore_missing(true);
    m
}

impl PgStore {
    /// Connects to `url` (a `postgres://` URL) with a pool of `pool_size` connections and
    /// brings the schema up to date. With `schema`, every connection works in that schema
    /// (created if missing): tests give each store a fresh one in one database.
    ///
    /// Errors: a bad URL (`Invalid`), the database cannot be reached (`Unavailable`), or a
    /// migration fails (`Invalid`).
    pub async fn open(url: &str, pool_size: u32, schema: Option<&str>) -> StoreResult<Self> {
        Self::open_as(url, pool_size, schema, None).await
    }

    /// [`PgStore::open`] for node `node`: every connection names it (the `cattery.node`
    /// setting), so that the session changes it writes are announced as this node's
    /// (`migrations/postgres/0012`) and its own change feed can leave them out.
    ///
    /// Errors: as [`PgStore::open`].
    pub async fn open_as(
        url: &str,
        pool_size: u32,
        schema: Option<&str>,
        node: Option<&str>,
    ) -> StoreResult<Self> {
        // The URL may hold a password: never put it in an error.
        let bad = || StoreError::Invalid("the database URL is not a valid postgres:// URL".into());
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad());
        }
        // Every transaction here is written for READ COMMITTED (each statement sees what
        // committed before it: the per-org limits count after their advisory lock, for one),
        // so a database, role or URL that defaults to another level does not apply to ours.
        let mut opts = PgConnectOptions::from_str(url)
            .map_err(|_| bad())?
            .application_name("cattery")
            .options([("default_transaction_isolation", "read committed")]);
        if let Some(schema) = schema {
            use sqlx::ConnectOptions;
            let mut c = opts.clone().connect().await?;
            query_dyn(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&mut c)
                .await?;
            opts = opts.options([("search_path", schema)]);
        }
        if let Some(node) = node {
            opts = opts.options([("cattery.node", node)]);
        }
        // One connection first, alone: the pool would report any failure to connect as a
        // timeout ("pool timed out while waiting for an open connection"), where this gives
        // the reason (refused, no such database, authentication).
        // Like the pool, it tries again for up to ACQUIRE_TIMEOUT while the database refuses
        // connections or is starting up.
        {
            use sqlx::{ConnectOptions, Connection};
            let began = std::time::Instant::now();
            let fail = |why: String| {
                StoreError::Unavailable(format!("cannot connect to the database: {why}"))
            };
            loop {
                let left = ACQUIRE_TIMEOUT.saturating_sub(began.elapsed());
                match tokio::time::timeout(left, opts.connect()).await {
                    Ok(Ok(c)) => {
                        let _ = c.close().await;
                        break;
                    }
                    Ok(Err(e)) => {
                        let again = match &e {
                            sqlx::Error::Io(_) => true,
                            // cannot_connect_now: starting up or shutting down
                            sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
                            _ => false,
                        };
                        if again && began.elapsed() + Duration::from_millis(100) < ACQUIRE_TIMEOUT {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        return Err(fail(match &e {
                            // The server's own words, without the source line sqlx appends.
                            sqlx::Error::Database(db) => db.message().to_string(),
                            e => e.to_string(),
                        }));
                    }
                    Err(_) => {
                        return Err(fail(format!("no answer within {ACQUIRE_TIMEOUT:?}")));
                    }
                }
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before each use (a round trip on every call of the warm start's path):
            // a connection broken by a database restart fails its next statement instead, is
            // closed by the pool, and the call answers 503 like any other while it heals.
            .test_before_acquire(false)
            // ...except a connection idle for a while: a database restart breaks every pooled
            // connection, and an idle node (a heartbeat every few seconds) would otherwise fail
            // one call per broken connection, for longer than the node timeout, and be taken
            // over although it lives. A busy path reuses its connections within milliseconds.
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    use sqlx::Connection;
                    Ok(meta.idle_for < PING_IF_IDLE_FOR || conn.ping().await.is_ok())
                })
            })
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_with(opts)
            .await?;
        migrator().run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
            e => StoreError::Invalid(format!("migration failed: {e}")),
        })?;
        Ok(PgStore {
            pool,
            keys: std::sync::Arc::default(),
        })
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

/// A statement whose text is put together at run time from this module's own constants
/// (column lists, filters with `$n` placeholders): never from a caller's input, whose values
/// are always bound.
pub(crate) fn query_dyn(
    sql: &str,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
}

/// What a per-org limit counts ([`super::KeyStore::insert_key`], [`super::AgentStore::create_agent`],
/// [`super::SecretStore::upsert_secret_set`], [`super::BuildStore::insert_build`] given a
/// limit).
#[derive(Debug, Clone, Copy)]
enum Limited {
    Agents,
    ApiKeys,
    SecretSets,
    Builds,
}

impl Limited {
    /// The first key of the kind's advisory locks (the second is the org's hash): arbitrary,
    /// distinct values ("Cat" and a number), unlikely to be another user's of the database.
    /// The two-key form never meets sqlx's migration lock, which takes the one-key form.
    fn lock_class(self) -> i32 {
        match self {
            Limited::Agents => 0x4361_7401,
            Limited::ApiKeys => 0x4361_7402,
            Limited::SecretSets => 0x4361_7403,
            Limited::Builds => 0x4361_7404,
        }
    }

    /// Counts an org's records of the kind (`$1`: the org), through the index on `org`.
    fn count_sql(self) -> &'static str {
        match self {
            Limited::Agents => "SELECT count(*) FROM agents WHERE org = $1 AND deleted_ms IS NULL",
            Limited::ApiKeys => {
                "SELECT count(*) FROM api_keys WHERE org = $1 AND revoked_ms IS NULL"
            }
            Limited::SecretSets => "SELECT count(*) FROM secret_sets WHERE org = $1",
            Limited::Builds => "SELECT count(*) FROM builds WHERE org = $1",
        }
    }
}

/// Serializes the limited creates of `org`'s records of one kind, from here to the end of the
/// transaction `db` is in, across every node: a transaction-scoped advisory lock on (kind,
/// hash of the org), released by the commit or rollback. A second create of that org and kind
/// waits here until the first one's transaction is over; its count (a later statement, so a
/// fresh READ COMMITTED snapshot) then sees the first one's insert.
///
/// Why an advisory lock rather than `SELECT ... FOR UPDATE` of the org's row: every insert into
/// `agents`, `api_keys` and `secret_sets` checks its foreign key with `FOR KEY SHARE` on that
/// row, which `FOR UPDATE` blocks, so the row lock would serialize all of an org's writes of
/// every kind (and its property changes) instead of one kind's creates; the advisory lock
/// needs no row and names just the org and kind. Two orgs whose names hash alike share a lock,
/// which only makes one wait for the other.
async fn lock_org_creates(db: &mut PgConnection, kind: Limited, org: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(kind.lock_class())
        .bind(org)
        .execute(&mut *db)
        .await?;
    Ok(())
}

/// A limited create's count, inside its transaction after [`lock_org_creates`]. Errors:
/// `LimitReached` when `org` holds `limit` or more records of the kind.
async fn within_limit(
    db: &mut PgConnection,
    kind: Limited,
    org: &str,
    limit: u32,
) -> StoreResult<()> {
    let n: i64 = sqlx::query_scalar(kind.count_sql())
        .bind(org)
        .fetch_one(&mut *db)
        .await?;
    if n >= i64::from(limit) {
        return Err(StoreError::LimitReached);
    }
    Ok(())
}

/// A JSON text column read back.
fn json_of<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("bad {what}: {e}")))
}

#[cfg(test)]
pub(crate) mod tests;
