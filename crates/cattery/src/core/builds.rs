//! Builds (reference §A.7): `pipecat cloud deploy` without an image uploads its build
//! context, asks for a build, polls it, and deploys the build's id.
//!
//! What is decided here:
//! - **uploads**: an upload id with a single-use token (random, kept only as its SHA-256,
//!   15 minutes), the size cap, the context hash (md5 of the uploaded bytes, first 16 hex
//!   digits, as the CLI computes it);
//! - **the cache** ([`decide`]): a build is keyed by (org, `contextHash`, region,
//!   `dockerfilePath`); a successful one is reused (`cached: true`), one still running is
//!   joined, a failed one is built again;
//! - **the state machine** ([`next`]): `pending` -> `building` -> `success` | `failed` |
//!   `timeout`, and nothing out of a terminal state; builds cut short by a restart end
//!   `failed` ([`Builds::recover`]);
//! - **what a deployment of a build runs** ([`deployable`]), with Pipecat Cloud's errors;
//! - **which builds a deployment names directly** ([`named_builds`]): each must be its own
//!   org's (`core::agents`).
//!
//! Building itself is a [`Builder`]'s (`crate::build`). Files live under
//! `<data-dir>/builds/`: `uploads/<id>.tar.gz` until a build takes it, then
//! `<build-id>/{context.tar.gz, app/, venv/, build.log}`.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use md5::Digest as _;
use parking_lot::Mutex;
use sha2::Sha256;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::orgs::AgentDefaults;
use super::{CoreError, CoreResult};
use crate::build::{Artifact, BuildJob, BuildLog, Builder};
use crate::model::{now_ms, DeploymentSpec};
use crate::store::{BuildFilter, BuildRecord, BuildStatus, Store};

/// How long an upload URL stays valid (Pipecat Cloud: 15 minutes).
pub const UPLOAD_TTL: Duration = Duration::from_secs(15 * 60);
/// Default and largest page of `GET builds`.
pub const LIST_DEFAULT: u32 = 20;
/// Largest page of `GET builds`.
pub const LIST_MAX: u32 = 100;
/// Default and largest `limit` of build logs.
pub const LOGS_DEFAULT: usize = 500;
/// Largest `limit` of build logs.
pub const LOGS_MAX: usize = 10_000;

/// Which builder builds (`--builder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderMode {
    /// Docker for a context with a Dockerfile when an engine answers, else the local builder.
    Auto,
    /// Always the local virtualenv builder.
    Venv,
    /// Always Docker; a build fails without an engine.
    Docker,
}

impl BuilderMode {
    /// From `auto`, `venv`, `docker`.
    pub fn parse(s: &str) -> Option<BuilderMode> {
        Some(match s {
            "auto" => BuilderMode::Auto,
            "venv" => BuilderMode::Venv,
            "docker" => BuilderMode::Docker,
            _ => return None,
        })
    }
}

/// Whether a build goes to Docker (`Ok(true)`) or the local builder (`Ok(false)`), or why it
/// cannot be built.
pub fn use_docker(
    mode: BuilderMode,
    has_dockerfile: bool,
    docker_available: bool,
) -> Result<bool, String> {
    match mode {
        BuilderMode::Venv => Ok(false),
        BuilderMode::Auto => Ok(has_dockerfile && docker_available),
        BuilderMode::Docker if !has_dockerfile => {
            Err("the context has no Dockerfile (the server builds with Docker only)".into())
        }
        BuilderMode::Docker if !docker_available => Err(
            "no Docker engine answers, and the server builds with Docker only (--builder docker)"
                .into(),
        ),
        BuilderMode::Docker => Ok(true),
    }
}

/// Settings of the build service.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// Which builder builds.
    pub mode: BuilderMode,
    /// `<data-dir>/builds` (absolute).
    pub dir: PathBuf,
    /// Largest upload (bytes).
    pub max_context_bytes: u64,
    /// Time limit of one build.
    pub timeout: Duration,
    /// This node's id, recorded on the builds it makes (their directory is in its data dir).
    pub node_id: String,
    /// Most upload URLs one org may hold at once on this node (not expired, not yet built):
    /// each may take `max_context_bytes` of disk. 0 = no limit.
    pub uploads_per_org: u32,
    /// Most builds of one org pending or building at once on this node: each holds its
    /// context and unpacked tree on disk, and builds run one at a time, so one org's queue
    /// would delay every other org's. 0 = no limit.
    pub builds_per_org: u32,
    /// Most builds one org keeps on record (any state, every node's): each finished one holds
    /// disk (its log, and a successful one its tree and virtualenv) until the retention
    /// deletes it, so without a bound an org deploying many contexts fills the disk within
    /// a retention. 0 = no limit.
    pub kept_per_org: u32,
}

