//! A private mount namespace per instance: its own `/tmp`, `/var/tmp` and `/dev/shm`, and a
//! `/proc` that hides other uids' processes.
//!
//! Instance uids come from a pool and are reused ([`super::uids`]): without this, a file an
//! agent leaves in a world-writable place of the host (`/tmp/x` instead of `$TMPDIR/x`)
//! outlives it, and the next instance drawing the same uid, of any org, owns it. So when
//! instances run under uids of their own (the server is root), every process that runs an
//! org's code (a spawned instance, one started from a spare cgroup slot, a fork server, and
//! with it every instance forked from it, a build step) starts, before it switches to its uid,
//! with:
//!
//! 1. `unshare(CLONE_NEWNS)`, and every mount made private (`MS_REC | MS_PRIVATE`): nothing
//!    mounted in the namespace reaches the host, nor anything mounted on the host later (no
//!    mount propagation to pay for per instance);
//! 2. a fresh `tmpfs` (`mode=1777`, `nosuid`, `nodev`) over each of `/tmp`, `/var/tmp` and
//!    `/dev/shm` that exists on the host (resolved: `/var/tmp` linked to `/tmp` is one). Its
//!    pages are charged to the memory cgroup of the process that writes them, and it is gone
//!    with the namespace, i.e. with the instance's last process;
//! 3. the entries of the host's place that the process must still reach are bound back at the
//!    same path (`MS_BIND | MS_REC`): the server's data directory and runtime directory (the
//!    instance's own directories, the runner, builds) when they lie there, and the top entry of
//!    any path the process is given (program, absolute arguments, working directory,
//!    environment values) that lies there, but only when that entry is not a link, not
//!    writable by others, and not owned by an instance uid: never what another instance left;
//! 4. a fresh `proc` mounted over `/proc` with `hidepid=invisible`, when the kernel allows it:
//!    the instance sees its own uid's processes only (no other instance's or the server's
//!    command lines).
//!
//! The server's own view is untouched: it still sees the instance's directory, its output
//! files and exit status at the host's paths, and removes them at the end. The namespace lives
//! as long as one process of the instance: a re-adopted instance keeps its own.
//!
//! Whether the machine allows this is tried once at start ([`Namespaces::probe`], on a thread of
//! its own that unshares its view and ends); when it does not, instances share the host's
//! places as before and the start-up log says so.
//!
//! The steps run between `clone` and `execve`, in a child that shares the server's memory, so
//! they allocate nothing: [`Plan`] is made by the parent, and [`enter`] only makes system
//! calls, through a [`Sys`]: `nix` ([`NixSys`]), or raw calls where even `errno` must not be
//! written (`spare.rs`).

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::uids::UidRange;

/// The world-writable places every instance gets its own of.
pub const PLACES: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// Mount options of each private place.
const TMPFS_DATA: &CStr = c"mode=1777";
/// Mount options of the private `/proc`.
const PROC_DATA: &CStr = c"hidepid=invisible";

/// What an instance's namespace is made of on this machine, decided once at start.
#[derive(Debug)]
pub struct Namespaces {
    /// The places that exist, resolved, without duplicates.
    places: Vec<PathBuf>,
    /// What every namespace binds back (the server's own directories).
    base: Plan,
    /// Instance uids: an entry one of them owns is never bound back.
    uids: UidRange,
}

/// One namespace to make: prepared by the parent, read by the child.
#[derive(Debug, Clone)]
pub struct Plan {
    places: Vec<Place>,
    hide_pids: bool,
}

#[derive(Debug, Clone)]
struct Place {
    dir: CString,
    keep: Vec<Keep>,
}

/// An entry of a place bound back: `name` (relative to the place) onto `target`.
#[derive(Debug, Clone)]
struct Keep {
    name: CString,
    target: CString,
    dir: bool,
}

