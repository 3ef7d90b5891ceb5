//! Typed response bodies of agents, sessions and logs (errors: `api::error`), so the OpenAPI
//! document describes the real shapes (reference §B.2, §A.5, §A.4).
//!
//! Fields are declared in byte order of their JSON names: the bodies are then serialised
//! exactly as the `serde_json::Value` maps they replace (sorted keys), byte for byte.
//! Optional fields are `null` when unknown, as before; the few fields a body carries only in
//! some answers are skipped when absent (noted on each).

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::core::health::{self, HealthState};
use crate::core::orgs::{DefaultRegionProperty, RegionInfo};
use crate::core::session::AgentPoolStatus;
use crate::model::{iso_ms, iso_ns, profile_limits, AgentRecord, DeploymentRecord, LogLine};
use crate::model::{ApiKeyRecord, MetricSample, SessionRecord};
use crate::store::SecretSetRecord;

/// `{"status": "OK"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusOk {
    /// Always `OK`.
    pub status: &'static str,
}

impl StatusOk {
    /// The body.
    pub const OK: StatusOk = StatusOk { status: "OK" };
}

/// `autoScaling` of an agent (reference names).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoScaling {
    /// `maxAgents`.
    pub max_replicas: u32,
    /// `minAgents`.
    pub min_replicas: u32,
}

impl AutoScaling {
    fn of(a: &AgentRecord) -> Self {
        AutoScaling {
            max_replicas: a.max_agents,
            min_replicas: a.min_agents,
        }
    }
}

/// One condition of an agent (`Available`, `Progressing`, `Degraded`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Condition {
    /// `True` or `False`.
    pub status: &'static str,
    /// Condition name.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl Condition {
    fn new(kind: &'static str, ok: bool) -> Self {
        Condition {
            status: if ok { "True" } else { "False" },
            kind,
        }
    }
}

/// One entry of an agent's `errors`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentErrorItem {
    /// Pipecat Cloud's code: the one a runtime names as a prefix of its deployment error
    /// (`PCC_IMAGE_NOT_FOUND: ...`, `PCC_IMAGE_PULL_UNAUTHORIZED: ...`), else `PCC_UNKNOWN_ERROR`.
    pub code: String,
    /// What is wrong.
    pub message: String,
}

impl AgentErrorItem {
    /// Splits a `PCC_XXX: message` prefix off an error text.
    pub fn of(e: &str) -> Self {
        let (code, message) = match e.split_once(": ") {
            Some((c, m))
                if c.starts_with("PCC_")
                    && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') =>
            {
                (c, m)
            }
            _ => ("PCC_UNKNOWN_ERROR", e),
        };
        AgentErrorItem {
            code: code.to_string(),
            message: message.to_string(),
        }
    }
}

/// `krispViva` of an agent.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KrispViva {
    /// `tel`, `pro` or null.
    pub audio_filter: Option<String>,
}

/// `warmInstances`: the agent's instances by state (Cattery's addition), on every node of a
/// shared store (docs/cluster.md).
#[derive(Debug, Serialize, ToSchema)]
pub struct WarmInstances {
    /// Serving a session (other nodes: promised to one).
    pub busy: u32,
    /// Ready and waiting (other nodes: promised to none, ready or still starting).
    pub idle: u32,
    /// Starting (the answering node's).
    pub starting: u32,
    /// All instances not yet gone.
    pub total: u32,
}

/// `forkServer`: how this node starts the agent's instances (Cattery's addition; `local:`
/// Python agents only).
#[derive(Debug, Serialize, ToSchema)]
pub struct ForkServer {
    /// `starting` (importing the bot), `ready` (instances are forked from it), `fallback`
    /// (instances are spawned as plain processes: see `reason`) or `off` (turned off on this
    /// node).
    pub state: &'static str,
    /// Why instances are spawned instead of forked (`fallback`, `off`), e.g. a bot that starts
    /// threads at import, or an import error.
    pub reason: Option<String>,
    /// The fork server's process id (`ready`).
    pub pid: Option<i32>,
}

impl ForkServer {
    /// The wire form of a runtime's fork-server status.
    pub fn of(s: &crate::runtime::ForkServerStatus) -> Self {
        ForkServer {
            state: s.state.as_str(),
            reason: s.reason.clone(),
            pid: s.pid,
        }
    }
}

/// `currentRevision.health`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionHealth {
    /// Exit code of the last failed start.
    pub last_exit_code: Option<i32>,
    /// Why the last start failed (`exited`, `start_timeout`, `spawn_failed`).
    pub last_termination_reason: Option<&'static str>,
    /// The deployment error, else the last failure's output (its stderr tail, or its stdout's
    /// when it wrote nothing to stderr).
    pub message: Option<String>,
    /// Ready to take sessions.
    pub ready: bool,
    /// `Error`, `CrashLoopBackOff` or null.
    pub reason: Option<&'static str>,
    /// Instances started and not gone.
    pub replicas_started: u32,
    /// Failed starts.
    pub restart_count: u32,
    /// `running`, `terminated` or `waiting`.
    pub state: &'static str,
}

