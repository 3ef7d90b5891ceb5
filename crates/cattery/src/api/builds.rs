//! Builds (reference §A.7), for `pipecat cloud deploy` without an image and `pipecat cloud
//! build list|status|logs`. Each route is served twice, as `/v1/builds...` and
//! `/v1/organizations/{org}/builds...` (the CLI's form); `core::builds` decides.
//!
//! - `POST .../builds/upload-url` `{region?}` → `{uploadId, uploadUrl, uploadFields,
//!   expiresAt}`. The URL is this server's own `POST /v1/builds/uploads/{uploadId}`; the
//!   single-use token rides in `uploadFields` (the CLI sends every field back in its
//!   multipart form, as for an S3 presigned POST), or in `?token=` for a raw `PUT`.
//! - `POST .../builds` `{uploadId, region?, dockerfilePath?}` → 201 `{build, contextHash,
//!   cached: false}`, or 200 with `cached: true` when a build of the same context succeeded.
//! - `GET .../builds?contextHash&region&status&limit&offset` → `{builds, total, limit, offset}`.
//! - `GET .../builds/{id}` → `{build}`; `GET .../builds/{id}/logs?limit` → `{logs: [line]}`.

use std::collections::HashMap;

use axum::extract::{Multipart, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::auth::{OrgAuth, PrivateAuth};
use super::error::ErrorBody;
use super::error::{ApiError, ApiResult};
use super::{ApiJson, ApiPath, AppState};
use crate::core::builds::{UploadSink, LOGS_DEFAULT};
use crate::model::iso_ms;
use crate::store::{BuildFilter, BuildRecord, BuildStatus};
use utoipa::ToSchema;

/// A build on the wire (reference §A.7 `Build`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    id: String,
    organization_id: String,
    status: &'static str,
    region: String,
    context_hash: String,
    dockerfile_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_uri: Option<String>,
    error_message: Option<String>,
    context_size_bytes: i64,
    build_duration_seconds: Option<i64>,
    /// Cattery: which builder made it (`venv`).
    builder: Option<String>,
    started_at: Option<String>,
    completed_at: Option<String>,
    created_at: String,
    updated_at: String,
}

impl Build {
    fn of(b: &BuildRecord) -> Build {
        Build {
            id: b.id.to_string(),
            organization_id: b.org.clone(),
            status: b.status.as_str(),
            region: b.region.clone(),
            context_hash: b.context_hash.clone(),
            dockerfile_path: b.dockerfile_path.clone(),
            image_uri: b
                .artifact
                .clone()
                .filter(|_| b.status == BuildStatus::Success),
            error_message: b.error_message.clone(),
            context_size_bytes: b.context_size,
            build_duration_seconds: b
                .started_ms
                .zip(b.completed_ms)
                .map(|(s, e)| ((e - s).max(0) + 999) / 1000),
            builder: b.builder.clone(),
            started_at: b.started_ms.map(iso_ms),
            completed_at: b.completed_ms.map(iso_ms),
            created_at: iso_ms(b.created_ms),
            updated_at: iso_ms(b.updated_ms),
        }
    }
}

/// `{"build": Build}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OneBuild {
    build: Build,
}

/// `{"build", "contextHash", "cached"}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedBuild {
    build: Build,
    context_hash: String,
    cached: bool,
}

/// `{"builds", "total", "limit", "offset"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildList {
    builds: Vec<Build>,
    total: u64,
    limit: u32,
    offset: u32,
}

/// `{"logs": [line]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildLogs {
    logs: Vec<String>,
}

/// `{"uploadId", "uploadUrl", "uploadFields", "expiresAt"}`.
#[derive(custom_debug::Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadUrl {
    upload_id: String,
    upload_url: String,
    // `{"token": ...}`: `Debug` shows the names alone.
    #[debug(with = crate::redact::map_keys)]
    upload_fields: HashMap<String, String>,
    expires_at: String,
    /// Cattery: the largest context accepted (bytes).
    max_size_bytes: u64,
}

/// Body of `POST .../upload-url`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct UploadUrlRequest {
    /// Accepted; the build's region is given again at create.
    #[allow(dead_code)]
    region: Option<String>,
}

/// Body of `POST .../builds`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateBuildRequest {
    upload_id: Option<String>,
    region: Option<String>,
    dockerfile_path: Option<String>,
}

async fn upload_url(st: &AppState, org: &str, headers: &HeaderMap) -> ApiResult<Json<UploadUrl>> {
    let u = st.builds.new_upload(org)?;
    let base = st.ws.public_url.http_base(headers);
    Ok(Json(UploadUrl {
        upload_id: u.id.to_string(),
        upload_url: format!("{base}/v1/builds/uploads/{}", u.id),
        upload_fields: HashMap::from([("token".to_string(), u.token)]),
        expires_at: iso_ms(u.expires_ms),
        max_size_bytes: st.builds.max_context_bytes(),
    }))
}

