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
}
