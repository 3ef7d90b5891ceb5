//! The embedded default store: one SQLite file (`<data-dir>/cattery.db`) in WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex, Semaphore};
use uuid::Uuid;

use self::raw::Val;
use super::{
    LogFilter, OrgRecord, SealedValue, SecretSetKind, SecretSetRecord, SessionFilter, Store,
    StoreError, StoreResult,
};
use crate::model::{
    AgentRecord, ApiKeyRecord, DeploymentRecord, DeploymentSpec, EndReason, InstanceRecord,
    KeyKind, LogLine, MetricSample, SessionEnd, SessionRecord,
};

/// SQLite-backed [`Store`].
///
/// Connections, not pools: sqlx's pool sends a ping through the connection's worker thread
/// every time a connection is given back (a full extra round trip per query, during which the
/// one write connection sat idle), so this keeps its connections itself.
///
/// - **Reads**: up to [`READERS`] connections, each used by one query at a time.
/// - **Writes**: one connection (WAL allows one writer; a second would collide on SQLite's
///   write lock, whose busy handler sleeps 1, 2, 5, 10 ms... between retries). The session
///   and instance writes of the start/stop path and the log inserts are *group-committed*:
///   they queue to one task that runs everything queued meanwhile in one transaction
///   (`BEGIN IMMEDIATE`, each write, `COMMIT`) and answers each caller once the `COMMIT`
///   returned, so a write is durable before its caller hears `Ok`, and eight concurrent
///   starts cost one commit instead of eight. Other writes (agents, keys, secrets, orgs) take
///   the same connection directly, between groups.
#[derive(Clone)]
pub struct SqliteStore {
    readers: Arc<Readers>,
    writer: Arc<AsyncMutex<Writer>>,
    jobs: mpsc::UnboundedSender<Job>,
    path: Arc<std::path::PathBuf>,
    /// Idle direct read connections ([`raw`]) for the hottest lookups (API keys, sessions).
    raw_readers: Arc<parking_lot::Mutex<Vec<raw::Conn>>>,
}

/// The write side: two connections to the same file behind one lock, so only one of them
/// ever writes at a time (no contention on SQLite's write lock). Group-committed writes run
/// on `raw` directly; the others through sqlx on `sqlx`.
struct Writer {
    sqlx: SqliteConnection,
    raw: raw::Conn,
}

/// Read connections.
const READERS: usize = 4;
/// Most writes committed in one group transaction.
const MAX_GROUP: usize = 64;

/// Read connections, opened on demand up to [`READERS`].
struct Readers {
    opts: SqliteConnectOptions,
    idle: parking_lot::Mutex<Vec<SqliteConnection>>,
    permits: Semaphore,
}

/// A read connection for one query; back to the idle list when dropped.
struct ReadConn<'a> {
    conn: Option<SqliteConnection>,
    readers: &'a Readers,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl std::ops::Deref for ReadConn<'_> {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl std::ops::DerefMut for ReadConn<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for ReadConn<'_> {
    fn drop(&mut self) {
        // A query cancelled half-way needs no cleanup: the connection's worker thread finishes
        // (or abandons and resets) each statement before it takes the next command.
        if let Some(c) = self.conn.take() {
            self.readers.idle.lock().push(c);
        }
    }
}

impl Readers {
    async fn get(&self) -> StoreResult<ReadConn<'_>> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let idle = self.idle.lock().pop();
        let conn = match idle {
            Some(c) => c,
            None => self.opts.connect().await?,
        };
        Ok(ReadConn {
            conn: Some(conn),
            readers: self,
            _permit: permit,
        })
    }
}

/// Called once the group transaction of a write ended, with the `COMMIT`'s error if any.
type Done = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A group-committed write: runs its statements on the write connection (inside the group's
/// transaction, or alone) and returns how to answer its caller. It must leave nothing behind
/// when it fails: one statement, or several in [`raw::Conn::atomic`].
type Job = Box<dyn FnOnce(&mut raw::Conn) -> Done + Send>;

/// The group-commit task: takes every queued write, runs them in one transaction on the
/// write connection (directly, see [`raw`]), commits, answers. A write that fails does not
/// affect the others of its group. Ends when the store is dropped.
async fn group_writer(writer: Arc<AsyncMutex<Writer>>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut jobs: Vec<Job> = Vec::new();
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        let mut w = writer.lock().await;
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let done = run_group(&mut w.raw, &mut jobs);
        drop(w);
        for (d, err) in done {
            d(err.as_ref());
        }
    }
}

/// Runs `jobs` as one transaction (or one by one when alone, or when the transaction cannot
/// start); returns each one's answer with the error its commit had, if any.
fn run_group(db: &mut raw::Conn, jobs: &mut Vec<Job>) -> Vec<(Done, Option<StoreError>)> {
    if jobs.len() == 1 || db.exec("BEGIN IMMEDIATE", &[]).is_err() {
        // Alone: its own statements commit it.
        return jobs.drain(..).map(|job| (job(db), None)).collect();
    }
    let done: Vec<Done> = jobs.drain(..).map(|job| job(db)).collect();
    let commit = db.exec("COMMIT", &[]).err();
    if commit.is_some() && !db.autocommit() {
        let _ = db.exec("ROLLBACK", &[]);
    }
    done.into_iter()
        .map(|d| {
            let e = commit.as_ref().map(|e| StoreError::Backend(e.to_string()));
            (d, e)
        })
        .collect()
}

/// SQLite connections driven directly through `rusqlite` (on the SQLite that sqlx bundles) on
/// the calling thread, for the hot path: the group-committed writes and the key and session
/// lookups. Through sqlx every statement is a round trip to the connection's worker thread
/// (20-100 µs here, mostly wake-ups on 2 busy cores); these run in a few µs, with their
/// statements prepared once per connection (`prepare_cached`).
mod raw {
    use std::path::Path;

    use rusqlite::types::{ToSqlOutput, ValueRef};
    use rusqlite::{ErrorCode, OpenFlags, ToSql};

    use super::StoreError;

