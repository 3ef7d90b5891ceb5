//! Spare cgroup slots: the cgroup migration taken off the start path.
//!
//! Joining a cgroup (writing a pid to `cgroup.procs`) takes the kernel's
//! `cgroup_threadgroup_rwsem` for writing, and the first writer after an idle moment waits
//! for an RCU grace period (10-13 ms on a VM here; `docs/performance.md`). A cold start after
//! a pause paid it on its own path. Creating a process straight inside a cgroup
//! (`clone3` with `CLONE_INTO_CGROUP`) takes only the read side and never waits, but only
//! for the cgroup v2 hierarchy: the cgroup v1 controllers that hold the agent's limits
//! (`memory`, `cpu`, `pids`) still need a migration.
//!
//! So where v1 controllers are in use, the runtime keeps a small stock of spares made in the
//! background. A spare is a set of fresh v1 cgroups (`<v1 base>/spare-<uuid>`) with a parked
//! process already inside them, which paid the migration's wait when it was made. A start
//! takes a spare:
//!
//! 1. writes the agent's limits into the spare's v1 cgroups (no migration);
//! 2. creates the instance's v2 cgroup (`<v2 base>/<instance id>`, as always) and hands the
//!    parked process the instance's prepared spawn ([`super::spawn::ChildArgs`]) and that
//!    directory;
//! 3. the parked process `clone3`s the instance's main process with
//!    `CLONE_VM | CLONE_VFORK | CLONE_PARENT | CLONE_INTO_CGROUP`: a new process, born in the
//!    instance's v2 cgroup, in the spare's v1 cgroups (inherited), a child of the server. It
//!    does what a spawned child does (own session, stdio, private mount namespace, uid,
//!    directory) and `exec`s; the
//!    parked process then exits;
//! 4. the spare's v1 directories are renamed to the instance id (cgroup v1 allows `rename(2)`
//!    within a parent; v2 does not, which is why the v2 cgroup is made at start), so
//!    re-adoption after a restart and the sweep of leftovers find them by id as before.
//!
//! The instance is one fresh process tree in its own cgroups, as with [`super::spawn`]; the
//! parked process never runs anything of the agent.
//!
//! The parked process is a `clone(CLONE_VM | CLONE_FILES)` child of the server: it shares the
//! server's memory (no copy, no copy-on-write faults) and its descriptor table (so it holds no
//! copies of the server's sockets while it waits, and sees the instance's log files by
//! number), and blocks reading a pipe. It also shares the thread-local storage of the thread
//! that made it, so it and the process it clones make only raw system calls ([`sys`]), which
//! never write `errno`. It dies with the server (`PR_SET_PDEATHSIG`, from the stock's own
//! thread, which lives as long as the stock). Spares of a server that crashed are therefore
//! empty, and the startup sweep removes their directories.
//!
//! When no spare is ready (or on other architectures than x86-64, or without cgroup v1
//! controllers), a start takes the old path ([`super::spawn`]) and joins its cgroups itself.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::spawn::ChildArgs;

/// How many spares the stock keeps ready.
pub const STOCK: usize = 2;

/// Stack of the parked process and of the process it clones (they only make system calls).
const STACK: usize = 64 * 1024;

/// Prefix of a spare's cgroup directories.
pub const SPARE_PREFIX: &str = "spare-";

/// What the stock should do, given how many spares it holds and how the last attempts went
/// (pure, for tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Make one more spare.
    Make,
    /// Wait for a spare to be taken (or for the stock to stop).
    Wait,
    /// Wait this long before trying again (after failures).
    Backoff(Duration),
    /// Stop for good (spares cannot work here).
    GiveUp,
}

/// The stock's decision: make spares up to `target`, back off after failures (0.5 s, doubling,
/// at most 60 s) and give up after `MAX_FAILURES` failures in a row.
pub fn next(held: usize, target: usize, failures: u32, unsupported: bool) -> Next {
    const MAX_FAILURES: u32 = 8;
    if unsupported || failures >= MAX_FAILURES {
        return Next::GiveUp;
    }
    if held >= target {
        return Next::Wait;
    }
    if failures > 0 {
        let ms = 500u64
            .saturating_mul(1 << (failures - 1).min(7))
            .min(60_000);
        return Next::Backoff(Duration::from_millis(ms));
    }
    Next::Make
}

/// Whether spares can be used on this machine: cgroup v2 (to be born into) and cgroup v1
/// controllers (the migration they avoid), on x86-64.
pub fn useful(has_v2: bool, v1_controllers: usize) -> bool {
    cfg!(target_arch = "x86_64") && has_v2 && v1_controllers > 0
}

/// Memory shared with a parked process (read by it, so never moved or freed while it lives).
#[repr(C)]
struct Shared {
    /// Read end of the control pipe: one byte means "go", end of file means "exit".
    ctl_r: i32,
    /// The server's pid (the parked process exits if its parent is another one).
    server_pid: i32,
    /// Highest signal number.
    sig_max: i32,
    /// The prepared spawn of the instance.
    args: AtomicPtr<ChildArgs>,
    /// Directory descriptor of the instance's v2 cgroup.
    cgroup_fd: AtomicI32,
    /// Set by the parked process before it exits: the new process's pid, or `-errno` of
    /// `clone3`. 0: it did not get that far.
    result: AtomicI32,
    /// Top of the stack of the process the parked one clones.
    child_stack: AtomicPtr<u8>,
}

