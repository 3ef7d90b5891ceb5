//! `/v1/agents`: create, list, get, update, delete (reference §A.3, response §B.2).

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::auth::PrivateAuth;
use super::error::{ApiError, ApiResult};
use super::{ApiJson, ApiPath, AppState};
use crate::core::agents::{self, AgentRequest};
use crate::core::supervisor::PoolStatus;
use crate::model::{iso_ms, profile_limits, AgentRecord, DeploymentRecord};

/// Builds the `ServiceDetailsResponse` (reference §B.2) plus Cattery's additive fields
/// (`healthState`, `command`, `stopGraceSeconds`, `warmInstances`...).
pub fn agent_details(
    a: &AgentRecord,
    d: &DeploymentRecord,
    p: &PoolStatus,
    default_grace_s: f64,
    warning: Option<String>,
) -> Value {
    let spec = &d.spec;
    let crash_loop = p.health.consecutive_failures >= crate::core::supervisor::CRASH_LOOP_THRESHOLD;
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
        // A runtime may name Pipecat Cloud's code as a prefix (`PCC_IMAGE_NOT_FOUND: ...`).
        let (code, message) = match e.split_once(": ") {
            Some((c, m))
                if c.starts_with("PCC_")
                    && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') =>
            {
                (c, m)
            }
            _ => ("PCC_UNKNOWN_ERROR", e.as_str()),
        };
        errors.push(json!({"code": code, "message": message}));
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

/// Loads an agent's details, or 404 `NOT_FOUND`.
pub async fn load_details(
    st: &AppState,
    org: &str,
    name: &str,
    warning: Option<String>,
) -> ApiResult<Value> {
    let a = st
        .store
        .get_agent(org, name)
        .await
        .map_err(crate::core::CoreError::from)?
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", format!("Not found: agent {name}")))?;
    details_of(st, &a, warning).await
}

/// Details of a loaded agent.
pub async fn details_of(
    st: &AppState,
    a: &AgentRecord,
    warning: Option<String>,
) -> ApiResult<Value> {
    let d = st
        .store
        .get_deployment(a.desired_deployment_id)
        .await
        .map_err(crate::core::CoreError::from)?
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", "deployment not found"))?;
    let p = st.sup.pool_status(a.id);
    Ok(agent_details(
        a,
        &d,
        &p,
        st.sup.default_stop_grace().as_secs_f64(),
        warning,
    ))
}

/// Create an agent.
#[utoipa::path(post, path = "/v1/agents", request_body = AgentRequest, tag = "agents",
    operation_id = "create_agent",
    responses((status = 200, description = "ServiceDetailsResponse", body = Object),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody),
              (status = 404, description = "secret set not found", body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn create_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiJson(req): ApiJson<AgentRequest>,
) -> ApiResult<Json<Value>> {
    let defaults = crate::core::orgs::org_defaults(&st.store, &st.defaults, &c.org).await?;
    let (a, _) = agents::create_agent(&st.store, &st.sup, &defaults, &c.org, &req).await?;
    Ok(Json(details_of(&st, &a, req.request_warnings()).await?))
}

/// Query of the agent list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct ListAgentsQuery {
    /// Only agents in this region.
    pub region: Option<String>,
    /// Include each agent's `deployment`.
    pub include_active_deployment: Option<String>,
}

/// List agents: `{"services": [...]}`.
#[utoipa::path(get, path = "/v1/agents", tag = "agents", operation_id = "list_agents",
    params(ListAgentsQuery),
    responses((status = 200, description = "{\"services\": [ServiceListItem]}", body = Object),
              (status = 401, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn list_agents(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let list = st
        .store
        .list_agents(&c.org)
        .await
        .map_err(crate::core::CoreError::from)?;
    let include = q
        .get("includeActiveDeployment")
        .is_some_and(|v| v == "true" || v == "1");
    let mut out = Vec::new();
    for a in list.iter().filter(|a| {
        q.get("region")
            .is_none_or(|r| r.is_empty() || *r == a.region)
    }) {
        let mut item = agent_list_item(a);
        if include {
            if let Ok(d) = details_of(&st, a, None).await {
                item["deployment"] = d["deployment"].clone();
            }
        }
        out.push(item);
    }
    Ok(Json(json!({ "services": out })))
}

/// Get an agent.
#[utoipa::path(get, path = "/v1/agents/{agent_name}", tag = "agents", operation_id = "get_agent",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "ServiceDetailsResponse", body = Object),
              (status = 401, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn get_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(load_details(&st, &c.org, &name, None).await?))
}

/// Update an agent (partial).
#[utoipa::path(post, path = "/v1/agents/{agent_name}", request_body = AgentRequest, tag = "agents",
    operation_id = "update_agent",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "ServiceDetailsResponse", body = Object),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn update_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<AgentRequest>,
) -> ApiResult<Json<Value>> {
    let (a, _, warning) = agents::update_agent(&st.store, &st.sup, &c.org, &name, &req)
        .await
        .map_err(|e| ApiError::from(e).with_not_found_code("NOT_FOUND"))?;
    let warning = [warning, req.request_warnings()]
        .into_iter()
        .flatten()
        .reduce(|a, b| format!("{a}; {b}"));
    Ok(Json(details_of(&st, &a, warning).await?))
}

/// Delete an agent: `{"status": "OK"}`.
#[utoipa::path(delete, path = "/v1/agents/{agent_name}", tag = "agents", operation_id = "delete_agent",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "{\"status\": \"OK\"}", body = Object),
              (status = 401, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn delete_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    agents::delete_agent(&st.store, &st.sup, &c.org, &name)
        .await
        .map_err(|e| ApiError::from(e).with_not_found_code("NOT_FOUND"))?;
    Ok(Json(json!({"status": "OK"})))
}
