//! The one place that turns configuration into a runtime.

use std::path::PathBuf;
use std::sync::Arc;

use super::docker::image::PullPolicy;
use super::docker::{DockerConfig, DockerRuntime};
use super::multi::MultiRuntime;
use super::process::python::PythonRunner;
use super::process::ProcessRuntime;
use super::{Runtime, RuntimeKind};

/// What every runtime may need to be built.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Which runtime.
    pub kind: RuntimeKind,
    /// Directory of per-instance directories (the data dir's `instances`).
    pub instances_dir: PathBuf,
    /// This server's id (names its cgroup subtree, labels its containers).
    pub server_id: String,
    /// What the node's cluster secret derives for its containers' cluster label, if it has
    /// one (`ClusterSecret::container_label`).
    pub cluster_label: Option<String>,
    /// Python interpreter for `local:` agents (default `python3`).
    pub python: String,
    /// Path of the bundled Python runner.
    pub runner_path: PathBuf,
    /// Range of instance uids; `None`: instances run as the server's uid (process runtime).
    pub instance_uids: Option<super::process::uids::UidRange>,
    /// Docker engine address; `None`: `DOCKER_HOST` or the local socket.
    pub docker_host: Option<String>,
    /// When images are pulled at deploy.
    pub image_pull_policy: PullPolicy,
    /// Whether `local:` Python instances are forked from a fork server.
    pub python_fork_server: super::process::zygote::ForkServerMode,
    /// Where instance directories live (process runtime; `--runtime-dir`).
    pub runtime_dir: super::process::rundir::RuntimeDir,
}

/// The runtimes a configuration builds: the one the engine drives, and the Docker runtime in
/// it (if any), which wants the server's pull-secret source once the store is open.
pub struct Built {
    /// The runtime for the engine.
    pub runtime: Arc<dyn Runtime>,
    /// The container runtime inside it.
    pub docker: Option<Arc<DockerRuntime>>,
}

fn process(cfg: &RuntimeConfig) -> anyhow::Result<ProcessRuntime> {
    Ok(ProcessRuntime::new(
        cfg.instances_dir.clone(),
        &cfg.server_id,
        cfg.instance_uids,
        &cfg.runtime_dir,
    )?
    .with_python_runner(PythonRunner::new(
        cfg.python.clone(),
        cfg.runner_path.clone(),
    ))
    .with_fork_server(cfg.python_fork_server))
}

fn docker(cfg: &RuntimeConfig) -> Arc<DockerRuntime> {
    Arc::new(DockerRuntime::new(DockerConfig {
        host: cfg.docker_host.clone(),
        pull_policy: cfg.image_pull_policy,
        server_id: cfg.server_id.clone(),
        cluster_label: cfg.cluster_label.clone(),
        images_file: cfg
            .instances_dir
            .parent()
            .map(|d| d.join("docker-images.json")),
    }))
}

/// Builds the configured runtime. Must run inside tokio.
pub fn build(cfg: &RuntimeConfig) -> anyhow::Result<Arc<dyn Runtime>> {
    Ok(build_all(cfg)?.runtime)
}

/// Builds the configured runtime and hands out its Docker part. Must run inside tokio.
pub fn build_all(cfg: &RuntimeConfig) -> anyhow::Result<Built> {
    Ok(match cfg.kind {
        RuntimeKind::Process => Built {
            runtime: Arc::new(process(cfg)?),
            docker: None,
        },
        RuntimeKind::Docker => {
            let d = docker(cfg);
            Built {
                runtime: d.clone(),
                docker: Some(d),
            }
        }
        RuntimeKind::Auto => {
            let d = docker(cfg);
            Built {
                runtime: Arc::new(MultiRuntime::new(Arc::new(process(cfg)?), d.clone())),
                docker: Some(d),
            }
        }
        RuntimeKind::Fake => anyhow::bail!(
            "the fake runtime is for tests (runtime::fake::FakeRuntime), not configurable"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fake runtime has a kind of its own (stored beside its instance records), but no
    /// configuration source can choose it.
    #[test]
    fn the_fake_kind_is_not_configurable() {
        use clap::ValueEnum;
        assert!(crate::config::Config::from_toml("[runtime]\nkind = \"fake\"\n").is_err());
        assert!(RuntimeKind::from_str("fake", true).is_err());
        assert!(RuntimeKind::value_variants()
            .iter()
            .all(|k| *k != RuntimeKind::Fake));
        assert!(RuntimeKind::parse("fake").is_none());
        let cfg = RuntimeConfig {
            kind: RuntimeKind::Fake,
            instances_dir: PathBuf::from("/nonexistent"),
            server_id: "t".into(),
            cluster_label: None,
            python: "python3".into(),
            runner_path: PathBuf::from("/nonexistent"),
            instance_uids: None,
            docker_host: None,
            image_pull_policy: PullPolicy::Missing,
            python_fork_server: crate::runtime::process::zygote::ForkServerMode::On,
            runtime_dir: Default::default(),
        };
        assert!(build(&cfg).is_err());
    }
}
