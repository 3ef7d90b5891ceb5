//! Copies of the database while the server runs: SQLite's online backup API, which copies
//! every page inside one read transaction, so the copy is the database as of one commit (a
//! WAL reader: the server's writes go on meanwhile).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rusqlite::backup::StepResult;
use rusqlite::{Connection, OpenFlags};

use super::migrate;

/// What a copy holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    /// Its schema version (`user_version`).
    pub schema: i64,
    /// Sessions recorded in it.
    pub sessions: i64,
    /// Agents recorded in it (deleted ones included).
    pub agents: i64,
    /// Values sealed with the secrets key in it (secrets, their deployment snapshots, webhook
    /// endpoint secrets): without the key they cannot be opened.
    pub sealed: i64,
}

/// Copies the database `src` (the server's `cattery.db`, which may be in use) to `dst` (a new
/// file) in one consistent step, then checks the copy (`PRAGMA quick_check`). Errors: `src`
/// is missing or not a database, `dst` exists, the copy fails its check.
pub fn copy(src: &Path, dst: &Path) -> anyhow::Result<CopyInfo> {
    if !src.is_file() {
        anyhow::bail!("no database at {}", src.display());
    }
    if dst.exists() {
        anyhow::bail!("{} exists already", dst.display());
    }
    // Read-write (a read-only connection cannot read a WAL database whose `-shm` it may not
    // create), but it writes nothing.
    let from = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", src.display()))?;
    from.busy_timeout(Duration::from_secs(30))?;
    from.pragma_update(None, "query_only", true)?;
    let mut to =
        Connection::open(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    {
        let b = rusqlite::backup::Backup::new(&from, &mut to)?;
        // All pages in one step (-1): one read transaction, so one consistent state. A step
        // that finds the database busy is retried, for up to 30 s.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match b.step(-1).context("online backup")? {
                StepResult::Done => break,
                StepResult::More => {}
                StepResult::Busy | StepResult::Locked => {
                    if std::time::Instant::now() > deadline {
                        anyhow::bail!("online backup: the database stayed locked for 30 s");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {}
            }
        }
    }
    drop(from);
    // A copy that stands alone: no WAL beside it.
    let _: String = to.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
    let info = inspect(&to)?;
    drop(to);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::File::open(dst)?.sync_all()?;
    Ok(info)
}

/// Checks a database file (`PRAGMA quick_check`) and says what it holds; also refuses one
/// whose schema is newer than this binary's.
pub fn verify(path: &Path) -> anyhow::Result<CopyInfo> {
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", path.display()))?;
    let info =
        inspect(&db).with_context(|| format!("{} is not a usable database", path.display()))?;
    migrate::refuse_newer(info.schema, path)?;
    Ok(info)
}

fn inspect(db: &Connection) -> anyhow::Result<CopyInfo> {
    let check: String = db.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        anyhow::bail!("integrity check failed: {check}");
    }
    Ok(CopyInfo {
        schema: migrate::schema_version(db)?,
        sessions: db.query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))?,
        agents: db.query_row("SELECT COUNT(*) FROM agents", [], |r| r.get(0))?,
        sealed: sealed_values(db)?,
    })
}

/// Forgets, in a database about to be restored (`path`, not in use), the instances it records
/// as warm (promised to no session). A backup holds the instances of its moment, and what was
/// warm then may have taken a session since, one the restored database does not know: a
/// server that stopped with `--on-stop detach` leaves it running. Re-adopted from its record,
/// it would go back into the warm pool and be handed a second session in the same process.
/// Forgotten, it is a process no record names, which the next server removes at start; an
/// instance recorded with its session is kept, since it serves that session or is gone.
/// Returns how many were forgotten.
pub fn forget_warm_instances(path: &Path) -> anyhow::Result<usize> {
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", path.display()))?;
    let n = db.execute("DELETE FROM instances WHERE session_id IS NULL", [])?;
    Ok(n)
}

/// How many values sealed with the secrets key the database holds, in the tables of its
/// schema (a backup made by an older Cattery may lack some): secrets, their deployment
/// snapshots, webhook endpoint secrets, and orgs' sealed `dailyApiKey` properties.
pub(crate) fn sealed_values(db: &Connection) -> anyhow::Result<i64> {
    let mut n = 0;
    for (table, filter) in [
        ("secrets", ""),
        ("deployment_secrets", ""),
        ("webhook_endpoints", ""),
        (
            "orgs",
            " WHERE json_type(properties, '$.dailyApiKey') = 'object'",
        ),
    ] {
        let exists: bool = db.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |r| r.get(0),
        )?;
        if exists {
            let sql = format!("SELECT COUNT(*) FROM {table}{filter}");
            n += db.query_row(&sql, [], |r| r.get::<_, i64>(0))?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of an older schema (no webhook tables yet) is still read; its sealed values
    /// are counted from the tables it has.
    #[test]
    fn an_older_schema_is_read_and_its_sealed_values_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("old.db");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(
            "CREATE TABLE sessions (id TEXT); CREATE TABLE agents (id TEXT);
             CREATE TABLE secrets (k TEXT); INSERT INTO secrets VALUES ('a'), ('b');
             CREATE TABLE orgs (name TEXT, properties TEXT);
             INSERT INTO orgs VALUES ('o1', '{\"dailyApiKey\": {\"nonce\": \"n\"}}'),
                 ('o2', '{\"dailyApiKey\": \"plain, from before sealing\"}'), ('o3', '{}');
             PRAGMA user_version = 6;",
        )
        .unwrap();
        drop(db);
        let info = verify(&path).unwrap();
        assert_eq!(
            (info.schema, info.sealed),
            (6, 3),
            "two secrets, one sealed Daily key"
        );
    }

    /// A database an earlier Cattery migrated with sqlx (schema 1 in sqlx's ledger,
    /// `user_version` 0) is reported as schema 1, not 0 (`backup.json`, the command's line).
    #[test]
    fn a_database_migrated_by_sqlx_has_the_ledgers_schema() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sqlx.db");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(include_str!("../../../migrations/0001_init.sql"))
            .unwrap();
        db.execute_batch(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
                 installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
                 checksum BLOB NOT NULL, execution_time BIGINT NOT NULL);
             INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                 VALUES (1, 'init', TRUE, x'00', 1);",
        )
        .unwrap();
        drop(db);
        assert_eq!(verify(&path).unwrap().schema, 1);
    }
}
