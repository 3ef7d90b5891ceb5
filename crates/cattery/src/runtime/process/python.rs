//! What the process runtime runs for a deployment: its `command`, or the bundled Python runner
//! for `image: "local:<dir>"` bots, and the deploy-time check that the chosen Python can
//! import what the runner needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::isolation::Isolation;
use super::reaper::Reaper;
use crate::model::DeploymentRecord;
use crate::runtime::{ExitInfo, Prepared};

/// How long a successful import check of one interpreter is remembered.
const DEPS_OK_FOR: Duration = Duration::from_secs(60);

/// The Python runner for `local:` bots: which interpreter by default, where the runner is,
/// and the interpreters already found able to run it.
#[derive(Debug)]
pub struct PythonRunner {
    /// Python interpreter for `local:` agents when neither the agent nor the bot dir names one.
    pub python: String,
    /// Path of the bundled Python runner.
    pub runner_path: PathBuf,
    /// Interpreters whose imports succeeded, and when (only successes are remembered).
    checked: Mutex<HashMap<String, Instant>>,
}

impl Default for PythonRunner {
    fn default() -> Self {
        PythonRunner::new("python3".into(), PathBuf::from("cattery_runner.py"))
    }
}

impl PythonRunner {
    /// A runner setting: default interpreter and the runner's path.
    pub fn new(python: String, runner_path: PathBuf) -> Self {
        PythonRunner {
            python,
            runner_path,
            checked: Mutex::new(HashMap::new()),
        }
    }

    /// Program, arguments, working directory and extra env of a deployment's instances.
    pub fn prepare(&self, dep: &DeploymentRecord) -> Result<Prepared, String> {
        let spec = &dep.spec;
        if let Some(cmd) = &spec.command {
            let (p, a) = cmd.split_first().ok_or("command is empty")?;
            return Ok(Prepared {
                program: p.clone(),
                args: a.to_vec(),
                working_dir: spec.working_dir.as_ref().map(PathBuf::from),
                env: vec![],
            });
        }
        match (spec.local_dir(), spec.image.as_deref()) {
            (Some(dir), _) => {
                let dir = PathBuf::from(dir);
                if let Some(problem) = local_dir_problem(&dir) {
                    return Err(problem);
                }
                let venv = dir.join(".venv/bin/python");
                let python = spec
                    .python
                    .clone()
                    .or_else(|| venv.is_file().then(|| venv.display().to_string()))
                    .unwrap_or_else(|| self.python.clone());
                Ok(Prepared {
                    program: python,
                    args: vec![self.runner_path.display().to_string()],
                    working_dir: Some(dir.clone()),
                    env: vec![
                        ("CATTERY_BOT_DIR".into(), dir.display().to_string()),
                        ("PYTHONUNBUFFERED".into(), "1".into()),
                    ],
                })
            }
            (None, Some(img)) => Err(format!(
                "image {img} needs a container runtime; this server runs the process runtime \
                 (use \"command\", or \"image\": \"local:<dir with bot.py>\")"
            )),
            (None, None) => Err("neither command nor image is set".into()),
        }
    }

    /// Whether `python` can import the runner's own dependencies; `Some(reason)` when it
    /// cannot. Runs `python -c "import fastapi, uvicorn"` (a few hundred ms) off the async
    /// worker's scheduling slot (`block_in_place`); a success is remembered per interpreter
    /// for [`DEPS_OK_FOR`] (a failure is checked again: the user fixes the environment and
    /// deploys again).
    ///
    /// The interpreter is the org's choice (the agent's `python`, the bot directory's
    /// `.venv`, a build's virtualenv whose packages the org chose), so it runs as an instance
    /// would ([`run_import_check`]): never as the server.
    pub fn deps_missing(&self, python: &str, iso: &Isolation) -> Option<String> {
        if let Some(at) = self.checked.lock().get(python) {
            if at.elapsed() < DEPS_OK_FOR {
                return None;
            }
        }
        let r = match run_import_check(python, iso) {
            Ok((exit, _)) if exit.success() => None,
            Ok((_, stderr)) => {
                let err = String::from_utf8_lossy(&stderr);
                let last = err
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_string();
                Some(format!(
                    "{python} cannot import fastapi and uvicorn, which the Python runner needs ({last}); \
                     install them in the bot's environment (docs/python-runner.md)"
                ))
            }
            Err(e) => Some(format!("cannot run {python}: {e}")),
        };
        if r.is_none() {
            self.checked
                .lock()
                .insert(python.to_string(), Instant::now());
        }
        r
    }
}

