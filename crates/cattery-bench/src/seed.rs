//! Seeding ended session rows straight into `cattery.db` (server stopped), so API latency can
//! be measured at 1,000 and 100,000 stored sessions without running that many sessions.
//! Rows follow the `sessions` table of `crates/cattery/migrations/0001_init.sql`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection};

/// Rows per multi-row `INSERT` (13 bound values each; well under SQLite's variable limit).
const ROWS_PER_INSERT: usize = 500;

/// Adds ended sessions for `agent_id` until it has `upto` rows; returns `(rows now, up to
/// 2,000 random session ids of the agent)`. The server must be stopped.
pub async fn seed_sessions(
    db: &Path,
    org: &str,
    agent_id: &str,
    deployment_id: &str,
    upto: u64,
) -> anyhow::Result<(u64, Vec<String>)> {
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    let mut conn = SqliteConnection::connect_with(&opts)
        .await
        .with_context(|| format!("opening {}", db.display()))?;
    let have: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE agent_id = ?")
        .bind(agent_id)
        .fetch_one(&mut conn)
        .await?;
    let have = have.max(0) as u64;
    if upto > have {
        let now = chrono::Utc::now().timestamp_millis();
        let n = (upto - have) as usize;
        let mut tx = conn.begin().await?;
        let mut done = 0usize;
        while done < n {
            let k = ROWS_PER_INSERT.min(n - done);
            let mut sql = String::from(
                "INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, \
                 ended_ms, bot_start_ms, cold_start, completion_status, end_reason, exit_code, \
                 transport) VALUES ",
            );
            for j in 0..k {
                if j > 0 {
                    sql.push(',');
                }
                sql.push_str("(?,?,?,?,?,?,?,?,?,?,?,?,?)");
            }
            let mut q = sqlx::query(&sql);
            for j in 0..k {
                let i = (done + j) as i64;
                // Spread over the past, 37 ms apart, older than anything live.
                let created = now - 86_400_000 - (n as i64 - i) * 37;
                q = q
                    .bind(uuid::Uuid::new_v4().to_string())
                    .bind(org)
                    .bind(agent_id)
                    .bind(deployment_id)
                    .bind(created)
                    .bind(created + 60_000)
                    .bind(created + 60_000)
                    .bind(4_i64)
                    .bind((i % 10 == 0) as i64)
                    .bind("HTTP_COMPLETED")
                    .bind("completed")
                    .bind(0_i64)
                    .bind(Option::<String>::None);
            }
            q.execute(&mut *tx).await?;
            done += k;
        }
        tx.commit().await?;
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE agent_id = ?")
        .bind(agent_id)
        .fetch_one(&mut conn)
        .await?;
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM sessions WHERE agent_id = ? ORDER BY random() LIMIT 2000",
    )
    .bind(agent_id)
    .fetch_all(&mut conn)
    .await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok((total.max(0) as u64, ids))
}
