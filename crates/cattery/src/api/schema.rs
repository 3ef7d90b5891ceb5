//! Typed response bodies of agents, sessions and logs (errors: `api::error`), so the OpenAPI
//! document describes the real shapes (reference §B.2, §A.5, §A.4).
//!
//! Fields are declared in byte order of their JSON names: the bodies are then serialised
//! exactly as the `serde_json::Value` maps they replace (sorted keys), byte for byte.
//! Optional fields are `null` when unknown, as before; the few fields a body carries only in
//! some answers are skipped when absent (noted on each).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::core::health::{self, HealthState};
use crate::core::supervisor::PoolStatus;
use crate::model::SessionRecord;
use crate::model::{iso_ms, iso_ns, profile_limits, AgentRecord, DeploymentRecord, LogLine};

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
    /// Always `PCC_UNKNOWN_ERROR`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

/// `krispViva` of an agent.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KrispViva {
    /// `tel`, `pro` or null.
    pub audio_filter: Option<String>,
}

/// `warmInstances`: the agent's instances by state (Cattery's addition).
#[derive(Debug, Serialize, ToSchema)]
pub struct WarmInstances {
    /// Serving a session.
    pub busy: u32,
    /// Ready and waiting.
    pub idle: u32,
    /// Starting.
    pub starting: u32,
    /// All instances not yet gone.
    pub total: u32,
}

/// `currentRevision.health`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionHealth {
    /// Exit code of the last failed start.
    pub last_exit_code: Option<i32>,
    /// Why the last start failed (`exited`, `start_timeout`, `spawn_failed`).
    pub last_termination_reason: Option<&'static str>,
    /// The deployment error, else the last failure's stderr tail.
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

