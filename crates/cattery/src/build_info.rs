//! What this binary is: its Cargo version and the commit it was built from (`build.rs`), shown
//! where an operator looks (`cattery --version`, the start log line, `GET /v1/cluster/nodes`
//! and the dashboard's Nodes page, `cattery_build_info`, backups' manifests, webhooks'
//! `User-Agent`), so that nodes of a rolling upgrade can be told apart although their Cargo
//! version is the same.

use std::sync::OnceLock;

/// The Cargo version (`0.1.0`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

const COMMIT_OR_EMPTY: &str = env!("CATTERY_COMMIT");

/// The commit the binary was built from (12 hex digits from git; `CATTERY_COMMIT` at build
/// time), or `None` for a build from a source tarball.
pub const COMMIT: Option<&str> = if COMMIT_OR_EMPTY.is_empty() {
    None
} else {
    Some(COMMIT_OR_EMPTY)
};

/// The version with the commit as semver build metadata (`0.1.0+6e78597a1b2c`; `0.1.0` without
/// a commit): what a node records in its heartbeat and webhooks send as their `User-Agent`.
pub fn full() -> &'static str {
    static FULL: OnceLock<String> = OnceLock::new();
    FULL.get_or_init(|| with_commit(VERSION, COMMIT))
}

/// What `cattery --version` prints after the name: `0.1.0 (commit 6e78597a1b2c)`, or `0.1.0
/// (commit unknown)`.
pub fn long() -> &'static str {
    static LONG: OnceLock<String> = OnceLock::new();
    LONG.get_or_init(|| format!("{VERSION} (commit {})", COMMIT.unwrap_or("unknown")))
}

fn with_commit(version: &str, commit: Option<&str>) -> String {
    match commit {
        Some(c) => format!("{version}+{c}"),
        None => version.to_string(),
    }
}

/// A recorded version ([`full`] of some node) split into the Cargo version and the commit: a
/// node of an earlier release recorded the Cargo version alone, hence no commit.
pub fn split(recorded: &str) -> (&str, Option<&str>) {
    match recorded.split_once('+') {
        Some((v, c)) if !c.is_empty() => (v, Some(c)),
        Some((v, _)) => (v, None),
        None => (recorded, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_is_known_in_a_checkout_and_travels_with_the_version() {
        let checkout = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.git");
        let Some(c) = COMMIT else {
            // A source tarball, without CATTERY_COMMIT at build time.
            assert!(
                !std::path::Path::new(checkout).exists(),
                "a checkout, no commit"
            );
            assert_eq!(full(), VERSION);
            assert_eq!(long(), format!("{VERSION} (commit unknown)"));
            return;
        };
        assert!(
            c.len() >= 7 && c.bytes().all(|b| b.is_ascii_hexdigit()),
            "{c}"
        );
        assert_eq!(full(), format!("{VERSION}+{c}"));
        assert_eq!(split(full()), (VERSION, Some(c)));
        assert_eq!(long(), format!("{VERSION} (commit {c})"));
    }

    #[test]
    fn a_version_recorded_by_an_earlier_release_has_no_commit() {
        assert_eq!(split("0.1.0"), ("0.1.0", None));
        assert_eq!(split("0.1.0+"), ("0.1.0", None));
        assert_eq!(split("0.2.0+abc1234"), ("0.2.0", Some("abc1234")));
        assert_eq!(with_commit("0.1.0", None), "0.1.0");
    }
}
