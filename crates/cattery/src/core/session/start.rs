//! Starting a session: admission under the state lock, the session's record, the hand-over
//! to the instance's actor, and the answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::actor::{self, Start};
use super::admission::{admit, Admission};
use super::ending::reply_err;
use super::state::{Cmd, Delivery, InstState, InstanceCtl, Mailbox};
use super::{StartOutcome, StartParams, Supervisor};
use crate::core::{CoreError, CoreResult};
use crate::model::{now_ms, EndReason, SessionEnd, SessionRecord};
use crate::store::{StoreError, StoreResult};

/// Where admission put a start.
struct Placed {
    ctl: Arc<InstanceCtl>,
    /// A new instance's mailbox (its actor is not running yet); `None`: a warm or claimed one.
    mailbox: Option<Mailbox>,
    cold: bool,
    agent_id: Uuid,
}

impl Supervisor {
    /// Starts a session on `org`'s agent `agent_name`: takes a ready warm instance, else a
    /// warm instance that is still starting, else starts a new one below `maxAgents`; delivers
    /// the session (`POST /bot`, or [`StartParams::deliver`]) and answers once it is delivered.
    ///
    /// Errors: `NotFound` (no such live agent), `DeploymentNotReady`, `AtCapacity` (429, at
    /// once), `Draining` (503, also for a start still in flight when the drain stops it),
    /// `StartFailed` (`INSTANCE_EXITED`, `START_TIMEOUT` (504), `AGENT_CRASH_LOOP`,
    /// `SPAWN_FAILED`, `DELIVERY_FAILED`), `StoppedDuringStart` (a `DELETE` or the client
    /// going away before delivery), the store's `Conflict` (409) for a taken session id
    /// ([`StartParams::session_id`] live here or recorded).
    ///
    /// Runs on a task of its own, to its end even when the caller goes away (hyper drops a
    /// handler's future when its client closes the connection): cut between its steps, a
    /// start would leave its capacity slot, its instance and its open record behind.
    pub async fn start_session(
        self: &Arc<Self>,
        org: &str,
        agent_name: &str,
        p: StartParams,
    ) -> CoreResult<StartOutcome> {
        let (sup, org, agent) = (self.clone(), org.to_string(), agent_name.to_string());
        match tokio::spawn(async move { sup.start_session_whole(&org, &agent, p).await }).await {
            Ok(r) => r,
            // A panic is the caller's, as if the start had run on its task (the API answers
            // a generic 500); a task cancelled by the runtime's shutdown is a drain.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(CoreError::Draining),
        }
    }

    async fn start_session_whole(
        self: &Arc<Self>,
        org: &str,
        agent_name: &str,
        p: StartParams,
    ) -> CoreResult<StartOutcome> {
        let requested = Instant::now();
        let created_ms = now_ms();
        let session = p.session_id.unwrap_or_else(Uuid::new_v4);
        let placed = match self.place_reserved(org, agent_name, session).await {
            Err(CoreError::NotFound(_)) if self.learn_agent(org, agent_name).await => {
                self.place_reserved(org, agent_name, session).await
            }
            r => r,
        }
        .inspect_err(|e| {
            if matches!(e, CoreError::AtCapacity(_)) {
                crate::telemetry::session_at_capacity(org, agent_name);
            }
        })?;
        let recorded = match self
            .record_start(
                &placed,
                org,
                session,
                created_ms,
                (p.transport.clone(), p.daily_room.clone()),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => match self.written_after_all(&placed, session, &e).await {
                // Written; only the answer was lost. The actor records the instance with its
                // session again before delivering (`recorded: false`).
                Some(true) => false,
                Some(false) => {
                    self.unplace(placed, session);
                    return Err(e.into());
                }
                None => {
                    let err = CoreError::from(e);
                    self.abandon(placed, session);
                    self.record_start_failed(org, agent_name, session, &err)
                        .await;
                    return Err(err);
                }
            },
        };
        placed.ctl.session_stored.store(true, Ordering::SeqCst);
        self.session_changed(org, session);
        let max_s = placed.ctl.deployment.spec.max_session_duration_s();
        let mut headers = vec![
            ("x-daily-session-id".to_string(), session.to_string()),
            ("x-pcc-max-session-seconds".to_string(), max_s.to_string()),
        ];
        if let Some(t) = &p.transport {
            headers.push(("x-daily-transport-type".into(), t.clone()));
        }
        headers.extend(p.extra_headers);
        let (tx, mut rx) = oneshot::channel();
        let delivery = Delivery {
            session,
            body: if p.body.is_empty() {
                Bytes::from_static(b"{}")
            } else {
                p.body
            },
            deliver: p.deliver,
            headers,
            transport: p.transport,
            requested,
            deadline: requested + Duration::from_secs(u64::from(max_s)),
            reply: Some(tx),
            recorded,
        };
        let (ctl, cold) = (placed.ctl.clone(), placed.cold);
        self.hand_over(placed, delivery);
        let answer = match p.client_gone {
            None => rx.await,
            Some(mut gone) => tokio::select! {
                r = &mut rx => r,
                _ = &mut gone => {
                    let _ = ctl.cmd_tx.send(Cmd::Stop(EndReason::ClientDisconnected));
                    rx.await
                }
            },
        };
        let err = match answer {
            Ok(Ok(bot_start_ms)) => {
                crate::telemetry::session_started(org, agent_name, cold, requested.elapsed());
                return Ok(StartOutcome {
                    session_id: session,
                    cold_start: cold,
                    bot_start_ms,
                });
            }
            Ok(Err(e)) => e,
            Err(_) => CoreError::StartFailed {
                code: "INSTANCE_EXITED",
                message: "the instance went away before the session was delivered".into(),
            },
        };
        // A warm instance ended (drained, stopped) before its actor took the session: the
        // session's recorded end says why, not "the instance went away".
        let err = match err {
            CoreError::StartFailed {
                code: "INSTANCE_EXITED",
                ..
            } => match self.store.get_session(session).await {
                Ok(Some(r)) => match r.end.map(|x| x.reason) {
                    Some(EndReason::Drained) => CoreError::Draining,
                    Some(EndReason::StoppedDuringStart | EndReason::ClientDisconnected) => {
                        CoreError::StoppedDuringStart(session)
                    }
                    _ => err,
                },
                _ => err,
            },
            e => e,
        };
        self.record_start_failed(org, agent_name, session, &err)
            .await;
        self.session_changed(org, session);
        Err(err)
    }

