//! Durable state behind one trait per aggregate, so a PostgreSQL store can follow the SQLite
//! default and be held to the same tests (`conformance`).
//!
//! Contract for every implementation (each trait adds its own):
//! - **Atomicity**: each method is one transaction: on `Err` nothing of it was written.
//! - **Durability**: a method that returns `Ok` has committed its write (SQLite: WAL with
//!   `synchronous=NORMAL`, so a crash of the process loses nothing; a power loss may lose the
//!   last transactions). A write is never reported done unless it was committed.
//! - **Faults**: a full disk is [`StoreError::Full`], any other storage fault
//!   [`StoreError::Unavailable`]; both leave the store usable, and it heals by itself once the
//!   fault is gone (no restart).
//! - **Scoping**: names are scoped to an org; another org's records are never returned.
//! - **Per-org limits**: a create that takes a `limit` (agents, API keys, secret sets, builds) counts
//!   the org's records of that kind and inserts in one step, serialized with every other
//!   limited create of that org and kind through any store on the same database: at limit N,
//!   concurrent creates (through any number of nodes) admit exactly as many as fit under N.
//!   At the limit it fails with [`StoreError::LimitReached`]. `None`: no limit.
//! - **Times** are Unix milliseconds unless named `*_ns`.

pub(crate) mod codec;
#[cfg(test)]
pub mod conformance;
pub mod log_cap;
pub mod postgres;
pub mod sqlite;

/// The store traits, for `store.method()` calls on a concrete store.
pub mod prelude {
    pub use super::{
        AgentStore, BuildStore, ClusterStore, InstanceStore, KeyStore, LogStore, NodeStore,
        SecretStore, SessionStore, Store, WebhookStore,
    };
}

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use uuid::Uuid;

use crate::config::{StoreConfig, StoreKind};

use crate::model::{
    AgentRecord, ApiKeyRecord, DeploymentRecord, EndReason, InstanceRecord, KeyKind, LogLine,
    MetricSample, SessionEnd, SessionRecord,
};

/// Errors from a store. `Display` carries the backend's own text for the server's log; the
/// API never shows it to a client (`api::error` answers a fixed message per variant).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The record to change does not exist.
    #[error("not found")]
    NotFound,
    /// A unique name is already taken, or the record conflicts with a stored one.
    #[error("already exists")]
    Conflict,
    /// The storage is full (no space left on its device): nothing was written. Heals by itself
    /// once space is freed.
    #[error("storage full: {0}")]
    Full(String),
    /// The storage cannot be used now (I/O error, read-only file system, locked, closed):
    /// nothing was written. Worth retrying later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A stored record cannot be read back (corrupt or from an unknown version): a bug or
    /// damage, not a transient fault.
    #[error("bad stored data: {0}")]
    Invalid(String),
    /// A create given a per-org limit found the org at it (it holds that many records of the
    /// kind already, counted in the same transaction): nothing was written.
    #[error("the org's limit is reached")]
    LimitReached,
}

impl StoreError {
    /// Whether the same write may succeed later (`Full`, `Unavailable`): nothing was written.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Full(_) | StoreError::Unavailable(_))
    }
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// Whether [`open`] may make a new, empty store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Open the store, creating it when there is none (`cattery serve`).
    Create,
    /// Open a store that must already exist (`cattery keys`: a typo in `--data-dir` must not
    /// make an empty one).
    Existing,
}

/// Opens the configured store and applies its migrations: the one place that chooses a
/// backend: PostgreSQL when a database URL is given, else by [`StoreKind`]. `data_dir` is the
/// server's data directory, which exists.
///
/// Errors: the store cannot be opened or migrated; with [`OpenMode::Existing`], there is none.
pub async fn open(
    cfg: &StoreConfig,
    data_dir: &Path,
    mode: OpenMode,
) -> anyhow::Result<Arc<dyn Store>> {
    open_as(cfg, data_dir, mode, None).await
}

/// [`open`] for a server whose node id is `node`: on PostgreSQL its connections name the node
/// (`PgStore::open_as`).
///
/// Errors: as [`open`].
pub async fn open_as(
    cfg: &StoreConfig,
    data_dir: &Path,
    mode: OpenMode,
    node: Option<&str>,
) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(url) = &cfg.database_url {
        // `OpenMode::Existing` needs no check: the database is the operator's, and its
        // schema is brought up to date either way.
        let store = postgres::PgStore::open_as(url, cfg.database_pool_size, None, node)
            .await
            .context("cannot open the PostgreSQL database")?;
        return Ok(Arc::new(store));
    }
    match cfg.kind {
        StoreKind::Sqlite => {
            if mode == OpenMode::Existing && !data_dir.join(sqlite::DB_FILE).is_file() {
                anyhow::bail!(
                    "{} is not a Cattery data dir (no {}); start `cattery serve --data-dir {}` first, or pass the server's --data-dir (a server on PostgreSQL keeps its records in the database: pass its --database-url, or set CATTERY_DATABASE_URL)",
                    data_dir.display(),
                    sqlite::DB_FILE,
                    data_dir.display()
                );
            }
            let db = data_dir.join(sqlite::DB_FILE);
            if db.is_file() {
                sqlite::migrate::refuse_newer(sqlite::migrate::version_of(&db)?, &db)?;
            }
            let store = sqlite::SqliteStore::open(data_dir)
                .await
                .context("cannot open the database")?;
            Ok(Arc::new(store))
        }
    }
}

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
    /// Only sessions that ended for this reason.
    pub end_reason: Option<EndReason>,
    /// Only sessions in this `endState`.
    pub end_state: Option<crate::model::EndState>,
    /// Delivered in at least this many ms (`startTimeMin`).
    pub bot_start_min_ms: Option<i64>,
    /// Delivered in at most this many ms (`startTimeMax`).
    pub bot_start_max_ms: Option<i64>,
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
    /// Only this instance.
    pub instance_id: Option<Uuid>,
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
#[derive(custom_debug::Debug, Clone, PartialEq)]
pub struct SealedValue {
    /// Secret key (the environment variable name).
    pub key: String,
    /// Nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    #[debug(with = crate::redact::hidden)]
    pub ciphertext: Vec<u8>,
}

