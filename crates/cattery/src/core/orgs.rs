//! Organizations: regions and properties (reference §A.8, §A.9, §D).
//!
//! The server offers the regions of `--regions` (default one region, `local`). Each org has
//! one property, `defaultRegion`, kept in `orgs.properties`; when unset, or when it names a
//! region the server no longer offers, the server's `--default-region` applies. New agents
//! and secret sets without a `region` go to the org's `defaultRegion`.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{CoreError, CoreResult};
use crate::store::{OrgRecord, Store};

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

/// `{"regions": [{"code", "display_name", "supported_architectures", "default_architecture"}]}`
/// (note the snake_case keys, reference §A.8).
pub fn regions_json(defaults: &AgentDefaults) -> Value {
    let arch = host_architecture();
    let list: Vec<Value> = defaults
        .regions
        .iter()
        .map(|c| {
            json!({
                "code": c,
                "display_name": region_display_name(c),
                "supported_architectures": [arch],
                "default_architecture": arch,
            })
        })
        .collect();
    json!({ "regions": list })
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

/// `{"properties": {"defaultRegion": ...}}` (values only).
pub async fn properties(
    store: &Arc<dyn Store>,
    server: &AgentDefaults,
    org: &str,
) -> CoreResult<Value> {
    let rec = org_record(store, org).await?;
    Ok(json!({"properties": {"defaultRegion": effective_default(&rec, server)}}))
}

/// `{"properties": {name: {type, description, readOnly, currentValue, default, availableValues}}}`.
pub async fn properties_schema(
    store: &Arc<dyn Store>,
    server: &AgentDefaults,
    org: &str,
) -> CoreResult<Value> {
    let rec = org_record(store, org).await?;
    Ok(schema_of(&rec, server))
}

fn schema_of(rec: &OrgRecord, server: &AgentDefaults) -> Value {
    json!({"properties": {"defaultRegion": {
        "type": "string",
        "description": "Region used for new agents and secret sets that name none",
        "readOnly": false,
        "currentValue": effective_default(rec, server),
        "default": server.default_region,
        "availableValues": server.regions,
    }}})
}

/// `PATCH .../properties`: sets the given properties and answers the schema form.
///
/// Errors (400): not an object, empty update, unknown property (only `defaultRegion` exists),
/// a value that is not a string, a region the server does not offer (the message lists them).
pub async fn update_properties(
    store: &Arc<dyn Store>,
    server: &AgentDefaults,
    org: &str,
    patch: &Value,
) -> CoreResult<Value> {
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
            other => {
                return Err(CoreError::bad_request(format!(
                    "unknown property {other}; known: defaultRegion"
                )))
            }
        }
    }
    rec.properties = Value::Object(props);
    store.set_org_properties(org, &rec.properties).await?;
    Ok(schema_of(&rec, server))
}
