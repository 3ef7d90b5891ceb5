//! Agent instance runtimes behind one trait: local process trees now, containers and pods later.
//!
//! An instance is one agent process tree (or container, or pod) that serves exactly one session
//! and is then discarded. A runtime starts it, reports when its main process exits, and removes
//! all of it (every process, its cgroup, its temp files, its port) in [`Instance::terminate`].

pub mod docker;
pub mod factory;
pub mod fake;
pub mod logs;
pub mod multi;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::model::{DeploymentRecord, InstanceRecord, ProfileLimits};

pub use logs::{LogAttribution, LogSink};

/// What to start.
#[derive(custom_debug::Debug, Clone)]
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
    #[debug(with = crate::redact::env_names)]
    pub env: Vec<(String, String)>,
    /// Resource limits, applied where the machine allows (cgroup v1 controllers here).
    pub limits: Option<ProfileLimits>,
    /// The agent the instance belongs to: the process runtime keeps one Python fork server
    /// per agent (`runtime/process/zygote.rs`), replaced when its deployment changes.
    pub agent: Option<Uuid>,
    /// The deployment the instance runs. Every deployment is new code (a redeploy of a
    /// `local:` bot, forced or not, reads its directory again), so a fork server serves the
    /// instances of one deployment only.
    pub deployment: Option<Uuid>,
    /// Cancelled when the engine no longer waits for this start (a stop, the start timeout):
    /// a runtime that is still waiting for something long before it makes the instance (a
    /// fork server importing the bot) returns [`RuntimeError::Abandoned`] at once. An
    /// instance a runtime still returns is removed by the engine.
    pub abandoned: tokio_util::sync::CancellationToken,
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

/// What [`Runtime::adopt`] found of a recorded instance.
pub enum Adopted {
    /// It runs: supervised again.
    Running(Arc<dyn Instance>),
    /// It is gone, its leftovers removed; with how it ended when the runtime still knows
    /// (a container's state; a process's `$CATTERY_EXIT_STATUS_FILE`), else `None`.
    Gone(Option<GoneExit>),
}

/// How an instance that ended while no server watched it ended ([`Adopted::Gone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoneExit {
    /// Its main process's exit.
    pub exit: ExitInfo,
    /// The kernel killed it for going over its memory limit.
    pub out_of_memory: bool,
    /// When it ended (Unix ms), when the runtime knows.
    pub ended_ms: Option<i64>,
}

/// The state of an agent's Python fork server on this node ([`process::zygote`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkServerState {
    /// Importing the bot; starts meanwhile wait for it.
    Starting,
    /// Instances are forked from it.
    Ready,
    /// Instances are spawned as plain processes; the status says why.
    Fallback,
    /// Turned off by the operator (`--python-fork-server off`).
    Off,
}

impl ForkServerState {
    /// Wire name: `starting`, `ready`, `fallback`, `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            ForkServerState::Starting => "starting",
            ForkServerState::Ready => "ready",
            ForkServerState::Fallback => "fallback",
            ForkServerState::Off => "off",
        }
    }
}

/// An agent's fork server as the runtime last saw it ([`Runtime::fork_server`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkServerStatus {
    /// Its state.
    pub state: ForkServerState,
    /// Why instances are spawned (with [`ForkServerState::Fallback`] and `Off`).
    pub reason: Option<String>,
    /// The fork server's pid (with [`ForkServerState::Ready`]).
    pub pid: Option<i32>,
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
    /// [`InstanceSpec::abandoned`] was cancelled before the instance was made.
    #[error("the start was abandoned before its instance was made")]
    Abandoned,
}

/// What [`Instance::last_output`] answers, from an instance's stderr tail and (read only when
/// that is blank) its stdout tail.
pub(crate) fn last_words(
    stderr: String,
    stdout: impl FnOnce() -> String,
) -> (&'static str, String) {
    if stderr.trim().is_empty() {
        ("stdout", stdout())
    } else {
        ("stderr", stderr)
    }
}

