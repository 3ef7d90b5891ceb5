//! Starting an instance's main process without `fork()`.
//!
//! The server is a multi-threaded process of tens of MiB. `fork()` (what `std::process::Command`
//! does as soon as a `pre_exec` hook is set) copies its page tables and write-protects all of
//! its memory: every server thread then takes copy-on-write faults, and the other cores get
//! TLB-shootdown interrupts (18 % of the server's CPU in a start/stop churn). `posix_spawn` is
//! `clone(CLONE_VM | CLONE_VFORK)` and costs none of that, but it cannot join the instance's
//! cgroups before `exec`, and joining them from the parent afterwards leaves a window in which
//! the agent runs (and could fork) outside them.
//!
//! So this does what `posix_spawn` does, plus the cgroup join: [`spawn`] calls glibc's
//! `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` with a small stack of its own; the child shares
//! the parent's memory (no copy) while the calling thread is suspended until the child has
//! called `execve` or exited. Before `execve` the child, using only async-signal-safe system
//! calls on data the parent prepared:
//!
//! 1. resets every signal the server handles to its default action (the child has its own
//!    copy of the handler table, so the server's handlers can never run in it), and `SIGPIPE`
//!    to default (Rust ignores it; an ignored signal would survive `exec`);
//! 2. `setsid()`: a new session and process group, led by the child;
//! 3. writes `0` to each `cgroup.procs` descriptor the parent opened (cgroup v2, plus the v1
//!    limit controllers): from here on the child and everything it forks is inside;
//! 4. sets up stdin (`/dev/null`), stdout and stderr, restores the open-files limit;
//!    When the instance gets a namespace of its own ([`super::namespace`]: a private `/tmp`,
//!    `/var/tmp`, `/dev/shm` and `/proc`), it is made here, as root, before anything of the
//!    agent runs;
//! 5. when the instance has a uid of its own: drops every supplementary group and switches
//!    to its gid and uid (raw `setgroups`/`setresgid`/`setresuid` system calls, which change
//!    only this process: glibc's wrappers would signal every thread of the server, whose
//!    memory the child shares), and sets `no_new_privs` (no setuid program or file
//!    capability can give it privileges back), then gives it kernel keyrings of its own
//!    ([`fresh_keyrings`]);
//! 6. sets the umask to 022 (the server's own is 077), changes directory (as the instance's
//!    uid, so a directory it cannot enter fails here, with a clear error);
//! 7. clears the signal mask, and `execve`s the program (a script without `#!` goes through
//!    `/bin/sh`, as `execvp` does).
//!
//! A failing step reports its `errno` through memory shared with the parent and exits 127;
//! the parent reaps that child at once and returns the error, so no process ever ran the
//! agent outside its cgroups.
//!
//! All signals are blocked in the calling thread across the `clone` (the child starts with
//! them blocked, so no handler can run before step 1), and restored right after.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use super::namespace::{self, BuildView, Namespaces, NixSys, Plan};

/// Stack of the child between `clone` and `execve` (it only makes system calls).
const CHILD_STACK: usize = 64 * 1024;

/// What to start.
pub struct SpawnSpec<'a> {
    /// The program as configured: a path (relative ones resolve against `cwd`), or a name
    /// looked up in the child's `PATH`.
    pub program: &'a str,
    /// Arguments after `argv[0]` (which is `program`).
    pub args: &'a [String],
    /// The complete environment of the child.
    pub env: &'a [(OsString, OsString)],
    /// Working directory.
    pub cwd: &'a Path,
    /// Standard output.
    pub stdout: &'a OwnedFd,
    /// Standard error.
    pub stderr: &'a OwnedFd,
    /// Open `cgroup.procs` descriptors the child joins before `execve`.
    pub cgroup_procs: &'a [RawFd],
    /// The uid and gid to run as (`None`: the server's own).
    pub ids: Option<(u32, u32)>,
    /// Standard input (`None`: `/dev/null`).
    pub stdin: Option<RawFd>,
    /// A private mount namespace to make before the uid switch (`None`: the host's view).
    pub namespaces: Option<&'a Namespaces>,
}

