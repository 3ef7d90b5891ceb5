//! Domain records shared by the store, the supervisor and the API layer.
//!
//! Nothing here does I/O. Times are Unix milliseconds (UTC) in `*_ms` fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The default `maxSessionDuration`, in seconds (reference §A.3: default 7200, range 60..=14400).
pub const DEFAULT_MAX_SESSION_DURATION_S: u32 = 7200;
/// Lowest accepted `maxSessionDuration`, in seconds (reference §A.3).
pub const MIN_MAX_SESSION_DURATION_S: u32 = 60;
/// Highest accepted `maxSessionDuration`, in seconds (reference §A.3).
pub const MAX_MAX_SESSION_DURATION_S: u32 = 14400;
/// Default `autoScaling.maxAgents` (reference §A.3).
pub const DEFAULT_MAX_AGENTS: u32 = 50;
/// Default stop grace, in seconds: SIGTERM to SIGKILL gap when neither the agent nor the server sets one.
pub const DEFAULT_STOP_GRACE_S: f64 = 5.0;

/// Kind of an API credential (reference §A.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// `pk_...`: starts sessions and calls the session proxy.
    Public,
    /// `sk_...`: the documented private API (`/v1/agents`, `/v1/secrets`, ...).
    Private,
    /// `pcc_pat_...`: a personal access token for the CLI's org-scoped API.
    Token,
}

impl KeyKind {
    /// Stored and printed name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Public => "public",
            KeyKind::Private => "private",
            KeyKind::Token => "token",
        }
    }

    /// Prefix of every key of this kind.
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::Public => "pk_",
            KeyKind::Private => "sk_",
            KeyKind::Token => "pcc_pat_",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "public" => Some(KeyKind::Public),
            "private" => Some(KeyKind::Private),
            "token" => Some(KeyKind::Token),
            _ => None,
        }
    }
}

/// A stored API key (the key itself is never stored, only its SHA-256).
#[derive(custom_debug::Debug, Clone)]
pub struct ApiKeyRecord {
    /// Key id (uuid).
    pub id: Uuid,
    /// Owning org name.
    pub org: String,
    /// Kind.
    pub kind: KeyKind,
    /// Human name.
    pub name: String,
    /// First characters of the key, for listings.
    pub prefix: String,
    /// Creation time (ms).
    pub created_ms: i64,
    /// Revocation time (ms), if revoked.
    pub revoked_ms: Option<i64>,
    /// The whole key, kept for public keys only (`GET .../apiKeys` lists it, reference §A.10);
    /// always `None` for private keys and tokens.
    #[debug(with = crate::redact::hidden_some)]
    pub public_key: Option<String>,
}

/// What defines a deployment: every field whose change alters how instances run.
///
/// Scaling (`minAgents`/`maxAgents`) is deliberately absent: changing it never creates a
/// new deployment (reference §A.3, "Update" semantics).
#[derive(custom_debug::Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    /// Container image, or `local:<dir>` for a Python bot directory.
    pub image: Option<String>,
    /// Program and arguments for the process runtime.
    pub command: Option<Vec<String>>,
    /// Working directory for `command`.
    pub working_dir: Option<String>,
    /// Extra environment for instances (its values may be credentials: `Debug` shows the
    /// names alone).
    #[serde(default)]
    #[debug(with = crate::redact::map_keys)]
    pub env: BTreeMap<String, String>,
    /// SIGTERM-to-SIGKILL gap in seconds; `None` uses the server default.
    pub stop_grace_seconds: Option<f64>,
    /// Bound secret set name.
    pub secret_set: Option<String>,
    /// Bound image pull secret set name.
    pub image_pull_secret_set: Option<String>,
    /// `agent-1x` | `agent-2x` | `agent-3x`.
    pub agent_profile: String,
    /// Session time limit in seconds; `None` = platform default (7200).
    pub max_session_duration: Option<u32>,
    /// Legacy Krisp flag.
    #[serde(default)]
    pub enable_krisp: bool,
    /// `tel` | `pro` | none.
    pub krisp_viva_audio_filter: Option<String>,
    /// `none` | `token`.
    pub websocket_auth: Option<String>,
    /// Python interpreter for `local:` agents.
    pub python: Option<String>,
    /// Bumped by `forceRedeploy` so an otherwise equal spec still gets a new deployment.
    #[serde(default)]
    pub revision: u64,
    /// The build this deployment runs (`buildId`), if it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<Uuid>,
    /// `keepDailyRooms`: keep the Daily rooms of this agent's sessions when they end (`None`:
    /// the org's `keepDailyRooms` property decides; the default deletes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily_rooms: Option<bool>,
    /// Explicit CPU and memory (`resources`, the CLI's `deploy --resources`) in place of the
    /// `agentProfile`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<CustomResources>,
    /// The fingerprint of a `local:` bot directory's files when the deployment was made
    /// (`core::local_dir`): a deploy of a changed directory makes a new deployment, one of an
    /// unchanged directory keeps the current one. `None` for other deployments, those from a
    /// `buildId`, and those recorded before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_fingerprint: Option<String>,
}

