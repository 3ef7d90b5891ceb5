//! WhatsApp Business calling (Pipecat Cloud's WhatsApp guide): Meta's webhook for an agent,
//! `/v1/public/webhooks/{org}/{agent}/whatsapp`. No API key: Meta cannot send one.
//!
//! - `GET` is Meta's verification: `hub.mode=subscribe`, `hub.verify_token` = one of the
//!   org's live public API keys, `hub.challenge` echoed as `text/plain`; a wrong token (or
//!   an unknown org, which answers the same) is a 403.
//! - `POST` is a call event. A `connect` starts a session for the call (a start like any
//!   other: capacity, warm pool, `maxAgents`), with `x-daily-transport-type: webrtc` and body
//!   `{}`, as a SmallWebRTC start; then the event, and every later event of the call, is
//!   forwarded unchanged (body and `x-hub-signature-256`) to the instance's `POST /whatsapp`
//!   with `x-daily-session-id`, and the instance's answer is returned. The bot answers the
//!   call through pipecat's `WhatsAppClient` and ends on `terminate`, which ends the session
//!   and so the call's mapping (see `core::whatsapp`). A payload about no call (messages,
//!   message statuses) is answered 200 and not forwarded: Meta re-sends any event it sees
//!   refused.
//! - Meta signs every `POST` (`x-hub-signature-256`, HMAC-SHA256 of the body with the app
//!   secret). When the deployment that serves the event (the one the call's session runs,
//!   else the one a new session would run) holds `WHATSAPP_APP_SECRET` (as the base image
//!   needs to serve `/whatsapp`), the platform checks the signature before it starts or
//!   forwards anything: without it, anyone who knows the URL could start sessions. The bot
//!   checks it again. An agent without that secret gets its events unchecked.
//!
//! What becomes of an event is `core::whatsapp::route_event`'s to decide; this handler
//! translates HTTP.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{OriginalUri, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJsonBytes, ApiPath, AppState};
use crate::core::whatsapp::{self, Inbound, Refused, Route};
use crate::core::CoreError;

/// An unknown org and an unknown agent answer alike: this route has no key, and must not
/// tell which orgs exist.
fn unknown() -> ApiError {
    ApiError::not_found("NOT_FOUND", "no such agent for this WhatsApp URL")
}

fn not_found(e: CoreError) -> ApiError {
    match e {
        CoreError::NotFound(_) => unknown(),
        e => e.into(),
    }
}

/// Meta's webhook verification: the challenge back when the verify token is a public API
/// key of the org.
#[utoipa::path(get, path = "/v1/public/webhooks/{org_id}/{agent_name}/whatsapp", tag = "sessions",
    operation_id = "whatsapp_verify",
    params(("org_id" = String, Path, description = "Organization"), ("agent_name" = String, Path, description = "Agent name"),
           ("hub.mode" = String, Query, description = "subscribe"),
           ("hub.verify_token" = String, Query, description = "A public API key of the org"),
           ("hub.challenge" = String, Query, description = "Echoed back")),
    responses((status = 200, description = "the challenge, as text/plain", body = String, content_type = "text/plain"),
              (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn whatsapp_verify(
    State(st): State<AppState>,
    ApiPath((org, name)): ApiPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let get = |k: &str| q.get(k).map(String::as_str);
    let (token, challenge) = whatsapp::verification(
        get("hub.mode"),
        get("hub.verify_token"),
        get("hub.challenge"),
    )
    .map_err(ApiError::bad_request)?;
    let refused = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "verification failed: hub.verify_token must be a public API key of the org",
        )
    };
    let key = crate::core::keys::find_live_key(st.store.as_ref(), token).await?;
    match key {
        Ok(k) if k.org == org && k.kind == crate::model::KeyKind::Public => {}
        _ => return Err(refused()),
    }
    // The caller holds the org's key: it may learn that the agent does not exist.
    crate::core::lookup::agent_of(&st.store, &org, &name)
        .await
        .map_err(not_found)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        challenge.to_string(),
    )
        .into_response())
}

/// Meta's call events: a session for a new call, and every event of the call forwarded to
/// its instance's `POST /whatsapp`.
#[utoipa::path(post, path = "/v1/public/webhooks/{org_id}/{agent_name}/whatsapp", tag = "sessions",
    operation_id = "whatsapp_event",
    request_body(content = Object, description = "Meta's WhatsApp Business webhook payload (object, entry[].changes[].value.calls[])"),
    params(("org_id" = String, Path, description = "Organization"), ("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "the bot's own answer, unchanged, or {\"status\":\"ignored\"} for a payload about no call", body = Object),
              (status = "default", description = "the bot's own answer with any other status, unchanged"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody),
              (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn whatsapp_event(
    State(st): State<AppState>,
    ApiPath((org, name)): ApiPath<(String, String)>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    ApiJsonBytes(body, raw): ApiJsonBytes<Value>,
) -> ApiResult<Response> {
    let from_peer = super::cluster::from_peer(&st, &headers).await?;
    let inbound = Inbound {
        org: &org,
        agent: &name,
        body: &body,
        raw: &raw,
        signature: headers
            .get("x-hub-signature-256")
            .and_then(|v| v.to_str().ok()),
        from_peer,
    };
    let routed = whatsapp::route_event(&st.sup, &st.store, &st.secrets, &inbound)
        .await
        .map_err(|r| match r {
            Refused::NotWhatsApp(why) => ApiError::bad_request(why),
            Refused::Unknown => unknown(),
            Refused::NoSession { call, ended } => {
                let why = if ended {
                    "has ended"
                } else {
                    "was never started"
                };
                ApiError::not_found(
                    "NOT_FOUND",
                    format!("the session of WhatsApp call {call} {why}"),
                )
            }
            Refused::Core(e) => not_found(e),
        })?;
    // The call's gate stays held (in `routed`) until the event is forwarded.
    match &routed.route {
        Route::Ignored => Ok(Json(
            json!({"status": "ignored", "reason": "the event is about no call"}),
        )
        .into_response()),
        Route::Here(sid) => to_instance(&st, *sid, headers, raw).await,
        Route::Owner { node, session } => {
            let mut req = Request::new(Body::from(raw));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri;
            *req.headers_mut() = headers;
            super::proxy::to_owner(&st, node, *session, req).await
        }
    }
}

/// Posts the event to the instance's `/whatsapp`, as Meta sent it plus `x-daily-session-id`,
/// and returns the instance's answer unchanged.
async fn to_instance(
    st: &AppState,
    sid: Uuid,
    headers: HeaderMap,
    raw: bytes::Bytes,
) -> ApiResult<Response> {
    let addr = st
        .sup
        .session_addr(sid, super::proxy::PROXY_WAIT)
        .await
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", format!("session {sid} is not running")))?;
    let mut req = Request::new(Body::from(raw));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!("http://{addr}/whatsapp")
        .parse::<Uri>()
        .expect("a socket address makes a valid URI");
    *req.headers_mut() = headers;
    let (parts, body) = req.into_parts();
    super::proxy::to_instance(sid, parts, body).await
}
