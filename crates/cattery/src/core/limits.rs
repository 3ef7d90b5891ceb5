//! Per-org limits on a shared server (`[limits]`, docs/operations.md#per-org-limits): how many
//! agents, API keys and secret sets an org may hold, and how many session event streams
//! (`GET /v1/sessions/events`) it may keep open on one node, and how many builds and upload
//! URLs it may have at once on one node (counted by `core::builds`, answered 429: they pass).
//!
//! Durable records are counted by the store, in the same step as the create's insert, so the
//! limit holds for the whole cluster on PostgreSQL: live agents (not deleted), keys not
//! revoked, secret sets, and the builds an org keeps (`core::builds`). The store serializes the creates of one org and kind (SQLite: its one
//! writer; PostgreSQL: a transaction-scoped advisory lock), so concurrent creates through any
//! number of nodes never overshoot ([`crate::store`], "per-org limits"). Event streams are
//! counted in memory, per node. Past a limit the answer is 403 `ORG_LIMIT_REACHED`, naming the
//! limit and its value ([`CoreError::OrgLimit`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{CoreError, CoreResult};
use crate::store::StoreError;

/// Default most live agents per org.
pub const DEFAULT_AGENTS_PER_ORG: u32 = 1000;
/// Default most API keys (not revoked, both kinds) per org.
pub const DEFAULT_API_KEYS_PER_ORG: u32 = 100;
/// Default most secret sets per org.
pub const DEFAULT_SECRET_SETS_PER_ORG: u32 = 1000;
/// Default most open session event streams per org, on one node.
pub const DEFAULT_EVENT_STREAMS_PER_ORG: u32 = 100;
/// Default most builds per org pending or building at once, on one node (`core::builds`).
pub const DEFAULT_BUILDS_PER_ORG: u32 = 4;
/// Default most upload URLs per org not yet built nor expired, on one node (`core::builds`).
pub const DEFAULT_BUILD_UPLOADS_PER_ORG: u32 = 10;

/// Default most builds one org keeps (any state, until the build retention deletes them;
/// `core::builds`).
pub const DEFAULT_BUILDS_KEPT_PER_ORG: u32 = 100;

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
    /// Builds per org pending or building at once on one node (429 past it).
    pub builds: u32,
    /// Upload URLs per org neither built nor expired on one node (429 past it).
    pub build_uploads: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            agents: DEFAULT_AGENTS_PER_ORG,
            api_keys: DEFAULT_API_KEYS_PER_ORG,
            secret_sets: DEFAULT_SECRET_SETS_PER_ORG,
            event_streams: DEFAULT_EVENT_STREAMS_PER_ORG,
            builds: DEFAULT_BUILDS_PER_ORG,
            build_uploads: DEFAULT_BUILD_UPLOADS_PER_ORG,
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
    /// Open event streams by org, on this node.
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

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

    /// The limit on `kind` records per org, for the store's create (`None`: no limit).
    pub fn of(&self, kind: Kind) -> Option<u32> {
        let limit = match kind {
            Kind::Agents => self.limits.agents,
            Kind::ApiKeys => self.limits.api_keys,
            Kind::SecretSets => self.limits.secret_sets,
        };
        (limit != 0).then_some(limit)
    }

    /// A store error of a create of `org`'s `kind` record given [`OrgLimits::of`]: the store's
    /// `LimitReached` is the 403 `ORG_LIMIT_REACHED` naming the limit; any other error stays
    /// a store error.
    pub fn refusal(&self, org: &str, kind: Kind, e: StoreError) -> CoreError {
        match (e, self.of(kind)) {
            (StoreError::LimitReached, Some(limit)) => {
                refused(org, kind.setting(), kind.what(), limit)
            }
            (e, _) => CoreError::Store(e),
        }
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
    fn the_stores_refusal_names_the_limit() {
        let l = OrgLimits::new(Limits {
            agents: 3,
            api_keys: 0,
            ..Limits::default()
        });
        assert_eq!(l.of(Kind::Agents), Some(3));
        assert_eq!(l.of(Kind::ApiKeys), None, "0 = no limit");
        let e = l.refusal("acme", Kind::Agents, StoreError::LimitReached);
        assert!(matches!(e, CoreError::OrgLimit(_)), "{e:?}");
        assert!(
            e.to_string().contains(
                "organization acme has reached its limit of 3 agents (agents_per_org = 3)"
            ),
            "{e}"
        );
        let e = l.refusal("acme", Kind::Agents, StoreError::Conflict);
        assert!(matches!(e, CoreError::Store(StoreError::Conflict)), "{e:?}");
    }

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
