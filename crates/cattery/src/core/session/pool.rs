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

/// Brings the pool to `min` warm instances (ready, starting and unclaimed, or having their
/// slot reserved) of the current deployment within `maxAgents`, unless the deployment is
/// backing off after failed starts or cannot run; removes idle instances of old deployments,
/// and trims extra idle ones. A deleted agent's or a draining server's idle instances all go.
/// During a rollout ([`AgentPool::previous`]) the previous deployment's idle instances stay,
/// to serve until the current one is proven, except one when the pool is at `maxAgents` with
/// no instance of the current deployment: it makes room for the first one, so that a rollout
/// progresses even at `minAgents == maxAgents`.
/// `min` is this node's share of the agent's `minAgents` ([`super::ClusterView::share`]).
/// At most `max_starting` warm instances (0: no limit) are starting or reserving at once: the
/// rest wait for the next plan (each instance that gets ready asks for one).
pub(super) fn plan(
    p: &AgentPool,
    draining: bool,
    min: u32,
    max_starting: u32,
    now: Instant,
) -> PoolPlan {
    let dep = p.deployment.id;
    let previous = p.previous.as_ref().map(|d| d.id);
    let deleted = p.agent.deleted_ms.is_some();
    let mut out = PoolPlan::default();
    let mut warm = p.reserving;
    let mut starting = p.reserving;
    // Instances of the current deployment in any state, and the previous one's idle ones.
    let mut of_current = p.reserving;
    let mut previous_idle = None;
    let mut ending = false;
    for c in p.instances.values() {
        let s = c.state();
        let current = c.deployment.id == dep;
        let serves = previous == Some(c.deployment.id);
        if s == InstState::Starting {
            starting += 1;
        }
        if current {
            of_current += 1;
        }
        ending |= s == InstState::Ending;
        if s == InstState::Idle && (deleted || draining || !(current || serves)) {
            out.stop.push(c.clone());
        } else if current && matches!(s, InstState::Idle | InstState::Starting) {
            warm += 1;
        } else if serves && s == InstState::Idle {
            previous_idle = Some(c);
        }
    }
    if deleted || draining {
        out.forget = deleted && p.instances.is_empty();
        return out;
    }
    if p.deploy_error.is_some() {
        return out;
    }
    let max = p.agent.max_agents;
    let backoff = p.health.get(&dep).is_some_and(|h| h.backing_off(now));
    let total = p.instances.len() as u32 + p.reserving;
    if !backoff {
        out.spawn = min.saturating_sub(warm).min(max.saturating_sub(total));
        if max_starting > 0 {
            out.spawn = out.spawn.min(max_starting.saturating_sub(starting));
        }
        if min > warm && total >= max && of_current == 0 && !ending {
            // Room for the rollout's first instance: the next plan starts it, once this
            // one is gone (until then an instance ending makes room already).
            out.stop.extend(previous_idle.cloned());
        }
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
    /// Brings an agent's warm pool in line with its settings and this node's share ([`plan`]).
    /// Each new warm instance first reserves its capacity slot in the store (cluster-wide
    /// `maxAgents`); one that gets none is not started (the next tick tries again). Does
    /// nothing until [`Supervisor::recover`] has finished (which then reconciles every agent).
    pub fn reconcile(self: &Arc<Self>, agent_id: Uuid) {
        // A fenced node changes nothing until it has reconciled with the store; a detached
        // server leaves its instances to the next one.
        if !self.recovered.load(Ordering::SeqCst)
            || self.is_fenced()
            || self.detached.load(Ordering::SeqCst)
        {
            return;
        }
        let view = self.cluster_view();
        let mut spawn = Vec::new();
        let stop = {
            let mut st = self.state.lock();
            let draining = self.is_draining();
            let Some(p) = st.pools.get_mut(&agent_id) else {
                return;
            };
            let min = view.share(p.agent.min_agents);
            if min == 0 {
                // Nothing of the current deployment will start here to prove it (minAgents
                // lowered to 0, or this node's share gone to others): it serves at once.
                p.previous = None;
            }
            let plan = plan(p, draining, min, self.cfg.max_warm_starting, Instant::now());
            p.reserving += plan.spawn;
            for _ in 0..plan.spawn {
                spawn.push((Uuid::new_v4(), p.agent.max_agents));
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
        for (id, max) in spawn {
            let (sup, node) = (self.clone(), self.cfg.node_id.clone());
            tokio::spawn(async move {
                let got = sup.store.reserve_slot(agent_id, max, id, &node).await;
                if let Err(e) = &got {
                    tracing::warn!(agent = %agent_id, error = %e, "could not reserve a warm instance's capacity slot");
                    sup.free_uncertain_slot(agent_id, max, id);
                }
                sup.spawn_reserved(agent_id, id, got.unwrap_or(false));
            });
        }
    }

    /// Starts the warm instance `id` whose slot reservation ended (`reserved`: it got one),
    /// unless the pool no longer wants it (then the slot is freed).
    fn spawn_reserved(self: &Arc<Self>, agent_id: Uuid, id: Uuid, reserved: bool) {
        let started = {
            let mut st = self.state.lock();
            let draining = self.is_draining();
            let Some(p) = st.pools.get_mut(&agent_id) else {
                drop(st);
                if reserved {
                    self.free_slot(id);
                }
                return;
            };
            p.reserving = p.reserving.saturating_sub(1);
            if !reserved {
                return;
            }
            if draining || p.agent.deleted_ms.is_some() || p.deploy_error.is_some() {
                None
            } else {
                let (c, mb) = InstanceCtl::new(
                    &p.agent,
                    p.deployment.clone(),
                    InstState::Starting,
                    None,
                    Some(id),
                );
                p.instances.insert(c.id, c.clone());
                Some((c, mb))
            }
        };
        match started {
            Some((c, mb)) => {
                tokio::spawn(actor::run(self.clone(), c, mb, Start::New(None)));
            }
            None => {
                self.free_slot(id);
                self.reconcile(agent_id);
            }
        }
    }

    /// Frees the capacity slot of an instance that never started (in the background; a
    /// failure is logged, and the slot is freed at this node's next start).
    pub(super) fn free_slot(&self, id: Uuid) {
        let store = self.store.clone();
        tokio::spawn(async move {
            match store.release_slot(id).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    tracing::warn!(instance = %id, error = %e, "could not free a capacity slot yet; trying again");
                    super::pending::write_again("a freed capacity slot", id, move || {
                        let store = store.clone();
                        async move { store.release_slot(id).await }
                    });
                }
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "could not free a capacity slot")
                }
            }
        });
    }

    /// Frees the capacity slot `id` of `agent_id` whose reservation answered an error. The
    /// store may have taken it all the same and lost only its answer (a connection cut after
    /// the commit), and that commit may land after a plain release, which would then free
    /// nothing and leave the slot held. So the reservation is first made again with the same
    /// instance id, which the store answers only once the first one has landed or failed
    /// (`Conflict` when it holds the slot), and only then is the slot released; both are
    /// retried while the store is unavailable ([`super::pending::write_again`]).
    pub(super) fn free_uncertain_slot(&self, agent_id: Uuid, max: u32, id: Uuid) {
        let (store, node) = (self.store.clone(), self.cfg.node_id.clone());
        super::pending::write_again("an uncertain capacity slot's release", id, move || {
            let (store, node) = (store.clone(), node.clone());
            async move {
                match store.reserve_slot(agent_id, max, id, &node).await {
                    Err(e) if e.is_transient() => return Err(e),
                    Ok(_) | Err(_) => {}
                }
                store.release_slot(id).await
            }
        });
    }

    /// [`Supervisor::reconcile`] for every agent.
    pub(super) fn reconcile_all(self: &Arc<Self>) {
        let ids: Vec<Uuid> = self.state.lock().pools.keys().copied().collect();
        for id in ids {
            self.reconcile(id);
        }
    }
}
