//! Sessions: start (public key), list, get, stop (private key). Reference §A.5.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::{PrivateAuth, PublicAuth};
use super::error::{ApiError, ApiResult, ErrorBody, RateLimitBody};
use super::schema::{ResourceMetrics, Session, SessionList};
use super::{ApiJson, ApiPath, AppState};
use crate::core::daily::DailyRoom;
use crate::core::lookup;
use crate::core::session::StartParams;
use crate::core::CoreError;
use crate::model::{now_ms, AgentRecord, EndReason, EndState, SessionRecord, SessionRoom};
use crate::store::SessionFilter;

/// Largest start `body` for daily/webrtc/plain sessions (bytes; reference §A.5).
pub const MAX_START_BODY: usize = 1024 * 1024;
/// Largest start `body` for websocket sessions (bytes; reference §A.5).
pub const MAX_WS_START_BODY: usize = 4 * 1024;

/// `StartRequest` (reference §A.5).
#[derive(custom_debug::Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartRequest {
    /// Create a Daily room for the session (needs the org's `dailyApiKey` property or the
    /// server's `--daily-api-key`); the bot gets it as `x-daily-room-url`/`x-daily-room-token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_daily_room: Option<bool>,
    /// Daily room properties, over the defaults (`exp` at most the session's end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_room_properties: Option<Value>,
    /// Daily meeting token properties of the client's token (`dailyToken`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_meeting_token_properties: Option<Value>,
    /// Include `iceConfig` in the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_default_ice_servers: Option<bool>,
    /// `daily`, `webrtc` or `websocket`. `daily` makes a room as `createDailyRoom: true` does,
    /// unless `createDailyRoom` is `false` (the caller's own room, passed in `body`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Passed to the bot as `args.body` (max 1 MiB; 4 KiB for websocket).
    // The caller's data: `Debug` shows whether it is there, not what.
    #[debug(with = crate::redact::hidden_some)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Pipecat Flows config text: the bot gets it as `args.flow_config` (the base image's
    /// start envelope, `X-Pcc-Start-Envelope: 1`).
    #[serde(rename = "flow_config", alias = "flowConfig")]
    #[debug(with = crate::redact::hidden_some)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_config: Option<String>,
}

/// `iceConfig` of a start answer: the server's `--ice-servers`, the ones bots use.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IceConfig {
    /// `[{"urls": [...]}]`, one entry per configured URL.
    #[schema(value_type = Vec<Object>)]
    pub ice_servers: Vec<Value>,
}

impl IceConfig {
    /// The answer for ICE server URLs `urls`.
    pub fn of(urls: &[String]) -> Self {
        IceConfig {
            ice_servers: urls
                .iter()
                .map(|u| serde_json::json!({ "urls": [u] }))
                .collect(),
        }
    }
}

/// `StartResponse`: `sessionId`, plus Cattery's additive `coldStart` and `botStartSeconds`.
#[derive(custom_debug::Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartResponse {
    /// Seconds from the start request to the delivered session.
    pub bot_start_seconds: f64,
    /// Whether a new instance was started for it.
    pub cold_start: bool,
    /// The Daily room's URL (`createDailyRoom: true` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_room: Option<String>,
    /// A meeting token for the client (`createDailyRoom: true` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[debug(with = crate::redact::hidden_some)]
    pub daily_token: Option<String>,
    /// With `enableDefaultIceServers: true` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ice_config: Option<IceConfig>,
    /// Session id.
    pub session_id: Uuid,
}

/// The answer of a start: a delivered session, or (websocket transport) where to connect.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StartAnswer {
    /// A delivered session.
    Started(StartResponse),
    /// A websocket session announced: the client connects to `wsUrl` with `token`.
    Websocket(super::ws::WsAnnounce),
}

/// `StopResponse` (the seed): note the snake_case `session_id`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StopResponse {
    /// The session.
    pub session_id: Uuid,
    /// Always `terminated`.
    pub status: String,
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

/// The agent whose sessions are listed: the live one, else the one of that name deleted last.
async fn agent_for(st: &AppState, org: &str, name: &str) -> ApiResult<AgentRecord> {
    Ok(lookup::agent_or_deleted(&st.store, org, name).await?)
}

/// Start a session.
#[utoipa::path(post, path = "/v1/public/{agent_name}/start", request_body = StartRequest, tag = "sessions",
    operation_id = "start_session",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, body = StartAnswer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 429, description = "at maxAgents", body = RateLimitBody), (status = 503, body = ErrorBody),
              (status = 504, body = ErrorBody)),
    security(("PublicKeyAuth" = [])))]
