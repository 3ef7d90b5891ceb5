//! The one place that reaps child processes.
//!
//! `cattery serve` is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so double-forked and
//! `setsid` grandchildren of agents are re-parented to it when their parent dies. Every child
//! is reaped here with `waitpid(-1, WNOHANG)` on SIGCHLD (and on a slow tick as a safety net),
//! and its status is handed to whoever registered the pid. Spawning holds the same lock, so a
//! status can never be reaped before its pid is registered. Reaping never waits for that
//! lock (a spawn may hold it for a cgroup join's RCU grace period, 10 ms or more): it marks
//! the reap as pending and the spawner runs it when it lets go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::runtime::ExitInfo;

/// Registry of child pids and their exit statuses.
pub struct Reaper {
    inner: Mutex<Inner>,
    /// A reap was asked for while the lock was held; whoever holds it reaps on release.
    pending: AtomicBool,
    /// Exit statuses reaped by another process (a fork server reaps its children), delivered
    /// with the next reap.
    external: Mutex<Vec<(i32, ExitInfo)>>,
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, watch::Sender<Option<ExitInfo>>>,
}

static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper. The first call makes this process a child subreaper and starts
    /// the SIGCHLD listener (it must run inside a tokio runtime).
    pub fn global() -> Arc<Reaper> {
        REAPER
            .get_or_init(|| {
                if nix::sys::prctl::set_child_subreaper(true).is_err() {
                    tracing::warn!(
                        "PR_SET_CHILD_SUBREAPER failed; orphaned grandchildren go to init"
                    );
                }
                let r = Arc::new(Reaper {
                    inner: Mutex::new(Inner::default()),
                    pending: AtomicBool::new(false),
                    external: Mutex::new(Vec::new()),
                });
                let r2 = r.clone();
                tokio::spawn(async move {
                    let mut sig =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
                            .expect("SIGCHLD handler");
                    let mut tick = tokio::time::interval(Duration::from_millis(500));
                    loop {
                        tokio::select! {
                            _ = sig.recv() => {},
                            _ = tick.tick() => {},
                        }
                        r2.reap_all();
                    }
                });
                r
            })
            .clone()
    }

    /// Runs `spawn` while no reaping can happen, then registers the returned pid.
    /// Returns the spawn result and a receiver that gets the pid's exit status.
    pub fn spawn_registered<T>(
        &self,
        spawn: impl FnOnce() -> std::io::Result<(T, i32)>,
    ) -> std::io::Result<(T, i32, watch::Receiver<Option<ExitInfo>>)> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let spawned = spawn();
        let out = spawned.map(|(t, pid)| {
            let (tx, rx) = watch::channel(None);
            g.waiters.insert(pid, tx);
            (t, pid, rx)
        });
        drop(g);
        if self.pending.load(Ordering::SeqCst) {
            self.reap_all();
        }
        out
    }

    /// Runs a short helper program (not an instance) to completion and returns its exit and
    /// its stderr; stdout is discarded. The program is spawned and registered under the
    /// reaper's lock and its status collected here: a plain `Command::output()` in this
    /// process races the reaper's `waitpid(-1)` and fails with `ECHILD`. Blocks the calling
    /// thread (at most `timeout` after the program closed its stderr).
    pub fn output(
        &self,
        cmd: &mut std::process::Command,
        timeout: Duration,
    ) -> std::io::Result<(ExitInfo, Vec<u8>)> {
        use std::io::Read;
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let (mut child, _pid, rx) = self.spawn_registered(|| {
            let c = cmd.spawn()?;
            let pid = c.id() as i32;
            Ok((c, pid))
        })?;
        let mut err = Vec::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_end(&mut err);
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.reap_all();
            if let Some(x) = *rx.borrow() {
                return Ok((x, err));
            }
            if std::time::Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the program did not exit",
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Delivers the exit status of a registered pid that another process reaped (a fork
    /// server's child). Never waits for a spawn in progress (see [`Reaper::reap_all`]).
    pub fn deliver_external(&self, pid: i32, info: ExitInfo) {
        self.external
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pid, info));
        self.reap_all();
    }

    /// Reaps every exited child now, or, when a spawn holds the lock, right after that spawn
    /// (never blocks on it).
    pub fn reap_all(&self) {
        loop {
            self.pending.store(true, Ordering::SeqCst);
            let mut g = match self.inner.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                // The holder sees `pending` once it lets go, and reaps.
                Err(TryLockError::WouldBlock) => return,
            };
            self.pending.store(false, Ordering::SeqCst);
            reap_locked(&mut g);
            let external =
                std::mem::take(&mut *self.external.lock().unwrap_or_else(|e| e.into_inner()));
            for (pid, info) in external {
                deliver(&mut g, pid, info);
            }
            drop(g);
            if !self.pending.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

/// `waitpid(-1, WNOHANG)` until no exited child is left, delivering each status.
fn reap_locked(g: &mut Inner) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => deliver(
                g,
                pid.as_raw(),
                ExitInfo {
                    code: Some(code),
                    signal: None,
                },
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) => deliver(
                g,
                pid.as_raw(),
                ExitInfo {
                    code: None,
                    signal: Some(sig as i32),
                },
            ),
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}

fn deliver(g: &mut Inner, pid: i32, info: ExitInfo) {
    if let Some(tx) = g.waiters.remove(&pid) {
        let _ = tx.send(Some(info));
    }
    // Otherwise: a re-parented grandchild; reaping it is all that was needed.
}