/// `POST /v1/builds/upload-url`.
#[utoipa::path(post, path = "/v1/builds/upload-url", request_body = UploadUrlRequest, tag = "builds",
    operation_id = "create_upload_url",
    responses((status = 200, description = "where to upload the build context (one use)", body = UploadUrl),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 429, description = "the org holds build_uploads_per_org upload URLs not yet built", body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn create_upload_url(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    headers: HeaderMap,
    ApiJson(_r): ApiJson<UploadUrlRequest>,
) -> ApiResult<Json<UploadUrl>> {
    upload_url(&st, &c.org, &headers).await
}

/// `POST /v1/organizations/{org}/builds/upload-url`.
pub async fn org_create_upload_url(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    headers: HeaderMap,
    ApiJson(_r): ApiJson<UploadUrlRequest>,
) -> ApiResult<Json<UploadUrl>> {
    upload_url(&st, &c.org, &headers).await
}

fn upload_id(id: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::parse_str(id)
        .map_err(|_| ApiError::not_found("404", "upload not found, expired, or its token is wrong"))
}

/// Writes every chunk of `stream` to `sink`, completing or aborting the upload.
async fn receive<S, E>(st: &AppState, mut sink: UploadSink, mut stream: S) -> ApiResult<()>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    while let Some(chunk) = stream.next().await {
        let r = match chunk {
            Ok(c) => sink.write(&c).await.map_err(ApiError::from),
            Err(e) => Err(ApiError::bad_request(format!(
                "could not read the upload: {e}"
            ))),
        };
        if let Err(e) = r {
            st.builds.abort_upload(sink);
            return Err(e);
        }
    }
    st.builds.finish_upload(sink).await?;
    Ok(())
}

/// Longest `token` field read from an upload form (a token is 64 hex digits): the upload
/// route has no body limit, and the field is read before any token is checked, so a longer
/// one is refused as it arrives rather than held in memory whole.
const MAX_TOKEN_FIELD: usize = 1024;

