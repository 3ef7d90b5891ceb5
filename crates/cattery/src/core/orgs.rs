//! Organizations: regions and properties (reference §A.8, §A.9, §D).
//!
//! The server offers the regions of `--regions` (default one region, `local`). Each org has
//! one property, `defaultRegion`, kept in `orgs.properties`; when unset, or when it names a
//! region the server no longer offers, the server's `--default-region` applies. New agents
//! and secret sets without a `region` go to the org's `defaultRegion`.

use std::sync::Arc;

use serde_json::{Map, Value};

use base64::Engine as _;

use super::secrets::SecretCipher;
use super::{CoreError, CoreResult};
use crate::store::{OrgRecord, SealedValue, Store};

/// Longest org name a new org may have (a DNS label, as Pipecat Cloud's org slugs).
pub const MAX_ORG_NAME_CHARS: usize = 63;

/// Checks the name of an org about to be created (`cattery keys create --org`). An org's name
/// is a path segment of every `/v1/organizations/{org}/...` call the official CLI makes (it
/// takes it from `GET /v1/organizations`) and the second half of the websocket service host
/// `{agent}.{org}`, so it must be 1 to 63 characters of ASCII letters, digits, `-`, `_` and
/// `.`, starting with a letter or digit. An empty name, a `/`, a space or a `?` would give an
/// org that no client can address. Errors: 400 naming the rule.
pub fn check_new_org_name(name: &str) -> CoreResult<()> {
    let ok = name.len() <= MAX_ORG_NAME_CHARS
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        return Ok(());
    }
    Err(CoreError::bad_request(format!(
        "invalid org name {name:?}: 1 to {MAX_ORG_NAME_CHARS} characters of ASCII letters, \
         digits, '-', '_' and '.', starting with a letter or digit (it goes into the CLI's \
         /v1/organizations/{{org}}/... paths and the websocket host {{agent}}.{{org}})"
    )))
}

/// Display name of a region code: the Pipecat Cloud names for their codes, "Local (this
/// server)" for `local`, otherwise the code itself.
pub fn region_display_name(code: &str) -> String {
    match code {
        "local" => "Local (this server)".into(),
        "us-west" => "US West (Oregon)".into(),
        "us-east" => "US East (Virginia)".into(),
        "eu-central" => "Europe (Frankfurt)".into(),
        "ap-south" => "Asia Pacific (Mumbai)".into(),
        other => other.into(),
    }
}

/// The architecture of this machine in Kubernetes' words (`amd64`, `arm64`, ...): the process
/// runtime runs host programs, so it is the only one every region supports.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// One region this server offers (the wire form is `api::schema::Region`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region code (`local`, `us-west`, ...).
    pub code: String,
    /// Display name ([`region_display_name`]).
    pub display_name: String,
    /// The one architecture instances run on ([`host_architecture`]).
    pub architecture: &'static str,
}

/// The regions this server offers, in configuration order (reference §A.8).
pub fn regions(defaults: &AgentDefaults) -> Vec<RegionInfo> {
    let architecture = host_architecture();
    defaults
        .regions
        .iter()
        .map(|c| RegionInfo {
            code: c.clone(),
            display_name: region_display_name(c),
            architecture,
        })
        .collect()
}

/// Server-side defaults for agents and secret sets.
#[derive(Debug, Clone)]
pub struct AgentDefaults {
    /// Regions this server offers.
    pub regions: Vec<String>,
    /// Region used when none is given.
    pub default_region: String,
}

/// The org's record. Errors: 404 `organization {org} not found`.
pub async fn org_record(store: &Arc<dyn Store>, org: &str) -> CoreResult<OrgRecord> {
    store
        .get_org(org)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("organization {org} not found")))
}

/// The server defaults with `default_region` replaced by the org's `defaultRegion` when it
/// names an offered region.
///
/// Errors: 404 for an unknown org; storage errors.
pub async fn org_defaults(
    store: &Arc<dyn Store>,
    server: &AgentDefaults,
    org: &str,
) -> CoreResult<AgentDefaults> {
    let rec = org_record(store, org).await?;
    Ok(AgentDefaults {
        regions: server.regions.clone(),
        default_region: effective_default(&rec, server),
    })
}

fn effective_default(rec: &OrgRecord, server: &AgentDefaults) -> String {
    rec.properties
        .get("defaultRegion")
        .and_then(Value::as_str)
        .filter(|r| server.regions.iter().any(|x| x == r))
        .unwrap_or(&server.default_region)
        .to_string()
}

