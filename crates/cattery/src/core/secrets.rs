//! Secret sets and image pull secrets: validation, sealing at rest, and injection into
//! instances (reference §A.6 and §D).
//!
//! - **At rest.** Every value is sealed with XChaCha20-Poly1305 (the `chacha20poly1305`
//!   crate) under a 32-byte key kept in `<data-dir>/secrets.key` (created with mode 0600 on
//!   first start, once the start is not refused). Each value has a fresh random 24-byte nonce, and the associated data binds
//!   it to its org, set and key, so a sealed value copied to another row does not open. No
//!   route ever returns a value.
//! - **When values reach instances.** A deployment snapshots the bound set's sealed values
//!   when it is created (the store does it in the same transaction, table
//!   `deployment_secrets`). Every instance of that deployment, warm or cold, before or after
//!   a server restart, gets exactly the snapshot. A changed value in an already-bound set is
//!   not a new deployment (reference §A.3 "Update"), so it reaches instances only after a
//!   redeploy that creates one: `forceRedeploy: true` (CLI: `deploy --force`) or any
//!   run-affecting change. Warm and cold instances therefore never disagree.
//! - **Provisioning** is synchronous here: a set is `ready` as soon as the upsert answers
//!   (the reference's `pending` state never shows).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::Deserialize;
use utoipa::ToSchema;

use super::env::reserved_for_secrets as reserved_key;
use super::limits::{Kind, OrgLimits};
use super::orgs::AgentDefaults;
use super::session::SecretSource;
use super::{CoreError, CoreResult};
use crate::model::{now_ms, DeploymentRecord};
use crate::store::{SealedValue, SecretSetKind, SecretSetRecord, Store, StoreError};

/// File name of the sealing key inside the data directory.
pub const KEY_FILE: &str = "secrets.key";
/// Largest secret value accepted (bytes).
pub const MAX_VALUE_BYTES: usize = 32 * 1024;
/// Most keys one set may hold (all of them become environment variables of one process).
pub const MAX_KEYS_PER_SET: usize = 500;

/// Seals and opens secret values. Cheap to share behind an `Arc`.
pub struct SecretCipher {
    aead: XChaCha20Poly1305,
    /// A key made for a data dir that had none, and where to write it: written by
    /// [`SecretCipher::save_new_key`] once the start is not refused.
    unsaved: parking_lot::Mutex<Option<(std::path::PathBuf, [u8; 32])>>,
}

impl std::fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCipher(..)")
    }
}

fn aad(org: &str, set: &str, key: &str) -> Vec<u8> {
    format!("cattery-secret-v1\0{org}\0{set}\0{key}").into_bytes()
}

impl SecretCipher {
    /// A cipher over a raw 32-byte key.
    pub fn from_key(key: &[u8; 32]) -> Self {
        SecretCipher {
            aead: XChaCha20Poly1305::new(key.into()),
            unsaved: parking_lot::Mutex::new(None),
        }
    }

