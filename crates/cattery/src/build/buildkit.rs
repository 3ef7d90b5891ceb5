//! BuildKit's progress, as the engine streams it during a build (`StatusResponse` messages:
//! vertices that start and complete, their output, warnings), turned into the build's log
//! lines, numbered by step as `docker build --progress=plain` prints them:
//!
//! ```text
//! #3 [2/3] RUN pip install -r requirements.txt
//! #3 0.512 Collecting loguru
//! #3 DONE 1.2s
//! ```
//!
//! A step that fails ends with `#N ERROR: <the engine's message>`; the build's error is the
//! engine's final message (the stream's error), not this line, followed by the step's output
//! line that names an error (else its last), since the engine's message names only the
//! command and its exit code ([`Progress::failed_output`]).

use std::collections::HashMap;

use bollard::moby::buildkit::v1::{StatusResponse, Vertex};

/// The state of one build's progress: the steps seen so far, numbered in the order they
/// appeared, and each step's unfinished output line.
#[derive(Default)]
pub struct Progress {
    /// A step's number by its digest.
    steps: HashMap<String, usize>,
    /// Steps whose start (or cached end) was logged.
    started: HashMap<String, bool>,
    /// Steps whose end was logged.
    done: HashMap<String, bool>,
    /// A step's output after its last newline (the engine cuts output anywhere).
    partial: HashMap<String, String>,
    /// Whether any message came: an engine that answers a BuildKit build with an error before
    /// any progress could not run it at all.
    pub any: bool,
    /// Each step's output line that best says why it would fail: its last line that names an
    /// error, else its last line.
    telling: HashMap<String, (bool, String)>,
    /// That line of the first step that failed, once one did: the engine's own message says
    /// only which command exited with which code, so it goes into the build's error too.
    pub failed_output: Option<String>,
}

impl Progress {
    /// The log lines `status` adds.
    pub fn lines(&mut self, status: &StatusResponse) -> Vec<String> {
        self.any = true;
        let mut out = Vec::new();
        for v in &status.vertexes {
            self.vertex(v, &mut out);
        }
        for l in &status.logs {
            let n = self.number(&l.vertex);
            let buf = self.partial.entry(l.vertex.clone()).or_default();
            buf.push_str(&String::from_utf8_lossy(&l.msg));
            while let Some(i) = buf.find('\n') {
                let line: String = buf.drain(..=i).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if !line.trim().is_empty() {
                    out.push(format!("#{n} {line}"));
                    let is_error = line.to_ascii_lowercase().contains("error");
                    let t = self.telling.entry(l.vertex.clone()).or_default();
                    if is_error || !t.0 {
                        *t = (is_error, line.trim().to_string());
                    }
                }
            }
        }
        for w in &status.warnings {
            let n = self.number(&w.vertex);
            out.push(format!("#{n} WARN: {}", String::from_utf8_lossy(&w.short)));
        }
        out
    }

    /// The output of every step not yet ended by a newline (at the end of a build).
    pub fn flush(&mut self) -> Vec<String> {
        let mut rest: Vec<(usize, String)> = self
            .partial
            .drain()
            .filter(|(_, s)| !s.trim().is_empty())
            .map(|(d, s)| (self.steps.get(&d).copied().unwrap_or(0), s))
            .collect();
        rest.sort();
        rest.into_iter()
            .map(|(n, s)| format!("#{n} {}", s.trim_end()))
            .collect()
    }

    fn number(&mut self, digest: &str) -> usize {
        let next = self.steps.len() + 1;
        *self.steps.entry(digest.to_string()).or_insert(next)
    }

