//! The local builder: the context becomes a managed `local:` directory with its own
//! virtualenv, built with pip from `uv.lock` (exactly the locked set, exported by uv),
//! `requirements.txt` or `pyproject.toml`'s `[project] dependencies` ([`choose_source`]).
//!
//! The virtualenv is layered on a base Python environment (`--build-python`, default
//! `--python`) the way a Pipecat Cloud image is layered on `dailyco/pipecat-base`: a `.pth`
//! file puts the base's site-packages after the venv's own, so what the base has (pipecat,
//! the runner's fastapi and uvicorn) is there without a download, and pip installs only what
//! the base lacks or pins differently.
//!
//! Every step runs the org's code (pip runs a source package's build, and `python -m` finds
//! modules in the context first), so no step runs as the server: with an environment built
//! from an allowlist (never the server's, which may hold its database URL or Daily key), and,
//! when instances get uids of their own, under an unprivileged uid of that pool with no
//! supplementary groups and `no_new_privs`, owning only the context, the virtualenv and a
//! home of its own for the build. Afterwards every process left under that uid is killed and
//! the results are given back to the server's user before they are opened to all, so a later
//! instance drawing the same uid cannot change them.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Artifact, BuildJob, BuildLog, Builder};
use crate::runtime::process::cgroup::{self, BoundedCgroups, CgroupSupport, TaskLimits};
use crate::runtime::process::namespace::{self, Namespaces, NixSys};
use crate::runtime::process::reaper::Reaper;
use crate::runtime::process::signals;
use crate::runtime::process::spawn::{fresh_keyrings, libc_keyctl};
use crate::runtime::process::uids::UidPool;

/// The local virtualenv builder.
#[derive(Clone)]
pub struct VenvBuilder {
    /// The base environment's interpreter.
    pub base_python: String,
    /// The instance uid pool, when instances run under uids of their own: each build's steps
    /// then run under one of them. `None`: steps run as the server's user (which is then no
    /// more than its instances' either).
    pub uids: Option<Arc<UidPool>>,
    /// What each step's private mount namespace is made of (a private `/tmp`, `/var/tmp`,
    /// `/dev/shm` and `/proc`, as instances get), when steps run under a uid of the pool and
    /// the machine allows namespaces.
    pub namespaces: Option<Arc<Namespaces>>,
    /// The runtime's cgroups, when the server can make them: each step then runs in a
    /// cgroup of its own with `limits`, removed when the step ends.
    pub cgroups: Option<Arc<CgroupSupport>>,
    /// Memory and task limits of each step.
    pub limits: TaskLimits,
}

/// The default memory limit of a build step: 4 GiB (pip building a large wheel from source
/// needs well over 1 GiB).
pub const DEFAULT_STEP_MEMORY_MB: u64 = 4096;

/// Name of the file in a build's directory naming the cgroups of its running step, one per
/// line: what a server that stopped mid-build kills at its next start ([`Builder::recover`]).
const STEP_CGROUPS: &str = "step.cgroups";

impl std::fmt::Debug for VenvBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VenvBuilder")
            .field("base_python", &self.base_python)
            .field("uids", &self.uids.as_ref().map(|p| p.range()))
            .field("limits", &self.limits)
            .finish()
    }
}

/// How a build's steps run: the environment they get, and the uid they run under.
struct Steps {
    env: Vec<(OsString, OsString)>,
    uid: Option<u32>,
    /// Each step's namespace, with `uid` only.
    namespaces: Option<Arc<Namespaces>>,
    /// Where each step's bounded cgroups are made, and their limits.
    cgroups: Option<(Arc<CgroupSupport>, TaskLimits)>,
    /// The file that names the running step's cgroups ([`STEP_CGROUPS`]).
    record: PathBuf,
}

/// What a build step gets of the server's environment: the locale, `PATH`, pip's own
/// configuration (`PIP_*`, but not a shared `PIP_CACHE_DIR` when steps run under uids of
/// their own: one org's build would fill the cache another's takes wheels from) and the
/// proxy and CA settings pip needs to reach an index; then `HOME` and `TMPDIR` of the build.
fn step_env(home: &Path, isolated: bool) -> Vec<(OsString, OsString)> {
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            let up = k.to_ascii_uppercase();
            matches!(k.as_ref(), "PATH" | "LANG" | "LANGUAGE" | "TZ")
                || k.starts_with("LC_")
                || (k.starts_with("PIP_") && !(isolated && k == "PIP_CACHE_DIR"))
                || matches!(
                    up.as_str(),
                    "HTTP_PROXY" | "HTTPS_PROXY" | "NO_PROXY" | "ALL_PROXY"
                )
                || matches!(
                    k.as_ref(),
                    "SSL_CERT_FILE" | "SSL_CERT_DIR" | "REQUESTS_CA_BUNDLE"
                )
        })
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("HOME".into(), home.into());
    env.insert("TMPDIR".into(), home.join("tmp").into());
    env.into_iter().collect()
}

/// What one command printed, and how it ended.
struct Ran {
    ok: bool,
    status: String,
    /// Its first [`KEPT_LINES`] lines.
    lines: Vec<String>,
    /// Why it failed, as [`reason`] picks it from all its lines.
    reason: String,
}

/// Most lines of a step's output kept in memory (what `python -c` printed is read from them;
/// the rest only goes to the build's log).
const KEPT_LINES: usize = 200;

/// [`reason`] over lines as they come, in bounded memory: the first five `ERROR:` lines and
/// the last three lines that are not blank.
#[derive(Default)]
struct Reason {
    errors: Vec<String>,
    last: std::collections::VecDeque<String>,
}

impl Reason {
    fn push(&mut self, line: &str) {
        let l = line.trim();
        // uv's `error:` comes with `cause:`/`Caused by:` lines and a `hint:`.
        let follows = !self.errors.is_empty()
            && ["cause:", "Caused by:", "hint:"]
                .iter()
                .any(|p| l.starts_with(p));
        if (l.starts_with("ERROR:") || l.starts_with("error:") || follows) && self.errors.len() < 5
        {
            self.errors.push(l.to_string());
        }
        if !l.is_empty() {
            if self.last.len() == 3 {
                self.last.pop_front();
            }
            self.last.push_back(l.to_string());
        }
    }

    fn text(&self) -> String {
        if self.errors.is_empty() {
            self.last.iter().cloned().collect::<Vec<_>>().join("\n")
        } else {
            self.errors.join("\n")
        }
    }
}

/// Sends the lines read from `pipe` to `tx`, each cut at [`super::MAX_LINE_BYTES`] (the rest
/// of a longer line is dropped; invalid UTF-8 is replaced): a step that prints without end
/// costs the server no more memory than one line.
async fn send_lines(
    pipe: impl tokio::io::AsyncRead + Unpin,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    let mut r = BufReader::new(pipe);
    let mut line: Vec<u8> = Vec::new();
    while let Ok(buf) = r.fill_buf().await {
        if buf.is_empty() {
            if !line.is_empty() {
                let _ = tx.send(String::from_utf8_lossy(&line).into_owned()).await;
            }
            break;
        }
        let (take, ends) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = super::MAX_LINE_BYTES.saturating_sub(line.len());
        let part = &buf[..take - usize::from(ends)];
        line.extend_from_slice(&part[..part.len().min(room)]);
        r.consume(take);
        if ends {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .await
                .is_err()
            {
                break;
            }
            line.clear();
        }
    }
}

/// The most processes and threads a build's uid may have at once (`RLIMIT_NPROC` of its
/// steps): pip and a compiler need a few dozen; a fork bomb in a package's build code is
/// refused more at this many instead of filling the machine's pid space.
pub const STEP_MAX_TASKS: libc::rlim_t = 512;

