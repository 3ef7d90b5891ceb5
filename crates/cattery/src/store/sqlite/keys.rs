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

    async fn insert_key(
        &self,
        rec: &ApiKeyRecord,
        hash: &[u8],
        limit: Option<u32>,
    ) -> StoreResult<()> {
        let (rec, hash) = (rec.clone(), hash.to_vec());
        self.write_tx(move |db| {
            // The one writer serializes the count with every other create.
            if let Some(limit) = limit {
                super::within_limit(
                    db,
                    "SELECT COUNT(*) FROM api_keys WHERE org = ? AND revoked_ms IS NULL",
                    &rec.org,
                    limit,
                )?;
            }
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
        // Every API request: a direct read on this thread.
        let sql = format!("SELECT {KEY_COLS} FROM api_keys WHERE key_hash = ?");
        self.read_now(|db| {
            db.query_row(&sql, &[Val::Blob(hash)], |r| {
                key_from_row(r).map(|k| (k, r.blob(8)))
            })
        })?
        .transpose()
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
