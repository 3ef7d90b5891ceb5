//! The `cattery` binary: `cattery serve` runs the platform; `cattery keys ...` manages keys;
//! `cattery backup` and `cattery restore` copy a data directory's state out and back;
//! `cattery store copy` moves a single node's SQLite records onto PostgreSQL; `cattery
//! secrets-key rotate` re-seals the stored secrets with a new key.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use cattery::config::{Config, ServeArgs};
use cattery::model::KeyKind;
use cattery::serve::{self, DEFAULT_ORG};

#[derive(Parser)]
#[command(
    name = "cattery",
    version = cattery::build_info::long(),
    about = "Self-hosted session platform for Pipecat voice agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (HTTP API, supervisor, runtimes for local processes and Docker images, SQLite
    /// or PostgreSQL store).
    Serve(Box<ServeArgs>),
    /// Manage API keys and user tokens (works while the server runs).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Copy the database (SQLite's online backup) and the secrets key into the new directory
    /// OUT; works while the server runs (docs/operations.md).
    Backup {
        /// The server's data dir and secrets key.
        #[command(flatten)]
        dir: DataDirArgs,
        /// Directory to create for the backup.
        out: PathBuf,
    },
    /// Put a backup made by `cattery backup` into the data directory of a stopped server.
    Restore {
        /// The data dir to restore into (created if missing), and the server's secrets key.
        #[command(flatten)]
        dir: DataDirArgs,
        /// Replace the database the data directory already holds.
        #[arg(long)]
        force: bool,
        /// The backup directory.
        from: PathBuf,
    },
    /// Manage the key that seals secret values at rest (docs/secrets.md).
    SecretsKey {
        #[command(subcommand)]
        cmd: SecretsKeyCmd,
    },
    /// Move a single node's records between stores (docs/cluster.md, "Moving from SQLite").
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
}

#[derive(Subcommand)]
enum SecretsKeyCmd {
    /// Re-seal every stored secret value (secret sets, image pull secrets, deployments'
    /// snapshots, webhook secrets, sealed org properties) with a new key, in one transaction,
    /// while no server runs; then replace the data dir's `secrets.key` with it (with
    /// `--secrets-key-file`, give every node the new file yourself). Refuses while a server
    /// holds the data dir (SQLite) or a node's heartbeat is live (PostgreSQL).
    Rotate {
        /// The server's TOML configuration file: its `[server] data_dir`, `[store]` and
        /// `[cluster]` are used.
        #[arg(long, env = "CATTERY_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory of the server [default: the config file's, else ./.cattery].
        #[arg(long, env = "CATTERY_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The server's current secrets key file, when it is not `<data-dir>/secrets.key`
        /// [default: the config file's `[cluster] secrets_key_file`].
        #[arg(long, env = "CATTERY_SECRETS_KEY_FILE", value_name = "FILE")]
        secrets_key_file: Option<PathBuf>,
        /// PostgreSQL database of the server (`postgres://...`), when it uses one [default:
        /// the config file's `[store] database_url`].
        #[arg(long, env = "CATTERY_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// The new key: 32 bytes, mode 0600 (`head -c 32 /dev/urandom > FILE`).
        #[arg(long, value_name = "FILE")]
        new_key_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Copy the SQLite records of a stopped server (or of a `cattery backup`) into a new,
    /// empty PostgreSQL database, in one transaction: orgs, keys, agents, deployments, secret
    /// sets, webhooks, builds, sessions and their logs. Refuses while a server runs on the
    /// data dir, and a database that already holds records.
    Copy {
        /// The server's TOML configuration file: its `[server] data_dir` and `[cluster]
        /// secrets_key_file` are used.
        #[arg(long, env = "CATTERY_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory of the stopped server [default: the config file's, else ./.cattery].
        #[arg(long, env = "CATTERY_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Copy a backup directory made by `cattery backup` instead of a data dir (its
        /// `secrets.key` is the key).
        #[arg(long, value_name = "DIR")]
        backup: Option<PathBuf>,
        /// The server's secrets key file, when it is not `<data-dir>/secrets.key` [default:
        /// the config file's `[cluster] secrets_key_file`]. Only its path is printed, never
        /// its content.
        #[arg(long, env = "CATTERY_SECRETS_KEY_FILE", value_name = "FILE")]
        secrets_key_file: Option<PathBuf>,
        /// The PostgreSQL database to fill (`postgres://...`): migrated to the current schema,
        /// refused if it holds any record [default: $CATTERY_DATABASE_URL, else the config
        /// file's `[store] database_url`]. A URL with a password is better given through the
        /// environment or the config file: arguments are visible to every user in `ps`.
        #[arg(
            long,
            env = "CATTERY_DATABASE_URL",
            hide_env_values = true,
            value_name = "URL"
        )]
        to: Option<String>,
    },
}

/// The server's `--config` file for the commands beside `serve`, or the defaults without one.
/// Errors: the file is unreadable or invalid.
fn config_file(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    path.map_or_else(|| Ok(Config::default()), Config::from_file)
}