/// What a step's process sets for itself once it runs under the build's uid, before `exec`:
/// `no_new_privs`, at most [`STEP_MAX_TASKS`] processes and threads, umask 022. Only
/// async-signal-safe system calls (it runs between `fork` and `exec`).
fn step_limits() -> std::io::Result<()> {
    // SAFETY: plain system calls on local data.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The uid is the build's alone: this caps every process and thread of the build (a
        // fork bomb in a package's setup code stops here, not at pid_max).
        let cap = libc::rlimit {
            rlim_cur: STEP_MAX_TASKS,
            rlim_max: STEP_MAX_TASKS,
        };
        if libc::setrlimit(libc::RLIMIT_NPROC, &cap) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::umask(0o022);
    }
    Ok(())
}

/// The environment entry that marks a step's processes: `CATTERY_BUILD_STEP=<id>`.
const STEP_MARKER: &str = "CATTERY_BUILD_STEP";

/// Kills a step's process group unless it exited: a build cut short (its time limit)
/// leaves nothing running. The group goes as a whole while its leader is not reaped; after,
/// each process still in it that carries the step's marker
/// ([`signals::signal_marked_group`]): never a stranger given a freed number.
struct KillGroup {
    pgid: i32,
    marker: String,
    exited: bool,
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        if !self.exited {
            signals::signal_marked_group(
                &Reaper::global(),
                self.pgid,
                self.marker.as_bytes(),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A step's bounded cgroups, recorded in the build's [`STEP_CGROUPS`] file while they exist.
/// [`StepCgroups::end`] kills what is left in them and removes them; dropped without that (a
/// build cut by its time limit), it does so on a thread of its own.
struct StepCgroups {
    cg: BoundedCgroups,
    record: PathBuf,
    limits: TaskLimits,
    ended: bool,
}

impl StepCgroups {
    /// Makes the step's cgroups and records them. Errors: they could not be made.
    fn make(
        cg: &CgroupSupport,
        step: &str,
        limits: TaskLimits,
        record: &Path,
    ) -> Result<StepCgroups, String> {
        let made = cg
            .create_bounded(&format!("build-{step}"), &limits)
            .map_err(|e| format!("cannot make the build step's cgroup: {e}"))?;
        let me = StepCgroups {
            cg: made,
            record: record.to_path_buf(),
            limits,
            ended: false,
        };
        let lines: String = me
            .cg
            .dirs
            .iter()
            .map(|d| format!("{}\n", d.display()))
            .collect();
        std::fs::write(record, lines)
            .map_err(|e| format!("cannot record the build step's cgroup: {e}"))?;
        Ok(me)
    }

    /// Why the step failed, if it hit a limit: a sentence naming the limit.
    fn limit_reason(&self) -> Option<String> {
        let hits = cgroup::limit_hits(&self.cg.dirs);
        let mut why = Vec::new();
        if hits.oom_kills > 0 {
            why.push(format!(
                "the step passed the build memory limit of {} MiB (--build-memory-mb) and was \
                 killed",
                self.limits.memory_bytes >> 20
            ));
        }
        if hits.pids_refused > 0 {
            why.push(format!(
                "the step reached the build limit of {} processes and threads \
                 (--build-max-processes)",
                self.limits.pids
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Makes `cmd`'s process join the cgroups before anything else (the first `pre_exec`
    /// hook): nothing of the step runs outside them.
    fn join(&self, cmd: &mut tokio::process::Command) {
        let fds = cgroup::raw_fds(&self.cg.procs_fds);
        // SAFETY: `write(2)` on descriptors opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// After the step: kills what is left in the cgroups and removes them, then the record.
    /// Returns the step's failure `reason`, led by the limit it hit (also written to `log`)
    /// when it failed (`ok` false) at one.
    async fn end(mut self, ok: bool, log: &BuildLog, reason: String) -> String {
        let reason = match self.limit_reason().filter(|_| !ok) {
            Some(limit) => {
                log.line(&format!("[cattery] {limit}"));
                if reason.is_empty() {
                    limit
                } else {
                    format!("{limit}: {reason}")
                }
            }
            None => reason,
        };
        self.ended = true;
        let (dirs, record) = (std::mem::take(&mut self.cg.dirs), self.record.clone());
        let _ = tokio::task::spawn_blocking(move || end_cgroups(&dirs, &record)).await;
        reason
    }
}

impl Drop for StepCgroups {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (dirs, record) = (std::mem::take(&mut self.cg.dirs), self.record.clone());
        std::thread::spawn(move || end_cgroups(&dirs, &record));
    }
}

/// Kills every process in a step's cgroups `dirs`, removes them, and then the `record`
/// naming them (kept when they would not empty, for the next start to try again). Blocking.
fn end_cgroups(dirs: &[PathBuf], record: &Path) {
    let reaper = Reaper::global();
    if cgroup::kill_and_remove(dirs, std::time::Duration::from_secs(10), || {
        reaper.reap_all()
    }) {
        let _ = std::fs::remove_file(record);
    } else {
        tracing::warn!(cgroups = ?dirs, "a build step's processes would not end");
    }
}

/// The cgroups a build's [`STEP_CGROUPS`] record names: only directories of a build step
/// (named `build-...`, under a `cattery` directory of a cgroup mount), whatever the file says.
fn recorded_cgroups(record: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    text.lines()
        .map(PathBuf::from)
        .filter(|p| {
            p.starts_with("/sys/fs/cgroup")
                && p.components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )
                })
                && p.components().any(|c| c.as_os_str() == "cattery")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("build-"))
        })
        .collect()
}

/// Runs `program args` in `cwd` in a process group of its own, every output line to `log`.
/// The child is spawned and collected through the server's reaper, which reaps every child of
/// the process (a plain wait would find it already reaped).
async fn run(
    log: &BuildLog,
    steps: &Steps,
    cwd: &Path,
    program: &str,
    args: &[String],
) -> Result<Ran, String> {
    log.line(&format!("$ {program} {}", args.join(" ")));
    let step = uuid::Uuid::new_v4().to_string();
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_clear().envs(steps.env.iter().map(|(k, v)| (k, v)));
    let bounded = match &steps.cgroups {
        Some((cg, limits)) => Some(StepCgroups::make(cg, &step, *limits, &steps.record)?),
        None => None,
    };
    if let Some(b) = &bounded {
        b.join(&mut cmd);
        let (memory, pids) = b.cg.enforced;
        let missing: Vec<&str> = [(!memory, "memory"), (!pids, "process")]
            .into_iter()
            .filter_map(|(m, what)| m.then_some(what))
            .collect();
        if !missing.is_empty() {
            log.line(&format!(
                "[cattery] this step's {} limit is not enforced: the server cannot use that \
                 cgroup controller on this machine",
                missing.join(" and ")
            ));
        }
    }
    if let Some(uid) = steps.uid {
        // The step's own /tmp, /var/tmp, /dev/shm and /proc (where the machine allows them)
        // are made as root, so the switch to its uid comes after them, here rather than by
        // std (which switches before any `pre_exec`).
        let plan = steps.namespaces.as_ref().map(|ns| {
            let given = [cwd.as_os_str(), OsStr::new(program)];
            // Of the builds, only this step's own (its working directory's).
            ns.plan(
                given.into_iter().chain(args.iter().map(OsStr::new)),
                steps.env.iter().map(|(_, v)| v.as_os_str()),
                namespace::BuildView::Make,
            )
        });
        let dir = std::ffi::CString::new(cwd.as_os_str().as_bytes())
            .map_err(|_| format!("cannot run {program}: nul byte in {}", cwd.display()))?;
        // SAFETY: only async-signal-safe system calls between fork and exec, on data made
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(plan) = &plan {
                    namespace::enter(plan, &NixSys).map_err(std::io::Error::from_raw_os_error)?;
                }
                nix::unistd::setgroups(&[])?;
                nix::unistd::setresgid(uid.into(), uid.into(), uid.into())?;
                nix::unistd::setresuid(uid.into(), uid.into(), uid.into())?;
                fresh_keyrings(libc_keyctl).map_err(std::io::Error::from_raw_os_error)?;
                // Again, now in the namespace (std's change of directory came before it).
                nix::unistd::chdir(dir.as_c_str())?;
                step_limits()
            });
        }
    }
    cmd.args(args)
        .env(STEP_MARKER, &step)
        .current_dir(cwd)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_NO_INPUT", "1")
        .env("PIP_PROGRESS_BAR", "off")
        .env("UV_PYTHON_DOWNLOADS", "never")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, pid, mut exit) = Reaper::global()
        .spawn_registered(|| {
            let c = cmd.spawn()?;
            let pid = c.id().map_or(0, |p| p as i32);
            Ok((c, pid))
        })
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut guard = KillGroup {
        pgid: pid,
        marker: format!("{STEP_MARKER}={step}"),
        exited: false,
    };
    // Bounded: a step that prints faster than its log is written waits.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    type Pipe = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
    let pipes: [Option<Pipe>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as Pipe),
        child.stderr.take().map(|p| Box::new(p) as Pipe),
    ];
    for pipe in pipes.into_iter().flatten() {
        tokio::spawn(send_lines(pipe, tx.clone()));
    }
    drop(tx);
    let mut lines = Vec::new();
    let mut why = Reason::default();
    while let Some(l) = rx.recv().await {
        log.output(&l);
        why.push(&l);
        if lines.len() < KEPT_LINES {
            lines.push(l);
        }
    }
    let st = loop {
        if let Some(x) = *exit.borrow_and_update() {
            break x;
        }
        if exit.changed().await.is_err() {
            return Err(format!("lost track of {program}"));
        }
    };
    guard.exited = true;
    let status = match (st.code, st.signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown exit".into(),
    };
    let ok = st.code == Some(0);
    let mut reason = why.text();
    if let Some(b) = bounded {
        reason = b.end(ok, log, reason).await;
    }
    Ok(Ran {
        ok,
        status,
        lines,
        reason,
    })
}