/// Explicit sizing of a deployment: the quantities as given and what they mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomResources {
    /// CPU as given (`500m`, `2`).
    pub cpu: String,
    /// Memory as given (`4Gi`).
    pub memory: String,
    /// CPU in millicores.
    pub cpu_millicores: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// Parses a Kubernetes CPU quantity (`500m`, `2`, `1.5`) into millicores.
pub fn parse_cpu(q: &str) -> Option<u32> {
    let (num, scale) = match q.strip_suffix('m') {
        Some(n) => (n, 1.0),
        None => (q, 1000.0),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let v = num.parse::<f64>().ok()? * scale;
    (v.is_finite() && (1.0..=1e6).contains(&v)).then(|| v.round() as u32)
}

/// Parses a Kubernetes memory quantity (`512Mi`, `4Gi`, `1G`, `1000000`) into bytes.
pub fn parse_memory(q: &str) -> Option<u64> {
    const UNITS: [(&str, f64); 10] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("k", 1e3),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("", 1.0),
    ];
    let (num, mult) = UNITS
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))?;
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let v = num.parse::<f64>().ok()? * mult;
    (v.is_finite() && (1.0..1e15).contains(&v)).then(|| v.round() as u64)
}

/// The bot directory an `image` names when it is `local:<dir>` (as given, not checked);
/// `None` for a container image.
pub fn local_image_dir(image: &str) -> Option<&str> {
    image.strip_prefix("local:")
}

impl DeploymentSpec {
    /// The bot directory of an `image: "local:<dir>"` deployment ([`local_image_dir`]).
    pub fn local_dir(&self) -> Option<&str> {
        self.image.as_deref().and_then(local_image_dir)
    }

    /// Whether its instances are Cattery's Python runner serving a `bot.py` (an `image:
    /// "local:<dir>"` without a `command`), whose exit code 3 means that `bot.py` could not be
    /// loaded (docs/python-runner.md).
    pub fn runs_the_python_runner(&self) -> bool {
        self.command.is_none() && self.local_dir().is_some()
    }

    /// The `image` when it is a container image (not `local:<dir>`).
    pub fn container_image(&self) -> Option<&str> {
        self.image
            .as_deref()
            .filter(|i| local_image_dir(i).is_none())
    }

    /// The limits instances of this deployment get: its explicit `resources` when set (with
    /// 1024 processes per GiB, at least 1024), else its `agentProfile`'s.
    pub fn limits(&self) -> Option<ProfileLimits> {
        match &self.resources {
            Some(r) => Some(ProfileLimits {
                cpu_millicores: r.cpu_millicores,
                memory_bytes: r.memory_bytes,
                pids: ((r.memory_bytes >> 20) as u32).clamp(1024, 65536),
                cpu_str: "",
                memory_str: "",
            }),
            None => profile_limits(&self.agent_profile),
        }
    }

