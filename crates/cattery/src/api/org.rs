//! The org-scoped surface the official CLI uses (reference §A.2, §A.8-§A.10, §G, §I), plus
//! the documented `/v1/regions` and `/v1/properties`.
//!
//! Every `/v1/organizations/{org}/...` route takes a user token (`pcc_pat_...`) or a private
//! key of that org ([`OrgAuth`]); another org's name answers 404. The service, session, log
//! and secret routes call the same code as the documented `/v1/agents` and `/v1/secrets`
//! routes; the CLI-only differences are kept here:
//!
//! - `GET .../services/{name}` wraps the details as `{"body": {...}}` (the CLI reads
//!   `result["body"]` and treats anything else as "no such agent");
//! - update is `PUT .../services` with the name in `serviceName`;
//! - `GET .../services/{name}/deployments` → `{"deployments": [...]}`, newest first;
//! - `GET /v1/organizations` lists only the caller's org: `{"organizations": [{"name",
//!   "verboseName"}]}`; `GET /v1/users` → `{"user": {"userId", "emails": []}}`;
//! - `apiKeys`: `GET` → `{"public": [{"id", "key", "metadata": {"name"}, "createdAt",
//!   "revoked"}]}`, `POST {"name", "type"?}` → the new key (`"key"`), `DELETE .../{id}` revokes
//!   (soft: the record stays with `revoked: true`);
//! - `GET .../daily` → `{"apiKey"}` when the server has a Daily key, else 404.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::agents;
use super::auth::{OrgAuth, PrivateAuth};
use super::error::{ApiError, ApiResult};
use super::schema::{
    AgentDetails, AgentList, ApiKey, ApiKeyList, CurrentUser, DailyKey, Deployment, DeploymentList,
    KeyRevoked, Organization, OrganizationList, Properties, PropertiesSchema, RegionList, Session,
    SessionList, StatusOk, User, WrappedAgentDetails,
};
use super::sessions;
use super::{ApiJson, ApiPath, AppState};
use crate::core::agents::AgentRequest;
use crate::core::CoreError;
use crate::core::{keys, orgs};
use crate::model::{iso_ms, KeyKind};

fn nf(e: CoreError) -> ApiError {
    ApiError::from(e).with_not_found_code("NOT_FOUND")
}

/// `GET /v1/organizations`: the caller's org only.
pub async fn list_organizations(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
) -> ApiResult<Json<OrganizationList>> {
    let org = orgs::org_record(&st.store, &c.org)
        .await
        .map_err(|e| match e {
            CoreError::NotFound(_) => ApiError::not_found("NOT_FOUND", "organization not found"),
            e => e.into(),
        })?;
    Ok(Json(OrganizationList {
        organizations: vec![Organization {
            created_at: iso_ms(org.created_ms),
            name: org.name,
            verbose_name: org.verbose_name,
        }],
    }))
}

/// `GET /v1/users`: the calling key or token as the "user".
pub async fn current_user(PrivateAuth(c): PrivateAuth) -> Json<CurrentUser> {
    Json(CurrentUser {
        user: User {
            emails: Vec::new(),
            key_type: c.kind.as_str(),
            name: c.key_name,
            organization: c.org,
            user_id: c.key_id,
        },
    })
}

/// `GET /v1/organizations/{org}/services`.
pub async fn list_services(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    q: Query<HashMap<String, String>>,
) -> ApiResult<Json<AgentList>> {
    agents::list_agents(State(st), PrivateAuth(c), q).await
}

/// `POST /v1/organizations/{org}/services`: create.
pub async fn create_service(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    body: ApiJson<AgentRequest>,
) -> ApiResult<Json<AgentDetails>> {
    agents::create_agent(State(st), PrivateAuth(c), body).await
}

/// `PUT /v1/organizations/{org}/services`: update the agent named by `serviceName`.
pub async fn update_service(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiJson(req): ApiJson<AgentRequest>,
) -> ApiResult<Json<AgentDetails>> {
    let name = req
        .service_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("serviceName is required"))?;
    agents::update_agent(State(st), PrivateAuth(c), ApiPath(name), ApiJson(req)).await
}