/// `currentRevision`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// The deployment.
    #[serde(rename = "deploymentID")]
    pub deployment_id: Uuid,
    /// Health.
    pub health: RevisionHealth,
    /// `Failed`, `Active` or `Creating`.
    pub phase: &'static str,
    /// When the deployment was created.
    pub phase_started_at: String,
    /// Ready and busy instances.
    pub ready_replicas: u32,
}

impl Revision {
    /// `previousRevision`: the previous deployment of a rollout, this node's instances of it.
    fn previous(v: &crate::core::session::PreviousStatus) -> Self {
        let last = v.health.last_failure.as_ref();
        let serves = v.serves();
        let running = v.idle + v.busy > 0;
        Revision {
            deployment_id: v.deployment_id,
            health: RevisionHealth {
                last_exit_code: last.and_then(|f| f.exit).and_then(|e| e.code),
                last_termination_reason: last.map(|f| f.reason),
                message: last.map(|f| f.stderr_tail.clone()),
                ready: serves,
                reason: (!serves).then_some("CrashLoopBackOff"),
                replicas_started: v.starting + v.idle + v.busy,
                restart_count: v.health.restarts,
                state: if running {
                    "running"
                } else if serves {
                    "waiting"
                } else {
                    "terminated"
                },
            },
            phase: if serves { "Active" } else { "Failed" },
            phase_started_at: iso_ms(v.created_ms),
            ready_replicas: v.idle + v.busy,
        }
    }
}

/// `resources` of a manifest.
#[derive(Debug, Serialize, ToSchema)]
pub struct Resources {
    /// CPU of the profile, or the explicit `resources.cpu`.
    pub cpu: Option<String>,
    /// Memory of the profile, or the explicit `resources.memory`.
    pub memory: Option<String>,
}

/// `krispModels` of a manifest.
#[derive(Debug, Serialize, ToSchema)]
pub struct KrispModels {
    /// Legacy Krisp flag.
    pub enabled: bool,
}

/// `krispViva` of a manifest.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestKrispViva {
    /// A filter is set.
    pub audio_filters: bool,
}

/// `manifest.spec` of a deployment.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestSpec {
    /// Scaling.
    pub auto_scaling: AutoScaling,
    /// Program and arguments.
    pub command: Option<Vec<String>>,
    /// The architecture instances run on (this machine's: `amd64`, `arm64`).
    pub daily_node_type: &'static str,
    /// The bound secret set, if any.
    pub env_from_secret_names: Vec<String>,
    /// Image.
    pub image: Option<String>,
    /// Image pull secret set.
    pub image_pull_secret_name: Option<String>,
    /// Krisp.
    pub krisp_models: KrispModels,
    /// Krisp VIVA.
    pub krisp_viva: ManifestKrispViva,
    /// Session time limit, when the agent set one (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_session_duration_seconds: Option<u32>,
    /// Resources of the profile.
    pub resources: Resources,
}

/// `manifest.metadata`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ManifestMetadata {
    /// Agent name.
    pub name: String,
    /// Org.
    pub namespace: String,
}

/// A deployment's manifest.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// `pipecatcloud.daily.co/v1`.
    pub api_version: &'static str,
    /// `PCService`.
    pub kind: &'static str,
    /// Name and namespace.
    pub metadata: ManifestMetadata,
    /// Spec.
    pub spec: ManifestSpec,
}

/// A deployment (the agent's `deployment`, or an item of a deployment list).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// Whether it is the agent's current deployment (deployment lists only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// The build it runs, when it was deployed from one (`buildId`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<Uuid>,
    /// Created.
    pub created_at: String,
    /// Deployment id.
    pub id: Uuid,
    /// Manifest.
    pub manifest: Manifest,
    /// Agent id.
    pub service_id: Uuid,
    /// Same as `createdAt` (deployments are immutable).
    pub updated_at: String,
}

impl Deployment {
    /// The deployment `d` of agent `a`.
    pub fn of(a: &AgentRecord, d: &DeploymentRecord) -> Self {
        let spec = &d.spec;
        let limits = profile_limits(&spec.agent_profile);
        Deployment {
            active: None,
            build_id: spec.build_id,
            created_at: iso_ms(d.created_ms),
            id: d.id,
            manifest: Manifest {
                api_version: "pipecatcloud.daily.co/v1",
                kind: "PCService",
                metadata: ManifestMetadata {
                    name: a.name.clone(),
                    namespace: a.org.clone(),
                },
                spec: ManifestSpec {
                    auto_scaling: AutoScaling::of(a),
                    command: spec.command.clone(),
                    daily_node_type: crate::core::orgs::host_architecture(),
                    env_from_secret_names: spec.secret_set.iter().cloned().collect(),
                    image: spec.image.clone(),
                    image_pull_secret_name: spec.image_pull_secret_set.clone(),
                    krisp_models: KrispModels {
                        enabled: spec.enable_krisp,
                    },
                    krisp_viva: ManifestKrispViva {
                        audio_filters: spec.krisp_viva_audio_filter.is_some(),
                    },
                    max_session_duration_seconds: spec.max_session_duration,
                    resources: Resources {
                        cpu: match &spec.resources {
                            Some(r) => Some(r.cpu.clone()),
                            None => limits.map(|l| l.cpu_str.to_string()),
                        },
                        memory: match &spec.resources {
                            Some(r) => Some(r.memory.clone()),
                            None => limits.map(|l| l.memory_str.to_string()),
                        },
                    },
                },
            },
            service_id: a.id,
            updated_at: iso_ms(d.created_ms),
        }
    }
}