    /// Effective session time limit in seconds.
    pub fn max_session_duration_s(&self) -> u32 {
        self.max_session_duration
            .unwrap_or(DEFAULT_MAX_SESSION_DURATION_S)
    }
}

/// Resource limits of an `agentProfile` (reference §A.3 / §B.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileLimits {
    /// CPU in millicores.
    pub cpu_millicores: u32,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Process count limit.
    pub pids: u32,
    /// Manifest strings (`resources.cpu`, `resources.memory`).
    pub cpu_str: &'static str,
    /// Manifest memory string.
    pub memory_str: &'static str,
}

/// Limits for a profile name; `None` for an unknown profile.
pub fn profile_limits(profile: &str) -> Option<ProfileLimits> {
    const GIB: u64 = 1024 * 1024 * 1024;
    match profile {
        "agent-1x" => Some(ProfileLimits {
            cpu_millicores: 500,
            memory_bytes: GIB,
            pids: 1024,
            cpu_str: "500m",
            memory_str: "1Gi",
        }),
        "agent-2x" => Some(ProfileLimits {
            cpu_millicores: 1000,
            memory_bytes: 2 * GIB,
            pids: 2048,
            cpu_str: "1000m",
            memory_str: "2Gi",
        }),
        "agent-3x" => Some(ProfileLimits {
            cpu_millicores: 1500,
            memory_bytes: 3 * GIB,
            pids: 3072,
            cpu_str: "1500m",
            memory_str: "3Gi",
        }),
        _ => None,
    }
}

/// A stored agent (service).
#[derive(Debug, Clone)]
pub struct AgentRecord {
    /// Agent (service) id.
    pub id: Uuid,
    /// Owning org.
    pub org: String,
    /// Agent name.
    pub name: String,
    /// Region code.
    pub region: String,
    /// Reserved warm instances.
    pub min_agents: u32,
    /// Instance cap (idle + busy + starting).
    pub max_agents: u32,
    /// Latest requested deployment.
    pub desired_deployment_id: Uuid,
    /// Creation time (ms).
    pub created_ms: i64,
    /// Last update (ms).
    pub updated_ms: i64,
    /// Deletion time (ms); deleted agents take no new sessions.
    pub deleted_ms: Option<i64>,
}

/// An immutable deployment (versioned manifest).
#[derive(Debug, Clone)]
pub struct DeploymentRecord {
    /// Deployment id.
    pub id: Uuid,
    /// Agent id.
    pub agent_id: Uuid,
    /// What instances run.
    pub spec: DeploymentSpec,
    /// Creation time (ms).
    pub created_ms: i64,
}

/// Why a session ended. Exactly one is recorded per session, and the first wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The agent answered `POST /bot` with 2xx, or its process exited with code 0.
    Completed,
    /// The agent answered `/bot` with an error, or exited non-zero or by a signal.
    Error,
    /// Stopped through `DELETE .../sessions/{id}` after it was delivered.
    Stopped,
    /// Stopped through `DELETE` while its instance was still starting.
    StoppedDuringStart,
    /// `maxSessionDuration` reached; the supervisor stopped it.
    MaxDuration,
    /// The instance failed to start (exited, timed out, or could not be spawned).
    StartFailed,
    /// The websocket client went away.
    ClientDisconnected,
    /// The server drained on shutdown and stopped it.
    Drained,
    /// The instance vanished while the control plane was down.
    Lost,
    /// The instance went over its `agentProfile` memory limit and the kernel killed it.
    OutOfMemory,
    /// A websocket session announced by `/start` whose client never connected before its
    /// token expired (or before the server restarted): no instance ever served it.
    ClientNeverConnected,
}

impl EndReason {
    /// Every reason.
    pub const ALL: [EndReason; 11] = [
        EndReason::Completed,
        EndReason::Error,
        EndReason::Stopped,
        EndReason::StoppedDuringStart,
        EndReason::MaxDuration,
        EndReason::StartFailed,
        EndReason::ClientDisconnected,
        EndReason::Drained,
        EndReason::Lost,
        EndReason::OutOfMemory,
        EndReason::ClientNeverConnected,
    ];

