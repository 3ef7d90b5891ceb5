//! Secret sets, their sealed values, and deployments' snapshots of them.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::{Limited, PgStore};
use crate::model::now_ms;
use crate::store::{
    Resealer, SealedOf, SealedValue, SecretSetKind, SecretSetRecord, SecretStore, StoreError,
    StoreResult,
};

const SET_COLS: &str = "org, name, kind, region, host, created_ms, updated_ms";

fn set_from_row(r: &PgRow) -> StoreResult<SecretSetRecord> {
    let kind: String = r.try_get(2)?;
    Ok(SecretSetRecord {
        org: r.try_get(0)?,
        name: r.try_get(1)?,
        kind: SecretSetKind::parse(&kind)
            .ok_or_else(|| StoreError::Invalid("bad secret set kind".into()))?,
        region: r.try_get(3)?,
        host: r.try_get(4)?,
        created_ms: r.try_get(5)?,
        updated_ms: r.try_get(6)?,
        keys: Vec::new(),
    })
}

/// A sealed value from `key, nonce, ciphertext` at columns `i..i + 3`.
fn sealed_from_row(r: &PgRow, i: usize) -> StoreResult<SealedValue> {
    Ok(SealedValue {
        key: r.try_get(i)?,
        nonce: r.try_get(i + 1)?,
        ciphertext: r.try_get(i + 2)?,
    })
}

