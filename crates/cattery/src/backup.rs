//! `cattery backup` and `cattery restore`: a data directory's durable state (the SQLite
//! database and the secrets key) copied out while the server runs, and put back into the data
//! directory of a stopped server. See docs/operations.md.
//!
//! A backup is a directory: `cattery.db` (SQLite's online backup: the database as of one
//! commit, checked), `secrets.key` (without it the sealed secret values in the copy cannot be
//! opened), and `backup.json` (what made it). Instance directories, captured-output files and
//! the server id are not part of it: a restored server ends the sessions that were live at
//! the backup as `lost`, like after any restart that finds their instances gone. The warm
//! instances a backup records are forgotten at restore (`forget_warm_instances`): one that
//! still runs may have taken a session the backup does not hold since.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::core::secrets::KEY_FILE;
use crate::store::sqlite::{backup, DB_FILE};

/// The description file of a backup.
pub const MANIFEST: &str = "backup.json";

/// What a backup or restore copied.
pub type Summary = backup::CopyInfo;

/// A server's durable state on disk: its data dir, and its secrets key file when the server
/// is given one (`--secrets-key-file`; else the key is `<data_dir>/secrets.key`).
pub struct Place {
    pub data_dir: PathBuf,
    pub key_file: Option<PathBuf>,
}

impl Place {
    /// A data dir whose secrets key is its own `secrets.key`.
    pub fn data_dir(data_dir: &Path) -> Self {
        Place {
            data_dir: data_dir.to_path_buf(),
            key_file: None,
        }
    }

    fn key(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(KEY_FILE))
    }
}

/// Copies the data dir's database and the secrets key into the new directory `out` (mode
/// 0700). Works while a server uses the data dir. Errors: the data dir holds no database,
/// `out` exists and is not an empty directory, a copy fails.
pub fn backup(place: &Place, out: &Path) -> anyhow::Result<Summary> {
    let data_dir = place.data_dir.as_path();
    let db = data_dir.join(DB_FILE);
    if !db.is_file() {
        anyhow::bail!(
            "{} is not a Cattery data dir (no {DB_FILE})",
            data_dir.display()
        );
    }
    // A backup of sealed values without their key could never be opened.
    let key = place.key();
    if !key.is_file() {
        let sealed = backup::verify(&db)?.sealed;
        if sealed > 0 {
            anyhow::bail!(
                "the database holds {sealed} sealed secret value(s) but there is no secrets key \
                 at {}: give the server's --secrets-key-file (or CATTERY_SECRETS_KEY_FILE, or \
                 its --config)",
                key.display()
            );
        }
    }
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out)?.next().is_none();
        if !empty {
            anyhow::bail!(
                "{} exists and is not an empty directory; give a new path",
                out.display()
            );
        }
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .with_context(|| format!("cannot create {}", out.display()))?;
    }
    let tmp = out.join(format!("{DB_FILE}.partial"));
    let _ = std::fs::remove_file(&tmp);
    let info = backup::copy(&db, &tmp)?;
    std::fs::rename(&tmp, out.join(DB_FILE))?;
    if key.is_file() {
        copy_private(&key, &out.join(KEY_FILE))?;
    }
    let manifest = serde_json::json!({
        "format": 1,
        "catteryVersion": crate::build_info::full(),
        "schemaVersion": info.schema,
        "createdMs": crate::model::now_ms(),
        "sessions": info.sessions,
        "agents": info.agents,
        "secretsKey": key.is_file(),
    });
    std::fs::write(
        out.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    sync_dir(out)?;
    Ok(info)
}

