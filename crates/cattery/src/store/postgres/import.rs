//! `cattery store copy`: a single node's SQLite records copied into a new PostgreSQL database,
//! so an operator who moves to several nodes (docs/cluster.md, "Moving from SQLite") keeps
//! their orgs, keys, agents, secrets, webhooks, builds and session history.
//!
//! - **Source**: the data dir of a stopped server (its `serve.lock` is taken for the whole
//!   copy, so a server cannot start on it meanwhile; a running one is refused), or a backup
//!   made by `cattery backup`. Read in one read transaction; a database of an older schema is
//!   copied into memory (SQLite's online backup) and migrated there, the source left as is.
//! - **Target**: brought to the current schema by the PostgreSQL store's own migrations, and
//!   refused unless every table is empty. Everything is written in one transaction (its
//!   tables locked against writers first): a failure leaves the target as it was.
//! - **What**: every table in [`COPIED`], column by column, each value converted to the type
//!   the PostgreSQL schema gives it (UUIDs, booleans, bytes) and free text in the stored form
//!   both stores write ([`crate::store::codec::storable_text`]); ids, timestamps, states and
//!   the `seq` of log lines and webhook deliveries as they were. Rows go in their SQLite
//!   order, so PostgreSQL's own `seq` columns keep the arrival order. [`SKIPPED`] says why each
//!   other table is left out (they belong to the old server's processes).
//! - **Left open by the old server**: a session not ended is ended as a restarted server ends
//!   one whose instance is gone ([`crate::core::session::lost_end`], through the store's own
//!   end statements); a build still pending or building ends `failed`, as a restarted server
//!   records it ([`crate::core::builds::STOPPED_DURING_BUILD`]). Queued webhook deliveries are
//!   copied as queued: the new nodes deliver them.
//!
//! Sealed values (secrets, deployment snapshots, webhook signing secrets, sealed org
//! properties) are copied as they are: they open with the source's secrets key, which every
//! new node must be given as `--secrets-key-file` (docs/secrets.md). The copy checks that the
//! key file is one a node accepts and that it opens one sealed value of each kind (each
//! dropped unseen);
//! the key is never printed or written to the database.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::PgStore;
use crate::core::secrets::KEY_FILE;
use crate::store::sqlite::{backup, migrate, DB_FILE};

/// The tables copied, in an order that satisfies the foreign keys.
pub const COPIED: &[&str] = &[
    "orgs",
    "api_keys",
    "agents",
    "deployments",
    "secret_sets",
    "secrets",
    "deployment_secrets",
    "sessions",
    "logs",
    "webhook_endpoints",
    "webhook_deliveries",
    "builds",
];

/// The SQLite tables deliberately not copied, and why.
pub const SKIPPED: &[(&str, &str)] = &[
    (
        "log_counts",
        "each org's number of log lines: PostgreSQL counts the copied lines itself (its triggers)",
    ),
    (
        "instances",
        "the old server's processes and containers, gone with it",
    ),
    (
        "capacity_slots",
        "held by the old server's instances; the new nodes count their own",
    ),
    (
        "ws_tokens",
        "single-use websocket tokens of the old server's sessions, which are over",
    ),
    (
        "nodes",
        "the old server's heartbeat; the new nodes record their own",
    ),
    (
        "_sqlx_migrations",
        "the migration ledger of an old SQLite database (PostgreSQL keeps its own)",
    ),
];

/// Rows read and written at a time (fewer for wide tables: PostgreSQL binds at most 65,535
/// values per statement).
const BATCH_VALUES: usize = 30_000;
const BATCH_ROWS: usize = 1_000;

/// Where the records come from.
pub enum Source {
    /// The data dir of a stopped server, and its secrets key file when it is not
    /// `<dir>/secrets.key`.
    DataDir {
        dir: PathBuf,
        key_file: Option<PathBuf>,
    },
    /// A directory made by `cattery backup` (its `secrets.key` beside the database).
    Backup(PathBuf),
}

impl Source {
    fn dir(&self) -> &Path {
        match self {
            Source::DataDir { dir, .. } | Source::Backup(dir) => dir,
        }
    }

    /// The secrets key file that opens the source's sealed values.
    pub fn key_file(&self) -> PathBuf {
        match self {
            Source::DataDir {
                key_file: Some(k), ..
            } => k.clone(),
            _ => self.dir().join(KEY_FILE),
        }
    }
}

