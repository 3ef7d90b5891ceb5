//! Signals to instance processes, never to a stranger that took a freed pid.
//!
//! A pid names a process only until that process is reaped (by the [`super::reaper`], by a
//! fork server, by a parent inside the instance, by init): from then on the kernel may hand
//! the number to any new process. Every signal the runtime sends goes by one of these rules:
//!
//! 1. A v2 cgroup's `cgroup.kill`: the cgroup is the instance's own.
//! 2. A pidfd ([`send_checked`]): the descriptor pins the process it was opened on, and a
//!    check made after opening it (the pid is in the instance's cgroup, carries its id, or
//!    started when the instance's main process did) is about that same process as long as it
//!    is not reaped yet, which the kernel checks when the signal is sent (`ESRCH` otherwise).
//!    A check that read a stranger (ours was reaped before the descriptor was opened) fails,
//!    and nothing is sent.
//! 3. A pid or process group of a child of this server registered with the reaper, signalled
//!    under the reaper's lock while its status is not delivered yet
//!    ([`super::reaper::Reaper::while_unreaped`]): only the reaper reaps the server's
//!    children, under that lock, so the pid (and the group it leads) still names it.
//!
//! A build step's process group ([`signal_marked_group`]) follows rule 3 while its leader is
//! not reaped and rule 2 after, each member checked for the step's environment marker.
//!
//! A fork server's child that could not join its instance's cgroups is not signalled at all:
//! its `go` pipe closed unwritten tells it never to run ([`super::zygote`]). Signal 0 (an
//! existence probe) sends nothing and is not bound by these rules.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::signal::Signal;

/// A pidfd for `pid`. Errors: `ESRCH` (no such process), `ENOSYS` (a kernel before 5.3).
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a system call with plain integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `sig` to the process of `pidfd`. Errors: `ESRCH` once it is reaped.
pub(super) fn pidfd_send(pidfd: &OwnedFd, sig: Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal on a descriptor we own, with no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `sig` to the process `pid` names if `ours` says it is one of the instance's (rule 2
/// of the module's doc): `ours` runs after a pidfd for `pid` is open and the signal goes
/// through that pidfd, so it reaches the process `ours` looked at or nothing. Returns whether
/// it was sent.
///
/// On a kernel without pidfds (before 5.3), or where a seccomp filter refuses `pidfd_open`
/// (`EPERM`, which the call itself never returns: older container engines' default
/// profiles), `pid` is signalled after `ours` by `kill(2)`, with the reuse window between the
/// two left open: nothing better exists there.
pub fn send_checked(pid: i32, sig: Signal, ours: impl FnOnce() -> bool) -> bool {
    if pid <= 0 {
        return false;
    }
    match pidfd_open(pid) {
        Ok(fd) => ours() && pidfd_send(&fd, sig).is_ok(),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            ours() && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok()
        }
        Err(_) => false,
    }
}

