//! The HTTP surface: axum handlers that translate between the wire and [`crate::core`].
//!
//! Every route is listed in [`router`] (reference §A.2): the documented private API under
//! `/v1/agents`, the public API under `/v1/public`, secrets, logs, regions and properties,
//! `/health`, the OpenAPI description at `/v1/openapi.json` (generated from that list), and
//! the CLI's org-scoped surface. Response bodies are typed ([`schema`], [`error`]).

pub mod agents;
pub mod auth;
pub mod builds;
pub mod cli_text;
pub mod cluster;
pub mod cors;
pub mod dialin;
pub mod error;
pub mod events;
pub mod forward_start;
pub mod logs;
pub mod metrics;
pub mod openapi;
pub mod org;
pub mod proxy;
pub mod router;
pub mod schema;
pub mod secrets;
pub mod sessions;
#[cfg(test)]
mod tests;
pub mod trace;
pub mod webhooks;
pub mod whatsapp;
pub mod ws;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::core::orgs::AgentDefaults;
use crate::core::session::Supervisor;
use crate::store::Store;
use error::ApiError;
pub use router::router;

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
    /// `GET /metrics` (`api::metrics`).
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Daily's REST API, for `createDailyRoom`.
    pub daily: Arc<crate::core::daily::Daily>,
    /// This node (`core::cluster`).
    pub node: Arc<crate::core::cluster::NodeIdentity>,
    /// Builds (`core::builds`).
    pub builds: Arc<crate::core::builds::Builds>,
    /// Outbound webhooks (`core::webhooks`).
    pub webhooks: Arc<crate::core::webhooks::Webhooks>,
    /// Cancelled when the server stops serving HTTP: answers that never end by themselves
    /// (`GET /v1/sessions/events`) end then, so the server's graceful close does not wait for
    /// them.
    pub closing: tokio_util::sync::CancellationToken,
    /// Per-org limits (`core::limits`).
    pub limits: Arc<crate::core::limits::OrgLimits>,
}

/// A JSON object body whose rejections are `{error, code}` 4xx responses, never 5xx.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ApiJsonBytes(v, _) = ApiJsonBytes::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

/// [`ApiJson`] with the body's bytes as they came (for a signature over them).
pub struct ApiJsonBytes<T>(pub T, pub axum::body::Bytes);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJsonBytes<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "413",
                        format!(
                            "request body is too large: the limit is {MAX_REQUEST_BYTES} bytes"
                        ),
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
                match serde_json::from_slice::<serde::de::IgnoredAny>(src) {
                    Ok(_) => "invalid JSON body: expected a JSON object".to_string(),
                    Err(e) => format!("invalid JSON body: {e}"),
                },
            ));
        }
        let v = serde_json::from_slice(src)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        Ok(ApiJsonBytes(v, bytes))
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