/// An org and its settings.
#[derive(custom_debug::Debug, Clone)]
pub struct OrgRecord {
    /// Slug used in `/v1/organizations/{org}/...`.
    pub name: String,
    /// Display name.
    pub verbose_name: String,
    /// Properties JSON object (reference §A.9), e.g. `{"defaultRegion": "local"}`. `Debug`
    /// hides the secret ones (`dailyApiKey`, `dailyDialinHmac`).
    #[debug(with = crate::redact::org_properties)]
    pub properties: serde_json::Value,
    /// Creation time (ms).
    pub created_ms: i64,
}

/// Orgs and API keys.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Creates the org if missing (idempotent; an existing org is left as it is).
    async fn ensure_org(&self, name: &str) -> StoreResult<()>;
    /// All org names, oldest first (then by name).
    async fn list_orgs(&self) -> StoreResult<Vec<String>>;
    /// An org.
    async fn get_org(&self, name: &str) -> StoreResult<Option<OrgRecord>>;
    /// Replaces an org's properties object. Errors: `NotFound` when there is no such org.
    async fn set_org_properties(&self, name: &str, props: &serde_json::Value) -> StoreResult<()>;

    /// Stores a key by its SHA-256 hash (the key itself is never stored; `public_key` is kept
    /// for public keys only). With `limit`, only while the org holds fewer than `limit` keys
    /// not revoked (of both kinds), counted in the same step (see the module's per-org limits).
    ///
    /// Errors: `Conflict` for a taken id or hash; `LimitReached` at the limit.
    async fn insert_key(
        &self,
        rec: &ApiKeyRecord,
        hash: &[u8],
        limit: Option<u32>,
    ) -> StoreResult<()>;
    /// Finds a key by hash (revoked ones included; the caller checks), with its stored hash.
    async fn find_key(&self, hash: &[u8]) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>>;
    /// Keys of an org (of one kind when given), oldest first.
    async fn list_keys(&self, org: &str, kind: Option<KeyKind>) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes a key (a second revocation keeps the first time); false when no such key in
    /// that org.
    async fn revoke_key(&self, org: &str, id: Uuid) -> StoreResult<bool>;
}

/// Agents and their immutable deployments.
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    /// Creates an agent with its first deployment, in one transaction; the deployment's bound
    /// secret set (if any) is snapshotted with it (see [`SecretStore::deployment_secrets`]).
    /// With `limit`, only while the org holds fewer than `limit` live agents, counted in the
    /// same transaction (see the module's per-org limits).
    ///
    /// Errors: `Conflict` when a live agent of that org has that name (a deleted one frees
    /// it), or when the bound secret set was deleted meanwhile; `LimitReached` at the limit.
    async fn create_agent(
        &self,
        agent: &AgentRecord,
        dep: &DeploymentRecord,
        limit: Option<u32>,
    ) -> StoreResult<()>;
    /// Saves scaling, desired deployment and update time of an agent, plus a new deployment
    /// when given (snapshotted as in [`AgentStore::create_agent`]), in one transaction.
    ///
    /// Errors: `NotFound` when there is no such agent; `Conflict` when the bound secret set
    /// was deleted meanwhile.
    async fn update_agent(
        &self,
        agent: &AgentRecord,
        dep: Option<&DeploymentRecord>,
    ) -> StoreResult<()>;
    /// A live (not deleted) agent by org and name.
    async fn get_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>>;
    /// An agent by id, deleted or not.
    async fn get_agent_by_id(&self, id: Uuid) -> StoreResult<Option<AgentRecord>>;
    /// The agent of that org and name deleted last, if any (its sessions may still run).
    async fn last_deleted_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>>;
    /// Live agents of an org, oldest first (then by name).
    async fn list_agents(&self, org: &str) -> StoreResult<Vec<AgentRecord>>;
    /// Every live agent of every org (for startup), in no particular order.
    async fn list_all_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Marks an agent deleted at `at_ms` (its name is free again; its records stay).
    /// Errors: `NotFound` for an unknown id.
    async fn delete_agent(&self, id: Uuid, at_ms: i64) -> StoreResult<()>;
    /// A deployment.
    async fn get_deployment(&self, id: Uuid) -> StoreResult<Option<DeploymentRecord>>;
    /// Deployments of an agent, newest first (same time: the later created first).
    async fn list_deployments(&self, agent_id: Uuid) -> StoreResult<Vec<DeploymentRecord>>;
}

