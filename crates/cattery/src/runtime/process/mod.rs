//! The embedded default runtime: each instance is a local process tree.
//!
//! Isolation, best first: a cgroup v2 directory per instance (atomic `cgroup.kill`, emptiness
//! from `cgroup.events`), plus cgroup v1 `memory`/`cpu`/`pids` limits where writable; without
//! cgroups, the instance's own session and process group (`setsid`) plus the server being a
//! child subreaper, and a scan for processes carrying the instance's `CATTERY_INSTANCE_ID`.
//! Nothing is ever killed by name.
//!
//! Separation (see [`isolation`] and `docs/security.md`): as root, each instance runs under a
//! uid and gid of its own ([`uids`]), with its own `/tmp`, `/var/tmp`, `/dev/shm` and `/proc`
//! ([`namespace`]), in directories only it can enter, with an environment built from an
//! allowlist; the data directory is closed to it.

pub mod cgroup;
pub mod isolation;
pub mod kfile;
pub mod locks;
pub mod namespace;
pub mod placement;
pub mod ports;
pub mod python;
pub mod reaper;
pub mod rundir;
pub mod signals;
pub mod spare;
pub mod spawn;
pub mod uids;
pub mod zygote;

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::sync::{watch, OnceCell};

use self::cgroup::{CgroupSupport, InstanceCgroups};
use self::isolation::{InstanceDirs, Isolation};
use self::placement::ProcessPlacement;
use self::ports::{listening_inodes, pids_hold_socket, PortBook};
use self::python::PythonRunner;
use self::reaper::Reaper;
use self::spawn::SpawnSpec;
use self::uids::{UidPool, UidRange};
use self::zygote::{ForkInputs, ForkServerMode, Started, Zygote};
use super::logs::{read_offsets, Tailer};
use super::{
    Adopted, ExitInfo, GoneExit, Instance, InstanceSpec, LogSink, Prepared, ResourceSample,
    Runtime, RuntimeError, RuntimeKind, TerminateReport,
};
use crate::model::{DeploymentRecord, InstanceRecord};

/// Upper bound on waiting for a SIGKILLed tree to disappear (it normally takes a few ms).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Local process runtime.
#[derive(Clone)]
pub struct ProcessRuntime {
    instances_dir: PathBuf,
    /// Where instance directories really are, and this server's hold on its runtime dir.
    rundir: Arc<rundir::Placed>,
    cgroups: Arc<CgroupSupport>,
    ports: Arc<PortBook>,
    reaper: Arc<Reaper>,
    isolation: Arc<Isolation>,
    python: Arc<PythonRunner>,
    zygotes: Arc<Zygotes>,
    /// Spare cgroup slots: the v1 cgroup migration off the start path ([`spare`]).
    spares: Arc<spare::Stock>,
}

/// The fork servers of `local:` agents ([`zygote`]), one per agent.
struct Zygotes {
    mode: ForkServerMode,
    by_agent: Mutex<std::collections::HashMap<uuid::Uuid, Arc<Mutex<AgentZygote>>>>,
    /// What each agent's fork server is doing, for its status.
    status: zygote::Statuses,
    /// The generation of the next import ([`Importing::generation`]).
    next_generation: std::sync::atomic::AtomicU64,
}

/// One agent's fork server, or why it has none.
#[derive(Default)]
struct AgentZygote {
    live: Option<Arc<Zygote>>,
    /// The fork server that was `live` when the latest import began (a redeploy's new bot),
    /// kept until that import has succeeded: during a rollout the previous deployment serves
    /// (`core::session`, `AgentPool::previous`), and a `local:` bot's directory already holds
    /// the new code, so the previous deployment's cold starts must fork from the bot this
    /// process imported before. Retired once the new one is ready or found unsafe to fork.
    previous: Option<Arc<Zygote>>,
    /// The fork server importing the bot, if one is.
    importing: Option<Importing>,
    /// The key whose zygote refused to fork, and why.
    unsafe_: Option<(u64, String)>,
    /// The key whose zygote failed to start, when (retried after [`ZYGOTE_RETRY`]), and why.
    failed: Option<(u64, Instant, String)>,
}

/// A fork server importing the bot, on a thread of its own
/// ([`ProcessRuntime::import_zygote`]): starts of its key wait for its outcome.
struct Importing {
    key: u64,
    /// Tells it from an earlier import of the same key.
    generation: u64,
    outcome: watch::Receiver<Option<ZygoteOutcome>>,
}

/// A fork server to fork from, or why instances are spawned (`None`: nothing worth saying).
type ZygoteOutcome = Result<Arc<Zygote>, Option<String>>;

/// What [`ProcessRuntime::decide_zygote`] found.
enum Decided {
    /// The outcome, known at once.
    Now(ZygoteOutcome),
    /// A fork server is importing the bot: its outcome comes here.
    Wait(watch::Receiver<Option<ZygoteOutcome>>),
}

/// How long after a failed fork-server start instances are spawned before trying again.
const ZYGOTE_RETRY: Duration = Duration::from_secs(60);

impl ProcessRuntime {
    /// Creates the runtime. `instances_dir` (`<data dir>/instances`) holds one directory per
    /// live instance, itself or through a link to `runtime_dir` ([`rundir`]); `server_id`
    /// names this server's cgroup subtree; `uids` is the range of instance uids (`None`:
    /// instances run as the server's uid). Closes the data directory (the parent of
    /// `instances_dir`) to instances, and logs how instances are separated. Must run inside
    /// tokio.
    pub fn new(
        instances_dir: PathBuf,
        server_id: &str,
        uids: Option<UidRange>,
        runtime_dir: &rundir::RuntimeDir,
    ) -> std::io::Result<Self> {
        let placed = rundir::place(&instances_dir, server_id, runtime_dir)?;
        let nofile = spawn::raise_nofile_limit();
        tracing::debug!(nofile, "open-files limit");
        let isolation = Isolation::configure(uids, &instances_dir);
        if let Some(data_dir) = instances_dir.parent() {
            isolation::secure_data_dir(data_dir, isolation.uids.is_some())?;
        }
        match (&isolation.off_reason, &isolation.namespaces_off) {
            (None, None)
                if isolation
                    .namespaces
                    .as_ref()
                    .is_some_and(|n| !n.covers_builds()) =>
            {
                tracing::warn!(
                    separation = %isolation.describe(),
                    "any instance can read any build's files by its path (see docs/security.md)"
                )
            }
            (None, None) => {
                tracing::info!(separation = %isolation.describe(), "instance separation")
            }
            (None, Some(_)) => tracing::warn!(
                separation = %isolation.describe(),
                "instances share /tmp, /var/tmp, /dev/shm and /run/lock: what one leaves there, a later instance of its uid can read, and builds are readable by path (see docs/security.md)"
            ),
            (Some(_), _) => tracing::warn!(
                separation = %isolation.describe(),
                "instances are NOT separated from each other or from the server's files (see docs/security.md)"
            ),
        }
        if locks::lock_root().is_none() {
            tracing::warn!("no private lock directory: ports are not reserved across servers");
        }
        let cgroups = CgroupSupport::detect(server_id);
        let unenforced = cgroups.unenforced_limits();
        if !unenforced.is_empty() && (cgroups.v2_base.is_some() || !cgroups.v1_bases.is_empty()) {
            tracing::warn!(
                cgroups = %cgroups.describe(),
                "agentProfile limits are not enforced for {}: neither a writable cgroup v1 hierarchy nor cgroup v2 gives this server those controllers (see docs/lifecycle.md)",
                unenforced.join(", ")
            );
        }
        let spares = spare::Stock::new(cgroups.v1_bases.clone(), cgroups.v2_base.is_some());
        Ok(ProcessRuntime {
            instances_dir,
            rundir: Arc::new(placed),
            cgroups: Arc::new(cgroups),
            spares: Arc::new(spares),
            ports: Arc::new(PortBook::new()),
            reaper: Reaper::global(),
            isolation: Arc::new(isolation),
            python: Arc::new(PythonRunner::default()),
            zygotes: Arc::new(Zygotes {
                mode: ForkServerMode::On,
                by_agent: Mutex::new(Default::default()),
                status: Default::default(),
                next_generation: Default::default(),
            }),
        })
    }

    /// Sets whether `local:` Python instances are forked from a fork server.
    pub fn with_fork_server(mut self, mode: ForkServerMode) -> Self {
        self.zygotes = Arc::new(Zygotes {
            mode,
            by_agent: Mutex::new(Default::default()),
            status: Default::default(),
            next_generation: Default::default(),
        });
        self
    }

    /// Sets the Python runner used for `image: "local:<dir>"` bots.
    pub fn with_python_runner(mut self, runner: PythonRunner) -> Self {
        self.python = Arc::new(runner);
        self
    }

    /// Whether `program` can be executed (deploy-time validation). Returns the reason if not.
    /// When instances run under uids of their own, also that such a uid can reach the working
    /// directory and run the program.
    ///
    /// The paths are the org's choice, so they are looked at as an instance would see them
    /// ([`Isolation::as_instance`]), never as the server: a path an instance cannot see gets
    /// the answer a missing one gets (the first directory on the way that lets no other user
    /// through, which an instance can see too, else "does not exist"), and a deploy tells an
    /// org nothing of the host's files (`/root/.ssh`, another org's) an instance could not.
    pub fn check_program(&self, program: &str, working_dir: Option<&str>) -> Result<(), String> {
        self.isolation
            .as_instance(|| self.check_program_seen(program, working_dir))?
    }

    /// [`ProcessRuntime::check_program`] on the thread that sees files as an instance.
    fn check_program_seen(&self, program: &str, working_dir: Option<&str>) -> Result<(), String> {
        let isolating = self.isolation.uids.is_some();
        if let Some(d) = working_dir {
            if !Path::new(d).is_dir() {
                return Err(
                    match blocked_on_the_way(Path::new(d)).filter(|_| isolating) {
                        Some(b) => unreachable("working directory", &b),
                        None => format!("workingDir {d} is not a directory"),
                    },
                );
            }
        }
        let path = resolve_program(program, working_dir).map_err(|e| {
            let blocked = program_path(program, working_dir)
                .filter(|_| isolating)
                .and_then(|p| Some((blocked_on_the_way(&p)?, p)));
            match blocked {
                Some((b, p)) => unreachable(&format!("program {}", shown_resolved(&p)), &b),
                None => e,
            }
        })?;
        if isolating {
            if let Some(d) = working_dir {
                isolation::reachable_by_others(Path::new(d), true)
                    .map_err(|e| unreachable("working directory", &e))?;
            }
            isolation::reachable_by_others(&path, false)
                .map_err(|e| unreachable(&format!("program {}", shown_resolved(&path)), &e))?;
        }
        Ok(())
    }

    /// Removes this server's own cgroup directories (`.../cattery/<server id>`) if they are
    /// empty; called on a clean shutdown, after every instance is gone.
    pub fn remove_server_cgroups(&self) {
        for d in self
            .cgroups
            .v2_base
            .iter()
            .chain(self.cgroups.v1_bases.iter().map(|(_, b)| b))
        {
            let _ = fs::remove_dir(d);
        }
        // The cgroup liveness lock's file goes first: the next server of this id (after a
        // detach) waits for the runtime dir's lock, and must then make a new file rather than
        // wait on this one, which this process holds until it exits.
        self.cgroups.remove_liveness_lock();
        self.rundir.release();
    }

    /// Kills and removes instance `id` with nothing but its id: its cgroups (v2 `cgroup.kill`,
    /// v1 members), and processes carrying `CATTERY_INSTANCE_ID=<id>`; then its directories.
    async fn remove_unrecorded(&self, id: &str) {
        let v2 = self
            .cgroups
            .v2_base
            .as_ref()
            .map(|b| b.join(id))
            .filter(|d| d.exists());
        let v1: Vec<PathBuf> = self
            .cgroups
            .v1_bases
            .iter()
            .map(|(_, b)| b.join(id))
            .filter(|d| d.exists())
            .collect();
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            if let Some(d) = &v2 {
                kill_cgroup(d).await;
            }
            let mut pids: Vec<i32> = v1.iter().flat_map(|d| cgroup::procs(d)).collect();
            pids.extend(pids_with_instance_env(id));
            for &p in &pids {
                // Through a pidfd, once the pid is seen in the cgroups or with the id
                // (`signals`, rule 2): not ours, it may be reaped and its pid reused any time.
                signals::send_checked(p, Signal::SIGKILL, || {
                    v1.iter().any(|d| cgroup::procs(d).contains(&p)) || has_instance_env(p, id)
                });
            }
            self.reaper.reap_all();
            let populated = v2.as_ref().is_some_and(|d| cgroup::populated(d));
            if (pids.is_empty() && !populated) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        remove_instance_files(
            v2.into_iter().chain(v1).collect(),
            self.instances_dir.join(id),
        )
        .await;
    }

