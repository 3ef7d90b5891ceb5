//! Orgs and API keys.

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Row, Val};
use super::SqliteStore;
use crate::model::{now_ms, ApiKeyRecord, KeyKind};
use crate::store::{KeyStore, OrgRecord, StoreError, StoreResult};

const KEY_COLS: &str =
    "id, org, kind, name, key_prefix, created_ms, revoked_ms, public_key, key_hash";

fn key_from_row(r: &Row<'_>) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: r.uuid(0)?,
        org: r.string(1),
        kind: KeyKind::parse(&r.string(2))
            .ok_or_else(|| StoreError::Invalid("bad key kind".into()))?,
        name: r.string(3),
        prefix: r.string(4),
        created_ms: r.int(5).unwrap_or_default(),
        revoked_ms: r.int(6),
        public_key: r.text(7),
    })
}

/// `SELECT` of one key by its hash.
static FIND_KEY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {KEY_COLS} FROM api_keys WHERE key_hash = ?"));

/// Live API keys read since the database last changed, so that a request's key check costs
/// no query. Its own read connection's `PRAGMA data_version` changes with every commit made
/// by any other connection, this server's writer or another process (`cattery keys revoke`
/// on the same data dir): the cache is emptied then, so a revocation, a deleted org or any
/// other write is seen by the very next request, as without the cache. Writes are frequent
/// (sessions, log lines), so in practice it serves the bursts of requests between them.
#[derive(Default)]
pub(super) struct KeyCache {
    conn: Option<super::conn::Conn>,
    version: Option<i64>,
    keys: std::collections::HashMap<Vec<u8>, (ApiKeyRecord, Vec<u8>)>,
}

impl KeyCache {
    /// Entries beyond this empty the cache (bounded memory).
    const MAX: usize = 10_000;

    /// The key stored under `hash` (its record and stored hash), from memory when the
    /// database has not changed since it was read.
    fn find(
        &mut self,
        path: &std::path::Path,
        hash: &[u8],
    ) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>> {
        let r = self.find_on_conn(path, hash);
        if r.is_err() {
            // A fresh connection next time (and nothing kept from this one).
            self.conn = None;
            self.version = None;
            self.keys.clear();
        }
        r
    }

    fn find_on_conn(
        &mut self,
        path: &std::path::Path,
        hash: &[u8],
    ) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>> {
        if self.conn.is_none() {
            self.conn = Some(super::conn::Conn::open(
                path,
                super::conn::Mode::Read,
                super::READER_CACHE_SIZE,
            )?);
        }
        let db = self.conn.as_mut().expect("opened above");
        let version = db
            .query_row("PRAGMA data_version", &[], |r| r.int(0))?
            .flatten();
        if version.is_none() || version != self.version {
            self.keys.clear();
            self.version = version;
        }
        if let Some(hit) = self.keys.get(hash) {
            return Ok(Some(hit.clone()));
        }
        let found = db
            .query_row(FIND_KEY.as_str(), &[Val::Blob(hash)], |r| {
                key_from_row(r).map(|k| (k, r.blob(8)))
            })?
            .transpose()?;
        db.ensure_clean();
        if let (Some((rec, stored)), Some(_)) = (&found, version) {
            if rec.revoked_ms.is_none() {
                if self.keys.len() >= Self::MAX {
                    self.keys.clear();
                }
                self.keys
                    .insert(hash.to_vec(), (rec.clone(), stored.clone()));
            }
        }
        Ok(found)
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn ensure_org(&self, name: &str) -> StoreResult<()> {
        let name = name.to_string();
        self.write_tx(move |db| {
            db.exec(
                "INSERT INTO orgs (name, verbose_name, created_ms) VALUES (?1, ?1, ?2) \
                 ON CONFLICT(name) DO NOTHING",
                &[Val::Text(&name), now_ms().into()],
            )
            .map(|_| ())
        })
        .await
    }

    async fn list_orgs(&self) -> StoreResult<Vec<String>> {
        self.scan(|db| {
            db.query_all(
                "SELECT name FROM orgs ORDER BY created_ms, name",
                &[],
                |r| Ok(r.string(0)),
            )
        })
        .await
    }

    async fn get_org(&self, name: &str) -> StoreResult<Option<OrgRecord>> {
        self.read_now(|db| {
            db.query_row(
                "SELECT name, verbose_name, properties, created_ms FROM orgs WHERE name = ?",
                &[Val::Text(name)],
                |r| OrgRecord {
                    name: r.string(0),
                    verbose_name: r.string(1),
                    properties: serde_json::from_str(&r.string(2))
                        .ok()
                        .filter(serde_json::Value::is_object)
                        .unwrap_or_else(|| serde_json::json!({})),
                    created_ms: r.int(3).unwrap_or_default(),
                },
            )
        })
    }

    async fn set_org_properties(&self, name: &str, props: &serde_json::Value) -> StoreResult<()> {
        let (name, props) = (name.to_string(), props.to_string());
        self.write_tx(move |db| {
            let n = db.exec(
                "UPDATE orgs SET properties = ? WHERE name = ?",
                &[Val::Text(&props), Val::Text(&name)],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn insert_key(&self, rec: &ApiKeyRecord, hash: &[u8]) -> StoreResult<()> {
        let (rec, hash) = (rec.clone(), hash.to_vec());
        self.write_tx(move |db| {
            let public = (rec.kind == KeyKind::Public)
                .then_some(rec.public_key.as_ref())
                .flatten();
            db.exec(
                "INSERT INTO api_keys (id, org, kind, name, key_hash, key_prefix, created_ms, \
                 revoked_ms, public_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                &[
                    rec.id.into(),
                    Val::Text(&rec.org),
                    Val::Text(rec.kind.as_str()),
                    Val::Text(&rec.name),
                    Val::Blob(&hash),
                    Val::Text(&rec.prefix),
                    rec.created_ms.into(),
                    rec.revoked_ms.into(),
                    public.into(),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn find_key(&self, hash: &[u8]) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>> {
        // Every API request: answered from the key cache while the database is unchanged
        // (see [`KeyCache`]), else a direct read on this thread.
        let begun = std::time::Instant::now();
        let r = self.inner.keys.lock().find(&self.inner.path, hash);
        crate::telemetry::store_op("read", begun.elapsed());
        r
    }

    async fn list_keys(&self, org: &str, kind: Option<KeyKind>) -> StoreResult<Vec<ApiKeyRecord>> {
        let org = org.to_string();
        let sql = format!(
            "SELECT {KEY_COLS} FROM api_keys WHERE org = ?1 AND (?2 IS NULL OR kind = ?2) \
             ORDER BY created_ms, rowid"
        );
        self.scan(move |db| {
            db.query_all(
                &sql,
                &[Val::Text(&org), kind.map(|k| k.as_str()).into()],
                key_from_row,
            )
        })
        .await
    }

    async fn revoke_key(&self, org: &str, id: Uuid) -> StoreResult<bool> {
        let org = org.to_string();
        self.write_tx(move |db| {
            let n = db.exec(
                "UPDATE api_keys SET revoked_ms = COALESCE(revoked_ms, ?3) WHERE org = ?1 AND id = ?2",
                &[Val::Text(&org), id.into(), now_ms().into()],
            )?;
            Ok(n > 0)
        })
        .await
    }
}