/// The text of an upload form's `token` field. Errors: 400 past [`MAX_TOKEN_FIELD`] bytes,
/// not UTF-8, or a broken form.
async fn token_field(mut field: axum::extract::multipart::Field<'_>) -> ApiResult<String> {
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("bad token field: {e}")))?
    {
        if buf.len() + chunk.len() > MAX_TOKEN_FIELD {
            return Err(ApiError::bad_request(format!(
                "the upload form's token field is longer than {MAX_TOKEN_FIELD} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf)
        .map_err(|_| ApiError::bad_request("the upload form's token field is not UTF-8"))
}

/// `POST /v1/builds/uploads/{uploadId}`: the CLI's presigned-POST-style multipart upload
/// (`token` field, then the `file` field). No bearer key: the single-use token is the
/// authorization. 204 on success, as S3 answers.
pub async fn upload_multipart(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    q: Query<HashMap<String, String>>,
    mut form: Multipart,
) -> ApiResult<StatusCode> {
    let id = upload_id(&id)?;
    let mut token = q.get("token").cloned();
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(format!("bad multipart upload: {e}")))?
            .ok_or_else(|| ApiError::bad_request("the upload form has no `file` field"))?;
        match field.name() {
            Some("token") => token = Some(token_field(field).await?),
            Some("file") => {
                let token = token.ok_or_else(|| {
                    ApiError::unauthorized("the upload form has no `token` field before `file`")
                })?;
                let sink = st.builds.begin_upload(id, &token).await?;
                receive(&st, sink, Box::pin(field)).await?;
                return Ok(StatusCode::NO_CONTENT);
            }
            _ => {}
        }
    }
}

/// `PUT /v1/builds/uploads/{uploadId}?token=`: the body is the context. 204 on success.
pub async fn upload_raw(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    q: Query<HashMap<String, String>>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    let id = upload_id(&id)?;
    let token = q
        .get("token")
        .ok_or_else(|| ApiError::unauthorized("missing ?token= of the upload URL"))?;
    let sink = st.builds.begin_upload(id, token).await?;
    receive(&st, sink, Box::pin(body.into_data_stream())).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create(
    st: &AppState,
    org: &str,
    r: CreateBuildRequest,
) -> ApiResult<(StatusCode, Json<CreatedBuild>)> {
    let upload = r
        .upload_id
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ApiError::bad_request("uploadId is required"))?;
    let (b, cached) = st
        .builds
        .create(
            &st.defaults,
            org,
            &upload,
            r.region.as_deref(),
            r.dockerfile_path.as_deref(),
        )
        .await?;
    let status = if cached {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(CreatedBuild {
            context_hash: b.context_hash.clone(),
            build: Build::of(&b),
            cached,
        }),
    ))
}

/// `POST /v1/builds`.
#[utoipa::path(post, path = "/v1/builds", request_body = CreateBuildRequest, tag = "builds",
    operation_id = "create_build",
    responses((status = 201, description = "a new build of the uploaded context", body = CreatedBuild),
              (status = 200, description = "a successful build of the same context (cached)", body = CreatedBuild),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, description = "ORG_LIMIT_REACHED: the org keeps builds_kept_per_org builds", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 429, description = "the org has builds_per_org builds pending or building", body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn create_build(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiJson(r): ApiJson<CreateBuildRequest>,
) -> ApiResult<(StatusCode, Json<CreatedBuild>)> {
    create(&st, &c.org, r).await
}

/// `POST /v1/organizations/{org}/builds`.
pub async fn org_create_build(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiJson(r): ApiJson<CreateBuildRequest>,
) -> ApiResult<(StatusCode, Json<CreatedBuild>)> {
    create(&st, &c.org, r).await
}

fn num<T: std::str::FromStr>(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<T>> {
    q.get(k)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{k} must be a non-negative integer")))
        })
        .transpose()
}

async fn list(st: &AppState, org: &str, q: &HashMap<String, String>) -> ApiResult<Json<BuildList>> {
    let text = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let status = match text("status") {
        None => None,
        Some(s) => Some(BuildStatus::parse(&s).ok_or_else(|| {
            ApiError::bad_request(
                "status must be one of pending, building, success, failed, timeout",
            )
        })?),
    };
    let limit: u32 = num(q, "limit")?.unwrap_or(0);
    let f = BuildFilter {
        context_hash: text("contextHash"),
        region: text("region"),
        status,
        dockerfile_path: text("dockerfilePath"),
        limit,
        offset: num(q, "offset")?.unwrap_or(0),
    };
    let offset = f.offset;
    let (list, total) = st.builds.list(org, f).await?;
    Ok(Json(BuildList {
        builds: list.iter().map(Build::of).collect(),
        total,
        limit: if limit == 0 {
            crate::core::builds::LIST_DEFAULT
        } else {
            limit.min(crate::core::builds::LIST_MAX)
        },
        offset,
    }))
}

/// `GET /v1/builds`.
#[utoipa::path(get, path = "/v1/builds", tag = "builds", operation_id = "list_builds",
    params(("contextHash" = Option<String>, Query, description = "only builds of this context"),
           ("region" = Option<String>, Query, description = "only builds of this region"),
           ("status" = Option<String>, Query, description = "pending, building, success, failed or timeout"),
           ("dockerfilePath" = Option<String>, Query, description = "only builds with this Dockerfile path"),
           ("limit" = Option<u32>, Query, description = "page size"),
           ("offset" = Option<u32>, Query, description = "first row")),
    responses((status = 200, body = BuildList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn list_builds(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<BuildList>> {
    list(&st, &c.org, &q).await
}

/// `GET /v1/organizations/{org}/builds`.
pub async fn org_list_builds(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<BuildList>> {
    list(&st, &c.org, &q).await
}

/// `GET /v1/builds/{id}`.
#[utoipa::path(get, path = "/v1/builds/{id}", tag = "builds", operation_id = "get_build",
    params(("id" = String, Path, description = "Build id")),
    responses((status = 200, body = OneBuild), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn get_build(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<OneBuild>> {
    let b = st.builds.get(&c.org, &id).await?;
    Ok(Json(OneBuild {
        build: Build::of(&b),
    }))
}

/// `GET /v1/organizations/{org}/builds/{id}`.
pub async fn org_get_build(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<OneBuild>> {
    get_build(State(st), PrivateAuth(c), ApiPath(id)).await
}

async fn logs(
    st: &AppState,
    org: &str,
    id: &str,
    q: &HashMap<String, String>,
) -> ApiResult<Json<BuildLogs>> {
    let limit: usize = num(q, "limit")?.unwrap_or(LOGS_DEFAULT);
    Ok(Json(BuildLogs {
        logs: st.builds.logs(org, id, limit).await?,
    }))
}

/// `GET /v1/builds/{id}/logs`.
#[utoipa::path(get, path = "/v1/builds/{id}/logs", tag = "builds", operation_id = "build_logs",
    params(("id" = String, Path, description = "Build id"),
           ("limit" = Option<usize>, Query, description = "at most this many of the last lines")),
    responses((status = 200, body = BuildLogs), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn build_logs(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<BuildLogs>> {
    logs(&st, &c.org, &id, &q).await
}

/// `GET /v1/organizations/{org}/builds/{id}/logs`.
pub async fn org_build_logs(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, id)): ApiPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<BuildLogs>> {
    logs(&st, &c.org, &id, &q).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_upload_urls_debug_hides_its_token() {
        let u = super::UploadUrl {
            upload_id: "u1".into(),
            upload_url: "http://h/v1/builds/uploads/u1".into(),
            upload_fields: std::collections::HashMap::from([(
                "token".to_string(),
                "upl-token-never-printed".to_string(),
            )]),
            expires_at: String::new(),
            max_size_bytes: 1,
        };
        let text = format!("{u:?}");
        assert!(
            !text.contains("upl-token") && text.contains("\"token\""),
            "{text}"
        );
    }
}
