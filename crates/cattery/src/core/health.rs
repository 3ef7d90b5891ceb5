//! An agent's health as the API shows it, derived from its pool (a pure function): whether it
//! is ready, its `healthState`, the revision phase and reason, and its `errors`.
//!
//! | `healthState` | when (first that holds) |
//! |---|---|
//! | `invalid` | the current deployment cannot run here (`deploy_error`) |
//! | `crash_loop` | [`CRASH_LOOP_THRESHOLD`] failed starts in a row |
//! | `ready` | an instance of the current deployment is idle, or any is busy |
//! | `starting` | an instance of the current deployment is starting |
//! | `scaled_to_zero` | `minAgents` is 0 and nothing runs |
//! | `pending` | otherwise (warm instances wanted, none started yet) |
//!
//! `ready` holds when the deployment can run, is not crash-looping, and either `minAgents` is
//! 0 or an instance of it answered `/readyz` once (issue #4 item 5: a crash-looping
//! deployment is never ready, whatever `minAgents` is).
//!
//! The counting itself (failed starts in a row, the backoff, the `AGENT_CRASH_LOOP` refusal)
//! is the engine's, in `core::session::health`; this module only reads its [`PoolStatus`].

use serde::Serialize;
use utoipa::ToSchema;

use super::session::PoolStatus;

/// `healthState` of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// The current deployment cannot run here.
    Invalid,
    /// Instances keep failing to start.
    CrashLoop,
    /// An instance is ready or serving.
    Ready,
    /// An instance is starting.
    Starting,
    /// No warm instance wanted and none running.
    ScaledToZero,
    /// Warm instances wanted, none started yet.
    Pending,
}

/// The derived health of an agent's current deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthView {
    /// Ready to take sessions (`ready`, `available`, `activeDeploymentReady`).
    pub ready: bool,
    /// Crash-looping.
    pub crash_loop: bool,
    /// `healthState`.
    pub state: HealthState,
    /// Revision phase: `Failed` (invalid or crash-looping), `Active` or `Creating`.
    pub phase: &'static str,
    /// Revision reason: `Error` (invalid), `CrashLoopBackOff`, or none.
    pub reason: Option<&'static str>,
    /// Container state: `running`, `terminated` or `waiting`.
    pub container_state: &'static str,
    /// Messages of the agent's `errors` (the deployment error, then the crash loop's).
    pub errors: Vec<String>,
    /// Revision health message: the deployment error, else the last failure's output.
    pub message: Option<String>,
}

/// Derives the health of an agent with `min_agents` warm instances from its pool.
pub fn derive(p: &PoolStatus, min_agents: u32) -> HealthView {
    let invalid = p.deploy_error.is_some();
    let crash_loop = p.health.crash_looping();
    let ready = !invalid && !crash_loop && (min_agents == 0 || p.health.ever_ready);
    let running = p.idle + p.busy > 0;
    let state = if invalid {
        HealthState::Invalid
    } else if crash_loop {
        HealthState::CrashLoop
    } else if running {
        HealthState::Ready
    } else if p.starting > 0 {
        HealthState::Starting
    } else if min_agents == 0 {
        HealthState::ScaledToZero
    } else {
        HealthState::Pending
    };
    let last = p.health.last_failure.as_ref();
    let mut errors = Vec::new();
    if let Some(e) = &p.deploy_error {
        errors.push(e.clone());
    }
    if crash_loop {
        let exit = last
            .and_then(|f| f.exit)
            .map(|e| format!(" ({})", e.describe()))
            .unwrap_or_default();
        // A failed spawn has no output of the agent: its tail is the runtime's error.
        errors.push(format!(
            "instances fail to start: {}{exit}{}",
            last.map(|f| f.reason).unwrap_or("unknown"),
            last.map(|f| stderr_summary(f.stream, &f.stderr_tail))
                .unwrap_or_default()
        ));
    }
    HealthView {
        ready,
        crash_loop,
        state,
        // A crash loop is not "Creating" (what the CLI showed for it): nothing will come up
        // until the agent is fixed.
        phase: if invalid || crash_loop {
            "Failed"
        } else if ready {
            "Active"
        } else {
            "Creating"
        },
        reason: if invalid {
            Some("Error")
        } else if crash_loop {
            Some("CrashLoopBackOff")
        } else {
            None
        },
        container_state: if running {
            "running"
        } else if crash_loop || invalid {
            "terminated"
        } else {
            "waiting"
        },
        errors,
        message: p
            .deploy_error
            .clone()
            .or_else(|| last.map(|f| f.stderr_tail.clone())),
    }
}

