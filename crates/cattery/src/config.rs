//! Configuration of `cattery serve`, in sections: `server`, `store`, `runtime`, `sessions`,
//! `logs`, `websocket`, `web`, `limits`, `cluster`.
//!
//! Each setting comes from, in order of precedence: a command-line flag, its `CATTERY_*`
//! environment variable, the TOML file given by `--config` (`CATTERY_CONFIG`), the default.
//! [`Config::validate`] checks the result once, before anything starts. A file holds any subset:
//!
//! ```toml
//! [server]
//! listen = "0.0.0.0:7870"
//! data_dir = "/var/lib/cattery"
//! max_connections = 2000
//!
//! [store]
//! kind = "sqlite"
//! # database_url = "postgres://cattery:PASSWORD@db.internal:5432/cattery"  # PostgreSQL instead
//!
//! [runtime]
//! kind = "process"
//! python = "/usr/bin/python3"
//! python_fork_server = "on"
//!
//! [sessions]
//! stop_grace_seconds = 10
//!
//! [logs]
//! retention_days = 7
//!
//! [websocket]
//! idle_timeout_seconds = 60
//!
//! [limits]    # per org; 0 = no limit
//! agents_per_org = 200
//! api_keys_per_org = 20
//!
//! [cluster]   # docs/cluster.md: several nodes on one PostgreSQL database
//! # node_id = "node-1"
//! # advertise_url = "http://10.0.0.11:7870"
//! # cluster_secret_file = "/etc/cattery/cluster.secret"
//! # secrets_key_file = "/etc/cattery/secrets.key"
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The whole configuration of `cattery serve`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listener, data directory, regions and connection limits.
    pub server: ServerConfig,
    /// Where durable state lives.
    pub store: StoreConfig,
    /// How instances run.
    pub runtime: RuntimeConfig,
    /// Session lifecycle timings.
    pub sessions: SessionsConfig,
    /// Captured log retention.
    pub logs: LogsConfig,
    /// The websocket transport.
    pub websocket: WebsocketConfig,
    /// CORS, TLS and the public URL (`crate::web`).
    pub web: crate::web::WebConfig,
    /// Per-org limits (`core::limits`).
    pub limits: LimitsConfig,
    /// This server as a node of a cluster (docs/cluster.md).
    pub cluster: ClusterConfig,
}

/// `[limits]`: per-org limits (`core::limits`, docs/operations.md#per-org-limits); 0 = no
/// limit.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Live agents per org.
    pub agents_per_org: u32,
    /// API keys not revoked per org (both kinds).
    pub api_keys_per_org: u32,
    /// Secret sets per org.
    pub secret_sets_per_org: u32,
    /// Open session event streams per org, on each node.
    pub event_streams_per_org: u32,
    /// Builds per org pending or building at once, on each node.
    pub builds_per_org: u32,
    /// Upload URLs per org neither built nor expired, on each node.
    pub build_uploads_per_org: u32,
    /// Builds per org kept (any state), on the store.
    pub builds_kept_per_org: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = crate::core::limits::Limits::default();
        LimitsConfig {
            agents_per_org: d.agents,
            api_keys_per_org: d.api_keys,
            secret_sets_per_org: d.secret_sets,
            event_streams_per_org: d.event_streams,
            builds_per_org: d.builds,
            build_uploads_per_org: d.build_uploads,
            builds_kept_per_org: crate::core::limits::DEFAULT_BUILDS_KEPT_PER_ORG,
        }
    }
}

impl LimitsConfig {
    /// The limits `core` enforces.
    pub fn get(&self) -> crate::core::limits::Limits {
        crate::core::limits::Limits {
            agents: self.agents_per_org,
            api_keys: self.api_keys_per_org,
            secret_sets: self.secret_sets_per_org,
            event_streams: self.event_streams_per_org,
            builds: self.builds_per_org,
            build_uploads: self.build_uploads_per_org,
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Node id; `None`: generated once and kept in the data dir (`server-id`).
    pub node_id: Option<String>,
    /// URL where other nodes reach this one.
    pub advertise_url: Option<String>,
    /// A node whose last heartbeat is older than this many seconds is dead.
    pub node_timeout_seconds: f64,
    /// The secrets key (32 bytes), shared by every node; `None`: `<data-dir>/secrets.key`.
    pub secrets_key_file: Option<PathBuf>,
    /// File holding the cluster secret, the same on every node: internal calls between nodes
    /// carry it. `None`: this node forwards nothing and accepts no internal call.
    pub cluster_secret_file: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            advertise_url: None,
            node_timeout_seconds: 10.0,
            secrets_key_file: None,
            cluster_secret_file: None,
        }
    }
}

/// `[server]`.
#[derive(custom_debug::Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, `host:port` (a host name is resolved).
    pub listen: String,
    /// Data directory: database, instance directories, secrets key.
    pub data_dir: PathBuf,
    /// Regions offered.
    pub regions: Vec<String>,
    /// Default region (`None`: the first of `regions`).
    pub default_region: Option<String>,
    /// Seconds a client has to send a request head, counted from the connection's opening or
    /// the end of the previous response (so also the keep-alive idle timeout).
    pub header_read_timeout_seconds: f64,
    /// Longest silence, in seconds, inside a request body.
    pub body_read_timeout_seconds: f64,
    /// Most client connections at once; 0 = the open-file limit less `reserved_fds`.
    pub max_connections: usize,
    /// Descriptors kept free of client connections for instances, log files and the store.
    pub reserved_fds: u64,
    /// Bearer token `GET /metrics` requires; `None`: open (docs/operations.md).
    #[debug(with = crate::redact::hidden_some)]
    pub metrics_token: Option<String>,
    /// Format of the server's own log on stderr.
    pub log_format: LogFormat,
}

/// Formats of the server's own log.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (tracing's JSON formatter), with the request id of the HTTP
    /// request a line was logged for.
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7870".into(),
            data_dir: PathBuf::from("./.cattery"),
            regions: vec!["local".into()],
            default_region: None,
            header_read_timeout_seconds: 10.0,
            body_read_timeout_seconds: 10.0,
            max_connections: 0,
            reserved_fds: 512,
            metrics_token: None,
            log_format: LogFormat::Text,
        }
    }
}

/// Kinds of store.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite in the data directory.
    #[default]
    Sqlite,
}

/// `[store]`.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Which store when no `database_url` is given.
    pub kind: StoreKind,
    /// A `postgres://` URL: the PostgreSQL store instead of SQLite (docs/cluster.md). May hold
    /// a password, so `Debug` never shows it.
    pub database_url: Option<String>,
    /// Connections in the PostgreSQL pool.
    pub database_pool_size: u32,
}

impl StoreConfig {
    /// Checks `database_url`, if given: a `postgres://` (or `postgresql://`) URL that parses.
    /// The message never holds the URL, which may hold a password.
    ///
    /// Errors: another scheme, or a URL that does not parse.
    pub fn check_url(&self) -> anyhow::Result<()> {
        if let Some(u) = &self.database_url {
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                anyhow::bail!("--database-url must be a postgres:// URL");
            }
            if <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(u).is_err() {
                anyhow::bail!("--database-url is not a valid postgres:// URL");
            }
        }
        Ok(())
    }
}

