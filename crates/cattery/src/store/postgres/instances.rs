//! Records of live instances, and the two writes that tie them to sessions.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::sessions::{end_session, insert_session, set_samples};
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
        let rows = sqlx::query(&format!("SELECT {INSTANCE_COLS} FROM instances"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(instance_from_row).collect()
    }

    async fn insert_session_for_instance(
        &self,
        s: &SessionRecord,
        instance_id: Uuid,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        insert_session(&mut tx, s).await?;
        // The instance's row is locked by the update: a second claim waits for this one and
        // then finds it promised (`session_id` set): never two sessions on one instance.
        let (updated, exists): (i64, i64) = sqlx::query_as(
            "WITH u AS (UPDATE instances SET session_id = $1 WHERE id = $2 \
             AND (session_id IS NULL OR session_id = $1) RETURNING id) \
             SELECT (SELECT COUNT(*) FROM u), (SELECT COUNT(*) FROM instances WHERE id = $2)",
        )
        .bind(s.id)
        .bind(instance_id)
        .fetch_one(&mut *tx)
        .await?;
        if updated == 0 && exists > 0 {
            // Promised to another session: not taken (the transaction rolls back).
            return Err(crate::store::StoreError::Conflict);
        }
        let claimed = updated == 1;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn end_instance(
        &self,
        instance_id: Uuid,
        session: Option<(Uuid, &SessionEnd, &[MetricSample])>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(instance_id)
            .execute(&mut *tx)
            .await?;
        super::cluster::release(&mut tx, instance_id).await?;
        let mut wrote = false;
        if let Some((sid, e, samples)) = session {
            wrote = end_session(&mut tx, sid, e).await?;
            if !samples.is_empty() {
                set_samples(&mut tx, sid, &samples_json(samples)).await?;
            }
        }
        tx.commit().await?;
        Ok(wrote)
    }
}
