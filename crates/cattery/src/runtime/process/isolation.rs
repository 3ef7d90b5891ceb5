//! What keeps instances away from each other and from the control plane (see
//! `docs/security.md`): a uid of their own ([`super::uids`]), a private `/tmp`, `/var/tmp`,
//! `/dev/shm` and `/proc` ([`super::namespace`]), private directories, an environment built
//! from an allowlist, and a data directory closed to them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::namespace::Namespaces;
use super::uids::{UidPool, UidRange};

/// The kernel's overflow uid (`nobody`), which owns no file of an instance.
const NOBODY: u32 = 65534;

/// `PATH` for instances when the server has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How instances are separated on this machine.
pub struct Isolation {
    /// The uid pool, when each instance runs under a uid of its own.
    pub uids: Option<Arc<UidPool>>,
    /// Why instances share the server's uid, when they do.
    pub off_reason: Option<String>,
    /// What each instance's private mount namespace is made of, when instances run under uids
    /// of their own and the machine allows namespaces.
    pub namespaces: Option<Arc<Namespaces>>,
    /// Why instances under uids of their own share the host's `/tmp`, `/var/tmp` and
    /// `/dev/shm`, when they do.
    pub namespaces_off: Option<String>,
}

impl Isolation {
    /// Decides, once at start: a uid per instance from `range` (`None`: turned off by the
    /// operator) when the server runs as root, the range is mapped in its user namespace, a
    /// lock directory exists, and `instances_dir` is reachable by other users.
    pub fn configure(range: Option<UidRange>, instances_dir: &Path) -> Isolation {
        let off = |why: String| Isolation {
            uids: None,
            off_reason: Some(why),
            namespaces: None,
            namespaces_off: None,
        };
        let Some(range) = range else {
            return off("turned off (--instance-uids off)".into());
        };
        if !nix::unistd::geteuid().is_root() {
            return off("the server does not run as root, so it cannot switch uids".into());
        }
        if !range_mapped(range) {
            return off(format!(
                "the uids {range} are not mapped in this user namespace (/proc/self/uid_map)"
            ));
        }
        // The data dir and `instances` are opened by `secure_data_dir`; the rest is the host's.
        let above = instances_dir.parent().and_then(Path::parent);
        if let Some(Err(why)) = above.map(traversable_by_others) {
            return off(format!(
                "instances could not reach their directories: {why}; choose a --data-dir whose \
                 parent directories other users may traverse (mode o+x)"
            ));
        }
        // Instance directories on a runtime dir (`super::rundir`): its parents too.
        if fs::symlink_metadata(instances_dir).is_ok_and(|m| m.file_type().is_symlink()) {
            let target = fs::canonicalize(instances_dir);
            if let Some(Err(why)) = target
                .ok()
                .as_deref()
                .and_then(Path::parent)
                .map(traversable_by_others)
            {
                return off(format!(
                    "instances could not reach their directories: {why}; choose a --runtime-dir \
                     whose parent directories other users may traverse (mode o+x)"
                ));
            }
        }
        let Some(lock_dir) = super::locks::lock_dir("uids") else {
            return off("no private lock directory for the uid reservations".into());
        };
        // The server's directories instances reach: bound back into their namespaces when
        // they lie in a private place (a data dir under /tmp, a runtime dir on /dev/shm).
        let roots: Vec<PathBuf> = [instances_dir.parent(), Some(instances_dir)]
            .into_iter()
            .flatten()
            .filter_map(|d| fs::canonicalize(d).ok())
            .collect();
        let builds = instances_dir
            .parent()
            .map(|d| d.join(super::namespace::BUILDS));
        // Made now, before the first build, so that whether it can be covered is tried here,
        // at start, rather than first found at an instance's start (`secure_data_dir` opens
        // it to instances).
        if let Some(b) = &builds {
            if let Err(e) = fs::create_dir_all(b) {
                tracing::warn!(error = %e, dir = %b.display(), "could not make the builds directory");
            }
        }
        let (namespaces, namespaces_off) = match Namespaces::probe(&roots, builds.as_deref(), range)
        {
            Ok(n) => (Some(Arc::new(n)), None),
            Err(why) => (None, Some(why)),
        };
        Isolation {
            uids: Some(Arc::new(UidPool::new(range, lock_dir))),
            off_reason: None,
            namespaces,
            namespaces_off,
        }
    }