/// `resources` of a manifest.
#[derive(Debug, Serialize, ToSchema)]
pub struct Resources {
    /// CPU of the profile.
    pub cpu: Option<&'static str>,
    /// Memory of the profile.
    pub memory: Option<&'static str>,
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
    /// Always `arm`.
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
                    daily_node_type: "arm",
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
                        cpu: limits.map(|l| l.cpu_str),
                        memory: limits.map(|l| l.memory_str),
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
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentDetails {
    /// The current deployment.
    pub active_deployment_id: Uuid,
    /// Same as `ready`.
    pub active_deployment_ready: bool,
    /// Sessions being served.
    pub active_session_count: u32,
    /// `agent-1x`, `agent-2x`, `agent-3x`.
    pub agent_profile: String,
    /// Scaling.
    pub auto_scaling: AutoScaling,
    /// Same as `ready`.
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
    /// Always null.
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
}

impl AgentDetails {
    /// The details of agent `a` with its current deployment `d` and pool `p`.
    pub fn of(
        a: &AgentRecord,
        d: &DeploymentRecord,
        p: &PoolStatus,
        default_grace_s: f64,
        warning: Option<String>,
    ) -> Self {
        let spec = &d.spec;
        let h = health::derive(p, a.min_agents);
        let last = p.health.last_failure.as_ref();
        AgentDetails {
            active_deployment_id: a.desired_deployment_id,
            active_deployment_ready: h.ready,
            active_session_count: p.busy,
            agent_profile: spec.agent_profile.clone(),
            auto_scaling: AutoScaling::of(a),
            available: h.ready,
            command: spec.command.clone(),
            conditions: vec![
                Condition::new("Available", h.ready),
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
                    replicas_started: p.starting + p.idle + p.busy,
                    restart_count: p.health.restarts,
                    state: h.container_state,
                },
                phase: h.phase,
                phase_started_at: iso_ms(d.created_ms),
                ready_replicas: p.idle + p.busy,
            },
            deleted_at: a.deleted_ms.map(iso_ms),
            deployment: Deployment::of(a, d),
            desired_deployment_id: a.desired_deployment_id,
            env: spec.env.clone(),
            errors: h
                .errors
                .into_iter()
                .map(|message| AgentErrorItem {
                    code: "PCC_UNKNOWN_ERROR",
                    message,
                })
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
            previous_revision: None,
            python: spec.python.clone(),
            ready: h.ready,
            reconciled_deployment_id: a.desired_deployment_id,
            region: a.region.clone(),
            secret_set: spec.secret_set.clone(),
            stop_grace_seconds: spec.stop_grace_seconds.unwrap_or(default_grace_s),
            updated_at: iso_ms(a.updated_ms),
            warm_instances: WarmInstances {
                busy: p.busy,
                idle: p.idle,
                starting: p.starting,
                total: p.total,
            },
            warning,
            websocket_auth: spec.websocket_auth.clone().unwrap_or_else(|| "none".into()),
            working_dir: spec.working_dir.clone(),
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
/// Cattery's additive `endReason`, `exitCode`, `exitSignal`, `endMessage`, `status`.
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
    /// Ended.
    pub ended_at: Option<String>,
    /// Exit code of the instance, when known.
    pub exit_code: Option<i32>,
    /// Signal that ended the instance, when known.
    pub exit_signal: Option<i32>,
    /// Always empty (single-session lookups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meeting_ids: Option<Vec<String>>,
    /// Org.
    pub organization_id: String,
    /// CPU and memory samples, null when none (single-session lookups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resource_metrics: Option<Value>,
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
            ended_at: end.map(|e| iso_ms(e.ended_ms)),
            exit_code: end.and_then(|e| e.exit_code),
            exit_signal: end.and_then(|e| e.exit_signal),
            meeting_ids: None,
            organization_id: s.org.clone(),
            resource_metrics: None,
            service_id: s.agent_id,
            service_name: agent.name.clone(),
            session_id: s.id,
            status: if end.is_some() { "ended" } else { "active" },
            transport: s.transport.clone(),
            updated_at: iso_ms(s.updated_ms),
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

#[cfg(test)]
mod equivalence {
    //! The typed bodies serialise exactly as the `json!` maps they replaced (kept here as the
    //! reference), byte for byte.
    use super::*;
    use crate::core::supervisor::{Health, StartFailure};
    use crate::model::{DeploymentSpec, EndReason, SessionEnd};
    use crate::runtime::ExitInfo;
    use serde_json::json;

    pub fn agent_details(
        a: &AgentRecord,
        d: &DeploymentRecord,
        p: &PoolStatus,
        default_grace_s: f64,
        warning: Option<String>,
    ) -> Value {
        let spec = &d.spec;
        let crash_loop =
            p.health.consecutive_failures >= crate::core::supervisor::CRASH_LOOP_THRESHOLD;
        // A crash-looping deployment is not ready, whatever minAgents is (issue #4 item 5).
        let ready =
            p.deploy_error.is_none() && !crash_loop && (a.min_agents == 0 || p.health.ever_ready);
        let last = p.health.last_failure.as_ref();
        let health_state = if p.deploy_error.is_some() {
            "invalid"
        } else if crash_loop {
            "crash_loop"
        } else if p.idle > 0 || p.busy > 0 {
            "ready"
        } else if p.starting > 0 {
            "starting"
        } else if a.min_agents == 0 {
            "scaled_to_zero"
        } else {
            "pending"
        };
        let mut errors = Vec::new();
        if let Some(e) = &p.deploy_error {
            errors.push(json!({"code": "PCC_UNKNOWN_ERROR", "message": e}));
        }
        if crash_loop {
            errors.push(json!({
                "code": "PCC_UNKNOWN_ERROR",
                "message": format!("instances fail to start: {} ({}){}",
                    last.map(|f| f.reason).unwrap_or("unknown"),
                    last.and_then(|f| f.exit).map(|e| e.describe()).unwrap_or_default(),
                    last.map(|f| stderr_summary(&f.stderr_tail)).unwrap_or_default()),
            }));
        }
        let limits = profile_limits(&spec.agent_profile);
        let mut manifest_spec = json!({
            "dailyNodeType": "arm",
            "image": spec.image,
            "command": spec.command,
            "autoScaling": {"minReplicas": a.min_agents, "maxReplicas": a.max_agents},
            "imagePullSecretName": spec.image_pull_secret_set,
            "envFromSecretNames": spec.secret_set.iter().collect::<Vec<_>>(),
            "resources": {"cpu": limits.map(|l| l.cpu_str), "memory": limits.map(|l| l.memory_str)},
            "krispModels": {"enabled": spec.enable_krisp},
            "krispViva": {"audioFilters": spec.krisp_viva_audio_filter.is_some()},
        });
        if let Some(m) = spec.max_session_duration {
            manifest_spec["maxSessionDurationSeconds"] = json!(m);
        }
        let reason = if p.deploy_error.is_some() {
            Some("Error")
        } else if crash_loop {
            Some("CrashLoopBackOff")
        } else {
            None
        };
        let phase = if p.deploy_error.is_some() {
            "Failed"
        } else if ready {
            "Active"
        } else {
            "Creating"
        };
        let condition =
            |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        json!({
            "id": a.id,
            "name": a.name,
            "region": a.region,
            "organizationId": a.org,
            "createdAt": iso_ms(a.created_ms),
            "updatedAt": iso_ms(a.updated_ms),
            "deletedAt": a.deleted_ms.map(iso_ms),
            "ready": ready,
            "available": ready,
            "desiredDeploymentId": a.desired_deployment_id,
            "activeDeploymentId": a.desired_deployment_id,
            "reconciledDeploymentId": a.desired_deployment_id,
            "activeDeploymentReady": ready,
            "autoScaling": {"minReplicas": a.min_agents, "maxReplicas": a.max_agents},
            "activeSessionCount": p.busy,
            "agentProfile": spec.agent_profile,
            "krispViva": {"audioFilter": spec.krisp_viva_audio_filter},
            "maxSessionDuration": spec.max_session_duration_s(),
            "secretSet": spec.secret_set,
            "imagePullSecretSet": spec.image_pull_secret_set,
            "websocketAuth": spec.websocket_auth.as_deref().unwrap_or("none"),
            "image": spec.image,
            "command": spec.command,
            "workingDir": spec.working_dir,
            "env": spec.env,
            "stopGraceSeconds": spec.stop_grace_seconds.unwrap_or(default_grace_s),
            "python": spec.python,
            "deployment": {
                "id": d.id,
                "serviceId": a.id,
                "createdAt": iso_ms(d.created_ms),
                "updatedAt": iso_ms(d.created_ms),
                "manifest": {
                    "apiVersion": "pipecatcloud.daily.co/v1",
                    "kind": "PCService",
                    "metadata": {"name": a.name, "namespace": a.org},
                    "spec": manifest_spec,
                }
            },
            "currentRevision": {
                "deploymentID": d.id,
                "phase": phase,
                "readyReplicas": p.idle + p.busy,
                "phaseStartedAt": iso_ms(d.created_ms),
                "health": {
                    "ready": ready,
                    "state": if p.idle + p.busy > 0 { "running" } else if crash_loop || p.deploy_error.is_some() { "terminated" } else { "waiting" },
                    "restartCount": p.health.restarts,
                    "replicasStarted": p.starting + p.idle + p.busy,
                    "reason": reason,
                    "lastExitCode": last.and_then(|f| f.exit).and_then(|e| e.code),
                    "lastTerminationReason": last.map(|f| f.reason),
                    "message": p.deploy_error.clone().or_else(|| last.map(|f| f.stderr_tail.clone())),
                },
            },
            "previousRevision": null,
            "healthState": health_state,
            "warmInstances": {"starting": p.starting, "idle": p.idle, "busy": p.busy, "total": p.total},
            "errors": errors,
            "conditions": [
                condition("Available", ready),
                condition("Progressing", p.starting > 0),
                condition("Degraded", crash_loop),
            ],
            "warning": warning,
        })
    }

    /// The last non-empty stderr lines (at most 3, 400 chars), as `; stderr: ...`, or empty.
    fn stderr_summary(tail: &str) -> String {
        let lines: Vec<&str> = tail
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            return String::new();
        }
        let last = lines[lines.len().saturating_sub(3)..].join(" | ");
        let cut: String = last
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("; stderr: {cut}")
    }

    /// Item of the agent list (reference §A.3 "List"): the six keys the CLI indexes, and more.
    pub fn agent_list_item(a: &AgentRecord) -> Value {
        json!({
            "id": a.id,
            "name": a.name,
            "region": a.region,
            "desiredDeploymentId": a.desired_deployment_id,
            "activeDeploymentId": a.desired_deployment_id,
            "reconciledDeploymentId": a.desired_deployment_id,
            "organizationId": a.org,
            "createdAt": iso_ms(a.created_ms),
            "updatedAt": iso_ms(a.updated_ms),
            "deletedAt": a.deleted_ms.map(iso_ms),
        })
    }

    pub fn session_json(s: &SessionRecord, agent: &AgentRecord) -> Value {
        let end = s.end.as_ref();
        json!({
            "sessionId": s.id,
            "serviceId": s.agent_id,
            "serviceName": agent.name,
            "organizationId": s.org,
            "deploymentId": s.deployment_id,
            "createdAt": iso_ms(s.created_ms),
            "updatedAt": iso_ms(s.updated_ms),
            "endedAt": end.map(|e| iso_ms(e.ended_ms)),
            "botStartSeconds": s.bot_start_ms.map(|ms| ms as f64 / 1000.0),
            "coldStart": s.cold_start,
            "completionStatus": end.map(|e| e.completion_status.clone()),
            "endReason": end.map(|e| e.reason.as_str()),
            "exitCode": end.and_then(|e| e.exit_code),
            "exitSignal": end.and_then(|e| e.exit_signal),
            "endMessage": end.and_then(|e| e.message.clone()),
            "transport": s.transport,
            "status": if end.is_some() { "ended" } else { "active" },
        })
    }

    fn agent(min: u32) -> AgentRecord {
        AgentRecord {
            id: Uuid::new_v4(),
            org: "org".into(),
            name: "a1".into(),
            region: "local".into(),
            min_agents: min,
            max_agents: 5,
            desired_deployment_id: Uuid::new_v4(),
            created_ms: 1_700_000_000_123,
            updated_ms: 1_700_000_001_456,
            deleted_ms: None,
        }
    }

    fn deployment(a: &AgentRecord, full: bool) -> DeploymentRecord {
        let mut spec = DeploymentSpec {
            agent_profile: "agent-1x".into(),
            command: Some(vec!["/bin/x".into(), "--y".into()]),
            ..Default::default()
        };
        if full {
            spec.image = Some("local:/srv/bot".into());
            spec.env.insert("K".into(), "v".into());
            spec.secret_set = Some("s1".into());
            spec.image_pull_secret_set = Some("p1".into());
            spec.max_session_duration = Some(600);
            spec.krisp_viva_audio_filter = Some("tel".into());
            spec.enable_krisp = true;
            spec.websocket_auth = Some("token".into());
            spec.working_dir = Some("/srv".into());
            spec.python = Some("/usr/bin/python3".into());
            spec.stop_grace_seconds = Some(2.5);
            spec.agent_profile = "agent-9x".into();
        }
        DeploymentRecord {
            id: a.desired_deployment_id,
            agent_id: a.id,
            spec,
            created_ms: 1_700_000_000_999,
        }
    }

    fn pools() -> Vec<PoolStatus> {
        let mut out = vec![PoolStatus::default()];
        let mut p = PoolStatus {
            starting: 1,
            idle: 2,
            busy: 3,
            total: 6,
            ..Default::default()
        };
        p.health.ever_ready = true;
        out.push(p.clone());
        let mut h = Health::default();
        h.consecutive_failures = 3;
        h.restarts = 4;
        h.last_failure = Some(StartFailure {
            reason: "exited",
            exit: Some(ExitInfo {
                code: Some(3),
                signal: None,
            }),
            stderr_tail: "line 1\nline 2".into(),
            at_ms: 5,
        });
        p.health = h;
        out.push(p.clone());
        p.deploy_error = Some("nope".into());
        out.push(p);
        out
    }

    #[test]
    fn agent_bodies_are_unchanged() {
        for min in [0, 2] {
            let a = agent(min);
            for full in [false, true] {
                let d = deployment(&a, full);
                for p in pools() {
                    for w in [None, Some("w".to_string())] {
                        let old = agent_details(&a, &d, &p, 5.0, w.clone());
                        let new = AgentDetails::of(&a, &d, &p, 5.0, w);
                        assert_eq!(
                            serde_json::to_string(&new).unwrap(),
                            serde_json::to_string(&old).unwrap()
                        );
                    }
                }
                let mut item = AgentListItem::of(&a);
                let mut old = agent_list_item(&a);
                assert_eq!(serde_json::to_string(&item).unwrap(), old.to_string());
                item.deployment = Some(Deployment::of(&a, &d));
                old["deployment"] =
                    agent_details(&a, &d, &PoolStatus::default(), 1.0, None)["deployment"].take();
                assert_eq!(serde_json::to_string(&item).unwrap(), old.to_string());
            }
        }
    }

    #[test]
    fn session_bodies_are_unchanged() {
        let a = agent(0);
        let mut s = SessionRecord {
            id: Uuid::new_v4(),
            org: "org".into(),
            agent_id: a.id,
            deployment_id: a.desired_deployment_id,
            created_ms: 1,
            updated_ms: 2,
            bot_start_ms: None,
            cold_start: None,
            transport: None,
            end: None,
            metrics: None,
        };
        assert_eq!(
            serde_json::to_string(&Session::of(&s, &a)).unwrap(),
            session_json(&s, &a).to_string()
        );
        s.bot_start_ms = Some(1234);
        s.cold_start = Some(true);
        s.transport = Some("daily".into());
        s.end = Some(SessionEnd {
            ended_ms: 9,
            reason: EndReason::Stopped,
            completion_status: "HTTP_COMPLETE".into(),
            exit_code: Some(0),
            exit_signal: Some(15),
            message: Some("m".into()),
        });
        let mut new = Session::of(&s, &a);
        let mut old = session_json(&s, &a);
        assert_eq!(serde_json::to_string(&new).unwrap(), old.to_string());
        new.resource_metrics = Some(Value::Null);
        new.meeting_ids = Some(Vec::new());
        old["resourceMetrics"] = Value::Null;
        old["meetingIds"] = json!([]);
        assert_eq!(serde_json::to_string(&new).unwrap(), old.to_string());
    }
}
