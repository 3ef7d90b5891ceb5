//! The Docker builder: the context's `Dockerfile` built into an image by the Docker runtime's
//! engine, the image the agent then runs in a container (docs/docker.md).
//!
//! `FROM dailyco/pipecat-base[:tag]` (Pipecat Cloud's base image, which a public registry
//! serves and this machine may not reach) is rewritten to `--build-base-image`, a local image
//! that follows the same contract (scripts/docker-images.sh builds `cattery-test/pipecat-base`);
//! every other line of the Dockerfile is built as written.

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt as _;

use super::buildkit::{engine_has_buildkit, Progress};
use super::{Artifact, BuildJob, BuildLog, Builder};
use crate::build::context::is_inside as inside;
use crate::runtime::docker::DockerRuntime;

/// Pipecat Cloud's base image, as Dockerfiles name it.
pub const PIPECAT_BASE: &str = "dailyco/pipecat-base";

/// The Docker builder.
pub struct DockerBuilder {
    /// The runtime whose engine builds.
    pub docker: Arc<DockerRuntime>,
    /// What `FROM dailyco/pipecat-base...` becomes.
    pub base_image: String,
    /// The network of the build's `RUN` steps (`--build-network`); empty: the engine's.
    pub network: String,
}

/// `text` with every `FROM dailyco/pipecat-base[:tag|@digest]` naming `base` instead, and
/// how many lines changed.
pub fn map_base(text: &str, base: &str) -> (String, usize) {
    let mut n = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            let mut words = t.split_whitespace();
            let (Some(kw), Some(img)) = (words.next(), words.next()) else {
                return l.to_string();
            };
            let name = img.split(['@', ':']).next().unwrap_or(img);
            let name = name.strip_prefix("docker.io/").unwrap_or(name);
            if !kw.eq_ignore_ascii_case("FROM") || name != PIPECAT_BASE {
                return l.to_string();
            }
            n += 1;
            let rest: Vec<&str> = words.collect();
            let mut line = format!("FROM {base}");
            if !rest.is_empty() {
                line.push(' ');
                line.push_str(&rest.join(" "));
            }
            line
        })
        .collect();
    (out.join("\n") + "\n", n)
}

/// The image a build makes.
fn image_tag(build: uuid::Uuid) -> String {
    format!("cattery-build:{build}")
}

#[async_trait]
impl Builder for DockerBuilder {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn available(&self) -> bool {
        self.docker.engine().await.is_ok()
    }

