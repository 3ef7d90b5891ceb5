//! `/v1/agents`: create, list, get, update, delete (reference §A.3, response §B.2).

use axum::extract::{Query, State};
use axum::Json;

use super::auth::PrivateAuth;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::schema::{AgentDetails, AgentList, AgentListItem, Deployment, ForkServer, StatusOk};
use super::{ApiJson, ApiPath, AppState};
use crate::core::agents::{self, AgentRequest};
use crate::core::lookup;
use crate::model::AgentRecord;

/// Loads an agent's details, or 404 `NOT_FOUND`.
pub async fn load_details(
    st: &AppState,
    org: &str,
    name: &str,
    warning: Option<String>,
) -> ApiResult<AgentDetails> {
    let a = lookup::find_agent(&st.store, org, name)
        .await?
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", format!("Not found: agent {name}")))?;
    details_of(st, &a, warning).await
}

/// Details of a loaded agent. Errors: 404 `NOT_FOUND` when its deployment is missing.
pub async fn details_of(
    st: &AppState,
    a: &AgentRecord,
    warning: Option<String>,
) -> ApiResult<AgentDetails> {
    let d = agents::current_deployment(&st.store, a)
        .await
        .map_err(|e| ApiError::from(e).with_not_found_code("NOT_FOUND"))?;
    let p = st.sup.agent_pool_status(a, d.id).await?;
    let fork = st.sup.runtime().fork_server(a.id);
    Ok(AgentDetails::of(
        a,
        &d,
        &p,
        st.sup.default_stop_grace().as_secs_f64(),
        warning,
        fork.as_ref().map(ForkServer::of),
    ))
}

/// Create an agent.
#[utoipa::path(post, path = "/v1/agents", request_body = AgentRequest, tag = "agents",
    operation_id = "create_agent",
    responses((status = 200, description = "ServiceDetailsResponse", body = AgentDetails),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, description = "ORG_LIMIT_REACHED: the org has agents_per_org agents", body = ErrorBody),
              (status = 404, description = "secret set not found", body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn create_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiJson(req): ApiJson<AgentRequest>,
) -> ApiResult<Json<AgentDetails>> {
    let defaults = crate::core::orgs::org_defaults(&st.store, &st.defaults, &c.org).await?;
    let (a, _) = agents::create_agent(
        &st.store,
        &st.sup,
        &st.limits,
        &defaults,
        st.builds.dir(),
        &c.org,
        &req,
    )
    .await?;
    Ok(Json(details_of(&st, &a, req.request_warnings()).await?))
}

/// Query of the agent list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct ListAgentsQuery {
    /// Only agents in this region.
    pub region: Option<String>,
    /// Include each agent's `deployment`.
    pub include_active_deployment: Option<String>,
}

/// List agents: `{"services": [...]}`.
#[utoipa::path(get, path = "/v1/agents", tag = "agents", operation_id = "list_agents",
    params(ListAgentsQuery),
    responses((status = 200, description = "{\"services\": [ServiceListItem]}", body = AgentList),
              (status = 401, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn list_agents(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Json<AgentList>> {
    let list = agents::list_agents(&st.store, &c.org, q.get("region").map(String::as_str)).await?;
    let include = q
        .get("includeActiveDeployment")
        .is_some_and(|v| v == "true" || v == "1");
    let mut services = Vec::with_capacity(list.len());
    for a in &list {
        let mut item = AgentListItem::of(a);
        if include {
            // The deployment alone: no pool, no counts (the list carries none).
            if let Ok(d) = agents::current_deployment(&st.store, a).await {
                item.deployment = Some(Deployment::of(a, &d));
            }
        }
        services.push(item);
    }
    Ok(Json(AgentList { services }))
}

/// Get an agent.
#[utoipa::path(get, path = "/v1/agents/{agent_name}", tag = "agents", operation_id = "get_agent",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "ServiceDetailsResponse", body = AgentDetails),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn get_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<AgentDetails>> {
    Ok(Json(load_details(&st, &c.org, &name, None).await?))
}

/// Update an agent (partial).
#[utoipa::path(post, path = "/v1/agents/{agent_name}", request_body = AgentRequest, tag = "agents",
    operation_id = "update_agent",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "ServiceDetailsResponse", body = AgentDetails),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn update_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<AgentRequest>,
) -> ApiResult<Json<AgentDetails>> {
    let (a, _, warning) =
        agents::update_agent(&st.store, &st.sup, st.builds.dir(), &c.org, &name, &req)
            .await
            .map_err(|e| ApiError::from(e).with_not_found_code("NOT_FOUND"))?;
    let warning = [warning, req.request_warnings()]
        .into_iter()
        .flatten()
        .reduce(|a, b| format!("{a}; {b}"));
    Ok(Json(details_of(&st, &a, warning).await?))
}

/// Delete an agent: `{"status": "OK"}`.
#[utoipa::path(delete, path = "/v1/agents/{agent_name}", tag = "agents", operation_id = "delete_agent",
    params(("agent_name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "{\"status\": \"OK\"}", body = StatusOk),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn delete_agent(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<StatusOk>> {
    agents::delete_agent(&st.store, &st.sup, &c.org, &name)
        .await
        .map_err(|e| ApiError::from(e).with_not_found_code("NOT_FOUND"))?;
    Ok(Json(StatusOk::OK))
}
