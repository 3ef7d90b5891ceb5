//! Where instance directories live: on a memory file system (`tmpfs`) when one is usable.
//!
//! Every instance makes seven inodes (its directory, `home`, `tmp`, the two output files, the
//! exit status file, the log offsets) and removes them when it ends. On a disk file system that
//! is real work per start and stop: on ext4 without a journal, each new inode is chosen past
//! every inode deleted in the last seconds, so under churn the allocator's cost grew with the
//! churn rate itself (a third of the server's CPU, `docs/performance.md`). On a `tmpfs` it is a
//! few hundred nanoseconds.
//!
//! `<data dir>/instances` stays the one path the rest of Cattery knows (recorded placements,
//! restart re-adoption, the sweep of leftovers): it becomes a symbolic link to
//! `<runtime dir>/<server id>`. The runtime dir is `--runtime-dir` when given; with `auto` (the
//! default) the first of `/run/cattery-instances` (as root) and `/dev/shm/cattery-<uid>` whose
//! file system is a `tmpfs` with at least [`MIN_FREE`] free; with `data` (or when none
//! qualifies) instances stay in a real `<data dir>/instances` directory. A real directory that
//! still holds instances (from a server that kept them there) is kept until it is empty, so
//! those instances are re-adopted where they are. The directories are created owned by the
//! server, mode `0711` (instances pass through to their own directory, never list it), and
//! refused if another user owns them. A `tmpfs` is emptied by a reboot, which also ends every
//! instance, so nothing is lost that re-adoption could use.
//!
//! A server that goes away without its data dir (a deleted install, a test's temporary data
//! dir) would leave `<runtime dir>/<server id>` behind for good, so each server sweeps the
//! leftovers of others when it places its own. Liveness is a lock, not a guess: a server holds
//! an exclusive `flock` on `<runtime dir>/<server id>.lock` while it runs, taken before it
//! creates `<server id>` (so a sweep by another server starting at the same moment cannot take
//! its fresh, empty directory for a leftover). The sweep takes every other server's lock
//! without waiting; only when it gets it is that server not running, and then it removes its
//! directory if empty (`rmdir`, never anything inside: a server killed with `SIGKILL` finds
//! its instances there when it starts again and re-adopts them), untouched for
//! [`UNTOUCHED_AGE`] and that server's cgroup liveness lock (`<lock root>/servers/<server
//! id>.lock`, see [`super::cgroup`]) is free (a server of an earlier version, which takes no
//! lock here, may run on that id after a rollback), and, once the directory is gone, the lock
//! file. Whoever takes a lock checks afterwards that the file is still the one at its path (a
//! sweep may have removed it meanwhile) and takes the new one if not. Only names shaped like
//! server ids are looked at: a runtime dir given with `--runtime-dir` may be shared with other
//! programs (`/run`, `/dev/shm`), and such a directory's mode is never changed either. A
//! directory without a lock file (left by a server of an earlier version) is never removed:
//! its server's liveness cannot be known; a reboot empties the `tmpfs`. A server's shutdown
//! removes its own directory if empty, then its lock file, and gives up the lock: the next
//! server of its id (after a detach, while the
//! old process still relays calls) does not wait for the old process to end.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// The least free space a `tmpfs` must have to hold instance directories (their output files
/// grow with what agents print until the tailer has read it).
pub const MIN_FREE: u64 = 256 << 20;

/// How long a stopped server's directory must have been left untouched before a sweep
/// removes it (if empty): a server of an earlier version, which takes no lock, may be using a
/// directory whose lock file a killed server of this version left (a rollback).
pub const UNTOUCHED_AGE: Duration = Duration::from_secs(600);

/// `--runtime-dir`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RuntimeDir {
    /// A `tmpfs` when one qualifies, else the data dir.
    #[default]
    Auto,
    /// Always `<data dir>/instances`.
    Data,
    /// This directory (any file system).
    Path(PathBuf),
}

impl std::str::FromStr for RuntimeDir {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RuntimeDir::Auto),
            "data" => Ok(RuntimeDir::Data),
            p if p.starts_with('/') => Ok(RuntimeDir::Path(PathBuf::from(p))),
            other => Err(format!(
                "must be auto, data or an absolute path (got {other:?})"
            )),
        }
    }
}

/// Where a server's instance directories are ([`place`]), and its hold on them.
#[derive(Debug)]
pub struct Placed {
    /// Where instance directories really are.
    pub dir: PathBuf,
    /// Behind a link: the liveness lock on `<runtime dir>/<server id>.lock` and its path,
    /// held until [`Placed::release`] or the end of the process (see the module docs).
    alive: Mutex<Option<(Flock<File>, PathBuf)>>,
}

