//! The Session API proxy (reference §A.5.5):
//! `{GET,POST,PUT,PATCH,DELETE,OPTIONS,HEAD} /v1/public/{agent}/sessions/{sessionId}/{path}`.
//!
//! Forwards to `http://127.0.0.1:<instance port>/{path}` on the instance that runs the session:
//! method, query and body unchanged (streamed); every header except `host`, `content-length`
//! and `authorization`, plus `x-daily-session-id`; the instance's status, headers and body are
//! streamed back unchanged. While the instance is still starting the request waits, up to
//! [`PROXY_WAIT`]. A session that ended or never existed answers 404 `{error, code}`.

use std::sync::LazyLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use uuid::Uuid;

use super::auth::PublicAuth;
use super::error::{ApiError, ApiResult};
use super::{ApiPath, AppState};

/// Longest a proxied request waits for a starting instance.
pub const PROXY_WAIT: Duration = Duration::from_secs(30);

/// The client for requests to instances. A pooled connection is dropped after 4 s idle:
/// the base image's server (uvicorn) closes keep-alive connections idle for 5 s, and a
/// request sent on a connection the server is closing fails (it is not retried).
pub(super) static CLIENT: LazyLock<Client<HttpConnector, Body>> = LazyLock::new(|| {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(4))
        .build(c)
});

/// The client for requests forwarded to another node (`http://` or `https://`). A pooled
/// connection is dropped after [`PEER_POOL_IDLE`](crate::core::cluster::PEER_POOL_IDLE),
/// within the peer's keep-alive timeout, for the same reason as [`CLIENT`]'s.
pub(super) static PEERS: LazyLock<Client<crate::core::cluster::PeerConnector, Body>> =
    LazyLock::new(|| {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(crate::core::cluster::PEER_POOL_IDLE)
            .build(crate::core::cluster::peer_connector())
    });

/// Checks that a live session of `agent` in `org` exists; returns its id.
/// Errors: 400 for a malformed id; 404 when unknown, another org's or agent's, or ended.
pub async fn live_session(st: &AppState, org: &str, agent: &str, sid: &str) -> ApiResult<Uuid> {
    let id = super::sessions::parse_session_id(sid)?;
    let (_, s) = super::sessions::session_of(st, org, agent, id).await?;
    if s.end.is_some() {
        return Err(ApiError::not_found(
            "404",
            format!("session {id} has ended"),
        ));
    }
    Ok(id)
}

/// Proxy with an empty sub-path.
pub async fn proxy_root(
    st: State<AppState>,
    auth: PublicAuth,
    ApiPath((agent, sid)): ApiPath<(String, String)>,
    req: Request,
) -> Response {
    forward(st, auth, agent, sid, String::new(), req).await
}

/// Proxy with a sub-path.
#[utoipa::path(method(get, post, put, patch, delete, head, options),
    path = "/v1/public/{agent_name}/sessions/{session_id}/{path}", tag = "sessions",
    operation_id = "session_proxy",
    params(("agent_name" = String, Path, description = "Agent name"),
           ("session_id" = String, Path, description = "Session UUID"),
           ("path" = String, Path, description = "Path on the bot (not bot or ws)")),
    responses((status = 200, description = "the bot's own answer, unchanged", body = Object),
              (status = "default", description = "the bot's own answer with any other status, unchanged"),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody),
              (status = 404, description = "unknown or ended session, or a reserved path", body = super::error::ErrorBody),
              (status = 502, body = super::error::ErrorBody)),
    security(("PublicKeyAuth" = [])))]
pub async fn proxy(
    st: State<AppState>,
    auth: PublicAuth,
    ApiPath((agent, sid, path)): ApiPath<(String, String, String)>,
    req: Request,
) -> Response {
    forward(st, auth, agent, sid, path, req).await
}

/// Marks `headers` as sent by this node: the cluster secret and this node's run.
pub(super) fn as_peer(
    st: &AppState,
    secret: &crate::core::cluster::ClusterSecret,
    headers: &mut axum::http::HeaderMap,
) {
    headers.insert(
        HeaderName::from_static(crate::core::cluster::SECRET_HEADER),
        secret
            .expose()
            .parse()
            .expect("the cluster secret is a valid header value"),
    );
    if let Ok(run) = st.node.run().parse() {
        headers.insert(
            HeaderName::from_static(crate::core::cluster::NODE_HEADER),
            run,
        );
    }
}

