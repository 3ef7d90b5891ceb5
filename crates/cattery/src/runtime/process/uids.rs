//! One unprivileged uid (and gid, the same number) per instance, from a configured range.
//!
//! A uid is held machine-wide while its instance lives: an exclusive `flock` on
//! `<lock root>/uids/<uid>.lock` (see [`super::locks`]), so servers sharing a machine never
//! hand out the same one. The lock file says `in use` while held and is emptied on release.
//! The kernel drops the lock when a server dies, but its instances may live on (waiting to
//! be re-adopted): a lock that is free while its file still says `in use` is therefore only
//! taken over once no process runs under that uid. A restarted server re-adopts its
//! instances' uids (read from the owner of each instance's home directory).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

use nix::fcntl::Flock;
use parking_lot::Mutex;

/// Default range: far above the users, `/etc/subuid` ranges (useradd hands out 100000 up to
/// 600100000) and systemd's container ranges (524288..=1879048191), below its foreign range
/// (2147352576..) and below 2^31 (some tools take uids as signed).
pub const DEFAULT_RANGE: UidRange = UidRange {
    start: 2_000_000_000,
    end: 2_000_065_535,
};

const IN_USE: &[u8] = b"in use\n";

/// An inclusive range of uids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// First uid.
    pub start: u32,
    /// Last uid.
    pub end: u32,
}

impl std::str::FromStr for UidRange {
    type Err = String;

    /// `START-END`, both inclusive, `0 < START <= END < 2^32 - 1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected START-END, e.g. 2000000000-2000065535"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: {v:?} is not a uid"))
        };
        let r = UidRange {
            start: num(a)?,
            end: num(b)?,
        };
        if r.start == 0 || r.start > r.end || r.end == u32::MAX {
            return Err(format!(
                "{s:?}: need 0 < START <= END < 4294967295 (root and -1 are never instance uids)"
            ));
        }
        Ok(r)
    }
}

impl UidRange {
    /// Whether `uid` is in the range.
    pub fn contains(&self, uid: u32) -> bool {
        (self.start..=self.end).contains(&uid)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// The uids of one server's live instances, each with its machine-wide lock.
pub struct UidPool {
    range: UidRange,
    lock_dir: PathBuf,
    held: Mutex<HashMap<u32, Flock<File>>>,
    /// Extra holders of a held uid beyond the first: the instances forked from one
    /// deployment's fork server share its uid (`runtime/process/zygote.rs`).
    shares: Mutex<HashMap<u32, usize>>,
}

/// Whether any process runs under `uid` (its `/proc/<pid>` directory is owned by it).
pub(crate) fn uid_has_processes(uid: u32) -> bool {
    let Ok(rd) = fs::read_dir("/proc") else {
        return true;
    };
    rd.flatten().any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok())
            && e.metadata().is_ok_and(|m| m.uid() == uid)
    })
}

/// Kills every process of `uid` (what a program run under it left behind, detached into a
/// session of its own): `kill(-1, SIGKILL)` sent by a process running as `uid` reaches
/// exactly that uid's processes, all at once; repeated until `/proc` shows none. Blocking.
/// Errors: some still run after a few seconds.
pub(crate) fn end_processes_of(uid: u32) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    for _ in 0..200 {
        if !uid_has_processes(uid) {
            return Ok(());
        }
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.env_clear()
            .args(["-c", "kill -9 -1"])
            .uid(uid)
            .gid(uid)
            .current_dir("/")
            .stdin(std::process::Stdio::null());
        super::reaper::Reaper::global()
            .output(&mut cmd, std::time::Duration::from_secs(10))
            .map_err(|e| format!("cannot end the processes of uid {uid}: {e}"))?;
        // Killed processes are reaped by their parents (the server's reaper, for one whose
        // parent died): their `/proc` entries go soon after.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(format!("processes of uid {uid} still run after SIGKILL"))
}

/// Runs `f` on a thread of its own that sees files as `uid` (and gid `uid`, with no
/// supplementary groups) would: its filesystem uid and gid are switched, which also drops the
/// capabilities that bypass file permissions (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`...),
/// so a `stat` or an `open` there answers what an instance's would. Only that thread changes
/// (`setfsuid`, `setfsgid` and the raw `setgroups` system call are per thread on Linux; the
/// C library's `setgroups` would change every thread of the server), and it ends with `f`.
/// Errors: the identity could not be taken (then `f` did not run).
pub(crate) fn with_fs_identity<T: Send>(
    uid: u32,
    f: impl FnOnce() -> T + Send,
) -> std::io::Result<T> {
    with_fs_ids(uid, uid, f)
}