    /// Creates the instance's uid, directories, port reservation, output files and cgroups,
    /// held by the returned [`InstanceSetup`] until [`ProcessRuntime::started`] hands them to
    /// the instance (dropped before that, it gives them back). Errors: a step failed; whatever
    /// was made is given back.
    fn set_up(
        &self,
        id: &str,
        spec: &InstanceSpec,
        shared_uid: Option<u32>,
        with_cgroups: bool,
    ) -> Result<(InstanceSetup, InstanceCgroups), RuntimeError> {
        let setup = |e: std::io::Error| RuntimeError::Setup(e.to_string());
        let uid = match (&self.isolation.uids, shared_uid) {
            (Some(pool), Some(u)) => {
                pool.share(u);
                Some(u)
            }
            (Some(pool), None) => Some(pool.allocate().map_err(setup)?),
            (None, _) => None,
        };
        let mut p = InstanceSetup {
            dirs: InstanceDirs::at(self.instances_dir.join(id)),
            uid,
            port: 0,
            out: None,
            cgroups: Vec::new(),
            ports: self.ports.clone(),
            uids: self.isolation.uids.clone(),
            handed_over: false,
        };
        p.dirs.create(uid.map(|u| (u, u))).map_err(setup)?;
        p.port = self.alloc_port().map_err(setup)?;
        let out = fs::File::create(p.dirs.dir.join("stdout.log")).map_err(setup)?;
        let err = fs::File::create(p.dirs.dir.join("stderr.log")).map_err(setup)?;
        p.out = Some((OwnedFd::from(out), OwnedFd::from(err)));
        let cgs = if with_cgroups {
            self.create_cgroups(&mut p, id, spec)?
        } else {
            InstanceCgroups::default()
        };
        Ok((p, cgs))
    }

    /// Creates the instance's cgroups, which `p` holds from then on (all of them, even when
    /// the creation fails part-way).
    fn create_cgroups(
        &self,
        p: &mut InstanceSetup,
        id: &str,
        spec: &InstanceSpec,
    ) -> Result<InstanceCgroups, RuntimeError> {
        p.cgroups.extend(
            self.cgroups
                .v2_base
                .iter()
                .chain(self.cgroups.v1_bases.iter().map(|(_, b)| b))
                .map(|b| b.join(id)),
        );
        self.cgroups
            .create(id, spec.limits.as_ref())
            .map_err(|e| RuntimeError::Setup(e.to_string()))
    }

    /// Creates the instance's uid, directories, port reservation and cgroups, and spawns its
    /// main process inside them (see [`spawn`]). Blocking: the cgroup join may wait for an
    /// RCU grace period. Needs a tokio context (the log tailer is a task).
    ///
    /// Errors: [`RuntimeError::Setup`] (uid, directory, port, cgroups) or
    /// [`RuntimeError::Spawn`] (the program could not be started); nothing is left behind.
    /// `decided`: the fork server to fork from, or why the instance is spawned
    /// ([`ProcessRuntime::zygote_for`]).
    fn start_blocking(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
        decided: Result<Arc<Zygote>, Option<String>>,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let (zygote, note) = match decided {
            Ok(z) => (Some(z), None),
            Err(note) => (None, note),
        };
        // A spare cgroup slot, when one is ready: no cgroup migration on this path.
        let spare = match zygote {
            None => self.spares.take(),
            Some(_) => None,
        };
        self.start_with(spec, logs, zygote, note, spare)
    }

    /// [`ProcessRuntime::start_blocking`] once the fork server (or why there is none) and the
    /// spare cgroup slot are decided.
    fn start_with(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
        zygote: Option<Arc<Zygote>>,
        note: Option<String>,
        spare: Option<spare::Spare>,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let id = spec.instance_id.to_string();
        let (mut p, mut cgs) = self.set_up(
            &id,
            &spec,
            zygote.as_ref().and_then(|z| z.uid),
            spare.is_none(),
        )?;
        let (out, err) = p.out.take().expect("set_up opened the output files");
        if let Some(n) = &note {
            // In the instance's own log, so the agent's logs say why its start was slow.
            let line = format!("cattery: this instance is spawned, not forked: {n}\n");
            if let Ok(fd) = err.try_clone() {
                let _ = std::io::Write::write_all(&mut fs::File::from(fd), line.as_bytes());
            }
        }
        let env = isolation::instance_env(&self.base_env(&id, &p), &spec.env);
        let cwd = spec
            .working_dir
            .clone()
            .unwrap_or_else(|| p.dirs.home.clone());
        // One spawn for both paths. No cgroup descriptors yet: a spare's process is born in
        // its cgroups; the plain path (and a spare's fallback to it) fills them in below.
        let mut sspec = spawn_spec(
            &spec,
            &env,
            &cwd,
            (&out, &err),
            p.uid,
            self.isolation.namespaces.as_deref(),
        );
        if let Some(spare) = spare {
            let started = self.start_from_spare(spare, &id, spec.limits.as_ref(), &sspec);
            self.spares.refill_soon();
            match started {
                Ok((pid, exit_rx, v2, v1)) => {
                    drop((out, err));
                    return Ok(self.started(id, (pid, true), p, (v2, v1), exit_rx, logs));
                }
                Err(SpareFailed::Spawn { source, v2 }) => {
                    drop((out, err));
                    p.cgroups.extend(v2);
                    return Err(RuntimeError::Spawn {
                        program: spec.program.clone(),
                        source,
                    });
                }
                Err(SpareFailed::Unusable) => {
                    // Its v2 cgroup, if made, is gone with the claim.
                    cgs = self.create_cgroups(&mut p, &id, &spec)?;
                }
            }
        }
        let fds = cgroup::raw_fds(&cgs.procs_fds);
        sspec.cgroup_procs = &fds;
        let spawned = self.reaper.spawn_registered(|| {
            if let Some(z) = &zygote {
                // A fork of the agent's fork server, moved into the instance's cgroups
                // before it runs anything of the bot: see `runtime/process/zygote.rs`.
                let pid = z.fork(&env, &cwd, &out, &err, |pid| {
                    let pid = pid.to_string();
                    for fd in &cgs.procs_fds {
                        let mut f = fs::File::from(fd.try_clone()?);
                        std::io::Write::write_all(&mut f, pid.as_bytes())?;
                    }
                    Ok(())
                })?;
                return Ok(((), pid));
            }
            // posix_spawn-like (no fork of this process), joining the cgroups and a new
            // session and switching to the instance's uid before exec: see
            // `runtime/process/spawn.rs`.
            let pid = spawn::spawn(&sspec)?;
            Ok(((), pid))
        });
        drop((out, err));
        let InstanceCgroups { v2, v1, procs_fds } = cgs;
        drop(procs_fds);
        let ((), pid, exit_rx) = match spawned {
            Ok(v) => v,
            Err(source) => {
                return Err(RuntimeError::Spawn {
                    program: spec.program.clone(),
                    source,
                });
            }
        };
        let child = zygote.is_none();
        Ok(self.started(id, (pid, child), p, (v2, v1), exit_rx, logs))
    }

    /// [`ProcessRuntime::start`] from a spare cgroup slot, on the calling worker. The
    /// instance's uid, directories, files, port and environment are made first, then the
    /// spare is claimed ([`ProcessRuntime::begin_spare_claim`]) and the start waits, without
    /// holding its worker, for the parked process's pidfd: it is readable once the new
    /// process has `exec`'d. Starts go side by side; no step waits for another start.
    ///
    /// A spare found unusable at its claim (its parked process gone) is discarded and the
    /// start made again the plain way (joining its cgroups, no spare), in `block_in_place`.
    /// The future is not cancelled by the session engine (it signals an abandoned start
    /// instead); if it is dropped while it waits (a task aborted at shutdown, a timeout
    /// around the start), the claim's guard kills what was started (see [`SpareClaim`]) and
    /// the setup's guard gives back the port, uid, directory and cgroups ([`InstanceSetup`]).
    async fn start_spare(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
        spare: spare::Spare,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let id = spec.instance_id.to_string();
        let (mut p, _) = match self.set_up(&id, &spec, None, false) {
            Ok(v) => v,
            Err(e) => {
                self.spares.give_back(spare);
                return Err(e);
            }
        };
        let (out, err) = p.out.take().expect("set_up opened the output files");
        let env = isolation::instance_env(&self.base_env(&id, &p), &spec.env);
        let cwd = spec
            .working_dir
            .clone()
            .unwrap_or_else(|| p.dirs.home.clone());
        let sspec = spawn_spec(
            &spec,
            &env,
            &cwd,
            (&out, &err),
            p.uid,
            self.isolation.namespaces.as_deref(),
        );
        // The stock makes up for the spare once the claim is done with cgroups, or once the
        // start is dropped during its wait.
        let refill = RefillOnDrop(&self.spares);
        let started = match self.begin_spare_claim(spare, &id, spec.limits.as_ref(), &sspec) {
            Ok(claim) => {
                if let Some(spare) = &claim.spare {
                    // SAFETY: the claim owns the pidfd and outlives the wait.
                    unsafe { exited(spare.pidfd()) }.await;
                }
                self.finish_spare_claim(claim)
            }
            Err(e) => Err(e),
        };
        drop(refill);
        drop((out, err));
        match started {
            Ok((pid, exit_rx, v2, v1)) => {
                Ok(self.started(id, (pid, true), p, (v2, v1), exit_rx, logs))
            }
            Err(SpareFailed::Spawn { source, v2 }) => {
                p.cgroups.extend(v2);
                Err(RuntimeError::Spawn {
                    program: spec.program.clone(),
                    source,
                })
            }
            Err(SpareFailed::Unusable) => {
                p.cgroups
                    .extend(self.cgroups.v2_base.as_ref().map(|b| b.join(&id)));
                // Given back before the start is made again the plain way.
                drop(p);
                // No spare this time (no fork server either: the agent runs no runner).
                tokio::task::block_in_place(|| self.start_with(spec, logs, None, None, None))
            }
        }
    }

    /// The handle of a newly started instance. `child`: its main process is this server's
    /// child, reaped by the reaper alone (not a fork server's).
    #[allow(clippy::too_many_arguments)]
    fn started(
        &self,
        id: String,
        (pid, child): (i32, bool),
        p: InstanceSetup,
        cgroups: (Option<PathBuf>, Vec<PathBuf>),
        exit_rx: watch::Receiver<Option<ExitInfo>>,
        logs: LogSink,
    ) -> Arc<dyn Instance> {
        // Read while the pid provably names the new process (not reaped yet), when it is this
        // server's child.
        let pid_start = match child {
            true => self
                .reaper
                .while_unreaped(pid, || pid_start_time(pid))
                .flatten(),
            false => pid_start_time(pid),
        };
        let (dir, port, uid) = p.hand_over();
        self.instance(
            id,
            (pid, pid_start.unwrap_or(0), child),
            (port, uid),
            dir,
            cgroups,
            exit_rx,
            (0, 0),
            logs,
        )
    }

