//! Which websocket sessions a live server process still relays.
//!
//! A websocket session's client is connected to the server process that accepted it, and only
//! that process can relay its frames (`api/ws.rs`). So when a server starts on a data dir and
//! finds a delivered websocket session, it must know whether the process that relayed it is
//! still alive: a server detached for an upgrade (`--on-stop detach`, docs/upgrade.md) goes on
//! relaying its calls, and the new server re-adopts their instances; a server that died (a
//! SIGKILL, a crash) took the relay with it, and the session is over (docs/lifecycle.md,
//! "Restart and re-adoption").
//!
//! The mark: while a process supervises a relayed session (from its delivery until its end is
//! recorded), it holds an exclusive `flock` on `<data dir>/relays/<session id>.lock`. The
//! kernel drops the lock with the process, whatever kills it; pids are never compared.

use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::fcntl::{Flock, FlockArg};
use uuid::Uuid;

/// Marks held by this process (a detached server exits once none is left).
static HELD: AtomicUsize = AtomicUsize::new(0);

/// How many relayed sessions this process still supervises.
pub fn held() -> usize {
    HELD.load(Ordering::SeqCst)
}

/// The relay marks of one data dir (`None`: no marks; every relay is taken as gone after a
/// restart).
#[derive(Debug, Default)]
pub struct RelayMarks {
    dir: Option<PathBuf>,
    /// Whether the directory was there before this process: a server of a version that made
    /// no marks leaves none (and may still relay its calls, detached for an upgrade), so a
    /// mark's absence means nothing until a server of this version has run on the data dir.
    trusted: bool,
}

/// One held mark; released (and its file removed) when dropped.
pub struct RelayMark {
    path: PathBuf,
    lock: Option<Flock<File>>,
}

impl Drop for RelayMark {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(lock) = self.lock.take() {
            // Explicitly: a process forked meanwhile shares the open file, and would keep it.
            let _ = lock.unlock();
        }
        HELD.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RelayMarks {
    /// Marks kept in `dir`, which is created now when missing (the next process on the data
    /// dir then knows that marks are made here).
    pub fn new(dir: Option<PathBuf>) -> RelayMarks {
        let trusted = dir.as_ref().is_some_and(|d| d.is_dir());
        if let Some(d) = dir.as_ref().filter(|_| !trusted) {
            if let Err(e) = fs::create_dir_all(d) {
                tracing::warn!(path = %d.display(), error = %e, "cannot make the relay marks' directory");
            }
        }
        RelayMarks { dir, trusted }
    }

    /// Removes the marks no live process holds (their holder died; a mark whose session's
    /// record recovery did not visit, e.g. one a takeover ended, would stay for good).
    pub fn sweep(&self) {
        let Some(entries) = self.dir.as_ref().and_then(|d| fs::read_dir(d).ok()) else {
            return;
        };
        for e in entries.flatten() {
            held_else_removed(&e.path());
        }
    }

    fn path(&self, session: Uuid) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join(format!("{session}.lock")))
    }

    /// Marks `session` as relayed by this process until the mark is dropped. `None` without a
    /// directory, or when the mark cannot be made (logged: a restart would then take the
    /// session's relay for gone).
    pub fn hold(&self, session: Uuid) -> Option<RelayMark> {
        let path = self.path(session)?;
        let made = path
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| {
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
            })
            .and_then(|f| {
                Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e.into())
            });
        match made {
            Ok(lock) => {
                HELD.fetch_add(1, Ordering::SeqCst);
                Some(RelayMark {
                    path,
                    lock: Some(lock),
                })
            }
            Err(e) => {
                tracing::warn!(session = %session, path = %path.display(), error = %e,
                    "could not mark a websocket session as relayed here");
                None
            }
        }
    }

    /// Whether another live process holds `session`'s mark (it relays the session). A mark
    /// left by a process that died is removed. Before any server of this version ran on the
    /// data dir (no marks' directory then), any session may still be relayed: `true`.
    pub fn relayed_elsewhere(&self, session: Uuid) -> bool {
        let Some(path) = self.path(session) else {
            return false;
        };
        !self.trusted || held_else_removed(&path)
    }
}

/// Whether a live process holds the mark at `path`; a mark nobody holds (its holder died) is
/// removed. No file: not held.
fn held_else_removed(path: &std::path::Path) -> bool {
    let Ok(f) = fs::OpenOptions::new().write(true).open(path) else {
        return false;
    };
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let _ = fs::remove_file(path);
            drop(lock);
            false
        }
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mark is seen from another open of its file (as another process sees it) while held,
    /// and not once dropped; without a directory nothing is marked.
    #[test]
    fn a_mark_is_seen_while_held() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("relays")).unwrap();
        let marks = RelayMarks::new(Some(dir.path().join("relays")));
        let s = Uuid::new_v4();
        assert!(!marks.relayed_elsewhere(s));
        let before = held();
        let m = marks.hold(s).expect("mark");
        assert!(held() > before);
        assert!(marks.relayed_elsewhere(s));
        assert!(!marks.relayed_elsewhere(Uuid::new_v4()));
        drop(m);
        assert!(!marks.relayed_elsewhere(s));
        assert!(!dir.path().join("relays").join(format!("{s}.lock")).exists());
        // A file whose holder died (no lock on it) is no relay, and is removed.
        let stale = dir.path().join("relays").join(format!("{s}.lock"));
        fs::write(&stale, b"").unwrap();
        assert!(!marks.relayed_elsewhere(s));
        assert!(!stale.exists());
        let none = RelayMarks::new(None);
        assert!(none.hold(s).is_none());
        assert!(!none.relayed_elsewhere(s));
    }

    /// On a data dir where no server of this version ran (no marks' directory: a server of an
    /// earlier version, detached for the upgrade, may still relay its calls without marks),
    /// every session counts as relayed elsewhere; the directory is made, so the next process
    /// on the data dir trusts the marks.
    #[test]
    fn marks_count_only_once_a_server_that_makes_them_has_run() {
        let dir = tempfile::tempdir().unwrap();
        let first = RelayMarks::new(Some(dir.path().join("relays")));
        assert!(first.relayed_elsewhere(Uuid::new_v4()));
        let next = RelayMarks::new(Some(dir.path().join("relays")));
        assert!(!next.relayed_elsewhere(Uuid::new_v4()));
    }

    /// The sweep removes the marks nobody holds and keeps the held ones.
    #[test]
    fn the_sweep_keeps_only_held_marks() {
        let dir = tempfile::tempdir().unwrap();
        let marks = RelayMarks::new(Some(dir.path().join("relays")));
        let held = marks.hold(Uuid::new_v4()).expect("mark");
        let stale = dir
            .path()
            .join("relays")
            .join(format!("{}.lock", Uuid::new_v4()));
        fs::write(&stale, b"").unwrap();
        marks.sweep();
        assert!(!stale.exists());
        assert!(held.path.exists());
    }
}
