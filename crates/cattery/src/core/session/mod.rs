//! The session engine: warm pool, capacity, delivery, one terminal state, cleanup.
//!
//! Every instance is driven by one task (its *actor*, [`actor`]) that owns every decision
//! about it, one phase after another (starting, idle, delivering, serving). Whatever happens
//! first, a stop, the agent's answer to `/bot`, the process exiting, the time limit, a start
//! timeout, decides the session's end; the actor then runs the one cleanup path
//! ([`cleanup`]: SIGTERM, stop grace, SIGKILL, wait until the tree is empty, remove
//! everything), frees the capacity slot, records the end (first wins in the store as well),
//! and refills the warm pool. One instance serves at most one session.
//!
//! Capacity: every instance of an agent that is not yet gone (starting, idle, busy, ending)
//! counts against `maxAgents`, so the cap bounds real processes (reference §B.4). A start
//! takes a ready warm instance (`coldStart: false`), else a warm instance that is still
//! starting and not yet promised to anyone, else starts a new one below `maxAgents`
//! (both `coldStart: true`), else answers 429 at once ([`admission`]).
//!
//! Order of the cleanup path, chosen so that no observer sees a state that is not yet true:
//! the tree is gone (terminate returns) -> the capacity slot is free -> the end is recorded
//! (first end wins, also in the store) -> the session leaves the live set -> waiters (a
//! `DELETE`, a pending start) are answered -> the pool is refilled. See `docs/lifecycle.md`.
//!
//! The engine knows instances only through [`crate::runtime::Runtime`] and
//! [`crate::runtime::Instance`]: what a deployment runs, where an instance is reached and
//! how it is found again after a restart are the runtime's.

mod actor;
mod admission;
mod cleanup;
mod counts;
mod ending;
mod fence;
mod forward;
mod health;
mod observe;
mod pending;
mod pool;
mod recover;
pub mod relays;
mod start;
mod state;
mod stop;
#[cfg(test)]
mod tests;
mod waiting;
mod watching;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use uuid::Uuid;

use super::instance_http::Deliver;
use super::{CoreError, CoreResult};
use crate::model::{now_ms, AgentRecord, DeploymentRecord, LogLine, MetricSample, SessionRecord};
use crate::runtime::Runtime;
use crate::store::Store;

pub use health::{Health, StartFailure, CRASH_LOOP_THRESHOLD};
pub use state::InstState;

pub use counts::{status_counts, AgentPoolStatus, StatusCounts};
pub use fence::Rejoined;
pub use forward::StartElsewhere;
pub use recover::lost_end;
use state::{AgentPool, InstanceCtl, State};
pub use watching::{Elsewhere, Watching};

/// How often a starting instance's `/readyz` is polled, at most (see [`next_ready_poll`]).
pub const READY_POLL: Duration = Duration::from_millis(5);
/// How often a starting instance's `/readyz` is polled, at least: the first polls, while a
/// native agent (ready within a few ms of its spawn) may answer any moment.
pub const FIRST_READY_POLL: Duration = Duration::from_millis(1);
/// Past its first polls, a starting instance is polled every 1/`READY_POLL_SHARE` of the
/// time it has taken so far (between [`FIRST_READY_POLL`] and [`READY_POLL`]): the time its
/// readiness goes unseen stays a small share of its start (at most 2.5 %, 2.5 ms for an agent
/// ready in 100 ms instead of up to 5 ms), for a number of polls that grows only with the log
/// of the start's length until the flat [`READY_POLL`] (about 200 for a 700 ms Python bot,
/// each a refused connect or a short `GET` on loopback).
pub const READY_POLL_SHARE: u32 = 40;
/// The same for an instance a session waits for (a cold start, or a warm instance claimed
/// while it starts): polled every 0.5 ms at first, then every 1/`WAITED_READY_POLL_SHARE` of
/// its time (its readiness unseen for at most 1 % of its start: 1 ms at 100 ms), at most
/// every [`READY_POLL`], since every moment of it is the caller's. The same bound of 5 ms keeps
/// a burst of slow starts (Python bots on a busy machine, each taking seconds) from spending
/// the cores they share on polls. A warm pool's refill, which nobody waits for, keeps the
/// sparser schedule above (its polls are a churn's CPU).
pub const WAITED_FIRST_READY_POLL: Duration = Duration::from_micros(500);
/// See [`WAITED_FIRST_READY_POLL`].
pub const WAITED_READY_POLL_SHARE: u32 = 100;

/// The wait before the next `/readyz` poll of an instance starting for `elapsed`; `waited`:
/// whether a session waits for it.
pub fn next_ready_poll(elapsed: Duration, waited: bool) -> Duration {
    if waited {
        (elapsed / WAITED_READY_POLL_SHARE).clamp(WAITED_FIRST_READY_POLL, READY_POLL)
    } else {
        (elapsed / READY_POLL_SHARE).clamp(FIRST_READY_POLL, READY_POLL)
    }
}

/// How often an idle warm instance's `/readyz` is checked; a non-200 answer replaces it.
pub const IDLE_CHECK: Duration = Duration::from_secs(2);