    /// Loads the key from `path`, a file that must exist (`--secrets-key-file`: the key every
    /// node of a cluster shares, docs/secrets.md).
    ///
    /// Errors: the file cannot be read, is readable by group or others, or is not exactly 32
    /// bytes.
    pub fn load_file(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| {
            anyhow::anyhow!("cannot read the secrets key file {}: {e}", path.display())
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            anyhow::bail!(
                "the secrets key file {} is readable by others; `chmod 600` it",
                path.display()
            );
        }
        let bytes = std::fs::read(path)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "the secrets key file {} must hold exactly 32 bytes (it holds {}); make one with \
                 `head -c 32 /dev/urandom > FILE`",
                path.display(),
                bytes.len()
            )
        })?;
        Ok(Self::from_key(&key))
    }

    /// Loads `<data_dir>/secrets.key`, or, when there is none, makes a new key (32 random
    /// bytes) that is written only by [`SecretCipher::save_new_key`]: a start refused before
    /// that (a store whose secrets another key sealed, a lost key) leaves the data dir as it
    /// found it. An existing file readable by group or others is tightened to 0600 with a
    /// warning.
    ///
    /// Errors: the file cannot be read, or is not exactly 32 bytes.
    pub fn load_or_new(data_dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let path = data_dir.join(KEY_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                let c = Self::from_key(&key);
                *c.unsaved.lock() = Some((path, key));
                return Ok(c);
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot read the secrets key file {}: {e}",
                    path.display()
                ))
            }
        };
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "secrets key file was readable by others; setting mode 0600");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let bytes = std::fs::read(&path)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "the secrets key file {} must hold exactly 32 bytes (it holds {}); restore it from a backup \
                 (without it, stored secret values cannot be read)",
                path.display(),
                bytes.len()
            )
        })?;
        Ok(Self::from_key(&key))
    }

    /// Writes the key [`SecretCipher::load_or_new`] made (mode 0600, created exclusively so
    /// two servers cannot race, synced with its directory); nothing when it was loaded.
    ///
    /// Errors: the file cannot be written, or appeared meanwhile.
    pub fn save_new_key(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut unsaved = self.unsaved.lock();
        let Some((path, key)) = unsaved.as_ref() else {
            return Ok(());
        };
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(key)?;
            f.sync_all()?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            anyhow::anyhow!("cannot create the secrets key file {}: {e}", path.display())
        })?;
        *unsaved = None;
        Ok(())
    }

    /// Seals `value` for (org, set, key).
    pub fn seal(&self, org: &str, set: &str, key: &str, value: &str) -> SealedValue {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad(org, set, key),
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail for inputs under 256 GiB");
        SealedValue {
            key: key.to_string(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// A value sealed with this key for no secret (nonce, then ciphertext): each node writes
    /// one in its heartbeat, and another node opens it to check that both have one key
    /// ([`SecretCipher::opens_check`]).
    pub fn seal_check(&self) -> Vec<u8> {
        let v = self.seal("", KEY_CHECK_SET, "", KEY_CHECK_TEXT);
        [v.nonce, v.ciphertext].concat()
    }

    /// Whether `check` ([`SecretCipher::seal_check`]) was sealed with this key.
    pub fn opens_check(&self, check: &[u8]) -> bool {
        if check.len() < 24 {
            return false;
        }
        let (nonce, ciphertext) = check.split_at(24);
        let v = SealedValue {
            key: String::new(),
            nonce: nonce.to_vec(),
            ciphertext: ciphertext.to_vec(),
        };
        self.open("", KEY_CHECK_SET, &v).as_deref() == Ok(KEY_CHECK_TEXT)
    }

    /// Opens a value sealed for (org, set, `v.key`).
    ///
    /// Errors: wrong key file, tampered row, or a row moved to another org/set/key.
    pub fn open(&self, org: &str, set: &str, v: &SealedValue) -> Result<String, String> {
        if v.nonce.len() != 24 {
            return Err(format!("secret {} of set {set}: bad nonce", v.key));
        }
        let plain = self
            .aead
            .decrypt(
                XNonce::from_slice(&v.nonce),
                Payload {
                    msg: &v.ciphertext,
                    aad: &aad(org, set, &v.key),
                },
            )
            .map_err(|_| {
                format!(
                    "secret {} of set {set} cannot be decrypted (was {KEY_FILE} replaced?)",
                    v.key
                )
            })?;
        String::from_utf8(plain).map_err(|_| format!("secret {} of set {set} is not UTF-8", v.key))
    }
}

/// The (set, text) of [`SecretCipher::seal_check`], sealed for the org "" (no org has that
/// name), so no secret value can be taken for it, nor it for one.
const KEY_CHECK_SET: &str = "cattery.node-key-check";
const KEY_CHECK_TEXT: &str = "cattery secrets key check";

/// Checks that `cipher` opens the secret values already in `store`: the first value found
/// (orgs and sets in the store's order) is opened. Nodes on one database must share one
/// secrets key; a node started with another key would fail every secret it reads and, worse,
/// seal new values that the other nodes cannot open. Nothing stored yet: nothing to check.
///
/// Errors: the value does not open (another key), or the store cannot be read.
pub async fn check_key_opens_stored(
    store: &dyn crate::store::Store,
    cipher: &SecretCipher,
) -> anyhow::Result<()> {
    for org in store.list_orgs().await? {
        for set in store.list_secret_sets(&org).await? {
            let Some(v) = store
                .secret_values(&org, &set.name)
                .await?
                .into_iter()
                .next()
            else {
                continue;
            };
            return cipher.open(&org, &set.name, &v).map(|_| ()).map_err(|_| {
                anyhow::anyhow!(
                    "this node's secrets key does not open the secrets already in the database \
                     (secret {} of set {} of org {org} was sealed with another key): give it the \
                     key they were sealed with (the data dir's {KEY_FILE} from a backup, or the \
                     --secrets-key-file every node shares); a server given a new key would \
                     fail every start of an agent with a secret set",
                    v.key,
                    set.name
                )
            });
        }
    }
    Ok(())
}

/// Opens every sealed value with the old key and seals it with the new one
/// ([`crate::store::SecretStore::reseal_all`]).
struct Rotation {
    old: SecretCipher,
    new: SecretCipher,
}

impl crate::store::Resealer for Rotation {
    fn reseal(
        &self,
        of: crate::store::SealedOf<'_>,
        v: &SealedValue,
    ) -> Result<SealedValue, String> {
        use crate::store::SealedOf;
        let (org, set, what) = match of {
            SealedOf::SecretSet { org, set } => (
                org,
                set.to_string(),
                format!("secret {} of set {set}", v.key),
            ),
            SealedOf::Deployment { org, set } => (
                org,
                set.to_string(),
                format!("secret {} of a deployment's snapshot of set {set}", v.key),
            ),
            SealedOf::Webhook { org, id } => (
                org,
                super::webhooks::sealed_as(id),
                format!("the signing secret of webhook endpoint {id}"),
            ),
        };
        let plain = self.old.open(org, &set, v).map_err(|_| {
            format!("{what} of org {org} does not open with the current secrets key")
        })?;
        Ok(self.new.seal(org, &set, &v.key, &plain))
    }

    fn reseal_properties(
        &self,
        org: &str,
        props: &serde_json::Value,
    ) -> Result<Option<serde_json::Value>, String> {
        use super::orgs::{open_sealed_property, sealed_property};
        let Some(obj) = props.as_object() else {
            return Ok(None);
        };
        let mut out = obj.clone();
        let mut changed = false;
        for (name, v) in obj {
            // A sealed property is `{"nonce", "ciphertext"}` (`orgs::sealed_property`).
            if v.get("nonce").is_none() || v.get("ciphertext").is_none() {
                continue;
            }
            let plain = open_sealed_property(org, name, v, &self.old).ok_or_else(|| {
                format!(
                    "sealed property {name} of org {org} does not open with the current secrets key"
                )
            })?;
            out.insert(name.clone(), sealed_property(org, name, &plain, &self.new));
            changed = true;
        }
        Ok(changed.then_some(serde_json::Value::Object(out)))
    }

    fn key_check(&self) -> Vec<u8> {
        self.new.seal_check()
    }
}

/// Re-seals every secret value in `store` (secret sets, image pull secrets, deployments'
/// snapshots, webhook secrets, sealed org properties) from `old` to `new`, and the nodes' key
/// checks, in one transaction: a value that does not open with `old` fails the whole
/// rotation and nothing changes. For `cattery secrets-key rotate`, with no server running.
/// Returns how many values were re-sealed.
///
/// Errors: a value does not open with `old` (naming it, never its value); the store fails.
pub async fn rotate_key(
    store: &dyn Store,
    old: SecretCipher,
    new: SecretCipher,
) -> anyhow::Result<u64> {
    store
        .reseal_all(Arc::new(Rotation { old, new }))
        .await
        .map_err(|e| match e {
            StoreError::Invalid(m) => anyhow::anyhow!(
                "{m}: nothing was changed (is the current key the one the server runs with?)"
            ),
            e => anyhow::anyhow!("re-sealing the secrets failed, nothing was changed: {e}"),
        })
}

/// Validates a set name: `^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`,
/// 3 to 63 characters (DNS style, reference §A.6).
pub fn valid_set_name(name: &str) -> bool {
    if !(3..=63).contains(&name.len()) {
        return false;
    }
    name.split('.').all(|label| {
        let b = label.as_bytes();
        let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        !b.is_empty()
            && edge(b[0])
            && edge(b[b.len() - 1])
            && b.iter().all(|&c| edge(c) || c == b'-')
    })
}

/// Validates a secret key: `[a-zA-Z0-9_-]`, 1 to 64 characters (reference §A.6).
pub fn valid_secret_key(key: &str) -> bool {
    (1..=64).contains(&key.len())
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn bad(msg: impl Into<String>) -> CoreError {
    CoreError::bad_request(msg)
}

fn check_name(name: &str) -> CoreResult<()> {
    if valid_set_name(name) {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid secret set name {name:?}: use 3 to 63 lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit"
        )))
    }
}