/// The lines worth showing as a failed step's reason: pip's `ERROR:` lines (the first five),
/// else the last three lines that are not blank.
#[cfg(test)]
fn reason(lines: &[String]) -> String {
    let mut why = Reason::default();
    for l in lines {
        why.push(l);
    }
    why.text()
}

/// The `[project] dependencies` of a `pyproject.toml`. Errors: it does not parse.
pub fn pyproject_dependencies(text: &str) -> Result<Vec<String>, String> {
    let v: toml::Value = toml::from_str(text).map_err(|e| format!("pyproject.toml: {e}"))?;
    Ok(v.get("project")
        .and_then(|p| p.get("dependencies"))
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// `python -c code`'s output lines. Errors: it fails.
async fn python_says(
    log: &BuildLog,
    steps: &Steps,
    cwd: &Path,
    python: &str,
    code: &str,
) -> Result<Vec<String>, String> {
    let r = run(log, steps, cwd, python, &["-c".into(), code.into()]).await?;
    if !r.ok {
        return Err(format!("{python} failed ({}): {}", r.status, r.reason));
    }
    Ok(r.lines)
}

const SITE: &str =
    "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])";

/// Writes `argv[2]` to the file `argv[1]`: the venv's `.pth`, written by a step (the server
/// never writes into a directory a step owns, whose paths the step could redirect).
const WRITE_FILE: &str = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])";

/// The uid a build's steps run under, held while they may run. [`StepUid::reclaim`] ends its
/// processes, gives the build's files back to the server's user and frees it; dropped
/// without that (a build cut by its time limit), it does so on a task of its own.
struct StepUid {
    pool: Arc<UidPool>,
    uid: u32,
    /// What the steps were given: taken back afterwards.
    dirs: Vec<PathBuf>,
    /// The steps' home: removed afterwards.
    home: PathBuf,
    done: bool,
}

impl StepUid {
    async fn reclaim(mut self) -> Result<(), String> {
        self.done = true;
        let dirs = std::mem::take(&mut self.dirs);
        // On a task of its own: a build cut by its time limit meanwhile (this future
        // dropped) neither leaves processes of the uid running nor keeps the uid held.
        tokio::spawn(reclaim(
            self.pool.clone(),
            self.uid,
            dirs,
            self.home.clone(),
        ))
        .await
        .map_err(|e| e.to_string())?
    }
}

impl Drop for StepUid {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (pool, uid, dirs, home) = (
            self.pool.clone(),
            self.uid,
            std::mem::take(&mut self.dirs),
            self.home.clone(),
        );
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = reclaim(pool, uid, dirs, home).await {
                    tracing::warn!(uid, error = %e, "could not take back a cut build's files");
                }
            });
        }
    }
}

