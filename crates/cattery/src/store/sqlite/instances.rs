//! Records of live instances, and the two writes that tie them to sessions.

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Row, Val};
use super::sessions::{end_session, insert_session, samples_json, set_samples};
use super::SqliteStore;
use crate::model::{InstanceRecord, MetricSample, SessionEnd, SessionRecord};
use crate::store::{InstanceStore, StoreError, StoreResult};

/// The columns [`instance_from_row`] reads, in order.
pub(super) const INSTANCE_COLS: &str =
    "id, agent_id, deployment_id, session_id, runtime, placement, created_ms, node_id";

pub(super) fn instance_from_row(r: &Row<'_>) -> StoreResult<InstanceRecord> {
    Ok(InstanceRecord {
        id: r.uuid(0)?,
        agent_id: r.uuid(1)?,
        deployment_id: r.uuid(2)?,
        session_id: r.opt_uuid(3)?,
        runtime: r.string(4),
        placement: serde_json::from_str(&r.string(5))
            .map_err(|e| StoreError::Invalid(format!("bad instance placement: {e}")))?,
        created_ms: r.int(6).unwrap_or_default(),
        node_id: r.string(7),
    })
}

#[async_trait]
impl InstanceStore for SqliteStore {
    async fn put_instance(&self, i: &InstanceRecord) -> StoreResult<()> {
        let i = i.clone();
        let placement = i.placement.to_string();
        self.write(move |db| {
            db.exec(
                "INSERT OR REPLACE INTO instances (id, agent_id, deployment_id, session_id, runtime, \
                 placement, created_ms, node_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                &[
                    i.id.into(),
                    i.agent_id.into(),
                    i.deployment_id.into(),
                    i.session_id.into(),
                    Val::Text(&i.runtime),
                    Val::Text(&placement),
                    i.created_ms.into(),
                    Val::Text(&i.node_id),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn update_instance(&self, i: &InstanceRecord) -> StoreResult<bool> {
        let i = i.clone();
        let placement = i.placement.to_string();
        self.write(move |db| {
            db.exec(
                "UPDATE instances SET session_id = ?, runtime = ?, placement = ?, created_ms = ?, \
                 node_id = ? WHERE id = ? AND (node_id = ? OR node_id = '')",
                &[
                    i.session_id.into(),
                    Val::Text(&i.runtime),
                    Val::Text(&placement),
                    i.created_ms.into(),
                    Val::Text(&i.node_id),
                    i.id.into(),
                    Val::Text(&i.node_id),
                ],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn delete_instance(&self, id: Uuid) -> StoreResult<()> {
        self.write(move |db| {
            db.atomic(|db| {
                db.exec("DELETE FROM instances WHERE id = ?", &[id.into()])?;
                super::cluster::release(db, id)
            })
        })
        .await
    }

    async fn list_instances(&self) -> StoreResult<Vec<InstanceRecord>> {
        self.scan(|db| {
            db.query_all(
                &format!("SELECT {INSTANCE_COLS} FROM instances"),
                &[],
                instance_from_row,
            )
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
                insert_session(db, &s)?;
                let n = db.exec(
                    "UPDATE instances SET session_id = ? WHERE id = ? \
                     AND (session_id IS NULL OR session_id = ?)",
                    &[s.id.into(), instance_id.into(), s.id.into()],
                )?;
                if n == 0
                    && db.query_int(
                        "SELECT COUNT(*) FROM instances WHERE id = ?",
                        &[instance_id.into()],
                    )? > 0
                {
                    // Promised to another session: not taken.
                    return Err(StoreError::Conflict);
                }
                Ok(n == 1)
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
                db.exec("DELETE FROM instances WHERE id = ?", &[instance_id.into()])?;
                super::cluster::release(db, instance_id)?;
                let Some((sid, e, samples)) = &session else {
                    return Ok(false);
                };
                let wrote = end_session(db, *sid, e)?;
                if let Some(m) = samples {
                    set_samples(db, *sid, m)?;
                }
                Ok(wrote)
            })
        })
        .await
    }
}