impl Namespaces {
    /// Tries, on a thread of its own, whether namespaces can be made here, and returns what
    /// they are made of: `roots` (the server's directories instances reach, resolved) are
    /// bound back in each. Errors: why not (instances then share the host's places).
    pub fn probe(roots: &[PathBuf], uids: UidRange) -> Result<Namespaces, String> {
        let mut places: Vec<PathBuf> = Vec::new();
        for p in PLACES {
            if let Ok(c) = std::fs::canonicalize(p) {
                if c.is_dir() && c != Path::new("/") && !places.contains(&c) {
                    places.push(c);
                }
            }
        }
        let mut base = Plan {
            places: places
                .iter()
                .map(|d| Place {
                    dir: cpath(d),
                    keep: Vec::new(),
                })
                .collect(),
            hide_pids: false,
        };
        for r in roots {
            base.keep(&places, r, |_| true);
        }
        let try_plan = base.clone();
        let hide_pids = std::thread::spawn(move || -> Result<bool, String> {
            // SAFETY: system calls on data this thread owns; the thread's view ends with it.
            unsafe { enter(&try_plan, &NixSys) }.map_err(|e| {
                format!(
                    "no private mount namespace (unshare, then tmpfs mounts): {}",
                    nix::errno::Errno::from_raw(e)
                )
            })?;
            Ok(mount_proc(&NixSys).is_ok())
        })
        .join()
        .map_err(|_| "the namespace probe panicked".to_string())??;
        base.hide_pids = hide_pids;
        Ok(Namespaces { places, base, uids })
    }

    /// One line for the start log.
    pub fn describe(&self) -> String {
        let proc = if self.base.hide_pids {
            ", and a /proc showing only its own uid's processes"
        } else {
            " (/proc is the host's: this kernel refused a private one)"
        };
        format!("a private /tmp, /var/tmp and /dev/shm per instance{proc}")
    }

    /// Whether instances get a `/proc` of their own.
    pub fn hides_pids(&self) -> bool {
        self.base.hide_pids
    }

    /// The namespace of a process given `paths` (its program, arguments, working directory,
    /// environment values: each absolute path in them, also `:`-separated ones).
    pub fn plan<'a>(&self, paths: impl IntoIterator<Item = &'a OsStr>) -> Plan {
        let mut plan = self.base.clone();
        for value in paths {
            for part in value.as_bytes().split(|&b| b == b':') {
                if part.first() == Some(&b'/') {
                    let p = Path::new(OsStr::from_bytes(part));
                    plan.keep(&self.places, p, |m| self.may_bind_back(m));
                }
            }
        }
        plan
    }

    /// Whether a place's entry may be bound back into an instance's namespace: a directory or
    /// file of the host's (no instance uid owns it, no other user may write it).
    fn may_bind_back(&self, m: &std::fs::Metadata) -> bool {
        let t = m.file_type();
        (t.is_dir() || t.is_file()) && !self.uids.contains(m.uid()) && m.mode() & 0o002 == 0
    }
}

impl Plan {
    /// Adds `path`'s top entry in a place (if it lies in one) to what is bound back, when
    /// `allowed` says so of its metadata.
    fn keep(
        &mut self,
        places: &[PathBuf],
        path: &Path,
        allowed: impl Fn(&std::fs::Metadata) -> bool,
    ) {
        for (i, d) in places.iter().enumerate() {
            let Ok(rest) = path.strip_prefix(d) else {
                continue;
            };
            let Some(std::path::Component::Normal(name)) = rest.components().next() else {
                continue;
            };
            let place = &mut self.places[i];
            if place
                .keep
                .iter()
                .any(|k| k.name.as_bytes() == name.as_bytes())
            {
                continue;
            }
            let entry = d.join(name);
            let Ok(m) = std::fs::symlink_metadata(&entry) else {
                continue;
            };
            if !allowed(&m) {
                continue;
            }
            let Ok(n) = CString::new(name.as_bytes()) else {
                continue;
            };
            place.keep.push(Keep {
                name: n,
                target: cpath(&entry),
                dir: m.is_dir(),
            });
        }
    }

