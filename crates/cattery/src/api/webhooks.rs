//! Outbound webhook endpoints of the key's org and their delivery log (`core::webhooks`;
//! docs/webhooks.md). Cattery's own routes: Pipecat Cloud manages endpoints in its dashboard.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::PrivateAuth;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::{ApiJson, ApiPath, AppState};
use crate::core::webhooks::{EndpointView, NewEndpoint};
use crate::model::iso_ms;
use crate::store::WebhookDelivery;

/// Body of `POST /v1/webhooks`.
#[derive(custom_debug::Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// `http://` or `https://` URL that receives the events (it may hold a credential: it
    /// is never logged).
    #[debug(with = crate::redact::url)]
    pub url: String,
    /// Event types (`session.started`, `session.ended`, `deployment.ready`,
    /// `deployment.failed`); all when absent.
    pub events: Option<Vec<String>>,
    /// What the endpoint is for.
    pub description: Option<String>,
    /// A `whsec_` signing secret to use; a new one when absent.
    #[debug(with = crate::redact::hidden_some)]
    pub secret: Option<String>,
}

/// A webhook endpoint (its secret only in the answer that creates it).
#[derive(custom_debug::Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Endpoint id.
    pub id: Uuid,
    /// Where events go.
    #[debug(with = crate::redact::url)]
    pub url: String,
    /// Event types it receives.
    pub events: Vec<String>,
    /// What it is for.
    pub description: String,
    /// Creation time (ISO 8601).
    pub created_at: String,
    /// The `whsec_` signing secret (creation only; later `GET /v1/webhooks/{id}/secret`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[debug(with = crate::redact::hidden_some)]
    pub secret: Option<String>,
}

impl Webhook {
    fn of(v: EndpointView, secret: Option<String>) -> Self {
        Webhook {
            id: v.id,
            url: v.url,
            events: v.events,
            description: v.description,
            created_at: iso_ms(v.created_ms),
            secret,
        }
    }
}

/// `{"webhooks": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    /// The org's endpoints, oldest first.
    pub webhooks: Vec<Webhook>,
}

/// `{"secret": "whsec_..."}`.
#[derive(custom_debug::Debug, Serialize, ToSchema)]
pub struct WebhookSecret {
    /// The signing secret.
    #[debug(with = crate::redact::hidden)]
    pub secret: String,
}

/// One delivery of one event to the endpoint.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The `webhook-id` header of every attempt (`msg_...`).
    pub webhook_id: String,
    /// Event type.
    pub event_type: String,
    /// `pending` (queued, retried), `delivered` (2xx) or `failed` (given up).
    pub state: String,
    /// Attempts made.
    pub attempts: i64,
    /// HTTP status of the last attempt, if one came.
    pub last_status: Option<i64>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// When the event happened.
    pub created_at: String,
    /// When a pending delivery is tried next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// When it was delivered or given up.
    pub finished_at: Option<String>,
    /// The body, as signed and sent.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

impl Delivery {
    fn of(d: WebhookDelivery) -> Self {
        let pending = d.state == crate::store::DeliveryState::Pending;
        Delivery {
            webhook_id: format!("msg_{}", d.id.simple()),
            event_type: d.event_type,
            state: d.state.as_str().to_string(),
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
            created_at: iso_ms(d.created_ms),
            next_attempt_at: pending.then(|| iso_ms(d.next_attempt_ms)),
            finished_at: d.finished_ms.map(iso_ms),
            payload: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// `{"deliveries": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    /// Newest first.
    pub deliveries: Vec<Delivery>,
}

fn endpoint_id(s: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError::bad_request(format!(
            "invalid webhook endpoint id {s:?}: expected a UUID"
        ))
    })
}

/// Create a webhook endpoint for the key's org; the answer holds its signing secret.
#[utoipa::path(post, path = "/v1/webhooks", request_body = CreateWebhook, tag = "webhooks",
    operation_id = "create_webhook",
    responses((status = 201, body = Webhook), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn create_webhook(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiJson(req): ApiJson<CreateWebhook>,
) -> ApiResult<(StatusCode, Json<Webhook>)> {
    let (v, secret) = st
        .webhooks
        .create(
            &c.org,
            NewEndpoint {
                url: req.url,
                events: req.events,
                description: req.description,
                secret: req.secret,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(Webhook::of(v, Some(secret)))))
}

/// The key's org's webhook endpoints.
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", operation_id = "list_webhooks",
    responses((status = 200, body = WebhookList), (status = 401, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn list_webhooks(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
) -> ApiResult<Json<WebhookList>> {
    let webhooks = st.webhooks.list(&c.org).await?;
    Ok(Json(WebhookList {
        webhooks: webhooks.into_iter().map(|v| Webhook::of(v, None)).collect(),
    }))
}

/// One webhook endpoint.
#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = "webhooks", operation_id = "get_webhook",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = Webhook), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn get_webhook(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Webhook>> {
    let v = st.webhooks.get(&c.org, endpoint_id(&id)?).await?;
    Ok(Json(Webhook::of(v, None)))
}

/// Delete a webhook endpoint, with its queued deliveries and its log.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", operation_id = "delete_webhook",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 204, description = "deleted"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn delete_webhook(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    st.webhooks.delete(&c.org, endpoint_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A webhook endpoint's signing secret.
#[utoipa::path(get, path = "/v1/webhooks/{id}/secret", tag = "webhooks", operation_id = "get_webhook_secret",
    params(("id" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookSecret), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn webhook_secret(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<WebhookSecret>> {
    let secret = st.webhooks.secret(&c.org, endpoint_id(&id)?).await?;
    Ok(Json(WebhookSecret { secret }))
}

/// A webhook endpoint's deliveries, newest first: queued ones (`pending`, with their next
/// attempt) and finished ones (kept 7 days).
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks", operation_id = "list_webhook_deliveries",
    params(("id" = String, Path, description = "Endpoint id"),
           ("limit" = Option<i64>, Query, description = "at most this many, default 100, at most 1000")),
    responses((status = 200, body = DeliveryList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn webhook_deliveries(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<DeliveryList>> {
    let limit = match q.get("limit").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| *l >= 1)
            .ok_or_else(|| ApiError::bad_request("limit must be a positive integer"))?,
    };
    let ds = st
        .webhooks
        .deliveries(&c.org, endpoint_id(&id)?, limit)
        .await?;
    Ok(Json(DeliveryList {
        deliveries: ds.into_iter().map(Delivery::of).collect(),
    }))
}
