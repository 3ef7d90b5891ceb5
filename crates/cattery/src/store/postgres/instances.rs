//! Records of live instances, and the two writes that tie them to sessions.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::{json_of, PgStore};
use crate::model::{InstanceRecord, MetricSample, SessionEnd, SessionRecord};
use crate::store::codec::samples_json;
use crate::store::{InstanceStore, StoreResult};

/// The columns [`instance_from_row`] reads, in order.
pub(super) const INSTANCE_COLS: &str =
    "id, agent_id, deployment_id, session_id, runtime, placement, created_ms, node_id";

pub(super) fn instance_from_row(r: &PgRow) -> StoreResult<InstanceRecord> {
    let placement: String = r.try_get(5)?;
    Ok(InstanceRecord {
        id: r.try_get(0)?,
        agent_id: r.try_get(1)?,
        deployment_id: r.try_get(2)?,
        session_id: r.try_get(3)?,
        runtime: r.try_get(4)?,
        placement: json_of(&placement, "instance placement")?,
        created_ms: r.try_get(6)?,
        node_id: r.try_get(7)?,
    })
}

#[async_trait]
impl InstanceStore for PgStore {
    async fn put_instance(&self, i: &InstanceRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO instances (id, agent_id, deployment_id, session_id, runtime, placement, \
             created_ms, node_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET agent_id = EXCLUDED.agent_id, \
             deployment_id = EXCLUDED.deployment_id, session_id = EXCLUDED.session_id, \
             runtime = EXCLUDED.runtime, placement = EXCLUDED.placement, \
             created_ms = EXCLUDED.created_ms, node_id = EXCLUDED.node_id",
        )
        .bind(i.id)
        .bind(i.agent_id)
        .bind(i.deployment_id)
        .bind(i.session_id)
        .bind(&i.runtime)
        .bind(i.placement.to_string())
        .bind(i.created_ms)
        .bind(&i.node_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn update_instance(&self, i: &InstanceRecord) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE instances SET session_id = $2, runtime = $3, placement = $4, \
             created_ms = $5, node_id = $6 WHERE id = $1 AND (node_id = $6 OR node_id = '')",
        )
        .bind(i.id)
        .bind(i.session_id)
        .bind(&i.runtime)
        .bind(i.placement.to_string())
        .bind(i.created_ms)
        .bind(&i.node_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn delete_instance(&self, id: Uuid) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        super::cluster::release(&mut tx, id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_instances(&self) -> StoreResult<Vec<InstanceRecord>> {
        let rows = super::query_dyn(&format!("SELECT {INSTANCE_COLS} FROM instances"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(instance_from_row).collect()
    }

    async fn insert_session_for_instance(
        &self,
        s: &SessionRecord,
        instance_id: Uuid,
    ) -> StoreResult<bool> {
        // One round trip (migrations/postgres/0008): the session's insert and the instance's
        // promise in one statement, undone together when either is refused (`Conflict`). The
        // instance's row is locked by the promise: a second claim waits for this one and then
        // finds it promised, so never two sessions on one instance.
        let claimed: bool = sqlx::query_scalar(
            "SELECT cattery_insert_session_for_instance($1, $2, $3, $4, $5, $6, $7, $8, $9, \
             $10, $11, $12, $13)",
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
        .bind(instance_id)
        .bind(s.daily_room.as_ref().map(|r| r.name.as_str()))
        .bind(s.daily_room.as_ref().is_some_and(|r| r.keep))
        .fetch_one(&self.pool)
        .await?;
        Ok(claimed)
    }

    async fn end_instance(
        &self,
        instance_id: Uuid,
        session: Option<(Uuid, &SessionEnd, &[MetricSample])>,
    ) -> StoreResult<bool> {
        // One statement (one round trip, atomic): the record goes, the slot is freed with its
        // agent's count, the session's end is written if none is yet (`e`), and the samples
        // are written with it, or alone on an end written before (`s`: it runs only when `e`
        // wrote nothing, so no row is updated twice).
        let (sid, end, samples) = match session {
            Some((sid, e, samples)) => (
                Some(sid),
                Some(e),
                (!samples.is_empty()).then(|| samples_json(samples)),
            ),
            None => (None, None, None),
        };
        let wrote: i64 = sqlx::query_scalar(
            "WITH i AS (DELETE FROM instances WHERE id = $1), \
             d AS (DELETE FROM capacity_slots WHERE instance_id = $1 RETURNING agent_id), \
             c AS (UPDATE agent_capacity a SET used = a.used - 1 FROM d \
                   WHERE a.agent_id = d.agent_id), \
             e AS (UPDATE sessions SET ended_ms = $3, updated_ms = $3, end_reason = $4, \
                   completion_status = $5, exit_code = $6, exit_signal = $7, end_message = $8, \
                   samples = COALESCE($9, samples) \
                   WHERE id = $2 AND ended_ms IS NULL RETURNING id), \
             s AS (UPDATE sessions SET samples = $9 WHERE id = $2 AND $9 IS NOT NULL \
                   AND NOT EXISTS (SELECT 1 FROM e)) \
             SELECT COUNT(*) FROM e",
        )
        .bind(instance_id)
        .bind(sid)
        .bind(end.map(|e| e.ended_ms))
        .bind(end.map(|e| e.reason.as_str()))
        .bind(end.map(|e| e.completion_status.as_str()))
        .bind(end.and_then(|e| e.exit_code).map(i64::from))
        .bind(end.and_then(|e| e.exit_signal).map(i64::from))
        .bind(
            end.and_then(|e| e.message.as_deref())
                .map(crate::store::codec::storable_text),
        )
        .bind(samples)
        .fetch_one(&self.pool)
        .await?;
        Ok(wrote == 1)
    }
}