/// `{"deployments": [...]}`, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentList {
    /// Deployments.
    pub deployments: Vec<Deployment>,
}

/// `ServiceDetailsResponse` (reference §B.2) plus Cattery's additive fields (`healthState`,
/// `command`, `stopGraceSeconds`, `warmInstances`...).
#[derive(custom_debug::Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentDetails {
    /// The current deployment.
    pub active_deployment_id: Uuid,
    /// Same as `ready`.
    pub active_deployment_ready: bool,
    /// Sessions being served (several nodes: the cluster's open sessions).
    pub active_session_count: u32,
    /// `agent-1x`, `agent-2x`, `agent-3x`.
    pub agent_profile: String,
    /// Scaling.
    pub auto_scaling: AutoScaling,
    /// Takes sessions now: `ready`, or during a rollout the previous deployment serves.
    pub available: bool,
    /// Program and arguments.
    pub command: Option<Vec<String>>,
    /// `Available`, `Progressing`, `Degraded`.
    pub conditions: Vec<Condition>,
    /// Created.
    pub created_at: String,
    /// The current deployment's revision.
    pub current_revision: Revision,
    /// Deleted (null while it lives).
    pub deleted_at: Option<String>,
    /// The current deployment.
    pub deployment: Deployment,
    /// The current deployment.
    pub desired_deployment_id: Uuid,
    /// Extra environment variables.
    #[debug(with = crate::redact::map_keys)]
    pub env: BTreeMap<String, String>,
    /// Why it cannot run or keeps failing.
    pub errors: Vec<AgentErrorItem>,
    /// Summary state.
    pub health_state: HealthState,
    /// Agent id.
    pub id: Uuid,
    /// Image.
    pub image: Option<String>,
    /// Image pull secret set.
    pub image_pull_secret_set: Option<String>,
    /// Krisp VIVA.
    pub krisp_viva: KrispViva,
    /// Session time limit (s).
    pub max_session_duration: u32,
    /// Agent name.
    pub name: String,
    /// Org.
    pub organization_id: String,
    /// During a rollout, the previous deployment, which serves until the current one has
    /// an instance ready (on this node); null otherwise.
    pub previous_revision: Option<Revision>,
    /// Python interpreter for `local:` agents.
    pub python: Option<String>,
    /// Ready to take sessions.
    pub ready: bool,
    /// The current deployment.
    pub reconciled_deployment_id: Uuid,
    /// Region.
    pub region: String,
    /// Bound secret set.
    pub secret_set: Option<String>,
    /// Seconds between SIGTERM and SIGKILL.
    pub stop_grace_seconds: f64,
    /// Last changed.
    pub updated_at: String,
    /// Instances by state.
    pub warm_instances: WarmInstances,
    /// What the request set that will not be used, if anything.
    pub warning: Option<String>,
    /// `none` or `token`.
    pub websocket_auth: String,
    /// Working directory of `command`.
    pub working_dir: Option<String>,
    /// Explicit `resources` (`{cpu, memory}`), when the agent has them instead of its
    /// `agentProfile`'s limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resources: Option<serde_json::Value>,
    /// The agent's own `keepDailyRooms` (absent: the org's property decides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily_rooms: Option<bool>,
    /// The Python fork server of a `local:` agent on the node that answered (absent for other
    /// agents, and before this node started an instance of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork_server: Option<ForkServer>,
}