/// Sessions. A session's end is written once: the first end wins.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session. Errors: `Conflict` for a taken id.
    async fn insert_session(&self, s: &SessionRecord) -> StoreResult<()>;
    /// Records delivery: time from request to delivered (ms). No effect on an ended or
    /// unknown session; returns whether it was recorded (the session is open), so that a
    /// start whose session was ended meanwhile by another node (a takeover while this node
    /// was fenced) is not answered as delivered.
    async fn mark_delivered(&self, id: Uuid, bot_start_ms: i64) -> StoreResult<bool>;
    /// Records the end if none is recorded yet (first wins); returns whether this call wrote
    /// it (false also for an unknown session).
    async fn end_session(&self, id: Uuid, end: &SessionEnd) -> StoreResult<bool>;
    /// Records the end of a session that still waits for its client
    /// ([`SessionRecord::waiting_for_client`]: announced by a websocket `/start`, not taken
    /// over by a start), in one step: the check and the end are one write, so a start that
    /// takes the record over ([`SessionStore::insert_session`]) either comes first (then
    /// nothing is written here) or is refused. Returns whether this call wrote the end (false
    /// also for an ended, started or unknown session).
    async fn end_waiting_session(&self, id: Uuid, end: &SessionEnd) -> StoreResult<bool>;
    /// Saves a session's resource samples (replacing any saved before; ended or not).
    async fn set_session_samples(&self, id: Uuid, samples: &[MetricSample]) -> StoreResult<()>;
    /// A session by id.
    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>>;
    /// Sessions of an agent, newest first (same time: the later inserted first), one page of
    /// `f.limit` after `f.offset`, and the total count matching the filter.
    async fn list_sessions(
        &self,
        agent_id: Uuid,
        f: &SessionFilter,
    ) -> StoreResult<(i64, Vec<SessionRecord>)>;
    /// Sessions without an end, across all agents and orgs, in no particular order.
    async fn list_open_sessions(&self) -> StoreResult<Vec<SessionRecord>>;
    /// Records the intent to stop an open session, with the deadline (Unix ms) at which its
    /// stop grace ends; durable when this returns. A deadline already recorded is kept (the
    /// first stop's grace is never extended); no effect on an ended or unknown session.
    async fn request_stop(&self, id: Uuid, deadline_ms: i64) -> StoreResult<()>;
    /// Open sessions whose stop was requested, with the recorded deadline, in no particular
    /// order.
    async fn stop_requests(&self) -> StoreResult<Vec<(Uuid, i64)>>;
}

/// Records of live instances, so a restarted server finds them again. The placement is the
/// runtime's own record, stored and returned unchanged.
#[async_trait]
pub trait InstanceStore: Send + Sync + 'static {
    /// Saves (inserts or replaces) a live instance: its first record.
    async fn put_instance(&self, rec: &InstanceRecord) -> StoreResult<()>;
    /// Records again an instance recorded before (its session, runtime, placement and
    /// time), only while its record exists and names `rec.node_id` (or no node). Returns
    /// whether it did: `false` when a takeover deleted the record or gave it to another
    /// node, which then decides the instance's fate (a re-record never re-creates a record
    /// or takes one back).
    async fn update_instance(&self, rec: &InstanceRecord) -> StoreResult<bool>;
    /// Forgets an instance once it is cleaned up (no error when there is none), and frees its
    /// capacity slot if it holds one ([`ClusterStore::reserve_slot`]), in one transaction.
    async fn delete_instance(&self, id: Uuid) -> StoreResult<()>;
    /// All recorded live instances, in no particular order.
    async fn list_instances(&self) -> StoreResult<Vec<InstanceRecord>>;
    /// Stores a new session taken by an already recorded (warm) instance and records the
    /// instance as promised to it, in one transaction (one write on the warm start's path).
    /// Returns whether the instance's record was found and updated (a missing one stays
    /// missing, and the session is stored all the same).
    ///
    /// The claim is conditional: an instance already promised to another session is never
    /// taken (no instance serves two sessions, whichever node asks).
    ///
    /// Errors: `Conflict` for a taken session id, or an instance promised to another session
    /// (then nothing is written).
    async fn insert_session_for_instance(
        &self,
        s: &SessionRecord,
        instance_id: Uuid,
    ) -> StoreResult<bool>;
    /// The end of an instance, in one transaction: forgets its record, frees its capacity slot
    /// (if it holds one) and, for its session,
    /// records the end (first wins, as [`SessionStore::end_session`]) and its resource samples
    /// when there are any (even when the end was already recorded). Returns whether this call
    /// wrote the session's end.
    async fn end_instance(
        &self,
        instance_id: Uuid,
        session: Option<(Uuid, &SessionEnd, &[MetricSample])>,
    ) -> StoreResult<bool>;
}

