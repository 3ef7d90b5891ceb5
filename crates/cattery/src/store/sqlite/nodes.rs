//! Nodes and their heartbeats.

use async_trait::async_trait;

use super::conn::{Row, Val};
use super::SqliteStore;
use crate::store::{NodeRecord, NodeStore, StoreResult};

fn node_from_row(r: &Row<'_>) -> StoreResult<NodeRecord> {
    Ok(NodeRecord {
        id: r.string(0),
        advertise_url: r.text(1),
        version: r.string(2),
        started_ms: r.int(3).unwrap_or_default(),
        heartbeat_ms: r.int(4).unwrap_or_default(),
        instances: r.int(5).unwrap_or_default(),
        busy: r.int(6).unwrap_or_default(),
    })
}

#[async_trait]
impl NodeStore for SqliteStore {
    async fn heartbeat(&self, n: &NodeRecord) -> StoreResult<()> {
        let n = n.clone();
        self.write(move |db| {
            db.exec(
                "INSERT OR REPLACE INTO nodes (id, advertise_url, version, started_ms, \
                 heartbeat_ms, instances, busy) VALUES (?, ?, ?, ?, ?, ?, ?)",
                &[
                    Val::Text(&n.id),
                    n.advertise_url.as_ref().into(),
                    Val::Text(&n.version),
                    n.started_ms.into(),
                    n.heartbeat_ms.into(),
                    n.instances.into(),
                    n.busy.into(),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        self.scan(|db| {
            db.query_all(
                "SELECT id, advertise_url, version, started_ms, heartbeat_ms, instances, busy \
                 FROM nodes ORDER BY id",
                &[],
                node_from_row,
            )
        })
        .await
    }
}
