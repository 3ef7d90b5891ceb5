//! One SQLite connection driven through `rusqlite` on the calling thread, with its statements
//! prepared once (`prepare_cached`), and the mapping of SQLite's errors to [`StoreError`].

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{ErrorCode, OpenFlags, ToSql};
use uuid::Uuid;

use crate::store::{StoreError, StoreResult};

/// Prepared statements kept per connection (the store uses a few dozen shapes).
const STATEMENT_CACHE: usize = 64;
/// Bytes of the database file that connections map into memory: none. In WAL mode a
/// connection whose database another connection has written since its last read drops its
/// page cache, and with a mapping it also unmaps the whole file (`munmap`, with a TLB
/// shootdown on every core the server's threads ran on) and maps it again at its next read.
/// Under steady writes that is every read transaction (the key check of every API request):
/// about 4 % of the server's CPU in churn, against a few `pread`s of B-tree pages without it.
const MMAP_SIZE: &str = "0";
/// How long a statement waits for another connection's write lock (another process, e.g.
/// `cattery keys`; within the server only one connection writes).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A value bound to a statement parameter.
pub enum Val<'a> {
    /// NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Borrowed text.
    Text(&'a str),
    /// Owned text.
    Str(String),
    /// An id as its text (lowercase, hyphenated), encoded without allocating.
    Id([u8; uuid::fmt::Hyphenated::LENGTH]),
    /// Bytes.
    Blob(&'a [u8]),
}

impl ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Val::Null => ValueRef::Null,
            Val::Int(v) => ValueRef::Integer(*v),
            Val::Text(t) => ValueRef::Text(t.as_bytes()),
            Val::Str(t) => ValueRef::Text(t.as_bytes()),
            Val::Id(b) => ValueRef::Text(b),
            Val::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl From<i64> for Val<'_> {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

impl From<bool> for Val<'_> {
    fn from(v: bool) -> Self {
        Val::Int(i64::from(v))
    }
}

impl<'a> From<&'a str> for Val<'a> {
    fn from(v: &'a str) -> Self {
        Val::Text(v)
    }
}

impl<'a> From<&'a String> for Val<'a> {
    fn from(v: &'a String) -> Self {
        Val::Text(v)
    }
}

impl From<Uuid> for Val<'_> {
    fn from(v: Uuid) -> Self {
        // The same text as `to_string()`, without the formatter and the allocation (ids are
        // bound several times per session write).
        let mut b = [0u8; uuid::fmt::Hyphenated::LENGTH];
        v.hyphenated().encode_lower(&mut b);
        Val::Id(b)
    }
}

impl<'a, T: Into<Val<'a>>> From<Option<T>> for Val<'a> {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Val::Null)
    }
}

/// The current row of a query.
pub struct Row<'r>(&'r rusqlite::Row<'r>);

impl Row<'_> {
    /// Column `i` as text (`None` for NULL or a column that is not text).
    pub fn text(&self, i: usize) -> Option<String> {
        self.0.get(i).ok().flatten()
    }

    /// Column `i` as text; empty for NULL.
    pub fn string(&self, i: usize) -> String {
        self.text(i).unwrap_or_default()
    }

    /// Column `i` as an integer (`None` for NULL).
    pub fn int(&self, i: usize) -> Option<i64> {
        self.0.get(i).ok().flatten()
    }

    /// Column `i` as bytes (empty for NULL).
    pub fn blob(&self, i: usize) -> Vec<u8> {
        self.0
            .get::<_, Option<Vec<u8>>>(i)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Column `i` as bytes (`None` for NULL).
    pub fn opt_blob(&self, i: usize) -> Option<Vec<u8>> {
        self.0.get::<_, Option<Vec<u8>>>(i).ok().flatten()
    }

    /// Column `i` as a uuid.
    pub fn uuid(&self, i: usize) -> StoreResult<Uuid> {
        uuid_of(&self.string(i))
    }

    /// Column `i` as an optional uuid.
    pub fn opt_uuid(&self, i: usize) -> StoreResult<Option<Uuid>> {
        self.text(i).map(|s| uuid_of(&s)).transpose()
    }
}

