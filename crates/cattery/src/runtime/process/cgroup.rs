//! cgroups for whole-tree cleanup and resource limits.
//!
//! Layout: `<v2 root>/cattery/<server id>/<instance id>` for membership, atomic kill
//! (`cgroup.kill`) and emptiness (`cgroup.events` `populated 0`); and, where cgroup v1
//! controllers are writable, `<v1 root>/<memory|cpu|pids>/cattery/<server id>/<instance id>`
//! for the `agentProfile` limits. The child joins every one of them before `exec` (it writes
//! `0` to each `cgroup.procs` through descriptors opened by the parent, `runtime/process/spawn.rs`), so
//! no process of the instance ever runs outside them.
//!
//! Each server holds an exclusive `flock` on `<lock root>/servers/<server id>.lock`
//! (`/run/cattery` as root, see [`super::locks`]) for its whole life. At start, a server
//! removes the empty cgroup directories of every other server id whose lock it can take: a
//! server that was `SIGKILL`ed and never restarted leaves
//! its `<server id>` directories behind (a running server removes its own at exit). Cgroups
//! that still hold processes stay: the instances of a killed server keep running until it is
//! started again on its data dir and re-adopts them.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;

use crate::model::ProfileLimits;

/// What this machine allows.
#[derive(Debug)]
pub struct CgroupSupport {
    /// Base v2 directory for this server's instances, with `cgroup.kill`.
    pub v2_base: Option<PathBuf>,
    /// Base v1 directories per controller (`memory`, `cpu`, `pids`).
    pub v1_bases: Vec<(&'static str, PathBuf)>,
    /// The `agentProfile` limits' controllers that no writable v1 hierarchy has and that the
    /// v2 hierarchy gives this server's instances (a machine with cgroup v2 alone): their
    /// limits are written in each instance's v2 cgroup ([`apply_v2_limits`]).
    pub v2_limits: Vec<&'static str>,
    /// This server's liveness lock (see the module docs), held while it runs.
    _alive: Option<Flock<File>>,
    /// This server's id.
    server_id: String,
}

/// Directory of the servers' liveness lock files.
fn server_lock_dir() -> Option<PathBuf> {
    super::locks::lock_dir("servers")
}

/// Opens (creating) the liveness lock file of `server_id` and locks it; `wait` blocks until
/// it is free, otherwise `None` when another process holds it.
fn lock_server(server_id: &str, wait: bool) -> Option<Flock<File>> {
    let dir = server_lock_dir()?;
    super::locks::lock_file(&dir.join(format!("{server_id}.lock")), wait)
}

/// Whether a server of an earlier version (its liveness lock under `<tmp>/cattery-servers`) is
/// running: during an upgrade both may share the machine, and its fresh cgroups (empty until
/// their first process joins) must not be taken for leftovers.
fn legacy_server_alive(server_id: &str) -> bool {
    let path = std::env::temp_dir()
        .join("cattery-servers")
        .join(format!("{server_id}.lock"));
    path.exists() && super::locks::lock_file(&path, false).is_none()
}

/// Removes the empty cgroup directories of servers that are not running (their liveness lock
/// is free) under each `<root>/cattery`; returns how many server directories went away.
fn sweep_dead_servers(own_id: &str, cattery_dirs: &[PathBuf]) -> usize {
    let mut removed = 0;
    let mut names: Vec<String> = cattery_dirs
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != own_id)
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        // Held by a running server: not ours to touch.
        let Some(_lock) = lock_server(&name, false) else {
            continue;
        };
        if legacy_server_alive(&name) {
            continue;
        }
        for root in cattery_dirs {
            let dir = root.join(&name);
            if let Ok(rd) = fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        // Fails (EBUSY) while the instance still has processes.
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            if fs::remove_dir(&dir).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// The cgroups of one instance.
#[derive(Debug, Default)]
pub struct InstanceCgroups {
    /// v2 directory.
    pub v2: Option<PathBuf>,
    /// v1 directories.
    pub v1: Vec<PathBuf>,
    /// Open `cgroup.procs` descriptors the child writes `0` to before exec.
    pub procs_fds: Vec<OwnedFd>,
}

fn v2_root() -> Option<PathBuf> {
    let pure = Path::new("/sys/fs/cgroup/cgroup.controllers");
    if pure.exists() {
        return Some(PathBuf::from("/sys/fs/cgroup"));
    }
    let hybrid = Path::new("/sys/fs/cgroup/unified/cgroup.procs");
    if hybrid.exists() {
        return Some(PathBuf::from("/sys/fs/cgroup/unified"));
    }
    None
}

impl CgroupSupport {
    /// Probes the machine. `server_id` separates servers sharing a machine (each data dir has
    /// one). Takes this server's liveness lock and removes what dead servers left behind (see
    /// the module docs).
    pub fn detect(server_id: &str) -> CgroupSupport {
        let mut s = CgroupSupport {
            v2_base: None,
            v1_bases: Vec::new(),
            v2_limits: Vec::new(),
            _alive: None,
            server_id: server_id.to_string(),
        };
        if std::env::var_os("CATTERY_NO_CGROUPS").is_some() {
            return s;
        }
        s._alive = lock_server(server_id, true);
        if let Some(root) = v2_root() {
            let base = root.join("cattery").join(server_id);
            let probe = base.join("probe");
            let ok = fs::create_dir_all(&probe).is_ok()
                && probe.join("cgroup.kill").exists()
                && probe.join("cgroup.events").exists();
            let _ = fs::remove_dir(&probe);
            if ok {
                s.v2_base = Some(base);
            }
        }
        for ctrl in ["memory", "cpu", "pids"] {
            let root = Path::new("/sys/fs/cgroup").join(ctrl);
            if !root.join("cgroup.procs").exists() || root.join("cgroup.controllers").exists() {
                continue;
            }
            let base = root.join("cattery").join(server_id);
            if fs::create_dir_all(&base).is_ok() {
                s.v1_bases.push((ctrl, base));
            }
        }
        if let Some(base) = &s.v2_base {
            let wanted: Vec<&'static str> = LIMIT_CONTROLLERS
                .into_iter()
                .filter(|c| !s.v1_bases.iter().any(|(v1, _)| v1 == c))
                .collect();
            s.v2_limits = enable_v2_controllers(base, &wanted);
        }
        if s._alive.is_some() {
            let dirs: Vec<PathBuf> = s
                .v2_base
                .iter()
                .chain(s.v1_bases.iter().map(|(_, b)| b))
                .filter_map(|b| b.parent().map(Path::to_path_buf))
                .collect();
            let n = sweep_dead_servers(server_id, &dirs);
            if n > 0 {
                tracing::info!(
                    directories = n,
                    "removed empty cgroups left by servers that are no longer running"
                );
            }
        }
        s
    }

    /// Removes this server's liveness lock file; on a clean exit, after its cgroups are gone
    /// (the lock itself goes with the process).
    pub fn remove_liveness_lock(&self) {
        if let (Some(_), Some(dir)) = (&self._alive, server_lock_dir()) {
            let _ = fs::remove_file(dir.join(format!("{}.lock", self.server_id)));
        }
    }

    /// Human description for logs.
    pub fn describe(&self) -> String {
        match &self.v2_base {
            Some(b) => {
                let mut d = format!("cgroup v2 at {} (cgroup.kill)", b.display());
                if !self.v1_bases.is_empty() {
                    let v1: Vec<&str> = self.v1_bases.iter().map(|(c, _)| *c).collect();
                    d.push_str(&format!(", v1 limits: {}", v1.join(",")));
                }
                if !self.v2_limits.is_empty() {
                    d.push_str(&format!(", v2 limits: {}", self.v2_limits.join(",")));
                }
                d
            }
            None => "process group + child subreaper (no writable cgroup v2)".into(),
        }
    }

    /// The `agentProfile` limits' controllers that neither hierarchy gives this server:
    /// instances run without those limits (the server says so at start).
    pub fn unenforced_limits(&self) -> Vec<&'static str> {
        LIMIT_CONTROLLERS
            .into_iter()
            .filter(|c| !self.v1_bases.iter().any(|(v1, _)| v1 == c) && !self.v2_limits.contains(c))
            .collect()
    }

    /// Writes `limits` into the instance's v2 cgroup `dir` for the controllers of
    /// [`CgroupSupport::v2_limits`] (none on a machine whose v1 hierarchies have them).
    pub fn apply_v2(&self, dir: &Path, limits: Option<&ProfileLimits>) {
        if let Some(l) = limits {
            apply_v2_limits(&self.v2_limits, dir, l);
        }
    }

    /// Creates the cgroups of one instance, applies limits and opens the join descriptors.
    pub fn create(
        &self,
        instance: &str,
        limits: Option<&ProfileLimits>,
    ) -> std::io::Result<InstanceCgroups> {
        let mut out = InstanceCgroups::default();
        if let Some(base) = &self.v2_base {
            let dir = base.join(instance);
            fs::create_dir_all(&dir)?;
            self.apply_v2(&dir, limits);
            out.procs_fds.push(open_procs(&dir)?);
            out.v2 = Some(dir);
        }
        for (ctrl, base) in &self.v1_bases {
            let dir = base.join(instance);
            if fs::create_dir_all(&dir).is_err() {
                continue;
            }
            if let Some(l) = limits {
                let _ = apply_limits(ctrl, &dir, l);
            }
            if let Ok(fd) = open_procs(&dir) {
                out.procs_fds.push(fd);
            }
            out.v1.push(dir);
        }
        Ok(out)
    }
}

/// Memory and task limits of a cgroup that holds no agent instance (a build step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// Most memory its processes may use (bytes, page cache and tmpfs included).
    pub memory_bytes: u64,
    /// Most processes and threads at once.
    pub pids: u64,
}

