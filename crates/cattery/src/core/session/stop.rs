//! Stopping a session (`DELETE`): answered only once the instance is gone and the end is
//! recorded.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::pending::STOP_COMMIT_WAIT;
use super::state::{Cmd, InstanceCtl, State};
use super::{PeerStop, Supervisor};
use crate::core::{CoreError, CoreResult};
use crate::model::{now_ms, EndReason, SessionEnd, SessionRecord};

/// How often a stop forwarded to another node checks, while it waits for the answer, that
/// the owner still heartbeats.
const OWNER_CHECK: Duration = Duration::from_secs(1);

/// How long a stop waits for this node's takeover of the session's lost node to end or adopt
/// it (a takeover writes its ends right after it took the records over); past it the stop
/// answers 503 `NODE_UNREACHABLE` and writes nothing.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// Whether a websocket token may still be stored for the session: only for a websocket
/// session that `/start` announced and no client has started (a start records `coldStart`
/// after the token is taken, and a live session's token was taken before it started).
pub(crate) fn may_hold_ws_token(rec: &crate::model::SessionRecord) -> bool {
    rec.transport.as_deref() == Some("websocket") && rec.cold_start.is_none()
}

/// Sends a stop and waits until the instance is gone (its end recorded).
async fn stop_and_wait(ctl: &InstanceCtl) {
    let _ = ctl.cmd_tx.send(Cmd::Stop(EndReason::Stopped));
    let mut done = ctl.done.clone();
    let _ = done.wait_for(|d| *d).await;
}