/// How often a deployment whose deploy error may clear by itself is validated again
/// ([`Supervisor::recheck_deploy_errors`]).
pub const DEPLOY_RECHECK: Duration = Duration::from_secs(2);

/// Changes kept for a slow watcher of [`Supervisor::session_changes`] before it lags.
const SESSION_CHANGES_BUFFER: usize = 4096;

/// Engine settings (from `cattery serve` flags).
#[derive(custom_debug::Debug, Clone)]
pub struct SupervisorConfig {
    /// Stop grace used when the agent sets none (`--stop-grace-seconds`, default 5 s).
    pub default_stop_grace: Duration,
    /// How long a start may take until its instance answers `/readyz` with 200, making the
    /// instance included (`--start-timeout-seconds`, default 60 s).
    pub start_timeout: Duration,
    /// Daily API key, needed for `createDailyRoom`.
    #[debug(with = crate::redact::hidden_some)]
    pub daily_api_key: Option<String>,
    /// Resource sampling interval (default 5 s).
    pub metrics_interval: Duration,
    /// ICE server URLs given to every instance as `CATTERY_ICE_SERVERS` (unless its env
    /// names its own ICE source) and answered for `enableDefaultIceServers`.
    pub ice_servers: Vec<String>,
    /// This node's id: the owner recorded on its sessions and instances (docs/cluster.md).
    pub node_id: String,
    /// A node whose last heartbeat is older than this is dead (`--node-timeout`).
    pub node_timeout: Duration,
    /// At most this many warm instances of one agent start at once on this node
    /// (`--max-warm-starting`, default [`DEFAULT_MAX_WARM_STARTING`]); 0: no limit.
    pub max_warm_starting: u32,
    /// Where relayed websocket sessions are marked while this process supervises them
    /// (`<data dir>/relays`, [`relays`]); `None`: no marks (a restart ends every delivered
    /// websocket session it finds).
    pub relay_dir: Option<std::path::PathBuf>,
    /// How much of each instance's output is captured per second (`--log-rate-lines`,
    /// `--log-rate-bytes`).
    pub log_rate: crate::runtime::logs::LogRate,
}

/// How many warm instances of one agent start at once on a node, by default. A large
/// `minAgents` then fills in waves (the next one as each instance gets ready) instead of
/// starting every instance at once: 1,000 Python bots started together on 2 cores would share
/// the CPU until each took longer than the start timeout, and fail as a crash loop.
pub const DEFAULT_MAX_WARM_STARTING: u32 = 16;

/// What another node answered to a forwarded stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStop {
    /// The session is ended (stopped now, or before); its instance is gone.
    Stopped,
    /// The session is not that node's (any more): ask the store who owns it now.
    NotOwner,
    /// That node refused this node's cluster secret (401: the nodes' `--cluster-secret-file`s
    /// differ). Trying again cannot help.
    Refused,
    /// That node's store has no record of this node's run (403 `NODE_UNKNOWN`): the two use
    /// different databases (one is a restored copy). Trying again cannot help.
    Stranger,
    /// That node knows no such session (404): the shared store has no record of it. Also what
    /// a node answers to the probe of [`crate::core::cluster::check_secret_with_peers`] once it
    /// accepted the secret.
    Unknown,
}

/// The other nodes of a cluster, as the engine reaches them (implemented over HTTP with the
/// cluster secret in `core::cluster`).
#[async_trait::async_trait]
pub trait Peers: Send + Sync {
    /// Asks the node at `url` to stop its session `session`, and waits for its answer (given
    /// only once the instance is gone). Errors: the node did not answer, or failed.
    async fn stop(&self, url: &str, session: Uuid) -> Result<PeerStop, String>;
}

/// Deletes the Daily rooms Cattery made for sessions once their end is recorded
/// ([`crate::model::SessionRecord::daily_room`]; implemented over Daily's API in
/// `core::daily`).
pub trait RoomRemover: Send + Sync {
    /// Deletes room `room` of session `session` of `org`, in the background (a failure is
    /// logged: the room expires by itself at its `exp`).
    fn remove(&self, org: &str, session: Uuid, room: &str);
}

/// Work to do once a session has ended (see [`Supervisor::on_session_end`]); its argument
/// says whether the session had started (reached its agent) before it ended.
pub type EndHook = Box<dyn FnOnce(bool) + Send + Sync>;

/// Resolves the environment variables that a deployment's bound secret set gives its
/// instances (reference §A.6 "Injection"). Implemented by the secrets module.
#[async_trait::async_trait]
pub trait SecretSource: Send + Sync {
    /// Variables for instances of `dep` (owned by `org`). Errors: the set or its key is unusable.
    async fn env_for(
        &self,
        org: &str,
        dep: &DeploymentRecord,
    ) -> Result<Vec<(String, String)>, String>;
}

