//! `cattery serve` and `cattery keys`: wiring the store, runtime, supervisor and HTTP server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::config::StoreConfig;
use crate::core::orgs::AgentDefaults;
use crate::core::session::{Supervisor, SupervisorConfig};
use crate::http_server::{self, HttpLimits};
use crate::model::{now_ns, KeyKind, LogLine};
use crate::runtime::factory::{self, RuntimeConfig};
use crate::runtime::Runtime;
use crate::store::{self, OpenMode, Store};

/// The org every server has from its first start.
pub const DEFAULT_ORG: &str = "default";

/// The Python runner for `local:` agents, shipped inside the binary.
pub const RUNNER_PY: &str = include_str!("../runner/cattery_runner.py");

/// The flat settings the wiring below reads, taken from the [`Config`] sections (the names the
/// runtime and engine construction use).
struct Settings {
    data_dir: PathBuf,
    stop_grace_seconds: f64,
    start_timeout_seconds: f64,
    drain_timeout_seconds: f64,
    python: String,
    daily_api_key: Option<String>,
    metrics_interval_ms: u64,
    log_retention_days: u64,
    log_retention_max_lines: u64,
    regions: Vec<String>,
    default_region: String,
    ws_idle_timeout_seconds: f64,
    ws_token_ttl_seconds: f64,
    instance_uids: Option<crate::runtime::process::uids::UidRange>,
}

impl Settings {
    fn from_config(c: &Config, data_dir: PathBuf) -> Settings {
        Settings {
            // Instances run in other directories: every path handed to them must be absolute.
            data_dir,
            stop_grace_seconds: c.sessions.stop_grace_seconds,
            start_timeout_seconds: c.sessions.start_timeout_seconds,
            drain_timeout_seconds: c.sessions.drain_timeout_seconds,
            python: c.runtime.python.clone(),
            daily_api_key: c.sessions.daily_api_key.clone(),
            metrics_interval_ms: c.sessions.metrics_interval_ms,
            log_retention_days: c.logs.retention_days,
            log_retention_max_lines: c.logs.retention_max_lines,
            regions: c.server.regions.clone(),
            default_region: c.default_region(),
            ws_idle_timeout_seconds: c.websocket.idle_timeout_seconds,
            ws_token_ttl_seconds: c.websocket.token_ttl_seconds,
            instance_uids: c.runtime.instance_uid_range(),
        }
    }
}

/// How long a start waits for the data directory's lock when the server that held it has
/// exited (see [`lock_data_dir`]).
const LOCK_HANDOVER: Duration = Duration::from_secs(10);

/// Takes the data directory's lock (`<data-dir>/serve.lock`, `flock`), so two servers never
/// supervise the same instances. Errors: another `cattery serve` holds it.
///
/// A server killed outright (SIGKILL, OOM) releases the lock only when the last process that
/// shares or copied its descriptor table is gone: a parked spare (`runtime::process::spare`,
/// killed by its parent-death signal) or a child between its `clone` and its `exec`. Those
/// die within moments of the server, but a restart can come sooner. So while the pid the
/// lock file names is no longer alive, the start waits for the lock, up to [`LOCK_HANDOVER`].
fn lock_data_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    lock_data_dir_within(dir, LOCK_HANDOVER)
}

/// Binds `--listen`. The previous server's listening socket can outlive it for a moment: a
/// server killed outright leaves processes that shared or copied its descriptors (see
/// [`lock_data_dir`]) until they die with it. So an address in use is tried again, for up to
/// `wait` (logged after 3 s), and then named with what to do. Another program on the port
/// (an instance of another server given it while this one was down: a `--listen` port among
/// the instance ports is warned about at start) is not waited out.
async fn bind_within(
    listen: SocketAddr,
    wait: Duration,
) -> anyhow::Result<tokio::net::TcpListener> {
    let t0 = std::time::Instant::now();
    let mut said = false;
    loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && t0.elapsed() < wait => {
                if !said && t0.elapsed() >= Duration::from_secs(3) {
                    said = true;
                    tracing::warn!(%listen, "waiting for the address: another process still \
                        listens on it (a process the previous server on this port started exits \
                        with it; any other holder stays)");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
                "cannot listen on {listen}: {e}, still after {} s: another process listens on \
                 it (`ss -ltnp 'sport = :{}'` names it); stop it or pick another --listen",
                wait.as_secs_f64(),
                listen.port()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {listen}")),
        }
    }
}

/// Logs a warning when `listen`'s port lies among the ports the process runtime gives
/// instances ([`crate::runtime::process::ports::listen_port_warning`]).
fn warn_of_a_listen_port_among_instance_ports(config: &Config, listen: SocketAddr) {
    if config.runtime.kind == crate::runtime::RuntimeKind::Docker {
        return;
    }
    let ports = crate::runtime::process::ports::instance_ports();
    if let Some(w) = crate::runtime::process::ports::listen_port_warning(listen.port(), ports) {
        tracing::warn!("{w}");
    }
}

