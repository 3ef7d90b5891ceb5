//! The embedded default store: one SQLite file (`<data-dir>/cattery.db`) in WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use super::{
    LogFilter, OrgRecord, SealedValue, SecretSetKind, SecretSetRecord, SessionFilter, Store,
    StoreError, StoreResult,
};
use crate::model::{
    AgentRecord, ApiKeyRecord, DeploymentRecord, DeploymentSpec, EndReason, InstanceRecord,
    KeyKind, LogLine, SessionEnd, SessionRecord,
};

/// SQLite-backed [`Store`].
///
/// Two pools on the same file: `pool` (several connections) for reads, and `writer` (one
/// connection) for every write. WAL lets readers run beside the one writer; funnelling writes
/// through a single connection means they queue in the pool (FIFO, async) instead of
/// colliding on SQLite's write lock, where the busy handler sleeps 1 ms, 2 ms, 5 ms...
/// between retries (which made p99 start latency at concurrency 8 cost ~10 ms).
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: SqlitePool,
}

/// Bytes of the database file that connections map into memory (reads without `read(2)`).
const MMAP_SIZE: &str = "268435456";
/// Pages of page cache per connection (negative: KiB), 16 MiB.
const CACHE_SIZE: &str = "-16384";
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
        _ => EndReason::Error,
    }
}

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] from a reader connection. `PASSIVE` never
/// waits for the writer or readers, and the writer never waits for it, so its fsyncs stay
/// off the write path; the writer restarts the WAL from the top once a checkpoint caught up.
/// Runs for the life of the process.
async fn checkpoints(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
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
        // No ping before each acquire (`test_before_acquire`): for SQLite it is a full round
        // trip to the connection's worker thread, doubling the cost of every query.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.clone())
            .await?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(opts)
            .await?;
        tokio::spawn(checkpoints(pool.clone()));
        Ok(SqliteStore { pool, writer })
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
        let ended_ms: Option<i64> = r.get("ended_ms");
        let end = ended_ms.map(|ended_ms| SessionEnd {
            ended_ms,
            reason: end_reason(
                r.get::<Option<String>, _>("end_reason")
                    .as_deref()
                    .unwrap_or(""),
            ),
            completion_status: r
                .get::<Option<String>, _>("completion_status")
                .unwrap_or_default(),
            exit_code: r.get::<Option<i64>, _>("exit_code").map(|v| v as i32),
            exit_signal: r.get::<Option<i64>, _>("exit_signal").map(|v| v as i32),
            message: r.get("end_message"),
        });
        let metrics: Option<String> = r.get("metrics");
        Ok(SessionRecord {
            id: uuid_of(r.get("id"))?,
            org: r.get("org"),
            agent_id: uuid_of(r.get("agent_id"))?,
            deployment_id: uuid_of(r.get("deployment_id"))?,
            created_ms: r.get("created_ms"),
            updated_ms: r.get("updated_ms"),
            bot_start_ms: r.get("bot_start_ms"),
            cold_start: r.get::<Option<i64>, _>("cold_start").map(|v| v != 0),
            transport: r.get("transport"),
            end,
            metrics: metrics.and_then(|m| serde_json::from_str(&m).ok()),
        })
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
    transport, metrics";

#[async_trait]
impl Store for SqliteStore {
    async fn ensure_org(&self, name: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO orgs (name, verbose_name, created_ms) VALUES (?1, ?1, ?2) \
             ON CONFLICT(name) DO NOTHING",
        )
        .bind(name)
        .bind(crate::model::now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn list_orgs(&self) -> StoreResult<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM orgs ORDER BY created_ms, name")
            .fetch_all(&self.pool)
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
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn find_key(&self, hash: &[u8]) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE key_hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some((Self::key_from_row(&r)?, r.get("key_hash")))),
            None => Ok(None),
        }
    }

    async fn list_keys(&self, org: &str, kind: Option<KeyKind>) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE org = ?1 AND (?2 IS NULL OR kind = ?2) ORDER BY created_ms",
        )
        .bind(org)
        .bind(kind.map(|k| k.as_str()))
        .fetch_all(&self.pool)
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
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn create_agent(&self, a: &AgentRecord, dep: &DeploymentRecord) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
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
        let mut tx = self.writer.begin().await?;
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
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(Self::agent_from_row).transpose()
    }

    async fn get_agent_by_id(&self, id: Uuid) -> StoreResult<Option<AgentRecord>> {
        let row = sqlx::query("SELECT * FROM agents WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::agent_from_row).transpose()
    }

    async fn list_agents(&self, org: &str) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM agents WHERE org = ? AND deleted_ms IS NULL ORDER BY created_ms, name",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::agent_from_row).collect()
    }

    async fn list_all_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query("SELECT * FROM agents WHERE deleted_ms IS NULL")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::agent_from_row).collect()
    }

    async fn delete_agent(&self, id: Uuid, at_ms: i64) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET deleted_ms = ?, updated_ms = ? WHERE id = ?")
            .bind(at_ms)
            .bind(at_ms)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn get_deployment(&self, id: Uuid) -> StoreResult<Option<DeploymentRecord>> {
        let row = sqlx::query("SELECT * FROM deployments WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::dep_from_row).transpose()
    }

    async fn list_deployments(&self, agent_id: Uuid) -> StoreResult<Vec<DeploymentRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM deployments WHERE agent_id = ? ORDER BY created_ms DESC, rowid DESC",
        )
        .bind(agent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::dep_from_row).collect()
    }

    async fn insert_session(&self, s: &SessionRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, \
             bot_start_ms, cold_start, transport) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id.to_string())
        .bind(&s.org)
        .bind(s.agent_id.to_string())
        .bind(s.deployment_id.to_string())
        .bind(s.created_ms)
        .bind(s.updated_ms)
        .bind(s.bot_start_ms)
        .bind(s.cold_start.map(|b| b as i64))
        .bind(&s.transport)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn mark_delivered(&self, id: Uuid, bot_start_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE sessions SET bot_start_ms = ?, updated_ms = ? WHERE id = ? AND ended_ms IS NULL",
        )
        .bind(bot_start_ms)
        .bind(crate::model::now_ms())
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn end_session(&self, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE sessions SET ended_ms = ?, updated_ms = ?, end_reason = ?, completion_status = ?, \
             exit_code = ?, exit_signal = ?, end_message = ? WHERE id = ? AND ended_ms IS NULL",
        )
        .bind(e.ended_ms)
        .bind(e.ended_ms)
        .bind(e.reason.as_str())
        .bind(&e.completion_status)
        .bind(e.exit_code.map(i64::from))
        .bind(e.exit_signal.map(i64::from))
        .bind(&e.message)
        .bind(id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_session_metrics(&self, id: Uuid, m: &serde_json::Value) -> StoreResult<()> {
        sqlx::query("UPDATE sessions SET metrics = ? WHERE id = ?")
            .bind(m.to_string())
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query(&format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::session_from_row).transpose()
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
            .fetch_one(&self.pool)
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
            .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::session_from_row).collect()
    }

    async fn put_instance(&self, i: &InstanceRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO instances (id, agent_id, deployment_id, session_id, pid, pid_start, \
             port, cgroup, dir, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(i.id.to_string())
        .bind(i.agent_id.to_string())
        .bind(i.deployment_id.to_string())
        .bind(i.session_id.map(|s| s.to_string()))
        .bind(i.pid as i64)
        .bind(i.pid_start as i64)
        .bind(i.port as i64)
        .bind(&i.cgroup)
        .bind(&i.dir)
        .bind(i.created_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn delete_instance(&self, id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM instances WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn list_instances(&self) -> StoreResult<Vec<InstanceRecord>> {
        let rows = sqlx::query("SELECT * FROM instances")
            .fetch_all(&self.pool)
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
                    pid: r.get::<i64, _>("pid") as i32,
                    pid_start: r.get::<i64, _>("pid_start") as u64,
                    port: r.get::<i64, _>("port") as u16,
                    cgroup: r.get("cgroup"),
                    dir: r.get("dir"),
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
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    async fn get_secret_set(&self, org: &str, name: &str) -> StoreResult<Option<SecretSetRecord>> {
        let row = sqlx::query("SELECT * FROM secret_sets WHERE org = ? AND name = ?")
            .bind(org)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = row else { return Ok(None) };
        let mut set = set_from_row(&r)?;
        set.keys = sqlx::query_scalar(
            "SELECT key FROM secrets WHERE org = ? AND set_name = ? ORDER BY key",
        )
        .bind(org)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(set))
    }

    async fn list_secret_sets(&self, org: &str) -> StoreResult<Vec<SecretSetRecord>> {
        let rows = sqlx::query("SELECT * FROM secret_sets WHERE org = ? ORDER BY name")
            .bind(org)
            .fetch_all(&self.pool)
            .await?;
        let mut sets = rows
            .iter()
            .map(set_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let keys = sqlx::query("SELECT set_name, key FROM secrets WHERE org = ? ORDER BY key")
            .bind(org)
            .fetch_all(&self.pool)
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
        let mut tx = self.writer.begin().await?;
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
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(sealed_from_row).collect())
    }

    async fn delete_secret_set(&self, org: &str, name: &str) -> StoreResult<bool> {
        let r = sqlx::query("DELETE FROM secret_sets WHERE org = ? AND name = ?")
            .bind(org)
            .bind(name)
            .execute(&self.writer)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn delete_secret(&self, org: &str, name: &str, key: &str) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await?;
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
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("set_name"), sealed_from_row(r)))
            .collect())
    }

    async fn get_org(&self, name: &str) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query("SELECT * FROM orgs WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
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
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        // One multi-row INSERT per chunk: one round trip to the connection's worker thread
        // per chunk instead of one per line, all in one transaction.
        let mut tx = self.writer.begin().await?;
        for chunk in lines.chunks(LOG_ROWS_PER_INSERT) {
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
            let mut q = sqlx::query(&sql);
            for l in chunk {
                q = q
                    .bind(&l.org)
                    .bind(l.agent_id.to_string())
                    .bind(l.deployment_id.map(|d| d.to_string()))
                    .bind(l.session_id.map(|d| d.to_string()))
                    .bind(l.instance_id.map(|d| d.to_string()))
                    .bind(l.ts_ns)
                    .bind(l.stream)
                    .bind(&l.line);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
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
            .fetch_one(&self.pool)
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
        .fetch_all(&self.pool)
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
            .execute(&self.writer)
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
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected())
    }
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