/// Secret sets (sealed values; the store never sees plaintext) and deployments' snapshots.
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Whether a secret set of that name exists in the org (of any kind).
    async fn secret_set_exists(&self, org: &str, name: &str) -> StoreResult<bool>;
    /// A secret set with its key names, sorted (never values).
    async fn get_secret_set(&self, org: &str, name: &str) -> StoreResult<Option<SecretSetRecord>>;
    /// The org's secret sets by name, each with its key names, sorted.
    async fn list_secret_sets(&self, org: &str) -> StoreResult<Vec<SecretSetRecord>>;
    /// Creates the set if missing (with `set`'s kind, region and host) or touches it (update
    /// time and host), then writes `values` (add or overwrite per key); with `replace_all`,
    /// first drops every value not in `values`. One transaction. With `limit`, a set that is
    /// missing is created only while the org holds fewer than `limit` sets, counted in the
    /// same transaction (see the module's per-org limits); an existing set is always written.
    ///
    /// Errors: `Conflict` when a set of that name exists with another kind or region;
    /// `LimitReached` when the set is new and the org is at the limit (nothing written either
    /// way).
    async fn upsert_secret_set(
        &self,
        set: &SecretSetRecord,
        values: &[SealedValue],
        replace_all: bool,
        limit: Option<u32>,
    ) -> StoreResult<()>;
    /// The sealed values of a set, by key (for image pull secrets: the one credential).
    async fn secret_values(&self, org: &str, name: &str) -> StoreResult<Vec<SealedValue>>;
    /// Deletes a set and its values; false when there was none. Deployments keep their
    /// snapshots.
    async fn delete_secret_set(&self, org: &str, name: &str) -> StoreResult<bool>;
    /// Deletes one key of a set (touching the set); false when there was none.
    async fn delete_secret(&self, org: &str, name: &str, key: &str) -> StoreResult<bool>;
    /// The snapshot of the bound set's sealed values taken when a deployment was created
    /// (empty when it binds none): `(set name, value)` pairs, by key.
    async fn deployment_secrets(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Vec<(String, SealedValue)>>;
    /// Re-seals every sealed value the store holds, in one transaction (`cattery secrets-key
    /// rotate`, with no server running): each value of a secret set, of a deployment's
    /// snapshot and of a webhook endpoint goes through [`Resealer::reseal`], each org's
    /// properties through [`Resealer::reseal_properties`], and every node's `key_check` that
    /// is set becomes [`Resealer::key_check`]. Returns how many values were re-sealed.
    ///
    /// Errors: `Invalid` with the resealer's message when it refuses one value (then nothing
    /// was written); the store's own faults (nothing written either).
    async fn reseal_all(&self, with: Arc<dyn Resealer>) -> StoreResult<u64>;
}

/// Where a sealed value is stored, which is what it was sealed for (the associated data).
#[derive(Debug, Clone, Copy)]
pub enum SealedOf<'a> {
    /// A value of secret set `set` of `org` (table `secrets`).
    SecretSet {
        /// Org.
        org: &'a str,
        /// Set name.
        set: &'a str,
    },
    /// A deployment's snapshot of a value of set `set` (sealed as that set's value).
    Deployment {
        /// Org.
        org: &'a str,
        /// Set name.
        set: &'a str,
    },
    /// The signing secret of webhook endpoint `id` of `org`.
    Webhook {
        /// Org.
        org: &'a str,
        /// Endpoint id.
        id: Uuid,
    },
}

/// Opens a sealed value with one key and seals it again with another
/// ([`SecretStore::reseal_all`]); `core::secrets` implements it.
pub trait Resealer: Send + Sync + 'static {
    /// `v` re-sealed for the same place. Errors: `v` does not open (a message naming it,
    /// never its value).
    fn reseal(&self, of: SealedOf<'_>, v: &SealedValue) -> Result<SealedValue, String>;
    /// Org `org`'s properties with their sealed values re-sealed; `None` when none is sealed
    /// (nothing to write). Errors: as [`Resealer::reseal`].
    fn reseal_properties(
        &self,
        org: &str,
        props: &serde_json::Value,
    ) -> Result<Option<serde_json::Value>, String>;
    /// A node key check sealed with the new key.
    fn key_check(&self) -> Vec<u8>;
}

