//! Reading the machine and its processes through `/proc` (Linux only).

use std::fs;
use std::path::Path;

use serde::Serialize;

/// What the numbers were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Online CPUs (count).
    pub cpus: usize,
    /// Total memory, MiB.
    pub mem_total_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Operating system (`PRETTY_NAME` of `/etc/os-release`).
    pub os: String,
    /// Soft limit on open files of the bench (and so of the server it starts), after raising it.
    pub nofile_limit: u64,
}

/// Describes this machine.
pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_total_mib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("PRETTY_NAME="))
                .map(|l| l["PRETTY_NAME=".len()..].trim_matches('"').to_string())
        })
        .unwrap_or_default();
    Machine {
        cpu_model,
        cpus,
        mem_total_mib,
        kernel,
        os,
        nofile_limit: nofile_limit().0,
    }
}

/// `(soft, hard)` limit on open files.
pub fn nofile_limit() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (r.rlim_cur, r.rlim_max)
}

/// Raises the soft limit on open files to the hard limit (children inherit it), so that a
/// server with 1,000 sessions does not run out of descriptors. Returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let (soft, hard) = nofile_limit();
    if soft < hard {
        let r = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
    nofile_limit().0
}

/// Fields after the command name in `/proc/<pid>/stat` (field 3, the state, is index 0).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat_fields(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|st| st != "Z" && st != "X")
}

/// Resident set size of a process, bytes (`VmRSS`).
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `RssAnon` and `RssFile` of a process, bytes: heap and stacks, and mapped file pages (for
/// Cattery mostly the pages of `cattery.db` that SQLite's `mmap` has touched).
pub fn rss_split_bytes(pid: i32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let kib: u64 = s
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

/// Number of threads of a process.
pub fn threads(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(17)?.parse().ok()
}

/// Number of open file descriptors of a process.
pub fn open_fds(pid: i32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// CPU time (user + system) a process has used so far, seconds.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let f = stat_fields(pid)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// CPU used by the children `pid` has reaped (`cutime + cstime`), in seconds (for
/// `cattery serve`: the agents, and the parked processes of spare cgroup slots).
pub fn reaped_children_cpu_seconds(pid: i32) -> Option<f64> {
    let f = stat_fields(pid)?;
    let ticks: u64 = f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// CPU of a process tree: `pid` and every live descendant, each with the children it reaped
/// (e.g. a PostgreSQL postmaster and its backends, or a node and its instances), in seconds.
pub fn tree_cpu_seconds(pid: i32) -> f64 {
    let mut t = cpu_seconds(pid).unwrap_or(0.0) + reaped_children_cpu_seconds(pid).unwrap_or(0.0);
    // Children are listed by the thread that made them.
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return t;
    };
    for task in tasks.flatten() {
        let kids = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for c in kids
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            t += tree_cpu_seconds(c);
        }
    }
    t
}

/// Environment of a process as `KEY=VALUE` byte strings (empty when unreadable).
pub fn environ(pid: i32) -> Vec<Vec<u8>> {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|kv| !kv.is_empty())
                .map(<[u8]>::to_vec)
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `key` in a process's environment.
pub fn env_var(pid: i32, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    environ(pid)
        .into_iter()
        .find(|kv| kv.starts_with(prefix.as_bytes()))
        .map(|kv| String::from_utf8_lossy(&kv[prefix.len()..]).into_owned())
}

/// Live (non-zombie) pids whose environment holds `key=value`. This is how the bench finds
/// instance processes, grandchildren included: every agent it deploys carries a unique tag.
pub fn pids_with_env(key: &str, value: &str) -> Vec<i32> {
    let needle = format!("{key}={value}");
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(env) = fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Zombie processes whose parent is `parent`.
pub fn zombie_children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            let ppid = f.get(1).and_then(|v| v.parse::<i32>().ok());
            if f.first().map(String::as_str) == Some("Z") && ppid == Some(parent) {
                out.push(pid);
            }
        }
    }
    out
}

/// The command line of a process, for reports.
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Entries in a directory (0 when it does not exist).
pub fn dir_entries(p: &Path) -> usize {
    fs::read_dir(p).map(|rd| rd.count()).unwrap_or(0)
}

/// Sub-directories of a cgroup directory (each a leftover instance cgroup).
pub fn cgroup_children(p: &Path) -> Vec<String> {
    fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Where this server's instance cgroups (v2) live, if the machine has them: the same layout
/// as `crates/cattery/src/runtime/process/cgroup.rs`.
pub fn cgroup_base(server_id: &str) -> Option<std::path::PathBuf> {
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let base = Path::new(root).join("cattery").join(server_id);
        if base.is_dir() {
            return Some(base);
        }
    }
    None
}

/// Sends `sig` to one pid (never by name). Errors are ignored: the process may be gone.
pub fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a positive pid we started or found by our own tag.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> [f64; 3] {
    let s = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// `(busy, total)` CPU time of the whole machine so far, in clock ticks (`/proc/stat`).
pub fn system_ticks() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}