    /// Starts an instance's main process from a spare cgroup slot (see [`spare`]):
    /// [`ProcessRuntime::begin_spare_claim`], then [`ProcessRuntime::finish_spare_claim`],
    /// blocking while the new process `exec`s.
    fn start_from_spare<'a>(
        &'a self,
        spare: spare::Spare,
        id: &str,
        limits: Option<&crate::model::ProfileLimits>,
        sspec: &SpawnSpec<'a>,
    ) -> Result<SpareStart, SpareFailed> {
        let claim = self.begin_spare_claim(spare, id, limits, sspec)?;
        self.finish_spare_claim(claim)
    }

    /// Begins the start of an instance's main process from a spare cgroup slot (see
    /// [`spare`]): writes the limits into the spare's v1 cgroups, creates the instance's v2
    /// cgroup and tells the parked process to clone the main process into it. No lock is
    /// held: claims go side by side (the reaper keeps a status it reaps before the pid is
    /// registered, `reaper::Unlocked`). Measured under churn, one claim took 1.7 ms, mostly
    /// the new process's `exec`, and starts queued 15-17 ms when claims went one at a time
    /// (`docs/performance.md`, "The spare claim's queue").
    ///
    /// Errors: [`SpareFailed::Unusable`] (the caller spawns the old way; the spare is gone),
    /// or [`SpareFailed::Spawn`] (the program could not be started; the spare is gone and the
    /// v2 cgroup, returned, is the caller's to remove).
    fn begin_spare_claim<'a>(
        &'a self,
        mut spare: spare::Spare,
        id: &str,
        limits: Option<&crate::model::ProfileLimits>,
        sspec: &SpawnSpec<'a>,
    ) -> Result<SpareClaim<'a>, SpareFailed> {
        let plan = match spawn::prepare(sspec) {
            Ok(p) => Box::new(p),
            Err(source) => {
                self.spares.give_back(spare);
                return Err(SpareFailed::Spawn { source, v2: None });
            }
        };
        if let Some(l) = limits {
            for (ctrl, d) in &spare.v1 {
                let _ = cgroup::apply_limits(ctrl, d, l);
            }
        }
        let (v2, v2_fd) = match self.cgroups.create_v2_dir(id) {
            Ok(Some((dir, fd))) => {
                self.cgroups.apply_v2(&dir, limits);
                (dir, fd)
            }
            Ok(None) | Err(_) => {
                spare.discard();
                return Err(SpareFailed::Unusable);
            }
        };
        let window = self.reaper.open_unlocked();
        match spare.claim_begin(&plan.args, &v2_fd) {
            Ok(()) => Ok(SpareClaim {
                id: id.to_string(),
                spare: Some(spare),
                plan,
                v2,
                _v2_fd: v2_fd,
                window: Some(window),
                cwd: sspec.cwd,
            }),
            Err(_) => {
                // Its parked process is gone (`clone3`'s support shows only in the claim's
                // end, below).
                spare.discard();
                Err(SpareFailed::Unusable)
            }
        }
    }

    /// Ends a claim begun by [`ProcessRuntime::begin_spare_claim`]: waits for the parked
    /// process to exit (blocking until the new process has `exec`'d or failed; at once when
    /// its pidfd is readable), registers the new pid and renames the spare's cgroups to the
    /// instance id. Returns the pid, its exit watch and the instance's cgroups.
    fn finish_spare_claim(&self, mut claim: SpareClaim<'_>) -> Result<SpareStart, SpareFailed> {
        let mut spare = claim.spare.take().expect("a claim is finished once");
        let window = claim.window.take().expect("a claim is finished once");
        let mut unusable = None;
        let spawned = match spare.claim_end() {
            // A process that failed before its `exec` exits at once: the reaper reaps it.
            Ok(pid) => match spawn::child_failure(&claim.plan.args, claim.cwd) {
                None => Ok((pid, window.register(pid))),
                Some(e) => Err(e),
            },
            Err(spare::ClaimError::Spawn(e)) => Err(e),
            Err(spare::ClaimError::Unusable { unsupported }) => {
                unusable = Some(unsupported);
                Err(std::io::Error::other("the spare cgroup slot is unusable"))
            }
        };
        let v2 = std::mem::take(&mut claim.v2);
        let id = std::mem::take(&mut claim.id);
        drop(claim);
        match spawned {
            Ok((pid, exit_rx)) => {
                let v1 = spare.rename(&id);
                drop(spare);
                Ok((pid, exit_rx, Some(v2), v1))
            }
            Err(source) => {
                spare.discard();
                match unusable {
                    Some(unsupported) => {
                        if unsupported {
                            self.spares.disable();
                        }
                        Err(SpareFailed::Unusable)
                    }
                    None => Err(SpareFailed::Spawn {
                        source,
                        v2: Some(v2),
                    }),
                }
            }
        }
    }

    /// The platform's variables of an instance (the agent's env and secrets come on top).
    fn base_env(&self, id: &str, p: &InstanceSetup) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut env = vec![
            ("HOME", p.dirs.home.clone().into_os_string()),
            ("TMPDIR", p.dirs.tmp.clone().into_os_string()),
            ("PORT", p.port.to_string().into()),
            ("CATTERY_INSTANCE_ID", id.into()),
            (
                "CATTERY_EXIT_STATUS_FILE",
                p.dirs.exit_status.clone().into_os_string(),
            ),
        ];
        if let Some(uid) = p.uid {
            // No passwd entry names the uid: tools that ask for a user name read these.
            env.push(("USER", format!("cattery-{uid}").into()));
            env.push(("LOGNAME", format!("cattery-{uid}").into()));
        }
        env
    }

    /// The handle of a started or re-adopted instance; starts tailing its output from
    /// `offsets` (bytes already captured of stdout and stderr).
    #[allow(clippy::too_many_arguments)]
    fn instance(
        &self,
        id: String,
        (pid, pid_start, child): (i32, u64, bool),
        (port, uid): (u16, Option<u32>),
        dir: PathBuf,
        (cg_v2, cg_v1): (Option<PathBuf>, Vec<PathBuf>),
        exit_rx: watch::Receiver<Option<ExitInfo>>,
        offsets: (u64, u64),
        logs: LogSink,
    ) -> Arc<ProcessInstance> {
        let tailer = Tailer::start(
            dir.join("stdout.log"),
            dir.join("stderr.log"),
            offsets,
            dir.join("offsets"),
            logs,
        );
        Arc::new(ProcessInstance {
            id,
            pid,
            pid_start,
            child,
            port,
            dir,
            cg_v2,
            cg_v1,
            exit_rx,
            tailer,
            ports: self.ports.clone(),
            uid: uid.zip(self.isolation.uids.clone()),
            reaper: self.reaper.clone(),
            terminated: OnceCell::new(),
            last_cpu: Mutex::new(None),
        })
    }

    fn alloc_port(&self) -> std::io::Result<u16> {
        self.ports.reserve()
    }
}

/// A main process started from a spare: pid, exit watch, v2 and v1 cgroups.
type SpareStart = (
    i32,
    watch::Receiver<Option<ExitInfo>>,
    Option<PathBuf>,
    Vec<PathBuf>,
);

/// A spare's claim in flight ([`ProcessRuntime::begin_spare_claim`]): the parked process
/// has been told to start the instance, whose main process reads the prepared spawn (boxed:
/// it must not move), the v2 cgroup's descriptor and the descriptors and paths the spawn
/// borrows (lifetime `'a`) until it has `exec`'d. Finished by
/// [`ProcessRuntime::finish_spare_claim`]; dropped before that (a start's future dropped
/// while it waits), it waits for the parked process there, blocking, so nothing it reads is
/// freed early, then kills what was started and removes its cgroups.
struct SpareClaim<'a> {
    id: String,
    spare: Option<spare::Spare>,
    plan: Box<spawn::ChildPlan>,
    v2: PathBuf,
    /// Open until the new process is born in it.
    _v2_fd: OwnedFd,
    window: Option<reaper::Unlocked<'a>>,
    cwd: &'a Path,
}

// SAFETY: the plan's raw pointers point into strings the plan owns; the only other reader
// is the process the claim starts, whatever thread the claim is finished or dropped on.
unsafe impl Send for SpareClaim<'_> {}

impl Drop for SpareClaim<'_> {
    fn drop(&mut self) {
        let Some(mut spare) = self.spare.take() else {
            return;
        };
        if let Ok(pid) = spare.claim_end() {
            // Started, but nobody will own it: the whole instance goes, by its cgroup. Only
            // without `cgroup.kill` (kernels before 5.14) by its pid, unless the reaper has
            // reaped it already (it may have exited at once): `signals`, rule 3.
            if cgroup::kill_all(&self.v2).is_err() {
                if let Some(w) = &self.window {
                    w.signal_unreaped(pid, Signal::SIGKILL);
                }
            }
        }
        spare.discard();
        cgroup::remove(&self.v2);
    }
}

/// Why [`ProcessRuntime::start_from_spare`] did not start the instance.
enum SpareFailed {
    /// Spawn the old way.
    Unusable,
    /// The program could not be started; `v2`: the instance's v2 cgroup, if made.
    Spawn {
        source: std::io::Error,
        v2: Option<PathBuf>,
    },
}

/// Asks the spare stock for a refill when dropped ([`spare::Stock::refill_soon`]).
struct RefillOnDrop<'a>(&'a spare::Stock);

impl Drop for RefillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.refill_soon();
    }
}

/// What [`ProcessRuntime::set_up`] made for an instance: its uid, directory, port and
/// cgroups. A guard: dropped before [`ProcessRuntime::started`] handed it all to the
/// instance (a start that failed, or whose future was dropped at an await), it gives back
/// everything it holds, so nothing a start took outlives it. Its process is not its to
/// kill: a start's process is either handed over too or killed by what started it (a
/// failed spawn has none, [`SpareClaim`] kills its own).
struct InstanceSetup {
    dirs: InstanceDirs,
    uid: Option<u32>,
    /// 0 until reserved.
    port: u16,
    /// stdout and stderr capture files.
    out: Option<(OwnedFd, OwnedFd)>,
    /// Cgroups made for the instance, removed if it is not handed over.
    cgroups: Vec<PathBuf>,
    ports: Arc<PortBook>,
    uids: Option<Arc<UidPool>>,
    /// Set by [`InstanceSetup::hand_over`]: nothing is given back.
    handed_over: bool,
}

impl InstanceSetup {
    /// Disarms the guard: the instance holds it all now.
    fn hand_over(mut self) -> (PathBuf, u16, Option<u32>) {
        self.handed_over = true;
        (std::mem::take(&mut self.dirs.dir), self.port, self.uid)
    }
}

impl Drop for InstanceSetup {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        self.out.take();
        for d in &self.cgroups {
            cgroup::remove(d);
        }
        let _ = fs::remove_dir_all(&self.dirs.dir);
        if self.port != 0 {
            self.ports.release(self.port);
        }
        if let (Some(pool), Some(uid)) = (&self.uids, self.uid) {
            pool.release(uid);
        }
    }
}

/// The spawn of an instance's main process, with no cgroup descriptors yet: a spare's
/// process is born in its cgroups, and the plain path fills them in.
fn spawn_spec<'a>(
    spec: &'a InstanceSpec,
    env: &'a [(std::ffi::OsString, std::ffi::OsString)],
    cwd: &'a Path,
    (stdout, stderr): (&'a OwnedFd, &'a OwnedFd),
    uid: Option<u32>,
    namespaces: Option<&'a namespace::Namespaces>,
) -> SpawnSpec<'a> {
    SpawnSpec {
        program: &spec.program,
        args: &spec.args,
        env,
        cwd,
        stdout,
        stderr,
        cgroup_procs: &[],
        ids: uid.map(|u| (u, u)),
        stdin: None,
        namespaces: uid.and(namespaces),
    }
}

/// Waits, without blocking the thread, until the process of `pidfd` has exited (a spare's
/// parked process, once the new process has `exec`'d or failed). If the pidfd cannot be
/// watched, returns at once (the caller's reap then blocks instead).
///
/// # Safety
/// `pidfd` stays open until the returned future is done or dropped.
async unsafe fn exited(pidfd: std::os::fd::RawFd) {
    // SAFETY: the caller keeps `pidfd` open while this watch lives.
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    };
    if let Ok(w) = watched {
        let _ = w.readable().await;
    }
}

/// The name of the directory and cgroups of the fork server with `key`.
fn zygote_name(key: u64) -> String {
    format!("zygote-{key:016x}")
}

/// Kills every process of a v2 cgroup (`cgroup.kill`) in `block_in_place`: the write waits
/// for the kernel's `cgroup_mutex` (see [`remove_instance_files`]).
async fn kill_cgroup(dir: &Path) {
    let _ = tokio::task::block_in_place(|| cgroup::kill_all(dir));
}

/// Removes an instance's cgroups and directory in `block_in_place`: `rmdir` of a cgroup
/// waits for the kernel's `cgroup_mutex`, which a concurrent cgroup join holds for an RCU
/// grace period (10 ms or more), and [`cgroup::remove`] retries with short sleeps.
async fn remove_instance_files(cgroups: Vec<PathBuf>, dir: PathBuf) {
    tokio::task::block_in_place(|| {
        for d in &cgroups {
            cgroup::remove(d);
        }
        remove_instance_dir(&dir);
    });
}

/// The files an instance's directory holds besides `home` and `tmp` (rundir.rs: its seven
/// inodes).
const INSTANCE_FILES: [&str; 4] = ["stdout.log", "stderr.log", EXIT_STATUS_FILE, "offsets"];

