//! Sessions: one row each; the end is written once (first wins).

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::PgStore;
use crate::model::{
    EndState, MetricSample, SessionEnd, SessionRecord, SessionRoom, NEVER_DELIVERED,
    START_TIMEOUT_MESSAGE,
};
use crate::store::codec::{end_reason, samples_json, samples_of};
use crate::store::{SessionFilter, SessionStore, StoreError, StoreResult};

pub(super) const SESSION_COLS: &str = "id, org, agent_id, deployment_id, created_ms, updated_ms, \
    ended_ms, bot_start_ms, cold_start, completion_status, end_reason, exit_code, exit_signal, \
    end_message, transport, samples, node_id, daily_room, daily_room_keep";

pub(super) fn session_from_row(r: &PgRow) -> StoreResult<SessionRecord> {
    let ended_ms: Option<i64> = r.try_get(6)?;
    let end = match ended_ms {
        Some(ended_ms) => Some(SessionEnd {
            ended_ms,
            reason: end_reason(&r.try_get::<Option<String>, _>(10)?.unwrap_or_default()),
            completion_status: r.try_get::<Option<String>, _>(9)?.unwrap_or_default(),
            exit_code: r.try_get::<Option<i64>, _>(11)?.map(|v| v as i32),
            exit_signal: r.try_get::<Option<i64>, _>(12)?.map(|v| v as i32),
            message: r.try_get(13)?,
        }),
        None => None,
    };
    Ok(SessionRecord {
        id: r.try_get(0)?,
        org: r.try_get(1)?,
        agent_id: r.try_get(2)?,
        deployment_id: r.try_get(3)?,
        created_ms: r.try_get(4)?,
        updated_ms: r.try_get(5)?,
        bot_start_ms: r.try_get(7)?,
        cold_start: r.try_get(8)?,
        transport: r.try_get(14)?,
        end,
        samples: r
            .try_get::<Option<String>, _>(15)?
            .map(|m| samples_of(&m))
            .unwrap_or_default(),
        node_id: r.try_get(16)?,
        daily_room: r
            .try_get::<Option<String>, _>(17)?
            .map(|name| -> StoreResult<SessionRoom> {
                Ok(SessionRoom {
                    name,
                    keep: r.try_get(18)?,
                })
            })
            .transpose()?,
    })
}

/// Inserts a session; a websocket session recorded at `/start` while it waits for its client
/// ([`SessionRecord::waiting_for_client`]) is taken over instead: its deployment, `coldStart`
/// and update time change, its creation time stays. An ended one is not: `Conflict`.
pub(super) async fn insert_session(db: &mut PgConnection, s: &SessionRecord) -> StoreResult<()> {
    let done = sqlx::query(
        "INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, \
         bot_start_ms, cold_start, transport, node_id, daily_room, daily_room_keep) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (id) DO UPDATE SET deployment_id = excluded.deployment_id, \
         cold_start = excluded.cold_start, updated_ms = excluded.updated_ms, \
         node_id = excluded.node_id \
         WHERE sessions.ended_ms IS NULL AND sessions.cold_start IS NULL \
         AND sessions.bot_start_ms IS NULL AND sessions.org = excluded.org \
         AND sessions.agent_id = excluded.agent_id",
    )
    .bind(s.id)
    .bind(&s.org)
    .bind(s.agent_id)
    .bind(s.deployment_id)
    .bind(s.created_ms)
    .bind(s.updated_ms)
    .bind(s.bot_start_ms)
    .bind(s.cold_start)
    .bind(&s.transport)
    .bind(&s.node_id)
    .bind(s.daily_room.as_ref().map(|r| r.name.as_str()))
    .bind(s.daily_room.as_ref().is_some_and(|r| r.keep))
    .execute(db)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::Conflict);
    }
    Ok(())
}

