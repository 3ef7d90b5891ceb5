//! The actor of one instance: one function per phase (starting, idle, delivering, serving),
//! each returning when its phase is over, or with the [`Ending`] that ends the instance.
//! Every ending then goes through the one cleanup path ([`Supervisor::finish`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ending::{during_start, ending_of_outcome, reply_err, Ending, OUTCOME_AFTER_EXIT};
use super::health::StartFailure;
use super::state::{Cmd, Delivery, InstState, InstanceCtl, Mailbox};
use super::{next_ready_poll, Supervisor, IDLE_CHECK};
use crate::core::instance_http::{self, BotOutcome, OutcomeFuture};
use crate::model::{now_ms, EndReason, InstanceRecord, MetricSample};
use crate::runtime::{Instance, InstanceSpec, LogSink};

/// How an actor begins.
pub(super) enum Start {
    /// Start a new instance, for this session (a cold start) or as a warm one.
    New(Option<Delivery>),
    /// An instance found again after a restart, with its live (delivered) session and that
    /// session's deadline, or without one (re-adopted as a warm instance).
    Adopted(Arc<dyn Instance>, Option<(Uuid, Instant)>),
}

/// The task of a session's own channel (the websocket relay): told why when the platform
/// ends the session ([`RelayTask::close`]), and aborted when dropped.
struct RelayTask {
    abort: tokio::task::AbortHandle,
    stop: Option<tokio::sync::oneshot::Sender<(u16, &'static str)>>,
}

/// Longest wait for a relay to close its client after a stop (the relay bounds its close
/// handshake itself, `api::ws::CLOSE_WAIT`; this is the actor's own bound on top of it).
const RELAY_CLOSE_WAIT: Duration = Duration::from_secs(3);

impl RelayTask {
    /// Tells the relay that the platform ends its session for `reason`, and waits (at most
    /// [`RELAY_CLOSE_WAIT`]) while it sends its client a close frame: a websocket client
    /// sees a close with a code, not a dropped connection. Drain: 1001 (going away: the
    /// server is shutting down); a stop or the time limit: 1000 (normal closure: the session
    /// is over and was ended on purpose, nothing to retry).
    async fn close(&mut self, reason: EndReason, bot: &mut OutcomeFuture) {
        let Some(stop) = self.stop.take() else { return };
        let why = match reason {
            EndReason::Drained => (1001, "the server is shutting down"),
            EndReason::MaxDuration => (1000, "maxSessionDuration reached"),
            _ => (1000, "the session was stopped"),
        };
        if stop.send(why).is_ok() {
            let _ = tokio::time::timeout(RELAY_CLOSE_WAIT, bot).await;
        }
    }
}

impl Drop for RelayTask {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

/// The actor's state between phases.
pub(super) struct Actor {
    pub sup: Arc<Supervisor>,
    pub ctl: Arc<InstanceCtl>,
    pub rx: mpsc::UnboundedReceiver<Cmd>,
    pub done_tx: watch::Sender<bool>,
    /// The session and its deadline, once there is one.
    pub session: Option<(Uuid, Instant)>,
    /// The session still to deliver (kept until delivered, so a failure can answer it).
    pub delivery: Option<Delivery>,
    /// The session the instance's durable record names.
    recorded_session: Option<Uuid>,
    /// The keep-alive connection of the `/readyz` answer that found the instance ready.
    ready_conn: Option<instance_http::Conn>,
    /// A relayed session's mark (`relays`), held until the actor is done, i.e. after the
    /// session's end is recorded: a server started meanwhile leaves the session to this one.
    relay_mark: Option<super::relays::RelayMark>,
    /// When the start times out (`START_TIMEOUT`): the start timeout after the actor began,
    /// for the whole start (the runtime making the instance, a retry on another port, the
    /// wait for `/readyz`).
    start_deadline: Instant,
}

/// Runs an instance's whole life. See the module docs.
pub(super) async fn run(sup: Arc<Supervisor>, ctl: Arc<InstanceCtl>, mb: Mailbox, start: Start) {
    let (rx, done_tx) = mb;
    let start_deadline = Instant::now() + sup.cfg.start_timeout;
    let mut a = Actor {
        sup,
        ctl,
        rx,
        done_tx,
        session: None,
        delivery: None,
        recorded_session: None,
        ready_conn: None,
        relay_mark: None,
        start_deadline,
    };
    let (inst, adopted_busy) = match start {
        Start::Adopted(i, s) => {
            a.session = s;
            a.recorded_session = s.map(|s| s.0);
            (i, s.is_some())
        }
        Start::New(d) => {
            if let Some(d) = &d {
                a.session = Some((d.session, d.deadline));
            }
            a.delivery = d;
            match a.spawn().await {
                Ok(i) => (i, false),
                Err((end, made)) => {
                    a.finish(made, end).await;
                    return;
                }
            }
        }
    };
    let mut inst = inst;
    let mut ending = match a.life(&mut inst, adopted_busy).await {
        Ok(e) | Err(e) => e,
    };
    ending.name_oom(&inst, &a.ctl.deployment.spec).await;
    a.finish(Some(inst), ending).await;
}

impl Actor {
    /// The phases in order; returns the ending (`Err` when a phase ended the instance early).
    async fn life(
        &mut self,
        inst: &mut Arc<dyn Instance>,
        adopted_busy: bool,
    ) -> Result<Ending, Ending> {
        if !adopted_busy {
            let sid = self.session.map(|s| s.0);
            let _ = self.sup.persist_instance(&self.ctl, inst, sid).await;
            self.recorded_session = sid;
            self.start_until_ready(inst).await?;
            self.sup.record_ready(&self.ctl);
            self.sup.platform_log(
                &self.ctl,
                format!(
                    "[cattery] instance {} ready ({})",
                    self.ctl.id,
                    inst.describe()
                ),
            );
            if self.delivery.is_none() {
                self.idle(inst).await?;
            }
        }
        let _ = self.ctl.instance.set(inst.clone());
        let inst: &Arc<dyn Instance> = inst;
        self.ctl.set_state(InstState::Busy);
        let (sid, deadline) = self.session.expect("busy instance has a session");
        let bot = match self.delivery.take() {
            Some(d) => Some(self.deliver(inst, d, sid, deadline).await?),
            None => None,
        };
        Ok(self.serving(inst, bot, deadline).await)
    }