/// Everything the child reads, prepared by the parent (the child must not allocate).
pub(super) struct ChildArgs {
    pub(super) path: CString,
    pub(super) argv: Vec<*const libc::c_char>,
    pub(super) sh_argv: Vec<*const libc::c_char>,
    pub(super) envp: Vec<*const libc::c_char>,
    pub(super) cwd: CString,
    pub(super) stdin: RawFd,
    pub(super) stdout: RawFd,
    pub(super) stderr: RawFd,
    pub(super) cgroup_procs: Vec<RawFd>,
    /// uid and gid to switch to.
    pub(super) ids: Option<(libc::uid_t, libc::gid_t)>,
    /// Highest signal number.
    pub(super) sig_max: libc::c_int,
    /// The open-files limit the server started with, restored for the agent (see
    /// [`raise_nofile_limit`]).
    pub(super) nofile: Option<libc::rlimit>,
    /// Set by the child on failure: `errno`.
    pub(super) error: AtomicI32,
    /// Which step failed (for the message).
    pub(super) stage: AtomicI32,
    /// The namespace to make (null: none), owned by the [`ChildPlan`].
    pub(super) ns: *const Plan,
}

pub(super) const STAGE_SETSID: i32 = 1;
const STAGE_CGROUP: i32 = 2;
pub(super) const STAGE_STDIO: i32 = 3;
pub(super) const STAGE_CHDIR: i32 = 4;
pub(super) const STAGE_EXEC: i32 = 5;
pub(super) const STAGE_IDS: i32 = 6;
pub(super) const STAGE_NS: i32 = 7;

fn errno() -> i32 {
    // SAFETY: reading the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// The child, on its own stack, sharing the parent's memory. Only system calls; never returns.
///
/// `spare.rs` restates these steps with raw system calls (`parked_main`: step 1;
/// `exec_main`: steps 2 and 4 to 7; step 3 there is `CLONE_INTO_CGROUP` and the parked
/// process's own v1 cgroups): a step changed here must change there too. Not shared on
/// purpose: the spare's processes must not touch libc's `errno` or call libc's wrappers
/// (they share the memory, `errno` included, of a server thread).
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's `ChildArgs`, alive until we exec or exit (the
    // parent is suspended by CLONE_VFORK). Every call below is async-signal-safe.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |stage: i32| -> ! {
            a.stage.store(stage, Ordering::Relaxed);
            a.error.store(errno().max(1), Ordering::Release);
            libc::_exit(127)
        };
        // 1. Default signal actions (handlers of the parent must never run here).
        let mut sa: libc::sigaction = std::mem::zeroed();
        for sig in 1..=a.sig_max {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            if libc::sigaction(sig, std::ptr::null(), &mut sa) != 0 {
                continue;
            }
            let h = sa.sa_sigaction;
            if (h != libc::SIG_DFL && h != libc::SIG_IGN) || sig == libc::SIGPIPE {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        // 2. Own session and process group.
        if libc::setsid() < 0 {
            fail(STAGE_SETSID);
        }
        // 3. Into the instance's cgroups, before anything of the agent runs.
        for &fd in &a.cgroup_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(STAGE_CGROUP);
            }
        }
        // 4. stdio and working directory.
        for (src, dst) in [(a.stdin, 0), (a.stdout, 1), (a.stderr, 2)] {
            let ok = if src == dst {
                libc::fcntl(src, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(src, dst) == dst
            };
            if !ok {
                fail(STAGE_STDIO);
            }
        }
        if let Some(l) = &a.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, l);
        }
        // 4b. The instance's own /tmp, /var/tmp, /dev/shm and /proc, while still root.
        if let Some(plan) = a.ns.as_ref() {
            if let Err(e) = namespace::enter(plan, &NixSys) {
                *libc::__errno_location() = e;
                fail(STAGE_NS);
            }
        }
        // 5. The instance's own uid and gid, for good.
        if let Some((uid, gid)) = a.ids {
            let no_groups: *const libc::gid_t = std::ptr::null();
            if libc::syscall(libc::SYS_setgroups, 0 as libc::size_t, no_groups) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                fail(STAGE_IDS);
            }
            // 5b. Keyrings of its own (see `fresh_keyrings`).
            if let Err(e) = fresh_keyrings(libc_keyctl) {
                *libc::__errno_location() = e;
                fail(STAGE_IDS);
            }
        }
        // 6. Usual umask, working directory.
        libc::umask(0o022);
        if libc::chdir(a.cwd.as_ptr()) != 0 {
            fail(STAGE_CHDIR);
        }
        // 7. Empty signal mask (as std does), then exec.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(a.path.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
        if errno() == libc::ENOEXEC {
            libc::execve(c"/bin/sh".as_ptr(), a.sh_argv.as_ptr(), a.envp.as_ptr());
        }
        fail(STAGE_EXEC)
    }
}