/// What a copy did.
#[derive(Debug)]
pub struct Report {
    /// The source's schema version (SQLite's `user_version`).
    pub schema: i64,
    /// Rows copied per table, in [`COPIED`] order.
    pub tables: Vec<(&'static str, u64)>,
    /// Sessions the old server left open, recorded as ended.
    pub ended_sessions: u64,
    /// Builds the old server left running, recorded as failed.
    pub failed_builds: u64,
    /// Values sealed with the secrets key among the copied records.
    pub sealed: i64,
    /// The key file that opens them (`None`: there is none, and nothing is sealed).
    pub key_file: Option<PathBuf>,
}

/// Copies `source` into the PostgreSQL database at `url` (see the module's doc). Errors: a
/// server runs on the source's data dir; the source is not a Cattery database, or its schema
/// is newer than this binary's; it holds sealed values but no key opens them; the target
/// cannot be reached or migrated, or already holds records; a copy fails (nothing written).
pub async fn copy(source: &Source, url: &str) -> anyhow::Result<Report> {
    copy_into(source, url, None).await
}

/// [`copy`] into `schema` of the database (tests give each copy a fresh one).
pub(crate) async fn copy_into(
    source: &Source,
    url: &str,
    schema: Option<&str>,
) -> anyhow::Result<Report> {
    let dir = source.dir();
    let db_path = dir.join(DB_FILE);
    if !db_path.is_file() {
        bail!(
            "{} is not a Cattery {} (no {DB_FILE})",
            dir.display(),
            match source {
                Source::DataDir { .. } => "data dir",
                Source::Backup(_) => "backup",
            }
        );
    }
    // Held until the copy is committed: no server starts on the data dir meanwhile.
    let _lock = match source {
        Source::DataDir { dir, .. } => Some(lock_stopped(dir)?),
        Source::Backup(_) => None,
    };
    let (db, schema_version) = open_source(&db_path)?;
    check_tables(&db)?;
    let sealed = backup::sealed_values(&db)?;
    let key = source.key_file();
    let key_file = key.is_file().then_some(key.clone());
    if sealed > 0 && key_file.is_none() {
        bail!(
            "the database holds {sealed} sealed secret value(s) but there is no secrets key at \
             {}: the copied values could not be opened; give the server's --secrets-key-file",
            key.display()
        );
    }
    if let Some(k) = &key_file {
        check_key(&db, k)?;
    }

    let store = PgStore::open(url, 1, schema)
        .await
        .map_err(|e| anyhow::anyhow!("the target database: {e}"))?;
    let mut tx = store.pool().begin().await?;
    let target = target_tables(&mut tx).await?;
    refuse_non_empty(&mut tx, &target).await?;
    let columns = target_columns(&mut tx).await?;

    db.execute_batch("BEGIN")?;
    let mut tables = Vec::with_capacity(COPIED.len());
    for &table in COPIED {
        let n = copy_table(&db, &mut tx, table, &columns)
            .await
            .with_context(|| format!("copying table {table}"))?;
        tables.push((table, n));
    }
    db.execute_batch("COMMIT")?;
    drop(db);

    let now = crate::model::now_ms();
    let ended_sessions = end_open_sessions(&mut tx, now).await?;
    let failed_builds = fail_unfinished_builds(&mut tx, now).await?;
    tx.commit().await?;
    Ok(Report {
        schema: schema_version,
        tables,
        ended_sessions,
        failed_builds,
        sealed,
        key_file,
    })
}

/// Takes the data dir's server lock (`serve.lock`, as `cattery serve` does). Errors: a server
/// holds it.
fn lock_stopped(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let f = crate::serve::open_lock_file(dir)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "a cattery serve is using {}: stop it first (the copy must see its last state, and \
             the server must not go on writing to SQLite once the copy is made)",
            dir.display()
        )
    })
}

