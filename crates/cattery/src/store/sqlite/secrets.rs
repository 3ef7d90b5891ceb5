//! Secret sets, their sealed values, and deployments' snapshots of them.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Row, Val};
use super::SqliteStore;
use crate::model::now_ms;
use crate::store::{
    Resealer, SealedOf, SealedValue, SecretSetKind, SecretSetRecord, SecretStore, StoreError,
    StoreResult,
};

const SET_COLS: &str = "org, name, kind, region, host, created_ms, updated_ms";

fn set_from_row(r: &Row<'_>) -> StoreResult<SecretSetRecord> {
    Ok(SecretSetRecord {
        org: r.string(0),
        name: r.string(1),
        kind: SecretSetKind::parse(&r.string(2))
            .ok_or_else(|| StoreError::Invalid("bad secret set kind".into()))?,
        region: r.string(3),
        host: r.text(4),
        created_ms: r.int(5).unwrap_or_default(),
        updated_ms: r.int(6).unwrap_or_default(),
        keys: Vec::new(),
    })
}

/// A sealed value from `key, nonce, ciphertext` at columns `i..i + 3`.
fn sealed_from_row(r: &Row<'_>, i: usize) -> SealedValue {
    SealedValue {
        key: r.string(i),
        nonce: r.blob(i + 1),
        ciphertext: r.blob(i + 2),
    }
}

#[async_trait]
impl SecretStore for SqliteStore {
    async fn secret_set_exists(&self, org: &str, name: &str) -> StoreResult<bool> {
        self.read_now(|db| {
            db.query_int(
                "SELECT COUNT(*) FROM secret_sets WHERE org = ? AND name = ?",
                &[Val::Text(org), Val::Text(name)],
            )
        })
        .map(|n| n > 0)
    }

    async fn get_secret_set(&self, org: &str, name: &str) -> StoreResult<Option<SecretSetRecord>> {
        let sql = format!("SELECT {SET_COLS} FROM secret_sets WHERE org = ? AND name = ?");
        self.read_now(|db| {
            let Some(set) = db.query_row(&sql, &[Val::Text(org), Val::Text(name)], set_from_row)?
            else {
                return Ok(None);
            };
            let mut set = set?;
            set.keys = db.query_all(
                "SELECT key FROM secrets WHERE org = ? AND set_name = ? ORDER BY key",
                &[Val::Text(org), Val::Text(name)],
                |r| Ok(r.string(0)),
            )?;
            Ok(Some(set))
        })
    }

    async fn list_secret_sets(&self, org: &str) -> StoreResult<Vec<SecretSetRecord>> {
        let org = org.to_string();
        let sql = format!("SELECT {SET_COLS} FROM secret_sets WHERE org = ? ORDER BY name");
        self.scan(move |db| {
            let mut sets = db.query_all(&sql, &[Val::Text(&org)], set_from_row)?;
            let keys = db.query_all(
                "SELECT set_name, key FROM secrets WHERE org = ? ORDER BY key",
                &[Val::Text(&org)],
                |r| Ok((r.string(0), r.string(1))),
            )?;
            for (set_name, key) in keys {
                if let Some(s) = sets.iter_mut().find(|s| s.name == set_name) {
                    s.keys.push(key);
                }
            }
            Ok(sets)
        })
        .await
    }