/// Ends every process under `uid`, gives `dirs` back to the server's user (recursively,
/// links not followed), removes `home`, and only then frees the uid: an instance given it
/// next finds nothing of the build's that it owns. The uid stays held when a process under
/// it would not end. Errors: what could not be done.
async fn reclaim(
    pool: Arc<UidPool>,
    uid: u32,
    dirs: Vec<PathBuf>,
    home: PathBuf,
) -> Result<(), String> {
    kill_all_of(uid).await?;
    let (me, my_gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let given = tokio::task::spawn_blocking(move || {
        let given = dirs.iter().try_for_each(|d| give_back(d, me, my_gid));
        // A build whose files could not all be given back fails: what the uid may still own
        // goes before the uid is freed (the home always does).
        if given.is_err() {
            for d in &dirs {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        let _ = std::fs::remove_dir_all(&home);
        given
    })
    .await
    .map_err(|e| e.to_string());
    pool.release(uid);
    given?
}

/// Kills every process of `uid` (a step may leave one behind, detached into a session of its
/// own): [`crate::runtime::process::uids::end_processes_of`], off the async workers.
async fn kill_all_of(uid: u32) -> Result<(), String> {
    tokio::task::spawn_blocking(move || crate::runtime::process::uids::end_processes_of(uid))
        .await
        .map_err(|e| e.to_string())?
}

/// Gives `p` and everything under it to `uid`:`gid`, links not followed (each link itself
/// changes owner), and takes every directory's write bits from its group and others (and its
/// set-id and sticky bits) before reading it: from then on no uid but the server's may add,
/// rename or swap an entry in it while the walk goes on. A path that went meanwhile is
/// skipped.
fn give_back(p: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::io::ErrorKind::NotFound;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let err = |e: std::io::Error| format!("{}: {e}", p.display());
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    // A second name of a file elsewhere (a step that links what it may not read, where the
    // kernel lets it) would be opened to all with the build: refused.
    if meta.file_type().is_file() && meta.nlink() > 1 {
        return Err(format!(
            "{} is a hard link, which a build may not make",
            p.display()
        ));
    }
    if !meta.is_dir() {
        return match std::os::unix::fs::lchown(p, Some(uid), Some(gid)) {
            Err(e) if e.kind() != NotFound => Err(err(e)),
            _ => Ok(()),
        };
    }
    // The directory itself, never what a link in its place would name.
    let d = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(p)
    {
        Ok(d) => d,
        Err(e) if e.kind() == NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    let now = d.metadata().map_err(err)?;
    if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
        return Err(format!("{} changed while it was given back", p.display()));
    }
    std::os::unix::fs::fchown(&d, Some(uid), Some(gid)).map_err(err)?;
    d.set_permissions(std::fs::Permissions::from_mode(now.mode() & 0o755))
        .map_err(err)?;
    for e in std::fs::read_dir(p).map_err(err)? {
        give_back(&e.map_err(err)?.path(), uid, gid)?;
    }
    Ok(())
}

/// The file a build's dependencies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `requirements.txt`, installed with pip.
    Requirements,
    /// `uv.lock` (with its `pyproject.toml`): exactly the locked set.
    Lock,
    /// The `[project] dependencies` of `pyproject.toml`, installed with pip.
    Pyproject,
    /// Nothing to install.
    Nothing,
}

/// What a Dockerfile installs from, when it names one source alone: [`Source::Lock`] when it
/// runs `uv sync` or names `uv.lock`, [`Source::Requirements`] when it names
/// `requirements.txt`; `None` when it names both or neither. Comment lines are skipped.
fn dockerfile_installs(text: &str) -> Option<Source> {
    let text: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let lock = text.contains("uv sync") || text.contains("uv.lock");
    let req = text.contains("requirements.txt");
    match (lock, req) {
        (true, false) => Some(Source::Lock),
        (false, true) => Some(Source::Requirements),
        _ => None,
    }
}

/// Which file a build installs from, given the files the context has and its Dockerfile's
/// text, and the line the build's log says it with (`None`: nothing worth saying).
///
/// `uv.lock` is used only with the `pyproject.toml` it locks (uv reads both). With both a
/// lock and `requirements.txt`, the Dockerfile decides when it installs one of them alone
/// (it is what Pipecat Cloud runs); else the lock, the exact set. Then `requirements.txt`,
/// then `pyproject.toml`'s dependencies.
fn choose_source(
    requirements: bool,
    lock: bool,
    pyproject: bool,
    dockerfile: Option<&str>,
) -> (Source, Option<String>) {
    let lock_usable = lock && pyproject;
    let ignored_lock =
        (lock && !pyproject).then(|| "uv.lock without pyproject.toml is not used".to_string());
    match (requirements, lock_usable) {
        (true, true) => match dockerfile.and_then(dockerfile_installs) {
            Some(Source::Requirements) => (
                Source::Requirements,
                Some(
                    "Installing requirements.txt, which the Dockerfile installs (uv.lock is not \
                     used)"
                        .into(),
                ),
            ),
            Some(_) => (
                Source::Lock,
                Some(
                    "Installing uv.lock, which the Dockerfile installs (requirements.txt is not \
                     used)"
                        .into(),
                ),
            ),
            None => (
                Source::Lock,
                Some("Installing uv.lock, the exact set (requirements.txt is not used)".into()),
            ),
        },
        (false, true) => (Source::Lock, Some("Installing uv.lock".into())),
        (true, false) => (Source::Requirements, ignored_lock),
        (false, false) if pyproject => (Source::Pyproject, ignored_lock),
        (false, false) => (
            Source::Nothing,
            Some(ignored_lock.map_or_else(
                || "No requirements.txt or pyproject.toml: nothing to install".into(),
                |l| format!("{l}: nothing to install"),
            )),
        ),
    }
}

/// The line a build's log says when the Dockerfile has steps this builder does not run
/// (every `RUN`, `COPY` and `ADD`: it only installs the dependencies), so that a step that
/// would fail, or that adds what the bot needs, is not passed over in silence.
fn steps_not_run(path: &str, text: &str) -> Option<String> {
    let n = text
        .lines()
        .map(str::trim_start)
        .filter(|l| {
            let word = l.split_whitespace().next().unwrap_or("");
            ["RUN", "COPY", "ADD"].contains(&word.to_ascii_uppercase().as_str())
        })
        .count();
    (n > 0).then(|| {
        format!(
            "The local builder does not run the {n} RUN/COPY/ADD step(s) of {path}: it installs \
             the dependencies and runs the bot from the whole context, so what another step \
             would add (apt packages, files a RUN makes) is not there; --builder docker runs them"
        )
    })
}

/// The Dockerfile's text, when `path` (relative, inside the context) names a readable file.
fn read_dockerfile(app: &Path, path: &str) -> Option<String> {
    let rel = Path::new(path);
    if !rel.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    }) {
        return None;
    }
    let p = app.join(rel);
    // At most 1 MiB of it: a Dockerfile is a few lines.
    let meta = std::fs::symlink_metadata(&p).ok()?;
    (meta.is_file() && meta.len() <= 1 << 20)
        .then(|| std::fs::read_to_string(&p).ok())
        .flatten()
}