/// A started (or re-adopted) instance.
///
/// # Contract
///
/// - [`Instance::endpoint`] is the address where the instance serves the instance contract
///   (`GET /readyz`, `POST /bot`, `/ws`, proxied paths), reachable from this control plane. It
///   never changes during the instance's life. For the process runtime it is a loopback port.
/// - [`Instance::wait_exit`] is cancel-safe and may be called any number of times, also
///   concurrently; once the main process has exited it returns at once.
/// - [`Instance::terminate`] is the one way an instance is removed. It is idempotent and safe
///   to call concurrently: every call waits for the first one and returns its report. When it
///   returns, nothing of the instance is left running (processes, containers), and its
///   resources (cgroups, files, port, volumes) are released. It never fails: what cannot be
///   removed is logged, and the instance is treated as gone.
/// - [`Instance::sample`], [`Instance::stderr_tail`] and [`Instance::out_of_memory`] are
///   best-effort reads and may be called before or after the exit (not after `terminate`
///   returned, when they answer their empty value).
#[async_trait]
pub trait Instance: Send + Sync {
    /// The runtime that made this instance (recorded as [`InstanceRecord::runtime`], so a
    /// server that runs several runtimes hands the record back to the right one).
    fn kind(&self) -> RuntimeKind;
    /// Where the instance lives, in the runtime's own terms (stored as
    /// [`InstanceRecord::placement`], opaque to the engine and the store; handed back to
    /// [`Runtime::adopt`] after a restart).
    fn placement(&self) -> serde_json::Value;
    /// Where the instance serves the contract (see the trait docs).
    fn endpoint(&self) -> SocketAddr;
    /// Short human description for platform logs (`pid 1234`, `container 3f2a...`).
    fn describe(&self) -> String;
    /// Waits until the main process has exited. Cancel-safe; returns at once once exited.
    async fn wait_exit(&self) -> ExitInfo;
    /// The main process's exit, if it already happened.
    fn exited(&self) -> Option<ExitInfo>;
    /// Whether what listens at [`Instance::endpoint`] is this instance itself (not a foreign
    /// program that took its address, e.g. a port on a shared host). The engine trusts a
    /// `/readyz` answer only then. Runtimes whose endpoints cannot be taken answer `true`.
    fn owns_endpoint(&self) -> bool {
        true
    }
    /// Removes the whole instance: SIGTERM to every process, wait up to `grace` (monotonic
    /// clock), SIGKILL what remains, wait until no process is left, then remove its cgroup,
    /// temp files and port. `grace` zero means SIGKILL at once. Idempotent: later and
    /// concurrent calls wait for the first one and return its report.
    async fn terminate(&self, grace: Duration) -> TerminateReport;
    /// Samples CPU and memory; `None` once gone.
    async fn sample(&self) -> Option<ResourceSample>;
    /// The last bytes (at most 2 KiB) of the instance's stderr, escaped for display; empty
    /// when none is known.
    async fn stderr_tail(&self) -> String;
    /// The instance's last words, for the agent's status, a failed start's recorded end and
    /// the engine's reading of an exit as a port clash: `("stderr", its tail)`, or `("stdout",
    /// the last bytes of stdout)` when nothing (but blanks) came on stderr.
    async fn last_output(&self) -> (&'static str, String) {
        ("stderr", self.stderr_tail().await)
    }
    /// How long the main process's exit may take to become known after the instance's
    /// connections broke (the engine waits this long for the exit status before it calls a
    /// broken `/bot` connection an error). A local process is reaped within moments; a
    /// container's exit passes through the engine's event pipeline first.
    fn exit_report_window(&self) -> Duration {
        Duration::from_millis(500)
    }
    /// Whether the kernel (or the container engine) killed a process of the instance for
    /// going over its memory limit. Read after the exit, before `terminate`.
    async fn out_of_memory(&self) -> bool {
        false
    }
}

/// What a runtime makes of a deployment: the command an instance runs and the environment it
/// adds (before the agent's own env, secrets and the session's variables). Made by
/// [`Runtime::prepare`]; the engine adds the rest and hands it back in an [`InstanceSpec`].
#[derive(custom_debug::Debug, Clone)]
pub struct Prepared {
    /// Program (a path, or a name looked up in `PATH`; an image for a container runtime).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Working directory; `None` = the runtime's default.
    pub working_dir: Option<PathBuf>,
    /// Environment the runtime itself adds (e.g. `CATTERY_BOT_DIR` for `local:` bots).
    #[debug(with = crate::redact::env_names)]
    pub env: Vec<(String, String)>,
}

/// The runtimes this server can be built with (`--runtime`, `[runtime] kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Local process trees ([`process::ProcessRuntime`]).
    #[default]
    #[value(help = "Local process trees")]
    Process,
    /// Containers on a Docker engine ([`docker::DockerRuntime`]).
    #[value(help = "Containers on a Docker engine")]
    Docker,
    /// Both: image agents in containers, `local:` and `command` agents as processes
    /// ([`multi::MultiRuntime`]); each record names the runtime that made it by its placement.
    #[value(
        help = "Both: image agents in containers, `local:` and `command` agents as processes; \
                each record names the runtime that made it by its placement"
    )]
    Auto,
    /// The in-process test runtime ([`fake::FakeRuntime`]). Never chosen by configuration:
    /// neither `--runtime` nor the config file accept it, and [`factory::build`] refuses it.
    #[serde(skip)]
    #[value(skip)]
    Fake,
}

impl RuntimeKind {
    /// Configuration and storage name (the `runtime` column of instance records).
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Fake => "fake",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Auto => "auto",
        }
    }

    /// Parses a configuration name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "process" => Some(RuntimeKind::Process),
            "docker" => Some(RuntimeKind::Docker),
            "auto" => Some(RuntimeKind::Auto),
            _ => None,
        }
    }
}

