//! The fingerprint of a `local:` bot directory. For such an agent the directory's contents are
//! its code: a deploy records their fingerprint in the deployment
//! ([`DeploymentSpec::local_fingerprint`](crate::model::DeploymentSpec::local_fingerprint)),
//! so that a deploy of an edited directory makes a new deployment and a deploy of an unchanged
//! one keeps the current deployment.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Directory entries the walk reads at most; what lies past them is not part of the
/// fingerprint (docs/python-runner.md).
pub const MAX_ENTRIES: usize = 20_000;

/// Names left out wherever they are, with all they hold: environments, caches, VCS data.
const SKIPPED: [&str; 5] = [".venv", "venv", "__pycache__", ".git", "node_modules"];

fn skipped(name: &std::ffi::OsStr) -> bool {
    SKIPPED.iter().any(|s| name == *s) || name.as_bytes().ends_with(b".pyc")
}

/// The fingerprint of the files under `dir`: a SHA-256 (hex) over the relative path, size and
/// modification time (ns) of each regular file, and the relative path and target of each
/// symbolic link, which is not followed (a file linked from outside `dir` is not looked into).
/// Entries named in [`SKIPPED`] and `*.pyc` files are left out; the walk stops after
/// [`MAX_ENTRIES`] entries. `None` when `dir` itself cannot be read: what is wrong with it is
/// the deployment's validation's to say. Blocking: reads the file system.
pub fn fingerprint(dir: &Path) -> Option<String> {
    let mut h = Sha256::new();
    let mut seen = 0usize;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match fs::read_dir(dir.join(&rel)) {
            Ok(e) => e,
            Err(_) if rel.as_os_str().is_empty() => return None,
            Err(_) => {
                // Unreadable below the top: that it is, not what it holds.
                entry(&mut h, b'u', &rel, &[]);
                continue;
            }
        };
        let mut names: Vec<OsString> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut dirs = Vec::new();
        for name in names {
            seen += 1;
            if seen > MAX_ENTRIES {
                h.update(b"truncated\0");
                return Some(hex::encode(h.finalize()));
            }
            if skipped(&name) {
                continue;
            }
            let path = rel.join(&name);
            let Ok(m) = fs::symlink_metadata(dir.join(&path)) else {
                continue;
            };
            let t = m.file_type();
            if t.is_dir() {
                dirs.push(path);
            } else if t.is_file() {
                let mut data = [0u8; 24];
                data[..8].copy_from_slice(&m.len().to_le_bytes());
                data[8..16].copy_from_slice(&m.mtime().to_le_bytes());
                data[16..].copy_from_slice(&m.mtime_nsec().to_le_bytes());
                entry(&mut h, b'f', &path, &data);
            } else if t.is_symlink() {
                let target = fs::read_link(dir.join(&path)).unwrap_or_default();
                entry(&mut h, b'l', &path, target.as_os_str().as_bytes());
            }
        }
        // Depth first, in name order.
        stack.extend(dirs.into_iter().rev());
    }
    Some(hex::encode(h.finalize()))
}

/// Adds one entry: its kind, its path (no NUL in a path ends it early) and what describes it.
fn entry(h: &mut Sha256, kind: u8, path: &Path, data: &[u8]) {
    h.update([kind]);
    h.update(path.as_os_str().as_bytes());
    h.update([0]);
    h.update((data.len() as u64).to_le_bytes());
    h.update(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_mtime(p: &Path, secs: i64, nsec: i64) {
        let f = fs::File::options().write(true).open(p).unwrap();
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(secs as u64)
            + std::time::Duration::from_nanos(nsec as u64);
        f.set_modified(t).unwrap();
    }

    /// A file's content size, its mtime (to the ns), a new file, a removed one and a changed
    /// link change the fingerprint; environments, caches, `*.pyc` and what links point to
    /// do not; an unreadable top directory has none.
    #[test]
    fn what_changes_the_fingerprint() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("bot");
        fs::create_dir_all(d.join("lib")).unwrap();
        fs::write(d.join("bot.py"), "print(1)\n").unwrap();
        fs::write(d.join("lib/util.py"), "x = 1\n").unwrap();
        set_mtime(&d.join("bot.py"), 1_000, 5);
        let fp = || fingerprint(&d).unwrap();
        let first = fp();
        assert_eq!(first.len(), 64);
        assert_eq!(fp(), first, "the same directory, the same fingerprint");

        // Left out.
        for skip in [
            ".venv/bin",
            "venv",
            "__pycache__",
            ".git/objects",
            "node_modules/x",
            "lib/__pycache__",
        ] {
            fs::create_dir_all(d.join(skip)).unwrap();
            fs::write(d.join(skip).join("f"), "y").unwrap();
        }
        fs::write(d.join("lib/util.cpython-311.pyc"), "z").unwrap();
        let outside = t.path().join("outside.py");
        fs::write(&outside, "a").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("linked.py")).unwrap();
        let with_link = fp();
        assert_ne!(with_link, first, "a new link is a new entry");
        fs::write(&outside, "a longer file").unwrap();
        assert_eq!(fp(), with_link, "a link is not followed");
        fs::remove_dir_all(d.join(".venv")).unwrap();
        assert_eq!(fp(), with_link);

        // Counted.
        set_mtime(&d.join("bot.py"), 1_000, 6);
        let touched = fp();
        assert_ne!(touched, with_link, "mtime to the nanosecond");
        fs::write(d.join("lib/util.py"), "x = 22\n").unwrap();
        let edited = fp();
        assert_ne!(edited, touched);
        fs::write(d.join("lib/new.py"), "").unwrap();
        let added = fp();
        assert_ne!(added, edited);
        fs::remove_file(d.join("lib/new.py")).unwrap();
        let removed = fp();
        assert_ne!(removed, added);
        fs::remove_file(d.join("linked.py")).unwrap();
        std::os::unix::fs::symlink("bot.py", d.join("linked.py")).unwrap();
        assert_ne!(fp(), removed, "a link's target is part of it");

        assert_eq!(fingerprint(&t.path().join("missing")), None);
        assert_eq!(fingerprint(&d.join("bot.py")), None);
    }

    /// The walk stops after `MAX_ENTRIES` entries: a file past them changes nothing.
    #[test]
    fn the_walk_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        // One past the bound: the walk is cut short already.
        for i in 0..=MAX_ENTRIES {
            fs::write(d.join(format!("a{i:05}")), "").unwrap();
        }
        let full = fingerprint(d).unwrap();
        fs::write(d.join("zzz.py"), "late").unwrap();
        assert_eq!(fingerprint(d).unwrap(), full);
        fs::write(d.join("a00000"), "early").unwrap();
        assert_ne!(fingerprint(d).unwrap(), full);
    }
}