/// Sends `sig` to process group `pgid`, led by a child of this server registered with the
/// reaper whose every process carries the environment entry `marker` (`NAME=value`, set when
/// the leader was spawned, for a step that is not an instance: a build's `pip`): the whole
/// group while the leader is not reaped (rule 3), else each process still in the group that
/// carries `marker`, through a pidfd (rule 2). A process of the group that cleared its
/// environment is then out of reach, as an instance's is without a v2 cgroup. Returns the
/// pids signalled (the leader's for the whole group).
pub fn signal_marked_group(
    reaper: &super::reaper::Reaper,
    pgid: i32,
    marker: &[u8],
    sig: Signal,
) -> Vec<i32> {
    if pgid <= 0 {
        return Vec::new();
    }
    let whole = reaper.while_unreaped(pgid, || {
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig).is_ok()
    });
    if whole == Some(true) {
        return vec![pgid];
    }
    super::pids_in_group(pgid)
        .into_iter()
        .filter(|&p| {
            send_checked(p, sig, || {
                super::process_group(p) == Some(pgid) && super::environ_has(p, marker)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` runs (not a zombie).
    fn runs(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with(['Z', 'X'])))
            .is_some_and(|dead| !dead)
    }

    /// A process whose check fails is not signalled; one whose check passes is. A pid that
    /// names nothing is never checked.
    #[test]
    fn a_signal_goes_only_where_the_check_after_pinning_says() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        assert!(!send_checked(pid, Signal::SIGKILL, || false));
        assert!(runs(pid), "signalled");
        let mut checked = false;
        assert!(send_checked(pid, Signal::SIGKILL, || {
            checked = true;
            true
        }));
        assert!(checked);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while runs(pid) {
            assert!(std::time::Instant::now() < deadline, "not killed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The reaper of another test may have reaped it first.
        let _ = child.wait();
        // A pid above any pid_max names nothing: never checked.
        assert!(!send_checked(0x3fff_0000, Signal::SIGKILL, || panic!(
            "checked"
        )));
    }

    /// Where a seccomp filter refuses `pidfd_open` with `EPERM` (here on this test's thread
    /// alone), a member is still signalled once checked, by `kill(2)`; not when its check
    /// fails.
    #[test]
    fn a_signal_goes_by_pid_where_pidfd_open_is_filtered_out() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        let (checked, sent) = std::thread::spawn(move || {
            // ld [nr]; jeq pidfd_open ? errno(EPERM) : allow. Filters this thread only.
            let mut prog = [
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_pidfd_open as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ALLOW,
                },
            ];
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_mut_ptr(),
            };
            // SAFETY: prctl and seccomp with a valid program, on this thread.
            unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                assert_eq!(
                    libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        &fprog as *const libc::sock_fprog
                    ),
                    0
                );
            }
            assert_eq!(
                pidfd_open(pid).err().and_then(|e| e.raw_os_error()),
                Some(libc::EPERM)
            );
            let refused = send_checked(pid, Signal::SIGKILL, || false);
            assert!(!refused && runs(pid), "signalled though its check failed");
            let mut checked = false;
            let sent = send_checked(pid, Signal::SIGKILL, || {
                checked = true;
                true
            });
            (checked, sent)
        })
        .join()
        .expect("filtered thread");
        assert!(checked, "never checked");
        assert!(sent, "not signalled");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while runs(pid) {
            assert!(std::time::Instant::now() < deadline, "not killed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.wait();
    }

    /// A build step's group: while its leader is not reaped the whole group is signalled;
    /// once it is, only the members that carry the step's marker (a member that cleared its
    /// environment cannot be told from a stranger that took a freed number, and is left).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_marked_group_is_signalled_whole_then_by_its_marked_members() {
        use std::os::unix::process::CommandExt;
        let reaper = super::super::reaper::Reaper::global();
        let step = uuid::Uuid::new_v4().to_string();
        let marker = format!("CATTERY_TEST_STEP={step}");
        let spawn = |script: &str| {
            let mut cmd = std::process::Command::new("/bin/sh");
            cmd.args(["-c", script])
                .env("CATTERY_TEST_STEP", &step)
                .process_group(0);
            reaper
                .spawn_registered(|| {
                    let c = cmd.spawn()?;
                    let pid = c.id() as i32;
                    Ok((c, pid))
                })
                .expect("spawn")
        };
        let gone = |pids: &[i32]| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while pids.iter().any(|&p| runs(p)) {
                assert!(std::time::Instant::now() < deadline, "{pids:?} still run");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let members = |pgid: i32, n: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let m: Vec<i32> = super::super::pids_in_group(pgid)
                    .into_iter()
                    .filter(|&p| runs(p))
                    .collect();
                if m.len() >= n {
                    return m;
                }
                assert!(std::time::Instant::now() < deadline, "{m:?}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };

        // The leader runs: the group as a whole.
        let (_c, pgid, _exit) = spawn("/bin/sleep 30 & wait");
        let all = members(pgid, 2);
        let sent = signal_marked_group(&reaper, pgid, marker.as_bytes(), Signal::SIGKILL);
        assert_eq!(sent, [pgid]);
        gone(&all);

        // The leader exited and is reaped: the marked member, not the one without the marker.
        let (_c, pgid, mut exit) = spawn("/bin/sleep 30 & env -i /bin/sleep 31 & exit 0");
        while exit.borrow_and_update().is_none() {
            exit.changed().await.expect("exit status");
        }
        let left = members(pgid, 2);
        // `env -i` shows the marker in its own environment until it runs `sleep`: wait for
        // both members to be `sleep`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !left.iter().all(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "{left:?} never ran sleep"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let marked: Vec<i32> = left
            .iter()
            .copied()
            .filter(|&p| super::super::environ_has(p, marker.as_bytes()))
            .collect();
        assert_eq!(marked.len(), 1, "{left:?}");
        let sent = signal_marked_group(&reaper, pgid, marker.as_bytes(), Signal::SIGKILL);
        assert_eq!(sent, marked);
        gone(&marked);
        let cleared: Vec<i32> = left.into_iter().filter(|p| !marked.contains(p)).collect();
        assert!(cleared.iter().all(|&p| runs(p)), "signalled {cleared:?}");
        for p in &cleared {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
        }
        gone(&cleared);
    }
}
