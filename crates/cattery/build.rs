//! Records the commit the binary is built from, as `CATTERY_COMMIT` (empty when unknown), for
//! `cattery --version`, the node list, the start log line and `cattery_build_info`
//! (`src/build_info.rs`).
//!
//! Where it comes from: `CATTERY_COMMIT` in the build's environment when set (a build from a
//! source tarball or a container context without `.git` can name its commit so), else `git
//! rev-parse` when the workspace is a git checkout (it has a `.git`), else nothing: a build
//! from a source tarball (`cargo install` of a published crate) says "unknown".
//!
//! Incremental builds stay fast: the script reruns only when the environment variable, git's
//! `HEAD`, the branch it names or the packed refs change (a commit, a checkout, a reset), not
//! on every source change, and it emits only files that exist (a missing one would make cargo
//! rerun it on every build).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CATTERY_COMMIT");
    let commit = match std::env::var("CATTERY_COMMIT") {
        Ok(c) => valid(c.trim()),
        Err(_) => from_git(),
    };
    println!(
        "cargo:rustc-env=CATTERY_COMMIT={}",
        commit.unwrap_or_default()
    );
}

/// `c` when it looks like a commit id (hex, 7 to 40 digits).
fn valid(c: &str) -> Option<String> {
    let ok = (7..=40).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| c.to_ascii_lowercase())
}

/// The short commit of the checkout's `HEAD`, when the workspace root has a `.git` (a
/// directory, or a file naming one for a worktree) and `git` answers.
fn from_git() -> Option<String> {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent()?.parent()?;
    if !root.join(".git").exists() {
        return None;
    }
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !s.trim().is_empty()).then(|| s.trim().to_string())
    };
    // What to watch: HEAD (in the worktree's git dir), and in the common git dir the branch's
    // refs directory (a new commit rewrites the branch's file, or creates it when the branch
    // was packed) and packed-refs.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch(&Path::new(&dir).join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        let common = root.join(common);
        watch(&common.join("packed-refs"));
        match git(&["symbolic-ref", "-q", "HEAD"]) {
            Some(branch) => watch(common.join(branch).parent().unwrap_or(common.as_path())),
            None => watch(&common.join("refs/heads")),
        }
    }
    valid(&git(&["rev-parse", "--short=12", "HEAD"])?)
}

fn watch(p: &Path) {
    if p.exists() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