    /// A command while the instance is being made or starts: a stop's ending (the start is
    /// over), or a session taken (the first; a second is refused).
    fn while_starting(&mut self, cmd: Option<Cmd>) -> Option<Ending> {
        match cmd {
            Some(Cmd::Stop(r)) => {
                let promised = self.session.is_some() || self.ctl.promised();
                Some(Ending::new(during_start(r, promised), "HTTP_ERROR"))
            }
            Some(Cmd::Assign(mut d)) => {
                if self.session.is_none() {
                    self.assign(*d);
                } else {
                    reply_err(&mut d, "instance is already promised to another session");
                }
                None
            }
            None => None,
        }
    }

    /// Takes a session for this instance (while starting or idle).
    fn assign(&mut self, d: Delivery) {
        self.session = Some((d.session, d.deadline));
        self.ctl.set_session(d.session);
        self.delivery = Some(d);
    }

    /// Starting, with a fresh port when the agent could not bind its own: an instance that
    /// exits before it is ready with an address-in-use error (another program, or a server
    /// not sharing this one's reservations, took the port between its reservation and the
    /// agent's bind) is cleaned up and started again on a new port, up to
    /// [`PORT_CLASH_RETRIES`] times, within the same start and unseen by its client.
    async fn start_until_ready(&mut self, inst: &mut Arc<dyn Instance>) -> Result<(), Ending> {
        let mut retries = 0;
        while self.starting(inst, retries < PORT_CLASH_RETRIES).await? == Started::PortClash {
            retries += 1;
            let port = inst.endpoint().port();
            inst.terminate(Duration::ZERO).await;
            self.sup.platform_log(
                &self.ctl,
                format!(
                    "[cattery] instance {} could not bind port {port} (address in use); starting it again on another port",
                    self.ctl.id
                ),
            );
            let sid = self.session.map(|s| s.0);
            match self.spawn().await {
                Ok(i) => *inst = i,
                Err((end, made)) => {
                    if let Some(i) = made {
                        *inst = i;
                    }
                    return Err(end);
                }
            }
            let _ = self.sup.persist_instance(&self.ctl, inst, sid).await;
            self.recorded_session = sid;
        }
        Ok(())
    }

