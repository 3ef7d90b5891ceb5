//! `GET /v1/cluster/nodes` (docs/cluster.md): the nodes sharing this server's store.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;

use super::auth::PrivateAuth;
use super::error::{ApiError, ApiResult};
use super::{ApiPath, AppState};
use crate::core::cluster::{self, NodeStatus};
use crate::core::session::PeerStop;
use crate::core::CoreError;
use crate::model::now_ms;
use crate::serve::DEFAULT_ORG;

/// The cluster's nodes are for operators: keys of the default org. Errors: 403 for another
/// org's key.
fn operators_only(c: &super::auth::Caller) -> ApiResult<()> {
    if c.org != DEFAULT_ORG {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "the cluster's nodes are for keys of the default org only",
        ));
    }
    Ok(())
}

/// The nodes, by id.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeList {
    /// Every node that ever heartbeat on this store, alive or not.
    pub nodes: Vec<NodeStatus>,
}

/// Nodes of the cluster with their heartbeat age and instance counts. Operators only: a
/// private key (or token) of the default org; another org's key gets 403.
#[utoipa::path(get, path = "/v1/cluster/nodes", tag = "cluster", operation_id = "list_cluster_nodes",
    responses((status = 200, description = "The nodes, by id", body = NodeList),
              (status = 401, body = super::error::ErrorBody),
              (status = 403, description = "not a key of the default org", body = super::error::ErrorBody),
              (status = 503, description = "the store is unavailable", body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn nodes(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
) -> ApiResult<Json<NodeList>> {
    operators_only(&c)?;
    let nodes = st.store.list_nodes().await.map_err(CoreError::from)?;
    Ok(Json(NodeList {
        nodes: cluster::statuses(&st.node, nodes, now_ms()),
    }))
}

/// A node forgotten by `DELETE /v1/cluster/nodes/{node_id}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ForgottenNode {
    /// The node's id.
    pub id: String,
    /// Always `forgotten`.
    pub state: &'static str,
}

/// Forgets a node that left, or is dead and owns nothing any more (a live node takes a dead
/// node's sessions and instances over within the node timeout): it leaves the node list. A
/// node that heartbeats again afterwards is listed again. Operators only, as the list.
#[utoipa::path(delete, path = "/v1/cluster/nodes/{node_id}", tag = "cluster",
    operation_id = "forget_cluster_node",
    params(("node_id" = String, Path, description = "The node's id")),
    responses((status = 200, description = "The node is forgotten", body = ForgottenNode),
              (status = 401, body = super::error::ErrorBody),
              (status = 403, description = "not a key of the default org", body = super::error::ErrorBody),
              (status = 404, description = "no such node (`NODE_NOT_FOUND`)", body = super::error::ErrorBody),
              (status = 409, description = "the node is alive (`NODE_ALIVE`), or dead but still owns sessions or instances (`NODE_OWNS_RECORDS`)", body = super::error::ErrorBody),
              (status = 503, description = "the store is unavailable", body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn forget_node(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(node_id): ApiPath<String>,
) -> ApiResult<Json<ForgottenNode>> {
    use crate::store::ForgetNode;
    operators_only(&c)?;
    let alive = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "NODE_ALIVE",
            format!(
                "node {node_id} is alive (it heartbeat within the node timeout); stop it \
                 first, or wait for the timeout after it stopped"
            ),
        )
    };
    if node_id == st.node.id {
        return Err(alive());
    }
    let timeout_ms = i64::try_from(st.node.timeout.as_millis()).unwrap_or(i64::MAX);
    let stale_ms = now_ms().saturating_sub(timeout_ms);
    match st
        .store
        .forget_node(&node_id, stale_ms)
        .await
        .map_err(CoreError::from)?
    {
        ForgetNode::Forgotten => {
            tracing::info!(node = %node_id, by = %c.org, "forgot a node");
            Ok(Json(ForgottenNode {
                id: node_id,
                state: "forgotten",
            }))
        }
        ForgetNode::Unknown => Err(ApiError::not_found(
            "NODE_NOT_FOUND",
            format!("Not found: node {node_id}"),
        )),
        ForgetNode::Alive => Err(alive()),
        ForgetNode::Owns {
            instances,
            sessions,
        } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "NODE_OWNS_RECORDS",
            format!(
                "node {node_id} is dead but still owns {sessions} open session(s) and \
                 {instances} instance(s); a live node takes them over within the node timeout"
            ),
        )),
    }
}

