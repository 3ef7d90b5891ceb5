//! The HTTP surface: axum handlers that translate between the wire and [`crate::core`].
//!
//! Routes (reference §A.2): the documented private API under `/v1/agents`, the public API
//! under `/v1/public`, `/health`, and the OpenAPI description at `/v1/openapi.json`; the
//! CLI's org-scoped surface, secrets, logs, regions and properties are in [`org::routes`].

pub mod agents;
pub mod auth;
pub mod error;
pub mod logs;
pub mod openapi;
pub mod org;
pub mod proxy;
pub mod secrets;
pub mod sessions;
pub mod ws;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use crate::core::agents::AgentDefaults;
use crate::core::supervisor::Supervisor;
use crate::store::Store;
use error::ApiError;

/// Largest request body accepted on any route (bytes). The start `body` limit (1 MiB) is
/// checked separately so it can answer 413 with a precise message.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Shared handler state.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The session supervisor.
    pub sup: Arc<Supervisor>,
    /// Agent defaults (regions).
    pub defaults: Arc<AgentDefaults>,
    /// Websocket transport state.
    pub ws: Arc<ws::WsState>,
    /// Seals and opens secret values (`core::secrets`).
    pub secrets: Arc<crate::core::secrets::SecretCipher>,
}

/// A JSON object body whose rejections are `{error, code}` 4xx responses, never 5xx.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "413",
                        "request body is too large",
                    )
                } else {
                    ApiError::bad_request(format!("could not read the request body: {e}"))
                }
            })?;
        let src: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            b"{}"
        } else {
            &bytes
        };
        // Every request body of this API is a JSON object; serde would otherwise accept an
        // array positionally for a struct.
        if src.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request(
                "invalid JSON body: expected a JSON object",
            ));
        }
        serde_json::from_slice(src)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Path parameters whose rejections are `{error, code}` responses like every other error of
/// this API (axum's own are `text/plain`): a segment that is not valid UTF-8 once
/// percent-decoded (`/v1/agents/%FF`), or that does not parse, is a 400.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e) if e.status().is_client_error() => Err(ApiError::bad_request(format!(
                "invalid path: {}",
                e.body_text()
            ))),
            Err(e) => Err(ApiError::new(e.status(), "500", e.body_text())),
        }
    }
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError::not_found("404", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "405",
        "method not allowed on this route",
    )
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/openapi.json", get(openapi::serve))
        .route(
            "/v1/agents",
            get(agents::list_agents).post(agents::create_agent),
        )
        .route(
            "/v1/agents/{agent_name}",
            get(agents::get_agent)
                .post(agents::update_agent)
                .delete(agents::delete_agent),
        )
        .route(
            "/v1/agents/{agent_name}/sessions",
            get(sessions::list_sessions),
        )
        .route(
            "/v1/agents/{agent_name}/sessions/{session_id}",
            get(sessions::get_session).delete(sessions::stop_session),
        )
        .route(
            "/v1/public/{agent_name}/start",
            post(sessions::start_session),
        )
        .route(
            "/v1/public/{agent_name}/sessions/{session_id}",
            any(proxy::proxy_root),
        )
        .route(
            "/v1/public/{agent_name}/sessions/{session_id}/{*path}",
            any(proxy::proxy),
        )
        .route("/ws/generic/{service}", get(ws::connect))
        .route("/ws/generic/{service}/{token}", get(ws::connect_with_token))
        .merge(org::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "500", "internal error")
                .into_response()
        }))
        .with_state(state)
}
