//! The fork server ("zygote") for `local:` Python bots.
//!
//! Starting a Python Pipecat bot costs most of a second of imports (`pipecat`, `fastapi`,
//! `uvicorn`, the bot module). So the process runtime keeps, per agent, one process that has
//! done them once: the bundled runner started as `cattery_runner.py --zygote`, under the
//! deployment's environment and secrets (minus the per-session `CATTERY_SESSION_ID`), in a cgroup
//! of its own. Every instance is then a `fork()` of it: a fresh process per session (no state
//! carried between sessions), sharing the imported code's memory copy-on-write.
//!
//! One instance start, over the `SOCK_SEQPACKET` socket that is the zygote's stdin:
//!
//! 1. the server sends `{"id", "env", "cwd"}` with three descriptors: the instance's stdout and
//!    stderr capture files, and the read end of a "go" pipe;
//! 2. the zygote forks; the child calls `setsid()` and blocks reading the go pipe; the zygote
//!    answers `pid <id> <pid>`;
//! 3. the server writes that pid into each of the instance's `cgroup.procs` (v2, and the v1
//!    limit controllers), then writes one byte to the go pipe. Only then does the child take
//!    its stdio, working directory and environment and run the bot's code: no code of the
//!    instance runs outside its cgroups. If the join fails the server closes the pipe unwritten
//!    (no signal by pid: the zygote reaps the child, so its pid may be reused): the child exits
//!    127 on end of file without running anything.
//!
//! The zygote reaps its children and reports `exit <pid> <code> <signal>`; a child whose zygote
//! is gone is re-parented to the server (a child subreaper), whose reaper then sees its exit.
//! Either way the status reaches the instance through [`Reaper`]. After a control-plane
//! restart, forked instances are re-adopted like spawned ones (pid and start time).
//!
//! A zygote is keyed by everything that shapes its import: the deployment (every deployment is
//! new code: a redeploy, forced or not, reads the bot directory again), program, arguments,
//! working directory and environment. A start whose key differs from its agent's zygote (a
//! redeploy, changed secrets) starts a new zygote and retires the old one (its socket is shut,
//! so it exits; its cgroup is killed and removed; one still importing the bot is killed).
//! Instances forked from the old one run on in their own cgroups. A zygote also exits by
//! itself after `CATTERY_ZYGOTE_IDLE_SECONDS` (600) without a start.
//!
//! A zygote imports the bot on a thread of its own, for up to [`READY_TIMEOUT`]; meanwhile the
//! starts of its key wait for it (no thread each), every one only until the engine abandons
//! it (its start timeout, a stop: `InstanceSpec::abandoned`). The import goes on for the
//! starts that follow; if it fails or times out, they are spawned.
//!
//! Forking is refused, and the agent's instances are spawned as before, when: the fork server
//! is turned off (`--python-fork-server off`); the machine has no writable cgroup v2 (a forked
//! child's environment is not visible in `/proc/<pid>/environ`, which the cgroup-less cleanup
//! relies on); or the bot is unsafe to fork: threads alive after its import (the runner's
//! `fork_unsafe_reason`). The reason goes to the server log and the instance's own log.
//!
//! Separation (`docs/security.md`): the zygote never runs as root. When instances get uids of
//! their own, the zygote runs under one uid allocated for it, and every instance forked from it
//! shares that uid (the uid is held until the zygote and its last instance are gone): instances
//! of one agent's deployment are not separated from each other, while instances of different
//! agents still are.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendmsg, shutdown, socketpair, AddressFamily, ControlMessage, MsgFlags, Shutdown,
    SockFlag, SockType,
};
use parking_lot::Mutex;

use super::reaper::Reaper;
use crate::runtime::ExitInfo;

