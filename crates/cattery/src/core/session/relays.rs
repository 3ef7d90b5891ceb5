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
    /// Marks kept in `dir` (created when the first is taken).
    pub fn new(dir: Option<PathBuf>) -> RelayMarks {
        RelayMarks { dir }
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
    /// left by a process that died is removed.
    pub fn relayed_elsewhere(&self, session: Uuid) -> bool {
        let Some(path) = self.path(session) else {
            return false;
        };
        let Ok(f) = fs::OpenOptions::new().write(true).open(&path) else {
            return false;
        };
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                let _ = fs::remove_file(&path);
                drop(lock);
                false
            }
            Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
        }
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
}