fn check_pair(key: &str, value: &str) -> CoreResult<()> {
    if !valid_secret_key(key) {
        return Err(bad(format!(
            "invalid secret key {key:?}: use 1 to 64 characters from [a-zA-Z0-9_-]"
        )));
    }
    if reserved_key(key) {
        return Err(bad(format!(
            "secret key {key} is reserved: the platform sets PORT, TMPDIR and CATTERY_* for every instance"
        )));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(bad(format!(
            "the value of {key} is {} bytes; the limit is {MAX_VALUE_BYTES}",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(bad(format!(
            "the value of {key} contains a NUL byte, which an environment variable cannot hold"
        )));
    }
    Ok(())
}

/// One pair of the documented upsert form.
#[derive(custom_debug::Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretPair {
    /// Key (the environment variable name).
    pub secret_key: String,
    /// Value, kept exactly (spaces, quotes, `=`).
    #[debug(with = crate::redact::hidden)]
    pub secret_value: String,
}

/// Body of `PUT /v1/secrets/{set}` and `PUT /v1/organizations/{org}/secrets/{set}`. Three
/// forms are accepted (reference §A.6 "Upsert"):
///
/// 1. documented: `{"secrets": [{"secretKey", "secretValue"}, ...], "region"?}`;
/// 2. the CLI's `secrets set`, one key per request:
///    `{"name", "isImagePullSecret": false, "secretKey", "secretValue", "region"?}`;
/// 3. image pull secret: `{"isImagePullSecret": true, "host", "secretValue", "region"?}`,
///    `secretValue` being base64 of `user:token`.
///
/// Forms 1 and 2 add or overwrite the given keys and keep the others; form 3 replaces the
/// credential.
#[derive(custom_debug::Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpsertRequest {
    /// Set name; when given it must equal the name in the path.
    pub name: Option<String>,
    /// Region (default: the org's `defaultRegion`); fixed once the set exists.
    pub region: Option<String>,
    /// `true` for an image pull secret.
    pub is_image_pull_secret: Option<bool>,
    /// Documented form: the pairs to add or overwrite (at least one).
    pub secrets: Option<Vec<SecretPair>>,
    /// Flat form: one key.
    pub secret_key: Option<String>,
    /// Flat form: its value; image pull form: base64 credentials.
    #[debug(with = crate::redact::hidden_some)]
    pub secret_value: Option<String>,
    /// Image pull form: registry host, e.g. `https://index.docker.io/v1/`.
    pub host: Option<String>,
}

/// Creates or updates a set; returns the set's region (answered as
/// `202 {"status":"OK","region":...}`).
///
/// `defaults` must already carry the org's `defaultRegion` (see `core::orgs`).
///
/// Errors (400 unless noted): invalid name, key or value; no pairs; `name` differing from the
/// path; unknown region; a region or kind change of an existing set; an image pull secret
/// without `host` or with a `secretValue` that is not base64; more than
/// [`MAX_KEYS_PER_SET`] keys; 409 when the set changed kind or region concurrently; 403
/// `ORG_LIMIT_REACHED` for a new set past the org's `secret_sets_per_org`.
pub async fn upsert(
    store: &Arc<dyn Store>,
    limits: &OrgLimits,
    cipher: &SecretCipher,
    defaults: &AgentDefaults,
    org: &str,
    name: &str,
    r: &UpsertRequest,
) -> CoreResult<String> {
    check_name(name)?;
    if let Some(n) = r.name.as_deref().filter(|n| !n.is_empty()) {
        if n != name {
            return Err(bad(format!(
                "name {n:?} in the body differs from {name:?} in the path"
            )));
        }
    }
    let existing = store.get_secret_set(org, name).await?;
    let region = match (&r.region, &existing) {
        (Some(want), Some(set)) if !want.is_empty() && *want != set.region => {
            return Err(bad(format!(
                "secret set {name} is in region {}; a set's region cannot change",
                set.region
            )))
        }
        (_, Some(set)) => set.region.clone(),
        (Some(want), None) if !want.is_empty() => want.clone(),
        _ => defaults.default_region.clone(),
    };
    if existing.is_none() && !defaults.regions.contains(&region) {
        return Err(bad(format!(
            "region {region} is not available; available: {}",
            defaults.regions.join(", ")
        )));
    }
    let image_pull = r.is_image_pull_secret.unwrap_or(false);
    let kind = if image_pull {
        SecretSetKind::ImagePullSecret
    } else {
        SecretSetKind::Secret
    };
    if let Some(set) = &existing {
        if set.kind != kind {
            return Err(bad(format!(
                "secret set {name} is of type {}; a set cannot change type",
                set.kind.as_str()
            )));
        }
    }
    let now = now_ms();
    let mut rec = SecretSetRecord {
        org: org.to_string(),
        name: name.to_string(),
        kind,
        region: region.clone(),
        host: None,
        created_ms: now,
        updated_ms: now,
        keys: Vec::new(),
    };
    let (values, replace_all) = if image_pull {
        let (value, host) = image_pull_value(cipher, org, name, r)?;
        rec.host = Some(host);
        (vec![value], true)
    } else {
        (
            sealed_pairs(cipher, org, name, r, existing.as_ref())?,
            false,
        )
    };
    // A new set must fit under the org's `secret_sets_per_org`: the store counts and writes in
    // one step (it knows whether the set is new by then).
    match store
        .upsert_secret_set(&rec, &values, replace_all, limits.of(Kind::SecretSets))
        .await
    {
        Err(StoreError::Conflict) => Err(CoreError::Conflict(format!(
            "secret set {name} was changed concurrently; retry"
        ))),
        r => r
            .map(|_| region)
            .map_err(|e| limits.refusal(org, Kind::SecretSets, e)),
    }
}

/// The sealed credential and the normalised host of an image pull secret upsert.
/// Errors: 400 for a missing host or value, a value that is not base64, or one too long.
fn image_pull_value(
    cipher: &SecretCipher,
    org: &str,
    name: &str,
    r: &UpsertRequest,
) -> CoreResult<(SealedValue, String)> {
    let missing = || bad("an image pull secret needs isImagePullSecret, host and secretValue");
    let host = r
        .host
        .as_deref()
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or_else(missing)?;
    let value = r
        .secret_value
        .as_deref()
        .filter(|v| !v.is_empty())
        .ok_or_else(missing)?;
    if base64::engine::general_purpose::STANDARD
        .decode(value)
        .is_err()
    {
        return Err(bad(
            "secretValue of an image pull secret must be base64 of user:token (illegal base64 data)",
        ));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(bad(format!(
            "secretValue is {} bytes; the limit is {MAX_VALUE_BYTES}",
            value.len()
        )));
    }
    let host = if host.ends_with('/') {
        host.to_string()
    } else {
        format!("{host}/")
    };
    Ok((cipher.seal(org, name, "secretValue", value), host))
}

/// The sealed pairs of a regular set upsert (documented and flat forms).
/// Errors: 400 for no pairs, a half pair, an invalid pair, or too many keys in the set.
fn sealed_pairs(
    cipher: &SecretCipher,
    org: &str,
    name: &str,
    r: &UpsertRequest,
    existing: Option<&SecretSetRecord>,
) -> CoreResult<Vec<SealedValue>> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    if let Some(list) = &r.secrets {
        pairs.extend(
            list.iter()
                .map(|p| (p.secret_key.as_str(), p.secret_value.as_str())),
        );
    }
    match (&r.secret_key, &r.secret_value) {
        (Some(k), Some(v)) => pairs.push((k, v)),
        (Some(k), None) => return Err(bad(format!("secretValue is missing for {k}"))),
        (None, Some(_)) => return Err(bad("secretKey is missing")),
        (None, None) => {}
    }
    if pairs.is_empty() {
        return Err(bad(
            "give at least one secret: {\"secrets\":[{\"secretKey\",\"secretValue\"}]} or {\"secretKey\",\"secretValue\"}",
        ));
    }
    for (k, v) in &pairs {
        check_pair(k, v)?;
    }
    let mut keys: std::collections::BTreeSet<&str> = existing
        .iter()
        .flat_map(|s| s.keys.iter().map(String::as_str))
        .collect();
    keys.extend(pairs.iter().map(|p| p.0));
    if keys.len() > MAX_KEYS_PER_SET {
        return Err(bad(format!(
            "a secret set holds at most {MAX_KEYS_PER_SET} keys"
        )));
    }
    Ok(pairs
        .iter()
        .map(|(k, v)| cipher.seal(org, name, k, v))
        .collect())
}

