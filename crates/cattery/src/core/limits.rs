//! Per-org limits on a shared server (`[limits]`, docs/operations.md#per-org-limits): how many
//! agents, API keys and secret sets an org may hold, and how many session event streams
//! (`GET /v1/sessions/events`) it may keep open on one node.
//!
//! Durable records are counted from the store, so the count is the cluster's on PostgreSQL:
//! live agents (not deleted), keys not revoked, secret sets. A create takes its org's lock
//! on this node from the count until its insert is done, so creates through one node never
//! overshoot; two creates through two nodes at the same moment may overshoot by one each.
//! Event streams are counted in memory, per node. Past a limit the answer is 403
//! `ORG_LIMIT_REACHED`, naming the limit and its value ([`CoreError::OrgLimit`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use super::{CoreError, CoreResult};
use crate::store::Store;

/// Default most live agents per org.
pub const DEFAULT_AGENTS_PER_ORG: u32 = 1000;
/// Default most API keys (not revoked, both kinds) per org.
pub const DEFAULT_API_KEYS_PER_ORG: u32 = 100;
/// Default most secret sets per org.
pub const DEFAULT_SECRET_SETS_PER_ORG: u32 = 1000;
/// Default most open session event streams per org, on one node.
pub const DEFAULT_EVENT_STREAMS_PER_ORG: u32 = 100;

/// The limits in force; 0 = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live agents per org.
    pub agents: u32,
    /// API keys not revoked per org.
    pub api_keys: u32,
    /// Secret sets per org.
    pub secret_sets: u32,
    /// Open session event streams per org on one node.
    pub event_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            agents: DEFAULT_AGENTS_PER_ORG,
            api_keys: DEFAULT_API_KEYS_PER_ORG,
            secret_sets: DEFAULT_SECRET_SETS_PER_ORG,
            event_streams: DEFAULT_EVENT_STREAMS_PER_ORG,
        }
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Live agents.
    Agents,
    /// API keys not revoked.
    ApiKeys,
    /// Secret sets.
    SecretSets,
}

impl Kind {
    /// The setting's name in `[limits]`.
    fn setting(self) -> &'static str {
        match self {
            Kind::Agents => "agents_per_org",
            Kind::ApiKeys => "api_keys_per_org",
            Kind::SecretSets => "secret_sets_per_org",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Agents => "agents",
            Kind::ApiKeys => "API keys (not revoked)",
            Kind::SecretSets => "secret sets",
        }
    }
}

/// The refusal of one more, naming the limit and its value.
fn refused(org: &str, setting: &str, what: &str, limit: u32) -> CoreError {
    CoreError::OrgLimit(format!(
        "organization {org} has reached its limit of {limit} {what} ({setting} = {limit}); \
         remove one first or ask the operator to raise {setting}"
    ))
}

/// The per-org limits of this node, with the in-memory state they need.
#[derive(Debug, Default)]
pub struct OrgLimits {
    limits: Limits,
    /// One lock per org, held from a create's count to its insert.
    creating: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Open event streams by org, on this node.
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

/// Room for one more record of an org: hold it until the record is inserted (or not).
#[must_use = "the room is only held while this lives"]
pub struct Room(#[allow(dead_code)] Option<OwnedMutexGuard<()>>);

impl OrgLimits {
    /// Limits as configured.
    pub fn new(limits: Limits) -> Self {
        OrgLimits {
            limits,
            ..Default::default()
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn limit(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Agents => self.limits.agents,
            Kind::ApiKeys => self.limits.api_keys,
            Kind::SecretSets => self.limits.secret_sets,
        }
    }

    /// Room for one more `kind` record of `org`: counts the org's records in the store under
    /// the org's lock on this node, and keeps the lock in the answer until it is dropped
    /// (after the insert). Errors: 403 `ORG_LIMIT_REACHED` at the limit; storage errors.
    pub async fn room(&self, store: &dyn Store, org: &str, kind: Kind) -> CoreResult<Room> {
        let limit = self.limit(kind);
        if limit == 0 {
            return Ok(Room(None));
        }
        let lock = self
            .creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(org.to_string())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        let n = match kind {
            Kind::Agents => store.list_agents(org).await?.len(),
            Kind::ApiKeys => store
                .list_keys(org, None)
                .await?
                .iter()
                .filter(|k| k.revoked_ms.is_none())
                .count(),
            Kind::SecretSets => store.list_secret_sets(org).await?.len(),
        };
        if n >= limit as usize {
            return Err(refused(org, kind.setting(), kind.what(), limit));
        }
        Ok(Room(Some(guard)))
    }

    /// Opens one event stream of `org` on this node; it counts until the answer is dropped.
    /// Errors: 403 `ORG_LIMIT_REACHED` when the org has `event_streams_per_org` open here.
    pub fn open_stream(&self, org: &str) -> CoreResult<StreamPermit> {
        let limit = self.limits.event_streams;
        let mut open = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(org.to_string()).or_insert(0);
        if limit != 0 && *n >= limit {
            return Err(refused(
                org,
                "event_streams_per_org",
                "open session event streams on this node",
                limit,
            ));
        }
        *n += 1;
        Ok(StreamPermit {
            org: org.to_string(),
            streams: self.streams.clone(),
        })
    }
}

/// One open event stream, counted against its org until dropped.
pub struct StreamPermit {
    org: String,
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.org) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.org);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_count_per_org_until_dropped() {
        let l = OrgLimits::new(Limits {
            event_streams: 2,
            ..Limits::default()
        });
        let a = l.open_stream("a").unwrap();
        let _b = l.open_stream("a").unwrap();
        let e = l.open_stream("a").err().unwrap();
        assert!(matches!(e, CoreError::OrgLimit(_)), "{e:?}");
        assert!(e.to_string().contains("event_streams_per_org = 2"), "{e}");
        let _other = l.open_stream("b").unwrap();
        drop(a);
        let _c = l.open_stream("a").unwrap();
        let unlimited = OrgLimits::new(Limits {
            event_streams: 0,
            ..Limits::default()
        });
        let _many: Vec<_> = (0..500)
            .map(|_| unlimited.open_stream("a").unwrap())
            .collect();
    }
}
