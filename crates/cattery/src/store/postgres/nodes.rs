//! Nodes and their heartbeats.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::instances::{instance_from_row, INSTANCE_COLS};
use super::sessions::{session_from_row, SESSION_COLS};
use super::PgStore;
use crate::store::{ForgetNode, NodeRecord, NodeStore, StoreResult, TakenOver};

fn node_from_row(r: &PgRow) -> StoreResult<NodeRecord> {
    Ok(NodeRecord {
        id: r.try_get(0)?,
        advertise_url: r.try_get(1)?,
        version: r.try_get(2)?,
        started_ms: r.try_get(3)?,
        heartbeat_ms: r.try_get(4)?,
        instances: r.try_get(5)?,
        busy: r.try_get(6)?,
        key_check: r.try_get(7)?,
        secret_check: r.try_get(8)?,
    })
}

#[async_trait]
impl NodeStore for PgStore {
    async fn heartbeat(&self, n: &NodeRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO nodes (id, advertise_url, version, started_ms, heartbeat_ms, instances, \
             busy, key_check, secret_check) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (id) DO UPDATE \
             SET advertise_url = EXCLUDED.advertise_url, version = EXCLUDED.version, \
             started_ms = EXCLUDED.started_ms, heartbeat_ms = EXCLUDED.heartbeat_ms, \
             instances = EXCLUDED.instances, busy = EXCLUDED.busy, key_check = EXCLUDED.key_check, \
             secret_check = EXCLUDED.secret_check",
        )
        .bind(&n.id)
        .bind(&n.advertise_url)
        .bind(&n.version)
        .bind(n.started_ms)
        .bind(n.heartbeat_ms)
        .bind(n.instances)
        .bind(n.busy)
        .bind(&n.key_check)
        .bind(&n.secret_check)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        let rows = sqlx::query(
            "SELECT id, advertise_url, version, started_ms, heartbeat_ms, instances, busy, \
             key_check, secret_check FROM nodes ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_from_row).collect()
    }

    async fn take_over_node(
        &self,
        dead: &str,
        by: &str,
        stale_ms: i64,
    ) -> StoreResult<Option<TakenOver>> {
        let mut tx = self.pool.begin().await?;
        // The row lock serializes takers, and holds back the dead node's next heartbeat
        // until this commits.
        let stale =
            sqlx::query("SELECT id FROM nodes WHERE id = $1 AND heartbeat_ms <= $2 FOR UPDATE")
                .bind(dead)
                .bind(stale_ms)
                .fetch_optional(&mut *tx)
                .await?;
        if stale.is_none() {
            return Ok(None);
        }
        let instances = super::query_dyn(&format!(
            "UPDATE instances SET node_id = $2 WHERE node_id = $1 RETURNING {INSTANCE_COLS}"
        ))
        .bind(dead)
        .bind(by)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(instance_from_row)
        .collect::<StoreResult<Vec<_>>>()?;
        let sessions = super::query_dyn(&format!(
            "UPDATE sessions SET node_id = $2 WHERE node_id = $1 AND ended_ms IS NULL \
             RETURNING {SESSION_COLS}"
        ))
        .bind(dead)
        .bind(by)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(session_from_row)
        .collect::<StoreResult<Vec<_>>>()?;
        tx.commit().await?;
        Ok(Some(TakenOver {
            instances,
            sessions,
        }))
    }

    async fn forget_node(&self, id: &str, stale_ms: i64) -> StoreResult<ForgetNode> {
        let mut tx = self.pool.begin().await?;
        // The row lock holds back the node's next heartbeat (and a takeover) until this
        // commits.
        let hb: Option<i64> =
            sqlx::query_scalar("SELECT heartbeat_ms FROM nodes WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(hb) = hb else {
            return Ok(ForgetNode::Unknown);
        };
        if hb > stale_ms {
            return Ok(ForgetNode::Alive);
        }
        let (instances, sessions): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM instances WHERE node_id = $1),              (SELECT COUNT(*) FROM sessions WHERE node_id = $1 AND ended_ms IS NULL)",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if instances > 0 || sessions > 0 {
            return Ok(ForgetNode::Owns {
                instances,
                sessions,
            });
        }
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ForgetNode::Forgotten)
    }
}