/// Where `cattery backup` and `cattery restore` find the server's SQLite data dir and secrets
/// key: the `--config` file's `[server] data_dir` and `[cluster] secrets_key_file`, which
/// `--data-dir` overrides (as for `cattery serve`).
#[derive(clap::Args)]
struct DataDirArgs {
    /// The server's TOML configuration file: its `[server] data_dir`, `[store]` and
    /// `[cluster] secrets_key_file` are used.
    #[arg(long, env = "CATTERY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory of the server [default: the config file's, else ./.cattery].
    #[arg(long, env = "CATTERY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The server's secrets key file, when it is not `<data-dir>/secrets.key` [default: the
    /// config file's `[cluster] secrets_key_file`].
    #[arg(long, env = "CATTERY_SECRETS_KEY_FILE", value_name = "FILE")]
    secrets_key_file: Option<PathBuf>,
    /// The server's PostgreSQL database, if it uses one: these commands copy a SQLite data
    /// dir and refuse it (PostgreSQL has its own tools).
    #[arg(
        long,
        env = "CATTERY_DATABASE_URL",
        hide_env_values = true,
        hide = true
    )]
    database_url: Option<String>,
}

impl DataDirArgs {
    /// The data dir and the secrets key file the server is configured with, if any. Errors:
    /// the config file is unreadable or invalid; the server's store is PostgreSQL.
    fn resolve(self) -> anyhow::Result<cattery::backup::Place> {
        let cfg = config_file(self.config.as_deref())?;
        if self.database_url.is_some() || cfg.store.database_url.is_some() {
            anyhow::bail!(
                "this server's store is PostgreSQL: back it up with PostgreSQL's own tools \
                 (pg_dump, or the database's backups) and keep the --secrets-key-file with it \
                 (docs/cluster.md, \"Backups\"); cattery backup and restore copy a SQLite data dir"
            );
        }
        Ok(cattery::backup::Place {
            data_dir: self.data_dir.unwrap_or(cfg.server.data_dir),
            key_file: self.secrets_key_file.or(cfg.cluster.secrets_key_file),
        })
    }
}

/// Where `cattery keys` finds the server's store: the `--config` file's data dir and `[store]`,
/// which `--data-dir` and `--database-url` override (as for `cattery serve`).
#[derive(clap::Args)]
struct KeyStoreArgs {
    /// The server's TOML configuration file: its `[server] data_dir` and `[store]` are used.
    #[arg(long, env = "CATTERY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory of the server [default: the config file's, else ./.cattery].
    #[arg(long, env = "CATTERY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL database of the server (`postgres://...`), when it uses one instead of
    /// SQLite in the data dir [default: the config file's `[store] database_url`].
    #[arg(long, env = "CATTERY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl KeyStoreArgs {
    /// The store's settings and the data dir. Errors: the config file is unreadable or
    /// invalid.
    fn resolve(self) -> anyhow::Result<(cattery::config::StoreConfig, PathBuf)> {
        let cfg = config_file(self.config.as_deref())?;
        let mut store = cfg.store;
        if self.database_url.is_some() {
            store.database_url = self.database_url;
        }
        // One command, a few statements.
        store.database_pool_size = 1;
        Ok((store, self.data_dir.unwrap_or(cfg.server.data_dir)))
    }
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
        /// The server's store.
        #[command(flatten)]
        store: KeyStoreArgs,
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
        /// The server's store.
        #[command(flatten)]
        store: KeyStoreArgs,
        /// Org.
        #[arg(long, default_value = DEFAULT_ORG)]
        org: String,
    },
    /// Revoke a key by id; it fails at once. An unknown or already revoked id is an error.
    Revoke {
        /// The server's store.
        #[command(flatten)]
        store: KeyStoreArgs,
        /// Org.
        #[arg(long, default_value = DEFAULT_ORG)]
        org: String,
        /// Key id.
        id: uuid::Uuid,
    },
}

/// Most threads in tokio's blocking pool (see `main`).
const BLOCKING_THREADS: usize = 32;