    /// The reason named `s` (its wire name).
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Wire/storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Completed => "completed",
            EndReason::Error => "error",
            EndReason::Stopped => "stopped",
            EndReason::StoppedDuringStart => "stopped_during_start",
            EndReason::MaxDuration => "max_duration",
            EndReason::StartFailed => "start_failed",
            EndReason::ClientDisconnected => "client_disconnected",
            EndReason::Drained => "drained",
            EndReason::Lost => "lost",
            EndReason::OutOfMemory => "out_of_memory",
            EndReason::ClientNeverConnected => "client_never_connected",
        }
    }
}

/// Start of the message of a start that failed because the instance did not answer `/readyz`
/// with 200 in time (`START_TIMEOUT`): what tells `agent_start_timeout` from other failed
/// starts. The message goes on `with 200 within N s (why)`; earlier versions went on
/// `within N s`, and the sessions they recorded start with the same words.
pub const START_TIMEOUT_MESSAGE: &str = "instance did not answer /readyz";

/// The `completionStatus` of a session whose start failed or was cancelled before its agent
/// had it (a `client_disconnected` one with it ended before the agent started).
pub const NEVER_DELIVERED: &str = "HTTP_ERROR";

/// A session's `endState`, Pipecat Cloud's summary of how it ended (the vocabulary of
/// `pipecat cloud agent sessions --end-state`), derived from the [`EndReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndState {
    /// Not ended.
    Active,
    /// The agent finished (its `/bot` answered, its process exited 0, or the websocket
    /// client hung up).
    Completed,
    /// Ended before the session reached the agent: stopped while its instance started, or a
    /// websocket client that never connected.
    EndedBeforeAgentStart,
    /// The instance did not become ready within the start timeout.
    AgentStartTimeout,
    /// Ended by the platform: a stop, `maxSessionDuration`, or a drain.
    Terminated,
    /// The agent failed: an error answer, a crash, a failed start, out of memory.
    AgentError,
    /// Unknown: the instance vanished while the control plane was down.
    Unknown,
}

impl EndState {
    /// Every state, in the CLI's order.
    pub const ALL: [EndState; 7] = [
        EndState::Active,
        EndState::Completed,
        EndState::EndedBeforeAgentStart,
        EndState::AgentStartTimeout,
        EndState::Terminated,
        EndState::AgentError,
        EndState::Unknown,
    ];

    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndState::Active => "active",
            EndState::Completed => "completed",
            EndState::EndedBeforeAgentStart => "ended_before_agent_start",
            EndState::AgentStartTimeout => "agent_start_timeout",
            EndState::Terminated => "terminated",
            EndState::AgentError => "agent_error",
            EndState::Unknown => "unknown",
        }
    }

    /// From its wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// The state of a session that ended with `end` (`None`: not ended).
    pub fn of(end: Option<&SessionEnd>) -> Self {
        let Some(e) = end else {
            return EndState::Active;
        };
        match e.reason {
            // A caller that hung up while its instance was still starting: the agent never
            // had the session (`HTTP_ERROR`: never delivered, docs/lifecycle.md).
            EndReason::ClientDisconnected if e.completion_status == NEVER_DELIVERED => {
                EndState::EndedBeforeAgentStart
            }
            EndReason::Completed | EndReason::ClientDisconnected => EndState::Completed,
            EndReason::Error | EndReason::OutOfMemory => EndState::AgentError,
            EndReason::StartFailed
                if e.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with(START_TIMEOUT_MESSAGE)) =>
            {
                EndState::AgentStartTimeout
            }
            EndReason::StartFailed => EndState::AgentError,
            EndReason::StoppedDuringStart | EndReason::ClientNeverConnected => {
                EndState::EndedBeforeAgentStart
            }
            EndReason::Stopped | EndReason::MaxDuration | EndReason::Drained => {
                EndState::Terminated
            }
            EndReason::Lost => EndState::Unknown,
        }
    }

    /// The end reasons whose sessions may have this state (`Active`: none, the session has
    /// no end). `StartFailed` is in both `AgentError` and `AgentStartTimeout`: its message
    /// tells them apart ([`START_TIMEOUT_MESSAGE`]); `ClientDisconnected` in both `Completed`
    /// and `EndedBeforeAgentStart`: its `completionStatus` does ([`NEVER_DELIVERED`]).
    pub fn reasons(self) -> &'static [EndReason] {
        match self {
            EndState::Active => &[],
            EndState::Completed => &[EndReason::Completed, EndReason::ClientDisconnected],
            EndState::EndedBeforeAgentStart => &[
                EndReason::StoppedDuringStart,
                EndReason::ClientNeverConnected,
                EndReason::ClientDisconnected,
            ],
            EndState::AgentStartTimeout => &[EndReason::StartFailed],
            EndState::Terminated => &[
                EndReason::Stopped,
                EndReason::MaxDuration,
                EndReason::Drained,
            ],
            EndState::AgentError => &[
                EndReason::Error,
                EndReason::OutOfMemory,
                EndReason::StartFailed,
            ],
            EndState::Unknown => &[EndReason::Lost],
        }
    }
}

