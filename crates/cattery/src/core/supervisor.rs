//! The session lifecycle: warm pool, capacity, delivery, one terminal state, cleanup.
//!
//! Every instance is driven by one task (its *actor*, [`Supervisor::run_instance`]) that owns
//! every decision about it. Whatever happens first, a stop, the agent's answer to `/bot`, the
//! process exiting, the time limit, a start timeout, decides the session's end; the actor then
//! runs the one cleanup path (SIGTERM, stop grace, SIGKILL, wait until the tree is empty,
//! remove cgroup, files and port), frees the capacity slot, records the end (first wins in
//! the store as well), and refills the warm pool. One instance serves at most one session.
//!
//! Capacity: every instance of an agent that is not yet gone (starting, idle, busy, ending)
//! counts against `maxAgents`, so the cap bounds real processes (reference §B.4). A start
//! takes a ready warm instance (`coldStart: false`), else a warm instance that is still
//! starting and not yet promised to anyone, else starts a new one below `maxAgents`
//! (both `coldStart: true`), else answers 429 at once.
//!
//! Order of the cleanup path, chosen so that no observer sees a state that is not yet true:
//! the tree is gone (terminate returns) -> the capacity slot is free -> the end is recorded
//! (first end wins, also in the store) -> the session leaves the live set -> waiters (a
//! `DELETE`, a pending start) are answered -> the pool is refilled. See `docs/lifecycle.md`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use super::instance_http::{self, BotOutcome, Deliver, OutcomeFuture};
use super::{CoreError, CoreResult};
use crate::model::{
    iso_ms, now_ms, profile_limits, AgentRecord, DeploymentRecord, EndReason, InstanceRecord,
    LogLine, MetricSample, SessionEnd, SessionRecord,
};
use crate::runtime::{ExitInfo, Instance, InstanceSpec, LogAttribution, LogSink, Runtime};
use crate::store::Store;

/// Consecutive failed starts after which a deployment counts as crash-looping.
pub const CRASH_LOOP_THRESHOLD: u32 = 2;
/// How often a starting instance's `/readyz` is polled, at most. The first polls come sooner
/// (see [`FIRST_READY_POLL`]).
pub const READY_POLL: Duration = Duration::from_millis(5);
/// Wait before the second `/readyz` poll of a starting instance; it doubles up to
/// [`READY_POLL`] (polls at about 0, 1, 3, 7, 12, 17, 22... ms). A native agent is ready
/// within a few ms of its spawn: with a flat 10 ms it almost always waited one whole
/// interval, most of the cold start overhead.
pub const FIRST_READY_POLL: Duration = Duration::from_millis(1);
/// How often an idle warm instance's `/readyz` is checked; a non-200 answer replaces it.
pub const IDLE_CHECK: Duration = Duration::from_secs(2);

/// Supervisor settings (from `cattery serve` flags).
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Stop grace used when the agent sets none (`--stop-grace-seconds`, default 5 s).
    pub default_stop_grace: Duration,
    /// How long an instance may take to answer `/readyz` with 200 (`--start-timeout-seconds`, default 60 s).
    pub start_timeout: Duration,
    /// Python interpreter for `local:` agents when neither the agent nor the bot dir names one.
    pub python: String,
    /// Path of the bundled Python runner.
    pub runner_path: PathBuf,
    /// Daily API key, needed for `createDailyRoom`.
    pub daily_api_key: Option<String>,
    /// Resource sampling interval (default 5 s).
    pub metrics_interval: Duration,
}

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

/// Program, arguments, working directory and extra environment of an instance.
type InstanceCommand = (String, Vec<String>, Option<PathBuf>, Vec<(String, String)>);

/// Lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstState {
    /// Process started, not yet ready.
    Starting,
    /// A warm instance still starting that a session has claimed (it gets the session as
    /// soon as it is ready; never trimmed, never taken by another start).
    Claimed,
    /// Ready and waiting for a session (warm).
    Idle,
    /// Serving a session (or about to).
    Busy,
    /// Being removed.
    Ending,
}

/// A recent failed start, shown in agent status.
#[derive(Debug, Clone)]
pub struct StartFailure {
    /// `exited`, `start_timeout`, `spawn_failed`.
    pub reason: &'static str,
    /// Exit of the main process, if it exited.
    pub exit: Option<ExitInfo>,
    /// Last lines of stderr.
    pub stderr_tail: String,
    /// When (ms).
    pub at_ms: i64,
}

/// Health of one deployment.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Some instance of it answered `/readyz` with 200 once.
    pub ever_ready: bool,
    /// Failed starts since the last successful one.
    pub consecutive_failures: u32,
    /// All failed starts.
    pub restarts: u32,
    /// Most recent failure.
    pub last_failure: Option<StartFailure>,
    backoff_until: Option<Instant>,
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
}

enum Cmd {
    Assign(Delivery),
    Stop(EndReason),
}

struct Delivery {
    session: Uuid,
    body: Bytes,
    deliver: Option<Deliver>,
    headers: Vec<(String, String)>,
    requested: Instant,
    deadline: Instant,
    reply: Option<oneshot::Sender<CoreResult<i64>>>,
    /// The instance's durable record already names this session (a warm start records the
    /// session and the promise in one write, `Store::insert_session_for_instance`).
    recorded: bool,
}

struct InstanceCtl {
    id: Uuid,
    org: String,
    agent_id: Uuid,
    deployment: Arc<DeploymentRecord>,
    state: Mutex<InstState>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    done: watch::Receiver<bool>,
    attribution: Arc<Mutex<LogAttribution>>,
    samples: Mutex<Vec<MetricSample>>,
    instance: OnceLock<Arc<dyn Instance>>,
    /// The session promised to this instance is stored (its `insert` returned): from then
    /// on a `DELETE` of it is answered from memory (`stop_session`).
    session_stored: AtomicBool,
}

struct AgentPool {
    agent: AgentRecord,
    deployment: Arc<DeploymentRecord>,
    deploy_error: Option<String>,
    instances: HashMap<Uuid, Arc<InstanceCtl>>,
    health: HashMap<Uuid, Health>,
}

#[derive(Default)]
struct State {
    pools: HashMap<Uuid, AgentPool>,
    by_name: HashMap<(String, String), Uuid>,
    sessions: HashMap<Uuid, Arc<InstanceCtl>>,
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
    /// Extra headers for `/bot` (room url and token).
    pub extra_headers: Vec<(String, String)>,
    /// Resolves when the client that asked for the session has gone away (the websocket
    /// transport's client dropped while its instance was starting). If it resolves before
    /// the session is delivered, the start is cancelled: the instance goes through the cleanup
    /// path and the session is recorded with `endReason: client_disconnected`. Never
    /// resolving is fine.
    pub client_gone: Option<ClientGone>,
}

/// An instance found again after a restart: the instance, and its live session with that
/// session's deadline (`None`: a warm instance).
type Adopted = (Arc<dyn Instance>, Option<(Uuid, Instant)>);

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

/// Why the actor ends an instance.
struct Ending {
    reason: EndReason,
    completion: String,
    message: Option<String>,
    exit: Option<ExitInfo>,
    start_error: Option<(&'static str, String)>,
}

impl Ending {
    fn new(reason: EndReason, completion: &str) -> Self {
        Ending {
            reason,
            completion: completion.into(),
            message: None,
            exit: None,
            start_error: None,
        }
    }
}

/// The session supervisor. One per server.
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
    live: watch::Sender<usize>,
    secrets: Arc<dyn SecretSource>,
}

