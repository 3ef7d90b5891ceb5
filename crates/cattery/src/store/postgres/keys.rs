//! Orgs and API keys.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::{Limited, PgStore};
use crate::model::{now_ms, ApiKeyRecord, KeyKind};
use crate::store::{KeyStore, OrgRecord, StoreError, StoreResult};

const KEY_COLS: &str =
    "id, org, kind, name, key_prefix, created_ms, revoked_ms, public_key, key_hash";

fn key_from_row(r: &PgRow) -> StoreResult<ApiKeyRecord> {
    let kind: String = r.try_get(2)?;
    Ok(ApiKeyRecord {
        id: r.try_get(0)?,
        org: r.try_get(1)?,
        kind: KeyKind::parse(&kind).ok_or_else(|| StoreError::Invalid("bad key kind".into()))?,
        name: r.try_get(3)?,
        prefix: r.try_get(4)?,
        created_ms: r.try_get(5)?,
        revoked_ms: r.try_get(6)?,
        public_key: r.try_get(7)?,
    })
}

#[async_trait]
impl KeyStore for PgStore {
    async fn ensure_org(&self, name: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO orgs (name, verbose_name, created_ms) VALUES ($1, $1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_orgs(&self) -> StoreResult<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM orgs ORDER BY created_ms, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(Into::into))
            .collect()
    }

    async fn get_org(&self, name: &str) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query(
            "SELECT name, verbose_name, properties, created_ms FROM orgs WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let props: String = r.try_get(2)?;
        Ok(Some(OrgRecord {
            name: r.try_get(0)?,
            verbose_name: r.try_get(1)?,
            properties: serde_json::from_str(&props)
                .ok()
                .filter(serde_json::Value::is_object)
                .unwrap_or_else(|| serde_json::json!({})),
            created_ms: r.try_get(3)?,
        }))
    }

    async fn set_org_properties(&self, name: &str, props: &serde_json::Value) -> StoreResult<()> {
        let n = sqlx::query("UPDATE orgs SET properties = $1 WHERE name = $2")
            .bind(props.to_string())
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn insert_key(
        &self,
        rec: &ApiKeyRecord,
        hash: &[u8],
        limit: Option<u32>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(limit) = limit {
            super::lock_org_creates(&mut tx, Limited::ApiKeys, &rec.org).await?;
            super::within_limit(&mut tx, Limited::ApiKeys, &rec.org, limit).await?;
        }
        let public = (rec.kind == KeyKind::Public)
            .then_some(rec.public_key.as_ref())
            .flatten();
        sqlx::query(
            "INSERT INTO api_keys (id, org, kind, name, key_hash, key_prefix, created_ms, \
             revoked_ms, public_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(rec.id)
        .bind(&rec.org)
        .bind(rec.kind.as_str())
        .bind(&rec.name)
        .bind(hash)
        .bind(&rec.prefix)
        .bind(rec.created_ms)
        .bind(rec.revoked_ms)
        .bind(public)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.keys.clear();
        Ok(())
    }

    async fn find_key(&self, hash: &[u8]) -> StoreResult<Option<(ApiKeyRecord, Vec<u8>)>> {
        if let Some(hit) = self.keys.get(hash) {
            return Ok(Some(hit));
        }
        let gen = self.keys.generation();
        let sql = format!("SELECT {KEY_COLS} FROM api_keys WHERE key_hash = $1");
        let row = super::query_dyn(&sql)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        let found: Option<(ApiKeyRecord, Vec<u8>)> = row
            .map(|r| Ok::<_, StoreError>((key_from_row(&r)?, r.try_get(8)?)))
            .transpose()?;
        if let Some((rec, stored)) = &found {
            self.keys.put(gen, hash, rec, stored);
        }
        Ok(found)
    }

    async fn list_keys(&self, org: &str, kind: Option<KeyKind>) -> StoreResult<Vec<ApiKeyRecord>> {
        let sql = format!(
            "SELECT {KEY_COLS} FROM api_keys WHERE org = $1 AND ($2::text IS NULL OR kind = $2) \
             ORDER BY created_ms, seq"
        );
        let rows = super::query_dyn(&sql)
            .bind(org)
            .bind(kind.map(|k| k.as_str()))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, org: &str, id: Uuid) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE api_keys SET revoked_ms = COALESCE(revoked_ms, $3) WHERE org = $1 AND id = $2",
        )
        .bind(org)
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.keys.clear();
        Ok(n > 0)
    }
}