/// One spare: its v1 cgroups and its parked process.
pub struct Spare {
    /// `(controller, directory)` of each v1 cgroup.
    pub v1: Vec<(&'static str, PathBuf)>,
    pid: i32,
    pidfd: OwnedFd,
    ctl_w: Option<OwnedFd>,
    _ctl_r: OwnedFd,
    shared: std::mem::ManuallyDrop<Box<Shared>>,
    stacks: Option<(Vec<u8>, Vec<u8>)>,
}

/// Why a spare could not start an instance.
#[derive(Debug)]
pub enum ClaimError {
    /// The spare is unusable (its process is gone, or this kernel lacks `clone3` into a
    /// cgroup: `unsupported`); the caller takes the old path. Its cgroups are still there.
    Unusable { unsupported: bool },
    /// The program could not be started (the same errors as [`super::spawn::spawn`]).
    Spawn(io::Error),
}

impl Spare {
    /// The parked process's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the parked process is still there.
    fn alive(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor we own, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 0
    }

    /// Starts the instance prepared in `args` inside the v2 cgroup open at `cgroup_dir`:
    /// [`Spare::claim_begin`], then [`Spare::claim_end`]. Blocking.
    #[cfg(test)]
    pub(super) fn claim(
        &mut self,
        args: &ChildArgs,
        cgroup_dir: &OwnedFd,
    ) -> Result<i32, ClaimError> {
        self.claim_begin(args, cgroup_dir)?;
        self.claim_end()
    }

    /// Tells the parked process to start the instance prepared in `args` inside the v2
    /// cgroup open at `cgroup_dir`. On success the parked process clones the instance's
    /// main process, which reads `args`, the descriptors it names and `cgroup_dir` until it
    /// has `exec`'d or failed: the caller keeps them alive and in place (not moved) until
    /// [`Spare::claim_end`] has returned. Its parked process exits then: its pidfd
    /// ([`Spare::pidfd`]) becomes readable. An error leaves the spare unused.
    pub(super) fn claim_begin(
        &mut self,
        args: &ChildArgs,
        cgroup_dir: &OwnedFd,
    ) -> Result<(), ClaimError> {
        if !self.alive() {
            return Err(ClaimError::Unusable { unsupported: false });
        }
        let Some(w) = &self.ctl_w else {
            return Err(ClaimError::Unusable { unsupported: false });
        };
        self.shared
            .args
            .store((args as *const ChildArgs).cast_mut(), Ordering::SeqCst);
        self.shared
            .cgroup_fd
            .store(cgroup_dir.as_raw_fd(), Ordering::SeqCst);
        // SAFETY: one byte to our own pipe.
        let n = unsafe { libc::write(w.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(ClaimError::Unusable { unsupported: false });
        }
        Ok(())
    }

    /// Waits for the parked process told to go by [`Spare::claim_begin`] to exit (it does
    /// once the new process has `exec`'d or failed: `CLONE_VFORK`; blocking until then) and
    /// returns the pid of the instance's main process, a child of the server. The spare is
    /// used up either way.
    pub(super) fn claim_end(&mut self) -> Result<i32, ClaimError> {
        self.wait_gone();
        let r = self.shared.result.load(Ordering::SeqCst);
        if r == 0 {
            return Err(ClaimError::Unusable { unsupported: false });
        }
        if r < 0 {
            let unsupported = [libc::ENOSYS, libc::E2BIG, libc::EINVAL].contains(&-r);
            if unsupported {
                return Err(ClaimError::Unusable { unsupported });
            }
            return Err(ClaimError::Spawn(io::Error::from_raw_os_error(-r)));
        }
        Ok(r)
    }

    /// The parked process's pidfd: readable once it has exited.
    pub(super) fn pidfd(&self) -> std::os::fd::RawFd {
        self.pidfd.as_raw_fd()
    }

    /// Reaps the parked process (it is exiting or killed); returns once it is gone.
    fn wait_gone(&mut self) {
        loop {
            // SAFETY: waitid on a pidfd we own, into a local struct.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PIDFD,
                    self.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::__WALL,
                )
            };
            if rc == 0 {
                return;
            }
            let e = io::Error::last_os_error().raw_os_error();
            if e == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: reaped by the reaper already. Anything else: make sure it is dead
            // and wait for its exit through the pidfd.
            if e != Some(libc::ECHILD) {
                self.kill();
                let mut p = libc::pollfd {
                    fd: self.pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one descriptor we own.
                unsafe { libc::poll(&mut p, 1, 5_000) };
            }
            return;
        }
    }

    fn kill(&self) {
        let _ = super::signals::pidfd_send(&self.pidfd, nix::sys::signal::Signal::SIGKILL);
    }

    /// Kills the parked process (if still there) and removes the spare's cgroups.
    pub fn discard(mut self) {
        self.kill();
        self.wait_gone();
        for (_, d) in &self.v1 {
            super::cgroup::remove(d);
        }
    }