/// The last non-empty lines of a failed start's tail (at most 3, 400 chars), as
/// `; <label>: ...`, or empty.
fn stderr_summary(label: &str, tail: &str) -> String {
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let last = lines[lines.len().saturating_sub(3)..].join(" | ");
    let cut: String = last
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("; {label}: {cut}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::session::{Health, StartFailure, CRASH_LOOP_THRESHOLD};

    fn pool(starting: u32, idle: u32, busy: u32) -> PoolStatus {
        PoolStatus {
            starting,
            idle,
            busy,
            total: starting + idle + busy,
            ..Default::default()
        }
    }

    fn failing(n: u32, stderr: &str) -> PoolStatus {
        let mut p = pool(0, 0, 0);
        p.health = Health::default();
        p.health.consecutive_failures = n;
        p.health.restarts = n;
        p.health.last_failure = Some(StartFailure {
            reason: "exited",
            exit: None,
            stderr_tail: stderr.into(),
            stream: "stderr",
            at_ms: 0,
        });
        p
    }

    #[test]
    fn ready_when_an_instance_is_up() {
        let mut p = pool(0, 1, 0);
        p.health.ever_ready = true;
        let h = derive(&p, 1);
        assert!(h.ready && !h.crash_loop);
        assert_eq!(h.state, HealthState::Ready);
        assert_eq!(
            (h.phase, h.reason, h.container_state),
            ("Active", None, "running")
        );
        assert!(h.errors.is_empty() && h.message.is_none());
        assert_eq!(derive(&pool(0, 0, 2), 0).state, HealthState::Ready);
    }

    #[test]
    fn starting_and_pending() {
        let h = derive(&pool(1, 0, 0), 1);
        assert!(!h.ready);
        assert_eq!(h.state, HealthState::Starting);
        assert_eq!((h.phase, h.container_state), ("Creating", "waiting"));
        assert_eq!(derive(&pool(0, 0, 0), 2).state, HealthState::Pending);
    }

    #[test]
    fn scaled_to_zero_is_ready() {
        let h = derive(&pool(0, 0, 0), 0);
        assert!(h.ready);
        assert_eq!(h.state, HealthState::ScaledToZero);
        assert_eq!(h.phase, "Active");
    }

    #[test]
    fn crash_loop_is_never_ready() {
        let one = derive(&failing(CRASH_LOOP_THRESHOLD - 1, "boom"), 0);
        assert!(one.ready && !one.crash_loop);
        let mut p = failing(CRASH_LOOP_THRESHOLD, "a\n\nb\nc\nd\n");
        p.health.ever_ready = true;
        let h = derive(&p, 0);
        assert!(!h.ready && h.crash_loop);
        assert_eq!(h.state, HealthState::CrashLoop);
        assert_eq!((h.phase, h.reason), ("Failed", Some("CrashLoopBackOff")));
        assert_eq!(h.container_state, "terminated");
        assert_eq!(
            h.errors,
            vec!["instances fail to start: exited; stderr: b | c | d".to_string()]
        );
        assert_eq!(h.message.as_deref(), Some("a\n\nb\nc\nd\n"));
        // With the exit, in parentheses; a failed spawn's tail is the runtime's error.
        let f = p.health.last_failure.as_mut().unwrap();
        f.exit = Some(crate::runtime::ExitInfo {
            code: Some(3),
            signal: None,
        });
        let with_exit = derive(&p, 0).errors;
        let f = p.health.last_failure.as_mut().unwrap();
        f.reason = "spawn_failed";
        f.stream = "error";
        f.exit = None;
        f.stderr_tail = "cannot create a container: No command specified".into();
        assert_eq!(
            (with_exit, derive(&p, 0).errors),
            (
                vec![format!(
                    "instances fail to start: exited ({}); stderr: b | c | d",
                    crate::runtime::ExitInfo {
                        code: Some(3),
                        signal: None
                    }
                    .describe()
                )],
                vec![
                    "instances fail to start: spawn_failed; error: cannot create a container: \
                     No command specified"
                        .to_string()
                ]
            )
        );
    }

    #[test]
    fn invalid_deployment_wins() {
        let mut p = failing(CRASH_LOOP_THRESHOLD, "");
        p.deploy_error = Some("/nope does not exist".into());
        p.idle = 1;
        let h = derive(&p, 0);
        assert!(!h.ready);
        assert_eq!(h.state, HealthState::Invalid);
        assert_eq!((h.phase, h.reason), ("Failed", Some("Error")));
        assert_eq!(h.container_state, "running");
        assert_eq!(h.errors[0], "/nope does not exist");
        assert_eq!(h.errors.len(), 2);
        assert_eq!(h.message.as_deref(), Some("/nope does not exist"));
    }

    #[test]
    fn long_stderr_is_cut() {
        let h = derive(&failing(CRASH_LOOP_THRESHOLD, &"x".repeat(1000)), 0);
        assert!(h.errors[0].ends_with(&format!("; stderr: {}", "x".repeat(400))));
    }
}