    /// Removes the build's image, `cattery-build:<id>` (no other image: a build never made
    /// one). An image already gone is not an error.
    async fn remove(&self, build: uuid::Uuid, artifact: &str) -> Result<(), String> {
        if artifact != image_tag(build) {
            return Ok(());
        }
        let engine = self.docker.engine().await?;
        match engine
            .remove_image(
                artifact,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_)
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn build(&self, job: &BuildJob, log: &BuildLog) -> Result<Artifact, String> {
        if !inside(&job.dockerfile_path) {
            return Err(format!(
                "dockerfilePath {:?} must be a relative path inside the context",
                job.dockerfile_path
            ));
        }
        let df = job.context.join(&job.dockerfile_path);
        let text = std::fs::read_to_string(&df)
            .map_err(|e| format!("the context has no readable {}: {e}", job.dockerfile_path))?;
        let (mapped, n) = map_base(&text, &self.base_image);
        if n > 0 {
            log.line(&format!(
                "{PIPECAT_BASE} is built as {} (--build-base-image)",
                self.base_image
            ));
            std::fs::write(&df, mapped).map_err(|e| format!("rewriting the Dockerfile: {e}"))?;
        }
        let engine = self.docker.engine().await?;
        let ctx = job.context.clone();
        let tarball = tokio::task::spawn_blocking(move || {
            let mut b = tar::Builder::new(Vec::new());
            b.follow_symlinks(false);
            b.append_dir_all(".", &ctx)?;
            b.into_inner()
        })
        .await
        .map_err(|e| format!("packing the context: {e}"))?
        .map_err(|e| format!("packing the context: {e}"))?;
        let tarball = bytes::Bytes::from(tarball);
        let tag = image_tag(job.id);
        let version = engine.version().await.ok();
        let (api, os) = version.as_ref().map_or((None, None), |v| {
            (v.api_version.as_deref(), v.os.as_deref())
        });
        if engine_has_buildkit(api, os) {
            log.line(&format!(
                "docker build -t {tag} -f {} . (BuildKit)",
                job.dockerfile_path
            ));
            let net = self.network.as_str();
            match buildkit_build(&engine, job, &tag, net, tarball.clone(), log).await {
                Ok(()) => {}
                Err(BuildkitFailure::Build(m)) => return Err(m),
                Err(BuildkitFailure::NotRun(m)) => {
                    log.line(&format!(
                        "The engine ran no BuildKit build ({m}): building with the classic builder, where RUN --mount is not supported"
                    ));
                    classic_build(&engine, job, &tag, net, tarball, log).await?;
                }
            }
        } else {
            log.line(&format!(
                "The engine (API {}, {}) has no BuildKit: building with the classic builder, where RUN --mount is not supported",
                api.unwrap_or("version unknown"),
                os.unwrap_or("OS unknown")
            ));
            log.line(&format!(
                "docker build -t {tag} -f {} .",
                job.dockerfile_path
            ));
            classic_build(&engine, job, &tag, &self.network, tarball, log).await?;
        }
        log.line(&format!("Built image {tag}"));
        if let Err(e) = self.check_runner(&engine, job.id, &tag, log).await {
            // A failed build keeps only its log: its image goes too.
            let _ = self.remove(job.id, &tag).await;
            return Err(e);
        }
        Ok(Artifact {
            image: tag,
            python: None,
        })
    }
}

/// How long the check of a built image ([`DockerBuilder::check_runner`]) may take.
const RUNNER_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl DockerBuilder {
    /// Checks that image `tag` can still run the base image's runner: when the image starts
    /// as the base image does (the same entry point and command, so the base's runner is what
    /// serves its sessions), a throwaway container of it, with no network, must import what
    /// the runner imports ([`super::RUNNER_IMPORTS`]). A Dockerfile's `uv sync` makes the
    /// base's venv exactly the project's lock, so a lock without `pipecat-ai[runner]` builds
    /// an image every session of which would fail at its start (503 `INSTANCE_EXITED`): the
    /// build fails instead, saying what is missing. An image with an entry command of its own
    /// runs its own server, which is not checked.
    async fn check_runner(
        &self,
        engine: &bollard::Docker,
        build: uuid::Uuid,
        tag: &str,
        log: &BuildLog,
    ) -> Result<(), String> {
        let entry = |i: bollard::models::ImageInspect| {
            i.config.map(|c| (c.entrypoint, c.cmd)).unwrap_or_default()
        };
        let Ok(base) = engine.inspect_image(&self.base_image).await else {
            return Ok(());
        };
        let built = engine
            .inspect_image(tag)
            .await
            .map_err(|e| format!("docker build failed: the engine has no image {tag} ({e})"))?;
        if entry(built) != entry(base) {
            log.line(&format!(
                "The image does not start as {} does (its entry point or command differ): what its server needs is not checked",
                self.base_image
            ));
            return Ok(());
        }
        let code = super::RUNNER_IMPORTS;
        log.line(&format!(
            "Checking that the image can run {}'s runner: python -c '{code}'",
            self.base_image
        ));
        // Bounded inside: the check's container is gone before this returns, so removing
        // the image of a failed check never races a container that still uses it.
        let (ok, output) = run_check(engine, build, tag, code, RUNNER_CHECK_TIMEOUT).await?;
        for l in &output {
            log.output(l);
        }
        if ok {
            return Ok(());
        }
        let why = output.last().map_or("no output", |l| l.trim());
        let m = format!(
            "the built image cannot import fastapi and uvicorn, which {}'s runner needs to \
             serve sessions ({why}): add them to the project's dependencies (pipecat-ai[runner] \
             brings both; a uv sync leaves in /app/.venv only what uv.lock names)",
            self.base_image
        );
        log.line(&m);
        Err(m)
    }
}

/// Runs `python -c code` in a throwaway container of `image`, `cattery-build-check-<build>`
/// (no network, bounded, no privileges): whether it exited 0 within `limit`, and its output.
/// The container is killed and removed before this returns, whether the check ended, failed
/// or ran out of time (and in the background when the build is cut meanwhile), so the image
/// is free to remove once it has. `Err`: the engine could not run it.
async fn run_check(
    engine: &bollard::Docker,
    build: uuid::Uuid,
    image: &str,
    code: &str,
    limit: std::time::Duration,
) -> Result<(bool, Vec<String>), String> {
    use bollard::models::{ContainerCreateBody, HostConfig};
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        entrypoint: Some(vec!["python".into(), "-c".into(), code.into()]),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            memory: Some(512 << 20),
            pids_limit: Some(256),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = format!("cattery-build-check-{build}");
    let opts = bollard::query_parameters::CreateContainerOptionsBuilder::default()
        .name(&name)
        .build();
    let id = engine
        .create_container(Some(opts), body)
        .await
        .map_err(check_failed)?
        .id;
    let container = RemoveOnDrop(engine.clone(), id);
    let r = tokio::time::timeout(limit, run_created(engine, &container.1))
        .await
        .unwrap_or_else(|_| {
            let secs = limit.as_secs();
            Ok((
                false,
                vec![format!("the check did not end within {secs} s")],
            ))
        });
    container.remove().await;
    r
}

/// The `errorMessage` of a build whose image the engine could not check.
fn check_failed(e: bollard::errors::Error) -> String {
    format!("docker build failed: checking the built image: {e}")
}

/// Starts container `id` and waits for its end: whether it exited 0, and its output.
async fn run_created(engine: &bollard::Docker, id: &str) -> Result<(bool, Vec<String>), String> {
    if let Err(e) = engine
        .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
        .await
    {
        // No `python` to start: the runner cannot start either.
        return Ok((false, vec![e.to_string()]));
    }
    let mut wait = std::pin::pin!(
        engine.wait_container(id, None::<bollard::query_parameters::WaitContainerOptions>)
    );
    let exit = match wait.next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => return Err(check_failed(e)),
        None => return Err("docker build failed: checking the built image: no exit".into()),
    };
    let opts = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .build();
    let mut output = Vec::new();
    let mut logs = std::pin::pin!(engine.logs(id, Some(opts)));
    while let Some(Ok(chunk)) = logs.next().await {
        let text = String::from_utf8_lossy(&chunk.into_bytes()).into_owned();
        output.extend(text.lines().map(str::to_string));
    }
    Ok((exit == 0, output))
}

