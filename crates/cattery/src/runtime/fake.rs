//! An in-process runtime for the session engine's unit tests: deterministic, no processes.
//!
//! A fake instance is an HTTP server on a loopback port inside this process that follows a
//! script taken from the deployment's `command` (`["fake", "ready-ms=50", "stubborn"]`):
//!
//! - `start-ms=N`: making the instance takes N ms ([`Runtime::start`] returns after them), as
//!   the process runtime waiting for an agent's fork server to import the bot; a start
//!   abandoned meanwhile ([`InstanceSpec::abandoned`]) returns at once, with the event
//!   `abandoned <id>`;
//! - `ready-ms=N`: `/readyz` answers 200 from N ms after the start (default 0; `never-ready`:
//!   never);
//! - `crash-ms=N[:CODE]`: the instance exits with CODE (default 1) N ms after its start;
//! - `bot-ms=N[:STATUS]`: `/bot` answers STATUS (default 200) N ms after it arrives (default:
//!   it answers only when the session ends);
//! - `exit-ms=N[:CODE]`: the instance exits with CODE (default 0) N ms after `/bot` arrives;
//! - `die-ms=N[:CODE]`: N ms after `/bot` arrives its connection drops unanswered, and the
//!   exit (CODE, default 1) is reported a little later, as a process that died mid-session
//!   (the platform may see either first);
//! - `stubborn`: SIGTERM is ignored; only the SIGKILL at the end of the grace ends it;
//! - `oom`: an exit counts as killed for going over the memory limit;
//! - `port-clash=N`: while the runtime has made at most N starts, a new instance exits at
//!   once (code 1) with an address-in-use error on its stderr, as an agent whose port was
//!   taken before it could bind it;
//! - `fork-fallback=REASON`: the runtime reports the agent's fork server as fallen back to
//!   plain starts for REASON ([`Runtime::fork_server`]), as the process runtime does for a
//!   Python bot that is unsafe to fork.
//!
//! Anything else in `command` makes [`Runtime::prepare`] fail (`spawn`-like errors are
//! simulated with `fail-start`). The runtime keeps every live instance, so a test can see
//! what is still "running", and a second engine on the same runtime re-adopts them as after
//! a restart.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use parking_lot::Mutex;
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    Adopted, ExitInfo, GoneExit, Instance, InstanceSpec, LogSink, Prepared, ResourceSample,
    Runtime, RuntimeError, RuntimeKind, TerminateReport,
};
use crate::model::{DeploymentRecord, InstanceRecord};

/// What a fake instance does (parsed from its arguments, see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Making the instance takes this long.
    pub making: Duration,
    /// `/readyz` answers 200 from this long after the start; `None`: never.
    pub ready_after: Option<Duration>,
    /// Exits with this code this long after the start.
    pub crash: Option<(Duration, i32)>,
    /// `/bot` answers this status this long after it arrives.
    pub bot_answer: Option<(Duration, u16)>,
    /// Exits with this code this long after `/bot` arrives.
    pub exit_after_bot: Option<(Duration, i32)>,
    /// Drops the `/bot` connection this long after it arrives, then exits with this code.
    pub die_after_bot: Option<(Duration, i32)>,
    /// Ignores SIGTERM.
    pub stubborn: bool,
    /// Its exit is an out-of-memory kill.
    pub oom: bool,
    /// `start` fails.
    pub fail_start: bool,
    /// The first this many starts of the runtime exit with an address-in-use error.
    pub port_clash: u32,
    /// The agent's fork server falls back to plain starts, for this reason.
    pub fork_fallback: Option<String>,
}

fn ms_and<T: std::str::FromStr>(v: &str, default: T) -> Result<(Duration, T), String> {
    let (ms, rest) = v.split_once(':').map_or((v, None), |(a, b)| (a, Some(b)));
    let ms: u64 = ms.parse().map_err(|_| format!("bad duration {ms}"))?;
    let t = match rest {
        Some(r) => r.parse().map_err(|_| format!("bad value {r}"))?,
        None => default,
    };
    Ok((Duration::from_millis(ms), t))
}