/// Runs the import check. Through the reaper: it reaps every child of this process, so a
/// plain `Command::output()` could find its child already reaped (ECHILD).
///
/// The interpreter and what it imports at start (a `.pth` file, `sitecustomize`) are the
/// org's code, so the check gets what an instance gets and no more: an environment from the
/// allowlist (never the server's, which may hold its database URL or Daily key), and, when
/// instances run under uids of their own, a uid of that pool with no supplementary groups and
/// `no_new_privs`, in a private mount namespace; whatever it leaves running is killed
/// before the uid is given back. Without a free uid the check is skipped (the first start
/// reports what is missing).
fn run_import_check(python: &str, iso: &Isolation) -> std::io::Result<(ExitInfo, Vec<u8>)> {
    let run = || {
        let mut cmd = std::process::Command::new(python);
        cmd.args(["-c", "import fastapi, uvicorn"])
            .env_clear()
            .envs(super::isolation::instance_env(&[], &[]))
            .current_dir("/")
            .stdin(std::process::Stdio::null());
        let Some(pool) = &iso.uids else {
            return Reaper::global().output(&mut cmd, Duration::from_secs(60));
        };
        let Ok(uid) = pool.allocate() else {
            return Ok((ExitInfo::default(), Vec::new()));
        };
        let plan = iso.namespaces.as_ref().map(|ns| {
            ns.plan(
                [std::ffi::OsStr::new(python)],
                [],
                super::namespace::BuildView::Run,
            )
        });
        as_uid(&mut cmd, uid, plan);
        let r = Reaper::global().output(&mut cmd, Duration::from_secs(60));
        match super::uids::end_processes_of(uid) {
            Ok(()) => pool.release(uid),
            Err(e) => {
                tracing::warn!(uid, error = %e, "the import check left processes that would not end; its uid stays held")
            }
        }
        r
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run)
        }
        _ => run(),
    }
}

/// Makes `cmd` run under `uid` (and gid), without supplementary groups and with
/// `no_new_privs`, in the namespace `plan` makes (as root, before the switch).
fn as_uid(cmd: &mut std::process::Command, uid: u32, plan: Option<super::namespace::Plan>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe system calls between fork and exec, on data made before
    // the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if let Some(plan) = &plan {
                super::namespace::enter(plan, &super::namespace::NixSys)
                    .map_err(std::io::Error::from_raw_os_error)?;
            }
            let no_groups: *const libc::gid_t = std::ptr::null();
            if libc::syscall(libc::SYS_setgroups, 0 as libc::size_t, no_groups) != 0
                || libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::chdir(c"/".as_ptr()) != 0
            {
                return fail();
            }
            super::spawn::fresh_keyrings(super::spawn::libc_keyctl)
                .map_err(std::io::Error::from_raw_os_error)
        });
    }
}

/// Why `dir`, a `local:` image's directory, cannot run. One message whether it is missing, a
/// file or a directory without `bot.py`: a deployer learns no more of the host's files.
fn local_dir_problem(dir: &Path) -> Option<String> {
    (!dir.join("bot.py").is_file()).then(|| {
        format!(
            "{} is not a directory holding a bot.py (`local:` names the bot's directory)",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::local_dir_problem;

    /// A missing path, a file and a directory without `bot.py` get the same message,
    /// which says what `local:` needs (it said "has no bot.py" of a missing directory).
    #[test]
    fn a_local_dir_problem_says_what_is_needed() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let says = |p: &std::path::Path| local_dir_problem(p).unwrap_or_default();
        let want = "is not a directory holding a bot.py (`local:` names the bot's directory)";
        assert!(says(&dir.join("nope")).ends_with(want));
        assert!(says(dir).ends_with(want));
        std::fs::write(dir.join("bot.py"), "").unwrap();
        assert_eq!(local_dir_problem(dir), None);
        assert!(says(&dir.join("bot.py")).ends_with(want));
    }
}