    /// Renames the spare's cgroups to `name` (after a claim), returning their new paths;
    /// a cgroup that cannot be renamed keeps its path (with a warning).
    pub fn rename(&self, name: &str) -> Vec<PathBuf> {
        self.v1
            .iter()
            .map(|(_, d)| {
                let to = d.with_file_name(name);
                match fs::rename(d, &to) {
                    Ok(()) => to,
                    Err(e) => {
                        tracing::warn!(cgroup = %d.display(), error = %e, "could not rename a spare cgroup");
                        d.clone()
                    }
                }
            })
            .collect()
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        // Closing the control pipe tells a parked process to exit; its memory must outlive
        // it, so wait (or, if that cannot be known, never free it).
        self.ctl_w.take();
        if self.alive() {
            self.kill();
            self.wait_gone();
        }
        if self.alive() {
            std::mem::forget(self.stacks.take());
        } else {
            // SAFETY: dropped once, here; the parked process that read it is gone.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.shared) };
        }
    }
}

/// Makes one spare: fresh v1 cgroups under each base, a parked process, moved into them
/// (this is where the migration's wait is paid). Blocking.
pub fn make(v1_bases: &[(&'static str, PathBuf)]) -> io::Result<Spare> {
    let name = format!("{SPARE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let mut v1 = Vec::new();
    let undo = |v1: &[(&'static str, PathBuf)]| {
        for (_, d) in v1 {
            let _ = fs::remove_dir(d);
        }
    };
    for (ctrl, base) in v1_bases {
        let d = base.join(&name);
        if let Err(e) = fs::create_dir(&d) {
            undo(&v1);
            return Err(e);
        }
        v1.push((*ctrl, d));
    }
    let spare = match park(v1) {
        Ok(s) => s,
        Err((e, v1)) => {
            undo(&v1);
            return Err(e);
        }
    };
    let pid = spare.pid.to_string();
    for (_, d) in &spare.v1 {
        if let Err(e) = super::cgroup::write_file(&d.join("cgroup.procs"), &pid) {
            spare.discard();
            return Err(e);
        }
    }
    Ok(spare)
}

type ParkError = (io::Error, Vec<(&'static str, PathBuf)>);

/// Starts a parked process (see the module docs).
fn park(v1: Vec<(&'static str, PathBuf)>) -> Result<Spare, ParkError> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err((io::Error::last_os_error(), v1));
    }
    // SAFETY: both descriptors are new and ours.
    let (ctl_r, ctl_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut stacks = (
        Vec::<u8>::with_capacity(STACK),
        Vec::<u8>::with_capacity(STACK),
    );
    let top = |v: &mut Vec<u8>| ((v.as_mut_ptr() as usize + STACK) & !15) as *mut u8;
    let shared = Box::new(Shared {
        ctl_r: ctl_r.as_raw_fd(),
        server_pid: std::process::id() as i32,
        sig_max: libc::SIGRTMAX(),
        args: AtomicPtr::default(),
        cgroup_fd: AtomicI32::new(-1),
        result: AtomicI32::new(0),
        child_stack: AtomicPtr::new(top(&mut stacks.1)),
    });
    let parked_top = top(&mut stacks.0);
    let mut pidfd: libc::c_int = -1;
    // SAFETY: all signals are blocked across the clone (the parked process starts with them
    // blocked and resets every handler before anything else) and the old mask restored. The
    // child runs `parked_main` on its own stack with `shared`; both stay allocated until it is
    // gone (see `Drop for Spare`).
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            parked_main,
            parked_top.cast(),
            libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_PIDFD | libc::SIGCHLD,
            (&*shared as *const Shared).cast_mut().cast(),
            &mut pidfd as *mut libc::c_int,
        );
        let e = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err((e, v1));
        }
        pid
    };
    Ok(Spare {
        v1,
        pid,
        // SAFETY: CLONE_PIDFD stored a new descriptor of ours.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        ctl_w: Some(ctl_w),
        _ctl_r: ctl_r,
        shared: std::mem::ManuallyDrop::new(shared),
        stacks: Some(stacks),
    })
}

/// The parked process: shares the server's memory and descriptors, makes raw system calls
/// only. Waits for "go", clones the instance's process into its v2 cgroup, reports, exits.
extern "C" fn parked_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the spare's `Shared`, alive while this process lives.
    unsafe {
        let s = &*(arg as *const Shared);
        // Default signal actions: the server's handlers must never run here (step 1 of
        // `spawn.rs::child_main`, which must change with it).
        let mut sig = 1;
        while sig <= s.sig_max {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                let mut old = sys::KSigaction::default();
                let rc = sys::rt_sigaction(sig, std::ptr::null(), &mut old);
                if rc == 0 && (old.handler > 1 || sig == libc::SIGPIPE) {
                    let dfl = sys::KSigaction::default();
                    sys::rt_sigaction(sig, &dfl, std::ptr::null_mut());
                }
            }
            sig += 1;
        }
        // Die with the server.
        sys::call(
            libc::SYS_prctl,
            [
                libc::PR_SET_PDEATHSIG as usize,
                libc::SIGKILL as usize,
                0,
                0,
                0,
                0,
            ],
        );
        if sys::call(libc::SYS_getppid, [0; 6]) != s.server_pid as isize {
            sys::exit(0);
        }
        let mut b = 0u8;
        loop {
            let n = sys::call(
                libc::SYS_read,
                [s.ctl_r as usize, &mut b as *mut u8 as usize, 1, 0, 0, 0],
            );
            if n == -(libc::EINTR as isize) {
                continue;
            }
            if n != 1 {
                sys::exit(0);
            }
            break;
        }
        let args = s.args.load(Ordering::SeqCst);
        let cg = s.cgroup_fd.load(Ordering::SeqCst);
        let stack = s.child_stack.load(Ordering::SeqCst);
        if args.is_null() || cg < 0 || stack.is_null() {
            sys::exit(0);
        }
        let ca = sys::CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT) as u64
                | sys::CLONE_INTO_CGROUP,
            stack: stack as u64 - STACK as u64 + 16,
            stack_size: STACK as u64 - 16,
            cgroup: cg as u64,
            ..Default::default()
        };
        let r = sys::clone3_run(&ca, exec_main, args.cast());
        s.result.store(r as i32, Ordering::SeqCst);
        sys::exit(0)
    }
}

/// The instance's main process, cloned by a parked process: what [`super::spawn`]'s child
/// does (own session, stdio, uid, directory, `exec`) with raw system calls. Never returns.
///
/// These steps (and the signal reset in [`parked_main`]) restate `spawn.rs::child_main`: a
/// step changed there must change here too, and the reverse. Kept apart on purpose: this
/// process must not touch libc's `errno` or call libc's wrappers.
extern "C" fn exec_main(arg: *mut libc::c_void) -> ! {
    use super::spawn::{STAGE_CHDIR, STAGE_EXEC, STAGE_IDS, STAGE_NS, STAGE_SETSID, STAGE_STDIO};
    // SAFETY: `arg` points to the `ChildArgs` the server keeps alive until this process has
    // exec'd or exited (the server waits for the parked process, which CLONE_VFORK suspends
    // until then).
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |stage: i32, rc: isize| -> ! {
            a.stage.store(stage, Ordering::Relaxed);
            a.error.store((-rc).max(1) as i32, Ordering::Release);
            sys::exit(127)
        };
        let rc = sys::call(libc::SYS_setsid, [0; 6]);
        if rc < 0 {
            fail(STAGE_SETSID, rc);
        }
        for (src, dst) in [(a.stdin, 0), (a.stdout, 1), (a.stderr, 2)] {
            let rc = if src == dst {
                sys::call(
                    libc::SYS_fcntl,
                    [src as usize, libc::F_SETFD as usize, 0, 0, 0, 0],
                )
            } else {
                let r = sys::call(libc::SYS_dup2, [src as usize, dst as usize, 0, 0, 0, 0]);
                if r == dst as isize {
                    0
                } else {
                    r.min(-1)
                }
            };
            if rc < 0 {
                fail(STAGE_STDIO, rc);
            }
        }
        if let Some(l) = &a.nofile {
            sys::call(
                libc::SYS_prlimit64,
                [
                    0,
                    libc::RLIMIT_NOFILE as usize,
                    l as *const libc::rlimit as usize,
                    0,
                    0,
                    0,
                ],
            );
        }
        // The instance's own /tmp, /var/tmp, /dev/shm and /proc, while still root.
        if let Some(plan) = a.ns.as_ref() {
            if let Err(e) = super::namespace::enter(plan, &sys::Raw) {
                fail(STAGE_NS, -(e as isize));
            }
        }
        if let Some((uid, gid)) = a.ids {
            for (nr, args) in [
                (libc::SYS_setgroups, [0usize, 0, 0, 0, 0, 0]),
                (
                    libc::SYS_setresgid,
                    [gid as usize, gid as usize, gid as usize, 0, 0, 0],
                ),
                (
                    libc::SYS_setresuid,
                    [uid as usize, uid as usize, uid as usize, 0, 0, 0],
                ),
                (
                    libc::SYS_prctl,
                    [libc::PR_SET_NO_NEW_PRIVS as usize, 1, 0, 0, 0, 0],
                ),
            ] {
                let rc = sys::call(nr, args);
                if rc < 0 {
                    fail(STAGE_IDS, rc);
                }
            }
            let keyctl = |a: [usize; 6]| sys::call(libc::SYS_keyctl, a);
            if let Err(e) = super::spawn::fresh_keyrings(keyctl) {
                fail(STAGE_IDS, -(e as isize));
            }
        }
        sys::call(libc::SYS_umask, [0o022, 0, 0, 0, 0, 0]);
        let rc = sys::call(libc::SYS_chdir, [a.cwd.as_ptr() as usize, 0, 0, 0, 0, 0]);
        if rc < 0 {
            fail(STAGE_CHDIR, rc);
        }
        let empty: u64 = 0;
        sys::call(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as usize,
                &empty as *const u64 as usize,
                0,
                8,
                0,
                0,
            ],
        );
        let rc = sys::call(
            libc::SYS_execve,
            [
                a.path.as_ptr() as usize,
                a.argv.as_ptr() as usize,
                a.envp.as_ptr() as usize,
                0,
                0,
                0,
            ],
        );
        let rc = if rc == -(libc::ENOEXEC as isize) {
            sys::call(
                libc::SYS_execve,
                [
                    c"/bin/sh".as_ptr() as usize,
                    a.sh_argv.as_ptr() as usize,
                    a.envp.as_ptr() as usize,
                    0,
                    0,
                    0,
                ],
            )
        } else {
            rc
        };
        fail(STAGE_EXEC, rc)
    }
}