/// A container removed when dropped (in the background: a build cut meanwhile), unless
/// [`RemoveOnDrop::remove`] removed it first.
struct RemoveOnDrop(bollard::Docker, String);

impl RemoveOnDrop {
    fn options() -> bollard::query_parameters::RemoveContainerOptions {
        bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build()
    }

    /// Removes it now (before its image can be removed).
    async fn remove(mut self) {
        let id = std::mem::take(&mut self.1);
        if let Err(e) = self.0.remove_container(&id, Some(Self::options())).await {
            tracing::warn!(container = %id, error = %e, "cannot remove a build's check container");
        }
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let (engine, id) = (self.0.clone(), std::mem::take(&mut self.1));
        if id.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = engine.remove_container(&id, Some(Self::options())).await {
                    tracing::warn!(container = %id, error = %e, "cannot remove a build's check container");
                }
            });
        }
    }
}

/// Why a BuildKit build did not make its image.
enum BuildkitFailure {
    /// The build ran and failed: the build's error.
    Build(String),
    /// The engine answered with an error before any progress: it runs no BuildKit build.
    NotRun(String),
}

/// The engine's options for building `job` into `tag` (`docker build -t tag -f <Dockerfile>`),
/// its `RUN` steps on `network` (empty: the engine's): with BuildKit when `session` (the
/// build's session with the engine) is given, else with the classic builder, which removes
/// its intermediate containers also when a step fails.
fn build_options(
    job: &BuildJob,
    tag: &str,
    network: &str,
    session: Option<&str>,
) -> bollard::query_parameters::BuildImageOptions {
    use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion};
    let b = BuildImageOptionsBuilder::default()
        .dockerfile(&job.dockerfile_path)
        .t(tag);
    let b = match session {
        Some(s) => b.version(BuilderVersion::BuilderBuildKit).session(s),
        None => b.rm(true).forcerm(true),
    };
    let mut opts = b.build();
    opts.networkmode = (!network.is_empty()).then(|| network.to_string());
    opts
}