/// Captured log lines.
#[async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// Appends log lines, all or none, keeping their order (arrival order is the order of
    /// calls, then of `lines`).
    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()>;
    /// Reads logs of an agent: one page, ordered by time (`f.desc`: newest first; same time:
    /// by arrival), and the total count matching the filter.
    async fn query_logs(&self, agent_id: Uuid, f: &LogFilter) -> StoreResult<(i64, Vec<LogLine>)>;
    /// Deletes logs older than `before_ns` (strictly); returns rows removed.
    async fn prune_logs(&self, before_ns: i64) -> StoreResult<u64>;
    /// Keeps only the newest `max_lines` log lines (by arrival); returns rows removed.
    async fn prune_logs_over(&self, max_lines: u64) -> StoreResult<u64>;
    /// [`LogStore::append_logs`], then [`LogStore::prune_logs_over`] `max_lines` (0: no cap):
    /// the log writer's step for every batch. A backend may do both in one round trip.
    /// Errors only when the lines were not stored; a prune that fails after them is logged
    /// and left to the next batch.
    async fn append_logs_capped(&self, lines: &[LogLine], max_lines: u64) -> StoreResult<()> {
        self.append_logs(lines).await?;
        if max_lines > 0 {
            if let Err(e) = self.prune_logs_over(max_lines).await {
                tracing::warn!(error = %e, "could not prune log lines over the size cap");
            }
        }
        Ok(())
    }
}

/// A Cattery node (one `cattery serve`) as it last reported itself (docs/cluster.md).
#[derive(custom_debug::Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// Node id (`--node-id`, else generated once and kept in the data dir).
    pub id: String,
    /// Where other nodes reach it (`--advertise-url`), if given.
    pub advertise_url: Option<String>,
    /// Cattery version of the node.
    pub version: String,
    /// When this run of the node started (ms).
    pub started_ms: i64,
    /// Last heartbeat (ms, the node's clock).
    pub heartbeat_ms: i64,
    /// Live instances of the node at its last heartbeat.
    pub instances: i64,
    /// Of them, serving a session.
    pub busy: i64,
    /// A value the node sealed with its secrets key (`SecretCipher::seal_check`): a node that
    /// cannot open it has another key. `None` from a node that wrote none.
    #[debug(with = crate::redact::hidden_some)]
    pub key_check: Option<Vec<u8>>,
    /// What the node derives from its cluster secret and its id
    /// (`core::cluster::ClusterSecret::check_for`): a node whose secret derives another value
    /// for that id has another secret. `None` from a node without a secret (or an older one).
    #[debug(with = crate::redact::hidden_some)]
    pub secret_check: Option<Vec<u8>>,
}

/// Nodes and their heartbeats.
#[async_trait]
pub trait NodeStore: Send + Sync + 'static {
    /// Records a node's heartbeat: inserts its row or replaces every field of it.
    async fn heartbeat(&self, node: &NodeRecord) -> StoreResult<()>;
    /// Every node that ever heartbeat, by id.
    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>>;
    /// Takes over node `dead` for node `by`, in one transaction, if `dead`'s last heartbeat
    /// is at or before `stale_ms`. The check holds a lock on `dead`'s row until the commit, so
    /// two live nodes never take over the same records, and a node that heartbeats again is
    /// not taken over (its heartbeat waits for the commit, then it sees what it lost). Every
    /// instance record and every open session that `dead` owns then belongs to `by`; they
    /// are returned. `None` when `dead` is unknown or not stale.
    async fn take_over_node(
        &self,
        dead: &str,
        by: &str,
        stale_ms: i64,
    ) -> StoreResult<Option<TakenOver>>;
    /// Forgets node `id` (removes its row from the node list), in one transaction, if its last
    /// heartbeat is at or before `stale_ms` (a node that left has 0) and it owns no instance
    /// record and no open session. Holds `id`'s row until the commit, so a heartbeat of the
    /// node meanwhile waits and then records it again.
    async fn forget_node(&self, id: &str, stale_ms: i64) -> StoreResult<ForgetNode>;
}

/// What [`NodeStore::forget_node`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgetNode {
    /// Its row is gone.
    Forgotten,
    /// No such node.
    Unknown,
    /// Its last heartbeat is newer than the limit: it may be alive. Kept.
    Alive,
    /// It still owns records (a dead node not yet taken over). Kept.
    Owns {
        /// Instance records it owns.
        instances: i64,
        /// Open sessions it owns.
        sessions: i64,
    },
}

/// What [`NodeStore::take_over_node`] moved to the taking node.
#[derive(Debug, Clone, Default)]
pub struct TakenOver {
    /// The dead node's instance records (now the taker's).
    pub instances: Vec<InstanceRecord>,
    /// The dead node's open sessions (now the taker's).
    pub sessions: Vec<SessionRecord>,
}

impl TakenOver {
    /// Names `node` as the owner of every record (what the store wrote).
    pub fn hand_to(&mut self, node: &str) {
        for i in &mut self.instances {
            i.node_id = node.to_string();
        }
        for s in &mut self.sessions {
            s.node_id = node.to_string();
        }
    }
}

/// A pending websocket session announced by `/start` (docs/cluster.md): redeemed once, on
/// whichever node the client connects to.
#[derive(custom_debug::Debug, Clone, PartialEq)]
pub struct WsTokenRecord {
    /// SHA-256 of the token (the token itself is never stored).
    pub hash: Vec<u8>,
    /// Org.
    pub org: String,
    /// Agent name.
    pub agent: String,
    /// Announced session id.
    pub session_id: Uuid,
    /// Start body as JSON bytes, if any.
    #[debug(with = crate::redact::hidden_some)]
    pub body: Option<Vec<u8>>,
    /// Expiry (Unix ms).
    pub expires_ms: i64,
}