/// Raw Linux system calls: they return `-errno` and never touch `errno` (thread-local
/// storage the parked process shares with a server thread).
mod sys {
    /// `CLONE_INTO_CGROUP` (Linux 5.7).
    pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

    /// The kernel's `struct sigaction` (x86-64).
    #[repr(C)]
    #[derive(Default)]
    pub struct KSigaction {
        pub handler: usize,
        pub flags: u64,
        pub restorer: usize,
        pub mask: u64,
    }

    /// `struct clone_args`, version 2 (with `cgroup`).
    #[repr(C)]
    #[derive(Default)]
    pub struct CloneArgs {
        pub flags: u64,
        pub pidfd: u64,
        pub child_tid: u64,
        pub parent_tid: u64,
        pub exit_signal: u64,
        pub stack: u64,
        pub stack_size: u64,
        pub tls: u64,
        pub set_tid: u64,
        pub set_tid_size: u64,
        pub cgroup: u64,
    }

    /// System call `nr` with six arguments.
    ///
    /// # Safety
    /// As the system call itself.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub unsafe fn call(nr: libc::c_long, a: [usize; 6]) -> isize {
        let ret: isize;
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
        ret
    }

    /// Never used: spares are off on other architectures ([`super::useful`]).
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn call(_nr: libc::c_long, _a: [usize; 6]) -> isize {
        -(libc::ENOSYS as isize)
    }

    /// [`super::super::namespace::Sys`] through raw calls (no `errno`).
    pub struct Raw;

    /// `-errno` of a raw call as `Err(errno)`.
    fn ok(rc: isize) -> Result<isize, i32> {
        if rc < 0 {
            Err((-rc) as i32)
        } else {
            Ok(rc)
        }
    }

    fn p(s: Option<&std::ffi::CStr>) -> usize {
        s.map_or(0, |s| s.as_ptr() as usize)
    }

    impl super::super::namespace::Sys for Raw {
        fn unshare(&self, flags: libc::c_int) -> Result<(), i32> {
            // SAFETY: a system call with no pointer.
            ok(unsafe { call(libc::SYS_unshare, [flags as usize, 0, 0, 0, 0, 0]) }).map(drop)
        }

        fn mount(
            &self,
            src: Option<&std::ffi::CStr>,
            target: &std::ffi::CStr,
            fstype: Option<&std::ffi::CStr>,
            flags: libc::c_ulong,
            data: Option<&std::ffi::CStr>,
        ) -> Result<(), i32> {
            let a = [
                p(src),
                p(Some(target)),
                p(fstype),
                flags as usize,
                p(data),
                0,
            ];
            // SAFETY: NUL-terminated strings alive for the call.
            ok(unsafe { call(libc::SYS_mount, a) }).map(drop)
        }

        fn open_dir(&self, path: &std::ffi::CStr) -> Result<i32, i32> {
            let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
            let a = [
                libc::AT_FDCWD as usize,
                path.as_ptr() as usize,
                flags as usize,
                0,
                0,
                0,
            ];
            // SAFETY: a NUL-terminated path alive for the call.
            ok(unsafe { call(libc::SYS_openat, a) }).map(|fd| fd as i32)
        }

        fn fchdir(&self, fd: i32) -> Result<(), i32> {
            // SAFETY: a system call with no pointer.
            ok(unsafe { call(libc::SYS_fchdir, [fd as usize, 0, 0, 0, 0, 0]) }).map(drop)
        }

        fn mkdir(&self, path: &std::ffi::CStr) -> Result<(), i32> {
            let a = [path.as_ptr() as usize, 0o755, 0, 0, 0, 0];
            // SAFETY: a NUL-terminated path alive for the call.
            ok(unsafe { call(libc::SYS_mkdir, a) }).map(drop)
        }

        fn chmod(&self, path: &std::ffi::CStr, mode: u32) -> Result<(), i32> {
            let a = [
                libc::AT_FDCWD as usize,
                path.as_ptr() as usize,
                mode as usize,
                0,
                0,
                0,
            ];
            // SAFETY: a NUL-terminated path alive for the call.
            ok(unsafe { call(libc::SYS_fchmodat, a) }).map(drop)
        }

        fn create(&self, path: &std::ffi::CStr) -> Result<(), i32> {
            let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC;
            let a = [
                libc::AT_FDCWD as usize,
                path.as_ptr() as usize,
                flags as usize,
                0o644,
                0,
                0,
            ];
            // SAFETY: a NUL-terminated path alive for the call.
            let fd = ok(unsafe { call(libc::SYS_openat, a) })?;
            self.close(fd as i32);
            Ok(())
        }

        fn close(&self, fd: i32) {
            // SAFETY: closing a descriptor this process opened.
            unsafe { call(libc::SYS_close, [fd as usize, 0, 0, 0, 0, 0]) };
        }
    }

    pub unsafe fn rt_sigaction(sig: i32, new: *const KSigaction, old: *mut KSigaction) -> isize {
        call(
            libc::SYS_rt_sigaction,
            [sig as usize, new as usize, old as usize, 8, 0, 0],
        )
    }

    pub unsafe fn exit(code: i32) -> ! {
        loop {
            call(libc::SYS_exit, [code as usize, 0, 0, 0, 0, 0]);
        }
    }

    /// `clone3(args)`; the new process runs `f(arg)` on the stack given in `args` (it must
    /// never return). Returns the new pid or `-errno` in the caller.
    ///
    /// # Safety
    /// `args` describes a valid stack; `f` must not return.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn clone3_run(
        args: &CloneArgs,
        f: extern "C" fn(*mut libc::c_void) -> !,
        arg: *mut libc::c_void,
    ) -> isize {
        let ret: isize;
        // The child returns from `syscall` on the new (16-byte aligned) stack with rax = 0
        // and every other register but rcx and r11 unchanged.
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r13",
            "call r12",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") args as *const CloneArgs as usize,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") f as usize,
            in("r13") arg as usize,
            lateout("rcx") _, lateout("r11") _,
        );
        ret
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn clone3_run(
        _args: &CloneArgs,
        _f: extern "C" fn(*mut libc::c_void) -> !,
        _arg: *mut libc::c_void,
    ) -> isize {
        -(libc::ENOSYS as isize)
    }
}

