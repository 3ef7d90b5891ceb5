//! Agents and deployments: validation, create, partial update, delete.
//!
//! Rules come from reference §A.3 (create/update fields and ranges) and §B.1 (what a
//! deployment is): every change that alters how instances run creates a new deployment id,
//! an edit of a `local:` bot's directory seen by the next deploy that names it included
//! ([`fingerprint_local_dir`]); scaling-only changes do not.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::limits::{Kind, OrgLimits};
use super::orgs::AgentDefaults;
use super::session::Supervisor;
use super::{env, exec_check, local_dir, CoreError, CoreResult};
use crate::model::{
    now_ms, profile_limits, valid_agent_name, AgentRecord, DeploymentRecord, DeploymentSpec,
    DEFAULT_MAX_AGENTS, MAX_MAX_SESSION_DURATION_S, MIN_MAX_SESSION_DURATION_S,
};
use crate::store::{Store, StoreError};

/// Highest `autoScaling.maxAgents` accepted (Pipecat Cloud caps at 50 unless raised by
/// support; a self-hosted machine is its own support).
pub const MAX_AGENTS_CAP: i64 = 10_000;

/// `autoScaling` in requests. `minReplicas`/`maxReplicas` are accepted as legacy names.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoScalingRequest {
    /// Reserved warm instances (default 0).
    pub min_agents: Option<i64>,
    /// Instance cap (default 50).
    pub max_agents: Option<i64>,
    /// Legacy name of `minAgents`.
    pub min_replicas: Option<i64>,
    /// Legacy name of `maxAgents`.
    pub max_replicas: Option<i64>,
}

/// `krispViva` in requests.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KrispVivaRequest {
    /// `tel`, `pro`, or null (disabled).
    pub audio_filter: Option<String>,
}

/// `resources` in requests.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct ResourcesRequest {
    /// CPU quantity (`500m`, `2`), between 10m and 64.
    pub cpu: Option<String>,
    /// Memory quantity (`512Mi`, `4Gi`), between 64Mi and 256Gi.
    pub memory: Option<String>,
}