/// A uuid read back from the store.
pub fn uuid_of(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Invalid(format!("bad uuid {s:?}: {e}")))
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let extended = e.sqlite_error().map(|f| f.extended_code);
        match e.sqlite_error_code() {
            Some(ErrorCode::ConstraintViolation)
                if matches!(
                    extended,
                    Some(
                        rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                            | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    )
                ) =>
            {
                StoreError::Conflict
            }
            Some(ErrorCode::DiskFull) => StoreError::Full(format!("sqlite: {e}")),
            Some(
                ErrorCode::SystemIoFailure
                | ErrorCode::ReadOnly
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::PermissionDenied,
            ) => StoreError::Unavailable(format!("sqlite: {e}")),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                StoreError::Invalid(format!("sqlite: {e}"))
            }
            // Constraint failures other than uniqueness (a foreign key to a missing record):
            // the caller named something that is not there.
            Some(ErrorCode::ConstraintViolation) => StoreError::NotFound,
            _ => StoreError::Unavailable(format!("sqlite: {e}")),
        }
    }
}

/// Routes SQLite's own error log (`SQLITE_CONFIG_LOG`) into the server's log, once per
/// process, before the first connection: corruption, I/O errors and recoveries then say
/// where SQLite saw them (`database corruption at line N`), not only that a statement
/// failed. Statements carry their values as bound parameters, so no value reaches the log.
pub fn install_error_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: called once, before this process opens its first connection (the store's
        // open calls it first); SQLite refuses the call (SQLITE_MISUSE) if it was already
        // initialised, which leaves the default (no log).
        if let Err(e) = unsafe { rusqlite::trace::config_log(Some(sqlite_log)) } {
            tracing::debug!(error = %e, "SQLite's error log stays off");
        }
    });
}

fn sqlite_log(code: std::os::raw::c_int, msg: &str) {
    use rusqlite::ffi;
    match code & 0xff {
        ffi::SQLITE_CORRUPT
        | ffi::SQLITE_NOTADB
        | ffi::SQLITE_IOERR
        | ffi::SQLITE_FULL
        | ffi::SQLITE_CANTOPEN
        | ffi::SQLITE_PROTOCOL => {
            tracing::error!(target: "cattery::store::sqlite", code, "sqlite: {msg}")
        }
        ffi::SQLITE_NOTICE | ffi::SQLITE_WARNING => {
            tracing::info!(target: "cattery::store::sqlite", code, "sqlite: {msg}")
        }
        _ => tracing::debug!(target: "cattery::store::sqlite", code, "sqlite: {msg}"),
    }
}

/// The size the writer truncates the WAL file back to when it restarts it, 64 MiB.
pub(super) const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// How a connection is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The one write connection: creates the file if missing.
    Write,
    /// A read connection: `query_only`, and it never checkpoints, not even when it is the
    /// last connection to close (only the store's checkpointing connection does: see
    /// `checkpoints` in the store's module).
    Read,
    /// The checkpointing connection: writes nothing but the WAL checkpoint.
    Checkpoint,
}

/// One connection with its prepared statements.
pub struct Conn(rusqlite::Connection);

