//! The one place that reaps child processes.
//!
//! `cattery serve` is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so double-forked and
//! `setsid` grandchildren of agents are re-parented to it when their parent dies. Every child
//! is reaped here with `waitpid(-1, WNOHANG)` on SIGCHLD (and on a slow tick as a safety net),
//! and its status is handed to whoever registered the pid. Spawning holds the same lock, so a
//! status can never be reaped before its pid is registered. Reaping never waits for that
//! lock (a spawn may hold it for a cgroup join's RCU grace period, 10 ms or more): it marks
//! the reap as pending and the spawner runs it when it lets go.
//!
//! A start that cannot hold the lock while its process is born (a spare's claim waits for
//! another process's `exec`, and claims must not queue behind each other) opens an
//! [`Unlocked`] window instead: while one is open, the status of a pid nobody registered is
//! kept, and the start's registration takes it if it is its own (see [`Unlocked::register`]).

use std::collections::{BTreeSet, HashMap};
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
    /// Counts reaps and openings of [`Unlocked`] windows, to order them.
    seq: u64,
    /// The sequence numbers of the open [`Unlocked`] windows.
    open: BTreeSet<u64>,
    /// Statuses of pids nobody had registered, reaped while a window was open: pid to (the
    /// reap's sequence number, status). Pruned as windows close.
    kept: HashMap<i32, (u64, ExitInfo)>,
}

impl Inner {
    /// Drops the kept statuses no open window can claim (reaped before the oldest opened).
    fn prune(&mut self) {
        match self.open.first() {
            None => self.kept.clear(),
            Some(&oldest) => self.kept.retain(|_, (s, _)| *s > oldest),
        }
    }
}

/// A window in which a process is started without the reaper's lock; see
/// [`Reaper::open_unlocked`]. Dropped without [`Unlocked::register`], it closes with no pid.
pub struct Unlocked<'a> {
    reaper: &'a Reaper,
    seq: u64,
}

impl Unlocked<'_> {
    /// Registers the pid started in this window and returns the receiver of its exit status.
    ///
    /// The process may have exited and been reaped before this call. Its status was then
    /// kept: reaped after the window opened, under this pid, and the pid names no process
    /// now (checked under the lock, so no reap can come between). A kept status whose pid
    /// names a process again belongs to an earlier holder of the pid (freed after the window
    /// opened and reused for this start), and is dropped: the live process's own status will
    /// come through the registration. Not told apart: this start's process reaped and its
    /// pid reused by another process before this call (the pid cycles through 32,768 or more
    /// numbers; the window lasts one `exec`); its waiter then never fires.
    pub fn register(self, pid: i32) -> watch::Receiver<Option<ExitInfo>> {
        let mut g = self.reaper.lock();
        // A status kept from before this window opened is not this start's (an older
        // window may still need it): it stays.
        let kept = match g.kept.get(&pid) {
            Some((s, _)) if *s > self.seq => g.kept.remove(&pid),
            _ => None,
        };
        let rx = if pid_exists(pid) {
            let (tx, rx) = watch::channel(None);
            g.waiters.insert(pid, tx);
            rx
        } else {
            let info = match kept {
                Some((_, info)) => info,
                None => {
                    // Not reachable while only the reaper reaps the server's children.
                    tracing::warn!(pid, "a started process was gone with no status on record");
                    ExitInfo::default()
                }
            };
            watch::channel(Some(info)).1
        };
        drop(g);
        // Dropping `self` closes the window.
        rx
    }
}

impl Unlocked<'_> {
    /// Sends `sig` to `pid`, a child of this server started in this window and not
    /// registered yet, unless the reaper has reaped it: under the lock, where no reap runs,
    /// and only if no status of `pid` was kept since the window opened (every reap of an
    /// unregistered pid while the window is open is kept). Rule 3 of [`super::signals`].
    /// Returns whether it was sent.
    pub fn signal_unreaped(&self, pid: i32, sig: nix::sys::signal::Signal) -> bool {
        let g = self.reaper.lock();
        if g.kept.get(&pid).is_some_and(|(s, _)| *s > self.seq) {
            return false;
        }
        let sent = nix::sys::signal::kill(Pid::from_raw(pid), sig).is_ok();
        drop(g);
        sent
    }
}