    /// Runs `f` seeing files as an instance would: when instances run under uids of their own,
    /// on a thread whose filesystem identity is the overflow uid `nobody`, without groups
    /// ([`super::uids::with_fs_identity`]): a user that owns none of the org's files, as an
    /// instance's fresh uid owns none. No uid of the pool is taken for it (a lock file per
    /// look, on the start path, and one uid fewer for instances meanwhile). Else as the
    /// server, whose uid the instances share. For the checks of an org's paths, whose answers
    /// must not tell what an instance could not see. Errors: the identity could not be taken.
    pub fn as_instance<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        if self.uids.is_none() {
            return Ok(f());
        }
        super::uids::with_fs_identity(NOBODY, f).map_err(|e| e.to_string())
    }

    /// One line for the start log.
    pub fn describe(&self) -> String {
        const SHARED: &str =
            "/tmp, /var/tmp, /dev/shm and /run/lock are the host's, shared by all instances, \
                              and any instance reads any build's files by its path";
        match (&self.uids, &self.off_reason) {
            (Some(p), _) => match (&self.namespaces, &self.namespaces_off) {
                (Some(n), _) => {
                    format!("one uid per instance from {}; {}", p.range(), n.describe())
                }
                (None, why) => format!(
                    "one uid per instance from {}; {SHARED} ({})",
                    p.range(),
                    why.as_deref().unwrap_or("no private mount namespace")
                ),
            },
            (None, Some(r)) => format!("instances run as the server's own uid: {r}; {SHARED}"),
            (None, None) => format!("instances run as the server's own uid; {SHARED}"),
        }
    }
}

/// Whether every uid of `range` is mapped in this process's user namespace.
fn range_mapped(range: UidRange) -> bool {
    let Ok(map) = fs::read_to_string("/proc/self/uid_map") else {
        return true;
    };
    map.lines().any(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        f.len() == 3 && f[0] <= u64::from(range.start) && u64::from(range.end) < f[0] + f[2]
    })
}

/// Checks that a user with no relation to `dir` or its parents can pass through all of them
/// (`o+x`), as given and with symlinks resolved. Errors: the first that blocks.
fn traversable_by_others(dir: &Path) -> Result<(), String> {
    let canonical = fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for p in [dir, canonical.as_path()] {
        for anc in p.ancestors() {
            let Ok(m) = fs::metadata(anc) else { continue };
            if m.mode() & 0o001 == 0 {
                return Err(format!(
                    "{} (mode {:o}) does not let other users through",
                    anc.display(),
                    m.mode() & 0o7777
                ));
            }
        }
    }
    Ok(())
}

/// Checks that a user with no relation to any file (an instance uid) can reach `path`: every
/// directory on the way can be searched (`o+x`), and `path` itself is readable and searchable
/// (`dir`) or executable, and readable unless it is an ELF binary (a file). Both the path as
/// given and its canonical form (symlinks resolved) are checked. Errors: what blocks it.
pub fn reachable_by_others(path: &Path, dir: bool) -> Result<(), String> {
    let canonical = fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for p in [path, canonical.as_path()] {
        if let Some(parent) = p.parent() {
            traversable_by_others(parent)?;
        }
    }
    let m = fs::metadata(&canonical).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = m.mode();
    let need = if dir || m.is_dir() {
        0o005
    } else if is_elf(&canonical) {
        0o001
    } else {
        0o005
    };
    if mode & need != need {
        return Err(format!(
            "{} (mode {:o}) is not {} by other users",
            path.display(),
            mode & 0o7777,
            if need == 0o001 {
                "executable"
            } else {
                "readable and executable"
            }
        ));
    }
    Ok(())
}

fn is_elf(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The environment of an instance: `PATH`, `LANG`, `LANGUAGE`, `LC_*` and `TZ` from the
/// server's (nothing else of it), then `base` (the platform's: `HOME`, `TMPDIR`, `PORT`,
/// `CATTERY_*`...), then `spec` (the agent's env, secrets, ...), later entries winning.
pub fn instance_env(
    base: &[(&str, OsString)],
    spec: &[(String, String)],
) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = server_env().clone();
    for (k, v) in base {
        env.insert(k.into(), v.clone());
    }
    for (k, v) in spec {
        env.insert(k.into(), v.into());
    }
    env.into_iter().collect()
}

/// What instances get of the server's own environment (see [`instance_env`]), read once:
/// the server never changes its environment, so it is not copied again (all of it, under
/// the environment's lock) for every spawn.
fn server_env() -> &'static BTreeMap<OsString, OsString> {
    static ENV: std::sync::OnceLock<BTreeMap<OsString, OsString>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.to_string_lossy();
                matches!(k.as_ref(), "PATH" | "LANG" | "LANGUAGE" | "TZ") || k.starts_with("LC_")
            })
            .collect();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env
    })
}

