//! Capacity slots and websocket tokens. One SQLite database has one writer (this process), so
//! each method's statements run as one atomic write; there is no change feed (a single node
//! made every change itself).

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Conn, Row, Val};
use super::SqliteStore;
use crate::store::{AgentCounts, Change, ClusterStore, StoreResult, WsTokenRecord};

/// Frees `instance`'s slot; part of the instance's end and delete.
pub(super) fn release(db: &mut Conn, instance: Uuid) -> StoreResult<()> {
    db.exec(
        "DELETE FROM capacity_slots WHERE instance_id = ?",
        &[instance.into()],
    )
    .map(|_| ())
}

fn token_from_row(r: &Row<'_>) -> StoreResult<WsTokenRecord> {
    Ok(WsTokenRecord {
        hash: r.blob(0),
        org: r.string(1),
        agent: r.string(2),
        session_id: r.uuid(3)?,
        body: r.opt_blob(4),
        expires_ms: r.int(5).unwrap_or_default(),
    })
}

#[async_trait]
impl ClusterStore for SqliteStore {
    async fn reserve_slot(
        &self,
        agent_id: Uuid,
        max: u32,
        instance_id: Uuid,
        node: &str,
    ) -> StoreResult<bool> {
        let node = node.to_string();
        self.write(move |db| {
            db.atomic(|db| {
                let held = db.query_int(
                    "SELECT COUNT(*) FROM capacity_slots WHERE agent_id = ?",
                    &[agent_id.into()],
                )?;
                if held >= i64::from(max) {
                    return Ok(false);
                }
                db.exec(
                    "INSERT INTO capacity_slots (instance_id, agent_id, node_id, created_ms) \
                     VALUES (?, ?, ?, ?)",
                    &[
                        instance_id.into(),
                        agent_id.into(),
                        Val::Text(&node),
                        crate::model::now_ms().into(),
                    ],
                )?;
                Ok(true)
            })
        })
        .await
    }

    async fn release_slot(&self, instance_id: Uuid) -> StoreResult<()> {
        self.write(move |db| release(db, instance_id)).await
    }

    async fn slots_held(&self, agent_id: Uuid) -> StoreResult<u32> {
        self.scan(move |db| {
            db.query_int(
                "SELECT COUNT(*) FROM capacity_slots WHERE agent_id = ?",
                &[agent_id.into()],
            )
        })
        .await
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn agent_counts(
        &self,
        agent_id: Uuid,
        deployment: Uuid,
        node: &str,
    ) -> StoreResult<AgentCounts> {
        let node = node.to_string();
        self.scan(move |db| {
            let row = db.query_row(
                "SELECT (SELECT COUNT(*) FROM sessions INDEXED BY sessions_active \
                 WHERE agent_id = ?1 AND ended_ms IS NULL), \
                 COUNT(*) FILTER (WHERE session_id IS NOT NULL), \
                 COUNT(*) FILTER (WHERE session_id IS NULL AND deployment_id = ?2), \
                 COUNT(*) \
                 FROM instances WHERE agent_id = ?1 AND node_id <> ?3",
                &[agent_id.into(), deployment.into(), Val::Text(&node)],
                |r| {
                    let n = |i| u32::try_from(r.int(i).unwrap_or(0)).unwrap_or(u32::MAX);
                    AgentCounts {
                        open_sessions: n(0),
                        others_promised: n(1),
                        others_unpromised: n(2),
                        others_total: n(3),
                    }
                },
            )?;
            Ok(row.unwrap_or_default())
        })
        .await
    }

    async fn nodes_with_unpromised(
        &self,
        agent_id: Uuid,
        deployment: Uuid,
        node: &str,
    ) -> StoreResult<Vec<String>> {
        let node = node.to_string();
        self.scan(move |db| {
            db.query_all(
                "SELECT DISTINCT node_id FROM instances WHERE agent_id = ?1 \
                 AND deployment_id = ?2 AND session_id IS NULL AND node_id <> ?3 \
                 ORDER BY node_id",
                &[agent_id.into(), deployment.into(), Val::Text(&node)],
                |r| Ok(r.string(0)),
            )
        })
        .await
    }

    async fn release_orphan_slots(&self, node: &str, keep: &[Uuid]) -> StoreResult<u64> {
        let node = node.to_string();
        let keep: Vec<String> = keep.iter().map(Uuid::to_string).collect();
        self.write(move |db| {
            db.atomic(|db| {
                let ids = db.query_all(
                    "SELECT s.instance_id FROM capacity_slots s WHERE s.node_id = ? AND NOT \
                     EXISTS (SELECT 1 FROM instances i WHERE i.id = s.instance_id)",
                    &[Val::Text(&node)],
                    |r| Ok(r.string(0)),
                )?;
                let mut n = 0;
                for id in ids.iter().filter(|id| !keep.contains(id)) {
                    n += db.exec(
                        "DELETE FROM capacity_slots WHERE instance_id = ?",
                        &[Val::Text(id)],
                    )?;
                }
                Ok(n)
            })
        })
        .await
    }

    async fn put_ws_token(&self, t: &WsTokenRecord, now_ms: i64) -> StoreResult<()> {
        let t = t.clone();
        self.write(move |db| {
            db.atomic(|db| {
                db.exec(
                    "DELETE FROM ws_tokens WHERE expires_ms < ?",
                    &[now_ms.into()],
                )?;
                db.exec(
                    "INSERT INTO ws_tokens (hash, org, agent, session_id, body, expires_ms) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                    &[
                        Val::Blob(&t.hash),
                        Val::Text(&t.org),
                        Val::Text(&t.agent),
                        t.session_id.into(),
                        t.body.as_deref().map(Val::Blob).unwrap_or(Val::Null),
                        t.expires_ms.into(),
                    ],
                )
                .map(|_| ())
            })
        })
        .await
    }

    async fn take_ws_token(
        &self,
        hash: &[u8],
        org: &str,
        agent: &str,
    ) -> StoreResult<Option<WsTokenRecord>> {
        let (hash, org, agent) = (hash.to_vec(), org.to_string(), agent.to_string());
        self.write(move |db| {
            db.atomic(|db| {
                let t = db
                    .query_row(
                        "SELECT hash, org, agent, session_id, body, expires_ms FROM ws_tokens \
                         WHERE hash = ? AND org = ? AND agent = ?",
                        &[Val::Blob(&hash), Val::Text(&org), Val::Text(&agent)],
                        token_from_row,
                    )?
                    .transpose()?;
                if t.is_some() {
                    db.exec("DELETE FROM ws_tokens WHERE hash = ?", &[Val::Blob(&hash)])?;
                }
                Ok(t)
            })
        })
        .await
    }

    async fn revoke_ws_tokens(&self, org: &str, agent: &str, session: Uuid) -> StoreResult<bool> {
        let (org, agent) = (org.to_string(), agent.to_string());
        self.write(move |db| {
            db.exec(
                "DELETE FROM ws_tokens WHERE session_id = ? AND org = ? AND agent = ?",
                &[session.into(), Val::Text(&org), Val::Text(&agent)],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn watch_changes(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<Change>>> {
        Ok(None)
    }

    async fn watch_sessions(&self, _node: &str, _on: bool) -> StoreResult<()> {
        Ok(())
    }
}
