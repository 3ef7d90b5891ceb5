//! The engine's in-memory state: agents' pools, their instances' controllers, live sessions.
//!
//! Everything here sits under the engine's one state lock (`Supervisor::state`), except each
//! controller's own slot (state and claim), which has a lock of its own so that the actor can
//! move its instance along without the engine lock.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use super::health::Health;
use crate::core::instance_http::Deliver;
use crate::core::CoreResult;
use crate::model::{AgentRecord, DeploymentRecord, EndReason, MetricSample};
use crate::runtime::{Instance, LogAttribution};

/// Lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstState {
    /// Started, not yet ready, promised to no session (a warm instance in the making).
    Starting,
    /// Starting and promised to a session ([`Slot::session`]): a cold start, or a warm
    /// instance a start claimed. It gets the session as soon as it is ready; never trimmed,
    /// never taken by another start.
    Claimed,
    /// Ready and waiting for a session (warm).
    Idle,
    /// Serving a session ([`Slot::session`]), or about to.
    Busy,
    /// Being removed.
    Ending,
}

/// A controller's state and the session it is promised to, under one lock: the one claim
/// marker. Invariant: `Claimed` and `Busy` have a session; `Starting` and `Idle` have none.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Lifecycle state.
    pub state: InstState,
    /// The session this instance is promised to or serves.
    pub session: Option<Uuid>,
}

/// A command to an instance's actor.
pub(super) enum Cmd {
    /// Deliver this session (to a warm or claimed instance). Boxed: a mailbox's first block
    /// holds 32 commands, and each instance has a mailbox.
    Assign(Box<Delivery>),
    /// End the instance (and its session) with this reason.
    Stop(EndReason),
}

/// A session on its way to an instance.
pub(super) struct Delivery {
    pub session: Uuid,
    pub body: Bytes,
    pub deliver: Option<Deliver>,
    pub headers: Vec<(String, String)>,
    /// The transport the start asked for or implied (`daily`, `webrtc`, `websocket`).
    pub transport: Option<String>,
    pub requested: Instant,
    pub deadline: Instant,
    pub reply: Option<oneshot::Sender<CoreResult<i64>>>,
    /// The instance's durable record already names this session (a warm start records the
    /// session and the promise in one write, `Store::insert_session_for_instance`).
    pub recorded: bool,
}

/// The actor's end of a controller: its commands, and the flag it raises once gone.
pub(super) type Mailbox = (mpsc::UnboundedReceiver<Cmd>, watch::Sender<bool>);

/// The engine's handle on one instance; its actor owns the instance itself.
pub(super) struct InstanceCtl {
    pub id: Uuid,
    pub org: String,
    pub agent_id: Uuid,
    pub deployment: Arc<DeploymentRecord>,
    slot: Mutex<Slot>,
    pub cmd_tx: mpsc::UnboundedSender<Cmd>,
    pub done: watch::Receiver<bool>,
    /// Who the instance's log lines belong to; mirrors [`Slot::session`] for logs only.
    pub attribution: Arc<Mutex<LogAttribution>>,
    pub samples: Mutex<Vec<MetricSample>>,
    pub instance: OnceLock<Arc<dyn Instance>>,
    /// The session promised to this instance is stored (its `insert` returned): from then
    /// on a `DELETE` of it is answered from memory (`stop_session`).
    pub session_stored: AtomicBool,
    /// A stop recorded before a restart: its deadline (Unix ms), which bounds the grace.
    pub stop_deadline_ms: Mutex<Option<i64>>,
    /// The instance's durable record was written by this node (or found at re-adoption).
    pub recorded: AtomicBool,
    /// Another node adopted the instance while this node was fenced: the actor lets it go
    /// (no removal, no record written) when it ends ([`Supervisor::rejoin`]).
    ///
    /// [`Supervisor::rejoin`]: super::Supervisor::rejoin
    pub released: AtomicBool,
}