    /// An agent this node does not know yet, read from the store; whether it was found (live,
    /// with its deployment) and registered. On several nodes an agent created through another
    /// node reaches this one through the store's change feed a few ms after its commit: a
    /// start sent here in between (a client that deploys, then starts at once, through a
    /// load balancer) would otherwise answer 404 for an agent whose creation was answered 200.
    /// One node alone (no feed) registers every agent it creates itself: nothing to read.
    async fn learn_agent(self: &Arc<Self>, org: &str, agent_name: &str) -> bool {
        if !self.has_change_feed() {
            return false;
        }
        let Ok(Some(agent)) = self.store.get_agent(org, agent_name).await else {
            return false;
        };
        let Ok(Some(dep)) = self.store.get_deployment(agent.desired_deployment_id).await else {
            return false;
        };
        self.upsert_agent(agent, dep);
        true
    }

    /// Admission ([`Supervisor::place`]); a cold start first reserves its capacity slot in
    /// the store, one atomic step that holds `maxAgents` across every node on the store, and
    /// answers `AtCapacity` when there is none.
    async fn place_reserved(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
    ) -> CoreResult<Placed> {
        let (agent_id, max) = match self.place(org, agent_name, session, None)? {
            Ok(placed) => return Ok(placed),
            Err(need) => need,
        };
        let id = Uuid::new_v4();
        let node = self.cfg.node_id.clone();
        let reserved = match self.store.reserve_slot(agent_id, max, id, &node).await {
            Ok(r) => r,
            Err(e) => {
                // The store may have taken it and lost only its answer.
                self.free_uncertain_slot(agent_id, max, id);
                return Err(e.into());
            }
        };
        if !reserved {
            return Err(CoreError::AtCapacity(agent_name.to_string()));
        }
        match self.place(org, agent_name, session, Some(id)) {
            Ok(Ok(placed)) if placed.mailbox.is_some() => Ok(placed),
            Ok(Ok(placed)) => {
                // A warm instance became free meanwhile and was taken instead.
                self.free_slot(id);
                Ok(placed)
            }
            Ok(Err(_)) => {
                self.free_slot(id);
                Err(CoreError::AtCapacity(agent_name.to_string()))
            }
            Err(e) => {
                self.free_slot(id);
                Err(e)
            }
        }
    }