impl Drop for Unlocked<'_> {
    fn drop(&mut self) {
        let mut g = self.reaper.lock();
        g.open.remove(&self.seq);
        g.prune();
    }
}

/// The reaper's lock held outside a reap ([`Reaper::lock`]): by a spawn or a window's step.
/// A reap asked for meanwhile ([`Reaper::reap_all`] never waits for the lock: it marks the
/// reap as pending) runs once it is let go; otherwise it would wait for the next SIGCHLD or
/// the 500 ms tick.
struct Held<'a> {
    reaper: &'a Reaper,
    guard: Option<std::sync::MutexGuard<'a, Inner>>,
}

impl std::ops::Deref for Held<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if self.reaper.pending.load(Ordering::SeqCst) {
            self.reaper.reap_all();
        }
    }
}

/// Whether `pid` names a process or a zombie.
fn pid_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper. The first call makes this process a child subreaper and starts
    /// the SIGCHLD listener on a thread of its own (with a one-thread runtime), so it lives as
    /// long as the process, whichever runtime called first: a listener spawned on the first
    /// caller's runtime stopped with that runtime, and then no child of the process was reaped
    /// again (a process that runs several runtimes one after another, such as the unit tests
    /// under `cargo test`, where each `#[tokio::test]` has its own).
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
                std::thread::Builder::new()
                    .name("cattery-reaper".into())
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("the reaper's runtime");
                        rt.block_on(async move {
                            let mut sig = tokio::signal::unix::signal(
                                tokio::signal::unix::SignalKind::child(),
                            )
                            .expect("SIGCHLD handler");
                            let mut tick = tokio::time::interval(Duration::from_millis(500));
                            loop {
                                tokio::select! {
                                    _ = sig.recv() => {},
                                    _ = tick.tick() => {},
                                }
                                r2.reap_all();
                            }
                        })
                    })
                    .expect("the reaper's thread");
                r
            })
            .clone()
    }

    /// The lock, for a spawn and for a window's opening, registration and closing: a reap
    /// asked for while it is held runs when it is let go (see [`Held`]).
    fn lock(&self) -> Held<'_> {
        Held {
            reaper: self,
            guard: Some(self.inner.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// Opens a window in which a process is started without holding the reaper's lock
    /// (reaping goes on meanwhile): the caller registers the started pid through the
    /// returned [`Unlocked`], or drops it if nothing was started. Windows are meant to be
    /// short (one process's birth): statuses of unregistered pids are kept while one is open.
    pub fn open_unlocked(&self) -> Unlocked<'_> {
        let mut g = self.lock();
        g.seq += 1;
        let seq = g.seq;
        g.open.insert(seq);
        Unlocked { reaper: self, seq }
    }

    /// Runs `spawn` while no reaping can happen, then registers the returned pid.
    /// Returns the spawn result and a receiver that gets the pid's exit status.
    pub fn spawn_registered<T>(
        &self,
        spawn: impl FnOnce() -> std::io::Result<(T, i32)>,
    ) -> std::io::Result<(T, i32, watch::Receiver<Option<ExitInfo>>)> {
        let mut g = self.lock();
        let spawned = spawn();
        spawned.map(|(t, pid)| {
            let (tx, rx) = watch::channel(None);
            g.waiters.insert(pid, tx);
            (t, pid, rx)
        })
        // Letting go of the lock runs a reap asked for meanwhile (`Held`).
    }

    /// Runs `f` while `pid`, a child of this server registered here, provably is not reaped:
    /// under the lock (no reap runs meanwhile) and only if its status was not delivered yet.
    /// `f` may then signal `pid`, or the process group it leads: the number names it and
    /// nothing else (rule 3 of [`super::signals`]). Returns `None` (and `f` does not run)
    /// once it is reaped.
    ///
    /// Only for pids the reaper alone reaps: not for a fork server's children (registered
    /// here, reaped by the fork server, [`Reaper::deliver_external`]).
    ///
    /// Called on a stop's async worker: a spawn holds the lock through a cgroup join (an RCU
    /// grace period, 10 ms or more) or a fork server's answer, so when the lock is taken the
    /// wait for it runs in `block_in_place` (on a multi-threaded runtime), never on the worker.
    pub fn while_unreaped<R>(&self, pid: i32, f: impl FnOnce() -> R) -> Option<R> {
        let g = match self.inner.try_lock() {
            Ok(guard) => Held {
                reaper: self,
                guard: Some(guard),
            },
            Err(TryLockError::Poisoned(e)) => Held {
                reaper: self,
                guard: Some(e.into_inner()),
            },
            Err(TryLockError::WouldBlock) => {
                let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| {
                    h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                if multi_thread {
                    tokio::task::block_in_place(|| self.lock())
                } else {
                    self.lock()
                }
            }
        };
        let r = g.waiters.contains_key(&pid).then(f);
        drop(g);
        r
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
    } else if !g.open.is_empty() {
        // Maybe a process started in an open window, not registered yet.
        g.seq += 1;
        let seq = g.seq;
        g.kept.insert(pid, (seq, info));
    }
    // Otherwise: a re-parented grandchild; reaping it is all that was needed.
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child of this process that exits with `code`, not registered with the reaper.
    #[allow(clippy::zombie_processes)] // The reaper reaps it.
    fn exited_child(code: i32) -> i32 {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("exit {code}")])
            .spawn()
            .expect("spawn sh");
        child.id() as i32
    }

    async fn reaped(pid: i32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pid_exists(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never reaped"
            );
            Reaper::global().reap_all();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The reaper outlives the runtime that first asked for it: a child registered from a
    /// later runtime is still reaped and its status delivered (no one calls `reap_all` here).
    /// Before, the listener ran on the first caller's runtime and died with it, so under
    /// `cargo test` (one process, a runtime per test) later tests' children stayed zombies
    /// and their tests hung.
    #[test]
    fn children_are_reaped_after_the_first_callers_runtime_is_gone() {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        first.block_on(async {
            Reaper::global();
        });
        drop(first);
        let later = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        later.block_on(async {
            let (_, pid, mut exit) = Reaper::global()
                .spawn_registered(|| {
                    let c = std::process::Command::new("/bin/sh")
                        .args(["-c", "exit 3"])
                        .spawn()?;
                    let pid = c.id() as i32;
                    Ok(((), pid))
                })
                .unwrap();
            let st = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Some(x) = *exit.borrow_and_update() {
                        break x;
                    }
                    exit.changed().await.unwrap();
                }
            })
            .await
            .unwrap_or_else(|_| panic!("pid {pid} never reaped"));
            assert_eq!(st.code, Some(3));
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_reaped_before_its_registration_in_a_window_keeps_its_status() {
        let r = Reaper::global();
        let window = r.open_unlocked();
        let pid = exited_child(7);
        reaped(pid).await;
        let rx = window.register(pid);
        assert_eq!(
            *rx.borrow(),
            Some(ExitInfo {
                code: Some(7),
                signal: None
            })
        );
        // With no window open, nothing is kept.
        let other = exited_child(3);
        reaped(other).await;
        assert!(!r.lock().kept.contains_key(&other));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::zombie_processes)] // The reaper reaps it.
    async fn a_kept_status_of_a_pid_that_names_a_live_process_again_is_not_taken() {
        let r = Reaper::global();
        // A live child stands for a process that reused the pid of one reaped in the window.
        let mut live = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = live.id() as i32;
        let window = r.open_unlocked();
        {
            let mut g = r.lock();
            g.seq += 1;
            let seq = g.seq;
            g.kept.insert(
                pid,
                (
                    seq,
                    ExitInfo {
                        code: Some(9),
                        signal: None,
                    },
                ),
            );
        }
        let rx = window.register(pid);
        assert_eq!(*rx.borrow(), None, "the earlier holder's status was taken");
        live.kill().expect("kill sleep");
        reaped(pid).await;
        assert_eq!(rx.borrow().and_then(|e| e.signal), Some(libc::SIGKILL));
    }

    /// A reap asked for while a window's opening, registration or closing holds the lock
    /// (here a fork server's report) runs when the lock is let go, as after a spawn: not at
    /// the next SIGCHLD or tick.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reap_asked_for_while_a_window_holds_the_lock_runs_when_it_is_let_go() {
        let r = Reaper::global();
        // Above any pid_max: registered, never a real process.
        let pid = 0x3fff_0000;
        let (_, _, rx) = r.spawn_registered(|| Ok(((), pid))).expect("register");
        let info = ExitInfo {
            code: Some(4),
            signal: None,
        };
        let held = r.lock();
        // Returns at once: its reap is left to the lock's holder.
        std::thread::scope(|s| {
            s.spawn(|| r.deliver_external(pid, info));
        });
        drop(held);
        assert_eq!(
            *rx.borrow(),
            Some(info),
            "the status waits for another reap"
        );
    }

    #[test]
    fn kept_statuses_go_once_no_window_can_claim_them() {
        let r = Reaper {
            inner: Mutex::new(Inner::default()),
            pending: AtomicBool::new(false),
            external: Mutex::new(Vec::new()),
        };
        let info = ExitInfo::default();
        let first = r.open_unlocked();
        deliver(&mut r.lock(), 100, info);
        let second = r.open_unlocked();
        deliver(&mut r.lock(), 101, info);
        drop(first);
        // 100 was reaped before the second window opened: only the first could claim it.
        let kept: Vec<i32> = r.lock().kept.keys().copied().collect();
        assert_eq!(kept, vec![101]);
        drop(second);
        assert!(r.lock().kept.is_empty());
    }

    /// While `while_unreaped` runs its closure no reap can deliver the pid's status (a reap
    /// asked for meanwhile waits for the lock's release); once delivered, the closure no
    /// longer runs: a signal sent from it goes to a pid not reaped yet.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_reaped_while_a_pid_is_known_unreaped() {
        let r = Reaper::global();
        // Above any pid_max: registered, never a real process.
        let pid = 0x3fff_0001;
        let (_, _, rx) = r.spawn_registered(|| Ok(((), pid))).expect("register");
        let info = ExitInfo {
            code: Some(5),
            signal: None,
        };
        let ran = r.while_unreaped(pid, || {
            std::thread::scope(|s| {
                s.spawn(|| r.deliver_external(pid, info));
            });
            // Asked for, not delivered: the lock is held.
            rx.borrow().is_none()
        });
        assert_eq!(ran, Some(true));
        assert_eq!(
            *rx.borrow(),
            Some(info),
            "delivered when the lock was let go"
        );
        assert_eq!(r.while_unreaped(pid, || ()), None, "ran after the reap");
        // A pid never registered is never taken for unreaped.
        assert_eq!(r.while_unreaped(0x3fff_0002, || ()), None);
    }

    /// A stop that finds the lock held by a spawn (through a cgroup join or a fork server's
    /// answer) waits for it off its async worker: the worker's other tasks run meanwhile.
    /// One worker, so a wait on it would hold up every other task until the lock is let go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_wait_for_the_lock_does_not_hold_up_the_async_worker() {
        let r = Reaper::global();
        let held = Arc::new(AtomicBool::new(true));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let (held, r) = (held.clone(), r.clone());
            std::thread::spawn(move || {
                let g = r.lock();
                let _ = locked_tx.send(());
                // Let go when told, or after 5 s if nothing tells it to.
                let _ = release_rx.recv_timeout(Duration::from_secs(5));
                held.store(false, Ordering::SeqCst);
                drop(g);
            })
        };
        locked_rx.recv().expect("the holder took the lock");
        let waiter = tokio::spawn(async move { r.while_unreaped(0x3fff_0003, || ()) });
        let other = {
            let held = held.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let ran_while_held = held.load(Ordering::SeqCst);
                let _ = release_tx.send(());
                ran_while_held
            })
        };
        assert!(
            other.await.expect("other task"),
            "the worker waited for the reaper's lock"
        );
        assert_eq!(waiter.await.expect("waiter"), None);
        holder.join().expect("holder");
    }

    /// A window's signal to the pid it started goes nowhere once the reaper reaped that pid
    /// (its status kept for the window), and reaches it while it is not reaped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::zombie_processes)] // The reaper reaps it.
    async fn a_windows_signal_goes_only_to_its_unreaped_process() {
        let r = Reaper::global();
        let window = r.open_unlocked();
        let gone = exited_child(0);
        reaped(gone).await;
        assert!(r.lock().kept.contains_key(&gone));
        assert!(!window.signal_unreaped(gone, nix::sys::signal::Signal::SIGKILL));
        let live = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = live.id() as i32;
        assert!(window.signal_unreaped(pid, nix::sys::signal::Signal::SIGKILL));
        reaped(pid).await;
        let rx = window.register(pid);
        assert_eq!(rx.borrow().and_then(|e| e.signal), Some(libc::SIGKILL));
    }
}
