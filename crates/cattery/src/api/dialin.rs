//! Daily PSTN/SIP dial-in (Pipecat Cloud's dial-in guide): Daily's pinless dial-in calls
//! `room_creation_api` = `POST /v1/public/webhooks/{org}/{agent}/dialin` while the caller
//! hears hold music. Cattery creates a SIP-enabled room (`sip_mode: dial-in`), starts a
//! session whose body is pipecat's `DailyDialinRequest` (`dialin_settings`, and the Daily key
//! and URL the bot's `pinlessCallUpdate` needs), and answers 200. The bot, on `dialin-ready`,
//! has Daily forward the held call into its room.
//!
//! No API key: Daily cannot send one (as on Pipecat Cloud, the org and agent names address
//! it). An org that sets `dailyDialinHmac` (the `hmac` of its `pinless_dialin` configuration)
//! takes only requests Daily signed with it (`X-Pinless-Timestamp`, `X-Pinless-Signature`).
//! A start costs what any start costs (`maxAgents` bounds it) and needs the org's Daily
//! key; Daily's configuration test (`{"test": ...}`) is answered without starting anything.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJsonBytes, ApiPath, AppState};
use crate::core::daily;
use crate::core::session::StartParams;

/// The answer to Daily.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DialinAnswer {
    /// `success`.
    pub status: String,
    /// The session started for the call (absent for Daily's configuration test).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
    /// The room the call is forwarded to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_room: Option<String>,
}

/// Daily's pinless dial-in webhook: a room with SIP dial-in, and a session for the call.
#[utoipa::path(post, path = "/v1/public/webhooks/{org_id}/{agent_name}/dialin", tag = "sessions",
    operation_id = "daily_dialin", request_body(content = Object, description = "Daily's pinless dial-in payload: To, From, callId, callDomain, sipHeaders"),
    params(("org_id" = String, Path, description = "Organization"), ("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, body = DialinAnswer), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn dialin(
    State(st): State<AppState>,
    ApiPath((org, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJsonBytes(call, raw): ApiJsonBytes<Value>,
) -> ApiResult<Json<DialinAnswer>> {
    if !call.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    // An unknown org and an unknown agent answer alike: this route has no key, and must not
    // tell which orgs exist. Checked before Daily is called: no room for nobody.
    let unknown = || ApiError::not_found("NOT_FOUND", "no such agent for this dial-in URL");
    let not_found = |e: crate::core::CoreError| match e {
        crate::core::CoreError::NotFound(_) => unknown(),
        e => e.into(),
    };
    let rec = crate::core::orgs::org_record(&st.store, &org)
        .await
        .map_err(not_found)?;
    // An org that gave Daily's signing secret takes only signed requests. A refusal answers
    // as an unknown agent does (the caller learns nothing), and says why in the log. A
    // secret stored but not readable (sealed under another secrets key) refuses every
    // request: the org asked for signed requests only.
    let hmac_set = rec
        .properties
        .get(crate::core::orgs::DAILY_DIALIN_HMAC)
        .is_some_and(|v| !v.is_null() && v.as_str() != Some(""));
    if hmac_set {
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let checked = match crate::core::orgs::daily_dialin_hmac_of(&rec, &st.secrets) {
            Some(secret) => daily::check_dialin_signature(
                &secret,
                header("x-pinless-timestamp"),
                header("x-pinless-signature"),
                &raw,
                crate::model::now_ms() / 1000,
            ),
            None => Err("the org's dailyDialinHmac cannot be read (sealed under another secrets key?); set it again"),
        };
        if let Err(why) = checked {
            tracing::warn!(org, agent = name, reason = why, "dial-in webhook refused");
            return Err(unknown());
        }
    }
    st.sup.check_startable(&org, &name).map_err(not_found)?;
    // The bot gets the Daily key in its body (it forwards the held call with it): an org
    // other than the default one must bring its own, never the operator's account.
    if org != crate::serve::DEFAULT_ORG {
        let own = crate::core::orgs::daily_api_key_of(&rec, &st.secrets);
        if own.is_none_or(|k| k.trim().is_empty()) {
            return Err(ApiError::bad_request(
                "dial-in needs the org's own Daily API key (its dailyApiKey property): the bot \
                 gets the key to forward the call, and the server's key is the operator's",
            ));
        }
    }
    if call.get("test").is_some() {
        return Ok(Json(DialinAnswer {
            status: "success".into(),
            session_id: None,
            daily_room: None,
        }));
    }
    // Checked before Daily is called: a bad payload makes no room.
    daily::dialin_body(&call, "", "")?;
    let session = Uuid::new_v4();
    let from = call.get("From").and_then(Value::as_str);
    let props = daily::dialin_room_properties(from);
    let (room, key, made) =
        super::sessions::daily_room(&st, &org, &name, session, Some(&props), None).await?;
    let body = daily::dialin_body(&call, &key, st.daily.base())?;
    let out = st
        .sup
        .start_session(
            &org,
            &name,
            StartParams {
                body: bytes::Bytes::from(body.to_string()),
                transport: Some("daily".into()),
                daily_room: Some(made),
                session_id: Some(session),
                extra_headers: vec![
                    ("x-daily-room-url".into(), room.url.clone()),
                    ("x-daily-room-token".into(), room.bot_token.clone()),
                ],
                ..Default::default()
            },
        )
        .await;
    match out {
        Ok(o) => {
            tracing::info!(org, agent = name, session.id = %o.session_id, "dial-in call: session started");
            Ok(Json(DialinAnswer {
                status: "success".into(),
                session_id: Some(o.session_id),
                daily_room: Some(room.url),
            }))
        }
        Err(e) => {
            st.sup.run_end_hook(session, false);
            Err(not_found(e))
        }
    }
}