    /// Admission under the state lock; the session joins the live set at once. A cold start
    /// needs a capacity slot: with `slot` (reserved for the new instance's id) it is placed,
    /// without it the answer is `Ok(Err((agent, maxAgents)))`, to reserve one first.
    ///
    /// Errors: those of [`admit`], `Draining`, `Fenced`, and the store's `Conflict` (409) for
    /// a session id already live here.
    fn place(
        &self,
        org: &str,
        agent_name: &str,
        session: Uuid,
        slot: Option<Uuid>,
    ) -> CoreResult<Result<Placed, (Uuid, u32)>> {
        let mut st = self.state.lock();
        // Checked under the state lock: the drain sets the flag under it too, so a start
        // either sees the drain or is seen by it (never a half-created instance).
        if self.is_draining() {
            return Err(CoreError::Draining);
        }
        if self.is_fenced() {
            return Err(CoreError::Fenced);
        }
        // A session id is live here once: a second start of a held id (a caller-given or
        // derived one, its first start not recorded yet) would take its entry, and the first
        // instance would outlive its session or never be stopped. Refused before anything is
        // admitted, as the store refuses a taken id.
        if st.sessions.contains_key(&session) {
            return Err(CoreError::Store(StoreError::Conflict));
        }
        let not_found = || CoreError::NotFound(format!("agent {agent_name} not found"));
        let agent_id = *st
            .by_name
            .get(&(org.to_string(), agent_name.to_string()))
            .ok_or_else(not_found)?;
        let pool = st.pools.get_mut(&agent_id).ok_or_else(not_found)?;
        let (ctl, mailbox, cold) = match admit(pool, agent_name, session, Instant::now())? {
            Admission::Warm(c) => (c, None, false),
            Admission::Claimed(c) => (c, None, true),
            Admission::Cold => {
                let Some(id) = slot else {
                    return Ok(Err((agent_id, pool.agent.max_agents)));
                };
                // The previous deployment during a rollout: the new one has not proven
                // itself yet.
                let (c, mb) = InstanceCtl::new(
                    &pool.agent,
                    pool.serving().clone(),
                    InstState::Claimed,
                    Some(session),
                    Some(id),
                );
                pool.instances.insert(c.id, c.clone());
                (c, Some(mb), true)
            }
        };
        st.sessions.insert(session, ctl.clone());
        self.publish_live(&st);
        Ok(Ok(Placed {
            ctl,
            mailbox,
            cold,
            agent_id,
        }))
    }

    /// Records the session. A ready warm instance is already recorded: the session and the
    /// instance's promise to it go in one write. Otherwise (or if its record was missing) the
    /// actor records the instance with its session before delivering. Returns whether the
    /// instance's record names the session.
    async fn record_start(
        &self,
        placed: &Placed,
        org: &str,
        session: Uuid,
        created_ms: i64,
        (transport, daily_room): (Option<String>, Option<crate::model::SessionRoom>),
    ) -> StoreResult<bool> {
        let rec = SessionRecord {
            id: session,
            org: org.to_string(),
            agent_id: placed.agent_id,
            deployment_id: placed.ctl.deployment.id,
            created_ms,
            updated_ms: created_ms,
            bot_start_ms: None,
            cold_start: Some(placed.cold),
            transport,
            end: None,
            samples: Vec::new(),
            node_id: self.cfg.node_id.clone(),
            daily_room,
        };
        if placed.mailbox.is_none() && !placed.cold {
            self.store
                .insert_session_for_instance(&rec, placed.ctl.id)
                .await
        } else {
            self.store.insert_session(&rec).await.map(|()| false)
        }
    }

    /// Whether the start's record was written after all, though its write answered `e`: a
    /// transient error may come after the commit (a connection cut before the reply), so the
    /// record is read back. `None` when that cannot be told (the read failed too).
    async fn written_after_all(
        &self,
        placed: &Placed,
        session: Uuid,
        e: &crate::store::StoreError,
    ) -> Option<bool> {
        if !e.is_transient() {
            return Some(false);
        }
        match self.store.get_session(session).await {
            // An insert that found the id taken answers `Conflict`, never a transient error:
            // an open record of this agent made by this node, as this start writes it (its
            // `coldStart`, not delivered), is this start's. A websocket session's record still
            // waiting for its client has no `coldStart` (the write did not take it over); a
            // delivered one is another start's (a lost node's, this node's since a takeover).
            Ok(r) => Some(r.is_some_and(|r| {
                r.agent_id == placed.agent_id
                    && r.deployment_id == placed.ctl.deployment.id
                    && r.node_id == self.cfg.node_id
                    && r.end.is_none()
                    && r.cold_start == Some(placed.cold)
                    && r.bot_start_ms.is_none()
            })),
            Err(_) => None,
        }
    }

