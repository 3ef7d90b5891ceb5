//! The one cleanup path: every end of every instance comes through here exactly once.
//!
//! Order: record a stop's intent (written while the SIGTERM goes out, durable before the stop
//! is answered) and remove the whole instance ([`crate::runtime::Instance::terminate`]) ->
//! free the capacity slot -> record the session's end (first end wins in the store) with its
//! metrics and end-of-session log line -> leave the live set -> answer a pending start, wake `DELETE`s waiting for this instance
//! -> refill the pool.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::actor::Actor;
use super::ending::{reply_err, Ending};
use super::state::{Cmd, InstanceCtl};
use super::Supervisor;
use crate::model::{iso_ms, now_ms, EndReason, SessionEnd};
use crate::runtime::{Instance, TerminateReport};

impl Actor {
    /// See the module docs.
    pub(super) async fn finish(mut self, inst: Option<Arc<dyn Instance>>, mut ending: Ending) {
        let ctl = self.ctl.clone();
        // A warm instance claimed by a start whose session it had not received yet: that
        // session ends with it.
        let promised = ctl.begin_ending();
        let session = self.session.map(|s| s.0).or(promised);
        if self.sup.adopted_elsewhere(&ctl, inst.as_ref()).await {
            self.let_go(session);
            return;
        }
        let mut report = None;
        if let Some(i) = &inst {
            let (grace, intent) = self.sup.stop_grace(&ctl, i, &ending, session);
            // The intent's write and the SIGTERM go out together: a commit is not added to
            // every stop's latency, and the intent is durable before the stop is answered.
            let (_, r) = tokio::join!(self.sup.record_stop_intent(intent), i.terminate(grace));
            if ending.exit.is_none() {
                ending.exit = r.exit;
            }
            report = Some(r);
        }
        let ended_ms = now_ms();
        // The tree is gone: its capacity slot is free from now on.
        if let Some(p) = self.sup.state.lock().pools.get_mut(&ctl.agent_id) {
            p.instances.remove(&ctl.id);
        }
        self.sup
            .record_end(&ctl, &ending, session, ended_ms, report)
            .await;
        // Recorded: the session leaves the live set (a `DELETE` arriving from now on finds
        // the recorded end; one arriving before waits for `done` below).
        {
            let mut st = self.sup.state.lock();
            if let Some(s) = session {
                st.leave_live_set(s, &ctl);
            }
            self.sup.publish_live(&st);
        }
        if let Some(s) = session {
            self.sup.session_changed(&ctl.org, s);
        }
        if let Some(d) = self.delivery.as_mut() {
            if let Some(r) = d.reply.take() {
                let _ = r.send(Err(ending.start_answer(d)));
            }
        }
        self.done_tx.send_replace(true);
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Assign(mut d) = cmd {
                reply_err(&mut d, "the instance went away");
            }
        }
        self.sup.reconcile(ctl.agent_id);
    }
}

impl Actor {
    /// Leaves an instance that another node adopted while this node was fenced: it is not
    /// removed and nothing is recorded (its records are the adopter's); it only leaves this
    /// node's memory.
    fn let_go(mut self, session: Option<Uuid>) {
        let ctl = self.ctl.clone();
        {
            let mut st = self.sup.state.lock();
            if let Some(p) = st.pools.get_mut(&ctl.agent_id) {
                p.instances.remove(&ctl.id);
            }
            if let Some(s) = session {
                st.leave_live_set(s, &ctl);
            }
            self.sup.publish_live(&st);
        }
        self.sup.platform_log(
            &ctl,
            format!(
                "[cattery] instance {} was adopted by another node while this node was fenced: let go",
                ctl.id
            ),
        );
        if let Some(d) = self.delivery.as_mut() {
            if let Some(r) = d.reply.take() {
                let _ = r.send(Err(super::super::CoreError::Fenced));
            }
        }
        self.done_tx.send_replace(true);
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Assign(mut d) = cmd {
                reply_err(&mut d, "the instance went away");
            }
        }
    }
}

impl Supervisor {
    /// Whether the instance ending now was adopted by another node and must be let go, not
    /// removed: marked so by [`Supervisor::rejoin`], or (an end while this node is fenced)
    /// its record now names another node that can reach it.
    async fn adopted_elsewhere(&self, ctl: &InstanceCtl, inst: Option<&Arc<dyn Instance>>) -> bool {
        use std::sync::atomic::Ordering;
        if ctl.released.load(Ordering::SeqCst) {
            return true;
        }
        if inst.is_none() || !self.is_fenced() {
            return false;
        }
        let Ok(records) = self.store.list_instances().await else {
            return false;
        };
        records.iter().any(|r| {
            r.id == ctl.id && !self.owns(&r.node_id) && self.runtime.adoptable_by_any_node(r)
        })
    }