/// Marks every descriptor the server inherited above stderr close-on-exec, before any thread
/// starts. What the server opens itself is close-on-exec already (the standard library, tokio,
/// SQLite); a descriptor its parent left open (a shell's, a supervisor's, a socket a service
/// manager passed) would otherwise reach every instance and build step, which run an org's code.
/// The server itself keeps using them (`--secrets-key-file /dev/fd/3` still reads).
fn keep_inherited_fds_from_children() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors; no memory
    // is touched.
    let r = unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if r == 0 {
        return;
    }
    // Kernels before 5.11: one fcntl per open descriptor.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD on a descriptor number; one that closed meanwhile (the
        // directory's own) just fails.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    keep_inherited_fds_from_children();
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
                let config = Config::load(*a)?;
                cattery::telemetry::init_log(config.server.log_format);
                serve::serve(config).await
            }
            Cmd::Keys { cmd } => keys(cmd).await,
            Cmd::Store { cmd } => store(cmd).await,
            Cmd::SecretsKey { cmd } => secrets_key(cmd).await,
            Cmd::Backup { dir, out } => {
                let place = dir.resolve()?;
                let i = cattery::backup::backup(&place, &out)?;
                println!(
                    "backed up {} to {} (schema {}, {} agents, {} sessions)",
                    place.data_dir.display(),
                    out.display(),
                    i.schema,
                    i.agents,
                    i.sessions
                );
                Ok(())
            }
            Cmd::Restore { dir, force, from } => {
                let place = dir.resolve()?;
                let i = cattery::backup::restore(&from, &place, force)?;
                println!(
                    "restored {} into {} (schema {}, {} agents, {} sessions)",
                    from.display(),
                    place.data_dir.display(),
                    i.schema,
                    i.agents,
                    i.sessions
                );
                Ok(())
            }
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
            store,
            kind,
            name,
            org,
        } => {
            let kind = match kind {
                KeyType::Public => KeyKind::Public,
                KeyType::Private => KeyKind::Private,
                KeyType::Token => KeyKind::Token,
            };
            let (store, data_dir) = store.resolve()?;
            let key = serve::create_key(&store, &data_dir, kind, &name, &org).await?;
            println!("{key}");
        }
        KeysCmd::List { store, org } => {
            let (store, data_dir) = store.resolve()?;
            let store = serve::open_existing_store(&store, &data_dir).await?;
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
        KeysCmd::Revoke { store, org, id } => {
            let (store, data_dir) = store.resolve()?;
            let store = serve::open_existing_store(&store, &data_dir).await?;
            // Nothing to do is a failure, as an unknown id is: a script sees that this run
            // revoked nothing.
            let known = store.list_keys(&org, None).await?;
            match known.iter().find(|k| k.id == id) {
                None => anyhow::bail!("no key {id} in org {org}"),
                Some(k) if k.revoked_ms.is_some() => {
                    anyhow::bail!("key {id} is already revoked: nothing to do")
                }
                Some(_) => {}
            }
            if !store.revoke_key(&org, id).await? {
                anyhow::bail!("no key {id} in org {org}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

async fn secrets_key(cmd: SecretsKeyCmd) -> anyhow::Result<()> {
    let SecretsKeyCmd::Rotate {
        config,
        data_dir,
        secrets_key_file,
        database_url,
        new_key_file,
    } = cmd;
    let cfg = config_file(config.as_deref())?;
    let mut store = cfg.store;
    if database_url.is_some() {
        store.database_url = database_url;
    }
    store.database_pool_size = 1;
    let r = cattery::secrets_key::rotate(&cattery::secrets_key::Rotate {
        store,
        data_dir: data_dir.unwrap_or(cfg.server.data_dir),
        key_file: secrets_key_file.or(cfg.cluster.secrets_key_file),
        new_key_file: new_key_file.clone(),
        node_timeout: std::time::Duration::from_secs_f64(cfg.cluster.node_timeout_seconds),
    })
    .await?;
    match r.replaced {
        Some(path) => println!(
            "re-sealed {} secret value(s) with the new key and replaced {} with it",
            r.values,
            path.display()
        ),
        None => println!(
            "re-sealed {} secret value(s) with the new key: give every node {} as its \
             --secrets-key-file before starting it",
            r.values,
            new_key_file.display()
        ),
    }
    Ok(())
}

async fn store(cmd: StoreCmd) -> anyhow::Result<()> {
    use cattery::store::postgres::import::{self, Source};
    let StoreCmd::Copy {
        config,
        data_dir,
        backup,
        secrets_key_file,
        to,
    } = cmd;
    let cfg = config_file(config.as_deref())?;
    let source = match backup {
        Some(dir) => Source::Backup(dir),
        None => Source::DataDir {
            dir: data_dir.unwrap_or(cfg.server.data_dir),
            key_file: secrets_key_file.or(cfg.cluster.secrets_key_file),
        },
    };
    let Some(to) = to.or(cfg.store.database_url) else {
        anyhow::bail!(
            "say which PostgreSQL database to copy into: --to postgres://..., \
             CATTERY_DATABASE_URL, or [store] database_url in the --config file"
        );
    };
    let r = import::copy(&source, &to).await?;
    let rows: Vec<String> = r.tables.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "copied the records (schema {}) into the PostgreSQL database: {}",
        r.schema,
        rows.join(", ")
    );
    println!(
        "sessions the old server left open, now ended as after a restart: {}; builds it left \
         running, now failed: {}",
        r.ended_sessions, r.failed_builds
    );
    match &r.key_file {
        Some(k) => println!(
            "secrets: {} sealed value(s) copied; they open with the key in {}: give that file \
             (mode 0600) to every node as --secrets-key-file (docs/secrets.md)",
            r.sealed,
            k.display()
        ),
        None => println!(
            "secrets: no sealed values and no secrets key; give every node one new \
             --secrets-key-file (docs/secrets.md)"
        ),
    }
    Ok(())
}
