//! `cattery serve` and `cattery keys`: wiring the store, runtime, supervisor and HTTP server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::api::{self, AppState};
use crate::core::agents::AgentDefaults;
use crate::core::supervisor::{Supervisor, SupervisorConfig};
use crate::model::{now_ns, KeyKind, LogLine};
use crate::runtime::factory::{self, RuntimeConfig};
use crate::runtime::RuntimeKind;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

/// The org every server has from its first start.
pub const DEFAULT_ORG: &str = "default";

/// The Python runner for `local:` agents, shipped inside the binary.
pub const RUNNER_PY: &str = include_str!("../runner/cattery_runner.py");

/// Settings of `cattery serve` (each has a flag and a `CATTERY_*` variable; see `cattery serve --help`).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Listen address (default `127.0.0.1:7870`).
    pub listen: SocketAddr,
    /// Data directory (default `./.cattery`).
    pub data_dir: PathBuf,
    /// Default stop grace, seconds (default 5).
    pub stop_grace_seconds: f64,
    /// Instance start timeout, seconds (default 60).
    pub start_timeout_seconds: f64,
    /// Drain timeout on SIGTERM, seconds (default 30).
    pub drain_timeout_seconds: f64,
    /// Python for `local:` agents (default `python3`).
    pub python: String,
    /// Daily API key.
    pub daily_api_key: Option<String>,
    /// Resource sampling interval, ms (default 5000).
    pub metrics_interval_ms: u64,
    /// Log retention by age, days (default 30).
    pub log_retention_days: u64,
    /// Log retention by size: the newest this many lines are kept (default 1,000,000; 0 = no cap).
    pub log_retention_max_lines: u64,
    /// Regions offered (default `local`).
    pub regions: Vec<String>,
    /// Default region (default the first region).
    pub default_region: String,
    /// A websocket client silent this long is treated as gone, seconds (default 30).
    pub ws_idle_timeout_seconds: f64,
    /// Lifetime of a websocket-transport token, seconds (default 300).
    pub ws_token_ttl_seconds: f64,
    /// Range of instance uids (default 2000000000-2000065535); `None`: the server's own.
    pub instance_uids: Option<crate::runtime::process::uids::UidRange>,
    /// Docker engine for image agents (`--docker-host`); `None`: `DOCKER_HOST` or the local socket.
    pub docker_host: Option<String>,
    /// When images are pulled at deploy (`--image-pull-policy`, default `missing`).
    pub image_pull_policy: crate::runtime::docker::image::PullPolicy,
}

/// Takes the data directory's lock (`<data-dir>/serve.lock`, `flock`), so two servers never
/// supervise the same instances. Errors: another `cattery serve` holds it.
fn lock_data_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("serve.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut holder = String::new();
    let _ = f.read_to_string(&mut holder);
    let mut lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another cattery serve (pid {}) is using the data dir {} ({e}); stop it or pick another --data-dir",
            holder.trim(),
            dir.display()
        )
    })?;
    lock.set_len(0)?;
    lock.rewind()?;
    write!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// Opens the store of an existing data directory (for `cattery keys`). Errors: the directory
/// holds no Cattery database (a typo in `--data-dir` must not create an empty one).
pub async fn open_existing_store(data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    if !data_dir.join("cattery.db").is_file() {
        anyhow::bail!(
            "{} is not a Cattery data dir (no cattery.db); start `cattery serve --data-dir {}` first, or pass the server's --data-dir",
            data_dir.display(),
            data_dir.display()
        );
    }
    open_store(data_dir).await
}

/// Opens the store in a data directory (creating both).
pub async fn open_store(data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let store = SqliteStore::open(data_dir)
        .await
        .context("cannot open the database")?;
    store.ensure_org(DEFAULT_ORG).await?;
    Ok(Arc::new(store))
}