/// Opens (creating it) the data dir's server lock file, `serve.lock`: whoever holds an
/// exclusive `flock` on it uses the data dir (`cattery serve`, `cattery store copy`).
pub(crate) fn open_lock_file(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("serve.lock");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn lock_data_dir_within(
    dir: &Path,
    handover: Duration,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::{Read, Seek, Write};
    let mut f = open_lock_file(dir)?;
    let t0 = std::time::Instant::now();
    let mut lock = loop {
        let mut holder = String::new();
        f.rewind()?;
        let _ = f.read_to_string(&mut holder);
        let holder = holder.trim().to_string();
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((back, e)) => {
                let exited = holder_exited(&holder);
                if e == nix::errno::Errno::EWOULDBLOCK && exited && t0.elapsed() < handover {
                    f = back;
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let why = if exited {
                    format!(
                        "the server (pid {holder}) has exited, but a process it started still \
                         holds the lock after {} s",
                        handover.as_secs_f64()
                    )
                } else {
                    format!("another cattery serve (pid {holder}) is using it")
                };
                anyhow::bail!(
                    "{why}: data dir {} ({e}); stop it or pick another --data-dir",
                    dir.display()
                );
            }
        }
    };
    lock.set_len(0)?;
    lock.rewind()?;
    write!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// Whether the pid a lock file names is gone (an empty or unreadable name is taken as alive:
/// a server that has just taken the lock writes its pid next).
fn holder_exited(holder: &str) -> bool {
    match holder.parse::<i32>() {
        Ok(pid) if pid > 0 => {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH)
        }
        _ => false,
    }
}

/// Opens the store of an existing data directory, or the PostgreSQL database `cfg` names (for
/// `cattery keys`). Errors: the directory holds no Cattery store (a typo in `--data-dir` must
/// not create an empty one).
pub async fn open_existing_store(
    cfg: &StoreConfig,
    data_dir: &Path,
) -> anyhow::Result<Arc<dyn Store>> {
    cfg.check_url()?;
    let store = store::open(cfg, data_dir, OpenMode::Existing).await?;
    store.ensure_org(DEFAULT_ORG).await?;
    Ok(store)
}

/// Opens the configured store in a data directory (creating both).
pub async fn open_store(cfg: &StoreConfig, data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let store = store::open(cfg, data_dir, OpenMode::Create).await?;
    store.ensure_org(DEFAULT_ORG).await?;
    Ok(store)
}

/// [`open_store`] for the server: its connections name its node (`--node-id`, else `sid`, the
/// data dir's id, as `node_identity` says), see `store::open_as`.
async fn open_node_store(
    config: &Config,
    data_dir: &Path,
    sid: &str,
) -> anyhow::Result<Arc<dyn Store>> {
    let node = config.cluster.node_id.as_deref().unwrap_or(sid);
    let cfg = &config.store;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let store = store::open_as(cfg, data_dir, OpenMode::Create, Some(node)).await?;
    store.ensure_org(DEFAULT_ORG).await?;
    Ok(store)
}

/// Creates a key and returns it (`cattery keys create`).
pub async fn create_key(
    store_cfg: &StoreConfig,
    data_dir: &Path,
    kind: KeyKind,
    name: &str,
    org: &str,
) -> anyhow::Result<String> {
    let store = open_existing_store(store_cfg, data_dir).await?;
    // Orgs made before names were checked keep working; a new one must be addressable.
    if store.get_org(org).await?.is_none() {
        crate::core::orgs::check_new_org_name(org)?;
    }
    store.ensure_org(org).await?;
    let (_, key) = crate::core::keys::issue_key(store.as_ref(), org, kind, name).await?;
    Ok(key)
}

fn server_id(data_dir: &Path) -> anyhow::Result<String> {
    let p = data_dir.join("server-id");
    if let Ok(s) = std::fs::read_to_string(&p) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let id = Uuid::new_v4().simple().to_string()[..12].to_string();
    std::fs::write(&p, &id)?;
    Ok(id)
}

/// How often logs older than the age limit are deleted.
const LOG_AGE_PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long the log writer lets lines gather after the first of a batch before it writes them
/// (unless 512 are waiting): a burst of starts and stops, each with a line or two, then costs
/// the store one write after the burst instead of several during it, each competing with the
/// burst's own session writes.
const LOG_LINGER: Duration = Duration::from_millis(20);

/// Writes captured lines in batches of up to 512, each written [`LOG_LINGER`] after its first
/// line (or once 512 wait, or at once while closing), and enforces retention: after each batch the
/// size cap (`max_lines`, shared fairly between orgs: the orgs holding the most lose their
/// oldest lines first, found on the `(org, seq)` index from a count kept per org), and every
/// minute the age
/// limit (`retention`). Both also run once at start.
/// Once `close` is cancelled, the writer stores what the channel holds and returns.
async fn log_writer(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<LogLine>,
    retention: Duration,
    max_lines: u64,
    close: tokio_util::sync::CancellationToken,
) {
    let prune_age = |store: Arc<dyn Store>| async move {
        let cutoff =
            now_ns().saturating_sub(i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX));
        if let Err(e) = store.prune_logs(cutoff).await {
            tracing::warn!(error = %e, "could not prune old log lines");
        }
    };
    let prune_size = |store: Arc<dyn Store>| async move {
        if max_lines > 0 {
            if let Err(e) = store.prune_logs_over(max_lines).await {
                tracing::warn!(error = %e, "could not prune log lines over the size cap");
            }
        }
    };
    prune_age(store.clone()).await;
    prune_size(store.clone()).await;
    let mut buf = Vec::with_capacity(512);
    let mut age_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + LOG_AGE_PRUNE_EVERY,
        LOG_AGE_PRUNE_EVERY,
    );
    loop {
        tokio::select! {
            n = rx.recv_many(&mut buf, 512) => {
                if n == 0 {
                    break;
                }
                crate::runtime::logs::LogSink::written(n);
                if !close.is_cancelled() && buf.len() < 512 {
                    let until = tokio::time::Instant::now() + LOG_LINGER;
                    while buf.len() < 512 {
                        let room = 512 - buf.len();
                        let more = tokio::time::timeout_at(until, rx.recv_many(&mut buf, room));
                        match more.await {
                            Ok(n) if n > 0 => crate::runtime::logs::LogSink::written(n),
                            _ => break,
                        }
                    }
                }
                // The batch and the size cap's prune: one round trip on PostgreSQL.
                if let Err(e) = store.append_logs_capped(&buf, max_lines).await {
                    crate::telemetry::log_lines_dropped(buf.len());
                    tracing::error!(error = %e, lines = buf.len(), "could not store log lines");
                }
                buf.clear();
            }
            _ = age_tick.tick() => prune_age(store.clone()).await,
            () = close.cancelled(), if !rx.is_closed() => rx.close(),
        }
    }
}

