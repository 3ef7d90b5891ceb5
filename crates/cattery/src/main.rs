//! The `cattery` binary: `cattery serve` runs the platform; `cattery keys ...` manages keys.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use cattery::model::KeyKind;
use cattery::serve::{self, ServeConfig, DEFAULT_ORG};

#[derive(Parser)]
#[command(
    name = "cattery",
    version,
    about = "Self-hosted session platform for Pipecat voice agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (HTTP API, supervisor, local process runtime, SQLite store).
    Serve(ServeArgs),
    /// Manage API keys and user tokens (works while the server runs).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (`host:port`; a host name is resolved).
    #[arg(long, env = "CATTERY_LISTEN", default_value = "127.0.0.1:7870")]
    listen: String,
    /// Data directory (SQLite database, instance directories).
    #[arg(long, env = "CATTERY_DATA_DIR", default_value = "./.cattery")]
    data_dir: PathBuf,
    /// Seconds between SIGTERM and SIGKILL when an instance is removed, for agents that set no
    /// `stopGraceSeconds`. 0 means SIGKILL at once.
    #[arg(long, env = "CATTERY_STOP_GRACE_SECONDS", default_value_t = cattery::model::DEFAULT_STOP_GRACE_S)]
    stop_grace_seconds: f64,
    /// Seconds an instance may take to answer /readyz with 200.
    #[arg(long, env = "CATTERY_START_TIMEOUT_SECONDS", default_value_t = 60.0)]
    start_timeout_seconds: f64,
    /// On SIGTERM, seconds running sessions may go on before they are stopped.
    #[arg(long, env = "CATTERY_DRAIN_TIMEOUT_SECONDS", default_value_t = 30.0)]
    drain_timeout_seconds: f64,
    /// Python interpreter for `local:` agents (after the agent's `python` and `<dir>/.venv`).
    #[arg(long, env = "CATTERY_PYTHON", default_value = "python3")]
    python: String,
    /// Daily API key, needed for `createDailyRoom`.
    #[arg(long, env = "CATTERY_DAILY_API_KEY")]
    daily_api_key: Option<String>,
    /// Resource sampling interval for sessions, ms.
    #[arg(long, env = "CATTERY_METRICS_INTERVAL_MS", default_value_t = 5000)]
    metrics_interval_ms: u64,
    /// Logs older than this many days are deleted.
    #[arg(long, env = "CATTERY_LOG_RETENTION_DAYS", default_value_t = 30)]
    log_retention_days: u64,
    /// At most this many log lines are kept (all agents together); the oldest go first. 0 = no cap.
    #[arg(
        long,
        env = "CATTERY_LOG_RETENTION_MAX_LINES",
        default_value_t = 1_000_000
    )]
    log_retention_max_lines: u64,
    /// Regions offered (comma-separated).
    #[arg(
        long,
        env = "CATTERY_REGIONS",
        default_value = "local",
        value_delimiter = ','
    )]
    regions: Vec<String>,
    /// Default region (default: the first of --regions).
    #[arg(long, env = "CATTERY_DEFAULT_REGION")]
    default_region: Option<String>,
    /// A websocket-transport client that sends nothing (not even a pong to Cattery's pings)
    /// for this many seconds is treated as gone and its session ends.
    #[arg(long, env = "CATTERY_WS_IDLE_TIMEOUT_SECONDS", default_value_t = 30.0)]
    ws_idle_timeout_seconds: f64,
    /// Seconds a websocket-transport token from `/start` stays valid (single use).
    #[arg(long, env = "CATTERY_WS_TOKEN_TTL_SECONDS", default_value_t = 300.0)]
    ws_token_ttl_seconds: f64,
    /// Range of uids (and gids) for instances, `START-END`: each instance runs under one of
    /// its own (needs root), or `off` to run instances as the server's user. See docs/security.md.
    #[arg(
        long,
        env = "CATTERY_INSTANCE_UIDS",
        default_value = "2000000000-2000065535"
    )]
    instance_uids: String,
    /// Docker engine for agents deployed from a container image (`unix:///path`,
    /// `tcp://host:port`; same meaning as `DOCKER_HOST`, which is the default, then the local
    /// socket). Without a reachable engine, image agents get a deployment error.
    #[arg(long, env = "CATTERY_DOCKER_HOST")]
    docker_host: Option<String>,
    /// When an agent's image is pulled at deploy: `missing` (only when the engine lacks it),
    /// `always`, or `never`.
    #[arg(long, env = "CATTERY_IMAGE_PULL_POLICY", default_value = "missing")]
    image_pull_policy: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyType {
    Public,
    Private,
    Token,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key and print it (and nothing else) on stdout.
    Create {
        /// Data directory of the server.
        #[arg(long, env = "CATTERY_DATA_DIR", default_value = "./.cattery")]
        data_dir: PathBuf,
        /// `public` (pk_, starts sessions), `private` (sk_, the private API) or `token`
        /// (pcc_pat_, for the CLI).
        #[arg(long = "type", value_enum)]
        kind: KeyType,
        /// A name for the key.
        #[arg(long, default_value = "default")]
        name: String,
        /// Org of the key (created if missing).
        #[arg(long, default_value = DEFAULT_ORG)]
        org: String,
    },
    /// List keys (id, kind, name, prefix, revoked).
    List {
        /// Data directory of the server.
        #[arg(long, env = "CATTERY_DATA_DIR", default_value = "./.cattery")]
        data_dir: PathBuf,
        /// Org.
        #[arg(long, default_value = DEFAULT_ORG)]
        org: String,
    },
    /// Revoke a key by id; it fails at once.
    Revoke {
        /// Data directory of the server.
        #[arg(long, env = "CATTERY_DATA_DIR", default_value = "./.cattery")]
        data_dir: PathBuf,
        /// Org.
        #[arg(long, default_value = DEFAULT_ORG)]
        org: String,
        /// Key id.
        id: uuid::Uuid,
    },
}