impl Supervisor {
    /// Creates the supervisor. `logs` receives captured and platform log lines; `secrets`
    /// gives instances their deployment's bound secrets.
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<dyn Runtime>,
        cfg: SupervisorConfig,
        logs: mpsc::UnboundedSender<LogLine>,
        secrets: Arc<dyn SecretSource>,
    ) -> Arc<Self> {
        let sup = Arc::new(Supervisor {
            store,
            runtime,
            cfg,
            state: Mutex::new(State::default()),
            logs,
            draining: AtomicBool::new(false),
            recovered: AtomicBool::new(false),
            live: watch::channel(0).0,
            secrets,
        });
        let weak = Arc::downgrade(&sup);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                let ids: Vec<Uuid> = s.state.lock().pools.keys().copied().collect();
                for id in ids {
                    s.reconcile(id);
                }
            }
        });
        sup
    }

    /// The runtime in use.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    /// Default stop grace.
    pub fn default_stop_grace(&self) -> Duration {
        self.cfg.default_stop_grace
    }

    /// The Daily API key, if configured.
    pub fn daily_api_key(&self) -> Option<String> {
        self.cfg.daily_api_key.clone()
    }

    /// Checks that `org`'s agent `name` could take a session now (exists, deployment valid,
    /// not draining) without starting one. Errors as [`Supervisor::start_session`].
    pub fn check_startable(&self, org: &str, name: &str) -> CoreResult<()> {
        if self.is_draining() {
            return Err(CoreError::Draining);
        }
        let st = self.state.lock();
        let p = st
            .by_name
            .get(&(org.to_string(), name.to_string()))
            .and_then(|id| st.pools.get(id))
            .filter(|p| p.agent.deleted_ms.is_none())
            .ok_or_else(|| CoreError::NotFound(format!("agent {name} not found")))?;
        if let Some(e) = &p.deploy_error {
            return Err(CoreError::DeploymentNotReady(format!(
                "deployment {} of agent {name} is not ready: {e}",
                p.deployment.id
            )));
        }
        Ok(())
    }

    /// The agent's `websocketAuth` (`None` when unset; the default is `token`).
    pub fn websocket_auth(&self, org: &str, name: &str) -> Option<String> {
        let st = self.state.lock();
        let id = st.by_name.get(&(org.to_string(), name.to_string()))?;
        st.pools.get(id)?.deployment.spec.websocket_auth.clone()
    }

    /// Loopback port of a live session's instance, waiting (up to `wait`) while the instance is
    /// still starting. `None` when the session is not live (ended or unknown).
    pub async fn session_port(&self, session: Uuid, wait: Duration) -> Option<u16> {
        let deadline = Instant::now() + wait;
        loop {
            let ctl = self.state.lock().sessions.get(&session).cloned()?;
            if *ctl.state.lock() == InstState::Busy {
                if let Some(i) = ctl.instance.get() {
                    return Some(i.port());
                }
            }
            if *ctl.done.borrow() || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Why a deployment cannot run here, or `None` when it can (deploy-time validation:
    /// for `command`, the program exists and is executable).
    ///
    /// For `local:` agents it also checks that the chosen Python can import what the bundled
    /// runner needs (`fastapi`, `uvicorn`), so a bot environment without them is reported at
    /// deploy time (`errors[]`, `ready: false`) rather than at the first session.
    pub fn validate(&self, dep: &DeploymentRecord) -> Option<String> {
        match self.instance_command(dep) {
            Ok((program, _, wd, _)) => {
                let wd = wd.as_ref().and_then(|p| p.to_str());
                if let Err(e) = self.runtime.check_program(&program, wd) {
                    return Some(e);
                }
                let local = dep.spec.command.is_none()
                    && dep
                        .spec
                        .image
                        .as_deref()
                        .is_some_and(|i| i.starts_with("local:"));
                if local {
                    return python_runner_deps_missing(&program);
                }
                None
            }
            Err(e) => Some(e),
        }
    }

    /// Program, arguments, working directory and extra env for a deployment.
    fn instance_command(&self, dep: &DeploymentRecord) -> Result<InstanceCommand, String> {
        let spec = &dep.spec;
        if let Some(cmd) = &spec.command {
            let (p, a) = cmd.split_first().ok_or("command is empty")?;
            return Ok((
                p.clone(),
                a.to_vec(),
                spec.working_dir.as_ref().map(PathBuf::from),
                vec![],
            ));
        }
        match spec.image.as_deref() {
            Some(img) if img.starts_with("local:") => {
                let dir = PathBuf::from(&img["local:".len()..]);
                if !dir.join("bot.py").is_file() {
                    return Err(format!("{} has no bot.py", dir.display()));
                }
                let venv = dir.join(".venv/bin/python");
                let python = spec
                    .python
                    .clone()
                    .or_else(|| venv.is_file().then(|| venv.display().to_string()))
                    .unwrap_or_else(|| self.cfg.python.clone());
                Ok((
                    python,
                    vec![self.cfg.runner_path.display().to_string()],
                    Some(dir.clone()),
                    vec![
                        ("CATTERY_BOT_DIR".into(), dir.display().to_string()),
                        ("PYTHONUNBUFFERED".into(), "1".into()),
                    ],
                ))
            }
            Some(img) => Err(format!(
                "image {img} needs a container runtime; this server runs the process runtime \
                 (use \"command\", or \"image\": \"local:<dir with bot.py>\")"
            )),
            None => Err("neither command nor image is set".into()),
        }
    }

    /// Registers or refreshes an agent after create/update, then reconciles its pool.
    pub fn upsert_agent(self: &Arc<Self>, agent: AgentRecord, dep: DeploymentRecord) {
        let deploy_error = self.validate(&dep);
        let id = agent.id;
        {
            let mut st = self.state.lock();
            st.by_name
                .insert((agent.org.clone(), agent.name.clone()), id);
            match st.pools.get_mut(&id) {
                Some(p) => {
                    if p.deployment.id != dep.id {
                        p.deployment = Arc::new(dep);
                    }
                    // Checked again even for the same deployment: a redeploy after fixing
                    // the environment (say, creating the bot's `.venv`) makes it ready.
                    p.deploy_error = deploy_error;
                    p.agent = agent;
                }
                None => {
                    st.pools.insert(
                        id,
                        AgentPool {
                            agent,
                            deployment: Arc::new(dep),
                            deploy_error,
                            instances: HashMap::new(),
                            health: HashMap::new(),
                        },
                    );
                }
            }
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
            ..Default::default()
        };
        for c in p.instances.values() {
            match *c.state.lock() {
                InstState::Starting | InstState::Claimed if c.deployment.id == dep => {
                    s.starting += 1
                }
                InstState::Idle if c.deployment.id == dep => s.idle += 1,
                InstState::Busy => s.busy += 1,
                _ => {}
            }
        }
        s
    }

    /// Resource samples of a running session so far (`None` when it is not running here).
    pub fn live_samples(&self, session: Uuid) -> Option<Vec<MetricSample>> {
        let ctl = self.state.lock().sessions.get(&session).cloned()?;
        let samples = ctl.samples.lock().clone();
        Some(samples)
    }

    /// Starts a session on `org`'s agent `agent_name`: takes a ready warm instance, else a
    /// warm instance that is still starting, else starts a new one below `maxAgents`; delivers
    /// the session (`POST /bot`, or [`StartParams::deliver`]) and answers once it is delivered.
    ///
    /// Errors: `NotFound` (no such live agent), `DeploymentNotReady`, `AtCapacity` (429, at
    /// once), `Draining` (503, also for a start still in flight when the drain stops it),
    /// `StartFailed` (`INSTANCE_EXITED`, `START_TIMEOUT` (504), `AGENT_CRASH_LOOP`,
    /// `SPAWN_FAILED`, `DELIVERY_FAILED`), `StoppedDuringStart` (a `DELETE` or the client
    /// going away before delivery).
    pub async fn start_session(
        self: &Arc<Self>,
        org: &str,
        agent_name: &str,
        p: StartParams,
    ) -> CoreResult<StartOutcome> {
        let requested = Instant::now();
        let created_ms = now_ms();
        let session = p.session_id.unwrap_or_else(Uuid::new_v4);
        // `Some(false)`: a ready warm instance; `Some(true)`: a claimed starting one; `None`: new.
        let (ctl, cold, agent_id, via_cmd) = {
            let mut st = self.state.lock();
            // Checked under the state lock: the drain sets the flag under it too, so a start
            // either sees the drain or is seen by it (never a half-created instance).
            if self.is_draining() {
                return Err(CoreError::Draining);
            }
            let agent_id = *st
                .by_name
                .get(&(org.to_string(), agent_name.to_string()))
                .ok_or_else(|| CoreError::NotFound(format!("agent {agent_name} not found")))?;
            let pool = st
                .pools
                .get_mut(&agent_id)
                .ok_or_else(|| CoreError::NotFound(format!("agent {agent_name} not found")))?;
            if pool.agent.deleted_ms.is_some() {
                return Err(CoreError::NotFound(format!("agent {agent_name} not found")));
            }
            if let Some(e) = &pool.deploy_error {
                return Err(CoreError::DeploymentNotReady(format!(
                    "deployment {} of agent {agent_name} is not ready: {e}",
                    pool.deployment.id
                )));
            }
            let dep = pool.deployment.clone();
            let h = pool.health.entry(dep.id).or_default();
            if h.consecutive_failures >= CRASH_LOOP_THRESHOLD
                && h.backoff_until.is_some_and(|b| Instant::now() < b)
            {
                let f = h.last_failure.clone();
                return Err(CoreError::StartFailed {
                    code: "AGENT_CRASH_LOOP",
                    message: format!(
                        "agent {agent_name} is crash-looping: {} failed starts in a row, last: {} ({}){}",
                        h.consecutive_failures,
                        f.as_ref().map(|f| f.reason).unwrap_or("unknown"),
                        f.as_ref().and_then(|f| f.exit).map(|e| e.describe()).unwrap_or_default(),
                        f.as_ref()
                            .filter(|f| !f.stderr_tail.is_empty())
                            .map(|f| format!("; stderr: {}", f.stderr_tail.trim()))
                            .unwrap_or_default()
                    ),
                });
            }
            let take = |want: InstState, to: InstState| {
                pool.instances
                    .values()
                    .find(|c| {
                        c.deployment.id == dep.id && {
                            let mut s = c.state.lock();
                            let ok = *s == want
                                && (want != InstState::Starting
                                    || c.attribution.lock().session_id.is_none());
                            if ok {
                                *s = to;
                            }
                            ok
                        }
                    })
                    .cloned()
            };
            let found = match take(InstState::Idle, InstState::Busy) {
                Some(c) => Some((c, false)),
                None => take(InstState::Starting, InstState::Claimed).map(|c| (c, true)),
            };
            let (ctl, cold, via_cmd) = match found {
                Some((c, cold)) => (c, cold, true),
                None => {
                    if pool.instances.len() as u32 >= pool.agent.max_agents {
                        return Err(CoreError::AtCapacity(agent_name.to_string()));
                    }
                    let c = self.new_ctl(&pool.agent, dep, InstState::Starting, None);
                    pool.instances.insert(c.id, c.clone());
                    (c, true, false)
                }
            };
            // Promised to this session from now on (also marks a starting instance as taken).
            ctl.attribution.lock().session_id = Some(session);
            st.sessions.insert(session, ctl.clone());
            self.live.send_replace(st.sessions.len());
            (ctl, cold, agent_id, via_cmd)
        };
        let dep = ctl.deployment.clone();
        let rec = SessionRecord {
            id: session,
            org: org.to_string(),
            agent_id,
            deployment_id: dep.id,
            created_ms,
            updated_ms: created_ms,
            bot_start_ms: None,
            cold_start: Some(cold),
            transport: p.transport.clone(),
            end: None,
            samples: Vec::new(),
        };
        // A ready warm instance is already recorded: the session and the instance's promise
        // to it go in one write. Otherwise (or if its record was missing) the actor records
        // the instance with its session before delivering.
        let inserted = if via_cmd && !cold {
            self.store.insert_session_for_instance(&rec, ctl.id).await
        } else {
            self.store.insert_session(&rec).await.map(|()| false)
        };
        let recorded = match inserted {
            Ok(r) => r,
            Err(e) => {
                {
                    let mut st = self.state.lock();
                    st.sessions.remove(&session);
                    self.live.send_replace(st.sessions.len());
                }
                if via_cmd {
                    // Give the instance back: it has not been told about the session yet.
                    ctl.attribution.lock().session_id = None;
                    let mut s = ctl.state.lock();
                    *s = match *s {
                        InstState::Busy => InstState::Idle,
                        InstState::Claimed => InstState::Starting,
                        other => other,
                    };
                } else {
                    let (rx, done_tx) = self.take_cmd_rx(&ctl);
                    drop(rx);
                    let _ = done_tx.send(true);
                    if let Some(pool) = self.state.lock().pools.get_mut(&agent_id) {
                        pool.instances.remove(&ctl.id);
                    }
                }
                return Err(e.into());
            }
        };
        ctl.session_stored.store(true, Ordering::SeqCst);
        let max_s = dep.spec.max_session_duration_s();
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
            requested,
            deadline: requested + Duration::from_secs(u64::from(max_s)),
            reply: Some(tx),
            recorded,
        };
        if !via_cmd {
            let (cmd_rx, me) = (self.take_cmd_rx(&ctl), self.clone());
            tokio::spawn(me.run_instance(ctl.clone(), cmd_rx, Some(delivery), None));
        } else if let Err(mpsc::error::SendError(Cmd::Assign(mut d))) =
            ctl.cmd_tx.send(Cmd::Assign(delivery))
        {
            reply_err(&mut d, "the warm instance went away");
        }
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
                return Ok(StartOutcome {
                    session_id: session,
                    cold_start: cold,
                    bot_start_ms,
                })
            }
            Ok(Err(e)) => e,
            Err(_) => CoreError::StartFailed {
                code: "INSTANCE_EXITED",
                message: "the instance went away before the session was delivered".into(),
            },
        };
        // The instance's end was recorded before this answer; if it ended before the
        // session's row existed (a warm instance exiting just as it was taken), that record
        // missed the session: end it now (first wins, so otherwise this changes nothing).
        let end = SessionEnd {
            ended_ms: now_ms(),
            reason: match &err {
                CoreError::Draining => EndReason::Drained,
                CoreError::StoppedDuringStart(_) => EndReason::StoppedDuringStart,
                _ => EndReason::StartFailed,
            },
            completion_status: "HTTP_ERROR".into(),
            exit_code: None,
            exit_signal: None,
            message: Some(err.to_string()),
        };
        if let Err(e) = self.store.end_session(session, &end).await {
            tracing::error!(session = %session, error = %e, "could not record session end");
        }
        Err(err)
    }

    /// Stops a session (the seed contract): the whole instance is removed and the end recorded
    /// before this returns. A session that already ended is left as it is.
    ///
    /// Errors: `NotFound` when the session does not exist, or belongs to another org or agent.
    pub async fn stop_session(&self, org: &str, agent_name: &str, session: Uuid) -> CoreResult<()> {
        // A live, stored session is answered from memory: no store read before the stop is
        // sent. (One whose record is still being inserted takes the store path below, as an
        // unknown one.)
        let live = {
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
        };
        match live {
            Some((ctl, Some(true))) => {
                let _ = ctl.cmd_tx.send(Cmd::Stop(EndReason::Stopped));
                let mut done = ctl.done.clone();
                let _ = done.wait_for(|d| *d).await;
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
        let (_, rec) = super::lookup::session_of(&self.store, org, agent_name, session).await?;
        if rec.end.is_some() {
            return Ok(());
        }
        let ctl = self.state.lock().sessions.get(&session).cloned();
        match ctl {
            Some(ctl) => {
                let _ = ctl.cmd_tx.send(Cmd::Stop(EndReason::Stopped));
                let mut done = ctl.done.clone();
                let _ = done.wait_for(|d| *d).await;
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
                self.store.end_session(session, &end).await?;
            }
        }
        Ok(())
    }

    /// A new instance controller (id: a new one, or a recorded one when re-adopting). Its
    /// command receiver waits in `PENDING` until the actor takes it.
    fn new_ctl(
        &self,
        agent: &AgentRecord,
        dep: Arc<DeploymentRecord>,
        state: InstState,
        id: Option<Uuid>,
    ) -> Arc<InstanceCtl> {
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
                session_id: None,
            })),
            deployment: dep,
            state: Mutex::new(state),
            cmd_tx,
            done,
            samples: Mutex::new(Vec::new()),
            instance: OnceLock::new(),
            session_stored: AtomicBool::new(false),
        });
        PENDING.lock().insert(id, (cmd_rx, done_tx));
        ctl
    }

    fn take_cmd_rx(
        &self,
        ctl: &InstanceCtl,
    ) -> (mpsc::UnboundedReceiver<Cmd>, watch::Sender<bool>) {
        PENDING
            .lock()
            .remove(&ctl.id)
            .expect("command receiver taken once")
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

    fn record_failure(&self, ctl: &InstanceCtl, f: StartFailure) {
        let mut st = self.state.lock();
        if let Some(p) = st.pools.get_mut(&ctl.agent_id) {
            let h = p.health.entry(ctl.deployment.id).or_default();
            h.consecutive_failures += 1;
            h.restarts += 1;
            let n = h.consecutive_failures.min(6);
            h.backoff_until =
                Some(Instant::now() + Duration::from_millis(500 << n).min(Duration::from_secs(30)));
            h.last_failure = Some(f);
        }
    }

    fn record_ready(&self, ctl: &InstanceCtl) {
        let mut st = self.state.lock();
        if let Some(p) = st.pools.get_mut(&ctl.agent_id) {
            let h = p.health.entry(ctl.deployment.id).or_default();
            h.ever_ready = true;
            h.consecutive_failures = 0;
            h.backoff_until = None;
        }
    }

    async fn spawn_instance(
        &self,
        ctl: &InstanceCtl,
        session: Option<Uuid>,
    ) -> Result<Arc<dyn Instance>, String> {
        let (program, args, working_dir, mut env) = self.instance_command(&ctl.deployment)?;
        env.extend(
            ctl.deployment
                .spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        // The bound secret set's keys, from the deployment's snapshot (core::secrets).
        env.extend(self.secrets.env_for(&ctl.org, &ctl.deployment).await?);
        if let Some(s) = session {
            env.push(("CATTERY_SESSION_ID".into(), s.to_string()));
        }
        let spec = InstanceSpec {
            instance_id: ctl.id,
            program,
            args,
            working_dir,
            env,
            limits: profile_limits(&ctl.deployment.spec.agent_profile),
        };
        let sink = LogSink {
            tx: self.logs.clone(),
            attribution: ctl.attribution.clone(),
        };
        self.runtime
            .start(spec, sink)
            .await
            .map_err(|e| e.to_string())
    }

    async fn persist_instance(
        &self,
        ctl: &InstanceCtl,
        inst: &Arc<dyn Instance>,
        session: Option<Uuid>,
    ) {
        let pl = inst.record_parts();
        let rec = InstanceRecord {
            id: ctl.id,
            agent_id: ctl.agent_id,
            deployment_id: ctl.deployment.id,
            session_id: session,
            runtime: self.runtime.kind().to_string(),
            placement: serde_json::to_value(&pl).unwrap_or_default(),
            created_ms: now_ms(),
        };
        if let Err(e) = self.store.put_instance(&rec).await {
            tracing::error!(instance = %ctl.id, error = %e, "could not record instance");
        }
    }

    fn grace(&self, ctl: &InstanceCtl) -> Duration {
        ctl.deployment
            .spec
            .stop_grace_seconds
            .map(|s| Duration::from_secs_f64(s.max(0.0)))
            .unwrap_or(self.cfg.default_stop_grace)
    }

    /// The actor of one instance. See the module docs.
    ///
    /// `delivery`: the session a cold start is for. `adopted`: an instance found again after a
    /// restart, with its live (delivered) session and that session's deadline, or without one
    /// to be re-adopted as a warm instance.
    async fn run_instance(
        self: Arc<Self>,
        ctl: Arc<InstanceCtl>,
        (mut rx, done_tx): PendingRx,
        mut delivery: Option<Delivery>,
        adopted: Option<Adopted>,
    ) {
        let adopted_busy = adopted.as_ref().is_some_and(|a| a.1.is_some());
        let mut session: Option<(Uuid, Instant)> = adopted.as_ref().and_then(|a| a.1);
        if let Some(d) = &delivery {
            session = Some((d.session, d.deadline));
            ctl.attribution.lock().session_id = Some(d.session);
        }
        let inst = match adopted {
            Some((i, _)) => i,
            None => match self.spawn_instance(&ctl, session.map(|s| s.0)).await {
                Ok(i) => i,
                Err(e) => {
                    self.record_failure(
                        &ctl,
                        StartFailure {
                            reason: "spawn_failed",
                            exit: None,
                            stderr_tail: e.clone(),
                            at_ms: now_ms(),
                        },
                    );
                    let mut end = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
                    end.message = Some(e.clone());
                    end.start_error = Some(("SPAWN_FAILED", e));
                    self.finish(
                        &ctl,
                        None,
                        end,
                        session.map(|s| s.0),
                        delivery,
                        &mut rx,
                        done_tx,
                    )
                    .await;
                    return;
                }
            },
        };
        let _ = ctl.instance.set(inst.clone());
        let port = inst.port();
        // The session the instance's durable record names (re-adopted busy: its own).
        let mut recorded_session: Option<Uuid> = if adopted_busy {
            session.map(|s| s.0)
        } else {
            None
        };
        // The keep-alive connection of the `/readyz` answer that found the instance ready.
        let mut ready_conn: Option<instance_http::Conn> = None;
        let ending = 'life: {
            if !adopted_busy {
                self.persist_instance(&ctl, &inst, session.map(|s| s.0))
                    .await;
                recorded_session = session.map(|s| s.0);
                // Starting: wait for /readyz 200, a stop, an exit, or a deadline. A warm
                // instance may be claimed by a session meanwhile (it then gets the session as
                // soon as it is ready).
                let start_deadline = Instant::now() + self.cfg.start_timeout;
                // Ready = `/readyz` answers 200 *and* the listening socket is the instance's
                // own (a foreign program on the port must never be taken for the agent).
                // Resolves to the connection of the answer that found it ready, which then
                // carries `/bot` if the session comes soon (`instance_http::post_bot`).
                let ready = async {
                    let mut warned = false;
                    let mut wait = FIRST_READY_POLL;
                    loop {
                        let (status, conn) =
                            instance_http::get_status_keep(port, "/readyz", Duration::from_secs(2))
                                .await;
                        if status == Some(200) {
                            if inst.serves_port() {
                                return conn;
                            }
                            if !warned {
                                warned = true;
                                self.platform_log(&ctl, format!("[cattery] port {port} answers /readyz but is not held by instance {}; waiting for the agent", ctl.id));
                            }
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(READY_POLL);
                    }
                };
                tokio::pin!(ready);
                loop {
                    let session_deadline = session
                        .map(|s| s.1)
                        .unwrap_or(start_deadline + Duration::from_secs(1 << 30));
                    tokio::select! {
                        biased;
                        cmd = rx.recv() => match cmd {
                            Some(Cmd::Stop(r)) => {
                                let promised = session.is_some() || ctl.attribution.lock().session_id.is_some();
                                break 'life Ending::new(during_start(r, promised), "HTTP_ERROR");
                            }
                            Some(Cmd::Assign(mut d)) => {
                                if session.is_none() {
                                    session = Some((d.session, d.deadline));
                                    ctl.attribution.lock().session_id = Some(d.session);
                                    delivery = Some(d);
                                } else {
                                    reply_err(&mut d, "instance is already promised to another session");
                                }
                            }
                            None => {}
                        },
                        ex = inst.wait_exit() => {
                            let tail = tail_of(&inst);
                            self.record_failure(&ctl, StartFailure { reason: "exited", exit: Some(ex), stderr_tail: tail.clone(), at_ms: now_ms() });
                            let msg = format!("instance exited before it was ready ({}){}", ex.describe(),
                                if tail.is_empty() { String::new() } else { format!("; stderr: {}", tail.trim()) });
                            let mut e = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
                            e.exit = Some(ex);
                            e.message = Some(msg.clone());
                            e.start_error = Some(("INSTANCE_EXITED", msg));
                            break 'life e;
                        }
                        _ = tokio::time::sleep_until(start_deadline) => {
                            let tail = tail_of(&inst);
                            self.record_failure(&ctl, StartFailure { reason: "start_timeout", exit: None, stderr_tail: tail, at_ms: now_ms() });
                            let msg = format!("instance did not answer /readyz within {} s", self.cfg.start_timeout.as_secs_f64());
                            let mut e = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
                            e.message = Some(msg.clone());
                            e.start_error = Some(("START_TIMEOUT", msg));
                            break 'life e;
                        }
                        _ = tokio::time::sleep_until(session_deadline) => {
                            break 'life Ending::new(EndReason::MaxDuration, "HTTP_ERROR");
                        }
                        conn = &mut ready => {
                            ready_conn = conn;
                            break;
                        }
                    }
                }
                self.record_ready(&ctl);
                self.platform_log(
                    &ctl,
                    format!(
                        "[cattery] instance {} ready (pid {})",
                        ctl.id,
                        inst.record_parts().pid
                    ),
                );
                // Idle: wait for a session, a stop, an exit, or a failed health check. The
                // health check runs beside the command channel, so a slow `/readyz` never
                // delays a session or a stop.
                if delivery.is_none() {
                    {
                        let mut s = ctl.state.lock();
                        if *s == InstState::Starting {
                            *s = InstState::Idle;
                        }
                    }
                    let health = move || -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
                        Box::pin(async move {
                            tokio::time::sleep(IDLE_CHECK).await;
                            instance_http::get_status(port, "/readyz", Duration::from_secs(2)).await
                                == Some(200)
                        })
                    };
                    let mut check = health();
                    loop {
                        tokio::select! {
                            biased;
                            cmd = rx.recv() => match cmd {
                                Some(Cmd::Stop(r)) => {
                                    let promised = ctl.attribution.lock().session_id.is_some();
                                    break 'life Ending::new(during_start(r, promised), "HTTP_ERROR");
                                }
                                Some(Cmd::Assign(d)) => {
                                    session = Some((d.session, d.deadline));
                                    ctl.attribution.lock().session_id = Some(d.session);
                                    delivery = Some(d);
                                    break;
                                }
                                None => {}
                            },
                            ex = inst.wait_exit() => {
                                let tail = tail_of(&inst);
                                self.record_failure(&ctl, StartFailure { reason: "exited", exit: Some(ex), stderr_tail: tail.clone(), at_ms: now_ms() });
                                let mut e = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
                                e.exit = Some(ex);
                                let msg = format!("the warm instance exited ({})", ex.describe());
                                e.message = Some(msg.clone());
                                e.start_error = Some(("INSTANCE_EXITED", msg));
                                break 'life e;
                            }
                            ok = &mut check => {
                                if !ok {
                                    let mut s = ctl.state.lock();
                                    if *s == InstState::Idle {
                                        *s = InstState::Ending;
                                        drop(s);
                                        self.platform_log(&ctl, "[cattery] warm instance not ready; replacing it".into());
                                        break 'life Ending::new(EndReason::Error, "HTTP_ERROR");
                                    }
                                }
                                check = health();
                            }
                        }
                    }
                }
            }
            // Delivering, then busy.
            *ctl.state.lock() = InstState::Busy;
            let (sid, deadline) = session.expect("busy instance has a session");
            let mut bot: OutcomeFuture = Box::pin(std::future::pending());
            let mut _bot_task: Option<AbortOnDrop> = None;
            if let Some(mut d) = delivery.take() {
                // Durable before `/bot`: a restart must never hand this instance out as warm
                // once it may have received a session.
                if !d.recorded && recorded_session != Some(sid) {
                    self.persist_instance(&ctl, &inst, Some(sid)).await;
                }
                let headers = std::mem::take(&mut d.headers);
                let conn = ready_conn.take();
                let mut fut: std::pin::Pin<
                    Box<dyn std::future::Future<Output = Result<OutcomeFuture, String>> + Send>,
                > = match d.deliver.take() {
                    Some(f) => f(port, headers),
                    None => {
                        let body = d.body.clone();
                        Box::pin(async move {
                            instance_http::post_bot(port, headers, body, conn)
                                .await
                                .map(|f| Box::pin(f) as OutcomeFuture)
                        })
                    }
                };
                // Delivery is bounded and interruptible like every other phase.
                let delivery_deadline = Instant::now() + self.cfg.start_timeout;
                let delivered: Result<OutcomeFuture, Ending> = loop {
                    tokio::select! {
                        biased;
                        cmd = rx.recv() => match cmd {
                            Some(Cmd::Stop(r)) => break Err(Ending::new(during_start(r, true), "HTTP_ERROR")),
                            Some(Cmd::Assign(mut a)) => reply_err(&mut a, "instance is busy"),
                            None => {}
                        },
                        r = &mut fut => break r.map_err(|err| {
                            let msg = format!("could not deliver the session to the instance: {err}");
                            let mut e = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
                            e.message = Some(msg.clone());
                            e.start_error = Some(("DELIVERY_FAILED", msg));
                            e
                        }),
                        ex = inst.wait_exit() => {
                            let msg = format!("the instance exited before the session was delivered ({})", ex.describe());
                            let mut e = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
                            e.exit = Some(ex);
                            e.message = Some(msg.clone());
                            e.start_error = Some(("INSTANCE_EXITED", msg));
                            break Err(e);
                        }
                        _ = tokio::time::sleep_until(deadline) => break Err(Ending::new(EndReason::MaxDuration, "HTTP_ERROR")),
                        _ = tokio::time::sleep_until(delivery_deadline) => {
                            let msg = format!("the instance did not take the session within {} s", self.cfg.start_timeout.as_secs_f64());
                            let mut e = Ending::new(EndReason::StartFailed, "HTTP_ERROR");
                            e.message = Some(msg.clone());
                            e.start_error = Some(("DELIVERY_FAILED", msg));
                            break Err(e);
                        }
                    }
                };
                drop(fut);
                match delivered {
                    Ok(outcome) => {
                        // Drive the session's request on its own task from now on, so it is
                        // sent at once whatever the actor does next; aborted when the session ends.
                        let task = tokio::spawn(outcome);
                        _bot_task = Some(AbortOnDrop(task.abort_handle()));
                        bot = Box::pin(async move {
                            task.await
                                .unwrap_or_else(|e| BotOutcome::Broken(e.to_string()))
                        });
                        let ms = d.requested.elapsed().as_millis() as i64;
                        if let Err(e) = self.store.mark_delivered(sid, ms).await {
                            tracing::error!(session = %sid, error = %e, "could not record delivery");
                        }
                        self.platform_log(
                            &ctl,
                            format!("[cattery] session {sid} delivered after {ms} ms"),
                        );
                        if let Some(r) = d.reply.take() {
                            let _ = r.send(Ok(ms));
                        }
                    }
                    Err(e) => {
                        delivery = Some(d);
                        break 'life e;
                    }
                }
            }
            let mut sample = tokio::time::interval(self.cfg.metrics_interval);
            let mut last_cpu: Option<(Instant, u64)> = None;
            loop {
                tokio::select! {
                    biased;
                    cmd = rx.recv() => match cmd {
                        Some(Cmd::Stop(r)) => break 'life Ending::new(r, "HTTP_ERROR"),
                        Some(Cmd::Assign(mut d)) => reply_err(&mut d, "instance is busy"),
                        None => {}
                    },
                    out = &mut bot => {
                        let mut e = ending_of_outcome(out, &inst).await;
                        if e.exit.is_none() { e.exit = inst.exited(); }
                        break 'life e;
                    }
                    ex = inst.wait_exit() => {
                        // The session's own channel (the `/bot` answer, the websocket relay)
                        // tells best how it ended, e.g. which side closed a websocket first;
                        // it settles within moments of the exit.
                        // (A broken `/bot` connection says less than the exit status.)
                        match tokio::time::timeout(OUTCOME_AFTER_EXIT, &mut bot).await {
                            Ok(BotOutcome::Broken(_)) | Err(_) => {}
                            Ok(out) => {
                                let mut e = ending_of_outcome(out, &inst).await;
                                e.exit = Some(ex);
                                break 'life e;
                            }
                        }
                        let mut e = if ex.success() {
                            Ending::new(EndReason::Completed, "HTTP_COMPLETED")
                        } else {
                            Ending::new(EndReason::Error, "HTTP_ERROR")
                        };
                        e.exit = Some(ex);
                        e.message = Some(format!("the instance exited ({})", ex.describe()));
                        break 'life e;
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        let mut e = Ending::new(EndReason::MaxDuration, "HTTP_ERROR");
                        e.message = Some(format!("maxSessionDuration ({} s) reached", ctl.deployment.spec.max_session_duration_s()));
                        break 'life e;
                    }
                    _ = sample.tick() => {
                        if let Some(s) = inst.sample() {
                            let now = Instant::now();
                            let mc = match last_cpu {
                                Some((t, c)) => {
                                    let dt = now.duration_since(t).as_nanos().max(1) as u64;
                                    s.cpu_ns.saturating_sub(c).saturating_mul(1000) / dt
                                }
                                None => 0,
                            };
                            last_cpu = Some((now, s.cpu_ns));
                            ctl.samples.lock().push(MetricSample {
                                t: now_ms() / 1000,
                                cpu_millicores: mc,
                                memory_bytes: s.memory_bytes,
                            });
                        }
                    }
                }
            }
        };
        self.finish(
            &ctl,
            Some(inst),
            ending,
            session.map(|s| s.0),
            delivery,
            &mut rx,
            done_tx,
        )
        .await;
    }

    /// The one cleanup path: every end of every instance comes through here exactly once.
    ///
    /// Order: remove the whole tree (SIGTERM, grace, SIGKILL, wait until empty, remove cgroup,
    /// files and port) -> free the capacity slot -> record the session's end (first end wins
    /// in the store) and its metrics and end-of-session log record -> leave the live set ->
    /// answer a pending start, wake `DELETE`s waiting for this instance -> refill the pool.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        self: &Arc<Self>,
        ctl: &Arc<InstanceCtl>,
        inst: Option<Arc<dyn Instance>>,
        mut ending: Ending,
        session: Option<Uuid>,
        mut delivery: Option<Delivery>,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
        done_tx: watch::Sender<bool>,
    ) {
        *ctl.state.lock() = InstState::Ending;
        // A warm instance claimed by a start whose session it had not received yet: that
        // session ends with it.
        let session = session.or_else(|| ctl.attribution.lock().session_id);
        let grace = self.grace(ctl);
        let mut report = None;
        if let Some(i) = &inst {
            let r = i.terminate(grace).await;
            if ending.exit.is_none() {
                ending.exit = r.exit;
            }
            report = Some(r);
        }
        let ended_ms = now_ms();
        // The tree is gone: its capacity slot is free from now on.
        if let Some(p) = self.state.lock().pools.get_mut(&ctl.agent_id) {
            p.instances.remove(&ctl.id);
        }
        // One write: the instance record goes, the session's end (first wins) and its
        // metrics are recorded.
        let end = SessionEnd {
            ended_ms,
            reason: ending.reason,
            completion_status: ending.completion.clone(),
            exit_code: ending.exit.and_then(|e| e.code),
            exit_signal: ending.exit.and_then(|e| e.signal),
            message: ending.message.clone(),
        };
        let samples = ctl.samples.lock().clone();
        match self
            .store
            .end_instance(ctl.id, session.map(|sid| (sid, &end, &samples[..])))
            .await
        {
            Ok(true) => {}
            Ok(false) if session.is_some() => {
                tracing::debug!(instance = %ctl.id, "session end was already recorded")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(
                instance = %ctl.id,
                error = %e,
                "could not record the end of the instance and its session"
            ),
        }
        if let Some(sid) = session {
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
        // Recorded: the session leaves the live set (a `DELETE` arriving from now on finds
        // the recorded end; one arriving before waits for `done` below).
        {
            let mut st = self.state.lock();
            if let Some(s) = session {
                if st.sessions.get(&s).is_some_and(|c| Arc::ptr_eq(c, ctl)) {
                    st.sessions.remove(&s);
                }
            }
            self.live.send_replace(st.sessions.len());
        }
        if let Some(d) = delivery.as_mut() {
            if let Some(r) = d.reply.take() {
                let err = match ending.reason {
                    EndReason::Drained => CoreError::Draining,
                    EndReason::StoppedDuringStart
                    | EndReason::Stopped
                    | EndReason::ClientDisconnected => CoreError::StoppedDuringStart(d.session),
                    EndReason::MaxDuration => CoreError::StartFailed {
                        code: "START_TIMEOUT",
                        message: "maxSessionDuration was reached before the instance was ready"
                            .into(),
                    },
                    _ => {
                        let (code, message) = ending.start_error.take().unwrap_or((
                            "INSTANCE_EXITED",
                            "the instance ended before the session was delivered".into(),
                        ));
                        CoreError::StartFailed { code, message }
                    }
                };
                let _ = r.send(Err(err));
            }
        }
        done_tx.send_replace(true);
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            if let Cmd::Assign(mut d) = cmd {
                reply_err(&mut d, "the instance went away");
            }
        }
        self.reconcile(ctl.agent_id);
    }

    /// Brings an agent's warm pool to `minAgents` within `maxAgents`, replaces idle instances of
    /// old deployments, and trims extra idle ones. Does nothing until [`Supervisor::recover`]
    /// has finished (which then reconciles every agent).
    pub fn reconcile(self: &Arc<Self>, agent_id: Uuid) {
        if !self.recovered.load(Ordering::SeqCst) {
            return;
        }
        let mut spawn = Vec::new();
        let mut stop = Vec::new();
        {
            let mut st = self.state.lock();
            let draining = self.is_draining();
            let Some(p) = st.pools.get_mut(&agent_id) else {
                return;
            };
            let dep = p.deployment.id;
            let deleted = p.agent.deleted_ms.is_some();
            let mut warm = 0u32;
            for c in p.instances.values() {
                let s = *c.state.lock();
                let current = c.deployment.id == dep;
                if s == InstState::Idle && (!current || deleted || draining) {
                    stop.push(c.clone());
                } else if current
                    && (s == InstState::Idle
                        || (s == InstState::Starting && c.attribution.lock().session_id.is_none()))
                {
                    warm += 1;
                }
            }
            if deleted || draining {
                if p.instances.is_empty() && deleted {
                    st.pools.remove(&agent_id);
                }
            } else if p.deploy_error.is_none() {
                let min = p.agent.min_agents;
                let max = p.agent.max_agents;
                let backoff = p
                    .health
                    .get(&dep)
                    .and_then(|h| h.backoff_until)
                    .is_some_and(|b| Instant::now() < b);
                let mut total = p.instances.len() as u32;
                while warm < min && total < max && !backoff {
                    let c = self.new_ctl(&p.agent, p.deployment.clone(), InstState::Starting, None);
                    p.instances.insert(c.id, c.clone());
                    spawn.push(c);
                    warm += 1;
                    total += 1;
                }
                if warm > min {
                    let mut extra = warm - min;
                    for c in p.instances.values() {
                        if extra == 0 {
                            break;
                        }
                        if c.deployment.id == dep && *c.state.lock() == InstState::Idle {
                            stop.push(c.clone());
                            extra -= 1;
                        }
                    }
                }
            }
        }
        for c in stop {
            let mut s = c.state.lock();
            if *s == InstState::Idle {
                *s = InstState::Ending;
                drop(s);
                let _ = c.cmd_tx.send(Cmd::Stop(EndReason::Stopped));
            }
        }
        for c in spawn {
            let rx = self.take_cmd_rx(&c);
            tokio::spawn(self.clone().run_instance(c, rx, None, None));
        }
    }

    /// Loads agents and finds again the instances a previous run left, after a restart (even
    /// a SIGKILL of the server). Instances are found from their durable records (pid plus
    /// its start time, which defeats pid reuse; cgroup; port), never by name:
    ///
    /// - alive with a delivered, open session: re-adopted and supervised as before (stop,
    ///   process exit, time limit from the session's `createdAt`);
    /// - alive with a session that was still starting: the start request died with the old
    ///   server, so the instance is removed and the session recorded `lost`;
    /// - alive and warm: re-adopted as a warm instance if it belongs to its agent's current
    ///   deployment, else removed;
    /// - gone: its leftovers are removed and its open session is recorded `lost`.
    ///
    /// Then the runtime sweeps this server's cgroups and instance directories for anything
    /// no record names (an instance spawned just before the crash), and the pools are refilled.
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        for agent in self.store.list_all_agents().await? {
            let Some(dep) = self
                .store
                .get_deployment(agent.desired_deployment_id)
                .await?
            else {
                continue;
            };
            let deploy_error = self.validate(&dep);
            let mut st = self.state.lock();
            st.by_name
                .insert((agent.org.clone(), agent.name.clone()), agent.id);
            st.pools.insert(
                agent.id,
                AgentPool {
                    agent,
                    deployment: Arc::new(dep),
                    deploy_error,
                    instances: HashMap::new(),
                    health: HashMap::new(),
                },
            );
        }
        let mut adopted_sessions = std::collections::HashSet::new();
        let mut keep = std::collections::HashSet::new();
        let mut remove: Vec<(Arc<dyn Instance>, Duration)> = Vec::new();
        for rec in self.store.list_instances().await? {
            let session = match rec.session_id {
                Some(s) => self.store.get_session(s).await?.filter(|s| s.end.is_none()),
                None => None,
            };
            let dep = self.store.get_deployment(rec.deployment_id).await?;
            let agent = self.store.get_agent_by_id(rec.agent_id).await?;
            let (Some(dep), Some(agent)) = (dep, agent) else {
                // Unknown owner: not kept, so the sweep below removes whatever is left.
                let _ = self.store.delete_instance(rec.id).await;
                continue;
            };
            let grace = dep
                .spec
                .stop_grace_seconds
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
                .unwrap_or(self.cfg.default_stop_grace);
            let dep = Arc::new(dep);
            // The controller exists before the adoption so that the log capture shares its
            // attribution (a re-adopted warm instance's lines follow it into its session).
            let ctl = self.new_ctl(&agent, dep.clone(), InstState::Starting, Some(rec.id));
            ctl.attribution.lock().session_id = session.as_ref().map(|s| s.id);
            let sink = LogSink {
                tx: self.logs.clone(),
                attribution: ctl.attribution.clone(),
            };
            let Some(inst) = self.runtime.adopt(&rec, sink).await else {
                // Gone while we were down; its open session is recorded `lost` below.
                discard_ctl(&ctl);
                let _ = self.store.delete_instance(rec.id).await;
                continue;
            };
            match session {
                Some(sess) if sess.bot_start_ms.is_some() => {
                    *ctl.state.lock() = InstState::Busy;
                    ctl.session_stored.store(true, Ordering::SeqCst);
                    {
                        let mut st = self.state.lock();
                        st.pools
                            .entry(agent.id)
                            .or_insert_with(|| AgentPool {
                                agent: agent.clone(),
                                deployment: dep.clone(),
                                deploy_error: None,
                                instances: HashMap::new(),
                                health: HashMap::new(),
                            })
                            .instances
                            .insert(ctl.id, ctl.clone());
                        st.sessions.insert(sess.id, ctl.clone());
                    }
                    let remaining_ms = (sess.created_ms
                        + i64::from(dep.spec.max_session_duration_s()) * 1000
                        - now_ms())
                    .max(0);
                    let deadline = Instant::now() + Duration::from_millis(remaining_ms as u64);
                    adopted_sessions.insert(sess.id);
                    keep.insert(rec.id);
                    self.platform_log(
                        &ctl,
                        format!(
                            "[cattery] re-adopted instance {} of session {} after a restart",
                            rec.id, sess.id
                        ),
                    );
                    let rx = self.take_cmd_rx(&ctl);
                    tokio::spawn(self.clone().run_instance(
                        ctl,
                        rx,
                        None,
                        Some((inst, Some((sess.id, deadline)))),
                    ));
                }
                Some(_) => {
                    // Still starting: its start request died with the previous server.
                    discard_ctl(&ctl);
                    let _ = self.store.delete_instance(rec.id).await;
                    remove.push((inst, grace));
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
                        keep.insert(rec.id);
                        self.platform_log(
                            &ctl,
                            format!(
                                "[cattery] re-adopted warm instance {} after a restart",
                                rec.id
                            ),
                        );
                        let rx = self.take_cmd_rx(&ctl);
                        tokio::spawn(self.clone().run_instance(ctl, rx, None, Some((inst, None))));
                    } else {
                        discard_ctl(&ctl);
                        let _ = self.store.delete_instance(rec.id).await;
                        remove.push((inst, grace));
                    }
                }
            }
        }
        futures_util::future::join_all(remove.iter().map(|(i, g)| i.terminate(*g))).await;
        self.runtime.sweep(&keep).await;
        for s in self.store.list_open_sessions().await? {
            if adopted_sessions.contains(&s.id) {
                continue;
            }
            let end = SessionEnd {
                ended_ms: now_ms(),
                reason: EndReason::Lost,
                completion_status: "HTTP_ERROR".into(),
                exit_code: None,
                exit_signal: None,
                message: Some(if s.bot_start_ms.is_some() {
                    "the instance was gone when the control plane restarted".into()
                } else {
                    "the control plane restarted before the session was delivered".into()
                }),
            };
            self.store.end_session(s.id, &end).await?;
        }
        self.live.send_replace(self.state.lock().sessions.len());
        self.recovered.store(true, Ordering::SeqCst);
        let ids: Vec<Uuid> = self.state.lock().pools.keys().copied().collect();
        for id in ids {
            self.reconcile(id);
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
        let ids: Vec<Uuid> = self.state.lock().pools.keys().copied().collect();
        for id in ids {
            self.reconcile(id);
        }
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
    }
}

