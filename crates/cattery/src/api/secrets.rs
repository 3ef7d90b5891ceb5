//! Secret sets and image pull secrets over HTTP (reference §A.6): the documented private form
//! `/v1/secrets...` and the CLI's `/v1/organizations/{org}/secrets...` share these handlers.
//!
//! | call | answer |
//! |---|---|
//! | `GET .../secrets[?region=]` | `{"sets": [{"name", "type", "region", "status"}]}` |
//! | `GET .../secrets/{set}` | `{"name", "type", "region", "status", "secrets": [{"fieldName"}]}`; 400 code `"400"` for an image pull secret |
//! | `PUT .../secrets/{set}` | `202 {"status": "OK", "region"}`; body: see [`UpsertRequest`] |
//! | `DELETE .../secrets/{set}` | `{"status": "OK"}` |
//! | `DELETE .../secrets/{set}/{key}` | `{"status": "OK"}` |
//!
//! Values are never returned. Missing sets and keys answer 404 `NOT_FOUND`.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::auth::{OrgAuth, PrivateAuth};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::schema::{SecretField, SecretSet, SecretSetList, SecretUpserted, StatusOk};
use super::{ApiJson, ApiPath, AppState};
use crate::core::orgs;
use crate::core::secrets::{self, UpsertRequest};

fn nf(e: crate::core::CoreError) -> ApiError {
    ApiError::from(e).with_not_found_code("NOT_FOUND")
}

async fn list_in(
    st: &AppState,
    org: &str,
    q: &HashMap<String, String>,
) -> ApiResult<Json<SecretSetList>> {
    let sets = secrets::list(&st.store, org, q.get("region").map(String::as_str))
        .await
        .map_err(nf)?;
    Ok(Json(SecretSetList {
        sets: sets.iter().map(SecretSet::of).collect(),
    }))
}

async fn get_in(st: &AppState, org: &str, name: &str) -> ApiResult<Json<SecretSet>> {
    let set = secrets::get(&st.store, org, name).await.map_err(nf)?;
    let fields = set
        .keys
        .iter()
        .map(|k| SecretField {
            field_name: k.clone(),
        })
        .collect();
    Ok(Json(SecretSet {
        secrets: Some(fields),
        ..SecretSet::of(&set)
    }))
}

async fn put_in(
    st: &AppState,
    org: &str,
    name: &str,
    req: &UpsertRequest,
) -> ApiResult<(StatusCode, Json<SecretUpserted>)> {
    let defaults = orgs::org_defaults(&st.store, &st.defaults, org)
        .await
        .map_err(nf)?;
    let region = secrets::upsert(
        &st.store,
        &st.limits,
        &st.secrets,
        &defaults,
        org,
        name,
        req,
    )
    .await
    .map_err(nf)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(SecretUpserted {
            region,
            status: "OK",
        }),
    ))
}

async fn delete_set_in(st: &AppState, org: &str, name: &str) -> ApiResult<Json<StatusOk>> {
    secrets::delete_set(&st.store, org, name)
        .await
        .map_err(nf)?;
    Ok(Json(StatusOk::OK))
}

async fn delete_key_in(
    st: &AppState,
    org: &str,
    name: &str,
    key: &str,
) -> ApiResult<Json<StatusOk>> {
    secrets::delete_key(&st.store, org, name, key)
        .await
        .map_err(nf)?;
    Ok(Json(StatusOk::OK))
}

/// List secret sets.
#[utoipa::path(get, path = "/v1/secrets", tag = "secrets", operation_id = "list_secret_sets",
    params(("region" = Option<String>, Query, description = "only sets of this region")),
    responses((status = 200, description = "{\"sets\": [{name, type, region, status}]}", body = SecretSetList),
              (status = 401, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn list_secret_sets(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<SecretSetList>> {
    list_in(&st, &c.org, &q).await
}

/// Get a secret set's key names.
#[utoipa::path(get, path = "/v1/secrets/{set_name}", tag = "secrets", operation_id = "get_secret_set",
    params(("set_name" = String, Path, description = "Secret set name")),
    responses((status = 200, description = "{name, type, region, status, secrets: [{fieldName}]}", body = SecretSet),
              (status = 400, description = "an image pull secret (code \"400\")", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn get_secret_set(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<SecretSet>> {
    get_in(&st, &c.org, &name).await
}

/// Create or update a secret set or an image pull secret.
#[utoipa::path(put, path = "/v1/secrets/{set_name}", tag = "secrets", operation_id = "upsert_secret_set",
    request_body = UpsertRequest,
    params(("set_name" = String, Path, description = "Secret set name")),
    responses((status = 202, description = "{\"status\": \"OK\", \"region\"}", body = SecretUpserted),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, description = "ORG_LIMIT_REACHED: a new set past secret_sets_per_org", body = ErrorBody),
              (status = 409, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn put_secret_set(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<UpsertRequest>,
) -> ApiResult<(StatusCode, Json<SecretUpserted>)> {
    put_in(&st, &c.org, &name, &req).await
}

/// Delete a secret set.
#[utoipa::path(delete, path = "/v1/secrets/{set_name}", tag = "secrets", operation_id = "delete_secret_set",
    params(("set_name" = String, Path, description = "Secret set name")),
    responses((status = 200, description = "{\"status\": \"OK\"}", body = StatusOk),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn delete_secret_set(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<StatusOk>> {
    delete_set_in(&st, &c.org, &name).await
}

/// Delete one key of a secret set.
#[utoipa::path(delete, path = "/v1/secrets/{set_name}/{secret_key}", tag = "secrets",
    operation_id = "delete_secret",
    params(("set_name" = String, Path, description = "Secret set name"),
           ("secret_key" = String, Path, description = "Key")),
    responses((status = 200, description = "{\"status\": \"OK\"}", body = StatusOk),
              (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn delete_secret(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath((name, key)): ApiPath<(String, String)>,
) -> ApiResult<Json<StatusOk>> {
    delete_key_in(&st, &c.org, &name, &key).await
}

/// `GET /v1/organizations/{org}/secrets`.
pub async fn org_list_secret_sets(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<SecretSetList>> {
    list_in(&st, &c.org, &q).await
}

/// `GET /v1/organizations/{org}/secrets/{set}`.
pub async fn org_get_secret_set(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<SecretSet>> {
    get_in(&st, &c.org, &name).await
}

/// `PUT /v1/organizations/{org}/secrets/{set}`.
pub async fn org_put_secret_set(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<UpsertRequest>,
) -> ApiResult<(StatusCode, Json<SecretUpserted>)> {
    put_in(&st, &c.org, &name, &req).await
}

/// `DELETE /v1/organizations/{org}/secrets/{set}`.
pub async fn org_delete_secret_set(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<StatusOk>> {
    delete_set_in(&st, &c.org, &name).await
}

/// `DELETE /v1/organizations/{org}/secrets/{set}/{key}`.
pub async fn org_delete_secret(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<StatusOk>> {
    delete_key_in(&st, &c.org, &name, &key).await
}
