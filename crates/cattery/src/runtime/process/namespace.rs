//! A private mount namespace per instance: its own `/tmp`, `/var/tmp`, `/dev/shm` and `/run/lock`, and a
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
//! 4. the server's `<data-dir>/builds` (made at start when missing) covered by an empty read-only `tmpfs`
//!    (`mode=0711`), with only the builds the process runs bound back at their host paths:
//!    an instance gets the `app/` and `venv/` of each build its program, working directory or
//!    absolute arguments name (read-only; never one named only by an environment value, which
//!    the control plane does not check), a build's step its build's whole directory. No other
//!    build, no upload and no build log is visible, whatever id the process learns;
//! 5. a fresh `proc` mounted over `/proc` with `hidepid=invisible`, when the kernel allows it:
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

/// The world-writable places every instance gets its own of: the usual scratch places, and
/// the lock directory (`/run/lock`, `/var/lock` linked to it on Debian), writable by every
/// user too.
pub const PLACES: [&str; 5] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"];

/// Mount options of each private place.
const TMPFS_DATA: &CStr = c"mode=1777";
/// Mount options of the private `/proc`.
const PROC_DATA: &CStr = c"hidepid=invisible";
/// Mount options of the `tmpfs` over the builds directory.
const MASK_DATA: &CStr = c"mode=0711";
/// The builds directory's name in the data directory.
pub const BUILDS: &str = "builds";

/// What of the builds directory a process sees besides the builds its paths name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildView {
    /// An instance (or a fork server): the `app/` and `venv/` of each build it runs, read-only.
    Run,
    /// A build's step: its build's whole directory, as it is (the steps write there).
    Make,
}

/// What an instance's namespace is made of on this machine, decided once at start.
#[derive(Debug)]
pub struct Namespaces {
    /// The places that exist, resolved, without duplicates.
    places: Vec<PathBuf>,
    /// What every namespace binds back (the server's own directories).
    base: Plan,
    /// Instance uids: an entry one of them owns is never bound back.
    uids: UidRange,
    /// The server's builds directory, as given and resolved (the resolved one is covered),
    /// when namespaces may cover it.
    builds: Option<(PathBuf, PathBuf)>,
    /// Why builds are not covered, when they are not.
    builds_off: Option<String>,
}

/// One namespace to make: prepared by the parent, read by the child.
#[derive(Debug, Clone)]
pub struct Plan {
    places: Vec<Place>,
    hide_pids: bool,
    mask: Option<Mask>,
    /// An IPC namespace of its own (System V IPC, POSIX message queues).
    ipc: bool,
    /// A fresh `mqueue` over the host's `/dev/mqueue` (with `ipc`, where the host has one).
    mqueue: bool,
}

