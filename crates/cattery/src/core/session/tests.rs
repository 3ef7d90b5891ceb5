//! Unit tests of the session engine on the fake runtime (`runtime::fake`): the decisions
//! (admission, pool plans, endings, health, recovery) without processes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::{SecretSource, StartParams, Supervisor, SupervisorConfig};
use crate::config::StoreConfig;
use crate::core::CoreError;
use crate::model::{
    now_ms, AgentRecord, DeploymentRecord, DeploymentSpec, EndReason, InstanceRecord, SessionRecord,
};
use crate::runtime::fake::FakeRuntime;
use crate::runtime::{InstanceSpec, LogAttribution, LogSink, Runtime};
use crate::store::{self, OpenMode, Store};

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    fake: FakeRuntime,
    sup: Arc<Supervisor>,
}

fn config() -> SupervisorConfig {
    SupervisorConfig {
        default_stop_grace: Duration::from_millis(500),
        start_timeout: Duration::from_secs(5),
        daily_api_key: None,
        metrics_interval: Duration::from_millis(100),
        ice_servers: Vec::new(),
        node_id: "n1".into(),
        node_timeout: Duration::from_secs(2),
        max_warm_starting: super::DEFAULT_MAX_WARM_STARTING,
        relay_dir: None,
        log_rate: crate::runtime::logs::LogRate::UNLIMITED,
    }
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    // The store `cattery serve` opens by default; the engine sees only its traits.
    let store = store::open(&StoreConfig::default(), dir.path(), OpenMode::Create)
        .await
        .unwrap();
    store.ensure_org("o").await.unwrap();
    let fake = FakeRuntime::new();
    let sup = engine(&store, &fake);
    sup.recover().await.unwrap();
    Env {
        _dir: dir,
        store,
        fake,
        sup,
    }
}