/// How a session ended, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEnd {
    /// End time (ms): when the instance was gone, so billing stops there.
    pub ended_ms: i64,
    /// Reason.
    pub reason: EndReason,
    /// `completionStatus` (reference §C): `HTTP_COMPLETED`, `HTTP_ERROR`, `WS_CONNECTION_CLOSED`, or an HTTP status.
    pub completion_status: String,
    /// Exit code of the instance's main process, if it exited.
    pub exit_code: Option<i32>,
    /// Signal that ended the instance's main process, if any.
    pub exit_signal: Option<i32>,
    /// Human detail.
    pub message: Option<String>,
}

/// A stored session.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Session id.
    pub id: Uuid,
    /// Org.
    pub org: String,
    /// Agent id (`serviceId`).
    pub agent_id: Uuid,
    /// Deployment that serves it.
    pub deployment_id: Uuid,
    /// Start request time (ms).
    pub created_ms: i64,
    /// Last change (ms).
    pub updated_ms: i64,
    /// Time from start request to delivered session (ms).
    pub bot_start_ms: Option<i64>,
    /// Whether a new instance had to be started for it.
    pub cold_start: Option<bool>,
    /// Requested transport.
    pub transport: Option<String>,
    /// End, once ended.
    pub end: Option<SessionEnd>,
    /// Resource samples taken while it ran (empty until its end is recorded with them);
    /// the API builds `resourceMetrics` from them.
    pub samples: Vec<MetricSample>,
    /// The node that owns it (docs/cluster.md): the one whose instance serves it, which
    /// stops, proxies and recovers it. Empty in records made before nodes owned sessions.
    pub node_id: String,
    /// The Daily room Cattery made for it (`createDailyRoom`, a dial-in), deleted when its
    /// end is recorded, by whichever node or process records it. `None` for a session
    /// without a room, or with a room its caller made.
    pub daily_room: Option<SessionRoom>,
}

/// A Daily room Cattery made for a session ([`SessionRecord::daily_room`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRoom {
    /// The room's name (what deletes it).
    pub name: String,
    /// Whether it outlives a session that reached its agent (`keepDailyRooms` when the room
    /// was made); a session that never did has its room deleted all the same.
    pub keep: bool,
}

impl SessionRecord {
    /// A websocket session announced by `/start` whose client has not connected yet: it is
    /// recorded at `/start` with no instance, so `coldStart` is unset until a client connects
    /// and an instance is assigned (every other session is recorded with it).
    pub fn waiting_for_client(&self) -> bool {
        self.end.is_none()
            && self.cold_start.is_none()
            && self.bot_start_ms.is_none()
            && self.transport.as_deref() == Some("websocket")
    }
}