    /// Has the runtime make the instance, answering stops and claims meanwhile, within the
    /// start's deadline and the session's: making it may take long (a fork server importing
    /// the bot, `runtime/process/zygote.rs`), and a stop waits for nothing but the stop grace
    /// (`docs/lifecycle.md`). When the actor stops waiting, the runtime is told to give up
    /// ([`InstanceSpec::abandoned`](crate::runtime::InstanceSpec::abandoned)) and its answer
    /// is awaited (at once, as a rule): an instance it made all the same comes back with the
    /// ending, for the cleanup path, so that nothing of the start outlives its answer.
    async fn spawn(&mut self) -> Result<Arc<dyn Instance>, (Ending, Option<Arc<dyn Instance>>)> {
        let abandoned = CancellationToken::new();
        let (sup, ctl, token) = (self.sup.clone(), self.ctl.clone(), abandoned.clone());
        let sid = self.session.map(|s| s.0);
        let mut making = Box::pin(async move { sup.spawn_instance(&ctl, sid, token).await });
        let ending = loop {
            let session_deadline = self
                .session
                .map(|s| s.1)
                .unwrap_or(self.start_deadline + Duration::from_secs(1 << 30));
            tokio::select! {
                biased;
                cmd = self.rx.recv() => if let Some(end) = self.while_starting(cmd) {
                    break end;
                },
                made = &mut making => return made.map_err(|e| {
                    self.sup.record_failure(&self.ctl, "spawn_failed", None, ("error", e.clone()));
                    (Ending::start_failed("SPAWN_FAILED", e, None), None)
                }),
                _ = tokio::time::sleep_until(self.start_deadline) => {
                    self.sup.record_failure(&self.ctl, "start_timeout", None, ("stderr", String::new()));
                    let importing = self.sup.runtime.fork_server(self.ctl.agent_id).is_some_and(|f| {
                        f.state == crate::runtime::ForkServerState::Starting
                    });
                    break self.start_timeout(if importing {
                        "the instance was not made yet: its fork server was still importing the bot"
                    } else {
                        "the instance was not made yet"
                    });
                }
                _ = tokio::time::sleep_until(session_deadline) => {
                    break Ending::new(EndReason::MaxDuration, "HTTP_ERROR");
                }
            }
        };
        abandoned.cancel();
        Err((ending, making.await.ok()))
    }

    /// The ending of a start that timed out (`START_TIMEOUT`); `detail` says how far it got.
    fn start_timeout(&self, detail: &str) -> Ending {
        let msg = format!(
            "{} with 200 within {} s ({detail})",
            crate::model::START_TIMEOUT_MESSAGE,
            self.sup.cfg.start_timeout.as_secs_f64()
        );
        Ending::start_failed("START_TIMEOUT", msg, None)
    }

    /// Starting: waits for `/readyz` 200, a stop, an exit, or a deadline. A warm instance
    /// may be claimed by a session meanwhile (it then gets the session as soon as it is ready).
    /// With `may_retry`, an exit that says the port was taken is [`Started::PortClash`].
    async fn starting(
        &mut self,
        inst: &Arc<dyn Instance>,
        may_retry: bool,
    ) -> Result<Started, Ending> {
        let start_deadline = self.start_deadline;
        let (sup, ctl) = (self.sup.clone(), self.ctl.clone());
        // The last `/readyz` status the instance answered (0: none), for a timeout's message.
        let last_status = AtomicU16::new(0);
        let ready = wait_ready(&sup, &ctl, inst, &last_status);
        tokio::pin!(ready);
        loop {
            let session_deadline = self
                .session
                .map(|s| s.1)
                .unwrap_or(start_deadline + Duration::from_secs(1 << 30));
            tokio::select! {
                biased;
                cmd = self.rx.recv() => if let Some(end) = self.while_starting(cmd) {
                    return Err(end);
                },
                ex = inst.wait_exit() => {
                    let output = inst.last_output().await;
                    let clash = is_port_clash(&output);
                    if may_retry && clash {
                        return Ok(Started::PortClash);
                    }
                    self.sup.record_failure(&self.ctl, "exited", Some(ex), output.clone());
                    let mut msg = format!("instance exited before it was ready ({})", ex.describe());
                    if clash {
                        // Ours to say (the instance's output is not in the answer).
                        msg.push_str(": the port it was given was in use, on every try");
                    } else if ex.code == Some(3) && self.ctl.deployment.spec.runs_the_python_runner() {
                        // The runner's own code, ours to name; the traceback stays private.
                        msg.push_str(
                            ": the Python runner could not load bot.py (an error while importing it, \
                             or no bot function); the traceback is in the agent's status and logs",
                        );
                    }
                    return Err(Ending::start_failed_with_output("INSTANCE_EXITED", msg, output, Some(ex)));
                }
                _ = tokio::time::sleep_until(start_deadline) => {
                    let output = inst.last_output().await;
                    self.sup.record_failure(&self.ctl, "start_timeout", None, output);
                    let detail = match last_status.load(Ordering::Relaxed) {
                        0 => "it never answered".to_string(),
                        s => format!("its last answer was {s}"),
                    };
                    return Err(self.start_timeout(&detail));
                }
                _ = tokio::time::sleep_until(session_deadline) => {
                    return Err(Ending::new(EndReason::MaxDuration, "HTTP_ERROR"));
                }
                conn = &mut ready => {
                    self.ready_conn = conn;
                    return Ok(Started::Ready);
                }
            }
        }
    }