/// Body of create (`POST /v1/agents`) and update (`POST /v1/agents/{name}`, `PUT .../services`).
/// Absent fields keep their value on update. `command`, `workingDir`, `env`,
/// `stopGraceSeconds` and `python` are Cattery's additive fields for the process runtime.
#[derive(custom_debug::Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    /// Agent name, `^[a-z0-9]([-a-z0-9]*[a-z0-9])$`, at most 54 chars. Required on create.
    pub service_name: Option<String>,
    /// Container image, or `local:<dir>` for a directory with `bot.py`.
    pub image: Option<String>,
    /// A successful build's id (`POST /v1/builds`): the agent runs what it built.
    pub build_id: Option<String>,
    /// Region code (default: the org's `defaultRegion`).
    pub region: Option<String>,
    /// Node type; only `arm` is known, and ignored here.
    pub node_type: Option<String>,
    /// Image pull secret set name; `null` or `""` unbinds it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub image_pull_secret_set: Option<Option<String>>,
    /// Secret set whose keys become environment variables; `null` or `""` unbinds it (absent:
    /// kept).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub secret_set: Option<Option<String>>,
    /// Scaling.
    pub auto_scaling: Option<AutoScalingRequest>,
    /// `agent-1x` (default), `agent-2x`, `agent-3x`.
    pub agent_profile: Option<String>,
    /// Krisp VIVA filter.
    pub krisp_viva: Option<KrispVivaRequest>,
    /// Session time limit in seconds, 60..=14400 (default 7200).
    pub max_session_duration: Option<i64>,
    /// Legacy Krisp flag.
    pub enable_krisp: Option<bool>,
    /// `none` or `token`.
    pub websocket_auth: Option<String>,
    /// Always create a new deployment.
    pub force_redeploy: Option<bool>,
    /// Accepted and ignored (GitHub Action).
    pub enable_integrated_keys_proxy: Option<bool>,
    /// Program and arguments (process runtime).
    pub command: Option<Vec<String>>,
    /// Working directory for `command`.
    pub working_dir: Option<String>,
    /// Extra environment variables.
    // Their values may be credentials: `Debug` shows the names alone.
    #[debug(with = crate::redact::map_keys_some)]
    pub env: Option<BTreeMap<String, String>>,
    /// Seconds between SIGTERM and SIGKILL when an instance is removed, 0..=3600; 0 = SIGKILL at once.
    pub stop_grace_seconds: Option<f64>,
    /// Python interpreter for `local:` agents.
    pub python: Option<String>,
    /// Keep the Daily room of a `createDailyRoom` session when the session ends (default: the
    /// org's `keepDailyRooms` property, else false: the room is deleted). `null` unsets it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<bool>)]
    pub keep_daily_rooms: Option<Option<bool>>,
    /// Explicit sizing, `{"cpu": "2", "memory": "4Gi"}` (the CLI's `deploy --resources`), in
    /// place of `agentProfile`'s limits; giving `agentProfile` alone clears it.
    pub resources: Option<ResourcesRequest>,
    /// The CPU architecture the image needs (`amd64` or `arm64`): checked against this host's,
    /// the only one instances run on (`GET /v1/regions`).
    pub architecture: Option<String>,
    /// Fields this server does not know; ignored, and named in the answer's `warning`.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl AgentRequest {
    /// A warning about what this request sets that will not be used, if anything: unknown
    /// fields (typos such as `autoscaling`), and `image` next to `command` (the command runs
    /// the agent).
    pub fn request_warnings(&self) -> Option<String> {
        let mut w = Vec::new();
        if !self.unknown.is_empty() {
            w.push(format!(
                "unknown fields ignored: {}",
                self.unknown.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if self.image.is_some() && self.command.is_some() {
            w.push("image ignored: command is set, and the command runs the agent".to_string());
        }
        (!w.is_empty()).then(|| w.join("; "))
    }
}

/// Deserializes a field that may be absent (`None`), `null` (`Some(None)`) or a value.
pub fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn bad(msg: impl Into<String>) -> CoreError {
    CoreError::bad_request(msg)
}

/// An `image` other than `local:<dir>` must be a container image reference as Docker and
/// registries read it (`[host[:port]/]name[:tag][@digest]`, the name in lowercase): a
/// reference no engine can pull is a 400 at the request, not a failed deployment later.
fn check_image_reference(img: &str) -> CoreResult<()> {
    if crate::model::local_image_dir(img).is_some() {
        return Ok(());
    }
    img.parse::<oci_spec::distribution::Reference>()
        .map(|_| ())
        .map_err(|e| {
            // oci-spec calls an uppercase name an invalid format; say what is wrong (as
            // Docker does: the reference would parse in lowercase, and tags may be uppercase).
            let fault = if img
                .to_lowercase()
                .parse::<oci_spec::distribution::Reference>()
                .is_ok()
            {
                "repository name must be lowercase".to_string()
            } else {
                e.to_string()
            };
            bad(format!(
                "image is not a valid image reference ({fault}): give \
                 [registry/]name[:tag][@digest], the name in lowercase, or local:/path/to/bot"
            ))
        })
}

/// Applies the request's run-affecting fields onto `spec`. Errors: 400 with the offending field.
fn apply(spec: &mut DeploymentSpec, r: &AgentRequest) -> CoreResult<()> {
    if r.build_id.is_some() {
        return Err(bad(
            "buildId must be resolved before the deployment is made (core::agents::resolve_build)",
        ));
    }
    if r.image.is_some() {
        spec.build_id = None;
    }
    if let Some(img) = &r.image {
        if img.trim().is_empty() {
            return Err(bad("image must not be empty"));
        }
        check_image_reference(img)?;
        spec.image = Some(img.clone());
        if r.command.is_none() {
            spec.command = None;
        }
    }
    if let Some(wd) = &r.working_dir {
        spec.working_dir = Some(exec_check::absolute_path("workingDir", wd)?);
    }
    if let Some(cmd) = &r.command {
        if cmd.is_empty() || cmd[0].is_empty() {
            return Err(bad("command must be a non-empty array of strings"));
        }
        spec.command = Some(exec_check::command(cmd, spec.working_dir.as_deref())?);
        if r.image.is_none() {
            spec.image = None;
        }
    }
    if let Some(env) = &r.env {
        check_env(env)?;
        spec.env = env.clone();
    }
    if let Some(g) = r.stop_grace_seconds {
        if !(0.0..=3600.0).contains(&g) || g.is_nan() {
            return Err(bad("stopGraceSeconds must be between 0 and 3600"));
        }
        spec.stop_grace_seconds = Some(g);
    }
    if let Some(p) = &r.agent_profile {
        if profile_limits(p).is_none() {
            return Err(bad(
                "agentProfile must be one of agent-1x, agent-2x, agent-3x",
            ));
        }
        spec.agent_profile = p.clone();
    }
    if let Some(m) = r.max_session_duration {
        let (lo, hi) = (
            i64::from(MIN_MAX_SESSION_DURATION_S),
            i64::from(MAX_MAX_SESSION_DURATION_S),
        );
        if !(lo..=hi).contains(&m) {
            return Err(bad(format!(
                "maxSessionDuration must be between {lo} and {hi} seconds"
            )));
        }
        spec.max_session_duration = Some(m as u32);
    }
    if let Some(k) = &r.krisp_viva {
        match k.audio_filter.as_deref() {
            None => spec.krisp_viva_audio_filter = None,
            Some(f @ ("tel" | "pro")) => spec.krisp_viva_audio_filter = Some(f.into()),
            Some(_) => return Err(bad("krispViva.audioFilter must be tel, pro or null")),
        }
    }
    if let Some(k) = r.enable_krisp {
        spec.enable_krisp = k;
    }
    if let Some(w) = &r.websocket_auth {
        if w != "none" && w != "token" {
            return Err(bad("websocketAuth must be none or token"));
        }
        spec.websocket_auth = Some(w.clone());
    }
    if let Some(s) = &r.secret_set {
        spec.secret_set = s.clone().filter(|s| !s.is_empty());
    }
    if let Some(s) = &r.image_pull_secret_set {
        spec.image_pull_secret_set = s.clone().filter(|s| !s.is_empty());
    }
    if let Some(p) = &r.python {
        exec_check::no_nul("python", p)?;
        spec.python = Some(p.clone());
    }
    if let Some(k) = r.keep_daily_rooms {
        spec.keep_daily_rooms = k;
    }
    apply_sizing(spec, r)?;
    if spec.image.is_none() && spec.command.is_none() {
        return Err(bad("give an image (or local:<dir>) or a command"));
    }
    if let Some(dir) = spec.local_dir() {
        if !dir.starts_with('/') {
            return Err(bad(format!(
                "image local:{dir}: the directory must be an absolute path (local:/path/to/bot)"
            )));
        }
        if r.image.is_some() {
            spec.image = Some(format!(
                "local:{}",
                exec_check::absolute_path("image (local: directory)", dir)?
            ));
        }
    }
    if r.command.is_some() || r.env.is_some() {
        let args = spec.command.as_deref().unwrap_or_default();
        exec_check::exec_fits(args, &spec.env)?;
    }
    Ok(())
}

/// A request whose `buildId` is replaced by what the build made (its `local:` directory and
/// Python, or its image), and the build's id to record on the deployment. Errors: 400 as
/// Pipecat Cloud words them (both image and buildId, build not found, another region, not
/// ready).
async fn resolve_build(
    store: &Arc<dyn Store>,
    org: &str,
    region: &str,
    r: &AgentRequest,
) -> CoreResult<(AgentRequest, Option<Uuid>)> {
    let Some(id) = r.build_id.as_deref() else {
        return Ok((r.clone(), None));
    };
    if r.image.is_some() {
        return Err(bad("give either image or buildId, not both"));
    }
    let found = match Uuid::parse_str(id) {
        // Taken for this deployment: the build retention counts from now, and a build it
        // deleted a moment ago is not found (`BuildStore::delete_unused_build`).
        Ok(u) => store.use_build(org, u, now_ms()).await?,
        Err(_) => None,
    };
    let art = super::builds::deployable(id, found.as_ref(), region)?;
    let mut out = r.clone();
    out.build_id = None;
    out.image = Some(art.image);
    if art.python.is_some() {
        out.python = art.python;
    }
    Ok((out, found.map(|b| b.id)))
}

/// Every build `spec` names directly ([`super::builds::named_builds`]: its image, `local:`
/// directory, Python, working directory or command under `builds_dir`) must be one of
/// `org`'s: another org's build is refused as an unknown one is, 400 `build <id> not found`,
/// so the answer tells nothing of other orgs' builds.
async fn check_builds(
    store: &Arc<dyn Store>,
    org: &str,
    builds_dir: &Path,
    spec: &DeploymentSpec,
) -> CoreResult<()> {
    for named in super::builds::named_builds(spec, builds_dir) {
        let own = match Uuid::parse_str(&named) {
            Ok(id) => store.get_build(org, id).await?.is_some(),
            Err(_) => false,
        };
        if !own {
            return Err(bad(format!("build {named} not found")));
        }
    }
    Ok(())
}

/// Records in `spec` the fingerprint of its bot directory ([`local_dir::fingerprint`]) when
/// that directory is its code: a `local:` image the Python runner runs (no `command`), not a
/// build's (a `buildId` names what it runs, and a new build is a new directory). `None`
/// otherwise, and when the directory cannot be read: the deployment's validation says why.
///
/// The directory is the org's choice, so it is read as an instance would see it
/// ([`crate::runtime::Runtime::as_instance`]), never as the server: what an instance could
/// not read (the directory behind `/root`, a subdirectory of another org's) does not count,
/// so a deployment's id does not change with files the org cannot see.
async fn fingerprint_local_dir(sup: &Supervisor, spec: &mut DeploymentSpec) {
    spec.local_fingerprint = None;
    if spec.command.is_some() || spec.build_id.is_some() {
        return;
    }
    let Some(dir) = spec.local_dir().map(std::path::PathBuf::from) else {
        return;
    };
    let runtime = sup.runtime().clone();
    spec.local_fingerprint = tokio::task::spawn_blocking(move || {
        let mut fp = None;
        let seen = runtime.as_instance(&mut || fp = local_dir::fingerprint(&dir));
        seen.ok().and(fp)
    })
    .await
    .ok()
    .flatten();
}

/// Applies `architecture` (checked only) and `resources` (or its clearing by
/// `agentProfile`). Errors: 400.
fn apply_sizing(spec: &mut DeploymentSpec, r: &AgentRequest) -> CoreResult<()> {
    if let Some(arch) = r.architecture.as_deref() {
        check_architecture(arch)?;
    }
    match &r.resources {
        Some(res) => {
            if r.agent_profile.is_some() {
                return Err(bad("give agentProfile or resources, not both"));
            }
            spec.resources = Some(check_resources(res)?);
        }
        None if r.agent_profile.is_some() => spec.resources = None,
        None => {}
    }
    Ok(())
}

/// Checks explicit `resources`. Errors: 400 naming what is missing, malformed or out of
/// bounds.
fn check_resources(r: &ResourcesRequest) -> CoreResult<crate::model::CustomResources> {
    let (Some(cpu), Some(memory)) = (r.cpu.as_deref(), r.memory.as_deref()) else {
        return Err(bad(
            "resources needs both cpu and memory, e.g. {\"cpu\": \"2\", \"memory\": \"4Gi\"}",
        ));
    };
    let cpu_millicores = crate::model::parse_cpu(cpu)
        .filter(|m| (10..=64_000).contains(m))
        .ok_or_else(|| {
            bad(format!(
                "resources.cpu {cpu:?}: a CPU quantity between 10m and 64 (e.g. 500m, 2)"
            ))
        })?;
    let memory_bytes = crate::model::parse_memory(memory)
        .filter(|b| (64 << 20..=256 << 30).contains(b))
        .ok_or_else(|| bad(format!("resources.memory {memory:?}: a memory quantity between 64Mi and 256Gi (e.g. 512Mi, 4Gi)")))?;
    Ok(crate::model::CustomResources {
        cpu: cpu.to_string(),
        memory: memory.to_string(),
        cpu_millicores,
        memory_bytes,
    })
}

/// Checks a requested `architecture` against this host's. Errors: 400 for anything but
/// `amd64`/`arm64`, and for the one this host is not.
fn check_architecture(arch: &str) -> CoreResult<()> {
    let host = super::orgs::host_architecture();
    if arch != "amd64" && arch != "arm64" {
        return Err(bad(format!(
            "architecture must be amd64 or arm64, not {arch:?}"
        )));
    }
    if arch != host {
        return Err(bad(format!(
            "architecture {arch} is not available: instances here run on {host} (GET /v1/regions lists it)"
        )));
    }
    Ok(())
}

/// Checks an agent's `env`: valid names, none the platform sets, values the kernel can pass.
/// Errors: 400 naming the variable.
fn check_env(env: &BTreeMap<String, String>) -> CoreResult<()> {
    if let Some(k) = env.keys().find(|k| !env::valid_name(k)) {
        return Err(bad(format!("env: invalid variable name {k:?}")));
    }
    if let Some(k) = env.keys().find(|k| env::is_platform_var(k)) {
        return Err(bad(format!(
            "env: {k} is set by the platform (reserved: {})",
            env::PLATFORM_VARS.join(", ")
        )));
    }
    exec_check::env_values(env)
}

fn scaling(r: &AgentRequest, cur: (u32, u32)) -> CoreResult<(u32, u32)> {
    let Some(a) = &r.auto_scaling else {
        return Ok(cur);
    };
    let min = a.min_agents.or(a.min_replicas).unwrap_or(i64::from(cur.0));
    let max = a.max_agents.or(a.max_replicas).unwrap_or(i64::from(cur.1));
    if min < 0 {
        return Err(bad("autoScaling.minAgents must be at least 0"));
    }
    if max < 1 {
        return Err(bad("autoScaling.maxAgents must be at least 1"));
    }
    if max > MAX_AGENTS_CAP {
        return Err(bad(format!(
            "autoScaling.maxAgents must be at most {MAX_AGENTS_CAP}"
        )));
    }
    if min > max {
        return Err(bad("autoScaling.minAgents must not exceed maxAgents"));
    }
    Ok((min as u32, max as u32))
}

/// Checks the named secret sets: they exist (404 naming the set), have the right type and
/// are in the agent's region (400). See `secrets::check_bindings`.
async fn check_sets(
    store: &Arc<dyn Store>,
    org: &str,
    region: &str,
    spec: &DeploymentSpec,
) -> CoreResult<()> {
    super::secrets::check_bindings(
        store,
        org,
        region,
        spec.secret_set.as_deref(),
        spec.image_pull_secret_set.as_deref(),
    )
    .await?;
    // Its variables join the agent's environment at exec: they must fit with the rest.
    if let Some(set) = spec.secret_set.as_deref() {
        // Sealed values carry a 16-byte tag.
        let sizes: Vec<(usize, usize)> = store
            .secret_values(org, set)
            .await?
            .iter()
            .map(|v| (v.key.len(), v.ciphertext.len().saturating_sub(16)))
            .collect();
        let args = spec.command.as_deref().unwrap_or_default();
        exec_check::exec_fits_with_secrets(args, &spec.env, set, &sizes)?;
    }
    Ok(())
}

/// Creates an agent with its first deployment.
///
/// Errors: 400 for an invalid or taken name, bad fields or an unknown region; 404 for a
/// missing secret set; 403 `ORG_LIMIT_REACHED` past the org's `agents_per_org`.
pub async fn create_agent(
    store: &Arc<dyn Store>,
    sup: &Arc<Supervisor>,
    limits: &OrgLimits,
    defaults: &AgentDefaults,
    builds_dir: &Path,
    org: &str,
    r: &AgentRequest,
) -> CoreResult<(AgentRecord, DeploymentRecord)> {
    let name = r
        .service_name
        .clone()
        .ok_or_else(|| bad("serviceName is required"))?;
    if !valid_agent_name(&name) {
        return Err(bad(
            "serviceName must match ^[a-z0-9]([-a-z0-9]*[a-z0-9])$ and be at most 54 characters",
        ));
    }
    let region = r
        .region
        .clone()
        .unwrap_or_else(|| defaults.default_region.clone());
    if !defaults.regions.contains(&region) {
        return Err(bad(format!(
            "region {region} is not available; available: {}",
            defaults.regions.join(", ")
        )));
    }
    let mut spec = DeploymentSpec {
        agent_profile: "agent-1x".into(),
        ..Default::default()
    };
    let (r, build) = resolve_build(store, org, &region, r).await?;
    let r = &r;
    apply(&mut spec, r)?;
    if build.is_some() {
        spec.build_id = build;
    }
    fingerprint_local_dir(sup, &mut spec).await;
    let (min, max) = scaling(r, (0, DEFAULT_MAX_AGENTS))?;
    check_sets(store, org, &region, &spec).await?;
    check_builds(store, org, builds_dir, &spec).await?;
    if store.get_agent(org, &name).await?.is_some() {
        return Err(bad(format!("service {name} already exists")));
    }
    let now = now_ms();
    let id = Uuid::new_v4();
    let dep = DeploymentRecord {
        id: Uuid::new_v4(),
        agent_id: id,
        spec,
        created_ms: now,
    };
    let agent = AgentRecord {
        id,
        org: org.to_string(),
        name: name.clone(),
        region,
        min_agents: min,
        max_agents: max,
        desired_deployment_id: dep.id,
        created_ms: now,
        updated_ms: now,
        deleted_ms: None,
    };
    // The store counts the org's agents and inserts in one step (`agents_per_org` holds
    // across nodes).
    match store
        .create_agent(&agent, &dep, limits.of(Kind::Agents))
        .await
    {
        Err(StoreError::Conflict) => return Err(bad(format!("service {name} already exists"))),
        r => r.map_err(|e| limits.refusal(org, Kind::Agents, e))?,
    }
    sup.upsert_agent(agent.clone(), dep.clone());
    Ok((agent, dep))
}

/// Partially updates an agent; returns it, its current deployment, and a warning when nothing
/// changed.
///
/// Errors: 404 when the agent does not exist; 400 for bad fields.
pub async fn update_agent(
    store: &Arc<dyn Store>,
    sup: &Arc<Supervisor>,
    builds_dir: &Path,
    org: &str,
    name: &str,
    r: &AgentRequest,
) -> CoreResult<(AgentRecord, DeploymentRecord, Option<String>)> {
    let mut agent = store
        .get_agent(org, name)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("agent {name} not found")))?;
    if let Some(region) = &r.region {
        if region != &agent.region {
            return Err(bad("region cannot change after the agent is created"));
        }
    }
    let cur = store
        .get_deployment(agent.desired_deployment_id)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("deployment of agent {name} not found")))?;
    let mut spec = cur.spec.clone();
    let (r, build) = resolve_build(store, org, &agent.region, r).await?;
    let r = &r;
    apply(&mut spec, r)?;
    if build.is_some() {
        spec.build_id = build;
    }
    let (min, max) = scaling(r, (agent.min_agents, agent.max_agents))?;
    let force = r.force_redeploy.unwrap_or(false);
    // A `local:` bot's directory is its code: a deploy that names it (the CLI's always does)
    // or makes a new deployment anyway reads it again, and an edited directory makes a new
    // deployment. A change of scaling alone keeps what the current deployment recorded.
    if r.image.is_some() || force || spec != cur.spec {
        fingerprint_local_dir(sup, &mut spec).await;
    }
    // The sets are checked only for a new deployment (which snapshots their values): a
    // scaling change works on, though a set the current deployment bound was deleted since.
    if force || spec != cur.spec {
        check_sets(store, org, &agent.region, &spec).await?;
        check_builds(store, org, builds_dir, &spec).await?;
    }
    if force {
        spec.revision += 1;
    }
    let now = now_ms();
    let new_dep = (spec != cur.spec).then(|| DeploymentRecord {
        id: Uuid::new_v4(),
        agent_id: agent.id,
        spec,
        created_ms: now,
    });
    let scaling_changed = (min, max) != (agent.min_agents, agent.max_agents);
    let warning = (new_dep.is_none() && !scaling_changed).then(|| {
        "nothing changed; the current deployment was kept and checked again (use forceRedeploy, `--force` in the CLI, to replace its instances)".to_string()
    });
    agent.min_agents = min;
    agent.max_agents = max;
    agent.updated_ms = now;
    if let Some(d) = &new_dep {
        agent.desired_deployment_id = d.id;
    }
    store.update_agent(&agent, new_dep.as_ref()).await?;
    let dep = new_dep.unwrap_or(cur);
    sup.upsert_agent(agent.clone(), dep.clone());
    Ok((agent, dep, warning))
}