/// One resource sample of a session's instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricSample {
    /// Sample time, Unix seconds.
    pub t: i64,
    /// CPU use over the last interval, in millicores.
    pub cpu_millicores: u64,
    /// Memory in use, in bytes.
    pub memory_bytes: u64,
}

/// Durable record of a live instance, used to find it again after a restart.
#[derive(Debug, Clone)]
pub struct InstanceRecord {
    /// Instance id.
    pub id: Uuid,
    /// Agent.
    pub agent_id: Uuid,
    /// Deployment.
    pub deployment_id: Uuid,
    /// Session it serves, if busy.
    pub session_id: Option<Uuid>,
    /// Kind of the runtime that runs it (`process`).
    pub runtime: String,
    /// Where it lives: the runtime's own record (for the process runtime: pid, pid start
    /// time, port, cgroup, directory), opaque to the core and the store.
    pub placement: serde_json::Value,
    /// Creation time (ms).
    pub created_ms: i64,
    /// The node that owns it (docs/cluster.md). Empty in records made before nodes owned
    /// instances.
    pub node_id: String,
}

/// One captured output line.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Org.
    pub org: String,
    /// Agent.
    pub agent_id: Uuid,
    /// Deployment.
    pub deployment_id: Option<Uuid>,
    /// Session, when the instance served one.
    pub session_id: Option<Uuid>,
    /// Instance.
    pub instance_id: Option<Uuid>,
    /// Capture time, ns since the Unix epoch.
    pub ts_ns: i64,
    /// `stdout`, `stderr` or `platform`.
    pub stream: &'static str,
    /// The line, without its newline; invalid UTF-8 is escaped as `\xNN`.
    pub line: String,
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Current time in Unix nanoseconds.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// ISO-8601 UTC with milliseconds and `Z` (reference §A.1).
pub fn iso_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// ISO-8601 UTC with nanoseconds and `Z` (log timestamps, reference §A.1).
pub fn iso_ns(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns)
        .format("%Y-%m-%dT%H:%M:%S%.9fZ")
        .to_string()
}