/// A change made by any node that other nodes must see (their caches and supervisors), from
/// [`ClusterStore::watch_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An agent was created, updated (scaling, deployment) or deleted.
    Agent(Uuid),
    /// An API key was created or revoked.
    Key,
    /// A session's record was stored, delivered or ended through node `node` (empty: a writer
    /// that names no node). Sent only while some node watches sessions
    /// ([`ClusterStore::watch_sessions`]).
    Session {
        /// The node whose connection wrote the change.
        node: String,
        /// The session's org.
        org: String,
        /// The session.
        id: Uuid,
    },
    /// Changes may have been missed (the feed lost its connection and listens again, or its
    /// reader lagged): reread everything cached. Sent once the feed listens again, so a
    /// reread after it misses nothing.
    Resync,
}

/// What several nodes on one store share beyond records: cluster-wide capacity, single-use
/// websocket tokens, and a feed of changes (docs/cluster.md).
#[async_trait]
pub trait ClusterStore: Send + Sync + 'static {
    /// Reserves one of an agent's `max` capacity slots for `instance_id` (started by `node`),
    /// in one atomic step: true when it got one, false when `max` slots are held already (by
    /// any node). The slot is freed with the instance's record ([`InstanceStore::end_instance`],
    /// [`InstanceStore::delete_instance`]) or by [`ClusterStore::release_slot`].
    ///
    /// Errors: `Conflict` when `instance_id` holds a slot already (nothing written).
    async fn reserve_slot(
        &self,
        agent_id: Uuid,
        max: u32,
        instance_id: Uuid,
        node: &str,
    ) -> StoreResult<bool>;
    /// Frees an instance's slot (no error when it holds none).
    async fn release_slot(&self, instance_id: Uuid) -> StoreResult<()>;
    /// Capacity slots an agent holds now (all nodes).
    async fn slots_held(&self, agent_id: Uuid) -> StoreResult<u32>;
    /// An agent's open sessions (every node's) and the instance records of the nodes other
    /// than `node`, in one read: what an agent's status counts on a shared store
    /// (docs/cluster.md). `deployment` is the agent's current one: only its unpromised
    /// instances are warm.
    async fn agent_counts(
        &self,
        agent_id: Uuid,
        deployment: Uuid,
        node: &str,
    ) -> StoreResult<AgentCounts>;
    /// The nodes other than `node` that hold an instance record of agent `agent_id`'s
    /// deployment `deployment` promised to no session (idle, or still starting: the record
    /// does not say), sorted by id, in one read: where a start that finds no idle instance on
    /// `node` may be forwarded (docs/cluster.md, "Starts go to a warm instance").
    async fn nodes_with_unpromised(
        &self,
        agent_id: Uuid,
        deployment: Uuid,
        node: &str,
    ) -> StoreResult<Vec<String>>;
    /// Frees the slots of `node` whose instance has no record and is not in `keep`: a node
    /// that stopped between a reservation and the instance's record (a crash) leaves such
    /// slots. Returns how many were freed.
    async fn release_orphan_slots(&self, node: &str, keep: &[Uuid]) -> StoreResult<u64>;
    /// Stores a websocket token (and forgets expired ones). Errors: `Conflict` for a taken hash.
    async fn put_ws_token(&self, t: &WsTokenRecord, now_ms: i64) -> StoreResult<()>;
    /// Takes a token by hash for `org`'s agent `agent`, in one atomic step: the first caller
    /// gets it (expired or not; the caller checks), every later one `None`. A token of another
    /// org or agent is left as it is (`None`).
    async fn take_ws_token(
        &self,
        hash: &[u8],
        org: &str,
        agent: &str,
    ) -> StoreResult<Option<WsTokenRecord>>;
    /// Forgets the tokens announced for `session` of `org`'s agent `agent`; whether there was one.
    async fn revoke_ws_tokens(&self, org: &str, agent: &str, session: Uuid) -> StoreResult<bool>;
    /// A feed of changes made through any node, or `None` when the store has one node only
    /// (SQLite: this process made every change). Lagging or reconnecting sends
    /// [`Change::Resync`].
    async fn watch_changes(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<Change>>>;
    /// Whether `node` has live session streams, so that the store announces every node's
    /// session changes on the feed ([`Change::Session`]) while any node does. `true` holds for
    /// at most [`SESSION_WATCH_LEASE`] unless said again (a node that died with a stream open);
    /// `false` ends it at once. A store with one node (SQLite) announces nothing: its one
    /// engine names every change itself.
    async fn watch_sessions(&self, node: &str, on: bool) -> StoreResult<()>;
}

/// What [`ClusterStore::agent_counts`] read: an agent's open sessions on every node, and the
/// instance records of the other nodes (only its owner knows whether an instance is ready:
/// the records say whether it is promised to a session).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentCounts {
    /// Sessions not ended (every node's, websocket sessions waiting for their client
    /// included).
    pub open_sessions: u32,
    /// The other nodes' instance records promised to a session (any deployment).
    pub others_promised: u32,
    /// The other nodes' instance records of the given deployment promised to none (idle, or
    /// still starting: the record does not say).
    pub others_unpromised: u32,
    /// Every instance record of the other nodes.
    pub others_total: u32,
}