/// Whether a request is an internal call from another node: it carries the cluster secret
/// ([`cluster::SECRET_HEADER`]). `false` when it carries none.
///
/// The secret alone is not enough when the call names its node's run
/// ([`cluster::NODE_HEADER`]): that run must be in this node's store, else the caller uses
/// another database (a restored copy whose node list names this cluster's nodes).
///
/// Errors: 401 `CLUSTER_UNAUTHORIZED` when it carries a wrong secret, or any while this node
/// has none (an org's API key is never enough for an internal call); 400 when the run it
/// names is not `<node id> <start ms>`; 403 `NODE_UNKNOWN` from a run this node's store does
/// not know.
pub async fn from_peer(st: &AppState, headers: &HeaderMap) -> ApiResult<bool> {
    let Some(given) = headers.get(cluster::SECRET_HEADER) else {
        return Ok(false);
    };
    match &st.node.secret {
        Some(s) if s.matches(given.as_bytes()) => {
            let Some(run) = headers.get(cluster::NODE_HEADER) else {
                return Ok(true);
            };
            let run = run.to_str().unwrap_or_default();
            let parsed = run
                .rsplit_once(' ')
                .and_then(|(id, started)| Some((id, started.parse::<i64>().ok()?)))
                .filter(|(id, _)| !id.is_empty());
            let Some((id, started)) = parsed else {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "GENERIC_BAD_REQUEST",
                    format!(
                        "{} must be \"<node id> <start time in ms>\"",
                        cluster::NODE_HEADER
                    ),
                ));
            };
            if st.sup.knows_node_run(id, started).await? {
                return Ok(true);
            }
            tracing::warn!(
                caller = %run,
                "refused an internal call from a node this node's database does not know: it \
                 uses another database (a restored copy?) with the same cluster secret"
            );
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "NODE_UNKNOWN",
                "the calling node is not in this node's database: the two use different databases",
            ))
        }
        s => {
            tracing::warn!(
                has_secret = s.is_some(),
                "refused an internal call from another node: its cluster secret is not this \
                 node's (every node needs the same --cluster-secret-file)"
            );
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "CLUSTER_UNAUTHORIZED",
                "internal calls between nodes need the cluster secret (--cluster-secret-file)",
            ))
        }
    }
}

/// `POST /internal/v1/sessions/{session_id}/stop`: another node forwards a stop of a session
/// this node owns (it checked the caller's key, org and agent). Only with the cluster secret.
/// 200 `{"status": "terminated"}` once the instance is gone (or the session had ended); 409
/// `NOT_OWNER` when this node does not own the session (the caller asks the store again);
/// 404 for an unknown session.
pub async fn internal_stop(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiPath(sid): ApiPath<String>,
) -> ApiResult<Json<serde_json::Value>> {
    if !from_peer(&st, &headers).await? {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "CLUSTER_UNAUTHORIZED",
            "internal calls between nodes need the cluster secret (--cluster-secret-file)",
        ));
    }
    let id = super::sessions::parse_session_id(&sid)?;
    match st.sup.stop_owned(id).await? {
        PeerStop::Stopped => Ok(Json(serde_json::json!({"status": "terminated"}))),
        // `Refused` and `Unknown` are a caller's view of a peer's answer; `stop_owned` never
        // gives them (an unknown session is its `NotFound`, 404).
        PeerStop::NotOwner | PeerStop::Refused | PeerStop::Stranger | PeerStop::Unknown => {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "NOT_OWNER",
                format!("session {id} is not this node's"),
            ))
        }
    }
}