/// One event of a build's life.
#[derive(Debug, Clone)]
pub enum BuildEvent {
    /// A builder took it.
    Start,
    /// It made `artifact` with builder `builder`.
    Succeed(Artifact, &'static str),
    /// It failed for this reason.
    Fail(String),
    /// It ran past the time limit.
    TimedOut,
}

/// Why a build still running when its server stopped ended `failed` (after a restart, and in
/// `cattery store copy`).
pub const STOPPED_DURING_BUILD: &str = "the server stopped during the build; deploy again";

/// The build after `ev` at `now`, or `None` when `ev` cannot happen in its state.
pub fn next(b: &BuildRecord, ev: BuildEvent, now: i64) -> Option<BuildRecord> {
    use BuildStatus::*;
    let mut n = b.clone();
    n.updated_ms = now;
    match (b.status, ev) {
        (Pending, BuildEvent::Start) => {
            n.status = Building;
            n.started_ms = Some(now);
        }
        (Building, BuildEvent::Succeed(a, builder)) => {
            n.status = Success;
            n.artifact = Some(a.image);
            n.python = a.python;
            n.builder = Some(builder.to_string());
            n.completed_ms = Some(now);
        }
        (Pending | Building, BuildEvent::Fail(msg)) => {
            n.status = Failed;
            n.error_message = Some(msg);
            n.completed_ms = Some(now);
        }
        (Building, BuildEvent::TimedOut) => {
            n.status = Timeout;
            n.error_message = Some("the build ran past its time limit".into());
            n.completed_ms = Some(now);
        }
        _ => return None,
    }
    Some(n)
}

/// What a build request does, given the builds of the same key (newest first).
#[derive(Debug, Clone, PartialEq)]
pub enum CacheDecision {
    /// Reuse this successful build (`cached: true`).
    Reuse(BuildRecord),
    /// Join this build, still running.
    Join(BuildRecord),
    /// Build anew.
    Build,
}

/// The cache: a success wins, then a running build; failed and timed-out builds are retried.
pub fn decide(same_key: &[BuildRecord]) -> CacheDecision {
    if let Some(b) = same_key.iter().find(|b| b.status == BuildStatus::Success) {
        return CacheDecision::Reuse(b.clone());
    }
    if let Some(b) = same_key.iter().find(|b| !b.status.is_terminal()) {
        return CacheDecision::Join(b.clone());
    }
    CacheDecision::Build
}

/// What a deployment of build `b` (looked up as `id` in the caller's org) runs in `region`.
/// Errors: 400 `GENERIC_BAD_REQUEST` as Pipecat Cloud words them: not found, region mismatch,
/// not ready.
pub fn deployable(id: &str, b: Option<&BuildRecord>, region: &str) -> CoreResult<Artifact> {
    let b = b.ok_or_else(|| CoreError::bad_request(format!("build {id} not found")))?;
    if b.region != region {
        return Err(CoreError::bad_request(format!(
            "build {id} is in region {}, not the agent's region {region}",
            b.region
        )));
    }
    match (&b.status, &b.artifact) {
        (BuildStatus::Success, Some(image)) => Ok(Artifact {
            image: image.clone(),
            python: b.python.clone(),
        }),
        (st, _) => Err(CoreError::bad_request(format!(
            "build {id} is not ready (status {}{}): only successful builds can be deployed",
            st.as_str(),
            b.error_message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ))),
    }
}

/// The Docker builder's image repository (`cattery-build:<build-id>`, `crate::build::docker`).
const BUILD_IMAGE_REPOSITORY: &str = "cattery-build";

/// The builds deployment `spec` names directly, as it names them (a build id, or what
/// stands in its place), whatever its `buildId` says: a Docker build's image
/// (`cattery-build:<id>`, under any spelling of it: `docker.io/library/...`, a digest), and
/// any path under this node's builds directory `dir` (the `local:` image, `python`,
/// `workingDir`, the `command`'s program, also a relative one under `workingDir`, and its
/// absolute-path arguments), lexically (`..`
/// resolved) and through symlinks. A path in `dir` that is no build's (`uploads/`, `dir`
/// itself) is named by its first component (or `dir`), which no build has as its id.
pub fn named_builds(spec: &DeploymentSpec, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(img) = spec.container_image() {
        if let Ok(r) = img.parse::<oci_spec::distribution::Reference>() {
            if r.registry() == "docker.io"
                && r.repository() == format!("library/{BUILD_IMAGE_REPOSITORY}")
            {
                out.push(match (r.digest(), r.tag()) {
                    (None, Some(tag)) => tag.to_string(),
                    _ => img.to_string(),
                });
            }
        }
    }
    let dirs = [Some(dir.to_path_buf()), std::fs::canonicalize(dir).ok()];
    let in_builds = |p: &Path| -> Option<String> {
        dirs.iter().flatten().find_map(|d| {
            let rest = p.strip_prefix(d).ok()?;
            Some(match rest.components().next() {
                Some(c) => c.as_os_str().to_string_lossy().into_owned(),
                None => d.display().to_string(),
            })
        })
    };
    let local = spec.local_dir();
    let args = spec.command.iter().flatten().map(String::as_str);
    // A relative program path runs from the working directory (`runtime::process`): the
    // path it names is that directory's.
    let program = spec
        .command
        .as_ref()
        .and_then(|c| c.first())
        .filter(|p| !p.starts_with('/') && p.contains('/'))
        .zip(spec.working_dir.as_deref())
        .map(|(p, wd)| Path::new(wd).join(p));
    let paths = [local, spec.python.as_deref(), spec.working_dir.as_deref()]
        .into_iter()
        .flatten()
        .chain(args)
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .chain(program);
    for p in paths {
        let p = p.as_path();
        let lexical = in_builds(&normalize(p));
        let real = std::fs::canonicalize(p).ok().and_then(|c| in_builds(&c));
        out.extend(lexical.into_iter().chain(real));
    }
    out.sort();
    out.dedup();
    out
}

/// `p` with `.` and `..` resolved lexically (`/a/../b` is `/b`), symlinks left alone.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// An upload URL's state.
#[derive(Debug, Clone, PartialEq)]
enum UploadState {
    /// Waiting for its bytes.
    Waiting,
    /// Its bytes are arriving (the token is spent).
    Receiving,
    /// Uploaded.
    Received { hash: String, size: u64 },
    /// Taken by a build, or its upload failed.
    Spent,
}

#[derive(custom_debug::Debug)]
struct Upload {
    org: String,
    #[debug(with = crate::redact::hidden)]
    token: [u8; 32],
    expires_ms: i64,
    state: UploadState,
}

/// A new upload URL's parts.
#[derive(custom_debug::Debug, Clone)]
pub struct NewUpload {
    /// Upload id.
    pub id: Uuid,
    /// Its single-use token.
    #[debug(with = crate::redact::hidden)]
    pub token: String,
    /// When it expires (ms).
    pub expires_ms: i64,
}

/// The bytes of one upload on their way to disk, hashed and capped as they come.
pub struct UploadSink {
    id: Uuid,
    path: PathBuf,
    file: tokio::fs::File,
    md5: md5::Md5,
    size: u64,
    cap: u64,
}

impl UploadSink {
    /// Appends `chunk`. Errors: 413 past the cap; storage errors.
    pub async fn write(&mut self, chunk: &[u8]) -> CoreResult<()> {
        self.size += chunk.len() as u64;
        if self.size > self.cap {
            return Err(CoreError::PayloadTooLarge(format!(
                "the build context is larger than this server accepts ({} MiB)",
                self.cap / (1024 * 1024)
            )));
        }
        self.md5.update(chunk);
        self.file.write_all(chunk).await.map_err(io_err)
    }
}

fn io_err(e: std::io::Error) -> CoreError {
    let full = e.raw_os_error() == Some(libc::ENOSPC);
    CoreError::Store(if full {
        crate::store::StoreError::Full(e.to_string())
    } else {
        crate::store::StoreError::Unavailable(e.to_string())
    })
}

/// The build service: uploads, builds and their logs.
pub struct Builds {
    store: Arc<dyn Store>,
    builder: Arc<dyn Builder>,
    /// The Docker builder, when the server has a Docker runtime.
    docker: Mutex<Option<Arc<dyn Builder>>>,
    s: BuildSettings,
    uploads: Mutex<HashMap<Uuid, Upload>>,
    /// One build at a time: builds are CPU- and disk-heavy, and share the machine with calls.
    slots: Arc<Semaphore>,
    /// Builds pending or building on this node, by org (`BuildSettings::builds_per_org`).
    active: Arc<Mutex<HashMap<String, u32>>>,
}

/// One of an org's builds pending or building on this node: counted until dropped.
struct ActiveBuild {
    org: String,
    active: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for ActiveBuild {
    fn drop(&mut self) {
        let mut active = self.active.lock();
        if let Some(n) = active.get_mut(&self.org) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.org);
            }
        }
    }
}

/// What a build that did not succeed leaves in its directory `dir` besides its log: the
/// context, the unpacked tree, the virtualenv and the build uid's home (which that uid may
/// own, so a later holder of the uid must not find them). Parts already gone are fine; every
/// part is tried, and the first error is returned.
fn remove_all_but_the_log(dir: &std::path::Path) -> std::io::Result<()> {
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    let tried = [
        gone(std::fs::remove_dir_all(dir.join("app"))),
        gone(std::fs::remove_dir_all(dir.join("venv"))),
        gone(std::fs::remove_dir_all(dir.join("home"))),
        gone(std::fs::remove_file(dir.join("context.tar.gz"))),
    ];
    tried.into_iter().collect()
}