impl AgentDetails {
    /// The details of agent `a` with its current deployment `d` and pool `ps`: health from
    /// this node's pool, judged against its share of `minAgents` (docs/cluster.md: all of
    /// them on one node), so a node that keeps none of them warm answers ready rather than
    /// waiting forever for an instance it never starts; the counts from `ps.counts` (the
    /// cluster's on several nodes).
    pub fn of(
        a: &AgentRecord,
        d: &DeploymentRecord,
        ps: &AgentPoolStatus,
        default_grace_s: f64,
        warning: Option<String>,
        fork_server: Option<ForkServer>,
    ) -> Self {
        let spec = &d.spec;
        let p = &ps.pool;
        let n = &ps.counts;
        let h = health::derive(p, ps.min_here);
        let last = p.health.last_failure.as_ref();
        // During a rollout the previous deployment serves while the current one proves
        // itself: available, not (yet) ready (reference §B.2, §B.3).
        let available = h.ready || p.previous.as_ref().is_some_and(|v| v.serves());
        AgentDetails {
            active_deployment_id: a.desired_deployment_id,
            active_deployment_ready: h.ready,
            active_session_count: n.active_sessions,
            agent_profile: spec.agent_profile.clone(),
            auto_scaling: AutoScaling::of(a),
            available,
            command: spec.command.clone(),
            conditions: vec![
                Condition::new("Available", available),
                Condition::new("Progressing", p.starting > 0),
                Condition::new("Degraded", h.crash_loop),
            ],
            created_at: iso_ms(a.created_ms),
            current_revision: Revision {
                deployment_id: d.id,
                health: RevisionHealth {
                    last_exit_code: last.and_then(|f| f.exit).and_then(|e| e.code),
                    last_termination_reason: last.map(|f| f.reason),
                    message: h.message,
                    ready: h.ready,
                    reason: h.reason,
                    replicas_started: n.starting + n.idle + n.busy,
                    restart_count: p.health.restarts,
                    state: h.container_state,
                },
                phase: h.phase,
                phase_started_at: iso_ms(d.created_ms),
                ready_replicas: n.idle + n.busy,
            },
            deleted_at: a.deleted_ms.map(iso_ms),
            deployment: Deployment::of(a, d),
            desired_deployment_id: a.desired_deployment_id,
            env: spec.env.clone(),
            errors: h
                .errors
                .into_iter()
                .map(|e| AgentErrorItem::of(&e))
                .collect(),
            health_state: h.state,
            id: a.id,
            image: spec.image.clone(),
            image_pull_secret_set: spec.image_pull_secret_set.clone(),
            krisp_viva: KrispViva {
                audio_filter: spec.krisp_viva_audio_filter.clone(),
            },
            max_session_duration: spec.max_session_duration_s(),
            name: a.name.clone(),
            organization_id: a.org.clone(),
            previous_revision: p.previous.as_ref().map(Revision::previous),
            python: spec.python.clone(),
            ready: h.ready,
            reconciled_deployment_id: a.desired_deployment_id,
            region: a.region.clone(),
            secret_set: spec.secret_set.clone(),
            stop_grace_seconds: spec.stop_grace_seconds.unwrap_or(default_grace_s),
            updated_at: iso_ms(a.updated_ms),
            warm_instances: WarmInstances {
                busy: n.busy,
                idle: n.idle,
                starting: n.starting,
                total: n.total,
            },
            warning,
            websocket_auth: spec
                .websocket_auth
                .clone()
                .unwrap_or_else(|| "token".into()),
            working_dir: spec.working_dir.clone(),
            keep_daily_rooms: spec.keep_daily_rooms,
            resources: spec
                .resources
                .as_ref()
                .map(|r| serde_json::json!({"cpu": r.cpu, "memory": r.memory})),
            fork_server,
        }
    }
}

/// `{"body": ServiceDetailsResponse}` (the CLI's `GET .../services/{name}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct WrappedAgentDetails {
    /// The details.
    pub body: AgentDetails,
}

/// Item of the agent list (reference §A.3 "List"): the six keys the CLI indexes, and more.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentListItem {
    /// The current deployment.
    pub active_deployment_id: Uuid,
    /// Created.
    pub created_at: String,
    /// Deleted (null while it lives).
    pub deleted_at: Option<String>,
    /// The current deployment (with `includeActiveDeployment` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<Deployment>,
    /// The current deployment.
    pub desired_deployment_id: Uuid,
    /// Agent id.
    pub id: Uuid,
    /// Agent name.
    pub name: String,
    /// Org.
    pub organization_id: String,
    /// The current deployment.
    pub reconciled_deployment_id: Uuid,
    /// Region.
    pub region: String,
    /// Last changed.
    pub updated_at: String,
}

impl AgentListItem {
    /// The list item of `a`.
    pub fn of(a: &AgentRecord) -> Self {
        AgentListItem {
            active_deployment_id: a.desired_deployment_id,
            created_at: iso_ms(a.created_ms),
            deleted_at: a.deleted_ms.map(iso_ms),
            deployment: None,
            desired_deployment_id: a.desired_deployment_id,
            id: a.id,
            name: a.name.clone(),
            organization_id: a.org.clone(),
            reconciled_deployment_id: a.desired_deployment_id,
            region: a.region.clone(),
            updated_at: iso_ms(a.updated_ms),
        }
    }
}

/// `{"services": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    /// Agents.
    pub services: Vec<AgentListItem>,
}

