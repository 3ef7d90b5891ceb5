//! The warm pool: a plan computed from a pool's state (a plain function), then applied. Run
//! on a 1 s tick and after every change (agent update, instance end), level-triggered.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;
use uuid::Uuid;

use super::actor::{self, Start};
use super::state::{AgentPool, Cmd, InstState, InstanceCtl};
use super::Supervisor;
use crate::model::EndReason;

/// What to do to one agent's pool.
#[derive(Default)]
pub(super) struct PoolPlan {
    /// New warm instances to start.
    pub spawn: u32,
    /// Idle instances to remove (old deployment, deleted agent, draining, above `minAgents`).
    pub stop: Vec<Arc<InstanceCtl>>,
    /// The agent is deleted and has no instance left: forget its pool.
    pub forget: bool,
}

/// Brings the pool to `minAgents` warm instances (ready or starting and unclaimed) of the
/// current deployment within `maxAgents`, unless the deployment is backing off after failed
/// starts or cannot run; removes idle instances of old deployments, and trims extra idle
/// ones. A deleted agent's or a draining server's idle instances all go.
pub(super) fn plan(p: &AgentPool, draining: bool, now: Instant) -> PoolPlan {
    let dep = p.deployment.id;
    let deleted = p.agent.deleted_ms.is_some();
    let mut out = PoolPlan::default();
    let mut warm = 0u32;
    for c in p.instances.values() {
        let s = c.state();
        let current = c.deployment.id == dep;
        if s == InstState::Idle && (!current || deleted || draining) {
            out.stop.push(c.clone());
        } else if current && matches!(s, InstState::Idle | InstState::Starting) {
            warm += 1;
        }
    }
    if deleted || draining {
        out.forget = deleted && p.instances.is_empty();
        return out;
    }
    if p.deploy_error.is_some() {
        return out;
    }
    let (min, max) = (p.agent.min_agents, p.agent.max_agents);
    let backoff = p.health.get(&dep).is_some_and(|h| h.backing_off(now));
    let total = p.instances.len() as u32;
    if !backoff {
        out.spawn = min.saturating_sub(warm).min(max.saturating_sub(total));
    }
    warm += out.spawn;
    let mut extra = warm.saturating_sub(min);
    for c in p.instances.values() {
        if extra == 0 {
            break;
        }
        if c.deployment.id == dep && c.state() == InstState::Idle {
            out.stop.push(c.clone());
            extra -= 1;
        }
    }
    out
}

impl Supervisor {
    /// Brings an agent's warm pool in line with its settings ([`plan`]). Does nothing until
    /// [`Supervisor::recover`] has finished (which then reconciles every agent).
    pub fn reconcile(self: &Arc<Self>, agent_id: Uuid) {
        if !self.recovered.load(Ordering::SeqCst) {
            return;
        }
        let mut spawn = Vec::new();
        let stop = {
            let mut st = self.state.lock();
            let draining = self.is_draining();
            let Some(p) = st.pools.get_mut(&agent_id) else {
                return;
            };
            let plan = plan(p, draining, Instant::now());
            for _ in 0..plan.spawn {
                let (c, mb) = InstanceCtl::new(
                    &p.agent,
                    p.deployment.clone(),
                    InstState::Starting,
                    None,
                    None,
                );
                p.instances.insert(c.id, c.clone());
                spawn.push((c, mb));
            }
            if plan.forget {
                st.pools.remove(&agent_id);
            }
            plan.stop
        };
        for c in stop {
            if c.transition(InstState::Idle, InstState::Ending) {
                let _ = c.cmd_tx.send(Cmd::Stop(EndReason::Stopped));
            }
        }
        for (c, mb) in spawn {
            tokio::spawn(actor::run(self.clone(), c, mb, Start::New(None)));
        }
    }

    /// [`Supervisor::reconcile`] for every agent.
    pub(super) fn reconcile_all(self: &Arc<Self>) {
        let ids: Vec<Uuid> = self.state.lock().pools.keys().copied().collect();
        for id in ids {
            self.reconcile(id);
        }
    }
}