/// Removes an instance's directory by its known layout: its four files, then `home`, `tmp`
/// and itself with `rmdir`, seven system calls. A directory that `rmdir` finds not empty (the
/// instance left files in its `home` or `tmp`, or something else lies there) is removed
/// whole with `fs::remove_dir_all`, as every one was before: that walk (`statx`, `openat`,
/// `fstat`, `fcntl`, two `getdents64` and `close` per directory) took about 30 system calls
/// for the layout alone.
fn remove_instance_dir(dir: &Path) {
    let gone = |r: std::io::Result<()>| match r {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    for f in INSTANCE_FILES {
        let _ = fs::remove_file(dir.join(f));
    }
    for sub in ["home", "tmp"] {
        let p = dir.join(sub);
        if !gone(fs::remove_dir(&p)) {
            let _ = fs::remove_dir_all(&p);
        }
    }
    if !gone(fs::remove_dir(dir)) {
        let _ = fs::remove_dir_all(dir);
    }
}

/// The fields of `/proc/<pid>/stat` after the command name, which may hold spaces and
/// parentheses: the state is field 0 of the list, the process group 2, the start time 19.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = kfile::read_to_string(Path::new(&format!("/proc/{pid}/stat"))).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`, clock ticks since boot).
pub fn pid_start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` is alive (and not a zombie) and still the process that started at `start`.
fn same_process_alive(pid: i32, start: u64) -> bool {
    let Some(f) = stat_fields(pid) else {
        return false;
    };
    let state = f.first().map_or("Z", String::as_str);
    state != "Z" && state != "X" && f.get(19).and_then(|v| v.parse::<u64>().ok()) == Some(start)
}

/// The process group of process `pid` (field 5 of `/proc/<pid>/stat`).
fn process_group(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Pids of every process `/proc` lists now.
fn proc_pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
}

/// Pids of the processes in process group `pgid` (zombies included).
fn pids_in_group(pgid: i32) -> Vec<i32> {
    proc_pids()
        .filter(|&p| process_group(p) == Some(pgid))
        .collect()
}

/// Whether the environment of process `pid` carries `CATTERY_INSTANCE_ID=<id>`.
fn has_instance_env(pid: i32, id: &str) -> bool {
    environ_has(pid, format!("CATTERY_INSTANCE_ID={id}").as_bytes())
}

/// Whether the environment of process `pid` holds the entry `kv` (a zombie's is empty).
fn environ_has(pid: i32, kv: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == kv))
}

/// Pids of live processes whose environment carries `CATTERY_INSTANCE_ID=<id>`.
fn pids_with_instance_env(id: &str) -> Vec<i32> {
    let needle = format!("CATTERY_INSTANCE_ID={id}");
    proc_pids()
        .filter(|&p| environ_has(p, needle.as_bytes()))
        .collect()
}

/// Why instances cannot reach `what` (`e`: what blocks it).
fn unreachable(what: &str, e: &str) -> String {
    format!(
        "instances run under unprivileged uids of their own and cannot reach the {what}: {e} \
         (docs/security.md)"
    )
}

/// `path` with what it resolves to when that is elsewhere: `/b/.venv/bin/python (a link to
/// /root/.pyenv/versions/3.11.7/bin/python3.11)`. A venv's `python` is such a link, and the
/// directory that blocks it is often on the link's side only. Links are followed as far as
/// the caller can read them (an instance, at deploy time: [`links_followed`]).
fn shown_resolved(path: &Path) -> String {
    let link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match fs::canonicalize(path) {
        Ok(c) if c != path && link => format!("{} (a link to {})", path.display(), c.display()),
        Ok(c) if c != path => format!("{} (which resolves to {})", path.display(), c.display()),
        Ok(_) => path.display().to_string(),
        Err(_) => match links_followed(path).pop() {
            Some(end) if link && end != path => {
                format!("{} (a link to {})", path.display(), end.display())
            }
            _ => path.display().to_string(),
        },
    }
}

/// `path`, then each path its links lead to, as far as they can be read (at most 40 links).
fn links_followed(path: &Path) -> Vec<PathBuf> {
    let mut chain = vec![path.to_path_buf()];
    while chain.len() <= 40 {
        let last = &chain[chain.len() - 1];
        let Ok(to) = fs::read_link(last) else { break };
        let next = match last.parent() {
            Some(dir) if to.is_relative() => dir.join(to),
            _ => to,
        };
        chain.push(next);
    }
    chain
}

/// The first directory on the way to `path` or to where its links lead that the caller can
/// see but that lets no other user through: `/root (mode 700) does not let other users
/// through`. Looked at from the top down, nothing past such a directory (nor past a missing
/// one) is looked at, so the answer is the same whether what lies behind it exists or not.
fn blocked_on_the_way(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    links_followed(path).iter().find_map(|p| {
        let mut ancestors: Vec<&Path> = p.ancestors().skip(1).collect();
        ancestors.reverse();
        for dir in ancestors {
            let m = fs::metadata(dir).ok().filter(|m| m.is_dir())?;
            if m.mode() & 0o001 == 0 {
                return Some(format!(
                    "{} (mode {:o}) does not let other users through",
                    dir.display(),
                    m.mode() & 0o7777
                ));
            }
        }
        None
    })
}

/// The path `program` names when it names one (it holds a `/`), against `working_dir` when
/// relative; `None` for a name looked up in `PATH`.
fn program_path(program: &str, working_dir: Option<&str>) -> Option<PathBuf> {
    program.contains('/').then(|| match working_dir {
        Some(d) if !program.starts_with('/') => Path::new(d).join(program),
        _ => PathBuf::from(program),
    })
}

fn resolve_program(program: &str, working_dir: Option<&str>) -> Result<PathBuf, String> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if let Some(p) = program_path(program, working_dir) {
        return if is_exec(&p) {
            Ok(p)
        } else if p.exists() {
            Err(format!("{} is not an executable file", p.display()))
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if is_exec(&p) {
            return Ok(p);
        }
    }
    Err(format!("{program} was not found in PATH"))
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    /// [`Isolation::as_instance`].
    fn as_instance(&self, f: &mut (dyn FnMut() + Send)) -> Result<(), String> {
        self.isolation.as_instance(f)
    }

    fn instance_uids(&self) -> Option<Arc<uids::UidPool>> {
        self.isolation.uids.clone()
    }

    fn instance_namespaces(&self) -> Option<Arc<namespace::Namespaces>> {
        self.isolation.namespaces.clone()
    }

    fn instance_cgroups(&self) -> Option<Arc<CgroupSupport>> {
        let c = &self.cgroups;
        (c.v2_base.is_some() || !c.v1_bases.is_empty()).then(|| c.clone())
    }

    fn isolation(&self) -> String {
        format!("{}; {}", self.cgroups.describe(), self.isolation.describe())
    }

    fn fork_server(&self, agent: uuid::Uuid) -> Option<crate::runtime::ForkServerStatus> {
        self.zygotes.status.get(agent)
    }

    /// [`PythonRunner::prepare`]. A `local:` directory is the org's choice, so whether it
    /// holds a `bot.py` and which `.venv` Python is chosen are looked at as an instance would
    /// see them ([`Isolation::as_instance`]), at every start as at deploy time: the same
    /// answers, and a start tells nothing of files an instance could not see (a `.venv`
    /// only root may enter is not chosen). A `command` looks at no file and pays nothing.
    fn prepare(&self, dep: &DeploymentRecord) -> Result<Prepared, String> {
        if !dep.spec.runs_the_python_runner() {
            return self.python.prepare(dep);
        }
        self.isolation.as_instance(|| self.python.prepare(dep))?
    }

    /// [`Runtime::prepare`], then: the program exists and is executable; for `local:` agents
    /// also that the chosen Python can import what the bundled runner needs (`fastapi`,
    /// `uvicorn`), so a bot environment without them is reported at deploy time (`errors[]`,
    /// `ready: false`) rather than at the first session.
    ///
    /// What it looks at in the org's directories (`bot.py`, a `.venv`, the program, the
    /// working directory) it looks at as an instance would see it
    /// ([`ProcessRuntime::check_program`]).
    fn validate(&self, dep: &DeploymentRecord) -> Option<String> {
        let p = match self.prepare(dep) {
            Ok(p) => p,
            Err(e) => return Some(e),
        };
        let wd = p.working_dir.as_ref().and_then(|p| p.to_str());
        let local = dep.spec.command.is_none() && dep.spec.local_dir().is_some();
        if let Err(e) = self.check_program(&p.program, wd) {
            // For a `local:` bot the program is the Python chosen for it: say how to choose
            // another.
            return Some(if local {
                // A venv's `python` is a link to the Python it was made with: that one must
                // be reachable too.
                let venv = if self.isolation.uids.is_some() {
                    " (made with a Python other users can reach, e.g. `/usr/bin/python3 -m venv \
                     .venv`)"
                } else {
                    ""
                };
                format!(
                    "{e}; the bot's Python is {}: choose another with the agent's `python` \
                     field, a `.venv` in the bot directory{venv}, or --python \
                     (docs/python-runner.md)",
                    p.program
                )
            } else {
                e
            });
        }
        if local {
            return self.python.deps_missing(&p.program, &self.isolation);
        }
        None
    }

    async fn shutdown(&self) {
        let all: Vec<_> = self.zygotes.by_agent.lock().drain().collect();
        for (_, slot) in all {
            if let Some(i) = slot.lock().importing.take() {
                // Its thread retires it.
                self.kill_importing(i.key);
            }
            let kept: Vec<_> = {
                let mut st = slot.lock();
                st.live
                    .take()
                    .into_iter()
                    .chain(st.previous.take())
                    .collect()
            };
            for z in kept {
                let rt = self.clone();
                let _ = tokio::task::spawn_blocking(move || rt.retire_zygote(&z)).await;
            }
        }
        let spares = self.spares.clone();
        let _ = tokio::task::spawn_blocking(move || spares.shutdown()).await;
        self.remove_server_cgroups();
    }

    /// Starts from a spare cgroup slot on the calling worker when one is ready and no fork
    /// server can be involved: that start is a few short system calls and the new process's
    /// `exec` (no cgroup migration), and handing the worker's other tasks to another thread
    /// first cost more CPU than that (0.3 ms per start under churn, `docs/performance.md`,
    /// "Starts from a spare slot on the worker"). It waits for the new process's `exec`
    /// without holding its worker ([`ProcessRuntime::start_spare`]), so starts go side by
    /// side. (A spare found unusable at its claim, its parked process gone, makes the start
    /// again the plain way: rare.)
    ///
    /// Every other start first waits, without holding its worker, for its agent's fork server
    /// when one is importing the bot ([`ProcessRuntime::zygote_for`]; an abandoned start stops
    /// waiting at once: [`RuntimeError::Abandoned`]), then runs
    /// [`ProcessRuntime::start_blocking`] in `block_in_place`: joining a cgroup can keep the
    /// spawning thread in the kernel for a whole RCU grace period (10-13 ms here), so the
    /// worker's other tasks move to another thread first. (On tokio's blocking pool instead,
    /// warm starts at concurrency 8 were 0.3-0.5 ms slower.) Needs the multi-threaded runtime.
    async fn start(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        if !self.runs_runner(&spec) {
            if let Some(spare) = self.spares.take() {
                return self.start_spare(spec, logs, spare).await;
            }
        }
        let decided = self.zygote_for(&spec).await?;
        tokio::task::block_in_place(|| self.start_blocking(spec, logs, decided))
    }

    async fn sweep(&self, keep: &HashSet<uuid::Uuid>) {
        let mut found: HashSet<String> = HashSet::new();
        let bases = std::iter::once(&self.instances_dir)
            .chain(self.cgroups.v2_base.iter())
            .chain(self.cgroups.v1_bases.iter().map(|(_, b)| b));
        for base in bases {
            let Ok(rd) = fs::read_dir(base) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Ok(id) = uuid::Uuid::parse_str(&name) {
                    if !keep.contains(&id) && e.path().is_dir() {
                        found.insert(name);
                    }
                }
            }
        }
        for id in found {
            tracing::warn!(instance = %id, "removing an unrecorded instance left by a previous run");
            self.remove_unrecorded(&id).await;
        }
        self.sweep_zygotes().await;
        let n = tokio::task::block_in_place(|| {
            spare::sweep(&self.cgroups.v1_bases, &self.spares.names())
        });
        if n > 0 {
            tracing::info!(cgroups = n, "removed spare cgroups left by a previous run");
        }
    }

    async fn adopt(&self, rec: &InstanceRecord, logs: LogSink) -> Adopted {
        let id = rec.id.to_string();
        let pl: ProcessPlacement = match serde_json::from_value(rec.placement.clone()) {
            Ok(pl) if rec.runtime == self.kind().as_str() => pl,
            _ => {
                tracing::warn!(instance = %id, runtime = %rec.runtime, "cannot read the placement of a recorded instance; leaving it");
                return Adopted::Gone(None);
            }
        };
        let dir = PathBuf::from(&pl.dir);
        let cg_v2 = pl.cgroup.as_ref().map(PathBuf::from);
        let cg_v1: Vec<PathBuf> = self
            .cgroups
            .v1_bases
            .iter()
            .map(|(_, b)| b.join(&id))
            .collect();
        let alive = same_process_alive(pl.pid, pl.pid_start);
        let (tx, exit_rx) = watch::channel(None);
        let offsets = read_offsets(&dir.join("offsets")).unwrap_or((0, 0));
        self.ports.adopt(pl.port);
        // The instance's uid is the owner of its home (none: it ran as the server's).
        let uid = match &self.isolation.uids {
            Some(pool) => InstanceDirs::at(dir.clone())
                .owner()
                .filter(|u| pool.range().contains(*u)),
            None => None,
        };
        if let (Some(pool), Some(u)) = (&self.isolation.uids, uid) {
            pool.adopt(u);
        }
        let inst = self.instance(
            id,
            // Not this server's child: its parent died with the previous server.
            (pl.pid, pl.pid_start, false),
            (pl.port, uid),
            dir,
            (cg_v2, cg_v1),
            exit_rx,
            offsets,
            logs,
        );
        // Not our child any more: the exit code is only known if the agent wrote it to
        // `$CATTERY_EXIT_STATUS_FILE`.
        let status_file = PathBuf::from(&pl.dir).join(EXIT_STATUS_FILE);
        if !alive {
            // Gone while we were down: remove whatever is left of it.
            let code = isolation::read_exit_status(&status_file);
            let _ = tx.send(Some(ExitInfo { code, signal: None }));
            inst.terminate(Duration::ZERO).await;
            return Adopted::Gone(code.map(|code| GoneExit {
                exit: ExitInfo {
                    code: Some(code),
                    signal: None,
                },
                out_of_memory: false,
                ended_ms: None,
            }));
        }
        // Watch the pid (and its start time) instead of waitpid.
        let (pid, start) = (pl.pid, pl.pid_start);
        tokio::spawn(async move {
            while same_process_alive(pid, start) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let code = isolation::read_exit_status(&status_file);
            let _ = tx.send(Some(ExitInfo { code, signal: None }));
        });
        Adopted::Running(inst)
    }
}

/// File in the instance directory where an agent may write its exit code before exiting
/// (`$CATTERY_EXIT_STATUS_FILE`): the only way to learn it for an instance re-adopted after a
/// restart, since the server is then no longer its parent.
pub const EXIT_STATUS_FILE: &str = "exit-status";

/// One local process tree.
pub struct ProcessInstance {
    id: String,
    pid: i32,
    pid_start: u64,
    /// The main process is this server's child, reaped by the reaper alone: it and its
    /// process group may be signalled under the reaper's lock until it is reaped
    /// ([`signals`], rule 3). Not so for a fork server's child or an adopted instance.
    child: bool,
    port: u16,
    dir: PathBuf,
    cg_v2: Option<PathBuf>,
    cg_v1: Vec<PathBuf>,
    exit_rx: watch::Receiver<Option<ExitInfo>>,
    tailer: Tailer,
    ports: Arc<PortBook>,
    /// The instance's own uid, released once it is gone.
    uid: Option<(u32, Arc<UidPool>)>,
    reaper: Arc<Reaper>,
    terminated: OnceCell<TerminateReport>,
    last_cpu: Mutex<Option<u64>>,
}

/// The members (pid, process group) a signal sent to process group `group` did not reach.
fn outside_group(
    members: impl IntoIterator<Item = (i32, Option<i32>)>,
    group: Option<i32>,
) -> impl Iterator<Item = i32> {
    members
        .into_iter()
        .filter(move |&(_, pgid)| group.is_none() || pgid != group)
        .map(|(p, _)| p)
}

impl ProcessInstance {
    /// Every pid that belongs to the instance right now.
    fn members(&self) -> Vec<i32> {
        let mut pids = match &self.cg_v2 {
            Some(d) => cgroup::procs(d),
            None => pids_with_instance_env(&self.id),
        };
        if self.exit_rx.borrow().is_none() && !pids.contains(&self.pid) {
            pids.push(self.pid);
        }
        pids
    }

    /// Whether nothing of the instance runs; through `events` (its v2 cgroup's, open) when
    /// given.
    fn tree_empty(&self, events: Option<&cgroup::Events>) -> bool {
        match &self.cg_v2 {
            Some(_) if events.is_some() => !events.is_some_and(|e| e.populated()),
            Some(d) => !cgroup::populated(d),
            None => {
                let leader_gone = self.exit_rx.borrow().is_some()
                    || !same_process_alive(self.pid, self.pid_start);
                // Signal 0 sends nothing: a stranger's group of that number only delays this.
                leader_gone
                    && killpg(Pid::from_raw(self.pid), None).is_err()
                    && pids_with_instance_env(&self.id).is_empty()
            }
        }
    }

    /// Sends `sig` once to every process of the tree: to the main process's group, then to
    /// each member outside that group (one that made a session or group of its own). A member
    /// signalled twice could read the second `SIGTERM` as "quit now" and skip its shutdown.
    ///
    /// Nothing goes to a pid that may have been reaped and reused ([`signals`]): the group
    /// only while its leader, this server's child, is not reaped, under the reaper's lock
    /// (rule 3); every other member, and the main process of a fork server or of a previous
    /// server, through a pidfd once it is seen to be a member ([`ProcessInstance::is_member`],
    /// rule 2).
    fn signal_all(&self, sig: Signal) {
        let group = self
            .child
            .then(|| {
                self.reaper
                    .while_unreaped(self.pid, || killpg(Pid::from_raw(self.pid), sig).is_ok())
            })
            .flatten()
            .unwrap_or(false)
            .then_some(self.pid);
        let members = self.members().into_iter().map(|p| {
            let pgid = nix::unistd::getpgid(Some(Pid::from_raw(p))).ok();
            (p, pgid.map(Pid::as_raw))
        });
        let led = match (group, &self.cg_v2) {
            (None, None) => self.signal_group_members(sig),
            _ => Vec::new(),
        };
        for p in outside_group(members, group).filter(|p| !led.contains(p)) {
            signals::send_checked(p, sig, || self.is_member(p));
        }
    }

    /// Without a v2 cgroup and with the main process's group not signalled under the
    /// reaper's lock (an adopted instance, or one whose main process was reaped), sends
    /// `sig` to each process of that group through a pidfd (rule 2 of [`signals`]), once it
    /// is seen in the group while the main process is not reaped (the pid, holding the
    /// group's number, has its start time): a member that carries no instance id (one that
    /// cleared its environment) is reached as `killpg` reached it. Scans again until no new
    /// member shows (one forked meanwhile), the main process last in each scan. Returns the
    /// pids signalled.
    fn signal_group_members(&self, sig: Signal) -> Vec<i32> {
        let (mut seen, mut sent) = (Vec::new(), Vec::new());
        if self.pid_start == 0 {
            return sent;
        }
        let leader_unreaped = || pid_start_time(self.pid) == Some(self.pid_start);
        for _ in 0..8 {
            let mut found = pids_in_group(self.pid);
            found.retain(|p| !seen.contains(p));
            if found.is_empty() || !leader_unreaped() {
                break;
            }
            seen.extend(&found);
            // The main process last: while it is not reaped, the group is its.
            found.sort_by_key(|&p| p == self.pid);
            for p in found {
                if signals::send_checked(p, sig, || {
                    process_group(p) == Some(self.pid) && leader_unreaped()
                }) {
                    sent.push(p);
                }
            }
        }
        sent
    }

    /// Whether `pid` names one of the instance's processes now: one in its v2 cgroup;
    /// without one, a process carrying its id in its environment, or its main process (by
    /// its start time).
    fn is_member(&self, pid: i32) -> bool {
        match &self.cg_v2 {
            Some(d) => cgroup::procs(d).contains(&pid),
            None => {
                has_instance_env(pid, &self.id)
                    || (pid == self.pid
                        && self.pid_start != 0
                        && same_process_alive(pid, self.pid_start))
            }
        }
    }

    /// Polls until the tree is empty (1, 2, 4... up to 20 ms apart), and at once when the
    /// main process exits (usually the last one: a cooperative agent's stop then never waits
    /// for the next poll).
    async fn wait_empty(&self, deadline: Instant, events: Option<&cgroup::Events>) -> bool {
        let mut step = Duration::from_millis(1);
        let mut exit_rx = self.exit_rx.clone();
        let mut watch_exit = exit_rx.borrow_and_update().is_none();
        loop {
            self.reaper.reap_all();
            if self.tree_empty(events) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let changed = async {
                match events {
                    Some(e) => e.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(step.min(deadline - now)) => {}
                _ = changed => {}
                r = exit_rx.changed(), if watch_exit => {
                    watch_exit = r.is_ok() && exit_rx.borrow_and_update().is_none();
                }
            }
            step = (step * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether nothing runs under the instance's own `uid` any more, so that it may be given
    /// to another instance. Without a cgroup, the instance's tree is found by its process
    /// group and the environment tag, and a process that left both (`setsid` and an exec
    /// with an empty environment) would still run under the uid, then shared with whichever
    /// instance (of any org) draws it next: every process of the uid is killed first. With a
    /// cgroup nothing can leave it (its directory is root's), and the kill above ended all.
    /// `false` (the uid stays held, and an error is logged) when some would not end.
    async fn uid_swept(&self, uid: u32) -> bool {
        if self.cg_v2.is_some() || !self.cg_v1.is_empty() {
            return true;
        }
        let swept = tokio::task::spawn_blocking(move || uids::end_processes_of(uid)).await;
        match swept {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(instance = %self.id, uid, error = %e, "processes of an ended instance's uid survived SIGKILL; the uid stays held");
                false
            }
            Err(_) => false,
        }
    }

    async fn do_terminate(&self, grace: Duration) -> TerminateReport {
        let t0 = Instant::now();
        let mut report = TerminateReport {
            sent_sigterm: false,
            killed: false,
            exit: None,
            took_ms: 0,
        };
        // Open for the whole stop: one open instead of one per check, and a wake on its change.
        let opened = self.cg_v2.as_deref().and_then(cgroup::Events::open);
        let events = opened.as_ref();
        if !self.tree_empty(events) {
            if !grace.is_zero() {
                report.sent_sigterm = true;
                self.signal_all(Signal::SIGTERM);
            }
            if grace.is_zero() || !self.wait_empty(t0 + grace, events).await {
                report.killed = true;
                if let Some(d) = &self.cg_v2 {
                    kill_cgroup(d).await;
                }
                self.signal_all(Signal::SIGKILL);
                if !self.wait_empty(Instant::now() + KILL_WAIT, events).await {
                    tracing::error!(instance = %self.id, "instance processes survived SIGKILL");
                }
            }
        }
        drop(opened);
        // The main process is reaped by the reaper (our child) or was watched (adopted).
        let mut rx = self.exit_rx.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|v| v.is_some())).await;
        report.exit = *self.exit_rx.borrow();
        self.tailer.drain().await;
        remove_instance_files(
            self.cg_v2
                .iter()
                .chain(self.cg_v1.iter())
                .cloned()
                .collect(),
            self.dir.clone(),
        )
        .await;
        self.ports.release(self.port);
        if let Some((uid, pool)) = &self.uid {
            if self.uid_swept(*uid).await {
                pool.release(*uid);
            }
        }
        report.took_ms = t0.elapsed().as_millis() as u64;
        report
    }
}

fn clk_tck() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as u64)
        .unwrap_or(100)
}