/// The stock of spares and its thread.
pub struct Stock {
    shared: Arc<StockShared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    v1_bases: Vec<(&'static str, PathBuf)>,
}

#[derive(Default)]
struct StockShared {
    state: Mutex<StockState>,
    cv: Condvar,
    /// Set once a claim found that this kernel cannot `clone3` into a cgroup.
    unsupported: AtomicBool,
}

#[derive(Default)]
struct StockState {
    spares: Vec<Spare>,
    /// Whether the stock's thread is running (it starts at the first take).
    started: bool,
    stop: bool,
}

impl Stock {
    /// A stock for these v1 controller bases (empty: spares are never made).
    pub fn new(v1_bases: Vec<(&'static str, PathBuf)>, has_v2: bool) -> Stock {
        let shared = Arc::new(StockShared::default());
        if !useful(has_v2, v1_bases.len()) {
            shared.unsupported.store(true, Ordering::SeqCst);
        }
        Stock {
            shared,
            thread: Mutex::new(None),
            v1_bases,
        }
    }

    /// Takes a ready spare, if any. The first call starts the
    /// stock's thread (a server that never starts an instance keeps no spares).
    pub fn take(&self) -> Option<Spare> {
        if self.shared.unsupported.load(Ordering::SeqCst) {
            return None;
        }
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.stop {
            return None;
        }
        if !st.started {
            st.started = true;
            let shared = self.shared.clone();
            let bases = self.v1_bases.clone();
            let h = std::thread::Builder::new()
                .name("cattery-spares".into())
                .spawn(move || refill(&shared, &bases));
            match h {
                Ok(h) => *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the spare cgroup thread");
                    self.shared.unsupported.store(true, Ordering::SeqCst);
                }
            }
        }
        // The stock's thread is woken by [`Stock::refill_soon`], once the start is done with
        // cgroups: its migration holds the kernel's `cgroup_mutex` through the RCU wait, and
        // the start's `mkdir`, `clone3` and `rename` need that mutex.
        st.spares.pop()
    }