/// A TOML error without the excerpt of the file that `toml`'s own `Display` adds (the line
/// at fault, which may be a secret's): its line and column, and its message.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML error at line {line}, column {column}: {msg}")
        }
        None => format!("TOML error: {msg}"),
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::default(),
            database_url: None,
            database_pool_size: crate::store::postgres::DEFAULT_POOL_SIZE,
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("database_pool_size", &self.database_pool_size)
            .finish()
    }
}

pub use crate::runtime::RuntimeKind;

/// `[runtime]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Which runtime.
    pub kind: RuntimeKind,
    /// Python interpreter for `local:` agents (after the agent's `python` and `<dir>/.venv`).
    pub python: String,
    /// Range of uids (and gids) for instances, `START-END`, or `off` (docs/security.md).
    pub instance_uids: String,
    /// Docker engine for image agents; `None`: `DOCKER_HOST`, then the local socket.
    pub docker_host: Option<String>,
    /// When an agent's image is pulled at deploy.
    pub image_pull_policy: crate::runtime::docker::image::PullPolicy,
    /// `on`: instances of `local:` Python agents are forked from a per-agent fork server that
    /// has imported the bot once (where the machine and the bot allow); `off`: spawned.
    pub python_fork_server: String,
    /// Python environment a build's virtualenv is layered on (plays `dailyco/pipecat-base`);
    /// `None`: `python`.
    pub build_python: Option<String>,
    /// Largest build context accepted for upload, in MiB.
    pub build_max_context_mb: u64,
    /// Seconds a build may run before it ends as `timeout`.
    pub build_timeout_seconds: f64,
    /// Most memory one build step may use, in MiB (its own cgroup; docs/builds.md).
    pub build_memory_mb: u64,
    /// Most processes and threads one build step may have at once.
    pub build_max_processes: u64,
    /// Hours a finished build that no deployment in use runs is kept (record, files, image);
    /// 0: kept for ever (docs/builds.md, "Retention").
    pub build_retention_hours: f64,
    /// `auto`, `venv` or `docker` (docs/builds.md).
    pub builder: String,
    /// What `FROM dailyco/pipecat-base...` becomes in a Docker build.
    pub build_base_image: String,
    /// The network of a Docker build's `RUN` steps (`host`, `none`, ...); empty: the
    /// engine's default.
    pub build_network: String,
    /// Where instance directories live: `auto` (a tmpfs when one has room, else the data
    /// dir), `data`, or a directory (`runtime/process/rundir.rs`).
    pub runtime_dir: String,
}

/// The default instance uid range: above the `/etc/subuid` and systemd container ranges.
pub const DEFAULT_INSTANCE_UIDS: &str = "2000000000-2000065535";

impl RuntimeConfig {
    /// The parsed `instance_uids` (`None` for `off`); `validate` has checked it.
    pub fn instance_uid_range(&self) -> Option<crate::runtime::process::uids::UidRange> {
        match self.instance_uids.as_str() {
            "off" => None,
            r => r.parse().ok(),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            kind: RuntimeKind::Auto,
            python: "python3".into(),
            instance_uids: DEFAULT_INSTANCE_UIDS.into(),
            docker_host: None,
            image_pull_policy: Default::default(),
            python_fork_server: "on".into(),
            build_python: None,
            build_max_context_mb: 500,
            build_timeout_seconds: 600.0,
            build_memory_mb: crate::build::venv::DEFAULT_STEP_MEMORY_MB,
            build_max_processes: crate::build::venv::STEP_MAX_TASKS,
            build_retention_hours: 168.0,
            builder: "auto".into(),
            build_base_image: "cattery-test/pipecat-base:latest".into(),
            build_network: String::new(),
            runtime_dir: "auto".into(),
        }
    }
}

/// `[sessions]`.
#[derive(custom_debug::Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Seconds between SIGTERM and SIGKILL for agents that set no `stopGraceSeconds`.
    pub stop_grace_seconds: f64,
    /// Seconds a start may take until its instance answers `/readyz` with 200 (making the
    /// instance included: a Python fork server's import).
    pub start_timeout_seconds: f64,
    /// On SIGTERM, seconds running sessions may go on before they are stopped.
    pub drain_timeout_seconds: f64,
    /// On SIGTERM, the least number of seconds the drain lasts (new sessions answered 503,
    /// `/ready` 503) even when no session is left, so that a load balancer's health check
    /// sees the node draining before it exits; unset: 2 on a shared database, else 0
    /// ([`SessionsConfig::drain_linger`]).
    pub drain_linger_seconds: Option<f64>,
    /// Resource sampling interval, ms.
    pub metrics_interval_ms: u64,
    /// Daily API key, for `createDailyRoom` (an org's `dailyApiKey` property wins).
    #[debug(with = crate::redact::hidden_some)]
    pub daily_api_key: Option<String>,
    /// Daily's REST API base URL.
    pub daily_api_url: String,
    /// ICE server URLs given to bots (`CATTERY_ICE_SERVERS`) and answered for
    /// `enableDefaultIceServers`; empty = none (host candidates only).
    pub ice_servers: Vec<String>,
    /// What SIGTERM/SIGINT do to running sessions: drain them, or detach (leave them running
    /// for the next `cattery serve`).
    pub on_stop: OnStop,
    /// At most this many warm instances of one agent start at once on a node; 0: no limit.
    pub max_warm_starting: u32,
}

impl SessionsConfig {
    /// The drain's least length: `drain_linger_seconds`, else 2 s on a shared database (its
    /// nodes sit behind a load balancer), else none.
    pub fn drain_linger(&self, shared_store: bool) -> std::time::Duration {
        let s = self
            .drain_linger_seconds
            .unwrap_or(if shared_store { 2.0 } else { 0.0 });
        std::time::Duration::from_secs_f64(s)
    }
}

/// What stopping the server does to running sessions (`--on-stop`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnStop {
    /// New sessions get 503; running ones may go on for the drain timeout, then are stopped.
    #[default]
    Drain,
    /// Stop serving HTTP, store every captured log line, and exit leaving instances and their
    /// session records as they are: the next `cattery serve` re-adopts them (an upgrade).
    Detach,
}

/// Daily's REST API.
pub const DEFAULT_DAILY_API_URL: &str = "https://api.daily.co/v1";
/// The ICE server the Python runner used before `--ice-servers` existed.
pub const DEFAULT_ICE_SERVER: &str = "stun:stun.l.google.com:19302";

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            stop_grace_seconds: crate::model::DEFAULT_STOP_GRACE_S,
            start_timeout_seconds: 60.0,
            drain_timeout_seconds: 30.0,
            drain_linger_seconds: None,
            metrics_interval_ms: 5000,
            daily_api_key: None,
            daily_api_url: DEFAULT_DAILY_API_URL.into(),
            ice_servers: vec![DEFAULT_ICE_SERVER.into()],
            on_stop: OnStop::Drain,
            max_warm_starting: crate::core::session::DEFAULT_MAX_WARM_STARTING,
        }
    }
}