/// [`with_fs_identity`] with gid `gid`.
pub(crate) fn with_fs_ids<T: Send>(
    uid: u32,
    gid: u32,
    f: impl FnOnce() -> T + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("fs-identity".into())
            .spawn_scoped(s, move || {
                let no_groups: *const libc::gid_t = std::ptr::null();
                // SAFETY: system calls on this thread's own credentials, with plain values.
                let took = unsafe {
                    libc::syscall(libc::SYS_setgroups, 0 as libc::size_t, no_groups) == 0 && {
                        libc::syscall(libc::SYS_setfsgid, gid);
                        libc::syscall(libc::SYS_setfsuid, uid);
                        // An invalid id changes nothing and answers the current one.
                        libc::syscall(libc::SYS_setfsgid, u32::MAX) == i64::from(gid)
                            && libc::syscall(libc::SYS_setfsuid, u32::MAX) == i64::from(uid)
                    }
                };
                if !took {
                    return Err(std::io::Error::other(format!(
                        "cannot take uid {uid}'s view of the files"
                    )));
                }
                Ok(f())
            })?
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the check's thread panicked")))
    })
}

impl UidPool {
    /// A pool over `range`, with its locks in `lock_dir`.
    pub fn new(range: UidRange, lock_dir: PathBuf) -> UidPool {
        UidPool {
            range,
            lock_dir,
            held: Mutex::new(HashMap::new()),
            shares: Mutex::new(HashMap::new()),
        }
    }

    /// The range.
    pub fn range(&self) -> UidRange {
        self.range
    }

    /// Takes `uid` if no live instance (of any server) has it.
    fn try_take(&self, uid: u32, held: &mut HashMap<u32, Flock<File>>) -> bool {
        if held.contains_key(&uid) {
            return false;
        }
        let path = self.lock_dir.join(format!("{uid}.lock"));
        let Some(mut lock) = super::locks::lock_file(&path, false) else {
            return false;
        };
        // One byte says whether the file is empty (no size query and no read to the end:
        // two system calls fewer per start).
        let mut first = [0u8; 1];
        let was_empty = !matches!(lock.read(&mut first), Ok(n) if n > 0);
        // Left `in use` by a server that died: its instance may still run.
        if !was_empty && uid_has_processes(uid) {
            return false;
        }
        // Not synced to disk: the mark only has to outlive this server (the page cache keeps
        // it), not the machine; a reboot ends the instance too. (A sync here was a disk
        // flush per instance start.)
        let ok = lock.set_len(0).is_ok() && lock.write_all_at(IN_USE, 0).is_ok();
        if ok {
            held.insert(uid, lock);
        }
        ok
    }

    /// A uid no live instance has, chosen at random in the range. Errors: none is free.
    pub fn allocate(&self) -> std::io::Result<u32> {
        let span = u64::from(self.range.end - self.range.start) + 1;
        let first = rand::random::<u64>() % span;
        let mut held = self.held.lock();
        // A stride coprime with most spans spreads the probes; then a plain scan.
        for i in 0..256u64 {
            let uid = self.range.start + ((first + i * 7919) % span) as u32;
            if self.try_take(uid, &mut held) {
                return Ok(uid);
            }
        }
        for i in 0..span {
            let uid = self.range.start + ((first + i) % span) as u32;
            if self.try_take(uid, &mut held) {
                return Ok(uid);
            }
        }
        Err(std::io::Error::other(format!(
            "no free instance uid in {}",
            self.range
        )))
    }

    /// One more holder of `uid`, which this pool holds (an instance forked from a fork server
    /// running under it). Each holder calls [`UidPool::release`] once.
    pub fn share(&self, uid: u32) {
        if self.held.lock().contains_key(&uid) {
            *self.shares.lock().entry(uid).or_default() += 1;
        }
    }