/// How long a zygote may take to import the bot before starts fall back to spawning. A start
/// waits for it at most until its own start timeout (the engine then abandons it); the zygote
/// goes on importing for the starts that follow.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fork may take to be answered.
const FORK_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the fork server is used (`--python-fork-server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkServerMode {
    /// For every `local:` agent, where the machine allows (the default).
    On,
    /// Never: every instance is spawned.
    Off,
}

impl std::str::FromStr for ForkServerMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(ForkServerMode::On),
            "off" => Ok(ForkServerMode::Off),
            _ => Err(format!("{s:?}: expected on or off")),
        }
    }
}

/// What the runtime knows when it decides how to start an instance.
#[derive(Debug, Clone, Copy)]
pub struct ForkInputs<'a> {
    /// The configured mode.
    pub mode: ForkServerMode,
    /// The instance runs the bundled runner (a `local:` agent).
    pub runs_runner: bool,
    /// The agent is known.
    pub has_agent: bool,
    /// The machine has a writable cgroup v2.
    pub cgroup_v2: bool,
    /// Why this agent's current zygote refused to fork, if it did.
    pub unsafe_reason: Option<&'a str>,
}

/// Whether an instance is forked from a zygote: `Ok(())`, or why it is spawned. `None` in the
/// error: spawned without anything worth reporting (not a `local:` agent, or turned off).
pub fn fork_decision(i: &ForkInputs<'_>) -> Result<(), Option<String>> {
    if i.mode == ForkServerMode::Off || !i.runs_runner || !i.has_agent {
        return Err(None);
    }
    if !i.cgroup_v2 {
        return Err(Some(
            "no writable cgroup v2 on this machine, which forked instances need".into(),
        ));
    }
    if let Some(r) = i.unsafe_reason {
        return Err(Some(format!("the bot is not safe to fork: {r}")));
    }
    Ok(())
}

/// What each agent's fork server is doing, for its status (`forkServer` in
/// `GET /v1/agents/{name}`): written where the runtime decides how to start an instance.
#[derive(Default)]
pub struct Statuses {
    by_agent: Mutex<HashMap<uuid::Uuid, Entry>>,
}

enum Entry {
    Starting,
    Ready(std::sync::Weak<Zygote>),
    Fallback(String),
    Off,
}

impl Statuses {
    /// Records the outcome of [`fork_decision`] (or of a fork server's start) for `agent`:
    /// `Ok` with the fork server instances are forked from; `Err(None)` only matters when the
    /// fork server is turned off; `Err(Some(reason))` is a fallback.
    pub fn record(
        &self,
        agent: uuid::Uuid,
        mode: ForkServerMode,
        outcome: Result<&Arc<Zygote>, Option<&str>>,
    ) {
        let e = match outcome {
            Ok(z) => Entry::Ready(Arc::downgrade(z)),
            Err(Some(r)) => Entry::Fallback(r.to_string()),
            Err(None) if mode == ForkServerMode::Off => Entry::Off,
            Err(None) => return,
        };
        self.by_agent.lock().insert(agent, e);
    }

    /// `agent`'s fork server is importing the bot.
    pub fn starting(&self, agent: uuid::Uuid) {
        self.by_agent.lock().insert(agent, Entry::Starting);
    }

    /// The status of `agent`'s fork server, if this runtime has decided anything about it.
    pub fn get(&self, agent: uuid::Uuid) -> Option<crate::runtime::ForkServerStatus> {
        use crate::runtime::{ForkServerState as S, ForkServerStatus};
        let m = self.by_agent.lock();
        let st = |state, reason: Option<String>, pid| ForkServerStatus { state, reason, pid };
        Some(match m.get(&agent)? {
            Entry::Starting => st(S::Starting, None, None),
            Entry::Ready(z) => match z.upgrade() {
                Some(z) if z.alive() => st(S::Ready, None, Some(z.pid)),
                _ => st(
                    S::Fallback,
                    Some("the fork server exited; the next start starts a new one".into()),
                    None,
                ),
            },
            Entry::Fallback(r) => st(S::Fallback, Some(r.clone()), None),
            Entry::Off => st(
                S::Off,
                Some(
                    "the fork server is turned off on this node (--python-fork-server off)".into(),
                ),
                None,
            ),
        })
    }
}

/// The zygote key of an instance: a hash of what its import can depend on (everything but the
/// instance's own variables, which its child gets after the fork), and of its deployment: the
/// bot's files are read at the import, and a new deployment of the same directory (a
/// redeploy after an edit) must import them again.
pub fn zygote_key(
    deployment: Option<uuid::Uuid>,
    program: &str,
    args: &[String],
    working_dir: Option<&Path>,
    env: &[(String, String)],
) -> u64 {
    let mut h = DefaultHasher::new();
    deployment.hash(&mut h);
    program.hash(&mut h);
    args.hash(&mut h);
    working_dir.hash(&mut h);
    let mut env: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k != "CATTERY_SESSION_ID")
        .collect();
    env.sort();
    env.hash(&mut h);
    h.finish()
}

/// Fork requests waiting for their answer, by request id.
type Pending = Arc<Mutex<HashMap<u64, mpsc::SyncSender<Result<i32, String>>>>>;

/// A live fork server.
pub struct Zygote {
    /// Its key ([`zygote_key`]).
    pub key: u64,
    /// Its pid.
    pub pid: i32,
    /// The uid it runs under when instances get uids of their own.
    pub uid: Option<u32>,
    /// Its directory (home, tmp, output).
    pub dir: PathBuf,
    /// Its cgroup v2 directory.
    pub cgroup: Option<PathBuf>,
    ctl: OwnedFd,
    pending: Pending,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    send: Mutex<()>,
}

/// How a zygote's start ended.
pub enum Started {
    /// Ready to fork.
    Ready(Zygote),
    /// It imported the bot but refuses to fork it (the reason); it has exited.
    Unsafe(String),
    /// It failed (the reason, and the bot's last line of stderr, if any); starts fall back to
    /// spawning, which reports the bot's error. The bot's output goes to the agent's status,
    /// never to the server's own log (it may hold what the bot printed of its secrets).
    Failed(String, Option<String>),
}

/// Creates the control socket pair: (server end, zygote end). Both close-on-exec (the zygote's
/// end becomes its stdin through `dup2`, which clears the flag there).
pub fn control_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// Receives one message (empty: end of file).
fn recv_msg(fd: RawFd) -> std::io::Result<String> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv(fd, &mut buf, MsgFlags::empty()) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits up to `timeout` for `fd` to be readable.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
        .unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, ms), Ok(n) if n > 0)
}

impl Zygote {
    /// Waits for a just-spawned zygote (`pid`, whose control socket is `ctl`) to report, and
    /// starts its reader thread when it is ready.
    pub fn await_ready(
        ctl: OwnedFd,
        key: u64,
        pid: i32,
        uid: Option<u32>,
        dir: PathBuf,
        cgroup: Option<PathBuf>,
        reaper: Arc<Reaper>,
    ) -> Started {
        if !wait_readable(&ctl, READY_TIMEOUT) {
            return Started::Failed(
                format!(
                    "the fork server did not import the bot within {} s",
                    READY_TIMEOUT.as_secs()
                ),
                None,
            );
        }
        let first = match recv_msg(ctl.as_raw_fd()) {
            Ok(m) => m,
            Err(e) => return Started::Failed(format!("fork server: {e}"), None),
        };
        if let Some(r) = first.strip_prefix("unsafe ") {
            return Started::Unsafe(r.to_string());
        }
        if first != "ready" {
            return Started::Failed(
                if first.is_empty() {
                    "the fork server exited before it was ready".into()
                } else {
                    format!("the fork server reported {first:?}")
                },
                None,
            );
        }
        let z = Zygote {
            key,
            pid,
            uid,
            dir,
            cgroup,
            ctl,
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            dead: Arc::new(AtomicBool::new(false)),
            send: Mutex::new(()),
        };
        z.start_reader(reaper);
        Started::Ready(z)
    }

    /// The thread that reads the zygote's answers and its children's exits.
    fn start_reader(&self, reaper: Arc<Reaper>) {
        let Ok(fd) = self.ctl.try_clone() else {
            self.dead.store(true, Ordering::SeqCst);
            return;
        };
        let pending = self.pending.clone();
        let dead = self.dead.clone();
        let pid = self.pid;
        let spawned = std::thread::Builder::new()
            .name(format!("zygote-{pid}"))
            .spawn(move || {
                loop {
                    let msg = match recv_msg(fd.as_raw_fd()) {
                        Ok(m) if !m.is_empty() => m,
                        _ => break,
                    };
                    let mut f = msg.splitn(3, ' ');
                    match (f.next(), f.next(), f.next()) {
                        (Some("pid"), Some(id), Some(p)) => {
                            let tx = id.parse().ok().and_then(|id| pending.lock().remove(&id));
                            if let (Some(tx), Ok(p)) = (tx, p.trim().parse()) {
                                let _ = tx.send(Ok(p));
                            }
                        }
                        (Some("err"), Some(id), rest) => {
                            let tx = id.parse().ok().and_then(|id| pending.lock().remove(&id));
                            if let Some(tx) = tx {
                                let _ = tx.send(Err(rest.unwrap_or("").to_string()));
                            }
                        }
                        (Some("exit"), Some(p), Some(rest)) => {
                            if let Some((p, info)) = parse_exit(p, rest) {
                                reaper.deliver_external(p, info);
                            }
                        }
                        _ => tracing::debug!(zygote = pid, %msg, "unexpected fork server message"),
                    }
                }
                dead.store(true, Ordering::SeqCst);
                for (_, tx) in pending.lock().drain() {
                    let _ = tx.send(Err("the fork server exited".into()));
                }
            });
        if spawned.is_err() {
            self.dead.store(true, Ordering::SeqCst);
        }
    }

    /// Whether it can still fork.
    pub fn alive(&self) -> bool {
        !self.dead.load(Ordering::SeqCst)
    }

    /// Forks one instance: sends the request, waits for the child's pid, calls `join(pid)`
    /// (which moves it into the instance's cgroups), then lets the child run. Errors: the
    /// zygote failed, or `join` did (the child is then told never to run the bot: its go pipe is
    /// closed unwritten).
    pub fn fork(
        &self,
        env: &[(OsString, OsString)],
        cwd: &Path,
        stdout: &OwnedFd,
        stderr: &OwnedFd,
        join: impl FnOnce(i32) -> std::io::Result<()>,
    ) -> std::io::Result<i32> {
        let mut envmap = serde_json::Map::new();
        for (k, v) in env {
            let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
                return Err(std::io::Error::other(
                    "an environment variable is not UTF-8; the fork server takes UTF-8 only",
                ));
            };
            envmap.insert(k.to_string(), v.into());
        }
        let cwd_s = cwd
            .to_str()
            .ok_or_else(|| std::io::Error::other("working directory is not UTF-8"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::json!({"id": id.to_string(), "env": envmap, "cwd": cwd_s});
        let body = serde_json::to_vec(&body).map_err(std::io::Error::other)?;
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (tx, rx) = mpsc::sync_channel(1);
        self.pending.lock().insert(id, tx);
        let sent = {
            let _g = self.send.lock();
            let fds = [stdout.as_raw_fd(), stderr.as_raw_fd(), go_r.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(
                self.ctl.as_raw_fd(),
                &[IoSlice::new(&body)],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
        };
        drop(go_r);
        if let Err(e) = sent {
            self.pending.lock().remove(&id);
            self.dead.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other(format!("fork server: {e}")));
        }
        let pid = match rx.recv_timeout(FORK_TIMEOUT) {
            Ok(Ok(pid)) => pid,
            Ok(Err(e)) => return Err(std::io::Error::other(format!("fork server: {e}"))),
            Err(_) => {
                self.pending.lock().remove(&id);
                return Err(std::io::Error::other("the fork server did not answer"));
            }
        };
        if let Err(e) = join(pid) {
            // No signal by pid (the fork server reaps its children, so the pid may be reused
            // by the time it would arrive): closing `go` unwritten tells the child never to
            // run, and it exits 127 without touching the bot.
            drop(go_w);
            return Err(std::io::Error::new(
                e.kind(),
                format!("joining the instance's cgroup: {e}"),
            ));
        }
        let mut go = std::fs::File::from(go_w);
        go.write_all(b"1")?;
        Ok(pid)
    }

    /// Retires it: shuts its socket (it exits at once; its forked instances live on) and
    /// kills whatever is left in its cgroup. The caller removes its cgroup and directory.
    pub fn retire(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = shutdown(self.ctl.as_raw_fd(), Shutdown::Both);
        if let Some(cg) = &self.cgroup {
            let _ = super::cgroup::kill_all(cg);
        }
    }
}

/// Parses `exit <pid> <code or -> <signal or ->` (after `exit `).
fn parse_exit(pid: &str, rest: &str) -> Option<(i32, ExitInfo)> {
    let pid = pid.parse().ok()?;
    let mut f = rest.split_whitespace();
    let code = f.next()?.parse().ok();
    let signal = f.next()?.parse().ok();
    Some((pid, ExitInfo { code, signal }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> ForkInputs<'static> {
        ForkInputs {
            mode: ForkServerMode::On,
            runs_runner: true,
            has_agent: true,
            cgroup_v2: true,
            unsafe_reason: None,
        }
    }

    #[test]
    fn forks_only_local_runner_agents_when_on_with_cgroups_and_a_safe_bot() {
        assert_eq!(fork_decision(&inputs()), Ok(()));
        for off in [
            ForkInputs {
                mode: ForkServerMode::Off,
                ..inputs()
            },
            ForkInputs {
                runs_runner: false,
                ..inputs()
            },
            ForkInputs {
                has_agent: false,
                ..inputs()
            },
        ] {
            assert_eq!(fork_decision(&off), Err(None), "{off:?}");
        }
        let no_cg = fork_decision(&ForkInputs {
            cgroup_v2: false,
            ..inputs()
        });
        assert!(matches!(no_cg, Err(Some(r)) if r.contains("cgroup v2")));
        let unsafe_bot = fork_decision(&ForkInputs {
            unsafe_reason: Some("2 threads alive after importing bot.py (t)"),
            ..inputs()
        });
        assert_eq!(
            unsafe_bot,
            Err(Some(
                "the bot is not safe to fork: 2 threads alive after importing bot.py (t)".into()
            ))
        );
        assert_eq!("off".parse(), Ok(ForkServerMode::Off));
        assert!("maybe".parse::<ForkServerMode>().is_err());
    }

    #[test]
    fn the_key_ignores_the_session_id_and_env_order_but_not_secrets_or_the_deployment() {
        let env = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let args = vec!["runner.py".to_string()];
        let dep = Some(uuid::Uuid::from_u128(1));
        let k = |e: &[(&str, &str)]| zygote_key(dep, "python", &args, None, &env(e));
        let base = k(&[("A", "1"), ("KEY", "s1")]);
        assert_eq!(
            base,
            k(&[("KEY", "s1"), ("CATTERY_SESSION_ID", "x"), ("A", "1")])
        );
        assert_ne!(base, k(&[("A", "1"), ("KEY", "s2")]));
        // A redeploy, nothing else changed (`forceRedeploy`): new code to import.
        let redeployed = Some(uuid::Uuid::from_u128(2));
        assert_ne!(
            base,
            zygote_key(
                redeployed,
                "python",
                &args,
                None,
                &env(&[("A", "1"), ("KEY", "s1")])
            )
        );
        assert_ne!(
            base,
            zygote_key(
                dep,
                "python3.12",
                &args,
                None,
                &env(&[("A", "1"), ("KEY", "s1")])
            )
        );
    }

    #[test]
    fn exit_reports_parse() {
        assert_eq!(
            parse_exit("12", "0 -"),
            Some((
                12,
                ExitInfo {
                    code: Some(0),
                    signal: None
                }
            ))
        );
        assert_eq!(
            parse_exit("7", "- 9"),
            Some((
                7,
                ExitInfo {
                    code: None,
                    signal: Some(9)
                }
            ))
        );
        assert_eq!(parse_exit("x", "0 -"), None);
    }
}