/// An org's one property, `defaultRegion`: its value and what it may be (the wire forms are
/// `api::schema::Properties` and `api::schema::PropertiesSchema`).
#[derive(custom_debug::Debug, Clone, PartialEq, Eq)]
pub struct DefaultRegionProperty {
    /// The region in effect for the org (its own choice, or the server's default).
    pub current: String,
    /// The server's default region.
    pub default: String,
    /// The regions the org may choose.
    pub available: Vec<String>,
    /// The org's own Daily API key (`dailyApiKey`), when set.
    #[debug(with = crate::redact::hidden_some)]
    pub daily_api_key: Option<String>,
    /// `keepDailyRooms`, when the org set it: keep Daily rooms when their sessions end
    /// (unset: false).
    pub keep_daily_rooms: Option<bool>,
    /// The org's `dailyDialinHmac` (the base64 secret Daily signs its dial-in webhooks
    /// with), when set.
    #[debug(with = crate::redact::hidden_some)]
    pub daily_dialin_hmac: Option<String>,
}

/// The org's properties. Errors: 404 for an unknown org; storage errors.
pub async fn properties(
    store: &Arc<dyn Store>,
    server: &AgentDefaults,
    cipher: &SecretCipher,
    org: &str,
) -> CoreResult<DefaultRegionProperty> {
    let rec = org_record(store, org).await?;
    Ok(property_of(&rec, server, cipher))
}

fn property_of(
    rec: &OrgRecord,
    server: &AgentDefaults,
    cipher: &SecretCipher,
) -> DefaultRegionProperty {
    DefaultRegionProperty {
        current: effective_default(rec, server),
        default: server.default_region.clone(),
        available: server.regions.clone(),
        daily_api_key: daily_api_key_of(rec, cipher),
        keep_daily_rooms: rec
            .properties
            .get(KEEP_DAILY_ROOMS)
            .and_then(Value::as_bool),
        daily_dialin_hmac: daily_dialin_hmac_of(rec, cipher),
    }
}

/// The property saying whether an org keeps the Daily rooms of ended sessions.
pub const KEEP_DAILY_ROOMS: &str = "keepDailyRooms";

/// The org's `keepDailyRooms` property (false when unset).
pub fn keep_daily_rooms_of(rec: &OrgRecord) -> bool {
    rec.properties.get(KEEP_DAILY_ROOMS) == Some(&Value::Bool(true))
}

/// The org's `dailyApiKey` property (its Daily API key for `createDailyRoom`), when set.
/// It is stored sealed with the secrets key (`{"nonce", "ciphertext"}` in base64); a plain
/// string, as written before keys were sealed, is read as it is. A sealed key that cannot be
/// opened (another secrets key) counts as unset, with an error in the log.
pub fn daily_api_key_of(rec: &OrgRecord, cipher: &SecretCipher) -> Option<String> {
    sealed_property_of(rec, DAILY_API_KEY, cipher)
}

/// The org's `dailyDialinHmac` property (the secret, base64 as Daily gives it, that Daily's
/// pinless dial-in signs its `room_creation_api` requests with), when set. Stored sealed like
/// `dailyApiKey`.
pub fn daily_dialin_hmac_of(rec: &OrgRecord, cipher: &SecretCipher) -> Option<String> {
    sealed_property_of(rec, DAILY_DIALIN_HMAC, cipher)
}

/// Sealed property `name` of an org, opened: see [`daily_api_key_of`].
fn sealed_property_of(rec: &OrgRecord, name: &str, cipher: &SecretCipher) -> Option<String> {
    match rec.properties.get(name)? {
        Value::String(k) if !k.is_empty() => Some(k.clone()),
        v @ Value::Object(_) => {
            let k = open_sealed_property(&rec.name, name, v, cipher);
            if k.is_none() {
                tracing::error!(org = %rec.name, property = name,
                    "cannot open a sealed property of the org");
            }
            k
        }
        _ => None,
    }
}