impl InstanceCtl {
    /// A new controller (id: a new one, or a recorded one when re-adopting) and its mailbox,
    /// which goes to the actor.
    pub fn new(
        agent: &AgentRecord,
        dep: Arc<DeploymentRecord>,
        state: InstState,
        session: Option<Uuid>,
        id: Option<Uuid>,
    ) -> (Arc<InstanceCtl>, Mailbox) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (done_tx, done) = watch::channel(false);
        let id = id.unwrap_or_else(Uuid::new_v4);
        let ctl = Arc::new(InstanceCtl {
            id,
            org: agent.org.clone(),
            agent_id: agent.id,
            attribution: Arc::new(Mutex::new(LogAttribution {
                org: agent.org.clone(),
                agent_id: agent.id,
                deployment_id: dep.id,
                instance_id: id,
                session_id: session,
            })),
            deployment: dep,
            slot: Mutex::new(Slot { state, session }),
            cmd_tx,
            done,
            samples: Mutex::new(Vec::new()),
            instance: OnceLock::new(),
            session_stored: AtomicBool::new(false),
            stop_deadline_ms: Mutex::new(None),
            recorded: AtomicBool::new(false),
            released: AtomicBool::new(false),
        });
        (ctl, (cmd_rx, done_tx))
    }

    /// Current state.
    pub fn state(&self) -> InstState {
        self.slot.lock().state
    }

    /// The session this instance is promised to or serves.
    pub fn session(&self) -> Option<Uuid> {
        self.slot.lock().session
    }

    /// Sets the state.
    pub fn set_state(&self, s: InstState) {
        self.slot.lock().state = s;
    }

    /// Moves to `Ending` and returns the session the instance is promised to or serves, in
    /// one step: a start claims it either before (and its session is returned, to end with
    /// the instance) or not at all. (Read and set apart, a warm claim between them left its
    /// session in the live set for good.)
    pub fn begin_ending(&self) -> Option<Uuid> {
        let mut s = self.slot.lock();
        s.state = InstState::Ending;
        s.session
    }

    /// Moves `from` -> `to` if the state is `from`; returns whether it did.
    pub fn transition(&self, from: InstState, to: InstState) -> bool {
        let mut s = self.slot.lock();
        let ok = s.state == from;
        if ok {
            s.state = to;
        }
        ok
    }

    /// Moves `from` -> `to` and promises the instance to `session`, if the state is `from`
    /// (one atomic step: no two starts can claim the same instance).
    pub fn try_claim(&self, from: InstState, to: InstState, session: Uuid) -> bool {
        {
            let mut s = self.slot.lock();
            if s.state != from {
                return false;
            }
            s.state = to;
            s.session = Some(session);
        }
        self.attribution.lock().session_id = Some(session);
        true
    }

    /// Takes a promise back (its session could not be recorded): `Busy` -> `Idle`,
    /// `Claimed` -> `Starting`.
    pub fn release(&self) {
        {
            let mut s = self.slot.lock();
            s.state = match s.state {
                InstState::Busy => InstState::Idle,
                InstState::Claimed => InstState::Starting,
                other => other,
            };
            s.session = None;
        }
        self.attribution.lock().session_id = None;
    }

    /// Records the session the actor now serves, keeping the state.
    pub fn set_session(&self, session: Uuid) {
        self.slot.lock().session = Some(session);
        self.attribution.lock().session_id = Some(session);
    }

    /// Whether the instance is promised to a session (a stop then ends that session too).
    pub fn promised(&self) -> bool {
        self.slot.lock().session.is_some()
    }
}