    fn vertex(&mut self, v: &Vertex, out: &mut Vec<String>) {
        let n = self.number(&v.digest);
        let seen = self.started.contains_key(&v.digest);
        if !seen && (v.started.is_some() || v.cached || v.completed.is_some()) {
            self.started.insert(v.digest.clone(), true);
            out.push(format!("#{n} {}", v.name));
        }
        if v.completed.is_none() || self.done.contains_key(&v.digest) {
            return;
        }
        self.done.insert(v.digest.clone(), true);
        if let Some(rest) = self.partial.remove(&v.digest) {
            if !rest.trim().is_empty() {
                out.push(format!("#{n} {}", rest.trim_end()));
            }
        }
        if !v.error.is_empty() {
            out.push(format!("#{n} ERROR: {}", v.error));
            if self.failed_output.is_none() {
                self.failed_output = self.telling.remove(&v.digest).map(|(_, l)| l);
            }
        } else if v.cached {
            out.push(format!("#{n} CACHED"));
        } else {
            let secs = match (&v.started, &v.completed) {
                (Some(a), Some(b)) => {
                    (b.seconds - a.seconds) as f64 + f64::from(b.nanos - a.nanos) / 1e9
                }
                _ => 0.0,
            };
            out.push(format!("#{n} DONE {secs:.1}s"));
        }
    }
}