/// Snapshot of an agent's pool for status responses.
#[derive(Debug, Clone, Default)]
pub struct PoolStatus {
    /// Instances of the current deployment that are starting.
    pub starting: u32,
    /// Ready idle instances of the current deployment.
    pub idle: u32,
    /// Busy instances (any deployment).
    pub busy: u32,
    /// All instances not yet gone.
    pub total: u32,
    /// Health of the current deployment.
    pub health: Health,
    /// Why the current deployment cannot run, if it cannot.
    pub deploy_error: Option<String>,
    /// During a rollout, the previous deployment, which serves until the current one is
    /// proven (its first instance ready here).
    pub previous: Option<PreviousStatus>,
}

/// The previous deployment of a rollout, as an agent's status shows it (`previousRevision`).
#[derive(Debug, Clone, Default)]
pub struct PreviousStatus {
    /// Its id.
    pub deployment_id: Uuid,
    /// When it was created (ms).
    pub created_ms: i64,
    /// Its ready idle instances.
    pub idle: u32,
    /// Its instances serving a session.
    pub busy: u32,
    /// Its instances starting (cold starts, which sessions wait for).
    pub starting: u32,
    /// Its health.
    pub health: Health,
}

impl PreviousStatus {
    /// Whether it takes sessions now: not crash-looping.
    pub fn serves(&self) -> bool {
        !self.health.crash_looping()
    }
}

/// How a start request wants its session delivered.
#[derive(Default)]
pub struct StartParams {
    /// JSON object sent as the `/bot` body (`{}` when absent).
    pub body: Bytes,
    /// Custom delivery (the websocket transport); `None` = `POST /bot` with `body`.
    pub deliver: Option<Deliver>,
    /// Use this session id (the websocket transport announces it at `/start`).
    pub session_id: Option<Uuid>,
    /// `x-daily-transport-type`.
    pub transport: Option<String>,
    /// The Daily room made for the session, recorded with it (deleted at its end: see
    /// [`Supervisor::watch_room`], which the caller registers before the start).
    pub daily_room: Option<crate::model::SessionRoom>,
    /// Extra headers for `/bot` (room url and token).
    pub extra_headers: Vec<(String, String)>,
    /// Resolves when the client that asked for the session has gone away (the websocket
    /// transport's client dropped while its instance was starting). If it resolves before
    /// the session is delivered, the start is cancelled: the instance goes through the cleanup
    /// path and the session is recorded with `endReason: client_disconnected`. Never
    /// resolving is fine.
    pub client_gone: Option<ClientGone>,
}

/// See [`StartParams::client_gone`].
pub type ClientGone = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A delivered session.
#[derive(Debug, Clone)]
pub struct StartOutcome {
    /// Session id.
    pub session_id: Uuid,
    /// Whether a new instance had to be started.
    pub cold_start: bool,
    /// Time from request to delivery, ms.
    pub bot_start_ms: i64,
}

/// The session engine. One per server.
pub struct Supervisor {
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    cfg: SupervisorConfig,
    state: Mutex<State>,
    logs: mpsc::UnboundedSender<LogLine>,
    draining: AtomicBool,
    /// Set once [`Supervisor::recover`] has finished: until then no warm pool is refilled (an
    /// instance spawned meanwhile would be unknown to the recovery's sweep and removed as a
    /// leftover of the previous run, and counted as a failed start).
    recovered: AtomicBool,
    /// Set by [`Supervisor::detach`]: no warm pool is refilled any more.
    detached: AtomicBool,
    live: watch::Sender<usize>,
    secrets: Arc<dyn SecretSource>,
    /// Ends the store has not accepted yet, written again until it does.
    pending_ends: pending::PendingEnds,
    /// Sessions of a lost node this node took over and is ending `lost` or adopting: a stop
    /// that reaches one meanwhile waits for that, instead of recording a vaguer end.
    taking_over: Mutex<std::collections::HashSet<Uuid>>,
    /// Takeovers whose records the store handed to this node and that a store error cut
    /// short: finished by the next try (`recover::Takeover`). Held while one runs, so that
    /// two takeovers on this node never do the same step.
    takeovers: tokio::sync::Mutex<Vec<recover::Takeover>>,
    /// `(org, session)` each time a session's record changes: stored, delivered, ended
    /// ([`Supervisor::session_changes`]).
    changes: broadcast::Sender<(String, Uuid)>,
    /// Session changes made through other nodes, and this node's registration for them.
    watching: watching::SessionWatch,
    /// Work to run when a session ends ([`Supervisor::on_session_end`]).
    end_hooks: Mutex<HashMap<Uuid, EndHook>>,
    /// What deletes the Daily rooms of ended sessions, once set ([`Supervisor::set_room_remover`]).
    rooms: std::sync::OnceLock<Arc<dyn RoomRemover>>,
    /// The other nodes, once the server has set them ([`Supervisor::set_peers`]).
    peers: std::sync::OnceLock<Arc<dyn Peers>>,
    /// The engine itself, for work started from `&self` that needs the `Arc`.
    this: std::sync::Weak<Supervisor>,
    /// This node and its share of the warm pools ([`Supervisor::set_cluster_view`]).
    cluster: Mutex<ClusterView>,
    /// Where session and deployment events go (webhooks), once set.
    events: std::sync::OnceLock<Arc<dyn crate::core::webhooks::EventSink>>,
    /// Deployments whose `deployment.ready`/`deployment.failed` was reported (or that were
    /// running before this start of the server): each is reported once.
    announced: Mutex<std::collections::HashSet<Uuid>>,
    /// Whether this node is fenced (its heartbeats were late): see `fence`.
    fence: Mutex<fence::Fence>,
    /// The node list as last read from the store ([`Supervisor::remember_nodes`]: every
    /// heartbeat period, and by every forwarded stop that had to read it), so a forwarded
    /// stop finds its owner's address without a round trip.
    nodes_seen: Mutex<HashMap<String, crate::store::NodeRecord>>,
    /// The relayed websocket sessions' marks ([`relays`]).
    relays: relays::RelayMarks,
}