/// Makes files created from now on private to the server (umask 077): the database, the
/// secrets key, lock files. Instances get the usual 022 back (`runtime/process/spawn.rs`).
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Closes the data directory to everyone but the server: the directory `0700` (`0711` when
/// instances run under their own uids: they may pass through to their own directory, never
/// list it), every file in it `0600`, every directory `0700`, except `instances` and `builds` (`0711`) and
/// `runner` (the Python runner, `0755` and its files `0644`). Symlinks are left alone.
pub fn secure_data_dir(data_dir: &Path, isolating: bool) -> std::io::Result<()> {
    let traverse = if isolating { 0o711 } else { 0o700 };
    set_mode(data_dir, traverse)?;
    for e in fs::read_dir(data_dir)?.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let name = e.file_name();
        let path = e.path();
        if t.is_file() {
            set_mode(&path, 0o600)?;
        } else if t.is_dir() {
            match name.to_str() {
                // Builds: instances pass through to a build's `app` and `venv` (`core::builds`).
                Some("instances" | "builds") => set_mode(&path, traverse)?,
                Some("runner") => {
                    set_mode(&path, 0o755)?;
                    for f in fs::read_dir(&path)?.flatten() {
                        if f.file_type().is_ok_and(|t| t.is_file()) {
                            set_mode(&f.path(), 0o644)?;
                        }
                    }
                }
                _ => set_mode(&path, 0o700)?,
            }
        }
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    let m = fs::symlink_metadata(p)?;
    if m.mode() & 0o7777 != mode {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The directories of one instance (see `docs/security.md`): `dir` (the server's: output
/// capture files, offsets; `0711` so the instance can pass through), `home` (`HOME`, the
/// default working directory) and `tmp` (`TMPDIR`), both the instance's own (`0700`), and the
/// exit status file (the instance's, `0600`) in `dir`, where the instance cannot replace it.
pub struct InstanceDirs {
    /// The instance directory.
    pub dir: PathBuf,
    /// `HOME`.
    pub home: PathBuf,
    /// `TMPDIR`.
    pub tmp: PathBuf,
    /// `CATTERY_EXIT_STATUS_FILE`.
    pub exit_status: PathBuf,
}

impl InstanceDirs {
    /// The paths under `dir`.
    pub fn at(dir: PathBuf) -> InstanceDirs {
        InstanceDirs {
            home: dir.join("home"),
            tmp: dir.join("tmp"),
            exit_status: dir.join(super::EXIT_STATUS_FILE),
            dir,
        }
    }

    /// Creates them, owned by `ids` (uid, gid) when given. Errors: any step failed (the
    /// caller removes `dir`).
    pub fn create(&self, ids: Option<(u32, u32)>) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let mode = if ids.is_some() { 0o711 } else { 0o700 };
        fs::DirBuilder::new().mode(mode).create(&self.dir)?;
        set_mode(&self.dir, mode)?;
        for d in [&self.home, &self.tmp] {
            fs::DirBuilder::new().mode(0o700).create(d)?;
        }
        fs::File::create(&self.exit_status)?;
        if let Some((uid, gid)) = ids {
            for p in [&self.home, &self.tmp, &self.exit_status] {
                std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
            }
        }
        Ok(())
    }

    /// The uid owning `home` (the instance's uid), for re-adoption.
    pub fn owner(&self) -> Option<u32> {
        fs::symlink_metadata(&self.home).ok().map(|m| m.uid())
    }
}

/// Reads the exit code an agent left in its status file: at most 64 bytes, a regular file
/// only (never a FIFO or a device the instance put there).
pub fn read_exit_status(path: &Path) -> Option<i32> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut s = String::new();
    f.take(64).read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_an_allowlist() {
        std::env::set_var("CATTERY_ISOLATION_TEST_SECRET", "x");
        let env = instance_env(
            &[
                ("HOME", OsString::from("/h")),
                ("PORT", OsString::from("1")),
            ],
            &[("PORT".into(), "2".into()), ("K".into(), "v".into())],
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert!(get("CATTERY_ISOLATION_TEST_SECRET").is_none());
        assert!(get("PATH").is_some());
        assert_eq!(get("HOME"), Some("/h".into()));
        assert_eq!(get("PORT"), Some("2".into()), "the agent's env wins");
        assert_eq!(get("K"), Some("v".into()));
    }

    #[test]
    fn reachability_sees_closed_directories() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("bot");
        fs::create_dir(&inner).unwrap();
        set_mode(dir.path(), 0o755).unwrap();
        set_mode(&inner, 0o755).unwrap();
        assert_eq!(reachable_by_others(&inner, true), Ok(()));
        set_mode(dir.path(), 0o700).unwrap();
        let e = reachable_by_others(&inner, true).unwrap_err();
        assert!(e.contains("does not let other users through"), "{e}");
        set_mode(dir.path(), 0o755).unwrap();
        set_mode(&inner, 0o750).unwrap();
        assert!(reachable_by_others(&inner, true).is_err());
        // An ELF binary only needs o+x.
        assert_eq!(reachable_by_others(Path::new("/bin/sh"), false), Ok(()));
    }
}
