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
    if wait {
        lock_waiting(f, path, WARN_AFTER).ok()
    } else {
        Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
    }
}

/// How long [`lock_waiting`] waits before it says so in the log.
pub const WARN_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes an exclusive `flock` on `f` (the file at `path`), waiting as long as another process
/// holds it. A wait longer than `warn_after` is logged once (a WARN naming the file): the
/// usual holders let go within moments (a server that was just killed, while the processes
/// that shared its descriptors die with it; a sweep), so a longer wait is most likely a second
/// server of the same id, such as one on a copy of the data dir, which waits until the first
/// one stops.
pub fn lock_waiting(
    f: File,
    path: &Path,
    warn_after: std::time::Duration,
) -> std::io::Result<Flock<File>> {
    let t0 = std::time::Instant::now();
    let mut f = f;
    let mut warned = false;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => {
                if warned {
                    tracing::info!(lock = %path.display(), "took the lock it waited for");
                }
                return Ok(l);
            }
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => f = back,
            Err((_, e)) => return Err(e.into()),
        }
        if !warned && t0.elapsed() >= warn_after {
            warned = true;
            tracing::warn!(
                lock = %path.display(),
                waited_ms = t0.elapsed().as_millis() as u64,
                "waiting for a lock another process holds: most likely another running server with this server id (a copy of this data dir, with its server-id file?); this server goes on once that one stops"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A lock held by another holder: the waiter says so in the log once it has waited long,
    /// and takes the lock as soon as the holder lets go.
    #[test]
    fn a_long_wait_for_a_lock_is_logged_and_ends_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = lock_file(&path, false).expect("free");
        let buf = Buf::default();
        let sink = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            drop(held);
        });
        let t0 = std::time::Instant::now();
        let got = tracing::subscriber::with_default(sub, || {
            let f = File::open(&path).unwrap();
            lock_waiting(f, &path, Duration::from_millis(100))
        });
        releaser.join().unwrap();
        assert!(got.is_ok());
        drop(got);
        assert!(t0.elapsed() >= Duration::from_millis(350));
        let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            log.matches("waiting for a lock another process holds")
                .count(),
            1,
            "{log}"
        );
        assert!(
            log.contains("x.lock") && log.contains("took the lock"),
            "{log}"
        );
        // Free: no word in the log.
        let quiet = Buf::default();
        let sink = quiet.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let f = File::open(&path).unwrap();
            lock_waiting(f, &path, Duration::ZERO).unwrap();
        });
        assert!(quiet.0.lock().unwrap().is_empty());
    }
}