/// How long a [`ClusterStore::watch_sessions`] `true` holds unless said again.
pub const SESSION_WATCH_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// A build's state (reference §A.7): `pending` -> `building` -> `success` | `failed` |
/// `timeout`. The transitions are decided in `core::builds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildStatus {
    /// Accepted, not started.
    Pending,
    /// Running.
    Building,
    /// Done: `artifact` is deployable.
    Success,
    /// Failed: `error_message` says why.
    Failed,
    /// Ran past the build time limit.
    Timeout,
}

impl BuildStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Pending => "pending",
            BuildStatus::Building => "building",
            BuildStatus::Success => "success",
            BuildStatus::Failed => "failed",
            BuildStatus::Timeout => "timeout",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<BuildStatus> {
        Some(match s {
            "pending" => BuildStatus::Pending,
            "building" => BuildStatus::Building,
            "success" => BuildStatus::Success,
            "failed" => BuildStatus::Failed,
            "timeout" => BuildStatus::Timeout,
            _ => return None,
        })
    }

    /// Whether the build is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildStatus::Success | BuildStatus::Failed | BuildStatus::Timeout
        )
    }
}

/// A build of an uploaded context (reference §A.7 `Build`).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRecord {
    /// Build id.
    pub id: Uuid,
    /// Owning org.
    pub org: String,
    /// State.
    pub status: BuildStatus,
    /// Region it was built for.
    pub region: String,
    /// md5 of the uploaded tar.gz, first 16 hex digits (the CLI's `contextHash`).
    pub context_hash: String,
    /// Dockerfile path inside the context.
    pub dockerfile_path: String,
    /// What a deployment of it runs, once `success`: `local:<dir>` or a container image.
    pub artifact: Option<String>,
    /// Python interpreter of a `local:` artifact (its own virtualenv).
    pub python: Option<String>,
    /// Which builder made it (`venv`, `docker`).
    pub builder: Option<String>,
    /// Why it failed.
    pub error_message: Option<String>,
    /// Size of the uploaded context (bytes, compressed).
    pub context_size: i64,
    /// When it was accepted, started, finished, last changed (ms).
    pub created_ms: i64,
    /// When it started building.
    pub started_ms: Option<i64>,
    /// When it finished.
    pub completed_ms: Option<i64>,
    /// Last change.
    pub updated_ms: i64,
    /// The node that made it, whose data dir holds its directory (`""` for builds made
    /// before builds recorded it).
    pub node_id: String,
}

/// Filters for listing builds, newest first.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    /// Only this context hash.
    pub context_hash: Option<String>,
    /// Only this region.
    pub region: Option<String>,
    /// Only this state.
    pub status: Option<BuildStatus>,
    /// Only this Dockerfile path.
    pub dockerfile_path: Option<String>,
    /// Page size.
    pub limit: u32,
    /// Skipped rows.
    pub offset: u32,
}

/// Builds.
#[async_trait]
pub trait BuildStore: Send + Sync + 'static {
    /// Inserts a new build. With `limit`, only while `b.org` keeps fewer than `limit` builds
    /// (any state), counted in the same step (see the module's per-org limits).
    ///
    /// Errors: `Conflict` when the id exists; `LimitReached` at the limit (nothing written).
    async fn insert_build(&self, b: &BuildRecord, limit: Option<u32>) -> StoreResult<()>;
    /// Replaces a build's mutable fields (status, artifact, times, error). Errors: `NotFound`.
    async fn update_build(&self, b: &BuildRecord) -> StoreResult<()>;
    /// `org`'s build `id`.
    async fn get_build(&self, org: &str, id: Uuid) -> StoreResult<Option<BuildRecord>>;
    /// `org`'s builds matching `f`, newest first, and how many match in all.
    async fn list_builds(&self, org: &str, f: &BuildFilter)
        -> StoreResult<(Vec<BuildRecord>, u64)>;
    /// Every org's builds not yet over (pending or building), for recovery after a restart.
    async fn unfinished_builds(&self) -> StoreResult<Vec<BuildRecord>>;
    /// Takes `org`'s build `id` for a deployment at `now_ms`: records the use (the build
    /// retention counts from the last one) and returns the build; `None` when there is none.
    async fn use_build(&self, org: &str, id: Uuid, now_ms: i64)
        -> StoreResult<Option<BuildRecord>>;
    /// Every org's finished builds (success, failed, timeout) neither used nor completed after
    /// `cutoff_ms` (the last use, else the completion), oldest first: what the build
    /// retention may remove.
    async fn unused_builds(&self, cutoff_ms: i64) -> StoreResult<Vec<BuildRecord>>;
    /// Deletes build `id`'s record if it is still finished and unused since `cutoff_ms`, in
    /// one step: a deploy that took it meanwhile ([`BuildStore::use_build`]) keeps it, and a
    /// deploy after the deletion finds no build. Returns whether it was deleted.
    async fn delete_unused_build(&self, id: Uuid, cutoff_ms: i64) -> StoreResult<bool>;
}