fn engine(store: &Arc<dyn Store>, fake: &FakeRuntime) -> Arc<Supervisor> {
    let (logs, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    Supervisor::new(
        store.clone(),
        Arc::new(fake.clone()),
        config(),
        logs,
        Arc::new(NoSecrets),
    )
}

/// The engine's tests bind no secret sets.
struct NoSecrets;

#[async_trait::async_trait]
impl SecretSource for NoSecrets {
    async fn env_for(
        &self,
        _org: &str,
        _dep: &DeploymentRecord,
    ) -> Result<Vec<(String, String)>, String> {
        Ok(Vec::new())
    }
}

/// Creates agent `name` running the fake script `script`.
async fn agent(e: &Env, name: &str, script: &[&str], min: u32, max: u32) -> AgentRecord {
    agent_with(e, name, script, min, max, |_| {}).await
}

/// Agent `name` keeping `warm` warm instances (`minAgents`, up to `max`), once they are ready.
async fn warm_agent(e: &Env, name: &str, warm: u32, max: u32) -> AgentRecord {
    let a = agent(e, name, &[], warm, max).await;
    until(&format!("{warm} warm instances"), async || {
        e.sup.pool_status(a.id).idle == warm
    })
    .await;
    a
}

async fn agent_with(
    e: &Env,
    name: &str,
    script: &[&str],
    min: u32,
    max: u32,
    f: impl FnOnce(&mut DeploymentSpec),
) -> AgentRecord {
    let now = now_ms();
    let agent = AgentRecord {
        id: Uuid::new_v4(),
        org: "o".into(),
        name: name.into(),
        region: "local".into(),
        min_agents: min,
        max_agents: max,
        desired_deployment_id: Uuid::new_v4(),
        created_ms: now,
        updated_ms: now,
        deleted_ms: None,
    };
    let mut spec = DeploymentSpec {
        command: Some(
            std::iter::once("fake")
                .chain(script.iter().copied())
                .map(String::from)
                .collect(),
        ),
        ..DeploymentSpec::default()
    };
    f(&mut spec);
    let dep = DeploymentRecord {
        id: agent.desired_deployment_id,
        agent_id: agent.id,
        spec,
        created_ms: now,
    };
    e.store.create_agent(&agent, &dep, None).await.unwrap();
    e.sup.upsert_agent(agent.clone(), dep);
    agent
}

async fn start(e: &Env, name: &str) -> Result<super::StartOutcome, CoreError> {
    e.sup.start_session("o", name, StartParams::default()).await
}

async fn end_reason(e: &Env, id: Uuid) -> Option<EndReason> {
    let s = e.store.get_session(id).await.unwrap()?;
    s.end.map(|x| x.reason)
}

/// Waits (up to 5 s) until session `id` has ended; returns how.
async fn ended(e: &Env, id: Uuid) -> crate::model::SessionEnd {
    until("ended", async || end_reason(e, id).await.is_some()).await;
    e.store.get_session(id).await.unwrap().unwrap().end.unwrap()
}

/// Waits (up to 5 s) until `f` holds.
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_answers_429_at_max_agents() {
    let e = env().await;
    agent(&e, "a", &[], 0, 1).await;
    let first = start(&e, "a").await.unwrap();
    assert!(first.cold_start);
    let second = start(&e, "a").await;
    assert!(
        matches!(second, Err(CoreError::AtCapacity(_))),
        "{second:?}"
    );
    assert_eq!(e.fake.starts(), 1);
    e.sup
        .stop_session("o", "a", first.session_id)
        .await
        .unwrap();
    let third = start(&e, "a").await.unwrap();
    assert_ne!(third.session_id, first.session_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instance_is_taken_then_refilled_to_min_agents() {
    let e = env().await;
    let a = warm_agent(&e, "a", 2, 5).await;
    let s = start(&e, "a").await.unwrap();
    assert!(!s.cold_start, "a ready warm instance was there");
    until("refilled to minAgents", async || {
        e.sup.pool_status(a.id).idle == 2
    })
    .await;
    assert_eq!(e.fake.starts(), 3);
    assert_eq!(e.sup.pool_status(a.id).busy, 1);
}

/// A server detached for an upgrade (`--on-stop detach`) makes no instance any more: a warm
/// instance taken (or a session that ends) is not replaced; the next server does that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_server_refills_no_warm_pool() {
    let e = env().await;
    let a = warm_agent(&e, "a", 1, 5).await;
    e.sup.detach();
    let s = start(&e, "a").await.unwrap();
    assert!(!s.cold_start);
    e.sup.stop_session("o", "a", s.session_id).await.unwrap();
    e.sup.reconcile_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(e.fake.starts(), 1, "no refill after the detach");
    assert_eq!(e.sup.pool_status(a.id).total, 0);
}

/// A large `minAgents` fills in waves of at most `max_warm_starting` (16 here) starting
/// instances, the next one as soon as one gets ready (not at the pool's 1 s tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_warm_pool_fills_in_waves_of_max_warm_starting() {
    let e = env().await;
    let began = tokio::time::Instant::now();
    let a = agent(&e, "a", &["ready-ms=100"], 40, 50).await;
    let mut most = 0;
    loop {
        let p = e.sup.pool_status(a.id);
        most = most.max(p.starting);
        if p.idle == 40 {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "not filled: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(most <= 16, "{most} warm instances were starting at once");
    assert!(most >= 8, "only {most} at once");
    // Three waves of 100 ms; waiting for the 1 s tick between waves would take 2 s or more.
    assert!(
        began.elapsed() < Duration::from_millis(1800),
        "filled in {:?}",
        began.elapsed()
    );
    assert_eq!(e.fake.starts(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_warm_instance_is_claimed() {
    let e = env().await;
    let a = agent(&e, "a", &["ready-ms=300"], 1, 1).await;
    until("one starting instance", async || {
        e.sup.pool_status(a.id).starting == 1
    })
    .await;
    let s = start(&e, "a").await.unwrap();
    assert!(s.cold_start);
    assert_eq!(e.fake.starts(), 1, "the starting instance was claimed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_answers_only_after_the_instance_is_gone() {
    let e = env().await;
    let mut spec_grace = |s: &mut DeploymentSpec| s.stop_grace_seconds = Some(0.3);
    agent_with(&e, "a", &["stubborn"], 0, 1, &mut spec_grace).await;
    let s = start(&e, "a").await.unwrap();
    let t0 = std::time::Instant::now();
    e.sup.stop_session("o", "a", s.session_id).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t0.elapsed()
    );
    assert!(e.fake.live().is_empty(), "nothing runs after the stop");
    let ev = e.fake.events();
    assert!(ev.iter().any(|x| x.starts_with("sigkill")), "{ev:?}");
    assert_eq!(end_reason(&e, s.session_id).await, Some(EndReason::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_end_wins() {
    let e = env().await;
    agent(&e, "a", &["bot-ms=50"], 0, 1).await;
    let s = start(&e, "a").await.unwrap();
    until("completed", async || {
        end_reason(&e, s.session_id).await.is_some()
    })
    .await;
    e.sup.stop_session("o", "a", s.session_id).await.unwrap();
    assert_eq!(
        end_reason(&e, s.session_id).await,
        Some(EndReason::Completed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_with_a_code_ends_in_error() {
    ends_in_error_with_its_exit_code("exit-ms=50:3", 3).await;
}

/// A session of an agent run with the fake runtime's `option` (which makes it exit with
/// `code`) ends in error, saying that it exited and how.
async fn ends_in_error_with_its_exit_code(option: &str, code: i32) {
    let e = env().await;
    agent(&e, "a", &[option], 0, 1).await;
    let s = start(&e, "a").await.unwrap();
    let end = ended(&e, s.session_id).await;
    assert_eq!(end.reason, EndReason::Error);
    assert_eq!(end.exit_code, Some(code));
    let told = format!("the instance exited (exit code {code})");
    assert_eq!(end.message.as_deref(), Some(told.as_str()));
}

/// A bot process that dies mid-session (a crash, `os._exit`) closes its `/bot` connection a
/// moment before its exit is reaped: the session's end says that it exited and how, as when
/// the exit is seen first, not that "the /bot connection broke".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_dying_mid_session_is_told_by_its_exit() {
    ends_in_error_with_its_exit_code("die-ms=50:7", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_before_the_agent_binds_it_is_retried_on_another() {
    let e = env().await;
    // The first two instances find their port taken; the third starts: one answer, 200.
    agent(&e, "a", &["port-clash=2"], 0, 1).await;
    let s = start(&e, "a")
        .await
        .expect("the start is retried on a fresh port");
    assert_eq!(e.fake.starts(), 3);
    assert_eq!(end_reason(&e, s.session_id).await, None);
    e.sup.stop_session("o", "a", s.session_id).await.unwrap();
    // More clashes in a row than the retries: the start fails as the agent's exit.
    let e = env().await;
    agent(&e, "b", &["port-clash=10"], 0, 1).await;
    let err = start(&e, "b").await.unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(e.fake.starts(), 4);
    until("no instance left", async || e.fake.live().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_named() {
    let e = env().await;
    let mut profile = |s: &mut DeploymentSpec| s.agent_profile = "agent-1x".into();
    agent_with(&e, "a", &["exit-ms=50:137", "oom"], 0, 1, &mut profile).await;
    let s = start(&e, "a").await.unwrap();
    let end = ended(&e, s.session_id).await;
    assert_eq!(end.reason, EndReason::OutOfMemory);
    let msg = end.message.unwrap_or_default();
    assert!(
        msg.contains("agent-1x") && msg.contains("1024 MiB"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_ends_the_session() {
    let e = env().await;
    let mut short = |s: &mut DeploymentSpec| s.max_session_duration = Some(1);
    agent_with(&e, "a", &[], 0, 1, &mut short).await;
    let s = start(&e, "a").await.unwrap();
    until("ended", async || {
        end_reason(&e, s.session_id).await.is_some()
    })
    .await;
    assert_eq!(
        end_reason(&e, s.session_id).await,
        Some(EndReason::MaxDuration)
    );
    assert!(e.fake.live().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_in_a_row_answer_crash_loop() {
    let e = env().await;
    let a = agent(&e, "a", &["never-ready", "crash-ms=10:2"], 0, 3).await;
    for _ in 0..2 {
        let r = start(&e, "a").await;
        assert!(
            matches!(
                r,
                Err(CoreError::StartFailed {
                    code: "INSTANCE_EXITED",
                    ..
                })
            ),
            "{r:?}"
        );
    }
    let r = start(&e, "a").await;
    assert!(
        matches!(
            r,
            Err(CoreError::StartFailed {
                code: "AGENT_CRASH_LOOP",
                ..
            })
        ),
        "{r:?}"
    );
    let h = e.sup.pool_status(a.id).health;
    assert_eq!(h.consecutive_failures, 2);
    assert!(!h.ever_ready);
    assert_eq!(e.fake.starts(), 2, "no start while backing off");
}

/// Redeploys agent `a`: a new deployment running the fake script `script`, with `min` and
/// `max` as its `minAgents` and `maxAgents`. Returns the agent as updated.
async fn redeploy(e: &Env, a: &AgentRecord, script: &[&str], min: u32, max: u32) -> AgentRecord {
    let mut agent = a.clone();
    agent.min_agents = min;
    agent.max_agents = max;
    agent.desired_deployment_id = Uuid::new_v4();
    agent.updated_ms = now_ms();
    let dep = DeploymentRecord {
        id: agent.desired_deployment_id,
        agent_id: agent.id,
        spec: DeploymentSpec {
            command: Some(
                std::iter::once("fake")
                    .chain(script.iter().copied())
                    .map(String::from)
                    .collect(),
            ),
            ..DeploymentSpec::default()
        },
        created_ms: now_ms(),
    };
    e.store.update_agent(&agent, Some(&dep)).await.unwrap();
    e.sup.upsert_agent(agent.clone(), dep);
    agent
}

/// The deployment session `sid` ran.
async fn deployment_of(e: &Env, sid: Uuid) -> Uuid {
    e.store
        .get_session(sid)
        .await
        .unwrap()
        .unwrap()
        .deployment_id
}

/// A redeploy to a deployment whose instances never get ready takes nothing down: the
/// previous deployment serves every start, its warm instance first, then cold starts of it,
/// while the new one crash-loops (which shows in the status, not in the starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_that_fails_at_start_leaves_the_previous_deployment_serving() {
    let e = env().await;
    let a = warm_agent(&e, "a", 1, 10).await;
    let old = a.desired_deployment_id;
    let b = redeploy(&e, &a, &["never-ready", "crash-ms=10:2"], 1, 10).await;
    let r = start(&e, "a").await.unwrap();
    assert!(!r.cold_start, "the previous deployment's warm instance");
    assert_eq!(deployment_of(&e, r.session_id).await, old);
    until("the new deployment crash-loops", async || {
        e.sup.pool_status(a.id).health.consecutive_failures >= super::CRASH_LOOP_THRESHOLD
    })
    .await;
    for _ in 0..3 {
        let r = start(&e, "a").await;
        let r = r.expect("served by the previous deployment, not AGENT_CRASH_LOOP");
        assert!(r.cold_start);
        assert_eq!(deployment_of(&e, r.session_id).await, old);
    }
    let s = e.sup.pool_status(a.id);
    assert_eq!(s.previous.map(|p| p.deployment_id), Some(old));
    assert_eq!(e.sup.current_deployment("o", "a"), Some(old));
    assert_ne!(b.desired_deployment_id, old);
}

/// Once the new deployment has a ready instance the rollout is over: starts get the new
/// deployment's instances, and the previous one's idle instances go. Until then, starts take
/// the previous deployment's warm instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_serves_the_new_deployment_once_it_has_a_ready_instance() {
    let e = env().await;
    let a = warm_agent(&e, "a", 2, 5).await;
    let old = a.desired_deployment_id;
    let b = redeploy(&e, &a, &["ready-ms=300"], 2, 5).await;
    let new = b.desired_deployment_id;
    let r = start(&e, "a").await.unwrap();
    assert!(!r.cold_start, "the previous deployment's warm instance");
    assert_eq!(deployment_of(&e, r.session_id).await, old);
    until(
        "the new deployment ready, the previous one's idle instance gone",
        async || {
            let s = e.sup.pool_status(a.id);
            // Its busy instance stays; two of the new one are warm.
            s.previous.is_none() && s.idle == 2 && s.total == 3
        },
    )
    .await;
    let r = start(&e, "a").await.unwrap();
    assert!(!r.cold_start);
    assert_eq!(deployment_of(&e, r.session_id).await, new);
    assert_eq!(e.sup.current_deployment("o", "a"), Some(new));
}

/// At `minAgents == maxAgents` the previous deployment's idle instance makes room for the new
/// one's first instance, so that the rollout goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_at_min_agents_equal_to_max_agents_rolls_over() {
    let e = env().await;
    let a = warm_agent(&e, "a", 1, 1).await;
    let b = redeploy(&e, &a, &["ready-ms=50"], 1, 1).await;
    until("the new deployment ready", async || {
        let s = e.sup.pool_status(a.id);
        s.previous.is_none() && s.idle == 1 && s.total == 1
    })
    .await;
    let r = start(&e, "a").await.unwrap();
    assert!(!r.cold_start);
    assert_eq!(
        deployment_of(&e, r.session_id).await,
        b.desired_deployment_id
    );
}

/// With `minAgents` 0 the new deployment has nothing to prove: it serves at once, failing or
/// not, and the previous one's idle instances go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_with_min_agents_0_switches_at_once() {
    let e = env().await;
    let a = warm_agent(&e, "a", 1, 3).await;
    let b = redeploy(&e, &a, &[], 0, 3).await;
    assert!(e.sup.pool_status(a.id).previous.is_none());
    assert_eq!(
        e.sup.current_deployment("o", "a"),
        Some(b.desired_deployment_id)
    );
    let r = start(&e, "a").await.unwrap();
    assert!(
        r.cold_start,
        "the previous deployment's idle instance is not taken"
    );
    assert_eq!(
        deployment_of(&e, r.session_id).await,
        b.desired_deployment_id
    );
    redeploy(&e, &b, &["never-ready", "crash-ms=10:2"], 0, 3).await;
    let r = start(&e, "a").await;
    assert!(
        matches!(
            r,
            Err(CoreError::StartFailed {
                code: "INSTANCE_EXITED",
                ..
            })
        ),
        "{r:?}"
    );
}

/// A start of session `sid` of agent `name` on `e`'s engine (to await or spawn), over
/// `transport` (`None`: the default).
fn start_of(
    e: &Env,
    name: &str,
    sid: Uuid,
    transport: Option<&str>,
) -> impl std::future::Future<Output = Result<super::StartOutcome, CoreError>> + 'static {
    let (sup, name) = (e.sup.clone(), name.to_string());
    let p = StartParams {
        session_id: Some(sid),
        transport: transport.map(str::to_string),
        ..StartParams::default()
    };
    async move { sup.start_session("o", &name, p).await }
}

/// Starts a session of agent `name` on a task of its own and waits until its record is stored
/// (the start still in flight); the session's id and the start's task.
async fn start_until_stored(
    e: &Env,
    name: &str,
) -> (
    Uuid,
    tokio::task::JoinHandle<Result<super::StartOutcome, CoreError>>,
) {
    let sid = Uuid::new_v4();
    let starting = tokio::spawn(start_of(e, name, sid, None));
    until("session stored", async || {
        e.store.get_session(sid).await.unwrap().is_some()
    })
    .await;
    (sid, starting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_start() {
    let e = env().await;
    agent(&e, "a", &["ready-ms=2000"], 0, 1).await;
    let (sid, starting) = start_until_stored(&e, "a").await;
    e.sup.stop_session("o", "a", sid).await.unwrap();
    let r = starting.await.unwrap();
    assert!(matches!(r, Err(CoreError::StoppedDuringStart(_))), "{r:?}");
    assert_eq!(
        end_reason(&e, sid).await,
        Some(EndReason::StoppedDuringStart)
    );
    assert!(e.fake.live().is_empty());
}

/// A second start of a session id that is live here (an id the caller gives or the start
/// derives, its first start not recorded yet, or delivered) is refused at once with the
/// store's answer for a taken id, and takes nothing: no warm instance, no capacity slot, no
/// store write. The first start goes on and its stop removes its instance. (The second start
/// took the live set's entry: its undo removed it, and the first instance was never stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_of_a_live_session_id_is_refused_and_takes_nothing() {
    let e = env().await;
    let a = warm_agent(&e, "a", 2, 2).await;
    let counts = || {
        let p = e.sup.pool_status(a.id);
        (p.idle, p.starting, p.busy, p.total)
    };
    let sid = Uuid::new_v4();
    // The first start takes a warm instance; its record's write waits for the lock.
    let lock = WriteLock::take(&e);
    let first = tokio::spawn(start_of(&e, "a", sid, None));
    until("the first start is placed", async || e.sup.serves(sid)).await;
    let placed = counts();
    assert_eq!(placed, (1, 0, 1, 2), "(idle, starting, busy, total)");
    let r = tokio::time::timeout(Duration::from_secs(2), start_of(&e, "a", sid, None))
        .await
        .expect("refused at once, without waiting for the store");
    assert!(
        matches!(r, Err(CoreError::Store(store::StoreError::Conflict))),
        "{r:?}"
    );
    assert_eq!(counts(), placed);
    drop(lock);
    assert_eq!(first.await.unwrap().unwrap().session_id, sid);
    // Delivered: refused alike.
    let r = start_of(&e, "a", sid, None).await;
    assert!(
        matches!(r, Err(CoreError::Store(store::StoreError::Conflict))),
        "{r:?}"
    );
    assert_eq!(counts(), placed);
    assert_eq!(e.fake.starts(), 2);
    assert_eq!(e.store.slots_held(a.id).await.unwrap(), 2);
    assert_eq!(end_reason(&e, sid).await, None);
    let iid = e
        .store
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.session_id == Some(sid))
        .expect("the first start's instance")
        .id;
    assert!(e.sup.serves(sid));
    stop_removes(&e, sid, iid).await;
}

/// Stops session `sid` of agent `a`: it ends `stopped`, is no longer served here, and its
/// instance `iid` is removed.
async fn stop_removes(e: &Env, sid: Uuid, iid: Uuid) {
    e.sup.stop_session("o", "a", sid).await.unwrap();
    assert_eq!(end_reason(e, sid).await, Some(EndReason::Stopped));
    assert!(!e.sup.serves(sid));
    assert!(
        !e.fake.live().contains(&iid),
        "its stop removed its instance"
    );
}

/// A stop while the runtime is still making the instance (the process runtime waiting for a
/// fork server that imports the bot: `start-ms`) answers without waiting for it: the start
/// gets `409 STOPPED_DURING_START`, the runtime is told to give up, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_runtime_makes_the_instance_does_not_wait_for_it() {
    let e = env().await;
    agent(&e, "a", &["start-ms=600000"], 0, 1).await;
    let (sid, starting) = start_until_stored(&e, "a").await;
    // Generous bounds: without the fix both wait for the runtime's 600 s.
    let stop = tokio::time::timeout(Duration::from_secs(20), e.sup.stop_session("o", "a", sid));
    stop.await
        .expect("the stop waited for the runtime's start")
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), starting)
        .await
        .expect("the start waited for the runtime")
        .unwrap();
    assert!(matches!(r, Err(CoreError::StoppedDuringStart(_))), "{r:?}");
    assert_eq!(
        end_reason(&e, sid).await,
        Some(EndReason::StoppedDuringStart)
    );
    assert!(e.fake.live().is_empty());
    assert_eq!(e.fake.starts(), 0);
    let events = e.fake.events();
    assert!(
        events.iter().any(|ev| ev.starts_with("abandoned ")),
        "{events:?}"
    );
}

/// The start timeout (5 s here) bounds the whole start, the time the runtime takes to make the
/// instance included: made in 4 s and ready 4 s later is too late, and a runtime that never
/// makes it is given up at the timeout. The message says what was missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_timeout_counts_the_time_the_runtime_takes_to_make_the_instance() {
    let e = env().await;
    agent(&e, "slow", &["start-ms=4000", "ready-ms=4000"], 0, 1).await;
    agent(&e, "hung", &["start-ms=600000"], 0, 1).await;
    agent(&e, "never", &["never-ready"], 0, 1).await;
    let timed_out = |r: Result<super::StartOutcome, CoreError>| match r {
        Err(CoreError::StartFailed {
            code: "START_TIMEOUT",
            message,
        }) => message,
        other => panic!("expected START_TIMEOUT, got {other:?}"),
    };
    let bounded = |f| tokio::time::timeout(Duration::from_secs(30), f);
    let slow = timed_out(bounded(start(&e, "slow")).await.expect("bounded"));
    assert!(
        slow.starts_with("instance did not answer /readyz with 200 within 5 s ("),
        "{slow}"
    );
    let hung = timed_out(
        bounded(start(&e, "hung"))
            .await
            .expect("the start waited for the runtime"),
    );
    assert_eq!(
        hung,
        "instance did not answer /readyz with 200 within 5 s (the instance was not made yet)"
    );
    let never = timed_out(bounded(start(&e, "never")).await.expect("bounded"));
    assert_eq!(
        never,
        "instance did not answer /readyz with 200 within 5 s (its last answer was 503)"
    );
    until("every instance gone", async || e.fake.live().is_empty()).await;
    let events = e.fake.events();
    assert_eq!(
        events
            .iter()
            .filter(|ev| ev.starts_with("abandoned "))
            .count(),
        1,
        "{events:?}"
    );
}

/// An instance and its delivered session as a previous run left them.
async fn left_by_previous_run(e: &Env, a: &AgentRecord) -> (Uuid, Uuid) {
    left_by(e, a, "n1").await
}

/// An instance and its delivered session as node `node` left them.
async fn left_by(e: &Env, a: &AgentRecord, node: &str) -> (Uuid, Uuid) {
    left_with(e, a, node, None).await
}

/// [`left_by`] for a session of `transport`.
async fn left_with(e: &Env, a: &AgentRecord, node: &str, transport: Option<&str>) -> (Uuid, Uuid) {
    let dep = e
        .store
        .get_deployment(a.desired_deployment_id)
        .await
        .unwrap()
        .unwrap();
    let p = e.fake.prepare(&dep).unwrap();
    let iid = Uuid::new_v4();
    let (tx, _rx) = mpsc::unbounded_channel();
    let sink = LogSink::new(
        tx,
        Arc::new(parking_lot::Mutex::new(LogAttribution {
            org: "o".into(),
            agent_id: a.id,
            deployment_id: dep.id,
            instance_id: iid,
            session_id: None,
        })),
        crate::runtime::logs::LogRate::UNLIMITED,
    );
    let spec = InstanceSpec {
        instance_id: iid,
        program: p.program,
        args: p.args,
        working_dir: None,
        env: vec![],
        limits: None,
        agent: None,
        deployment: None,
        abandoned: Default::default(),
    };
    let inst = e.fake.start(spec, sink).await.unwrap();
    let sid = Uuid::new_v4();
    let now = now_ms();
    let s = SessionRecord {
        id: sid,
        org: "o".into(),
        agent_id: a.id,
        deployment_id: dep.id,
        created_ms: now,
        updated_ms: now,
        bot_start_ms: None,
        cold_start: Some(true),
        transport: transport.map(str::to_string),
        end: None,
        samples: Vec::new(),
        node_id: node.into(),
        daily_room: None,
    };
    e.store.insert_session(&s).await.unwrap();
    e.store.mark_delivered(sid, 5).await.unwrap();
    let rec = InstanceRecord {
        id: iid,
        agent_id: a.id,
        deployment_id: dep.id,
        session_id: Some(sid),
        runtime: e.fake.kind().as_str().to_string(),
        placement: inst.placement(),
        created_ms: now,
        node_id: node.into(),
    };
    e.store.put_instance(&rec).await.unwrap();
    (iid, sid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_re_adopts_a_live_session() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let (iid, sid) = left_by_previous_run(&e, &a).await;
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    assert!(sup.session_addr(sid, Duration::ZERO).await.is_some());
    assert_eq!(e.fake.live(), vec![iid]);
    sup.stop_session("o", "a", sid).await.unwrap();
    assert_eq!(end_reason(&e, sid).await, Some(EndReason::Stopped));
    assert!(e.fake.live().is_empty());
}

/// A delivered websocket session ends with the server process that relays it: after a
/// restart, one that no live process relays any more (no relay mark held) is recorded `lost`
/// and its instance removed, never re-adopted (it held its slot until its time limit); one a
/// live process still relays (a server detached for an upgrade) is re-adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_ends_a_websocket_session_whose_relay_is_gone() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let (_, gone) = left_with(&e, &a, "n1", Some("websocket")).await;
    let (kept_iid, kept) = left_with(&e, &a, "n1", Some("websocket")).await;
    let dir = tempfile::tempdir().unwrap();
    let relays = dir.path().join("relays");
    // The detached server's mark (another open of the file: as another process holds it).
    let _detached = super::relays::RelayMarks::new(Some(relays.clone()))
        .hold(kept)
        .unwrap();
    let (logs, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let cfg = SupervisorConfig {
        relay_dir: Some(relays),
        ..config()
    };
    let sup = Supervisor::new(
        e.store.clone(),
        Arc::new(e.fake.clone()),
        cfg,
        logs,
        Arc::new(NoSecrets),
    );
    sup.recover().await.unwrap();
    let s = e.store.get_session(gone).await.unwrap().unwrap();
    let end = s.end.expect("ended at the restart");
    assert_eq!(end.reason, EndReason::Lost);
    assert!(
        end.message.unwrap_or_default().contains("relay"),
        "says why"
    );
    assert!(!sup.serves(gone));
    assert_eq!(
        e.fake.live(),
        vec![kept_iid],
        "only the relayed one runs on"
    );
    assert_eq!(e.store.list_instances().await.unwrap().len(), 1);
    assert_eq!(end_reason(&e, kept).await, None);
    assert!(sup.serves(kept));
}

/// An instance that ended while no control plane watched it, where the runtime still knows
/// how (a container's state): its delivered session is recorded as it ended (exit code, OOM,
/// a requested stop), not `lost`; one the runtime knows nothing of stays `lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_records_how_an_unwatched_instance_ended() {
    let e = env().await;
    let cases = [
        (
            "err",
            vec!["crash-ms=30:3"],
            false,
            EndReason::Error,
            Some(3),
        ),
        (
            "done",
            vec!["crash-ms=30:0"],
            false,
            EndReason::Completed,
            Some(0),
        ),
        (
            "oom",
            vec!["crash-ms=30:137", "oom"],
            false,
            EndReason::OutOfMemory,
            Some(137),
        ),
        (
            "stopped",
            vec!["crash-ms=30:0"],
            true,
            EndReason::Stopped,
            Some(0),
        ),
    ];
    let mut left = Vec::new();
    for (name, script, stop, ..) in &cases {
        let a = agent(&e, name, script, 0, 1).await;
        let (_, sid) = left_by_previous_run(&e, &a).await;
        if *stop {
            e.store.request_stop(sid, now_ms() + 60_000).await.unwrap();
        }
        left.push(sid);
    }
    // One whose instance the runtime has forgotten entirely.
    let a = agent(&e, "forgotten", &[], 0, 1).await;
    let (iid, forgotten) = left_by_previous_run(&e, &a).await;
    e.fake.forget(iid).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    for ((name, _, _, reason, code), sid) in cases.iter().zip(&left) {
        let s = e.store.get_session(*sid).await.unwrap().unwrap();
        let end = s.end.expect("ended");
        assert_eq!(end.reason, *reason, "{name}");
        assert_eq!(end.exit_code, *code, "{name}");
        let msg = end.message.unwrap_or_default();
        assert!(
            msg.contains("exited while no control plane watched it"),
            "{name}: {msg}"
        );
        assert!(
            end.ended_ms >= s.created_ms && end.ended_ms <= now_ms(),
            "{name}"
        );
    }
    assert_eq!(end_reason(&e, forgotten).await, Some(EndReason::Lost));
    assert!(e.fake.live().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_finishes_a_stop_cut_off_by_a_restart() {
    let e = env().await;
    let mut grace = |s: &mut DeploymentSpec| s.stop_grace_seconds = Some(20.0);
    let a = agent_with(&e, "a", &["stubborn"], 0, 1, &mut grace).await;
    let (_, sid) = left_by_previous_run(&e, &a).await;
    // The previous run recorded the stop 19.7 s into a 20 s grace, then died.
    e.store.request_stop(sid, now_ms() + 300).await.unwrap();
    let sup = engine(&e.store, &e.fake);
    let t0 = std::time::Instant::now();
    sup.recover().await.unwrap();
    sup.stop_session("o", "a", sid).await.unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "no second full grace: {took:?}"
    );
    assert_eq!(end_reason(&e, sid).await, Some(EndReason::Stopped));
    assert!(e.fake.live().is_empty());
    assert!(e.fake.events().iter().any(|x| x.starts_with("sigkill")));
}

/// A node's recovery touches only its own records: another node's session stays open and
/// its instance runs on (before ownership, a restarting node ended every session it found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_leaves_another_nodes_sessions_alone() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let (iid, sid) = left_by(&e, &a, "n2").await;
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    assert_eq!(end_reason(&e, sid).await, None);
    assert_eq!(e.fake.live(), vec![iid]);
    assert_eq!(e.store.list_instances().await.unwrap().len(), 1);
    assert!(!sup.serves(sid));
}

/// A dead node is taken over once: its sessions (whose instances this node cannot reach)
/// end `lost` saying the node was lost, and its instance records go, freeing capacity. A node
/// with a fresh heartbeat is never taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_sessions_end_lost_once() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let (_, sid) = left_by(&e, &a, "n2").await;
    let node = |id: &str, hb: i64| crate::store::NodeRecord {
        id: id.into(),
        advertise_url: None,
        version: "t".into(),
        started_ms: 0,
        heartbeat_ms: hb,
        instances: 1,
        busy: 1,
        key_check: None,
        secret_check: None,
    };
    let now = now_ms();
    e.store.heartbeat(&node("n2", now)).await.unwrap();
    assert_eq!(e.sup.take_over("n2", now - 2000).await.unwrap(), None);
    assert_eq!(end_reason(&e, sid).await, None);
    e.store.heartbeat(&node("n2", now - 5000)).await.unwrap();
    assert_eq!(e.sup.take_over("n2", now - 2000).await.unwrap(), Some(1));
    let s = e.store.get_session(sid).await.unwrap().unwrap();
    let end = s.end.unwrap();
    assert_eq!(end.reason, EndReason::Lost);
    assert!(
        end.message
            .as_deref()
            .unwrap_or("")
            .contains("node n2 was lost"),
        "{end:?}"
    );
    assert_eq!(s.node_id, "n1");
    assert!(e.store.list_instances().await.unwrap().is_empty());
    // A second taker finds nothing left.
    assert_eq!(e.sup.take_over("n2", now - 2000).await.unwrap(), Some(0));
    // Stopping it answers as for any ended session.
    e.sup.stop_session("o", "a", sid).await.unwrap();
}

/// Records the Daily rooms the engine asks to delete.
#[derive(Default)]
struct Rooms(parking_lot::Mutex<Vec<String>>);

impl super::RoomRemover for Rooms {
    fn remove(&self, _org: &str, _session: Uuid, room: &str) {
        self.0.lock().push(room.to_string());
    }
}

/// The rooms recorded with sessions are deleted by the process that records their end, not
/// only by the one that made them: a restart that finds a session without its instance, and
/// a takeover of a lost node, delete its room. A kept room stays once its session reached
/// its agent; one kept for a session never delivered goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_of_sessions_ended_by_a_restart_or_a_takeover_are_deleted() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 4).await;
    let now = now_ms();
    let open = |node: &str, room: &str, keep: bool, delivered: bool| SessionRecord {
        id: Uuid::new_v4(),
        org: "o".into(),
        agent_id: a.id,
        deployment_id: a.desired_deployment_id,
        created_ms: now,
        updated_ms: now,
        bot_start_ms: delivered.then_some(5),
        cold_start: Some(true),
        transport: Some("daily".into()),
        end: None,
        samples: Vec::new(),
        node_id: node.into(),
        daily_room: Some(crate::model::SessionRoom {
            name: room.into(),
            keep,
        }),
    };
    for s in [
        open("n1", "lost", false, true),
        open("n1", "kept", true, true),
        open("n1", "kept-undelivered", true, false),
        open("n2", "taken-over", false, true),
    ] {
        e.store.insert_session(&s).await.unwrap();
    }
    let sup = engine(&e.store, &e.fake);
    let rooms = Arc::new(Rooms::default());
    sup.set_room_remover(rooms.clone());
    sup.recover().await.unwrap();
    let deleted = || {
        let mut v = rooms.0.lock().clone();
        v.sort();
        v
    };
    assert_eq!(deleted(), ["kept-undelivered", "lost"]);
    let node = crate::store::NodeRecord {
        id: "n2".into(),
        advertise_url: None,
        version: "t".into(),
        started_ms: 0,
        heartbeat_ms: now - 5000,
        instances: 0,
        busy: 0,
        key_check: None,
        secret_check: None,
    };
    e.store.heartbeat(&node).await.unwrap();
    assert_eq!(sup.take_over("n2", now - 2000).await.unwrap(), Some(1));
    assert_eq!(deleted(), ["kept-undelivered", "lost", "taken-over"]);
}

/// A node that was fenced (its heartbeats late) reconciles with the store: the instance
/// whose session another node ended `lost` (and whose record it dropped) is removed at once,
/// with no second end written; the instance still its own is kept and its session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_node_removes_what_was_taken_over_and_keeps_the_rest() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 2).await;
    let (lost_iid, lost) = left_by_previous_run(&e, &a).await;
    let (kept_iid, kept) = left_by_previous_run(&e, &a).await;
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    assert_eq!(e.fake.live().len(), 2);
    // What a taker does to a session it cannot reach: ends it, drops its instance record.
    let end = crate::model::SessionEnd {
        ended_ms: now_ms(),
        reason: EndReason::Lost,
        completion_status: "HTTP_ERROR".into(),
        exit_code: None,
        exit_signal: None,
        message: Some("node n1 was lost".into()),
    };
    assert!(e.store.end_session(lost, &end).await.unwrap());
    e.store.delete_instance(lost_iid).await.unwrap();
    let done = sup.rejoin().await.unwrap();
    assert_eq!(
        done,
        super::Rejoined {
            removed: 1,
            released: 0,
            kept: 1
        }
    );
    assert_eq!(e.fake.live(), vec![kept_iid]);
    assert!(!sup.serves(lost));
    assert!(sup.serves(kept));
    let s = e.store.get_session(lost).await.unwrap().unwrap();
    assert_eq!(
        s.end.as_ref().unwrap().message.as_deref(),
        Some("node n1 was lost")
    );
    assert_eq!(end_reason(&e, kept).await, None);
    sup.stop_session("o", "a", kept).await.unwrap();
    assert_eq!(end_reason(&e, kept).await, Some(EndReason::Stopped));
}

/// A start whose session another node ended before it was delivered (a takeover while this
/// node was frozen or cut off) is not answered as started: 503 `NODE_FENCED`, the taker's end
/// stays, and the instance is removed.
#[tokio::test]
async fn a_start_whose_session_was_ended_elsewhere_before_delivery_is_not_answered_started() {
    let e = env().await;
    agent(&e, "a", &["ready-ms=300"], 0, 2).await;
    let (sid, start) = start_until_stored(&e, "a").await;
    let end = crate::model::SessionEnd {
        ended_ms: now_ms(),
        reason: EndReason::Lost,
        completion_status: "HTTP_ERROR".into(),
        exit_code: None,
        exit_signal: None,
        message: Some("node n1 was lost".into()),
    };
    assert!(e.store.end_session(sid, &end).await.unwrap());
    match start.await.unwrap() {
        Err(CoreError::StartFailed { code, .. }) => assert_eq!(code, "NODE_FENCED"),
        r => panic!("expected NODE_FENCED, got {r:?}"),
    }
    until("the instance to be gone", async || e.fake.live().is_empty()).await;
    let s = e.store.get_session(sid).await.unwrap().unwrap();
    assert_eq!(s.end, Some(end));
    assert_eq!(s.bot_start_ms, None);
}

/// The plain decisions, without an engine: admission and the pool plan over a pool's state.
mod decisions {
    use std::sync::Arc;

    use tokio::time::Instant;
    use uuid::Uuid;

    use super::super::admission::{admit, Admission};
    use super::super::health::StartFailure;
    use super::super::pool::plan;
    use super::super::state::{AgentPool, InstState, InstanceCtl};
    use crate::core::CoreError;
    use crate::model::{now_ms, AgentRecord, DeploymentRecord, DeploymentSpec};

    /// A starting instance is polled every millisecond at first, then at a share of the
    /// time it has taken (its readiness unseen for at most 2.5 % of its start, 2.5 ms for an
    /// agent ready in 100 ms), never less often than every 5 ms; a 700 ms start costs about
    /// 200 polls, not thousands. One a session waits for is polled twice as often at first
    /// and then at 1 % of its start, up to the same 5 ms: its readiness is seen at most 1 ms
    /// late for an agent ready in 100 ms, for about 170 polls over a 100 ms start and 370 over
    /// 700 ms.
    #[test]
    fn ready_polls_scale_with_the_time_a_start_has_taken() {
        use super::super::{
            next_ready_poll, FIRST_READY_POLL, READY_POLL, WAITED_FIRST_READY_POLL,
        };
        use std::time::Duration;
        let ms = Duration::from_millis;
        assert_eq!(next_ready_poll(ms(0), false), FIRST_READY_POLL);
        assert_eq!(next_ready_poll(ms(30), false), FIRST_READY_POLL);
        assert_eq!(next_ready_poll(ms(100), false), Duration::from_micros(2500));
        assert_eq!(next_ready_poll(ms(700), false), READY_POLL);
        assert_eq!(next_ready_poll(Duration::from_secs(60), false), READY_POLL);
        assert_eq!(next_ready_poll(ms(0), true), WAITED_FIRST_READY_POLL);
        assert_eq!(next_ready_poll(ms(30), true), WAITED_FIRST_READY_POLL);
        assert_eq!(next_ready_poll(ms(100), true), ms(1));
        assert_eq!(next_ready_poll(ms(200), true), ms(2));
        assert_eq!(next_ready_poll(ms(700), true), READY_POLL);
        assert_eq!(next_ready_poll(Duration::from_secs(60), true), READY_POLL);
        let polls = |until: Duration, waited: bool| {
            let (mut t, mut n) = (Duration::ZERO, 0);
            while t < until {
                t += next_ready_poll(t, waited);
                n += 1;
            }
            n
        };
        assert!(polls(ms(100), false) <= 80, "{}", polls(ms(100), false));
        assert!(polls(ms(700), false) <= 220, "{}", polls(ms(700), false));
        assert!(polls(ms(100), true) <= 180, "{}", polls(ms(100), true));
        assert!(polls(ms(700), true) <= 380, "{}", polls(ms(700), true));
    }

    fn pool(min: u32, max: u32) -> AgentPool {
        let agent = AgentRecord {
            id: Uuid::new_v4(),
            org: "o".into(),
            name: "a".into(),
            region: "local".into(),
            min_agents: min,
            max_agents: max,
            desired_deployment_id: Uuid::new_v4(),
            created_ms: now_ms(),
            updated_ms: now_ms(),
            deleted_ms: None,
        };
        let dep = DeploymentRecord {
            id: agent.desired_deployment_id,
            agent_id: agent.id,
            spec: DeploymentSpec::default(),
            created_ms: now_ms(),
        };
        AgentPool::new(agent, Arc::new(dep), None)
    }

    fn add(p: &mut AgentPool, state: InstState, current: bool) -> Arc<InstanceCtl> {
        let dep = if current {
            p.deployment.clone()
        } else {
            Arc::new(DeploymentRecord {
                id: Uuid::new_v4(),
                ..(*p.deployment).clone()
            })
        };
        let session = matches!(state, InstState::Claimed | InstState::Busy).then(Uuid::new_v4);
        let (c, _mb) = InstanceCtl::new(&p.agent, dep, state, session, None);
        p.instances.insert(c.id, c.clone());
        c
    }

    /// An instance that begins to end and a start that claims it at the same moment: the
    /// claim either came first (and its session ends with the instance) or fails, from any
    /// interleaving of the two threads.
    #[test]
    fn an_ending_instance_is_claimed_before_or_not_at_all() {
        for _ in 0..2_000 {
            let mut p = pool(1, 1);
            let idle = add(&mut p, InstState::Idle, true);
            let s1 = Uuid::new_v4();
            let c = idle.clone();
            let ending = std::thread::spawn(move || c.begin_ending());
            let claimed = idle.try_claim(InstState::Idle, InstState::Busy, s1);
            let ended_with = ending.join().unwrap();
            assert_eq!(ended_with, claimed.then_some(s1));
            assert_eq!(idle.state(), InstState::Ending);
        }
    }

    #[test]
    fn admission_order_is_idle_then_starting_then_cold_then_429() {
        let now = Instant::now();
        let mut p = pool(0, 3);
        let starting = add(&mut p, InstState::Starting, true);
        let idle = add(&mut p, InstState::Idle, true);
        add(&mut p, InstState::Idle, false);
        let s1 = Uuid::new_v4();
        match admit(&p, "a", s1, now).unwrap() {
            Admission::Warm(c) => assert_eq!(c.id, idle.id),
            _ => panic!("a ready warm instance of the current deployment first"),
        }
        assert_eq!(idle.state(), InstState::Busy);
        assert_eq!(idle.session(), Some(s1));
        match admit(&p, "a", Uuid::new_v4(), now).unwrap() {
            Admission::Claimed(c) => assert_eq!(c.id, starting.id),
            _ => panic!("then a starting one"),
        }
        assert_eq!(starting.state(), InstState::Claimed);
        // Three instances at maxAgents 3 (the old deployment's idle one counts too).
        assert!(matches!(
            admit(&p, "a", Uuid::new_v4(), now),
            Err(CoreError::AtCapacity(_))
        ));
        p.agent.max_agents = 4;
        assert!(matches!(
            admit(&p, "a", Uuid::new_v4(), now),
            Ok(Admission::Cold)
        ));
    }

    #[test]
    fn admission_refuses_a_crash_looping_deployment_while_it_backs_off() {
        let now = Instant::now();
        let mut p = pool(0, 3);
        let h = p.health.entry(p.deployment.id).or_default();
        for _ in 0..2 {
            h.failed(
                StartFailure {
                    reason: "exited",
                    exit: None,
                    stderr_tail: "boom".into(),
                    stream: "stderr",
                    at_ms: 0,
                },
                now,
            );
        }
        let r = admit(&p, "a", Uuid::new_v4(), now);
        assert!(matches!(
            r,
            Err(CoreError::StartFailed {
                code: "AGENT_CRASH_LOOP",
                ..
            })
        ));
        let later = now + std::time::Duration::from_secs(60);
        assert!(matches!(
            admit(&p, "a", Uuid::new_v4(), later),
            Ok(Admission::Cold)
        ));
    }

    #[test]
    fn the_pool_plan_fills_to_min_within_max_and_trims_the_rest() {
        let now = Instant::now();
        let mut p = pool(2, 3);
        assert_eq!(plan(&p, false, p.agent.min_agents, 0, now).spawn, 2);
        add(&mut p, InstState::Busy, true);
        add(&mut p, InstState::Claimed, true);
        // Two slots used by sessions, one left under maxAgents.
        assert_eq!(plan(&p, false, p.agent.min_agents, 0, now).spawn, 1);
        let mut p = pool(1, 5);
        for _ in 0..3 {
            add(&mut p, InstState::Idle, true);
        }
        let old = add(&mut p, InstState::Idle, false);
        let pl = plan(&p, false, p.agent.min_agents, 0, now);
        assert_eq!(pl.spawn, 0);
        assert_eq!(
            pl.stop.len(),
            3,
            "two extra idle ones and the old deployment's"
        );
        assert!(pl.stop.iter().any(|c| c.id == old.id));
        let pl = plan(&p, true, p.agent.min_agents, 0, now);
        assert_eq!(pl.stop.len(), 4, "a drain removes every idle instance");
    }

    #[test]
    fn the_pool_plan_starts_at_most_max_starting_warm_instances_at_once() {
        let now = Instant::now();
        let mut p = pool(100, 200);
        assert_eq!(plan(&p, false, 100, 16, now).spawn, 16);
        assert_eq!(plan(&p, false, 100, 0, now).spawn, 100, "0: no limit");
        // Reserving and starting ones count; ready, busy and claimed ones do not.
        p.reserving = 5;
        for _ in 0..10 {
            add(&mut p, InstState::Starting, true);
        }
        for _ in 0..20 {
            add(&mut p, InstState::Idle, true);
            add(&mut p, InstState::Busy, true);
        }
        add(&mut p, InstState::Claimed, true);
        assert_eq!(plan(&p, false, 100, 16, now).spawn, 1);
        p.reserving = 6;
        assert_eq!(plan(&p, false, 100, 16, now).spawn, 0);
        // Still within minAgents and maxAgents.
        assert_eq!(plan(&p, false, 100, 1000, now).spawn, 100 - 36);
    }

    /// During a rollout the previous deployment's idle instances stay (another old one's go),
    /// except one that makes room at `maxAgents` for the current deployment's first instance.
    #[test]
    fn the_pool_plan_keeps_the_previous_deployment_during_a_rollout() {
        let now = Instant::now();
        let mut p = pool(1, 3);
        let prev = add(&mut p, InstState::Idle, false);
        p.previous = Some(prev.deployment.clone());
        let other = add(&mut p, InstState::Idle, false);
        let pl = plan(&p, false, 1, 0, now);
        assert_eq!(pl.spawn, 1);
        assert_eq!(pl.stop.len(), 1);
        assert_eq!(pl.stop[0].id, other.id, "only the older deployment's");
        // At maxAgents with nothing of the current deployment: the previous one makes room.
        p.instances.remove(&other.id);
        p.agent.max_agents = 1;
        let pl = plan(&p, false, 1, 0, now);
        assert_eq!(pl.spawn, 0);
        assert_eq!(pl.stop.len(), 1);
        assert_eq!(pl.stop[0].id, prev.id);
        // Not while an instance is ending (room is being made), nor once the current
        // deployment has one.
        let ending = add(&mut p, InstState::Ending, false);
        assert!(plan(&p, false, 1, 0, now).stop.is_empty());
        p.instances.remove(&ending.id);
        p.agent.max_agents = 2;
        add(&mut p, InstState::Starting, true);
        let pl = plan(&p, false, 1, 0, now);
        assert!(pl.stop.is_empty() && pl.spawn == 0);
        // A drain takes them all the same.
        assert_eq!(plan(&p, true, 1, 0, now).stop.len(), 1);
    }

    /// A start during a rollout runs the previous deployment, whatever the current one's
    /// health; the previous one's crash loop refuses.
    #[test]
    fn admission_during_a_rollout_takes_the_previous_deployment() {
        let now = Instant::now();
        let mut p = pool(1, 3);
        let prev = add(&mut p, InstState::Idle, false);
        let starting = add(&mut p, InstState::Starting, true);
        p.previous = Some(prev.deployment.clone());
        p.deploy_error = Some("broken".into());
        let fail = |h: &mut super::super::health::Health| {
            for _ in 0..2 {
                h.failed(
                    StartFailure {
                        reason: "exited",
                        exit: None,
                        stderr_tail: "boom".into(),
                        stream: "stderr",
                        at_ms: 0,
                    },
                    now,
                );
            }
        };
        fail(p.health.entry(p.deployment.id).or_default());
        match admit(&p, "a", Uuid::new_v4(), now).unwrap() {
            Admission::Warm(c) => assert_eq!(c.id, prev.id),
            _ => panic!("the previous deployment's idle instance"),
        }
        assert!(
            matches!(admit(&p, "a", Uuid::new_v4(), now), Ok(Admission::Cold)),
            "a cold start, not the current deployment's starting instance"
        );
        assert_eq!(starting.state(), InstState::Starting);
        fail(p.health.entry(prev.deployment.id).or_default());
        assert!(matches!(
            admit(&p, "a", Uuid::new_v4(), now),
            Err(CoreError::StartFailed {
                code: "AGENT_CRASH_LOOP",
                ..
            })
        ));
    }

    /// A redeploy keeps the deployment that could serve as the previous one while the new one
    /// has warm instances to prove itself with; not at `minAgents` 0, not a failing one, and a
    /// redeploy back to the previous deployment ends the rollout.
    #[test]
    fn a_redeploy_keeps_what_served_until_the_new_deployment_is_proven() {
        let dep = |p: &AgentPool| {
            Arc::new(DeploymentRecord {
                id: Uuid::new_v4(),
                ..(*p.deployment).clone()
            })
        };
        let mut p = pool(1, 3);
        p.redeploy(dep(&p), None, 0);
        assert!(
            p.previous.is_none(),
            "minAgents 0: the new one serves at once"
        );
        let mut p = pool(1, 3);
        let a = p.deployment.clone();
        let b = dep(&p);
        p.redeploy(b.clone(), None, 1);
        assert_eq!(p.previous.as_ref().map(|d| d.id), Some(a.id));
        assert_eq!(p.serving().id, a.id);
        // Another redeploy before `b` is proven: `a` still serves.
        let c = dep(&p);
        p.redeploy(c.clone(), None, 1);
        assert_eq!(p.previous.as_ref().map(|d| d.id), Some(a.id));
        assert!(!p.proven(b.id));
        assert!(p.proven(c.id));
        assert!(p.previous.is_none() && p.serving().id == c.id);
        // A failing deployment is not kept serving.
        p.deploy_error = Some("broken".into());
        p.redeploy(dep(&p), None, 1);
        assert!(p.previous.is_none());
        // Back to the deployment that serves: nothing to roll out.
        let d = p.deployment.clone();
        p.redeploy(dep(&p), None, 1);
        p.redeploy(d.clone(), None, 1);
        assert!(p.previous.is_none() && p.serving().id == d.id);
    }

    #[test]
    fn a_deleted_agent_without_instances_is_forgotten() {
        let mut p = pool(1, 5);
        p.agent.deleted_ms = Some(now_ms());
        let pl = plan(&p, false, p.agent.min_agents, 0, Instant::now());
        assert!(pl.forget && pl.spawn == 0);
        add(&mut p, InstState::Busy, true);
        assert!(!plan(&p, false, p.agent.min_agents, 0, Instant::now()).forget);
    }
}

/// The network between nodes as the engine sees it: records where each forwarded stop went;
/// the node at `refuses` does not answer.
struct Forwards {
    calls: parking_lot::Mutex<Vec<String>>,
    refuses: &'static str,
}

#[async_trait::async_trait]
impl super::Peers for Forwards {
    async fn stop(&self, url: &str, _session: Uuid) -> Result<super::PeerStop, String> {
        self.calls.lock().push(url.to_string());
        if url == self.refuses {
            return Err("connection refused".into());
        }
        if url == FROZEN {
            // Took the request, never answers (a frozen process, a lost machine).
            std::future::pending::<()>().await;
        }
        Ok(super::PeerStop::Stopped)
    }
}

/// The address of a node that takes a forwarded stop and never answers.
const FROZEN: &str = "http://frozen";

/// Node `n2`, alive, at `url`, as its heartbeat records it.
fn n2_at(url: &str) -> crate::store::NodeRecord {
    crate::store::NodeRecord {
        id: "n2".into(),
        advertise_url: Some(url.into()),
        version: "test".into(),
        started_ms: now_ms(),
        heartbeat_ms: now_ms(),
        instances: 1,
        busy: 1,
        key_check: None,
        secret_check: None,
    }
}

/// Agent `a` with a session left by node `n2`, which the store lists at `stored` and this
/// node last saw at `seen`; forwarded stops are recorded by the returned [`Forwards`], whose
/// node at `refuses` does not answer.
async fn session_left_by_n2(
    stored: &str,
    seen: &str,
    refuses: &'static str,
) -> (Env, AgentRecord, Uuid, Arc<Forwards>) {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let (_, sid) = left_by(&e, &a, "n2").await;
    e.store.heartbeat(&n2_at(stored)).await.unwrap();
    e.sup.remember_nodes(&[n2_at(seen)]);
    let peers = Arc::new(Forwards {
        calls: parking_lot::Mutex::default(),
        refuses,
    });
    e.sup.set_peers(peers.clone());
    (e, a, sid, peers)
}

/// A stop of another live node's session goes to the owner's address from the node list
/// last read (refreshed every heartbeat period): no read of the node list on the stop's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stop_takes_the_owners_address_from_the_node_list_seen() {
    let (e, _, sid, peers) = session_left_by_n2("http://stored", "http://seen", "").await;
    // Named under another agent, or another org: not found, nothing forwarded.
    agent(&e, "b", &[], 0, 1).await;
    for (org, name) in [("o", "b"), ("o", "nope"), ("p", "a")] {
        let r = e.sup.stop_session(org, name, sid).await;
        assert!(
            matches!(r, Err(CoreError::NotFound(_))),
            "{org}/{name}: {r:?}"
        );
    }
    assert!(peers.calls.lock().is_empty());
    e.sup.stop_session("o", "a", sid).await.unwrap();
    assert_eq!(*peers.calls.lock(), ["http://seen"]);
}

/// An address seen earlier that no longer answers (the owner restarted elsewhere) costs one
/// failed try: the node list is then read from the store and the stop goes to the address
/// there. A node the list seen has as dead, or does not have, is looked up in the store at
/// once (only the store's list declares a node dead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stop_reads_the_node_list_again_when_the_address_seen_fails() {
    let (e, a, sid, peers) = session_left_by_n2("http://new", "http://old", "http://old").await;
    e.sup.stop_session("o", "a", sid).await.unwrap();
    assert_eq!(*peers.calls.lock(), ["http://old", "http://new"]);

    // Seen dead (an old heartbeat) or not seen at all: the store's list, at once.
    for seen in [
        vec![crate::store::NodeRecord {
            heartbeat_ms: 0,
            ..n2_at("http://old")
        }],
        Vec::new(),
    ] {
        let (_, sid) = left_by(&e, &a, "n2").await;
        e.sup.remember_nodes(&seen);
        peers.calls.lock().clear();
        e.sup.stop_session("o", "a", sid).await.unwrap();
        assert_eq!(*peers.calls.lock(), ["http://new"]);
    }
}

/// An owner that takes a forwarded stop and never answers (frozen, or its machine lost) holds
/// it only until it misses its heartbeats for the node timeout (2 s here): this node then
/// takes the session over and the stop answers, with the session ended once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stop_to_an_owner_that_froze_ends_when_the_owner_is_declared_dead() {
    let (e, _, sid, peers) = session_left_by_n2(FROZEN, FROZEN, "").await;
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(8), e.sup.stop_session("o", "a", sid))
        .await
        .expect("the stop ends once the owner is dead")
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(*peers.calls.lock(), [FROZEN]);
    let rec = e.store.get_session(sid).await.unwrap().unwrap();
    let end = rec.end.expect("ended");
    assert_eq!(end.reason, crate::model::EndReason::Lost, "{end:?}");
}

/// Right after a database outage every node's last heartbeat is stale, the living ones' too:
/// a stop of another node's session does not take that node over (and end its sessions
/// `lost`) before this node's own heartbeats have been taken steadily for a node timeout. The
/// owner heartbeats again meanwhile and gets the stop. Once this node's heartbeats have been
/// steady for the timeout, a stop of a node still stale takes it over at once. (Found by a
/// three-node trial: PostgreSQL stopped 5 s with `--node-timeout 3`; a stop through another
/// node right after ended four sessions of a live node `lost` and killed their processes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_a_database_outage_does_not_take_a_live_owner_over() {
    let (e, a, sid, peers) = session_left_by_n2("http://n2", "http://n2", "").await;
    let stale = crate::store::NodeRecord {
        heartbeat_ms: now_ms() - 5000,
        ..n2_at("http://n2")
    };
    e.store.heartbeat(&stale).await.unwrap();
    e.sup.remember_nodes(&[]);
    // This node heartbeated, then the database went away, and it just came back.
    assert!(!e.sup.heartbeat_recorded(tokio::time::Instant::now()));
    e.sup.heartbeat_failed();
    assert!(!e.sup.heartbeat_recorded(tokio::time::Instant::now()));
    assert!(!e.sup.may_declare_dead());
    let stop = tokio::spawn({
        let sup = e.sup.clone();
        async move { sup.stop_session("o", "a", sid).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The owner's next heartbeat after the outage.
    e.store.heartbeat(&n2_at("http://n2")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("the stop ends once the owner heartbeats")
        .unwrap()
        .unwrap();
    assert_eq!(*peers.calls.lock(), ["http://n2"], "forwarded to the owner");
    let rec = e.store.get_session(sid).await.unwrap().unwrap();
    assert!(rec.end.is_none(), "ended by this node: {:?}", rec.end);
    assert_eq!(rec.node_id, "n2", "taken over");

    // Steady heartbeats for the node timeout (2 s): a node still stale is dead.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!e.sup.heartbeat_recorded(tokio::time::Instant::now()));
    }
    assert!(e.sup.may_declare_dead());
    let (_, sid3) = left_by(&e, &a, "n3").await;
    e.store
        .heartbeat(&crate::store::NodeRecord {
            id: "n3".into(),
            ..stale
        })
        .await
        .unwrap();
    e.sup.stop_session("o", "a", sid3).await.unwrap();
    assert_eq!(
        end_reason(&e, sid3).await,
        Some(crate::model::EndReason::Lost)
    );
}

/// Only a websocket session that `/start` announced and nothing started may hold a token:
/// every other stop revokes nothing (no round trip to the store).
#[test]
fn only_an_announced_websocket_session_may_hold_a_token() {
    let now = now_ms();
    let rec = |transport: Option<&str>, cold: Option<bool>| SessionRecord {
        id: Uuid::new_v4(),
        org: "o".into(),
        agent_id: Uuid::new_v4(),
        deployment_id: Uuid::new_v4(),
        created_ms: now,
        updated_ms: now,
        bot_start_ms: None,
        cold_start: cold,
        transport: transport.map(String::from),
        end: None,
        samples: Vec::new(),
        node_id: "n1".into(),
        daily_room: None,
    };
    assert!(super::stop::may_hold_ws_token(&rec(
        Some("websocket"),
        None
    )));
    assert!(!super::stop::may_hold_ws_token(&rec(
        Some("websocket"),
        Some(false)
    )));
    assert!(!super::stop::may_hold_ws_token(&rec(Some("webrtc"), None)));
    assert!(!super::stop::may_hold_ws_token(&rec(None, Some(true))));
}

/// A stop that reaches a session this node is taking over from a lost node (its record is
/// already this node's, its end not yet written) waits for the takeover's end instead of
/// recording a vaguer `lost` of its own first ("no live instance was found").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_takeover_waits_for_the_takeovers_end() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let (_, sid) = left_by(&e, &a, "n1").await;
    e.sup.taking_over.lock().insert(sid);
    let stop = tokio::spawn({
        let sup = e.sup.clone();
        async move { sup.stop_session("o", "a", sid).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stop.is_finished(),
        "the stop did not wait for the takeover"
    );
    let end = crate::model::SessionEnd {
        ended_ms: now_ms(),
        reason: crate::model::EndReason::Lost,
        completion_status: "HTTP_ERROR".into(),
        exit_code: None,
        exit_signal: None,
        message: Some("node n2 was lost".into()),
    };
    assert!(e.store.end_session(sid, &end).await.unwrap());
    e.sup.taking_over.lock().remove(&sid);
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("the stop ends with the takeover")
        .unwrap()
        .unwrap();
    let rec = e.store.get_session(sid).await.unwrap().unwrap();
    assert_eq!(
        rec.end.unwrap().message.as_deref(),
        Some("node n2 was lost")
    );
}

/// A takeover that has not ended or adopted the session within the stop's wait (a slow
/// store or engine) may still adopt its instance: the stop answers 503 `NODE_UNREACHABLE`
/// and writes no end of its own, so no `lost` is answered while the instance runs on.
/// (Waits the stop's whole 10 s bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_takeover_that_does_not_end_answers_503_and_writes_nothing() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let (_, sid) = left_by(&e, &a, "n1").await;
    e.sup.taking_over.lock().insert(sid);
    let err = e.sup.stop_session("o", "a", sid).await.unwrap_err();
    assert!(matches!(err, CoreError::NodeUnreachable(_)), "{err:?}");
    let rec = e.store.get_session(sid).await.unwrap().unwrap();
    assert!(rec.end.is_none(), "the stop wrote an end: {:?}", rec.end);
    // Once the takeover has ended it, the same stop answers as usual.
    e.sup.taking_over.lock().remove(&sid);
    e.sup.stop_session("o", "a", sid).await.unwrap();
    assert!(end_reason(&e, sid).await.is_some());
}

/// A warm instance whose record a takeover dropped (this node was declared dead meanwhile)
/// is not recorded again by its delivery: a re-record never re-creates a record or takes one
/// back from the node that took it over; the start fails and the instance is not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_record_never_re_creates_a_record_a_takeover_dropped() {
    let e = env().await;
    warm_agent(&e, "a", 1, 2).await;
    let rec = e.store.list_instances().await.unwrap().pop().unwrap();
    e.store.delete_instance(rec.id).await.unwrap();
    let err = start(&e, "a").await.unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::StartFailed {
                code: "DELIVERY_FAILED",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        !e.store
            .list_instances()
            .await
            .unwrap()
            .iter()
            .any(|r| r.id == rec.id),
        "the dropped record was re-created"
    );
}

// ---- A start cut by its caller; a start the drain stops ----

/// Polls `f` once; its output if that poll finished it.
async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *f).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// Holds SQLite's write lock on the engine's database (another connection's `BEGIN
/// IMMEDIATE`) until dropped, so that the store's writes meanwhile wait for it.
struct WriteLock(Option<rusqlite::Connection>);

impl WriteLock {
    fn take(e: &Env) -> WriteLock {
        let c =
            rusqlite::Connection::open(e._dir.path().join(crate::store::sqlite::DB_FILE)).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        WriteLock(Some(c))
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.execute_batch("ROLLBACK").unwrap();
        }
    }
}

/// What is left of agent `a` once every open session of it is stopped (as `DELETE` does):
/// (live sessions, instances in the pool, open records, slots held, processes).
async fn left_after_stopping_all(e: &Env, a: &AgentRecord) -> (bool, u32, usize, u32, usize) {
    let open: Vec<_> = e.store.list_open_sessions().await.unwrap();
    let mut live = false;
    for s in open.iter().filter(|s| s.agent_id == a.id) {
        e.sup.stop_session("o", &a.name, s.id).await.unwrap();
        live |= e.sup.serves(s.id);
    }
    let open = e.store.list_open_sessions().await.unwrap();
    (
        live,
        e.sup.pool_status(a.id).total,
        open.iter().filter(|s| s.agent_id == a.id).count(),
        e.store.slots_held(a.id).await.unwrap(),
        e.fake.live().len(),
    )
}

/// A start whose caller goes away (hyper drops a handler's future when its client closes the
/// connection) runs to its end on its own task: once its session is stopped, nothing of it is
/// left and the next start of a `maxAgents: 1` agent fits. (Cut while it waited for its
/// capacity slot, a start kept the slot until the server restarted: 429 meanwhile; cut while
/// its session's record was written, it left an instance that never ran, a live session that
/// a `DELETE` could not end and an open record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cut_by_its_caller_runs_to_its_end() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 1).await;
    let lock = WriteLock::take(&e);
    let mut f = Box::pin(start(&e, "a"));
    assert!(
        poll_once(&mut f).await.is_none(),
        "the start waits for the store"
    );
    drop(f); // the client went away
    drop(lock);
    until("the cut start's session is delivered", async || {
        e.store
            .list_open_sessions()
            .await
            .unwrap()
            .iter()
            .any(|s| s.agent_id == a.id && s.bot_start_ms.is_some())
    })
    .await;
    assert_eq!(left_after_stopping_all(&e, &a).await, (false, 0, 0, 0, 0));
    let next = start(&e, "a").await;
    assert!(next.is_ok(), "the next start: {next:?}");
}

/// docs/lifecycle.md, "Graceful drain": a start still in flight when the drain stops it
/// answers 503 `DRAINING`. Here the start took a ready warm instance and its session's
/// record is being written when the drain's stop reaches the instance (it answered
/// `INSTANCE_EXITED`, "the instance went away").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_start_in_flight_when_the_drain_stops_it_answers_draining() {
    let e = env().await;
    let a = warm_agent(&e, "a", 1, 1).await;
    let lock = WriteLock::take(&e);
    let mut f = Box::pin(start(&e, "a"));
    assert!(
        poll_once(&mut f).await.is_none(),
        "the start waits for the store"
    );
    until("the warm instance is claimed", async || {
        e.sup.pool_status(a.id).busy == 1
    })
    .await;
    let sup = e.sup.clone();
    let drain = tokio::spawn(async move { sup.stop_everything(EndReason::Drained).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(lock);
    let r = f.as_mut().await;
    drain.await.unwrap();
    assert!(
        matches!(r, Err(CoreError::Draining)),
        "the start answered {r:?}"
    );
}

/// Makes the engine's SQLite store refuse every write that matches `when` (a trigger on
/// `table`'s `op`), until the returned connection drops it with `DROP TRIGGER refuse`.
fn refuse_writes(e: &Env, op: &str, table: &str, when: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(e._dir.path().join(crate::store::sqlite::DB_FILE)).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch(&format!(
        "CREATE TRIGGER refuse BEFORE {op} ON {table} WHEN {when} \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    ))
    .unwrap();
    c
}

/// A takeover that a store error cuts short after the store moved the lost node's records
/// to this node (the records are this node's, their deletes or ends not yet written) is
/// finished by the next try: the session ends `lost` saying the node was lost, its instance
/// record goes and its capacity slot is freed. (A refused delete was ignored, and a refused
/// end left the session open: both owned by the live taker, with the slot held, until the
/// taker restarted, since the next try found nothing left to take over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_cut_by_a_store_error_is_finished_by_the_next_try() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 2).await;
    let now = now_ms();
    for (dead, op, table, when) in [
        ("n2", "DELETE", "instances", "1"),
        ("n3", "UPDATE", "sessions", "NEW.ended_ms IS NOT NULL"),
    ] {
        let (iid, sid) = left_by(&e, &a, dead).await;
        assert!(e.store.reserve_slot(a.id, 2, iid, dead).await.unwrap());
        let mut node = n2_at("http://n2");
        node.id = dead.into();
        node.heartbeat_ms = now - 5000;
        e.store.heartbeat(&node).await.unwrap();
        let c = refuse_writes(&e, op, table, when);
        let _ = e.sup.take_over(dead, now - 2000).await;
        c.execute_batch("DROP TRIGGER refuse").unwrap();
        let rec = e.store.get_session(sid).await.unwrap().unwrap();
        assert_eq!(
            rec.node_id, "n1",
            "{op} {table}: the records are this node's"
        );
        // The watch tries again at its next tick.
        let _ = e.sup.take_over(dead, now - 2000).await.unwrap();
        let end = e.store.get_session(sid).await.unwrap().unwrap().end;
        let end = end.unwrap_or_else(|| panic!("{op} {table}: the session is ended"));
        assert_eq!(end.reason, EndReason::Lost);
        assert!(
            end.message
                .as_deref()
                .unwrap_or("")
                .contains(&format!("node {dead} was lost")),
            "{end:?}"
        );
        assert!(
            e.store.list_instances().await.unwrap().is_empty(),
            "{op} {table}: the instance record is gone"
        );
        assert_eq!(e.store.slots_held(a.id).await.unwrap(), 0, "{op} {table}");
    }
}

/// A warm instance that a start claims while it is still starting is recorded with the
/// session before `/bot`. When the store refuses that write, the session is not delivered:
/// the record would still name no session, and a restart would take the instance for a warm
/// one and hand it to the next session (it did: the start answered 200, and after a restart
/// the instance, still serving the first session, sat in the warm pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_instance_whose_session_cannot_be_recorded_is_not_delivered() {
    let e = env().await;
    let a = agent(&e, "a", &["ready-ms=300"], 1, 2).await;
    until("one starting instance, recorded", async || {
        e.sup.pool_status(a.id).starting == 1 && e.store.list_instances().await.unwrap().len() == 1
    })
    .await;
    let iid = e.store.list_instances().await.unwrap()[0].id;
    let c = refuse_writes(&e, "UPDATE", "instances", "NEW.session_id IS NOT NULL");
    let first = start(&e, "a").await;
    c.execute_batch("DROP TRIGGER refuse").unwrap();
    assert!(first.is_err(), "not delivered: {first:?}");
    assert!(
        !e.fake.live().contains(&iid),
        "the instance of the failed start is removed"
    );
    // A restart (a previous server detached: its instances run on).
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    let first = first.map(|s| s.session_id).unwrap_or_default();
    assert!(
        !e.fake.live().contains(&iid) || sup.serves(first),
        "the instance that got the first session is never a warm instance again"
    );
}

/// A start whose record the store wrote but answered with an error (a connection cut after
/// the commit, before the reply) is served: the engine reads the record back before deciding.
/// (It took the error as the outcome: the instance went back to the warm pool, free for
/// another session, while the store had it promised to this one, whose record stayed open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_store_wrote_but_answered_an_error_for_is_served() {
    let e = env().await;
    let a = agent(&e, "a", &[], 1, 2).await;
    until("one idle instance, recorded", async || {
        e.sup.pool_status(a.id).idle == 1 && e.store.list_instances().await.unwrap().len() == 1
    })
    .await;
    let iid = e.store.list_instances().await.unwrap()[0].id;
    let dep = a.desired_deployment_id;
    let sid = Uuid::new_v4();
    let now = now_ms();
    let rec = SessionRecord {
        id: sid,
        org: "o".into(),
        agent_id: a.id,
        deployment_id: dep,
        created_ms: now,
        updated_ms: now,
        bot_start_ms: None,
        cold_start: Some(false),
        transport: None,
        end: None,
        samples: Vec::new(),
        node_id: "n1".into(),
        daily_room: None,
    };
    // The write the store committed, and the answer the engine gets: an outage's error.
    assert!(e
        .store
        .insert_session_for_instance(&rec, iid)
        .await
        .unwrap());
    let c = refuse_writes_for_now(&e, "INSERT", "sessions", "1");
    let r = start_of(&e, "a", sid, None).await;
    c.execute_batch("DROP TRIGGER refuse_for_now").unwrap();
    let out = r.expect("the session was recorded: it is served");
    assert_eq!(out.session_id, sid);
    assert!(e.sup.serves(sid));
    until("its instance is the one the store promised", async || {
        e.store
            .list_instances()
            .await
            .unwrap()
            .iter()
            .any(|i| i.id == iid && i.session_id == Some(sid))
    })
    .await;
    assert_eq!(end_reason(&e, sid).await, None);
}

/// A heartbeat made on time but taken by the store only after the node timeout (its write
/// stalled: a slow or cut connection) leaves the node open to a takeover meanwhile: the
/// store's row still showed the heartbeat before it. So the node reconciles when the store
/// takes it, as after a late one. (It reconciled only when the heartbeats were made late:
/// taken over during the stall, it lifted its fence without reconciling, and its instances
/// served on sessions the taker had ended `lost`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_the_store_took_after_the_node_timeout_makes_the_node_reconcile() {
    let e = env().await;
    let t0 = tokio::time::Instant::now();
    assert!(!e.sup.heartbeat_recorded(t0));
    // The next heartbeat is made 400 ms later, and its write returns after the timeout (2 s).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(e.sup.is_fenced(), "fenced while the write stalls");
    assert!(
        e.sup.heartbeat_recorded(t0 + Duration::from_millis(400)),
        "the node reconciles before it serves again"
    );
    assert!(e.sup.is_fenced(), "until it has reconciled");
}

/// A websocket session whose token expires as its client connects: the expiry reads the
/// record as still waiting while the start's write (which takes the record over) waits to be
/// committed, and its end is written after it. Either the start fails and the session ends
/// `client_never_connected`, or the session is served and stays active. (The expiry wrote
/// its end over the started session: recorded ended while its instance served it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_as_its_client_connects_never_ends_a_started_session() {
    let e = env().await;
    warm_agent(&e, "a", 1, 2).await;
    let sid = Uuid::new_v4();
    e.sup.record_waiting_session("o", "a", sid).await.unwrap();
    let lock = WriteLock::take(&e);
    let start = tokio::spawn(start_of(&e, "a", sid, Some("websocket")));
    until("the start is placed", async || e.sup.serves(sid)).await;
    // Its record's write waits for the lock; the expiry reads the record meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let expire = tokio::spawn({
        let sup = e.sup.clone();
        async move {
            sup.expire_waiting_session("o", "a", sid, Duration::from_secs(300))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(lock);
    let started = start.await.unwrap();
    expire.await.unwrap().unwrap();
    let end = end_reason(&e, sid).await;
    match started {
        Ok(_) => assert_eq!(end, None, "a started session is not ended by its token"),
        Err(err) => assert_eq!(end, Some(EndReason::ClientNeverConnected), "{err:?}"),
    }
}

/// Ends session `sid` in the store alone, as a stop that found no live instance does while
/// no server supervises the session's instance.
async fn end_while_unwatched(e: &Env, sid: Uuid) {
    let end = crate::model::SessionEnd {
        ended_ms: now_ms(),
        reason: EndReason::Lost,
        completion_status: "HTTP_ERROR".into(),
        exit_code: None,
        exit_signal: None,
        message: Some("no live instance was found for this session".into()),
    };
    assert!(e.store.end_session(sid, &end).await.unwrap());
}

/// An instance whose record names a session that is no longer open (its end was written
/// while no server supervised the instance: a stop that found no live instance, a takeover)
/// served or was promised to that session: recovery removes it and never re-adopts it as a
/// warm instance for the next session (it did, when it belonged to the agent's current
/// deployment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_never_makes_an_instance_of_an_ended_session_warm() {
    let e = env().await;
    let a = agent(&e, "a", &[], 1, 2).await;
    let (iid, sid) = left_by_previous_run(&e, &a).await;
    end_while_unwatched(&e, sid).await;
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    assert!(!e.fake.live().contains(&iid), "removed");
    assert!(e
        .store
        .list_instances()
        .await
        .unwrap()
        .iter()
        .all(|r| r.id != iid));
}

