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
        Ok(Artifact {
            image: tag,
            python: None,
        })
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