    /// Idle (warm): waits for a session, a stop, an exit, or a failed health check. The
    /// health check runs beside the command channel, so a slow `/readyz` never delays a
    /// session or a stop.
    async fn idle(&mut self, inst: &Arc<dyn Instance>) -> Result<(), Ending> {
        if self.ctl.transition(InstState::Starting, InstState::Idle) {
            // One start fewer under way: the pool may start the next warm instance at once
            // (`max_warm_starting`), not at its next tick.
            self.sup.reconcile(self.ctl.agent_id);
        }
        let addr = inst.endpoint();
        let health = move || -> Pin<Box<dyn Future<Output = bool> + Send>> {
            Box::pin(async move {
                tokio::time::sleep(IDLE_CHECK).await;
                instance_http::get_status(addr, "/readyz", Duration::from_secs(2)).await
                    == Some(200)
            })
        };
        let mut check = health();
        loop {
            tokio::select! {
                biased;
                cmd = self.rx.recv() => match cmd {
                    Some(Cmd::Stop(r)) => {
                        let promised = self.ctl.promised();
                        return Err(Ending::new(during_start(r, promised), "HTTP_ERROR"));
                    }
                    Some(Cmd::Assign(d)) => {
                        self.assign(*d);
                        return Ok(());
                    }
                    None => {}
                },
                ex = inst.wait_exit() => {
                    let output = inst.last_output().await;
                    self.sup.record_failure(&self.ctl, "exited", Some(ex), output);
                    let msg = format!("the warm instance exited ({})", ex.describe());
                    return Err(Ending::start_failed("INSTANCE_EXITED", msg, Some(ex)));
                }
                ok = &mut check => {
                    if !ok && self.ctl.transition(InstState::Idle, InstState::Ending) {
                        self.sup.platform_log(&self.ctl, "[cattery] warm instance not ready; replacing it".into());
                        return Err(Ending::new(EndReason::Error, "HTTP_ERROR"));
                    }
                    check = health();
                }
            }
        }
    }