/// A heartbeat that comes late again while the node reconciles after a late one (the node
/// froze or lost the store again, and may have been taken over again after the reconciliation
/// read the store): the fence stays up when that reconciliation ends, and the next heartbeat
/// starts another. (The first reconciliation lifted the fence, and what the second takeover
/// ended ran on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_late_again_during_a_reconciliation_makes_the_node_reconcile_again() {
    let e = env().await;
    let t0 = tokio::time::Instant::now();
    assert!(!e.sup.heartbeat_recorded(t0));
    let late = t0 + Duration::from_secs(3);
    assert!(e.sup.heartbeat_recorded(late), "late: a reconciliation");
    let again = late + Duration::from_secs(3);
    assert!(!e.sup.heartbeat_recorded(again), "one at a time");
    e.sup.rejoined(true);
    assert!(
        e.sup.is_fenced(),
        "the reconciliation read the store before the second gap"
    );
    assert!(
        e.sup.heartbeat_recorded(again + Duration::from_millis(400)),
        "another reconciliation"
    );
    e.sup.rejoined(true);
    assert!(!e.sup.is_fenced());
}

/// A lost node's delivered websocket session whose instance this node reaches (a shared
/// container engine): its relay went with the lost node, so the takeover ends it `lost` and
/// removes the instance, whatever this node's own relay marks say. (A taker whose marks were
/// not trusted yet, in its first run of a version that makes them, re-adopted it: listed
/// active with nobody relaying it, its slot held until its time limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_ends_a_lost_nodes_relayed_session_whose_instance_it_reaches() {
    let e = env().await;
    e.fake.set_shared(true);
    let a = agent(&e, "a", &[], 0, 2).await;
    let (iid, sid) = left_with(&e, &a, "n2", Some("websocket")).await;
    let now = now_ms();
    let mut n2 = n2_at("http://n2");
    n2.heartbeat_ms = now - 5000;
    e.store.heartbeat(&n2).await.unwrap();
    // This node's first run with relay marks: its directory is made now, not trusted yet.
    let dir = tempfile::tempdir().unwrap();
    let (logs, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let cfg = SupervisorConfig {
        relay_dir: Some(dir.path().join("relays")),
        ..config()
    };
    let sup = Supervisor::new(
        e.store.clone(),
        Arc::new(e.fake.clone()),
        cfg,
        logs,
        Arc::new(NoSecrets),
    );
    sup.recover().await.unwrap();
    assert_eq!(sup.take_over("n2", now - 2000).await.unwrap(), Some(1));
    let end = e.store.get_session(sid).await.unwrap().unwrap().end;
    assert_eq!(end.map(|x| x.reason), Some(EndReason::Lost));
    assert!(!sup.serves(sid));
    assert!(!e.fake.live().contains(&iid), "its instance is removed");
    assert!(e.store.list_instances().await.unwrap().is_empty());
}

