//! Sessions: start (public key), list, get, stop (private key). Reference §A.5.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::{PrivateAuth, PublicAuth};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJson, ApiPath, AppState};
use crate::core::supervisor::StartParams;
use crate::core::CoreError;
use crate::model::{iso_ms, now_ms, AgentRecord, MetricSample, SessionRecord};
use crate::store::SessionFilter;

/// Largest start `body` for daily/webrtc/plain sessions (bytes; reference §A.5).
pub const MAX_START_BODY: usize = 1024 * 1024;
/// Largest start `body` for websocket sessions (bytes; reference §A.5).
pub const MAX_WS_START_BODY: usize = 4 * 1024;

/// `StartRequest` (reference §A.5).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartRequest {
    /// Create a Daily room for the bot (needs a Daily API key on the server).
    pub create_daily_room: Option<bool>,
    /// Daily room properties.
    pub daily_room_properties: Option<Value>,
    /// Daily meeting token properties.
    pub daily_meeting_token_properties: Option<Value>,
    /// Include `iceConfig` in the answer.
    pub enable_default_ice_servers: Option<bool>,
    /// `daily`, `webrtc` or `websocket`.
    pub transport: Option<String>,
    /// Passed to the bot as `args.body` (max 1 MiB; 4 KiB for websocket).
    pub body: Option<Value>,
    /// Flow config text (accepted, not yet delivered).
    pub flow_config: Option<String>,
}

/// `StartResponse`: `sessionId`, plus Cattery's additive `coldStart` and `botStartSeconds`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartResponse {
    /// Session id.
    pub session_id: Uuid,
    /// Whether a new instance was started for it.
    pub cold_start: bool,
    /// Seconds from the start request to the delivered session.
    pub bot_start_seconds: f64,
}

/// `StopResponse` (the seed): note the snake_case `session_id`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StopResponse {
    /// Always `terminated`.
    pub status: String,
    /// The session.
    pub session_id: Uuid,
}

/// Session JSON (reference §A.5.2/§A.5.3): every key present, null when unknown, plus
/// Cattery's additive `endReason`, `exitCode`, `exitSignal`, `endMessage`, `status`.
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

/// Parses a session id path segment. Errors: 400 `"400"` (the seed's malformed-id case).
pub fn parse_session_id(s: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "400",
            format!("invalid session id {s:?}: expected a UUID"),
        )
    })
}

async fn agent_for(st: &AppState, org: &str, name: &str) -> ApiResult<AgentRecord> {
    st.store
        .get_agent(org, name)
        .await
        .map_err(CoreError::from)?
        .ok_or_else(|| ApiError::not_found("404", format!("agent {name} not found")))
}

/// Start a session.
#[utoipa::path(post, path = "/v1/public/{agent_name}/start", request_body = StartRequest, tag = "sessions",
    operation_id = "start_session",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, body = StartResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 429, description = "at maxAgents", body = Object), (status = 503, body = ErrorBody),
              (status = 504, body = ErrorBody)),
    security(("PublicKeyAuth" = [])))]
pub async fn start_session(
    State(st): State<AppState>,
    PublicAuth(c): PublicAuth,
    ApiPath(name): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<StartRequest>,
) -> ApiResult<Json<Value>> {
    let transport = match req.transport.as_deref() {
        None | Some("") => None,
        Some(t @ ("daily" | "webrtc" | "websocket")) => Some(t.to_string()),
        Some(t) => {
            return Err(ApiError::bad_request(format!(
                "transport must be daily, webrtc or websocket, not {t:?}"
            )))
        }
    };
    let body = match &req.body {
        Some(b) => Bytes::from(serde_json::to_vec(b).unwrap_or_default()),
        None => Bytes::from_static(b"{}"),
    };
    let limit = if transport.as_deref() == Some("websocket") {
        MAX_WS_START_BODY
    } else {
        MAX_START_BODY
    };
    if body.len() > limit {
        return Err(CoreError::PayloadTooLarge(format!(
            "body is {} bytes; the limit for this transport is {limit} bytes",
            body.len()
        ))
        .into());
    }
    if req.create_daily_room == Some(true) && st.sup_daily_key().is_none() {
        return Err(ApiError::bad_request(
            "createDailyRoom needs a Daily API key on the server (cattery serve --daily-api-key or CATTERY_DAILY_API_KEY)",
        ));
    }
    if transport.as_deref() == Some("websocket") {
        st.sup.check_startable(&c.org, &name)?;
        if req.body.is_some() && st.sup.websocket_auth(&c.org, &name).as_deref() == Some("none") {
            return Err(ApiError::bad_request(
                "a body needs websocketAuth \"token\"; this agent has websocketAuth \"none\"",
            ));
        }
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1:7870")
            .to_string();
        return Ok(Json(super::ws::announce(
            &st,
            &host,
            &c.org,
            &name,
            req.body.as_ref(),
        )));
    }
    let out = st
        .sup
        .start_session(
            &c.org,
            &name,
            StartParams {
                body,
                transport,
                ..Default::default()
            },
        )
        .await?;
    let mut resp = json!({
        "sessionId": out.session_id,
        "coldStart": out.cold_start,
        "botStartSeconds": out.bot_start_ms as f64 / 1000.0,
    });
    if req.enable_default_ice_servers == Some(true) {
        resp["iceConfig"] = json!({"iceServers": []});
    }
    Ok(Json(resp))
}