/// Records the end of a session with `UPDATE ... WHERE id = $7 AND ended_ms IS NULL`, then
/// the condition given (`AND ...`, or none).
macro_rules! end_sql {
    ($and:literal) => {
        concat!(
            "UPDATE sessions SET ended_ms = $1, updated_ms = $1, end_reason = $2, \
             completion_status = $3, exit_code = $4, exit_signal = $5, end_message = $6 \
             WHERE id = $7 AND ended_ms IS NULL",
            $and
        )
    };
}
/// [`end_session`] of a session that waits for its client
/// ([`crate::model::SessionRecord::waiting_for_client`]).
const END_WAITING_SQL: &str =
    end_sql!(" AND cold_start IS NULL AND bot_start_ms IS NULL AND transport = 'websocket'");

/// [`end_session`] of a session that waits for its client, as
/// [`crate::store::SessionStore::end_waiting_session`].
pub(super) async fn end_waiting_session(
    db: &mut PgConnection,
    id: Uuid,
    e: &SessionEnd,
) -> StoreResult<bool> {
    end_session_as(db, id, e, END_WAITING_SQL).await
}

/// Records the end if none is recorded yet (first wins); whether this call wrote it.
pub(super) async fn end_session(
    db: &mut PgConnection,
    id: Uuid,
    e: &SessionEnd,
) -> StoreResult<bool> {
    end_session_as(db, id, e, end_sql!("")).await
}

/// [`end_session`] with the statement `sql` ([`end_sql`]).
async fn end_session_as(
    db: &mut PgConnection,
    id: Uuid,
    e: &SessionEnd,
    sql: &'static str,
) -> StoreResult<bool> {
    let n = sqlx::query(sql)
        .bind(e.ended_ms)
        .bind(e.reason.as_str())
        .bind(&e.completion_status)
        .bind(e.exit_code.map(i64::from))
        .bind(e.exit_signal.map(i64::from))
        .bind(e.message.as_deref().map(crate::store::codec::storable_text))
        .bind(id)
        .execute(db)
        .await?
        .rows_affected();
    Ok(n == 1)
}