/// What a build installs.
enum Install {
    /// `python -m pip install ARGS` in the venv; `what` names it in an error.
    Pip(&'static str, Vec<String>),
    /// The locked set of `uv.lock` ([`VenvBuilder::install_lock`]).
    Lock,
    Nothing,
}

/// How an install from `requirements.txt` is named in an error.
const PIP_REQUIREMENTS: &str = "pip install -r requirements.txt";

impl Install {
    /// The context's file the install comes from, as [`runner_deps_missing`] names it.
    fn source(&self) -> Source {
        match self {
            Install::Pip(PIP_REQUIREMENTS, _) => Source::Requirements,
            Install::Pip(..) => Source::Pyproject,
            Install::Lock => Source::Lock,
            Install::Nothing => Source::Nothing,
        }
    }
}

/// The error of a built virtualenv that cannot import what Cattery's runner needs. Such an
/// environment has what the context's file (`source`) installed and, through its `.pth`, the
/// packages of the base environment (`base`, `--build-python`); there is no base image. Says
/// where to add them for the file this context builds from.
fn runner_deps_missing(source: Source, base: &str, reason: &str) -> String {
    let (installed, add_to) = match source {
        Source::Requirements => ("requirements.txt", "requirements.txt"),
        Source::Lock => (
            "uv.lock",
            "the dependencies of pyproject.toml, and lock them again (uv lock)",
        ),
        Source::Pyproject => (
            "the dependencies of pyproject.toml",
            "the dependencies of pyproject.toml",
        ),
        Source::Nothing => (
            "nothing of the context (it names no dependencies)",
            "a requirements.txt",
        ),
    };
    format!(
        "the built environment cannot import fastapi and uvicorn, which Cattery's runner needs \
         ({reason}): it holds what {installed} installed and the packages of the base \
         environment {base} (--build-python), and neither has them: add pipecat-ai[runner] \
         (which brings both), or fastapi and uvicorn, to {add_to}; or start the server with \
         a --build-python that has them"
    )
}

/// What to install, read before any step runs (from then on a step, the org's code, may
/// change the context).
fn what_to_install(app: &Path, dockerfile: &str, log: &BuildLog) -> Result<Install, String> {
    let pip = |args: Vec<String>| {
        let mut a = vec!["-m".to_string(), "pip".into(), "install".into()];
        a.extend(args);
        a
    };
    let has = |f: &str| app.join(f).is_file();
    let text = read_dockerfile(app, dockerfile);
    let (source, said) = choose_source(
        has("requirements.txt"),
        has("uv.lock"),
        has("pyproject.toml"),
        text.as_deref(),
    );
    if let Some(line) = said {
        log.line(&line);
    }
    if let Some(line) = text.as_deref().and_then(|t| steps_not_run(dockerfile, t)) {
        log.line(&line);
    }
    Ok(match source {
        Source::Requirements => Install::Pip(
            PIP_REQUIREMENTS,
            pip(vec!["-r".into(), "requirements.txt".into()]),
        ),
        Source::Lock => Install::Lock,
        Source::Pyproject => {
            let text = std::fs::read_to_string(app.join("pyproject.toml"))
                .map_err(|e| format!("reading pyproject.toml: {e}"))?;
            let deps = pyproject_dependencies(&text)?;
            if deps.is_empty() {
                log.line("pyproject.toml lists no [project] dependencies");
                Install::Nothing
            } else {
                Install::Pip("pip install (pyproject.toml dependencies)", pip(deps))
            }
        }
        Source::Nothing => Install::Nothing,
    })
}

/// The locked set, as `uv export` writes it, in the build's home: a step writes it there.
const LOCKED_SET: &str = "uv-locked-requirements.txt";

impl VenvBuilder {
    /// The steps of a build: the virtualenv, its base `.pth`, the install, the runner's
    /// check. Returns the venv's `python`.
    async fn steps(
        &self,
        log: &BuildLog,
        steps: &Steps,
        app: &Path,
        venv: &Path,
        home: &Path,
        install: Install,
    ) -> Result<String, String> {
        let base = self.base_python.as_str();
        log.line(&format!("Base environment: {base}"));
        if matches!(install, Install::Lock) {
            self.check_uv(log, steps, app).await?;
        }
        let base_site = python_says(log, steps, app, base, SITE).await?;
        let r = run(
            log,
            steps,
            app,
            base,
            &["-m".into(), "venv".into(), venv.display().to_string()],
        )
        .await?;
        if !r.ok {
            return Err(format!(
                "creating the virtualenv failed ({}): {}",
                r.status, r.reason
            ));
        }
        let python = venv.join("bin/python").display().to_string();
        let own_site = python_says(log, steps, app, &python, SITE).await?;
        let own = own_site
            .first()
            .ok_or("the virtualenv has no site-packages")?;
        let mut pth: Vec<&str> = base_site.iter().map(String::as_str).collect();
        pth.dedup();
        let w = run(
            log,
            steps,
            app,
            &python,
            &[
                "-c".into(),
                WRITE_FILE.into(),
                Path::new(own)
                    .join("_cattery_base.pth")
                    .display()
                    .to_string(),
                pth.join("\n") + "\n",
            ],
        )
        .await?;
        if !w.ok {
            return Err(format!(
                "writing the virtualenv's base path failed ({}): {}",
                w.status, w.reason
            ));
        }
        let source = install.source();
        match install {
            Install::Pip(what, args) => {
                let r = run(log, steps, app, &python, &args).await?;
                if !r.ok {
                    return Err(format!("{what} failed ({}): {}", r.status, r.reason));
                }
            }
            Install::Lock => self.install_lock(log, steps, app, &python, home).await?,
            Install::Nothing => {}
        }
        let check = run(
            log,
            steps,
            app,
            &python,
            &["-c".into(), super::RUNNER_IMPORTS.into()],
        )
        .await?;
        if !check.ok {
            return Err(runner_deps_missing(source, base, &check.reason));
        }
        Ok(python)
    }
}

/// `-m uv ARGS`: the base environment's uv.
fn uv_args(args: &[&str]) -> Vec<String> {
    ["-m", "uv"]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect()
}

impl VenvBuilder {
    /// Fails unless the base environment runs uv (`python -m uv --version`, its version in
    /// the log): a build of a `uv.lock` needs it, and stops before any other step without it.
    async fn check_uv(&self, log: &BuildLog, steps: &Steps, app: &Path) -> Result<(), String> {
        let base = self.base_python.as_str();
        let v = run(log, steps, app, base, &uv_args(&["--version"])).await?;
        if !v.ok {
            return Err(format!(
                "the context has uv.lock, which the local builder installs with uv, but the base \
                 environment cannot run it ({base} -m uv: {}): install uv there ({base} -m pip \
                 install uv; scripts/setup-python.sh does), or build with Docker",
                v.reason
            ));
        }
        Ok(())
    }