/// A kind of place to run instances.
///
/// # Contract (what a new runtime implements)
///
/// - [`Runtime::prepare`] turns a deployment into something runnable, or says why it cannot
///   run here (an image on the process runtime, a missing `bot.py`). Cheap and pure enough to
///   be called on every start. [`Runtime::validate`] is the deploy-time check: `prepare` plus
///   whatever may be slow (the program exists, the Python runner's imports work).
/// - [`Runtime::start`] returns once the instance exists and its main process runs (not once
///   it is ready: the engine polls `/readyz` at [`Instance::endpoint`]). On error nothing is
///   left behind.
/// - After a restart the engine calls [`Runtime::adopt`] for every recorded instance, then
///   [`Runtime::sweep`] exactly once with the ids it kept; only then does it start new
///   instances (a sweep never sees an instance started by this run).
/// - [`Runtime::shutdown`] runs once on a clean stop, after every instance is gone.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The kind (stored beside every instance record).
    fn kind(&self) -> RuntimeKind;
    /// What an instance of `dep` runs. Errors: the deployment cannot run on this runtime.
    fn prepare(&self, dep: &DeploymentRecord) -> Result<Prepared, String>;
    /// Why `dep` cannot run here, or `None` when it can (deploy-time validation). May block
    /// for a moment (it may run the agent's interpreter).
    fn validate(&self, dep: &DeploymentRecord) -> Option<String>;
    /// Starts an instance. Its stdout and stderr go to `logs`, line by line. Returns soon
    /// after `spec.abandoned` is cancelled (see [`InstanceSpec::abandoned`]).
    async fn start(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
    ) -> Result<Arc<dyn Instance>, RuntimeError>;
    /// Finds a recorded instance again after a restart: [`Adopted::Running`], or
    /// [`Adopted::Gone`] (its leftovers are removed) with how it ended when the runtime still
    /// knows it.
    async fn adopt(&self, rec: &InstanceRecord, logs: LogSink) -> Adopted;
    /// After a restart, once every recorded instance was adopted or removed: removes every
    /// instance of this server that `keep` does not name (processes, cgroups, directories),
    /// e.g. one spawned just before a crash and never recorded. Only this server's own
    /// instances are touched (its cgroup subtree and instance directory), never by name.
    async fn sweep(&self, keep: &std::collections::HashSet<uuid::Uuid>);
    /// Whether the last [`Runtime::validate`] of `dep` failed only for want of something that
    /// may come back by itself (a Docker engine that did not answer): the engine validates
    /// such a deployment again every few seconds until it passes or fails for another reason,
    /// so its agent becomes ready without a redeploy. Default false.
    fn deploy_error_may_clear(&self, _dep: &DeploymentRecord) -> bool {
        false
    }
    /// Whether another node of a cluster may adopt this recorded instance when its node is
    /// lost (docs/cluster.md): true where every node reaches the same engine by the record
    /// alone (a shared Docker engine); false where the instance lives on its node's machine
    /// (processes). Default false.
    fn adoptable_by_any_node(&self, _rec: &InstanceRecord) -> bool {
        false
    }
    /// Whether `agent`'s instances are forked from a Python fork server on this node, and if
    /// not, why (`forkServer` in the agent's status). `None`: the runtime has no fork server
    /// for this agent (not a `local:` agent, or no instance started here yet). Default `None`.
    fn fork_server(&self, _agent: uuid::Uuid) -> Option<ForkServerStatus> {
        None
    }
    /// The uids instances run under, when each gets its own: a build's steps (the org's code,
    /// `build::venv`) run under one of them too. Default `None`.
    fn instance_uids(&self) -> Option<Arc<crate::runtime::process::uids::UidPool>> {
        None
    }
    /// What each instance's private mount namespace is made of, when instances get one
    /// ([`crate::runtime::process::namespace`]): a build's steps get one too. Default `None`.
    fn instance_namespaces(&self) -> Option<Arc<crate::runtime::process::namespace::Namespaces>> {
        None
    }
    /// The cgroups instances are made in, when the server can make them: a build's steps
    /// run in bounded cgroups of their own there (`build::venv`). Default `None`.
    fn instance_cgroups(&self) -> Option<Arc<crate::runtime::process::cgroup::CgroupSupport>> {
        None
    }
    /// Runs `f` seeing the host's files as this runtime's instances would: for what the
    /// server reads of an org's paths outside a deploy's checks (a `local:` directory's
    /// fingerprint), so that what it tells of them tells nothing an instance could not see.
    /// Errors: that view could not be taken, or instances see no host file (then `f` did not
    /// run). Default: as the server, whose view the instances share.
    fn as_instance(&self, f: &mut (dyn FnMut() + Send)) -> Result<(), String> {
        f();
        Ok(())
    }
    /// Describes how whole-tree cleanup works on this machine (for logs and status).
    fn isolation(&self) -> String;
    /// Releases what the runtime holds for this server (its cgroup directories, locks) on a
    /// clean shutdown, after every instance is gone.
    async fn shutdown(&self) {}
}