impl Builds {
    /// The service over `store`, building with `builder`.
    pub fn new(store: Arc<dyn Store>, builder: Arc<dyn Builder>, s: BuildSettings) -> Arc<Builds> {
        Arc::new(Builds {
            store,
            builder,
            docker: Mutex::new(None),
            s,
            uploads: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(1)),
            active: Arc::default(),
        })
    }

    /// Adds the Docker builder (the server has a Docker runtime).
    pub fn set_docker_builder(&self, b: Arc<dyn Builder>) {
        *self.docker.lock() = Some(b);
    }

    /// The builder for a context (`has_dockerfile`) under the configured mode.
    async fn pick(&self, has_dockerfile: bool) -> Result<Arc<dyn Builder>, String> {
        let docker = self.docker.lock().clone();
        let available = match &docker {
            Some(d) if has_dockerfile && self.s.mode != BuilderMode::Venv => d.available().await,
            _ => false,
        };
        Ok(
            match (use_docker(self.s.mode, has_dockerfile, available)?, docker) {
                (true, Some(d)) => d,
                _ => self.builder.clone(),
            },
        )
    }

    /// `<data-dir>/builds`: where this node's builds live ([`named_builds`]).
    pub fn dir(&self) -> &Path {
        &self.s.dir
    }

    /// The largest upload accepted (bytes).
    pub fn max_context_bytes(&self) -> u64 {
        self.s.max_context_bytes
    }

    fn build_dir(&self, id: Uuid) -> PathBuf {
        self.s.dir.join(id.to_string())
    }

    fn upload_path(&self, id: Uuid) -> PathBuf {
        self.s.dir.join("uploads").join(format!("{id}.tar.gz"))
    }

    /// A new upload URL for `org`; forgets expired ones (and their files). Errors: 429 when
    /// the org holds `uploads_per_org` upload URLs neither expired nor built.
    pub fn new_upload(&self, org: &str) -> CoreResult<NewUpload> {
        let now = now_ms();
        let mut ups = self.uploads.lock();
        let expired: Vec<Uuid> = ups
            .iter()
            .filter(|(_, u)| u.expires_ms < now && u.state != UploadState::Receiving)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            ups.remove(&id);
            let _ = std::fs::remove_file(self.upload_path(id));
        }
        let limit = self.s.uploads_per_org;
        let held = ups
            .values()
            .filter(|u| u.org == org && u.state != UploadState::Spent)
            .count();
        if limit != 0 && held >= limit as usize {
            return Err(CoreError::OrgBusy(format!(
                "organization {org} already has {held} upload URLs waiting to be built, as many \
                 as one org may hold at once (build_uploads_per_org = {limit}); build one, or \
                 wait for one to expire ({} minutes after it was given)",
                UPLOAD_TTL.as_secs() / 60
            )));
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        let id = Uuid::new_v4();
        let expires_ms = now + UPLOAD_TTL.as_millis() as i64;
        ups.insert(
            id,
            Upload {
                org: org.to_string(),
                token: token_digest(&token),
                expires_ms,
                state: UploadState::Waiting,
            },
        );
        Ok(NewUpload {
            id,
            token,
            expires_ms,
        })
    }

    /// Starts receiving upload `id` with `token`, which is spent by this call. Errors: 404 for
    /// an unknown or expired upload or a wrong token (one answer for all three), 409 when it
    /// was already used.
    pub async fn begin_upload(&self, id: Uuid, token: &str) -> CoreResult<UploadSink> {
        {
            let mut ups = self.uploads.lock();
            let u = ups
                .get_mut(&id)
                .filter(|u| {
                    u.expires_ms >= now_ms()
                        && subtle::ConstantTimeEq::ct_eq(&u.token[..], &token_digest(token)[..])
                            .into()
                })
                .ok_or_else(|| {
                    CoreError::NotFound("upload not found, expired, or its token is wrong".into())
                })?;
            if u.state != UploadState::Waiting {
                return Err(CoreError::Conflict(
                    "this upload URL was already used; ask for a new one".into(),
                ));
            }
            u.state = UploadState::Receiving;
        }
        let path = self.upload_path(id);
        let r = async {
            tokio::fs::create_dir_all(path.parent().unwrap_or(&self.s.dir))
                .await
                .map_err(io_err)?;
            tokio::fs::File::create(&path).await.map_err(io_err)
        }
        .await;
        match r {
            Ok(file) => Ok(UploadSink {
                id,
                path,
                file,
                md5: md5::Md5::new(),
                size: 0,
                cap: self.s.max_context_bytes,
            }),
            Err(e) => {
                self.spend(id);
                Err(e)
            }
        }
    }

    fn spend(&self, id: Uuid) {
        if let Some(u) = self.uploads.lock().get_mut(&id) {
            u.state = UploadState::Spent;
        }
    }

    /// Completes an upload. Errors: an empty upload (400), storage errors.
    pub async fn finish_upload(&self, mut sink: UploadSink) -> CoreResult<()> {
        let r = async {
            if sink.size == 0 {
                return Err(CoreError::bad_request(
                    "the uploaded build context is empty",
                ));
            }
            sink.file.flush().await.map_err(io_err)?;
            sink.file.sync_all().await.map_err(io_err)
        }
        .await;
        if let Err(e) = r {
            self.abort_upload(sink);
            return Err(e);
        }
        let hash = hex::encode(sink.md5.finalize())[..16].to_string();
        if let Some(u) = self.uploads.lock().get_mut(&sink.id) {
            u.state = UploadState::Received {
                hash,
                size: sink.size,
            };
        }
        Ok(())
    }

    /// Drops a failed upload: its file goes, its URL stays spent.
    pub fn abort_upload(&self, sink: UploadSink) {
        let _ = std::fs::remove_file(&sink.path);
        self.spend(sink.id);
    }

    /// A build of `org`'s upload `upload_id` for `region` (the org default when `None`):
    /// `(build, cached)`. Errors: 400 for an unknown upload, one not uploaded yet, or an
    /// unknown region.
    pub async fn create(
        self: &Arc<Self>,
        defaults: &AgentDefaults,
        org: &str,
        upload_id: &str,
        region: Option<&str>,
        dockerfile_path: Option<&str>,
    ) -> CoreResult<(BuildRecord, bool)> {
        let region = region
            .filter(|r| !r.is_empty())
            .unwrap_or(&defaults.default_region)
            .to_string();
        if !defaults.regions.contains(&region) {
            return Err(CoreError::bad_request(format!(
                "region {region} is not available; available: {}",
                defaults.regions.join(", ")
            )));
        }
        let dockerfile_path = dockerfile_path
            .filter(|d| !d.is_empty())
            .unwrap_or("Dockerfile")
            .to_string();
        if !crate::build::context::is_inside(&dockerfile_path) || dockerfile_path.len() > 1024 {
            return Err(CoreError::bad_request(
                "dockerfilePath must be a relative path inside the context (no \"..\", at most \
                 1024 bytes)",
            ));
        }
        let not_found = || CoreError::bad_request(format!("upload {upload_id} not found"));
        let id = Uuid::parse_str(upload_id).map_err(|_| not_found())?;
        let (hash, size) = {
            let ups = self.uploads.lock();
            let u = ups
                .get(&id)
                .filter(|u| u.org == org)
                .ok_or_else(not_found)?;
            match &u.state {
                UploadState::Received { hash, size } => (hash.clone(), *size),
                UploadState::Spent => {
                    return Err(CoreError::bad_request(format!(
                        "upload {upload_id} was already built or failed; upload again"
                    )))
                }
                _ => {
                    return Err(CoreError::bad_request(format!(
                        "upload {upload_id} has not been uploaded yet"
                    )))
                }
            }
        };
        let (same, _) = self
            .store
            .list_builds(
                org,
                &BuildFilter {
                    context_hash: Some(hash.clone()),
                    region: Some(region.clone()),
                    dockerfile_path: Some(dockerfile_path.clone()),
                    limit: LIST_MAX,
                    ..Default::default()
                },
            )
            .await?;
        let decision = decide(&same);
        if !matches!(decision, CacheDecision::Build) {
            self.spend(id);
            let _ = std::fs::remove_file(self.upload_path(id));
        }
        match decision {
            CacheDecision::Reuse(b) => {
                // Taken again: its retention counts from now.
                self.store.use_build(org, b.id, now_ms()).await?;
                return Ok((b, true));
            }
            CacheDecision::Join(b) => return Ok((b, false)),
            CacheDecision::Build => {}
        }
        // Refused (here or by the insert, below) before the upload is spent: the same upload
        // can be built once another build of the org has ended (or, past `kept_per_org`, gone).
        let slot = self.count_active(org)?;
        let now = now_ms();
        let b = BuildRecord {
            id: Uuid::new_v4(),
            org: org.to_string(),
            status: BuildStatus::Pending,
            region,
            context_hash: hash,
            dockerfile_path,
            artifact: None,
            python: None,
            builder: None,
            error_message: None,
            context_size: size as i64,
            created_ms: now,
            started_ms: None,
            completed_ms: None,
            updated_ms: now,
            node_id: self.s.node_id.clone(),
        };
        let dir = self.build_dir(b.id);
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        open_dir(&self.s.dir);
        open_dir(&dir);
        let context = dir.join("context.tar.gz");
        std::fs::rename(self.upload_path(id), &context).map_err(io_err)?;
        // The kept builds are counted with the insert, in one step of the store: builds
        // created at once through any node never take the org past `kept_per_org`.
        let limit = (self.s.kept_per_org != 0).then_some(self.s.kept_per_org);
        if let Err(e) = self.store.insert_build(&b, limit).await {
            // Nothing recorded: the upload is left as it was, to be built again.
            let _ = std::fs::rename(&context, self.upload_path(id));
            let _ = std::fs::remove_dir_all(&dir);
            return Err(match e {
                crate::store::StoreError::LimitReached => self.kept_limit(org),
                e => e.into(),
            });
        }
        self.spend(id);
        let me = self.clone();
        let run = b.clone();
        tokio::spawn(async move {
            me.run(run).await;
            drop(slot);
        });
        Ok((b, false))
    }

    /// The refusal of a build past `kept_per_org`.
    fn kept_limit(&self, org: &str) -> CoreError {
        let limit = self.s.kept_per_org;
        CoreError::OrgLimit(format!(
            "organization {org} has reached its limit of {limit} builds kept \
             (builds_kept_per_org = {limit}); a build is deleted --build-retention-hours \
             after its last use unless a deployment runs it: deploy one of the kept builds \
             by its id, or ask the operator to raise builds_kept_per_org"
        ))
    }

    /// Counts one more build of `org` pending or building. Errors: 429 at `builds_per_org`.
    fn count_active(&self, org: &str) -> CoreResult<ActiveBuild> {
        let limit = self.s.builds_per_org;
        let mut active = self.active.lock();
        let n = active.entry(org.to_string()).or_insert(0);
        if limit != 0 && *n >= limit {
            return Err(CoreError::OrgBusy(format!(
                "organization {org} already has {n} builds pending or building, as many as one \
                 org may have at once (builds_per_org = {limit}); deploy again once one has \
                 ended"
            )));
        }
        *n += 1;
        Ok(ActiveBuild {
            org: org.to_string(),
            active: self.active.clone(),
        })
    }

    /// Applies `ev` to `b` and stores the result; `b` unchanged when `ev` cannot happen.
    async fn step(&self, b: BuildRecord, ev: BuildEvent) -> BuildRecord {
        let Some(n) = next(&b, ev, now_ms()) else {
            return b;
        };
        if let Err(e) = self.store.update_build(&n).await {
            tracing::warn!(build = %n.id, error = %e, "cannot record the build's state");
        }
        n
    }

    /// Runs a pending build to its end.
    async fn run(self: Arc<Self>, b: BuildRecord) {
        let _slot = self.slots.clone().acquire_owned().await;
        let dir = self.build_dir(b.id);
        let log = match BuildLog::create(&dir.join("build.log")) {
            Ok(l) => l,
            Err(e) => {
                self.step(
                    b,
                    BuildEvent::Fail(format!("cannot write the build log: {e}")),
                )
                .await;
                return;
            }
        };
        let b = self.step(b, BuildEvent::Start).await;
        let begun = std::time::Instant::now();
        tracing::info!(build = %b.id, org = %b.org, hash = %b.context_hash, "build started");
        log.line(&format!(
            "Build {} of context {} ({} bytes)",
            b.id, b.context_hash, b.context_size
        ));
        let job = BuildJob {
            id: b.id,
            dir: dir.clone(),
            context: dir.join("app"),
            dockerfile_path: b.dockerfile_path.clone(),
        };
        let work = async {
            let (archive, app, cap) = (
                dir.join("context.tar.gz"),
                job.context.clone(),
                self.s.max_context_bytes.saturating_mul(4),
            );
            let unpacked = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&app).map_err(|e| e.to_string())?;
                crate::build::context::unpack(&archive, &app, cap)
            })
            .await
            .map_err(|e| format!("unpacking failed: {e}"))??;
            log.line(&format!(
                "Unpacked {} files ({} bytes)",
                unpacked.files, unpacked.bytes
            ));
            let builder = self
                .pick(job.context.join(&job.dockerfile_path).is_file())
                .await?;
            log.line(&format!("Builder: {}", builder.kind()));
            builder.build(&job, &log).await.map(|a| (a, builder.kind()))
        };
        let ev = match tokio::time::timeout(self.s.timeout, work).await {
            Ok(Ok((a, kind))) => BuildEvent::Succeed(a, kind),
            Ok(Err(msg)) => BuildEvent::Fail(msg),
            Err(_) => BuildEvent::TimedOut,
        };
        let secs = begun.elapsed().as_secs_f64();
        match &ev {
            BuildEvent::Succeed(..) => log.line(&format!("Build complete in {secs:.1} s")),
            BuildEvent::Fail(m) => log.line(&format!("Build failed after {secs:.1} s: {m}")),
            _ => log.line(&format!("Build timed out after {secs:.1} s")),
        }
        let ok = matches!(ev, BuildEvent::Succeed(..));
        let b = self.step(b, ev).await;
        tracing::info!(build = %b.id, status = b.status.as_str(), seconds = secs, "build ended");
        let _ = std::fs::remove_file(dir.join("context.tar.gz"));
        if !ok {
            let _ = remove_all_but_the_log(&dir);
        }
    }

    /// After a restart: builds this node left running (their directory is in its data dir;
    /// another node's are its own) end `failed`, and keep only their log, as a failed build
    /// does: what the stopped build's steps made (the context, the virtualenv, the build's
    /// home), which its build uid may own, goes, so a later holder of that uid finds nothing
    /// of it.
    pub async fn recover(&self) -> CoreResult<()> {
        for b in self.store.unfinished_builds().await? {
            let dir = self.build_dir(b.id);
            if !dir.exists() {
                continue;
            }
            let id = b.id;
            // Its steps' processes first (by the cgroups the build recorded): they may
            // still run, under the build's uid, in what is removed next.
            self.builder.recover(&dir).await;
            self.step(b, BuildEvent::Fail(STOPPED_DURING_BUILD.into()))
                .await;
            let left = tokio::task::spawn_blocking(move || remove_all_but_the_log(&dir)).await;
            if let Ok(Err(e)) = left {
                tracing::warn!(build = %id, error = %e, "could not remove what a build stopped by the server left");
            }
        }
        Ok(())
    }

    /// The build retention: deletes the finished builds this node made (recorded on the
    /// build; for builds made before that, their directory is in its data dir) that no deploy
    /// took and that did not complete within `keep`, unless a deployment runs them: one in
    /// the store (an agent's current deployment, or one a recorded instance runs, on any node)
    /// or one `in_use` gives (this node's live instances). The record goes first, in one step
    /// that a deploy taking the build meanwhile prevents (`BuildStore::delete_unused_build`;
    /// a deploy after it finds no build), then the directory and what the builder made
    /// elsewhere (a Docker build's image). Returns how many were deleted.
    pub async fn collect(
        &self,
        keep: Duration,
        in_use: impl Fn() -> Vec<Arc<crate::model::DeploymentRecord>>,
    ) -> CoreResult<usize> {
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(keep_ms);
        let old = self.store.unused_builds(cutoff).await?;
        if old.is_empty() {
            return Ok(0);
        }
        let mut deps = in_use();
        deps.extend(self.deployments_in_store().await?);
        let used = self.used_by(&deps);
        let mut deleted = 0;
        for b in old {
            let dir = self.build_dir(b.id);
            let ours = if b.node_id.is_empty() {
                dir.is_dir()
            } else {
                b.node_id == self.s.node_id
            };
            if !ours || used.contains(&b.id) {
                continue;
            }
            if !self.store.delete_unused_build(b.id, cutoff).await? {
                continue;
            }
            deleted += 1;
            if let Some(art) = &b.artifact {
                let builder = match b.builder.as_deref() {
                    Some("docker") => self.docker.lock().clone(),
                    _ => Some(self.builder.clone()),
                };
                let removed = match builder {
                    Some(x) => x.remove(b.id, art).await,
                    None => Err("this server has no Docker runtime now".into()),
                };
                if let Err(e) = removed {
                    tracing::warn!(build = %b.id, artifact = %art, error = %e, "could not remove a deleted build's image; remove it by hand");
                }
            }
            let d = dir.clone();
            let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&d) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            })
            .await;
            if let Ok(Err(e)) = removed {
                tracing::warn!(build = %b.id, dir = %dir.display(), error = %e, "could not remove a deleted build's directory");
            }
            tracing::info!(build = %b.id, org = %b.org, status = b.status.as_str(), "deleted a build past its retention");
        }
        Ok(deleted)
    }

    /// The deployments the store says may run: every live agent's current one, and those of
    /// the recorded instances (of every node).
    async fn deployments_in_store(&self) -> CoreResult<Vec<Arc<crate::model::DeploymentRecord>>> {
        let mut ids: HashSet<Uuid> = self
            .store
            .list_all_agents()
            .await?
            .iter()
            .map(|a| a.desired_deployment_id)
            .collect();
        ids.extend(
            self.store
                .list_instances()
                .await?
                .iter()
                .map(|i| i.deployment_id),
        );
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(d) = self.store.get_deployment(id).await? {
                out.push(Arc::new(d));
            }
        }
        Ok(out)
    }

    /// The builds that deployments `deps` run: their `buildId`, a Docker build's image
    /// (`cattery-build:<id>`) given as `image`, and any build of this node whose directory
    /// their image (`local:`) or Python lies in (also through a symlinked path).
    fn used_by(&self, deps: &[Arc<crate::model::DeploymentRecord>]) -> HashSet<Uuid> {
        let mut out = HashSet::new();
        let under_builds = |p: &std::path::Path| -> Option<Uuid> {
            let rest = p.strip_prefix(&self.s.dir).ok()?;
            let first = rest.components().next()?;
            Uuid::parse_str(&first.as_os_str().to_string_lossy()).ok()
        };
        for d in deps {
            out.extend(d.spec.build_id);
            let image = d.spec.image.as_deref().unwrap_or_default();
            if let Some(id) = image
                .strip_prefix("cattery-build:")
                .and_then(|t| Uuid::parse_str(t).ok())
            {
                out.insert(id);
            }
            let paths = [d.spec.local_dir(), d.spec.python.as_deref()];
            for p in paths.into_iter().flatten().map(std::path::Path::new) {
                let id = under_builds(p)
                    .or_else(|| std::fs::canonicalize(p).ok().and_then(|c| under_builds(&c)));
                out.extend(id);
            }
        }
        out
    }

    /// `org`'s build `id`. Errors: 404.
    pub async fn get(&self, org: &str, id: &str) -> CoreResult<BuildRecord> {
        let nf = || CoreError::NotFound(format!("build {id} not found"));
        let id = Uuid::parse_str(id).map_err(|_| nf())?;
        self.store.get_build(org, id).await?.ok_or_else(nf)
    }

    /// `org`'s builds matching `f` (limit clamped to 1..=100, default 20) and their total.
    pub async fn list(&self, org: &str, mut f: BuildFilter) -> CoreResult<(Vec<BuildRecord>, u64)> {
        f.limit = if f.limit == 0 {
            LIST_DEFAULT
        } else {
            f.limit.min(LIST_MAX)
        };
        Ok(self.store.list_builds(org, &f).await?)
    }

    /// The last `limit` lines of build `id`'s log. Errors: 404.
    pub async fn logs(&self, org: &str, id: &str, limit: usize) -> CoreResult<Vec<String>> {
        let b = self.get(org, id).await?;
        let path = self.build_dir(b.id).join("build.log");
        let limit = limit.clamp(1, LOGS_MAX);
        tokio::task::spawn_blocking(move || BuildLog::tail(&path, limit))
            .await
            .map_err(|e| CoreError::Store(crate::store::StoreError::Unavailable(e.to_string())))
    }
}