/// Sends `req` to node `node` and waits for the answer's head, checking every
/// [`OWNER_CHECK`] that the node is still alive: `None` once it is declared dead.
pub(super) async fn send_to_peer(
    st: &AppState,
    node: &str,
    req: Request<Body>,
) -> Option<Result<axum::http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>>
{
    let sent = PEERS.request(req);
    tokio::pin!(sent);
    loop {
        tokio::select! {
            r = &mut sent => return Some(r),
            () = tokio::time::sleep(OWNER_CHECK) => {
                if st.sup.owner_dead(node).await {
                    return None;
                }
            }
        }
    }
}

async fn forward(
    State(st): State<AppState>,
    PublicAuth(c): PublicAuth,
    agent: String,
    sid: String,
    path: String,
    req: Request,
) -> Response {
    match forward_inner(&st, &c.org, &agent, &sid, &path, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// How often a request forwarded to another node checks, while it waits for the answer,
/// that the owner is still alive.
const OWNER_CHECK: Duration = Duration::from_secs(1);

/// Sends a proxied request for another node's session to that node, unchanged (its own
/// path, query, headers with the caller's key, and body) plus the cluster secret, and streams
/// its answer back. The owner serves it from its instance and never forwards it again.
/// While it waits for the answer's head, it checks every [`OWNER_CHECK`] that the owner is
/// alive (`Supervisor::owner_dead`): an owner that froze or lost its machine is declared dead
/// after the node timeout, and the request ends then (a dead peer's TCP connection could hang
/// for many minutes).
/// Errors: 503 `NODE_UNREACHABLE` when the owner is not alive (before or while the request
/// waits), has no advertise URL, does not take the connection (a node that died and is not
/// declared dead yet), or this node has no cluster secret; 502 when the request was sent and
/// no answer came.
pub(super) async fn to_owner(
    st: &AppState,
    owner: &str,
    id: Uuid,
    req: Request,
) -> ApiResult<Response> {
    let unreachable = |why: &str| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NODE_UNREACHABLE",
            format!("session {id} runs on node {owner}, {why}"),
        )
    };
    let no_answer = |e: &(dyn std::error::Error + 'static)| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "502",
            format!(
                "node {owner}, which runs session {id}, did not answer ({}): the request may \
                 have reached it; a node that stopped is taken over once it misses the node \
                 timeout (--node-timeout), and its sessions are then ended",
                crate::core::cluster::error_chain(e)
            ),
        )
    };
    let Some(node) = st.sup.live_node(owner).await? else {
        return Err(unreachable("which is not alive"));
    };
    let (Some(url), Some(secret)) = (node.advertise_url, st.node.secret.as_ref()) else {
        return Err(unreachable(
            "which this node cannot reach: give every node --advertise-url and --cluster-secret-file",
        ));
    };
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = format!("{}{path}", url.trim_end_matches('/'))
        .parse::<Uri>()
        .map_err(|e| unreachable(&format!("whose advertise URL is unusable ({e})")))?;
    parts.headers.remove("host");
    as_peer(st, secret, &mut parts.headers);
    let Some(resp) = send_to_peer(st, owner, Request::from_parts(parts, body)).await else {
        return Err(unreachable(
            "which stopped answering and is no longer alive",
        ));
    };
    // A connection the owner never took carried nothing: a 503 (a balancer may retry it),
    // not the 502 of a request that may have reached the owner.
    let resp = resp.map_err(|e| {
        if e.is_connect() {
            unreachable(&format!(
                "which did not take the connection ({}; nothing was sent): it may be down, \
                 and is taken over once it misses the node timeout",
                crate::core::cluster::error_chain(&e)
            ))
        } else {
            no_answer(&e)
        }
    })?;
    let (parts, body) = resp.into_parts();
    // The owner refusing this node's cluster secret, or its run (another database), is this
    // cluster's fault, not the caller's: its 401 `CLUSTER_UNAUTHORIZED` or 403 `NODE_UNKNOWN`
    // is not passed on (a bot's own 401 or 403 is).
    if matches!(
        parts.status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) && small_json(&parts.headers)
    {
        use http_body_util::BodyExt;
        let bytes = body.collect().await.map_err(|e| no_answer(&e))?.to_bytes();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_string));
        match code.as_deref() {
            Some("CLUSTER_UNAUTHORIZED") => {
                return Err(unreachable(
                    "which refused this node's cluster secret: every node needs the same \
                     --cluster-secret-file",
                ))
            }
            Some("NODE_UNKNOWN") => {
                return Err(unreachable(
                    "which does not find this node in its database: the two use different \
                     databases",
                ))
            }
            _ => {}
        }
        return Ok(Response::from_parts(parts, Body::from(bytes)));
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Whether an answer is JSON with a `Content-Length` of at most 64 KiB (read whole to look
/// at its `code`).
pub(super) fn small_json(h: &axum::http::HeaderMap) -> bool {
    let json = h
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let small = h
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= 64 * 1024);
    json && small
}