pub async fn start_session(
    State(st): State<AppState>,
    PublicAuth(c): PublicAuth,
    ApiPath(name): ApiPath<String>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<StartRequest>,
) -> ApiResult<Response> {
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
    let flow = req.flow_config.as_deref().filter(|f| !f.is_empty());
    // The daily transport makes a room as `createDailyRoom: true` does, unless the start
    // says `createDailyRoom: false` (a room of the caller's own, passed in `body`).
    let daily = req
        .create_daily_room
        .unwrap_or(transport.as_deref() == Some("daily"));
    if transport.as_deref() == Some("websocket") {
        if daily || flow.is_some() {
            return Err(ApiError::bad_request(
                "createDailyRoom and flow_config do not go with transport \"websocket\"",
            ));
        }
        st.sup.check_startable(&c.org, &name)?;
        if req.body.is_some() && st.sup.websocket_auth(&c.org, &name).as_deref() == Some("none") {
            return Err(ApiError::bad_request(
                "a body needs websocketAuth \"token\"; this agent has websocketAuth \"none\"",
            ));
        }
        let base = st.ws.public_url.ws_base(&headers);
        return Ok(Json(StartAnswer::Websocket(
            super::ws::announce(&st, &base, &c.org, &name, req.body.as_ref()).await?,
        ))
        .into_response());
    }
    // Before anything of the session exists here (its room, its slot, its record): a start
    // that another node can serve warm is that node's (docs/cluster.md).
    if let Some(r) =
        super::forward_start::elsewhere(&st, &c.org, &name, &uri, &headers, &req).await?
    {
        return Ok(r);
    }
    let session = Uuid::new_v4();
    let mut extra_headers = Vec::new();
    // The base image's start envelope: the bot gets `body` as `args.body` and the flow as
    // `args.flow_config`.
    let body = match flow {
        Some(f) => {
            extra_headers.push(("x-pcc-start-envelope".to_string(), "1".to_string()));
            let inner = req.body.clone().unwrap_or_else(|| serde_json::json!({}));
            Bytes::from(
                serde_json::to_vec(&serde_json::json!({"body": inner, "flow_config": f}))
                    .unwrap_or_default(),
            )
        }
        None => body,
    };
    let (room, made) = if daily {
        let (room, _, made) = daily_room(
            &st,
            &c.org,
            &name,
            session,
            req.daily_room_properties.as_ref(),
            req.daily_meeting_token_properties.as_ref(),
        )
        .await?;
        (Some(room), Some(made))
    } else {
        (None, None)
    };
    if let Some(r) = &room {
        extra_headers.push(("x-daily-room-url".into(), r.url.clone()));
        extra_headers.push(("x-daily-room-token".into(), r.bot_token.clone()));
    }
    let out = st
        .sup
        .start_session(
            &c.org,
            &name,
            StartParams {
                body,
                transport: transport.or_else(|| daily.then(|| "daily".to_string())),
                daily_room: made,
                session_id: Some(session),
                extra_headers,
                ..Default::default()
            },
        )
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            // Nothing of the session remains: its room goes too.
            st.sup.run_end_hook(session, false);
            return Err(e.into());
        }
    };
    Ok(Json(StartAnswer::Started(StartResponse {
        bot_start_seconds: out.bot_start_ms as f64 / 1000.0,
        cold_start: out.cold_start,
        daily_room: room.as_ref().map(|r| r.url.clone()),
        daily_token: room.map(|r| r.client_token),
        ice_config: (req.enable_default_ice_servers == Some(true))
            .then(|| IceConfig::of(st.sup.ice_servers())),
        session_id: out.session_id,
    }))
    .into_response())
}