    /// Asks the stock's thread to make up for a spare that was taken (call once the start
    /// that took it is done with cgroups).
    pub fn refill_soon(&self) {
        self.shared.cv.notify_all();
    }

    /// Returns a spare that was taken but not used.
    pub fn give_back(&self, s: Spare) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.stop {
            drop(st);
            s.discard();
            return;
        }
        st.spares.push(s);
    }

    /// Stops using spares on this machine (a claim found `clone3` unsupported).
    pub fn disable(&self) {
        if !self.shared.unsupported.swap(true, Ordering::SeqCst) {
            tracing::warn!("clone3 into a cgroup is not supported here: spare cgroups are off");
        }
        self.shared.cv.notify_all();
    }

    /// Names of the spares held now (their cgroup directories' names).
    pub fn names(&self) -> Vec<String> {
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.spares
            .iter()
            .filter_map(|s| s.v1.first())
            .filter_map(|(_, d)| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    /// How many spares are ready.
    pub fn ready(&self) -> usize {
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.spares.len()
    }

    /// Stops the stock: its thread ends and every spare is discarded (processes killed,
    /// cgroups removed). Blocking; idempotent.
    pub fn shutdown(&self) {
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.stop = true;
        }
        self.shared.cv.notify_all();
        let h = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
        let left: Vec<Spare> = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut st.spares)
        };
        for s in left {
            s.discard();
        }
    }
}

impl Drop for Stock {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The stock's thread: keeps [`STOCK`] spares ready (see [`next`]). The parked processes die
/// with this thread (`PR_SET_PDEATHSIG`), so it discards them itself before it ends.
fn refill(shared: &StockShared, bases: &[(&'static str, PathBuf)]) {
    let mut failures = 0u32;
    loop {
        let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.stop {
            break;
        }
        let unsupported = shared.unsupported.load(Ordering::SeqCst);
        match next(st.spares.len(), STOCK, failures, unsupported) {
            Next::Wait => {
                drop(shared.cv.wait(st).unwrap_or_else(|e| e.into_inner()));
                continue;
            }
            Next::GiveUp => {
                if !unsupported {
                    tracing::warn!("spare cgroup slots are off after repeated failures");
                    shared.unsupported.store(true, Ordering::SeqCst);
                }
                break;
            }
            Next::Backoff(d) => {
                let (st, _) = shared
                    .cv
                    .wait_timeout(st, d)
                    .unwrap_or_else(|e| e.into_inner());
                if st.stop {
                    break;
                }
            }
            Next::Make => drop(st),
        }
        match make(bases) {
            Ok(s) => {
                failures = 0;
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.stop {
                    drop(st);
                    s.discard();
                    break;
                }
                st.spares.push(s);
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "could not make a spare cgroup slot");
            }
        }
    }
    let left: Vec<Spare> = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut st.spares)
    };
    for s in left {
        s.discard();
    }
}