/// A start of a session id placed here just before a takeover re-adopts that session (its
/// lost node's instance, reachable from here): the store refuses the start's record (the
/// session is recorded delivered), and the undo of the start leaves the live set's entry to
/// the adopted instance, which its stop removes. (The undo removed the entry whoever held
/// it: the adopted instance served on with no entry, never stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_leaves_a_re_adopted_session_live() {
    let e = env().await;
    e.fake.set_shared(true);
    let a = warm_agent(&e, "a", 1, 2).await;
    let (iid, sid, held, taking) = take_over_held_at_adoption(&e, &a).await;
    // The start takes the warm instance; its record's write waits for the lock.
    let lock = WriteLock::take(&e);
    let starting = tokio::spawn(start_of(&e, "a", sid, None));
    until("the start is placed", async || e.sup.serves(sid)).await;
    drop(held);
    assert_eq!(taking.await.unwrap(), Some(1));
    drop(lock);
    let r = starting.await.unwrap();
    assert!(
        matches!(r, Err(CoreError::Store(store::StoreError::Conflict))),
        "{r:?}"
    );
    assert!(e.sup.serves(sid), "the adopted instance keeps the session");
    assert_eq!(end_reason(&e, sid).await, None);
    stop_removes(&e, sid, iid).await;
}