    async fn upsert_secret_set(
        &self,
        set: &SecretSetRecord,
        values: &[SealedValue],
        replace_all: bool,
        limit: Option<u32>,
    ) -> StoreResult<()> {
        let (set, values) = (set.clone(), values.to_vec());
        self.write_tx(move |db| {
            // A new set counts against the limit; the one writer serializes the count with
            // every other create.
            if let Some(limit) = limit {
                let exists = db.query_int(
                    "SELECT COUNT(*) FROM secret_sets WHERE org = ? AND name = ?",
                    &[Val::Text(&set.org), Val::Text(&set.name)],
                )? > 0;
                if !exists {
                    super::within_limit(
                        db,
                        "SELECT COUNT(*) FROM secret_sets WHERE org = ?",
                        &set.org,
                        limit,
                    )?;
                }
            }
            let n = db.exec(
                "INSERT INTO secret_sets (org, name, kind, region, host, created_ms, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) \
                 ON CONFLICT(org, name) DO UPDATE SET updated_ms = excluded.updated_ms, \
                 host = excluded.host WHERE kind = excluded.kind AND region = excluded.region",
                &[
                    Val::Text(&set.org),
                    Val::Text(&set.name),
                    Val::Text(set.kind.as_str()),
                    Val::Text(&set.region),
                    set.host.as_ref().into(),
                    set.updated_ms.into(),
                ],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict);
            }
            if replace_all {
                db.exec(
                    "DELETE FROM secrets WHERE org = ? AND set_name = ?",
                    &[Val::Text(&set.org), Val::Text(&set.name)],
                )?;
            }
            for v in &values {
                db.exec(
                    "INSERT INTO secrets (org, set_name, key, nonce, ciphertext) VALUES (?, ?, ?, ?, ?) \
                     ON CONFLICT(org, set_name, key) DO UPDATE SET nonce = excluded.nonce, \
                     ciphertext = excluded.ciphertext",
                    &[
                        Val::Text(&set.org),
                        Val::Text(&set.name),
                        Val::Text(&v.key),
                        Val::Blob(&v.nonce),
                        Val::Blob(&v.ciphertext),
                    ],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn secret_values(&self, org: &str, name: &str) -> StoreResult<Vec<SealedValue>> {
        self.read_now(|db| {
            db.query_all(
                "SELECT key, nonce, ciphertext FROM secrets WHERE org = ? AND set_name = ? \
                 ORDER BY key",
                &[Val::Text(org), Val::Text(name)],
                |r| Ok(sealed_from_row(r, 0)),
            )
        })
    }

    async fn delete_secret_set(&self, org: &str, name: &str) -> StoreResult<bool> {
        let (org, name) = (org.to_string(), name.to_string());
        self.write_tx(move |db| {
            let n = db.exec(
                "DELETE FROM secret_sets WHERE org = ? AND name = ?",
                &[Val::Text(&org), Val::Text(&name)],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_secret(&self, org: &str, name: &str, key: &str) -> StoreResult<bool> {
        let (org, name, key) = (org.to_string(), name.to_string(), key.to_string());
        self.write_tx(move |db| {
            let n = db.exec(
                "DELETE FROM secrets WHERE org = ? AND set_name = ? AND key = ?",
                &[Val::Text(&org), Val::Text(&name), Val::Text(&key)],
            )?;
            if n > 0 {
                db.exec(
                    "UPDATE secret_sets SET updated_ms = ? WHERE org = ? AND name = ?",
                    &[now_ms().into(), Val::Text(&org), Val::Text(&name)],
                )?;
            }
            Ok(n > 0)
        })
        .await
    }

    async fn deployment_secrets(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Vec<(String, SealedValue)>> {
        self.read_now(|db| {
            db.query_all(
                "SELECT set_name, key, nonce, ciphertext FROM deployment_secrets \
                 WHERE deployment_id = ? ORDER BY key",
                &[deployment_id.into()],
                |r| Ok((r.string(0), sealed_from_row(r, 1))),
            )
        })
    }

    async fn reseal_all(&self, with: Arc<dyn Resealer>) -> StoreResult<u64> {
        self.write_tx(move |db| {
            let with = with.as_ref();
            let fail = StoreError::Invalid;
            let mut n = 0;
            let rows = db.query_all(
                "SELECT org, set_name, key, nonce, ciphertext FROM secrets",
                &[],
                |r| Ok((r.string(0), r.string(1), sealed_from_row(r, 2))),
            )?;
            for (org, set, v) in rows {
                let s = with
                    .reseal(
                        SealedOf::SecretSet {
                            org: &org,
                            set: &set,
                        },
                        &v,
                    )
                    .map_err(fail)?;
                db.exec(
                    "UPDATE secrets SET nonce = ?, ciphertext = ? \
                     WHERE org = ? AND set_name = ? AND key = ?",
                    &[
                        Val::Blob(&s.nonce),
                        Val::Blob(&s.ciphertext),
                        Val::Text(&org),
                        Val::Text(&set),
                        Val::Text(&v.key),
                    ],
                )?;
                n += 1;
            }
            let rows = db.query_all(
                "SELECT deployment_id, org, set_name, key, nonce, ciphertext \
                 FROM deployment_secrets",
                &[],
                |r| Ok((r.string(0), r.string(1), r.string(2), sealed_from_row(r, 3))),
            )?;
            for (dep, org, set, v) in rows {
                let s = with
                    .reseal(
                        SealedOf::Deployment {
                            org: &org,
                            set: &set,
                        },
                        &v,
                    )
                    .map_err(fail)?;
                db.exec(
                    "UPDATE deployment_secrets SET nonce = ?, ciphertext = ? \
                     WHERE deployment_id = ? AND key = ?",
                    &[
                        Val::Blob(&s.nonce),
                        Val::Blob(&s.ciphertext),
                        Val::Text(&dep),
                        Val::Text(&v.key),
                    ],
                )?;
                n += 1;
            }
            n += reseal_webhooks_and_orgs(db, with)?;
            let check = with.key_check();
            db.exec(
                "UPDATE nodes SET key_check = ? WHERE key_check IS NOT NULL",
                &[Val::Blob(&check)],
            )?;
            Ok(n)
        })
        .await
    }
}

/// The webhook and org-property part of [`SecretStore::reseal_all`], inside its transaction.
fn reseal_webhooks_and_orgs(db: &mut super::conn::Conn, with: &dyn Resealer) -> StoreResult<u64> {
    let mut n = 0;
    let rows = db.query_all(
        "SELECT id, org, nonce, ciphertext FROM webhook_endpoints",
        &[],
        |r| {
            let v = SealedValue {
                key: "secret".into(),
                nonce: r.blob(2),
                ciphertext: r.blob(3),
            };
            Ok((r.uuid(0)?, r.string(1), v))
        },
    )?;
    for (id, org, v) in rows {
        let s = with
            .reseal(SealedOf::Webhook { org: &org, id }, &v)
            .map_err(StoreError::Invalid)?;
        db.exec(
            "UPDATE webhook_endpoints SET nonce = ?, ciphertext = ? WHERE id = ?",
            &[Val::Blob(&s.nonce), Val::Blob(&s.ciphertext), id.into()],
        )?;
        n += 1;
    }
    let rows = db.query_all("SELECT name, properties FROM orgs", &[], |r| {
        Ok((r.string(0), r.string(1)))
    })?;
    for (org, props) in rows {
        let props: serde_json::Value = serde_json::from_str(&props)
            .map_err(|e| StoreError::Invalid(format!("properties of org {org}: {e}")))?;
        if let Some(p) = with
            .reseal_properties(&org, &props)
            .map_err(StoreError::Invalid)?
        {
            db.exec(
                "UPDATE orgs SET properties = ? WHERE name = ?",
                &[Val::Str(p.to_string()), Val::Text(&org)],
            )?;
            n += 1;
        }
    }
    Ok(n)
}