/// A session (reference §A.5.2/§A.5.3): every key present, null when unknown, plus
/// Cattery's additive `endReason`, `exitCode`, `exitSignal`, `endMessage`, `status`,
/// `waitingForClient`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// Seconds from the start request to the delivered session.
    pub bot_start_seconds: Option<f64>,
    /// Whether a new instance was started for it.
    pub cold_start: Option<bool>,
    /// How it ended (`HTTP_COMPLETE`, `HTTP_ERROR`...).
    pub completion_status: Option<String>,
    /// Created.
    pub created_at: String,
    /// Deployment that served it.
    pub deployment_id: Uuid,
    /// Why it ended, in words.
    pub end_message: Option<String>,
    /// Why it ended (`stopped`, `completed`, `error`, ...).
    pub end_reason: Option<&'static str>,
    /// How it ended in Pipecat Cloud's words: `active`, `completed`,
    /// `ended_before_agent_start`, `agent_start_timeout`, `terminated`, `agent_error`,
    /// `unknown` (derived from `endReason`).
    pub end_state: &'static str,
    /// Ended.
    pub ended_at: Option<String>,
    /// Exit code of the instance, when known.
    pub exit_code: Option<i32>,
    /// Signal that ended the instance, when known.
    pub exit_signal: Option<i32>,
    /// Always empty (single-session lookups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meeting_ids: Option<Vec<String>>,
    /// The node that owns it (docs/cluster.md): the one whose instance serves it, which stops,
    /// proxies and supervises it. Null in records made before nodes owned sessions. A
    /// Cattery extension.
    pub node_id: Option<String>,
    /// Org.
    pub organization_id: String,
    /// CPU and memory figures, null when none (single-session lookups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_metrics: Option<Option<ResourceMetrics>>,
    /// Agent id.
    pub service_id: Uuid,
    /// Agent name.
    pub service_name: String,
    /// Session id.
    pub session_id: Uuid,
    /// `active` or `ended`.
    pub status: &'static str,
    /// `daily`, `webrtc`, `websocket` or null.
    pub transport: Option<String>,
    /// Last changed.
    pub updated_at: String,
    /// A websocket session announced by `/start` whose client has not connected yet (no
    /// instance serves it; it ends `client_never_connected` when its token expires).
    pub waiting_for_client: bool,
}

impl Session {
    /// Session `s` of `agent`.
    pub fn of(s: &SessionRecord, agent: &AgentRecord) -> Self {
        let end = s.end.as_ref();
        Session {
            bot_start_seconds: s.bot_start_ms.map(|ms| ms as f64 / 1000.0),
            cold_start: s.cold_start,
            completion_status: end.map(|e| e.completion_status.clone()),
            created_at: iso_ms(s.created_ms),
            deployment_id: s.deployment_id,
            end_message: end.and_then(|e| e.message.clone()),
            end_reason: end.map(|e| e.reason.as_str()),
            end_state: crate::model::EndState::of(end).as_str(),
            ended_at: end.map(|e| iso_ms(e.ended_ms)),
            exit_code: end.and_then(|e| e.exit_code),
            exit_signal: end.and_then(|e| e.exit_signal),
            meeting_ids: None,
            node_id: Some(s.node_id.clone()).filter(|n| !n.is_empty()),
            organization_id: s.org.clone(),
            resource_metrics: None,
            service_id: s.agent_id,
            service_name: agent.name.clone(),
            session_id: s.id,
            status: if end.is_some() { "ended" } else { "active" },
            transport: s.transport.clone(),
            updated_at: iso_ms(s.updated_ms),
            waiting_for_client: s.waiting_for_client(),
        }
    }
}

/// `{"sessions": [...], "total_count"}` (note the snake_case `total_count`).
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// A page of sessions, newest first.
    pub sessions: Vec<Session>,
    /// Sessions matching the filter.
    pub total_count: i64,
}

/// One captured log line.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogItem {
    /// Deployment of the instance.
    pub deployment_id: Option<Uuid>,
    /// Instance that wrote it.
    pub instance_id: Option<Uuid>,
    /// The line.
    pub log: String,
    /// Session it belongs to, once assigned.
    pub session_id: Option<Uuid>,
    /// `stdout`, `stderr` or `platform`.
    pub stream: &'static str,
    /// Capture time, ISO-8601 with ns.
    pub timestamp: String,
}

impl LogItem {
    /// The item of line `l`.
    pub fn of(l: &LogLine) -> Self {
        LogItem {
            deployment_id: l.deployment_id,
            instance_id: l.instance_id,
            log: l.line.clone(),
            session_id: l.session_id,
            stream: l.stream,
            timestamp: iso_ns(l.ts_ns),
        }
    }
}

/// `total` of a log page.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogTotal {
    /// Always `eq`.
    pub relation: &'static str,
    /// Lines matching the filter.
    pub value: i64,
}

/// `{"logs": [...], "total": {"relation", "value"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogPage {
    /// A page of lines.
    pub logs: Vec<LogItem>,
    /// Lines matching the filter.
    pub total: LogTotal,
}

/// One sample of `resourceMetrics.timeseries`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricPoint {
    /// CPU, millicores.
    pub c: u64,
    /// Memory, bytes.
    pub m: u64,
    /// Unix time, s.
    pub t: i64,
}

