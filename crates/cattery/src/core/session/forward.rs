//! Where a start goes on several nodes: a start that finds no idle instance on this node,
//! while another live node holds one of the same deployment, is served by that node
//! (docs/cluster.md, "Starts go to a warm instance"). This module decides; the API relays the
//! start and falls back to a local one when the other node does not answer.

use super::state::InstState;
use super::Supervisor;

/// The node a start is forwarded to: it holds an instance of the agent's deployment that no
/// session has, while this node holds no idle one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartElsewhere {
    /// The node's id.
    pub node: String,
    /// Its advertise URL.
    pub url: String,
}

impl Supervisor {
    /// Whether a start of `org`'s agent `agent_name` should be served by another node: only
    /// while several nodes are live (a shared store), when this node can take the start at
    /// all (not draining or fenced, the agent live and its deployment ready: a start this node
    /// refuses is answered here), holds no ready idle instance of the deployment that serves,
    /// and another live node with an advertise URL holds an instance of it promised to no
    /// session. One store read, only in that last case (the live nodes come from the node
    /// list last read). A store that cannot be read forwards nothing: the start is local.
    pub async fn start_elsewhere(&self, org: &str, agent_name: &str) -> Option<StartElsewhere> {
        if self.cluster_view().nodes < 2 || self.check_startable(org, agent_name).is_err() {
            return None;
        }
        let (agent_id, deployment) = {
            let st = self.state.lock();
            let id = *st.by_name.get(&(org.to_string(), agent_name.to_string()))?;
            let pool = st.pools.get(&id)?;
            let dep = pool.serving().id;
            let idle_here = pool
                .instances
                .values()
                .any(|c| c.deployment.id == dep && c.state() == InstState::Idle);
            if idle_here {
                return None;
            }
            (id, dep)
        };
        let nodes = match self
            .store
            .nodes_with_unpromised(agent_id, deployment, self.node_id())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read other nodes' idle instances; starting here");
                return None;
            }
        };
        let timeout_ms = i64::try_from(self.cfg.node_timeout.as_millis()).unwrap_or(i64::MAX);
        let now = crate::model::now_ms();
        nodes.into_iter().find_map(|id| {
            let n = self.node_seen(&id)?;
            let url = n
                .advertise_url
                .filter(|_| n.heartbeat_ms > now - timeout_ms)?;
            Some(StartElsewhere { node: id, url })
        })
    }
}