#[async_trait]
impl SecretStore for PgStore {
    async fn secret_set_exists(&self, org: &str, name: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM secret_sets WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn get_secret_set(&self, org: &str, name: &str) -> StoreResult<Option<SecretSetRecord>> {
        let sql = format!("SELECT {SET_COLS} FROM secret_sets WHERE org = $1 AND name = $2");
        let mut tx = self.pool.begin().await?;
        let Some(row) = super::query_dyn(&sql)
            .bind(org)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let mut set = set_from_row(&row)?;
        let keys =
            sqlx::query("SELECT key FROM secrets WHERE org = $1 AND set_name = $2 ORDER BY key")
                .bind(org)
                .bind(name)
                .fetch_all(&mut *tx)
                .await?;
        set.keys = keys
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        tx.commit().await?;
        Ok(Some(set))
    }

    async fn list_secret_sets(&self, org: &str) -> StoreResult<Vec<SecretSetRecord>> {
        let sql = format!("SELECT {SET_COLS} FROM secret_sets WHERE org = $1 ORDER BY name");
        let mut tx = self.pool.begin().await?;
        let rows = super::query_dyn(&sql).bind(org).fetch_all(&mut *tx).await?;
        let mut sets = rows
            .iter()
            .map(set_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let keys = sqlx::query("SELECT set_name, key FROM secrets WHERE org = $1 ORDER BY key")
            .bind(org)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        for r in &keys {
            let (set_name, key): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            if let Some(s) = sets.iter_mut().find(|s| s.name == set_name) {
                s.keys.push(key);
            }
        }
        Ok(sets)
    }

    async fn upsert_secret_set(
        &self,
        set: &SecretSetRecord,
        values: &[SealedValue],
        replace_all: bool,
        limit: Option<u32>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(limit) = limit {
            // Under the lock, so a create of the same set meanwhile is seen here (then this
            // is an update), and a set deleted meanwhile is counted as new.
            super::lock_org_creates(&mut tx, Limited::SecretSets, &set.org).await?;
            let exists = sqlx::query("SELECT 1 FROM secret_sets WHERE org = $1 AND name = $2")
                .bind(&set.org)
                .bind(&set.name)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !exists {
                super::within_limit(&mut tx, Limited::SecretSets, &set.org, limit).await?;
            }
        }
        let n = sqlx::query(
            "INSERT INTO secret_sets AS s (org, name, kind, region, host, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $6) \
             ON CONFLICT (org, name) DO UPDATE SET updated_ms = EXCLUDED.updated_ms, \
             host = EXCLUDED.host WHERE s.kind = EXCLUDED.kind AND s.region = EXCLUDED.region",
        )
        .bind(&set.org)
        .bind(&set.name)
        .bind(set.kind.as_str())
        .bind(&set.region)
        .bind(&set.host)
        .bind(set.updated_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::Conflict);
        }
        if replace_all {
            sqlx::query("DELETE FROM secrets WHERE org = $1 AND set_name = $2")
                .bind(&set.org)
                .bind(&set.name)
                .execute(&mut *tx)
                .await?;
        }
        for v in values {
            sqlx::query(
                "INSERT INTO secrets (org, set_name, key, nonce, ciphertext) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (org, set_name, key) DO UPDATE SET nonce = EXCLUDED.nonce, \
                 ciphertext = EXCLUDED.ciphertext",
            )
            .bind(&set.org)
            .bind(&set.name)
            .bind(&v.key)
            .bind(&v.nonce)
            .bind(&v.ciphertext)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn secret_values(&self, org: &str, name: &str) -> StoreResult<Vec<SealedValue>> {
        let rows = sqlx::query(
            "SELECT key, nonce, ciphertext FROM secrets WHERE org = $1 AND set_name = $2 \
             ORDER BY key",
        )
        .bind(org)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| sealed_from_row(r, 0)).collect()
    }

    async fn delete_secret_set(&self, org: &str, name: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM secret_sets WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn delete_secret(&self, org: &str, name: &str, key: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM secrets WHERE org = $1 AND set_name = $2 AND key = $3")
            .bind(org)
            .bind(name)
            .bind(key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            sqlx::query("UPDATE secret_sets SET updated_ms = $1 WHERE org = $2 AND name = $3")
                .bind(now_ms())
                .bind(org)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn deployment_secrets(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Vec<(String, SealedValue)>> {
        let rows = sqlx::query(
            "SELECT set_name, key, nonce, ciphertext FROM deployment_secrets \
             WHERE deployment_id = $1 ORDER BY key",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, sealed_from_row(r, 1)?)))
            .collect()
    }

    async fn reseal_all(&self, with: Arc<dyn Resealer>) -> StoreResult<u64> {
        let with = with.as_ref();
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        let rows = sqlx::query("SELECT org, set_name, key, nonce, ciphertext FROM secrets")
            .fetch_all(&mut *tx)
            .await?;
        for r in &rows {
            let (org, set): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            let v = sealed_from_row(r, 2)?;
            let s = with
                .reseal(
                    SealedOf::SecretSet {
                        org: &org,
                        set: &set,
                    },
                    &v,
                )
                .map_err(StoreError::Invalid)?;
            sqlx::query(
                "UPDATE secrets SET nonce = $1, ciphertext = $2 \
                 WHERE org = $3 AND set_name = $4 AND key = $5",
            )
            .bind(&s.nonce)
            .bind(&s.ciphertext)
            .bind(&org)
            .bind(&set)
            .bind(&v.key)
            .execute(&mut *tx)
            .await?;
            n += 1;
        }
        let rows = sqlx::query(
            "SELECT deployment_id, org, set_name, key, nonce, ciphertext FROM deployment_secrets",
        )
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let (dep, org, set): (Uuid, String, String) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let v = sealed_from_row(r, 3)?;
            let s = with
                .reseal(
                    SealedOf::Deployment {
                        org: &org,
                        set: &set,
                    },
                    &v,
                )
                .map_err(StoreError::Invalid)?;
            sqlx::query(
                "UPDATE deployment_secrets SET nonce = $1, ciphertext = $2 \
                 WHERE deployment_id = $3 AND key = $4",
            )
            .bind(&s.nonce)
            .bind(&s.ciphertext)
            .bind(dep)
            .bind(&v.key)
            .execute(&mut *tx)
            .await?;
            n += 1;
        }
        n += reseal_webhooks_and_orgs(&mut tx, with).await?;
        sqlx::query("UPDATE nodes SET key_check = $1 WHERE key_check IS NOT NULL")
            .bind(with.key_check())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// The webhook and org-property part of [`SecretStore::reseal_all`], inside its transaction.
async fn reseal_webhooks_and_orgs(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    with: &dyn Resealer,
) -> StoreResult<u64> {
    let mut n = 0;
    let rows = sqlx::query("SELECT id, org, nonce, ciphertext FROM webhook_endpoints")
        .fetch_all(&mut **tx)
        .await?;
    for r in &rows {
        let (id, org): (Uuid, String) = (r.try_get(0)?, r.try_get(1)?);
        let v = SealedValue {
            key: "secret".into(),
            nonce: r.try_get(2)?,
            ciphertext: r.try_get(3)?,
        };
        let s = with
            .reseal(SealedOf::Webhook { org: &org, id }, &v)
            .map_err(StoreError::Invalid)?;
        sqlx::query("UPDATE webhook_endpoints SET nonce = $1, ciphertext = $2 WHERE id = $3")
            .bind(&s.nonce)
            .bind(&s.ciphertext)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        n += 1;
    }
    let rows = sqlx::query("SELECT name, properties FROM orgs")
        .fetch_all(&mut **tx)
        .await?;
    for r in &rows {
        let (org, props): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        let props: serde_json::Value = serde_json::from_str(&props)
            .map_err(|e| StoreError::Invalid(format!("properties of org {org}: {e}")))?;
        if let Some(p) = with
            .reseal_properties(&org, &props)
            .map_err(StoreError::Invalid)?
        {
            sqlx::query("UPDATE orgs SET properties = $1 WHERE name = $2")
                .bind(p.to_string())
                .bind(&org)
                .execute(&mut **tx)
                .await?;
            n += 1;
        }
    }
    Ok(n)
}
