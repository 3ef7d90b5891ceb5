//! Sessions: one row each; the end is written once (first wins).

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Conn, Row, Val};
use super::SqliteStore;
use crate::model::{
    EndState, MetricSample, SessionEnd, SessionRecord, SessionRoom, NEVER_DELIVERED,
    START_TIMEOUT_MESSAGE,
};
pub(super) use crate::store::codec::samples_json;
use crate::store::codec::{end_reason, samples_of};
use crate::store::{SessionFilter, SessionStore, StoreError, StoreResult};

pub(super) const SESSION_COLS: &str = "id, org, agent_id, deployment_id, created_ms, updated_ms, \
    ended_ms, bot_start_ms, cold_start, completion_status, end_reason, exit_code, exit_signal, \
    end_message, transport, samples, node_id, daily_room, daily_room_keep";

/// The SQL condition (with its parameters) for sessions in end state `e`
/// ([`EndState::of`]'s mapping, by reason and, for failed starts, message).
fn end_state_sql(e: EndState, params: &mut Vec<Val<'static>>) -> String {
    if e == EndState::Active {
        return " AND ended_ms IS NULL".into();
    }
    let reasons = e.reasons();
    let marks = vec!["?"; reasons.len()].join(", ");
    params.extend(reasons.iter().map(|r| Val::from(r.as_str())));
    let timeout = format!("{START_TIMEOUT_MESSAGE}%");
    let cond = match e {
        EndState::AgentStartTimeout => " AND COALESCE(end_message, '') LIKE ?",
        EndState::AgentError => {
            " AND NOT (end_reason = 'start_failed' AND COALESCE(end_message, '') LIKE ?)"
        }
        _ => "",
    };
    if !cond.is_empty() {
        params.push(Val::Str(timeout));
    }
    // `client_disconnected` is in two states: before delivery, or after.
    let hung_up = match e {
        EndState::Completed => {
            " AND NOT (end_reason = 'client_disconnected' AND COALESCE(completion_status, '') = ?)"
        }
        EndState::EndedBeforeAgentStart => {
            " AND NOT (end_reason = 'client_disconnected' AND COALESCE(completion_status, '') <> ?)"
        }
        _ => "",
    };
    if !hung_up.is_empty() {
        params.push(Val::from(NEVER_DELIVERED));
    }
    format!(" AND ended_ms IS NOT NULL AND end_reason IN ({marks}){cond}{hung_up}")
}

/// A session from a row of [`SESSION_COLS`] (in that order).
pub(super) fn session_from_row(r: &Row<'_>) -> StoreResult<SessionRecord> {
    let end = r.int(6).map(|ended_ms| SessionEnd {
        ended_ms,
        reason: end_reason(&r.string(10)),
        completion_status: r.string(9),
        exit_code: r.int(11).map(|v| v as i32),
        exit_signal: r.int(12).map(|v| v as i32),
        message: r.text(13),
    });
    Ok(SessionRecord {
        id: r.uuid(0)?,
        org: r.string(1),
        agent_id: r.uuid(2)?,
        deployment_id: r.uuid(3)?,
        created_ms: r.int(4).unwrap_or_default(),
        updated_ms: r.int(5).unwrap_or_default(),
        bot_start_ms: r.int(7),
        cold_start: r.int(8).map(|v| v != 0),
        transport: r.text(14),
        end,
        samples: r.text(15).map(|m| samples_of(&m)).unwrap_or_default(),
        node_id: r.string(16),
        daily_room: r.text(17).map(|name| SessionRoom {
            name,
            keep: r.int(18).is_some_and(|k| k != 0),
        }),
    })
}

/// Inserts a session; a websocket session recorded at `/start` while it waits for its client
/// ([`SessionRecord::waiting_for_client`]) is taken over instead: its deployment, `coldStart`
/// and update time change, its creation time stays. An ended one is not: `Conflict`.
pub(super) fn insert_session(db: &mut Conn, s: &SessionRecord) -> StoreResult<()> {
    let n = db.exec(
        "INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, \
         bot_start_ms, cold_start, transport, node_id, daily_room, daily_room_keep) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET deployment_id = excluded.deployment_id, \
         cold_start = excluded.cold_start, updated_ms = excluded.updated_ms, \
         node_id = excluded.node_id \
         WHERE sessions.ended_ms IS NULL AND sessions.cold_start IS NULL \
         AND sessions.bot_start_ms IS NULL AND sessions.org = excluded.org \
         AND sessions.agent_id = excluded.agent_id",
        &[
            s.id.into(),
            Val::Text(&s.org),
            s.agent_id.into(),
            s.deployment_id.into(),
            s.created_ms.into(),
            s.updated_ms.into(),
            s.bot_start_ms.into(),
            s.cold_start.into(),
            s.transport.as_ref().into(),
            Val::Text(&s.node_id),
            s.daily_room.as_ref().map(|r| r.name.as_str()).into(),
            s.daily_room.as_ref().is_some_and(|r| r.keep).into(),
        ],
    )?;
    if n == 0 {
        return Err(StoreError::Conflict);
    }
    Ok(())
}

/// Records the end of a session with `UPDATE ... WHERE id = ? AND ended_ms IS NULL`, then the
/// condition given (`AND ...`, or none).
macro_rules! end_sql {
    ($and:literal) => {
        concat!(
            "UPDATE sessions SET ended_ms = ?, updated_ms = ?, end_reason = ?, \
             completion_status = ?, exit_code = ?, exit_signal = ?, end_message = ? \
             WHERE id = ? AND ended_ms IS NULL",
            $and
        )
    };
}

