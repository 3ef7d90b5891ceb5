//! Schema migrations: the `.sql` files of `crates/cattery/migrations/`, applied in order
//! through `rusqlite_migration` (the version is SQLite's `user_version`).
//!
//! Databases made before this runner kept their migrations in sqlx's `_sqlx_migrations`
//! table; their version is taken from it once. Those earlier binaries still read that ledger
//! and nothing else, so every database this runner migrates gets one that names a version
//! they do not know, which makes them refuse it (see [`mark_sqlx_ledger`]).

use rusqlite_migration::{Migrations, M};

use super::conn::Conn;
use crate::store::{StoreError, StoreResult};

/// Every migration, oldest first. Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/0001_init.sql"),
    include_str!("../../../migrations/0002_opaque_placement_and_samples.sql"),
    include_str!("../../../migrations/0003_stop_intent.sql"),
    include_str!("../../../migrations/0004_nodes.sql"),
    include_str!("../../../migrations/0005_capacity_and_tokens.sql"),
    include_str!("../../../migrations/0006_ownership.sql"),
    include_str!("../../../migrations/0007_webhooks.sql"),
    include_str!("../../../migrations/0008_builds.sql"),
    include_str!("../../../migrations/0009_node_key_check.sql"),
    include_str!("../../../migrations/0010_build_use.sql"),
    include_str!("../../../migrations/0011_node_secret_check.sql"),
    include_str!("../../../migrations/0012_log_counts.sql"),
    include_str!("../../../migrations/0013_session_daily_room.sql"),
];

/// The schema version this binary brings a database to (SQLite's `user_version`).
pub const LATEST: i64 = MIGRATIONS.len() as i64;

/// Refuses a database whose schema version is newer than this binary's: a newer Cattery
/// migrated it, and this one would misread it. The message says what to do.
pub fn refuse_newer(version: i64, path: &std::path::Path) -> anyhow::Result<()> {
    if version > LATEST {
        anyhow::bail!(
            "the database {} has schema version {version}, newer than this cattery {} knows \
             (version {LATEST}): a newer Cattery has used it. Run that newer version, or restore \
             a backup made with this one (`cattery restore`); a downgrade is not supported \
             (docs/operations.md)",
            path.display(),
            crate::build_info::full(),
        );
    }
    Ok(())
}

/// The schema version of the database file at `path` (0 for a new or empty one), read
/// without changing it (read-write without creating: a WAL database may need its `-shm`).
pub fn version_of(path: &std::path::Path) -> anyhow::Result<i64> {
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.pragma_update(None, "query_only", true)?;
    Ok(db.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Brings the database to the latest schema.
///
/// Errors: `Invalid` when the database is newer than this binary or a migration fails.
pub fn run(conn: &mut Conn) -> StoreResult<()> {
    run_on(conn.inner())
}

/// [`run`] on a plain connection (`cattery store copy` brings an older database it reads, a
/// copy in memory, to the latest schema).
pub fn run_on(db: &mut rusqlite::Connection) -> StoreResult<()> {
    adopt_sqlx_ledger(db)?;
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > LATEST {
        return Err(StoreError::Invalid(format!(
            "schema version {version} is newer than this binary's ({LATEST})"
        )));
    }
    let ms: Vec<M<'static>> = MIGRATIONS.iter().map(|sql| M::up(sql)).collect();
    Migrations::new(ms).to_latest(db).map_err(|e| match e {
        rusqlite_migration::Error::RusqliteError { err, .. } => StoreError::from(err),
        e => StoreError::Invalid(format!("migration failed: {e}")),
    })?;
    mark_sqlx_ledger(db)
}

/// sqlx's ledger table, as sqlx (0.8) creates it for SQLite.
const SQLX_LEDGER: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
)";

/// Records the schema version in sqlx's ledger, creating the ledger if needed, so that a
/// Cattery from before this runner (whose sqlx migrator knows migration 1 only and reads
/// nothing but that ledger) refuses the database at start, before it changes anything
/// ("migration N was previously applied but is missing in the resolved migrations"), instead
/// of running on a schema it does not know: it would find every migration it knows applied,
/// start, and fail on the tables migration 2 rewrote (a downgrade is not supported; the
/// binaries of this runner refuse a newer database by its `user_version`, [`refuse_newer`]).
fn mark_sqlx_ledger(db: &rusqlite::Connection) -> StoreResult<()> {
    db.execute_batch(SQLX_LEDGER)?;
    db.execute(
        "INSERT OR IGNORE INTO _sqlx_migrations
             (version, description, success, checksum, execution_time)
         VALUES (?1, ?2, TRUE, x'', 0)",
        rusqlite::params![
            LATEST,
            format!("schema {LATEST} by a newer cattery: a downgrade is not supported"),
        ],
    )?;
    Ok(())
}

/// Sets `user_version` from sqlx's ledger when this database was migrated by sqlx.
fn adopt_sqlx_ledger(db: &rusqlite::Connection) -> StoreResult<()> {
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version != 0 {
        return Ok(());
    }
    let applied = schema_version(db)?;
    if applied > 0 {
        db.pragma_update(None, "user_version", applied)?;
    }
    Ok(())
}

/// The schema version of an open database: its `user_version`, or, for one an earlier
/// Cattery migrated with sqlx (`user_version` 0), the last migration in sqlx's ledger.
pub fn schema_version(db: &rusqlite::Connection) -> rusqlite::Result<i64> {
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let has_ledger: bool = db.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
        [],
        |r| r.get(0),
    )?;
    if version != 0 || !has_ledger {
        return Ok(version);
    }
    db.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success",
        [],
        |r| r.get(0),
    )
}