    /// Prepared statements kept per connection (the hot path uses a few dozen shapes).
    const STATEMENT_CACHE: usize = 64;

    /// A value bound to a statement parameter.
    pub enum Val<'a> {
        Null,
        Int(i64),
        Text(&'a str),
        Blob(&'a [u8]),
    }

    impl ToSql for Val<'_> {
        fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
            Ok(ToSqlOutput::Borrowed(match self {
                Val::Null => ValueRef::Null,
                Val::Int(v) => ValueRef::Integer(*v),
                Val::Text(t) => ValueRef::Text(t.as_bytes()),
                Val::Blob(b) => ValueRef::Blob(b),
            }))
        }
    }

    impl From<i64> for Val<'_> {
        fn from(v: i64) -> Self {
            Val::Int(v)
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

    impl<'a, T: Into<Val<'a>>> From<Option<T>> for Val<'a> {
        fn from(v: Option<T>) -> Self {
            v.map(Into::into).unwrap_or(Val::Null)
        }
    }

    /// What a statement did.
    pub struct Outcome {
        /// Rows it changed.
        pub changes: u64,
    }

    /// The current row of a query.
    pub struct Row<'r>(&'r rusqlite::Row<'r>);

    impl Row<'_> {
        /// Column `i` as text (`None` for NULL or a column that is not text).
        pub fn text(&self, i: usize) -> Option<String> {
            self.0.get(i).ok().flatten()
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
    }

    impl From<rusqlite::Error> for StoreError {
        fn from(e: rusqlite::Error) -> Self {
            match e.sqlite_error_code() {
                Some(ErrorCode::ConstraintViolation)
                    if matches!(
                        e.sqlite_error().map(|f| f.extended_code),
                        Some(
                            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                        )
                    ) =>
                {
                    StoreError::Conflict
                }
                _ => StoreError::Backend(format!("sqlite: {e}")),
            }
        }
    }

    /// One connection with its prepared statements.
    pub struct Conn(rusqlite::Connection);

    impl Conn {
        /// Opens `path` (which must exist and be in WAL mode) with the store's settings;
        /// `write: false` makes it refuse writes (`query_only`).
        pub fn open(path: &Path, write: bool) -> Result<Conn, StoreError> {
            // Read-write even for readers (a read-only connection cannot recover a WAL left
            // by a crash); readers get `query_only` instead.
            let db = rusqlite::Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )?;
            db.busy_timeout(std::time::Duration::from_secs(10))?;
            db.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            db.execute_batch(&format!(
                "PRAGMA mmap_size = {mmap};
                 PRAGMA cache_size = {cache};
                 PRAGMA temp_store = memory;
                 PRAGMA foreign_keys = ON;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA wal_autocheckpoint = 0;
                 PRAGMA query_only = {query_only};",
                mmap = super::MMAP_SIZE,
                cache = super::RAW_CACHE_SIZE,
                // Checkpoints run off the write path (`checkpoints`).
                query_only = if write { "OFF" } else { "ON" },
            ))?;
            Ok(Conn(db))
        }

        /// Runs one statement with `params` bound in order.
        pub fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> Result<Outcome, StoreError> {
            let mut stmt = self.0.prepare_cached(sql)?;
            let changes = stmt.execute(rusqlite::params_from_iter(params.iter()))?;
            Ok(Outcome {
                changes: changes as u64,
            })
        }

        /// The first row of a query, mapped by `f`.
        pub fn query_row<T>(
            &mut self,
            sql: &str,
            params: &[Val<'_>],
            f: impl Fn(&Row<'_>) -> T,
        ) -> Result<Option<T>, StoreError> {
            let mut stmt = self.0.prepare_cached(sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
            Ok(rows.next()?.map(|r| f(&Row(r))))
        }

        /// Runs `body` atomically: inside a savepoint, undone if it fails.
        pub fn atomic<T>(
            &mut self,
            body: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
        ) -> Result<T, StoreError> {
            self.exec("SAVEPOINT w", &[])?;
            match body(self) {
                Ok(v) => {
                    self.exec("RELEASE w", &[])?;
                    Ok(v)
                }
                Err(e) => {
                    let _ = self.exec("ROLLBACK TO w", &[]);
                    let _ = self.exec("RELEASE w", &[]);
                    Err(e)
                }
            }
        }

        /// Whether the connection is outside any transaction.
        pub fn autocommit(&self) -> bool {
            self.0.is_autocommit()
        }
    }
}

/// Bytes of the database file that connections map into memory (reads without `read(2)`).
const MMAP_SIZE: &str = "268435456";
/// Pages of page cache per connection (negative: KiB), 16 MiB.
const CACHE_SIZE: &str = "-16384";
/// Page cache of each direct connection ([`raw`]), 2 MiB: they read through the memory map and
/// look up single rows or write a few pages per statement; with 16 MiB each, the extra
/// connections held tens of MiB of the control plane's RSS once the log table had grown.
const RAW_CACHE_SIZE: &str = "-2048";
/// Log lines per multi-row `INSERT` (8 bound values each, far below SQLite's 32,766 limit).
const LOG_ROWS_PER_INSERT: usize = 128;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn uuid_of(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Backend(format!("bad uuid in store: {e}")))
}

