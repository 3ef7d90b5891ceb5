//! Bearer-key authentication (reference §A.1, §A.10): the extractors that turn a key into a
//! [`Caller`]. Keys themselves (issuance, lookup, revocation) are `core::keys`.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;
use crate::core::keys::{self, KeyRefusal};
use crate::model::KeyKind;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Org of the key.
    pub org: String,
    /// Kind of key.
    pub kind: KeyKind,
    /// Id of the key or token.
    pub key_id: uuid::Uuid,
    /// Name of the key or token.
    pub key_name: String,
}

async fn authenticate(
    parts: &Parts,
    state: &AppState,
    allowed: &[KeyKind],
) -> Result<Caller, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized("Unauthorized: missing Authorization: Bearer <key>")
        })?;
    let key = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("Unauthorized: expected Authorization: Bearer <key>")
        })?;
    let rec = match keys::find_live_key(state.store.as_ref(), key).await? {
        Ok(rec) => rec,
        Err(KeyRefusal::Unknown) => {
            return Err(ApiError::unauthorized(
                "Unauthorized / token expired: unknown key",
            ))
        }
        Err(KeyRefusal::Revoked) => {
            return Err(ApiError::unauthorized(
                "Unauthorized / token expired: key revoked",
            ))
        }
    };
    if !allowed.contains(&rec.kind) {
        let want = allowed
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(" or ");
        return Err(ApiError::unauthorized(format!(
            "Unauthorized: this route needs a {want} key, not a {} key",
            rec.kind.as_str()
        )));
    }
    Ok(Caller {
        org: rec.org,
        kind: rec.kind,
        key_id: rec.id,
        key_name: rec.name,
    })
}

/// A private key (or a user token): the documented private API.
pub struct PrivateAuth(pub Caller);
/// A public key: start sessions and the session proxy.
pub struct PublicAuth(pub Caller);

impl FromRequestParts<AppState> for PrivateAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state, &[KeyKind::Private, KeyKind::Token])
            .await
            .map(PrivateAuth)
    }
}

impl FromRequestParts<AppState> for PublicAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state, &[KeyKind::Public])
            .await
            .map(PublicAuth)
    }
}

/// A user token or a private key on the org-scoped surface `/v1/organizations/{org}/...`
/// (reference §A.2). The `{org}` path segment must be the caller's org; any other org answers
/// 404 `NOT_FOUND`, so a caller cannot learn which orgs exist. Public keys get 401.
pub struct OrgAuth(pub Caller);

impl FromRequestParts<AppState> for OrgAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state, &[KeyKind::Token, KeyKind::Private]).await?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found("NOT_FOUND", "Not found"))?;
        let org = params
            .iter()
            .find(|(k, _)| *k == "org")
            .map(|(_, v)| v.to_string());
        match org {
            Some(o) if o == caller.org => Ok(OrgAuth(caller)),
            Some(o) => Err(ApiError::not_found(
                "NOT_FOUND",
                format!("organization {o} not found"),
            )),
            None => Ok(OrgAuth(caller)),
        }
    }
}