/// An org's webhook endpoint (`core::webhooks`): where its events go, signed with a secret
/// that is stored sealed.
#[derive(custom_debug::Debug, Clone, PartialEq)]
pub struct WebhookEndpointRecord {
    /// Endpoint id.
    pub id: Uuid,
    /// Owning org.
    pub org: String,
    /// Where events are POSTed (may hold a credential: never logged whole).
    #[debug(with = crate::redact::url)]
    pub url: String,
    /// Event types it receives, sorted.
    pub events: Vec<String>,
    /// What it is for (the org's words).
    pub description: String,
    /// The sealed `whsec_` signing secret.
    pub secret: SealedValue,
    /// Creation time (ms).
    pub created_ms: i64,
}

/// Where a webhook delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Queued: not yet answered with 2xx, still tried.
    Pending,
    /// The endpoint answered 2xx.
    Delivered,
    /// Given up (retries exhausted).
    Failed,
}

impl DeliveryState {
    /// Wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    /// From its storage name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "failed" => Some(DeliveryState::Failed),
            _ => None,
        }
    }
}

/// One event for one endpoint: queued until delivered or given up, then kept as the
/// delivery log.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookDelivery {
    /// Message id (`webhook-id` is `msg_` and its simple form); the same on every attempt.
    pub id: Uuid,
    /// Queue order, assigned by the store (ignored by writes): an endpoint's deliveries go
    /// out in this order.
    pub seq: i64,
    /// The endpoint.
    pub endpoint_id: Uuid,
    /// Owning org.
    pub org: String,
    /// `session.started`, ...
    pub event_type: String,
    /// The JSON body, exactly as signed and sent.
    pub payload: String,
    /// When the event happened (ms).
    pub created_ms: i64,
    /// Where it is.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: i64,
    /// When it is due next (ms; also the lease of an attempt under way).
    pub next_attempt_ms: i64,
    /// HTTP status of the last attempt, if it got one.
    pub last_status: Option<i64>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// When it was delivered or given up (ms).
    pub finished_ms: Option<i64>,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    /// The state after it.
    pub state: DeliveryState,
    /// When the next attempt is due (pending only).
    pub next_attempt_ms: i64,
    /// HTTP status, if one came.
    pub status: Option<i64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// When it ended (ms).
    pub at_ms: i64,
}

/// Webhook endpoints and their delivery queue (kept across restarts) and log.
#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Stores a new endpoint. Errors: `Conflict` for a taken id.
    async fn insert_webhook_endpoint(&self, e: &WebhookEndpointRecord) -> StoreResult<()>;
    /// Endpoints of an org (`None`: of every org), oldest first.
    async fn list_webhook_endpoints(
        &self,
        org: Option<&str>,
    ) -> StoreResult<Vec<WebhookEndpointRecord>>;
    /// Deletes an endpoint of `org` and all its deliveries; false when there was none.
    async fn delete_webhook_endpoint(&self, org: &str, id: Uuid) -> StoreResult<bool>;
    /// Queues deliveries (as given: pending, with their due time), all in one transaction,
    /// in order; a delivery whose endpoint already has `max_pending` pending ones, or no
    /// longer exists, or whose id is already queued (or was delivered), is left out.
    /// Returns how many were queued.
    async fn enqueue_webhook_deliveries(
        &self,
        ds: &[WebhookDelivery],
        max_pending: i64,
    ) -> StoreResult<u64>;
    /// Claims what is due: the oldest pending delivery of each endpoint (never a later one
    /// before it) whose `next_attempt_ms` is at most `now_ms`, at most `limit` of them, by
    /// queue order; each claimed one is due again at `lease_until_ms` (so no one else takes
    /// it meanwhile).
    async fn claim_webhook_deliveries(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>>;
    /// Records an attempt: attempts + 1, the new state, due time, status, error and (when
    /// no longer pending) the finish time. No effect on an unknown delivery.
    async fn record_webhook_attempt(&self, id: Uuid, a: &DeliveryAttempt) -> StoreResult<()>;
    /// The deliveries of `org`'s endpoint, newest first, at most `limit`.
    async fn list_webhook_deliveries(
        &self,
        org: &str,
        endpoint_id: Uuid,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>>;
    /// Deletes finished (delivered or failed) deliveries that finished before `before_ms`;
    /// returns rows removed.
    async fn prune_webhook_deliveries(&self, before_ms: i64) -> StoreResult<u64>;
}

/// The durable state of Cattery: every aggregate's store. Implemented by any type that
/// implements them all.
pub trait Store:
    KeyStore
    + AgentStore
    + SessionStore
    + InstanceStore
    + SecretStore
    + LogStore
    + NodeStore
    + ClusterStore
    + BuildStore
    + WebhookStore
{
}

impl<T> Store for T where
    T: KeyStore
        + AgentStore
        + SessionStore
        + InstanceStore
        + SecretStore
        + LogStore
        + NodeStore
        + ClusterStore
        + BuildStore
        + WebhookStore
{
}