    /// Whether the plan mounts a private `/proc`.
    pub fn hides_pids(&self) -> bool {
        self.hide_pids
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// The system calls [`enter`] makes; errors are `errno` values.
pub trait Sys {
    /// `unshare(CLONE_NEWNS)`.
    fn unshare_mounts(&self) -> Result<(), i32>;
    /// `mount(2)`.
    fn mount(
        &self,
        src: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), i32>;
    /// `open(path, O_PATH | O_DIRECTORY | O_CLOEXEC)`.
    fn open_dir(&self, path: &CStr) -> Result<i32, i32>;
    /// `fchdir(fd)`.
    fn fchdir(&self, fd: i32) -> Result<(), i32>;
    /// `mkdir(path, 0755)`.
    fn mkdir(&self, path: &CStr) -> Result<(), i32>;
    /// Creates an empty file (a mount point for a file).
    fn create(&self, path: &CStr) -> Result<(), i32>;
    /// `close(fd)`.
    fn close(&self, fd: i32);
}

/// [`Sys`] through `nix` (sets `errno`: not for a spare's processes).
pub struct NixSys;

impl Sys for NixSys {
    fn unshare_mounts(&self) -> Result<(), i32> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| e as i32)
    }

    fn mount(
        &self,
        src: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), i32> {
        nix::mount::mount(
            src,
            target,
            fstype,
            nix::mount::MsFlags::from_bits_retain(flags),
            data,
        )
        .map_err(|e| e as i32)
    }

    fn open_dir(&self, path: &CStr) -> Result<i32, i32> {
        use nix::fcntl::OFlag;
        use std::os::fd::IntoRawFd;
        nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map(IntoRawFd::into_raw_fd)
        .map_err(|e| e as i32)
    }

    fn fchdir(&self, fd: i32) -> Result<(), i32> {
        // SAFETY: `fd` is open for the duration of the call (the caller's).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        nix::unistd::fchdir(fd).map_err(|e| e as i32)
    }

    fn mkdir(&self, path: &CStr) -> Result<(), i32> {
        nix::unistd::mkdir(path, nix::sys::stat::Mode::from_bits_truncate(0o755))
            .map_err(|e| e as i32)
    }

