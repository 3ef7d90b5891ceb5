//! The local builder: the context becomes a managed `local:` directory with its own
//! virtualenv, built from `requirements.txt` (or `pyproject.toml`'s `[project]
//! dependencies`) with pip.
//!
//! The virtualenv is layered on a base Python environment (`--build-python`, default
//! `--python`) the way a Pipecat Cloud image is layered on `dailyco/pipecat-base`: a `.pth`
//! file puts the base's site-packages after the venv's own, so what the base has (pipecat,
//! the runner's fastapi and uvicorn) is there without a download, and pip installs only what
//! the base lacks or pins differently. pip keeps its usual download cache (`PIP_CACHE_DIR`,
//! else `~/.cache/pip` of the server's user).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Artifact, BuildJob, BuildLog, Builder};
use crate::runtime::process::reaper::Reaper;
use crate::runtime::process::signals;

/// The local virtualenv builder.
#[derive(Debug, Clone)]
pub struct VenvBuilder {
    /// The base environment's interpreter.
    pub base_python: String,
}

/// What one command printed, and how it ended.
struct Ran {
    ok: bool,
    status: String,
    lines: Vec<String>,
}

/// The environment entry that marks a step's processes: `CATTERY_BUILD_STEP=<id>`.
const STEP_MARKER: &str = "CATTERY_BUILD_STEP";