/// Makes the engine's SQLite store refuse, as an outage would (a plain SQLite error, which
/// the store answers `Unavailable`), every write that matches `when` on `table`'s `op`,
/// until the returned connection runs `DROP TRIGGER refuse_for_now`.
fn refuse_writes_for_now(e: &Env, op: &str, table: &str, when: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(e._dir.path().join(crate::store::sqlite::DB_FILE)).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch(&format!(
        "CREATE TRIGGER refuse_for_now BEFORE {op} ON {table} WHEN {when} \
         BEGIN SELECT abs(-9223372036854775808); END"
    ))
    .unwrap();
    c
}

/// A start whose record's write the store refused for now (an outage's error, which may come
/// after the commit) reads the record back: a websocket session's record still waiting for
/// its client is not the start's (its write sets `coldStart`). The start fails and delivers
/// nothing. (It took the record for its own and delivered: the record stayed waiting, and
/// the token's expiry could end the session its instance served.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_never_takes_a_waiting_record_it_could_not_write_for_its_own() {
    let e = env().await;
    let a = warm_agent(&e, "a", 1, 2).await;
    let sid = Uuid::new_v4();
    e.sup.record_waiting_session("o", "a", sid).await.unwrap();
    let c = refuse_writes_for_now(&e, "INSERT", "sessions", "1");
    let r = start_of(&e, "a", sid, Some("websocket")).await;
    c.execute_batch("DROP TRIGGER refuse_for_now").unwrap();
    assert!(
        matches!(r, Err(CoreError::Store(store::StoreError::Unavailable(_)))),
        "{r:?}"
    );
    assert!(e.fake.delivered().is_empty());
    assert!(!e.sup.serves(sid));
    let s = e.store.get_session(sid).await.unwrap().unwrap();
    assert!(s.waiting_for_client(), "{s:?}");
    assert_eq!(
        e.sup.pool_status(a.id).idle,
        1,
        "the warm instance is given back"
    );
}

