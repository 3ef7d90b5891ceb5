//! cgroups for whole-tree cleanup and resource limits.
//!
//! Layout: `<v2 root>/cattery/<server id>/<instance id>` for membership, atomic kill
//! (`cgroup.kill`) and emptiness (`cgroup.events` `populated 0`); and, where cgroup v1
//! controllers are writable, `<v1 root>/<memory|cpu|pids>/cattery/<server id>/<instance id>`
//! for the `agentProfile` limits. The child joins every one of them before `exec` (it writes
//! `0` to each `cgroup.procs` through descriptors opened by the parent, `runtime/spawn.rs`), so
//! no process of the instance ever runs outside them.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::model::ProfileLimits;

/// What this machine allows.
#[derive(Debug, Clone)]
pub struct CgroupSupport {
    /// Base v2 directory for this server's instances, with `cgroup.kill`.
    pub v2_base: Option<PathBuf>,
    /// Base v1 directories per controller (`memory`, `cpu`, `pids`).
    pub v1_bases: Vec<(&'static str, PathBuf)>,
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
    /// Probes the machine. `server_id` separates servers sharing a machine (each data dir has one).
    pub fn detect(server_id: &str) -> CgroupSupport {
        let mut s = CgroupSupport {
            v2_base: None,
            v1_bases: Vec::new(),
        };
        if std::env::var_os("CATTERY_NO_CGROUPS").is_some() {
            return s;
        }
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
        s
    }

    /// Human description for logs.
    pub fn describe(&self) -> String {
        match &self.v2_base {
            Some(b) => format!(
                "cgroup v2 at {} (cgroup.kill){}",
                b.display(),
                if self.v1_bases.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", v1 limits: {}",
                        self.v1_bases
                            .iter()
                            .map(|(c, _)| *c)
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }
            ),
            None => "process group + child subreaper (no writable cgroup v2)".into(),
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
            out.procs_fds.push(open_procs(&dir)?);
            out.v2 = Some(dir);
        }
        for (ctrl, base) in &self.v1_bases {
            let dir = base.join(instance);
            if fs::create_dir_all(&dir).is_err() {
                continue;
            }
            if let Some(l) = limits {
                let _ = match *ctrl {
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
                };
            }
            if let Ok(fd) = open_procs(&dir) {
                out.procs_fds.push(fd);
            }
            out.v1.push(dir);
        }
        Ok(out)
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
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether a v2 cgroup still has processes (`cgroup.events` `populated 1`). A missing
/// directory counts as empty.
pub fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
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