/// Paths of the instance contract that the proxy never forwards: they belong to the platform
/// (reference §A.5.5 "Reserved paths"; `/api/offer` is forwarded on purpose, for SmallWebRTC).
const RESERVED: &[&str] = &["bot", "ws"];

/// The part of a proxy request's path after `/v1/public/{agent}/sessions/{sessionId}`, as the
/// client sent it (still percent-encoded), without its leading `/`: what the instance gets.
fn raw_rest(path: &str) -> &str {
    // "", "v1", "public", agent, "sessions", session id, rest
    path.splitn(7, '/').nth(6).unwrap_or("")
}

/// Percent-decodes `s` (an invalid escape is kept as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The reserved path a proxied path `raw` (as sent) could reach on an instance's server,
/// whichever way that server reads it: percent-decoded, with empty and `.` segments dropped
/// and `..` applied, cut at a `?`, `#` or `;`, in any case. `None` when it reaches none.
fn reserved_target(raw: &str) -> Option<&'static str> {
    let decoded = percent_decode(raw);
    let mut segs: Vec<&str> = Vec::new();
    for seg in decoded.split(['/', '\\']) {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let first = segs.first()?;
    let first = first.split(['?', '#', ';']).next().unwrap_or("");
    RESERVED
        .iter()
        .find(|r| r.eq_ignore_ascii_case(first))
        .copied()
}

async fn forward_inner(
    st: &AppState,
    org: &str,
    agent: &str,
    sid: &str,
    path: &str,
    req: Request,
) -> ApiResult<Response> {
    // What the instance gets is the path as the client sent it (still percent-encoded), not
    // the decoded `path`, whose `%3F` or `%2F` would change what the instance reads.
    let raw = raw_rest(req.uri().path()).to_string();
    if let Some(r) = reserved_target(&raw).or_else(|| reserved_target(path)) {
        return Err(ApiError::not_found(
            "404",
            format!("/{r} is reserved for the platform and is not proxied"),
        ));
    }
    // A request that claims to come from another node must carry the right secret.
    let from_peer = super::cluster::from_peer(st, req.headers()).await?;
    // Fast path: a running session of this org's agent is answered from memory (two store
    // reads less per request); anything else (starting, ended, unknown) asks the store.
    let running = uuid::Uuid::parse_str(sid)
        .ok()
        .and_then(|id| Some((id, st.sup.running_session_addr(org, agent, id)?)));
    let (id, addr) = match running {
        Some(v) => v,
        None => {
            let id = super::sessions::parse_session_id(sid)?;
            let (_, rec) = super::sessions::session_of(st, org, agent, id).await?;
            if rec.end.is_some() {
                return Err(ApiError::not_found(
                    "404",
                    format!("session {id} has ended"),
                ));
            }
            if !st.sup.owns(&rec.node_id) && !st.sup.serves(id) && !from_peer {
                return to_owner(st, &rec.node_id, id, req).await;
            }
            let addr = st.sup.session_addr(id, PROXY_WAIT).await.ok_or_else(|| {
                ApiError::not_found("404", format!("session {id} is not running"))
            })?;
            (id, addr)
        }
    };
    let (mut parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = format!("http://{addr}/{raw}{query}")
        .parse::<Uri>()
        .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))?;
    to_instance(id, parts, body).await
}

/// Sends a request to session `id`'s instance (`parts.uri` already names it) and returns the
/// instance's answer unchanged. Every proxied request leaves for an instance here: the
/// headers the bot must never see are removed and `x-daily-session-id` is set.
///
/// Errors: 502 when the instance does not answer.
pub async fn to_instance(
    id: uuid::Uuid,
    mut parts: axum::http::request::Parts,
    body: Body,
) -> ApiResult<Response> {
    // Never to the bot: the caller's key, and what a forwarding node added to reach this one
    // (with the cluster secret, tenant code could call any node's internal routes).
    for h in [
        "host",
        "content-length",
        "authorization",
        crate::core::cluster::SECRET_HEADER,
        crate::core::cluster::NODE_HEADER,
    ] {
        parts.headers.remove(h);
    }
    parts.headers.insert(
        HeaderName::from_static("x-daily-session-id"),
        id.to_string()
            .parse()
            .expect("uuid is a valid header value"),
    );
    let resp = CLIENT
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "502",
                format!(
                    "the session's instance did not answer: {}",
                    crate::core::cluster::error_chain(&e)
                ),
            )
        })?;
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}
