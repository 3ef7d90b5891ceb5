//! `cattery secrets-key rotate`: every sealed value in the store re-sealed from the current
//! secrets key to a new one, offline (docs/secrets.md, "Rotating the secrets key").
//!
//! - **No server runs.** On SQLite the command takes the data dir's `serve.lock` for its whole
//!   run, as `cattery serve` does; on PostgreSQL it refuses while any node's heartbeat is
//!   younger than `[cluster] node_timeout_seconds` (a node that stopped cleanly, or whose
//!   heartbeat is that old, counts as stopped).
//! - **All or nothing.** The values are re-sealed in one store transaction
//!   ([`crate::core::secrets::rotate_key`]); a value that does not open with the current key
//!   fails it and nothing changes.
//! - **The key file.** With the data dir's own `secrets.key`, the new key replaces it after
//!   the commit (written to a temporary file, synced, renamed over it, the directory synced).
//!   With `--secrets-key-file` the operator replaces that file on every node.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::config::StoreConfig;
use crate::core::secrets::{SecretCipher, KEY_FILE};

/// Where the server keeps its store and its key, and the new key.
pub struct Rotate {
    /// The server's store settings (SQLite in `data_dir`, or PostgreSQL).
    pub store: StoreConfig,
    /// The server's data dir.
    pub data_dir: PathBuf,
    /// The server's `--secrets-key-file`, if it has one (else `<data_dir>/secrets.key`).
    pub key_file: Option<PathBuf>,
    /// The new key: 32 bytes, mode 0600.
    pub new_key_file: PathBuf,
    /// How old a node's heartbeat must be for the node to count as stopped (PostgreSQL).
    pub node_timeout: Duration,
}

/// What a rotation did.
pub struct Rotated {
    /// Sealed values re-sealed.
    pub values: u64,
    /// The key file replaced by the new key, if the command replaced one (the data dir's own).
    pub replaced: Option<PathBuf>,
}

/// Runs the rotation. Errors: a server runs on the store; a key file is missing, readable by
/// others or not 32 bytes; the new key is the current one; a stored value does not open with
/// the current key or the store fails (nothing changed then); the key file cannot be replaced
/// after the commit (the message says how to finish by hand).
pub async fn rotate(r: &Rotate) -> anyhow::Result<Rotated> {
    let postgres = r.store.database_url.is_some();
    let _lock = if postgres {
        None
    } else {
        Some(lock_stopped(&r.data_dir)?)
    };
    let current = r
        .key_file
        .clone()
        .unwrap_or_else(|| r.data_dir.join(KEY_FILE));
    let old = SecretCipher::load_file(&current).context("the current secrets key")?;
    let new_bytes = read_key(&r.new_key_file)?;
    let new = SecretCipher::load_file(&r.new_key_file).context("the new secrets key")?;
    if new.opens_check(&old.seal_check()) {
        anyhow::bail!(
            "the new key file {} holds the current key: make a new one with \
             `head -c 32 /dev/urandom > FILE`",
            r.new_key_file.display()
        );
    }
    let store = crate::serve::open_existing_store(&r.store, &r.data_dir).await?;
    if postgres {
        refuse_live_nodes(store.as_ref(), r.node_timeout).await?;
    }
    let values = crate::core::secrets::rotate_key(store.as_ref(), old, new).await?;
    drop(store);
    if r.key_file.is_some() {
        return Ok(Rotated {
            values,
            replaced: None,
        });
    }
    replace_key_file(&current, &new_bytes).with_context(|| {
        format!(
            "the secrets were re-sealed with the new key, but {} could not be replaced: copy {} \
             over it (mode 0600) before starting the server",
            current.display(),
            r.new_key_file.display()
        )
    })?;
    Ok(Rotated {
        values,
        replaced: Some(current),
    })
}

/// Takes the data dir's server lock (`serve.lock`, as `cattery serve` does) for the whole
/// rotation. Errors: a server holds it.
fn lock_stopped(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let f = crate::serve::open_lock_file(dir)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "a cattery serve is using {}: stop it first (a running server keeps the key it \
             started with and would seal new values with it)",
            dir.display()
        )
    })
}

/// The 32 bytes of a key file (checked by `SecretCipher::load_file` too).
fn read_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the new key file {}", path.display()))
}

/// Refuses while a node's heartbeat is younger than `timeout`.
async fn refuse_live_nodes(
    store: &dyn crate::store::Store,
    timeout: Duration,
) -> anyhow::Result<()> {
    let now = crate::model::now_ms();
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let live: Vec<String> = store
        .list_nodes()
        .await?
        .into_iter()
        .filter(|n| n.heartbeat_ms != 0 && now.saturating_sub(n.heartbeat_ms) <= timeout_ms)
        .map(|n| n.id)
        .collect();
    if !live.is_empty() {
        anyhow::bail!(
            "node(s) {} still run on this database (a heartbeat within the last {} s): stop \
             every node first, then rotate",
            live.join(", "),
            timeout.as_secs_f64()
        );
    }
    Ok(())
}

/// Replaces `path` with `key` atomically: a temporary file beside it (mode 0600), synced,
/// renamed over it, and the directory synced.
fn replace_key_file(path: &Path, key: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!("{KEY_FILE}.new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(key)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