/// `sealed` ([`sealed_property`]'s `{"nonce", "ciphertext"}`) opened; `None` when it is not
/// one or does not open with `cipher`.
pub(crate) fn open_sealed_property(
    org: &str,
    name: &str,
    sealed: &Value,
    cipher: &SecretCipher,
) -> Option<String> {
    let b64 = |k: &str| {
        sealed
            .get(k)
            .and_then(Value::as_str)
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let v = SealedValue {
        key: name.into(),
        nonce: b64("nonce")?,
        ciphertext: b64("ciphertext")?,
    };
    cipher.open(org, SEALED_PROPERTIES, &v).ok()
}

/// The sealing context of sealed org properties.
pub(crate) const SEALED_PROPERTIES: &str = "org-properties";

/// Property `name`'s value sealed for storage in the org's properties.
pub(crate) fn sealed_property(org: &str, name: &str, value: &str, cipher: &SecretCipher) -> Value {
    let v = cipher.seal(org, SEALED_PROPERTIES, name, value);
    let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
    serde_json::json!({"nonce": b64(&v.nonce), "ciphertext": b64(&v.ciphertext)})
}

/// The property holding the secret Daily signs an org's dial-in webhooks with.
pub const DAILY_DIALIN_HMAC: &str = "dailyDialinHmac";

/// The property holding an org's Daily API key.
pub const DAILY_API_KEY: &str = "dailyApiKey";

/// `PATCH .../properties`: sets the given properties and answers them as they now are.
///
/// Errors (400): not an object, empty update, unknown property (only `defaultRegion` exists),
/// a value that is not a string, a region the server does not offer (the message lists them).
pub async fn update_properties(
    store: &Arc<dyn Store>,
    server: &AgentDefaults,
    cipher: &SecretCipher,
    org: &str,
    patch: &Value,
) -> CoreResult<DefaultRegionProperty> {
    let mut rec = org_record(store, org).await?;
    let obj = patch
        .as_object()
        .ok_or_else(|| CoreError::bad_request("the body must be a JSON object of properties"))?;
    if obj.is_empty() {
        return Err(CoreError::bad_request(
            "empty update: give at least one property, e.g. {\"defaultRegion\": \"local\"}",
        ));
    }
    let mut props: Map<String, Value> = rec.properties.as_object().cloned().unwrap_or_default();
    for (k, v) in obj {
        match k.as_str() {
            "defaultRegion" => {
                let r = v.as_str().ok_or_else(|| {
                    CoreError::bad_request("defaultRegion must be a string region code")
                })?;
                if !server.regions.iter().any(|x| x == r) {
                    return Err(CoreError::bad_request(format!(
                        "region {r} is not available; available: {}",
                        server.regions.join(", ")
                    )));
                }
                props.insert(k.clone(), Value::String(r.to_string()));
            }
            DAILY_API_KEY => match v {
                Value::Null => {
                    props.remove(k);
                }
                Value::String(key) if key.trim().is_empty() => {
                    props.remove(k);
                }
                Value::String(key) if key.len() <= 512 && !key.chars().any(char::is_control) => {
                    props.insert(k.clone(), sealed_property(org, k, key.trim(), cipher));
                }
                _ => {
                    return Err(CoreError::bad_request(
                        "dailyApiKey must be a Daily API key (a string; \"\" or null unsets it)",
                    ))
                }
            },
            DAILY_DIALIN_HMAC => match v {
                Value::Null => {
                    props.remove(k);
                }
                Value::String(h) if h.trim().is_empty() => {
                    props.remove(k);
                }
                Value::String(h)
                    if h.trim().len() <= 512
                        && base64::engine::general_purpose::STANDARD
                            .decode(h.trim())
                            .is_ok_and(|b| !b.is_empty()) =>
                {
                    props.insert(k.clone(), sealed_property(org, k, h.trim(), cipher));
                }
                _ => {
                    return Err(CoreError::bad_request(
                        "dailyDialinHmac must be the base64 secret of the number's \
                         pinless_dialin configuration (its hmac); \"\" or null unsets it",
                    ))
                }
            },
            KEEP_DAILY_ROOMS => match v {
                Value::Null => {
                    props.remove(k);
                }
                Value::Bool(b) => {
                    props.insert(k.clone(), Value::Bool(*b));
                }
                Value::String(b) if b == "true" || b == "false" => {
                    props.insert(k.clone(), Value::Bool(b == "true"));
                }
                _ => {
                    return Err(CoreError::bad_request(
                        "keepDailyRooms must be true or false (null unsets it)",
                    ))
                }
            },
            other => {
                return Err(CoreError::bad_request(format!(
                    "unknown property {other}; known: defaultRegion, dailyApiKey, dailyDialinHmac, \
                     keepDailyRooms"
                )))
            }
        }
    }
    rec.properties = Value::Object(props);
    store.set_org_properties(org, &rec.properties).await?;
    Ok(property_of(&rec, server, cipher))
}