impl Supervisor {
    /// Stops a session (the seed contract): the whole instance is removed and the end recorded
    /// before this returns. A session that already ended is left as it is. A websocket
    /// session whose client has not connected has its token revoked first (every node), so it
    /// can never start; its record then ends `stopped_during_start`.
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
            Some((_, None)) => {
                return Err(CoreError::NotFound(format!("session {session} not found")))
            }
            // Another agent has the name now: the session may be of a deleted agent that had
            // it, which the store says (below).
            Some((_, Some(false))) | None => {}
        }
        let mut rec = self.session_to_stop(org, agent_name, session).await?;
        if may_hold_ws_token(&rec) {
            // A websocket session announced by /start that has not started: its token is
            // revoked first (in the store, for every node), so no client can start it any
            // more; then its record is read again (a client may have taken the token just
            // before). A session that started, or any other transport, holds no token:
            // nothing to revoke, no round trip.
            self.store
                .revoke_ws_tokens(org, agent_name, session)
                .await?;
            rec = self.session_to_stop(org, agent_name, session).await?;
        }
        if rec.end.is_some() {
            return Ok(());
        }
        let here = self.state.lock().sessions.contains_key(&session);
        // A fenced node may still hold a session another node has adopted meanwhile: the
        // adopter's record wins, and the stop goes to it.
        if !self.owns(&rec.node_id) && (!here || self.is_fenced()) {
            return self.stop_elsewhere(rec.node_id, session).await;
        }
        self.stop_here(org, agent_name, &rec).await
    }

    /// The record of `org`'s session `session` of agent `agent_name`, as
    /// [`crate::core::lookup::session_of`] finds it: the live agent of that name comes from
    /// this node's agents (kept in step with the store by the change feed); any other agent
    /// (a deleted one of that name) from the store. Errors: `NotFound` as `session_of`.
    async fn session_to_stop(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
    ) -> CoreResult<crate::model::SessionRecord> {
        let rec = self
            .store
            .get_session(session)
            .await?
            .filter(|s| s.org == org)
            .ok_or_else(|| CoreError::NotFound(format!("session {session} not found")))?;
        // The live agent of that name is known here; a session of a deleted agent of that
        // name (one created again since, too) is checked against the store.
        let live = names_live_agent(&self.state.lock(), org, agent_name, rec.agent_id);
        let matches = match live {
            Some(true) => true,
            _ => crate::core::lookup::names_agent(&self.store, org, agent_name, rec.agent_id)
                .await?
                .is_some(),
        };
        if !matches {
            return Err(CoreError::NotFound(format!(
                "session {session} not found for agent {agent_name}"
            )));
        }
        Ok(rec)
    }

    /// Stops a session this node owns (or one no live instance serves), as a `DELETE` does
    /// on a single node.
    async fn stop_here(&self, org: &str, agent_name: &str, rec: &SessionRecord) -> CoreResult<()> {
        let (session, waiting) = (rec.id, rec.waiting_for_client());
        // Taken over from a lost node by this node a moment ago: its end (`lost`, naming the
        // node) or its adoption is being written; wait for it rather than record a vaguer end.
        let began = std::time::Instant::now();
        while self.taking_over(session) {
            if began.elapsed() >= TAKEOVER_WAIT {
                // The takeover may still be adopting the instance (a slow store or engine):
                // a `lost` written now would answer while the instance runs on, adopted
                // for a session already over. The caller tries again.
                return Err(CoreError::NodeUnreachable(format!(
                    "session {session} belonged to a lost node whose takeover is not finished yet; try again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ctl = self.state.lock().sessions.get(&session).cloned();
        match ctl {
            Some(ctl) => stop_and_wait(&ctl).await,
            // Its instance is gone, its end not written yet: that end, never `lost`.
            None if self.pending_ends.has(session) => {}
            // A websocket session whose client has not connected: it never reaches one.
            None if waiting => {
                let end = super::waiting::waiting_end(
                    EndReason::StoppedDuringStart,
                    "stopped before its websocket client connected",
                );
                if self.store.end_waiting_session(session, &end).await? {
                    self.session_end_recorded(org, (None, agent_name), None, session, &end);
                    self.session_changed(org, session);
                    return Ok(());
                }
                // Not waiting any more: ended, or a client that took its token just before
                // the stop revoked it has started it (on this node or another): stopped as
                // any started session, once its instance is gone.
                let rec =
                    self.store.get_session(session).await?.ok_or_else(|| {
                        CoreError::NotFound(format!("session {session} not found"))
                    })?;
                if rec.end.is_some() {
                    return Ok(());
                }
                if !self.owns(&rec.node_id) {
                    return Box::pin(self.stop_elsewhere(rec.node_id, session)).await;
                }
                return Box::pin(self.stop_here(org, agent_name, &rec)).await;
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
                    self.session_end_recorded(org, (None, agent_name), None, session, &end);
                    self.record_ended(rec);
                }
            }
        }
        self.pending_ends
            .committed(session, STOP_COMMIT_WAIT)
            .await?;
        Ok(())
    }

    /// A stop forwarded by another node of the cluster (it checked the caller's org and
    /// agent): stops the session if this node owns it. Answered once the instance is gone.
    ///
    /// Errors: `NotFound` for an unknown session; `Store` as [`Supervisor::stop_session`].
    pub async fn stop_owned(&self, session: Uuid) -> CoreResult<PeerStop> {
        let live = self.state.lock().sessions.get(&session).cloned();
        if let Some(ctl) = live {
            stop_and_wait(&ctl).await;
            self.pending_ends
                .committed(session, STOP_COMMIT_WAIT)
                .await?;
            return Ok(PeerStop::Stopped);
        }
        let rec = self
            .store
            .get_session(session)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("session {session} not found")))?;
        if rec.end.is_some() {
            return Ok(PeerStop::Stopped);
        }
        if !self.owns(&rec.node_id) {
            return Ok(PeerStop::NotOwner);
        }
        let agent = self.agent_name(rec.agent_id);
        self.stop_here(&rec.org, &agent, &rec).await?;
        Ok(PeerStop::Stopped)
    }

    /// Stops a session that node `owner` owns: forwarded to it while it is alive; once it is
    /// dead (no heartbeat within the node timeout), this node takes it over first
    /// ([`Supervisor::take_over`]) and stops what it adopted. Follows the session when its
    /// owner changes meanwhile. Bounded by twice the node timeout plus 5 s.
    ///
    /// The first try takes the owner's address from the node list last read (refreshed every
    /// heartbeat period), when that list has it alive: no round trip to the store. Anything
    /// else (not in it, seen dead there, a failed or refused forward) reads the list from the
    /// store, and only a list read from the store declares a node dead.
    async fn stop_elsewhere(&self, mut owner: String, session: Uuid) -> CoreResult<()> {
        let timeout = self.cfg.node_timeout;
        let give_up = std::time::Instant::now() + timeout * 2 + Duration::from_secs(5);
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let mut first = true;
        // The last failure of a forward, for the answer when the stop's time is up.
        let mut failed: Option<String> = None;
        loop {
            let stale_ms = now_ms() - timeout_ms;
            let seen = first
                .then(|| self.node_seen(&owner))
                .flatten()
                .filter(|n| n.heartbeat_ms > stale_ms && n.advertise_url.is_some());
            first = false;
            let (node, stale_ms) = match seen {
                Some(n) => (Some(n), stale_ms),
                None => {
                    let nodes = self.store.list_nodes().await?;
                    self.remember_nodes(&nodes);
                    let n = nodes.into_iter().find(|n| n.id == owner);
                    (n, now_ms() - timeout_ms)
                }
            };
            match node {
                Some(n) if n.heartbeat_ms > stale_ms => {
                    let (Some(peers), Some(url)) = (self.peers.get(), n.advertise_url.as_deref())
                    else {
                        return Err(CoreError::NodeUnreachable(format!(
                            "session {session} runs on node {owner}, which this node cannot \
                             reach: give every node --advertise-url and --cluster-secret-file"
                        )));
                    };
                    match self.stop_at_live_owner(peers, url, &owner, session).await? {
                        Some(Ok(PeerStop::Stopped)) => return Ok(()),
                        // Not the owner's any more, or gone from the store: read it again.
                        Some(Ok(PeerStop::NotOwner | PeerStop::Unknown)) => {}
                        Some(Ok(PeerStop::Refused)) => {
                            return Err(CoreError::NodeUnreachable(format!(
                                "session {session} runs on node {owner}, which refused this \
                                 node's cluster secret: every node needs the same \
                                 --cluster-secret-file"
                            )));
                        }
                        Some(Ok(PeerStop::Stranger)) => {
                            return Err(CoreError::NodeUnreachable(format!(
                                "session {session} runs on node {owner}, which does not find \
                                 this node in its database: the two use different databases"
                            )));
                        }
                        Some(Err(e)) => {
                            // Said once per stop (then at debug level): the retries come
                            // every 150 ms or so until the stop's time is up.
                            if failed.is_none() {
                                tracing::warn!(node = %owner, %session, url = %url, error = %e,
                                    "a forwarded stop failed; retrying until the owner answers or is dead");
                            } else {
                                tracing::debug!(node = %owner, %session, error = %e,
                                    "a forwarded stop failed again; retrying");
                            }
                            failed = Some(e);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        None => {
                            tracing::warn!(node = %owner, %session,
                                "the owner stopped heartbeating while it had the stop; taking over");
                        }
                    }
                }
                // Stale, but this node's own heartbeats were not taken steadily for a node
                // timeout (a database outage just ended): the owner may live and not have
                // heartbeated again yet. Asked again until it does or the wait says it is dead.
                _ if !self.may_declare_dead() => {
                    failed.get_or_insert_with(|| {
                        format!(
                            "node {owner}'s heartbeat is stale, but this node's own heartbeats \
                             were not recorded steadily for the node timeout, so it cannot tell \
                             a lost node from a database outage yet"
                        )
                    });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {
                    if let Some(me) = self.me() {
                        me.take_over(&owner, stale_ms)
                            .await
                            .map_err(|e| CoreError::NodeUnreachable(e.to_string()))?;
                    }
                }
            }
            let rec = self
                .store
                .get_session(session)
                .await?
                .ok_or_else(|| CoreError::NotFound(format!("session {session} not found")))?;
            if rec.end.is_some() {
                return Ok(());
            }
            if self.owns(&rec.node_id) {
                let agent = self.agent_name(rec.agent_id);
                return self.stop_here(&rec.org, &agent, &rec).await;
            }
            owner = rec.node_id;
            if std::time::Instant::now() > give_up {
                let last = failed
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                return Err(CoreError::NodeUnreachable(format!(
                    "session {session} runs on node {owner}, which did not answer the stop in \
                     time{last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a stop to node `owner` at `url` and waits for its answer while the owner stays
    /// alive ([`Supervisor::owner_dead`], every [`OWNER_CHECK`]). `None`: it is dead (an
    /// owner that froze, or lost its machine, after it took the request would otherwise hold
    /// the stop for as long as its TCP connection lasts); the caller then takes it over.
    async fn stop_at_live_owner(
        &self,
        peers: &Arc<dyn super::Peers>,
        url: &str,
        owner: &str,
        session: Uuid,
    ) -> CoreResult<Option<Result<PeerStop, String>>> {
        let sent = peers.stop(url, session);
        tokio::pin!(sent);
        loop {
            tokio::select! {
                r = &mut sent => return Ok(Some(r)),
                () = tokio::time::sleep(OWNER_CHECK) => {
                    if self.owner_dead(owner).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Node `id` if it is alive (its heartbeat within the node timeout) and has an advertise
    /// URL: from the node list seen (refreshed every heartbeat period; a node alive there is
    /// alive in the store too), else from the store's list, which is then remembered.
    pub async fn live_node(&self, id: &str) -> CoreResult<Option<crate::store::NodeRecord>> {
        let timeout_ms = i64::try_from(self.cfg.node_timeout.as_millis()).unwrap_or(i64::MAX);
        let live = |n: &crate::store::NodeRecord| n.heartbeat_ms > now_ms() - timeout_ms;
        let usable = |n: &crate::store::NodeRecord| live(n) && n.advertise_url.is_some();
        if let Some(n) = self.node_seen(id).filter(usable) {
            return Ok(Some(n));
        }
        let nodes = self.store.list_nodes().await?;
        self.remember_nodes(&nodes);
        Ok(nodes.into_iter().find(|n| n.id == id && live(n)))
    }

    /// Whether node `owner`, which has a forwarded call in hand, is known dead
    /// ([`Supervisor::live_node`] finds it nowhere alive). A store that cannot be read says
    /// nothing: the call waits on (a database outage must not fail calls the owner is still
    /// answering).
    pub async fn owner_dead(&self, owner: &str) -> bool {
        match self.live_node(owner).await {
            Ok(n) => n.is_none(),
            Err(e) => {
                tracing::warn!(node = %owner, error = %e,
                    "cannot read the node list; waiting on for the owner's answer");
                false
            }
        }
    }

    /// A live, stored session's controller, and whether `org`'s agent `agent_name` owns it
    /// (`None`: another org's; `Some(false)`: another agent's). `None` overall also when no
    /// live agent has that name here: the store path decides then.
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
            .and_then(|ctl| {
                if ctl.org != org {
                    return Some((ctl, None));
                }
                let agent_matches = names_live_agent(&st, org, agent_name, ctl.agent_id)?;
                Some((ctl, Some(agent_matches)))
            })
    }
}

/// Whether `org`'s live agent `name` is agent `id`; `None` when no live agent has that name
/// here (then the name may stand for a deleted agent: the store says which).
fn names_live_agent(st: &State, org: &str, name: &str, id: Uuid) -> Option<bool> {
    let live = st.by_name.get(&(org.to_string(), name.to_string()))?;
    Some(*live == id)
}