/// Lets instances pass through a build directory (never list it).
fn open_dir(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings for a test's builds under `dir`: no per-org limit (a test sets those it checks).
    fn settings(mode: BuilderMode, dir: std::path::PathBuf) -> BuildSettings {
        BuildSettings {
            mode,
            dir,
            max_context_bytes: 1 << 20,
            timeout: Duration::from_secs(60),
            node_id: "n1".into(),
            uploads_per_org: 0,
            builds_per_org: 0,
            kept_per_org: 0,
        }
    }

    /// A relative program runs from `workingDir`: under the builds directory that way, it
    /// names its build as an absolute path there does.
    #[test]
    fn a_relative_program_under_the_working_directory_names_its_build() {
        let dir = tempfile::tempdir().unwrap();
        let builds = dir.path().join("builds");
        let id = Uuid::new_v4();
        std::fs::create_dir_all(builds.join(id.to_string()).join("app")).unwrap();
        let spec = DeploymentSpec {
            command: Some(vec![format!("builds/{id}/app/run.sh")]),
            working_dir: Some(dir.path().display().to_string()),
            ..DeploymentSpec::default()
        };
        assert_eq!(named_builds(&spec, &builds), [id.to_string()]);
        // Outside the builds directory, it names none.
        let spec = DeploymentSpec {
            command: Some(vec!["bin/run.sh".into()]),
            working_dir: Some(dir.path().display().to_string()),
            ..DeploymentSpec::default()
        };
        assert!(named_builds(&spec, &builds).is_empty());
    }

    fn rec(status: BuildStatus) -> BuildRecord {
        BuildRecord {
            id: Uuid::new_v4(),
            org: "o".into(),
            status,
            region: "local".into(),
            context_hash: "0123456789abcdef".into(),
            dockerfile_path: "Dockerfile".into(),
            artifact: None,
            python: None,
            builder: None,
            error_message: None,
            context_size: 1,
            created_ms: 1,
            started_ms: None,
            completed_ms: None,
            updated_ms: 1,
            node_id: "n1".into(),
        }
    }

    fn art() -> Artifact {
        Artifact {
            image: "local:/b/app".into(),
            python: Some("/b/venv/bin/python".into()),
        }
    }

    #[test]
    fn state_machine() {
        use BuildStatus::*;
        let p = rec(Pending);
        let b = next(&p, BuildEvent::Start, 5).unwrap();
        assert_eq!((b.status, b.started_ms), (Building, Some(5)));
        let s = next(&b, BuildEvent::Succeed(art(), "venv"), 9).unwrap();
        assert_eq!(s.status, Success);
        assert_eq!(s.artifact.as_deref(), Some("local:/b/app"));
        assert_eq!(s.completed_ms, Some(9));
        let f = next(&b, BuildEvent::Fail("pip".into()), 9).unwrap();
        assert_eq!(
            (f.status, f.error_message.as_deref()),
            (Failed, Some("pip"))
        );
        assert_eq!(next(&b, BuildEvent::TimedOut, 9).unwrap().status, Timeout);
        assert_eq!(
            next(&p, BuildEvent::Fail("x".into()), 9).unwrap().status,
            Failed
        );
        // Nothing skips `building`, and nothing leaves a terminal state.
        assert!(next(&p, BuildEvent::Succeed(art(), "venv"), 9).is_none());
        assert!(next(&p, BuildEvent::TimedOut, 9).is_none());
        for t in [&s, &f] {
            assert!(next(t, BuildEvent::Start, 10).is_none());
            assert!(next(t, BuildEvent::Fail("y".into()), 10).is_none());
            assert!(next(t, BuildEvent::Succeed(art(), "venv"), 10).is_none());
        }
        assert!(next(&b, BuildEvent::Start, 10).is_none());
    }

    #[test]
    fn cache_reuses_success_joins_running_retries_failures() {
        use BuildStatus::*;
        assert_eq!(decide(&[]), CacheDecision::Build);
        assert_eq!(decide(&[rec(Failed), rec(Timeout)]), CacheDecision::Build);
        let ok = rec(Success);
        assert_eq!(
            decide(&[rec(Failed), rec(Building), ok.clone()]),
            CacheDecision::Reuse(ok)
        );
        let running = rec(Pending);
        assert_eq!(
            decide(&[rec(Failed), running.clone()]),
            CacheDecision::Join(running)
        );
    }

    #[test]
    fn builder_choice() {
        use BuilderMode::*;
        assert_eq!(use_docker(Auto, true, true), Ok(true));
        assert_eq!(use_docker(Auto, true, false), Ok(false));
        assert_eq!(use_docker(Auto, false, true), Ok(false));
        assert_eq!(use_docker(Venv, true, true), Ok(false));
        assert_eq!(use_docker(Docker, true, true), Ok(true));
        assert!(use_docker(Docker, false, true)
            .unwrap_err()
            .contains("no Dockerfile"));
        assert!(use_docker(Docker, true, false)
            .unwrap_err()
            .contains("no Docker engine"));
        assert_eq!(BuilderMode::parse("venv"), Some(Venv));
        assert_eq!(BuilderMode::parse("kaniko"), None);
    }

    #[test]
    fn deployable_checks_found_region_and_status() {
        use BuildStatus::*;
        let msg = |r: CoreResult<Artifact>| r.unwrap_err().to_string();
        assert!(msg(deployable("x", None, "local")).contains("build x not found"));
        let mut s = rec(Success);
        s.artifact = Some("local:/b/app".into());
        s.python = Some("/b/venv/bin/python".into());
        assert_eq!(deployable("x", Some(&s), "local").unwrap(), art());
        assert!(msg(deployable("x", Some(&s), "eu")).contains("region local"));
        let mut f = rec(Failed);
        f.error_message = Some("pip install failed".into());
        let m = msg(deployable("x", Some(&f), "local"));
        assert!(
            m.contains("not ready (status failed: pip install failed)"),
            "{m}"
        );
        assert!(msg(deployable("x", Some(&rec(Building)), "local")).contains("status building"));
    }

    /// A builder that records what it was asked to remove (and which build directories to
    /// recover, as `(id, "recover")`).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(Uuid, String)>>);

    #[async_trait::async_trait]
    impl Builder for Recorder {
        fn kind(&self) -> &'static str {
            "docker"
        }
        async fn build(&self, _: &BuildJob, _: &BuildLog) -> Result<Artifact, String> {
            Err("not in this test".into())
        }
        async fn remove(&self, build: Uuid, artifact: &str) -> Result<(), String> {
            self.0.lock().push((build, artifact.to_string()));
            Ok(())
        }
        async fn recover(&self, dir: &Path) {
            let id = Uuid::parse_str(&dir.file_name().unwrap().to_string_lossy()).unwrap();
            self.0.lock().push((id, "recover".into()));
        }
    }

    /// The retention deletes finished builds of this node (by the record; by the directory
    /// for builds made before nodes were recorded) neither used nor completed within `keep`
    /// that no deployment runs (this node's in memory, or any in the store; by `buildId`, by
    /// a Docker build's image, or by its `local:` directory), with their directory and their
    /// builder's image. It keeps recent, recently used, unfinished, in-use and other nodes'
    /// builds.
    #[tokio::test]
    async fn retention_deletes_only_old_unused_builds_of_this_node() {
        use crate::model::{AgentRecord, DeploymentRecord, DeploymentSpec};
        use crate::store::{self, OpenMode};
        use BuildStatus::*;
        let tmp = tempfile::tempdir().unwrap();
        let store = store::open(&Default::default(), tmp.path(), OpenMode::Create)
            .await
            .unwrap();
        store.ensure_org("o").await.unwrap();
        let dir = tmp.path().join("builds");
        let docker = Arc::new(Recorder::default());
        let builds = Builds::new(
            store.clone(),
            Arc::new(Recorder::default()),
            settings(BuilderMode::Auto, dir.clone()),
        );
        builds.set_docker_builder(docker.clone());
        let (now, day) = (now_ms(), 86_400_000);
        let made = |status, age_days: Option<i64>, builder: &str, node: &str, has_dir: bool| {
            let mut b = rec(status);
            b.completed_ms = age_days.map(|d| now - d * day);
            b.builder = Some(builder.into());
            b.node_id = node.into();
            b.artifact = Some(if builder == "docker" {
                format!("cattery-build:{}", b.id)
            } else {
                format!("local:{}/{}/app", dir.display(), b.id)
            });
            if has_dir {
                std::fs::create_dir_all(dir.join(b.id.to_string()).join("app")).unwrap();
            }
            b
        };
        let cases = [
            // (build, kept)
            (made(Success, Some(10), "docker", "n1", true), false),
            (made(Failed, Some(10), "venv", "n1", true), false),
            (made(Success, Some(10), "venv", "n1", false), false), // its directory already gone
            (made(Success, Some(10), "venv", "", true), false), // made before nodes were recorded
            (made(Success, Some(1), "venv", "n1", true), true), // recent
            (made(Success, Some(10), "venv", "n1", true), true), // used a moment ago (below)
            (made(Building, None, "venv", "n1", true), true),
            (made(Success, Some(10), "venv", "n2", true), true), // another node's
            (made(Success, Some(10), "venv", "", false), true),  // another node's, before nodes
            (made(Success, Some(10), "venv", "n1", true), true), // buildId, this node's memory
            (made(Success, Some(10), "venv", "n1", true), true), // local: path, memory
            (made(Success, Some(10), "docker", "n1", true), true), // image, an agent in the store
        ];
        let had_dir: Vec<bool> = cases
            .iter()
            .map(|(b, _)| dir.join(b.id.to_string()).exists())
            .collect();
        for (b, _) in &cases {
            store.insert_build(b, None).await.unwrap();
        }
        let id = |i: usize| cases[i].0.id;
        store.use_build("o", id(5), now).await.unwrap().unwrap();
        let dep = |spec: DeploymentSpec| DeploymentRecord {
            id: Uuid::new_v4(),
            agent_id: Uuid::new_v4(),
            spec,
            created_ms: now,
        };
        let in_memory = vec![
            Arc::new(dep(DeploymentSpec {
                build_id: Some(id(9)),
                ..Default::default()
            })),
            Arc::new(dep(DeploymentSpec {
                image: cases[10].0.artifact.clone(),
                ..Default::default()
            })),
        ];
        let stored = dep(DeploymentSpec {
            image: cases[11].0.artifact.clone(),
            ..Default::default()
        });
        let agent = AgentRecord {
            id: stored.agent_id,
            org: "o".into(),
            name: "a".into(),
            region: "local".into(),
            min_agents: 0,
            max_agents: 1,
            desired_deployment_id: stored.id,
            created_ms: now,
            updated_ms: now,
            deleted_ms: None,
        };
        store.create_agent(&agent, &stored, None).await.unwrap();
        let keep = Duration::from_secs(7 * 86_400);
        let n = builds.collect(keep, || in_memory.clone()).await.unwrap();
        assert_eq!(n, 4);
        for (i, (b, kept)) in cases.iter().enumerate() {
            let found = store.get_build("o", b.id).await.unwrap().is_some();
            assert_eq!(found, *kept, "record of case {i}");
            let has = dir.join(b.id.to_string()).exists();
            assert_eq!(has, *kept && had_dir[i], "directory of case {i}");
        }
        assert_eq!(
            docker.0.lock().clone(),
            [(id(0), format!("cattery-build:{}", id(0)))],
            "the Docker build's image, and nothing else"
        );
        // Nothing more to delete on a second pass.
        assert_eq!(builds.collect(keep, || in_memory.clone()).await.unwrap(), 0);
    }

    /// A builder whose builds each wait for a permit, then fail.
    struct Held(Semaphore);

    #[async_trait::async_trait]
    impl Builder for Held {
        fn kind(&self) -> &'static str {
            "venv"
        }
        async fn build(&self, _: &BuildJob, _: &BuildLog) -> Result<Artifact, String> {
            let _ = self.0.acquire().await.map_err(|e| e.to_string())?.forget();
            Err("released".into())
        }
    }

    /// An org may hold `uploads_per_org` upload URLs not yet built and have `builds_per_org`
    /// builds pending or building on a node: past either, 429 (`OrgBusy`), other orgs
    /// unaffected; a build refused keeps its upload, which builds once one of the org's
    /// builds ended, and a built or expired upload no longer counts.
    #[tokio::test]
    async fn uploads_and_builds_at_once_are_bounded_per_org() {
        use crate::store::{self, OpenMode};
        let tmp = tempfile::tempdir().unwrap();
        let store = store::open(&Default::default(), tmp.path(), OpenMode::Create)
            .await
            .unwrap();
        for org in ["a", "b"] {
            store.ensure_org(org).await.unwrap();
        }
        let held = Arc::new(Held(Semaphore::new(0)));
        let builds = Builds::new(
            store.clone(),
            held.clone(),
            BuildSettings {
                uploads_per_org: 3,
                builds_per_org: 2,
                ..settings(BuilderMode::Venv, tmp.path().join("builds"))
            },
        );
        let defaults = AgentDefaults {
            regions: vec!["local".into()],
            default_region: "local".into(),
        };
        // An uploaded context (each different, so none is a cached build of another).
        let uploaded = |org: &'static str, n: u8| {
            let builds = builds.clone();
            async move {
                let u = builds.new_upload(org)?;
                let mut sink = builds.begin_upload(u.id, &u.token).await?;
                let gz = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                let mut tar = tar::Builder::new(gz);
                let mut h = tar::Header::new_gnu();
                h.set_size(1);
                h.set_mode(0o644);
                h.set_cksum();
                tar.append_data(&mut h, "bot.py", &[b'0' + n][..]).unwrap();
                sink.write(&tar.into_inner().unwrap().finish().unwrap())
                    .await?;
                builds.finish_upload(sink).await?;
                CoreResult::Ok(u.id.to_string())
            }
        };
        let busy = |r: CoreResult<_>, what: &str| match r {
            Err(CoreError::OrgBusy(m)) => assert!(m.contains(what), "{m}"),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("not refused"),
        };
        let mut ups = Vec::new();
        for n in 0..3 {
            ups.push(uploaded("a", n).await.unwrap());
        }
        busy(
            builds.new_upload("a").map(drop),
            "build_uploads_per_org = 3",
        );
        uploaded("b", 9).await.unwrap();
        // Two builds of org a: the first builds (held), the second waits for the slot.
        let first = builds
            .create(&defaults, "a", &ups[0], None, None)
            .await
            .unwrap()
            .0;
        builds
            .create(&defaults, "a", &ups[1], None, None)
            .await
            .unwrap();
        busy(
            builds
                .create(&defaults, "a", &ups[2], None, None)
                .await
                .map(drop),
            "builds_per_org = 2",
        );
        // The built uploads count no more; the refused one still does.
        let fourth = uploaded("a", 3).await.unwrap();
        uploaded("a", 4).await.unwrap();
        busy(
            builds.new_upload("a").map(drop),
            "build_uploads_per_org = 3",
        );
        // Another org builds meanwhile (it waits for the one slot, it is not refused).
        let other = uploaded("b", 8).await.unwrap();
        builds
            .create(&defaults, "b", &other, None, None)
            .await
            .unwrap();
        // Once org a's first build ends, the refused upload builds.
        held.0.add_permits(1);
        for _ in 0..500 {
            let b = store.get_build("a", first.id).await.unwrap().unwrap();
            if b.status == BuildStatus::Failed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut again = Err(CoreError::Conflict("not tried".into()));
        for _ in 0..500 {
            again = builds.create(&defaults, "a", &ups[2], None, None).await;
            if !matches!(again, Err(CoreError::OrgBusy(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        again.unwrap();
        busy(
            builds
                .create(&defaults, "a", &fourth, None, None)
                .await
                .map(drop),
            "builds_per_org = 2",
        );
        held.0.add_permits(100);
    }

    /// An org keeps at most `kept_per_org` builds: past it a new build is 403
    /// `ORG_LIMIT_REACHED` naming the limit, and its upload stays unspent; another org, and
    /// a cached build of the same context, are not refused; once a kept build is deleted,
    /// the same upload builds.
    #[tokio::test]
    async fn the_builds_an_org_keeps_are_bounded() {
        use crate::store::{self, OpenMode};
        let tmp = tempfile::tempdir().unwrap();
        let store = store::open(&Default::default(), tmp.path(), OpenMode::Create)
            .await
            .unwrap();
        for org in ["o", "p"] {
            store.ensure_org(org).await.unwrap();
        }
        let builds = Builds::new(
            store.clone(),
            Arc::new(Held(Semaphore::new(100))),
            BuildSettings {
                kept_per_org: 2,
                ..settings(BuilderMode::Venv, tmp.path().join("builds"))
            },
        );
        let defaults = AgentDefaults {
            regions: vec!["local".into()],
            default_region: "local".into(),
        };
        let upload = |org: &'static str| {
            let builds = builds.clone();
            async move {
                let u = builds.new_upload(org).unwrap();
                let mut sink = builds.begin_upload(u.id, &u.token).await.unwrap();
                sink.write(b"a context").await.unwrap();
                builds.finish_upload(sink).await.unwrap();
                u.id.to_string()
            }
        };
        let kept: Vec<BuildRecord> = (0..2).map(|_| rec(BuildStatus::Failed)).collect();
        for b in &kept {
            store.insert_build(b, None).await.unwrap();
        }
        let up = upload("o").await;
        match builds.create(&defaults, "o", &up, None, None).await {
            Err(CoreError::OrgLimit(m)) => {
                assert!(
                    m.contains("limit of 2 builds kept (builds_kept_per_org = 2)"),
                    "{m}"
                )
            }
            r => panic!("not refused: {r:?}"),
        }
        let other = upload("p").await;
        builds
            .create(&defaults, "p", &other, None, None)
            .await
            .unwrap();
        assert!(store
            .delete_unused_build(kept[0].id, i64::MAX)
            .await
            .unwrap());
        let (b, cached) = builds
            .create(&defaults, "o", &up, None, None)
            .await
            .unwrap();
        assert!(!cached);
        assert_eq!(b.org, "o");
    }

    /// Builds of an org created at the same moment never take it past `kept_per_org`: the
    /// store counts with the insert. The one refused keeps its upload unspent (asked again,
    /// it is refused by the limit, not as an upload already built).
    #[tokio::test]
    async fn builds_created_at_once_never_pass_the_kept_limit() {
        use crate::store::{self, OpenMode};
        let tmp = tempfile::tempdir().unwrap();
        let store = store::open(&Default::default(), tmp.path(), OpenMode::Create)
            .await
            .unwrap();
        store.ensure_org("o").await.unwrap();
        let builds = Builds::new(
            store.clone(),
            Arc::new(Held(Semaphore::new(0))),
            BuildSettings {
                kept_per_org: 1,
                ..settings(BuilderMode::Venv, tmp.path().join("builds"))
            },
        );
        let defaults = AgentDefaults {
            regions: vec!["local".into()],
            default_region: "local".into(),
        };
        let mut ups = Vec::new();
        for context in [&b"one context"[..], &b"another context"[..]] {
            let u = builds.new_upload("o").unwrap();
            let mut sink = builds.begin_upload(u.id, &u.token).await.unwrap();
            sink.write(context).await.unwrap();
            builds.finish_upload(sink).await.unwrap();
            ups.push(u.id.to_string());
        }
        let (a, b) = tokio::join!(
            builds.create(&defaults, "o", &ups[0], None, None),
            builds.create(&defaults, "o", &ups[1], None, None)
        );
        let f = BuildFilter {
            limit: 10,
            ..Default::default()
        };
        assert_eq!(
            store.list_builds("o", &f).await.unwrap().1,
            1,
            "{a:?} {b:?}"
        );
        let refused = match (&a, &b) {
            (Ok(_), Err(CoreError::OrgLimit(_))) => &ups[1],
            (Err(CoreError::OrgLimit(_)), Ok(_)) => &ups[0],
            _ => panic!("not one build and one refusal: {a:?} {b:?}"),
        };
        let again = builds.create(&defaults, "o", refused, None, None).await;
        assert!(matches!(again, Err(CoreError::OrgLimit(_))), "{again:?}");
    }

    /// A build the server stopped (it crashed or was killed mid-build) ends `failed` at the
    /// next start and keeps only its log: its builder ends what its steps left running (by
    /// the cgroups they recorded), and its context, virtualenv and home (which its build
    /// uid owned) go. Another node's build, and a finished one, are left alone.
    #[tokio::test]
    async fn a_build_cut_by_a_server_stop_keeps_only_its_log() {
        use crate::store::{self, OpenMode};
        let tmp = tempfile::tempdir().unwrap();
        let store = store::open(&Default::default(), tmp.path(), OpenMode::Create)
            .await
            .unwrap();
        store.ensure_org("o").await.unwrap();
        let dir = tmp.path().join("builds");
        let recorder = Arc::new(Recorder::default());
        let builds = Builds::new(
            store.clone(),
            recorder.clone(),
            settings(BuilderMode::Venv, dir.clone()),
        );
        let made = |status| {
            let mut b = rec(status);
            b.node_id = "n1".into();
            let d = dir.join(b.id.to_string());
            for sub in ["app/pkg", "venv/lib", "home/.cache"] {
                std::fs::create_dir_all(d.join(sub)).unwrap();
                std::fs::write(d.join(sub).join("f"), "x").unwrap();
            }
            std::fs::write(d.join("context.tar.gz"), "x").unwrap();
            std::fs::write(d.join("build.log"), "Build ...\n").unwrap();
            b
        };
        let (cut, done) = (made(BuildStatus::Building), made(BuildStatus::Success));
        for b in [&cut, &done] {
            store.insert_build(b, None).await.unwrap();
        }
        builds.recover().await.unwrap();
        let got = store.get_build("o", cut.id).await.unwrap().unwrap();
        assert_eq!(got.status, BuildStatus::Failed);
        let names = |id: Uuid| {
            let mut v: Vec<String> = std::fs::read_dir(dir.join(id.to_string()))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(cut.id), ["build.log"]);
        assert_eq!(names(done.id).len(), 5, "a finished build is left alone");
        // What its steps left running is ended by its builder, before its files go.
        assert_eq!(*recorder.0.lock(), [(cut.id, "recover".to_string())]);
    }
}
