//! Builders: what turns an uploaded build context (`pipecat cloud deploy` without an image)
//! into something a deployment runs. `core::builds` decides (the state machine, the cache by
//! `contextHash`, uploads); a [`Builder`] only builds one context into one [`Artifact`],
//! writing its progress to the build's [`BuildLog`].
//!
//! - [`venv::VenvBuilder`]: a managed `local:` directory (the context) with its own
//!   virtualenv, layered on a base Python environment (docs/builds.md);
//! - [`docker::DockerBuilder`]: the context's `Dockerfile` built into an image by the Docker
//!   runtime's engine.

pub mod buildkit;
pub mod context;
pub mod docker;
pub mod venv;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use uuid::Uuid;

/// One build to run.
#[derive(Debug, Clone)]
pub struct BuildJob {
    /// Build id.
    pub id: Uuid,
    /// The build's own directory (`<data-dir>/builds/<id>`): the builder may write in it.
    pub dir: PathBuf,
    /// The extracted context (inside `dir`).
    pub context: PathBuf,
    /// Dockerfile path inside the context.
    pub dockerfile_path: String,
}

/// What a successful build made: what its deployments run.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    /// `local:<dir>`, or a container image.
    pub image: String,
    /// Python interpreter of a `local:` artifact.
    pub python: Option<String>,
}

/// Builds one context.
#[async_trait]
pub trait Builder: Send + Sync + 'static {
    /// Its name, recorded on the build (`venv`, `docker`).
    fn kind(&self) -> &'static str;
    /// Builds `job`; `Err` is the reason the build failed, shown to the user as the build's
    /// `errorMessage` (one or a few lines: the details are in the log). Dropping the future
    /// (the time limit) stops whatever it started.
    async fn build(&self, job: &BuildJob, log: &BuildLog) -> Result<Artifact, String>;
    /// Whether it can build now (for Docker: whether an engine answers).
    async fn available(&self) -> bool {
        true
    }
    /// Ends what the steps of build directory `dir` left running when the server stopped
    /// mid-build (called at the next start, before the directory is emptied).
    async fn recover(&self, _dir: &Path) {}
    /// Removes what a build made outside its directory (which the caller removes), when the
    /// build retention deletes it: the Docker builder's image. Errors: why it could not.
    async fn remove(&self, _build: Uuid, _artifact: &str) -> Result<(), String> {
        Ok(())
    }
}

/// What the runner (Cattery's, in the base image or the local builder's base environment)
/// imports to serve sessions: a built environment that cannot fails its build (a `python -c`
/// program).
pub const RUNNER_IMPORTS: &str = "import fastapi, uvicorn";

/// Most bytes of a build's output (its steps', the engine's) its log keeps; later lines are
/// dropped, and the log says so once. The server's own lines are always written.
pub const MAX_OUTPUT_BYTES: u64 = 16 * 1024 * 1024;

/// Longest line of a build's output kept (bytes): the rest of a longer line is dropped.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// A build's log: a file of lines, appended while it runs, read by `build logs`.
#[derive(Clone)]
pub struct BuildLog {
    file: Arc<Mutex<Option<std::fs::File>>>,
    /// Bytes of output written so far.
    output: Arc<std::sync::atomic::AtomicU64>,
}

impl BuildLog {
    /// Creates (or truncates) the log at `path`.
    pub fn create(path: &Path) -> std::io::Result<BuildLog> {
        let f = std::fs::File::create(path)?;
        Ok(BuildLog {
            file: Arc::new(Mutex::new(Some(f))),
            output: Arc::default(),
        })
    }

    /// Appends one line of the build's output (a step's, the engine's), cut at
    /// [`MAX_LINE_BYTES`], while the output stays within [`MAX_OUTPUT_BYTES`].
    pub fn output(&self, s: &str) {
        use std::sync::atomic::Ordering;
        let mut end = s.len().min(MAX_LINE_BYTES);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let s = &s[..end];
        let n = s.len() as u64 + 1;
        let before = self.output.fetch_add(n, Ordering::SeqCst);
        if before + n <= MAX_OUTPUT_BYTES {
            self.line(s);
        } else if before <= MAX_OUTPUT_BYTES {
            self.line(&format!(
                "[cattery] the build's output passed {} MiB: later lines are not kept",
                MAX_OUTPUT_BYTES / (1024 * 1024)
            ));
        }
    }

    /// Appends one line (without its newline); best-effort.
    pub fn line(&self, s: &str) {
        let mut g = self.file.lock();
        if let Some(f) = g.as_mut() {
            for l in s.lines() {
                let _ = writeln!(f, "{}", l.trim_end_matches('\r'));
            }
        }
    }

    /// The last `limit` lines of the log at `path` (none when it does not exist).
    pub fn tail(path: &Path, limit: usize) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(limit);
        lines[from..].iter().map(|s| s.to_string()).collect()
    }
}

/// Makes `root` and everything under it readable (and directories passable) by every user, so
/// instances under their own uids can run a built bot and its virtualenv, and writable by no
/// one but their owner. Symlinks are left alone.
pub fn open_for_all(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(root)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    // No set-id or sticky bit survives, nor write access for anyone but the owner (the
    // server's user): no instance may change a build, nor swap an entry of a directory
    // for a link while this walk goes on (each directory is closed before it is read).
    let mode = meta.permissions().mode() & 0o755;
    if meta.is_dir() {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode | 0o755))?;
        for e in std::fs::read_dir(root)? {
            open_for_all(&e?.path())?;
        }
    } else {
        let x = if mode & 0o100 != 0 { 0o055 } else { 0 };
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode | 0o644 | x))?;
    }
    Ok(())
}
