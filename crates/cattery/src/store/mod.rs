//! Durable state behind one trait, so a PostgreSQL store can follow the SQLite default.
//!
//! Contract for every implementation:
//! - each method is atomic; a method that returns `Ok` has made its write durable
//!   (SQLite: WAL, `synchronous=NORMAL`, so a crash of the process loses nothing; a power
//!   loss may lose the last transactions);
//! - [`Store::end_session`] is first-wins: it only writes when the session has no end yet;
//! - names are scoped to an org; another org's records are never returned.

pub mod sqlite;

use async_trait::async_trait;
use uuid::Uuid;

use crate::model::{
    AgentRecord, ApiKeyRecord, DeploymentRecord, InstanceRecord, KeyKind, LogLine, MetricSample,
    SessionEnd, SessionRecord,
};

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique name is already taken.
    #[error("already exists")]
    Conflict,
    /// The backend failed.
    #[error("storage error: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                return StoreError::Conflict;
            }
        }
        StoreError::Backend(e.to_string())
    }
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// Filters for listing sessions (reference §A.5.2).
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Page size.
    pub limit: i64,
    /// Rows to skip.
    pub offset: i64,
    /// Only this deployment.
    pub deployment_id: Option<Uuid>,
    /// `Some(true)` active only, `Some(false)` ended only.
    pub active: Option<bool>,
    /// `Some(true)` cold only, `Some(false)` warm only.
    pub cold: Option<bool>,
    /// Created at or after (ms).
    pub start_ms: Option<i64>,
    /// Created at or before (ms).
    pub end_ms: Option<i64>,
}

/// Filters for reading logs (reference §A.4).
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Page size.
    pub limit: i64,
    /// Rows to skip.
    pub offset: i64,
    /// Newest first when true.
    pub desc: bool,
    /// Only this deployment.
    pub deployment_id: Option<Uuid>,
    /// Only this session.
    pub session_id: Option<Uuid>,
    /// Substring search.
    pub query: Option<String>,
    /// At or after (ns).
    pub start_ns: Option<i64>,
    /// At or before (ns).
    pub end_ns: Option<i64>,
}

/// Kind of a secret set (reference §A.6): `secret` (keys become env vars) or
/// `imagePullSecret` (registry credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSetKind {
    /// A regular set.
    Secret,
    /// An image pull secret.
    ImagePullSecret,
}

impl SecretSetKind {
    /// Wire and storage name: `secret` or `imagePullSecret`.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretSetKind::Secret => "secret",
            SecretSetKind::ImagePullSecret => "imagePullSecret",
        }
    }

    /// Parses the wire/storage name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "secret" => Some(SecretSetKind::Secret),
            "imagePullSecret" => Some(SecretSetKind::ImagePullSecret),
            _ => None,
        }
    }
}

/// A stored secret set, without values.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretSetRecord {
    /// Owning org.
    pub org: String,
    /// Set name.
    pub name: String,
    /// Kind.
    pub kind: SecretSetKind,
    /// Region code; fixed at creation.
    pub region: String,
    /// Registry host of an image pull secret.
    pub host: Option<String>,
    /// Creation time (ms).
    pub created_ms: i64,
    /// Last change (ms).
    pub updated_ms: i64,
    /// Key names, sorted (filled by reads; ignored by writes).
    pub keys: Vec<String>,
}

/// One sealed value: XChaCha20-Poly1305 nonce (24 bytes) and ciphertext with tag. Only
/// `core::secrets` can open it.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedValue {
    /// Secret key (the environment variable name).
    pub key: String,
    /// Nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// An org and its settings.
#[derive(Debug, Clone)]
pub struct OrgRecord {
    /// Slug used in `/v1/organizations/{org}/...`.
    pub name: String,
    /// Display name.
    pub verbose_name: String,
    /// Properties JSON object (reference §A.9), e.g. `{"defaultRegion": "local"}`.
    pub properties: serde_json::Value,
    /// Creation time (ms).
    pub created_ms: i64,
}

