//! Crash-loop health of a deployment: failed starts in a row, with a backoff.

use std::time::Duration;

use tokio::time::Instant;

use crate::core::CoreError;
use crate::runtime::ExitInfo;

/// Consecutive failed starts after which a deployment counts as crash-looping.
pub const CRASH_LOOP_THRESHOLD: u32 = 2;

/// A recent failed start, shown in agent status.
#[derive(Debug, Clone)]
pub struct StartFailure {
    /// `exited`, `start_timeout`, `spawn_failed`.
    pub reason: &'static str,
    /// Exit of the main process, if it exited.
    pub exit: Option<ExitInfo>,
    /// The instance's last output ([`crate::runtime::Instance::last_output`]), or the
    /// runtime's error for a failed spawn.
    pub stderr_tail: String,
    /// Which output `stderr_tail` is: `stderr`, `stdout`, or `error` (a failed spawn's).
    pub stream: &'static str,
    /// When (ms).
    pub at_ms: i64,
}

/// Health of one deployment.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Some instance of it answered `/readyz` with 200 once.
    pub ever_ready: bool,
    /// Failed starts since the last successful one.
    pub consecutive_failures: u32,
    /// All failed starts.
    pub restarts: u32,
    /// Most recent failure.
    pub last_failure: Option<StartFailure>,
    pub(super) backoff_until: Option<Instant>,
}

impl Health {
    /// Counts a failed start; the backoff doubles from 1 s up to 30 s.
    pub(super) fn failed(&mut self, f: StartFailure, now: Instant) {
        self.consecutive_failures += 1;
        self.restarts += 1;
        let n = self.consecutive_failures.min(6);
        self.backoff_until =
            Some(now + Duration::from_millis(500 << n).min(Duration::from_secs(30)));
        self.last_failure = Some(f);
    }

    /// Counts a start that became ready.
    pub(super) fn ready(&mut self) {
        self.ever_ready = true;
        self.consecutive_failures = 0;
        self.backoff_until = None;
    }

    /// Whether it counts as crash-looping: [`CRASH_LOOP_THRESHOLD`] failed starts in a row.
    pub fn crash_looping(&self) -> bool {
        self.consecutive_failures >= CRASH_LOOP_THRESHOLD
    }

    /// Whether the pool must not start instances of this deployment now.
    pub(super) fn backing_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|b| now < b)
    }

    /// `AGENT_CRASH_LOOP` when the deployment failed [`CRASH_LOOP_THRESHOLD`] starts in a
    /// row and is still backing off.
    pub(super) fn crash_loop(&self, agent_name: &str, now: Instant) -> Option<CoreError> {
        if !self.crash_looping() || !self.backing_off(now) {
            return None;
        }
        let f = self.last_failure.as_ref();
        // No stderr here: this answers public-key callers; the agent's status (private) has it.
        Some(CoreError::StartFailed {
            code: "AGENT_CRASH_LOOP",
            message: format!(
                "agent {agent_name} is crash-looping: {} failed starts in a row, last: {} ({}); \
                 its output is in the agent's status and logs",
                self.consecutive_failures,
                f.map(|f| f.reason).unwrap_or("unknown"),
                f.and_then(|f| f.exit)
                    .map(|e| e.describe())
                    .unwrap_or_default(),
            ),
        })
    }
}
