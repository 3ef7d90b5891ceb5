//! Agent instance runtimes behind one trait: local process trees now, containers and pods later.
//!
//! An instance is one agent process tree (or container, or pod) that serves exactly one session
//! and is then discarded. A runtime starts it, reports when its main process exits, and removes
//! all of it (every process, its cgroup, its temp files, its port) in [`Instance::terminate`].

pub mod logs;
pub mod process;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::model::{InstanceRecord, ProfileLimits};

pub use logs::{LogAttribution, LogSink};

/// What to start.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Instance id (also exported as `CATTERY_INSTANCE_ID`).
    pub instance_id: Uuid,
    /// Program (a path, or a name looked up in `PATH`).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Working directory; `None` = the instance directory.
    pub working_dir: Option<PathBuf>,
    /// Environment added to the server's own (minus `CATTERY_*`): agent env, secrets, `PORT`...
    pub env: Vec<(String, String)>,
    /// Resource limits, applied where the machine allows (cgroup v1 controllers here).
    pub limits: Option<ProfileLimits>,
}

/// How an instance's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Human form: `exit code 3`, `signal 9 (SIGKILL)`, or `unknown` for an adopted process.
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => {
                let name = nix::sys::signal::Signal::try_from(s)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| "?".into());
                format!("signal {s} ({name})")
            }
            _ => "exit status unknown".into(),
        }
    }
}

/// What [`Instance::terminate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminateReport {
    /// Whether SIGTERM was sent (false when the tree was already gone, or grace was 0).
    pub sent_sigterm: bool,
    /// Whether anything was still alive at the end of the grace and got SIGKILL.
    pub killed: bool,
    /// The main process's exit, when known.
    pub exit: Option<ExitInfo>,
    /// Time from the start of terminate to an empty tree, in ms.
    pub took_ms: u64,
}

/// CPU and memory of a whole instance at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceSample {
    /// Total CPU time consumed so far by live processes, ns.
    pub cpu_ns: u64,
    /// Resident memory, bytes.
    pub memory_bytes: u64,
}

/// Errors from starting an instance.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The program could not be executed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// Program.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Setup (directories, cgroups, ports) failed.
    #[error("instance setup failed: {0}")]
    Setup(String),
}

/// A started (or re-adopted) instance.
#[async_trait]
pub trait Instance: Send + Sync {
    /// Durable identity, to find it again after a restart.
    fn record_parts(&self) -> InstancePlacement;
    /// Loopback port where the instance serves the contract.
    fn port(&self) -> u16;
    /// Waits until the main process has exited. Cancel-safe; returns at once once exited.
    async fn wait_exit(&self) -> ExitInfo;
    /// The main process's exit, if it already happened.
    fn exited(&self) -> Option<ExitInfo>;
    /// Whether the listening socket on [`Instance::port`] belongs to this instance's own
    /// processes (not to a foreign program that took the port). The supervisor trusts a
    /// `/readyz` answer only then. Runtimes that cannot tell answer `true`.
    fn serves_port(&self) -> bool {
        true
    }
    /// Removes the whole instance: SIGTERM to every process, wait up to `grace` (monotonic
    /// clock), SIGKILL what remains, wait until no process is left, then remove its cgroup,
    /// temp files and port. `grace` zero means SIGKILL at once. Idempotent: later and
    /// concurrent calls wait for the first one and return its report.
    async fn terminate(&self, grace: Duration) -> TerminateReport;
    /// Samples CPU and memory; `None` once gone.
    fn sample(&self) -> Option<ResourceSample>;
}

/// Where a process instance lives, stored as [`InstanceRecord::placement`] (its JSON form).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InstancePlacement {
    /// Main pid.
    pub pid: i32,
    /// Main process start time (clock ticks since boot).
    pub pid_start: u64,
    /// Port.
    pub port: u16,
    /// cgroup v2 directory.
    pub cgroup: Option<String>,
    /// Instance directory.
    pub dir: String,
}

/// A kind of place to run instances.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Short name (`process`).
    fn kind(&self) -> &'static str;
    /// Starts an instance. Its stdout and stderr go to `logs`, line by line.
    async fn start(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
    ) -> Result<Arc<dyn Instance>, RuntimeError>;
    /// Finds a recorded instance again after a restart; `None` when it is gone (its leftovers
    /// are removed).
    async fn adopt(&self, rec: &InstanceRecord, logs: LogSink) -> Option<Arc<dyn Instance>>;
    /// After a restart, once every recorded instance was adopted or removed: removes every
    /// instance of this server that `keep` does not name (processes, cgroups, directories),
    /// e.g. one spawned just before a crash and never recorded. Only this server's own
    /// instances are touched (its cgroup subtree and instance directory), never by name.
    async fn sweep(&self, keep: &std::collections::HashSet<uuid::Uuid>);
    /// Whether `program` can be executed (deploy-time validation). Returns the reason if not.
    fn check_program(&self, program: &str, working_dir: Option<&str>) -> Result<(), String>;
    /// Describes how whole-tree cleanup works on this machine (for logs and status).
    fn isolation(&self) -> String;
}