/// `[logs]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogsConfig {
    /// Lines older than this many days are deleted.
    pub retention_days: u64,
    /// At most this many lines are kept (all orgs together; over it, the orgs holding the most
    /// lose their oldest lines first); 0 = no cap.
    pub retention_max_lines: u64,
    /// Lines of one instance's output captured per second, on average; 0 = no limit.
    pub rate_lines: u64,
    /// Bytes of one instance's output captured per second, on average; 0 = no limit.
    pub rate_bytes: u64,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            retention_days: 30,
            retention_max_lines: 1_000_000,
            rate_lines: crate::runtime::logs::LogRate::DEFAULT.lines,
            rate_bytes: crate::runtime::logs::LogRate::DEFAULT.bytes,
        }
    }
}

/// `[websocket]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebsocketConfig {
    /// A client silent this long (not even a pong) is treated as gone, seconds.
    pub idle_timeout_seconds: f64,
    /// Lifetime of a single-use websocket token from `/start`, seconds.
    pub token_ttl_seconds: f64,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        WebsocketConfig {
            idle_timeout_seconds: 30.0,
            token_ttl_seconds: 300.0,
        }
    }
}

/// Flags of `cattery serve`. Every one is optional: an absent flag (and variable) leaves the
/// file's value or the default (see [`Config`]).
#[derive(custom_debug::Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (sections server, store, runtime, sessions, logs, websocket,
    /// web, limits, cluster);
    /// flags and environment variables override it.
    #[arg(long, env = "CATTERY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The `[web]` section: CORS, TLS, public URL.
    #[command(flatten)]
    pub web: crate::web::WebArgs,

    /// Address to listen on (`host:port`; a host name is resolved) [default: 127.0.0.1:7870].
    #[arg(long, env = "CATTERY_LISTEN", help_heading = "Server")]
    pub listen: Option<String>,
    /// Data directory (SQLite database, instance directories) [default: ./.cattery].
    #[arg(long, env = "CATTERY_DATA_DIR", help_heading = "Server")]
    pub data_dir: Option<PathBuf>,
    /// Regions offered (comma-separated) [default: local].
    #[arg(
        long,
        env = "CATTERY_REGIONS",
        value_delimiter = ',',
        help_heading = "Server"
    )]
    pub regions: Option<Vec<String>>,
    /// Default region [default: the first of --regions].
    #[arg(long, env = "CATTERY_DEFAULT_REGION", help_heading = "Server")]
    pub default_region: Option<String>,
    /// Seconds a client has to send a request head, from the connection's opening or the end of
    /// the previous response (also the keep-alive idle timeout) [default: 10].
    #[arg(
        long,
        env = "CATTERY_HEADER_READ_TIMEOUT_SECONDS",
        help_heading = "Server"
    )]
    pub header_read_timeout_seconds: Option<f64>,
    /// Longest silence inside a request body, seconds [default: 10].
    #[arg(
        long,
        env = "CATTERY_BODY_READ_TIMEOUT_SECONDS",
        help_heading = "Server"
    )]
    pub body_read_timeout_seconds: Option<f64>,
    /// Most client connections at once; at the cap the oldest idle one is closed. 0 = the
    /// open-file limit less --reserved-fds [default: 0].
    #[arg(long, env = "CATTERY_MAX_CONNECTIONS", help_heading = "Server")]
    pub max_connections: Option<usize>,
    /// Open files kept free of client connections for instances, logs and the store [default: 512].
    #[arg(long, env = "CATTERY_RESERVED_FDS", help_heading = "Server")]
    pub reserved_fds: Option<u64>,
    /// Bearer token that `GET /metrics` (Prometheus) requires; without it /metrics is open.
    #[arg(
        long,
        env = "CATTERY_METRICS_TOKEN",
        help_heading = "Server",
        hide_env_values = true
    )]
    #[debug(with = crate::redact::hidden_some)]
    pub metrics_token: Option<String>,
    /// Format of the server's own log on stderr: `text`, or `json` (one object per line, with
    /// request ids) [default: text].
    #[arg(long, env = "CATTERY_LOG_FORMAT", value_enum, help_heading = "Server")]
    pub log_format: Option<LogFormat>,

    /// Store kind when no --database-url is given [default: sqlite]; a --database-url
    /// (CATTERY_DATABASE_URL) selects PostgreSQL whatever this says.
    #[arg(long, env = "CATTERY_STORE", value_enum, help_heading = "Store")]
    pub store: Option<StoreKind>,
    /// PostgreSQL database (`postgres://user:password@host:port/db`): selects the PostgreSQL
    /// store instead of SQLite in the data dir; several nodes may share it (docs/cluster.md).
    #[arg(
        long,
        env = "CATTERY_DATABASE_URL",
        help_heading = "Store",
        hide_env_values = true
    )]
    #[debug(with = crate::redact::hidden_some)]
    pub database_url: Option<String>,
    /// Connections in the PostgreSQL pool [default: 16].
    #[arg(long, env = "CATTERY_DATABASE_POOL_SIZE", help_heading = "Store")]
    pub database_pool_size: Option<u32>,

    /// Runtime kind: `auto` runs image agents in containers and `local:`/`command` agents as
    /// processes, `process` or `docker` only one of them [default: auto].
    #[arg(long, env = "CATTERY_RUNTIME", value_enum, help_heading = "Runtime")]
    pub runtime: Option<RuntimeKind>,
    /// Python interpreter for `local:` agents (after the agent's `python` and `<dir>/.venv`)
    /// [default: python3].
    #[arg(long, env = "CATTERY_PYTHON", help_heading = "Runtime")]
    pub python: Option<String>,
    /// Range of uids (and gids) for instances, `START-END`: each instance runs under one of its
    /// own (needs root), or `off` to run instances as the server's user; see docs/security.md
    /// [default: 2000000000-2000065535].
    #[arg(long, env = "CATTERY_INSTANCE_UIDS", help_heading = "Runtime")]
    pub instance_uids: Option<String>,
    /// Docker engine for agents deployed from a container image (`unix:///path`,
    /// `tcp://host:port`; same meaning as `DOCKER_HOST`, which is the default, then the local
    /// socket). Without a reachable engine, image agents get a deployment error.
    #[arg(long, env = "CATTERY_DOCKER_HOST", help_heading = "Runtime")]
    pub docker_host: Option<String>,
    /// When an agent's image is pulled at deploy: `missing` (only when the engine lacks it),
    /// `always`, or `never` [default: missing].
    #[arg(
        long,
        env = "CATTERY_IMAGE_PULL_POLICY",
        value_enum,
        help_heading = "Runtime"
    )]
    pub image_pull_policy: Option<crate::runtime::docker::image::PullPolicy>,
    /// `on`: each instance of a `local:` Python agent is a fork of a per-agent process that has
    /// imported the bot once (tens of ms instead of most of a second); `off`: every instance is
    /// a fresh interpreter; see docs/instance-contract.md [default: on].
    #[arg(long, env = "CATTERY_PYTHON_FORK_SERVER", help_heading = "Runtime")]
    pub python_fork_server: Option<String>,
    /// Python environment that builds (`pipecat cloud deploy` without an image) layer their
    /// virtualenv on, as `dailyco/pipecat-base` is the base of a Pipecat Cloud image: its
    /// packages are visible to the bot, its `uv.lock` or `requirements.txt` adds to them; it
    /// needs `uv` for a `uv.lock` (docs/builds.md) [default: --python].
    #[arg(long, env = "CATTERY_BUILD_PYTHON", help_heading = "Runtime")]
    pub build_python: Option<String>,
    /// Largest build context accepted for upload, in MiB [default: 500].
    #[arg(long, env = "CATTERY_BUILD_MAX_CONTEXT_MB", help_heading = "Runtime")]
    pub build_max_context_mb: Option<u64>,
    /// Seconds a build may run before it ends as `timeout` [default: 600].
    #[arg(long, env = "CATTERY_BUILD_TIMEOUT_SECONDS", help_heading = "Runtime")]
    pub build_timeout_seconds: Option<f64>,
    /// Most memory one step of a local build may use, in MiB: each step runs in a cgroup of
    /// its own, and one that passes this is killed and fails the build [default: 4096].
    #[arg(long, env = "CATTERY_BUILD_MEMORY_MB", help_heading = "Runtime")]
    pub build_memory_mb: Option<u64>,
    /// Most processes and threads one step of a local build may have at once [default: 512].
    #[arg(long, env = "CATTERY_BUILD_MAX_PROCESSES", help_heading = "Runtime")]
    pub build_max_processes: Option<u64>,
    /// Hours a finished build that no deployment in use runs is kept before its record,
    /// files and image are deleted; 0 keeps builds for ever [default: 168, a week].
    #[arg(long, env = "CATTERY_BUILD_RETENTION_HOURS", help_heading = "Runtime")]
    pub build_retention_hours: Option<f64>,
    /// Which builder builds a deploy without an image: `auto` (Docker when the context has a
    /// Dockerfile and an engine answers, else a local virtualenv), `venv` or `docker`
    /// [default: auto].
    #[arg(long, env = "CATTERY_BUILDER", help_heading = "Runtime")]
    pub builder: Option<String>,
    /// The image `FROM dailyco/pipecat-base...` is built on in a Docker build: a local image
    /// that follows the base image's contract [default: cattery-test/pipecat-base:latest].
    #[arg(long, env = "CATTERY_BUILD_BASE_IMAGE", help_heading = "Runtime")]
    pub build_base_image: Option<String>,
    /// The network a Docker build's `RUN` steps use: `host` (the host's network, for a
    /// machine whose package index is reachable only from it), `none`, or another network
    /// mode the engine's builder accepts [default: the engine's own].
    #[arg(long, env = "CATTERY_BUILD_NETWORK", help_heading = "Runtime")]
    pub build_network: Option<String>,
    /// Where the process runtime keeps instance directories (output files, `HOME`, `TMPDIR`):
    /// `auto` puts them on a memory file system (`/run/cattery-instances` or
    /// `/dev/shm/cattery-<uid>`, a tmpfs with at least 256 MiB free) behind a link at
    /// `<data dir>/instances`, else in the data dir; `data` keeps them in the data dir; or a
    /// directory of your choice [default: auto].
    #[arg(long, env = "CATTERY_RUNTIME_DIR", help_heading = "Runtime")]
    pub runtime_dir: Option<String>,

    /// Seconds between SIGTERM and SIGKILL when an instance is removed, for agents that set no
    /// `stopGraceSeconds`; 0 means SIGKILL at once [default: 5].
    #[arg(long, env = "CATTERY_STOP_GRACE_SECONDS", help_heading = "Sessions")]
    pub stop_grace_seconds: Option<f64>,
    /// Seconds a start may take until its instance answers /readyz with 200, making the
    /// instance included (a Python fork server's import) [default: 60].
    #[arg(long, env = "CATTERY_START_TIMEOUT_SECONDS", help_heading = "Sessions")]
    pub start_timeout_seconds: Option<f64>,
    /// On SIGTERM, seconds running sessions may go on before they are stopped [default: 30].
    #[arg(long, env = "CATTERY_DRAIN_TIMEOUT_SECONDS", help_heading = "Sessions")]
    pub drain_timeout_seconds: Option<f64>,
    /// On SIGTERM, the least number of seconds the drain lasts (new sessions get 503, /ready
    /// 503) even with no session left, so a load balancer's health check sees the node
    /// draining before it exits; a second signal cuts it short [default: 2 with
    /// --database-url, else 0].
    #[arg(long, env = "CATTERY_DRAIN_LINGER_SECONDS", help_heading = "Sessions")]
    pub drain_linger_seconds: Option<f64>,
    /// On SIGTERM/SIGINT: `drain` running sessions, or `detach` (exit leaving them running for
    /// the next `cattery serve` to re-adopt: an upgrade without dropping calls) [default: drain].
    #[arg(long, env = "CATTERY_ON_STOP", value_enum, help_heading = "Sessions")]
    pub on_stop: Option<OnStop>,
    /// Resource sampling interval for sessions, ms [default: 5000].
    #[arg(long, env = "CATTERY_METRICS_INTERVAL_MS", help_heading = "Sessions")]
    pub metrics_interval_ms: Option<u64>,
    /// Daily API key, needed for `createDailyRoom`.
    #[arg(
        long,
        env = "CATTERY_DAILY_API_KEY",
        help_heading = "Sessions",
        hide_env_values = true
    )]
    #[debug(with = crate::redact::hidden_some)]
    pub daily_api_key: Option<String>,
    /// Daily's REST API base URL [default: https://api.daily.co/v1].
    #[arg(long, env = "CATTERY_DAILY_API_URL", help_heading = "Sessions")]
    pub daily_api_url: Option<String>,
    /// ICE server URLs (comma-separated) given to bots and answered for
    /// `enableDefaultIceServers`; "" = none [default: stun:stun.l.google.com:19302].
    #[arg(
        long,
        env = "CATTERY_ICE_SERVERS",
        value_delimiter = ',',
        help_heading = "Sessions"
    )]
    pub ice_servers: Option<Vec<String>>,
    /// At most this many warm instances of one agent start at once on this node: a large
    /// `minAgents` fills in waves, the next instance as each one gets ready. 0 = no limit
    /// [default: 16].
    #[arg(long, env = "CATTERY_MAX_WARM_STARTING", help_heading = "Sessions")]
    pub max_warm_starting: Option<u32>,

    /// Logs older than this many days are deleted [default: 30].
    #[arg(long, env = "CATTERY_LOG_RETENTION_DAYS", help_heading = "Logs")]
    pub log_retention_days: Option<u64>,
    /// At most this many log lines are kept (all orgs together); over it, the orgs holding the
    /// most lose their oldest lines first, so an org within its share (this cap divided by
    /// the orgs with lines) keeps all of its lines. 0 = no cap [default: 1000000].
    #[arg(long, env = "CATTERY_LOG_RETENTION_MAX_LINES", help_heading = "Logs")]
    pub log_retention_max_lines: Option<u64>,
    /// Each instance's output is captured at up to this many lines a second on average (bursts
    /// of 10 s worth); past it lines are dropped, and a platform line says how many. 0 = no
    /// limit [default: 1000].
    #[arg(long, env = "CATTERY_LOG_RATE_LINES", help_heading = "Logs")]
    pub log_rate_lines: Option<u64>,
    /// As `--log-rate-lines`, in bytes a second [default: 1048576].
    #[arg(long, env = "CATTERY_LOG_RATE_BYTES", help_heading = "Logs")]
    pub log_rate_bytes: Option<u64>,

    /// A websocket-transport client that sends nothing (not even a pong to Cattery's pings)
    /// for this many seconds is treated as gone and its session ends [default: 30].
    #[arg(
        long,
        env = "CATTERY_WS_IDLE_TIMEOUT_SECONDS",
        help_heading = "Websocket"
    )]
    pub ws_idle_timeout_seconds: Option<f64>,
    /// Seconds a websocket-transport token from `/start` stays valid (single use) [default: 300].
    #[arg(long, env = "CATTERY_WS_TOKEN_TTL_SECONDS", help_heading = "Websocket")]
    pub ws_token_ttl_seconds: Option<f64>,

    /// Most live agents an org may have; 0 = no limit [default: 1000].
    #[arg(long, env = "CATTERY_AGENTS_PER_ORG", help_heading = "Limits")]
    pub agents_per_org: Option<u32>,
    /// Most API keys (not revoked, both kinds) an org may have; 0 = no limit [default: 100].
    #[arg(long, env = "CATTERY_API_KEYS_PER_ORG", help_heading = "Limits")]
    pub api_keys_per_org: Option<u32>,
    /// Most secret sets an org may have; 0 = no limit [default: 1000].
    #[arg(long, env = "CATTERY_SECRET_SETS_PER_ORG", help_heading = "Limits")]
    pub secret_sets_per_org: Option<u32>,
    /// Most session event streams (GET /v1/sessions/events) an org may keep open on this node;
    /// 0 = no limit [default: 100].
    #[arg(long, env = "CATTERY_EVENT_STREAMS_PER_ORG", help_heading = "Limits")]
    pub event_streams_per_org: Option<u32>,
    /// Most builds (`pipecat cloud deploy` without an image) an org may have pending or
    /// building at once on this node; past it, 429. 0 = no limit [default: 4].
    #[arg(long, env = "CATTERY_BUILDS_PER_ORG", help_heading = "Limits")]
    pub builds_per_org: Option<u32>,
    /// Most build upload URLs an org may hold at once on this node (neither built nor
    /// expired; each may take --build-max-context-mb of disk); past it, 429. 0 = no limit
    /// [default: 10].
    #[arg(long, env = "CATTERY_BUILD_UPLOADS_PER_ORG", help_heading = "Limits")]
    pub build_uploads_per_org: Option<u32>,
    /// Most builds an org may keep (any state; each holds its log, and a successful one its
    /// tree and virtualenv, until the build retention deletes it); past it, a new build is
    /// 403 ORG_LIMIT_REACHED. 0 = no limit [default: 100].
    #[arg(long, env = "CATTERY_BUILDS_KEPT_PER_ORG", help_heading = "Limits")]
    pub builds_kept_per_org: Option<u32>,

    /// Node id: letters, digits, `-`, `_`, `.`, at most 63 [default: generated once, kept in
    /// the data dir].
    #[arg(long, env = "CATTERY_NODE_ID", help_heading = "Cluster")]
    pub node_id: Option<String>,
    /// URL where other nodes reach this one (`http://host:port`).
    #[arg(long, env = "CATTERY_ADVERTISE_URL", help_heading = "Cluster")]
    pub advertise_url: Option<String>,
    /// A node whose last heartbeat is older than this many seconds is dead [default: 10].
    #[arg(long, env = "CATTERY_NODE_TIMEOUT", help_heading = "Cluster")]
    pub node_timeout: Option<f64>,
    /// File holding the 32-byte secrets key, the same on every node of a cluster
    /// (docs/secrets.md) [default: <data-dir>/secrets.key, made at first start].
    #[arg(long, env = "CATTERY_SECRETS_KEY_FILE", help_heading = "Cluster")]
    pub secrets_key_file: Option<PathBuf>,
    /// File holding the cluster secret (at least 32 characters), the same on every node:
    /// internal calls between nodes (forwarded stops and proxied requests) carry it
    /// (docs/cluster.md) [default: none; then this node forwards nothing].
    #[arg(long, env = "CATTERY_CLUSTER_SECRET_FILE", help_heading = "Cluster")]
    pub cluster_secret_file: Option<PathBuf>,
}