    /// Takes back the uid of a re-adopted instance (its processes already run under it). A
    /// uid already held here (instances forked from one fork server) gains one more holder.
    pub fn adopt(&self, uid: u32) {
        let path = self.lock_dir.join(format!("{uid}.lock"));
        let mut held = self.held.lock();
        if held.contains_key(&uid) {
            *self.shares.lock().entry(uid).or_default() += 1;
            return;
        }
        match super::locks::lock_file(&path, false) {
            Some(lock) => {
                held.insert(uid, lock);
            }
            // Expected in an upgrade (`--on-stop detach`): the previous server of this data dir
            // still runs while it relays its websocket calls, and holds the uids of the
            // instances it started until it exits (a killed server's locks are gone before the
            // data dir is free). The file still says `in use`, so no start takes the uid while
            // the instance runs (`try_take`).
            None => tracing::info!(
                uid,
                "an adopted instance's uid is still locked by the previous server (detached, relaying its websocket calls); it is free once that server exits"
            ),
        }
    }

    /// How many uids are held.
    #[cfg(test)]
    pub fn held_count(&self) -> usize {
        self.held.lock().len()
    }

    /// Releases `uid` once its instance is gone (once its last holder is, when shared).
    pub fn release(&self, uid: u32) {
        let mut held = self.held.lock();
        {
            let mut shares = self.shares.lock();
            if let Some(n) = shares.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    shares.remove(&uid);
                }
                return;
            }
        }
        if let Some(lock) = held.remove(&uid) {
            let _ = lock.set_len(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread of `with_fs_identity` sees files as the uid: a file behind a `0700`
    /// directory is as missing as one that is not there, and one readable by others is read;
    /// the calling thread (a tokio worker, in the server) keeps root's view.
    #[test]
    fn a_uids_view_of_the_files_is_its_own_threads_only() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let hidden = t.path().join("hidden");
        fs::create_dir(&hidden).unwrap();
        fs::set_permissions(&hidden, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(hidden.join("secret"), "x").unwrap();
        fs::write(t.path().join("open"), "y").unwrap();
        fs::set_permissions(t.path().join("open"), fs::Permissions::from_mode(0o644)).unwrap();
        let seen = with_fs_identity(2_000_099_999, || {
            let groups = fs::read_to_string("/proc/thread-self/status").unwrap();
            (
                hidden.join("secret").exists(),
                fs::read_to_string(t.path().join("open")).ok(),
                groups.lines().any(|l| l.trim_end() == "Groups:"),
            )
        })
        .unwrap();
        assert_eq!(seen, (false, Some("y".into()), true));
        assert!(
            hidden.join("secret").exists(),
            "the caller's view is root's"
        );
    }

    #[test]
    fn ranges_parse_and_uids_are_never_shared() {
        assert_eq!(
            "10-20".parse::<UidRange>(),
            Ok(UidRange { start: 10, end: 20 })
        );
        for bad in ["", "5", "0-10", "20-10", "a-b", "1-4294967295"] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        // A range of uids no process has (test processes never run there).
        let range: UidRange = "2100000000-2100000002".parse().unwrap();
        let a = UidPool::new(range, dir.path().to_path_buf());
        let b = UidPool::new(range, dir.path().to_path_buf());
        let mut got = vec![
            a.allocate().unwrap(),
            b.allocate().unwrap(),
            a.allocate().unwrap(),
        ];
        assert!(b.allocate().is_err(), "three uids, three holders");
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 3);
        a.release(got[0]);
        b.release(got[0]);
        // Released by whichever pool held it: free again.
        let again = b.allocate().unwrap();
        assert!(got.contains(&again));
        // A server that died: its locks are gone but their files say `in use`; with no
        // process under those uids they are taken over.
        drop(b);
        let c = UidPool::new(range, dir.path().to_path_buf());
        let taken = c.allocate().unwrap();
        // Its file says `in use` once, from the start, over what it said before.
        let mark = fs::read(dir.path().join(format!("{taken}.lock"))).unwrap();
        assert_eq!(mark, IN_USE);
    }

    #[test]
    fn a_shared_uid_is_freed_by_its_last_holder() {
        let dir = tempfile::tempdir().unwrap();
        let range: UidRange = "2100000010-2100000010".parse().unwrap();
        let pool = UidPool::new(range, dir.path().to_path_buf());
        let u = pool.allocate().unwrap();
        pool.share(u);
        pool.adopt(u);
        pool.release(u);
        pool.release(u);
        assert!(pool.allocate().is_err(), "one holder left");
        pool.release(u);
        assert_eq!(pool.allocate().unwrap(), u);
    }
}