/// A session of `a` delivered on node n2 (its record and instance left by n2), n2's heartbeat
/// stale, and a takeover of n2 that has handed the records over and waits to adopt the
/// instance until the returned hold is dropped. Returns the instance and session ids, the
/// hold and the takeover's task.
async fn take_over_held_at_adoption(
    e: &Env,
    a: &AgentRecord,
) -> (
    Uuid,
    Uuid,
    tokio::sync::OwnedRwLockWriteGuard<()>,
    tokio::task::JoinHandle<Option<usize>>,
) {
    let (iid, sid) = left_by(e, a, "n2").await;
    let now = now_ms();
    let mut n2 = n2_at("http://n2");
    n2.heartbeat_ms = now - 5000;
    e.store.heartbeat(&n2).await.unwrap();
    let held = e.fake.hold_adoptions().await;
    let taking = tokio::spawn({
        let sup = e.sup.clone();
        async move { sup.take_over("n2", now - 2000).await.unwrap() }
    });
    until("the takeover is adopting", async || e.fake.adopts() == 1).await;
    (iid, sid, held, taking)
}

/// A start of a session id whose record a takeover has just handed to this node (delivered
/// on the lost node; its instance not adopted yet), whose write the store refused for now:
/// the record read back is not the start's (it is delivered), so the start fails and delivers
/// nothing; the adopted instance keeps the session. (The start took the record for its own
/// and delivered the session to a second instance.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_never_takes_a_taken_over_record_for_its_own() {
    let e = env().await;
    e.fake.set_shared(true);
    let a = agent(&e, "a", &[], 0, 2).await;
    let (iid, sid, held, taking) = take_over_held_at_adoption(&e, &a).await;
    let c = refuse_writes_for_now(&e, "INSERT", "sessions", "1");
    let r = start_of(&e, "a", sid, None).await;
    c.execute_batch("DROP TRIGGER refuse_for_now").unwrap();
    assert!(
        matches!(r, Err(CoreError::Store(store::StoreError::Unavailable(_)))),
        "{r:?}"
    );
    drop(held);
    assert_eq!(taking.await.unwrap(), Some(1));
    assert!(e.fake.delivered().is_empty(), "no second delivery");
    assert_eq!(
        e.fake.live(),
        vec![iid],
        "the cold start's instance is gone"
    );
    e.sup.stop_session("o", "a", sid).await.unwrap();
    assert_eq!(end_reason(&e, sid).await, Some(EndReason::Stopped));
    assert!(e.fake.live().is_empty());
}