/// Whether the engine, by its version, runs BuildKit builds through the API: Engine API 1.39
/// (Docker 18.09) and later, on Linux (a Windows engine has no BuildKit).
pub fn engine_has_buildkit(api_version: Option<&str>, os: Option<&str>) -> bool {
    let Some(v) = api_version else { return false };
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return false;
    };
    (major, minor) >= (1, 39) && os.is_none_or(|o| o.eq_ignore_ascii_case("linux"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::moby::buildkit::v1::{VertexLog, VertexWarning};

    /// Sets a vertex's `started` or `completed` time (the proto's timestamp type is not
    /// exported by bollard, hence by field).
    fn at<T: Default>(slot: &mut Option<T>, set: impl FnOnce(&mut T)) {
        let mut t = T::default();
        set(&mut t);
        *slot = Some(t);
    }

    fn vertex(digest: &str, name: &str) -> Vertex {
        Vertex {
            digest: digest.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    fn log(digest: &str, msg: &str) -> VertexLog {
        VertexLog {
            vertex: digest.into(),
            msg: msg.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn steps_are_numbered_with_their_output_and_their_end() {
        let mut p = Progress::default();
        let run = "[2/3] RUN --mount=type=cache,target=/root/.cache/uv uv sync --locked";
        // Announced before it starts: nothing yet.
        let mut all = p.lines(&StatusResponse {
            vertexes: vec![vertex("sha:a", "[1/3] FROM base"), vertex("sha:b", run)],
            ..Default::default()
        });
        assert!(all.is_empty(), "{all:?}");
        let mut a = vertex("sha:a", "[1/3] FROM base");
        a.cached = true;
        at(&mut a.started, |t| t.seconds = 10);
        at(&mut a.completed, |t| t.seconds = 10);
        let mut b = vertex("sha:b", run);
        at(&mut b.started, |t| t.seconds = 10);
        all.extend(p.lines(&StatusResponse {
            vertexes: vec![a, b.clone()],
            ..Default::default()
        }));
        // Output cut mid-line, a blank line, a line with no end until the step completes.
        all.extend(p.lines(&StatusResponse {
            logs: vec![
                log("sha:b", "Resolved 3 pack"),
                log("sha:b", "ages\n\nAudited"),
            ],
            ..Default::default()
        }));
        all.extend(p.lines(&StatusResponse {
            logs: vec![log("sha:b", " 3 packages\r\n")],
            warnings: vec![VertexWarning {
                vertex: "sha:b".into(),
                short: b"a warning".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }));
        all.extend(p.lines(&StatusResponse {
            logs: vec![log("sha:b", "no newline")],
            ..Default::default()
        }));
        at(&mut b.completed, |t| {
            (t.seconds, t.nanos) = (11, 500_000_000)
        });
        all.extend(p.lines(&StatusResponse {
            vertexes: vec![b.clone()],
            ..Default::default()
        }));
        // A repeated completion adds nothing.
        all.extend(p.lines(&StatusResponse {
            vertexes: vec![b],
            ..Default::default()
        }));
        assert_eq!(
            all,
            [
                "#1 [1/3] FROM base".to_string(),
                "#1 CACHED".into(),
                format!("#2 {run}"),
                "#2 Resolved 3 packages".into(),
                "#2 Audited 3 packages".into(),
                "#2 WARN: a warning".into(),
                "#2 no newline".into(),
                "#2 DONE 1.5s".into(),
            ]
        );
        assert!(p.flush().is_empty());
    }

    #[test]
    fn a_failing_step_ends_with_the_engines_error_and_unfinished_output_is_flushed() {
        let mut p = Progress::default();
        let mut v = vertex("sha:c", "[2/2] RUN exit 3");
        at(&mut v.started, |t| t.seconds = 1);
        let mut lines = p.lines(&StatusResponse {
            vertexes: vec![v.clone()],
            logs: vec![log("sha:c", "partial")],
            ..Default::default()
        });
        at(&mut v.completed, |t| {
            (t.seconds, t.nanos) = (1, 100_000_000)
        });
        v.error =
            "process \"/bin/sh -c exit 3\" did not complete successfully: exit code: 3".into();
        lines.extend(p.lines(&StatusResponse {
            vertexes: vec![v],
            ..Default::default()
        }));
        assert_eq!(p.failed_output, None, "a step with no whole line of output");
        assert_eq!(
            lines,
            [
                "#1 [2/2] RUN exit 3",
                "#1 partial",
                "#1 ERROR: process \"/bin/sh -c exit 3\" did not complete successfully: exit code: 3",
            ]
        );
        // Output of a step that never completed comes out at the end.
        let mut q = Progress::default();
        let _ = q.lines(&StatusResponse {
            logs: vec![log("sha:x", "first\nrest")],
            ..Default::default()
        });
        assert_eq!(q.flush(), ["#1 rest"]);
        assert!(q.any && !Progress::default().any);
    }

    /// The line that says why a step failed (uv's `error:` before its `hint:`) is kept for
    /// the build's error; a step's last line when none names an error.
    #[test]
    fn the_failing_steps_telling_line_is_kept() {
        let mut p = Progress::default();
        let mut v = vertex("sha:u", "[2/3] RUN uv sync --locked");
        at(&mut v.started, |t| t.seconds = 1);
        let _ = p.lines(&StatusResponse {
            vertexes: vec![v.clone()],
            logs: vec![log(
                "sha:u",
                "Resolved 179 packages\nerror: The lockfile at `uv.lock` needs to be updated\nhint: To update the lockfile, run `uv lock`.\n",
            )],
            ..Default::default()
        });
        assert_eq!(p.failed_output, None, "no step failed yet");
        at(&mut v.completed, |t| t.seconds = 2);
        v.error = "executor failed running [/bin/sh -c uv sync --locked]: exit code: 1".into();
        let _ = p.lines(&StatusResponse {
            vertexes: vec![v],
            ..Default::default()
        });
        assert_eq!(
            p.failed_output.as_deref(),
            Some("error: The lockfile at `uv.lock` needs to be updated")
        );
        let mut q = Progress::default();
        let mut w = vertex("sha:l", "[2/2] RUN ls /nope");
        at(&mut w.started, |t| t.seconds = 1);
        at(&mut w.completed, |t| t.seconds = 2);
        w.error = "exit code: 2".into();
        let _ = q.lines(&StatusResponse {
            logs: vec![log(
                "sha:l",
                "x\nls: cannot access '/nope': No such file or directory\n",
            )],
            ..Default::default()
        });
        let _ = q.lines(&StatusResponse {
            vertexes: vec![w],
            ..Default::default()
        });
        assert_eq!(
            q.failed_output.as_deref(),
            Some("ls: cannot access '/nope': No such file or directory")
        );
    }

    #[test]
    fn buildkit_is_used_on_linux_engines_from_api_1_39() {
        for (v, os, want) in [
            (Some("1.49"), Some("linux"), true),
            (Some("1.39"), None, true),
            (Some("1.38"), Some("linux"), false),
            (Some("2.0"), Some("Linux"), true),
            (Some("1.41"), Some("windows"), false),
            (Some("x"), Some("linux"), false),
            (None, Some("linux"), false),
        ] {
            assert_eq!(engine_has_buildkit(v, os), want, "{v:?} {os:?}");
        }
    }
}
