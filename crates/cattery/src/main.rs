//! The `cattery` binary: `cattery serve` runs the platform; `cattery keys ...` manages keys.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use cattery::config::{Config, ServeArgs};
use cattery::model::KeyKind;
use cattery::serve::{self, DEFAULT_ORG};

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
    Serve(Box<ServeArgs>),
    /// Manage API keys and user tokens (works while the server runs).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
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
        /// PostgreSQL database of the server (`postgres://...`), when it uses one instead of
        /// SQLite in the data dir.
        #[arg(long, env = "CATTERY_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
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
        /// PostgreSQL database of the server (`postgres://...`), when it uses one instead of
        /// SQLite in the data dir.
        #[arg(long, env = "CATTERY_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Org.
        #[arg(long, default_value = DEFAULT_ORG)]
        org: String,
    },
    /// Revoke a key by id; it fails at once.
    Revoke {
        /// Data directory of the server.
        #[arg(long, env = "CATTERY_DATA_DIR", default_value = "./.cattery")]
        data_dir: PathBuf,
        /// PostgreSQL database of the server (`postgres://...`), when it uses one instead of
        /// SQLite in the data dir.
        #[arg(long, env = "CATTERY_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
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
                    // A log that cannot be written (its disk is full) must not panic the task
                    // that logged (`eprintln!` of the write error does).
                    .log_internal_errors(false)
                    .init();
                serve::serve(Config::load(*a)?).await
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

/// The store of `cattery keys`: PostgreSQL when a database URL is given, else the data dir's.
fn store_config(database_url: Option<String>) -> cattery::config::StoreConfig {
    cattery::config::StoreConfig {
        database_url,
        // One command, a few statements.
        database_pool_size: 1,
        ..Default::default()
    }
}

async fn keys(cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Create {
            data_dir,
            database_url,
            kind,
            name,
            org,
        } => {
            let kind = match kind {
                KeyType::Public => KeyKind::Public,
                KeyType::Private => KeyKind::Private,
                KeyType::Token => KeyKind::Token,
            };
            let key = serve::create_key(&store_config(database_url), &data_dir, kind, &name, &org)
                .await?;
            println!("{key}");
        }
        KeysCmd::List {
            data_dir,
            database_url,
            org,
        } => {
            let store = serve::open_existing_store(&store_config(database_url), &data_dir).await?;
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
        KeysCmd::Revoke {
            data_dir,
            database_url,
            org,
            id,
        } => {
            let store = serve::open_existing_store(&store_config(database_url), &data_dir).await?;
            if !store.revoke_key(&org, id).await? {
                anyhow::bail!("no key {id} in org {org}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