/// Builds `tarball` with BuildKit (the engine's `/build` with `version=2` and a session of
/// its own), its progress written to `log` step by step (build/buildkit.rs).
async fn buildkit_build(
    engine: &bollard::Docker,
    job: &BuildJob,
    tag: &str,
    network: &str,
    tarball: bytes::Bytes,
    log: &BuildLog,
) -> Result<(), BuildkitFailure> {
    use bollard::models::BuildInfoAux;
    let session = format!("cattery-build-{}", job.id);
    let opts = build_options(job, tag, network, Some(&session));
    let mut progress = Progress::default();
    let mut stream = engine.build_image(opts, None, Some(bollard::body_full(tarball)));
    let mut built = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                match info.aux {
                    Some(BuildInfoAux::BuildKit(status)) => {
                        for l in progress.lines(&status) {
                            log.output(&l);
                        }
                    }
                    // The image's id: the engine's last message of a build that succeeded
                    // (the session may stay open after it, so the stream need not end).
                    Some(BuildInfoAux::Default(_)) => {
                        built = true;
                        break;
                    }
                    None => {}
                }
                if let Some(s) = info.stream.as_deref() {
                    for l in s.lines().filter(|l| !l.trim().is_empty()) {
                        log.output(l);
                    }
                }
            }
            Err(e) => {
                for l in progress.flush() {
                    log.output(&l);
                }
                let m = match e {
                    bollard::errors::Error::DockerStreamError { error } => error,
                    e => e.to_string(),
                };
                if !progress.any {
                    return Err(BuildkitFailure::NotRun(m));
                }
                log.line(&m);
                let m = match progress.failed_output.take() {
                    Some(why) => format!("{m} ({why})"),
                    None => m,
                };
                return Err(BuildkitFailure::Build(failed(&m)));
            }
        }
    }
    for l in progress.flush() {
        log.output(&l);
    }
    if built {
        return Ok(());
    }
    if !progress.any {
        return Err(BuildkitFailure::NotRun(
            "the engine answered nothing".to_string(),
        ));
    }
    // The stream ended without the image's id: the build succeeded only if the image is there.
    match engine.inspect_image(tag).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let m = format!("the engine ended the build without its image ({e})");
            log.line(&m);
            Err(BuildkitFailure::Build(failed(&m)))
        }
    }
}

/// Builds `tarball` with the engine's classic builder, its output written to `log`.
async fn classic_build(
    engine: &bollard::Docker,
    job: &BuildJob,
    tag: &str,
    network: &str,
    tarball: bytes::Bytes,
    log: &BuildLog,
) -> Result<(), String> {
    let opts = build_options(job, tag, network, None);
    let mut stream = engine.build_image(opts, None, Some(bollard::body_full(tarball)));
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(s) = info.stream.as_deref().or(info.status.as_deref()) {
                    for l in s.lines().filter(|l| !l.trim().is_empty()) {
                        log.output(l);
                    }
                }
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    log.line(&e);
                    return Err(failed(&e));
                }
            }
            Err(e) => {
                let m = match e {
                    bollard::errors::Error::DockerStreamError { error } => error,
                    e => e.to_string(),
                };
                log.line(&m);
                return Err(failed(&m));
            }
        }
    }
    Ok(())
}

/// A failed Docker build's `errorMessage`: the engine's message, as it is (the official CLI,
/// which prints it through rich's markup, gets it escaped: `api::cli_text`).
fn failed(engine_message: &str) -> String {
    format!("docker build failed: {engine_message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A check that runs out of time has its container killed and removed before it returns
    /// (the image's removal after a failed check found it still there, in use, when the
    /// removal was left to the background). Needs the engine and `cattery-test/pipecat-base`
    /// (scripts/docker-ci.sh, scripts/docker-images.sh): skipped without them unless
    /// `CATTERY_REQUIRE_DOCKER` is set.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_check_out_of_time_leaves_no_container_behind() {
        const IMAGE: &str = "cattery-test/pipecat-base:latest";
        let required = std::env::var_os("CATTERY_REQUIRE_DOCKER").is_some();
        let engine = match bollard::Docker::connect_with_local_defaults() {
            Ok(e) if e.inspect_image(IMAGE).await.is_ok() => e,
            _ if required => panic!("CATTERY_REQUIRE_DOCKER is set, but no engine with {IMAGE}"),
            _ => return eprintln!("SKIPPED: no Docker engine with {IMAGE}"),
        };
        let build = uuid::Uuid::new_v4();
        let limit = std::time::Duration::from_secs(2);
        let code = "import time; time.sleep(120)";
        let (ok, out) = run_check(&engine, build, IMAGE, code, limit).await.unwrap();
        assert!(!ok);
        assert_eq!(out, ["the check did not end within 2 s"]);
        let name = format!("cattery-build-check-{build}");
        let left = engine
            .inspect_container(
                &name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await;
        assert!(
            matches!(
                left,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                })
            ),
            "the check's container is still there: {left:?}"
        );
    }

    #[test]
    fn maps_only_the_pipecat_base() {
        let (t, n) = map_base(
            "FROM dailyco/pipecat-base:latest\nRUN echo FROM dailyco/pipecat-base\nfrom docker.io/dailyco/pipecat-base@sha256:ab AS base\nFROM python:3.12\n",
            "cattery-test/pipecat-base:latest",
        );
        assert_eq!(n, 2);
        assert_eq!(
            t,
            "FROM cattery-test/pipecat-base:latest\nRUN echo FROM dailyco/pipecat-base\nFROM cattery-test/pipecat-base:latest AS base\nFROM python:3.12\n"
        );
        assert!(inside("Dockerfile") && inside("docker/Dockerfile.prod"));
        assert!(!inside("../Dockerfile") && !inside("/etc/passwd") && !inside(""));
    }
}
