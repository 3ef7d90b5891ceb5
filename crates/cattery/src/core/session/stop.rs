//! Stopping a session (`DELETE`): answered only once the instance is gone and the end is
//! recorded.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use uuid::Uuid;

use super::pending::STOP_COMMIT_WAIT;
use super::state::{Cmd, InstanceCtl};
use super::Supervisor;
use crate::core::{CoreError, CoreResult};
use crate::model::{now_ms, EndReason, SessionEnd};

/// Sends a stop and waits until the instance is gone (its end recorded).
async fn stop_and_wait(ctl: &InstanceCtl) {
    let _ = ctl.cmd_tx.send(Cmd::Stop(EndReason::Stopped));
    let mut done = ctl.done.clone();
    let _ = done.wait_for(|d| *d).await;
}

impl Supervisor {
    /// Stops a session (the seed contract): the whole instance is removed and the end recorded
    /// before this returns. A session that already ended is left as it is.
    ///
    /// Errors: `NotFound` when the session does not exist, or belongs to another org or agent;
    /// `Store` when the instance is gone but the store has not taken its end within
    /// [`STOP_COMMIT_WAIT`] (the end is kept and written as soon as the store heals).
    pub async fn stop_session(&self, org: &str, agent_name: &str, session: Uuid) -> CoreResult<()> {
        let begun = std::time::Instant::now();
        self.stop_session_inner(org, agent_name, session).await?;
        crate::telemetry::session_stopped(org, agent_name, begun.elapsed());
        Ok(())
    }

    async fn stop_session_inner(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
    ) -> CoreResult<()> {
        // A live, stored session is answered from memory: no store read before the stop is
        // sent. (One whose record is still being inserted takes the store path below, as an
        // unknown one.)
        match self.live_owned(org, agent_name, session) {
            Some((ctl, Some(true))) => {
                stop_and_wait(&ctl).await;
                self.pending_ends
                    .committed(session, STOP_COMMIT_WAIT)
                    .await?;
                return Ok(());
            }
            Some((_, Some(false))) => {
                return Err(CoreError::NotFound(format!(
                    "session {session} not found for agent {agent_name}"
                )))
            }
            Some((_, None)) => {
                return Err(CoreError::NotFound(format!("session {session} not found")))
            }
            None => {}
        }
        let (_, rec) =
            crate::core::lookup::session_of(&self.store, org, agent_name, session).await?;
        if rec.end.is_some() {
            return Ok(());
        }
        let ctl = self.state.lock().sessions.get(&session).cloned();
        match ctl {
            Some(ctl) => stop_and_wait(&ctl).await,
            // Its instance is gone, its end not written yet: that end, never `lost`.
            None if self.pending_ends.has(session) => {}
            // A websocket session whose client has not connected: it never reaches one.
            None if rec.waiting_for_client() => {
                let end = super::waiting::waiting_end(
                    EndReason::StoppedDuringStart,
                    "stopped before its websocket client connected",
                );
                if self.store.end_session(session, &end).await? {
                    crate::telemetry::session_ended(org, agent_name, end.reason.as_str());
                    self.session_changed(org, session);
                }
                return Ok(());
            }
            None => {
                let end = SessionEnd {
                    ended_ms: now_ms(),
                    reason: EndReason::Lost,
                    completion_status: "HTTP_ERROR".into(),
                    exit_code: None,
                    exit_signal: None,
                    message: Some("no live instance was found for this session".into()),
                };
                if self.store.end_session(session, &end).await? {
                    crate::telemetry::session_ended(org, agent_name, end.reason.as_str());
                }
            }
        }
        self.pending_ends
            .committed(session, STOP_COMMIT_WAIT)
            .await?;
        Ok(())
    }

    /// A live, stored session's controller, and whether `org`'s agent `agent_name` owns it
    /// (`None`: another org's; `Some(false)`: another agent's).
    fn live_owned(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
    ) -> Option<(Arc<InstanceCtl>, Option<bool>)> {
        let st = self.state.lock();
        st.sessions
            .get(&session)
            .cloned()
            .filter(|c| c.session_stored.load(Ordering::SeqCst))
            .map(|ctl| {
                let agent_matches = st
                    .pools
                    .get(&ctl.agent_id)
                    .is_some_and(|p| p.agent.name == agent_name);
                let owned = (ctl.org == org).then_some(agent_matches);
                (ctl, owned)
            })
    }
}