async fn signal_stream() -> mpsc::UnboundedReceiver<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if tx.send(s).is_err() {
                break;
            }
        }
    });
    rx
}

/// What a server started with text logs prints on stdout: where it listens, and the first
/// steps (keys, an agent, a session) against this server's store.
fn banner(addr: SocketAddr, data_dir: &Path, tls: bool, postgres: bool) -> String {
    let d = data_dir.display();
    let http = if tls { "https" } else { "http" };
    // Keys live in the store: on PostgreSQL, `keys create` needs the same database (its URL
    // may hold a password, so it is never printed).
    let store = if postgres {
        "--database-url \"$CATTERY_DATABASE_URL\"".to_string()
    } else {
        format!("--data-dir {d}")
    };
    let store_note = if postgres {
        "\n(CATTERY_DATABASE_URL: the database URL this server was given)"
    } else {
        ""
    };
    format!(
        "cattery listening on {http}://{addr} (data dir {d})

Next steps, in another terminal:{store_note}
  SK=$(cattery keys create {store} --type private)   # management API key (sk_...)
  PK=$(cattery keys create {store} --type public)    # session start key (pk_...)
  curl -s -X POST {http}://{addr}/v1/agents -H \"Authorization: Bearer $SK\" \\
       -d '{{\"serviceName\":\"hello\",\"command\":[\"/path/to/your/agent\"]}}'
  curl -s -X POST {http}://{addr}/v1/public/hello/start -H \"Authorization: Bearer $PK\" -d '{{}}'
  curl -s -X DELETE {http}://{addr}/v1/agents/hello/sessions/<sessionId> -H \"Authorization: Bearer $SK\"
(with cargo: replace `cattery` by `cargo run -q --release -p cattery --`; the API is at /v1/openapi.json)"
    )
}