type PendingRx = (mpsc::UnboundedReceiver<Cmd>, watch::Sender<bool>);

/// Command receivers of instances whose actor has not started yet.
static PENDING: std::sync::LazyLock<Mutex<HashMap<Uuid, PendingRx>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

/// Forgets a controller whose actor will never run (its pending command receiver).
/// How long an instance's exit waits for its session's outcome (see `run_instance`).
const OUTCOME_AFTER_EXIT: Duration = Duration::from_millis(250);

/// The ending of a delivered session from what its channel reported: the `/bot` answer
/// (2xx: completed, else an error with the status as `completionStatus`, reference §C), a
/// broken connection (completed only if the process exited 0 within 500 ms), or the end of
/// a websocket relay (`WS_CONNECTION_CLOSED`; `client_disconnected` when the client closed).
async fn ending_of_outcome(out: BotOutcome, inst: &Arc<dyn Instance>) -> Ending {
    match out {
        BotOutcome::Answered(s) if (200..300).contains(&s) => {
            Ending::new(EndReason::Completed, "HTTP_COMPLETED")
        }
        BotOutcome::WsClosed { by_client: true } => {
            Ending::new(EndReason::ClientDisconnected, "WS_CONNECTION_CLOSED")
        }
        BotOutcome::WsClosed { by_client: false } => {
            Ending::new(EndReason::Completed, "WS_CONNECTION_CLOSED")
        }
        BotOutcome::Answered(s) => {
            let mut e = Ending::new(EndReason::Error, &s.to_string());
            e.message = Some(format!("the agent answered /bot with HTTP {s}"));
            e
        }
        BotOutcome::Broken(err) => {
            // Usually the process died: give the exit status a moment to arrive.
            let ex = tokio::time::timeout(Duration::from_millis(500), inst.wait_exit())
                .await
                .ok();
            let mut e = match ex {
                Some(x) if x.success() => Ending::new(EndReason::Completed, "HTTP_COMPLETED"),
                _ => Ending::new(EndReason::Error, "HTTP_ERROR"),
            };
            e.exit = ex;
            e.message = Some(format!("the /bot connection broke: {err}"));
            e
        }
    }
}

