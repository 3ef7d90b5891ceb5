//! Deploy-time checks of what the kernel would refuse at every start: a NUL byte in an
//! argument or an environment variable, an argument or variable over `MAX_ARG_STRLEN`, an
//! argument list and environment over `ARG_MAX`, a relative program path that only resolves
//! from the server's own directory, and `..` in a path. Each refusal is a 400 naming the
//! field; accepted absolute paths are made canonical (lexically: `//`, `.` and a trailing `/`
//! removed; symbolic links are kept, so the path stays the one the agent gave).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::{CoreError, CoreResult};

/// Largest single argument or `NAME=value` the kernel takes, with its NUL (32 pages).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;
/// Room kept under `ARG_MAX` for the variables the server and the platform add (`PORT`,
/// `TMPDIR`, `CATTERY_*`, the inherited environment) and the bound secrets.
pub const PLATFORM_HEADROOM: usize = 64 * 1024;
/// Cap of the kernel's own limit whatever the stack limit (3/4 of its 8 MiB `_STK_LIM`).
const KERNEL_CAP: usize = 6 * 1024 * 1024;

fn bad(msg: String) -> CoreError {
    CoreError::bad_request(msg)
}

/// The kernel's limit on arguments plus environment for this server's children (bytes).
pub fn arg_max() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    if v <= 0 {
        MAX_ARG_STRLEN
    } else {
        (v as usize).min(KERNEL_CAP)
    }
}

/// The budget a deployment's own arguments and `env` may use.
pub fn exec_budget() -> usize {
    arg_max().saturating_sub(PLATFORM_HEADROOM)
}

/// Checks that `s` holds no NUL byte. Errors: 400 naming `field`.
pub fn no_nul(field: &str, s: &str) -> CoreResult<()> {
    if s.contains('\0') {
        return Err(bad(format!(
            "{field} contains a NUL byte, which the kernel cannot pass to a program"
        )));
    }
    Ok(())
}

fn has_parent(p: &Path) -> bool {
    p.components().any(|c| c == Component::ParentDir)
}

/// An absolute path without `..`, made canonical. Errors: 400 naming `field`.
pub fn absolute_path(field: &str, p: &str) -> CoreResult<String> {
    no_nul(field, p)?;
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(bad(format!("{field} must be an absolute path, not {p:?}")));
    }
    if has_parent(path) {
        return Err(bad(format!(
            "{field} must not contain \"..\" ({p:?}); give the path itself"
        )));
    }
    Ok(path.components().collect::<PathBuf>().display().to_string())
}

/// Checks a `command` (with the `workingDir` it will run in) and returns it with its
/// program path made canonical. The program is an absolute path, a name looked up in `PATH`
/// (no `/`), or a path relative to `workingDir` (only when one is set). Errors: 400 naming
/// `command[i]`.
pub fn command(cmd: &[String], working_dir: Option<&str>) -> CoreResult<Vec<String>> {
    for (i, a) in cmd.iter().enumerate() {
        no_nul(&format!("command[{i}]"), a)?;
        if a.len() + 1 > MAX_ARG_STRLEN {
            return Err(bad(format!(
                "command[{i}] is {} bytes; the kernel takes at most {} bytes per argument",
                a.len(),
                MAX_ARG_STRLEN - 1
            )));
        }
    }
    let mut out = cmd.to_vec();
    let program = &cmd[0];
    if program.starts_with('/') {
        out[0] = absolute_path("command[0]", program)?;
    } else if program.contains('/') {
        if working_dir.is_none() {
            return Err(bad(format!(
                "command[0] {program:?} is a relative path, which would resolve from the \
                 instance's own directory; give an absolute path, a program name found in PATH, \
                 or a workingDir it is relative to"
            )));
        }
        if has_parent(Path::new(program)) {
            return Err(bad(format!(
                "command[0] must not contain \"..\" ({program:?}); give the path itself"
            )));
        }
    }
    Ok(out)
}

/// Checks `env` values: no NUL, each `NAME=value` within [`MAX_ARG_STRLEN`]. (Names are
/// checked by `core::env`.) Errors: 400 naming `env.NAME`.
pub fn env_values(env: &BTreeMap<String, String>) -> CoreResult<()> {
    for (k, v) in env {
        no_nul(&format!("env.{k}"), v)?;
        if k.len() + v.len() + 2 > MAX_ARG_STRLEN {
            return Err(bad(format!(
                "env.{k} is {} bytes; the kernel takes at most {} bytes per variable (NAME=value)",
                k.len() + v.len() + 1,
                MAX_ARG_STRLEN - 1
            )));
        }
    }
    Ok(())
}