/// The session engine over `store` and `runtime`, and the handlers' state around it: what
/// [`serve`] runs, and what the in-process API tests build over the fake runtime. The engine
/// has not recovered yet (`state.sup.recover()` comes next). `data_dir` holds the secrets key.
pub fn app_state(
    config: &Config,
    data_dir: &Path,
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    logs: mpsc::UnboundedSender<LogLine>,
) -> anyhow::Result<AppState> {
    let cfg = Settings::from_config(config, data_dir.to_path_buf());
    let cipher = Arc::new(
        match &config.cluster.secrets_key_file {
            Some(f) => crate::core::secrets::SecretCipher::load_file(f),
            None => crate::core::secrets::SecretCipher::load_or_new(&cfg.data_dir),
        }
        .context("opening the secrets key file")?,
    );
    let node = Arc::new(node_identity(config, data_dir, &cipher)?);
    let store_for_builds = store.clone();
    let build_uids = runtime.instance_uids();
    let build_namespaces = runtime.instance_namespaces();
    let build_cgroups = runtime.instance_cgroups();
    let sup = Supervisor::new(
        store.clone(),
        runtime,
        SupervisorConfig {
            default_stop_grace: Duration::from_secs_f64(cfg.stop_grace_seconds),
            start_timeout: Duration::from_secs_f64(cfg.start_timeout_seconds),
            daily_api_key: cfg.daily_api_key.clone(),
            metrics_interval: Duration::from_millis(cfg.metrics_interval_ms.max(100)),
            ice_servers: config.sessions.ice_servers.clone(),
            node_id: node.id.clone(),
            node_timeout: node.timeout,
            max_warm_starting: config.sessions.max_warm_starting,
            relay_dir: Some(cfg.data_dir.join("relays")),
            log_rate: crate::runtime::logs::LogRate {
                lines: config.logs.rate_lines,
                bytes: config.logs.rate_bytes,
            },
        },
        logs,
        Arc::new(crate::core::secrets::DeploymentSecrets::new(
            store.clone(),
            cipher.clone(),
        )),
    );
    let webhooks = crate::core::webhooks::Webhooks::start(
        store.clone(),
        cipher.clone(),
        crate::core::webhooks::WebhookSettings::default(),
    );
    sup.set_event_sink(webhooks.clone());
    let daily = Arc::new(crate::core::daily::Daily::new(
        &config.sessions.daily_api_url,
        config.sessions.daily_api_key.clone(),
    ));
    sup.set_room_remover(Arc::new(crate::core::daily::RoomDeleter {
        daily: daily.clone(),
        store: store.clone(),
        cipher: cipher.clone(),
    }));
    Ok(AppState {
        closing: tokio_util::sync::CancellationToken::new(),
        webhooks,
        limits: Arc::new(crate::core::limits::OrgLimits::new(config.limits.get())),
        store,
        sup,
        defaults: Arc::new(AgentDefaults {
            regions: cfg.regions.clone(),
            default_region: cfg.default_region.clone(),
        }),
        ws: Arc::new(
            api::ws::WsState::new(
                Duration::from_secs_f64(cfg.ws_idle_timeout_seconds),
                Duration::from_secs_f64(cfg.ws_token_ttl_seconds),
            )
            .with_public_url(crate::web::PublicUrl::new(&config.web)),
        ),
        secrets: cipher,
        metrics: Arc::new(crate::telemetry::Metrics::new(
            config.server.metrics_token.clone(),
        )),
        daily,
        node: node.clone(),
        builds: crate::core::builds::Builds::new(
            store_for_builds,
            Arc::new(crate::build::venv::VenvBuilder {
                base_python: config
                    .runtime
                    .build_python
                    .clone()
                    .unwrap_or_else(|| cfg.python.clone()),
                uids: build_uids,
                namespaces: build_namespaces,
                cgroups: build_cgroups,
                limits: crate::runtime::process::cgroup::TaskLimits {
                    memory_bytes: config.runtime.build_memory_mb.saturating_mul(1024 * 1024),
                    pids: config.runtime.build_max_processes,
                },
            }),
            crate::core::builds::BuildSettings {
                mode: crate::core::builds::BuilderMode::parse(&config.runtime.builder)
                    .unwrap_or(crate::core::builds::BuilderMode::Auto),
                dir: std::path::absolute(cfg.data_dir.join("builds"))?,
                max_context_bytes: config
                    .runtime
                    .build_max_context_mb
                    .saturating_mul(1024 * 1024),
                timeout: Duration::from_secs_f64(config.runtime.build_timeout_seconds),
                node_id: node.id.clone(),
                uploads_per_org: config.limits.build_uploads_per_org,
                builds_per_org: config.limits.builds_per_org,
                kept_per_org: config.limits.builds_kept_per_org,
            },
        ),
    })
}

/// This node (docs/cluster.md): `--node-id`, else the id generated once in the data dir; its
/// heartbeat shows its secrets key (`cipher`) by a value sealed with it.
fn node_identity(
    config: &Config,
    data_dir: &Path,
    cipher: &crate::core::secrets::SecretCipher,
) -> anyhow::Result<crate::core::cluster::NodeIdentity> {
    let c = &config.cluster;
    Ok(crate::core::cluster::NodeIdentity {
        id: match &c.node_id {
            Some(id) => id.clone(),
            None => server_id(data_dir)?,
        },
        advertise_url: c.advertise_url.clone(),
        started_ms: crate::model::now_ms(),
        timeout: Duration::from_secs_f64(c.node_timeout_seconds),
        secret: c
            .cluster_secret_file
            .as_deref()
            .map(crate::core::cluster::ClusterSecret::load_file)
            .transpose()?,
        key_check: Some(cipher.seal_check()),
    })
}