impl Placed {
    /// At shutdown: removes this server's runtime directory if it is empty, and gives up its
    /// lock, removing the lock file first. The next server of this id (after a detach, while
    /// this process still relays calls) takes a new one at once and re-adopts what the
    /// directory holds. The link in the data dir stays, and the directory is made again at the
    /// next start. A real directory in the data dir stays.
    pub fn release(&self) {
        let Some((lock, path)) = self.alive.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_file(path);
        drop(lock);
    }
}

/// Makes `instances_dir` (`<data dir>/instances`) usable, as a link into the chosen runtime
/// dir or as a real directory, and sweeps the runtime dir (see the module docs). Returns
/// where instance directories really are. Errors: `instances_dir` could not be made at all.
pub fn place(
    instances_dir: &Path,
    server_id: &str,
    choice: &RuntimeDir,
) -> std::io::Result<Placed> {
    let real_dir = |why: &str| -> std::io::Result<Placed> {
        if fs::symlink_metadata(instances_dir).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(instances_dir)?;
        }
        fs::create_dir_all(instances_dir)?;
        tracing::info!(dir = %instances_dir.display(), reason = why, "instance directories on the data dir");
        Ok(Placed {
            dir: instances_dir.to_path_buf(),
            alive: Mutex::new(None),
        })
    };
    let base = match choice {
        RuntimeDir::Data => return real_dir("--runtime-dir data"),
        RuntimeDir::Path(p) => Some(p.clone()),
        RuntimeDir::Auto => candidates().into_iter().find(|c| usable_tmpfs(c)),
    };
    let Some(base) = base else {
        return real_dir("no tmpfs with room for them (--runtime-dir)");
    };
    match fs::symlink_metadata(instances_dir) {
        Ok(m) if m.is_dir() => {
            let empty = fs::read_dir(instances_dir)?.next().is_none();
            if !empty {
                return real_dir("it still holds instances of a previous run");
            }
            fs::remove_dir(instances_dir)?;
        }
        _ => {}
    }
    let target = base.join(server_id);
    let lock_path = lock_path(&base, server_id);
    let base_ok = match choice {
        RuntimeDir::Path(_) => given_base(&base),
        _ => owned_dir(&base),
    };
    let alive = base_ok
        .and_then(|()| lock_own(&lock_path))
        .and_then(|lock| owned_dir(&target).map(|()| lock));
    let alive = match alive {
        Ok(lock) => lock,
        Err(e) => {
            tracing::warn!(dir = %target.display(), error = %e, "unusable runtime directory");
            return real_dir("the runtime directory is unusable");
        }
    };
    let swept = sweep(&base, server_id, UNTOUCHED_AGE);
    if swept > 0 {
        tracing::info!(
            directories = swept,
            dir = %base.display(),
            "removed empty instance directories left by servers that are no longer running"
        );
    }
    match fs::read_link(instances_dir) {
        Ok(t) if t == target => {}
        Ok(_) => {
            fs::remove_file(instances_dir)?;
            std::os::unix::fs::symlink(&target, instances_dir)?;
        }
        Err(_) => std::os::unix::fs::symlink(&target, instances_dir)?,
    }
    tracing::info!(dir = %target.display(), link = %instances_dir.display(), "instance directories");
    Ok(Placed {
        dir: target,
        alive: Mutex::new(Some((alive, lock_path))),
    })
}

/// `<runtime dir>/<server id>.lock`.
fn lock_path(base: &Path, server_id: &str) -> PathBuf {
    base.join(format!("{server_id}.lock"))
}

/// Takes this server's liveness lock at `path`, waiting while a sweep holds it; if a sweep
/// removed the file meanwhile, takes the new one.
fn lock_own(path: &Path) -> std::io::Result<Flock<File>> {
    loop {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let lock = super::locks::lock_waiting(f, path, super::locks::WARN_AFTER)?;
        if is_at(&lock, path) {
            return Ok(lock);
        }
    }
}

