//! `GET /metrics`: the Prometheus text exposition of `crate::telemetry`, open, or behind the
//! bearer token of `--metrics-token`.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// The exposition format's content type (text format 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`.
pub async fn scrape(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(want) = &st.metrics.token {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(got.as_bytes().ct_eq(want.as_bytes())) {
            return ApiError::unauthorized(
                "/metrics needs the metrics token (Authorization: Bearer ...)",
            )
            .into_response();
        }
    }
    let body = st.metrics.render(&st.sup.gauges());
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        body,
    )
        .into_response()
}
