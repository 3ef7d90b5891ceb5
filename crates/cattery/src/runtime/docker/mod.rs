//! The Docker runtime: each instance is a container from the deployment's image, started
//! through the engine API (bollard), published on a free `127.0.0.1` port.
//!
//! The base image's contract (Pipecat Cloud): the container's server listens on `PORT=8080`;
//! the engine runs an init as PID 1 (`init: true`), so SIGTERM reaches a bot still importing.
//! Isolation by default: no host mounts, not privileged, every capability dropped,
//! `no-new-privileges`, CPU/memory/pids limits from the agent profile, bounded json-file logs.
//! Every container carries labels naming this server, the instance and the deployment (and,
//! on a node with a cluster secret, a hash of it); the session binding lives in the store (labels cannot change after create, and a
//! warm pool container gets its session later). See `docs/docker.md`.

mod container;
pub mod image;
mod stats;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
};
use bollard::Docker;
use parking_lot::Mutex;
use uuid::Uuid;

pub use self::container::DockerInstance;
use self::image::{PullPolicy, PullSecret};
use super::{
    Adopted, Instance, InstanceSpec, LogSink, Prepared, Runtime, RuntimeError, RuntimeKind,
};
use crate::model::{now_ms, DeploymentRecord, InstanceRecord};

/// Prefix of [`Prepared::program`] for a container: the image id follows.
pub const IMAGE_PROGRAM_PREFIX: &str = "docker-image:";
/// The port the base image's server listens on inside the container.
pub const CONTAINER_PORT: u16 = 8080;
/// Label: this server's id.
pub const LABEL_SERVER: &str = "org.cattery.server";
/// Label: instance id.
pub const LABEL_INSTANCE: &str = "org.cattery.instance";
/// Label: deployment id.
pub const LABEL_DEPLOYMENT: &str = "org.cattery.deployment";
/// Label: what the node's cluster secret derives (`ClusterSecret::container_label`), on the
/// containers of a node that has one.
pub const LABEL_CLUSTER: &str = "org.cattery.cluster";
/// How long connecting to the engine may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A failed connection is tried again only this long after the last attempt.
const RETRY_CONNECT_AFTER: Duration = Duration::from_secs(2);

/// Whether a deployment runs in a container: an `image` that is not `local:<dir>`, and no
/// `command` (a command runs on the process runtime and the image is ignored).
pub fn runs_in_container(dep: &DeploymentRecord) -> bool {
    dep.spec.command.is_none() && dep.spec.container_image().is_some()
}

/// Where a container instance lives ([`Instance::placement`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DockerPlacement {
    /// Container id.
    pub container_id: String,
    /// Container name (`cattery-<instance id>`).
    pub name: String,
    /// Host port on 127.0.0.1.
    pub port: u16,
    /// Image id the container runs.
    pub image_id: String,
    /// Creation time, ms.
    pub created_ms: i64,
}

/// Settings of the Docker runtime.
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    /// Engine address (`unix://...`, `tcp://...`); `None`: `DOCKER_HOST` or the local socket.
    pub host: Option<String>,
    /// Pull policy at deploy.
    pub pull_policy: PullPolicy,
    /// This server's id (the `org.cattery.server` label).
    pub server_id: String,
    /// What this node's cluster secret derives for the `org.cattery.cluster` label, if it has
    /// a secret: set on its containers, and compared before adopting another node's.
    pub cluster_label: Option<String>,
    /// File where the image id resolved for each deployment is kept across restarts
    /// (`<data dir>/docker-images.json`); `None`: memory only.
    pub images_file: Option<PathBuf>,
}

/// Looks up the registry credentials of a deployment's `imagePullSecretSet`.
#[async_trait]
pub trait PullSecrets: Send + Sync {
    /// The credentials bound to `dep`, if any. Errors: they cannot be read.
    async fn pull_secret(&self, dep: &DeploymentRecord) -> Result<Option<PullSecret>, String>;
}

