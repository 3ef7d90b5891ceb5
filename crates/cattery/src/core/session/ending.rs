//! How an instance ends: the reason recorded for its session, and what a start still waiting
//! for that session is answered.

use std::sync::Arc;
use std::time::Duration;

use crate::core::instance_http::BotOutcome;
use crate::core::CoreError;
use crate::model::EndReason;
use crate::runtime::{ExitInfo, Instance};

use super::state::Delivery;

/// How long an instance's exit waits for its session's outcome (see `actor::serving`).
pub(super) const OUTCOME_AFTER_EXIT: Duration = Duration::from_millis(250);

/// Why the actor ends an instance.
pub(super) struct Ending {
    pub reason: EndReason,
    pub completion: String,
    pub message: Option<String>,
    pub exit: Option<ExitInfo>,
    /// The error code and message a start waiting for the session gets.
    pub start_error: Option<(&'static str, String)>,
    /// Ended by the platform (a stop, the drain, the time limit), not by the session's own
    /// channel or its process: a websocket relay then closes its client first.
    pub by_platform: bool,
}

impl Ending {
    pub fn new(reason: EndReason, completion: &str) -> Self {
        Ending {
            reason,
            completion: completion.into(),
            message: None,
            exit: None,
            start_error: None,
            by_platform: false,
        }
    }

    /// This ending, as one the platform decided ([`Ending::by_platform`]).
    pub fn by_platform(mut self) -> Self {
        self.by_platform = true;
        self
    }

    /// A failed start (`start_failed`) with the code a waiting start gets.
    pub fn start_failed(code: &'static str, msg: String, exit: Option<ExitInfo>) -> Self {
        let mut e = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
        e.exit = exit;
        e.message = Some(msg.clone());
        e.start_error = Some((code, msg));
        e
    }

