//! The one place that turns errors into HTTP responses.
//!
//! Every error body is `{"error": "<message>", "code": "<string>"}` with
//! `Content-Type: application/json` (reference §A.1). The capacity 429 also carries
//! `"status": 429` and `"message"` as documented (reference §A.5). Status table:
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `GENERIC_BAD_REQUEST`, `"400"` | invalid field, malformed JSON or id |
//! | 400 | `PCC-1001` | the deployment cannot run |
//! | 401 | `"401"` | missing, unknown, revoked or wrong-kind key |
//! | 404 | `NOT_FOUND` / `"404"` | no such agent, session or route (or another org's) |
//! | 405 | `"405"` | method not allowed on a route |
//! | 409 | `CONFLICT`, `STOPPED_DURING_START` | conflicting state |
//! | 413 | `"413"` | start `body` over the transport's limit, or request too large |
//! | 429 | `"429"` | agent at `maxAgents`; an org at its uploads or builds at once |
//! | 500 | `"500"` | unreadable stored data or a bug (never a panic escaping) |
//! | 503 | `STORAGE_FULL`, `STORAGE_UNAVAILABLE` | the storage cannot write now (full disk, I/O error, read-only); nothing was saved |
//! | 503 | `DRAINING`, `NODE_FENCED`, `INSTANCE_EXITED`, `AGENT_CRASH_LOOP`, `SPAWN_FAILED`, `DELIVERY_FAILED` | no instance could take the session |
//! | 504 | `START_TIMEOUT` | the instance did not become ready in time |

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::core::CoreError;
use crate::store::StoreError;

/// The error body (reference `ErrorResponse`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Code, always a string.
    pub code: String,
    /// Message.
    pub error: String,
}

/// The capacity 429 body (reference §A.5): the error body plus `status` and `message`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RateLimitBody {
    /// `"429"`.
    pub code: String,
    /// Message.
    pub error: String,
    /// `Rate limit exceeded. Please try again later (...)`.
    pub message: String,
    /// 429.
    pub status: u16,
}

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    /// Status.
    pub status: StatusCode,
    /// `code`.
    pub code: String,
    /// `error`.
    pub message: String,
}

impl ApiError {
    /// Any status and code.
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }
    /// 400 `GENERIC_BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST", message)
    }
    /// 401 `"401"`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "401", message)
    }
    /// 404 with a code.
    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    /// Replaces the code of a 404 (agent routes document `NOT_FOUND`; session routes `"404"`).
    pub fn with_not_found_code(mut self, code: &str) -> Self {
        if self.status == StatusCode::NOT_FOUND {
            self.code = code.into();
        }
        self
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let msg = e.to_string();
        match e {
            CoreError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "404", msg),
            CoreError::BadRequest { code, .. } => ApiError::new(StatusCode::BAD_REQUEST, code, msg),
            CoreError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "CONFLICT", msg),
            CoreError::PayloadTooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "413", msg)
            }
            CoreError::AtCapacity(_) | CoreError::OrgBusy(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "429", msg)
            }
            CoreError::OrgLimit(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "ORG_LIMIT_REACHED", msg)
            }
            CoreError::Draining => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "DRAINING", msg),
            CoreError::Fenced => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NODE_FENCED", msg),
            CoreError::DeploymentNotReady(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "PCC-1001", msg)
            }
            CoreError::StartFailed { code, .. } => {
                let status = if code == "START_TIMEOUT" {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                ApiError::new(status, code, msg)
            }
            CoreError::StoppedDuringStart(_) => {
                ApiError::new(StatusCode::CONFLICT, "STOPPED_DURING_START", msg)
            }
            CoreError::Daily { status, .. } => match status {
                400 => ApiError::new(StatusCode::BAD_REQUEST, "DAILY_BAD_REQUEST", msg),
                429 => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "DAILY_RATE_LIMITED", msg),
                401 | 403 => ApiError::new(StatusCode::BAD_GATEWAY, "DAILY_UNAUTHORIZED", msg),
                _ => ApiError::new(StatusCode::BAD_GATEWAY, "DAILY_ERROR", msg),
            },
            CoreError::Store(e) => store_error(e),
            CoreError::NodeUnreachable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NODE_UNREACHABLE", msg)
            }
        }
    }
}

/// A storage failure that reached a handler. The backend's text goes to the server's log
/// only; the client gets a fixed message.
fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "404", "not found"),
        StoreError::Conflict => ApiError::new(
            StatusCode::CONFLICT,
            "CONFLICT",
            "conflicts with a stored record (changed meanwhile); retry",
        ),
        StoreError::Full(_) => {
            tracing::error!(error = %e, "storage full: writes fail until space is freed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORAGE_FULL",
                "the server's storage is full; nothing was saved. Retry once space is freed",
            )
        }
        StoreError::Unavailable(_) => {
            tracing::error!(error = %e, "storage unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORAGE_UNAVAILABLE",
                "the server's storage is unavailable; nothing was saved. Retry later",
            )
        }
        // `core` names the limit (`OrgLimits::refusal`); this is only a fallback.
        StoreError::LimitReached => ApiError::new(
            StatusCode::FORBIDDEN,
            "ORG_LIMIT_REACHED",
            "the organization has reached one of its limits",
        ),
        StoreError::Invalid(_) => {
            tracing::error!(error = %e, "bad stored data");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500",
                "internal error reading stored data",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            let body = RateLimitBody {
                code: self.code,
                message: format!(
                    "Rate limit exceeded. Please try again later ({})",
                    self.message
                ),
                error: self.message,
                status: 429,
            };
            return (self.status, Json(body)).into_response();
        }
        let body = ErrorBody {
            code: self.code,
            error: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
