//! After a restart: re-adopting what the previous run left, finishing its interrupted stops;
//! and at shutdown: the drain.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::actor::{self, Start};
use super::state::{AgentPool, Cmd, InstState, InstanceCtl};
use super::Supervisor;
use crate::model::{now_ms, AgentRecord, EndReason, InstanceRecord, SessionEnd, SessionRecord};
use crate::runtime::logs::StoredTail;
use crate::runtime::{Adopted, GoneExit, Instance, LogSink};
use crate::store::LogFilter;

/// What the recovery found, as it goes.
#[derive(Default)]
struct Found {
    /// Sessions whose instance was re-adopted.
    adopted_sessions: HashSet<Uuid>,
    /// Instances kept (the sweep removes the others).
    keep: HashSet<Uuid>,
    /// Instances to remove, with their grace.
    remove: Vec<(Arc<dyn Instance>, Duration)>,
    /// Stops requested before the restart: session -> deadline (Unix ms).
    stops: HashMap<Uuid, i64>,
    /// Delivered sessions whose instance ended while no server watched it, and how (when the
    /// runtime still knew).
    exits: HashMap<Uuid, GoneExit>,
    /// Delivered websocket sessions whose relay is gone (no live process relays them, see
    /// `relays`): whether their instance was still running (and is removed), and how it
    /// ended if it had and the runtime knows.
    relay_gone: HashMap<Uuid, (bool, Option<GoneExit>)>,
    /// The records come from a lost node (a takeover): its relays went with it, whatever
    /// this node's own relay marks say.
    from_lost_node: bool,
}

/// The end recorded for an open session that no instance serves any more after a restart
/// (its instance gone, or never delivered): `client_never_connected` for a websocket session
/// still waiting for its client, `stopped` when its stop had been requested, else `lost`.
/// `cattery store copy` records the same for the sessions a stopped server left open.
pub fn lost_end(
    waiting_for_client: bool,
    stop_requested: bool,
    delivered: bool,
    now_ms: i64,
) -> SessionEnd {
    let (reason, message) = if waiting_for_client {
        (
            EndReason::ClientNeverConnected,
            "the server restarted before the websocket client connected (its token is gone)",
        )
    } else if stop_requested {
        (
            EndReason::Stopped,
            "the instance was gone when the control plane restarted during its stop",
        )
    } else if delivered {
        (
            EndReason::Lost,
            "the instance was gone when the control plane restarted",
        )
    } else {
        (
            EndReason::Lost,
            "the control plane restarted before the session was delivered",
        )
    };
    SessionEnd {
        ended_ms: now_ms,
        reason,
        completion_status: "HTTP_ERROR".into(),
        exit_code: None,
        exit_signal: None,
        message: Some(message.into()),
    }
}