    /// Delivering: `POST /bot` (or the session's own delivery), bounded and interruptible
    /// like every other phase. Returns the session's outcome future, driven on its own task.
    async fn deliver(
        &mut self,
        inst: &Arc<dyn Instance>,
        mut d: Delivery,
        sid: Uuid,
        deadline: Instant,
    ) -> Result<(OutcomeFuture, Option<RelayTask>), Ending> {
        // Durable before `/bot`: a restart must never hand this instance out as warm once it
        // may have received a session. Not recorded, it is not delivered: its record would
        // still say warm.
        if !d.recorded && self.recorded_session != Some(sid) {
            if let Err(e) = self.sup.persist_instance(&self.ctl, inst, Some(sid)).await {
                self.delivery = Some(d);
                let msg = format!("could not record the instance with its session: {e}");
                return Err(Ending::start_failed("DELIVERY_FAILED", msg, None));
            }
            self.recorded_session = Some(sid);
        }
        let addr = inst.endpoint();
        let headers = std::mem::take(&mut d.headers);
        let conn = self.ready_conn.take();
        let relay = d.deliver.is_some();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let fut: Pin<Box<dyn Future<Output = Result<OutcomeFuture, String>> + Send>> =
            match d.deliver.take() {
                Some(f) => f(addr, headers, stop_rx),
                None => {
                    let body = d.body.clone();
                    Box::pin(async move {
                        instance_http::post_bot(addr, headers, body, conn)
                            .await
                            .map(|f| Box::pin(f) as OutcomeFuture)
                    })
                }
            };
        match self.await_delivery(inst, fut, deadline).await {
            Ok(outcome) => {
                if relay {
                    // Before the delivery is recorded: a delivered websocket session without
                    // a mark is one whose relay is gone (`recover`).
                    self.relay_mark = self.sup.relays.hold(sid);
                }
                let (bot, guard): (OutcomeFuture, _) = if relay {
                    // The session's own channel (the websocket relay): driven on its own task
                    // from now on, whatever the actor does next; aborted when the session ends.
                    let task = tokio::spawn(outcome);
                    let guard = RelayTask {
                        abort: task.abort_handle(),
                        stop: Some(stop_tx),
                    };
                    let bot = Box::pin(async move {
                        task.await
                            .unwrap_or_else(|e| BotOutcome::Broken(e.to_string()))
                    });
                    (bot, Some(guard))
                } else {
                    // `/bot` was written whole; what is left is reading its answer, which the
                    // actor polls while serving (the socket keeps whatever arrives meanwhile):
                    // no task of its own per session.
                    (outcome, None)
                };
                let ms = d.requested.elapsed().as_millis() as i64;
                if let Err(end) = self.record_delivery(sid, ms).await {
                    self.delivery = Some(d);
                    return Err(end);
                }
                self.sup.session_changed(&self.ctl.org, sid);
                let (service, region) = self.sup.agent_name_region(self.ctl.agent_id);
                let mut data = serde_json::json!({
                    "session_id": sid,
                    "service": service,
                    "region": region,
                    "service_id": self.ctl.agent_id,
                    "deployment_id": self.ctl.deployment.id,
                    "bot_start_seconds": ms as f64 / 1000.0,
                });
                // Pipecat Cloud's payload: `transport` only when the start named or implied one.
                if let Some(t) = &d.transport {
                    data["transport"] = serde_json::Value::String(t.clone());
                }
                self.sup.emit(&self.ctl.org, "session.started", data);
                self.sup.platform_log(
                    &self.ctl,
                    format!("[cattery] session {sid} delivered after {ms} ms"),
                );
                if let Some(r) = d.reply.take() {
                    let _ = r.send(Ok(ms));
                }
                Ok((bot, guard))
            }
            Err(e) => {
                self.delivery = Some(d);
                Err(e)
            }
        }
    }

    /// Records the delivery. A session this node lost meanwhile is not answered as started:
    /// its record was ended by another node (a takeover while this node was frozen or cut
    /// off, so fenced), or, fenced, the delivery cannot be recorded. The ending fails the
    /// start with 503 `NODE_FENCED`; the cleanup removes the instance (or lets it go, if the
    /// taker adopted it) and writes no end over the taker's.
    async fn record_delivery(&mut self, sid: Uuid, ms: i64) -> Result<(), Ending> {
        let lost = |why: &str| {
            let msg = format!(
                "this node's heartbeats were late and {why}: the session was not started; start it again"
            );
            tracing::warn!(session = %sid, "{msg}");
            Ending::start_failed("NODE_FENCED", msg, None)
        };
        match self.sup.store.mark_delivered(sid, ms).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(lost(
                "another node ended the session before it was delivered",
            )),
            Err(e) if e.is_transient() && self.sup.is_fenced() => {
                Err(lost("the store did not take the session's delivery"))
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(session = %sid, error = %e, "could not record the delivery yet; trying again");
                let store = self.sup.store.clone();
                super::pending::write_again("a session's delivery", sid, move || {
                    let store = store.clone();
                    async move { store.mark_delivered(sid, ms).await.map(|_| ()) }
                });
                Ok(())
            }
            Err(e) => {
                tracing::error!(session = %sid, error = %e, "could not record delivery");
                Ok(())
            }
        }
    }