fn proc_cpu_rss(pid: i32) -> Option<(u64, u64)> {
    let s = kfile::read_to_string(Path::new(&format!("/proc/{pid}/stat"))).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    let ticks = utime + stime;
    Some((ticks * 1_000_000_000 / clk_tck(), rss_pages * 4096))
}

#[async_trait]
impl Instance for ProcessInstance {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn placement(&self) -> serde_json::Value {
        serde_json::to_value(ProcessPlacement {
            pid: self.pid,
            pid_start: self.pid_start,
            port: self.port,
            cgroup: self.cg_v2.as_ref().map(|p| p.display().to_string()),
            dir: self.dir.display().to_string(),
        })
        .unwrap_or_default()
    }

    fn endpoint(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn describe(&self) -> String {
        format!("pid {}", self.pid)
    }

    async fn stderr_tail(&self) -> String {
        file_tail(&self.dir.join("stderr.log"))
    }

    async fn last_output(&self) -> (&'static str, String) {
        crate::runtime::last_words(file_tail(&self.dir.join("stderr.log")), || {
            file_tail(&self.dir.join("stdout.log"))
        })
    }

    /// Reads the OOM-kill count of the instance's memory cgroup: v1 `memory.oom_control`
    /// (`oom_kill N`), or v2 `memory.events` (`oom_kill N`) where the memory controller is on.
    async fn out_of_memory(&self) -> bool {
        let files = self
            .cg_v1
            .iter()
            .map(|d| d.join("memory.oom_control"))
            .chain(self.cg_v2.iter().map(|d| d.join("memory.events")));
        files
            .into_iter()
            .any(|f| cgroup::counter(&f, "oom_kill") > 0)
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit_rx.clone();
        let r = rx.wait_for(|v| v.is_some()).await;
        match r {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => ExitInfo::default(),
        }
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit_rx.borrow()
    }

    fn owns_endpoint(&self) -> bool {
        pids_hold_socket(&self.members(), &listening_inodes(self.port))
    }

    async fn terminate(&self, grace: Duration) -> TerminateReport {
        *self
            .terminated
            .get_or_init(|| self.do_terminate(grace))
            .await
    }

    async fn sample(&self) -> Option<ResourceSample> {
        if self.terminated.initialized() {
            return None;
        }
        let mut cpu = 0u64;
        let mut mem = 0u64;
        let mut any = false;
        for p in self.members() {
            if let Some((c, m)) = proc_cpu_rss(p) {
                cpu += c;
                mem += m;
                any = true;
            }
        }
        if !any {
            return None;
        }
        *self.last_cpu.lock() = Some(cpu);
        Some(ResourceSample {
            cpu_ns: cpu,
            memory_bytes: mem,
        })
    }
}

/// The last 2 KiB of a captured output file, escaped for display; empty when unreadable. Only
/// those bytes are read: the file keeps its whole length after the tailer gave back what it
/// read (a hole, read as zeros, which are left out).
fn file_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 2048;
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
        let mut b = Vec::with_capacity(TAIL as usize);
        f.take(TAIL).read_to_end(&mut b)?;
        Ok(b)
    };
    let Ok(b) = read() else {
        return String::new();
    };
    let start = b.iter().position(|&c| c != 0).unwrap_or(b.len());
    super::logs::escape_bytes(&b[start..])
}