/// Joins the cluster on the store and recovers this node's instances: the peers for forwarded
/// stops (with a cluster secret), then heartbeats (the first one written before the recovery:
/// a node that restarts within the timeout is never taken over while it re-adopts, and one
/// that was taken over sees what it lost, since the store makes its heartbeat wait for a
/// takeover in progress), the recovery, and the watch over the other nodes. Returns the
/// heartbeat and watch tasks. `builds` (their recovery) runs before the instances' recovery.
/// A node that fails after its first heartbeat takes it back (`core::cluster::take_back`). On
/// a shared database, first refuses an id another live node uses at another address
/// (`core::cluster::id_in_use`), another secrets key or cluster secret than a live node's
/// (`core::cluster::refusal`); on any store, refuses a secrets key that does not open the
/// secrets already stored (`core::secrets::check_key_opens_stored`).
async fn join_cluster(
    store: &Arc<dyn Store>,
    state: &AppState,
    shared_store: bool,
    builds: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<(
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
    crate::core::shared::Shared,
)> {
    let sup = &state.sup;
    if let Some(secret) = &state.node.secret {
        sup.set_peers(Arc::new(crate::core::cluster::HttpPeers::new(
            secret.clone(),
            Some(state.node.run()),
        )));
    }
    // Only a shared database can have another live node with this id (SQLite's data dir is
    // locked to one server).
    let mut before = Vec::new();
    if shared_store {
        let nodes = store.list_nodes().await.context("reading the node list")?;
        let now = crate::model::now_ms();
        if let Some(why) = crate::core::cluster::id_in_use(&state.node, &nodes, now) {
            anyhow::bail!(why);
        }
        if let Some(why) = crate::core::cluster::refusal(&state.node, &nodes, now, &state.secrets) {
            anyhow::bail!(why);
        }
        if let Some(why) = crate::core::cluster::unreachable_by_peers(&state.node, &nodes, now) {
            tracing::warn!("{why}");
        }
        before = nodes;
    }
    // Also on SQLite: a lost or replaced `secrets.key` would otherwise be replaced by a new
    // key at start, every secret-bound start would fail, and values written since would be
    // sealed under a key the older ones do not share.
    crate::core::secrets::check_key_opens_stored(store.as_ref(), &state.secrets).await?;
    // Only now is a new data dir's key written: a start refused before leaves no key.
    state.secrets.save_new_key()?;
    // The first heartbeat; on a shared database, checked against the nodes that started
    // meanwhile (`core::cluster::announce`).
    crate::core::cluster::announce(store.as_ref(), &state.node, &state.secrets, &before).await?;
    if shared_store {
        // After the first heartbeat: the peer looks this node's run up in its store.
        let now = crate::model::now_ms();
        if let Err(e) =
            crate::core::cluster::check_secret_with_peers(&state.node, &before, now).await
        {
            crate::core::cluster::take_back(store.as_ref(), &state.node, &before).await;
            return Err(e);
        }
    }
    let heartbeats = crate::core::cluster::spawn_heartbeats(
        store.clone(),
        (*state.node).clone(),
        Arc::downgrade(sup),
    );
    let rest = async {
        // The builds first: the recovery refills warm pools (instance records this node then
        // owns, which would keep its heartbeat from being taken back).
        builds.await?;
        let shared = crate::core::shared::Shared::start(store.clone(), &state.node, sup).await?;
        sup.recover()
            .await
            .context("recovering instances after restart")?;
        anyhow::Ok(shared.after_recovery(store.clone(), &state.node, sup))
    };
    match rest.await {
        Ok(shared) => {
            let watch = crate::core::cluster::spawn_watch(
                store.clone(),
                Arc::downgrade(sup),
                (*state.node).clone(),
            );
            Ok((heartbeats, watch, shared))
        }
        Err(e) => {
            // Not started after all: no heartbeat of a node that never served stays behind.
            heartbeats.abort();
            let _ = heartbeats.await;
            crate::core::cluster::take_back(store.as_ref(), &state.node, &before).await;
            Err(e)
        }
    }
}

/// Builds (`core::builds`): the Docker builder when there is a Docker runtime, and the
/// recovery of builds a restart cut short.
async fn start_builds(
    state: &AppState,
    docker: Option<&Arc<crate::runtime::docker::DockerRuntime>>,
    config: &Config,
) -> anyhow::Result<()> {
    if let Some(d) = docker {
        state
            .builds
            .set_docker_builder(Arc::new(crate::build::docker::DockerBuilder {
                docker: d.clone(),
                base_image: config.runtime.build_base_image.clone(),
                network: config.runtime.build_network.clone(),
            }));
    }
    state
        .builds
        .recover()
        .await
        .context("recovering builds after restart")?;
    let hours = config.runtime.build_retention_hours;
    if hours > 0.0 {
        let keep = Duration::from_secs_f64(hours * 3600.0);
        // A tenth of the retention, between 1 s and an hour.
        let every = (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let (builds, sup) = (state.builds.clone(), Arc::downgrade(&state.sup));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(s) = sup.upgrade() else { break };
                if let Err(e) = builds.collect(keep, || s.deployments_in_use()).await {
                    tracing::warn!(error = %e, "the build retention could not run; next try in {every:?}");
                }
            }
        });
    }
    Ok(())
}