/// Gives the calling process, already under its instance uid, kernel keyrings of its own,
/// with `call` making each system call (`-errno` on failure). Keyrings are not namespaced:
/// a process keeps the session keyring of whoever started it (a server under systemd has
/// one, which every instance would then share and could read), and a uid's user, user
/// session and persistent keyrings outlive its processes, so what one instance left there
/// would be readable by the next instance given the same uid. So: a new anonymous session
/// keyring, and the uid's own keyrings emptied before any of the agent's code runs. A kernel
/// without keyrings (`ENOSYS`, `EOPNOTSUPP`) has nothing to hide, nor has a server whose
/// seccomp filter refuses them (`EPERM`: Docker's default profile does), since the agent
/// inherits the filter. Errors: the `errno` of the call that failed. Async-signal-safe
/// (system calls only).
pub fn fresh_keyrings(call: impl Fn([usize; 6]) -> isize) -> Result<(), i32> {
    let absent = |rc: isize| {
        [libc::ENOSYS, libc::EOPNOTSUPP, libc::EPERM]
            .iter()
            .any(|&e| rc == -(e as isize))
    };
    let key = |k: i32| k as isize as usize;
    let keyctl = |op: u32, a: usize, b: usize| call([op as usize, a, b, 0, 0, 0]);
    let rc = keyctl(libc::KEYCTL_JOIN_SESSION_KEYRING, 0, 0);
    if absent(rc) {
        return Ok(());
    }
    let check = |rc: isize| if rc < 0 { Err((-rc) as i32) } else { Ok(rc) };
    check(rc)?;
    for ring in [
        libc::KEY_SPEC_USER_KEYRING,
        libc::KEY_SPEC_USER_SESSION_KEYRING,
    ] {
        check(keyctl(libc::KEYCTL_CLEAR, key(ring), 0))?;
    }
    // The uid's persistent keyring (where the kernel has them), linked into the new session
    // keyring by the lookup: emptied, then unlinked again.
    let session = key(libc::KEY_SPEC_SESSION_KEYRING);
    let persistent = keyctl(libc::KEYCTL_GET_PERSISTENT, u32::MAX as usize, session);
    if !absent(persistent) {
        let id = check(persistent)? as usize;
        check(keyctl(libc::KEYCTL_CLEAR, id, 0))?;
        check(keyctl(libc::KEYCTL_UNLINK, id, session))?;
    }
    Ok(())
}

/// `keyctl(2)` through libc (sets `errno`: not for a spare's processes), for
/// [`fresh_keyrings`].
pub fn libc_keyctl(a: [usize; 6]) -> isize {
    // SAFETY: keyctl with integer arguments only.
    let rc = unsafe { libc::syscall(libc::SYS_keyctl, a[0], a[1], a[2], a[3], a[4]) };
    if rc < 0 {
        -(errno() as isize)
    } else {
        rc as isize
    }
}

static ORIGINAL_NOFILE: std::sync::OnceLock<Option<libc::rlimit>> = std::sync::OnceLock::new();

/// Raises this process's soft open-files limit to its hard limit (once; later calls do
/// nothing) and returns the new soft limit. Each live instance holds a few descriptors in the
/// server (its log files, its `/bot` connection), so 1,000 sessions need more than the usual
/// soft limit of 1,024. Agents started by [`spawn`] get the original limit back.
pub fn raise_nofile_limit() -> u64 {
    let get = || {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit into a local struct.
        (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0).then_some(l)
    };
    ORIGINAL_NOFILE.get_or_init(|| {
        let orig = get()?;
        if orig.rlim_cur >= orig.rlim_max {
            return None;
        }
        let raised = libc::rlimit {
            rlim_cur: orig.rlim_max,
            rlim_max: orig.rlim_max,
        };
        // SAFETY: setrlimit from a local struct.
        (unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0).then_some(orig)
    });
    get().map(|l| l.rlim_cur).unwrap_or(0)
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in argument"))
}

