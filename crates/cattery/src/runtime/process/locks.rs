//! Machine-wide lock files: port reservations, servers' liveness, instance uids.
//!
//! They must be shared by every server on the machine (each has its own data dir), and no
//! other user may create or replace them. So they live under `/run/cattery` (mode 0700, owned
//! by root) when the server runs as root; otherwise under `$XDG_RUNTIME_DIR/cattery`, or
//! `<temp dir>/cattery-<uid>` (mode 0700, refused unless owned by this user), which servers of
//! the same user share. Never in a world-writable directory where another user could plant
//! the files first.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::fcntl::{Flock, FlockArg};

/// The root of the lock directories (see the module docs); `None` when no safe one could be
/// made (reservations across servers are then off, and the start log says so).
pub fn lock_root() -> Option<&'static Path> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let candidates: Vec<PathBuf> = if nix::unistd::geteuid().is_root() {
            vec![PathBuf::from("/run/cattery")]
        } else {
            let uid = nix::unistd::geteuid().as_raw();
            std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|d| !d.is_empty())
                .map(|d| PathBuf::from(d).join("cattery"))
                .into_iter()
                .chain(std::iter::once(
                    std::env::temp_dir().join(format!("cattery-{uid}")),
                ))
                .collect()
        };
        for dir in candidates {
            match private_dir(&dir) {
                Ok(()) => return Some(dir),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "unusable lock directory")
                }
            }
        }
        None
    })
    .as_deref()
}

/// Creates `dir` (mode 0700) if missing and checks it is a real directory owned by this user
/// and closed to others (a looser mode of our own directory is tightened).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
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
    if m.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// `<lock root>/<name>` (created, mode 0700), or `None` without a lock root.
pub fn lock_dir(name: &str) -> Option<PathBuf> {
    let dir = lock_root()?.join(name);
    private_dir(&dir).ok()?;
    Some(dir)
}

/// Opens (creating) the lock file `path` and takes an exclusive `flock` on it, held until the
/// returned value is dropped (the kernel drops it if the process dies). `wait`: block until it
/// is free; otherwise `None` when another process holds it. Used for the machine-wide port
/// reservations, the servers' liveness locks and the instance uids.
pub fn lock_file(path: &Path, wait: bool) -> Option<Flock<File>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    let how = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    Flock::lock(f, how).ok()
}
