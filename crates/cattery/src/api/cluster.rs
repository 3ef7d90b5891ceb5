//! `GET /v1/cluster/nodes` (docs/cluster.md): the nodes sharing this server's store.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::auth::PrivateAuth;
use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::core::cluster::{self, NodeStatus};
use crate::core::CoreError;
use crate::model::now_ms;
use crate::serve::DEFAULT_ORG;

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
    if c.org != DEFAULT_ORG {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "the cluster's nodes are listed for keys of the default org only",
        ));
    }
    let nodes = st.store.list_nodes().await.map_err(CoreError::from)?;
    Ok(Json(NodeList {
        nodes: cluster::statuses(&st.node, nodes, now_ms()),
    }))
}