/// The runtimes' configuration of a node with server id `sid`. Errors: its cluster secret
/// file (which labels its containers, `ClusterSecret::container_label`) cannot be read or is
/// invalid.
fn runtime_config(
    config: &Config,
    cfg: &Settings,
    sid: &str,
    runner_path: PathBuf,
) -> anyhow::Result<RuntimeConfig> {
    Ok(RuntimeConfig {
        kind: config.runtime.kind,
        instances_dir: cfg.data_dir.join("instances"),
        server_id: sid.to_string(),
        cluster_label: config
            .cluster
            .cluster_secret_file
            .as_deref()
            .map(crate::core::cluster::ClusterSecret::load_file)
            .transpose()?
            .map(|s| s.container_label()),
        python: cfg.python.clone(),
        runner_path,
        instance_uids: cfg.instance_uids,
        docker_host: config.runtime.docker_host.clone(),
        image_pull_policy: config.runtime.image_pull_policy,
        python_fork_server: config
            .runtime
            .python_fork_server
            .parse()
            .unwrap_or(crate::runtime::process::zygote::ForkServerMode::On),
        runtime_dir: config.runtime.runtime_dir.parse().unwrap_or_default(),
    })
}

/// Runs the server until SIGTERM/SIGINT and a completed drain.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let listen: SocketAddr = tokio::net::lookup_host(&config.server.listen)
        .await
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| anyhow::anyhow!("--listen {}: expected host:port", config.server.listen))?;
    let mut signals = signal_stream().await;
    crate::runtime::process::isolation::restrict_umask();
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let cfg = Settings::from_config(&config, std::fs::canonicalize(data_dir)?);
    let lock = lock_data_dir(&cfg.data_dir)?;
    // Bound once the data dir is ours (the previous server's listening socket may outlive it
    // for the lock's hand-over), and before anything is written or announced: a node that
    // cannot listen leaves no heartbeat behind (another node would take it for a live one)
    // and touches no instance. Connections wait in the backlog until the recovery is done.
    let listener = bind_within(listen, LOCK_HANDOVER).await?;
    warn_of_a_listen_port_among_instance_ports(&config, listen);
    let sid = server_id(&cfg.data_dir)?;
    let store = open_node_store(&config, &cfg.data_dir, &sid).await?;
    let runner_dir = cfg.data_dir.join("runner");
    std::fs::create_dir_all(&runner_dir)?;
    let runner_path = runner_dir.join("cattery_runner.py");
    std::fs::write(&runner_path, RUNNER_PY)?;
    let built = factory::build_all(&runtime_config(&config, &cfg, &sid, runner_path)?)?;
    let runtime = built.runtime;
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    let close_logs = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(log_writer(
        store.clone(),
        log_rx,
        Duration::from_secs(cfg.log_retention_days.saturating_mul(86400)),
        cfg.log_retention_max_lines,
        close_logs.clone(),
    ));
    let state = app_state(
        &config,
        &cfg.data_dir,
        store.clone(),
        runtime.clone(),
        log_tx,
    )?;
    if let Some(d) = &built.docker {
        d.set_pull_secrets(Arc::new(crate::core::secrets::ImagePullSecrets::new(
            store.clone(),
            state.secrets.clone(),
        )));
    }
    let sup = state.sup.clone();
    state
        .webhooks
        .load()
        .await
        .context("reading the webhook endpoints")?;
    let shared_store = config.store.database_url.is_some();
    let tls = crate::web::tls_acceptor(&config.web)?;
    let builds = start_builds(&state, built.docker.as_ref(), &config);
    let (heartbeats, watch, shared) = join_cluster(&store, &state, shared_store, builds).await?;
    let node = state.node.clone();
    let closing = state.closing.clone();
    let app = api::cors::wrap(api::router(state), &config.web);
    let addr = listener.local_addr()?;
    // After the runtime is made: it raises the soft open-files limit to the hard one.
    let nofile = http_server::nofile_limit();
    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs_f64(config.server.header_read_timeout_seconds),
        body_read_timeout: Duration::from_secs_f64(config.server.body_read_timeout_seconds),
        max_connections: config.connection_cap(nofile),
    };
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), isolation = %runtime.isolation(),
        nofile, max_connections = limits.max_connections,
        version = crate::build_info::VERSION,
        commit = crate::build_info::COMMIT.unwrap_or("unknown"), "cattery listening");
    // With JSON logs, stdout carries nothing but JSON either (journald mixes the two).
    if config.server.log_format == crate::config::LogFormat::Text {
        let b = banner(addr, &cfg.data_dir, tls.is_some(), shared_store);
        println!("{b}");
    }
    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    // Event streams end when HTTP stops: the graceful close would otherwise wait out its
    // bound for every dashboard left open.
    let http = tokio::spawn(http_server::serve(listener, app, limits, tls, async move {
        let _ = stop_http_rx.await;
        closing.cancel();
    }));
    crate::core::cluster::spawn_advertise_check(&node, shared_store);
    let first = signals.recv().await.unwrap_or("SIGTERM");
    if config.sessions.on_stop == crate::config::OnStop::Detach {
        let _ = stop_http_tx.send(());
        let tasks = (http, close_logs, writer);
        return detach(first, &sup, &store, &runtime, tasks, lock, &node.id).await;
    }
    tracing::info!(
        signal = first,
        "draining: new sessions get 503; a second signal stops sessions now"
    );
    let drain_began = tokio::time::Instant::now();
    let forced = tokio_util::sync::CancellationToken::new();
    let second = forced.clone();
    tokio::spawn(async move {
        let _ = signals.recv().await;
        tracing::info!("second signal: stopping every session now");
        second.cancel();
    });
    sup.drain(
        Duration::from_secs_f64(cfg.drain_timeout_seconds),
        forced.clone().cancelled_owned(),
    )
    .await;
    linger(
        drain_began + config.sessions.drain_linger(shared_store),
        &forced,
    )
    .await;
    runtime.shutdown().await;
    watch.abort();
    heartbeats.abort();
    shared.stop();
    crate::core::cluster::leave(store.as_ref(), &node).await;
    let _ = stop_http_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    drop(sup);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    tracing::info!("stopped");
    Ok(())
}

