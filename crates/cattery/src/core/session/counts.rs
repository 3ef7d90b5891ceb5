//! What an agent's status counts (`activeSessionCount`, `warmInstances`, `readyReplicas`,
//! `replicasStarted`): on one node its pool in memory, with no store read (the CLI reads the
//! status before every start); on a shared store with several live nodes the cluster's, from
//! one store read (docs/cluster.md, "An agent's status: the cluster's counts, this node's
//! health").
//!
//! Only an instance's owner knows whether it is ready, so the other nodes' instances are
//! counted from their records: promised to a session = busy, promised to none (of the current
//! deployment) = idle, although one may still be starting (its owner records it when it
//! spawns it, before `/readyz` answers). This node's own come from memory, exactly.
//! `activeSessionCount` on several nodes is the agent's open sessions in the store: those
//! starting and websocket sessions waiting for their client count as well, as the Sessions
//! page's `active` filter lists them.
//!
//! Health (`ready`, `healthState`, the phase) stays this node's, judged against its share of
//! `minAgents` (`core::health`): it says whether a start through this node works.

use uuid::Uuid;

use super::{PoolStatus, Supervisor};
use crate::core::CoreResult;
use crate::model::AgentRecord;
use crate::store::AgentCounts;

/// The counts an agent's status shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// `activeSessionCount`.
    pub active_sessions: u32,
    /// Instances of the current deployment starting (this node's only: the others' records
    /// do not say).
    pub starting: u32,
    /// Instances of the current deployment ready and waiting (the other nodes': promised to
    /// no session).
    pub idle: u32,
    /// Instances serving a session (the other nodes': promised to one).
    pub busy: u32,
    /// Every instance not yet gone.
    pub total: u32,
}

/// The counts from this node's pool `local` and, on several nodes, what the store holds of
/// the cluster (`others`; `None` on one node).
pub fn status_counts(local: &PoolStatus, others: Option<&AgentCounts>) -> StatusCounts {
    let mine = StatusCounts {
        active_sessions: local.busy,
        starting: local.starting,
        idle: local.idle,
        busy: local.busy,
        total: local.total,
    };
    match others {
        None => mine,
        Some(o) => StatusCounts {
            active_sessions: o.open_sessions,
            starting: mine.starting,
            idle: mine.idle.saturating_add(o.others_unpromised),
            busy: mine.busy.saturating_add(o.others_promised),
            total: mine.total.saturating_add(o.others_total),
        },
    }
}

/// An agent's pool as its status shows it.
#[derive(Debug, Clone, Default)]
pub struct AgentPoolStatus {
    /// This node's pool: health is judged on it.
    pub pool: PoolStatus,
    /// This node's share of the agent's `minAgents` (all of them on one node).
    pub min_here: u32,
    /// The counts shown: this node's on one node, the cluster's on several.
    pub counts: StatusCounts,
}

impl Supervisor {
    /// Agent `a`'s pool for its status (current deployment `deployment`): this node's pool
    /// and share, and the counts, read from the store only while several nodes are live (one
    /// round trip).
    ///
    /// Errors: the store could not be read (several nodes only).
    pub async fn agent_pool_status(
        &self,
        a: &AgentRecord,
        deployment: Uuid,
    ) -> CoreResult<AgentPoolStatus> {
        let view = self.cluster_view();
        let others = if view.nodes > 1 {
            Some(
                self.store
                    .agent_counts(a.id, deployment, self.node_id())
                    .await?,
            )
        } else {
            None
        };
        // Read after the store, so that an instance of this node that moved meanwhile is
        // counted once at most (its record is not read: it is this node's).
        let pool = self.pool_status(a.id);
        Ok(AgentPoolStatus {
            counts: status_counts(&pool, others.as_ref()),
            min_here: view.share(a.min_agents),
            pool,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> PoolStatus {
        PoolStatus {
            starting: 1,
            idle: 2,
            busy: 3,
            total: 7,
            ..Default::default()
        }
    }

    #[test]
    fn one_node_counts_its_pool() {
        let c = status_counts(&local(), None);
        assert_eq!(
            c,
            StatusCounts {
                active_sessions: 3,
                starting: 1,
                idle: 2,
                busy: 3,
                total: 7
            }
        );
    }

    #[test]
    fn several_nodes_add_the_others_records_and_count_the_stores_open_sessions() {
        let o = AgentCounts {
            open_sessions: 9,
            others_promised: 4,
            others_unpromised: 5,
            others_total: 11,
        };
        let c = status_counts(&local(), Some(&o));
        assert_eq!(
            c,
            StatusCounts {
                active_sessions: 9,
                // The others' records do not say which of their instances still start.
                starting: 1,
                idle: 2 + 5,
                busy: 3 + 4,
                total: 7 + 11
            }
        );
        // Nothing elsewhere: this node's instances, the store's sessions.
        let c = status_counts(&local(), Some(&AgentCounts::default()));
        assert_eq!((c.active_sessions, c.idle, c.busy, c.total), (0, 2, 3, 7));
    }

    #[test]
    fn counts_saturate() {
        let o = AgentCounts {
            open_sessions: u32::MAX,
            others_promised: u32::MAX,
            others_unpromised: u32::MAX,
            others_total: u32::MAX,
        };
        let c = status_counts(&local(), Some(&o));
        assert_eq!((c.busy, c.idle, c.total), (u32::MAX, u32::MAX, u32::MAX));
    }
}