impl Script {
    /// Parses the arguments after `fake`.
    pub fn parse(args: &[String]) -> Result<Script, String> {
        let mut s = Script {
            ready_after: Some(Duration::ZERO),
            ..Script::default()
        };
        for a in args {
            let (k, v) = a.split_once('=').unwrap_or((a.as_str(), ""));
            match k {
                "start-ms" => s.making = ms_and(v, 0u8)?.0,
                "ready-ms" => s.ready_after = Some(ms_and(v, 0u8)?.0),
                "never-ready" => s.ready_after = None,
                "crash-ms" => s.crash = Some(ms_and(v, 1)?),
                "bot-ms" => s.bot_answer = Some(ms_and(v, 200)?),
                "exit-ms" => s.exit_after_bot = Some(ms_and(v, 0)?),
                "die-ms" => s.die_after_bot = Some(ms_and(v, 1)?),
                "stubborn" => s.stubborn = true,
                "oom" => s.oom = true,
                "fail-start" => s.fail_start = true,
                "port-clash" => s.port_clash = v.parse().map_err(|_| format!("bad count {v}"))?,
                "fork-fallback" => s.fork_fallback = Some(v.to_string()),
                _ => return Err(format!("unknown fake instance option {a}")),
            }
        }
        Ok(s)
    }
}

/// The fake runtime. Cheap to clone; clones share their instances.
#[derive(Clone, Default)]
pub struct FakeRuntime {
    inner: Arc<FakeInner>,
}

#[derive(Default)]
struct FakeInner {
    live: Mutex<HashMap<Uuid, Arc<FakeInstance>>>,
    starts: AtomicU32,
    events: Mutex<Vec<String>>,
    delivered: Mutex<Vec<Delivered>>,
    whatsapp: Mutex<Vec<Delivered>>,
    fork: Mutex<HashMap<Uuid, super::ForkServerStatus>>,
    /// Instances reachable from any node ([`FakeRuntime::set_shared`]).
    shared: std::sync::atomic::AtomicBool,
    /// While set, validation fails as for an engine that does not answer.
    unavailable: std::sync::atomic::AtomicBool,
    /// Adoptions wait while its write side is held ([`FakeRuntime::hold_adoptions`]).
    adoptions: Arc<tokio::sync::RwLock<()>>,
    /// Adoptions asked for so far.
    adopts: AtomicU32,
}

/// A session as an instance received it (`POST /bot`).
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The request's headers.
    pub headers: axum::http::HeaderMap,
    /// Its body.
    pub body: String,
}

impl FakeRuntime {
    /// A runtime with no instances.
    pub fn new() -> Self {
        FakeRuntime::default()
    }

    /// Instances started so far (adoptions not counted).
    pub fn starts(&self) -> u32 {
        self.inner.starts.load(Ordering::SeqCst)
    }

    /// Instances not yet terminated.
    pub fn live(&self) -> Vec<Uuid> {
        self.inner.live.lock().keys().copied().collect()
    }

    /// Removes instance `id` as if the machine had lost it: it ends, and the runtime no longer
    /// knows it (an adoption finds nothing to say how it ended).
    pub async fn forget(&self, id: Uuid) {
        let i = self.inner.live.lock().get(&id).cloned();
        if let Some(i) = i {
            i.terminate(Duration::ZERO).await;
        }
    }

    /// Makes its instances reachable from any node, as a shared container engine's are
    /// ([`Runtime::adoptable_by_any_node`]): a takeover adopts them.
    pub fn set_shared(&self, shared: bool) {
        self.inner.shared.store(shared, Ordering::SeqCst);
    }

    /// Makes validation fail (`true`) as for an engine that does not answer, an error that
    /// may clear by itself ([`Runtime::deploy_error_may_clear`]), or pass again (`false`).
    pub fn set_unavailable(&self, on: bool) {
        self.inner.unavailable.store(on, Ordering::SeqCst);
    }

    /// Holds every adoption ([`Runtime::adopt`]) until the guard is dropped: a recovery or a
    /// takeover waits there, its store steps before it done.
    pub async fn hold_adoptions(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.inner.adoptions.clone().write_owned().await
    }

    /// Adoptions asked for so far (held ones included).
    pub fn adopts(&self) -> u32 {
        self.inner.adopts.load(Ordering::SeqCst)
    }

    /// Every `POST /bot` received, in order.
    pub fn delivered(&self) -> Vec<Delivered> {
        self.inner.delivered.lock().clone()
    }

    /// WhatsApp events instances received (`POST /whatsapp`), in order.
    pub fn whatsapp(&self) -> Vec<Delivered> {
        self.inner.whatsapp.lock().clone()
    }

    /// What happened, in order (`start <id>`, `sigterm <id>`, `sigkill <id>`, `gone <id>`).
    pub fn events(&self) -> Vec<String> {
        self.inner.events.lock().clone()
    }

    fn event(&self, e: String) {
        self.inner.events.lock().push(e);
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Fake
    }

    fn prepare(&self, dep: &DeploymentRecord) -> Result<Prepared, String> {
        let cmd = dep.spec.command.as_deref().unwrap_or_default();
        match cmd.split_first() {
            Some((p, args)) if p == "fake" => {
                Script::parse(args)?;
                Ok(Prepared {
                    program: p.clone(),
                    args: args.to_vec(),
                    working_dir: None,
                    env: vec![],
                })
            }
            _ => Err("the fake runtime runs only [\"fake\", ...] commands".into()),
        }
    }