pub(super) async fn set_samples(db: &mut PgConnection, id: Uuid, samples: &str) -> StoreResult<()> {
    sqlx::query("UPDATE sessions SET samples = $1 WHERE id = $2")
        .bind(samples)
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// Appends the `WHERE` terms of a session list (only those that are set, so the planner
/// can use an index).
fn push_filter(q: &mut QueryBuilder<Postgres>, agent_id: Uuid, f: &SessionFilter) {
    q.push(" WHERE agent_id = ").push_bind(agent_id);
    if let Some(d) = f.deployment_id {
        q.push(" AND deployment_id = ").push_bind(d);
    }
    match f.active {
        Some(true) => {
            q.push(" AND ended_ms IS NULL");
        }
        Some(false) => {
            q.push(" AND ended_ms IS NOT NULL");
        }
        None => {}
    }
    if let Some(c) = f.cold {
        q.push(" AND cold_start = ").push_bind(c);
    }
    if let Some(t) = f.start_ms {
        q.push(" AND created_ms >= ").push_bind(t);
    }
    if let Some(t) = f.end_ms {
        q.push(" AND created_ms <= ").push_bind(t);
    }
    if let Some(r) = f.end_reason {
        q.push(" AND end_reason = ").push_bind(r.as_str());
    }
    if let Some(t) = f.bot_start_min_ms {
        q.push(" AND bot_start_ms >= ").push_bind(t);
    }
    if let Some(t) = f.bot_start_max_ms {
        q.push(" AND bot_start_ms <= ").push_bind(t);
    }
    if let Some(e) = f.end_state {
        push_end_state(q, e);
    }
}

/// The condition for sessions in end state `e` ([`EndState::of`]'s mapping, by reason and,
/// for failed starts, message), as the SQLite store writes it.
fn push_end_state(q: &mut QueryBuilder<Postgres>, e: EndState) {
    if e == EndState::Active {
        q.push(" AND ended_ms IS NULL");
        return;
    }
    let reasons: Vec<String> = e.reasons().iter().map(|r| r.as_str().to_string()).collect();
    q.push(" AND ended_ms IS NOT NULL AND end_reason = ANY(")
        .push_bind(reasons)
        .push(")");
    let timeout = format!("{START_TIMEOUT_MESSAGE}%");
    match e {
        EndState::AgentStartTimeout => {
            q.push(" AND COALESCE(end_message, '') LIKE ")
                .push_bind(timeout);
        }
        EndState::AgentError => {
            q.push(" AND NOT (end_reason = 'start_failed' AND COALESCE(end_message, '') LIKE ")
                .push_bind(timeout)
                .push(")");
        }
        _ => {}
    }
    // `client_disconnected` is in two states: before delivery, or after.
    let hung_up = match e {
        EndState::Completed => "=",
        EndState::EndedBeforeAgentStart => "<>",
        _ => return,
    };
    q.push(" AND NOT (end_reason = 'client_disconnected' AND COALESCE(completion_status, '') ")
        .push(hung_up)
        .push(" ")
        .push_bind(NEVER_DELIVERED)
        .push(")");
}

#[async_trait]
impl SessionStore for PgStore {
    async fn insert_session(&self, s: &SessionRecord) -> StoreResult<()> {
        let mut c = self.pool.acquire().await?;
        insert_session(&mut c, s).await
    }

    async fn mark_delivered(&self, id: Uuid, bot_start_ms: i64) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE sessions SET bot_start_ms = $1, updated_ms = $2 WHERE id = $3 AND ended_ms IS NULL",
        )
        .bind(bot_start_ms)
        .bind(crate::model::now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn end_session(&self, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
        let mut c = self.pool.acquire().await?;
        end_session(&mut c, id, e).await
    }

    async fn end_waiting_session(&self, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
        let mut c = self.pool.acquire().await?;
        end_waiting_session(&mut c, id, e).await
    }

    async fn set_session_samples(&self, id: Uuid, samples: &[MetricSample]) -> StoreResult<()> {
        let mut c = self.pool.acquire().await?;
        set_samples(&mut c, id, &samples_json(samples)).await
    }

    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = $1");
        let row = super::query_dyn(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn list_sessions(
        &self,
        agent_id: Uuid,
        f: &SessionFilter,
    ) -> StoreResult<(i64, Vec<SessionRecord>)> {
        let mut count = QueryBuilder::<Postgres>::new("SELECT COUNT(*) FROM sessions");
        push_filter(&mut count, agent_id, f);
        let total: i64 = count.build().fetch_one(&self.pool).await?.try_get(0)?;
        let mut select =
            QueryBuilder::<Postgres>::new(format!("SELECT {SESSION_COLS} FROM sessions"));
        push_filter(&mut select, agent_id, f);
        select
            .push(" ORDER BY created_ms DESC, seq DESC LIMIT ")
            .push_bind(f.limit)
            .push(" OFFSET ")
            .push_bind(f.offset);
        let rows = select.build().fetch_all(&self.pool).await?;
        let list = rows
            .iter()
            .map(session_from_row)
            .collect::<StoreResult<_>>()?;
        Ok((total, list))
    }

    async fn request_stop(&self, id: Uuid, deadline_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE sessions SET stop_deadline_ms = COALESCE(stop_deadline_ms, $1) \
             WHERE id = $2 AND ended_ms IS NULL",
        )
        .bind(deadline_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn stop_requests(&self) -> StoreResult<Vec<(Uuid, i64)>> {
        let rows = sqlx::query(
            "SELECT id, stop_deadline_ms FROM sessions \
             WHERE ended_ms IS NULL AND stop_deadline_ms IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn list_open_sessions(&self) -> StoreResult<Vec<SessionRecord>> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE ended_ms IS NULL");
        let rows = super::query_dyn(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(session_from_row).collect()
    }
}