/// The source database, read-only, at the latest schema: the file itself when it is, else a
/// migrated copy in memory. Returns it with its schema version.
fn open_source(path: &Path) -> anyhow::Result<(Connection, i64)> {
    // Read-write without create (a WAL database may need its `-shm`), but it writes nothing.
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", path.display()))?;
    db.busy_timeout(Duration::from_secs(30))?;
    db.pragma_update(None, "query_only", true)?;
    let check: String = db
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .with_context(|| format!("{} is not a usable database", path.display()))?;
    if check != "ok" {
        bail!("{}: integrity check failed: {check}", path.display());
    }
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    migrate::refuse_newer(version, path)?;
    if version == migrate::LATEST {
        return Ok((db, version));
    }
    let mut mem = Connection::open_in_memory()?;
    {
        let b = rusqlite::backup::Backup::new(&db, &mut mem)?;
        // All pages in one step: one read transaction, so one consistent state.
        b.run_to_completion(i32::MAX, Duration::from_millis(50), None)
            .context("reading the database")?;
    }
    migrate::run_on(&mut mem).map_err(|e| anyhow::anyhow!("migrating a copy in memory: {e}"))?;
    mem.pragma_update(None, "query_only", true)?;
    Ok((mem, version))
}

/// Checks that the key file is one the nodes accept as `--secrets-key-file` (32 bytes, mode
/// 0600) and that it opens the source's sealed values: the first of each kind is tried (a
/// secret set's value, a deployment's snapshot of one, a webhook endpoint's signing secret,
/// an org's sealed `dailyApiKey`), each value dropped unseen. Errors: it does not, with what
/// to do.
fn check_key(db: &Connection, path: &Path) -> anyhow::Result<()> {
    let cipher = crate::core::secrets::SecretCipher::load_file(path)?;
    for (what, (org, set, v)) in first_sealed_values(db)? {
        if cipher.open(&org, &set, &v).is_err() {
            bail!(
                "the secrets key in {} does not open the database's {what}: it is not the key \
                 they were sealed with; give the server's own --secrets-key-file",
                path.display()
            );
        }
    }
    Ok(())
}

/// The first sealed value of each kind the source holds, as `(what, (org, set, value))`
/// ready for [`crate::core::secrets::SecretCipher::open`] (the contexts `core::webhooks` and
/// `core::orgs` seal them for).
#[allow(clippy::type_complexity)]
fn first_sealed_values(
    db: &Connection,
) -> anyhow::Result<Vec<(&'static str, (String, String, crate::store::SealedValue))>> {
    use base64::Engine;
    let sealed = |key: String, nonce: Vec<u8>, ciphertext: Vec<u8>| crate::store::SealedValue {
        key,
        nonce,
        ciphertext,
    };
    let mut out = Vec::new();
    for (what, sql) in [
        (
            "secret values",
            "SELECT org, set_name, key, nonce, ciphertext FROM secrets LIMIT 1",
        ),
        (
            "deployments' secret values",
            "SELECT org, set_name, key, nonce, ciphertext FROM deployment_secrets LIMIT 1",
        ),
        (
            "webhook signing secrets",
            "SELECT org, 'webhook:' || id, 'secret', nonce, ciphertext FROM webhook_endpoints \
             LIMIT 1",
        ),
    ] {
        let row = db
            .query_row(sql, [], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    sealed(r.get(2)?, r.get(3)?, r.get(4)?),
                ))
            })
            .optional()?;
        out.extend(row.map(|r| (what, r)));
    }
    let org = db
        .query_row(
            "SELECT name, json_extract(properties, '$.dailyApiKey.nonce'), \
             json_extract(properties, '$.dailyApiKey.ciphertext') FROM orgs \
             WHERE json_type(properties, '$.dailyApiKey') = 'object' LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            },
        )
        .optional()?;
    if let Some((name, nonce, ciphertext)) = org {
        let b64 = |s: Option<String>| {
            base64::engine::general_purpose::STANDARD
                .decode(s.unwrap_or_default())
                .unwrap_or_default()
        };
        out.push((
            "sealed org properties",
            (
                name,
                crate::core::orgs::SEALED_PROPERTIES.to_string(),
                sealed(
                    crate::core::orgs::DAILY_API_KEY.to_string(),
                    b64(nonce),
                    b64(ciphertext),
                ),
            ),
        ));
    }
    Ok(out)
}

/// The source's tables (SQLite's own left out).
fn source_tables(db: &Connection) -> anyhow::Result<Vec<String>> {
    let mut st = db.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         ORDER BY name",
    )?;
    let names = st
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(names)
}