/// Deletes an agent: new sessions are refused; running ones go on until they end or are
/// stopped (reference §A.3 "Delete").
///
/// Errors: 404 when it does not exist.
pub async fn delete_agent(
    store: &Arc<dyn Store>,
    sup: &Arc<Supervisor>,
    org: &str,
    name: &str,
) -> CoreResult<()> {
    let agent = store
        .get_agent(org, name)
        .await?
        .ok_or_else(|| CoreError::NotFound(format!("agent {name} not found")))?;
    store.delete_agent(agent.id, now_ms()).await?;
    sup.remove_agent(agent.id);
    Ok(())
}

/// `org`'s live agents (of one region when `region` is given and not empty).
pub async fn list_agents(
    store: &Arc<dyn Store>,
    org: &str,
    region: Option<&str>,
) -> CoreResult<Vec<AgentRecord>> {
    let mut list = store.list_agents(org).await?;
    if let Some(r) = region.filter(|r| !r.is_empty()) {
        list.retain(|a| a.region == r);
    }
    Ok(list)
}

/// The agent's current deployment. Errors: 404 `deployment not found`.
pub async fn current_deployment(
    store: &Arc<dyn Store>,
    agent: &AgentRecord,
) -> CoreResult<DeploymentRecord> {
    store
        .get_deployment(agent.desired_deployment_id)
        .await?
        .ok_or_else(|| CoreError::NotFound("deployment not found".into()))
}

/// `org`'s agent `name` (`None` when it does not exist) with its deployments, newest first.
pub async fn deployments(
    store: &Arc<dyn Store>,
    org: &str,
    name: &str,
) -> CoreResult<Option<(AgentRecord, Vec<DeploymentRecord>)>> {
    let Some(a) = super::lookup::find_agent(store, org, name).await? else {
        return Ok(None);
    };
    let deps = store.list_deployments(a.id).await?;
    Ok(Some((a, deps)))
}