    fn create(&self, path: &CStr) -> Result<(), i32> {
        use nix::fcntl::OFlag;
        nix::fcntl::open(
            path,
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .map(drop)
        .map_err(|e| e as i32)
    }

    fn close(&self, fd: i32) {
        // SAFETY: closing a descriptor `open_dir` returned, once.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
}

/// Makes the calling process's namespace as `plan` says (see the module docs). Changes the
/// working directory: the caller sets its own afterwards. Errors: the `errno` of the step
/// that failed.
///
/// # Safety
/// Only system calls (async-signal-safe, no allocation) on data `plan` owns; the caller is a
/// process about to `exec` or a thread whose view ends with it.
pub unsafe fn enter(plan: &Plan, sys: &impl Sys) -> Result<(), i32> {
    sys.unshare_mounts()?;
    sys.mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    for place in &plan.places {
        // The host's place, to bind entries back from once it is covered.
        let host = match place.keep.is_empty() {
            true => None,
            false => Some(sys.open_dir(&place.dir)?),
        };
        let covered = sys.mount(
            Some(c"tmpfs"),
            &place.dir,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(TMPFS_DATA),
        );
        let kept = covered.and_then(|()| match host {
            Some(fd) => bind_back(place, fd, sys),
            None => Ok(()),
        });
        if let Some(fd) = host {
            sys.close(fd);
        }
        kept?;
    }
    if plan.hide_pids {
        mount_proc(sys)?;
    }
    Ok(())
}

/// Binds `place`'s kept entries back from the host's place, open at `host`.
fn bind_back(place: &Place, host: i32, sys: &impl Sys) -> Result<(), i32> {
    sys.fchdir(host)?;
    for k in &place.keep {
        let made = match k.dir {
            true => sys.mkdir(&k.target),
            false => sys.create(&k.target),
        };
        match made {
            Ok(()) | Err(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        // `name` is looked up from the working directory: the host's place, under the tmpfs.
        sys.mount(
            Some(&k.name),
            &k.target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
    }
    Ok(())
}

/// Mounts a fresh `proc` over `/proc` that hides other uids' processes.
fn mount_proc(sys: &impl Sys) -> Result<(), i32> {
    sys.mount(
        Some(c"proc"),
        c"/proc",
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(PROC_DATA),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn range() -> UidRange {
        "2000000000-2000065535".parse().unwrap()
    }

    /// What a process under an instance uid started in a namespace reports (`script`'s
    /// output), started by `start` (`spawn`, or a spare) from the prepared spawn, in `dir`
    /// (under `/tmp`, bound back as a root of the server's).
    pub(crate) fn run_in_namespace(
        start: impl FnOnce(&super::super::spawn::SpawnSpec<'_>) -> i32,
    ) -> Option<(String, String)> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ns = Namespaces::probe(&[dir.path().to_path_buf()], range()).unwrap();
        let name = format!(
            "cattery-ns-test-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        );
        let script = format!(
            "for d in /tmp /var/tmp /dev/shm; do echo x > $d/{name} || echo cannot-write; done; \
             test -d {dir} && echo sees-its-dir; \
             cat /proc/1/cmdline > /dev/null 2>&1 && echo sees-pid-1 || echo pid-1-hidden; pwd",
            dir = dir.path().display()
        );
        let out_path = dir.path().join("out");
        let out: std::os::fd::OwnedFd = std::fs::File::create(&out_path).unwrap().into();
        let args = ["-c".to_string(), script];
        let env = [(
            std::ffi::OsString::from("PATH"),
            std::ffi::OsString::from("/usr/bin:/bin"),
        )];
        let pid = start(&super::super::spawn::SpawnSpec {
            program: "/bin/sh",
            args: &args,
            env: &env,
            cwd: dir.path(),
            stdout: &out,
            stderr: &out,
            cgroup_procs: &[],
            ids: Some((2_000_000_007, 2_000_000_007)),
            stdin: None,
            namespaces: Some(&ns),
        });
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let got = std::fs::read_to_string(&out_path).unwrap();
        let mut leaked = String::new();
        for d in PLACES {
            let p = Path::new(d).join(&name);
            if p.exists() {
                leaked.push_str(&format!("{} ", p.display()));
                let _ = std::fs::remove_file(&p);
            }
        }
        let proc_line = if ns.hides_pids() {
            "pid-1-hidden"
        } else {
            "sees-pid-1"
        };
        let want = format!("sees-its-dir\n{proc_line}\n{}\n", dir.path().display());
        assert_eq!(got, want, "{got}");
        Some((got, leaked))
    }

    #[test]
    fn a_spawned_process_has_its_own_tmp_var_tmp_dev_shm_and_proc() {
        let r = run_in_namespace(|spec| super::super::spawn::spawn(spec).unwrap());
        if let Some((_, leaked)) = r {
            assert_eq!(leaked, "", "the host got the instance's files");
        }
    }

    #[test]
    fn only_the_hosts_own_entries_are_bound_back() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir_in("/tmp").unwrap();
        let mine = tempfile::tempdir_in("/tmp").unwrap();
        let theirs = tempfile::tempdir_in("/tmp").unwrap();
        std::os::unix::fs::chown(theirs.path(), Some(2_000_000_001), None).unwrap();
        let open = tempfile::tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let ns = Namespaces::probe(&[root.path().to_path_buf()], range()).unwrap();
        let deep = |d: &tempfile::TempDir| d.path().join("a/b").into_os_string();
        let values = [
            deep(&mine),
            format!("/usr/bin:{}", theirs.path().display()).into(),
            deep(&open),
            "relative/path".into(),
        ];
        let plan = ns.plan(values.iter().map(|v| v.as_os_str()));
        let tmp = plan
            .places
            .iter()
            .find(|p| p.dir.as_bytes() == b"/tmp")
            .unwrap();
        let kept: Vec<&[u8]> = tmp.keep.iter().map(|k| k.target.as_bytes()).collect();
        let b = |d: &tempfile::TempDir| d.path().as_os_str().as_bytes().to_vec();
        assert_eq!(kept, [b(&root).as_slice(), b(&mine).as_slice()]);
    }
}