    /// Installs exactly the set `uv.lock` locks into the venv whose interpreter is `python`,
    /// as Pipecat Cloud's `uv sync --locked --no-install-project --no-dev` does: the base
    /// environment's uv exports it (`--locked`: a lock that no longer matches
    /// `pyproject.toml` fails, as does a `requires-python` that `python` does not satisfy)
    /// into the build's `home`, then the venv's pip installs it with `--require-hashes
    /// --no-deps`. pip, unlike uv, sees the base's site-packages through the venv's `.pth`,
    /// so a locked version the base already has is not installed again.
    async fn install_lock(
        &self,
        log: &BuildLog,
        steps: &Steps,
        app: &Path,
        python: &str,
        home: &Path,
    ) -> Result<(), String> {
        let base = self.base_python.as_str();
        let set = home.join(LOCKED_SET).display().to_string();
        let r = run(
            log,
            steps,
            app,
            base,
            &uv_args(&[
                "export",
                "--locked",
                "--quiet",
                "--no-progress",
                "--no-dev",
                "--no-emit-project",
                "--format",
                "requirements-txt",
                "--python",
                python,
                "--output-file",
                &set,
            ]),
        )
        .await?;
        if !r.ok {
            return Err(format!(
                "uv export --locked (uv.lock) failed ({}): {}",
                r.status, r.reason
            ));
        }
        let args: Vec<String> = [
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--require-hashes",
            "-r",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([set])
        .collect();
        let r = run(log, steps, app, python, &args).await?;
        if !r.ok {
            return Err(format!(
                "pip install of the locked set (uv.lock) failed ({}): {}",
                r.status, r.reason
            ));
        }
        Ok(())
    }
}

/// Creates `p` (a directory) for a step under `uid`: owned by it, `mode`.
fn step_dir(p: &Path, uid: Option<u32>, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e: std::io::Error| format!("preparing {}: {e}", p.display());
    std::fs::create_dir_all(p).map_err(err)?;
    if let Some(u) = uid {
        std::os::unix::fs::lchown(p, Some(u), Some(u)).map_err(err)?;
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(err)
}

#[async_trait]
impl Builder for VenvBuilder {
    fn kind(&self) -> &'static str {
        "venv"
    }

    async fn recover(&self, dir: &Path) {
        let record = dir.join(STEP_CGROUPS);
        let dirs = recorded_cgroups(&record);
        if dirs.is_empty() {
            let _ = std::fs::remove_file(&record);
            return;
        }
        tracing::warn!(cgroups = ?dirs, "killing what a build step left running when the server stopped");
        let _ = tokio::task::spawn_blocking(move || end_cgroups(&dirs, &record)).await;
    }

    async fn build(&self, job: &BuildJob, log: &BuildLog) -> Result<Artifact, String> {
        let app = &job.context;
        if !app.join("bot.py").is_file() {
            return Err(
                "the build context has no bot.py at its root: Cattery runs bot.py as the base \
                 image does (run deploy from the bot's directory, or set [build] context_dir)"
                    .into(),
            );
        }
        let install = what_to_install(app, &job.dockerfile_path, log)?;
        let venv: PathBuf = job.dir.join("venv");
        let home: PathBuf = job.dir.join("home");
        let held = match &self.uids {
            Some(pool) => Some(StepUid {
                pool: pool.clone(),
                uid: pool
                    .allocate()
                    .map_err(|e| format!("no uid for the build's steps: {e}"))?,
                dirs: vec![app.clone(), venv.clone()],
                home: home.clone(),
                done: false,
            }),
            None => None,
        };
        let uid = held.as_ref().map(|h| h.uid);
        if let Some(u) = uid {
            // The context was unpacked by the server (regular files and directories only).
            give_back(app, u, u)?;
            log.line(&format!("Build steps run as uid {u}"));
        }
        step_dir(&home, uid, 0o700)?;
        step_dir(&home.join("tmp"), uid, 0o700)?;
        step_dir(&venv, uid, 0o755)?;
        let steps = Steps {
            env: step_env(&home, uid.is_some()),
            uid,
            namespaces: uid.and(self.namespaces.clone()),
            cgroups: self.cgroups.clone().map(|c| (c, self.limits)),
            record: job.dir.join(STEP_CGROUPS),
        };
        if steps.cgroups.is_none() {
            log.line("Build steps run without a memory limit: the server cannot make cgroups here");
        }
        let built = self.steps(log, &steps, app, &venv, &home, install).await;
        match held {
            Some(h) => h
                .reclaim()
                .await
                .map_err(|e| format!("taking the build's files back from its steps: {e}"))?,
            None => {
                let _ = std::fs::remove_dir_all(&home);
            }
        }
        let python = built?;
        for d in [app.as_path(), venv.as_path()] {
            super::open_for_all(d)
                .map_err(|e| format!("opening {} to instances: {e}", d.display()))?;
        }
        log.line(&format!("Built local:{} with {python}", app.display()));
        Ok(Artifact {
            image: format!("local:{}", app.display()),
            python: Some(python),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build cut by its time limit while its files are being taken back (the walk of a
    /// large virtualenv takes a while) still frees its uid once that is done: the taking
    /// back is not dropped with the build.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_cut_while_its_files_are_taken_back_still_frees_its_uid() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("venv");
        for i in 0..100 {
            let d = tree.join(format!("d{i}"));
            std::fs::create_dir_all(&d).unwrap();
            for j in 0..20 {
                std::fs::write(d.join(format!("f{j}")), "").unwrap();
            }
        }
        // One uid no process has: the pool can give it once.
        let range: crate::runtime::process::uids::UidRange =
            "2100000030-2100000030".parse().unwrap();
        std::fs::create_dir(dir.path().join("locks")).unwrap();
        let pool = Arc::new(UidPool::new(range, dir.path().join("locks")));
        let held = StepUid {
            pool: pool.clone(),
            uid: pool.allocate().unwrap(),
            dirs: vec![tree],
            home: dir.path().join("home"),
            done: false,
        };
        let cut = tokio::time::timeout(std::time::Duration::from_millis(1), held.reclaim()).await;
        assert!(cut.is_err(), "the taking back ended within 1 ms");
        let freed = async {
            while pool.allocate().is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), freed)
            .await
            .expect("the cut build's uid is never freed");
    }

    /// A step under a build uid has its own `/tmp`, `/var/tmp`, `/dev/shm` and `/run/lock` (what it
    /// leaves there is gone with it, never seen by a later holder of the uid) and a `/proc`
    /// without other uids' processes, and still runs in its directory under that uid.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_under_a_build_uid_has_its_own_tmp_and_proc() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let app = dir.path().join("app");
        let uid = 2_000_000_011;
        step_dir(&app, Some(uid), 0o755).unwrap();
        let range = "2000000000-2000065535".parse().unwrap();
        let ns = Namespaces::probe(&[], None, range).unwrap();
        let proc_line = match ns.hides_pids() {
            true => "pid-1-hidden",
            false => "sees-pid-1",
        };
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        let steps = Steps {
            env: step_env(&app, true),
            uid: Some(uid),
            namespaces: Some(Arc::new(ns)),
            cgroups: None,
            record: dir.path().join("step.cgroups"),
        };
        let name = format!("cattery-step-test-{}", uuid::Uuid::new_v4());
        let script = format!(
            "for d in /tmp /var/tmp /dev/shm; do echo x > $d/{name} || echo cannot-write; done; \
             cat /proc/1/cmdline > /dev/null 2>&1 && echo sees-pid-1 || echo pid-1-hidden; \
             echo $(id -u) $(pwd)"
        );
        let r = run(&log, &steps, &app, "/bin/sh", &["-c".into(), script])
            .await
            .unwrap();
        let leaked: Vec<String> = namespace::PLACES
            .iter()
            .map(|d| format!("{d}/{name}"))
            .filter(|p| std::fs::remove_file(p).is_ok())
            .collect();
        assert!(r.ok, "{:?}", r.lines);
        assert_eq!(
            r.lines,
            [proc_line.to_string(), format!("{uid} {}", app.display())]
        );
        assert!(
            leaked.is_empty(),
            "the host got the step's files: {leaked:?}"
        );
    }

    /// The cgroups of a test "server" (a server id of its own), with their base directories
    /// removed when dropped; `None` where the machine gives none (not root, no cgroups).
    struct TestCgroups(Arc<CgroupSupport>);

    impl TestCgroups {
        fn new() -> Option<TestCgroups> {
            if !nix::unistd::geteuid().is_root() {
                return None;
            }
            let cg = CgroupSupport::detect(&format!("test-{}", uuid::Uuid::new_v4()));
            let has = |c: &str| cg.v1_bases.iter().any(|(n, _)| *n == c);
            (cg.v2_base.is_some() && has("memory") && has("pids"))
                .then(|| TestCgroups(Arc::new(cg)))
        }
    }

    impl Drop for TestCgroups {
        fn drop(&mut self) {
            for d in self
                .0
                .v2_base
                .iter()
                .chain(self.0.v1_bases.iter().map(|(_, b)| b))
            {
                let _ = std::fs::remove_dir(d);
            }
            self.0.remove_liveness_lock();
        }
    }

    fn bounded_steps(dir: &Path, cg: &TestCgroups, memory_mb: u64, pids: u64) -> Steps {
        Steps {
            env: step_env(dir, false),
            uid: None,
            namespaces: None,
            cgroups: Some((
                cg.0.clone(),
                TaskLimits {
                    memory_bytes: memory_mb << 20,
                    pids,
                },
            )),
            record: dir.join(STEP_CGROUPS),
        }
    }

    /// Whether process `pid` runs (exists and is not a zombie).
    fn runs(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| !s[i + 2..].starts_with(['Z', 'X'])))
            .unwrap_or(false)
    }