    /// The grace for removing an instance, and the stop intent to record with it. A stop of
    /// a live session is recorded with its deadline, so a restart during the grace finishes
    /// it; a stop recorded before a restart gets only what is left of its grace.
    fn stop_grace(
        &self,
        ctl: &InstanceCtl,
        inst: &Arc<dyn Instance>,
        ending: &Ending,
        session: Option<Uuid>,
    ) -> (Duration, Option<(Uuid, i64)>) {
        let grace = self.grace(&ctl.deployment);
        if let Some(deadline) = *ctl.stop_deadline_ms.lock() {
            let left = Duration::from_millis((deadline - now_ms()).max(0) as u64).min(grace);
            return (left, None);
        }
        let Some(sid) = session else {
            return (grace, None);
        };
        if ending.reason != EndReason::Stopped || grace.is_zero() || inst.exited().is_some() {
            return (grace, None);
        }
        (grace, Some((sid, now_ms() + grace.as_millis() as i64)))
    }

    /// Records a stop's intent (session, deadline of its grace); failures are logged.
    async fn record_stop_intent(&self, intent: Option<(Uuid, i64)>) {
        let Some((sid, deadline)) = intent else {
            return;
        };
        if let Err(e) = self.store.request_stop(sid, deadline).await {
            tracing::error!(session = %sid, error = %e, "could not record the stop request");
        }
    }

    /// One write: the instance record goes, the session's end (first wins) and its samples
    /// are recorded; then the end-of-session platform log line.
    async fn record_end(
        &self,
        ctl: &InstanceCtl,
        ending: &Ending,
        session: Option<Uuid>,
        ended_ms: i64,
        report: Option<TerminateReport>,
    ) {
        let end = SessionEnd {
            ended_ms,
            reason: ending.reason,
            completion_status: ending.completion.clone(),
            exit_code: ending.exit.and_then(|e| e.code),
            exit_signal: ending.exit.and_then(|e| e.signal),
            message: ending.message.clone(),
        };
        let samples = ctl.samples.lock().clone();
        let count_end = || {
            if let Some(sid) = session {
                let agent = self.agent_name(ctl.agent_id);
                crate::telemetry::session_ended(&ctl.org, &agent, end.reason.as_str());
                self.announce_session_end(
                    &ctl.org,
                    (Some(ctl.agent_id), &agent),
                    Some(ctl.deployment.id),
                    sid,
                    &end,
                );
            }
        };
        match self
            .store
            .end_instance(ctl.id, session.map(|sid| (sid, &end, &samples[..])))
            .await
        {
            Ok(true) => count_end(),
            Ok(false) if session.is_some() => {
                tracing::debug!(instance = %ctl.id, "session end was already recorded")
            }
            Ok(false) => {}
            Err(e) => {
                // Written again until the store takes it: counted now.
                count_end();
                tracing::warn!(
                    instance = %ctl.id,
                    error = %e,
                    "could not record the end of the instance and its session; retrying until the store takes it"
                );
                self.pending_ends.retry(
                    self.store.clone(),
                    ctl.id,
                    session.map(|sid| (sid, end.clone(), samples.clone())),
                    e,
                );
            }
        }
        let Some(sid) = session else { return };
        let started = !matches!(
            crate::model::EndState::of(Some(&end)),
            crate::model::EndState::EndedBeforeAgentStart
                | crate::model::EndState::AgentStartTimeout
        );
        self.run_end_hook(sid, started);
        let how = match report {
            Some(r) if r.killed => format!("SIGKILL after {} ms", r.took_ms),
            Some(r) if r.sent_sigterm => format!("SIGTERM, gone after {} ms", r.took_ms),
            _ => "already gone".to_string(),
        };
        self.platform_log(
            ctl,
            format!(
                "[cattery] session {sid} ended at {}: reason={} completionStatus={} exit={} cleanup={how}{}",
                iso_ms(ended_ms),
                ending.reason.as_str(),
                ending.completion,
                ending.exit.map(|e| e.describe()).unwrap_or_else(|| "none".into()),
                ending.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default(),
            ),
        );
        tracing::info!(session.id = %sid, agent.id = %ctl.agent_id, reason = ending.reason.as_str(), "session ended");
    }
}