/// Whether `f` is still the file at `path`.
fn is_at(f: &File, path: &Path) -> bool {
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Removes the empty directories of the servers under `base` that are not running, and their
/// lock files (see the module docs); `own_id` is left alone. Returns how many directories went
/// away.
fn sweep(base: &Path, own_id: &str, untouched: Duration) -> usize {
    let Ok(entries) = fs::read_dir(base) else {
        return 0;
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kind = e.file_type().ok()?;
            if kind.is_dir() {
                Some(name)
            } else if kind.is_file() {
                name.strip_suffix(".lock").map(str::to_string)
            } else {
                None
            }
        })
        .filter(|id| id != own_id && is_server_id(id))
        .collect();
    ids.sort();
    ids.dedup();
    ids.iter()
        .filter(|id| sweep_one(base, id, untouched))
        .count()
}

/// Whether `name` has the shape of a server id (12 lowercase hex digits, `serve.rs`): a
/// runtime dir given with `--runtime-dir` may be shared with other programs (`/run`,
/// `/dev/shm`), whose files and directories are never the sweep's.
fn is_server_id(name: &str) -> bool {
    name.len() == 12 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Sweeps server `id` (see [`sweep`]); whether its directory was removed.
fn sweep_one(base: &Path, id: &str, untouched: Duration) -> bool {
    let dir = base.join(id);
    let path = lock_path(base, id);
    // No lock file: a server of an earlier version, whose liveness cannot be known.
    let Ok(f) = fs::OpenOptions::new().read(true).write(true).open(&path) else {
        return false;
    };
    let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
        // A running server.
        return false;
    };
    if !is_at(&lock, &path) {
        // Removed and made again meanwhile: by a server that is starting, or by another sweep.
        return false;
    }
    // A server of an earlier version may run on this id after a rollback: it holds its cgroup
    // liveness lock, and its directory changes as its instances come and go.
    let may_remove = untouched_for(&dir, untouched) && !legacy_alive(id);
    let (removed, gone) = if may_remove {
        match fs::remove_dir(&dir) {
            Ok(()) => (true, true),
            Err(e) => (false, e.kind() == std::io::ErrorKind::NotFound),
        }
    } else {
        (false, !dir.exists())
    };
    // A lock file stays beside a directory that stays (a killed server's instances, for when
    // it starts again).
    if gone {
        let _ = fs::remove_file(&path);
    }
    removed
}

/// Whether `dir` was last changed at least `age` ago (`false` when unknown).
fn untouched_for(dir: &Path, age: Duration) -> bool {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|d| d >= age)
}

/// Whether a server of an earlier version with this id runs: it holds its cgroup liveness
/// lock ([`super::cgroup`]) for its whole life, unless cgroups are turned off.
fn legacy_alive(id: &str) -> bool {
    let Some(root) = super::locks::lock_root() else {
        return false;
    };
    let Ok(f) = File::open(root.join("servers").join(format!("{id}.lock"))) else {
        return false;
    };
    Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err()
}

/// The `auto` candidates, best first.
fn candidates() -> Vec<PathBuf> {
    let uid = nix::unistd::geteuid();
    let mut c = Vec::new();
    if uid.is_root() {
        // Not under `/run/cattery`: that one is private to the server (the lock files).
        c.push(PathBuf::from("/run/cattery-instances"));
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        c.push(PathBuf::from(d).join("cattery-instances"));
    }
    c.push(PathBuf::from(format!("/dev/shm/cattery-{}", uid.as_raw())));
    c
}

/// Whether the file system that holds (or would hold) `dir` is a `tmpfs` with room.
fn usable_tmpfs(dir: &Path) -> bool {
    let Some(existing) = dir.ancestors().find(|a| a.exists()) else {
        return false;
    };
    let Ok(st) = nix::sys::statfs::statfs(existing) else {
        return false;
    };
    st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC
        && st.blocks_available().saturating_mul(st.block_size() as u64) >= MIN_FREE
}

/// Creates `dir` (mode 0711) if missing, and checks it is a real directory owned by this
/// user that no one else may write to.
/// Checks a runtime dir given with `--runtime-dir` (made, mode `0711`, when missing). An
/// existing one is the operator's and may be shared (`/run`, `/dev/shm`): its mode is never
/// changed, and it must be this user's or sticky (so that no other user can rename or replace
/// the server's directory in it).
fn given_base(dir: &Path) -> std::io::Result<()> {
    match fs::DirBuilder::new().mode(0o711).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = fs::symlink_metadata(dir)?;
    let mine = m.uid() == nix::unistd::geteuid().as_raw();
    if !m.is_dir() || !(mine || m.mode() & 0o1000 != 0) {
        return Err(std::io::Error::other(
            "not a directory of this user's, nor a sticky one like /tmp",
        ));
    }
    Ok(())
}