    fn validate(&self, dep: &DeploymentRecord) -> Option<String> {
        if self.inner.unavailable.load(Ordering::SeqCst) {
            return Some("no reachable fake engine".into());
        }
        self.prepare(dep).err()
    }

    fn deploy_error_may_clear(&self, _dep: &DeploymentRecord) -> bool {
        self.inner.unavailable.load(Ordering::SeqCst)
    }

    async fn start(
        &self,
        spec: InstanceSpec,
        _logs: LogSink,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        let mut script = Script::parse(&spec.args).map_err(RuntimeError::Setup)?;
        if script.fail_start {
            return Err(RuntimeError::Setup("simulated start failure".into()));
        }
        if !script.making.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(script.making) => {}
                _ = spec.abandoned.cancelled() => {
                    self.event(format!("abandoned {}", spec.instance_id));
                    return Err(RuntimeError::Abandoned);
                }
            }
        }
        if let (Some(agent), Some(r)) = (spec.agent, &script.fork_fallback) {
            let st = super::ForkServerStatus {
                state: super::ForkServerState::Fallback,
                reason: Some(r.clone()),
                pid: None,
            };
            self.inner.fork.lock().insert(agent, st);
        }
        let n = self.inner.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let clashed = n <= script.port_clash;
        if clashed {
            script.crash = Some((Duration::ZERO, 1));
            script.ready_after = None;
        }
        let inst = FakeInstance::start(spec.instance_id, script, clashed, self.clone())
            .await
            .map_err(|e| RuntimeError::Setup(e.to_string()))?;
        self.event(format!("start {}", spec.instance_id));
        self.inner
            .live
            .lock()
            .insert(spec.instance_id, inst.clone());
        Ok(inst)
    }

    async fn adopt(&self, rec: &InstanceRecord, _logs: LogSink) -> Adopted {
        self.inner.adopts.fetch_add(1, Ordering::SeqCst);
        drop(self.inner.adoptions.read().await);
        let Some(i) = self.inner.live.lock().get(&rec.id).cloned() else {
            return Adopted::Gone(None);
        };
        if let Some(exit) = i.exited() {
            let out_of_memory = i.out_of_memory().await;
            i.terminate(Duration::ZERO).await;
            return Adopted::Gone(Some(GoneExit {
                exit,
                out_of_memory,
                ended_ms: None,
            }));
        }
        Adopted::Running(i)
    }

    async fn sweep(&self, keep: &HashSet<Uuid>) {
        let gone: Vec<Arc<FakeInstance>> = self
            .inner
            .live
            .lock()
            .iter()
            .filter(|(id, _)| !keep.contains(id))
            .map(|(_, i)| i.clone())
            .collect();
        for i in gone {
            i.terminate(Duration::ZERO).await;
        }
    }

    fn isolation(&self) -> String {
        "fake (in-process)".into()
    }

    fn adoptable_by_any_node(&self, _rec: &InstanceRecord) -> bool {
        self.inner.shared.load(Ordering::SeqCst)
    }

    fn fork_server(&self, agent: Uuid) -> Option<super::ForkServerStatus> {
        self.inner.fork.lock().get(&agent).cloned()
    }
}

/// One fake instance.
pub struct FakeInstance {
    id: Uuid,
    addr: SocketAddr,
    script: Script,
    /// Exited for an address-in-use error (`port-clash`).
    clashed: bool,
    started: Instant,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    server: Mutex<Option<tokio::task::AbortHandle>>,
    terminated: OnceCell<TerminateReport>,
    runtime: FakeRuntime,
}

#[derive(Clone)]
struct Srv(Arc<FakeInstance>);

impl FakeInstance {
    async fn start(
        id: Uuid,
        script: Script,
        clashed: bool,
        runtime: FakeRuntime,
    ) -> std::io::Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (exit_tx, _) = watch::channel(None);
        let inst = Arc::new(FakeInstance {
            id,
            addr,
            script,
            clashed,
            started: Instant::now(),
            exit_tx,
            server: Mutex::new(None),
            terminated: OnceCell::new(),
            runtime,
        });
        let app = axum::Router::new()
            .route("/readyz", get(readyz))
            .route("/bot", post(bot))
            .route("/whatsapp", post(whatsapp))
            .with_state(Srv(inst.clone()));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *inst.server.lock() = Some(server.abort_handle());
        if let Some((after, code)) = inst.script.crash {
            let me = Arc::downgrade(&inst);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(me) = me.upgrade() {
                    me.exit(ExitInfo {
                        code: Some(code),
                        signal: None,
                    });
                }
            });
        }
        Ok(inst)
    }

    fn exit(&self, e: ExitInfo) {
        self.exit_tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(e);
                true
            } else {
                false
            }
        });
    }
}