/// `GET /v1/organizations/{org}/services/{name}`: `{"body": ServiceDetailsResponse}`.
pub async fn get_service(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<WrappedAgentDetails>> {
    let body = agents::load_details(&st, &c.org, &name, None).await?;
    Ok(Json(WrappedAgentDetails { body }))
}

/// `DELETE /v1/organizations/{org}/services/{name}`.
pub async fn delete_service(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<StatusOk>> {
    agents::delete_agent(State(st), PrivateAuth(c), ApiPath(name)).await
}

async fn deployments_in(st: &AppState, org: &str, name: &str) -> ApiResult<Json<DeploymentList>> {
    let (a, deps) = crate::core::agents::deployments(&st.store, org, name)
        .await?
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", "Not found"))?;
    let deployments = deps
        .iter()
        .map(|d| Deployment {
            active: Some(d.id == a.desired_deployment_id),
            ..Deployment::of(&a, d)
        })
        .collect();
    Ok(Json(DeploymentList { deployments }))
}

/// `GET /v1/organizations/{org}/services/{name}/deployments`: `{"deployments": [{id,
/// serviceId, manifest, createdAt, updatedAt, active}]}`, newest first.
pub async fn list_deployments(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<DeploymentList>> {
    deployments_in(&st, &c.org, &name).await
}

/// `GET /v1/agents/{name}/deployments` (Cattery's documented-form twin of the CLI route).
pub async fn agent_deployments(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<DeploymentList>> {
    deployments_in(&st, &c.org, &name).await
}

/// `GET /v1/organizations/{org}/services/{name}/sessions`.
pub async fn list_sessions(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
    q: Query<HashMap<String, String>>,
) -> ApiResult<Json<SessionList>> {
    sessions::list_sessions(State(st), PrivateAuth(c), ApiPath(name), q).await
}

/// `GET /v1/organizations/{org}/services/{name}/sessions/{id}`.
pub async fn get_session(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name, sid)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<Session>> {
    sessions::get_session(State(st), PrivateAuth(c), ApiPath((name, sid))).await
}

/// `DELETE /v1/organizations/{org}/services/{name}/sessions/{id}`.
pub async fn stop_session(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name, sid)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<sessions::StopResponse>> {
    sessions::stop_session(State(st), PrivateAuth(c), ApiPath((name, sid))).await
}

fn regions_in(st: &AppState) -> Json<RegionList> {
    Json(RegionList::of(orgs::regions(&st.defaults)))
}

/// List regions: `{"regions": [{"code", "display_name", ...}]}`.
#[utoipa::path(get, path = "/v1/regions", tag = "organization", operation_id = "list_regions",
    responses((status = 200, description = "The regions this server offers", body = RegionList),
              (status = 401, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn regions(State(st): State<AppState>, PrivateAuth(_c): PrivateAuth) -> Json<RegionList> {
    regions_in(&st)
}

/// `GET /v1/organizations/{org}/regions`.
pub async fn org_regions(State(st): State<AppState>, OrgAuth(_c): OrgAuth) -> Json<RegionList> {
    regions_in(&st)
}

/// Organization properties: `{"properties": {"defaultRegion"}}`.
#[utoipa::path(get, path = "/v1/properties", tag = "organization", operation_id = "get_properties",
    responses((status = 200, description = "The org's property values", body = Properties),
              (status = 401, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn properties(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
) -> ApiResult<Json<Properties>> {
    let p = orgs::properties(&st.store, &st.defaults, &st.secrets, &c.org)
        .await
        .map_err(nf)?;
    Ok(Json(Properties::of(p)))
}

/// Organization properties with their schema.
#[utoipa::path(get, path = "/v1/properties/schema", tag = "organization",
    operation_id = "get_properties_schema",
    responses((status = 200, description = "The org's properties with their schemas", body = PropertiesSchema),
              (status = 401, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn properties_schema(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
) -> ApiResult<Json<PropertiesSchema>> {
    let p = orgs::properties(&st.store, &st.defaults, &st.secrets, &c.org)
        .await
        .map_err(nf)?;
    Ok(Json(PropertiesSchema::of(p)))
}

/// Update organization properties (`{"defaultRegion": "..."}`); answers the schema form.
#[utoipa::path(patch, path = "/v1/properties", tag = "organization", operation_id = "update_properties",
    request_body = Object,
    responses((status = 200, description = "the schema form", body = PropertiesSchema),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn update_properties(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiJson(patch): ApiJson<Value>,
) -> ApiResult<Json<PropertiesSchema>> {
    let p = orgs::update_properties(&st.store, &st.defaults, &st.secrets, &c.org, &patch)
        .await
        .map_err(nf)?;
    Ok(Json(PropertiesSchema::of(p)))
}

/// `GET /v1/organizations/{org}/properties`.
pub async fn org_properties(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
) -> ApiResult<Json<Properties>> {
    properties(State(st), PrivateAuth(c)).await
}

/// `GET /v1/organizations/{org}/properties/schema`.
pub async fn org_properties_schema(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
) -> ApiResult<Json<PropertiesSchema>> {
    properties_schema(State(st), PrivateAuth(c)).await
}

/// `PATCH /v1/organizations/{org}/properties`.
pub async fn org_update_properties(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    body: ApiJson<Value>,
) -> ApiResult<Json<PropertiesSchema>> {
    update_properties(State(st), PrivateAuth(c), body).await
}

/// `GET /v1/organizations/{org}/apiKeys`: the org's public keys (with the whole key) and its
/// private keys (prefix only); tokens are not listed.
pub async fn list_api_keys(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
) -> ApiResult<Json<ApiKeyList>> {
    let keys = keys::list_keys(st.store.as_ref(), &c.org).await?;
    let of = |kind| {
        keys.iter()
            .filter(|k| k.kind == kind)
            .map(ApiKey::of)
            .collect::<Vec<_>>()
    };
    Ok(Json(ApiKeyList {
        private: of(KeyKind::Private),
        public: of(KeyKind::Public),
    }))
}

/// Body of `POST .../apiKeys`.
#[derive(Debug, Deserialize)]
pub struct CreateKeyRequest {
    /// Human name (1 to 100 characters).
    pub name: Option<String>,
    /// `public` (default) or `private`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// `POST /v1/organizations/{org}/apiKeys`: creates a key and answers it once, whole, as
/// `"key"`. Errors: 400 for a missing or long name or an unknown type; 403
/// `ORG_LIMIT_REACHED` when the org has `api_keys_per_org` keys not revoked.
pub async fn create_api_key(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> ApiResult<Json<ApiKey>> {
    let (name, kind) = keys::check_new_key(req.name.as_deref(), req.kind.as_deref())?;
    let (rec, key) = keys::create_key(st.store.as_ref(), &st.limits, &c.org, kind, &name).await?;
    Ok(Json(ApiKey {
        key,
        ..ApiKey::of(&rec)
    }))
}

/// `DELETE /v1/organizations/{org}/apiKeys/{id}`: revokes (soft delete); the key fails at
/// once. Errors: 400 for a malformed id, 404 for an unknown one.
pub async fn revoke_api_key(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<KeyRevoked>> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request(format!("invalid key id {id:?}: expected a UUID")))?;
    keys::revoke_key(st.store.as_ref(), &c.org, id)
        .await
        .map_err(|e| ApiError::from(e).with_not_found_code("NOT_FOUND"))?;
    Ok(Json(KeyRevoked {
        id,
        revoked: true,
        status: "OK",
    }))
}

/// `GET /v1/organizations/{org}/daily`: `{"apiKey"}`, the org's Daily API key: its
/// `dailyApiKey` property; for the default org (the operator's) without one, the server's
/// `--daily-api-key`. Another org never reads the server's key (it holds the operator's
/// whole Daily account), though its rooms are made with it: 404 instead.
pub async fn daily_key(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
) -> ApiResult<Json<DailyKey>> {
    let rec = orgs::org_record(&st.store, &c.org).await.map_err(nf)?;
    let own = orgs::daily_api_key_of(&rec, &st.secrets).filter(|k| !k.trim().is_empty());
    if own.is_none() && c.org != crate::serve::DEFAULT_ORG {
        return Err(ApiError::not_found(
            "NOT_FOUND",
            "this org has no Daily API key of its own (its dailyApiKey property); the \
             server's key is not shown to orgs",
        ));
    }
    st.daily
        .key_for(own.as_deref())
        .map(|api_key| Json(DailyKey { api_key }))
        .ok_or_else(|| {
            ApiError::not_found(
                "NOT_FOUND",
                "this server has no Daily API key (cattery serve --daily-api-key)",
            )
        })
}

/// `GET /v1/organizations/{org}/agent-profiles` (`agent profiles list`): the fixed catalog,
/// `agent-1x` to `agent-3x`, with the limits instances get (Cattery has no custom profiles).
pub async fn agent_profiles(State(_st): State<AppState>, OrgAuth(_c): OrgAuth) -> Json<Value> {
    let profiles: Vec<Value> = ["agent-1x", "agent-2x", "agent-3x"]
        .iter()
        .filter_map(|name| {
            let l = crate::model::profile_limits(name)?;
            Some(serde_json::json!({
                "api_name": name,
                "display_name": format!("Agent {}", name.trim_start_matches("agent-")),
                "resources": {"cpu": l.cpu_str, "memory": l.memory_str},
                "custom": false,
                "enabled": true,
            }))
        })
        .collect();
    Json(serde_json::json!({ "agentProfiles": profiles }))
}