/// This node among the live nodes on the store (docs/cluster.md): its place in the sorted
/// list of live nodes, which decides its share of every agent's `minAgents`. (Its id is the
/// engine's, [`SupervisorConfig::node_id`].)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// This node's index among the live nodes sorted by id.
    pub index: u32,
    /// Live nodes (at least 1).
    pub nodes: u32,
}

impl Default for ClusterView {
    fn default() -> Self {
        ClusterView { index: 0, nodes: 1 }
    }
}

impl ClusterView {
    /// This node's share of `min` warm instances: `min / nodes`, plus one for the first
    /// `min % nodes` nodes, so the shares of all live nodes add up to `min`.
    pub fn share(&self, min: u32) -> u32 {
        let n = self.nodes.max(1);
        min / n + u32::from(self.index.min(n - 1) < min % n)
    }
}

impl Supervisor {
    /// Every deployment this node may run now: each agent's current one, the previous one
    /// still serving during a rollout, and those its live instances run (an old deployment's
    /// sessions go on after a redeploy). What the build retention must keep
    /// (`core::builds::Builds::collect`).
    pub fn deployments_in_use(&self) -> Vec<Arc<DeploymentRecord>> {
        let st = self.state.lock();
        let mut out: Vec<Arc<DeploymentRecord>> = Vec::new();
        for p in st.pools.values() {
            out.push(p.deployment.clone());
            out.extend(p.previous.clone());
            out.extend(p.instances.values().map(|c| c.deployment.clone()));
        }
        out
    }