/// Creates a key and returns it (`cattery keys create`).
pub async fn create_key(
    data_dir: &Path,
    kind: KeyKind,
    name: &str,
    org: &str,
) -> anyhow::Result<String> {
    let store = open_existing_store(data_dir).await?;
    store.ensure_org(org).await?;
    let (_, key) = api::auth::issue_key(store.as_ref(), org, kind, name).await?;
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

/// Writes captured lines in batches of up to 512, and enforces retention: after each batch the
/// size cap (`max_lines`, cheap: a range delete on the primary key), and every minute the age
/// limit (`retention`). Both also run once at start.
async fn log_writer(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<LogLine>,
    retention: Duration,
    max_lines: u64,
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
                if let Err(e) = store.append_logs(&buf).await {
                    tracing::error!(error = %e, lines = buf.len(), "could not store log lines");
                }
                buf.clear();
                prune_size(store.clone()).await;
            }
            _ = age_tick.tick() => prune_age(store.clone()).await,
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

fn print_banner(addr: SocketAddr, data_dir: &Path) {
    let d = data_dir.display();
    println!(
        "cattery listening on http://{addr} (data dir {d})

Next steps, in another terminal:
  SK=$(cattery keys create --data-dir {d} --type private)   # management API key (sk_...)
  PK=$(cattery keys create --data-dir {d} --type public)    # session start key (pk_...)
  curl -s -X POST http://{addr}/v1/agents -H \"Authorization: Bearer $SK\" \\
       -d '{{\"serviceName\":\"hello\",\"command\":[\"/path/to/your/agent\"]}}'
  curl -s -X POST http://{addr}/v1/public/hello/start -H \"Authorization: Bearer $PK\" -d '{{}}'
  curl -s -X DELETE http://{addr}/v1/agents/hello/sessions/<sessionId> -H \"Authorization: Bearer $SK\"
(with cargo: replace `cattery` by `cargo run -q --release -p cattery --`; the API is at /v1/openapi.json)"
    );
}

/// Runs the server until SIGTERM/SIGINT and a completed drain.
pub async fn serve(mut cfg: ServeConfig) -> anyhow::Result<()> {
    let mut signals = signal_stream().await;
    crate::runtime::process::isolation::restrict_umask();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    // Instances run in other directories: every path handed to them must be absolute.
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let store = open_store(&cfg.data_dir).await?;
    let sid = server_id(&cfg.data_dir)?;
    let runner_dir = cfg.data_dir.join("runner");
    std::fs::create_dir_all(&runner_dir)?;
    let runner_path = runner_dir.join("cattery_runner.py");
    std::fs::write(&runner_path, RUNNER_PY)?;
    let built = factory::build_all(&RuntimeConfig {
        kind: RuntimeKind::Auto,
        instances_dir: cfg.data_dir.join("instances"),
        server_id: sid.clone(),
        python: cfg.python.clone(),
        runner_path,
        instance_uids: cfg.instance_uids,
        docker_host: cfg.docker_host.clone(),
        image_pull_policy: cfg.image_pull_policy,
    })?;
    let runtime = built.runtime;
    let cipher = Arc::new(
        crate::core::secrets::SecretCipher::load_or_create(&cfg.data_dir)
            .context("opening the secrets key file")?,
    );
    if let Some(d) = &built.docker {
        d.set_pull_secrets(Arc::new(crate::core::secrets::ImagePullSecrets::new(
            store.clone(),
            cipher.clone(),
        )));
    }
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(log_writer(
        store.clone(),
        log_rx,
        Duration::from_secs(cfg.log_retention_days.saturating_mul(86400)),
        cfg.log_retention_max_lines,
    ));
    let sup = Supervisor::new(
        store.clone(),
        runtime.clone(),
        SupervisorConfig {
            default_stop_grace: Duration::from_secs_f64(cfg.stop_grace_seconds),
            start_timeout: Duration::from_secs_f64(cfg.start_timeout_seconds),
            daily_api_key: cfg.daily_api_key.clone(),
            metrics_interval: Duration::from_millis(cfg.metrics_interval_ms.max(100)),
        },
        log_tx,
    );
    sup.set_secret_source(Arc::new(crate::core::secrets::DeploymentSecrets::new(
        store.clone(),
        cipher.clone(),
    )));
    sup.recover()
        .await
        .context("recovering instances after restart")?;
    let state = AppState {
        store: store.clone(),
        sup: sup.clone(),
        defaults: Arc::new(AgentDefaults {
            regions: cfg.regions.clone(),
            default_region: cfg.default_region.clone(),
        }),
        ws: Arc::new(api::ws::WsState::new(
            Duration::from_secs_f64(cfg.ws_idle_timeout_seconds),
            Duration::from_secs_f64(cfg.ws_token_ttl_seconds),
        )),
        secrets: cipher,
    };
    let app = api::router(state);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), isolation = %runtime.isolation(), "cattery listening");
    print_banner(addr, &cfg.data_dir);

    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_http_rx.await;
            })
            .await
    });
    let first = signals.recv().await.unwrap_or("SIGTERM");
    tracing::info!(
        signal = first,
        "draining: new sessions get 503; a second signal stops sessions now"
    );
    let force = async move {
        let _ = signals.recv().await;
        tracing::info!("second signal: stopping every session now");
    };
    sup.drain(Duration::from_secs_f64(cfg.drain_timeout_seconds), force)
        .await;
    runtime.shutdown().await;
    let _ = stop_http_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    drop(sup);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    tracing::info!("stopped");
    Ok(())
}
