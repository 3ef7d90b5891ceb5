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

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The least free space a `tmpfs` must have to hold instance directories (their output files
/// grow with what agents print until the tailer has read it).
pub const MIN_FREE: u64 = 256 << 20;

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

/// Makes `instances_dir` (`<data dir>/instances`) usable, as a link into the chosen runtime
/// dir or as a real directory (see the module docs). Returns where instance directories
/// really are. Errors: `instances_dir` could not be made at all.
pub fn place(
    instances_dir: &Path,
    server_id: &str,
    choice: &RuntimeDir,
) -> std::io::Result<PathBuf> {
    let real_dir = |why: &str| -> std::io::Result<PathBuf> {
        if fs::symlink_metadata(instances_dir).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(instances_dir)?;
        }
        fs::create_dir_all(instances_dir)?;
        tracing::info!(dir = %instances_dir.display(), reason = why, "instance directories on the data dir");
        Ok(instances_dir.to_path_buf())
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
    if let Err(e) = owned_dir(&base).and_then(|()| owned_dir(&target)) {
        tracing::warn!(dir = %target.display(), error = %e, "unusable runtime directory");
        return real_dir("the runtime directory is unusable");
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
    Ok(target)
}

/// Removes the runtime directory of this server if it is empty (a clean shutdown); the link in
/// the data dir stays and the directory is made again at the next start.
pub fn remove_if_empty(instances_dir: &Path) {
    if fs::symlink_metadata(instances_dir).is_ok_and(|m| m.file_type().is_symlink()) {
        if let Ok(target) = fs::read_link(instances_dir) {
            let _ = fs::remove_dir(target);
        }
    }
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
        let data = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let base = run.path().join("rt");
        let inst = data.path().join("instances");
        // A fresh data dir: a link to <base>/<server id>.
        let got = place(&inst, "srv", &RuntimeDir::Path(base.clone())).unwrap();
        assert_eq!(got, base.join("srv"));
        assert_eq!(fs::read_link(&inst).unwrap(), base.join("srv"));
        let m = fs::metadata(&got).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o711);
        // Again: unchanged; after the target vanished (a reboot): made again.
        assert_eq!(
            place(&inst, "srv", &RuntimeDir::Path(base.clone())).unwrap(),
            got
        );
        remove_if_empty(&inst);
        assert!(!got.exists());
        assert_eq!(
            place(&inst, "srv", &RuntimeDir::Path(base.clone())).unwrap(),
            got
        );
        // `data`: a real directory again.
        assert_eq!(place(&inst, "srv", &RuntimeDir::Data).unwrap(), inst);
        assert!(fs::symlink_metadata(&inst).unwrap().is_dir());
        // A real directory with an instance in it is kept.
        fs::create_dir(inst.join("x")).unwrap();
        assert_eq!(
            place(&inst, "srv", &RuntimeDir::Path(base.clone())).unwrap(),
            inst
        );
        fs::remove_dir(inst.join("x")).unwrap();
        assert_eq!(place(&inst, "srv", &RuntimeDir::Path(base)).unwrap(), got);
    }
}
