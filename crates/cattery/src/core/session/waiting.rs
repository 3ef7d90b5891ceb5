//! Websocket sessions waiting for their client: recorded at `/start` (listed, stoppable),
//! taken over by the start when the client connects ([`super::Supervisor::start_session`]
//! with the announced id), or ended `client_never_connected` when the token expires.

use uuid::Uuid;

use super::Supervisor;
use crate::core::{CoreError, CoreResult};
use crate::model::{now_ms, EndReason, SessionEnd, SessionRecord};

impl Supervisor {
    /// Records `session`, announced by a websocket `/start` of `org`'s agent `agent_name`,
    /// as waiting for its client: no instance, no `coldStart` until the client connects.
    ///
    /// Errors: `NotFound` (no such live agent), `Store`.
    pub async fn record_waiting_session(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
    ) -> CoreResult<()> {
        let (agent_id, deployment_id) = {
            let st = self.state.lock();
            st.by_name
                .get(&(org.to_string(), agent_name.to_string()))
                .and_then(|id| st.pools.get(id))
                .map(|p| (p.agent.id, p.deployment.id))
                .ok_or_else(|| CoreError::NotFound(format!("agent {agent_name} not found")))?
        };
        let now = now_ms();
        self.store
            .insert_session(&SessionRecord {
                id: session,
                org: org.to_string(),
                agent_id,
                deployment_id,
                created_ms: now,
                updated_ms: now,
                bot_start_ms: None,
                cold_start: None,
                transport: Some("websocket".into()),
                end: None,
                samples: Vec::new(),
                node_id: self.node_id().to_string(),
                daily_room: None,
            })
            .await?;
        self.session_changed(org, session);
        Ok(())
    }

    /// Ends a session that waited for its client and will never get one (its token expired,
    /// or it was stopped first): `reason` with `message`, first end wins. Returns whether
    /// this call recorded the end.
    pub async fn end_waiting_session(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
        reason: EndReason,
        message: &str,
    ) -> CoreResult<bool> {
        let end = waiting_end(reason, message);
        // Only while no start has taken the record over (one write): a client that connects
        // at this moment either starts the session or is refused.
        let wrote = self.store.end_waiting_session(session, &end).await?;
        if wrote {
            self.session_end_recorded(org, (None, agent_name), None, session, &end);
            self.session_changed(org, session);
        }
        Ok(wrote)
    }
}

impl Supervisor {
    /// The token of `session` expired: if its record still waits for a client (none
    /// connected, none was stopped), it ends `client_never_connected`. Returns whether this
    /// call recorded the end.
    pub async fn expire_waiting_session(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
        ttl: std::time::Duration,
    ) -> CoreResult<bool> {
        let waiting = self
            .store
            .get_session(session)
            .await?
            .is_some_and(|r| r.org == org && r.waiting_for_client());
        if !waiting {
            return Ok(false);
        }
        let message = format!(
            "no websocket client connected within the token's {} s",
            ttl.as_secs_f64()
        );
        self.end_waiting_session(
            org,
            agent_name,
            session,
            EndReason::ClientNeverConnected,
            &message,
        )
        .await
    }
}

/// The end of a session that never reached an instance.
pub(super) fn waiting_end(reason: EndReason, message: &str) -> SessionEnd {
    SessionEnd {
        ended_ms: now_ms(),
        reason,
        completion_status: "HTTP_ERROR".into(),
        exit_code: None,
        exit_signal: None,
        message: Some(message.to_string()),
    }
}