/// Kills a step's process group unless it exited: a build cut short (its time limit)
/// leaves nothing running. The group goes as a whole while its leader is not reaped; after,
/// each process still in it that carries the step's marker
/// ([`signals::signal_marked_group`]): never a stranger given a freed number.
struct KillGroup {
    pgid: i32,
    marker: String,
    exited: bool,
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        if !self.exited {
            signals::signal_marked_group(
                &Reaper::global(),
                self.pgid,
                self.marker.as_bytes(),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs `program args` in `cwd` in a process group of its own, every output line to `log`.
/// The child is spawned and collected through the server's reaper, which reaps every child of
/// the process (a plain wait would find it already reaped).
async fn run(log: &BuildLog, cwd: &Path, program: &str, args: &[String]) -> Result<Ran, String> {
    log.line(&format!("$ {program} {}", args.join(" ")));
    let step = uuid::Uuid::new_v4().to_string();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env(STEP_MARKER, &step)
        .current_dir(cwd)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_NO_INPUT", "1")
        .env("PIP_PROGRESS_BAR", "off")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, pid, mut exit) = Reaper::global()
        .spawn_registered(|| {
            let c = cmd.spawn()?;
            let pid = c.id().map_or(0, |p| p as i32);
            Ok((c, pid))
        })
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut guard = KillGroup {
        pgid: pid,
        marker: format!("{STEP_MARKER}={step}"),
        exited: false,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    type Pipe = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
    let pipes: [Option<Pipe>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as Pipe),
        child.stderr.take().map(|p| Box::new(p) as Pipe),
    ];
    for pipe in pipes.into_iter().flatten() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut lines = Vec::new();
    while let Some(l) = rx.recv().await {
        log.line(&l);
        lines.push(l);
    }
    let st = loop {
        if let Some(x) = *exit.borrow_and_update() {
            break x;
        }
        if exit.changed().await.is_err() {
            return Err(format!("lost track of {program}"));
        }
    };
    guard.exited = true;
    let status = match (st.code, st.signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown exit".into(),
    };
    Ok(Ran {
        ok: st.code == Some(0),
        status,
        lines,
    })
}

/// The lines worth showing as a failed step's reason: pip's `ERROR:` lines, else the last
/// few lines.
fn reason(lines: &[String]) -> String {
    let errors: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("ERROR:") || l.starts_with("error:"))
        .collect();
    let picked: Vec<&str> = if errors.is_empty() {
        lines
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        errors.into_iter().take(5).collect()
    };
    picked.join("\n")
}

/// The `[project] dependencies` of a `pyproject.toml`. Errors: it does not parse.
pub fn pyproject_dependencies(text: &str) -> Result<Vec<String>, String> {
    let v: toml::Value = toml::from_str(text).map_err(|e| format!("pyproject.toml: {e}"))?;
    Ok(v.get("project")
        .and_then(|p| p.get("dependencies"))
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// `python -c code`'s output lines. Errors: it fails.
async fn python_says(
    log: &BuildLog,
    cwd: &Path,
    python: &str,
    code: &str,
) -> Result<Vec<String>, String> {
    let r = run(log, cwd, python, &["-c".into(), code.into()]).await?;
    if !r.ok {
        return Err(format!(
            "{python} failed ({}): {}",
            r.status,
            reason(&r.lines)
        ));
    }
    Ok(r.lines)
}

const SITE: &str =
    "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])";

#[async_trait]
impl Builder for VenvBuilder {
    fn kind(&self) -> &'static str {
        "venv"
    }

    async fn build(&self, job: &BuildJob, log: &BuildLog) -> Result<Artifact, String> {
        let app = &job.context;
        if !app.join("bot.py").is_file() {
            return Err(
                "the build context has no bot.py at its root: Cattery runs bot.py as the base \
                 image does (run deploy from the bot's directory, or set [build] context_dir)"
                    .into(),
            );
        }
        let base = self.base_python.as_str();
        log.line(&format!("Base environment: {base}"));
        let base_site = python_says(log, app, base, SITE).await?;
        let venv: PathBuf = job.dir.join("venv");
        let r = run(
            log,
            app,
            base,
            &["-m".into(), "venv".into(), venv.display().to_string()],
        )
        .await?;
        if !r.ok {
            return Err(format!(
                "creating the virtualenv failed ({}): {}",
                r.status,
                reason(&r.lines)
            ));
        }
        let python = venv.join("bin/python").display().to_string();
        let own_site = python_says(log, app, &python, SITE).await?;
        let own = own_site
            .first()
            .ok_or("the virtualenv has no site-packages")?;
        let mut pth: Vec<&str> = base_site.iter().map(String::as_str).collect();
        pth.dedup();
        std::fs::write(
            Path::new(own).join("_cattery_base.pth"),
            pth.join("\n") + "\n",
        )
        .map_err(|e| format!("writing the virtualenv's base path: {e}"))?;

        let pip = |args: Vec<String>| {
            let mut a = vec!["-m".to_string(), "pip".into(), "install".into()];
            a.extend(args);
            a
        };
        let (what, args) = if app.join("requirements.txt").is_file() {
            (
                "pip install -r requirements.txt",
                Some(pip(vec!["-r".into(), "requirements.txt".into()])),
            )
        } else if app.join("pyproject.toml").is_file() {
            let text = std::fs::read_to_string(app.join("pyproject.toml"))
                .map_err(|e| format!("reading pyproject.toml: {e}"))?;
            let deps = pyproject_dependencies(&text)?;
            if deps.is_empty() {
                log.line("pyproject.toml lists no [project] dependencies");
                ("", None)
            } else {
                ("pip install (pyproject.toml dependencies)", Some(pip(deps)))
            }
        } else {
            log.line("No requirements.txt or pyproject.toml: nothing to install");
            ("", None)
        };
        if let Some(args) = args {
            let r = run(log, app, &python, &args).await?;
            if !r.ok {
                return Err(format!(
                    "{what} failed ({}): {}",
                    r.status,
                    reason(&r.lines)
                ));
            }
        }
        let check = run(
            log,
            app,
            &python,
            &["-c".into(), "import fastapi, uvicorn".into()],
        )
        .await?;
        if !check.ok {
            return Err(format!(
                "the built environment cannot import fastapi and uvicorn, which Cattery's runner \
                 needs (the base image has them): add them to requirements.txt, or start the \
                 server with a --build-python that has them ({})",
                reason(&check.lines)
            ));
        }
        for d in [app.as_path(), venv.as_path()] {
            super::open_for_all(d)
                .map_err(|e| format!("opening {} to instances: {e}", d.display()))?;
        }
        log.line(&format!("Built local:{} with {python}", app.display()));
        Ok(Artifact {
            image: format!("local:{}", app.display()),
            python: Some(python),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step cut short (its future dropped, as the build's time limit does) leaves none of
    /// its processes running: the leader's group while the leader runs, and a member it left
    /// behind after it exited.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_cut_short_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        let pid_file = dir.path().join("pids");
        // The leader prints nothing and so never returns; then one whose leader exits but whose
        // member keeps the output pipe open (the step waits for its lines).
        for script in [
            format!(
                "/bin/sleep 30 & echo $! > {0}; echo $$ >> {0}; wait",
                pid_file.display()
            ),
            format!("/bin/sleep 30 & echo $! > {0}; exit 0", pid_file.display()),
        ] {
            let _ = std::fs::remove_file(&pid_file);
            let args = ["-c".to_string(), script];
            let step = run(&log, dir.path(), "/bin/sh", &args);
            let cut = tokio::time::timeout(std::time::Duration::from_millis(500), step).await;
            assert!(cut.is_err(), "the step ended by itself");
            let pids: Vec<i32> = std::fs::read_to_string(&pid_file)
                .unwrap()
                .lines()
                .map(|l| l.trim().parse().unwrap())
                .collect();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while pids.iter().any(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| s.rfind(')').map(|i| !s[i + 2..].starts_with(['Z', 'X'])))
                    .unwrap_or(false)
            }) {
                assert!(std::time::Instant::now() < deadline, "{pids:?} still run");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    #[test]
    fn pyproject_deps() {
        let t = "[project]\nname = \"bot\"\ndependencies = [\"pipecat-ai[daily]>=0.0.80\", \"loguru\"]\n";
        assert_eq!(
            pyproject_dependencies(t).unwrap(),
            ["pipecat-ai[daily]>=0.0.80", "loguru"]
        );
        assert!(pyproject_dependencies("[tool.poetry]\nname = \"x\"\n")
            .unwrap()
            .is_empty());
        assert!(pyproject_dependencies("not toml [").is_err());
    }

    #[test]
    fn failure_reason_prefers_pip_errors() {
        let lines: Vec<String> = [
            "Collecting x",
            "ERROR: Invalid requirement: 'not a requirement!!' (from line 1 of requirements.txt)",
            "[notice] something",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            reason(&lines),
            "ERROR: Invalid requirement: 'not a requirement!!' (from line 1 of requirements.txt)"
        );
        let lines: Vec<String> = ["a", "b", "", "c", "d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(reason(&lines), "b\nc\nd");
    }
}
