//! Admission: who gets an instance. A plain function over one agent's pool.

use std::sync::Arc;

use tokio::time::Instant;
use uuid::Uuid;

use super::state::{AgentPool, InstState, InstanceCtl};
use crate::core::{CoreError, CoreResult};

/// Where a start's session goes.
pub(super) enum Admission {
    /// A ready warm instance, now `Busy` and promised to the session (`coldStart: false`).
    Warm(Arc<InstanceCtl>),
    /// A warm instance still starting, now `Claimed` by the session (`coldStart: true`).
    Claimed(Arc<InstanceCtl>),
    /// No instance to take, and room below `maxAgents`: start a new one (`coldStart: true`).
    Cold,
}

/// Decides a start on `pool` for `session`, in order: a ready warm instance of the deployment
/// that serves ([`AgentPool::serving`]: the current one, or the previous one during a
/// rollout), else a starting one that nobody claimed, else a cold start (of that deployment)
/// below `maxAgents`, else 429. The instance taken is claimed in the same step (under its own
/// lock), so two starts never get the same one.
///
/// Errors: `NotFound` (the agent is deleted), `DeploymentNotReady`, `AGENT_CRASH_LOOP`
/// (failed starts in a row, still backing off), `AtCapacity`.
pub(super) fn admit(
    pool: &AgentPool,
    agent_name: &str,
    session: Uuid,
    now: Instant,
) -> CoreResult<Admission> {
    refused_whatever_its_instances(pool, agent_name, now)?;
    let dep = pool.serving().id;
    let take = |from: InstState, to: InstState| {
        pool.instances
            .values()
            .find(|c| c.deployment.id == dep && c.try_claim(from, to, session))
            .cloned()
    };
    if let Some(c) = take(InstState::Idle, InstState::Busy) {
        return Ok(Admission::Warm(c));
    }
    if let Some(c) = take(InstState::Starting, InstState::Claimed) {
        return Ok(Admission::Claimed(c));
    }
    if pool.instances.len() as u32 >= pool.agent.max_agents {
        return Err(CoreError::AtCapacity(agent_name.to_string()));
    }
    Ok(Admission::Cold)
}

/// What refuses a start on `pool` whatever its instances: the agent deleted, the deployment
/// that serves not ready, or crash-looping (still backing off). During a rollout only the
/// previous deployment's crash loop refuses: the new one's failures leave it serving.
fn refused_whatever_its_instances(
    pool: &AgentPool,
    agent_name: &str,
    now: Instant,
) -> CoreResult<()> {
    if pool.agent.deleted_ms.is_some() {
        return Err(CoreError::NotFound(format!("agent {agent_name} not found")));
    }
    if let Some(e) = pool.serving_error() {
        return Err(CoreError::DeploymentNotReady(format!(
            "deployment {} of agent {agent_name} is not ready: {e}",
            pool.deployment.id
        )));
    }
    if let Some(e) = pool
        .health
        .get(&pool.serving().id)
        .and_then(|h| h.crash_loop(agent_name, now))
    {
        return Err(e);
    }
    Ok(())
}

/// Whether [`admit`] would refuse a start on `pool` now, without claiming anything: for a
/// start that must do costly work before it is admitted (a Daily room, with three calls to
/// Daily's API), so that a start at `maxAgents` is answered 429 before any of it. A start this
/// lets through may still be refused by `admit` (the pool changes meanwhile); a refusal here
/// is one `admit` would give too: the instances counted are this node's, a part of what
/// `maxAgents` bounds.
///
/// Errors: as [`admit`].
pub(super) fn precheck(pool: &AgentPool, agent_name: &str, now: Instant) -> CoreResult<()> {
    refused_whatever_its_instances(pool, agent_name, now)?;
    let dep = pool.serving().id;
    let free = pool.instances.values().any(|c| {
        c.deployment.id == dep
            && match c.state() {
                InstState::Idle => true,
                InstState::Starting => c.session().is_none(),
                _ => false,
            }
    });
    if !free && pool.instances.len() as u32 >= pool.agent.max_agents {
        return Err(CoreError::AtCapacity(agent_name.to_string()));
    }
    Ok(())
}