/// [`end_session`] of a session that waits for its client
/// ([`crate::model::SessionRecord::waiting_for_client`]).
const END_WAITING_SQL: &str =
    end_sql!(" AND cold_start IS NULL AND bot_start_ms IS NULL AND transport = 'websocket'");

/// Records the end if none is recorded yet (first wins); whether this call wrote it.
pub(super) fn end_session(db: &mut Conn, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
    end_session_as(db, id, e, end_sql!(""))
}

/// [`end_session`] with the statement `sql` ([`end_sql`]).
fn end_session_as(db: &mut Conn, id: Uuid, e: &SessionEnd, sql: &str) -> StoreResult<bool> {
    let message = e.message.as_deref().map(crate::store::codec::storable_text);
    let n = db.exec(
        sql,
        &[
            e.ended_ms.into(),
            e.ended_ms.into(),
            Val::Text(e.reason.as_str()),
            Val::Text(&e.completion_status),
            e.exit_code.map(i64::from).into(),
            e.exit_signal.map(i64::from).into(),
            message.as_deref().into(),
            id.into(),
        ],
    )?;
    Ok(n == 1)
}

pub(super) fn set_samples(db: &mut Conn, id: Uuid, samples: &str) -> StoreResult<()> {
    db.exec(
        "UPDATE sessions SET samples = ? WHERE id = ?",
        &[Val::Text(samples), id.into()],
    )
    .map(|_| ())
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn insert_session(&self, s: &SessionRecord) -> StoreResult<()> {
        let s = s.clone();
        self.write(move |db| insert_session(db, &s)).await
    }

    async fn mark_delivered(&self, id: Uuid, bot_start_ms: i64) -> StoreResult<bool> {
        let now = crate::model::now_ms();
        self.write(move |db| {
            db.exec(
                "UPDATE sessions SET bot_start_ms = ?, updated_ms = ? WHERE id = ? AND ended_ms IS NULL",
                &[bot_start_ms.into(), now.into(), id.into()],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn end_session(&self, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
        let e = e.clone();
        self.write(move |db| end_session(db, id, &e)).await
    }

    async fn end_waiting_session(&self, id: Uuid, e: &SessionEnd) -> StoreResult<bool> {
        let e = e.clone();
        self.write(move |db| end_session_as(db, id, &e, END_WAITING_SQL))
            .await
    }

    async fn set_session_samples(&self, id: Uuid, samples: &[MetricSample]) -> StoreResult<()> {
        let m = samples_json(samples);
        self.write(move |db| set_samples(db, id, &m)).await
    }

    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>> {
        // A direct read on this thread.
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?");
        self.read_now(|db| db.query_row(&sql, &[id.into()], session_from_row))?
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
        let mut params: Vec<Val<'static>> = vec![agent_id.into()];
        if let Some(d) = f.deployment_id {
            filter.push_str(" AND deployment_id = ?");
            params.push(d.into());
        }
        match f.active {
            Some(true) => filter.push_str(" AND ended_ms IS NULL"),
            Some(false) => filter.push_str(" AND ended_ms IS NOT NULL"),
            None => {}
        }
        if let Some(c) = f.cold {
            filter.push_str(" AND cold_start = ?");
            params.push(c.into());
        }
        if let Some(t) = f.start_ms {
            filter.push_str(" AND created_ms >= ?");
            params.push(t.into());
        }
        if let Some(t) = f.end_ms {
            filter.push_str(" AND created_ms <= ?");
            params.push(t.into());
        }
        if let Some(r) = f.end_reason {
            filter.push_str(" AND end_reason = ?");
            params.push(r.as_str().into());
        }
        if let Some(t) = f.bot_start_min_ms {
            filter.push_str(" AND bot_start_ms >= ?");
            params.push(t.into());
        }
        if let Some(t) = f.bot_start_max_ms {
            filter.push_str(" AND bot_start_ms <= ?");
            params.push(t.into());
        }
        if let Some(e) = f.end_state {
            filter.push_str(&end_state_sql(e, &mut params));
        }
        let count_sql = format!("SELECT COUNT(*) FROM sessions WHERE {filter}");
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
        let (limit, offset) = (f.limit, f.offset);
        self.scan(move |db| {
            let total = db.query_int(&count_sql, &params)?;
            params.push(limit.into());
            params.push(offset.into());
            let list = db.query_all(&select_sql, &params, session_from_row)?;
            Ok((total, list))
        })
        .await
    }

    async fn request_stop(&self, id: Uuid, deadline_ms: i64) -> StoreResult<()> {
        self.write(move |db| {
            db.exec(
                "UPDATE sessions SET stop_deadline_ms = COALESCE(stop_deadline_ms, ?) \
                 WHERE id = ? AND ended_ms IS NULL",
                &[deadline_ms.into(), id.into()],
            )
            .map(|_| ())
        })
        .await
    }

    async fn stop_requests(&self) -> StoreResult<Vec<(Uuid, i64)>> {
        self.scan(|db| {
            db.query_all(
                "SELECT id, stop_deadline_ms FROM sessions \
                 WHERE ended_ms IS NULL AND stop_deadline_ms IS NOT NULL",
                &[],
                |r| Ok((r.uuid(0)?, r.int(1).unwrap_or_default())),
            )
        })
        .await
    }

    async fn list_open_sessions(&self) -> StoreResult<Vec<SessionRecord>> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE ended_ms IS NULL");
        self.scan(move |db| db.query_all(&sql, &[], session_from_row))
            .await
    }
}
