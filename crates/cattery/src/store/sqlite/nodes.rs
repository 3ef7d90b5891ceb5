//! Nodes and their heartbeats.

use async_trait::async_trait;

use super::conn::{Row, Val};
use super::instances::INSTANCE_COLS;
use super::sessions::SESSION_COLS;
use super::SqliteStore;
use crate::store::{ForgetNode, NodeRecord, NodeStore, StoreResult, TakenOver};

fn node_from_row(r: &Row<'_>) -> StoreResult<NodeRecord> {
    Ok(NodeRecord {
        id: r.string(0),
        advertise_url: r.text(1),
        version: r.string(2),
        started_ms: r.int(3).unwrap_or_default(),
        heartbeat_ms: r.int(4).unwrap_or_default(),
        instances: r.int(5).unwrap_or_default(),
        busy: r.int(6).unwrap_or_default(),
        key_check: r.opt_blob(7),
        secret_check: r.opt_blob(8),
    })
}

#[async_trait]
impl NodeStore for SqliteStore {
    async fn heartbeat(&self, n: &NodeRecord) -> StoreResult<()> {
        let n = n.clone();
        self.write(move |db| {
            db.exec(
                "INSERT OR REPLACE INTO nodes (id, advertise_url, version, started_ms, \
                 heartbeat_ms, instances, busy, key_check, secret_check) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                &[
                    Val::Text(&n.id),
                    n.advertise_url.as_ref().into(),
                    Val::Text(&n.version),
                    n.started_ms.into(),
                    n.heartbeat_ms.into(),
                    n.instances.into(),
                    n.busy.into(),
                    n.key_check.as_deref().map(Val::Blob).unwrap_or(Val::Null),
                    n.secret_check
                        .as_deref()
                        .map(Val::Blob)
                        .unwrap_or(Val::Null),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        self.scan(|db| {
            db.query_all(
                "SELECT id, advertise_url, version, started_ms, heartbeat_ms, instances, busy, \
                 key_check, secret_check FROM nodes ORDER BY id",
                &[],
                node_from_row,
            )
        })
        .await
    }

    async fn take_over_node(
        &self,
        dead: &str,
        by: &str,
        stale_ms: i64,
    ) -> StoreResult<Option<TakenOver>> {
        let (dead, by) = (dead.to_string(), by.to_string());
        // One writer at a time: the check and the moves are one transaction.
        self.write(move |db| {
            db.atomic(|db| {
                let stale = db.query_int(
                    "SELECT COUNT(*) FROM nodes WHERE id = ? AND heartbeat_ms <= ?",
                    &[Val::Text(&dead), stale_ms.into()],
                )?;
                if stale == 0 {
                    return Ok(None);
                }
                let instances = db.query_all(
                    &format!("SELECT {INSTANCE_COLS} FROM instances WHERE node_id = ?"),
                    &[Val::Text(&dead)],
                    super::instances::instance_from_row,
                )?;
                let sessions = db.query_all(
                    &format!(
                        "SELECT {SESSION_COLS} FROM sessions WHERE node_id = ? AND ended_ms IS NULL"
                    ),
                    &[Val::Text(&dead)],
                    super::sessions::session_from_row,
                )?;
                db.exec(
                    "UPDATE instances SET node_id = ? WHERE node_id = ?",
                    &[Val::Text(&by), Val::Text(&dead)],
                )?;
                db.exec(
                    "UPDATE sessions SET node_id = ? WHERE node_id = ? AND ended_ms IS NULL",
                    &[Val::Text(&by), Val::Text(&dead)],
                )?;
                let mut taken = TakenOver {
                    instances,
                    sessions,
                };
                taken.hand_to(&by);
                Ok(Some(taken))
            })
        })
        .await
    }

    async fn forget_node(&self, id: &str, stale_ms: i64) -> StoreResult<ForgetNode> {
        let id = id.to_string();
        // One writer at a time: the checks and the delete are one transaction.
        self.write(move |db| {
            db.atomic(|db| {
                let hb = db.query_all(
                    "SELECT heartbeat_ms FROM nodes WHERE id = ?",
                    &[Val::Text(&id)],
                    |r| Ok(r.int(0).unwrap_or_default()),
                )?;
                let Some(&hb) = hb.first() else {
                    return Ok(ForgetNode::Unknown);
                };
                if hb > stale_ms {
                    return Ok(ForgetNode::Alive);
                }
                let instances = db.query_int(
                    "SELECT COUNT(*) FROM instances WHERE node_id = ?",
                    &[Val::Text(&id)],
                )?;
                let sessions = db.query_int(
                    "SELECT COUNT(*) FROM sessions WHERE node_id = ? AND ended_ms IS NULL",
                    &[Val::Text(&id)],
                )?;
                if instances > 0 || sessions > 0 {
                    return Ok(ForgetNode::Owns {
                        instances,
                        sessions,
                    });
                }
                db.exec("DELETE FROM nodes WHERE id = ?", &[Val::Text(&id)])?;
                Ok(ForgetNode::Forgotten)
            })
        })
        .await
    }
}