/// Resolves `program` like `execvp`: as a path if it has a `/` (relative to `cwd`), else the
/// first executable file of that name in `path_var` (the child's `PATH`).
pub fn resolve(program: &str, cwd: &Path, path_var: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let default = OsString::from("/usr/local/bin:/usr/bin:/bin");
    let path_var = path_var.unwrap_or(&default);
    let mut denied = false;
    for dir in std::env::split_paths(path_var) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let p = if dir.is_relative() {
            cwd.join(&dir).join(program)
        } else {
            dir.join(program)
        };
        let Ok(c) = cstring(p.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: access(2) on a NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 && p.is_file() {
            return Ok(p);
        }
        denied |= p.exists();
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

/// Everything the child of a spawn needs, owned: [`ChildPlan::args`] points into it.
pub(super) struct ChildPlan {
    pub(super) args: ChildArgs,
    _strings: (Vec<CString>, Vec<CString>),
    /// What [`ChildArgs::ns`] points to (boxed: the plan moves, the namespace's plan not).
    _ns: Option<Box<Plan>>,
}

/// `/dev/null` for the standard input of every spawn, opened once (close-on-exec) and kept
/// for the server's life: not an `openat` and a `close` per start.
fn dev_null() -> io::Result<RawFd> {
    static NULL: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(f) = NULL.get() {
        return Ok(f.as_raw_fd());
    }
    let f = std::fs::File::open("/dev/null")?;
    Ok(NULL.get_or_init(|| f).as_raw_fd())
}

/// Resolves the program and prepares what the child reads (see [`ChildArgs`]); allocates,
/// so it runs in the parent.
pub(super) fn prepare(spec: &SpawnSpec<'_>) -> io::Result<ChildPlan> {
    let path_var = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str());
    let path = match spec.ids {
        // A name looked up in the agent's own `PATH` is looked up as the instance would: as
        // root, a directory of that `PATH` the instance cannot enter would still be searched,
        // and whether the start then works would tell the org what that directory holds.
        Some((uid, gid)) if !spec.program.contains('/') => {
            super::uids::with_fs_ids(uid, gid, || resolve(spec.program, spec.cwd, path_var))??
        }
        _ => resolve(spec.program, spec.cwd, path_var)?,
    };
    let path = cstring(path.as_os_str().as_bytes())?;
    let mut arg_strings = vec![cstring(spec.program.as_bytes())?];
    for a in spec.args {
        arg_strings.push(cstring(a.as_bytes())?);
    }
    let env_strings = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            cstring(&b)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let sh = c"sh";
    let mut argv: Vec<*const libc::c_char> = arg_strings.iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());
    // `/bin/sh <path> <args...>` for a script without `#!`.
    let mut sh_argv: Vec<*const libc::c_char> = vec![sh.as_ptr(), path.as_ptr()];
    sh_argv.extend(arg_strings.iter().skip(1).map(|s| s.as_ptr()));
    sh_argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env_strings.iter().map(|s| s.as_ptr()).collect();
    envp.push(std::ptr::null());
    let devnull = dev_null()?;
    // Every path the process is given: what of them lies in a private place is bound back.
    // Of the builds, only those its program, working directory or arguments lie in.
    let ns = spec.namespaces.map(|n| {
        let given = [spec.cwd.as_os_str(), OsStr::from_bytes(path.as_bytes())];
        let args = spec.args.iter().map(OsStr::new);
        let env = spec.env.iter().map(|(_, v)| v.as_os_str());
        Box::new(n.plan(given.into_iter().chain(args), env, BuildView::Run))
    });
    let args = ChildArgs {
        path,
        argv,
        sh_argv,
        envp,
        cwd: cstring(spec.cwd.as_os_str().as_bytes())?,
        stdin: spec.stdin.unwrap_or(devnull),
        stdout: spec.stdout.as_raw_fd(),
        stderr: spec.stderr.as_raw_fd(),
        cgroup_procs: spec.cgroup_procs.to_vec(),
        ids: spec.ids,
        sig_max: libc::SIGRTMAX(),
        nofile: ORIGINAL_NOFILE.get().copied().flatten(),
        error: AtomicI32::new(0),
        stage: AtomicI32::new(0),
        ns: ns.as_deref().map_or(std::ptr::null(), |p| p as *const Plan),
    };
    Ok(ChildPlan {
        args,
        _strings: (arg_strings, env_strings),
        _ns: ns,
    })
}

