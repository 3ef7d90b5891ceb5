//! API keys and user tokens: issuance, lookup, listing, revocation (reference §A.1, §A.10).
//!
//! Keys are random (a kind prefix plus 160 bits in hex); only their SHA-256 is stored and
//! compared in constant time, and the whole key of a public key (the CLI lists it). Each
//! request looks its key up again, so a revoked key fails at once, even one revoked by
//! `cattery keys revoke` from another process.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::limits::{Kind, OrgLimits};
use super::{CoreError, CoreResult};
use crate::model::{now_ms, ApiKeyRecord, KeyKind};
use crate::store::Store;

/// Longest key name (characters).
pub const MAX_NAME_CHARS: usize = 100;

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
/// (shown once: only its hash is stored, and the whole key for public keys, which the CLI
/// lists). Not limited (the operator's `cattery keys create`). Errors: the store failed.
pub async fn issue_key(
    store: &dyn Store,
    org: &str,
    kind: KeyKind,
    name: &str,
) -> CoreResult<(ApiKeyRecord, String)> {
    Ok(issue_key_within(store, org, kind, name, None).await?)
}

/// [`issue_key`] while `org` holds fewer than `limit` keys not revoked, counted by the store
/// in the same step as the insert. Errors: the store failed (`LimitReached` at the limit).
async fn issue_key_within(
    store: &dyn Store,
    org: &str,
    kind: KeyKind,
    name: &str,
    limit: Option<u32>,
) -> Result<(ApiKeyRecord, String), crate::store::StoreError> {
    let key = generate_key(kind);
    let rec = ApiKeyRecord {
        id: Uuid::new_v4(),
        org: org.to_string(),
        kind,
        name: name.to_string(),
        prefix: key[..kind.prefix().len() + 6].to_string(),
        created_ms: now_ms(),
        revoked_ms: None,
        public_key: (kind == KeyKind::Public).then(|| key.clone()),
    };
    store.insert_key(&rec, &hash_key(&key), limit).await?;
    Ok((rec, key))
}

/// [`issue_key`] for an org's own request (`POST .../apiKeys`): within the org's
/// `api_keys_per_org`. (The operator's `cattery keys create` is not limited.)
/// Errors: 403 `ORG_LIMIT_REACHED` at the limit; the store failed.
pub async fn create_key(
    store: &dyn Store,
    limits: &OrgLimits,
    org: &str,
    kind: KeyKind,
    name: &str,
) -> CoreResult<(ApiKeyRecord, String)> {
    issue_key_within(store, org, kind, name, limits.of(Kind::ApiKeys))
        .await
        .map_err(|e| limits.refusal(org, Kind::ApiKeys, e))
}

/// Checks a key name and type of `POST .../apiKeys` (`type`: `public`, the default, or
/// `private`). Returns the trimmed name and the kind. Errors: 400 naming the field.
pub fn check_new_key(name: Option<&str>, kind: Option<&str>) -> CoreResult<(String, KeyKind)> {
    let name = name
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| CoreError::bad_request("name is required"))?;
    if name.contains('\0') {
        return Err(CoreError::bad_request("name must not contain a NUL byte"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(CoreError::bad_request(format!(
            "name must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    let kind = match kind {
        None | Some("") | Some("public") => KeyKind::Public,
        Some("private") => KeyKind::Private,
        Some(t) => {
            return Err(CoreError::bad_request(format!(
                "type must be public or private, not {t:?}"
            )))
        }
    };
    Ok((name.to_string(), kind))
}

/// Why a presented key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No key has this hash.
    Unknown,
    /// The key was revoked.
    Revoked,
}

/// The live key record for a presented key. `Ok(Err(_))`: unknown or revoked. Errors: the
/// store failed.
pub async fn find_live_key(
    store: &dyn Store,
    key: &str,
) -> CoreResult<Result<ApiKeyRecord, KeyRefusal>> {
    let hash = hash_key(key);
    let Some((rec, stored)) = store.find_key(&hash).await? else {
        return Ok(Err(KeyRefusal::Unknown));
    };
    if !bool::from(stored.ct_eq(&hash)) || rec.revoked_ms.is_some() {
        return Ok(Err(KeyRefusal::Revoked));
    }
    Ok(Ok(rec))
}

/// The org's keys of every kind (tokens included), as the store lists them.
pub async fn list_keys(store: &dyn Store, org: &str) -> CoreResult<Vec<ApiKeyRecord>> {
    Ok(store.list_keys(org, None).await?)
}

/// Whether the org's key `id` of `kind` is still live (not revoked, not gone): what a
/// long-lived request (an event stream) checks now and then, since its key was checked once,
/// at its start. Errors: the store failed.
pub async fn is_live(store: &dyn Store, org: &str, kind: KeyKind, id: Uuid) -> CoreResult<bool> {
    Ok(store
        .list_keys(org, Some(kind))
        .await?
        .iter()
        .any(|k| k.id == id && k.revoked_ms.is_none()))
}

/// Revokes (soft delete) one of the org's keys by id. Errors: 404 for an unknown id.
pub async fn revoke_key(store: &dyn Store, org: &str, id: Uuid) -> CoreResult<()> {
    if store.revoke_key(org, id).await? {
        Ok(())
    } else {
        Err(CoreError::NotFound(format!("API key {id} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys() {
        let k = generate_key(KeyKind::Public);
        assert!(k.starts_with(KeyKind::Public.prefix()));
        assert_eq!(k.len(), KeyKind::Public.prefix().len() + 40);
        assert_ne!(k, generate_key(KeyKind::Public));
        assert_eq!(hash_key(&k).len(), 32);
    }

    #[test]
    fn new_key_fields() {
        assert_eq!(
            check_new_key(Some(" ci "), None).unwrap(),
            ("ci".to_string(), KeyKind::Public)
        );
        assert_eq!(
            check_new_key(Some("x"), Some("private")).unwrap().1,
            KeyKind::Private
        );
        assert!(check_new_key(None, None).is_err());
        assert!(check_new_key(Some("  "), None).is_err());
        assert!(check_new_key(Some(&"n".repeat(101)), None).is_err());
        assert!(check_new_key(Some("x"), Some("token")).is_err());
    }
}