impl Supervisor {
    /// Loads agents and finds again the instances a previous run left, after a restart (even
    /// a SIGKILL of the server). Instances are found from their durable records through the
    /// runtime ([`crate::runtime::Runtime::adopt`]), never by name:
    ///
    /// - alive with a delivered, open session: re-adopted and supervised as before (stop,
    ///   process exit, time limit from the session's `createdAt`); if its stop was requested
    ///   before the restart, the stop is finished (the rest of its grace, then SIGKILL);
    /// - with a delivered websocket session that no live process relays any more (its relay
    ///   died with the previous server; one detached for an upgrade still relays its calls):
    ///   the session is over, so the instance is removed and the session recorded `lost`;
    /// - alive with a session that was still starting: the start request died with the old
    ///   server, so the instance is removed and the session recorded `lost`;
    /// - alive and warm: re-adopted as a warm instance if it belongs to its agent's current
    ///   deployment, else removed; alive and promised to a session that is over: removed;
    /// - gone: its leftovers are removed and its open session is recorded `lost` (`stopped`
    ///   when its stop had been requested).
    ///
    /// Then the runtime sweeps this server's instances for anything no record names (an
    /// instance spawned just before the crash), and the pools are refilled.
    ///
    /// Only this node's records are touched (docs/cluster.md): instances and sessions that
    /// another node owns are left to it. A node that was declared dead and taken over meanwhile
    /// finds those records gone (or another node's): the sweep removes their instances, so a
    /// session never has two lives; instances another node adopted are kept.
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        self.load_agents().await?;
        let mut found = Found {
            stops: self.store.stop_requests().await?.into_iter().collect(),
            ..Found::default()
        };
        for rec in self.store.list_instances().await? {
            if self.owns(&rec.node_id) {
                self.recover_instance(rec, &mut found).await?;
            } else {
                // Another node's (maybe one it adopted from this node): never swept here.
                found.keep.insert(rec.id);
            }
        }
        futures_util::future::join_all(found.remove.iter().map(|(i, g)| i.terminate(*g))).await;
        self.runtime.sweep(&found.keep).await;
        self.relays.sweep();
        for s in self.store.list_open_sessions().await? {
            if self.owns(&s.node_id) && !found.adopted_sessions.contains(&s.id) {
                let stop_requested = found.stops.contains_key(&s.id);
                if let Some(g) = found.relay_gone.get(&s.id) {
                    self.end_relay_gone(&s, g, stop_requested).await?;
                    continue;
                }
                match found.exits.get(&s.id) {
                    Some(g) => self.end_unwatched(&s, g, stop_requested).await?,
                    None => self.end_lost(&s, stop_requested).await?,
                }
            }
        }
        self.publish_live(&self.state.lock());
        self.recovered.store(true, Ordering::SeqCst);
        self.reconcile_all();
        Ok(())
    }

    /// Whether a record owned by `node` is this node's: its own, or one made before nodes
    /// owned records.
    pub fn owns(&self, node: &str) -> bool {
        node.is_empty() || node == self.cfg.node_id
    }

    /// Takes over node `dead`, whose last heartbeat is at or before `stale_ms`, if no other
    /// node did (the store decides, one taker at a time: [`crate::store::NodeStore::take_over_node`]).
    /// Its instances that this node's runtime reaches ([`crate::runtime::Runtime::adoptable_by_any_node`],
    /// a shared Docker engine) are re-adopted as after a restart; its other sessions are
    /// ended `lost`, saying the node was lost, and their instance records dropped, which
    /// frees their capacity (the instances themselves live on the lost node's machine: it
    /// removes them when it comes back, before anything else). Returns how many sessions
    /// were taken over or ended, or `None` when `dead` was not taken over by this call.
    ///
    /// Once the store has handed the records over, they are this node's alone: a store error
    /// after that leaves the rest of the takeover pending, and it is finished by the next
    /// call (or [`Supervisor::finish_takeovers`], at every heartbeat period), never dropped.
    pub async fn take_over(
        self: &Arc<Self>,
        dead: &str,
        stale_ms: i64,
    ) -> anyhow::Result<Option<usize>> {
        let mut pending = self.takeovers.lock().await;
        // Takeovers a store error cut short go on first (their errors are this call's only
        // when it takes nothing over itself).
        let earlier = self.finish_pending(&mut pending).await;
        let Some(taken) = self
            .store
            .take_over_node(dead, &self.cfg.node_id, stale_ms)
            .await?
        else {
            earlier?;
            return Ok(None);
        };
        if let Err(e) = earlier {
            tracing::warn!(error = %e, "could not finish an earlier takeover; trying again later");
        }
        let n = taken.sessions.len();
        let mut t = Takeover::new(self, dead, taken);
        if let Err(e) = self.finish_takeover(&mut t).await {
            pending.push(t);
            return Err(e);
        }
        Ok(Some(n))
    }

    /// Finishes the takeovers a store error cut short ([`Supervisor::take_over`]). Errors:
    /// the last store error; what is left stays pending.
    pub async fn finish_takeovers(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut pending = self.takeovers.lock().await;
        self.finish_pending(&mut pending).await
    }

    async fn finish_pending(self: &Arc<Self>, pending: &mut Vec<Takeover>) -> anyhow::Result<()> {
        let mut err = None;
        for mut t in std::mem::take(pending) {
            if let Err(e) = self.finish_takeover(&mut t).await {
                err = Some(e);
                pending.push(t);
            }
        }
        err.map_or(Ok(()), Err)
    }

    /// Does what is left of takeover `t`, step by step: each step done is never done again.
    /// A takeover that was cut short reads its records again first: another node may hold
    /// them by now (this node was itself taken over meanwhile), or they may be ended.
    async fn finish_takeover(self: &Arc<Self>, t: &mut Takeover) -> anyhow::Result<()> {
        let resumed = std::mem::replace(&mut t.tried, true);
        if !t.orphans_freed {
            // Slots the dead node reserved for instances it never recorded (it died between
            // the two) are freed here; those of its recorded instances go with their records.
            self.store.release_orphan_slots(&t.dead, &[]).await?;
            t.orphans_freed = true;
        }
        if t.found.is_none() {
            let ids: HashSet<Uuid> = t.sessions.iter().map(|s| s.id).collect();
            let stops = if ids.is_empty() {
                HashMap::new()
            } else {
                self.store
                    .stop_requests()
                    .await?
                    .into_iter()
                    .filter(|(s, _)| ids.contains(s))
                    .collect()
            };
            t.found = Some(Found {
                stops,
                from_lost_node: true,
                ..Found::default()
            });
        }
        if resumed && !t.instances.is_empty() {
            let mine: HashSet<Uuid> = self
                .store
                .list_instances()
                .await?
                .into_iter()
                .filter(|r| r.node_id == self.cfg.node_id)
                .map(|r| r.id)
                .collect();
            t.instances.retain(|r| mine.contains(&r.id));
        }
        let found = t.found.as_mut().expect("set above");
        while let Some(rec) = t.instances.last().cloned() {
            if self.runtime.adoptable_by_any_node(&rec) {
                self.recover_instance(rec, found).await?;
            } else {
                self.store.delete_instance(rec.id).await?;
            }
            t.instances.pop();
        }
        let remove = std::mem::take(&mut found.remove);
        futures_util::future::join_all(remove.iter().map(|(i, g)| i.terminate(*g))).await;
        while let Some(s) = t.sessions.last().cloned() {
            let still_mine = !resumed
                || self
                    .store
                    .get_session(s.id)
                    .await?
                    .is_some_and(|r| r.end.is_none() && r.node_id == self.cfg.node_id);
            if still_mine && !found.adopted_sessions.contains(&s.id) {
                let stop_requested = found.stops.contains_key(&s.id);
                if let Some(g) = found.relay_gone.get(&s.id) {
                    self.end_relay_gone(&s, g, stop_requested).await?;
                } else {
                    match found.exits.get(&s.id) {
                        Some(g) => self.end_unwatched(&s, g, stop_requested).await?,
                        None => self.end_node_lost(&s, &t.dead).await?,
                    }
                }
                t.lost += 1;
            }
            t.sessions.pop();
        }
        if t.records > 0 {
            tracing::warn!(node = %t.dead, adopted = found.adopted_sessions.len(), lost = t.lost,
                "took over a node that stopped heartbeating");
        }
        t.done(self);
        self.publish_live(&self.state.lock());
        Ok(())
    }

    /// Whether this node is ending (or adopting) `session` in a takeover of its lost node.
    pub(super) fn taking_over(&self, session: Uuid) -> bool {
        self.taking_over.lock().contains(&session)
    }

    /// Records the end of an open session whose node was lost with its instance.
    async fn end_node_lost(&self, s: &SessionRecord, node: &str) -> anyhow::Result<()> {
        let end = SessionEnd {
            ended_ms: now_ms(),
            reason: EndReason::Lost,
            completion_status: "HTTP_ERROR".into(),
            exit_code: None,
            exit_signal: None,
            message: Some(format!(
                "node {node} was lost (no heartbeat within the node timeout) with this session's instance"
            )),
        };
        let wrote = self.end_unless_started(s, &end).await?;
        if wrote {
            let agent = self.agent_name(s.agent_id);
            self.session_end_recorded(
                &s.org,
                (Some(s.agent_id), &agent),
                Some(s.deployment_id).filter(|_| !s.waiting_for_client()),
                s.id,
                &end,
            );
            self.record_ended(s);
            let _ = self.changes.send((s.org.clone(), s.id));
        }
        Ok(())
    }

    async fn load_agents(&self) -> anyhow::Result<()> {
        for agent in self.store.list_all_agents().await? {
            let Some(dep) = self
                .store
                .get_deployment(agent.desired_deployment_id)
                .await?
            else {
                continue;
            };
            let deploy_error = self.validate(&dep);
            let recheck = deploy_error.is_some() && self.runtime.deploy_error_may_clear(&dep);
            // Deployed before this start of the server: reported then, not again.
            self.announced.lock().insert(dep.id);
            let mut st = self.state.lock();
            st.by_name
                .insert((agent.org.clone(), agent.name.clone()), agent.id);
            let id = agent.id;
            let mut pool = AgentPool::new(agent, Arc::new(dep), deploy_error);
            pool.recheck = recheck;
            st.pools.insert(id, pool);
        }
        Ok(())
    }

    /// Deletes the record of an instance recovery does not keep. A delete the store refuses
    /// for now is written again until it lands ([`super::pending::write_again`]): the record
    /// would otherwise outlive its instance until the next restart.
    async fn forget_record(&self, id: uuid::Uuid) {
        match self.store.delete_instance(id).await {
            Ok(()) | Err(crate::store::StoreError::NotFound) => {}
            Err(e) if e.is_transient() => {
                tracing::warn!(instance = %id, error = %e, "could not delete an instance record yet; trying again");
                let store = self.store.clone();
                super::pending::write_again("an instance record's removal", id, move || {
                    let store = store.clone();
                    async move {
                        match store.delete_instance(id).await {
                            Err(crate::store::StoreError::NotFound) => Ok(()),
                            r => r,
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "could not delete an instance record")
            }
        }
    }

    /// Re-adopts or removes one recorded instance.
    async fn recover_instance(
        self: &Arc<Self>,
        rec: InstanceRecord,
        found: &mut Found,
    ) -> anyhow::Result<()> {
        let session = match rec.session_id {
            Some(s) => self.store.get_session(s).await?.filter(|s| s.end.is_none()),
            None => None,
        };
        let dep = self.store.get_deployment(rec.deployment_id).await?;
        let agent = self.store.get_agent_by_id(rec.agent_id).await?;
        let (Some(dep), Some(agent)) = (dep, agent) else {
            // Unknown owner: not kept, so the sweep removes whatever is left.
            self.forget_record(rec.id).await;
            return Ok(());
        };
        let grace = self.grace(&dep);
        let dep = Arc::new(dep);
        // The controller exists before the adoption so that the log capture shares its
        // attribution (a re-adopted warm instance's lines follow it into its session).
        let sid = session.as_ref().map(|s| s.id);
        let state = if sid.is_some() {
            InstState::Busy
        } else {
            InstState::Starting
        };
        let (ctl, mb) = InstanceCtl::new(&agent, dep.clone(), state, sid, Some(rec.id));
        ctl.recorded.store(true, Ordering::SeqCst);
        let mut sink = LogSink::new(
            self.logs.clone(),
            ctl.attribution.clone(),
            self.cfg.log_rate,
        );
        if let Some(tail) = self.stored_tail(&rec).await {
            sink = sink.resuming(tail);
        }
        // A delivered websocket session lives only as long as its relay, in the server
        // process its client reached: on this machine, a live process holds its mark; a lost
        // node's relays went with it (its records name this node once taken over, and this
        // node's marks say nothing of its relays).
        let relay_gone = session.as_ref().is_some_and(|s| {
            s.bot_start_ms.is_some()
                && s.transport.as_deref() == Some("websocket")
                && (found.from_lost_node
                    || !self.owns(&rec.node_id)
                    || !self.relays.relayed_elsewhere(s.id))
        });
        let inst = match self.runtime.adopt(&rec, sink).await {
            Adopted::Running(inst) => inst,
            Adopted::Gone(gone) => {
                // Gone while we were down; its open session is recorded below, with how the
                // instance ended if the runtime knows and the session was delivered.
                match (gone, &session) {
                    (g, Some(s)) if relay_gone => {
                        found.relay_gone.insert(s.id, (false, g));
                    }
                    (Some(g), Some(s)) if s.bot_start_ms.is_some() => {
                        found.exits.insert(s.id, g);
                    }
                    _ => {}
                }
                self.forget_record(rec.id).await;
                return Ok(());
            }
        };
        if session.is_none() && rec.session_id.is_some() {
            // Promised to a session that is over (its end written while no server watched
            // the instance): one session, one instance; never a warm instance again.
            self.forget_record(rec.id).await;
            found.remove.push((inst, grace));
            return Ok(());
        }
        match session {
            Some(sess) if relay_gone => {
                // Its client was cut with the relay: the session is over.
                found.relay_gone.insert(sess.id, (true, None));
                self.forget_record(rec.id).await;
                found.remove.push((inst, grace));
            }
            Some(sess) if sess.bot_start_ms.is_some() => {
                self.readopt_busy(&agent, (ctl, mb), inst, &sess, found);
            }
            Some(_) => {
                // Still starting: its start request died with the previous server.
                self.forget_record(rec.id).await;
                found.remove.push((inst, grace));
            }
            None => {
                let adopted = {
                    let mut st = self.state.lock();
                    match st.pools.get_mut(&agent.id).filter(|p| {
                        p.agent.deleted_ms.is_none()
                            && p.deployment.id == dep.id
                            && p.deploy_error.is_none()
                    }) {
                        Some(p) => {
                            p.instances.insert(ctl.id, ctl.clone());
                            true
                        }
                        None => false,
                    }
                };
                if adopted {
                    found.keep.insert(rec.id);
                    let line = format!(
                        "[cattery] re-adopted warm instance {} after a restart",
                        rec.id
                    );
                    self.platform_log(&ctl, line);
                    tokio::spawn(actor::run(
                        self.clone(),
                        ctl,
                        mb,
                        Start::Adopted(inst, None),
                    ));
                } else {
                    self.forget_record(rec.id).await;
                    found.remove.push((inst, grace));
                }
            }
        }
        Ok(())
    }

    /// Supervises a re-adopted instance with its delivered session again; finishes its stop
    /// if one was requested before the restart.
    fn readopt_busy(
        self: &Arc<Self>,
        agent: &AgentRecord,
        (ctl, mb): (Arc<InstanceCtl>, super::state::Mailbox),
        inst: Arc<dyn Instance>,
        sess: &SessionRecord,
        found: &mut Found,
    ) {
        let dep = ctl.deployment.clone();
        ctl.session_stored.store(true, Ordering::SeqCst);
        {
            let mut st = self.state.lock();
            st.pools
                .entry(agent.id)
                .or_insert_with(|| AgentPool::new(agent.clone(), dep.clone(), None))
                .instances
                .insert(ctl.id, ctl.clone());
            // A start of this id may hold the entry: placed here before this takeover handed
            // the session over, its record not written yet. The store refuses that write (the
            // session is recorded delivered), so the entry is the recorded instance's, and the
            // start's undo leaves it alone (`Supervisor::unplace`). Left to the start, the
            // adopted instance would have no entry: never stopped, outliving its session.
            if let Some(held) = st.sessions.insert(sess.id, ctl.clone()) {
                tracing::warn!(session = %sess.id, instance = %ctl.id, start_instance = %held.id,
                    "a start of a re-adopted session's id was placed here; the adopted instance keeps the session");
            }
        }
        let remaining_ms = (sess.created_ms + i64::from(dep.spec.max_session_duration_s()) * 1000
            - now_ms())
        .max(0);
        let deadline = Instant::now() + Duration::from_millis(remaining_ms as u64);
        found.adopted_sessions.insert(sess.id);
        found.keep.insert(ctl.id);
        // Its room (made by the process that started it) goes when its end is recorded here.
        if let Some(room) = &sess.daily_room {
            self.watch_room(&sess.org, sess.id, room);
        }
        tracing::info!(session = %sess.id, instance = %ctl.id, agent = %agent.name,
            remaining_s = remaining_ms / 1000, "re-adopted a running session after a restart");
        self.platform_log(
            &ctl,
            format!(
                "[cattery] re-adopted instance {} of session {} after a restart",
                ctl.id, sess.id
            ),
        );
        if let Some(&d) = found.stops.get(&sess.id) {
            *ctl.stop_deadline_ms.lock() = Some(d);
            let _ = ctl.cmd_tx.send(Cmd::Stop(EndReason::Stopped));
            self.platform_log(
                &ctl,
                format!(
                    "[cattery] finishing the stop of session {} requested before the restart ({} ms of grace left)",
                    sess.id,
                    (d - now_ms()).max(0)
                ),
            );
        }
        // Its address is known from now on (`session_addr`), not only once the actor runs.
        let _ = ctl.instance.set(inst.clone());
        tokio::spawn(actor::run(
            self.clone(),
            ctl,
            mb,
            Start::Adopted(inst, Some((sess.id, deadline))),
        ));
    }

    /// Writes the end of open session `s` (first wins). One that waits for its client is
    /// ended only while it still waits: a client may take its token on any node at this
    /// moment (tokens are in the store), and then the start is its end's to write.
    async fn end_unless_started(
        &self,
        s: &SessionRecord,
        end: &SessionEnd,
    ) -> crate::store::StoreResult<bool> {
        if s.waiting_for_client() {
            self.store.end_waiting_session(s.id, end).await
        } else {
            self.store.end_session(s.id, end).await
        }
    }

    /// Records the end of an open session that no instance serves any more.
    async fn end_lost(&self, s: &SessionRecord, stop_requested: bool) -> anyhow::Result<()> {
        let end = lost_end(
            s.waiting_for_client(),
            stop_requested,
            s.bot_start_ms.is_some(),
            now_ms(),
        );
        if self.end_unless_started(s, &end).await? {
            self.ended_at_restart(s, &end);
        }
        Ok(())
    }

    /// Counts the end of an open session that this restart recorded (it found the session
    /// without a live instance), tells the event stream, and says so in the server's log and,
    /// as a platform line, in the session's own logs: both otherwise named only the sessions
    /// re-adopted, and an operator who upgraded had to find the others by listing sessions.
    fn ended_at_restart(&self, s: &SessionRecord, end: &SessionEnd) {
        let agent = self.agent_name(s.agent_id);
        let reason = end.reason.as_str();
        self.session_end_recorded(
            &s.org,
            (Some(s.agent_id), &agent),
            Some(s.deployment_id).filter(|_| !s.waiting_for_client()),
            s.id,
            end,
        );
        self.record_ended(s);
        let _ = self.changes.send((s.org.clone(), s.id));
        let message = end.message.as_deref().unwrap_or("");
        tracing::info!(session = %s.id, agent = %agent, reason, message,
            "ended a session found without its instance after a restart");
        let _ = self.logs.send(crate::model::LogLine {
            org: s.org.clone(),
            agent_id: s.agent_id,
            deployment_id: Some(s.deployment_id),
            session_id: Some(s.id),
            instance_id: None,
            ts_ns: crate::model::now_ns(),
            stream: "platform",
            line: format!(
                "[cattery] session {} ended after a restart: reason={reason} ({message})",
                s.id
            ),
        });
    }

    /// Records the end of a delivered websocket session whose relay died with the previous
    /// server: `lost` (the server lost it: its client's connection was cut with the relay;
    /// neither the client nor the agent ended it), `stopped` if its stop had been requested;
    /// with the instance's exit when it had exited and the runtime knows how.
    async fn end_relay_gone(
        &self,
        s: &SessionRecord,
        (removed, g): &(bool, Option<GoneExit>),
        stop_requested: bool,
    ) -> anyhow::Result<()> {
        let g = g.as_ref();
        let reason = if stop_requested {
            EndReason::Stopped
        } else {
            EndReason::Lost
        };
        let how = match g {
            Some(g) => format!("its instance had exited ({})", g.exit.describe()),
            None if *removed => "its instance was removed".to_string(),
            None => "its instance had exited".to_string(),
        };
        let end = SessionEnd {
            ended_ms: now_ms(),
            reason,
            completion_status: "HTTP_ERROR".into(),
            exit_code: g.and_then(|g| g.exit.code),
            exit_signal: g.and_then(|g| g.exit.signal),
            message: Some(format!(
                "the server that relayed this websocket session ended, and the relay with it: \
                 the client's connection was cut; {how}"
            )),
        };
        if self.store.end_session(s.id, &end).await? {
            self.ended_at_restart(s, &end);
        }
        Ok(())
    }

    /// Records the end of a delivered session whose instance ended while no server watched
    /// it, as the runtime says it ended ([`unwatched_end`]).
    async fn end_unwatched(
        &self,
        s: &SessionRecord,
        g: &GoneExit,
        stop_requested: bool,
    ) -> anyhow::Result<()> {
        let end = unwatched_end(s, g, stop_requested);
        if self.store.end_session(s.id, &end).await? {
            self.ended_at_restart(s, &end);
        }
        Ok(())
    }

    /// Graceful drain: new starts get 503 `DRAINING` from now on; warm instances go at once;
    /// running sessions (and starts in flight) may finish until `timeout` or until `force`
    /// resolves (a second SIGTERM), then they are stopped through the cleanup path
    /// (`endReason: drained`; a start still in flight answers 503 `DRAINING`). Returns when
    /// every instance is gone.
    pub async fn drain(
        self: &Arc<Self>,
        timeout: Duration,
        force: impl std::future::Future<Output = ()>,
    ) {
        {
            let _st = self.state.lock();
            self.draining.store(true, Ordering::SeqCst);
        }
        self.reconcile_all();
        let mut live = self.live.subscribe();
        tokio::select! {
            _ = live.wait_for(|n| *n == 0) => {}
            _ = tokio::time::sleep(timeout) => {}
            _ = force => {}
        }
        self.stop_everything(EndReason::Drained).await;
    }

    /// Stops every instance (sessions recorded with `reason`) and waits until all are gone.
    /// No instance can be created from the moment this starts (the draining flag is set
    /// under the state lock, where starts and the pool check it).
    pub async fn stop_everything(&self, reason: EndReason) {
        let all: Vec<Arc<InstanceCtl>> = {
            let st = self.state.lock();
            self.draining.store(true, Ordering::SeqCst);
            st.pools
                .values()
                .flat_map(|p| p.instances.values().cloned())
                .collect()
        };
        for c in &all {
            let _ = c.cmd_tx.send(Cmd::Stop(reason));
        }
        for c in all {
            let mut d = c.done.clone();
            let _ = d.wait_for(|v| *v).await;
        }
        // Ends the store refused are written again meanwhile: give them a bounded chance.
        self.pending_ends
            .all_committed(super::pending::STOP_COMMIT_WAIT)
            .await;
    }
}

impl Supervisor {
    /// What the store holds of instance `rec`'s output (`stdout`/`stderr`, not the platform's
    /// lines): the latest second one of its lines is stamped in and how many are stamped in
    /// it and in the second before, so that its capture resumes right after them
    /// ([`LogSink::resuming`]). Two reads of the instance's lines: the newest, then those from
    /// the second before it. `None` when the store cannot say.
    async fn stored_tail(&self, rec: &InstanceRecord) -> Option<StoredTail> {
        const PAGE: i64 = 1000;
        let output = |l: &crate::model::LogLine| l.stream != "platform";
        let mut f = LogFilter {
            limit: PAGE,
            desc: true,
            instance_id: Some(rec.id),
            ..Default::default()
        };
        let newest = loop {
            let (_, page) = self.store.query_logs(rec.agent_id, &f).await.ok()?;
            if let Some(l) = page.iter().find(|l| output(l)) {
                break l.ts_ns;
            }
            if (page.len() as i64) < PAGE {
                return Some(StoredTail::default());
            }
            f.offset += PAGE;
        };
        let from = (newest.div_euclid(1_000_000_000) - 1) * 1_000_000_000;
        let mut f = LogFilter {
            limit: PAGE,
            instance_id: Some(rec.id),
            start_ns: Some(from),
            ..Default::default()
        };
        let mut stamps = Vec::new();
        loop {
            let (_, page) = self.store.query_logs(rec.agent_id, &f).await.ok()?;
            stamps.extend(page.iter().filter(|l| output(l)).map(|l| l.ts_ns));
            if (page.len() as i64) < PAGE {
                return Some(StoredTail::of(stamps.iter().copied()));
            }
            f.offset += PAGE;
        }
    }
}

/// A takeover whose records the store handed to this node, and what is left to do of it. Its
/// sessions are registered in [`Supervisor::taking_over`] until it is done.
pub(super) struct Takeover {
    /// The lost node.
    dead: String,
    /// Every session it took over.
    ids: Vec<Uuid>,
    /// Whether a try ran already (then its records are read again before each step).
    tried: bool,
    /// Whether the lost node's slots without an instance record are freed.
    orphans_freed: bool,
    /// Instance records not yet adopted or dropped.
    instances: Vec<InstanceRecord>,
    /// Sessions not yet adopted or ended.
    sessions: Vec<SessionRecord>,
    /// What adopting its instances found, once its stop requests are read.
    found: Option<Found>,
    /// Sessions ended so far.
    lost: usize,
    /// How many records it took over.
    records: usize,
}

impl Takeover {
    fn new(sup: &Supervisor, dead: &str, taken: crate::store::TakenOver) -> Takeover {
        let ids: Vec<Uuid> = taken.sessions.iter().map(|s| s.id).collect();
        sup.taking_over.lock().extend(ids.iter().copied());
        let records = taken.instances.len() + taken.sessions.len();
        Takeover {
            dead: dead.to_string(),
            ids,
            tried: false,
            orphans_freed: false,
            instances: taken.instances,
            sessions: taken.sessions,
            found: None,
            lost: 0,
            records,
        }
    }

    /// Its sessions are adopted or ended: a stop of one no longer waits for it.
    fn done(&self, sup: &Supervisor) {
        let mut m = sup.taking_over.lock();
        for id in &self.ids {
            m.remove(id);
        }
    }
}

/// The end of a delivered session whose instance ended while no server watched it (the
/// control plane down, or its node lost), from how the runtime says it ended: `stopped` if
/// its stop had been requested, `out_of_memory` for an OOM kill, else `completed` (exit 0) or
/// `error`; with the exit, and the time it ended when the runtime knows it.
fn unwatched_end(s: &SessionRecord, g: &GoneExit, stop_requested: bool) -> SessionEnd {
    let (reason, completion) = if stop_requested {
        (EndReason::Stopped, "HTTP_ERROR")
    } else if g.out_of_memory {
        (EndReason::OutOfMemory, "HTTP_ERROR")
    } else if g.exit.success() {
        (EndReason::Completed, "HTTP_COMPLETED")
    } else {
        (EndReason::Error, "HTTP_ERROR")
    };
    let oom = if g.out_of_memory {
        ", killed for going over its memory limit"
    } else {
        ""
    };
    SessionEnd {
        ended_ms: g
            .ended_ms
            .unwrap_or_else(now_ms)
            .clamp(s.created_ms, now_ms().max(s.created_ms)),
        reason,
        completion_status: completion.into(),
        exit_code: g.exit.code,
        exit_signal: g.exit.signal,
        message: Some(format!(
            "the instance exited while no control plane watched it ({}{oom})",
            g.exit.describe()
        )),
    }
}