/// A fork server's environment: the allowlist, its own `HOME` and `TMPDIR`, and the agent's
/// (deployment env and secrets) without the per-session `CATTERY_SESSION_ID`.
fn zygote_env(
    dirs: &InstanceDirs,
    uid: Option<u32>,
    spec_env: &[(String, String)],
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut base = vec![
        ("HOME", dirs.home.clone().into_os_string()),
        ("TMPDIR", dirs.tmp.clone().into_os_string()),
        ("CATTERY_FORK_SERVER", "1".into()),
    ];
    if let Some(uid) = uid {
        base.push(("USER", format!("cattery-{uid}").into()));
        base.push(("LOGNAME", format!("cattery-{uid}").into()));
    }
    let own: Vec<(String, String)> = spec_env
        .iter()
        .filter(|(k, _)| k != "CATTERY_SESSION_ID")
        .cloned()
        .collect();
    isolation::instance_env(&base, &own)
}

/// The last non-empty line of a file ("" when none).
fn last_line(p: &Path) -> String {
    let text = fs::read_to_string(p).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The fork servers of `local:` Python agents (see [`zygote`]).
impl ProcessRuntime {
    /// The fork server to fork `spec`'s instance from, started if needed; or why the instance
    /// is spawned instead (`None`: nothing worth saying, e.g. not a `local:` agent). While the
    /// agent's fork server imports the bot, every start of its key waits for it here, on no
    /// thread of its own; a start abandoned meanwhile ([`InstanceSpec::abandoned`]: a stop,
    /// the start timeout) stops waiting at once, with [`RuntimeError::Abandoned`], and the
    /// fork server goes on importing for the starts that follow (up to its own limit,
    /// [`zygote::READY_TIMEOUT`]). The outcome is kept for the agent's status
    /// ([`Runtime::fork_server`]).
    async fn zygote_for(&self, spec: &InstanceSpec) -> Result<ZygoteOutcome, RuntimeError> {
        let mut rx = match self.decide_zygote(spec) {
            Decided::Now(outcome) => {
                if let (Some(agent), true) = (spec.agent, self.runs_runner(spec)) {
                    let view = outcome.as_ref().map_err(|e| e.as_deref());
                    self.zygotes.status.record(agent, self.zygotes.mode, view);
                }
                return Ok(outcome);
            }
            Decided::Wait(rx) => rx,
        };
        // The import's own thread records its outcome in the status.
        tokio::select! {
            r = rx.wait_for(Option::is_some) => Ok(match r {
                Ok(o) => o.clone().unwrap_or(Err(None)),
                Err(_) => Err(Some("the fork server's start ended without an outcome".into())),
            }),
            _ = spec.abandoned.cancelled() => Err(RuntimeError::Abandoned),
        }
    }

    /// Whether `spec` runs the bundled Python runner (a `local:` agent).
    fn runs_runner(&self, spec: &InstanceSpec) -> bool {
        spec.args.len() == 1 && Path::new(&spec.args[0]) == self.python.runner_path
    }

    /// [`ProcessRuntime::zygote_for`]'s decision, under the agent's lock: the live fork
    /// server of `spec`'s key, a known reason to spawn, or the import of its key (started
    /// here if none is under way; a fork server of another key, live or importing, is
    /// retired).
    fn decide_zygote(&self, spec: &InstanceSpec) -> Decided {
        let inputs = ForkInputs {
            mode: self.zygotes.mode,
            runs_runner: self.runs_runner(spec),
            has_agent: spec.agent.is_some(),
            cgroup_v2: self.cgroups.v2_base.is_some(),
            unsafe_reason: None,
        };
        if let Err(e) = zygote::fork_decision(&inputs) {
            return Decided::Now(Err(e));
        }
        let Some(agent) = spec.agent else {
            return Decided::Now(Err(None));
        };
        let key = zygote::zygote_key(
            spec.deployment,
            &spec.program,
            &spec.args,
            spec.working_dir.as_deref(),
            &spec.env,
        );
        let slot = self
            .zygotes
            .by_agent
            .lock()
            .entry(agent)
            .or_default()
            .clone();
        let mut st = slot.lock();
        if let Some((k, r)) = &st.unsafe_ {
            if *k == key {
                let mut known = inputs;
                known.unsafe_reason = Some(r);
                return Decided::Now(Err(zygote::fork_decision(&known).err().flatten()));
            }
        }
        for z in st.live.iter().chain(&st.previous) {
            if z.key == key && z.alive() {
                return Decided::Now(Ok(z.clone()));
            }
        }
        if let Some(i) = &st.importing {
            if i.key == key {
                return Decided::Wait(i.outcome.clone());
            }
        }
        if let Some((k, at, why)) = &st.failed {
            if *k == key && at.elapsed() < ZYGOTE_RETRY {
                // The same reason as at the failure, until the retry.
                return Decided::Now(Err(Some(format!("{why}; tried again within a minute"))));
            }
        }
        if let Some(old) = st.live.take() {
            // Kept until this import succeeds; the one kept before it goes.
            if let Some(older) = st.previous.replace(old) {
                let rt = self.clone();
                std::thread::spawn(move || rt.retire_zygote(&older));
            }
        }
        if let Some(old) = st.importing.take() {
            // Its thread retires it: killed, its import ends now.
            self.kill_importing(old.key);
        }
        st.unsafe_ = None;
        st.failed = None;
        let generation = self
            .zygotes
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let (rt, slot2, spec2) = (self.clone(), slot.clone(), spec.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("zygote-import-{key:016x}"))
            .spawn(move || rt.import_zygote(&slot2, agent, (key, generation), &spec2, &tx));
        if let Err(e) = spawned {
            return Decided::Now(Err(Some(format!(
                "the fork server failed: cannot start a thread: {e}"
            ))));
        }
        st.importing = Some(Importing {
            key,
            generation,
            outcome: rx.clone(),
        });
        self.zygotes.status.starting(agent);
        Decided::Wait(rx)
    }

    /// Kills the fork server of `key` that is importing the bot (its import then fails at
    /// once, and its thread removes what it had).
    fn kill_importing(&self, key: u64) {
        if let Some(cg) = self
            .cgroups
            .v2_base
            .as_ref()
            .map(|b| b.join(zygote_name(key)))
        {
            let _ = cgroup::kill_all(&cg);
        }
    }

    /// The thread of one import (`generation` of `key`): starts the fork server, and once it
    /// has imported the bot (or failed) records the outcome for `agent`'s starts and its
    /// status. An import no longer the agent's current one (another key's started meanwhile,
    /// or the runtime shut down) is retired instead, and its waiting starts are spawned.
    fn import_zygote(
        &self,
        slot: &Mutex<AgentZygote>,
        agent: uuid::Uuid,
        (key, generation): (u64, u64),
        spec: &InstanceSpec,
        tx: &watch::Sender<Option<ZygoteOutcome>>,
    ) {
        let t0 = Instant::now();
        let started = self.start_zygote(key, spec);
        let mut st = slot.lock();
        if st.importing.as_ref().map(|i| i.generation) != Some(generation) {
            drop(st);
            if let Started::Ready(z) = started {
                self.retire_zygote(&z);
            }
            tx.send_replace(Some(Err(Some(
                "the fork server was replaced by a newer one (a redeploy)".into(),
            ))));
            return;
        }
        st.importing = None;
        let mut retire = None;
        let outcome = match started {
            Started::Ready(z) => {
                tracing::info!(agent = %agent, pid = z.pid, took_ms = t0.elapsed().as_millis() as u64, "fork server ready");
                let z = Arc::new(z);
                st.live = Some(z.clone());
                retire = st.previous.take();
                Ok(z)
            }
            Started::Unsafe(r) => {
                // The reason names the bot's threads: the agent's status has it, not this log.
                tracing::warn!(agent = %agent, "the bot is not safe to fork (threads alive after its import): its instances are spawned; the agent's status says which");
                let why = zygote::fork_decision(&ForkInputs {
                    mode: self.zygotes.mode,
                    runs_runner: true,
                    has_agent: true,
                    cgroup_v2: true,
                    unsafe_reason: Some(&r),
                })
                .err()
                .flatten();
                st.unsafe_ = Some((key, r));
                // The new bot runs (spawned): nothing forks from the previous one any more.
                retire = st.previous.take();
                Err(why)
            }
            Started::Failed(r, output) => {
                // The bot's output stays out of the server's log (the agent's status has it).
                tracing::warn!(agent = %agent, reason = %r, "the fork server failed: instances are spawned (the agent's status has the bot's output)");
                let why = match output {
                    Some(o) => format!("the fork server failed: {r}: {o}"),
                    None => format!("the fork server failed: {r}"),
                };
                st.failed = Some((key, Instant::now(), why.clone()));
                Err(Some(why))
            }
        };
        let view = outcome.as_ref().map_err(|e| e.as_deref());
        self.zygotes.status.record(agent, self.zygotes.mode, view);
        drop(st);
        tx.send_replace(Some(outcome));
        if let Some(old) = retire {
            self.retire_zygote(&old);
        }
    }

    /// Starts a fork server for `spec`'s agent and waits until it has imported the bot.
    /// Blocking (an import takes most of a second).
    fn start_zygote(&self, key: u64, spec: &InstanceSpec) -> Started {
        let name = zygote_name(key);
        let dirs = InstanceDirs::at(self.instances_dir.join(&name));
        let _ = fs::remove_dir_all(&dirs.dir);
        if let Some(d) = self.cgroups.v2_base.as_ref().map(|b| b.join(&name)) {
            if d.exists() {
                let _ = cgroup::kill_all(&d);
                cgroup::remove(&d);
            }
        }
        let uid = match &self.isolation.uids {
            Some(pool) => match pool.allocate() {
                Ok(u) => Some(u),
                Err(e) => return Started::Failed(e.to_string(), None),
            },
            None => None,
        };
        let made = (|| -> std::io::Result<_> {
            dirs.create(uid.map(|u| (u, u)))?;
            let out = fs::File::create(dirs.dir.join("stdout.log"))?;
            let err = fs::File::create(dirs.dir.join("stderr.log"))?;
            let cgs = self.cgroups.create(&name, None)?;
            let (ctl, child_ctl) = zygote::control_pair()?;
            Ok((OwnedFd::from(out), OwnedFd::from(err), cgs, ctl, child_ctl))
        })();
        let cleanup = |cg: Option<&Path>| {
            if let Some(cg) = cg {
                let _ = cgroup::kill_all(cg);
                for _ in 0..200 {
                    self.reaper.reap_all();
                    if !cgroup::populated(cg) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                cgroup::remove(cg);
            }
            self.remove_zygote_v1_cgroups(key);
            let _ = fs::remove_dir_all(&dirs.dir);
            if let (Some(pool), Some(u)) = (&self.isolation.uids, uid) {
                pool.release(u);
            }
        };
        let (out, err, cgs, ctl, child_ctl) = match made {
            Ok(v) => v,
            Err(e) => {
                cleanup(None);
                return Started::Failed(e.to_string(), None);
            }
        };
        let env = zygote_env(&dirs, uid, &spec.env);
        let cwd = spec
            .working_dir
            .clone()
            .unwrap_or_else(|| dirs.home.clone());
        let mut args = spec.args.clone();
        args.push("--zygote".into());
        let fds = cgroup::raw_fds(&cgs.procs_fds);
        let spawned = self.reaper.spawn_registered(|| {
            let pid = spawn::spawn(&SpawnSpec {
                program: &spec.program,
                args: &args,
                env: &env,
                cwd: &cwd,
                stdout: &out,
                stderr: &err,
                cgroup_procs: &fds,
                ids: uid.map(|u| (u, u)),
                stdin: Some(std::os::fd::AsRawFd::as_raw_fd(&child_ctl)),
                // The fork server's namespace is its instances' too (they are its forks, of
                // one deployment and one uid): a tmpfs, alive while one of them is.
                namespaces: uid.and(self.isolation.namespaces.as_deref()),
            })?;
            Ok(((), pid))
        });
        drop((child_ctl, out, err));
        // The fork server sits in its v1 cgroups until it is retired, which removes them
        // ([`Self::remove_zygote_v1_cgroups`]); its instances join their own before bot code.
        let InstanceCgroups { v2, procs_fds, .. } = cgs;
        drop(procs_fds);
        let pid = match spawned {
            Ok(((), pid, _exit)) => pid,
            Err(e) => {
                cleanup(v2.as_deref());
                return Started::Failed(format!("cannot start {}: {e}", spec.program), None);
            }
        };
        let started = Zygote::await_ready(
            ctl,
            key,
            pid,
            uid,
            dirs.dir.clone(),
            v2.clone(),
            self.reaper.clone(),
        );
        match started {
            Started::Ready(z) => Started::Ready(z),
            Started::Unsafe(r) => {
                cleanup(v2.as_deref());
                Started::Unsafe(r)
            }
            Started::Failed(r, _) => {
                let last = last_line(&dirs.dir.join("stderr.log"));
                cleanup(v2.as_deref());
                Started::Failed(r, Some(last).filter(|l| !l.is_empty()))
            }
        }
    }

    /// Retires a fork server (see [`Zygote::retire`]) and removes what it had: its cgroup, its
    /// directory, its hold on its uid (which its forked instances keep until they are gone).
    /// Blocking.
    fn retire_zygote(&self, z: &Zygote) {
        z.retire();
        if let Some(cg) = &z.cgroup {
            for _ in 0..400 {
                self.reaper.reap_all();
                if !cgroup::populated(cg) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            cgroup::remove(cg);
        }
        self.remove_zygote_v1_cgroups(z.key);
        let _ = fs::remove_dir_all(&z.dir);
        if let (Some(pool), Some(u)) = (&self.isolation.uids, z.uid) {
            pool.release(u);
        }
    }

    /// Removes the v1 cgroups of the fork server with `key` once it is gone (they hold no
    /// instance: a forked instance joins its own before it runs bot code). Blocking.
    fn remove_zygote_v1_cgroups(&self, key: u64) {
        let name = zygote_name(key);
        for (_, base) in &self.cgroups.v1_bases {
            cgroup::remove(&base.join(&name));
        }
    }

    /// Removes the directories and cgroups of fork servers a previous run left behind (v1
    /// ones too: runs before fork servers had only a v2 cgroup left them in v1).
    async fn sweep_zygotes(&self) {
        let live: HashSet<String> = self
            .zygotes
            .by_agent
            .lock()
            .values()
            .flat_map(|s| {
                let st = s.lock();
                let live = st
                    .live
                    .iter()
                    .chain(&st.previous)
                    .map(|z| zygote_name(z.key));
                live.chain(st.importing.as_ref().map(|i| zygote_name(i.key)))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut dirs = Vec::new();
        let mut cgroups = Vec::new();
        // (base, what it holds): instance dirs, v2 cgroups (killed whole), v1 cgroups (their
        // processes are the v2 ones', removed after them).
        enum Kind {
            Dir,
            V2,
            V1,
        }
        let bases = std::iter::once((&self.instances_dir, Kind::Dir))
            .chain(self.cgroups.v2_base.iter().map(|b| (b, Kind::V2)))
            .chain(self.cgroups.v1_bases.iter().map(|(_, b)| (b, Kind::V1)));
        for (base, kind) in bases {
            let Ok(rd) = fs::read_dir(base) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("zygote-") && !live.contains(&name) {
                    match kind {
                        Kind::Dir => dirs.push(e.path()),
                        Kind::V2 => {
                            kill_cgroup(&e.path()).await;
                            cgroups.push(e.path());
                        }
                        Kind::V1 => cgroups.push(e.path()),
                    }
                }
            }
        }
        tokio::task::block_in_place(|| {
            for cg in &cgroups {
                for _ in 0..200 {
                    self.reaper.reap_all();
                    if !cgroup::populated(cg) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                cgroup::remove(cg);
            }
            for d in &dirs {
                let _ = fs::remove_dir_all(d);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    /// An instance's directory goes by its known layout, and whole when it holds more: files
    /// the instance left in `home` and `tmp` (a subdirectory among them), and a file of
    /// another kind beside its own.
    #[test]
    fn an_instance_directory_is_removed_with_whatever_it_holds() {
        use super::isolation::InstanceDirs;
        let root = tempfile::tempdir().unwrap();
        let plain = InstanceDirs::at(root.path().join("a"));
        plain.create(None).unwrap();
        for f in super::INSTANCE_FILES {
            std::fs::write(plain.dir.join(f), b"x").unwrap();
        }
        super::remove_instance_dir(&plain.dir);
        assert!(!plain.dir.exists());
        let full = InstanceDirs::at(root.path().join("b"));
        full.create(None).unwrap();
        std::fs::write(full.dir.join("stdout.log"), b"x").unwrap();
        std::fs::create_dir_all(full.home.join(".cache/pip")).unwrap();
        std::fs::write(full.home.join(".cache/pip/f"), b"x").unwrap();
        std::fs::write(full.tmp.join("t"), b"x").unwrap();
        std::fs::write(full.dir.join("other"), b"x").unwrap();
        super::remove_instance_dir(&full.dir);
        assert!(!full.dir.exists());
        // Already gone: nothing to do, nothing fails.
        super::remove_instance_dir(&full.dir);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    /// A captured output file's tail: its last 2 KiB only, read from the end of a file much
    /// longer than that, and without the zeros of a hole the tailer punched.
    #[test]
    fn an_output_tail_is_the_files_last_bytes_without_its_hole() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stdout.log");
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(&vec![b'x'; 1 << 20]).unwrap();
        f.write_all(b"last words\n").unwrap();
        let tail = super::file_tail(&p);
        assert_eq!(tail.len(), 2048);
        assert!(tail.ends_with("xlast words\n"), "{tail}");
        // A hole up to the end but for a few bytes (read back as zeros).
        let mut g = fs::File::create(dir.path().join("h")).unwrap();
        g.seek(SeekFrom::Start(1 << 20)).unwrap();
        g.write_all(b"bye").unwrap();
        assert_eq!(super::file_tail(&dir.path().join("h")), "bye");
        assert_eq!(super::file_tail(&dir.path().join("missing")), "");
    }

    use super::*;

    /// A program that cannot be reached is named with what it resolves to when that is
    /// elsewhere (a venv's `python` linking into a pyenv under `/root`), so that the
    /// directory named as blocking it is explained; a plain path is named alone.
    #[test]
    fn an_unreachable_program_is_named_with_where_it_leads() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("pyenv/versions/3.11/bin");
        fs::create_dir_all(&real).unwrap();
        let python = real.join("python3.11");
        fs::write(&python, "").unwrap();
        let bin = t.path().join("bot/.venv/bin");
        fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(&python, bin.join("python3")).unwrap();
        std::os::unix::fs::symlink("python3", bin.join("python")).unwrap();
        let real = fs::canonicalize(&python).unwrap();
        let venv_python = bin.join("python");
        let msg = unreachable(
            &format!("program {}", shown_resolved(&venv_python)),
            "/root (mode 700) does not let other users through",
        );
        assert_eq!(
            msg,
            format!(
                "instances run under unprivileged uids of their own and cannot reach the program \
                 {} (a link to {}): /root (mode 700) does not let other users through \
                 (docs/security.md)",
                venv_python.display(),
                real.display()
            )
        );
        assert_eq!(shown_resolved(&real), real.display().to_string());
        // A path through a linked directory resolves elsewhere without being a link itself.
        let linked_dir = t.path().join("venv-link");
        std::os::unix::fs::symlink(real.parent().unwrap(), &linked_dir).unwrap();
        assert_eq!(
            shown_resolved(&linked_dir.join("python3.11")),
            format!(
                "{} (which resolves to {})",
                linked_dir.join("python3.11").display(),
                real.display()
            )
        );
        // What does not exist is named as given.
        let gone = t.path().join("gone");
        assert_eq!(shown_resolved(&gone), gone.display().to_string());
    }

    /// A signal to the main process's group (pid 10) reaches its members once: only the
    /// members in other groups (a `setsid` child) are signalled one by one; when the group
    /// could not be signalled (the main process is gone), every member is.
    #[test]
    fn a_signal_reaches_each_process_once() {
        let members = [(10, Some(10)), (11, Some(10)), (12, Some(12)), (13, None)];
        assert_eq!(
            outside_group(members, Some(10)).collect::<Vec<_>>(),
            [12, 13]
        );
        assert_eq!(
            outside_group(members, None).collect::<Vec<_>>(),
            [10, 11, 12, 13]
        );
    }

    /// A spare's claim dropped before it was finished (a start's future dropped while it
    /// waits for the `exec`) waits for the parked process, kills the started process and
    /// removes the instance's cgroups; nothing it started lives on. Skipped without spares
    /// (root, cgroup v2 next to v1 controllers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_dropped_before_it_is_finished_leaves_nothing_running() {
        let (data, rt) = test_runtime("claim-drop", None);
        let Some(spare) = first_spare(&rt).await else {
            rt.shutdown().await;
            return;
        };
        let v1: Vec<PathBuf> = spare.v1.iter().map(|(_, d)| d.clone()).collect();
        let id = uuid::Uuid::new_v4().to_string();
        let files = (
            OwnedFd::from(fs::File::create(data.path().join("out")).expect("out")),
            OwnedFd::from(fs::File::create(data.path().join("err")).expect("err")),
        );
        let program = "/bin/sleep".to_string();
        let args = vec!["30".to_string()];
        let env = vec![("CATTERY_INSTANCE_ID".into(), id.clone().into())];
        let cwd = data.path().to_path_buf();
        let sspec = SpawnSpec {
            program: &program,
            args: &args,
            env: &env,
            cwd: &cwd,
            stdout: &files.0,
            stderr: &files.1,
            cgroup_procs: &[],
            ids: None,
            stdin: None,
            namespaces: None,
        };
        let claim = match rt.begin_spare_claim(spare, &id, None, &sspec) {
            Ok(c) => c,
            Err(_) => panic!("the spare could not be claimed"),
        };
        let v2 = claim.v2.clone();
        drop(claim);
        assert!(
            !v2.exists(),
            "the instance's v2 cgroup is left: {}",
            v2.display()
        );
        for d in &v1 {
            assert!(!d.exists(), "a v1 cgroup is left: {}", d.display());
        }
        assert!(
            pids_with_instance_env(&id).is_empty(),
            "the started process lives on"
        );
        rt.shutdown().await;
    }

    /// What a start runs for a `local:` bot is chosen as an instance sees the bot directory,
    /// as the deploy-time check chooses it: a `.venv` only root may enter is not its Python
    /// (the default is), and a bot directory behind a directory only its owner may enter is
    /// as missing as one that is not there. As root, a start chose that `.venv` and found
    /// that `bot.py`. Skipped where instances get no uids of their own (not root).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_sees_a_local_bot_as_its_instance_would() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m));
        let uids = Some("1900000-1999999".parse::<UidRange>().expect("range"));
        let (_data, rt) = test_runtime("as-instance", uids);
        if rt.isolation.uids.is_none() {
            rt.shutdown().await;
            return;
        }
        let t = tempfile::tempdir().unwrap();
        mode(t.path(), 0o755).unwrap();
        let bot = t.path().join("bot");
        fs::create_dir_all(bot.join(".venv/bin")).unwrap();
        fs::write(bot.join("bot.py"), "").unwrap();
        fs::write(bot.join(".venv/bin/python"), "#!/bin/sh\n").unwrap();
        mode(&bot.join(".venv/bin/python"), 0o755).unwrap();
        mode(&bot.join(".venv"), 0o700).unwrap();
        let private = t.path().join("private");
        fs::create_dir_all(private.join("bot")).unwrap();
        fs::write(private.join("bot/bot.py"), "").unwrap();
        mode(&private, 0o700).unwrap();
        let dep = |dir: &Path| DeploymentRecord {
            id: uuid::Uuid::new_v4(),
            agent_id: uuid::Uuid::new_v4(),
            spec: crate::model::DeploymentSpec {
                image: Some(format!("local:{}", dir.display())),
                ..Default::default()
            },
            created_ms: 0,
        };
        let chosen = rt.prepare(&dep(&bot)).expect("bot.py is seen");
        assert_eq!(
            chosen.program, rt.python.python,
            "not the hidden .venv's python"
        );
        let hidden = rt.prepare(&dep(&private.join("bot"))).unwrap_err();
        let missing = rt.prepare(&dep(&private.join("gone"))).unwrap_err();
        assert_eq!(
            hidden.replace("/bot ", "/X "),
            missing.replace("/gone ", "/X ")
        );
        // Once an instance may enter the `.venv`, it is chosen.
        mode(&bot.join(".venv"), 0o755).unwrap();
        let venv = bot.join(".venv/bin/python").display().to_string();
        assert_eq!(rt.prepare(&dep(&bot)).unwrap().program, venv);
        rt.shutdown().await;
    }

    /// A process runtime on a fresh data dir (kept alive by the returned `TempDir`), its
    /// server id made of `prefix` and a random suffix.
    fn test_runtime(prefix: &str, uids: Option<UidRange>) -> (tempfile::TempDir, ProcessRuntime) {
        let data = tempfile::tempdir().expect("tempdir");
        let server_id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
        let rt = ProcessRuntime::new(
            data.path().join("instances"),
            &server_id,
            uids,
            &rundir::RuntimeDir::Data,
        )
        .expect("runtime");
        (data, rt)
    }

    /// The runtime's first spare, waited for up to 20 s; `None` (and a note that the test is
    /// skipped) where this machine makes none (not root, no cgroup v2 next to v1 controllers).
    async fn first_spare(rt: &ProcessRuntime) -> Option<spare::Spare> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = rt.spares.take() {
                return Some(s);
            }
            if Instant::now() > deadline {
                eprintln!("no spare cgroup slots on this machine: skipped");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn test_sink() -> LogSink {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        LogSink::of_no_instance(tx, crate::runtime::logs::LogRate::UNLIMITED)
    }

    /// A fresh data dir gets its builds directory when the runtime starts, so that whether
    /// instances' namespaces can cover it is tried then, not first at an instance's start
    /// after the first build; instances may pass through it (`0711`) when they run under
    /// uids of their own, and it is covered for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fresh_data_dir_gets_its_builds_directory_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let uids = Some("1900000-1999999".parse::<UidRange>().expect("range"));
        let (data, rt) = test_runtime("builds-dir", uids);
        let builds = data.path().join(namespace::BUILDS);
        let meta = std::fs::metadata(&builds).expect("the builds directory is made at start");
        assert!(meta.is_dir());
        if rt.isolation.uids.is_some() {
            assert_eq!(meta.permissions().mode() & 0o7777, 0o711);
            if let Some(ns) = &rt.isolation.namespaces {
                assert!(ns.covers_builds(), "{}", ns.describe());
            }
        }
        rt.shutdown().await;
    }

    /// A start's future dropped while it waits for its process's `exec` (a start from a
    /// spare: the session engine's task aborted, a timeout around the start) gives back all
    /// it took: its port and uid can be taken again, its directory and cgroups are gone, its
    /// process is killed. A start let finish keeps them. Skipped without spares (root,
    /// cgroup v2 next to v1 controllers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_dropped_while_it_waits_gives_back_all_it_took() {
        // Instance uids where this machine allows them (root, a mapped range).
        let uids = Some("1900000-1999999".parse::<UidRange>().expect("range"));
        let (data, rt) = test_runtime("start-drop", uids);
        let Some(spare) = first_spare(&rt).await else {
            rt.shutdown().await;
            return;
        };
        rt.spares.give_back(spare);
        // A full stock, its thread waiting to be asked for more.
        let full = |rt: &ProcessRuntime| rt.spares.ready() == spare::STOCK;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !full(&rt) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(full(&rt), "the stock never filled");
        let spec = |id: uuid::Uuid| InstanceSpec {
            instance_id: id,
            program: "/bin/sleep".into(),
            args: vec!["30".into()],
            working_dir: None,
            env: vec![],
            limits: None,
            agent: None,
            deployment: None,
            abandoned: Default::default(),
        };
        let held = |rt: &ProcessRuntime| {
            (
                rt.ports.held_count(),
                rt.isolation.uids.as_ref().map_or(0, |p| p.held_count()),
            )
        };
        // One poll: set up, spare claimed, waiting for the pidfd. Tokio learns its readiness
        // from its driver, which the other worker may run at that moment: on a loaded machine
        // the exec can win the race to the first poll, and the start is then simply done.
        // Such a start is stopped and the next one tried, until one waits.
        let mut waited = None;
        for _ in 0..20 {
            let id = uuid::Uuid::new_v4();
            let mut start = Box::pin(rt.start(spec(id), test_sink()));
            let polled = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(start.as_mut(), cx))
            })
            .await;
            match polled {
                std::task::Poll::Pending => {
                    waited = Some((id, start));
                    break;
                }
                std::task::Poll::Ready(done) => {
                    done.expect("start").terminate(Duration::ZERO).await;
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !full(&rt) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        let (id, start) = waited.expect("no start ever waited for its pidfd");
        let v2 = rt.cgroups.v2_base.as_ref().map(|b| b.join(id.to_string()));
        {
            let _start = start;
            let taken = held(&rt);
            assert_eq!(taken.0, 1, "the start reserved no port");
            if rt.isolation.uids.is_some() {
                assert_eq!(taken.1, 1, "the start took no uid");
            }
            assert!(data.path().join("instances").join(id.to_string()).exists());
        }
        assert_eq!(held(&rt), (0, 0), "a port or uid is still held");
        assert!(
            !data.path().join("instances").join(id.to_string()).exists(),
            "the instance's directory is left"
        );
        if let Some(v2) = &v2 {
            assert!(!v2.exists(), "the v2 cgroup is left: {}", v2.display());
        }
        for (_, b) in &rt.cgroups.v1_bases {
            assert!(!b.join(id.to_string()).exists(), "a v1 cgroup is left");
        }
        assert!(
            pids_with_instance_env(&id.to_string()).is_empty(),
            "the started process lives on"
        );
        // The stock made up for the spare the dropped start took.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !full(&rt) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            full(&rt),
            "the stock was not refilled after the dropped start"
        );
        // Started to the end, the instance keeps what it was handed.
        let inst = rt.start(spec(uuid::Uuid::new_v4()), test_sink()).await;
        let inst = inst.expect("start");
        let kept = held(&rt);
        assert_eq!(kept.0, 1);
        assert!(inst.exited().is_none());
        inst.terminate(Duration::ZERO).await;
        assert_eq!(held(&rt), (0, 0));
        rt.shutdown().await;
    }

    /// A stranger that took the pid of an instance's main process after it was reaped (here
    /// a process group leader of ours, standing for it, with no status delivered to the
    /// instance yet: the moment between a check and a signal) gets no signal from the
    /// instance's stop, with or without a v2 cgroup. It blocks `SIGTERM`, so a signal sent
    /// would stay pending, for all to see.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_sends_nothing_to_a_stranger_with_a_reaped_main_processs_pid() {
        use std::os::unix::process::CommandExt;
        let (data, rt) = test_runtime("pid-reuse", None);
        let mut stranger = std::process::Command::new("/bin/sleep");
        stranger.arg("30").process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            stranger.pre_exec(|| {
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(Signal::SIGTERM);
                set.thread_block().map_err(std::io::Error::from)
            })
        };
        let mut stranger = stranger.spawn().expect("spawn sleep");
        let pid = stranger.id() as i32;
        // Whether a SIGTERM is pending for it (sent, blocked).
        let sigterm_pending = |pid: i32| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            status.lines().any(|l| {
                let mask = l
                    .strip_prefix("ShdPnd:")
                    .or_else(|| l.strip_prefix("SigPnd:"));
                mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                    .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
            })
        };
        assert!(!sigterm_pending(pid));
        let cg = data.path().join("cgroup");
        fs::create_dir_all(&cg).expect("cgroup dir");
        fs::write(cg.join("cgroup.procs"), "").expect("cgroup.procs");
        for (cg_v2, child) in [(None, true), (Some(cg.clone()), true), (None, false)] {
            let id = uuid::Uuid::new_v4().to_string();
            let dir = data.path().join(&id);
            fs::create_dir_all(&dir).expect("dir");
            // Its status was not delivered (the sender stays), but no waiter is registered:
            // the reaper reaped it.
            let (_tx, exit_rx) = watch::channel(None);
            let inst = rt.instance(
                id,
                // Its own start time, not the stranger's.
                (pid, 1, child),
                (0, None),
                dir,
                (cg_v2.clone(), vec![]),
                exit_rx,
                (0, 0),
                test_sink(),
            );
            inst.signal_all(Signal::SIGTERM);
            assert!(
                !sigterm_pending(pid),
                "the stranger was signalled (v2 cgroup: {}, child: {child})",
                cg_v2.is_some()
            );
        }
        let _ = stranger.kill();
        let _ = stranger.wait();
        rt.shutdown().await;
    }

    /// Without a v2 cgroup, the stop of an instance whose main process is not this server's
    /// child (adopted after a restart) reaches the members of the main process's group that
    /// carry no instance id (here a `sleep` of a shell that leads the group), as `killpg`
    /// did: each through a pidfd, only while the main process, with its start time, holds
    /// the group. With another start time (a stranger holding the number) none is signalled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::zombie_processes)] // The reaper reaps it.
    async fn a_stop_reaches_the_untagged_group_members_of_an_adopted_instance_without_cgroup() {
        use std::os::unix::process::CommandExt;
        let (data, rt) = test_runtime("adopted-group", None);
        let leader = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & wait"])
            .env_remove("CATTERY_INSTANCE_ID")
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let lead = leader.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let member = loop {
            if let Some(&p) = pids_in_group(lead).iter().find(|&&p| p != lead) {
                break p;
            }
            assert!(Instant::now() < deadline, "the shell started no sleep");
            std::thread::sleep(Duration::from_millis(5));
        };
        let runs = |pid: i32| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with(['Z', 'X'])))
                .is_some_and(|dead| !dead)
        };
        let start = pid_start_time(lead).expect("start time");
        for (pid_start, reached) in [(start + 1, false), (start, true)] {
            let id = uuid::Uuid::new_v4().to_string();
            let dir = data.path().join(&id);
            fs::create_dir_all(&dir).expect("dir");
            let (_tx, exit_rx) = watch::channel(None);
            let inst = rt.instance(
                id,
                (lead, pid_start, false),
                (0, None),
                dir,
                (None, vec![]),
                exit_rx,
                (0, 0),
                test_sink(),
            );
            inst.signal_all(Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while reached && runs(member) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                !runs(member),
                reached,
                "the group's member was {}signalled (start time {pid_start}, the leader's {start})",
                if reached { "not " } else { "" }
            );
            assert_eq!(!runs(lead), reached);
        }
        rt.shutdown().await;
    }
}