async fn readyz(State(Srv(i)): State<Srv>) -> StatusCode {
    let ready = i
        .script
        .ready_after
        .is_some_and(|d| i.started.elapsed() >= d);
    if ready && i.exited().is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Records a WhatsApp event and answers as the base image does.
async fn whatsapp(
    State(Srv(i)): State<Srv>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::Json<serde_json::Value> {
    i.runtime
        .inner
        .whatsapp
        .lock()
        .push(Delivered { headers, body });
    axum::Json(
        serde_json::json!({"status": "success", "message": "Webhook processed successfully"}),
    )
}

async fn bot(
    State(Srv(i)): State<Srv>,
    headers: axum::http::HeaderMap,
    body: String,
) -> StatusCode {
    i.runtime
        .inner
        .delivered
        .lock()
        .push(Delivered { headers, body });
    if let Some((after, code)) = i.script.exit_after_bot {
        let me = i.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            me.exit(ExitInfo {
                code: Some(code),
                signal: None,
            });
        });
    }
    if let Some((after, code)) = i.script.die_after_bot {
        tokio::time::sleep(after).await;
        let me = i.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            me.exit(ExitInfo {
                code: Some(code),
                signal: None,
            });
        });
        // Unwinding the connection's task closes it without an answer.
        std::panic::resume_unwind(Box::new("fake instance died during /bot (die-ms)"));
    }
    let answer = async {
        match i.script.bot_answer {
            Some((after, status)) => {
                tokio::time::sleep(after).await;
                StatusCode::from_u16(status).unwrap_or(StatusCode::OK)
            }
            None => std::future::pending().await,
        }
    };
    let mut rx = i.exit_tx.subscribe();
    tokio::select! {
        s = answer => s,
        // An exited instance never answers (as a dead process would not).
        _ = async { let _ = rx.wait_for(|v| v.is_some()).await; } => std::future::pending().await,
    }
}

#[async_trait]
impl Instance for FakeInstance {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Fake
    }

    fn placement(&self) -> serde_json::Value {
        serde_json::json!({ "fake": self.id, "addr": self.addr.to_string() })
    }

    fn endpoint(&self) -> SocketAddr {
        self.addr
    }

    fn describe(&self) -> String {
        format!("fake {}", self.id)
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit_tx.subscribe();
        let r = rx.wait_for(|v| v.is_some()).await;
        r.map(|v| v.unwrap_or_default()).unwrap_or_default()
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit_tx.borrow()
    }

    async fn terminate(&self, grace: Duration) -> TerminateReport {
        *self
            .terminated
            .get_or_init(|| async {
                let t0 = Instant::now();
                let mut report = TerminateReport {
                    sent_sigterm: false,
                    killed: false,
                    exit: None,
                    took_ms: 0,
                };
                if self.exited().is_none() {
                    if !grace.is_zero() {
                        report.sent_sigterm = true;
                        self.runtime.event(format!("sigterm {}", self.id));
                        if !self.script.stubborn {
                            self.exit(ExitInfo {
                                code: Some(0),
                                signal: None,
                            });
                        }
                    }
                    let exited = tokio::time::timeout(grace, self.wait_exit()).await;
                    if exited.is_err() || grace.is_zero() {
                        report.killed = true;
                        self.runtime.event(format!("sigkill {}", self.id));
                        self.exit(ExitInfo {
                            code: None,
                            signal: Some(9),
                        });
                    }
                }
                report.exit = self.exited();
                if let Some(s) = self.server.lock().take() {
                    s.abort();
                }
                self.runtime.inner.live.lock().remove(&self.id);
                self.runtime.event(format!("gone {}", self.id));
                report.took_ms = t0.elapsed().as_millis() as u64;
                report
            })
            .await
    }

    async fn sample(&self) -> Option<ResourceSample> {
        if self.terminated.initialized() {
            return None;
        }
        Some(ResourceSample {
            cpu_ns: self.started.elapsed().as_nanos() as u64 / 10,
            memory_bytes: 1 << 20,
        })
    }

    async fn stderr_tail(&self) -> String {
        if self.clashed {
            format!(
                "cannot bind 127.0.0.1:{}: Address already in use (os error 98)\n",
                self.addr.port()
            )
        } else {
            String::new()
        }
    }

    async fn out_of_memory(&self) -> bool {
        self.script.oom && self.exited().is_some()
    }
}