/// The org's sets (optionally of one region), by name.
pub async fn list(
    store: &Arc<dyn Store>,
    org: &str,
    region: Option<&str>,
) -> CoreResult<Vec<SecretSetRecord>> {
    let mut sets = store.list_secret_sets(org).await?;
    if let Some(r) = region.filter(|r| !r.is_empty()) {
        sets.retain(|s| s.region == r);
    }
    Ok(sets)
}

/// A regular set with its key names.
///
/// Errors: 404 `Set not found`; 400 with code `"400"` for an image pull secret ("Cannot
/// retrieve image pull secrets by name": the CLI's deploy reads that code as "exists",
/// reference §A.6 "Get one").
pub async fn get(store: &Arc<dyn Store>, org: &str, name: &str) -> CoreResult<SecretSetRecord> {
    let set = store
        .get_secret_set(org, name)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("Set not found: {name}")))?;
    if set.kind == SecretSetKind::ImagePullSecret {
        return Err(CoreError::BadRequest {
            code: "400",
            message: format!("Cannot retrieve image pull secrets by name ({name})"),
        });
    }
    Ok(set)
}

/// Deletes a set. Deployments that bound it keep their snapshot; a later deploy naming it
/// fails with 404.
///
/// Errors: 404 `Set not found`.
pub async fn delete_set(store: &Arc<dyn Store>, org: &str, name: &str) -> CoreResult<()> {
    if store.delete_secret_set(org, name).await? {
        Ok(())
    } else {
        Err(CoreError::NotFound(format!("Set not found: {name}")))
    }
}

