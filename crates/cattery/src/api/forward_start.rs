//! Relaying a start to the node the core chose ([`Supervisor::start_elsewhere`]): the start
//! as the client sent it (path, query, headers with the caller's key, its body) plus the
//! cluster secret and [`FORWARDED_START_HEADER`]; the answer is the serving node's, unchanged.
//! A forward that gets no usable answer leaves the start to this node (`None`).
//!
//! [`Supervisor::start_elsewhere`]: crate::core::session::Supervisor::start_elsewhere

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;

use super::cluster::from_peer;
use super::error::ApiResult;
use super::AppState;
use crate::core::cluster::FORWARDED_START_HEADER;
use crate::core::session::StartElsewhere;

/// Whether a start request was forwarded by another node (it carries
/// [`FORWARDED_START_HEADER`] and the cluster secret): it is served here, never forwarded.
/// The header without the secret is ignored (the start may be forwarded as any other).
///
/// Errors: those of [`from_peer`] (a wrong cluster secret: 401; an unknown node run: 403).
pub async fn forwarded(st: &AppState, headers: &HeaderMap) -> ApiResult<bool> {
    if !headers.contains_key(FORWARDED_START_HEADER) {
        return Ok(false);
    }
    from_peer(st, headers).await
}

/// A start of `org`'s agent `name` (`uri`, `headers`, `req` as the client sent them) served
/// by another node, when the engine chooses one ([`Supervisor::start_elsewhere`]) and the
/// start was not forwarded already: that node's answer. `None`: the start is this node's.
///
/// Errors: those of [`forwarded`].
///
/// [`Supervisor::start_elsewhere`]: crate::core::session::Supervisor::start_elsewhere
pub async fn elsewhere(
    st: &AppState,
    org: &str,
    name: &str,
    uri: &Uri,
    headers: &HeaderMap,
    req: &super::sessions::StartRequest,
) -> ApiResult<Option<Response>> {
    if forwarded(st, headers).await? {
        return Ok(None);
    }
    let Some(to) = st.sup.start_elsewhere(org, name).await else {
        return Ok(None);
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let json = Bytes::from(serde_json::to_vec(req).unwrap_or_default());
    Ok(relay(st, &to, path, headers, json).await)
}

/// Sends the start (`path_and_query`, `headers`, the JSON `body`) to `to` and answers its
/// answer. `None` when there is no answer to pass on, and the start is then this node's:
/// this node has no cluster secret, the node did not take the connection or closed it
/// unanswered, it was declared dead while the start waited, or it refused the start for a
/// reason of its own and not the caller's (it drains or is fenced, or refuses this node's
/// cluster secret or run).
pub async fn relay(
    st: &AppState,
    to: &StartElsewhere,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Option<Response> {
    let secret = st.node.secret.as_ref()?;
    let uri = format!("{}{path_and_query}", to.url.trim_end_matches('/'))
        .parse::<Uri>()
        .ok()?;
    let mut req = Request::post(uri).body(Body::from(body)).ok()?;
    let h = req.headers_mut();
    for (k, v) in headers {
        if !matches!(
            k.as_str(),
            "host" | "content-length" | "transfer-encoding" | "connection"
        ) {
            h.append(k.clone(), v.clone());
        }
    }
    super::proxy::as_peer(st, secret, h);
    h.insert(
        HeaderName::from_static(FORWARDED_START_HEADER),
        HeaderValue::from_static("1"),
    );
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let Some(resp) = super::proxy::send_to_peer(st, &to.node, req).await else {
        tracing::warn!(node = %to.node,
            "a start forwarded to a node with an idle instance got no answer before the node \
             was declared dead; starting it here");
        return None;
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(node = %to.node, error = %crate::core::cluster::error_chain(&e),
                "a start forwarded to a node with an idle instance got no answer; starting it here");
            return None;
        }
    };
    let (parts, body) = resp.into_parts();
    if matches!(
        parts.status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::SERVICE_UNAVAILABLE
    ) && super::proxy::small_json(&parts.headers)
    {
        use http_body_util::BodyExt;
        let bytes = body.collect().await.ok()?.to_bytes();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_string));
        if matches!(
            code.as_deref(),
            Some("CLUSTER_UNAUTHORIZED" | "NODE_UNKNOWN" | "DRAINING" | "NODE_FENCED")
        ) {
            tracing::warn!(node = %to.node, code = code.as_deref().unwrap_or_default(),
                "a node with an idle instance refused a forwarded start; starting it here");
            return None;
        }
        return Some(Response::from_parts(parts, Body::from(bytes)));
    }
    tracing::debug!(node = %to.node, status = %parts.status, "start served by another node");
    Some(Response::from_parts(parts, Body::new(body)))
}