fn zod(field: &str, msg: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "400",
        format!("Invalid parameters: {field}: {msg}"),
    )
}

fn int_param(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<i64>> {
    match q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| Some(f as i64))
            .ok_or_else(|| zod(k, "expected a non-negative number")),
    }
}

/// List an agent's sessions: `{"total_count", "sessions"}`, newest first.
#[utoipa::path(get, path = "/v1/agents/{agent_name}/sessions", tag = "sessions", operation_id = "list_sessions",
    params(("agent_name" = String, Path, description = "Agent name"),
           ("limit" = Option<i64>, Query, description = "page size, default 10, at most 1000"),
           ("offset" = Option<i64>, Query, description = "rows to skip"),
           ("deploymentId" = Option<String>, Query, description = "only this deployment"),
           ("status" = Option<String>, Query, description = "active | ended | all"),
           ("startType" = Option<String>, Query, description = "cold | warm | all"),
           ("startTime" = Option<i64>, Query, description = "created at or after (Unix s)"),
           ("endTime" = Option<i64>, Query, description = "created at or before (Unix s)")),
    responses((status = 200, description = "{\"total_count\", \"sessions\"}", body = Object),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn list_sessions(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let agent = agent_for(&st, &c.org, &name).await?;
    let mut f = SessionFilter {
        limit: int_param(&q, "limit")?.unwrap_or(10).clamp(1, 1000),
        offset: int_param(&q, "offset")?.unwrap_or(0),
        // Saturating: a huge `startTime` (found by the API fuzz) must not overflow.
        start_ms: int_param(&q, "startTime")?.map(|s| s.saturating_mul(1000)),
        end_ms: int_param(&q, "endTime")?.map(|s| s.saturating_mul(1000).saturating_add(999)),
        ..Default::default()
    };
    if let Some(d) = q.get("deploymentId").filter(|s| !s.is_empty()) {
        f.deployment_id =
            Some(Uuid::parse_str(d).map_err(|_| zod("deploymentId", "expected a UUID"))?);
    }
    f.active = match q.get("status").map(String::as_str) {
        None | Some("") | Some("all") => None,
        Some("active") => Some(true),
        Some("ended") => Some(false),
        Some(_) => return Err(zod("status", "expected active, ended or all")),
    };
    f.cold = match q.get("startType").map(String::as_str) {
        None | Some("") | Some("all") => None,
        Some("cold") => Some(true),
        Some("warm") => Some(false),
        Some(_) => return Err(zod("startType", "expected cold, warm or all")),
    };
    let (total, list) = st
        .store
        .list_sessions(agent.id, &f)
        .await
        .map_err(CoreError::from)?;
    let sessions: Vec<Value> = list.iter().map(|s| session_json(s, &agent)).collect();
    Ok(Json(json!({"total_count": total, "sessions": sessions})))
}

/// A session of `org`'s agent `name`, with the agent. Errors: 404 `"404"` when it does not
/// exist, or belongs to another org or agent.
pub async fn session_of(
    st: &AppState,
    org: &str,
    name: &str,
    id: Uuid,
) -> ApiResult<(AgentRecord, SessionRecord)> {
    let s = st
        .store
        .get_session(id)
        .await
        .map_err(CoreError::from)?
        .filter(|s| s.org == org)
        .ok_or_else(|| ApiError::not_found("404", format!("session {id} not found")))?;
    let agent = st
        .store
        .get_agent_by_id(s.agent_id)
        .await
        .map_err(CoreError::from)?
        .filter(|a| a.name == name)
        .ok_or_else(|| {
            ApiError::not_found("404", format!("session {id} not found for agent {name}"))
        })?;
    Ok((agent, s))
}

/// Get one session, with `resourceMetrics`.
#[utoipa::path(get, path = "/v1/agents/{agent_name}/sessions/{session_id}", tag = "sessions",
    operation_id = "get_session",
    params(("agent_name" = String, Path, description = "Agent name"), ("session_id" = String, Path, description = "Session UUID")),
    responses((status = 200, description = "SessionResponse", body = Object), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn get_session(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath((name, sid)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let id = parse_session_id(&sid)?;
    let (agent, s) = session_of(&st, &c.org, &name, id).await?;
    let mut v = session_json(&s, &agent);
    v["resourceMetrics"] = if !s.samples.is_empty() {
        let at = s.end.as_ref().map_or_else(now_ms, |e| e.ended_ms);
        metrics_json(id, &s.samples, at)
    } else {
        match st.sup.live_samples(id) {
            Some(samples) => metrics_json(id, &samples, now_ms()),
            None => Value::Null,
        }
    };
    v["meetingIds"] = json!([]);
    Ok(Json(v))
}

/// Stop a session (the seed contract): the whole instance is removed and the end recorded
/// before the answer; an ended session answers the same 200 again.
#[utoipa::path(delete, path = "/v1/agents/{agent_name}/sessions/{session_id}", tag = "sessions",
    operation_id = "stop_session",
    params(("agent_name" = String, Path, description = "Agent name"), ("session_id" = String, Path, description = "Session UUID")),
    responses((status = 200, body = StopResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn stop_session(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath((name, sid)): ApiPath<(String, String)>,
) -> ApiResult<Json<StopResponse>> {
    let id = parse_session_id(&sid)?;
    match st.sup.stop_session(&c.org, &name, id).await {
        // A websocket session announced by /start whose client never connected: its token
        // is revoked, so it can never start.
        Err(CoreError::NotFound(_)) if st.ws.revoke_session(&c.org, &name, id) => {}
        r => r?,
    }
    Ok(Json(StopResponse {
        status: "terminated".into(),
        session_id: id,
    }))
}

impl AppState {
    fn sup_daily_key(&self) -> Option<String> {
        self.sup.daily_api_key()
    }
}

/// Nearest-rank percentile `p` (0..=1) of sorted values; 0 when empty.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// `resourceMetrics` JSON (reference §A.5.3) of a session from its samples; `at_ms` is the
/// time the figures stand for (the session's end, or now while it runs).
pub fn metrics_json(session: Uuid, samples: &[MetricSample], at_ms: i64) -> Value {
    let mut cpu: Vec<u64> = samples.iter().map(|s| s.cpu_millicores).collect();
    let mut mem: Vec<u64> = samples.iter().map(|s| s.memory_bytes).collect();
    cpu.sort_unstable();
    mem.sort_unstable();
    let at = iso_ms(at_ms);
    json!({
        "id": session,
        "sessionId": session,
        "sampleCount": samples.len(),
        "cpuMillicoresP50": pct(&cpu, 0.50),
        "cpuMillicoresP90": pct(&cpu, 0.90),
        "cpuMillicoresP95": pct(&cpu, 0.95),
        "cpuMillicoresP99": pct(&cpu, 0.99),
        "memoryBytesP50": pct(&mem, 0.50),
        "memoryBytesP90": pct(&mem, 0.90),
        "memoryBytesP95": pct(&mem, 0.95),
        "memoryBytesP99": pct(&mem, 0.99),
        "timeseries": samples
            .iter()
            .map(|s| json!({"t": s.t, "c": s.cpu_millicores, "m": s.memory_bytes}))
            .collect::<Vec<_>>(),
        "eventTs": at,
        "createdAt": at,
    })
}
