//! Bearer-key authentication (reference §A.1, §A.10).
//!
//! Keys are random; only their SHA-256 is stored and compared in constant time. Each request
//! looks the key up again, so a revoked key fails at once, even one revoked by
//! `cattery keys revoke` from another process.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::model::KeyKind;

/// SHA-256 of a key.
pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A new random key of a kind: prefix plus 40 hex characters (160 bits).
pub fn generate_key(kind: KeyKind) -> String {
    let mut b = [0u8; 20];
    rand::rng().fill_bytes(&mut b);
    format!("{}{}", kind.prefix(), hex::encode(b))
}

/// Creates and stores a new key of `kind` for `org`; returns its record and the key itself
/// (shown once: only its hash is stored, and the whole key for public keys, which the CLI lists).
/// Errors: the store failed.
pub async fn issue_key(
    store: &dyn crate::store::Store,
    org: &str,
    kind: KeyKind,
    name: &str,
) -> Result<(crate::model::ApiKeyRecord, String), crate::store::StoreError> {
    let key = generate_key(kind);
    let rec = crate::model::ApiKeyRecord {
        id: uuid::Uuid::new_v4(),
        org: org.to_string(),
        kind,
        name: name.to_string(),
        prefix: key[..kind.prefix().len() + 6].to_string(),
        created_ms: crate::model::now_ms(),
        revoked_ms: None,
        public_key: (kind == KeyKind::Public).then(|| key.clone()),
    };
    store.insert_key(&rec, &hash_key(&key)).await?;
    Ok((rec, key))
}

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
    let hash = hash_key(key);
    let found = state
        .store
        .find_key(&hash)
        .await
        .map_err(|e| ApiError::from(crate::core::CoreError::Store(e)))?;
    let Some((rec, stored)) = found else {
        return Err(ApiError::unauthorized(
            "Unauthorized / token expired: unknown key",
        ));
    };
    if !bool::from(stored.ct_eq(&hash)) || rec.revoked_ms.is_some() {
        return Err(ApiError::unauthorized(
            "Unauthorized / token expired: key revoked",
        ));
    }
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