/// Deletes one key of a regular set.
///
/// Errors: 404 `Set not found` / `Secret not found`; 400 on an image pull secret.
pub async fn delete_key(
    store: &Arc<dyn Store>,
    org: &str,
    name: &str,
    key: &str,
) -> CoreResult<()> {
    let set = store
        .get_secret_set(org, name)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("Set not found: {name}")))?;
    if set.kind == SecretSetKind::ImagePullSecret {
        return Err(bad(format!(
            "{name} is an image pull secret; its keys cannot be deleted one by one (delete the set)"
        )));
    }
    if store.delete_secret(org, name, key).await? {
        Ok(())
    } else {
        Err(CoreError::NotFound(format!(
            "Secret not found: {key} in set {name}"
        )))
    }
}

/// Checks the sets a deployment binds (reference §A.3 create/update errors): a `secretSet`
/// must be a regular set, an `imagePullSecretSet` an image pull secret, both in `region`.
///
/// Errors: 404 naming the missing set; 400 for a wrong type or region.
pub async fn check_bindings(
    store: &Arc<dyn Store>,
    org: &str,
    region: &str,
    secret_set: Option<&str>,
    image_pull_secret_set: Option<&str>,
) -> CoreResult<()> {
    for (field, name, kind) in [
        ("secretSet", secret_set, SecretSetKind::Secret),
        (
            "imagePullSecretSet",
            image_pull_secret_set,
            SecretSetKind::ImagePullSecret,
        ),
    ] {
        let Some(name) = name else { continue };
        // A name no set can have (a NUL byte, which a store may not even take) is not asked.
        let found = if valid_set_name(name) {
            store.get_secret_set(org, name).await?
        } else {
            None
        };
        let set = found
            .ok_or_else(|| CoreError::NotFound(format!("{field}: secret set {name} not found")))?;
        if set.kind != kind {
            return Err(bad(format!(
                "{field}: {name} is of type {}, not {}",
                set.kind.as_str(),
                kind.as_str()
            )));
        }
        if set.region != region {
            return Err(bad(format!(
                "{field}: secret set region mismatch: {name} is in {}, the agent in {region}",
                set.region
            )));
        }
    }
    Ok(())
}