fn discard_ctl(ctl: &InstanceCtl) {
    PENDING.lock().remove(&ctl.id);
}

/// The reason recorded for a stop that arrives before the session was delivered: a plain
/// stop (`DELETE`) becomes `stopped_during_start`; drain and client-gone keep their own.
fn during_start(r: EndReason, promised: bool) -> EndReason {
    if promised && r == EndReason::Stopped {
        EndReason::StoppedDuringStart
    } else {
        r
    }
}

/// Aborts a spawned task when dropped (the session's `/bot` request or websocket relay).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn reply_err(d: &mut Delivery, why: &str) {
    if let Some(r) = d.reply.take() {
        let _ = r.send(Err(CoreError::StartFailed {
            code: "INSTANCE_EXITED",
            message: why.into(),
        }));
    }
}

fn tail_of(inst: &Arc<dyn Instance>) -> String {
    let dir = inst.record_parts().dir;
    let Ok(b) = std::fs::read(PathBuf::from(dir).join("stderr.log")) else {
        return String::new();
    };
    let start = b.len().saturating_sub(2048);
    crate::runtime::logs::escape_bytes(&b[start..])
}

/// Whether `python` can import the runner's own dependencies; `Some(reason)` when it cannot.
/// Runs `python -c "import fastapi, uvicorn"` (a few hundred ms) off the async worker's
/// scheduling slot (`block_in_place`); a success is cached per interpreter for 60 s (a
/// failure is checked again).
fn python_runner_deps_missing(python: &str) -> Option<String> {
    type Checked = (std::time::Instant, Option<String>);
    static CACHE: std::sync::LazyLock<Mutex<HashMap<String, Checked>>> =
        std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));
    if let Some((at, r)) = CACHE.lock().get(python) {
        if at.elapsed() < Duration::from_secs(60) {
            return r.clone();
        }
    }
    // Through the reaper: it reaps every child of this process, so a plain
    // `Command::output()` could find its child already reaped (ECHILD).
    let run = || {
        let mut cmd = std::process::Command::new(python);
        cmd.args(["-c", "import fastapi, uvicorn"])
            .stdin(std::process::Stdio::null());
        crate::runtime::process::reaper::Reaper::global().output(&mut cmd, Duration::from_secs(60))
    };
    let out = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run)
        }
        Ok(_) => run(),
        Err(_) => std::process::Command::new(python)
            .args(["-c", "import fastapi, uvicorn"])
            .stdin(std::process::Stdio::null())
            .output()
            .map(|o| {
                let exit = crate::runtime::ExitInfo {
                    code: o.status.code(),
                    signal: std::os::unix::process::ExitStatusExt::signal(&o.status),
                };
                (exit, o.stderr)
            }),
    };
    let r = match out {
        Ok((exit, _)) if exit.success() => None,
        Ok((_, stderr)) => {
            let err = String::from_utf8_lossy(&stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string();
            Some(format!(
                "{python} cannot import fastapi and uvicorn, which the Python runner needs ({last}); \
                 install them in the bot's environment (docs/python-runner.md)"
            ))
        }
        Err(e) => Some(format!("cannot run {python}: {e}")),
    };
    // Only a success is remembered: after a failure the user fixes the environment and
    // deploys again, which must check again.
    if r.is_none() {
        CACHE
            .lock()
            .insert(python.to_string(), (std::time::Instant::now(), None));
    }
    r
}