    async fn await_delivery(
        &mut self,
        inst: &Arc<dyn Instance>,
        mut fut: Pin<Box<dyn Future<Output = Result<OutcomeFuture, String>> + Send>>,
        deadline: Instant,
    ) -> Result<OutcomeFuture, Ending> {
        let delivery_deadline = Instant::now() + self.sup.cfg.start_timeout;
        let within = self.sup.cfg.start_timeout.as_secs_f64();
        loop {
            tokio::select! {
                biased;
                cmd = self.rx.recv() => match cmd {
                    Some(Cmd::Stop(r)) => return Err(Ending::new(during_start(r, true), "HTTP_ERROR")),
                    Some(Cmd::Assign(mut a)) => reply_err(&mut a, "instance is busy"),
                    None => {}
                },
                r = &mut fut => return r.map_err(|err| {
                    let msg = format!("could not deliver the session to the instance: {err}");
                    Ending::start_failed("DELIVERY_FAILED", msg, None)
                }),
                ex = inst.wait_exit() => {
                    let msg = format!("the instance exited before the session was delivered ({})", ex.describe());
                    return Err(Ending::start_failed("INSTANCE_EXITED", msg, Some(ex)));
                }
                _ = tokio::time::sleep_until(deadline) => return Err(Ending::new(EndReason::MaxDuration, "HTTP_ERROR")),
                _ = tokio::time::sleep_until(delivery_deadline) => {
                    let msg = format!("the instance did not take the session within {within} s");
                    return Err(Ending::start_failed("DELIVERY_FAILED", msg, None));
                }
            }
        }
    }

    /// Serving: waits for the session's end (a stop, the agent's answer, the exit, the time
    /// limit), sampling resources meanwhile.
    async fn serving(
        &mut self,
        inst: &Arc<dyn Instance>,
        bot: Option<(OutcomeFuture, Option<RelayTask>)>,
        deadline: Instant,
    ) -> Ending {
        let (mut bot, mut relay): (OutcomeFuture, _) = match bot {
            Some((b, g)) => (b, g),
            None => (Box::pin(std::future::pending()), None),
        };
        let ending = self.serve_until_end(inst, &mut bot, deadline).await;
        // Ended by the platform (not by the session's own channel): the relay closes its
        // client before the instance is stopped.
        if let (Some(r), true) = (relay.as_mut(), ending.by_platform) {
            r.close(ending.reason, &mut bot).await;
        }
        ending
    }