    /// Creates the engine. `logs` receives captured and platform log lines; `secrets`
    /// gives instances their deployment's bound secrets.
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<dyn Runtime>,
        cfg: SupervisorConfig,
        logs: mpsc::UnboundedSender<LogLine>,
        secrets: Arc<dyn SecretSource>,
    ) -> Arc<Self> {
        let relays = relays::RelayMarks::new(cfg.relay_dir.clone());
        let sup = Arc::new_cyclic(|this| Supervisor {
            this: this.clone(),
            relays,
            store,
            runtime,
            cfg,
            state: Mutex::new(State::default()),
            logs,
            draining: AtomicBool::new(false),
            recovered: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            live: watch::channel(0).0,
            secrets,
            pending_ends: pending::PendingEnds::default(),
            taking_over: Mutex::default(),
            takeovers: tokio::sync::Mutex::default(),
            changes: broadcast::channel(SESSION_CHANGES_BUFFER).0,
            watching: watching::SessionWatch::default(),
            end_hooks: Mutex::new(HashMap::new()),
            rooms: std::sync::OnceLock::new(),
            peers: std::sync::OnceLock::new(),
            cluster: Mutex::new(ClusterView::default()),
            events: std::sync::OnceLock::new(),
            announced: Mutex::new(std::collections::HashSet::new()),
            fence: Mutex::new(fence::Fence::default()),
            nodes_seen: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&sup);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                s.reconcile_all();
            }
        });
        let weak = Arc::downgrade(&sup);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DEPLOY_RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                s.recheck_deploy_errors();
            }
        });
        sup
    }

    /// Validates again every deployment whose deploy error may clear by itself
    /// ([`crate::runtime::Runtime::deploy_error_may_clear`], e.g. a Docker engine that did not
    /// answer at deploy or at this server's start): one that passes now makes its agent
    /// ready, as a deploy would; one that fails for another reason keeps that error.
    pub(super) fn recheck_deploy_errors(self: &Arc<Self>) {
        let due: Vec<(Uuid, Arc<DeploymentRecord>)> = self
            .state
            .lock()
            .pools
            .iter()
            .filter(|(_, p)| p.recheck && p.agent.deleted_ms.is_none())
            .map(|(id, p)| (*id, p.deployment.clone()))
            .collect();
        for (id, dep) in due {
            let error = self.validate(&dep);
            let recheck = error.is_some() && self.runtime.deploy_error_may_clear(&dep);
            let agent = {
                let mut st = self.state.lock();
                let Some(p) = st.pools.get_mut(&id) else {
                    continue;
                };
                if p.deployment.id != dep.id || !p.recheck {
                    // Redeployed meanwhile: that deploy validated its own.
                    continue;
                }
                p.recheck = recheck;
                p.deploy_error = error.clone();
                p.agent.clone()
            };
            match &error {
                Some(_) if recheck => continue,
                Some(e) => self.announce_deployment(&agent, dep.id, Some(e)),
                None => {
                    tracing::info!(agent = %agent.name, deployment = %dep.id, "the deployment can run now");
                    if agent.min_agents == 0 {
                        self.announce_deployment(&agent, dep.id, None);
                    }
                }
            }
            self.reconcile(id);
        }
    }

    /// How this node reaches the other nodes of its cluster (for forwarded stops). Without
    /// it, a stop of another live node's session answers 503 `NODE_UNREACHABLE`.
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    /// The engine's `Arc` (`None` once it is being dropped).
    fn me(&self) -> Option<Arc<Supervisor>> {
        self.this.upgrade()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// Sets this node's place among the live nodes; when its share of the warm pools
    /// changed, every pool is reconciled to it.
    pub fn set_cluster_view(self: &Arc<Self>, view: ClusterView) {
        let changed = {
            let mut c = self.cluster.lock();
            let changed = *c != view;
            *c = view;
            changed
        };
        if changed {
            self.reconcile_all();
        }
    }

    /// Keeps the node list just read from the store (the whole list: nodes not in it are
    /// forgotten), for forwarded stops and proxied requests.
    pub fn remember_nodes(&self, nodes: &[crate::store::NodeRecord]) {
        *self.nodes_seen.lock() = nodes.iter().map(|n| (n.id.clone(), n.clone())).collect();
    }

    /// Node `id` as last read from the store (at most one heartbeat period ago), if it was in
    /// the list. Its heartbeat is at most as recent as the store's: a node alive by it is
    /// alive by the store too.
    pub fn node_seen(&self, id: &str) -> Option<crate::store::NodeRecord> {
        self.nodes_seen.lock().get(id).cloned()
    }

    /// Whether this node's store knows node `id`'s run that started at `started_ms`: from the
    /// list last read, else read again (a node that just started or restarted). An internal
    /// call from a run the store does not know comes from a node on another database (a
    /// restored copy of this one, whose node list still names this cluster's nodes).
    ///
    /// Errors: the store could not be read.
    pub async fn knows_node_run(&self, id: &str, started_ms: i64) -> CoreResult<bool> {
        let is = |n: &crate::store::NodeRecord| n.started_ms == started_ms;
        if self.node_seen(id).is_some_and(|n| is(&n)) {
            return Ok(true);
        }
        let nodes = self.store.list_nodes().await?;
        self.remember_nodes(&nodes);
        Ok(nodes.iter().any(|n| n.id == id && is(n)))
    }

    /// This node's place among the live nodes.
    pub fn cluster_view(&self) -> ClusterView {
        self.cluster.lock().clone()
    }

    /// The runtime in use.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    /// Default stop grace.
    pub fn default_stop_grace(&self) -> Duration {
        self.cfg.default_stop_grace
    }

    /// The ICE server URLs of `--ice-servers`.
    pub fn ice_servers(&self) -> &[String] {
        &self.cfg.ice_servers
    }

    /// Runs `hook` once session `session` has ended: when its end is recorded, or when its
    /// start fails (the caller of a failed [`Supervisor::start_session`] may also run it at
    /// once with [`Supervisor::run_end_hook`]). Register it before starting the session.
    pub fn on_session_end(&self, session: Uuid, hook: EndHook) {
        self.end_hooks.lock().insert(session, hook);
    }

    /// Deletes the Daily rooms of ended sessions through `remover` from now on (set once;
    /// later calls are ignored).
    pub fn set_room_remover(&self, remover: Arc<dyn RoomRemover>) {
        let _ = self.rooms.set(remover);
    }

    /// Deletes `room`, the Daily room of `org`'s session `session`, once the session ends
    /// here: its end recorded by this process, or its start failed (an end hook). A session
    /// that outlives this process has the room in its record, and whichever process records
    /// its end deletes it ([`Supervisor::room_ended`]).
    pub fn watch_room(&self, org: &str, session: Uuid, room: &crate::model::SessionRoom) {
        let (me, org, room) = (self.this.clone(), org.to_string(), room.clone());
        self.on_session_end(
            session,
            Box::new(move |started| {
                if let Some(me) = me.upgrade() {
                    me.room_ended(&org, session, &room, started);
                }
            }),
        );
    }

    /// `org`'s session `session` has ended (`started`: it reached its agent): its room goes,
    /// unless it is kept; a room kept for a session that never started would serve nobody.
    pub(super) fn room_ended(
        &self,
        org: &str,
        session: Uuid,
        room: &crate::model::SessionRoom,
        started: bool,
    ) {
        if room.keep && started {
            return;
        }
        match self.rooms.get() {
            Some(r) => r.remove(org, session, &room.name),
            None => tracing::warn!(session = %session, room = %room.name,
                "no Daily client to delete the session's room with"),
        }
    }

    /// [`Supervisor::room_ended`] for stored session `s`, whose end this process has just
    /// recorded.
    pub(super) fn record_ended(&self, s: &SessionRecord) {
        if let Some(room) = &s.daily_room {
            self.room_ended(&s.org, s.id, room, s.bot_start_ms.is_some());
        }
    }

    /// Sends session and deployment events to `sink` from now on (set once; later calls are
    /// ignored).
    pub fn set_event_sink(&self, sink: Arc<dyn crate::core::webhooks::EventSink>) {
        let _ = self.events.set(sink);
    }

    /// Reports an event of `org`, if anyone listens.
    pub(super) fn emit(&self, org: &str, event_type: &'static str, data: serde_json::Value) {
        if let Some(s) = self.events.get() {
            s.emit(org, event_type, data);
        }
    }

    /// Reports `deployment.ready` (`failure` `None`) or `deployment.failed` for a deployment
    /// of `agent`, once per deployment: once per run here, and once in the store across
    /// nodes and restarts ([`crate::core::webhooks::EventSink::emit_once`]).
    pub(super) fn announce_deployment(
        &self,
        agent: &AgentRecord,
        deployment: Uuid,
        failure: Option<&str>,
    ) {
        if self.events.get().is_none() || !self.announced.lock().insert(deployment) {
            return;
        }
        let mut data = serde_json::json!({
            "deployment_id": deployment,
            "service_id": agent.id,
            "service_name": agent.name,
        });
        let kind = match failure {
            None => "deployment.ready",
            Some(reason) => {
                data["reason"] = serde_json::Value::String(reason.to_string());
                "deployment.failed"
            }
        };
        if let Some(s) = self.events.get() {
            s.emit_once(&agent.org, kind, &deployment.to_string(), data);
        }
    }

    /// What follows every recorded end of a session that no instance watched (a websocket
    /// session that never got its client, a stop or a restart that found no instance): the
    /// metric and `session.ended`, as an instance's end reports them. The agent's id is
    /// looked up by name when not given.
    pub(super) fn session_end_recorded(
        &self,
        org: &str,
        agent: (Option<Uuid>, &str),
        deployment: Option<Uuid>,
        session: Uuid,
        end: &crate::model::SessionEnd,
    ) {
        crate::telemetry::session_ended(org, agent.1, end.reason.as_str());
        let agent_id = agent.0.or_else(|| {
            self.state
                .lock()
                .by_name
                .get(&(org.to_string(), agent.1.to_string()))
                .copied()
        });
        self.announce_session_end(org, (agent_id, agent.1), deployment, session, end);
    }

    /// Reports `session.ended` for session `session` of `org`'s agent `agent` (id, name).
    pub(super) fn announce_session_end(
        &self,
        org: &str,
        agent: (Option<Uuid>, &str),
        deployment: Option<Uuid>,
        session: Uuid,
        end: &crate::model::SessionEnd,
    ) {
        let state = crate::model::EndState::of(Some(end));
        self.emit(
            org,
            "session.ended",
            serde_json::json!({
                "session_id": session,
                "service_id": agent.0,
                "service_name": agent.1,
                "deployment_id": deployment,
                "end_state": state.as_str(),
                "end_reason": end.reason.as_str(),
                "completion_status": end.completion_status,
                "exit_code": end.exit_code,
                "ended_at": crate::model::iso_ms(end.ended_ms),
            }),
        );
    }

    /// Runs and forgets `session`'s end hook, if it still has one.
    pub fn run_end_hook(&self, session: Uuid, started: bool) {
        let hook = self.end_hooks.lock().remove(&session);
        if let Some(h) = hook {
            h(started);
        }
    }

    /// The Daily API key, if configured.
    pub fn daily_api_key(&self) -> Option<String> {
        self.cfg.daily_api_key.clone()
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `--on-stop detach`: the instances are left to the next server on the data dir, so this
    /// process makes none any more (no warm refill after a session it still relays ends);
    /// those it runs go on, and stay the next server's to re-adopt.
    pub fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    /// [`Supervisor::check_startable`], and that the agent is not crash-looping nor at
    /// `maxAgents` on this node right now (`admission::precheck`): for a start with costly work
    /// before its admission (a Daily room). Errors as [`Supervisor::start_session`].
    pub fn check_admissible(&self, org: &str, name: &str) -> CoreResult<()> {
        self.check_startable(org, name)?;
        let st = self.state.lock();
        let Some(p) = st
            .by_name
            .get(&(org.to_string(), name.to_string()))
            .and_then(|id| st.pools.get(id))
        else {
            return Err(CoreError::NotFound(format!("agent {name} not found")));
        };
        admission::precheck(p, name, Instant::now())
    }

    /// Checks that `org`'s agent `name` could take a session now (exists, deployment valid,
    /// not draining) without starting one. Errors as [`Supervisor::start_session`].
    pub fn check_startable(&self, org: &str, name: &str) -> CoreResult<()> {
        if self.is_draining() {
            return Err(CoreError::Draining);
        }
        if self.is_fenced() {
            return Err(CoreError::Fenced);
        }
        let st = self.state.lock();
        let p = st
            .by_name
            .get(&(org.to_string(), name.to_string()))
            .and_then(|id| st.pools.get(id))
            .filter(|p| p.agent.deleted_ms.is_none())
            .ok_or_else(|| CoreError::NotFound(format!("agent {name} not found")))?;
        if let Some(e) = p.serving_error() {
            return Err(CoreError::DeploymentNotReady(format!(
                "deployment {} of agent {name} is not ready: {e}",
                p.deployment.id
            )));
        }
        Ok(())
    }

    /// The deployment a session started now on the agent runs here (admission takes only
    /// its instances): the current one, or the previous one during a rollout.
    pub fn current_deployment(&self, org: &str, name: &str) -> Option<Uuid> {
        let st = self.state.lock();
        let id = st.by_name.get(&(org.to_string(), name.to_string()))?;
        Some(st.pools.get(id)?.serving().id)
    }

    /// The `maxSessionDuration` (s) of the deployment a session started now runs.
    pub fn max_session_seconds(&self, org: &str, name: &str) -> Option<u32> {
        let st = self.state.lock();
        let id = st.by_name.get(&(org.to_string(), name.to_string()))?;
        Some(st.pools.get(id)?.serving().spec.max_session_duration_s())
    }

    /// The agent's `keepDailyRooms` (`None` when unset: the org decides).
    pub fn keep_daily_rooms(&self, org: &str, name: &str) -> Option<bool> {
        let st = self.state.lock();
        let id = st.by_name.get(&(org.to_string(), name.to_string()))?;
        st.pools.get(id)?.deployment.spec.keep_daily_rooms
    }

    /// The agent's `websocketAuth` (`None` when unset; the default is `token`).
    pub fn websocket_auth(&self, org: &str, name: &str) -> Option<String> {
        let st = self.state.lock();
        let id = st.by_name.get(&(org.to_string(), name.to_string()))?;
        st.pools.get(id)?.deployment.spec.websocket_auth.clone()
    }

    /// Address of the instance running `org`'s session `session` of agent `name`, from memory
    /// alone: `Some` only when the session is live, delivered (busy) and belongs to that org
    /// and agent. The session proxy's fast path: `None` sends it to the store's answer.
    pub fn running_session_addr(&self, org: &str, name: &str, session: Uuid) -> Option<SocketAddr> {
        let st = self.state.lock();
        let ctl = st.sessions.get(&session)?;
        let agent = st.by_name.get(&(org.to_string(), name.to_string()))?;
        if ctl.org != org || ctl.agent_id != *agent || ctl.state() != InstState::Busy {
            return None;
        }
        if *ctl.done.borrow() {
            return None;
        }
        ctl.instance.get().map(|i| i.endpoint())
    }

    /// Whether a session is live on this node (starting or running here).
    pub fn serves(&self, session: Uuid) -> bool {
        self.state.lock().sessions.contains_key(&session)
    }

    /// Address of a live session's instance, waiting (up to `wait`) while the instance is
    /// still starting. `None` when the session is not live (ended or unknown).
    pub async fn session_addr(&self, session: Uuid, wait: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + wait;
        loop {
            let ctl = self.state.lock().sessions.get(&session).cloned()?;
            if ctl.state() == InstState::Busy {
                if let Some(i) = ctl.instance.get() {
                    return Some(i.endpoint());
                }
            }
            if *ctl.done.borrow() || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Why a deployment cannot run here, or `None` when it can (the runtime's deploy-time
    /// validation, [`Runtime::validate`]).
    pub fn validate(&self, dep: &DeploymentRecord) -> Option<String> {
        self.runtime.validate(dep)
    }

    /// Registers or refreshes an agent after create/update, then reconciles its pool.
    pub fn upsert_agent(self: &Arc<Self>, agent: AgentRecord, dep: DeploymentRecord) {
        let deploy_error = self.validate(&dep);
        let recheck = deploy_error.is_some() && self.runtime.deploy_error_may_clear(&dep);
        let id = agent.id;
        let (announce_agent, dep_id) = (agent.clone(), dep.id);
        let mut new_deployment = true;
        let min_here = self.cluster_view().share(agent.min_agents);
        {
            let mut st = self.state.lock();
            st.by_name
                .insert((agent.org.clone(), agent.name.clone()), id);
            match st.pools.get_mut(&id) {
                Some(p) => {
                    new_deployment = p.deployment.id != dep.id;
                    if new_deployment {
                        p.redeploy(Arc::new(dep), deploy_error.clone(), min_here);
                    } else {
                        // Checked again even for the same deployment: a redeploy after
                        // fixing the environment (say, creating the bot's `.venv`) makes it
                        // ready.
                        p.deploy_error = deploy_error.clone();
                    }
                    p.recheck = recheck;
                    p.agent = agent;
                }
                None => {
                    let mut p = AgentPool::new(agent, Arc::new(dep), deploy_error.clone());
                    p.recheck = recheck;
                    st.pools.insert(id, p);
                }
            }
        }
        match &deploy_error {
            // Not final yet: announced once it passes or fails for good.
            Some(_) if recheck => {}
            Some(e) => self.announce_deployment(&announce_agent, dep_id, Some(e)),
            // Nothing to start: ready now. Otherwise its first ready instance says so.
            None if new_deployment && announce_agent.min_agents == 0 => {
                self.announce_deployment(&announce_agent, dep_id, None)
            }
            None => {}
        }
        self.reconcile(id);
    }

    /// Marks an agent deleted: no new sessions; running sessions go on; idle instances go.
    pub fn remove_agent(self: &Arc<Self>, agent_id: Uuid) {
        {
            let mut st = self.state.lock();
            let Some(p) = st.pools.get_mut(&agent_id) else {
                return;
            };
            p.agent.deleted_ms = Some(now_ms());
            let key = (p.agent.org.clone(), p.agent.name.clone());
            if st.by_name.get(&key) == Some(&agent_id) {
                st.by_name.remove(&key);
            }
        }
        self.reconcile(agent_id);
    }

    /// Ids of the live (not deleted) agents this node knows.
    pub fn agent_ids(&self) -> Vec<Uuid> {
        let st = self.state.lock();
        st.pools
            .iter()
            .filter(|(_, p)| p.agent.deleted_ms.is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Pool snapshot for status.
    pub fn pool_status(&self, agent_id: Uuid) -> PoolStatus {
        let st = self.state.lock();
        let Some(p) = st.pools.get(&agent_id) else {
            return PoolStatus::default();
        };
        let dep = p.deployment.id;
        let mut s = PoolStatus {
            health: p.health.get(&dep).cloned().unwrap_or_default(),
            deploy_error: p.deploy_error.clone(),
            total: p.instances.len() as u32,
            previous: p.previous.as_ref().map(|d| PreviousStatus {
                deployment_id: d.id,
                created_ms: d.created_ms,
                health: p.health.get(&d.id).cloned().unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        };
        for c in p.instances.values() {
            let state = c.state();
            match state {
                InstState::Starting | InstState::Claimed if c.deployment.id == dep => {
                    s.starting += 1
                }
                InstState::Idle if c.deployment.id == dep => s.idle += 1,
                InstState::Busy => s.busy += 1,
                _ => {}
            }
            if let Some(prev) = s
                .previous
                .as_mut()
                .filter(|v| v.deployment_id == c.deployment.id)
            {
                match state {
                    InstState::Starting | InstState::Claimed => prev.starting += 1,
                    InstState::Idle => prev.idle += 1,
                    InstState::Busy => prev.busy += 1,
                    InstState::Ending => {}
                }
            }
        }
        s
    }

    /// Instances of this node not yet gone, and of them those serving a session (for the
    /// node's heartbeat, `core::cluster`).
    pub fn instance_counts(&self) -> (u32, u32) {
        let st = self.state.lock();
        let mut n = (0, 0);
        for c in st.pools.values().flat_map(|p| p.instances.values()) {
            n.0 += 1;
            if matches!(c.state(), InstState::Busy) {
                n.1 += 1;
            }
        }
        n
    }

    /// Resource samples of a running session so far (`None` when it is not running here).
    pub fn live_samples(&self, session: Uuid) -> Option<Vec<MetricSample>> {
        let ctl = self.state.lock().sessions.get(&session).cloned()?;
        let samples = ctl.samples.lock().clone();
        Some(samples)
    }

    /// `(org, session)` each time a session's record changes: once stored, once delivered,
    /// once its end is recorded (or its start failed). For live views (the dashboard's event
    /// stream, `api::events`); a watcher that lags reads [`Supervisor::live_sessions`] again.
    pub fn session_changes(&self) -> broadcast::Receiver<(String, Uuid)> {
        self.changes.subscribe()
    }

    fn session_changed(&self, org: &str, session: Uuid) {
        // No watcher is fine.
        let _ = self.changes.send((org.to_string(), session));
    }

    /// `org`'s live sessions whose record is stored.
    pub fn live_sessions(&self, org: &str) -> Vec<Uuid> {
        let st = self.state.lock();
        st.sessions
            .iter()
            .filter(|(_, c)| c.org == org && c.session_stored.load(Ordering::SeqCst))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The stop grace of an instance: its agent's `stopGraceSeconds`, else the default.
    fn grace(&self, dep: &DeploymentRecord) -> Duration {
        dep.spec
            .stop_grace_seconds
            .map(|s| Duration::from_secs_f64(s.max(0.0)))
            .unwrap_or(self.cfg.default_stop_grace)
    }

    fn platform_log(&self, ctl: &InstanceCtl, line: String) {
        let a = ctl.attribution.lock().clone();
        let _ = self.logs.send(LogLine {
            org: a.org,
            agent_id: a.agent_id,
            deployment_id: Some(a.deployment_id),
            session_id: a.session_id,
            instance_id: Some(a.instance_id),
            ts_ns: crate::model::now_ns(),
            stream: "platform",
            line,
        });
    }

    fn publish_live(&self, st: &State) {
        self.live.send_replace(st.sessions.len());
    }
}