/// `resourceMetrics` of a session (reference §A.5.3), from its samples.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceMetrics {
    /// CPU median, millicores.
    pub cpu_millicores_p50: u64,
    /// CPU 90th percentile.
    pub cpu_millicores_p90: u64,
    /// CPU 95th percentile.
    pub cpu_millicores_p95: u64,
    /// CPU 99th percentile.
    pub cpu_millicores_p99: u64,
    /// When the figures stand for (the session's end, or now while it runs).
    pub created_at: String,
    /// Same as `createdAt`.
    pub event_ts: String,
    /// The session.
    pub id: Uuid,
    /// Memory median, bytes.
    pub memory_bytes_p50: u64,
    /// Memory 90th percentile.
    pub memory_bytes_p90: u64,
    /// Memory 95th percentile.
    pub memory_bytes_p95: u64,
    /// Memory 99th percentile.
    pub memory_bytes_p99: u64,
    /// Samples taken.
    pub sample_count: usize,
    /// The session.
    pub session_id: Uuid,
    /// The samples.
    pub timeseries: Vec<MetricPoint>,
}

/// Nearest-rank percentile `p` (0..=1) of sorted values; 0 when empty.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

impl ResourceMetrics {
    /// The figures of `session` from its samples; `at_ms` is the time they stand for.
    pub fn of(session: Uuid, samples: &[MetricSample], at_ms: i64) -> Self {
        let mut cpu: Vec<u64> = samples.iter().map(|s| s.cpu_millicores).collect();
        let mut mem: Vec<u64> = samples.iter().map(|s| s.memory_bytes).collect();
        cpu.sort_unstable();
        mem.sort_unstable();
        let at = iso_ms(at_ms);
        ResourceMetrics {
            cpu_millicores_p50: pct(&cpu, 0.50),
            cpu_millicores_p90: pct(&cpu, 0.90),
            cpu_millicores_p95: pct(&cpu, 0.95),
            cpu_millicores_p99: pct(&cpu, 0.99),
            created_at: at.clone(),
            event_ts: at,
            id: session,
            memory_bytes_p50: pct(&mem, 0.50),
            memory_bytes_p90: pct(&mem, 0.90),
            memory_bytes_p95: pct(&mem, 0.95),
            memory_bytes_p99: pct(&mem, 0.99),
            sample_count: samples.len(),
            session_id: session,
            timeseries: samples
                .iter()
                .map(|s| MetricPoint {
                    c: s.cpu_millicores,
                    m: s.memory_bytes,
                    t: s.t,
                })
                .collect(),
        }
    }
}

/// A secret set in a listing, or with its key names (`secrets`, single-set lookups only).
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretSet {
    /// Set name.
    pub name: String,
    /// Region.
    pub region: String,
    /// Key names (values are never returned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<SecretField>>,
    /// Always `ready` (provisioning is synchronous).
    pub status: &'static str,
    /// `secret` or `imagePullSecret`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl SecretSet {
    /// The listing item of `s`.
    pub fn of(s: &SecretSetRecord) -> Self {
        SecretSet {
            name: s.name.clone(),
            region: s.region.clone(),
            secrets: None,
            status: "ready",
            kind: s.kind.as_str(),
        }
    }
}

/// One key name of a secret set.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretField {
    /// The key.
    pub field_name: String,
}

/// `{"sets": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretSetList {
    /// Sets, by name.
    pub sets: Vec<SecretSet>,
}

/// `202 {"region", "status": "OK"}` of an upsert.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretUpserted {
    /// The set's region.
    pub region: String,
    /// Always `OK`.
    pub status: &'static str,
}

/// `metadata` of an API key.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyMetadata {
    /// Human name.
    pub name: String,
}

/// An API key as the CLI lists it (`key`: the whole key for public keys and a new key,
/// the prefix and `...` otherwise).
#[derive(custom_debug::Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// Created.
    pub created_at: String,
    /// Key id.
    pub id: Uuid,
    /// The key, or its prefix.
    #[debug(with = crate::redact::hidden)]
    pub key: String,
    /// Name.
    pub metadata: KeyMetadata,
    /// Revoked.
    pub revoked: bool,
    /// When it was revoked.
    pub revoked_at: Option<String>,
    /// `public`, `private` or `token`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl ApiKey {
    /// The listing item of `k`.
    pub fn of(k: &ApiKeyRecord) -> Self {
        ApiKey {
            created_at: iso_ms(k.created_ms),
            id: k.id,
            key: k
                .public_key
                .clone()
                .unwrap_or_else(|| format!("{}...", k.prefix)),
            metadata: KeyMetadata {
                name: k.name.clone(),
            },
            revoked: k.revoked_ms.is_some(),
            revoked_at: k.revoked_ms.map(iso_ms),
            kind: k.kind.as_str(),
        }
    }
}