/// Runs instances as containers on one Docker engine.
pub struct DockerRuntime {
    cfg: DockerConfig,
    /// The connected client (version negotiated); `None` until an engine answered.
    engine: tokio::sync::Mutex<Option<Docker>>,
    /// The last failed connection attempt and its error: repeated within
    /// [`RETRY_CONNECT_AFTER`] (a restart validating many image agents asks once).
    last_failure: Mutex<Option<(std::time::Instant, String)>>,
    /// Image id resolved at deploy, by deployment.
    images: Mutex<HashMap<Uuid, String>>,
    secrets: Mutex<Option<Arc<dyn PullSecrets>>>,
    /// Deployments whose last validation failed while the engine did not answer.
    unreachable: Mutex<HashSet<Uuid>>,
    /// While a sweep waits for the engine: the instances this run started (never swept).
    sweep_pending: Arc<Mutex<Option<HashSet<Uuid>>>>,
}

impl DockerRuntime {
    /// Whether a container with these labels may be adopted by this node: its own (this
    /// server's id), one made without a cluster label (a node without a cluster secret, or of
    /// a version before the label), or one whose cluster label is this node's.
    fn of_this_cluster(&self, labels: &HashMap<String, String>) -> bool {
        labels.get(LABEL_SERVER) == Some(&self.cfg.server_id)
            || labels
                .get(LABEL_CLUSTER)
                .is_none_or(|c| Some(c) == self.cfg.cluster_label.as_ref())
    }

    /// A runtime on the configured engine; it connects on first use (an engine that is down
    /// makes image deployments fail with a deploy error, nothing else).
    pub fn new(cfg: DockerConfig) -> Self {
        let images = cfg
            .images_file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        DockerRuntime {
            cfg,
            engine: tokio::sync::Mutex::new(None),
            last_failure: Mutex::new(None),
            images: Mutex::new(images),
            secrets: Mutex::new(None),
            unreachable: Mutex::new(HashSet::new()),
            sweep_pending: Arc::new(Mutex::new(None)),
        }
    }

    /// Sets where `imagePullSecretSet` credentials come from.
    pub fn set_pull_secrets(&self, s: Arc<dyn PullSecrets>) {
        *self.secrets.lock() = Some(s);
    }

    fn engine_name(&self) -> String {
        self.cfg
            .host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
    }

    /// The engine client, connecting (and negotiating the API version) when not yet done.
    /// Errors: no engine answers; the message says so and where it was looked for.
    pub async fn engine(&self) -> Result<Docker, String> {
        let mut g = self.engine.lock().await;
        if let Some(d) = g.as_ref() {
            return Ok(d.clone());
        }
        if let Some((at, e)) = self.last_failure.lock().as_ref() {
            if at.elapsed() < RETRY_CONNECT_AFTER {
                return Err(e.clone());
            }
        }
        let name = self.engine_name();
        let no_engine = |e: String| {
            let m = format!(
                "no reachable Docker engine at {name} (--docker-host / CATTERY_DOCKER_HOST): {e}"
            );
            *self.last_failure.lock() = Some((std::time::Instant::now(), m.clone()));
            m
        };
        let d = connect(self.cfg.host.as_deref()).await.map_err(no_engine)?;
        *self.last_failure.lock() = None;
        tracing::info!(engine = %name, version = ?d.client_version(), "connected to the Docker engine");
        *g = Some(d.clone());
        Ok(d)
    }

    /// Whether the engine answers a ping now.
    async fn engine_answers(&self) -> bool {
        let Ok(docker) = self.engine().await else {
            return false;
        };
        matches!(
            tokio::time::timeout(CONNECT_TIMEOUT, docker.ping()).await,
            Ok(Ok(_))
        )
    }