    /// The select loop of [`Actor::serving`].
    async fn serve_until_end(
        &mut self,
        inst: &Arc<dyn Instance>,
        bot: &mut OutcomeFuture,
        deadline: Instant,
    ) -> Ending {
        let mut sample = tokio::time::interval(self.sup.cfg.metrics_interval);
        let mut last_cpu: Option<(Instant, u64)> = None;
        loop {
            tokio::select! {
                biased;
                cmd = self.rx.recv() => match cmd {
                    Some(Cmd::Stop(r)) => return Ending::new(r, "HTTP_ERROR").by_platform(),
                    Some(Cmd::Assign(mut d)) => reply_err(&mut d, "instance is busy"),
                    None => {}
                },
                out = &mut *bot => {
                    let mut e = ending_of_outcome(out, inst).await;
                    if e.exit.is_none() { e.exit = inst.exited(); }
                    return e;
                }
                ex = inst.wait_exit() => return exited_while_serving(inst, bot, ex).await,
                _ = tokio::time::sleep_until(deadline) => {
                    let mut e = Ending::new(EndReason::MaxDuration, "HTTP_ERROR").by_platform();
                    e.message = Some(format!("maxSessionDuration ({} s) reached", self.ctl.deployment.spec.max_session_duration_s()));
                    return e;
                }
                _ = sample.tick() => {
                    if let Some(s) = inst.sample().await {
                        let now = Instant::now();
                        let mc = match last_cpu {
                            Some((t, c)) => {
                                let dt = now.duration_since(t).as_nanos().max(1) as u64;
                                s.cpu_ns.saturating_sub(c).saturating_mul(1000) / dt
                            }
                            None => 0,
                        };
                        last_cpu = Some((now, s.cpu_ns));
                        self.ctl.samples.lock().push(MetricSample {
                            t: now_ms() / 1000,
                            cpu_millicores: mc,
                            memory_bytes: s.memory_bytes,
                        });
                    }
                }
            }
        }
    }
}

/// The ending of a session whose instance exited. The session's own channel (the `/bot`
/// answer, the websocket relay) tells best how it ended, e.g. which side closed a websocket
/// first; it settles within moments of the exit. (A broken `/bot` connection says less than
/// the exit status.)
async fn exited_while_serving(
    inst: &Arc<dyn Instance>,
    bot: &mut OutcomeFuture,
    ex: crate::runtime::ExitInfo,
) -> Ending {
    match tokio::time::timeout(OUTCOME_AFTER_EXIT, bot).await {
        Ok(BotOutcome::Broken(_)) | Err(_) => {}
        Ok(out) => {
            let mut e = ending_of_outcome(out, inst).await;
            e.exit = Some(ex);
            return e;
        }
    }
    let mut e = if ex.success() {
        Ending::new(EndReason::Completed, "HTTP_COMPLETED")
    } else {
        Ending::new(EndReason::Error, "HTTP_ERROR")
    };
    e.exit = Some(ex);
    e.message = Some(format!("the instance exited ({})", ex.describe()));
    e
}

/// How many times a start is tried again on a fresh port (see `Actor::start_until_ready`).
const PORT_CLASH_RETRIES: u32 = 3;

/// How the starting phase ended when it did not end the instance.
#[derive(Debug, PartialEq, Eq)]
enum Started {
    Ready,
    /// The instance exited because its port was taken; worth another port.
    PortClash,
}

/// Whether an instance's last output ([`Instance::last_output`]) is its stderr and says it
/// could not bind its port because it was in use (the messages of Rust, Python (`[Errno 98]
/// ... address already in use`), Node (`EADDRINUSE`) and Go (`bind: address already in
/// use`)). Stdout, the output only when stderr is blank, never counts.
fn is_port_clash((stream, tail): &(&'static str, String)) -> bool {
    if *stream != "stderr" {
        return false;
    }
    let t = tail.to_ascii_lowercase();
    t.contains("address already in use") || t.contains("eaddrinuse")
}

/// Ready = `/readyz` answers 200 *and* the runtime says the endpoint is the instance's own (a
/// foreign program at its address must never be taken for the agent). Resolves to the connection of the
/// answer that found it ready, which then carries `/bot` if the session comes soon
/// (`instance_http::post_bot`).
async fn wait_ready(
    sup: &Supervisor,
    ctl: &InstanceCtl,
    inst: &Arc<dyn Instance>,
    last_status: &AtomicU16,
) -> Option<instance_http::Conn> {
    let addr = inst.endpoint();
    let mut warned = false;
    let began = tokio::time::Instant::now();
    loop {
        let (status, conn) =
            instance_http::get_status_keep(addr, "/readyz", Duration::from_secs(2)).await;
        if let Some(s) = status {
            last_status.store(s, Ordering::Relaxed);
        }
        if status == Some(200) {
            if inst.owns_endpoint() {
                return conn;
            }
            if !warned {
                warned = true;
                sup.platform_log(
                    ctl,
                    format!(
                        "[cattery] {addr} answers /readyz but is not served by instance {}; waiting for the agent",
                        ctl.id
                    ),
                );
            }
        }
        tokio::time::sleep(next_ready_poll(began.elapsed(), ctl.promised())).await;
    }
}

impl Supervisor {
    /// Counts a failed start against the deployment's health.
    pub(super) fn record_failure(
        &self,
        ctl: &InstanceCtl,
        reason: &'static str,
        exit: Option<crate::runtime::ExitInfo>,
        (stream, stderr_tail): (&'static str, String),
    ) {
        let f = StartFailure {
            reason,
            exit,
            stderr_tail,
            stream,
            at_ms: now_ms(),
        };
        let failed = {
            let mut st = self.state.lock();
            st.pools.get_mut(&ctl.agent_id).and_then(|p| {
                let h = p.health.entry(ctl.deployment.id).or_default();
                h.failed(f, Instant::now());
                // Crash-looping before it ever started: the deployment failed.
                (h.crash_looping() && !h.ever_ready).then(|| p.agent.clone())
            })
        };
        if let Some(agent) = failed {
            let why = format!(
                "{} failed starts in a row, last: {reason}",
                super::CRASH_LOOP_THRESHOLD
            );
            self.announce_deployment(&agent, ctl.deployment.id, Some(&why));
        }
    }

    /// Counts a start that became ready. The current deployment's first ready instance ends
    /// a rollout: from then on starts take the new deployment, and the previous one's idle
    /// instances go.
    pub(super) fn record_ready(&self, ctl: &InstanceCtl) {
        let (agent, proven) = {
            let mut st = self.state.lock();
            match st.pools.get_mut(&ctl.agent_id) {
                Some(p) => {
                    p.health.entry(ctl.deployment.id).or_default().ready();
                    (Some(p.agent.clone()), p.proven(ctl.deployment.id))
                }
                None => (None, false),
            }
        };
        if let Some(agent) = agent {
            self.announce_deployment(&agent, ctl.deployment.id, None);
        }
        if let Some(sup) = self.me().filter(|_| proven) {
            sup.reconcile(ctl.agent_id);
        }
    }

    /// Starts the instance: the runtime's command for the deployment, plus the agent's env,
    /// its secrets and the session's id.
    pub(super) async fn spawn_instance(
        &self,
        ctl: &InstanceCtl,
        session: Option<Uuid>,
        abandoned: CancellationToken,
    ) -> Result<Arc<dyn Instance>, String> {
        let prepared = self.runtime.prepare(&ctl.deployment)?;
        let mut env = prepared.env;
        env.extend(
            ctl.deployment
                .spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        // The bound secret set's keys, from the deployment's snapshot (core::secrets).
        env.extend(self.secrets.env_for(&ctl.org, &ctl.deployment).await?);
        // The ICE servers the start answer gives clients, unless the agent names its own.
        if !env
            .iter()
            .any(|(k, _)| k == "CATTERY_ICE_SERVERS" || k == "ICE_CONFIG_URL")
        {
            env.push(("CATTERY_ICE_SERVERS".into(), self.cfg.ice_servers.join(",")));
        }
        if let Some(s) = session {
            env.push(("CATTERY_SESSION_ID".into(), s.to_string()));
        }
        let spec = InstanceSpec {
            instance_id: ctl.id,
            program: prepared.program,
            args: prepared.args,
            working_dir: prepared.working_dir,
            env,
            limits: ctl.deployment.spec.limits(),
            agent: Some(ctl.agent_id),
            deployment: Some(ctl.deployment.id),
            abandoned,
        };
        let sink = LogSink::new(
            self.logs.clone(),
            ctl.attribution.clone(),
            self.cfg.log_rate,
        );
        self.runtime
            .start(spec, sink)
            .await
            .map_err(|e| e.to_string())
    }

    /// Records (or re-records) the instance, naming its session. A re-record (the instance
    /// was recorded before) only updates a record that still names this node: a takeover
    /// that deleted it or gave it to another node is never undone (that node, or this
    /// node's reconciliation once fenced, decides the instance's fate). Errors (logged): the
    /// store's, or the record taken over.
    pub(super) async fn persist_instance(
        &self,
        ctl: &InstanceCtl,
        inst: &Arc<dyn Instance>,
        session: Option<Uuid>,
    ) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let rec = InstanceRecord {
            id: ctl.id,
            agent_id: ctl.agent_id,
            deployment_id: ctl.deployment.id,
            session_id: session,
            runtime: inst.kind().as_str().to_string(),
            placement: inst.placement(),
            created_ms: now_ms(),
            node_id: self.cfg.node_id.clone(),
        };
        let r = if ctl.recorded.load(Ordering::SeqCst) {
            match self.store.update_instance(&rec).await {
                Ok(true) => Ok(()),
                Ok(false) => Err("its record was taken over by another node".to_string()),
                Err(e) => Err(e.to_string()),
            }
        } else {
            self.store
                .put_instance(&rec)
                .await
                .map_err(|e| e.to_string())
        };
        match &r {
            Ok(()) => ctl.recorded.store(true, Ordering::SeqCst),
            Err(e) => tracing::error!(instance = %ctl.id, error = %e, "could not record instance"),
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::is_port_clash;

    #[test]
    fn a_port_clash_is_read_from_stderr_only() {
        let said = |stream, tail: &str| is_port_clash(&(stream, tail.to_string()));
        assert!(said("stderr", "OSError: [Errno 98] Address already in use"));
        assert!(said("stderr", "Error: listen EADDRINUSE: address :::8080"));
        assert!(!said("stderr", "Traceback: ImportError"));
        // Stdout is the last output only when stderr is blank, and a blank stderr is no clash.
        assert!(!said("stdout", "bind: address already in use"));
    }
}