/// Validates an agent name: `^[a-z0-9]([-a-z0-9]*[a-z0-9])$`, at most 54 chars (reference §A.3).
pub fn valid_agent_name(name: &str) -> bool {
    let b = name.as_bytes();
    if b.len() < 2 || b.len() > 54 {
        return false;
    }
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    edge(b[0]) && edge(b[b.len() - 1]) && b.iter().all(|&c| edge(c) || c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_a_local_bot_directory_or_a_container_image() {
        let spec = |image: Option<&str>| DeploymentSpec {
            image: image.map(str::to_string),
            ..Default::default()
        };
        let local = spec(Some("local:/srv/bot"));
        assert_eq!(local.local_dir(), Some("/srv/bot"));
        assert_eq!(local.container_image(), None);
        let image = spec(Some("ghcr.io/acme/bot:1"));
        assert_eq!(image.local_dir(), None);
        assert_eq!(image.container_image(), Some("ghcr.io/acme/bot:1"));
        assert_eq!(spec(None).local_dir(), None);
        assert_eq!(spec(None).container_image(), None);
        // The prefix is exact: anything else is an image reference to check as one.
        assert_eq!(local_image_dir("Local:/srv/bot"), None);
        assert_eq!(local_image_dir("local:"), Some(""));
    }

    #[test]
    fn kubernetes_quantities() {
        assert_eq!(parse_cpu("500m"), Some(500));
        assert_eq!(parse_cpu("2"), Some(2000));
        assert_eq!(parse_cpu("1.5"), Some(1500));
        for bad in ["", "m", "-1", "2 ", "1e3", "0"] {
            assert_eq!(parse_cpu(bad), None, "{bad:?}");
        }
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("4Gi"), Some(4 << 30));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("1048576"), Some(1 << 20));
        for bad in ["", "Gi", "4GB", "-1Mi", "1.5Xi"] {
            assert_eq!(parse_memory(bad), None, "{bad:?}");
        }
        let spec = DeploymentSpec {
            agent_profile: "agent-1x".into(),
            resources: Some(CustomResources {
                cpu: "2".into(),
                memory: "4Gi".into(),
                cpu_millicores: 2000,
                memory_bytes: 4 << 30,
            }),
            ..Default::default()
        };
        let l = spec.limits().unwrap();
        assert_eq!(
            (l.cpu_millicores, l.memory_bytes, l.pids),
            (2000, 4 << 30, 4096)
        );
        let plain = DeploymentSpec {
            agent_profile: "agent-1x".into(),
            ..Default::default()
        };
        assert_eq!(plain.limits(), profile_limits("agent-1x"));
    }

    #[test]
    fn end_states_of_end_reasons() {
        let end = |reason, message: Option<&str>| SessionEnd {
            ended_ms: 1,
            reason,
            completion_status: "HTTP_ERROR".into(),
            exit_code: None,
            exit_signal: None,
            message: message.map(str::to_string),
        };
        assert_eq!(EndState::of(None), EndState::Active);
        let timeout =
            format!("{START_TIMEOUT_MESSAGE} with 200 within 60 s (its last answer was 503)");
        // As versions before the message said "with 200" recorded it.
        let earlier = "instance did not answer /readyz within 60 s";
        for (reason, message, state) in [
            (EndReason::Completed, None, "completed"),
            (
                EndReason::ClientDisconnected,
                None,
                "ended_before_agent_start",
            ),
            (EndReason::Error, None, "agent_error"),
            (EndReason::OutOfMemory, None, "agent_error"),
            (
                EndReason::StartFailed,
                Some("instance exited before it was ready"),
                "agent_error",
            ),
            (EndReason::StartFailed, None, "agent_error"),
            (
                EndReason::StartFailed,
                Some(timeout.as_str()),
                "agent_start_timeout",
            ),
            (EndReason::StartFailed, Some(earlier), "agent_start_timeout"),
            (
                EndReason::StoppedDuringStart,
                None,
                "ended_before_agent_start",
            ),
            (EndReason::Stopped, None, "terminated"),
            (EndReason::MaxDuration, None, "terminated"),
            (EndReason::Drained, None, "terminated"),
            (EndReason::Lost, None, "unknown"),
            (
                EndReason::ClientNeverConnected,
                None,
                "ended_before_agent_start",
            ),
        ] {
            let st = EndState::of(Some(&end(reason, message)));
            assert_eq!(st.as_str(), state, "{reason:?} {message:?}");
            assert!(st.reasons().contains(&reason), "{st:?} lists {reason:?}");
            assert_eq!(EndState::parse(state), Some(st));
        }
        // A websocket caller that hung up after its agent had the session completed it.
        let delivered = SessionEnd {
            completion_status: "WS_CONNECTION_CLOSED".into(),
            ..end(EndReason::ClientDisconnected, None)
        };
        assert_eq!(EndState::of(Some(&delivered)), EndState::Completed);
        assert!(EndState::Completed
            .reasons()
            .contains(&EndReason::ClientDisconnected));
        assert_eq!(EndState::parse("sleeping"), None);
    }

    /// Every reason reads back from its stored name (the stores keep the name).
    #[test]
    fn end_reason_names_round_trip() {
        for r in EndReason::ALL {
            assert_eq!(EndReason::from_name(r.as_str()), Some(r));
            assert_eq!(crate::store::codec::end_reason(r.as_str()), r);
        }
    }

    #[test]
    fn agent_names() {
        assert!(valid_agent_name("ab"));
        assert!(valid_agent_name("my-agent-1"));
        assert!(!valid_agent_name("a"));
        assert!(!valid_agent_name("-ab"));
        assert!(!valid_agent_name("ab-"));
        assert!(!valid_agent_name("Ab"));
        assert!(!valid_agent_name(&"a".repeat(55)));
        assert!(valid_agent_name(&"a".repeat(54)));
    }
}