    /// Records the image id of a deployment (in memory and in the images file).
    fn record_image(&self, dep: Uuid, id: &str) {
        let mut m = self.images.lock();
        m.insert(dep, id.to_string());
        if let Some(f) = &self.cfg.images_file {
            let tmp = f.with_extension("json.tmp");
            let body = serde_json::to_vec(&*m).unwrap_or_default();
            if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, f)) {
                tracing::warn!(file = %f.display(), error = %e, "cannot save resolved image ids");
            }
        }
    }

    /// The image id of a deployment: the one recorded at its first resolution while the engine
    /// still has it (a tag moved since does not change the deployment), else the reference
    /// resolved under the pull policy.
    async fn resolve(&self, dep: &DeploymentRecord) -> Result<String, String> {
        let reference = dep.spec.image.clone().ok_or("no image")?;
        let docker = self.engine().await?;
        let known = self.images.lock().get(&dep.id).cloned();
        if let Some(id) = known {
            if docker.inspect_image(&id).await.is_ok() {
                return Ok(id);
            }
            tracing::warn!(deployment = %dep.id, image_id = %id, "the deployment's image is gone from the engine; resolving its reference again");
        }
        let source = self.secrets.lock().clone();
        let secret = match (&dep.spec.image_pull_secret_set, source) {
            (Some(_), Some(s)) => s.pull_secret(dep).await?,
            _ => None,
        };
        let id = image::resolve(&docker, &reference, self.cfg.pull_policy, secret.as_ref()).await?;
        tracing::info!(deployment = %dep.id, image = %reference, image_id = %id, "image resolved");
        self.record_image(dep.id, &id);
        Ok(id)
    }

    fn container_body(
        &self,
        spec: &InstanceSpec,
        image_id: &str,
        dep: &str,
    ) -> ContainerCreateBody {
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("CATTERY_INSTANCE_ID={}", spec.instance_id));
        let port_key = format!("{CONTAINER_PORT}/tcp");
        let ports = HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(String::new()),
            }]),
        )]);
        let mut labels = HashMap::from([
            (LABEL_SERVER.to_string(), self.cfg.server_id.clone()),
            (LABEL_INSTANCE.to_string(), spec.instance_id.to_string()),
            (LABEL_DEPLOYMENT.to_string(), dep.to_string()),
        ]);
        if let Some(c) = &self.cfg.cluster_label {
            labels.insert(LABEL_CLUSTER.to_string(), c.clone());
        }
        let l = spec.limits;
        ContainerCreateBody {
            image: Some(image_id.to_string()),
            env: Some(env),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            labels: Some(labels),
            exposed_ports: Some(vec![port_key]),
            host_config: Some(HostConfig {
                init: Some(true),
                port_bindings: Some(ports),
                memory: l.map(|l| l.memory_bytes as i64),
                memory_swap: l.map(|l| l.memory_bytes as i64),
                nano_cpus: l.map(|l| l.cpu_millicores as i64 * 1_000_000),
                pids_limit: l.map(|l| l.pids as i64),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                cap_drop: Some(vec!["ALL".into()]),
                privileged: Some(false),
                auto_remove: Some(false),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".into(), "10m".into()),
                        ("max-file".into(), "2".into()),
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The `CATTERY_DEPLOYMENT_ID` of a spec (the deployment label).
    fn deployment_of(spec: &InstanceSpec) -> String {
        spec.env
            .iter()
            .find(|(k, _)| k == "CATTERY_DEPLOYMENT_ID")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

/// Creates and starts the container; returns its id and published port. On error the
/// container (if created) is removed; so is a container created after `abandoned` was
/// cancelled, which is never started.
async fn create_and_start(
    docker: Docker,
    body: ContainerCreateBody,
    image_id: String,
    name: String,
    abandoned: tokio_util::sync::CancellationToken,
) -> Result<(String, u16), String> {
    let opts = CreateContainerOptionsBuilder::default().name(&name).build();
    let c = match docker.create_container(Some(opts), body).await {
        Ok(c) => c,
        Err(e) => {
            // No answer (a broken connection, a timeout) does not mean nothing was made:
            // the name is this instance's own. (One try: an engine that refuses connections
            // made nothing; one that made it and went away leaves it to the next sweep.)
            if !matches!(e, Error::DockerResponseServerError { .. }) {
                if let Err(e) = container::remove_once(&docker, &name).await {
                    tracing::debug!(container = %name, error = %e, "cannot remove a container whose create got no answer");
                }
            }
            return Err(format!("cannot create a container from {image_id}: {e}"));
        }
    };
    if abandoned.is_cancelled() {
        remove_quietly(&docker, &c.id).await;
        return Err("the start was abandoned".into());
    }
    let started = async {
        docker
            .start_container(&c.id, None)
            .await
            .map_err(|e| format!("cannot start container: {e}"))?;
        let ins = docker
            .inspect_container(&c.id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| e.to_string())?;
        let running = ins.state.as_ref().and_then(|s| s.running) == Some(true);
        match published_port(&ins) {
            Some(port) => Ok(port),
            // Exited already (a crash at start): no port, but its exit code and output
            // are the instance's to report, so it is handed over like any other.
            None if !running => Ok(0),
            None => Err("the container has no published port".to_string()),
        }
    }
    .await;
    match started {
        Ok(port) => Ok((c.id, port)),
        Err(e) => {
            remove_quietly(&docker, &c.id).await;
            Err(e)
        }
    }
}

/// The host port the engine published the container's 8080 on, on 127.0.0.1.
fn published_port(ins: &bollard::models::ContainerInspectResponse) -> Option<u16> {
    let key = format!("{CONTAINER_PORT}/tcp");
    ins.network_settings
        .as_ref()?
        .ports
        .as_ref()?
        .get(&key)?
        .as_ref()?
        .iter()
        .find(|b| b.host_ip.as_deref() == Some("127.0.0.1"))?
        .host_port
        .as_ref()?
        .parse()
        .ok()
}

/// Removes a container (by id or name; gone already is fine); an engine that does not take
/// the removal gets it again in the background until it does.
async fn remove_quietly(docker: &Docker, id: &str) {
    if let Err(e) = container::remove_once(docker, id).await {
        tracing::error!(container = %id, error = %e, "cannot remove container; trying again in the background until the engine takes it");
        spawn_cleanup(container::remove_until_gone(docker.clone(), id.to_string()));
    }
}

/// Removals running in the background (the container of a start given up while the engine
/// made it, a container the engine could not remove yet).
static CLEANUPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// How long a clean shutdown waits for the removals still running in the background.
const CLEANUP_WAIT: Duration = Duration::from_secs(10);
/// How long a given-up start waits for the engine to finish making its container and to
/// remove it, before the removal goes on in the background.
const ABANDON_WAIT: Duration = Duration::from_secs(10);

/// Runs a removal in the background, counted until it is done: a clean shutdown waits for it
/// (at most [`CLEANUP_WAIT`]), so a container the engine makes after its start was given up
/// is not left behind by a server that stops meanwhile.
pub(super) fn spawn_cleanup(f: impl std::future::Future<Output = ()> + Send + 'static) {
    use std::sync::atomic::Ordering;
    CLEANUPS.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        f.await;
        CLEANUPS.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Connects to the engine at `host` (`None`: `DOCKER_HOST` or the local socket) and
/// negotiates the API version.
async fn connect(host: Option<&str>) -> Result<Docker, String> {
    let client = match host {
        Some(h) => Docker::connect_with_host(h),
        None => Docker::connect_with_defaults(),
    }
    .map_err(|e| e.to_string())?;
    tokio::time::timeout(CONNECT_TIMEOUT, client.negotiate_version())
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())
}

/// Removes every container labelled with `server` whose instance `keep` does not name, nor
/// `started` (the instances this run started, while a sweep waits for the engine).
async fn sweep_with(
    docker: &Docker,
    server: &str,
    keep: &HashSet<Uuid>,
    started: &Mutex<Option<HashSet<Uuid>>>,
) -> Result<(), Error> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_SERVER}={server}")],
    )]);
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let all = docker.list_containers(Some(opts)).await?;
    for c in all {
        let inst = c
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_INSTANCE))
            .and_then(|v| Uuid::parse_str(v).ok());
        // Read after the listing: a container of this run was noted before it was created.
        let ours_now = |i: &Uuid| started.lock().as_ref().is_some_and(|s| s.contains(i));
        if inst.is_some_and(|i| keep.contains(&i) || ours_now(&i)) {
            continue;
        }
        if let Some(id) = c.id {
            tracing::warn!(container = %id, instance = ?inst, "removing a container no record explains");
            remove_quietly(docker, &id).await;
        }
    }
    Ok(())
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    fn prepare(&self, dep: &DeploymentRecord) -> Result<Prepared, String> {
        if !runs_in_container(dep) {
            return Err("the Docker runtime runs container images only".into());
        }
        let image = self
            .images
            .lock()
            .get(&dep.id)
            .cloned()
            .or_else(|| dep.spec.image.clone())
            .unwrap_or_default();
        Ok(Prepared {
            program: format!("{IMAGE_PROGRAM_PREFIX}{image}"),
            args: vec![],
            working_dir: None,
            env: vec![
                ("PORT".into(), CONTAINER_PORT.to_string()),
                ("TINI_SUBREAPER".into(), "1".into()),
                ("CATTERY_DEPLOYMENT_ID".into(), dep.id.to_string()),
            ],
        })
    }

    /// Connects to the engine and resolves the image (pulling it under the pull policy);
    /// blocks the calling worker meanwhile (`block_in_place`), so it needs the multi-threaded
    /// runtime.
    fn validate(&self, dep: &DeploymentRecord) -> Option<String> {
        if let Err(e) = self.prepare(dep) {
            return Some(e);
        }
        let h = tokio::runtime::Handle::current();
        let error = tokio::task::block_in_place(|| {
            h.block_on(async {
                let error = self.resolve(dep).await.err();
                // Failed while the engine does not answer: may pass once it does.
                let unreachable = error.is_some() && !self.engine_answers().await;
                let mut u = self.unreachable.lock();
                if unreachable {
                    u.insert(dep.id);
                } else {
                    u.remove(&dep.id);
                }
                error
            })
        });
        error
    }

    fn deploy_error_may_clear(&self, dep: &DeploymentRecord) -> bool {
        self.unreachable.lock().contains(&dep.id)
    }

    async fn start(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let abandoned = spec.abandoned.clone();
        let docker = tokio::select! {
            biased;
            () = abandoned.cancelled() => return Err(RuntimeError::Abandoned),
            d = self.engine() => d.map_err(RuntimeError::Setup)?,
        };
        let image_id = spec
            .program
            .strip_prefix(IMAGE_PROGRAM_PREFIX)
            .unwrap_or(&spec.program)
            .to_string();
        if let Some(started) = self.sweep_pending.lock().as_mut() {
            started.insert(spec.instance_id);
        }
        let name = format!("cattery-{}", spec.instance_id);
        let body = self.container_body(&spec, &image_id, &Self::deployment_of(&spec));
        // The engine's requests run to their end on a task of their own (the engine makes a
        // container even when its client goes away): a start given up meanwhile returns at
        // once, and that task removes whatever the engine made, never starting it after.
        let mut making = tokio::spawn(create_and_start(
            docker.clone(),
            body,
            image_id.clone(),
            name.clone(),
            abandoned.clone(),
        ));
        let made = tokio::select! {
            biased;
            r = &mut making => r,
            () = abandoned.cancelled() => {
                // Given up (a stop, the start timeout): the answer waits until what the engine
                // made is removed (a stop answers once its instance is gone), unless the
                // engine has not answered within ABANDON_WAIT; then the removal goes on in
                // the background (a shutdown waits for it).
                let docker = docker.clone();
                let mut removal = Box::pin(async move {
                    if let Ok(Ok((id, _))) = making.await {
                        remove_quietly(&docker, &id).await;
                    }
                });
                if tokio::time::timeout(ABANDON_WAIT, &mut removal).await.is_err() {
                    tracing::warn!(instance = %spec.instance_id,
                        "the engine has not answered a given-up start; its container is removed once it does");
                    spawn_cleanup(removal);
                }
                return Err(RuntimeError::Abandoned);
            }
        };
        let (id, port) = made
            .map_err(|e| RuntimeError::Setup(format!("container start task: {e}")))?
            .map_err(RuntimeError::Setup)?;
        let pl = DockerPlacement {
            container_id: id,
            name,
            port,
            image_id,
            created_ms: now_ms(),
        };
        Ok(DockerInstance::watch(docker, pl, logs, 0))
    }

    /// Containers are found by id on the engine: a node on the same engine adopts them (one
    /// on another engine does not find them, and ends their sessions).
    fn adoptable_by_any_node(&self, _rec: &InstanceRecord) -> bool {
        true
    }

    async fn adopt(&self, rec: &InstanceRecord, logs: LogSink) -> Adopted {
        let Ok(pl) = serde_json::from_value::<DockerPlacement>(rec.placement.clone()) else {
            return Adopted::Gone(None);
        };
        let docker = match self.engine().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(instance = %rec.id, error = %e, "cannot re-adopt a container");
                return Adopted::Gone(None);
            }
        };
        let (state, labels) = match docker
            .inspect_container(&pl.container_id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => (
                c.state.unwrap_or_default(),
                c.config.and_then(|c| c.labels).unwrap_or_default(),
            ),
            Err(_) => return Adopted::Gone(None),
        };
        if !self.of_this_cluster(&labels) {
            // Another cluster's container on a shared engine (this node runs on a copy of
            // its database): left alone, neither adopted nor removed; the copy's session
            // ends as one whose instance is gone.
            tracing::warn!(instance = %rec.id, container = %pl.container_id,
                "not adopting a container made by a node with another cluster secret");
            return Adopted::Gone(None);
        }
        if state.running != Some(true) {
            // It ended while no server watched it: the engine still has how.
            let gone = container::gone_exit(&state);
            remove_quietly(&docker, &pl.container_id).await;
            return Adopted::Gone(gone);
        }
        // Follows on from what the store holds of its output (`LogResume`), so the lines it
        // wrote while no server ran are captured, none twice; from one second ago when the
        // store could not say.
        let since = match logs.stored() {
            Some(_) => 0,
            None => (now_ms() / 1000) as i32 - 1,
        };
        Adopted::Running(DockerInstance::watch(docker, pl, logs, since))
    }

    /// Without an engine answering, the sweep goes on in the background (1 s doubling to
    /// 30 s) until one does: the containers of the sessions a restart recorded `lost` are
    /// removed then. Instances this run starts meanwhile are noted and left alone.
    async fn sweep(&self, keep: &HashSet<Uuid>) {
        let e = match self.engine().await {
            Ok(docker) => {
                match sweep_with(&docker, &self.cfg.server_id, keep, &self.sweep_pending).await {
                    Ok(()) => return,
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e,
        };
        // No image was ever resolved on this data dir, so no container of this server can
        // exist anywhere: nothing to sweep (a machine without Docker, the embedded default).
        if self.cfg.images_file.as_ref().is_some_and(|f| !f.exists()) {
            tracing::debug!(error = %e, "no Docker engine answers, and this server never ran a container");
            return;
        }
        tracing::warn!(error = %e, "cannot sweep this server's containers now; trying again until the engine answers");
        *self.sweep_pending.lock() = Some(HashSet::new());
        let (host, server) = (self.cfg.host.clone(), self.cfg.server_id.clone());
        let (keep, pending) = (keep.clone(), self.sweep_pending.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                tokio::time::sleep(backoff).await;
                if let Ok(docker) = connect(host.as_deref()).await {
                    if sweep_with(&docker, &server, &keep, &pending).await.is_ok() {
                        *pending.lock() = None;
                        tracing::info!("swept this server's containers once the engine answered");
                        return;
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
    }

    /// Waits (at most [`CLEANUP_WAIT`]) for the removals still running in the background.
    async fn shutdown(&self) {
        use std::sync::atomic::Ordering;
        let deadline = std::time::Instant::now() + CLEANUP_WAIT;
        while CLEANUPS.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = CLEANUPS.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(
                left,
                "containers still to remove at shutdown; the next start's sweep removes them"
            );
        }
    }

    /// Containers see none of the host's files: nothing of them is read for an org.
    fn as_instance(&self, _f: &mut (dyn FnMut() + Send)) -> Result<(), String> {
        Err("container instances see none of the host's files".into())
    }

    fn isolation(&self) -> String {
        format!(
            "docker at {} (init, loopback port, no mounts, caps dropped, no-new-privileges, profile limits)",
            self.engine_name()
        )
    }
}