impl Conn {
    /// Opens `path` with the store's settings (WAL, `synchronous=NORMAL`, no automatic
    /// checkpoints: the store checkpoints on a connection of its own, off the write path).
    pub fn open(path: &Path, mode: Mode, cache_size: &str) -> StoreResult<Conn> {
        // Read-write even for readers (a read-only connection cannot recover a WAL left by a
        // crash); readers get `query_only` instead.
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        if mode == Mode::Write {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let db = rusqlite::Connection::open_with_flags(path, flags)?;
        db.busy_timeout(BUSY_TIMEOUT)?;
        db.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        if mode == Mode::Read {
            db.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            )?;
        }
        if mode == Mode::Write {
            // Persistent in the file; only the writer sets it (it needs the write lock).
            let _: String = db.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            // When the writer restarts the WAL from the top, it truncates a file that a
            // burst grew past this back to it.
            let _: i64 = db.query_row(
                &format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}"),
                [],
                |r| r.get(0),
            )?;
        }
        db.execute_batch(&format!(
            "PRAGMA mmap_size = {MMAP_SIZE};
             PRAGMA cache_size = {cache_size};
             PRAGMA temp_store = memory;
             PRAGMA foreign_keys = ON;
             PRAGMA synchronous = NORMAL;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA query_only = {query_only};",
            query_only = if mode == Mode::Read { "ON" } else { "OFF" },
        ))?;
        Ok(Conn(db))
    }

    /// The `rusqlite` connection (migrations).
    pub fn inner(&mut self) -> &mut rusqlite::Connection {
        &mut self.0
    }

    /// Runs one statement with `params` bound in order; returns the rows it changed.
    pub fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> StoreResult<u64> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let changes = stmt.execute(rusqlite::params_from_iter(params.iter()))?;
        Ok(changes as u64)
    }

    /// The first row of a query, mapped by `f`.
    pub fn query_row<T>(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        f: impl Fn(&Row<'_>) -> T,
    ) -> StoreResult<Option<T>> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        Ok(rows.next()?.map(|r| f(&Row(r))))
    }

    /// Every row of a query, mapped by `f`.
    pub fn query_all<T>(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        f: impl Fn(&Row<'_>) -> StoreResult<T>,
    ) -> StoreResult<Vec<T>> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(f(&Row(r))?);
        }
        Ok(out)
    }

    /// Runs a query (or a statement with `RETURNING`), handing each row to `f` as it comes
    /// instead of collecting them; returns the number of rows.
    pub fn for_each(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        mut f: impl FnMut(&Row<'_>),
    ) -> StoreResult<u64> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            f(&Row(r));
            n += 1;
        }
        Ok(n)
    }

    /// A single integer (`COUNT(*)`...); 0 for no row or NULL.
    pub fn query_int(&mut self, sql: &str, params: &[Val<'_>]) -> StoreResult<i64> {
        Ok(self
            .query_row(sql, params, |r| r.int(0))?
            .flatten()
            .unwrap_or(0))
    }

    /// Runs `body` atomically, undone if it fails: inside a transaction, in a savepoint.
    ///
    /// Alone, it is a `BEGIN IMMEDIATE` transaction: a savepoint there would begin a deferred
    /// one, whose first write, after its reads, needs the write lock while a read is open,
    /// and SQLite does not wait for the lock then (its busy handler is skipped, to avoid a
    /// deadlock): `database is locked` at once whenever another connection writes (another
    /// process on the same file, such as `cattery keys create`). `BEGIN IMMEDIATE` takes the
    /// write lock first, waiting for it like any single statement.
    pub fn atomic<T>(&mut self, body: impl FnOnce(&mut Conn) -> StoreResult<T>) -> StoreResult<T> {
        if self.autocommit() {
            self.exec("BEGIN IMMEDIATE", &[])?;
            let out = body(self).and_then(|v| self.exec("COMMIT", &[]).map(|_| v));
            if out.is_err() {
                self.ensure_clean();
            }
            return out;
        }
        self.exec("SAVEPOINT w", &[])?;
        match body(self).and_then(|v| self.exec("RELEASE w", &[]).map(|_| v)) {
            Ok(v) => Ok(v),
            Err(e) => {
                // After some errors (a full disk, I/O) SQLite has already rolled the whole
                // transaction back; then these fail harmlessly.
                if !self.autocommit() {
                    let _ = self.exec("ROLLBACK TO w", &[]);
                    let _ = self.exec("RELEASE w", &[]);
                }
                Err(e)
            }
        }
    }

    /// Whether the connection is outside any transaction.
    pub fn autocommit(&self) -> bool {
        self.0.is_autocommit()
    }

    /// Leaves any transaction still open (after a failed statement or `COMMIT`), so the
    /// connection never keeps the write lock past a failure.
    pub fn ensure_clean(&mut self) {
        if !self.autocommit() {
            if let Err(e) = self.0.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rollback after a failed write failed");
            }
        }
    }
}