/// A delivery the store cannot record for now (an outage as `/bot` is answered) is written
/// again until the store takes it. Lost, a restart would take the delivered session for one
/// still starting, remove its instance and end it `lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_the_store_refused_for_now_is_recorded_once_it_takes_it() {
    let e = env().await;
    agent(&e, "a", &[], 0, 2).await;
    let c = refuse_writes_for_now(
        &e,
        "UPDATE",
        "sessions",
        "NEW.bot_start_ms IS NOT NULL AND OLD.bot_start_ms IS NULL",
    );
    let sid = start(&e, "a").await.unwrap().session_id;
    let delivered = async || {
        let s = e.store.get_session(sid).await.unwrap().unwrap();
        s.bot_start_ms.is_some()
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!delivered().await, "the store refused it meanwhile");
    c.execute_batch("DROP TRIGGER refuse_for_now").unwrap();
    until("the delivery is recorded", delivered).await;
    assert_eq!(end_reason(&e, sid).await, None);
}

/// A capacity slot the store cannot free for now is freed once it can; it stayed held, and
/// counted against `maxAgents` on every node, until the server restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_slot_the_store_could_not_free_for_now_is_freed_once_it_can() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 2).await;
    let id = Uuid::new_v4();
    assert!(e.store.reserve_slot(a.id, 2, id, "n1").await.unwrap());
    let c = refuse_writes_for_now(&e, "DELETE", "capacity_slots", "1");
    e.sup.free_slot(id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        e.store.slots_held(a.id).await.unwrap(),
        1,
        "refused meanwhile"
    );
    c.execute_batch("DROP TRIGGER refuse_for_now").unwrap();
    until("the slot is freed", async || {
        e.store.slots_held(a.id).await.unwrap() == 0
    })
    .await;
}