/// Puts the backup `from` into the data dir (created if missing). Refuses while a server uses
/// the data dir, when it already holds a database (unless `force`: then it is replaced, its
/// WAL files removed), when the backup's schema is newer than this binary's, and when the
/// server is given a secrets key file (`Place::key_file`) that is not the backup's key (the
/// restored secret values could not be opened; that file is never overwritten).
pub fn restore(from: &Path, place: &Place, force: bool) -> anyhow::Result<Summary> {
    let data_dir = place.data_dir.as_path();
    let src = from.join(DB_FILE);
    if !src.is_file() {
        anyhow::bail!("{} is not a Cattery backup (no {DB_FILE})", from.display());
    }
    let info = backup::verify(&src)?;
    let key = from.join(KEY_FILE);
    if let (Some(file), true) = (&place.key_file, key.is_file()) {
        let same = std::fs::read(file)
            .with_context(|| format!("cannot read the secrets key file {}", file.display()))?
            == std::fs::read(&key)?;
        if !same {
            anyhow::bail!(
                "the backup's secrets key is not the one in {}: the restored secret values \
                 could not be opened; put the backup's {KEY_FILE} there first (on every node \
                 that uses it)",
                file.display()
            );
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    // The server's own lock: held while it runs.
    let lock_path = data_dir.join("serve.lock");
    let lock_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| {
            anyhow::anyhow!(
                "a cattery serve is using {}; stop it before restoring into it",
                data_dir.display()
            )
        })?;
    let dst = data_dir.join(DB_FILE);
    if dst.exists() && !force {
        anyhow::bail!(
            "{} already holds a database; pass --force to replace it",
            data_dir.display()
        );
    }
    let tmp = data_dir.join(format!("{DB_FILE}.restoring"));
    let _ = std::fs::remove_file(&tmp);
    copy_private(&src, &tmp)?;
    backup::forget_warm_instances(&tmp)?;
    // The replaced database's WAL must not be applied to the restored one.
    for suffix in ["-wal", "-shm"] {
        let p = data_dir.join(format!("{DB_FILE}{suffix}"));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
    }
    std::fs::rename(&tmp, &dst)?;
    if key.is_file() && place.key_file.is_none() {
        let dst_key = data_dir.join(KEY_FILE);
        let _ = std::fs::remove_file(&dst_key);
        copy_private(&key, &dst_key)?;
    }
    sync_dir(data_dir)?;
    Ok(info)
}

/// Copies a file to a new file of mode 0600, synced.
fn copy_private(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut src =
        std::fs::File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("cannot create {}", to.display()))?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{self, OpenMode};

    #[tokio::test]
    async fn backup_restore_round_trip_and_newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let s = store::open(&Default::default(), &data, OpenMode::Create)
            .await
            .unwrap();
        s.ensure_org("default").await.unwrap();
        std::fs::write(data.join(KEY_FILE), [7u8; 32]).unwrap();
        // While the store is open (the server runs).
        let out = tmp.path().join("bk");
        let info = backup(&Place::data_dir(&data), &out).unwrap();
        assert_eq!(info.schema, crate::store::sqlite::migrate::LATEST);
        assert!(out.join(MANIFEST).is_file());
        assert_eq!(std::fs::read(out.join(KEY_FILE)).unwrap(), [7u8; 32]);
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!((mode(DB_FILE), mode(KEY_FILE)), (0o600, 0o600));
        }
        assert!(
            backup(&Place::data_dir(&data), &out).is_err(),
            "a backup never overwrites"
        );

        let restored = tmp.path().join("restored");
        restore(&out, &Place::data_dir(&restored), false).unwrap();
        assert!(
            restore(&out, &Place::data_dir(&restored), false).is_err(),
            "needs --force"
        );
        restore(&out, &Place::data_dir(&restored), true).unwrap();
        let r = store::open(&Default::default(), &restored, OpenMode::Existing)
            .await
            .unwrap();
        assert!(r
            .list_orgs()
            .await
            .unwrap()
            .contains(&"default".to_string()));
        drop(r);

        // A schema newer than this binary's: refused, with a message that says what to do.
        let db = rusqlite::Connection::open(restored.join(DB_FILE)).unwrap();
        db.pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        let err = match store::open(&Default::default(), &restored, OpenMode::Existing).await {
            Ok(_) => panic!("a newer schema must be refused"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("schema version 99, newer than this cattery"),
            "{err}"
        );
        let err = restore(
            &restored,
            &Place::data_dir(&tmp.path().join("other")),
            false,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("newer"), "{err:#}");
    }
}