    /// Undoes [`Supervisor::place`] when whether the session was recorded is unknown: a warm
    /// instance may be promised to it in the store, so it is never given back to the pool
    /// (another session could take it while the store names this one): it is stopped, and
    /// its cleanup ends the session it was promised to. Anything else is undone as
    /// [`Supervisor::unplace`] does (no instance record was promised).
    fn abandon(&self, placed: Placed, session: Uuid) {
        if placed.mailbox.is_some() || placed.cold {
            return self.unplace(placed, session);
        }
        self.leave_live_set(&placed, session);
        let _ = placed.ctl.cmd_tx.send(Cmd::Stop(EndReason::StartFailed));
    }

    /// Takes the start's session out of the live set, if the entry is still this start's: a
    /// re-adoption in a takeover may have put the session's recorded instance there since
    /// (`readopt_busy`), and that entry stays.
    fn leave_live_set(&self, placed: &Placed, session: Uuid) {
        let mut st = self.state.lock();
        st.leave_live_set(session, &placed.ctl);
        self.publish_live(&st);
    }

    /// Undoes [`Supervisor::place`] when the session could not be recorded.
    fn unplace(&self, placed: Placed, session: Uuid) {
        self.leave_live_set(&placed, session);
        match placed.mailbox {
            // Give the instance back: it has not been told about the session yet.
            None => placed.ctl.release(),
            Some((rx, done_tx)) => {
                drop(rx);
                let _ = done_tx.send(true);
                if let Some(pool) = self.state.lock().pools.get_mut(&placed.agent_id) {
                    pool.instances.remove(&placed.ctl.id);
                }
                // It never started: its capacity slot goes now.
                self.free_slot(placed.ctl.id);
            }
        }
    }

    /// Gives the session to its instance: a new instance's actor starts with it; a warm or
    /// claimed one gets it as a command.
    fn hand_over(self: &Arc<Self>, placed: Placed, delivery: Delivery) {
        match placed.mailbox {
            Some(mb) => {
                tokio::spawn(actor::run(
                    self.clone(),
                    placed.ctl,
                    mb,
                    Start::New(Some(delivery)),
                ));
            }
            None => {
                if let Err(mpsc::error::SendError(Cmd::Assign(mut d))) =
                    placed.ctl.cmd_tx.send(Cmd::Assign(Box::new(delivery)))
                {
                    reply_err(&mut d, "the warm instance went away");
                }
            }
        }
    }

    /// The instance's end was recorded before a failed start's answer; if it ended before
    /// the session's row existed (a warm instance exiting just as it was taken), that record
    /// missed the session: end it now (first wins, so otherwise this changes nothing). A
    /// write the store refuses for now is written again until it lands.
    async fn record_start_failed(
        self: &Arc<Self>,
        org: &str,
        agent: &str,
        session: Uuid,
        err: &CoreError,
    ) {
        let end = SessionEnd {
            ended_ms: now_ms(),
            reason: match err {
                CoreError::Draining => EndReason::Drained,
                CoreError::StoppedDuringStart(_) => EndReason::StoppedDuringStart,
                _ => EndReason::StartFailed,
            },
            completion_status: "HTTP_ERROR".into(),
            exit_code: None,
            exit_signal: None,
            message: Some(err.to_string()),
        };
        match self.store.end_session(session, &end).await {
            Ok(wrote) => self.start_failure_recorded(org, agent, session, &end, wrote),
            Err(e) if e.is_transient() => {
                tracing::warn!(session = %session, error = %e, "could not record the failed start's end yet; trying again");
                let (sup, org, agent) = (self.clone(), org.to_string(), agent.to_string());
                super::pending::write_again("a failed start's end", session, move || {
                    let (sup, org, agent, end) =
                        (sup.clone(), org.clone(), agent.clone(), end.clone());
                    async move {
                        let wrote = sup.store.end_session(session, &end).await?;
                        sup.start_failure_recorded(&org, &agent, session, &end, wrote);
                        Ok(())
                    }
                });
            }
            Err(e) => {
                tracing::error!(session = %session, error = %e, "could not record session end")
            }
        }
        self.run_end_hook(session, false);
    }

    /// What follows a failed start's end once the store took it (`wrote`: this write was
    /// the session's end).
    fn start_failure_recorded(
        &self,
        org: &str,
        agent: &str,
        session: Uuid,
        end: &SessionEnd,
        wrote: bool,
    ) {
        if !wrote {
            return;
        }
        crate::telemetry::session_ended(org, agent, end.reason.as_str());
        let agent_id = self
            .state
            .lock()
            .by_name
            .get(&(org.to_string(), agent.to_string()))
            .copied();
        self.announce_session_end(org, (agent_id, agent), None, session, end);
    }
}