/// Refuses a source with a table that is neither copied nor skipped (a newer schema this
/// binary does not know would be refused before; this is the guard for the lists).
fn check_tables(db: &Connection) -> anyhow::Result<()> {
    let known: HashSet<&str> = COPIED
        .iter()
        .copied()
        .chain(SKIPPED.iter().map(|(t, _)| *t))
        .collect();
    let unknown: Vec<String> = source_tables(db)?
        .into_iter()
        .filter(|t| !known.contains(t.as_str()))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "the database has table(s) this copy does not know: {}",
            unknown.join(", ")
        );
    }
    Ok(())
}

/// The target's tables (the migration ledger left out).
async fn target_tables(db: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' \
         AND table_name <> '_sqlx_migrations' ORDER BY table_name",
    )
    .fetch_all(db)
    .await?;
    Ok(names)
}

/// Locks the target's tables against writers until the copy commits, and refuses it unless
/// every one is empty.
async fn refuse_non_empty(db: &mut PgConnection, tables: &[String]) -> anyhow::Result<()> {
    let quoted: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
    super::query_dyn("SET LOCAL lock_timeout = '10s'")
        .execute(&mut *db)
        .await?;
    super::query_dyn(&format!(
        "LOCK TABLE {} IN EXCLUSIVE MODE",
        quoted.join(", ")
    ))
    .execute(&mut *db)
    .await
    .context("locking the target's tables (is a node running on it?)")?;
    let mut held = Vec::new();
    for (t, q) in tables.iter().zip(&quoted) {
        let any: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {q})"
        )))
        .fetch_one(&mut *db)
        .await?;
        if any {
            held.push(t.as_str());
        }
    }
    if !held.is_empty() {
        bail!(
            "the target database already holds records (in {}): a copy goes only into a new, \
             empty database; nothing was written",
            held.join(", ")
        );
    }
    Ok(())
}

/// A target column: its type and whether PostgreSQL generates it (identity or serial).
struct PgColumn {
    ty: String,
    generated: bool,
}

/// The target's columns, by table and name.
async fn target_columns(
    db: &mut PgConnection,
) -> anyhow::Result<HashMap<(String, String), PgColumn>> {
    let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, \
         (is_identity = 'YES' OR COALESCE(column_default, '') LIKE 'nextval(%') \
         FROM information_schema.columns WHERE table_schema = current_schema()",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(t, c, ty, generated)| ((t, c), PgColumn { ty, generated }))
        .collect())
}

/// A value converted for its target column.
enum PgVal {
    Uuid(Option<Uuid>),
    Int(Option<i64>),
    Bool(Option<bool>),
    Bytes(Option<Vec<u8>>),
    Text(Option<String>),
}

/// A SQLite value as the PostgreSQL store would have written it into a column of type `ty`.
fn convert(v: Value, ty: &str) -> anyhow::Result<PgVal> {
    let bad = |v: &Value| anyhow::anyhow!("a {:?} value where {ty} is expected", v.data_type());
    Ok(match (ty, v) {
        ("uuid", Value::Null) => PgVal::Uuid(None),
        ("uuid", Value::Text(s)) => PgVal::Uuid(Some(
            Uuid::parse_str(&s).with_context(|| format!("bad uuid {s:?}"))?,
        )),
        ("bigint", Value::Null) => PgVal::Int(None),
        ("bigint", Value::Integer(i)) => PgVal::Int(Some(i)),
        ("boolean", Value::Null) => PgVal::Bool(None),
        ("boolean", Value::Integer(i)) => PgVal::Bool(Some(i != 0)),
        ("bytea", Value::Null) => PgVal::Bytes(None),
        ("bytea", Value::Blob(b)) => PgVal::Bytes(Some(b)),
        ("bytea", Value::Text(s)) => PgVal::Bytes(Some(s.into_bytes())),
        ("text", Value::Null) => PgVal::Text(None),
        ("text", Value::Text(s)) => {
            PgVal::Text(Some(crate::store::codec::storable_text(&s).into_owned()))
        }
        ("text", Value::Integer(i)) => PgVal::Text(Some(i.to_string())),
        ("uuid" | "bigint" | "boolean" | "bytea" | "text", v) => return Err(bad(&v)),
        (other, _) => bail!("column type {other} is not supported by the copy"),
    })
}