/// Sets `$dst` to `$src` when the flag (or its variable) was given.
macro_rules! set_some {
    ($($dst:expr => $src:expr),* $(,)?) => {
        $(if let Some(v) = $src { $dst = v; })*
    };
}

impl Config {
    /// Reads a TOML configuration file. Errors: unreadable, not TOML, an unknown key or a
    /// value of the wrong type (with the file's line).
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// Parses a TOML configuration.
    ///
    /// Errors: the TOML does not parse or does not fit; the message says where (line and
    /// column) and why, never quoting the file, whose lines may hold a secret
    /// (`database_url`, `daily_api_key`, `metrics_token`).
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!(toml_error(text, &e)))
    }

    /// Defaults, under the `--config` file, under the environment and flags; validated.
    pub fn load(args: ServeArgs) -> anyhow::Result<Config> {
        let mut cfg = match &args.config {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        cfg.apply(args);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Overrides with what the flags and environment gave.
    pub fn apply(&mut self, a: ServeArgs) {
        let (s, se, l, w) = (
            &mut self.server,
            &mut self.sessions,
            &mut self.logs,
            &mut self.websocket,
        );
        set_some! {
            s.listen => a.listen,
            s.data_dir => a.data_dir,
            s.regions => a.regions,
            s.header_read_timeout_seconds => a.header_read_timeout_seconds,
            s.body_read_timeout_seconds => a.body_read_timeout_seconds,
            s.max_connections => a.max_connections,
            s.reserved_fds => a.reserved_fds,
            s.log_format => a.log_format,
            self.store.kind => a.store,
            self.store.database_pool_size => a.database_pool_size,
            self.runtime.kind => a.runtime,
            self.runtime.python => a.python,
            self.runtime.instance_uids => a.instance_uids,
            self.runtime.image_pull_policy => a.image_pull_policy,
            self.runtime.python_fork_server => a.python_fork_server,
            self.runtime.build_max_context_mb => a.build_max_context_mb,
            self.runtime.build_timeout_seconds => a.build_timeout_seconds,
            self.runtime.build_memory_mb => a.build_memory_mb,
            self.runtime.build_max_processes => a.build_max_processes,
            self.runtime.build_retention_hours => a.build_retention_hours,
            self.runtime.builder => a.builder,
            self.runtime.build_base_image => a.build_base_image,
            self.runtime.build_network => a.build_network,
            self.runtime.runtime_dir => a.runtime_dir,
            se.stop_grace_seconds => a.stop_grace_seconds,
            se.start_timeout_seconds => a.start_timeout_seconds,
            se.drain_timeout_seconds => a.drain_timeout_seconds,
            se.metrics_interval_ms => a.metrics_interval_ms,
            se.daily_api_url => a.daily_api_url,
            se.on_stop => a.on_stop,
            se.max_warm_starting => a.max_warm_starting,
            l.retention_days => a.log_retention_days,
            l.retention_max_lines => a.log_retention_max_lines,
            l.rate_lines => a.log_rate_lines,
            l.rate_bytes => a.log_rate_bytes,
            w.idle_timeout_seconds => a.ws_idle_timeout_seconds,
            w.token_ttl_seconds => a.ws_token_ttl_seconds,
            self.limits.agents_per_org => a.agents_per_org,
            self.limits.api_keys_per_org => a.api_keys_per_org,
            self.limits.secret_sets_per_org => a.secret_sets_per_org,
            self.limits.event_streams_per_org => a.event_streams_per_org,
            self.limits.builds_per_org => a.builds_per_org,
            self.limits.builds_kept_per_org => a.builds_kept_per_org,
            self.limits.build_uploads_per_org => a.build_uploads_per_org,
        }
        if a.default_region.is_some() {
            s.default_region = a.default_region;
        }
        if a.metrics_token.is_some() {
            s.metrics_token = a.metrics_token;
        }
        if a.build_python.is_some() {
            self.runtime.build_python = a.build_python;
        }
        if a.docker_host.is_some() {
            self.runtime.docker_host = a.docker_host;
        }
        if a.daily_api_key.is_some() {
            se.daily_api_key = a.daily_api_key;
        }
        if a.drain_linger_seconds.is_some() {
            se.drain_linger_seconds = a.drain_linger_seconds;
        }
        if let Some(v) = a.ice_servers {
            se.ice_servers = v
                .into_iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect();
        }
        self.web.apply(a.web);
        if a.database_url.is_some() {
            self.store.database_url = a.database_url;
        }
        let c = &mut self.cluster;
        set_some! { c.node_timeout_seconds => a.node_timeout }
        for (dst, src) in [
            (&mut c.node_id, a.node_id),
            (&mut c.advertise_url, a.advertise_url),
        ] {
            if src.is_some() {
                *dst = src;
            }
        }
        if a.secrets_key_file.is_some() {
            c.secrets_key_file = a.secrets_key_file;
        }
        if a.cluster_secret_file.is_some() {
            c.cluster_secret_file = a.cluster_secret_file;
        }
    }

    /// Checks every setting; the error names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = |v: f64, flag: &str| -> anyhow::Result<()> {
            if !(v.is_finite() && v > 0.0 && v <= 1e9) {
                anyhow::bail!("--{flag} must be a positive number of seconds (got {v})");
            }
            Ok(())
        };
        let d = &self.sessions.daily_api_url;
        if !(d.starts_with("http://") || d.starts_with("https://")) {
            anyhow::bail!("--daily-api-url must be an http(s) URL (got {d:?})");
        }
        if let Some(u) = self.sessions.ice_servers.iter().find(|u| {
            !["stun:", "stuns:", "turn:", "turns:"]
                .iter()
                .any(|p| u.starts_with(p))
                || u.contains(',')
        }) {
            anyhow::bail!("--ice-servers takes stun:/turn: URLs (got {u:?})");
        }
        let s = &self.server;
        if s.listen.trim().is_empty() {
            anyhow::bail!("--listen must be host:port");
        }
        if s.regions.is_empty() || s.regions.iter().any(|r| r.trim().is_empty()) {
            anyhow::bail!("--regions must name at least one region, none empty");
        }
        let default_region = self.default_region();
        if !s.regions.contains(&default_region) {
            anyhow::bail!(
                "--default-region {default_region} is not one of --regions ({})",
                s.regions.join(", ")
            );
        }
        positive(s.header_read_timeout_seconds, "header-read-timeout-seconds")?;
        positive(s.body_read_timeout_seconds, "body-read-timeout-seconds")?;
        let se = &self.sessions;
        if !(0.0..=3600.0).contains(&se.stop_grace_seconds) {
            anyhow::bail!("--stop-grace-seconds must be between 0 and 3600");
        }
        positive(se.start_timeout_seconds, "start-timeout-seconds")?;
        if !(se.drain_timeout_seconds.is_finite() && se.drain_timeout_seconds >= 0.0) {
            anyhow::bail!("--drain-timeout-seconds must be 0 or more");
        }
        if let Some(l) = se.drain_linger_seconds {
            if !(l.is_finite() && (0.0..=600.0).contains(&l)) {
                anyhow::bail!("--drain-linger-seconds must be between 0 and 600");
            }
        }
        positive(
            self.websocket.idle_timeout_seconds,
            "ws-idle-timeout-seconds",
        )?;
        positive(self.websocket.token_ttl_seconds, "ws-token-ttl-seconds")?;
        if self.store.database_pool_size == 0 || self.store.database_pool_size > 1000 {
            anyhow::bail!("--database-pool-size must be between 1 and 1000");
        }
        self.store.check_url()?;
        self.validate_cluster()?;
        if self.runtime.python.is_empty() {
            anyhow::bail!("--python must not be empty");
        }
        if self.runtime.build_max_context_mb == 0 {
            anyhow::bail!("--build-max-context-mb must be at least 1");
        }
        if crate::core::builds::BuilderMode::parse(&self.runtime.builder).is_none() {
            anyhow::bail!("--builder must be auto, venv or docker");
        }
        if self.runtime.build_base_image.trim().is_empty() {
            anyhow::bail!("--build-base-image must not be empty");
        }
        let net = &self.runtime.build_network;
        if !net
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            anyhow::bail!(
                "--build-network must be a network mode such as host or none, not {net:?}"
            );
        }
        let bt = self.runtime.build_timeout_seconds;
        if !(bt.is_finite() && bt > 0.0) {
            anyhow::bail!("--build-timeout-seconds must be a positive number");
        }
        if self.runtime.build_memory_mb < 64 {
            anyhow::bail!("--build-memory-mb must be at least 64");
        }
        if self.runtime.build_max_processes < 16 {
            anyhow::bail!("--build-max-processes must be at least 16");
        }
        let br = self.runtime.build_retention_hours;
        if !(br.is_finite() && (0.0..=1e6).contains(&br)) {
            anyhow::bail!(
                "--build-retention-hours must be a number of hours from 0 (keep for ever)"
            );
        }
        if self.runtime.instance_uids != "off" {
            self.runtime
                .instance_uids
                .parse::<crate::runtime::process::uids::UidRange>()
                .map_err(|e| anyhow::anyhow!("--instance-uids {e}"))?;
        }
        self.runtime
            .python_fork_server
            .parse::<crate::runtime::process::zygote::ForkServerMode>()
            .map_err(|e| anyhow::anyhow!("--python-fork-server {e}"))?;
        self.runtime
            .runtime_dir
            .parse::<crate::runtime::process::rundir::RuntimeDir>()
            .map_err(|e| anyhow::anyhow!("--runtime-dir {e}"))?;
        self.web.validate()?;
        Ok(())
    }

    /// Checks `[cluster]`.
    fn validate_cluster(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        if !(c.node_timeout_seconds.is_finite() && (1.0..=3600.0).contains(&c.node_timeout_seconds))
        {
            anyhow::bail!("--node-timeout must be between 1 and 3600 seconds");
        }
        if let Some(id) = &c.node_id {
            let ok = !id.is_empty()
                && id.len() <= 63
                && id
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
            if !ok {
                anyhow::bail!("--node-id must be 1 to 63 letters, digits, '-', '_' or '.'");
            }
        }
        if let Some(u) = &c.advertise_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                anyhow::bail!("--advertise-url must be an http:// or https:// URL");
            }
        }
        Ok(())
    }

    /// The default region: the configured one, else the first region.
    pub fn default_region(&self) -> String {
        self.server
            .default_region
            .clone()
            .or_else(|| self.server.regions.first().cloned())
            .unwrap_or_default()
    }

    /// The connection cap for an open-file limit of `nofile`: `max_connections` if set, never
    /// above `nofile - reserved_fds`, and at least 16.
    pub fn connection_cap(&self, nofile: u64) -> usize {
        let room = usize::try_from(nofile.saturating_sub(self.server.reserved_fds))
            .unwrap_or(usize::MAX)
            .max(16);
        match self.server.max_connections {
            0 => room.min(65_536),
            n => n.min(room),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn args(v: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("cattery").chain(v.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().default_region(), "local");
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let mut cfg = Config::from_toml(
            "[server]\nlisten = \"0.0.0.0:9000\"\nmax_connections = 100\n\
             [sessions]\nstop_grace_seconds = 2\n[logs]\nretention_days = 7\n\
             [store]\nkind = \"sqlite\"\n[runtime]\nkind = \"process\"\n",
        )
        .unwrap();
        assert_eq!(cfg.server.listen, "0.0.0.0:9000");
        assert_eq!(cfg.logs.retention_days, 7);
        assert_eq!(
            cfg.logs.retention_max_lines,
            LogsConfig::default().retention_max_lines
        );
        cfg.apply(args(&[
            "--listen",
            "127.0.0.1:1",
            "--stop-grace-seconds",
            "3",
        ]));
        assert_eq!(cfg.server.listen, "127.0.0.1:1");
        assert_eq!(cfg.sessions.stop_grace_seconds, 3.0);
        assert_eq!(cfg.server.max_connections, 100);
        assert_eq!(cfg.logs.retention_days, 7);
        cfg.validate().unwrap();
    }

    #[test]
    fn the_drain_lingers_on_a_shared_database_unless_told_otherwise() {
        let d = std::time::Duration::from_secs_f64;
        let mut cfg = Config::default();
        assert_eq!(cfg.sessions.drain_linger(false), d(0.0));
        assert_eq!(cfg.sessions.drain_linger(true), d(2.0));
        cfg = Config::from_toml("[sessions]\ndrain_linger_seconds = 5\n").unwrap();
        assert_eq!(cfg.sessions.drain_linger(false), d(5.0));
        cfg.apply(args(&["--drain-linger-seconds", "0"]));
        assert_eq!(cfg.sessions.drain_linger(true), d(0.0));
        cfg.validate().unwrap();
        cfg.apply(args(&["--drain-linger-seconds=-1"]));
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn the_python_fork_server_is_on_by_default_and_can_be_turned_off() {
        assert_eq!(Config::default().runtime.python_fork_server, "on");
        let mut cfg = Config::from_toml("[runtime]\npython_fork_server = \"off\"\n").unwrap();
        assert_eq!(cfg.runtime.python_fork_server, "off");
        cfg.validate().unwrap();
        cfg.apply(args(&["--python-fork-server", "on"]));
        assert_eq!(cfg.runtime.python_fork_server, "on");
        cfg.apply(args(&["--python-fork-server", "sometimes"]));
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("--python-fork-server"), "{e}");
    }

    #[test]
    fn the_build_network_is_the_engines_unless_set() {
        assert_eq!(Config::default().runtime.build_network, "");
        let mut cfg = Config::from_toml("[runtime]\nbuild_network = \"none\"\n").unwrap();
        assert_eq!(cfg.runtime.build_network, "none");
        cfg.apply(args(&["--build-network", "host"]));
        assert_eq!(cfg.runtime.build_network, "host");
        cfg.validate().unwrap();
        cfg.apply(args(&["--build-network", "host; rm"]));
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("--build-network"), "{e}");
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused() {
        assert!(Config::from_toml("[server]\nlisen = \"x\"\n").is_err());
        assert!(Config::from_toml("[store]\nkind = \"postgres\"\n").is_err());
        assert!(Config::from_toml("[nope]\n").is_err());
    }

    /// The example at the top of this file is a valid configuration.
    #[test]
    fn the_example_file_parses() {
        let src = include_str!("config.rs");
        let body: String = src
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        assert!(body.contains("[cluster]"), "{body}");
        Config::from_toml(&body).unwrap();
    }

    #[test]
    fn validate_names_the_flag() {
        let mut cfg = Config::default();
        cfg.sessions.stop_grace_seconds = 4000.0;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--stop-grace-seconds"));
        let mut cfg = Config::default();
        cfg.server.default_region = Some("mars".into());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--default-region"));
        let mut cfg = Config::default();
        cfg.server.header_read_timeout_seconds = 0.0;
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn help_never_shows_a_secret_variables_value() {
        // clap's --help shows `[env: NAME=value]` for a variable that is set, unless hidden.
        use clap::CommandFactory;
        let cmd = Cli::command();
        let secret = |n: &str| {
            n.ends_with("_TOKEN") || n.ends_with("_API_KEY") || n.ends_with("DATABASE_URL")
        };
        let mut seen = 0;
        for a in cmd.get_arguments() {
            let Some(env) = a.get_env().and_then(|e| e.to_str()) else {
                continue;
            };
            if secret(env) {
                seen += 1;
                assert!(a.is_hide_env_values_set(), "--help would show ${env}");
            }
        }
        assert_eq!(
            seen, 3,
            "CATTERY_METRICS_TOKEN, _DAILY_API_KEY, _DATABASE_URL"
        );
    }

    /// `deploy/systemd/cattery.service` sets only variables and flags `cattery serve` reads,
    /// and a `CATTERY_LOG` there keeps the default filter's directives. Before, the unit set
    /// `CATTERY_LOG=info`, which brought back PostgreSQL's NOTICE at every start that the
    /// default filter (`telemetry::DEFAULT_LOG_FILTER`) leaves out.
    #[test]
    fn the_systemd_unit_sets_only_what_cattery_serve_reads() {
        use clap::CommandFactory;
        let unit = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/systemd/cattery.service"
        ))
        .unwrap();
        let cmd = Cli::command();
        let envs: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_env().and_then(|e| e.to_str()).map(String::from))
            .collect();
        let flags: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        let mut checked = 0;
        for line in unit.lines() {
            let line = line.trim_start_matches("# ").trim();
            if let Some(kv) = line.strip_prefix("Environment=") {
                let (name, value) = kv.split_once('=').unwrap();
                if name == "CATTERY_LOG" {
                    for directive in crate::telemetry::DEFAULT_LOG_FILTER.split(',') {
                        assert!(value.split(',').any(|d| d == directive), "{line}");
                    }
                } else {
                    assert!(envs.iter().any(|e| e == name), "{line}: not read by serve");
                }
                checked += 1;
            } else if let Some(cmdline) = line.strip_prefix("ExecStart=") {
                let words: Vec<&str> = cmdline.split_whitespace().collect();
                assert_eq!(words.get(1), Some(&"serve"), "{line}");
                for w in words.iter().filter_map(|w| w.strip_prefix("--")) {
                    let flag = w.split('=').next().unwrap();
                    assert!(flags.contains(&flag), "{line}: no --{flag}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 5, "{checked}");
        // Its `Documentation=` names a file the install steps in docs/operations.md put there.
        let ops = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/operations.md"
        ))
        .unwrap();
        for line in unit.lines() {
            if let Some(doc) = line.strip_prefix("Documentation=file://") {
                let installed = format!("docs/{} {doc}", doc.rsplit('/').next().unwrap());
                assert!(ops.contains(&installed), "{doc}: no install step");
                checked += 1;
            }
        }
        assert!(checked >= 6, "{checked}");
    }

    /// `--help` is for operators: rustdoc's links (`[`Type`]`) in a doc comment that clap
    /// reads as help text are noise there. Before, `cattery serve --help` listed
    /// `--runtime process` as "Local process trees ([`process::ProcessRuntime`])".
    #[test]
    fn help_shows_no_rustdoc_links() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let mut texts = Vec::new();
        for a in cmd.get_arguments() {
            texts.extend(a.get_help().map(ToString::to_string));
            texts.extend(a.get_long_help().map(ToString::to_string));
            for v in a.get_possible_values() {
                texts.extend(v.get_help().map(ToString::to_string));
            }
        }
        assert!(texts.len() > 50, "{}", texts.len());
        for text in texts {
            assert!(!text.contains("[`"), "{text}");
        }
    }

    #[test]
    fn file_errors_say_where_without_quoting_the_file() {
        // A misspelt key, an unterminated string, a bad value: toml's own message quotes the
        // line at fault, here a password or key.
        for (text, line) in [
            ("[store]\ndatabse_url = \"postgres://u:hunter2@db/c\"\n", 2),
            ("[store]\ndatabase_url = \"postgres://u:hunter2@db/c\n", 2),
            ("[sessions]\n\ndaily_api_key = hunter2\n", 3),
            ("[server]\nmetrics_token = \"hunter2\" 5\n", 2),
        ] {
            let e = format!("{:#}", Config::from_toml(text).unwrap_err());
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains(&format!("line {line}")), "{e}");
        }
        let e = Config::from_toml("[server]\nlisen = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `lisen`"), "{e}");
    }

    #[test]
    fn store_and_cluster_settings_come_from_the_file_and_flags() {
        let mut cfg = Config::from_toml(
            "[store]\ndatabase_url = \"postgres://u:hunter2@db/c\"\ndatabase_pool_size = 4\n\
             [cluster]\nnode_id = \"n1\"\nnode_timeout_seconds = 5\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.store.database_pool_size, 4);
        assert_eq!(cfg.cluster.node_id.as_deref(), Some("n1"));
        // The password never shows in Debug.
        assert!(!format!("{cfg:?}").contains("hunter2"));
        cfg.apply(args(&[
            "--database-pool-size",
            "8",
            "--node-id",
            "n2",
            "--advertise-url",
            "http://10.0.0.2:7870",
        ]));
        assert_eq!(cfg.store.database_pool_size, 8);
        assert_eq!(cfg.cluster.node_id.as_deref(), Some("n2"));
        assert_eq!(cfg.cluster.node_timeout_seconds, 5.0);
        cfg.validate().unwrap();
        let bad = |f: fn(&mut Config), flag: &str| {
            let mut c = Config::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        };
        bad(
            |c| c.store.database_url = Some("mysql://x".into()),
            "--database-url",
        );
        bad(
            |c| c.store.database_url = Some("postgres://u:hunter2@h:notaport/db".into()),
            "--database-url is not a valid postgres:// URL",
        );
        bad(|c| c.store.database_pool_size = 0, "--database-pool-size");
        bad(|c| c.cluster.node_id = Some("a b".into()), "--node-id");
        bad(|c| c.cluster.node_timeout_seconds = 0.5, "--node-timeout");
        bad(
            |c| c.cluster.advertise_url = Some("10.0.0.2:7870".into()),
            "--advertise-url",
        );
    }

    #[test]
    fn limits_come_from_the_file_and_flags() {
        let d = crate::core::limits::Limits::default();
        assert_eq!(Config::default().limits.get(), d);
        let mut cfg =
            Config::from_toml("[limits]\nagents_per_org = 5\napi_keys_per_org = 0\n").unwrap();
        assert_eq!(cfg.limits.agents_per_org, 5);
        assert_eq!(cfg.limits.api_keys_per_org, 0, "0 is kept: no limit");
        assert_eq!(cfg.limits.secret_sets_per_org, d.secret_sets);
        cfg.apply(args(&[
            "--agents-per-org",
            "7",
            "--event-streams-per-org",
            "3",
            "--builds-per-org",
            "1",
            "--build-uploads-per-org",
            "0",
        ]));
        let l = cfg.limits.get();
        assert_eq!((l.agents, l.api_keys, l.event_streams), (7, 0, 3));
        assert_eq!((l.builds, l.build_uploads), (1, 0));
        assert_eq!(l.secret_sets, d.secret_sets);
        cfg.validate().unwrap();
        assert!(Config::from_toml("[limits]\nagents = 5\n").is_err());
        assert!(Config::from_toml("[limits]\nagents_per_org = -1\n").is_err());
    }

    #[test]
    fn connection_cap_leaves_room_below_the_open_file_limit() {
        let mut cfg = Config::default();
        assert_eq!(cfg.connection_cap(1024), 512);
        assert_eq!(cfg.connection_cap(1_000_000), 65_536);
        cfg.server.max_connections = 2000;
        assert_eq!(cfg.connection_cap(1024), 512);
        assert_eq!(cfg.connection_cap(100_000), 2000);
        assert_eq!(cfg.connection_cap(100), 16);
    }
}