/// Goes on answering as a draining node (starts 503, `/ready` 503) until `until`, the drain's
/// least length (`--drain-linger-seconds`), unless a second signal comes: a load balancer
/// that checks `/ready` every second then takes the node out before it exits, instead of
/// sending a start to a port that closes under it.
async fn linger(until: tokio::time::Instant, forced: &tokio_util::sync::CancellationToken) {
    if until <= tokio::time::Instant::now() || forced.is_cancelled() {
        return;
    }
    tracing::info!(
        seconds = (until - tokio::time::Instant::now()).as_secs_f64(),
        "drained; answering as draining a little longer, for the load balancer's checks"
    );
    tokio::select! {
        () = tokio::time::sleep_until(until) => {}
        () = forced.cancelled() => {}
    }
}

/// `--on-stop detach`: stops serving HTTP (requests in flight finish, so a start either
/// records its session or fails), stores every captured log line, and returns leaving every
/// instance and session record as it is, for the next `cattery serve` to re-adopt. The
/// tasks: the HTTP server's, and the log writer's stop token and task.
async fn detach(
    signal: &str,
    sup: &Arc<Supervisor>,
    store: &Arc<dyn Store>,
    runtime: &Arc<dyn Runtime>,
    (http, close_logs, writer): (
        tokio::task::JoinHandle<()>,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ),
    data_dir_lock: nix::fcntl::Flock<std::fs::File>,
    node_id: &str,
) -> anyhow::Result<()> {
    tracing::info!(
        signal,
        "detaching: no new connections; sessions keep running for the next cattery serve"
    );
    sup.detach();
    let _ = tokio::time::timeout(Duration::from_secs(10), http).await;
    crate::runtime::logs::freeze_capture();
    close_logs.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    // This node's: on a shared database the others' sessions are theirs to keep.
    let open = store
        .list_open_sessions()
        .await
        .map(|s| s.iter().filter(|s| s.node_id == node_id).count())
        .unwrap_or(0);
    tracing::info!(
        open_sessions = open,
        "detached: instances left running; start the next cattery serve on this data dir to re-adopt them"
    );
    // Websocket calls relayed by this process go on through it: the data dir and the port are
    // the next server's already, and this process exits when its last relay ends.
    drop(data_dir_lock);
    // Releases this server's liveness lock (the next server, of the same id, waits for it) and
    // removes its cgroup directories only where they are empty: running instances keep theirs.
    runtime.shutdown().await;
    // A relayed session is this process's until its end is recorded (its relay mark,
    // `core::session::relays`), a moment after its relay ends.
    let relaying = || crate::api::ws::live_relays().max(crate::core::session::relays::held());
    let relays = relaying();
    if relays > 0 {
        tracing::info!(
            relays,
            "relaying the websocket calls already connected until they end"
        );
        while relaying() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!("the last relayed websocket call ended");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{Flock, FlockArg};
    use std::io::Write;

    /// `cattery keys create --org` refuses to create an org whose name no client can put in
    /// `/v1/organizations/{org}/...` or `{agent}.{org}` (empty, a `/`, a space, ...): the
    /// key would be printed, and every CLI call with it would then fail. Good names work.
    #[tokio::test]
    async fn keys_create_refuses_a_new_org_name_no_client_can_address() {
        let dir = tempfile::tempdir().unwrap();
        drop(
            crate::store::sqlite::SqliteStore::open(dir.path())
                .await
                .unwrap(),
        );
        let cfg = StoreConfig::default();
        let long = "a".repeat(64);
        for bad in ["", "acme/eu", "my team", "a?b", "\u{e9}quipe", "-x", &long] {
            let e = create_key(&cfg, dir.path(), KeyKind::Public, "k", bad)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("invalid org name"), "{bad:?}: {e}");
        }
        for good in ["default", "acme", "org-b", "lab_org.eu", "Acme2"] {
            let key = create_key(&cfg, dir.path(), KeyKind::Public, "k", good).await;
            assert!(key.is_ok(), "{good:?}: {key:?}");
        }
        let store = open_existing_store(&cfg, dir.path()).await.unwrap();
        let mut orgs = store.list_orgs().await.unwrap();
        orgs.sort();
        assert_eq!(orgs, ["Acme2", "acme", "default", "lab_org.eu", "org-b"]);
    }

    /// A captured line is stored a batch delay after its capture, never before, with the
    /// lines captured meanwhile; closing writes what waits at once.
    #[tokio::test]
    async fn log_lines_are_written_in_batches_and_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(dir.path())
                .await
                .unwrap(),
        );
        let agent = uuid::Uuid::new_v4();
        let (tx, rx) = mpsc::unbounded_channel();
        let close = tokio_util::sync::CancellationToken::new();
        let writer = tokio::spawn(log_writer(
            store.clone(),
            rx,
            Duration::from_secs(3600),
            0,
            close.clone(),
        ));
        let line = |n: i64| LogLine {
            org: "default".into(),
            agent_id: agent,
            deployment_id: None,
            session_id: None,
            instance_id: None,
            ts_ns: crate::model::now_ns() + n,
            stream: "platform",
            line: format!("line {n}"),
        };
        let stored = || {
            let store = store.clone();
            async move {
                let f = crate::store::LogFilter {
                    limit: 100,
                    ..Default::default()
                };
                store.query_logs(agent, &f).await.unwrap().0
            }
        };
        let sent = std::time::Instant::now();
        tx.send(line(1)).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        tx.send(line(2)).unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        if sent.elapsed() < LOG_LINGER {
            assert_eq!(stored().await, 0, "written before the batch delay");
        }
        let began = std::time::Instant::now();
        while stored().await < 2 {
            assert!(began.elapsed() < Duration::from_secs(10), "never written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(stored().await, 2, "both lines in the batch");
        tx.send(line(3)).unwrap();
        close.cancel();
        drop(tx);
        writer.await.unwrap();
        assert_eq!(stored().await, 3, "written on close");
    }

    /// The banner's key commands name the store the keys live in: the data dir on SQLite,
    /// the database on PostgreSQL (by its variable: the URL may hold a password).
    #[test]
    fn the_banner_creates_keys_in_this_servers_store() {
        let addr: SocketAddr = "127.0.0.1:7860".parse().unwrap();
        let dir = Path::new("/var/lib/cattery");
        let b = banner(addr, dir, false, false);
        assert!(b.contains("cattery keys create --data-dir /var/lib/cattery --type private"));
        let b = banner(addr, dir, true, true);
        assert!(
            b.contains(
                "cattery keys create --database-url \"$CATTERY_DATABASE_URL\" --type public"
            ),
            "{b}"
        );
        assert!(b.contains("https://127.0.0.1:7860/v1/agents"), "{b}");
        assert!(!b.contains("--data-dir /var/lib/cattery --type"), "{b}");
    }

    /// A pid that is surely not alive: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    /// Holds `dir`'s lock through a descriptor of its own (a process sharing the old
    /// server's descriptors), naming `pid` as the server.
    fn hold(dir: &Path, pid: u32) -> Flock<std::fs::File> {
        let mut f = std::fs::File::create(dir.join("serve.lock")).unwrap();
        write!(f, "{pid}").unwrap();
        Flock::lock(f, FlockArg::LockExclusiveNonblock).unwrap()
    }

    #[test]
    fn a_start_waits_for_the_lock_of_a_server_that_has_exited() {
        let dir = tempfile::tempdir().unwrap();
        let held = hold(dir.path(), dead_pid());
        let t0 = std::time::Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let lock = lock_data_dir_within(dir.path(), Duration::from_secs(10)).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        release.join().unwrap();
        let me = std::fs::read_to_string(dir.path().join("serve.lock")).unwrap();
        assert_eq!(me, std::process::id().to_string());
        drop(lock);
    }

    #[test]
    fn a_start_refuses_at_once_while_the_server_that_holds_the_lock_lives() {
        let dir = tempfile::tempdir().unwrap();
        let _held = hold(dir.path(), std::process::id());
        let t0 = std::time::Instant::now();
        let e = lock_data_dir_within(dir.path(), Duration::from_secs(10)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(e.to_string().contains("another cattery serve"), "{e}");
    }

    /// A restart right after a clean stop may find the previous server's listening socket
    /// still open in a process it started: the bind waits for it, and names what to do when
    /// it does not go. Before, the start failed at once with "Address already in use".
    #[tokio::test]
    async fn a_listen_address_still_in_use_is_waited_for_and_then_named() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let l = bind_within(addr, Duration::from_secs(10)).await.unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        release.join().unwrap();
        let e = bind_within(addr, Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("another process listens on it"), "{e}");
        assert!(e.contains(&format!("sport = :{}", addr.port())), "{e}");
    }

    #[test]
    fn a_lock_kept_past_the_handover_by_an_exited_server_is_an_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let _held = hold(dir.path(), dead_pid());
        let e = lock_data_dir_within(dir.path(), Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("has exited"), "{e}");
    }
}