/// The [`SecretSource`] of the server: opens a deployment's snapshot.
pub struct DeploymentSecrets {
    store: Arc<dyn Store>,
    cipher: Arc<SecretCipher>,
}

impl DeploymentSecrets {
    /// A source over a store and the server's cipher.
    pub fn new(store: Arc<dyn Store>, cipher: Arc<SecretCipher>) -> Self {
        DeploymentSecrets { store, cipher }
    }
}

#[async_trait::async_trait]
impl SecretSource for DeploymentSecrets {
    /// Every key of the snapshot as `(KEY, value)`, by key. Reserved names are skipped.
    ///
    /// Errors: the snapshot cannot be read or a value cannot be opened; the instance then
    /// fails to start with that message rather than run without its secrets.
    async fn env_for(
        &self,
        org: &str,
        dep: &DeploymentRecord,
    ) -> Result<Vec<(String, String)>, String> {
        if dep.spec.secret_set.is_none() {
            return Ok(Vec::new());
        }
        let snap = self
            .store
            .deployment_secrets(dep.id)
            .await
            .map_err(|e| format!("cannot read the secrets of deployment {}: {e}", dep.id))?;
        let mut env = Vec::with_capacity(snap.len());
        for (set, v) in &snap {
            if reserved_key(&v.key) {
                continue;
            }
            env.push((v.key.clone(), self.cipher.open(org, set, v)?));
        }
        Ok(env)
    }
}