fn owned_dir(dir: &Path) -> std::io::Result<()> {
    match fs::DirBuilder::new().mode(0o711).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::other(
            "not a directory owned by this user (another user may have planted it)",
        ));
    }
    if m.mode() & 0o7777 != 0o711 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_parses() {
        assert_eq!("auto".parse(), Ok(RuntimeDir::Auto));
        assert_eq!("data".parse(), Ok(RuntimeDir::Data));
        assert_eq!(
            "/run/x".parse(),
            Ok(RuntimeDir::Path(PathBuf::from("/run/x")))
        );
        assert!("run/x".parse::<RuntimeDir>().is_err());
    }

    #[test]
    fn instances_go_behind_a_link_and_a_busy_real_directory_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, inst) = (tmp.path().join("rt"), tmp.path().join("instances"));
        let at = |choice: &RuntimeDir| place(&inst, "srv", choice).unwrap();
        // A fresh data dir: a link to <base>/<server id>, and the server's lock beside it.
        let placed = at(&RuntimeDir::Path(base.clone()));
        let got = placed.dir.clone();
        assert_eq!(got, base.join("srv"));
        assert_eq!(fs::read_link(&inst).unwrap(), base.join("srv"));
        let m = fs::metadata(&got).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o711);
        assert!(base.join("srv.lock").is_file());
        drop(placed);
        // Again: unchanged; after a clean shutdown (or a reboot): made again.
        let placed = at(&RuntimeDir::Path(base.clone()));
        assert_eq!(placed.dir, got);
        placed.release();
        assert!(!got.exists());
        assert!(!base.join("srv.lock").exists());
        drop(placed);
        assert_eq!(at(&RuntimeDir::Path(base.clone())).dir, got);
        // `data`: a real directory again.
        assert_eq!(at(&RuntimeDir::Data).dir, inst);
        assert!(fs::symlink_metadata(&inst).unwrap().is_dir());
        // A real directory with an instance in it is kept.
        fs::create_dir(inst.join("x")).unwrap();
        assert_eq!(at(&RuntimeDir::Path(base.clone())).dir, inst);
        fs::remove_dir(inst.join("x")).unwrap();
        assert_eq!(at(&RuntimeDir::Path(base)).dir, got);
    }

    /// A server directory (mode 0711, like `owned_dir`'s) last changed `age` ago.
    fn server_dir(base: &Path, id: &str, age: Duration) -> PathBuf {
        let d = base.join(id);
        fs::DirBuilder::new().mode(0o711).create(&d).unwrap();
        File::open(&d)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
        d
    }

    #[test]
    fn placing_sweeps_the_empty_directories_of_servers_that_are_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("rt");
        fs::DirBuilder::new().mode(0o711).create(&base).unwrap();
        let old = UNTOUCHED_AGE + Duration::from_secs(60);
        let lock = |id: &str| base.join(format!("{id}.lock"));
        // Running: its lock is held (here by this test), its empty directory stays.
        let live = server_dir(&base, "a00000000001", old);
        let _held = lock_own(&lock("a00000000001")).unwrap();
        // Not running, empty, long untouched: goes, with its lock file.
        let dead = server_dir(&base, "a00000000002", old);
        fs::write(lock("a00000000002"), "").unwrap();
        // Not running, instances inside (a killed server's, re-adopted when it starts
        // again): stays, lock file and all.
        let killed = server_dir(&base, "a00000000003", old);
        fs::create_dir(killed.join("instance")).unwrap();
        fs::write(lock("a00000000003"), "").unwrap();
        // A lock file without a directory (killed before it made it): goes.
        fs::write(lock("a00000000004"), "").unwrap();
        // Not running but changed a moment ago (a server of an earlier version may use it
        // after a rollback): stays, lock file and all.
        let fresh = server_dir(&base, "a00000000005", Duration::ZERO);
        fs::write(lock("a00000000005"), "").unwrap();
        // No lock file (an earlier version's): stays, empty and old or not.
        let stale = server_dir(&base, "a00000000006", old);
        let busy = server_dir(&base, "a00000000007", old);
        fs::create_dir(busy.join("instance")).unwrap();
        // Not a server directory: a symbolic link is left alone.
        std::os::unix::fs::symlink(&live, base.join("a00000000008")).unwrap();
        fs::write(lock("a00000000008"), "").unwrap();

        let placed = place(
            &tmp.path().join("instances"),
            "a0000000000f",
            &RuntimeDir::Path(base.clone()),
        )
        .unwrap();
        assert!(placed.dir.is_dir());
        assert!(live.is_dir() && lock("a00000000001").exists());
        assert!(!dead.exists() && !lock("a00000000002").exists());
        assert!(killed.join("instance").is_dir() && lock("a00000000003").exists());
        assert!(!lock("a00000000004").exists());
        assert!(fresh.is_dir() && lock("a00000000005").exists());
        assert!(stale.is_dir() && !lock("a00000000006").exists());
        assert!(busy.join("instance").is_dir() && !lock("a00000000007").exists());
        assert!(fs::symlink_metadata(base.join("a00000000008")).is_ok());
        // The server's own lock is held while it runs: another sweep leaves it alone.
        assert_eq!(sweep(&base, "b00000000000", Duration::ZERO), 1); // now old enough
        assert!(!fresh.exists() && !lock("a00000000005").exists());
        assert!(placed.dir.is_dir() && lock("a0000000000f").exists());
        drop(placed);
        assert_eq!(sweep(&base, "b00000000000", Duration::ZERO), 1);
        assert!(!base.join("a0000000000f").exists() && !lock("a0000000000f").exists());
    }

    /// `--runtime-dir PATH` naming a directory other programs use too (`/run`, `/dev/shm`,
    /// `$XDG_RUNTIME_DIR`): what is not a server's is not the sweep's, and the directory's
    /// mode stays as it was.
    #[test]
    fn a_shared_runtime_dir_keeps_what_is_not_a_servers() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("run");
        fs::DirBuilder::new().mode(0o1777).create(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).unwrap();
        // sshd's privilege separation directory: empty, long untouched.
        let sshd = server_dir(&base, "sshd", UNTOUCHED_AGE + Duration::from_secs(60));
        // A lock file another program creates and flocks only while it works.
        fs::write(base.join("xtables.lock"), "").unwrap();
        let _placed = place(
            &tmp.path().join("instances"),
            "c00000000000",
            &RuntimeDir::Path(base.clone()),
        )
        .unwrap();
        assert_eq!(
            (base.join("xtables.lock").exists(), sshd.is_dir()),
            (true, true),
            "(another program's lock file, its empty directory) kept"
        );
        let mode = fs::metadata(&base).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o1777, "the shared directory's mode changed");
    }

    /// A server of the earlier version (no lock of its own) running on a data dir whose
    /// server of this version was killed (its lock file left): its fresh, empty directory
    /// stays.
    #[test]
    fn an_earlier_version_after_a_killed_one_keeps_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("rt");
        fs::DirBuilder::new().mode(0o711).create(&base).unwrap();
        // The killed server's lock file, free.
        fs::write(base.join("d00000000000.lock"), "").unwrap();
        // The earlier version's server of that id, started a moment ago.
        let dir = server_dir(&base, "d00000000000", Duration::ZERO);
        let _placed = place(
            &tmp.path().join("instances"),
            "d00000000001",
            &RuntimeDir::Path(base.clone()),
        )
        .unwrap();
        assert!(dir.is_dir(), "a running server's directory removed");
    }

    /// A server that shut down leaving instances (a detach) gives up its lock while its
    /// process lives on: the next server of its id places its directory at once, instances
    /// and all.
    #[test]
    fn a_released_directory_is_the_next_servers_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, inst) = (tmp.path().join("rt"), tmp.path().join("instances"));
        let old = place(&inst, "srv", &RuntimeDir::Path(base.clone())).unwrap();
        fs::create_dir(old.dir.join("instance")).unwrap();
        old.release();
        assert!(old.dir.join("instance").is_dir());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(place(&inst, "srv", &RuntimeDir::Path(base)).map(|p| p.dir));
        });
        let new = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("placed without waiting for the old process")
            .unwrap();
        assert_eq!(new, old.dir);
        assert!(new.join("instance").is_dir());
    }

    #[test]
    fn a_lock_removed_by_a_sweep_meanwhile_is_taken_again() {
        let run = tempfile::tempdir().unwrap();
        let path = run.path().join("srv.lock");
        fs::write(&path, "").unwrap();
        let stale = File::open(&path).unwrap();
        fs::remove_file(&path).unwrap();
        assert!(!is_at(&stale, &path));
        let lock = lock_own(&path).unwrap();
        assert!(is_at(&lock, &path));
        // Held: a sweep cannot take it.
        assert!(!sweep_one(run.path(), "srv", Duration::ZERO));
        assert!(path.exists());
    }
}
