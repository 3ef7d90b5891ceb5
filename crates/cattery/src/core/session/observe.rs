//! What the engine shows of itself to metrics: its pools and instances at one moment, read
//! under the state lock (`telemetry` turns it into gauges at each scrape).

use std::collections::HashMap;

use uuid::Uuid;

use super::state::InstState;
use super::Supervisor;
use crate::telemetry::{EngineGauges, PoolGauges};

impl Supervisor {
    /// Every pool's counts and the instances by state, now.
    pub fn gauges(&self) -> EngineGauges {
        let st = self.state.lock();
        let mut active: HashMap<Uuid, u32> = HashMap::new();
        for ctl in st.sessions.values() {
            *active.entry(ctl.agent_id).or_default() += 1;
        }
        let mut g = EngineGauges::default();
        for (id, p) in &st.pools {
            let dep = p.deployment.id;
            let mut pg = PoolGauges {
                org: p.agent.org.clone(),
                agent: p.agent.name.clone(),
                active_sessions: active.get(id).copied().unwrap_or(0),
                min_agents: p.agent.min_agents,
                max_agents: p.agent.max_agents,
                ..Default::default()
            };
            for c in p.instances.values() {
                let s = c.state();
                g.instances[state_index(s)] += 1;
                match s {
                    InstState::Starting | InstState::Claimed if c.deployment.id == dep => {
                        pg.starting += 1
                    }
                    InstState::Idle if c.deployment.id == dep => pg.idle += 1,
                    InstState::Busy => pg.busy += 1,
                    _ => {}
                }
            }
            g.pools.push(pg);
        }
        g
    }

    /// The name of agent `agent_id` for metric labels (empty when it has no pool here).
    pub(super) fn agent_name(&self, agent_id: Uuid) -> String {
        self.state
            .lock()
            .pools
            .get(&agent_id)
            .map(|p| p.agent.name.clone())
            .unwrap_or_default()
    }

    /// The name and region of agent `agent_id` (empty when it has no pool here).
    pub(super) fn agent_name_region(&self, agent_id: Uuid) -> (String, String) {
        self.state
            .lock()
            .pools
            .get(&agent_id)
            .map(|p| (p.agent.name.clone(), p.agent.region.clone()))
            .unwrap_or_default()
    }
}

/// The index of `s` in [`crate::telemetry::INSTANCE_STATES`].
fn state_index(s: InstState) -> usize {
    match s {
        InstState::Starting => 0,
        InstState::Claimed => 1,
        InstState::Idle => 2,
        InstState::Busy => 3,
        InstState::Ending => 4,
    }
}