    /// A step that takes more memory than the build's limit is killed, fails with the limit
    /// named (in its reason and the log), and its cgroups and their record are gone after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_past_the_memory_limit_fails_naming_it() {
        let Some(cg) = TestCgroups::new() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        let steps = bounded_steps(dir.path(), &cg, 64, 64);
        let code = "b = b'x' * (512 << 20); print('survived', len(b))";
        let r = run(
            &log,
            &steps,
            dir.path(),
            "python3",
            &["-c".into(), code.into()],
        )
        .await
        .unwrap();
        assert!(!r.ok, "{:?}", r.lines);
        assert_eq!(r.status, "killed by signal 9");
        assert!(
            r.reason.contains("build memory limit of 64 MiB"),
            "{}",
            r.reason
        );
        let text = std::fs::read_to_string(dir.path().join("build.log")).unwrap();
        assert!(
            text.contains("[cattery] the step passed the build memory limit"),
            "{text}"
        );
        assert!(!dir.path().join(STEP_CGROUPS).exists());
        let left: Vec<_> =
            cg.0.v2_base
                .iter()
                .chain(cg.0.v1_bases.iter().map(|(_, b)| b))
                .flat_map(|b| std::fs::read_dir(b).unwrap().flatten().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A step that forks past the build's process limit (a fork bomb in miniature) is
    /// refused more processes, fails with the limit named, and what it started is killed
    /// with its cgroup when it ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_past_the_process_limit_fails_naming_it() {
        let Some(cg) = TestCgroups::new() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        let steps = bounded_steps(dir.path(), &cg, 256, 20);
        let pids = dir.path().join("pids");
        let script = format!(
            "for i in $(seq 100); do /bin/sleep 60 >/dev/null 2>&1 & echo $! >> {}; done; wait",
            pids.display()
        );
        let r = run(&log, &steps, dir.path(), "/bin/sh", &["-c".into(), script])
            .await
            .unwrap();
        assert!(!r.ok, "{:?}", r.lines);
        assert!(
            r.reason.contains("build limit of 20 processes and threads"),
            "{}",
            r.reason
        );
        let started: Vec<i32> = std::fs::read_to_string(&pids)
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert!(!started.is_empty() && started.len() < 20, "{started:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while started.iter().any(|&p| runs(p)) {
            assert!(
                std::time::Instant::now() < deadline,
                "{started:?} still run"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// What a step left running when the server stopped mid-build (its cgroup recorded in
    /// the build's directory) is killed by the builder's recovery at the next start, and
    /// the cgroups and their record go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_kills_what_a_cut_build_left_in_its_cgroups() {
        use std::os::unix::process::CommandExt;
        let Some(cg) = TestCgroups::new() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join(STEP_CGROUPS);
        let limits = TaskLimits {
            memory_bytes: 256 << 20,
            pids: 64,
        };
        let made = StepCgroups::make(&cg.0, "crashed", limits, &record).unwrap();
        let fds = cgroup::raw_fds(&made.cg.procs_fds);
        let mut cmd = std::process::Command::new("/bin/sleep");
        cmd.arg("300");
        // SAFETY: `write(2)` on descriptors opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let (_child, pid, _exit) = Reaper::global()
            .spawn_registered(|| {
                let c = cmd.spawn()?;
                let pid = c.id() as i32;
                Ok((c, pid))
            })
            .unwrap();
        let dirs = made.cg.dirs.clone();
        // The server stops: nothing ends the step.
        std::mem::forget(made);
        assert!(runs(pid));
        assert_eq!(recorded_cgroups(&record), dirs);
        let builder = VenvBuilder {
            base_python: "python3".into(),
            uids: None,
            namespaces: None,
            cgroups: Some(cg.0.clone()),
            limits,
        };
        builder.recover(dir.path()).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while runs(pid) {
            assert!(std::time::Instant::now() < deadline, "{pid} still runs");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
        assert!(!record.exists());
    }

    /// Only build-step cgroups under a `cattery` directory of the cgroup mount are taken
    /// from a record, whatever else it says.
    #[test]
    fn a_step_record_names_only_build_step_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join(STEP_CGROUPS);
        std::fs::write(
            &record,
            "/sys/fs/cgroup/unified/cattery/s1/build-a\n\
             /sys/fs/cgroup/memory/cattery/s1/build-a\n\
             /sys/fs/cgroup/unified/cattery/s1/0b7e0c1e-instance\n\
             /sys/fs/cgroup/unified/cattery/s1/../../build-x\n\
             /tmp/cattery/build-a\n\
             /sys/fs/cgroup/unified/user.slice/build-a\n",
        )
        .unwrap();
        assert_eq!(
            recorded_cgroups(&record),
            [
                PathBuf::from("/sys/fs/cgroup/unified/cattery/s1/build-a"),
                PathBuf::from("/sys/fs/cgroup/memory/cattery/s1/build-a"),
            ]
        );
    }

    /// A step cut short (its future dropped, as the build's time limit does) leaves none of
    /// its processes running: the leader's group while the leader runs, and a member it left
    /// behind after it exited.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_cut_short_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        let pid_file = dir.path().join("pids");
        // The leader prints nothing and so never returns; then one whose leader exits but whose
        // member keeps the output pipe open (the step waits for its lines).
        for script in [
            format!(
                "/bin/sleep 30 & echo $! > {0}; echo $$ >> {0}; wait",
                pid_file.display()
            ),
            format!("/bin/sleep 30 & echo $! > {0}; exit 0", pid_file.display()),
        ] {
            let _ = std::fs::remove_file(&pid_file);
            let args = ["-c".to_string(), script];
            let steps = Steps {
                env: step_env(dir.path(), false),
                uid: None,
                namespaces: None,
                cgroups: None,
                record: dir.path().join("step.cgroups"),
            };
            let step = run(&log, &steps, dir.path(), "/bin/sh", &args);
            let cut = tokio::time::timeout(std::time::Duration::from_millis(500), step).await;
            assert!(cut.is_err(), "the step ended by itself");
            let pids: Vec<i32> = std::fs::read_to_string(&pid_file)
                .unwrap()
                .lines()
                .map(|l| l.trim().parse().unwrap())
                .collect();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while pids.iter().any(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| s.rfind(')').map(|i| !s[i + 2..].starts_with(['Z', 'X'])))
                    .unwrap_or(false)
            }) {
                assert!(std::time::Instant::now() < deadline, "{pids:?} still run");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    /// A step that prints more than the log keeps (40 MiB in lines of 1 KiB, then one line
    /// of 1 MiB): the log stops at its cap (16 MiB) and says so, and the server keeps a
    /// bounded part of the output.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_steps_output_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let log = BuildLog::create(&path).unwrap();
        let steps = Steps {
            env: step_env(dir.path(), false),
            uid: None,
            namespaces: None,
            cgroups: None,
            record: dir.path().join("step.cgroups"),
        };
        let script = "yes \"$(head -c 1023 /dev/zero | tr '\\0' x)\" | head -n 40960; \
                      head -c 1048576 /dev/zero | tr '\\0' y; exit 3";
        let r = run(
            &log,
            &steps,
            dir.path(),
            "/bin/sh",
            &["-c".into(), script.into()],
        )
        .await
        .unwrap();
        assert!(!r.ok);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= (16 << 20) + 4096, "the log holds {size} bytes");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("later lines are not kept"),
            "{}",
            &text[text.len() - 200..]
        );
        assert!(r.lines.len() <= 200, "{} lines kept", r.lines.len());
    }

    #[test]
    fn pyproject_deps() {
        let t = "[project]\nname = \"bot\"\ndependencies = [\"pipecat-ai[daily]>=0.0.80\", \"loguru\"]\n";
        assert_eq!(
            pyproject_dependencies(t).unwrap(),
            ["pipecat-ai[daily]>=0.0.80", "loguru"]
        );
        assert!(pyproject_dependencies("[tool.poetry]\nname = \"x\"\n")
            .unwrap()
            .is_empty());
        assert!(pyproject_dependencies("not toml [").is_err());
    }

    /// Which file a build installs from: a usable lock (with its pyproject.toml) over
    /// requirements.txt unless the Dockerfile installs requirements.txt alone; a lock without
    /// pyproject.toml is not used; then requirements.txt, then pyproject.toml.
    #[test]
    fn the_file_a_build_installs_from() {
        use Source::*;
        let pip_df = "FROM dailyco/pipecat-base:latest\nCOPY requirements.txt .\n\
                      RUN pip install -r requirements.txt\n";
        let uv_df = "FROM dailyco/pipecat-base:latest\nRUN --mount=type=bind,source=uv.lock,\
                     target=uv.lock \\\n    uv sync --locked --no-install-project --no-dev\n";
        let commented =
            "FROM x\n# was: RUN pip install -r requirements.txt\nRUN uv sync --locked\n";
        let both = "COPY requirements.txt uv.lock ./\nRUN uv sync\n";
        let cases: [(bool, bool, bool, Option<&str>, Source); 12] = [
            // (requirements.txt, uv.lock, pyproject.toml, Dockerfile) → source
            (false, true, true, None, Lock),
            (false, true, true, Some(pip_df), Lock),
            (true, true, true, None, Lock),
            (true, true, true, Some(uv_df), Lock),
            (true, true, true, Some(both), Lock),
            (true, true, true, Some(commented), Lock),
            (true, true, true, Some(pip_df), Requirements),
            (true, true, false, Some(uv_df), Requirements),
            (false, true, false, None, Nothing),
            (true, false, true, Some(uv_df), Requirements),
            (false, false, true, None, Pyproject),
            (false, false, false, None, Nothing),
        ];
        for (req, lock, py, df, want) in cases {
            let (got, line) = choose_source(req, lock, py, df);
            assert_eq!(got, want, "{req} {lock} {py} {df:?}: {line:?}");
        }
        assert_eq!(
            choose_source(true, true, true, Some(pip_df)).1.unwrap(),
            "Installing requirements.txt, which the Dockerfile installs (uv.lock is not used)"
        );
        assert_eq!(
            choose_source(false, true, false, None).1.unwrap(),
            "uv.lock without pyproject.toml is not used: nothing to install"
        );
    }