/// The Docker runtime's source of registry credentials: a deployment's `imagePullSecretSet`
/// (the set's host and its one sealed value, base64 of `user:password`), read when the image
/// is resolved at deploy.
pub struct ImagePullSecrets {
    store: Arc<dyn Store>,
    cipher: Arc<SecretCipher>,
}

impl ImagePullSecrets {
    /// A source over a store and the server's cipher.
    pub fn new(store: Arc<dyn Store>, cipher: Arc<SecretCipher>) -> Self {
        ImagePullSecrets { store, cipher }
    }
}

#[async_trait::async_trait]
impl crate::runtime::docker::PullSecrets for ImagePullSecrets {
    /// Errors: the set is gone, is not an image pull secret, or cannot be opened.
    async fn pull_secret(
        &self,
        dep: &DeploymentRecord,
    ) -> Result<Option<crate::runtime::docker::image::PullSecret>, String> {
        let Some(name) = dep.spec.image_pull_secret_set.as_deref() else {
            return Ok(None);
        };
        let err = |e: String| format!("cannot read imagePullSecretSet {name}: {e}");
        let agent = self
            .store
            .get_agent_by_id(dep.agent_id)
            .await
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("the agent is gone".into()))?;
        let set = self
            .store
            .get_secret_set(&agent.org, name)
            .await
            .map_err(|e| err(e.to_string()))?
            .filter(|s| s.kind == SecretSetKind::ImagePullSecret)
            .ok_or_else(|| err("no image pull secret of that name".into()))?;
        let values = self
            .store
            .secret_values(&agent.org, name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let v = values
            .first()
            .ok_or_else(|| err("the set holds no credential".into()))?;
        Ok(Some(crate::runtime::docker::image::PullSecret {
            host: set.host.unwrap_or_default(),
            value: self.cipher.open(&agent.org, name, v).map_err(err)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's key is checked against the values already stored: none stored passes, the
    /// key that sealed them passes, another key is refused with a message naming the file.
    #[tokio::test]
    async fn a_key_that_does_not_open_the_stored_secrets_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(
            &crate::config::StoreConfig::default(),
            dir.path(),
            crate::store::OpenMode::Create,
        )
        .await
        .unwrap();
        store.ensure_org("o").await.unwrap();
        let ours = SecretCipher::from_key(&[7u8; 32]);
        let other = SecretCipher::from_key(&[8u8; 32]);
        check_key_opens_stored(store.as_ref(), &other)
            .await
            .unwrap();
        let set = crate::store::SecretSetRecord {
            org: "o".into(),
            name: "my-set".into(),
            kind: crate::store::SecretSetKind::Secret,
            region: "local".into(),
            host: None,
            created_ms: 1,
            updated_ms: 1,
            keys: Vec::new(),
        };
        let v = ours.seal("o", "my-set", "GREETING", "hello");
        store
            .upsert_secret_set(&set, &[v], true, None)
            .await
            .unwrap();
        check_key_opens_stored(store.as_ref(), &ours).await.unwrap();
        let err = check_key_opens_stored(store.as_ref(), &other)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not open the secrets already in the database"),
            "{err}"
        );
        assert!(err.contains("--secrets-key-file"), "{err}");
    }

    #[test]
    fn set_names() {
        for ok in ["abc", "my-secrets", "a.b-c.d1", &"a".repeat(63)] {
            assert!(valid_set_name(ok), "{ok}");
        }
        for bad in [
            "ab",
            "-abc",
            "abc-",
            "ABC",
            "a_b_c",
            "a..b",
            ".abc",
            "abc.",
            &"a".repeat(64),
            "a b c",
        ] {
            assert!(!valid_set_name(bad), "{bad}");
        }
    }

    #[test]
    fn secret_keys() {
        assert!(valid_secret_key("API_KEY"));
        assert!(valid_secret_key("a-b_C9"));
        assert!(valid_secret_key(&"K".repeat(64)));
        assert!(!valid_secret_key(""));
        assert!(!valid_secret_key(&"K".repeat(65)));
        assert!(!valid_secret_key("A=B"));
        assert!(!valid_secret_key("A.B"));
        assert!(reserved_key("PORT"));
        assert!(reserved_key("CATTERY_INSTANCE_ID"));
        assert!(!reserved_key("PORTS"));
    }

    #[test]
    fn seal_open_binds_the_row() {
        let c = SecretCipher::from_key(&[7u8; 32]);
        let v = c.seal("org", "set", "K", "a value with = and \"quotes\"");
        assert_ne!(v.ciphertext, b"a value with = and \"quotes\"".to_vec());
        assert_eq!(
            c.open("org", "set", &v).unwrap(),
            "a value with = and \"quotes\""
        );
        assert!(c.open("org", "other", &v).is_err());
        assert!(c.open("other", "set", &v).is_err());
        let mut moved = v.clone();
        moved.key = "K2".into();
        assert!(c.open("org", "set", &moved).is_err());
        assert!(SecretCipher::from_key(&[8u8; 32])
            .open("org", "set", &v)
            .is_err());
    }

    /// A key check opens with its own key only, never as a secret value, and garbage never
    /// opens.
    #[test]
    fn a_key_check_opens_with_its_own_key_only() {
        let c = SecretCipher::from_key(&[7u8; 32]);
        let check = c.seal_check();
        assert!(c.opens_check(&check));
        assert_ne!(check, c.seal_check(), "a fresh nonce each time");
        assert!(!SecretCipher::from_key(&[8u8; 32]).opens_check(&check));
        assert!(!c.opens_check(&check[..20]));
        assert!(!c.opens_check(&[0u8; 64]));
        // A secret value is no key check, and a key check opens as no secret of any org.
        let v = c.seal("org", KEY_CHECK_SET, "", KEY_CHECK_TEXT);
        assert!(!c.opens_check(&[v.nonce, v.ciphertext].concat()));
    }

    #[test]
    fn key_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = SecretCipher::load_or_new(dir.path()).unwrap();
        let p = dir.path().join(KEY_FILE);
        assert!(
            !p.exists(),
            "the new key is written only once the start goes on"
        );
        a.save_new_key().unwrap();
        a.save_new_key().unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = a.seal("o", "s", "k", "v");
        let b = SecretCipher::load_or_new(dir.path()).unwrap();
        assert_eq!(b.open("o", "s", &sealed).unwrap(), "v");
        std::fs::write(&p, b"short").unwrap();
        assert!(SecretCipher::load_or_new(dir.path()).is_err());
    }
}
