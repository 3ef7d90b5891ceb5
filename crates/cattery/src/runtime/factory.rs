//! The one place that turns configuration into a runtime.

use std::path::PathBuf;
use std::sync::Arc;

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
    /// This server's id (names its cgroup subtree).
    pub server_id: String,
    /// Python interpreter for `local:` agents (default `python3`).
    pub python: String,
    /// Path of the bundled Python runner.
    pub runner_path: PathBuf,
    /// Range of instance uids; `None`: instances run as the server's uid (process runtime).
    pub instance_uids: Option<super::process::uids::UidRange>,
}

/// Builds the configured runtime. Must run inside tokio.
pub fn build(cfg: &RuntimeConfig) -> anyhow::Result<Arc<dyn Runtime>> {
    match cfg.kind {
        RuntimeKind::Process => Ok(Arc::new(
            ProcessRuntime::new(cfg.instances_dir.clone(), &cfg.server_id, cfg.instance_uids)?
                .with_python_runner(PythonRunner::new(
                    cfg.python.clone(),
                    cfg.runner_path.clone(),
                )),
        )),
        RuntimeKind::Fake => anyhow::bail!(
            "the fake runtime is for tests (runtime::fake::FakeRuntime), not configurable"
        ),
    }
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
            python: "python3".into(),
            runner_path: PathBuf::from("/nonexistent"),
            instance_uids: None,
        };
        assert!(build(&cfg).is_err());
    }
}