/// Most threads in tokio's blocking pool (see `main`).
const BLOCKING_THREADS: usize = 32;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking sections (spawns and cgroup removals in `block_in_place`, whose worker is
        // replaced by a pool thread meanwhile) are few at a time: the kernel serializes them on
        // its cgroup mutex. The default of 512 let a churn grow the pool past 100 threads.
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cattery: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => {
                tracing_subscriber::fmt()
                    .with_env_filter(
                        tracing_subscriber::EnvFilter::try_from_env("CATTERY_LOG")
                            .unwrap_or_else(|_| "info".into()),
                    )
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .init();
                let default_region = a
                    .default_region
                    .clone()
                    .unwrap_or_else(|| a.regions[0].clone());
                if !(0.0..=3600.0).contains(&a.stop_grace_seconds) {
                    anyhow::bail!("--stop-grace-seconds must be between 0 and 3600");
                }
                if !a.regions.contains(&default_region) {
                    anyhow::bail!(
                        "--default-region {default_region} is not one of --regions ({})",
                        a.regions.join(", ")
                    );
                }
                let listen: SocketAddr = tokio::net::lookup_host(&a.listen)
                    .await
                    .ok()
                    .and_then(|mut it| it.next())
                    .ok_or_else(|| anyhow::anyhow!("--listen {}: expected host:port", a.listen))?;
                serve::serve(ServeConfig {
                    listen,
                    data_dir: a.data_dir,
                    stop_grace_seconds: a.stop_grace_seconds,
                    start_timeout_seconds: a.start_timeout_seconds,
                    drain_timeout_seconds: a.drain_timeout_seconds,
                    python: a.python,
                    daily_api_key: a.daily_api_key,
                    metrics_interval_ms: a.metrics_interval_ms,
                    log_retention_days: a.log_retention_days,
                    log_retention_max_lines: a.log_retention_max_lines,
                    regions: a.regions,
                    default_region,
                    ws_idle_timeout_seconds: a.ws_idle_timeout_seconds,
                    ws_token_ttl_seconds: a.ws_token_ttl_seconds,
                    instance_uids: match a.instance_uids.as_str() {
                        "off" => None,
                        r => Some(
                            r.parse()
                                .map_err(|e| anyhow::anyhow!("--instance-uids {e}"))?,
                        ),
                    },
                    docker_host: a.docker_host,
                    image_pull_policy: cattery::runtime::docker::image::PullPolicy::parse(
                        &a.image_pull_policy,
                    )
                    .ok_or_else(|| {
                        anyhow::anyhow!("--image-pull-policy must be missing, always or never")
                    })?,
                })
                .await
            }
            Cmd::Keys { cmd } => keys(cmd).await,
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cattery: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn keys(cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Create {
            data_dir,
            kind,
            name,
            org,
        } => {
            let kind = match kind {
                KeyType::Public => KeyKind::Public,
                KeyType::Private => KeyKind::Private,
                KeyType::Token => KeyKind::Token,
            };
            let key = serve::create_key(&data_dir, kind, &name, &org).await?;
            println!("{key}");
        }
        KeysCmd::List { data_dir, org } => {
            let store = serve::open_existing_store(&data_dir).await?;
            for k in store.list_keys(&org, None).await? {
                println!(
                    "{}\t{}\t{}\t{}...\t{}",
                    k.id,
                    k.kind.as_str(),
                    k.name,
                    k.prefix,
                    if k.revoked_ms.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
        }
        KeysCmd::Revoke { data_dir, org, id } => {
            let store = serve::open_existing_store(&data_dir).await?;
            if !store.revoke_key(&org, id).await? {
                anyhow::bail!("no key {id} in org {org}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
