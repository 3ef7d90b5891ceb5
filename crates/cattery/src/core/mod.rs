//! Domain logic: agents and deployments, the session lifecycle, the warm pool.
//!
//! Nothing here knows about HTTP. Handlers call these functions and turn [`CoreError`] into
//! responses in `api::error`, the one place that decides statuses and bodies.

pub mod agents;
pub mod builds;
pub mod cluster;
pub mod daily;
pub mod env;
pub mod exec_check;
pub mod health;
pub mod instance_http;
pub mod keys;
pub mod limits;
pub mod local_dir;
pub mod lookup;
pub mod orgs;
pub mod secrets;
pub mod session;
pub mod shared;
pub mod webhooks;
pub mod whatsapp;

use crate::store::StoreError;

/// Errors of domain operations. Each variant's doc says which HTTP status it becomes.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Daily's API refused or failed (`status`: Daily's HTTP status, 502 when it gave none):
    /// 400 `DAILY_BAD_REQUEST` for its 400, 429 `DAILY_RATE_LIMITED`, else 502
    /// (`DAILY_UNAUTHORIZED` for its 401/403, `DAILY_ERROR`).
    #[error("{message}")]
    Daily {
        /// Daily's status.
        status: u16,
        /// What Daily said.
        message: String,
    },
    /// 404: the named thing does not exist (or belongs to another org).
    #[error("{0}")]
    NotFound(String),
    /// 400 with a code (`GENERIC_BAD_REQUEST`, `"400"`, ...).
    #[error("{message}")]
    BadRequest {
        /// Error code.
        code: &'static str,
        /// Message.
        message: String,
    },
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 413: the start `body` is over the per-transport limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429: the agent is at `maxAgents` (reference §A.5 / §B.4).
    #[error("agent {0} is at capacity (maxAgents)")]
    AtCapacity(String),
    /// 429 `"429"`: the org already has as many of something that passes (uploads waiting to
    /// be built, builds running) as one org may have at once; the message names the limit.
    #[error("{0}")]
    OrgBusy(String),
    /// 403 `ORG_LIMIT_REACHED`: the org is at one of its per-org limits (`core::limits`); the
    /// message names the limit and its value.
    #[error("{0}")]
    OrgLimit(String),
    /// 503: the server is draining and takes no new sessions.
    #[error("server is shutting down; no new sessions")]
    Draining,
    /// 503 `NODE_FENCED`: this node's heartbeats were late (it may have been taken over):
    /// it takes no new session until it has reconciled with the store (docs/cluster.md).
    #[error("this node's heartbeats were late; it takes no new session until it has reconciled with the store")]
    Fenced,
    /// 400 `PCC-1001`: the deployment cannot run (reference §A.12).
    #[error("{0}")]
    DeploymentNotReady(String),
    /// 503 or 504 with a specific code: the instance could not be started.
    #[error("{message}")]
    StartFailed {
        /// `INSTANCE_EXITED`, `START_TIMEOUT`, `AGENT_CRASH_LOOP`, `SPAWN_FAILED`, `DELIVERY_FAILED`.
        code: &'static str,
        /// Message.
        message: String,
    },
    /// 409 `STOPPED_DURING_START`: the session was stopped before it was delivered.
    #[error("session {0} was stopped before its instance was ready")]
    StoppedDuringStart(uuid::Uuid),
    /// 503 `STORAGE_FULL` (the disk is full) or `STORAGE_UNAVAILABLE` (any other storage
    /// fault); 404/409 for a record that vanished or conflicts; 500 for a stored record that
    /// cannot be read back. The driver's text goes to the server's log, never to the client
    /// (`api::error`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// 503 `NODE_UNREACHABLE`: the session belongs to another node of the cluster, which
    /// this node could not reach in time (docs/cluster.md).
    #[error("{0}")]
    NodeUnreachable(String),
}

impl CoreError {
    /// A 400 `GENERIC_BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        CoreError::BadRequest {
            code: "GENERIC_BAD_REQUEST",
            message: message.into(),
        }
    }
}

/// Result alias.
pub type CoreResult<T> = Result<T, CoreError>;
