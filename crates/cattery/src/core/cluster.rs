//! Nodes (docs/cluster.md): every `cattery serve` is a node with an id and, optionally, an
//! address other nodes can reach. It heartbeats in the store; `GET /v1/cluster/nodes` lists
//! the nodes with their heartbeat age and instance counts.
//!
//! What is not here yet: ownership of sessions and instances by node, forwarding, cluster-wide
//! capacity. Until it is, a node refuses to start while another node with a fresh heartbeat
//! uses the same database ([`check_alone`]): two nodes would end each other's sessions at
//! recovery and each admit `maxAgents`.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::model::now_ms;
use crate::store::{NodeRecord, Store};

/// This node: what it reports in its heartbeats.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Node id.
    pub id: String,
    /// Where other nodes reach it.
    pub advertise_url: Option<String>,
    /// When this run started (ms).
    pub started_ms: i64,
    /// A node whose last heartbeat is older than this is dead.
    pub timeout: Duration,
}

impl NodeIdentity {
    /// How often the node heartbeats: a fifth of the timeout, at least every 100 ms.
    pub fn heartbeat_every(&self) -> Duration {
        (self.timeout / 5).max(Duration::from_millis(100))
    }

    /// The heartbeat record with the given instance counts.
    pub fn record(&self, instances: i64, busy: i64) -> NodeRecord {
        NodeRecord {
            id: self.id.clone(),
            advertise_url: self.advertise_url.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_ms: self.started_ms,
            heartbeat_ms: now_ms(),
            instances,
            busy,
        }
    }
}

/// One node in `GET /v1/cluster/nodes`.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Node id.
    pub id: String,
    /// Where other nodes reach it (`--advertise-url`), if given.
    pub advertise_url: Option<String>,
    /// Cattery version.
    pub version: String,
    /// When its current run started (ms).
    pub started_ms: i64,
    /// Milliseconds since its last heartbeat (by this node's clock).
    pub heartbeat_age_ms: i64,
    /// Whether its last heartbeat is within the node timeout.
    pub alive: bool,
    /// Live instances at its last heartbeat.
    pub instances: i64,
    /// Of them, serving a session.
    pub busy: i64,
    /// Whether it is the node that answered.
    #[serde(rename = "self")]
    pub this: bool,
}

/// The nodes as seen from `me` at `now` (ms), by id.
pub fn statuses(me: &NodeIdentity, nodes: Vec<NodeRecord>, now: i64) -> Vec<NodeStatus> {
    let timeout = i64::try_from(me.timeout.as_millis()).unwrap_or(i64::MAX);
    nodes
        .into_iter()
        .map(|n| {
            let age = now.saturating_sub(n.heartbeat_ms).max(0);
            NodeStatus {
                this: n.id == me.id,
                alive: age <= timeout,
                heartbeat_age_ms: age,
                id: n.id,
                advertise_url: n.advertise_url,
                version: n.version,
                started_ms: n.started_ms,
                instances: n.instances,
                busy: n.busy,
            }
        })
        .collect()
}

/// The live nodes other than `me` among `nodes` at `now` (ms).
pub fn other_live_nodes(me: &NodeIdentity, nodes: Vec<NodeRecord>, now: i64) -> Vec<NodeStatus> {
    statuses(me, nodes, now)
        .into_iter()
        .filter(|n| n.alive && !n.this)
        .collect()
}

/// Heartbeats until the returned handle is aborted: the first at once, then every
/// [`NodeIdentity::heartbeat_every`]. `counts` gives the live and busy instances. A failed
/// heartbeat (the database down) is logged and retried at the next tick.
pub fn spawn_heartbeats(
    store: Arc<dyn Store>,
    me: NodeIdentity,
    counts: impl Fn() -> (i64, i64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(me.heartbeat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (instances, busy) = counts();
            if let Err(e) = store.heartbeat(&me.record(instances, busy)).await {
                tracing::warn!(error = %e, node = %me.id, "heartbeat not recorded");
            }
        }
    })
}

/// Records that this node left after a clean drain (no instance of it runs any more): its
/// last heartbeat becomes 0, so every node sees it dead at once and another node may start on
/// the database without waiting for the node timeout. Not used by `--on-stop detach`, whose
/// instances live on for the next server of this node.
pub async fn leave(store: &dyn Store, me: &NodeIdentity) {
    let mut rec = me.record(0, 0);
    rec.heartbeat_ms = 0;
    if let Err(e) = store.heartbeat(&rec).await {
        tracing::warn!(error = %e, node = %me.id, "could not record that this node left");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> NodeIdentity {
        NodeIdentity {
            id: "a".into(),
            advertise_url: None,
            started_ms: 0,
            timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_node_is_alive_until_its_heartbeat_is_older_than_the_timeout() {
        let me = me();
        let at = |id: &str, hb: i64| NodeRecord {
            heartbeat_ms: hb,
            id: id.into(),
            ..me.record(0, 0)
        };
        let now = 100_000;
        let st = statuses(
            &me,
            vec![at("a", now), at("b", now - 10_000), at("c", now - 10_001)],
            now,
        );
        assert_eq!(
            st.iter()
                .map(|n| (n.id.as_str(), n.alive, n.this))
                .collect::<Vec<_>>(),
            [("a", true, true), ("b", true, false), ("c", false, false)]
        );
        // A clock behind ours reads as age 0, never negative.
        assert_eq!(
            statuses(&me, vec![at("b", now + 5)], now)[0].heartbeat_age_ms,
            0
        );
        let others = other_live_nodes(&me, vec![at("a", now), at("b", now - 5)], now);
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].id, "b");
    }

    #[test]
    fn heartbeats_come_five_times_per_timeout() {
        assert_eq!(me().heartbeat_every(), Duration::from_secs(2));
    }
}