/// A capacity slot whose reservation answered an error but landed in the store later (its
/// commit came after the answer, and after the release a failed reservation makes) is freed
/// all the same: the engine settles the reservation before releasing. (A plain release ran
/// first, freed nothing, and the slot stayed held, against `maxAgents` on every node, until
/// the server restarted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_slot_whose_reservation_landed_after_its_error_is_freed() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 2).await;
    let id = Uuid::new_v4();
    // This node's writes of slots fail for now; the reservation of `id` answered an error.
    let c = refuse_writes_for_now(&e, "INSERT", "capacity_slots", "NEW.node_id = 'n1'");
    e.sup.free_uncertain_slot(a.id, 2, id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its commit lands now, after the engine took the error.
    assert!(e.store.reserve_slot(a.id, 2, id, "late").await.unwrap());
    c.execute_batch("DROP TRIGGER refuse_for_now").unwrap();
    until("the slot is freed", async || {
        e.store.slots_held(a.id).await.unwrap() == 0
    })
    .await;
}

/// A deployment whose validation failed only because its runtime's engine did not answer
/// (at deploy, or at the server's start) is validated again and becomes ready once the engine
/// answers, without a redeploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_error_of_an_engine_that_did_not_answer_clears_once_it_answers() {
    let e = env().await;
    e.fake.set_unavailable(true);
    agent(&e, "a", &[], 0, 2).await;
    let r = start(&e, "a").await;
    assert!(matches!(r, Err(CoreError::DeploymentNotReady(_))), "{r:?}");
    e.fake.set_unavailable(false);
    let ready = async |sup: &Arc<Supervisor>| {
        let deadline = tokio::time::Instant::now() + 3 * super::DEPLOY_RECHECK;
        loop {
            match sup.start_session("o", "a", StartParams::default()).await {
                Ok(s) => return s,
                Err(CoreError::DeploymentNotReady(m)) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "still not ready: {m}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
    };
    let s = ready(&e.sup).await;
    e.sup.stop_session("o", "a", s.session_id).await.unwrap();

    // A restart while the engine does not answer.
    e.fake.set_unavailable(true);
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    let r = sup.start_session("o", "a", StartParams::default()).await;
    assert!(matches!(r, Err(CoreError::DeploymentNotReady(_))), "{r:?}");
    e.fake.set_unavailable(false);
    let s = ready(&sup).await;
    sup.stop_session("o", "a", s.session_id).await.unwrap();
}

/// The record of an instance recovery removes (here one promised to a session that ended
/// while no server watched it) is deleted once the store takes the delete, when it refused
/// it for now at the recovery: it outlived its instance until the next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_record_recovery_could_not_delete_for_now_is_deleted_once_it_can() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 2).await;
    let (iid, sid) = left_by_previous_run(&e, &a).await;
    end_while_unwatched(&e, sid).await;
    let c = refuse_writes_for_now(&e, "DELETE", "instances", "1");
    let sup = engine(&e.store, &e.fake);
    sup.recover().await.unwrap();
    assert!(!e.fake.live().contains(&iid), "removed");
    let recorded = async || {
        let all = e.store.list_instances().await.unwrap();
        all.iter().any(|r| r.id == iid)
    };
    assert!(recorded().await, "the store refused the delete meanwhile");
    c.execute_batch("DROP TRIGGER refuse_for_now").unwrap();
    until("the record is deleted", async || !recorded().await).await;
}

/// An agent's status counts this node's pool alone while it is the only live node (the other
/// nodes' records in the store are not read), and the cluster's once several nodes are live:
/// the store's open sessions, the other nodes' instance records added to this node's pool;
/// health keeps this node's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_the_cluster_only_with_several_live_nodes() {
    let e = env().await;
    let a = warm_agent(&e, "a", 1, 5).await;
    // Node n2 serves a session; node n3 keeps a warm instance.
    let now = now_ms();
    let s = SessionRecord {
        id: Uuid::new_v4(),
        org: "o".into(),
        agent_id: a.id,
        deployment_id: a.desired_deployment_id,
        created_ms: now,
        updated_ms: now,
        bot_start_ms: Some(5),
        cold_start: Some(false),
        transport: None,
        end: None,
        samples: Vec::new(),
        node_id: "n2".into(),
        daily_room: None,
    };
    e.store.insert_session(&s).await.unwrap();
    for (node, session) in [("n2", Some(s.id)), ("n3", None)] {
        let rec = InstanceRecord {
            id: Uuid::new_v4(),
            agent_id: a.id,
            deployment_id: a.desired_deployment_id,
            session_id: session,
            runtime: "fake".into(),
            placement: serde_json::json!({}),
            created_ms: now,
            node_id: node.into(),
        };
        e.store.put_instance(&rec).await.unwrap();
    }
    let one = e
        .sup
        .agent_pool_status(&a, a.desired_deployment_id)
        .await
        .unwrap();
    let mine = super::StatusCounts {
        active_sessions: 0,
        starting: 0,
        idle: 1,
        busy: 0,
        total: 1,
    };
    assert_eq!(one.counts, mine, "one node: its own pool");
    assert_eq!(one.min_here, 1);
    e.sup
        .set_cluster_view(super::ClusterView { index: 0, nodes: 3 });
    let three = e
        .sup
        .agent_pool_status(&a, a.desired_deployment_id)
        .await
        .unwrap();
    let cluster = super::StatusCounts {
        active_sessions: 1,
        starting: 0,
        idle: 2,
        busy: 1,
        total: 3,
    };
    assert_eq!(three.counts, cluster, "three nodes: the cluster's");
    assert_eq!(three.min_here, 1, "health keeps this node's share");
    assert_eq!(
        three.pool.idle, 1,
        "the pool health is judged on stays this node's"
    );
}

/// An instance record of node `node` for agent `a`'s deployment, promised to no session: a
/// warm instance there.
async fn idle_record_of(e: &Env, a: &AgentRecord, node: &str) {
    let rec = InstanceRecord {
        id: Uuid::new_v4(),
        agent_id: a.id,
        deployment_id: a.desired_deployment_id,
        session_id: None,
        runtime: e.fake.kind().as_str().to_string(),
        placement: serde_json::json!({}),
        created_ms: now_ms(),
        node_id: node.into(),
    };
    e.store.put_instance(&rec).await.unwrap();
}

/// A start goes to another node only while several nodes are live, this node holds no idle
/// instance of the agent, and a live node with an advertise URL holds one promised to no
/// session; a start this node refuses (unknown agent) stays here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_without_an_idle_instance_here_goes_to_a_live_node_that_has_one() {
    let e = env().await;
    let a = agent(&e, "a", &[], 0, 2).await;
    let b = agent(&e, "b", &[], 0, 2).await;
    idle_record_of(&e, &a, "n2").await;
    left_by(&e, &b, "n2").await;
    e.store.heartbeat(&n2_at("http://n2")).await.unwrap();
    e.sup.remember_nodes(&[n2_at("http://n2")]);
    // One live node (a store of one node): never.
    assert_eq!(e.sup.start_elsewhere("o", "a").await, None);
    e.sup
        .set_cluster_view(super::ClusterView { index: 0, nodes: 2 });
    assert_eq!(
        e.sup.start_elsewhere("o", "a").await,
        Some(super::StartElsewhere {
            node: "n2".into(),
            url: "http://n2".into()
        })
    );
    // n2's only instance of b serves a session; an unknown agent, another org's: here.
    for (org, name) in [("o", "b"), ("o", "nope"), ("p", "a")] {
        assert_eq!(e.sup.start_elsewhere(org, name).await, None, "{org}/{name}");
    }
    // n2 seen dead (its last heartbeat older than the node timeout), or without an address.
    let stale = crate::store::NodeRecord {
        heartbeat_ms: now_ms() - 5000,
        ..n2_at("http://n2")
    };
    e.sup.remember_nodes(&[stale]);
    assert_eq!(e.sup.start_elsewhere("o", "a").await, None);
    let no_url = crate::store::NodeRecord {
        advertise_url: None,
        ..n2_at("http://n2")
    };
    e.sup.remember_nodes(&[no_url]);
    assert_eq!(e.sup.start_elsewhere("o", "a").await, None);
    // This node holds an idle instance of its own (its share of minAgents 2): it serves.
    e.sup.remember_nodes(&[n2_at("http://n2")]);
    let c = warm_agent(&e, "c", 1, 2).await;
    idle_record_of(&e, &c, "n2").await;
    assert_eq!(e.sup.start_elsewhere("o", "c").await, None);
    // Once it is taken, the next start goes to n2's.
    let s = start(&e, "c").await.unwrap();
    assert!(!s.cold_start);
    assert_eq!(
        e.sup.start_elsewhere("o", "c").await.map(|t| t.node),
        Some("n2".to_string())
    );
}
