//! Nodes and their heartbeats.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::PgStore;
use crate::store::{NodeRecord, NodeStore, StoreResult};

fn node_from_row(r: &PgRow) -> StoreResult<NodeRecord> {
    Ok(NodeRecord {
        id: r.try_get(0)?,
        advertise_url: r.try_get(1)?,
        version: r.try_get(2)?,
        started_ms: r.try_get(3)?,
        heartbeat_ms: r.try_get(4)?,
        instances: r.try_get(5)?,
        busy: r.try_get(6)?,
    })
}

#[async_trait]
impl NodeStore for PgStore {
    async fn heartbeat(&self, n: &NodeRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO nodes (id, advertise_url, version, started_ms, heartbeat_ms, instances, \
             busy) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET \
             advertise_url = EXCLUDED.advertise_url, version = EXCLUDED.version, \
             started_ms = EXCLUDED.started_ms, heartbeat_ms = EXCLUDED.heartbeat_ms, \
             instances = EXCLUDED.instances, busy = EXCLUDED.busy",
        )
        .bind(&n.id)
        .bind(&n.advertise_url)
        .bind(&n.version)
        .bind(n.started_ms)
        .bind(n.heartbeat_ms)
        .bind(n.instances)
        .bind(n.busy)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        let rows = sqlx::query(
            "SELECT id, advertise_url, version, started_ms, heartbeat_ms, instances, busy \
             FROM nodes ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_from_row).collect()
    }
}