/// Creates the Daily room of a `createDailyRoom` start (or a dial-in) and arranges its
/// deletion when the session ends (or its start fails); answers the room, the Daily key
/// used, and what the session's record keeps of the room (give it to the start). Errors: 400 without a Daily key; the agent's 404/400/503 before Daily is called;
/// Daily's refusals ([`CoreError::Daily`]).
pub(super) async fn daily_room(
    st: &AppState,
    org: &str,
    name: &str,
    session: Uuid,
    room_props: Option<&Value>,
    token_props: Option<&Value>,
) -> ApiResult<(DailyRoom, String, SessionRoom)> {
    let rec = crate::core::orgs::org_record(&st.store, org).await?;
    let key = st
        .daily
        .key_for(crate::core::orgs::daily_api_key_of(&rec, &st.secrets).as_deref())
        .ok_or_else(|| {
            ApiError::bad_request(
                "a Daily room (createDailyRoom, or transport \"daily\") needs a Daily API key: set the org's dailyApiKey property, or start the server with --daily-api-key (CATTERY_DAILY_API_KEY)",
            )
        })?;
    crate::core::daily::check_properties(room_props, token_props, now_ms() / 1000)?;
    // At maxAgents (or crash-looping) the start is refused before Daily is asked for anything:
    // a room made for a refused start costs three calls to Daily's API and its deletion.
    st.sup.check_admissible(org, name)?;
    let max_s = st
        .sup
        .max_session_seconds(org, name)
        .unwrap_or(crate::model::DEFAULT_MAX_SESSION_DURATION_S);
    let room = st
        .daily
        .create_room(&key, max_s, room_props, token_props)
        .await?;
    let made = SessionRoom {
        name: room.name.clone(),
        keep: crate::core::daily::keep_room(
            st.sup.keep_daily_rooms(org, name),
            crate::core::orgs::keep_daily_rooms_of(&rec),
        ),
    };
    // Deleted at the session's end here; recorded with the session (the caller's
    // `StartParams::daily_room`), so that the end's writer deletes it wherever that is.
    st.sup.watch_room(org, session, &made);
    Ok((room, key, made))
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

/// A non-negative number of seconds, as ms (`startTimeMin`/`startTimeMax` may be fractional).
fn seconds_param(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<i64>> {
    match q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f <= 1e9)
            .map(|f| Some((f * 1000.0).round() as i64))
            .ok_or_else(|| zod(k, "expected a non-negative number of seconds")),
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
           ("endTime" = Option<i64>, Query, description = "created at or before (Unix s)"),
           ("endReason" = Option<String>, Query, description = "only sessions that ended for this reason (completed, error, stopped, ...)"),
           ("endState" = Option<String>, Query, description = "active | completed | ended_before_agent_start | agent_start_timeout | terminated | agent_error | unknown"),
           ("startTimeMin" = Option<f64>, Query, description = "botStartSeconds at least"),
           ("startTimeMax" = Option<f64>, Query, description = "botStartSeconds at most")),
    responses((status = 200, description = "{\"total_count\", \"sessions\"}", body = SessionList),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn list_sessions(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<SessionList>> {
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
    if let Some(r) = q.get("endReason").filter(|s| !s.is_empty()) {
        f.end_reason = Some(EndReason::from_name(r).ok_or_else(|| {
            let all: Vec<&str> = EndReason::ALL.iter().map(|r| r.as_str()).collect();
            zod("endReason", &format!("expected one of {}", all.join(", ")))
        })?);
    }
    f.cold = match q.get("startType").map(String::as_str) {
        None | Some("") | Some("all") => None,
        Some("cold") => Some(true),
        Some("warm") => Some(false),
        Some(_) => return Err(zod("startType", "expected cold, warm or all")),
    };
    f.end_state = match q.get("endState").map(|s| s.trim()) {
        None | Some("") => None,
        Some(e) => Some(EndState::parse(e).ok_or_else(|| {
            let all: Vec<_> = EndState::ALL.iter().map(|e| e.as_str()).collect();
            zod("endState", &format!("expected one of {}", all.join(", ")))
        })?),
    };
    f.bot_start_min_ms = seconds_param(&q, "startTimeMin")?;
    f.bot_start_max_ms = seconds_param(&q, "startTimeMax")?;
    let (total_count, list) = lookup::sessions_of(&st.store, &agent, &f).await?;
    Ok(Json(SessionList {
        sessions: list.iter().map(|s| Session::of(s, &agent)).collect(),
        total_count,
    }))
}

/// A session of `org`'s agent `name`, with the agent. Errors: 404 `"404"` when it does not
/// exist, or belongs to another org or agent (`core::lookup::session_of`).
pub async fn session_of(
    st: &AppState,
    org: &str,
    name: &str,
    id: Uuid,
) -> ApiResult<(AgentRecord, SessionRecord)> {
    Ok(lookup::session_of(&st.store, org, name, id).await?)
}

/// Get one session, with `resourceMetrics`.
#[utoipa::path(get, path = "/v1/agents/{agent_name}/sessions/{session_id}", tag = "sessions",
    operation_id = "get_session",
    params(("agent_name" = String, Path, description = "Agent name"), ("session_id" = String, Path, description = "Session UUID")),
    responses((status = 200, description = "SessionResponse", body = Session), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn get_session(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath((name, sid)): ApiPath<(String, String)>,
) -> ApiResult<Json<Session>> {
    let id = parse_session_id(&sid)?;
    let (agent, s) = session_of(&st, &c.org, &name, id).await?;
    let mut v = Session::of(&s, &agent);
    v.resource_metrics = Some(if !s.samples.is_empty() {
        let at = s.end.as_ref().map_or_else(now_ms, |e| e.ended_ms);
        Some(ResourceMetrics::of(id, &s.samples, at))
    } else {
        st.sup
            .live_samples(id)
            .map(|samples| ResourceMetrics::of(id, &samples, now_ms()))
    });
    v.meeting_ids = Some(Vec::new());
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
    // A websocket session announced by /start whose client has not connected has its token
    // revoked first (in the store, on every node), so it can never start; the stop then ends
    // its record (`stopped_during_start`). See `Supervisor::stop_session`.
    st.sup.stop_session(&c.org, &name, id).await?;
    Ok(Json(StopResponse {
        session_id: id,
        status: "terminated".into(),
    }))
}