/// `{"private": [...], "public": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    /// Private keys (prefix only).
    pub private: Vec<ApiKey>,
    /// Public keys (whole).
    pub public: Vec<ApiKey>,
}

/// `{"id", "revoked": true, "status": "OK"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyRevoked {
    /// The key.
    pub id: Uuid,
    /// Always true.
    pub revoked: bool,
    /// Always `OK`.
    pub status: &'static str,
}

/// An organization.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Organization {
    /// Created.
    pub created_at: String,
    /// Name.
    pub name: String,
    /// Display name.
    pub verbose_name: String,
}

/// `{"organizations": [...]}` (the caller's only).
#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationList {
    /// Organizations.
    pub organizations: Vec<Organization>,
}

/// The calling key or token as the "user".
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Always empty.
    pub emails: Vec<String>,
    /// `public`, `private` or `token`.
    pub key_type: &'static str,
    /// Name of the key.
    pub name: String,
    /// Org of the key.
    pub organization: String,
    /// Id of the key.
    pub user_id: Uuid,
}

/// `{"user": {...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CurrentUser {
    /// The caller.
    pub user: User,
}

/// `{"apiKey"}`: the server's Daily API key.
#[derive(custom_debug::Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DailyKey {
    /// The key.
    #[debug(with = crate::redact::hidden)]
    pub api_key: String,
}

/// One region (note the snake_case keys, reference §A.8).
#[derive(Debug, Serialize, ToSchema)]
pub struct Region {
    /// Region code.
    pub code: String,
    /// The architecture instances get when they name none (the host's).
    pub default_architecture: &'static str,
    /// Display name.
    pub display_name: String,
    /// Architectures instances may run on (the host's only).
    pub supported_architectures: Vec<&'static str>,
}

impl From<RegionInfo> for Region {
    fn from(r: RegionInfo) -> Self {
        Region {
            code: r.code,
            default_architecture: r.architecture,
            display_name: r.display_name,
            supported_architectures: vec![r.architecture],
        }
    }
}

/// `{"regions": [...]}`: the regions this server offers.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegionList {
    /// Regions, in configuration order.
    pub regions: Vec<Region>,
}

impl RegionList {
    /// The body of the regions a server offers.
    pub fn of(regions: Vec<RegionInfo>) -> Self {
        RegionList {
            regions: regions.into_iter().map(Region::from).collect(),
        }
    }
}

/// An org's property values.
#[derive(custom_debug::Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropertyValues {
    /// Region for new agents and secret sets that name none.
    pub default_region: String,
    /// The org's Daily API key, masked (present only when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[debug(with = crate::redact::hidden_some)]
    pub daily_api_key: Option<String>,
    /// Whether the Daily rooms of ended sessions are kept (present only when set; agents
    /// may say otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily_rooms: Option<bool>,
    /// The secret Daily signs the org's dial-in webhooks with, masked (present only when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[debug(with = crate::redact::hidden_some)]
    pub daily_dialin_hmac: Option<String>,
}

/// A key shown by its last four characters only.
pub fn masked_key(k: &str) -> String {
    let tail: String = k
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if k.chars().count() <= 8 {
        "****".into()
    } else {
        format!("****{tail}")
    }
}

/// `{"properties": {"defaultRegion"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Properties {
    /// The values.
    pub properties: PropertyValues,
}

impl Properties {
    /// The values of an org's properties.
    pub fn of(p: DefaultRegionProperty) -> Self {
        Properties {
            properties: PropertyValues {
                default_region: p.current,
                daily_api_key: p.daily_api_key.as_deref().map(masked_key),
                keep_daily_rooms: p.keep_daily_rooms,
                daily_dialin_hmac: p.daily_dialin_hmac.as_deref().map(masked_key),
            },
        }
    }
}

/// One property with its schema.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropertySchema {
    /// Values it may take.
    pub available_values: Vec<String>,
    /// Value in effect.
    pub current_value: String,
    /// Value when the org sets none.
    pub default: String,
    /// What it is for.
    pub description: &'static str,
    /// Whether it is read-only (false: the org may change it).
    pub read_only: bool,
    /// JSON type of its value (`string`).
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// An org's properties with their schemas.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropertySchemas {
    /// `defaultRegion`.
    pub default_region: PropertySchema,
    /// `dailyApiKey` (present only when the org has set one; settable always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_api_key: Option<PropertySchema>,
    /// `keepDailyRooms` (present only when the org has set it; settable always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily_rooms: Option<PropertySchema>,
    /// `dailyDialinHmac` (present only when the org has set one; settable always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_dialin_hmac: Option<PropertySchema>,
}

/// `{"properties": {name: {availableValues, currentValue, default, description, readOnly,
/// type}}}`: the answer of the properties schema and of a properties update.
#[derive(Debug, Serialize, ToSchema)]
pub struct PropertiesSchema {
    /// The properties.
    pub properties: PropertySchemas,
}