fn end_reason(s: &str) -> EndReason {
    match s {
        "completed" => EndReason::Completed,
        "stopped" => EndReason::Stopped,
        "stopped_during_start" => EndReason::StoppedDuringStart,
        "max_duration" => EndReason::MaxDuration,
        "start_failed" => EndReason::StartFailed,
        "client_disconnected" => EndReason::ClientDisconnected,
        "drained" => EndReason::Drained,
        "lost" => EndReason::Lost,
        "out_of_memory" => EndReason::OutOfMemory,
        _ => EndReason::Error,
    }
}

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] from a reader connection. `PASSIVE` never
/// waits for the writer or readers, and the writer never waits for it, so its fsyncs stay
/// off the write path; the writer restarts the WAL from the top once a checkpoint caught up.
/// Runs until the store is dropped.
async fn checkpoints(readers: Weak<Readers>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = readers.upgrade() else { return };
        let res = match r.get().await {
            Ok(mut c) => sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut *c)
                .await
                .map(|_| ())
                .map_err(StoreError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "WAL checkpoint failed; retrying later");
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `<dir>/cattery.db` and applies migrations.
    ///
    /// Errors: the file cannot be opened or a migration fails.
    pub async fn open(dir: &Path) -> StoreResult<Self> {
        let path = dir.join("cattery.db");
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .statement_cache_capacity(256)
            .pragma("mmap_size", MMAP_SIZE)
            .pragma("cache_size", CACHE_SIZE)
            .pragma("temp_store", "memory")
            // No automatic checkpoints on commit: the commit that crossed the threshold paid
            // for the checkpoint and its fsyncs (1-50 ms) on the one write path, stalling
            // every start and stop behind it. `checkpoints` below does it off that path.
            .pragma("wal_autocheckpoint", "0");
        let mut writer = opts.connect().await?;
        MIGRATOR
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        let raw_writer = raw::Conn::open(&path, true)?;
        let readers = Arc::new(Readers {
            opts,
            idle: parking_lot::Mutex::new(Vec::new()),
            permits: Semaphore::new(READERS),
        });
        let writer = Arc::new(AsyncMutex::new(Writer {
            sqlx: writer,
            raw: raw_writer,
        }));
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(group_writer(writer.clone(), rx));
        tokio::spawn(checkpoints(Arc::downgrade(&readers)));
        Ok(SqliteStore {
            readers,
            writer,
            jobs,
            path: Arc::new(path),
            raw_readers: Arc::new(parking_lot::Mutex::new(Vec::new())),
        })
    }

    /// Runs `f` on an idle direct read connection (opened when none is idle), on this thread.
    fn raw_read<T>(&self, f: impl FnOnce(&mut raw::Conn) -> StoreResult<T>) -> StoreResult<T> {
        let idle = self.raw_readers.lock().pop();
        let mut c = match idle {
            Some(c) => c,
            None => raw::Conn::open(&self.path, false)?,
        };
        let r = f(&mut c);
        self.raw_readers.lock().push(c);
        r
    }

    /// A read connection.
    async fn read(&self) -> StoreResult<ReadConn<'_>> {
        self.readers.get().await
    }

    /// Runs `f` on the write connection as part of the next group commit (see
    /// [`SqliteStore`]) and returns its result once committed. `f` must leave nothing behind
    /// when it fails: one statement, or several in [`raw::Conn::atomic`].
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut raw::Conn) -> StoreResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            let r = f(db);
            Box::new(move |commit: Option<&StoreError>| {
                let _ = tx.send(match commit {
                    Some(e) => Err(StoreError::Backend(format!("commit failed: {e}"))),
                    None => r,
                });
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Backend("the store's writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Backend("the store's writer has stopped".into()))?
    }

    fn agent_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<AgentRecord> {
        Ok(AgentRecord {
            id: uuid_of(r.get("id"))?,
            org: r.get("org"),
            name: r.get("name"),
            region: r.get("region"),
            min_agents: r.get::<i64, _>("min_agents") as u32,
            max_agents: r.get::<i64, _>("max_agents") as u32,
            desired_deployment_id: uuid_of(r.get("desired_deployment_id"))?,
            created_ms: r.get("created_ms"),
            updated_ms: r.get("updated_ms"),
            deleted_ms: r.get("deleted_ms"),
        })
    }

    fn dep_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<DeploymentRecord> {
        let spec: DeploymentSpec = serde_json::from_str(r.get("spec"))
            .map_err(|e| StoreError::Backend(format!("bad deployment spec: {e}")))?;
        Ok(DeploymentRecord {
            id: uuid_of(r.get("id"))?,
            agent_id: uuid_of(r.get("agent_id"))?,
            spec,
            created_ms: r.get("created_ms"),
        })
    }

    fn session_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<SessionRecord> {
        session_from_cols(
            |i| r.try_get::<Option<String>, _>(i).ok().flatten(),
            |i| r.try_get::<Option<i64>, _>(i).ok().flatten(),
        )
    }

    fn key_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<ApiKeyRecord> {
        Ok(ApiKeyRecord {
            id: uuid_of(r.get("id"))?,
            org: r.get("org"),
            kind: KeyKind::parse(r.get("kind"))
                .ok_or_else(|| StoreError::Backend("bad key kind".into()))?,
            name: r.get("name"),
            prefix: r.get("key_prefix"),
            created_ms: r.get("created_ms"),
            revoked_ms: r.get("revoked_ms"),
            public_key: r.get("public_key"),
        })
    }
}

const SESSION_COLS: &str = "id, org, agent_id, deployment_id, created_ms, updated_ms, ended_ms, \
    bot_start_ms, cold_start, completion_status, end_reason, exit_code, exit_signal, end_message, \
    transport, samples";

#[async_trait]
impl Store for SqliteStore {
    async fn ensure_org(&self, name: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO orgs (name, verbose_name, created_ms) VALUES (?1, ?1, ?2) \
             ON CONFLICT(name) DO NOTHING",
        )
        .bind(name)
        .bind(crate::model::now_ms())
        .execute(&mut self.writer.lock().await.sqlx)
        .await?;
        Ok(())
    }

    async fn list_orgs(&self) -> StoreResult<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM orgs ORDER BY created_ms, name")
            .fetch_all(&mut *self.read().await?)
            .await?;
        Ok(rows.iter().map(|r| r.get("name")).collect())
    }

    async fn insert_key(&self, rec: &ApiKeyRecord, hash: &[u8]) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, org, kind, name, key_hash, key_prefix, created_ms, revoked_ms, \
             public_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(rec.id.to_string())
        .bind(&rec.org)
        .bind(rec.kind.as_str())
        .bind(&rec.name)
        .bind(hash)
        .bind(&rec.prefix)
        .bind(rec.created_ms)
        .bind(rec.revoked_ms)
        .bind(rec.kind.eq(&KeyKind::Public).then_some(rec.public_key.as_deref()).flatten())
        .execute(&mut self.writer.lock().await.sqlx)
        .await?;
        Ok(())
    }

    async fn find_key(&self, hash: &[u8]) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>> {
        // Every API request: a direct read on this thread (no round trip to a worker thread).
        let row = self.raw_read(|c| {
            c.query_row(
                "SELECT id, org, kind, name, key_prefix, created_ms, revoked_ms, public_key, \
                 key_hash FROM api_keys WHERE key_hash = ?",
                &[Val::Blob(hash)],
                |r| {
                    (
                        r.text(0).unwrap_or_default(),
                        r.text(1).unwrap_or_default(),
                        r.text(2).unwrap_or_default(),
                        r.text(3).unwrap_or_default(),
                        r.text(4).unwrap_or_default(),
                        r.int(5).unwrap_or_default(),
                        r.int(6),
                        r.text(7),
                        r.blob(8),
                    )
                },
            )
        })?;
        let Some((id, org, kind, name, prefix, created_ms, revoked_ms, public_key, stored)) = row
        else {
            return Ok(None);
        };
        let rec = ApiKeyRecord {
            id: uuid_of(&id)?,
            org,
            kind: KeyKind::parse(&kind)
                .ok_or_else(|| StoreError::Backend("bad key kind".into()))?,
            name,
            prefix,
            created_ms,
            revoked_ms,
            public_key,
        };
        Ok(Some((rec, stored)))
    }

    async fn list_keys(&self, org: &str, kind: Option<KeyKind>) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE org = ?1 AND (?2 IS NULL OR kind = ?2) ORDER BY created_ms",
        )
        .bind(org)
        .bind(kind.map(|k| k.as_str()))
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(Self::key_from_row).collect()
    }

    async fn revoke_key(&self, org: &str, id: Uuid) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_ms = COALESCE(revoked_ms, ?3) WHERE org = ?1 AND id = ?2",
        )
        .bind(org)
        .bind(id.to_string())
        .bind(crate::model::now_ms())
        .execute(&mut self.writer.lock().await.sqlx)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn create_agent(&self, a: &AgentRecord, dep: &DeploymentRecord) -> StoreResult<()> {
        let mut w = self.writer.lock().await;
        let mut tx = w.sqlx.begin().await?;
        sqlx::query(
            "INSERT INTO agents (id, org, name, region, min_agents, max_agents, desired_deployment_id, \
             created_ms, updated_ms, deleted_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
        )
        .bind(a.id.to_string())
        .bind(&a.org)
        .bind(&a.name)
        .bind(&a.region)
        .bind(a.min_agents as i64)
        .bind(a.max_agents as i64)
        .bind(a.desired_deployment_id.to_string())
        .bind(a.created_ms)
        .bind(a.updated_ms)
        .execute(&mut *tx)
        .await?;
        insert_dep(&mut tx, &a.org, dep).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_agent(
        &self,
        a: &AgentRecord,
        dep: Option<&DeploymentRecord>,
    ) -> StoreResult<()> {
        let mut w = self.writer.lock().await;
        let mut tx = w.sqlx.begin().await?;
        if let Some(dep) = dep {
            insert_dep(&mut tx, &a.org, dep).await?;
        }
        sqlx::query(
            "UPDATE agents SET min_agents = ?, max_agents = ?, desired_deployment_id = ?, updated_ms = ? \
             WHERE id = ?",
        )
        .bind(a.min_agents as i64)
        .bind(a.max_agents as i64)
        .bind(a.desired_deployment_id.to_string())
        .bind(a.updated_ms)
        .bind(a.id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>> {
        let row =
            sqlx::query("SELECT * FROM agents WHERE org = ? AND name = ? AND deleted_ms IS NULL")
                .bind(org)
                .bind(name)
                .fetch_optional(&mut *self.read().await?)
                .await?;
        row.as_ref().map(Self::agent_from_row).transpose()
    }

    async fn get_agent_by_id(&self, id: Uuid) -> StoreResult<Option<AgentRecord>> {
        let row = sqlx::query("SELECT * FROM agents WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.as_ref().map(Self::agent_from_row).transpose()
    }

    async fn list_agents(&self, org: &str) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM agents WHERE org = ? AND deleted_ms IS NULL ORDER BY created_ms, name",
        )
        .bind(org)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(Self::agent_from_row).collect()
    }

    async fn list_all_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query("SELECT * FROM agents WHERE deleted_ms IS NULL")
            .fetch_all(&mut *self.read().await?)
            .await?;
        rows.iter().map(Self::agent_from_row).collect()
    }

    async fn delete_agent(&self, id: Uuid, at_ms: i64) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET deleted_ms = ?, updated_ms = ? WHERE id = ?")
            .bind(at_ms)
            .bind(at_ms)
            .bind(id.to_string())
            .execute(&mut self.writer.lock().await.sqlx)
            .await?;
        Ok(())
    }

    async fn get_deployment(&self, id: Uuid) -> StoreResult<Option<DeploymentRecord>> {
        let row = sqlx::query("SELECT * FROM deployments WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.as_ref().map(Self::dep_from_row).transpose()
    }

    async fn list_deployments(&self, agent_id: Uuid) -> StoreResult<Vec<DeploymentRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM deployments WHERE agent_id = ? ORDER BY created_ms DESC, rowid DESC",
        )
        .bind(agent_id.to_string())
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(Self::dep_from_row).collect()
    }

    async fn insert_session(&self, s: &SessionRecord) -> StoreResult<()> {
        let s = s.clone();
        self.write(move |db| insert_session_raw(db, &s)).await
    }

    async fn mark_delivered(&self, id: Uuid, bot_start_ms: i64) -> StoreResult<()> {
        let now = crate::model::now_ms();
        self.write(move |db| {
            db.exec(
                "UPDATE sessions SET bot_start_ms = ?, updated_ms = ? WHERE id = ? AND ended_ms IS NULL",
                &[bot_start_ms.into(), now.into(), Val::Text(&id.to_string())],
            )
            .map(|_| ())
        })
        .await
    }

    async fn end_session(&self, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
        let e = e.clone();
        self.write(move |db| end_session_raw(db, id, &e)).await
    }

    async fn set_session_samples(&self, id: Uuid, samples: &[MetricSample]) -> StoreResult<()> {
        let m = samples_json(samples);
        self.write(move |db| {
            db.exec(
                "UPDATE sessions SET samples = ? WHERE id = ?",
                &[Val::Text(&m), Val::Text(&id.to_string())],
            )
            .map(|_| ())
        })
        .await
    }

    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>> {
        // A direct read on this thread (no round trip to a worker thread).
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?");
        self.raw_read(|c| c.query_row(&sql, &[Val::Text(&id.to_string())], session_from_raw))?
            .transpose()
    }

    async fn list_sessions(
        &self,
        agent_id: Uuid,
        f: &SessionFilter,
    ) -> StoreResult<(i64, Vec<SessionRecord>)> {
        // Only the filters that are set go into the SQL, so SQLite can use an index: an
        // index-only count for the plain list, `sessions_active` for `status=active`. With
        // `?n IS NULL OR ...` terms it read every row of the agent (100,000 stored sessions:
        // 7 ms per list, 40-120 ms with `status=active`).
        let mut filter = String::from("agent_id = ?");
        if f.deployment_id.is_some() {
            filter.push_str(" AND deployment_id = ?");
        }
        match f.active {
            Some(true) => filter.push_str(" AND ended_ms IS NULL"),
            Some(false) => filter.push_str(" AND ended_ms IS NOT NULL"),
            None => {}
        }
        if f.cold.is_some() {
            filter.push_str(" AND cold_start = ?");
        }
        if f.start_ms.is_some() {
            filter.push_str(" AND created_ms >= ?");
        }
        if f.end_ms.is_some() {
            filter.push_str(" AND created_ms <= ?");
        }
        // Binds in the order of the `?`s above.
        macro_rules! bind_filter {
            ($q:expr) => {{
                let mut q = $q.bind(agent_id.to_string());
                if let Some(d) = f.deployment_id {
                    q = q.bind(d.to_string());
                }
                if let Some(c) = f.cold {
                    q = q.bind(c as i64);
                }
                if let Some(t) = f.start_ms {
                    q = q.bind(t);
                }
                if let Some(t) = f.end_ms {
                    q = q.bind(t);
                }
                q
            }};
        }
        let count_sql = format!("SELECT COUNT(*) FROM sessions WHERE {filter}");
        let total: i64 = bind_filter!(sqlx::query_scalar(&count_sql))
            .fetch_one(&mut *self.read().await?)
            .await?;
        // Active sessions are few: read them through their partial index and sort them,
        // rather than walking every session of the agent newest first to find them.
        let index = if f.active == Some(true) {
            " INDEXED BY sessions_active"
        } else {
            ""
        };
        let select_sql = format!(
            "SELECT {SESSION_COLS} FROM sessions{index} WHERE {filter} \
             ORDER BY created_ms DESC, rowid DESC LIMIT ? OFFSET ?"
        );
        let rows = bind_filter!(sqlx::query(&select_sql))
            .bind(f.limit)
            .bind(f.offset)
            .fetch_all(&mut *self.read().await?)
            .await?;
        let list = rows
            .iter()
            .map(Self::session_from_row)
            .collect::<StoreResult<_>>()?;
        Ok((total, list))
    }

    async fn list_open_sessions(&self) -> StoreResult<Vec<SessionRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE ended_ms IS NULL"
        ))
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(Self::session_from_row).collect()
    }

    async fn request_stop(&self, id: Uuid, deadline_ms: i64) -> StoreResult<()> {
        self.write(move |db| {
            db.exec(
                "UPDATE sessions SET stop_deadline_ms = COALESCE(stop_deadline_ms, ?) \
                 WHERE id = ? AND ended_ms IS NULL",
                &[deadline_ms.into(), Val::Text(&id.to_string())],
            )
            .map(|_| ())
        })
        .await
    }

    async fn stop_requests(&self) -> StoreResult<Vec<(Uuid, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, stop_deadline_ms FROM sessions \
             WHERE ended_ms IS NULL AND stop_deadline_ms IS NOT NULL",
        )
        .fetch_all(&mut *self.read().await?)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, d)| Some((Uuid::parse_str(&id).ok()?, d)))
            .collect())
    }

    async fn put_instance(&self, i: &InstanceRecord) -> StoreResult<()> {
        let i = i.clone();
        self.write(move |db| {
            db.exec(
                "INSERT OR REPLACE INTO instances (id, agent_id, deployment_id, session_id, runtime, \
                 placement, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                &[
                    Val::Text(&i.id.to_string()),
                    Val::Text(&i.agent_id.to_string()),
                    Val::Text(&i.deployment_id.to_string()),
                    i.session_id.map(|s| s.to_string()).as_ref().into(),
                    Val::Text(&i.runtime),
                    Val::Text(&i.placement.to_string()),
                    i.created_ms.into(),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn delete_instance(&self, id: Uuid) -> StoreResult<()> {
        self.write(move |db| {
            db.exec(
                "DELETE FROM instances WHERE id = ?",
                &[Val::Text(&id.to_string())],
            )
            .map(|_| ())
        })
        .await
    }

    async fn insert_session_for_instance(
        &self,
        s: &SessionRecord,
        instance_id: Uuid,
    ) -> StoreResult<bool> {
        let s = s.clone();
        self.write(move |db| {
            db.atomic(|db| {
                insert_session_raw(db, &s)?;
                let d = db.exec(
                    "UPDATE instances SET session_id = ? WHERE id = ?",
                    &[
                        Val::Text(&s.id.to_string()),
                        Val::Text(&instance_id.to_string()),
                    ],
                )?;
                Ok(d.changes == 1)
            })
        })
        .await
    }

    async fn end_instance(
        &self,
        instance_id: Uuid,
        session: Option<(Uuid, &SessionEnd, &[MetricSample])>,
    ) -> StoreResult<bool> {
        let session =
            session.map(|(sid, e, m)| (sid, e.clone(), (!m.is_empty()).then(|| samples_json(m))));
        self.write(move |db| {
            db.atomic(|db| {
                db.exec(
                    "DELETE FROM instances WHERE id = ?",
                    &[Val::Text(&instance_id.to_string())],
                )?;
                let Some((sid, e, metrics)) = &session else {
                    return Ok(false);
                };
                let wrote = end_session_raw(db, *sid, e)?;
                if let Some(m) = metrics {
                    db.exec(
                        "UPDATE sessions SET samples = ? WHERE id = ?",
                        &[Val::Text(m), Val::Text(&sid.to_string())],
                    )?;
                }
                Ok(wrote)
            })
        })
        .await
    }

    async fn list_instances(&self) -> StoreResult<Vec<InstanceRecord>> {
        let rows = sqlx::query("SELECT * FROM instances")
            .fetch_all(&mut *self.read().await?)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceRecord {
                    id: uuid_of(r.get("id"))?,
                    agent_id: uuid_of(r.get("agent_id"))?,
                    deployment_id: uuid_of(r.get("deployment_id"))?,
                    session_id: r
                        .get::<Option<String>, _>("session_id")
                        .map(|s| uuid_of(&s))
                        .transpose()?,
                    runtime: r.get("runtime"),
                    placement: serde_json::from_str(r.get("placement"))
                        .map_err(|e| StoreError::Backend(format!("bad instance placement: {e}")))?,
                    created_ms: r.get("created_ms"),
                })
            })
            .collect()
    }

    async fn secret_set_exists(&self, org: &str, name: &str) -> StoreResult<bool> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM secret_sets WHERE org = ? AND name = ?")
                .bind(org)
                .bind(name)
                .fetch_one(&mut *self.read().await?)
                .await?;
        Ok(n > 0)
    }

    async fn get_secret_set(&self, org: &str, name: &str) -> StoreResult<Option<SecretSetRecord>> {
        let row = sqlx::query("SELECT * FROM secret_sets WHERE org = ? AND name = ?")
            .bind(org)
            .bind(name)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        let Some(r) = row else { return Ok(None) };
        let mut set = set_from_row(&r)?;
        set.keys = sqlx::query_scalar(
            "SELECT key FROM secrets WHERE org = ? AND set_name = ? ORDER BY key",
        )
        .bind(org)
        .bind(name)
        .fetch_all(&mut *self.read().await?)
        .await?;
        Ok(Some(set))
    }

    async fn list_secret_sets(&self, org: &str) -> StoreResult<Vec<SecretSetRecord>> {
        let rows = sqlx::query("SELECT * FROM secret_sets WHERE org = ? ORDER BY name")
            .bind(org)
            .fetch_all(&mut *self.read().await?)
            .await?;
        let mut sets = rows
            .iter()
            .map(set_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let keys = sqlx::query("SELECT set_name, key FROM secrets WHERE org = ? ORDER BY key")
            .bind(org)
            .fetch_all(&mut *self.read().await?)
            .await?;
        for k in &keys {
            let set_name: String = k.get("set_name");
            if let Some(s) = sets.iter_mut().find(|s| s.name == set_name) {
                s.keys.push(k.get("key"));
            }
        }
        Ok(sets)
    }

    async fn upsert_secret_set(
        &self,
        set: &SecretSetRecord,
        values: &[SealedValue],
        replace_all: bool,
    ) -> StoreResult<()> {
        let mut w = self.writer.lock().await;
        let mut tx = w.sqlx.begin().await?;
        let r = sqlx::query(
            "INSERT INTO secret_sets (org, name, kind, region, host, created_ms, updated_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) \
             ON CONFLICT(org, name) DO UPDATE SET updated_ms = excluded.updated_ms, \
             host = excluded.host WHERE kind = excluded.kind AND region = excluded.region",
        )
        .bind(&set.org)
        .bind(&set.name)
        .bind(set.kind.as_str())
        .bind(&set.region)
        .bind(&set.host)
        .bind(set.updated_ms)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        if replace_all {
            sqlx::query("DELETE FROM secrets WHERE org = ? AND set_name = ?")
                .bind(&set.org)
                .bind(&set.name)
                .execute(&mut *tx)
                .await?;
        }
        for v in values {
            sqlx::query(
                "INSERT INTO secrets (org, set_name, key, nonce, ciphertext) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT(org, set_name, key) DO UPDATE SET nonce = excluded.nonce, \
                 ciphertext = excluded.ciphertext",
            )
            .bind(&set.org)
            .bind(&set.name)
            .bind(&v.key)
            .bind(&v.nonce)
            .bind(&v.ciphertext)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn secret_values(&self, org: &str, name: &str) -> StoreResult<Vec<SealedValue>> {
        let rows = sqlx::query(
            "SELECT key, nonce, ciphertext FROM secrets WHERE org = ? AND set_name = ? ORDER BY key",
        )
        .bind(org)
        .bind(name)
        .fetch_all(&mut *self.read().await?)
        .await?;
        Ok(rows.iter().map(sealed_from_row).collect())
    }

    async fn delete_secret_set(&self, org: &str, name: &str) -> StoreResult<bool> {
        let r = sqlx::query("DELETE FROM secret_sets WHERE org = ? AND name = ?")
            .bind(org)
            .bind(name)
            .execute(&mut self.writer.lock().await.sqlx)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn delete_secret(&self, org: &str, name: &str, key: &str) -> StoreResult<bool> {
        let mut w = self.writer.lock().await;
        let mut tx = w.sqlx.begin().await?;
        let r = sqlx::query("DELETE FROM secrets WHERE org = ? AND set_name = ? AND key = ?")
            .bind(org)
            .bind(name)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() > 0 {
            sqlx::query("UPDATE secret_sets SET updated_ms = ? WHERE org = ? AND name = ?")
                .bind(crate::model::now_ms())
                .bind(org)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    async fn deployment_secrets(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Vec<(String, SealedValue)>> {
        let rows = sqlx::query(
            "SELECT set_name, key, nonce, ciphertext FROM deployment_secrets \
             WHERE deployment_id = ? ORDER BY key",
        )
        .bind(deployment_id.to_string())
        .fetch_all(&mut *self.read().await?)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("set_name"), sealed_from_row(r)))
            .collect())
    }

    async fn get_org(&self, name: &str) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query("SELECT * FROM orgs WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        Ok(row.map(|r| OrgRecord {
            name: r.get("name"),
            verbose_name: r.get("verbose_name"),
            properties: serde_json::from_str(r.get("properties"))
                .ok()
                .filter(serde_json::Value::is_object)
                .unwrap_or_else(|| serde_json::json!({})),
            created_ms: r.get("created_ms"),
        }))
    }

    async fn set_org_properties(&self, name: &str, props: &serde_json::Value) -> StoreResult<()> {
        sqlx::query("UPDATE orgs SET properties = ? WHERE name = ?")
            .bind(props.to_string())
            .bind(name)
            .execute(&mut self.writer.lock().await.sqlx)
            .await?;
        Ok(())
    }

    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        // One multi-row INSERT per chunk, all of them atomically.
        let lines = lines.to_vec();
        self.write(move |db| {
            db.atomic(|db| {
                // Chunks of 128, 64, 32... rows: at most eight statement shapes to keep
                // prepared, instead of one per batch size.
                let mut rest = &lines[..];
                let mut chunks = Vec::new();
                while !rest.is_empty() {
                    let n = if rest.len() >= LOG_ROWS_PER_INSERT {
                        LOG_ROWS_PER_INSERT
                    } else {
                        1 << rest.len().ilog2()
                    };
                    chunks.push(&rest[..n]);
                    rest = &rest[n..];
                }
                for chunk in chunks {
                    let mut sql = String::from(
                        "INSERT INTO logs (org, agent_id, deployment_id, session_id, instance_id, ts_ns, stream, line) VALUES ",
                    );
                    for i in 0..chunk.len() {
                        sql.push_str(if i == 0 {
                            "(?, ?, ?, ?, ?, ?, ?, ?)"
                        } else {
                            ", (?, ?, ?, ?, ?, ?, ?, ?)"
                        });
                    }
                    let ids: Vec<[Option<String>; 4]> = chunk
                        .iter()
                        .map(|l| {
                            [
                                Some(l.agent_id.to_string()),
                                l.deployment_id.map(|d| d.to_string()),
                                l.session_id.map(|d| d.to_string()),
                                l.instance_id.map(|d| d.to_string()),
                            ]
                        })
                        .collect();
                    let mut params = Vec::with_capacity(chunk.len() * 8);
                    for (l, ids) in chunk.iter().zip(&ids) {
                        params.push(Val::Text(&l.org));
                        for id in ids {
                            params.push(id.as_ref().into());
                        }
                        params.push(l.ts_ns.into());
                        params.push(Val::Text(l.stream));
                        params.push(Val::Text(&l.line));
                    }
                    db.exec(&sql, &params)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn query_logs(&self, agent_id: Uuid, f: &LogFilter) -> StoreResult<(i64, Vec<LogLine>)> {
        let filter = "agent_id = ?1 AND (?2 IS NULL OR deployment_id = ?2) \
            AND (?3 IS NULL OR session_id = ?3) AND (?4 IS NULL OR instr(line, ?4) > 0) \
            AND (?5 IS NULL OR ts_ns >= ?5) AND (?6 IS NULL OR ts_ns <= ?6)";
        let dep = f.deployment_id.map(|d| d.to_string());
        let sess = f.session_id.map(|d| d.to_string());
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM logs WHERE {filter}"))
            .bind(agent_id.to_string())
            .bind(&dep)
            .bind(&sess)
            .bind(&f.query)
            .bind(f.start_ns)
            .bind(f.end_ns)
            .fetch_one(&mut *self.read().await?)
            .await?;
        let order = if f.desc { "DESC" } else { "ASC" };
        let rows = sqlx::query(&format!(
            "SELECT * FROM logs WHERE {filter} ORDER BY ts_ns {order}, seq {order} LIMIT ?7 OFFSET ?8"
        ))
        .bind(agent_id.to_string())
        .bind(&dep)
        .bind(&sess)
        .bind(&f.query)
        .bind(f.start_ns)
        .bind(f.end_ns)
        .bind(f.limit)
        .bind(f.offset)
        .fetch_all(&mut *self.read().await?)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let stream: String = r.get("stream");
            out.push(LogLine {
                org: r.get("org"),
                agent_id: uuid_of(r.get("agent_id"))?,
                deployment_id: r
                    .get::<Option<String>, _>("deployment_id")
                    .map(|s| uuid_of(&s))
                    .transpose()?,
                session_id: r
                    .get::<Option<String>, _>("session_id")
                    .map(|s| uuid_of(&s))
                    .transpose()?,
                instance_id: r
                    .get::<Option<String>, _>("instance_id")
                    .map(|s| uuid_of(&s))
                    .transpose()?,
                ts_ns: r.get("ts_ns"),
                stream: match stream.as_str() {
                    "stdout" => "stdout",
                    "stderr" => "stderr",
                    _ => "platform",
                },
                line: r.get("line"),
            });
        }
        Ok((total, out))
    }

    async fn prune_logs(&self, before_ns: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM logs WHERE ts_ns < ?")
            .bind(before_ns)
            .execute(&mut self.writer.lock().await.sqlx)
            .await?;
        Ok(r.rows_affected())
    }

    async fn prune_logs_over(&self, max_lines: u64) -> StoreResult<u64> {
        // `seq` grows by arrival, so the newest `max_lines` rows are those with
        // seq > max(seq) - max_lines: one index lookup and one range delete on the primary key.
        let max_lines = i64::try_from(max_lines).unwrap_or(i64::MAX);
        let r = sqlx::query(
            "DELETE FROM logs WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM logs) - ?",
        )
        .bind(max_lines)
        .execute(&mut self.writer.lock().await.sqlx)
        .await?;
        Ok(r.rows_affected())
    }
}

/// Stored form of samples: a JSON array of `{"t", "c", "m"}`.
fn samples_json(samples: &[MetricSample]) -> String {
    let v: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| serde_json::json!({"t": s.t, "c": s.cpu_millicores, "m": s.memory_bytes}))
        .collect();
    serde_json::Value::from(v).to_string()
}

/// Samples from their stored form (an unreadable entry is skipped).
fn samples_of(text: &str) -> Vec<MetricSample> {
    let Ok(serde_json::Value::Array(a)) = serde_json::from_str(text) else {
        return Vec::new();
    };
    a.iter()
        .filter_map(|e| {
            Some(MetricSample {
                t: e["t"].as_i64()?,
                cpu_millicores: e["c"].as_u64()?,
                memory_bytes: e["m"].as_u64()?,
            })
        })
        .collect()
}

/// A session from a direct read of [`SESSION_COLS`] (in that order).
fn session_from_raw(r: &raw::Row<'_>) -> StoreResult<SessionRecord> {
    session_from_cols(|i| r.text(i), |i| r.int(i))
}

/// A session from a row of [`SESSION_COLS`] (in that order) of either driver, read by column
/// index as text or integer (`None` for NULL).
fn session_from_cols(
    text: impl Fn(usize) -> Option<String>,
    int: impl Fn(usize) -> Option<i64>,
) -> StoreResult<SessionRecord> {
    let end = int(6).map(|ended_ms| SessionEnd {
        ended_ms,
        reason: end_reason(text(10).as_deref().unwrap_or("")),
        completion_status: text(9).unwrap_or_default(),
        exit_code: int(11).map(|v| v as i32),
        exit_signal: int(12).map(|v| v as i32),
        message: text(13),
    });
    Ok(SessionRecord {
        id: uuid_of(&text(0).unwrap_or_default())?,
        org: text(1).unwrap_or_default(),
        agent_id: uuid_of(&text(2).unwrap_or_default())?,
        deployment_id: uuid_of(&text(3).unwrap_or_default())?,
        created_ms: int(4).unwrap_or_default(),
        updated_ms: int(5).unwrap_or_default(),
        bot_start_ms: int(7),
        cold_start: int(8).map(|v| v != 0),
        transport: text(14),
        end,
        samples: text(15).map(|m| samples_of(&m)).unwrap_or_default(),
    })
}

fn insert_session_raw(db: &mut raw::Conn, s: &SessionRecord) -> StoreResult<()> {
    db.exec(
        "INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, \
         bot_start_ms, cold_start, transport) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        &[
            Val::Text(&s.id.to_string()),
            Val::Text(&s.org),
            Val::Text(&s.agent_id.to_string()),
            Val::Text(&s.deployment_id.to_string()),
            s.created_ms.into(),
            s.updated_ms.into(),
            s.bot_start_ms.into(),
            s.cold_start.map(i64::from).into(),
            s.transport.as_ref().into(),
        ],
    )
    .map(|_| ())
}

/// Records the end if none is recorded yet (first wins); whether this call wrote it.
fn end_session_raw(db: &mut raw::Conn, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
    let d = db.exec(
        "UPDATE sessions SET ended_ms = ?, updated_ms = ?, end_reason = ?, completion_status = ?, \
         exit_code = ?, exit_signal = ?, end_message = ? WHERE id = ? AND ended_ms IS NULL",
        &[
            e.ended_ms.into(),
            e.ended_ms.into(),
            Val::Text(e.reason.as_str()),
            Val::Text(&e.completion_status),
            e.exit_code.map(i64::from).into(),
            e.exit_signal.map(i64::from).into(),
            e.message.as_ref().into(),
            Val::Text(&id.to_string()),
        ],
    )?;
    Ok(d.changes == 1)
}

fn set_from_row(r: &sqlx::sqlite::SqliteRow) -> StoreResult<SecretSetRecord> {
    Ok(SecretSetRecord {
        org: r.get("org"),
        name: r.get("name"),
        kind: SecretSetKind::parse(r.get("kind"))
            .ok_or_else(|| StoreError::Backend("bad secret set kind".into()))?,
        region: r.get("region"),
        host: r.get("host"),
        created_ms: r.get("created_ms"),
        updated_ms: r.get("updated_ms"),
        keys: Vec::new(),
    })
}

fn sealed_from_row(r: &sqlx::sqlite::SqliteRow) -> SealedValue {
    SealedValue {
        key: r.get("key"),
        nonce: r.get("nonce"),
        ciphertext: r.get("ciphertext"),
    }
}

/// Inserts a deployment and, when it binds a secret set, snapshots the set's sealed values
/// into `deployment_secrets` in the same transaction (see the migration's comment).
async fn insert_dep(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    org: &str,
    dep: &DeploymentRecord,
) -> StoreResult<()> {
    let spec = serde_json::to_string(&dep.spec).map_err(|e| StoreError::Backend(e.to_string()))?;
    sqlx::query("INSERT INTO deployments (id, agent_id, spec, created_ms) VALUES (?, ?, ?, ?)")
        .bind(dep.id.to_string())
        .bind(dep.agent_id.to_string())
        .bind(spec)
        .bind(dep.created_ms)
        .execute(&mut **tx)
        .await?;
    if let Some(set) = &dep.spec.secret_set {
        let exists: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM secret_sets WHERE org = ? AND name = ? AND kind = 'secret'",
        )
        .bind(org)
        .bind(set)
        .fetch_one(&mut **tx)
        .await?;
        if exists == 0 {
            return Err(StoreError::Backend(format!(
                "secret set {set} was deleted while the deployment was being created; retry"
            )));
        }
        sqlx::query(
            "INSERT INTO deployment_secrets (deployment_id, org, set_name, key, nonce, ciphertext) \
             SELECT ?, org, set_name, key, nonce, ciphertext FROM secrets \
             WHERE org = ? AND set_name = ?",
        )
        .bind(dep.id.to_string())
        .bind(org)
        .bind(set)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::now_ms;

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
        store.create_agent(&agent, &dep).await.unwrap();
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
}
