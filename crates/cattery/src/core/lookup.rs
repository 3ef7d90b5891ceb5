//! Reading an org's records, with the ownership check in one place: an agent by name, a
//! session of an agent (the org and the agent must both match), an agent's sessions and logs.
//! Another org's record is reported as missing, so a caller cannot learn that it exists.

use std::sync::Arc;

use uuid::Uuid;

use super::{CoreError, CoreResult};
use crate::model::{AgentRecord, LogLine, SessionRecord};
use crate::store::{LogFilter, SessionFilter, Store};

/// `org`'s live agent `name`, or `None`.
pub async fn find_agent(
    store: &Arc<dyn Store>,
    org: &str,
    name: &str,
) -> CoreResult<Option<AgentRecord>> {
    Ok(store.get_agent(org, name).await?)
}

/// `org`'s live agent `name`. Errors: 404 `agent {name} not found`.
pub async fn agent_of(store: &Arc<dyn Store>, org: &str, name: &str) -> CoreResult<AgentRecord> {
    find_agent(store, org, name)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("agent {name} not found")))
}

/// What `org`'s agent `name` reads as for its sessions and logs: the live agent, else the one
/// of that name deleted last (its sessions run on until they end, and stay listable).
/// Errors: 404 `agent {name} not found` when neither exists.
pub async fn agent_or_deleted(
    store: &Arc<dyn Store>,
    org: &str,
    name: &str,
) -> CoreResult<AgentRecord> {
    if let Some(a) = store.get_agent(org, name).await? {
        return Ok(a);
    }
    store
        .last_deleted_agent(org, name)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("agent {name} not found")))
}

/// A session of `org`'s agent `name`, with the agent that ran it: the live agent of that
/// name, or a deleted one that had it ([`names_agent`]), so a session that outlived its
/// agent stays reachable (and stoppable) by the name even once an agent of that name is
/// created again. Errors: 404 when it does not exist, or belongs to another org (`session
/// {id} not found`) or to an agent of another name (`... not found for agent {name}`).
pub async fn session_of(
    store: &Arc<dyn Store>,
    org: &str,
    name: &str,
    id: Uuid,
) -> CoreResult<(AgentRecord, SessionRecord)> {
    let s = store
        .get_session(id)
        .await?
        .filter(|s| s.org == org)
        .ok_or_else(|| CoreError::NotFound(format!("session {id} not found")))?;
    match names_agent(store, org, name, s.agent_id).await? {
        Some(agent) => Ok((agent, s)),
        None => Err(CoreError::NotFound(format!(
            "session {id} not found for agent {name}"
        ))),
    }
}

/// Agent `id` (live or deleted), if it is `org`'s and is (or was, when deleted) named `name`.
/// A deleted agent's sessions run on until they end (reference §A.3); an agent of the same
/// name created meanwhile does not make them unreachable by that name, or they could not be
/// stopped until their time limit.
pub async fn names_agent(
    store: &Arc<dyn Store>,
    org: &str,
    name: &str,
    id: Uuid,
) -> CoreResult<Option<AgentRecord>> {
    Ok(store
        .get_agent_by_id(id)
        .await?
        .filter(|a| a.org == org && a.name == name))
}

/// Scans (session lists and log queries, which may read an agent's every line) of one org
/// that run at once on this node; the org's others wait for one of them to finish. The store
/// runs a few scans at once for everyone (four on SQLite), so one org hammering its logs with
/// queries that read a million lines each leaves the others a free slot instead of a queue
/// behind its own.
pub const SCANS_PER_ORG: usize = 2;

/// One org's turn to scan ([`SCANS_PER_ORG`]).
async fn org_scan(org: &str) -> tokio::sync::OwnedSemaphorePermit {
    static ORGS: std::sync::LazyLock<
        parking_lot::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
    > = std::sync::LazyLock::new(Default::default);
    let gate = ORGS
        .lock()
        .entry(org.to_string())
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(SCANS_PER_ORG)))
        .clone();
    gate.acquire_owned()
        .await
        .expect("an org's scan gate is never closed")
}

/// A page of an agent's sessions (newest first) and the total that match `f`.
pub async fn sessions_of(
    store: &Arc<dyn Store>,
    agent: &AgentRecord,
    f: &SessionFilter,
) -> CoreResult<(i64, Vec<SessionRecord>)> {
    let _turn = org_scan(&agent.org).await;
    Ok(store.list_sessions(agent.id, f).await?)
}

/// A page of an agent's log lines and the total that match `f`.
pub async fn logs_of(
    store: &Arc<dyn Store>,
    agent: &AgentRecord,
    f: &LogFilter,
) -> CoreResult<(i64, Vec<LogLine>)> {
    let _turn = org_scan(&agent.org).await;
    Ok(store.query_logs(agent.id, f).await?)
}

/// Session `id` with its agent, if it exists and belongs to `org` (else `None`: another
/// org's session is reported as missing).
pub async fn org_session(
    store: &Arc<dyn Store>,
    org: &str,
    id: Uuid,
) -> CoreResult<Option<(AgentRecord, SessionRecord)>> {
    let Some(s) = store.get_session(id).await?.filter(|s| s.org == org) else {
        return Ok(None);
    };
    Ok(store.get_agent_by_id(s.agent_id).await?.map(|a| (a, s)))
}