impl PropertiesSchema {
    /// The schema form of an org's properties.
    pub fn of(p: DefaultRegionProperty) -> Self {
        PropertiesSchema {
            properties: PropertySchemas {
                default_region: PropertySchema {
                    available_values: p.available,
                    current_value: p.current,
                    default: p.default,
                    description: "Region used for new agents and secret sets that name none",
                    read_only: false,
                    kind: "string",
                },
                daily_api_key: p.daily_api_key.as_deref().map(|k| PropertySchema {
                    available_values: Vec::new(),
                    current_value: masked_key(k),
                    default: String::new(),
                    description: "Daily API key for createDailyRoom (else the server's --daily-api-key); \"\" unsets it",
                    read_only: false,
                    kind: "string",
                }),
                keep_daily_rooms: p.keep_daily_rooms.map(|k| PropertySchema {
                    available_values: vec!["true".into(), "false".into()],
                    current_value: k.to_string(),
                    default: "false".into(),
                    description: "Keep the Daily room of a createDailyRoom session when it ends (an agent's keepDailyRooms wins)",
                    read_only: false,
                    kind: "boolean",
                }),
                daily_dialin_hmac: p.daily_dialin_hmac.as_deref().map(|k| PropertySchema {
                    available_values: Vec::new(),
                    current_value: masked_key(k),
                    default: String::new(),
                    description: "The hmac of the pinless_dialin configuration: dial-in webhooks without Daily's signature are refused; \"\" unsets it",
                    read_only: false,
                    kind: "string",
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_metrics() {
        let id = Uuid::nil();
        let samples: Vec<MetricSample> = (1..=10)
            .map(|i| MetricSample {
                t: i,
                cpu_millicores: i as u64 * 10,
                memory_bytes: i as u64 * 1000,
            })
            .collect();
        let v = serde_json::to_value(ResourceMetrics::of(id, &samples, 0)).unwrap();
        assert_eq!(v["sampleCount"], 10);
        assert_eq!(v["cpuMillicoresP50"], 60);
        assert_eq!(v["memoryBytesP99"], 10000);
        assert_eq!(
            v["timeseries"][0],
            serde_json::json!({"t": 1, "c": 10, "m": 1000})
        );
        assert_eq!(v["createdAt"], v["eventTs"]);
        let empty = serde_json::to_value(ResourceMetrics::of(id, &[], 0)).unwrap();
        assert_eq!(empty["cpuMillicoresP50"], 0);
    }

    /// During a rollout the agent is available (the previous deployment serves) and not
    /// ready (the new one has no ready instance yet), and `previousRevision` names what
    /// serves. A failing new deployment still shows in `errors` (the CLI's deploy fails on
    /// them); a crash-looping previous one makes the agent unavailable.
    #[test]
    fn a_rollout_is_available_not_ready_with_its_previous_revision() {
        use crate::core::session::{Health, PoolStatus, PreviousStatus};
        let a = AgentRecord {
            id: Uuid::new_v4(),
            org: "o".into(),
            name: "a".into(),
            region: "local".into(),
            min_agents: 1,
            max_agents: 3,
            desired_deployment_id: Uuid::new_v4(),
            created_ms: 0,
            updated_ms: 0,
            deleted_ms: None,
        };
        let d = DeploymentRecord {
            id: a.desired_deployment_id,
            agent_id: a.id,
            spec: crate::model::DeploymentSpec::default(),
            created_ms: 0,
        };
        let prev = Uuid::new_v4();
        let mut ps = AgentPoolStatus {
            pool: PoolStatus {
                starting: 1,
                previous: Some(PreviousStatus {
                    deployment_id: prev,
                    idle: 1,
                    busy: 1,
                    ..Default::default()
                }),
                ..Default::default()
            },
            min_here: 1,
            ..Default::default()
        };
        let show = |ps: &AgentPoolStatus| {
            serde_json::to_value(AgentDetails::of(&a, &d, ps, 5.0, None, None)).unwrap()
        };
        let v = show(&ps);
        assert_eq!(v["available"], true, "{v}");
        assert_eq!(v["ready"], false, "{v}");
        assert_eq!(v["conditions"][0]["status"], "True", "{v}");
        assert_eq!(v["previousRevision"]["deploymentID"], prev.to_string());
        assert_eq!(v["previousRevision"]["readyReplicas"], 2);
        assert_eq!(v["previousRevision"]["phase"], "Active");
        assert_eq!(v["currentRevision"]["deploymentID"], d.id.to_string());
        let mut failing = Health::default();
        failing.consecutive_failures = 2;
        ps.pool.health = failing.clone();
        let v = show(&ps);
        assert_eq!(v["available"], true);
        assert!(!v["errors"].as_array().unwrap().is_empty(), "{v}");
        ps.pool.previous.as_mut().unwrap().health = failing;
        let v = show(&ps);
        assert_eq!(v["available"], false);
        assert_eq!(v["previousRevision"]["phase"], "Failed");
        ps.pool.previous = None;
        assert!(show(&ps)["previousRevision"].is_null());
    }
}