/// What `args` and `env` take of `ARG_MAX`: each string with its NUL, plus a pointer each.
pub fn exec_size(args: &[String], env: &BTreeMap<String, String>) -> usize {
    let ptr = std::mem::size_of::<usize>();
    args.iter().map(|a| a.len() + 1 + ptr).sum::<usize>()
        + env
            .iter()
            .map(|(k, v)| env_entry_size(k.len(), v.len()))
            .sum::<usize>()
}

/// What one `NAME=value` variable takes of `ARG_MAX`: the string with its `=` and NUL, and a
/// pointer.
fn env_entry_size(name: usize, value: usize) -> usize {
    name + value + 2 + std::mem::size_of::<usize>()
}

/// Checks that `args` and `env` fit in [`exec_budget`]. Errors: 400 naming both fields.
pub fn exec_fits(args: &[String], env: &BTreeMap<String, String>) -> CoreResult<()> {
    let (size, budget) = (exec_size(args, env), exec_budget());
    if size > budget {
        return Err(bad(format!(
            "command and env take {size} bytes of arguments and environment; this server's \
             kernel takes at most {} (ARG_MAX), of which {budget} are left for an agent",
            arg_max()
        )));
    }
    Ok(())
}

/// [`exec_fits`] with the variables of secret set `set` too, given as (name, value) lengths:
/// a set too large for the kernel's exec is a 400 at deploy, not a start that fails every
/// time (`Argument list too long`). Errors: 400 naming the set.
pub fn exec_fits_with_secrets(
    args: &[String],
    env: &BTreeMap<String, String>,
    set: &str,
    secrets: &[(usize, usize)],
) -> CoreResult<()> {
    let of_set: usize = secrets.iter().map(|&(k, v)| env_entry_size(k, v)).sum();
    let (size, budget) = (exec_size(args, env) + of_set, exec_budget());
    if size > budget {
        return Err(bad(format!(
            "secretSet {set} takes {of_set} bytes of environment, and with the command and env \
             {size}; this server's kernel takes at most {} (ARG_MAX), of which {budget} are \
             left for an agent: make the set smaller",
            arg_max()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn absolute_paths_are_canonical() {
        assert_eq!(absolute_path("f", "/a//b/./c/").unwrap(), "/a/b/c");
        assert_eq!(absolute_path("f", "/").unwrap(), "/");
        for bad in ["a/b", "", "./x", "/a/../b", "/a/b/..", "/a\0b"] {
            let e = absolute_path("workingDir", bad).unwrap_err().to_string();
            assert!(e.contains("workingDir"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn commands() {
        assert_eq!(
            command(&v(&["/usr//bin/./env", "a/../b"]), None).unwrap(),
            v(&["/usr/bin/env", "a/../b"])
        );
        assert_eq!(
            command(&v(&["sleep", "1"]), None).unwrap(),
            v(&["sleep", "1"])
        );
        assert_eq!(
            command(&v(&["./bot"]), Some("/srv")).unwrap(),
            v(&["./bot"])
        );
        for (cmd, wd) in [
            (v(&["./bot"]), None),
            (v(&["bin/bot"]), None),
            (v(&["../bot"]), Some("/srv")),
            (v(&["/bin/../bin/true"]), None),
            (v(&["/bin/true", "a\0b"]), None),
            (v(&["/bin/true", &"x".repeat(MAX_ARG_STRLEN)]), None),
        ] {
            let e = command(&cmd, wd).unwrap_err().to_string();
            assert!(e.contains("command["), "{cmd:?}: {e}");
        }
    }

    #[test]
    fn env_limits() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "ok".to_string());
        assert!(env_values(&env).is_ok());
        env.insert("B".to_string(), "x\0y".to_string());
        assert!(env_values(&env).unwrap_err().to_string().contains("env.B"));
        env.insert("B".to_string(), "x".repeat(MAX_ARG_STRLEN));
        assert!(env_values(&env).unwrap_err().to_string().contains("env.B"));
    }

    #[test]
    fn sizes() {
        let env = BTreeMap::from([("K".to_string(), "vv".to_string())]);
        let ptr = std::mem::size_of::<usize>();
        assert_eq!(exec_size(&v(&["ab", ""]), &env), 3 + 1 + 5 + 3 * ptr);
        assert!(exec_fits(&v(&["/bin/true"]), &env).is_ok());
        let many = vec![String::new(); exec_budget() / (1 + ptr) + 1];
        assert!(exec_fits(&many, &BTreeMap::new()).is_err());
        assert!(exec_budget() > 0);
    }
}