/// The durable state of Cattery.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates the org if missing.
    async fn ensure_org(&self, name: &str) -> StoreResult<()>;
    /// All org names.
    async fn list_orgs(&self) -> StoreResult<Vec<String>>;

    /// Stores a key by its SHA-256 hash.
    async fn insert_key(&self, rec: &ApiKeyRecord, hash: &[u8]) -> StoreResult<()>;
    /// Finds a key by hash (revoked ones included; the caller checks).
    async fn find_key(&self, hash: &[u8]) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>>;
    /// Keys of an org.
    async fn list_keys(&self, org: &str, kind: Option<KeyKind>) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes a key; false when no such key in that org.
    async fn revoke_key(&self, org: &str, id: Uuid) -> StoreResult<bool>;

    /// Creates an agent with its first deployment.
    async fn create_agent(&self, agent: &AgentRecord, dep: &DeploymentRecord) -> StoreResult<()>;
    /// Saves scaling/timestamps of an agent, plus a new deployment when given.
    async fn update_agent(
        &self,
        agent: &AgentRecord,
        dep: Option<&DeploymentRecord>,
    ) -> StoreResult<()>;
    /// A live (not deleted) agent by org and name.
    async fn get_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>>;
    /// An agent by id, deleted or not.
    async fn get_agent_by_id(&self, id: Uuid) -> StoreResult<Option<AgentRecord>>;
    /// Live agents of an org.
    async fn list_agents(&self, org: &str) -> StoreResult<Vec<AgentRecord>>;
    /// Every live agent of every org (for startup).
    async fn list_all_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Marks an agent deleted.
    async fn delete_agent(&self, id: Uuid, at_ms: i64) -> StoreResult<()>;
    /// A deployment.
    async fn get_deployment(&self, id: Uuid) -> StoreResult<Option<DeploymentRecord>>;
    /// Deployments of an agent, newest first.
    async fn list_deployments(&self, agent_id: Uuid) -> StoreResult<Vec<DeploymentRecord>>;

    /// Stores a new session.
    async fn insert_session(&self, s: &SessionRecord) -> StoreResult<()>;
    /// Records delivery: time from request to delivered (ms).
    async fn mark_delivered(&self, id: Uuid, bot_start_ms: i64) -> StoreResult<()>;
    /// Records the end if none is recorded yet; returns whether this call wrote it.
    async fn end_session(&self, id: Uuid, end: &SessionEnd) -> StoreResult<bool>;
    /// Saves a session's resource samples (replacing any saved before).
    async fn set_session_samples(&self, id: Uuid, samples: &[MetricSample]) -> StoreResult<()>;
    /// A session by id.
    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>>;
    /// Sessions of an agent (newest first) and the total matching count.
    async fn list_sessions(
        &self,
        agent_id: Uuid,
        f: &SessionFilter,
    ) -> StoreResult<(i64, Vec<SessionRecord>)>;
    /// Sessions without an end, across all agents.
    async fn list_open_sessions(&self) -> StoreResult<Vec<SessionRecord>>;
    /// Records the intent to stop an open session, with the deadline (Unix ms) at which its
    /// stop grace ends; durable when this returns. A deadline already recorded is kept (the
    /// first stop's grace is never extended).
    async fn request_stop(&self, id: Uuid, deadline_ms: i64) -> StoreResult<()>;
    /// Open sessions whose stop was requested, with the recorded deadline.
    async fn stop_requests(&self) -> StoreResult<Vec<(Uuid, i64)>>;

    /// Saves (inserts or replaces) a live instance.
    async fn put_instance(&self, rec: &InstanceRecord) -> StoreResult<()>;
    /// Forgets an instance once it is cleaned up.
    async fn delete_instance(&self, id: Uuid) -> StoreResult<()>;
    /// All recorded live instances.
    async fn list_instances(&self) -> StoreResult<Vec<InstanceRecord>>;

    /// Stores a new session taken by an already recorded (warm) instance and records the
    /// instance as promised to it: one write on the warm start's path instead of
    /// [`Store::insert_session`] plus [`Store::put_instance`]. Returns whether the instance's
    /// record was found and updated (a missing one is left missing). A store should override
    /// this to do both in one transaction (SQLite does); this default does them in turn.
    async fn insert_session_for_instance(
        &self,
        s: &SessionRecord,
        instance_id: Uuid,
    ) -> StoreResult<bool> {
        self.insert_session(s).await?;
        if let Some(mut rec) = self
            .list_instances()
            .await?
            .into_iter()
            .find(|i| i.id == instance_id)
        {
            rec.session_id = Some(s.id);
            self.put_instance(&rec).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The end of an instance: forgets its record and, for its session, records the end
    /// (first wins, as [`Store::end_session`]) and its resource samples when there are any. Returns
    /// whether this call wrote the session's end. A store should override this to do it in one
    /// transaction (SQLite does); this default does the steps in turn.
    async fn end_instance(
        &self,
        instance_id: Uuid,
        session: Option<(Uuid, &SessionEnd, &[MetricSample])>,
    ) -> StoreResult<bool> {
        self.delete_instance(instance_id).await?;
        let Some((sid, end, samples)) = session else {
            return Ok(false);
        };
        let wrote = self.end_session(sid, end).await?;
        if !samples.is_empty() {
            self.set_session_samples(sid, samples).await?;
        }
        Ok(wrote)
    }

    /// Whether a secret set of that name exists in the org.
    async fn secret_set_exists(&self, org: &str, name: &str) -> StoreResult<bool>;
    /// A secret set with its key names (never values).
    async fn get_secret_set(&self, org: &str, name: &str) -> StoreResult<Option<SecretSetRecord>>;
    /// The org's secret sets with their key names, by name.
    async fn list_secret_sets(&self, org: &str) -> StoreResult<Vec<SecretSetRecord>>;
    /// Creates the set if missing (with `set`'s kind, region and host) or touches it, then
    /// writes `values` (add or overwrite per key); with `replace_all`, first drops every
    /// value not in `values`. One transaction.
    ///
    /// Errors: `Conflict` when a set of that name exists with another kind or region.
    async fn upsert_secret_set(
        &self,
        set: &SecretSetRecord,
        values: &[SealedValue],
        replace_all: bool,
    ) -> StoreResult<()>;
    /// The sealed values of a set (for image pull secrets: the one credential).
    async fn secret_values(&self, org: &str, name: &str) -> StoreResult<Vec<SealedValue>>;
    /// Deletes a set and its values; false when there was none.
    async fn delete_secret_set(&self, org: &str, name: &str) -> StoreResult<bool>;
    /// Deletes one key of a set; false when there was none.
    async fn delete_secret(&self, org: &str, name: &str, key: &str) -> StoreResult<bool>;
    /// The snapshot of the bound set's sealed values taken when a deployment was created
    /// (empty when it binds none): `(set name, value)` pairs, by key.
    async fn deployment_secrets(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Vec<(String, SealedValue)>>;

    /// An org.
    async fn get_org(&self, name: &str) -> StoreResult<Option<OrgRecord>>;
    /// Replaces an org's properties object.
    async fn set_org_properties(&self, name: &str, props: &serde_json::Value) -> StoreResult<()>;

    /// Appends log lines.
    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()>;
    /// Reads logs of an agent and the total matching count.
    async fn query_logs(&self, agent_id: Uuid, f: &LogFilter) -> StoreResult<(i64, Vec<LogLine>)>;
    /// Deletes logs older than `before_ns`; returns rows removed.
    async fn prune_logs(&self, before_ns: i64) -> StoreResult<u64>;
    /// Keeps only the newest `max_lines` log lines (by arrival); returns rows removed.
    async fn prune_logs_over(&self, max_lines: u64) -> StoreResult<u64>;
}