/// The builds directory covered, and what of it is bound back.
#[derive(Debug, Clone)]
struct Mask {
    /// The builds directory (resolved).
    dir: CString,
    /// Mount points made on the `tmpfs`, parents first.
    dirs: Vec<CString>,
    /// Entries bound back: `name` relative to the host's builds directory.
    binds: Vec<Keep>,
    /// Whether the entries bound back are made read-only.
    read_only: bool,
    /// The flags of the host's mount under the builds that a read-only remount keeps (a
    /// remount may not drop them).
    locked: libc::c_ulong,
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
    ///
    /// `builds` is the server's builds directory (`<data-dir>/builds`): each namespace covers
    /// it and binds back only what the process runs ([`Namespaces::plan`]); whether the
    /// kernel allows that is tried here too, when the directory exists.
    pub fn probe(
        roots: &[PathBuf],
        builds: Option<&Path>,
        uids: UidRange,
    ) -> Result<Namespaces, String> {
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
            mask: None,
            ipc: false,
            mqueue: false,
        };
        for r in roots {
            base.keep(&places, r, |_| true);
        }
        let builds = builds.map(|b| {
            let given = std::path::absolute(b).unwrap_or_else(|_| b.to_path_buf());
            let real = std::fs::canonicalize(b).unwrap_or_else(|_| given.clone());
            (given, real)
        });
        let try_plan = base.clone();
        let try_mask = builds
            .as_ref()
            .and_then(|(_, real)| mask_of(real, &[], BuildView::Run));
        let (hide_pids, masked, ipc, mqueue) = std::thread::spawn(move || -> Result<_, String> {
            // SAFETY: system calls on data this thread owns; the thread's view ends with it.
            unsafe { enter(&try_plan, &NixSys) }.map_err(|e| {
                format!(
                    "no private mount namespace (unshare, then tmpfs mounts): {}",
                    nix::errno::Errno::from_raw(e)
                )
            })?;
            let masked = match &try_mask {
                Some(m) => cover_builds(m, &NixSys).map_err(|e| {
                    format!(
                        "the builds directory could not be covered: {}",
                        nix::errno::Errno::from_raw(e)
                    )
                }),
                None => Ok(()),
            };
            let (ipc, mqueue) = probe_ipc();
            Ok((mount_proc(&NixSys).is_ok(), masked, ipc, mqueue))
        })
        .join()
        .map_err(|_| "the namespace probe panicked".to_string())??;
        base.hide_pids = hide_pids;
        (base.ipc, base.mqueue) = (ipc, mqueue);
        let builds_off = masked.err();
        Ok(Namespaces {
            places,
            base,
            uids,
            builds: builds.filter(|_| builds_off.is_none()),
            builds_off,
        })
    }

    /// One line for the start log.
    pub fn describe(&self) -> String {
        let proc = if self.base.hide_pids {
            ", and a /proc showing only its own uid's processes"
        } else {
            " (/proc is the host's: this kernel refused a private one)"
        };
        let builds = match (&self.builds, &self.builds_off) {
            (Some(_), _) => ", and of the builds only those it runs".to_string(),
            (None, Some(why)) => format!("; builds are readable by path ({why})"),
            (None, None) => String::new(),
        };
        let ipc = if self.base.ipc {
            ", System V IPC and message queues"
        } else {
            " (System V IPC and message queues are the host's: this kernel refused an IPC namespace)"
        };
        format!("a private /tmp, /var/tmp, /dev/shm and /run/lock per instance{ipc}{proc}{builds}")
    }

    /// Whether builds are hidden from instances but for those they run (false: any instance
    /// reads a build by its path).
    pub fn covers_builds(&self) -> bool {
        self.builds.is_some()
    }

    /// Whether instances get a `/proc` of their own.
    pub fn hides_pids(&self) -> bool {
        self.base.hide_pids
    }

    /// The namespace of a process given `named` (its program, working directory and
    /// arguments: what the control plane checks names only the org's own builds) and `other`
    /// values (its environment's): each absolute path in them, also `:`-separated ones, that
    /// lies in a private place is bound back; the builds `named` paths lie in (whole values,
    /// as given or resolved) are bound back as `view` says. Allocates: made by the parent.
    pub fn plan<'a>(
        &self,
        named: impl IntoIterator<Item = &'a OsStr>,
        other: impl IntoIterator<Item = &'a OsStr>,
        view: BuildView,
    ) -> Plan {
        let mut plan = self.base.clone();
        let mut runs: Vec<String> = Vec::new();
        for value in named {
            self.keep_value(&mut plan, value);
            if let Some(id) = self.build_of(Path::new(value)) {
                if !runs.contains(&id) {
                    runs.push(id);
                }
            }
        }
        for value in other {
            self.keep_value(&mut plan, value);
        }
        plan.mask = self
            .builds
            .as_ref()
            .and_then(|(_, real)| mask_of(real, &runs, view));
        plan
    }

    fn keep_value(&self, plan: &mut Plan, value: &OsStr) {
        for part in value.as_bytes().split(|&b| b == b':') {
            if part.first() == Some(&b'/') {
                let p = Path::new(OsStr::from_bytes(part));
                plan.keep(&self.places, p, |m| self.may_bind_back(m));
            }
        }
    }

    /// The build (its id, a directory of the builds directory) `path` lies in, as given
    /// (`..` resolved) or resolved; `None` for any other path (`uploads/` included).
    fn build_of(&self, path: &Path) -> Option<String> {
        let (given, real) = self.builds.as_ref()?;
        if !path.is_absolute() {
            return None;
        }
        let id_in = |p: &Path| -> Option<String> {
            [given, real].into_iter().find_map(|d| {
                let rest = p.strip_prefix(d).ok()?;
                let Some(std::path::Component::Normal(id)) = rest.components().next() else {
                    return None;
                };
                let id = id.to_str()?;
                uuid::Uuid::parse_str(id).ok().map(|_| id.to_string())
            })
        };
        id_in(&normalize(path)).or_else(|| id_in(&std::fs::canonicalize(path).ok()?))
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

/// What covers `builds` (resolved) in a namespace that runs the builds `runs` as `view`
/// says; `None` when `builds` is no directory.
fn mask_of(builds: &Path, runs: &[String], view: BuildView) -> Option<Mask> {
    let st = nix::sys::statvfs::statvfs(builds).ok()?;
    if !std::fs::metadata(builds).is_ok_and(|m| m.is_dir()) {
        return None;
    }
    use nix::sys::statvfs::FsFlags;
    let locked = [
        (FsFlags::ST_NOSUID, libc::MS_NOSUID),
        (FsFlags::ST_NODEV, libc::MS_NODEV),
        (FsFlags::ST_NOEXEC, libc::MS_NOEXEC),
        (FsFlags::ST_NOATIME, libc::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, libc::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, libc::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(f, _)| st.flags().contains(*f))
    .fold(0, |acc, (_, m)| acc | m);
    let mut mask = Mask {
        dir: cpath(builds),
        dirs: Vec::new(),
        binds: Vec::new(),
        read_only: view == BuildView::Run,
        locked,
    };
    for id in runs {
        let entries: &[&str] = match view {
            BuildView::Run => &["app", "venv"],
            BuildView::Make => &[""],
        };
        let mut made = false;
        for e in entries {
            let name = Path::new(id).join(e);
            let target = builds.join(&name);
            if !std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            if !made && !e.is_empty() {
                mask.dirs.push(cpath(&builds.join(id)));
            }
            made = true;
            mask.dirs.push(cpath(&target));
            mask.binds.push(Keep {
                name: cpath(&name),
                target: cpath(&target),
                dir: true,
            });
        }
    }
    Some(mask)
}

/// `p` with `.` and `..` resolved lexically (`/a/../b` is `/b`), links left alone.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// The system calls [`enter`] makes; errors are `errno` values.
pub trait Sys {
    /// `unshare(flags)`: `CLONE_NEWNS`, with `CLONE_NEWIPC` where the kernel allows it.
    fn unshare(&self, flags: libc::c_int) -> Result<(), i32>;
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
    /// `chmod(path, mode)` (the mode `mkdir` gave is cut by the umask).
    fn chmod(&self, path: &CStr, mode: u32) -> Result<(), i32>;
    /// Creates an empty file (a mount point for a file).
    fn create(&self, path: &CStr) -> Result<(), i32>;
    /// `close(fd)`.
    fn close(&self, fd: i32);
}

/// [`Sys`] through `nix` (sets `errno`: not for a spare's processes).
pub struct NixSys;

impl Sys for NixSys {
    fn unshare(&self, flags: libc::c_int) -> Result<(), i32> {
        nix::sched::unshare(nix::sched::CloneFlags::from_bits_retain(flags)).map_err(|e| e as i32)
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

    fn chmod(&self, path: &CStr, mode: u32) -> Result<(), i32> {
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            path,
            nix::sys::stat::Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
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
    let ipc = if plan.ipc { libc::CLONE_NEWIPC } else { 0 };
    sys.unshare(libc::CLONE_NEWNS | ipc)?;
    sys.mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    if plan.mqueue {
        mount_mqueue(sys)?;
    }
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
    if let Some(m) = &plan.mask {
        cover_builds(m, sys)?;
    }
    if plan.hide_pids {
        mount_proc(sys)?;
    }
    Ok(())
}

/// Covers the builds directory with an empty read-only `tmpfs` and binds back what `mask`
/// keeps of the host's (see the module docs).
fn cover_builds(m: &Mask, sys: &impl Sys) -> Result<(), i32> {
    let tmpfs = libc::MS_NOSUID | libc::MS_NODEV;
    if m.dirs.is_empty() {
        // Nothing to make on it: read-only from the start, one call.
        return sys.mount(
            Some(c"tmpfs"),
            &m.dir,
            Some(c"tmpfs"),
            tmpfs | libc::MS_RDONLY,
            Some(MASK_DATA),
        );
    }
    // The host's builds directory, to bind from once it is covered.
    let host = sys.open_dir(&m.dir)?;
    let done = sys
        .mount(
            Some(c"tmpfs"),
            &m.dir,
            Some(c"tmpfs"),
            tmpfs,
            Some(MASK_DATA),
        )
        .and_then(|()| bind_builds(m, host, sys));
    sys.close(host);
    done?;
    sys.mount(
        None,
        &m.dir,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | tmpfs,
        Some(MASK_DATA),
    )
}

/// Makes the mount points of `m` on the fresh `tmpfs` and binds its entries back from the
/// host's builds directory, open at `host`.
fn bind_builds(m: &Mask, host: i32, sys: &impl Sys) -> Result<(), i32> {
    for d in &m.dirs {
        match sys.mkdir(d) {
            Ok(()) | Err(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        // A directory on the way to what is bound back (a build's own): traversable.
        if !m.binds.iter().any(|k| k.target.as_c_str() == d.as_c_str()) {
            sys.chmod(d, 0o755)?;
        }
    }
    sys.fchdir(host)?;
    for k in &m.binds {
        sys.mount(
            Some(&k.name),
            &k.target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        if m.read_only {
            let flags = libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | m.locked;
            sys.mount(None, &k.target, None, flags, None)?;
        }
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

/// Where the host shows its POSIX message queues.
const MQUEUE_DIR: &CStr = c"/dev/mqueue";

/// Mounts a fresh `mqueue` over `/dev/mqueue`: the queues of the process's own IPC namespace
/// (the host's stay out of reach, and nothing made there outlives the namespace).
fn mount_mqueue(sys: &impl Sys) -> Result<(), i32> {
    sys.mount(
        Some(c"mqueue"),
        MQUEUE_DIR,
        Some(c"mqueue"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}

/// Whether this kernel gives a process an IPC namespace of its own, and whether the host's
/// `/dev/mqueue` (when it has one) can be covered in it. Called on the probe's thread, whose
/// view ends with it.
fn probe_ipc() -> (bool, bool) {
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC).is_err() {
        return (false, false);
    }
    let mqueue = nix::sys::statfs::FsType(0x1980_0202);
    let host_has =
        nix::sys::statfs::statfs(MQUEUE_DIR).is_ok_and(|f| f.filesystem_type() == mqueue);
    (true, host_has && mount_mqueue(&NixSys).is_ok())
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
    /// (under `/tmp`, bound back as a root of the server's, with two builds: it runs the
    /// first, named by a path argument, and sees nothing of the second).
    pub(crate) fn run_in_namespace(
        start: impl FnOnce(&super::super::spawn::SpawnSpec<'_>) -> i32,
    ) -> Option<(String, String)> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Two builds in the data dir: the process runs the first (a path argument in it).
        let builds = dir.path().join(BUILDS);
        let (own, other) = (builds.join(A).join("app"), builds.join(B).join("app"));
        for d in [&own, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("f"), "code").unwrap();
        }
        let ns = Namespaces::probe(&[dir.path().to_path_buf()], Some(&builds), range()).unwrap();
        let name = format!(
            "cattery-ns-test-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        );
        let script = format!(
            "for d in /tmp /var/tmp /dev/shm; do echo x > $d/{name} || echo cannot-write; done; \
             test -d {dir} && echo sees-its-dir; \
             cat /proc/1/cmdline > /dev/null 2>&1 && echo sees-pid-1 || echo pid-1-hidden; \
             cat $0/f > /dev/null && echo reads-its-build; \
             cat {other}/f > /dev/null 2>&1 && echo reads-another-build; \
             touch $0/g 2> /dev/null && echo writes-its-build; pwd",
            dir = dir.path().display(),
            other = other.display(),
        );
        let out_path = dir.path().join("out");
        let out: std::os::fd::OwnedFd = std::fs::File::create(&out_path).unwrap().into();
        let args = ["-c".to_string(), script, own.display().to_string()];
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
        let want = format!(
            "sees-its-dir\n{proc_line}\nreads-its-build\n{}\n",
            dir.path().display()
        );
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
        let ns = Namespaces::probe(&[root.path().to_path_buf()], None, range()).unwrap();
        let deep = |d: &tempfile::TempDir| d.path().join("a/b").into_os_string();
        let values = [
            deep(&mine),
            format!("/usr/bin:{}", theirs.path().display()).into(),
            deep(&open),
            "relative/path".into(),
        ];
        let plan = ns.plan(values.iter().map(|v| v.as_os_str()), [], BuildView::Run);
        let tmp = plan
            .places
            .iter()
            .find(|p| p.dir.as_bytes() == b"/tmp")
            .unwrap();
        let kept: Vec<&[u8]> = tmp.keep.iter().map(|k| k.target.as_bytes()).collect();
        let b = |d: &tempfile::TempDir| d.path().as_os_str().as_bytes().to_vec();
        assert_eq!(kept, [b(&root).as_slice(), b(&mine).as_slice()]);
    }

    /// A [`Sys`] that records the calls [`enter`] makes, one line each, and succeeds.
    #[derive(Default)]
    struct Recorder(std::cell::RefCell<Vec<String>>);

    impl Recorder {
        fn note(&self, line: String) {
            self.0.borrow_mut().push(line);
        }
    }

    fn text(c: &CStr) -> String {
        c.to_string_lossy().into_owned()
    }

    impl Sys for Recorder {
        fn unshare(&self, flags: libc::c_int) -> Result<(), i32> {
            let ipc = if flags & libc::CLONE_NEWIPC != 0 {
                " ipc"
            } else {
                ""
            };
            self.note(format!("unshare{ipc}"));
            Ok(())
        }
        fn mount(
            &self,
            src: Option<&CStr>,
            target: &CStr,
            fstype: Option<&CStr>,
            flags: libc::c_ulong,
            data: Option<&CStr>,
        ) -> Result<(), i32> {
            let mut f = Vec::new();
            for (bit, name) in [
                (libc::MS_REMOUNT, "remount"),
                (libc::MS_BIND, "bind"),
                (libc::MS_RDONLY, "ro"),
                (libc::MS_PRIVATE, "private"),
            ] {
                if flags & bit != 0 {
                    f.push(name);
                }
            }
            self.note(format!(
                "mount {} {} {} [{}] {}",
                src.map(text).unwrap_or_default(),
                text(target),
                fstype.map(text).unwrap_or_default(),
                f.join(","),
                data.map(text).unwrap_or_default()
            ));
            Ok(())
        }
        fn open_dir(&self, path: &CStr) -> Result<i32, i32> {
            self.note(format!("open {}", text(path)));
            Ok(7)
        }
        fn fchdir(&self, fd: i32) -> Result<(), i32> {
            self.note(format!("fchdir {fd}"));
            Ok(())
        }
        fn mkdir(&self, path: &CStr) -> Result<(), i32> {
            self.note(format!("mkdir {}", text(path)));
            Ok(())
        }
        fn chmod(&self, path: &CStr, mode: u32) -> Result<(), i32> {
            self.note(format!("chmod {} {mode:o}", text(path)));
            Ok(())
        }
        fn create(&self, path: &CStr) -> Result<(), i32> {
            self.note(format!("create {}", text(path)));
            Ok(())
        }
        fn close(&self, fd: i32) {
            self.note(format!("close {fd}"));
        }
    }

    const A: &str = "0b6f5f4e-4f4a-4f0e-9c55-6a1b2c3d4e5f";
    const B: &str = "7d1c2b3a-1111-4222-8333-944455566677";

    /// A data directory with two built builds (`A`, `B`, each with `app/`, `venv/`, its log)
    /// and an upload, and namespaces (unprobed: no places of their own) that cover its builds.
    fn two_builds() -> (tempfile::TempDir, PathBuf, Namespaces) {
        let data = tempfile::tempdir().unwrap();
        let builds = std::fs::canonicalize(data.path()).unwrap().join(BUILDS);
        for id in [A, B] {
            for d in ["app", "venv/bin"] {
                std::fs::create_dir_all(builds.join(id).join(d)).unwrap();
            }
            std::fs::write(builds.join(id).join("build.log"), "log").unwrap();
            std::fs::write(builds.join(id).join("venv/bin/python"), "").unwrap();
        }
        std::fs::create_dir_all(builds.join("uploads")).unwrap();
        std::fs::write(builds.join("uploads/u.tar.gz"), "").unwrap();
        let ns = Namespaces {
            places: Vec::new(),
            base: Plan {
                places: Vec::new(),
                hide_pids: false,
                mask: None,
                ipc: false,
                mqueue: false,
            },
            uids: range(),
            builds: Some((builds.clone(), builds.clone())),
            builds_off: None,
        };
        (data, builds, ns)
    }

    /// The calls `enter` makes for `plan`, after the namespace's own two.
    fn calls(plan: &Plan) -> Vec<String> {
        let r = Recorder::default();
        // SAFETY: the recorder makes no system call.
        unsafe { enter(plan, &r) }.unwrap();
        let got = r.0.into_inner();
        assert_eq!(got[..2], ["unshare", "mount  /  [private] "]);
        got[2..].to_vec()
    }

    #[test]
    fn an_instance_sees_of_the_builds_only_the_app_and_venv_of_its_own_read_only() {
        let (_data, builds, ns) = two_builds();
        let b = builds.display();
        let python = builds.join(A).join("venv/bin/python");
        let cwd = builds.join(A).join("app");
        // B's path only in an environment value: the control plane does not check those.
        let env = builds.join(B).join("app");
        let plan = ns.plan(
            [python.as_os_str(), cwd.as_os_str()],
            [env.as_os_str()],
            BuildView::Run,
        );
        let ro = "[remount,bind,ro]";
        assert_eq!(
            calls(&plan),
            [
                format!("open {b}"),
                format!("mount tmpfs {b} tmpfs [] mode=0711"),
                format!("mkdir {b}/{A}"),
                format!("chmod {b}/{A} 755"),
                format!("mkdir {b}/{A}/app"),
                format!("mkdir {b}/{A}/venv"),
                "fchdir 7".to_string(),
                format!("mount {A}/app {b}/{A}/app  [bind] "),
                format!("mount  {b}/{A}/app  {ro} "),
                format!("mount {A}/venv {b}/{A}/venv  [bind] "),
                format!("mount  {b}/{A}/venv  {ro} "),
                "close 7".to_string(),
                format!("mount  {b}  [remount,ro] mode=0711"),
            ]
        );
    }

    #[test]
    fn an_instance_that_runs_no_build_sees_an_empty_read_only_builds_dir() {
        let (_data, builds, ns) = two_builds();
        let b = builds.display();
        // Named by an environment value, an upload, a path that is no build, a relative one.
        let env = builds.join(A).join("app");
        let upload = builds.join("uploads/u.tar.gz");
        let other = builds.join("not-a-build");
        let named = [
            upload.as_os_str(),
            other.as_os_str(),
            OsStr::new("builds/x"),
            OsStr::new("/usr/bin/python3"),
        ];
        let plan = ns.plan(named, [env.as_os_str()], BuildView::Run);
        assert_eq!(
            calls(&plan),
            [format!("mount tmpfs {b} tmpfs [ro] mode=0711")]
        );
    }

    #[test]
    fn a_path_into_a_build_through_dot_dot_or_a_link_names_that_build() {
        let (data, builds, ns) = two_builds();
        let link = data.path().join("link");
        std::os::unix::fs::symlink(builds.join(B).join("app"), &link).unwrap();
        let dotted = builds.join(A).join("app/../../").join(B).join("venv");
        let plan = ns.plan([link.as_os_str()], [], BuildView::Run);
        let got = calls(&plan);
        assert!(
            got.contains(&format!("mkdir {}/{B}/app", builds.display())),
            "{got:?}"
        );
        assert!(!got.iter().any(|c| c.contains(A)), "{got:?}");
        let plan = ns.plan([dotted.as_os_str()], [], BuildView::Run);
        let got = calls(&plan);
        assert!(
            got.contains(&format!("mkdir {}/{B}/venv", builds.display())),
            "{got:?}"
        );
        assert!(!got.iter().any(|c| c.contains(A)), "{got:?}");
    }

    #[test]
    fn a_build_step_sees_its_own_builds_whole_directory_writable_and_no_other() {
        let (_data, builds, ns) = two_builds();
        let b = builds.display();
        let cwd = builds.join(A).join("app");
        let plan = ns.plan(
            [OsStr::new("/usr/bin/python3"), cwd.as_os_str()],
            [],
            BuildView::Make,
        );
        assert_eq!(
            calls(&plan),
            [
                format!("open {b}"),
                format!("mount tmpfs {b} tmpfs [] mode=0711"),
                format!("mkdir {b}/{A}/"),
                "fchdir 7".to_string(),
                format!("mount {A}/ {b}/{A}/  [bind] "),
                "close 7".to_string(),
                format!("mount  {b}  [remount,ro] mode=0711"),
            ]
        );
    }

    #[test]
    fn without_a_builds_dir_nothing_is_covered() {
        let (data, builds, ns) = two_builds();
        std::fs::remove_dir_all(&builds).unwrap();
        let plan = ns.plan([data.path().as_os_str()], [], BuildView::Run);
        assert!(calls(&plan).is_empty());
    }

    /// Where the kernel allows it, the namespace is an IPC namespace too, made by the same
    /// `unshare`, and the host's `/dev/mqueue` (when it has one) is covered by the queues of
    /// that namespace, before anything else is mounted.
    #[test]
    fn an_instance_gets_its_own_ipc_namespace_and_dev_mqueue() {
        let (_data, builds, mut ns) = two_builds();
        std::fs::remove_dir_all(&builds).unwrap();
        (ns.base.ipc, ns.base.mqueue) = (true, true);
        let r = Recorder::default();
        // SAFETY: the recorder makes no system call.
        unsafe { enter(&ns.plan([], [], BuildView::Run), &r) }.unwrap();
        assert_eq!(
            r.0.into_inner(),
            [
                "unshare ipc",
                "mount  /  [private] ",
                "mount mqueue /dev/mqueue mqueue [] "
            ]
        );
    }
}
