//! Request ids and the request span: every request gets an `x-request-id` (the client's own,
//! if it sent one, else a new uuid), echoed on the response, and is served inside a `request`
//! span that carries it, with the method and the matched route's template (never the raw
//! path: it may hold a websocket token). Every line the server logs while serving a request
//! carries its request id (`--log-format json`: under `span`). The response line
//! (`tower_http=debug`) adds status and latency.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

/// The request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id kept from a client (longer ones are cut).
const MAX_ID_LEN: usize = 128;

fn span_for(req: &Request) -> tracing::Span {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let id = &id[..id.len().min(MAX_ID_LEN)];
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        route = tracing::field::Empty,
    )
}

/// A route layer: records the matched route's template in the request span.
pub async fn record_route(path: Option<MatchedPath>, req: Request, next: Next) -> Response {
    if let Some(p) = path {
        tracing::Span::current().record("route", p.as_str());
    }
    next.run(req).await
}

/// Wraps `router` with the request id and span layers.
pub fn with_request_ids(router: Router) -> Router {
    router
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(span_for)
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}