/// The cgroups of a bounded task ([`CgroupSupport::create_bounded`]).
#[derive(Debug, Default)]
pub struct BoundedCgroups {
    /// Every directory made (v2 first when there is one).
    pub dirs: Vec<PathBuf>,
    /// The v2 directory (membership, `cgroup.kill`).
    pub v2: Option<PathBuf>,
    /// Open `cgroup.procs` descriptors the child writes `0` to before exec.
    pub procs_fds: Vec<OwnedFd>,
    /// Which limits are enforced: (memory, pids).
    pub enforced: (bool, bool),
}

/// What a bounded task's cgroups counted against its limits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LimitHits {
    /// Processes the kernel killed for the memory limit.
    pub oom_kills: u64,
    /// Forks refused at the task limit.
    pub pids_refused: u64,
}

/// The number after `key` on a line `key N` of a cgroup file (0 when absent), e.g.
/// `oom_kill` in v1 `memory.oom_control` or v2 `memory.events`.
pub fn counter(path: &Path, key: &str) -> u64 {
    super::kfile::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.trim().split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

/// How many times `dirs` hit their limits: the memory controller's OOM kills (v1
/// `memory.oom_control`, v2 `memory.events`) and the pids controller's refused forks
/// (`pids.events`).
pub fn limit_hits(dirs: &[PathBuf]) -> LimitHits {
    let mut h = LimitHits::default();
    for d in dirs {
        h.oom_kills = h
            .oom_kills
            .max(counter(&d.join("memory.oom_control"), "oom_kill"))
            .max(counter(&d.join("memory.events"), "oom_kill"));
        h.pids_refused = h.pids_refused.max(counter(&d.join("pids.events"), "max"));
    }
    h
}

impl CgroupSupport {
    /// Creates cgroups `name` (not an instance id: the runtime's sweeps leave it alone) with
    /// memory and task limits: a v2 cgroup for membership and `cgroup.kill` (its
    /// `memory.max` and `pids.max` too where those controllers are enabled, which
    /// [`CgroupSupport::detect`] does for the controllers no v1 hierarchy has), and the v1
    /// `memory` and `pids` cgroups where they are writable. Errors: a directory could not be
    /// made; what was made is removed.
    pub fn create_bounded(&self, name: &str, l: &TaskLimits) -> std::io::Result<BoundedCgroups> {
        let mut out = BoundedCgroups::default();
        let made = (|| {
            if let Some(base) = &self.v2_base {
                let dir = base.join(name);
                fs::create_dir_all(&dir)?;
                out.dirs.push(dir.clone());
                if write_file(&dir.join("memory.max"), &l.memory_bytes.to_string()).is_ok() {
                    // Without swap use, or a step could go past its memory through it.
                    let _ = write_file(&dir.join("memory.swap.max"), "0");
                    out.enforced.0 = true;
                }
                out.enforced.1 |= write_file(&dir.join("pids.max"), &l.pids.to_string()).is_ok();
                out.procs_fds.push(open_procs(&dir)?);
                out.v2 = Some(dir);
            }
            for (ctrl, base) in &self.v1_bases {
                let (file, value) = match *ctrl {
                    "memory" => ("memory.limit_in_bytes", l.memory_bytes),
                    "pids" => ("pids.max", l.pids),
                    _ => continue,
                };
                let dir = base.join(name);
                fs::create_dir_all(&dir)?;
                out.dirs.push(dir.clone());
                write_file(&dir.join(file), &value.to_string())?;
                if *ctrl == "memory" {
                    let _ =
                        write_file(&dir.join("memory.memsw.limit_in_bytes"), &value.to_string());
                    out.enforced.0 = true;
                } else {
                    out.enforced.1 = true;
                }
                out.procs_fds.push(open_procs(&dir)?);
            }
            Ok(())
        })();
        match made {
            Ok(()) => Ok(out),
            Err(e) => {
                for d in out.dirs.iter().rev() {
                    remove(d);
                }
                Err(e)
            }
        }
    }
}

/// The controllers of the `agentProfile` limits.
const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Enables the v2 controllers `wanted` for the children of `base` and of its parent (the
/// `cattery` directory), where the level above offers them; returns those `base`'s children
/// then have (read back from its `cgroup.subtree_control`). Neither directory holds a
/// process, so v2's rule that a cgroup with controllers for its children holds none holds.
fn enable_v2_controllers(base: &Path, wanted: &[&'static str]) -> Vec<&'static str> {
    for dir in base.parent().into_iter().chain([base]) {
        let offered = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for ctrl in wanted {
            if offered.split_whitespace().any(|c| c == *ctrl) {
                let _ = write_file(&dir.join("cgroup.subtree_control"), &format!("+{ctrl}"));
            }
        }
    }
    let on = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
    wanted
        .iter()
        .copied()
        .filter(|c| on.split_whitespace().any(|o| o == *c))
        .collect()
}

/// Writes an instance's `agentProfile` limits into its v2 cgroup `dir`, for `ctrls`: the
/// same values as the v1 files ([`apply_limits`]): `memory.max`, `cpu.max` (quota and a
/// 100 ms period) and `pids.max`. Best-effort, as the v1 writes are.
fn apply_v2_limits(ctrls: &[&'static str], dir: &Path, l: &ProfileLimits) {
    for ctrl in ctrls {
        let _ = match *ctrl {
            "memory" => write_file(&dir.join("memory.max"), &l.memory_bytes.to_string()),
            "cpu" => write_file(
                &dir.join("cpu.max"),
                &format!("{} 100000", u64::from(l.cpu_millicores) * 100),
            ),
            "pids" => write_file(&dir.join("pids.max"), &l.pids.to_string()),
            _ => Ok(()),
        };
    }
}

/// Kills every process in the cgroups `dirs` (v2 `cgroup.kill`, else each listed pid of
/// the v1 ones), waits (up to `wait`) for them to be empty while `reap` collects the dead,
/// and removes them. Blocking. Returns whether they were all emptied.
pub fn kill_and_remove(dirs: &[PathBuf], wait: std::time::Duration, reap: impl Fn()) -> bool {
    let deadline = std::time::Instant::now() + wait;
    let empty = loop {
        let mut left = false;
        for d in dirs {
            if d.join("cgroup.kill").exists() {
                if populated(d) {
                    let _ = kill_all(d);
                    left = true;
                }
            } else {
                for p in procs(d) {
                    // Through a pidfd, checked to be a member after it was opened: a pid
                    // freed and reused meanwhile is never signalled.
                    super::signals::send_checked(p, nix::sys::signal::Signal::SIGKILL, || {
                        procs(d).contains(&p)
                    });
                    left = true;
                }
            }
        }
        reap();
        if !left {
            break true;
        }
        if std::time::Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    for d in dirs {
        remove(d);
    }
    empty
}

/// Writes an agent profile's limits into a v1 cgroup of controller `ctrl`.
pub fn apply_limits(ctrl: &str, dir: &Path, l: &ProfileLimits) -> std::io::Result<()> {
    match ctrl {
        "memory" => write_file(
            &dir.join("memory.limit_in_bytes"),
            &l.memory_bytes.to_string(),
        ),
        "cpu" => write_file(&dir.join("cpu.cfs_period_us"), "100000").and_then(|_| {
            write_file(
                &dir.join("cpu.cfs_quota_us"),
                &(u64::from(l.cpu_millicores) * 100).to_string(),
            )
        }),
        "pids" => write_file(&dir.join("pids.max"), &l.pids.to_string()),
        _ => Ok(()),
    }
}

impl CgroupSupport {
    /// Creates the v2 cgroup of one instance and opens its directory (for `clone3`'s
    /// `CLONE_INTO_CGROUP`). `None` without cgroup v2.
    pub fn create_v2_dir(&self, instance: &str) -> std::io::Result<Option<(PathBuf, OwnedFd)>> {
        let Some(base) = &self.v2_base else {
            return Ok(None);
        };
        let dir = base.join(instance);
        fs::create_dir_all(&dir)?;
        let fd = fs::File::open(&dir).map(OwnedFd::from);
        match fd {
            Ok(fd) => Ok(Some((dir, fd))),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        }
    }
}

fn open_procs(dir: &Path) -> std::io::Result<OwnedFd> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    Ok(OwnedFd::from(f))
}

/// Writes `s` to a cgroup file.
pub fn write_file(p: &Path, s: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(p)?;
    f.write_all(s.as_bytes())
}

/// Raw fds of open descriptors.
pub fn raw_fds(fds: &[OwnedFd]) -> Vec<i32> {
    fds.iter().map(|f| f.as_raw_fd()).collect()
}

/// Pids in a cgroup directory (v1 or v2).
pub fn procs(dir: &Path) -> Vec<i32> {
    super::kfile::read_to_string(&dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether a v2 cgroup still has processes (`cgroup.events` `populated 1`). A missing
/// directory counts as empty.
pub fn populated(dir: &Path) -> bool {
    match super::kfile::read_to_string(&dir.join("cgroup.events")) {
        Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// A v2 cgroup's `cgroup.events`, kept open through a stop: each check of `populated` is one
/// `pread` (not an open, two reads and a close), and the kernel's `POLLPRI` on the file (sent
/// on every change of it, such as `populated 0`) wakes the wait at once, before its next poll.
pub struct Events(tokio::io::unix::AsyncFd<File>);

impl Events {
    /// The open file, registered with the runtime's I/O driver for `POLLPRI`. `None` when it
    /// cannot be opened (the cgroup is gone) or registered: the caller checks by path then.
    pub fn open(dir: &Path) -> Option<Events> {
        let f = File::open(dir.join("cgroup.events")).ok()?;
        // SAFETY: a `File` owns its descriptor: open, the same one, until it is dropped with
        // the `AsyncFd`.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(f, tokio::io::Interest::PRIORITY)
        }
        .ok()
        .map(Events)
    }

    /// [`populated`] through the open file (a read error counts as empty, as a missing
    /// directory does there).
    pub fn populated(&self) -> bool {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 256];
        match self.0.get_ref().read_at(&mut buf, 0) {
            Ok(n) => buf[..n].split(|&b| b == b'\n').any(|l| l == b"populated 1"),
            Err(_) => false,
        }
    }

    /// Until the file changes (its next `POLLPRI`); never, if the driver fails.
    pub async fn changed(&self) {
        match self.0.ready(tokio::io::Interest::PRIORITY).await {
            Ok(mut g) => g.clear_ready(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// SIGKILLs every process of a v2 cgroup at once.
pub fn kill_all(dir: &Path) -> std::io::Result<()> {
    write_file(&dir.join("cgroup.kill"), "1")
}

/// Removes an (empty) cgroup directory; missing is fine.
pub fn remove(dir: &Path) {
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    }
    tracing::warn!(cgroup = %dir.display(), "could not remove cgroup");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn support(v1: &[&'static str], v2: &[&'static str]) -> CgroupSupport {
        CgroupSupport {
            v2_base: Some(PathBuf::from("/sys/fs/cgroup/cattery/s")),
            v1_bases: v1.iter().map(|c| (*c, PathBuf::from(c))).collect(),
            v2_limits: v2.to_vec(),
            _alive: None,
            server_id: "s".into(),
        }
    }

    /// `Events` reads `populated` through its open file, and its change wakes `changed`
    /// (the kernel's `POLLPRI`): the stop's wait needs no poll to see a tree gone. Skipped
    /// without root and a v2 hierarchy.
    #[tokio::test]
    async fn events_see_a_cgroup_empty_and_wake_on_it() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let cg = CgroupSupport::detect(&format!("test-{}", uuid::Uuid::new_v4()));
        let Some(base) = cg.v2_base.clone() else {
            return;
        };
        let dir = base.join("events");
        fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        write_file(&dir.join("cgroup.procs"), &child.id().to_string()).unwrap();
        let ev = Events::open(&dir).expect("cgroup.events opens and registers");
        assert!(ev.populated() && populated(&dir));
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), ev.changed());
        assert!(quiet.await.is_err(), "woken with nothing changed");
        let _ = child.kill();
        tokio::time::timeout(std::time::Duration::from_secs(5), ev.changed())
            .await
            .expect("no POLLPRI when the cgroup emptied");
        assert!(!ev.populated());
        let _ = child.wait();
        drop(ev);
        remove(&dir);
        remove(&base);
        cg.remove_liveness_lock();
    }

    /// On a machine with cgroup v2 alone, an instance's `agentProfile` limits are written in
    /// its v2 cgroup, with the values of the v1 files: `agent-1x` is 1 GiB, half a CPU and
    /// 1,024 processes. Controllers a v1 hierarchy has are left to it.
    #[test]
    fn v2_limits_carry_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["memory.max", "cpu.max", "pids.max"] {
            fs::write(dir.path().join(f), "max").unwrap();
        }
        let l = crate::model::profile_limits("agent-1x").unwrap();
        support(&[], &["memory", "cpu", "pids"]).apply_v2(dir.path(), Some(&l));
        let read = |d: &tempfile::TempDir, f: &str| fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(read(&dir, "memory.max"), "1073741824");
        assert_eq!(read(&dir, "cpu.max"), "50000 100000");
        assert_eq!(read(&dir, "pids.max"), "1024");

        let dir = tempfile::tempdir().unwrap();
        for f in ["memory.max", "cpu.max", "pids.max"] {
            fs::write(dir.path().join(f), "max").unwrap();
        }
        support(&["memory", "cpu"], &["pids"]).apply_v2(dir.path(), Some(&l));
        assert_eq!(read(&dir, "memory.max"), "max");
        assert_eq!(read(&dir, "cpu.max"), "max");
        assert_eq!(read(&dir, "pids.max"), "1024");
    }

    /// What neither hierarchy gives is named (the server warns at start), and the description
    /// says where each limit is.
    #[test]
    fn limits_no_hierarchy_gives_are_named() {
        assert!(support(&["memory", "cpu", "pids"], &[])
            .unenforced_limits()
            .is_empty());
        assert!(support(&[], &["memory", "cpu", "pids"])
            .unenforced_limits()
            .is_empty());
        let s = support(&["memory"], &["pids"]);
        assert_eq!(s.unenforced_limits(), ["cpu"]);
        let d = s.describe();
        assert!(
            d.contains("v1 limits: memory") && d.contains("v2 limits: pids"),
            "{d}"
        );
        assert_eq!(support(&[], &[]).unenforced_limits(), LIMIT_CONTROLLERS);
    }

    /// The v2 controllers an instance's limits go to are those `base`'s children have once
    /// enabled, read back: none where the hierarchy offers none (a hybrid machine), and those
    /// already on (another server of the machine enabled them) among those wanted.
    #[test]
    fn v2_controllers_are_those_the_children_get() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("s");
        fs::create_dir_all(&base).unwrap();
        fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        fs::write(base.join("cgroup.controllers"), "").unwrap();
        assert!(enable_v2_controllers(&base, &LIMIT_CONTROLLERS).is_empty());
        fs::write(base.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        assert_eq!(
            enable_v2_controllers(&base, &["memory", "pids"]),
            ["memory", "pids"]
        );
    }
}
