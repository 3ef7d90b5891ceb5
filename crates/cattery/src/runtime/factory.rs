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
    }
}