/// Removes spare cgroups a previous run left (their parked processes died with it; any
/// process still inside is killed). `keep`: names of this run's spares.
pub fn sweep(v1_bases: &[(&'static str, PathBuf)], keep: &[String]) -> usize {
    let mut removed = 0;
    for (_, base) in v1_bases {
        let Ok(rd) = fs::read_dir(base) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(SPARE_PREFIX) || keep.contains(&name) {
                continue;
            }
            let dir = e.path();
            for pid in super::cgroup::procs(&dir) {
                // Not our child: through a pidfd, once seen in the cgroup
                // (`super::signals`, rule 2).
                super::signals::send_checked(pid, nix::sys::signal::Signal::SIGKILL, || {
                    super::cgroup::procs(&dir).contains(&pid)
                });
            }
            remove_when_empty(&dir);
            removed += 1;
        }
    }
    removed
}

fn remove_when_empty(dir: &Path) {
    for _ in 0..100 {
        if super::cgroup::procs(dir).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    super::cgroup::remove(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stock_fills_to_its_target_backs_off_and_gives_up() {
        assert_eq!(next(0, 2, 0, false), Next::Make);
        assert_eq!(next(1, 2, 0, false), Next::Make);
        assert_eq!(next(2, 2, 0, false), Next::Wait);
        assert_eq!(next(3, 2, 0, false), Next::Wait);
        assert_eq!(
            next(0, 2, 1, false),
            Next::Backoff(Duration::from_millis(500))
        );
        assert_eq!(
            next(0, 2, 3, false),
            Next::Backoff(Duration::from_millis(2000))
        );
        assert_eq!(
            next(0, 2, 7, false),
            Next::Backoff(Duration::from_millis(32_000))
        );
        assert_eq!(next(0, 2, 8, false), Next::GiveUp);
        assert_eq!(next(0, 2, 0, true), Next::GiveUp);
        assert_eq!(next(2, 2, 0, true), Next::GiveUp);
    }

    #[test]
    fn spares_only_where_v1_controllers_would_need_a_migration() {
        assert!(!useful(false, 3));
        assert!(!useful(true, 0));
        assert_eq!(useful(true, 3), cfg!(target_arch = "x86_64"));
    }
}

#[cfg(test)]
mod real_tests {
    //! On real cgroups (skipped unless root on a machine with cgroup v2 and v1 controllers).
    use super::*;
    use std::ffi::OsString;

    struct Bases {
        v2: PathBuf,
        v1: Vec<(&'static str, PathBuf)>,
    }

    impl Bases {
        fn new() -> Option<Bases> {
            if !nix::unistd::geteuid().is_root() {
                return None;
            }
            let name = format!("cattery-spare-test-{}", uuid::Uuid::new_v4().simple());
            let v2root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .map(PathBuf::from)
                .find(|r| r.join("cgroup.procs").exists() && !r.join("memory").is_dir())?;
            let v2 = v2root.join(&name);
            let mut v1 = Vec::new();
            for ctrl in ["memory", "pids"] {
                let root = Path::new("/sys/fs/cgroup").join(ctrl);
                if root.join("cgroup.procs").exists() && fs::create_dir(root.join(&name)).is_ok() {
                    v1.push((ctrl, root.join(&name)));
                }
            }
            if v1.is_empty() || fs::create_dir(&v2).is_err() {
                for (_, d) in &v1 {
                    let _ = fs::remove_dir(d);
                }
                return None;
            }
            Some(Bases { v2, v1 })
        }
    }

    impl Drop for Bases {
        fn drop(&mut self) {
            for d in std::iter::once(&self.v2).chain(self.v1.iter().map(|(_, d)| d)) {
                if let Ok(rd) = fs::read_dir(d) {
                    for e in rd.flatten().filter(|e| e.path().is_dir()) {
                        super::super::cgroup::remove(&e.path());
                    }
                }
                super::super::cgroup::remove(d);
            }
        }
    }

    /// Claims `spare` for `args` as the runtime does (in a window of the process's reaper):
    /// the new process's pid and its exit code once the reaper has it. A `waitpid` of the
    /// test's own would race the reaper's `waitpid(-1)`, which another test of this process
    /// (under `cargo test`) may have started.
    fn claim_and_wait(spare: &mut Spare, args: &ChildArgs, cgroup: &OwnedFd) -> (i32, i32) {
        let reaper = super::super::reaper::Reaper::global();
        let window = reaper.open_unlocked();
        let pid = spare.claim(args, cgroup).unwrap();
        let exit = window.register(pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = *exit.borrow() {
                return (pid, st.code.expect("exited, not killed"));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never reaped"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_claimed_spare_starts_the_program_in_its_cgroups_without_a_migration() {
        let Some(b) = Bases::new() else { return };
        let mut spare = make(&b.v1).unwrap();
        assert!(spare.alive());
        let parked = spare.pid();
        for (_, d) in &spare.v1 {
            assert_eq!(super::super::cgroup::procs(d), vec![parked]);
        }
        // An idle moment: a migration now would wait for an RCU grace period.
        std::thread::sleep(Duration::from_millis(150));
        let inst = b.v2.join("inst");
        fs::create_dir(&inst).unwrap();
        let inst_fd = OwnedFd::from(fs::File::open(&inst).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let out: OwnedFd = fs::File::create(dir.path().join("out")).unwrap().into();
        let args = vec![
            "-c".to_string(),
            "echo $X $$ $(cut -d' ' -f6 /proc/$$/stat) $(pwd); cat /proc/$$/cgroup".to_string(),
        ];
        let env = vec![
            (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
            (OsString::from("X"), OsString::from("hello")),
        ];
        let plan = super::super::spawn::prepare(&super::super::spawn::SpawnSpec {
            program: "sh",
            args: &args,
            env: &env,
            cwd: dir.path(),
            stdout: &out,
            stderr: &out,
            cgroup_procs: &[],
            ids: None,
            stdin: None,
            namespaces: None,
        })
        .unwrap();
        let t0 = std::time::Instant::now();
        let (pid, code) = claim_and_wait(&mut spare, &plan.args, &inst_fd);
        let took = t0.elapsed();
        assert!(super::super::spawn::child_failure(&plan.args, dir.path()).is_none());
        assert_ne!(pid, parked);
        assert_eq!(code, 0);
        let v1 = spare.rename("renamed");
        drop(spare);
        let got = fs::read_to_string(dir.path().join("out")).unwrap();
        let first: Vec<&str> = got.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(first[0], "hello");
        assert_eq!(first[1], pid.to_string());
        assert_eq!(first[2], pid.to_string(), "its own session: {got}");
        assert_eq!(
            fs::canonicalize(first[3]).unwrap(),
            fs::canonicalize(dir.path()).unwrap()
        );
        let v2_name = format!("/{}/inst", b.v2.file_name().unwrap().to_string_lossy());
        assert!(
            got.lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&v2_name)),
            "{got}"
        );
        for (ctrl, d) in &b.v1 {
            let want = format!(
                "/{}/{SPARE_PREFIX}",
                d.file_name().unwrap().to_string_lossy()
            );
            assert!(
                got.lines()
                    .any(|l| l.contains(&format!(":{ctrl}:")) && l.contains(&want)),
                "{ctrl}: {got}"
            );
        }
        for d in &v1 {
            assert!(d.ends_with("renamed") && d.is_dir(), "{}", d.display());
            super::super::cgroup::remove(d);
        }
        super::super::cgroup::remove(&inst);
        eprintln!("claim took {took:?}");
    }

    #[test]
    fn a_failed_exec_is_reported_and_a_discarded_spare_leaves_nothing() {
        let Some(b) = Bases::new() else { return };
        let mut spare = make(&b.v1).unwrap();
        let inst = b.v2.join("inst");
        fs::create_dir(&inst).unwrap();
        let inst_fd = OwnedFd::from(fs::File::open(&inst).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let out: OwnedFd = fs::File::create(dir.path().join("out")).unwrap().into();
        let missing = dir.path().join("missing");
        let plan = super::super::spawn::prepare(&super::super::spawn::SpawnSpec {
            program: "/bin/true",
            args: &[],
            env: &[],
            cwd: &missing,
            stdout: &out,
            stderr: &out,
            cgroup_procs: &[],
            ids: None,
            stdin: None,
            namespaces: None,
        })
        .unwrap();
        let (_, code) = claim_and_wait(&mut spare, &plan.args, &inst_fd);
        let e = super::super::spawn::child_failure(&plan.args, &missing).unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert_eq!(code, 127);
        spare.discard();
        for (_, d) in &b.v1 {
            assert_eq!(
                fs::read_dir(d)
                    .unwrap()
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .count(),
                0
            );
        }
        // A spare discarded unused: its process is gone and its cgroups removed.
        let spare = make(&b.v1).unwrap();
        let parked = spare.pid();
        spare.discard();
        assert!(
            !Path::new(&format!("/proc/{parked}")).exists()
                || fs::read_to_string(format!("/proc/{parked}/stat"))
                    .map(|s| s.contains(") Z"))
                    .unwrap_or(true)
        );
        for (_, d) in &b.v1 {
            assert_eq!(
                fs::read_dir(d)
                    .unwrap()
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .count(),
                0
            );
        }
        super::super::cgroup::remove(&inst);
    }

    #[test]
    fn the_started_process_has_its_own_tmp_var_tmp_dev_shm_and_proc() {
        let Some(b) = Bases::new() else { return };
        let mut spare = make(&b.v1).unwrap();
        let inst = b.v2.join("inst");
        fs::create_dir(&inst).unwrap();
        let inst_fd = OwnedFd::from(fs::File::open(&inst).unwrap());
        let r = super::super::namespace::tests::run_in_namespace(|spec| {
            let plan = super::super::spawn::prepare(spec).unwrap();
            let pid = spare.claim(&plan.args, &inst_fd).unwrap();
            let failed = super::super::spawn::child_failure(&plan.args, spec.cwd);
            assert!(failed.is_none(), "{failed:?}");
            pid
        });
        spare.discard();
        super::super::cgroup::remove(&inst);
        if let Some((_, leaked)) = r {
            assert_eq!(leaked, "", "the host got the instance's files");
        }
    }

    #[test]
    fn the_started_process_runs_under_the_instance_uid_without_groups_or_privileges() {
        let Some(b) = Bases::new() else { return };
        let mut spare = make(&b.v1).unwrap();
        let inst = b.v2.join("inst");
        fs::create_dir(&inst).unwrap();
        let inst_fd = OwnedFd::from(fs::File::open(&inst).unwrap());
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.path().join("out");
        let out: OwnedFd = fs::File::create(&path).unwrap().into();
        let script = "echo $(id -u) $(id -g) $(id -G) $(grep NoNewPrivs /proc/self/status | cut -f2) $(umask)";
        let args = ["-c".to_string(), script.to_string()];
        let env = [(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
        let plan = super::super::spawn::prepare(&super::super::spawn::SpawnSpec {
            program: "/bin/sh",
            args: &args,
            env: &env,
            cwd: dir.path(),
            stdout: &out,
            stderr: &out,
            cgroup_procs: &[],
            ids: Some((2_100_000_007, 2_100_000_008)),
            stdin: None,
            namespaces: None,
        })
        .unwrap();
        let (_, code) = claim_and_wait(&mut spare, &plan.args, &inst_fd);
        assert!(super::super::spawn::child_failure(&plan.args, dir.path()).is_none());
        assert_eq!(code, 0);
        spare.discard();
        assert_eq!(
            fs::read_to_string(&path).unwrap().trim(),
            "2100000007 2100000008 2100000008 1 0022"
        );
        super::super::cgroup::remove(&inst);
    }
}