/// One agent's pool of instances.
pub(super) struct AgentPool {
    pub agent: AgentRecord,
    /// The current deployment: the agent's desired one, which the pool keeps warm.
    pub deployment: Arc<DeploymentRecord>,
    /// During a rollout, the deployment that served before the current one and serves
    /// until the current one has proven itself (its first instance ready on this node):
    /// starts take its idle instances and cold-start it ([`AgentPool::serving`]). Memory
    /// only: a restart forgets it (docs/lifecycle.md, redeploys).
    pub previous: Option<Arc<DeploymentRecord>>,
    pub deploy_error: Option<String>,
    /// The deploy error may clear by itself (the runtime could not reach its engine): the
    /// deployment is validated again until it passes or fails for another reason.
    pub recheck: bool,
    pub instances: HashMap<Uuid, Arc<InstanceCtl>>,
    pub health: HashMap<Uuid, Health>,
    /// Warm instances planned whose capacity slot is being reserved in the store (not yet in
    /// `instances`): counted as warm, so a plan does not ask for them twice.
    pub reserving: u32,
}

impl AgentPool {
    pub fn new(
        agent: AgentRecord,
        deployment: Arc<DeploymentRecord>,
        deploy_error: Option<String>,
    ) -> Self {
        AgentPool {
            agent,
            deployment,
            previous: None,
            deploy_error,
            recheck: false,
            instances: HashMap::new(),
            health: HashMap::new(),
            reserving: 0,
        }
    }

    /// The deployment a start runs now: the previous one during a rollout, else the current
    /// one.
    pub fn serving(&self) -> &Arc<DeploymentRecord> {
        self.previous.as_ref().unwrap_or(&self.deployment)
    }

    /// Why the deployment a start runs now cannot run: the current one's deploy error, or
    /// none during a rollout (the previous one could run when it was replaced).
    pub fn serving_error(&self) -> Option<&String> {
        match self.previous {
            Some(_) => None,
            None => self.deploy_error.as_ref(),
        }
    }

    /// Whether the current deployment could serve now: it can run here and is not
    /// crash-looping.
    fn current_can_serve(&self) -> bool {
        self.deploy_error.is_none()
            && self
                .health
                .get(&self.deployment.id)
                .is_none_or(|h| !h.crash_looping())
    }

    /// Makes `dep` the current deployment (a redeploy: a new id) and decides what serves
    /// meanwhile. When `dep` has something to prove here (`min`, this node's share of
    /// `minAgents`, is above 0: it starts warm instances), the deployment that served until
    /// now keeps serving ([`AgentPool::previous`]) until `dep`'s first instance is ready
    /// ([`AgentPool::proven`]): the previous one of a rollout still under way, else the
    /// replaced one if it could serve (no deploy error, not crash-looping). Otherwise `dep`
    /// serves at once. A redeploy back to the previous deployment ends the rollout.
    /// `deploy_error` is `dep`'s.
    pub fn redeploy(&mut self, dep: Arc<DeploymentRecord>, deploy_error: Option<String>, min: u32) {
        let before = match self.previous.take() {
            Some(p) => Some(p),
            None => self.current_can_serve().then(|| self.deployment.clone()),
        };
        self.previous = before.filter(|b| min > 0 && b.id != dep.id);
        self.deployment = dep;
        self.deploy_error = deploy_error;
    }

    /// An instance of deployment `dep` became ready: if it is the current one, the rollout
    /// is over (the previous deployment's idle instances go at the next plan). Returns
    /// whether it ended one.
    pub fn proven(&mut self, dep: Uuid) -> bool {
        dep == self.deployment.id && self.previous.take().is_some()
    }
}

/// Everything under the engine's state lock.
#[derive(Default)]
pub(super) struct State {
    pub pools: HashMap<Uuid, AgentPool>,
    pub by_name: HashMap<(String, String), Uuid>,
    pub sessions: HashMap<Uuid, Arc<InstanceCtl>>,
}

impl State {
    /// Takes `session` out of the live set if its entry is `ctl`'s: another instance may hold
    /// it since (a takeover's re-adoption), and that entry stays.
    pub fn leave_live_set(&mut self, session: Uuid, ctl: &Arc<InstanceCtl>) {
        if self
            .sessions
            .get(&session)
            .is_some_and(|c| Arc::ptr_eq(c, ctl))
        {
            self.sessions.remove(&session);
        }
    }
}