    /// A Dockerfile with steps the local builder skips is named in the log, with their count.
    #[test]
    fn the_log_says_the_dockerfile_steps_are_not_run() {
        let quickstart = "FROM dailyco/pipecat-base:latest\nENV UV_LINK_MODE=copy\n\
                          RUN --mount=type=bind,source=uv.lock,target=uv.lock \\\n    \
                          uv sync --locked --no-install-project --no-dev\n\
                          COPY ./*.py .\nrun ls /nonexistent\n";
        assert_eq!(
            steps_not_run("Dockerfile", quickstart).as_deref(),
            Some(
                "The local builder does not run the 3 RUN/COPY/ADD step(s) of Dockerfile: it \
                 installs the dependencies and runs the bot from the whole context, so what \
                 another step would add (apt packages, files a RUN makes) is not there; \
                 --builder docker runs them"
            )
        );
        assert_eq!(steps_not_run("Dockerfile", "FROM x\nENV A=1\n"), None);
    }

    /// The Dockerfile is read only inside the context, and only as a regular file.
    #[test]
    fn a_dockerfile_is_read_inside_the_context_only() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(app.join("deploy")).unwrap();
        std::fs::write(app.join("deploy/Dockerfile"), "RUN uv sync\n").unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "outside").unwrap();
        assert_eq!(
            read_dockerfile(&app, "deploy/Dockerfile").as_deref(),
            Some("RUN uv sync\n")
        );
        assert_eq!(read_dockerfile(&app, "../Dockerfile"), None);
        let abs = dir.path().join("Dockerfile").display().to_string();
        assert_eq!(read_dockerfile(&app, &abs), None);
        assert_eq!(read_dockerfile(&app, "deploy"), None);
        assert_eq!(read_dockerfile(&app, "missing"), None);
    }

    /// A context with a lock, built on a base environment without uv, fails at once saying
    /// so (no fallback to pyproject.toml's ranges).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_without_uv_in_the_base_fails_the_build_saying_so() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A base Python that finds no site-packages, so no uv whatever the machine has.
        let base = dir.path().join("python-without-site");
        std::fs::write(&base, "#!/bin/sh\nexec python3 -S \"$@\"\n").unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir(&app).unwrap();
        std::fs::write(app.join("bot.py"), "async def bot(args): pass\n").unwrap();
        std::fs::write(
            app.join("pyproject.toml"),
            "[project]\nname = \"b\"\nversion = \"0.1.0\"\ndependencies = [\"six\"]\n",
        )
        .unwrap();
        std::fs::write(app.join("uv.lock"), "version = 1\n").unwrap();
        let builder = VenvBuilder {
            base_python: base.display().to_string(),
            uids: None,
            namespaces: None,
            cgroups: None,
            limits: TaskLimits {
                memory_bytes: 1 << 30,
                pids: 512,
            },
        };
        let job = BuildJob {
            id: uuid::Uuid::new_v4(),
            dir: dir.path().to_path_buf(),
            context: app.clone(),
            dockerfile_path: "Dockerfile".into(),
        };
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        let e = builder.build(&job, &log).await.unwrap_err();
        assert!(
            e.starts_with("the context has uv.lock, which the local builder installs with uv")
                && e.contains("No module named uv"),
            "{e}"
        );
        assert!(!dir.path().join("venv/bin").exists(), "a venv was made");
    }

    /// A venv build whose environment cannot import the runner's dependencies says where
    /// they could come from (the context's requirements.txt, the base environment), not that
    /// a base image has them (a venv build has none), and where to add them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_venv_without_the_runners_dependencies_says_where_to_add_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A base Python that finds no site-packages, so no fastapi whatever the machine has.
        let base = dir.path().join("python-without-site");
        std::fs::write(&base, "#!/bin/sh\nexec python3 -S \"$@\"\n").unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir(&app).unwrap();
        std::fs::write(app.join("bot.py"), "async def bot(args): pass\n").unwrap();
        std::fs::write(app.join("requirements.txt"), "").unwrap();
        let builder = VenvBuilder {
            base_python: base.display().to_string(),
            uids: None,
            namespaces: None,
            cgroups: None,
            limits: TaskLimits {
                memory_bytes: 1 << 30,
                pids: 512,
            },
        };
        let job = BuildJob {
            id: uuid::Uuid::new_v4(),
            dir: dir.path().to_path_buf(),
            context: app.clone(),
            dockerfile_path: "Dockerfile".into(),
        };
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        let e = builder.build(&job, &log).await.unwrap_err();
        assert!(
            e.starts_with("the built environment cannot import fastapi and uvicorn"),
            "{e}"
        );
        assert!(!e.contains("image"), "a venv build has no image: {e}");
        assert!(
            e.contains(&format!(
                "what requirements.txt installed and the packages of the base environment {} \
                 (--build-python)",
                base.display()
            )) && e.contains("pipecat-ai[runner]")
                && e.contains("to requirements.txt"),
            "{e}"
        );
        // Each source names its own file.
        let lock = runner_deps_missing(Source::Lock, "/b/python", "x");
        assert!(
            lock.contains("what uv.lock installed") && lock.contains("(uv lock)"),
            "{lock}"
        );
        let none = runner_deps_missing(Source::Nothing, "/b/python", "x");
        assert!(none.contains("to a requirements.txt"), "{none}");
    }

    #[test]
    fn failure_reason_keeps_uvs_causes_and_hints() {
        let lines: Vec<String> = [
            "Using CPython 3.11.2 interpreter at: /usr/bin/python3",
            "hint: not after an error",
            "error: Failed to generate package metadata for `m==0.1.0 @ path+wheels/m.whl`",
            "  cause: failed to open file `/b/app/wheels/m.whl`: No such file or directory",
            "hint: To update the lockfile, run `uv lock`.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            reason(&lines),
            "error: Failed to generate package metadata for `m==0.1.0 @ path+wheels/m.whl`\n\
             cause: failed to open file `/b/app/wheels/m.whl`: No such file or directory\n\
             hint: To update the lockfile, run `uv lock`."
        );
    }

    #[test]
    fn failure_reason_prefers_pip_errors() {
        let lines: Vec<String> = [
            "Collecting x",
            "ERROR: Invalid requirement: 'not a requirement!!' (from line 1 of requirements.txt)",
            "[notice] something",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            reason(&lines),
            "ERROR: Invalid requirement: 'not a requirement!!' (from line 1 of requirements.txt)"
        );
        let lines: Vec<String> = ["a", "b", "", "c", "d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(reason(&lines), "b\nc\nd");
    }
}