/// The error of a child that exited without running the program (`None`: it did run it).
pub(super) fn child_failure(args: &ChildArgs, cwd: &Path) -> Option<io::Error> {
    let err = args.error.load(Ordering::Acquire);
    if err == 0 {
        return None;
    }
    let e = io::Error::from_raw_os_error(err);
    Some(match args.stage.load(Ordering::Relaxed) {
        STAGE_EXEC => e,
        STAGE_SETSID => io::Error::new(e.kind(), format!("setsid: {e}")),
        STAGE_CGROUP => io::Error::new(e.kind(), format!("joining the instance's cgroup: {e}")),
        STAGE_STDIO => io::Error::new(e.kind(), format!("setting up stdio: {e}")),
        STAGE_IDS => io::Error::new(e.kind(), format!("switching to the instance's uid: {e}")),
        STAGE_NS => io::Error::new(
            e.kind(),
            format!("making the instance's private /tmp, /var/tmp, /dev/shm and /proc: {e}"),
        ),
        STAGE_CHDIR => io::Error::new(e.kind(), format!("changing to {}: {e}", cwd.display())),
        _ => e,
    })
}

/// Starts the process described by `spec` (see the module docs) and returns its pid. The
/// caller reaps it. Errors: the program could not be executed, or a setup step failed (the
/// failed child is already reaped).
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<i32> {
    let plan = prepare(spec)?;
    let args = &plan.args;
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // The stack grows down from its (16-byte aligned) top.
    let top = ((stack.as_mut_ptr() as usize + CHILD_STACK) & !15) as *mut libc::c_void;
    // SAFETY: all signals are blocked across the clone and the old mask restored; the child
    // runs `child_main` on `stack` with `args`, both alive until it has exec'd or exited
    // (CLONE_VFORK suspends this thread until then).
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (args as *const ChildArgs).cast_mut().cast(),
        );
        let clone_errno = errno();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(io::Error::from_raw_os_error(clone_errno));
        }
        pid
    };
    drop(stack);
    if let Some(e) = child_failure(args, spec.cwd) {
        // The child exited without running the program: reap it now.
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(e);
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    /// `fresh_keyrings`: a new session keyring, the uid's keyrings emptied (the persistent
    /// one unlinked again); a kernel without keyrings is fine; any other error fails.
    #[test]
    fn keyrings_are_made_fresh_and_a_kernel_without_them_is_fine() {
        use libc::{KEYCTL_CLEAR, KEYCTL_GET_PERSISTENT, KEYCTL_JOIN_SESSION_KEYRING};
        let run = |fail: Option<(u32, i32)>| {
            let calls = std::cell::RefCell::new(Vec::new());
            let r = fresh_keyrings(|a| {
                let op = a[0] as u32;
                calls.borrow_mut().push(op);
                match fail {
                    Some((f, e)) if f == op => -(e as isize),
                    _ if op == KEYCTL_GET_PERSISTENT => 42,
                    _ => 0,
                }
            });
            (r, calls.into_inner())
        };
        let (r, calls) = run(None);
        assert_eq!(r, Ok(()));
        assert_eq!(
            calls,
            [
                KEYCTL_JOIN_SESSION_KEYRING,
                KEYCTL_CLEAR,
                KEYCTL_CLEAR,
                KEYCTL_GET_PERSISTENT,
                KEYCTL_CLEAR,
                libc::KEYCTL_UNLINK
            ]
        );
        for refused in [libc::ENOSYS, libc::EPERM] {
            let none = run(Some((KEYCTL_JOIN_SESSION_KEYRING, refused)));
            assert_eq!(none, (Ok(()), vec![KEYCTL_JOIN_SESSION_KEYRING]));
        }
        let (r, calls) = run(Some((KEYCTL_GET_PERSISTENT, libc::EOPNOTSUPP)));
        assert_eq!((r, calls.len()), (Ok(()), 4));
        assert_eq!(run(Some((KEYCTL_CLEAR, libc::EACCES))).0, Err(libc::EACCES));
    }

    fn wait(pid: i32) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    /// Spawns `program` with an empty environment in `cwd`, stdout and stderr to one file;
    /// waits, and returns its wait status and its output.
    fn run_captured(program: &str, args: &[String], cwd: &Path) -> (i32, String) {
        let path = cwd.join("out");
        let out: OwnedFd = std::fs::File::create(&path).unwrap().into();
        let pid = spawn(&SpawnSpec {
            program,
            args,
            env: &[],
            cwd,
            stdout: &out,
            stderr: &out,
            cgroup_procs: &[],
            ids: None,
            stdin: None,
            namespaces: None,
        })
        .unwrap();
        let status = wait(pid);
        (status, std::fs::read_to_string(&path).unwrap())
    }

    #[test]
    fn runs_in_a_new_session_with_env_cwd_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let out: OwnedFd = std::fs::File::create(dir.path().join("out"))
            .unwrap()
            .into();
        let err: OwnedFd = std::fs::File::create(dir.path().join("err"))
            .unwrap()
            .into();
        let env = vec![
            (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
            (OsString::from("X_TEST"), OsString::from("hello world")),
        ];
        let args = vec![
            "-c".to_string(),
            "echo \"$X_TEST\" $(pwd) $(cut -d' ' -f6 /proc/$$/stat) $$; read x || echo eof >&2"
                .to_string(),
        ];
        let pid = spawn(&SpawnSpec {
            program: "sh",
            args: &args,
            env: &env,
            cwd: dir.path(),
            stdout: &out,
            stderr: &err,
            cgroup_procs: &[],
            ids: None,
            stdin: None,
            namespaces: None,
        })
        .unwrap();
        assert_eq!(wait(pid), 0);
        let o = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let f: Vec<&str> = o.split_whitespace().collect();
        assert_eq!(f[0..2], ["hello", "world"]);
        assert_eq!(
            std::fs::canonicalize(f[2]).unwrap(),
            std::fs::canonicalize(dir.path()).unwrap()
        );
        assert_eq!(f[3], f[4], "session leader: sid == pid");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("err")).unwrap(),
            "eof\n"
        );
    }

    #[test]
    fn errors_are_reported_and_the_child_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let out: OwnedFd = std::fs::File::create(dir.path().join("out"))
            .unwrap()
            .into();
        let spec = |program: &'static str, cwd: PathBuf| (program, cwd);
        for (program, cwd) in [
            spec("/nonexistent/program", dir.path().to_path_buf()),
            spec("no-such-program-anywhere", dir.path().to_path_buf()),
            spec("/bin/true", dir.path().join("missing-dir")),
        ] {
            let r = spawn(&SpawnSpec {
                program,
                args: &[],
                env: &[(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))],
                cwd: &cwd,
                stdout: &out,
                stderr: &out,
                cgroup_procs: &[],
                ids: None,
                stdin: None,
                namespaces: None,
            });
            let e = r.expect_err(program);
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{program}: {e}");
        }
    }

    #[test]
    fn agents_get_the_original_open_files_limit() {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit on local structs.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
            l.rlim_cur = l.rlim_max.min(1000);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
        }
        let raised = raise_nofile_limit();
        assert_eq!(raised, l.rlim_max);
        let dir = tempfile::tempdir().unwrap();
        let (status, got) = run_captured(
            "/bin/sh",
            &["-c".to_string(), "ulimit -n".to_string()],
            dir.path(),
        );
        assert_eq!(status, 0);
        assert_eq!(got.trim(), l.rlim_cur.min(l.rlim_max).to_string());
    }

    #[test]
    fn runs_under_its_own_uid_without_groups_or_privileges() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("out");
        let out: OwnedFd = std::fs::File::create(&path).unwrap().into();
        let script = "echo $(id -u) $(id -g) $(id -G) $(grep NoNewPrivs /proc/self/status | cut -f2) $(umask); cat secret || echo refused";
        let args = ["-c".to_string(), script.to_string()];
        let pid = spawn(&SpawnSpec {
            program: "/bin/sh",
            args: &args,
            env: &[(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))],
            cwd: dir.path(),
            stdout: &out,
            stderr: &out,
            cgroup_procs: &[],
            ids: Some((2_100_000_007, 2_100_000_008)),
            stdin: None,
            namespaces: None,
        })
        .unwrap();
        assert_eq!(wait(pid), 0);
        let got = std::fs::read_to_string(&path).unwrap();
        let mut lines = got.lines();
        assert_eq!(
            lines.next().unwrap(),
            "2100000007 2100000008 2100000008 1 0022"
        );
        assert!(
            got.contains("Permission denied") && got.ends_with("refused\n"),
            "{got}"
        );
    }

    /// A bare program name is looked up in the instance's `PATH` as the instance sees the
    /// files: a directory of that `PATH` it cannot enter is as if it held nothing, so the
    /// start runs the next one's program (as for a missing file) instead of failing on what
    /// only root could see there. The server's own lookup (no uid switch) is root's.
    #[test]
    fn a_bare_program_name_is_looked_up_as_the_instance() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let hidden = dir.path().join("hidden");
        std::fs::create_dir(&hidden).unwrap();
        std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(hidden.join("true"), "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(hidden.join("true"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let env = [(
            OsString::from("PATH"),
            OsString::from(format!("{}:/usr/bin:/bin", hidden.display())),
        )];
        let out: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let plan = |ids| {
            prepare(&SpawnSpec {
                program: "true",
                args: &[],
                env: &env,
                cwd: Path::new("/"),
                stdout: &out,
                stderr: &out,
                cgroup_procs: &[],
                ids,
                stdin: None,
                namespaces: None,
            })
            .unwrap()
            .args
            .path
        };
        let as_instance = plan(Some((2_100_000_011, 2_100_000_011)));
        assert!(
            !as_instance
                .to_string_lossy()
                .starts_with(&*hidden.to_string_lossy()),
            "{as_instance:?}"
        );
        assert!(as_instance.to_string_lossy().ends_with("/true"));
        let as_server = plan(None);
        assert_eq!(
            as_server.to_str().unwrap(),
            hidden.join("true").to_str().unwrap()
        );
    }

    /// Where a seccomp filter refuses keyrings (Docker's default profile, for a server in a
    /// container), an instance under its own uid still starts: it inherits the filter, so it
    /// has no keyring to be given fresh. Here the filter is on this test's thread alone.
    #[test]
    fn an_instance_starts_where_a_seccomp_filter_refuses_keyrings() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let code = std::thread::spawn(|| {
            // ld [nr]; jeq keyctl ? errno(EPERM) : allow.
            let stmt = |code: u16, k: u32, jf: u8| libc::sock_filter { code, jt: 0, jf, k };
            let mut prog = [
                stmt(0x20, 0, 0),
                stmt(0x15, libc::SYS_keyctl as u32, 1),
                stmt(0x06, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32, 0),
                stmt(0x06, libc::SECCOMP_RET_ALLOW, 0),
            ];
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_mut_ptr(),
            };
            // SAFETY: prctl and seccomp with a valid program, on this thread.
            unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                let set = libc::SECCOMP_SET_MODE_FILTER;
                let p = &fprog as *const libc::sock_fprog;
                assert_eq!(libc::syscall(libc::SYS_seccomp, set, 0, p), 0);
            }
            let out: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            let args = ["-c".to_string(), "exit 7".to_string()];
            let pid = spawn(&SpawnSpec {
                program: "/bin/sh",
                args: &args,
                env: &[],
                cwd: Path::new("/"),
                stdout: &out,
                stderr: &out,
                cgroup_procs: &[],
                ids: Some((2_100_000_009, 2_100_000_009)),
                stdin: None,
                namespaces: None,
            })
            .expect("spawn under a filter refusing keyctl");
            wait(pid)
        })
        .join()
        .unwrap();
        assert!(
            libc::WIFEXITED(code) && libc::WEXITSTATUS(code) == 7,
            "{code}"
        );
    }

    #[test]
    fn scripts_without_shebang_run_through_sh() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "echo from-script \"$1\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (status, got) = run_captured("./s", &["arg1".to_string()], dir.path());
        assert_eq!(status, 0);
        assert_eq!(got, "from-script arg1\n");
    }
}