/// Copies one table, in SQLite's row order; returns how many rows.
async fn copy_table(
    src: &Connection,
    dst: &mut PgConnection,
    table: &str,
    target: &HashMap<(String, String), PgColumn>,
) -> anyhow::Result<u64> {
    let cols: Vec<String> = {
        let mut st = src.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        let v = st
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        v
    };
    let mut types = Vec::with_capacity(cols.len());
    let mut overriding = false;
    for c in &cols {
        let Some(pc) = target.get(&(table.to_string(), c.clone())) else {
            bail!("column {table}.{c} has no place in the PostgreSQL schema");
        };
        overriding |= pc.generated;
        types.push(pc.ty.clone());
    }
    let list = cols
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let select =
        format!("SELECT rowid, {list} FROM \"{table}\" WHERE rowid > ?1 ORDER BY rowid LIMIT ?2");
    let batch = (BATCH_VALUES / cols.len().max(1)).clamp(1, BATCH_ROWS);
    let mut st = src.prepare(&select)?;
    let mut after = i64::MIN;
    let mut copied = 0u64;
    loop {
        let mut rows: Vec<Vec<PgVal>> = Vec::with_capacity(batch);
        let mut q = st.query(rusqlite::params![after, batch as i64])?;
        while let Some(r) = q.next()? {
            after = r.get(0)?;
            let mut row = Vec::with_capacity(cols.len());
            for (i, ty) in types.iter().enumerate() {
                let v: Value = r.get(i + 1)?;
                row.push(convert(v, ty).with_context(|| format!("column {}", cols[i]))?);
            }
            rows.push(row);
        }
        if rows.is_empty() {
            break;
        }
        copied += rows.len() as u64;
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "INSERT INTO \"{table}\" ({list}){} ",
            if overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            }
        ));
        qb.push_values(rows, |mut b, row| {
            for v in row {
                match v {
                    PgVal::Uuid(x) => b.push_bind(x),
                    PgVal::Int(x) => b.push_bind(x),
                    PgVal::Bool(x) => b.push_bind(x),
                    PgVal::Bytes(x) => b.push_bind(x),
                    PgVal::Text(x) => b.push_bind(x),
                };
            }
        });
        qb.build().execute(&mut *dst).await?;
    }
    // A copied `seq` (log lines, webhook deliveries): the next one PostgreSQL generates
    // follows the copied ones.
    for c in &cols {
        if target[&(table.to_string(), c.clone())].generated {
            super::query_dyn(&format!(
                "SELECT setval(pg_get_serial_sequence('\"{table}\"', '{c}'), MAX(\"{c}\")) \
                 FROM \"{table}\" HAVING MAX(\"{c}\") IS NOT NULL"
            ))
            .execute(&mut *dst)
            .await?;
        }
    }
    Ok(copied)
}

/// Ends the sessions the old server left open, as its own restart would have
/// ([`crate::core::session::lost_end`]); returns how many.
async fn end_open_sessions(db: &mut PgConnection, now: i64) -> anyhow::Result<u64> {
    type Open = (Uuid, Option<bool>, Option<i64>, Option<String>, Option<i64>);
    let open: Vec<Open> = sqlx::query_as(
        "SELECT id, cold_start, bot_start_ms, transport, stop_deadline_ms FROM sessions \
         WHERE ended_ms IS NULL ORDER BY seq",
    )
    .fetch_all(&mut *db)
    .await?;
    let mut n = 0;
    for (id, cold_start, bot_start_ms, transport, stop_deadline) in open {
        let waiting = cold_start.is_none()
            && bot_start_ms.is_none()
            && transport.as_deref() == Some("websocket");
        let end = crate::core::session::lost_end(
            waiting,
            stop_deadline.is_some(),
            bot_start_ms.is_some(),
            now,
        );
        let wrote = if waiting {
            super::sessions::end_waiting_session(&mut *db, id, &end).await?
        } else {
            super::sessions::end_session(&mut *db, id, &end).await?
        };
        n += u64::from(wrote);
    }
    Ok(n)
}

/// Records the builds the old server left pending or building as failed, as its own restart
/// would have ([`crate::core::builds::next`] with a `Fail`); returns how many.
async fn fail_unfinished_builds(db: &mut PgConnection, now: i64) -> anyhow::Result<u64> {
    let n = sqlx::query(
        "UPDATE builds SET status = 'failed', error_message = $1, completed_ms = $2, \
         updated_ms = $2 WHERE status IN ('pending', 'building')",
    )
    .bind(crate::core::builds::STOPPED_DURING_BUILD)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n)
}

#[cfg(test)]
mod tests;