    /// [`Ending::start_failed`] with the instance's last output ([`Instance::last_output`]:
    /// its stderr tail, or stdout's when stderr is blank, named by `stream`): in the session's recorded end
    /// (the org's private API), never in the start's answer, which goes to public-key callers
    /// (browsers) and unauthenticated webhooks: a bot may print its secrets.
    pub fn start_failed_with_output(
        code: &'static str,
        msg: String,
        (stream, output): (&'static str, String),
        exit: Option<ExitInfo>,
    ) -> Self {
        let mut e = Ending::start_failed(code, msg.clone(), exit);
        let tail = output.trim();
        if !tail.is_empty() {
            e.message = Some(format!("{msg}; {stream}: {tail}"));
        }
        e
    }

    /// The answer for a start whose session this ending ends before it was delivered.
    pub fn start_answer(&mut self, d: &Delivery) -> CoreError {
        match self.reason {
            EndReason::Drained => CoreError::Draining,
            // Removed by the reconciliation of a fenced node: another node took it over.
            EndReason::Lost => CoreError::Fenced,
            EndReason::StoppedDuringStart | EndReason::Stopped | EndReason::ClientDisconnected => {
                CoreError::StoppedDuringStart(d.session)
            }
            EndReason::MaxDuration => CoreError::StartFailed {
                code: "START_TIMEOUT",
                message: "maxSessionDuration was reached before the instance was ready".into(),
            },
            _ => {
                let (code, message) = self.start_error.take().unwrap_or((
                    "INSTANCE_EXITED",
                    "the instance ended before the session was delivered".into(),
                ));
                CoreError::StartFailed { code, message }
            }
        }
    }

    /// Names an out-of-memory kill: an instance that ended in error after the kernel killed
    /// a process of it for going over its memory limit.
    pub async fn name_oom(
        &mut self,
        inst: &Arc<dyn Instance>,
        spec: &crate::model::DeploymentSpec,
    ) {
        if self.reason != EndReason::Error || self.exit.is_none() || !inst.out_of_memory().await {
            return;
        }
        let limit = spec
            .limits()
            .map(|l| format!("{} MiB", l.memory_bytes / (1024 * 1024)))
            .unwrap_or_else(|| "its memory limit".into());
        let of = match &spec.resources {
            Some(r) => format!("resources.memory {}", r.memory),
            None => format!("agentProfile {}", spec.agent_profile),
        };
        self.reason = EndReason::OutOfMemory;
        self.message = Some(format!(
            "out of memory: the instance went over the memory limit of {of} ({limit}) and was killed ({})",
            self.exit.map(|e| e.describe()).unwrap_or_default()
        ));
    }
}

/// The reason recorded for a stop that arrives before the session was delivered: a plain
/// stop (`DELETE`) becomes `stopped_during_start`; drain and client-gone keep their own.
pub(super) fn during_start(r: EndReason, promised: bool) -> EndReason {
    if promised && r == EndReason::Stopped {
        EndReason::StoppedDuringStart
    } else {
        r
    }
}

/// The ending of a delivered session from what its channel reported: the `/bot` answer
/// (2xx: completed, else an error with the status as `completionStatus`, reference §C), a
/// broken connection (completed only if the process exited 0 within 500 ms), or the end of
/// a websocket relay (`WS_CONNECTION_CLOSED`; `client_disconnected` when the client closed).
pub(super) async fn ending_of_outcome(out: BotOutcome, inst: &Arc<dyn Instance>) -> Ending {
    match out {
        BotOutcome::Answered(s, _) if (200..300).contains(&s) => {
            Ending::new(EndReason::Completed, "HTTP_COMPLETED")
        }
        BotOutcome::WsClosed { by_client: true } => {
            Ending::new(EndReason::ClientDisconnected, "WS_CONNECTION_CLOSED")
        }
        BotOutcome::WsClosed { by_client: false } => {
            Ending::new(EndReason::Completed, "WS_CONNECTION_CLOSED")
        }
        BotOutcome::WsAgentError(reason) => {
            let mut e = Ending::new(EndReason::Error, "WS_CONNECTION_CLOSED");
            e.message = Some(if reason.is_empty() {
                "the agent closed the websocket with 1011 (internal error): the bot raised (see the session's logs)".into()
            } else {
                format!("the agent closed the websocket with 1011 (internal error): {reason}")
            });
            e
        }
        BotOutcome::Answered(s, error) => {
            let mut e = Ending::new(EndReason::Error, &s.to_string());
            e.message = Some(answered_message(s, error.as_deref()));
            e
        }
        BotOutcome::Broken(err) => {
            // Usually the process died: give the exit status a moment to arrive.
            let ex = tokio::time::timeout(inst.exit_report_window(), inst.wait_exit())
                .await
                .ok();
            let mut e = match ex {
                Some(x) if x.success() => Ending::new(EndReason::Completed, "HTTP_COMPLETED"),
                _ => Ending::new(EndReason::Error, "HTTP_ERROR"),
            };
            e.exit = ex;
            // A process that died mid-session breaks the connection just before its exit
            // arrives: say so as when the exit is seen first (`exited_while_serving`).
            e.message = Some(match ex {
                Some(x) => format!("the instance exited ({})", x.describe()),
                None => format!("the /bot connection broke: {err}"),
            });
            e
        }
    }
}

/// The end message of a session whose `/bot` answered an error: the status and, when the body
/// said, why (the bot's exception, from the runner).
pub(super) fn answered_message(status: u16, error: Option<&str>) -> String {
    match error {
        Some(why) => format!("the agent answered /bot with HTTP {status}: {why}"),
        None => format!("the agent answered /bot with HTTP {status}"),
    }
}

/// Answers a start that this instance cannot serve.
pub(super) fn reply_err(d: &mut Delivery, why: &str) {
    if let Some(r) = d.reply.take() {
        let _ = r.send(Err(CoreError::StartFailed {
            code: "INSTANCE_EXITED",
            message: why.into(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use crate::core::instance_http::error_of_body;

    #[test]
    fn the_end_message_carries_the_bots_exception() {
        let body = br#"{"error": "RuntimeError: the LLM key is wrong", "code": "500"}"#;
        let why = error_of_body(body);
        assert_eq!(
            super::answered_message(500, why.as_deref()),
            "the agent answered /bot with HTTP 500: RuntimeError: the LLM key is wrong"
        );
        assert_eq!(
            error_of_body(br#"{"detail": "Not Found"}"#).as_deref(),
            Some("Not Found")
        );
        assert_eq!(error_of_body(b"<html>oops</html>"), None);
        // FastAPI's 422 for a /bot body that is not a JSON object: what was wrong, not the
        // body itself.
        let not_an_object = br#"{"detail": [{"type": "dict_type", "loc": ["body"],
            "msg": "Input should be a valid dictionary", "input": ["secret-ish"]}]}"#;
        assert_eq!(
            super::answered_message(422, error_of_body(not_an_object).as_deref()),
            "the agent answered /bot with HTTP 422: body: Input should be a valid dictionary"
        );
        let two = br#"{"detail": [{"loc": ["body", "a", 0], "msg": "bad"}, {"msg": "worse"}]}"#;
        assert_eq!(error_of_body(two).as_deref(), Some("body.a.0: bad; worse"));
        assert_eq!(error_of_body(br#"{"detail": [{"type": "x"}]}"#), None);
        assert_eq!(
            super::answered_message(502, None),
            "the agent answered /bot with HTTP 502"
        );
        let long = format!(r#"{{"error": "{}"}}"#, "x".repeat(5000));
        assert!(error_of_body(long.as_bytes()).unwrap().len() < 1100);
    }
}
