//! Builds.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{Limited, PgStore};
use crate::store::{BuildFilter, BuildRecord, BuildStatus, BuildStore, StoreError, StoreResult};

const COLS: &str = "id, org, status, region, context_hash, dockerfile_path, artifact, python, \
    builder, error_message, context_size, created_ms, started_ms, completed_ms, updated_ms, node_id";

/// A finished build's last use, else its completion (the retention counts from it).
const UNUSED_SINCE: &str = "COALESCE(last_used_ms, completed_ms, updated_ms)";

fn build_from_row(r: &PgRow) -> StoreResult<BuildRecord> {
    let status: String = r.try_get(2)?;
    Ok(BuildRecord {
        id: r.try_get(0)?,
        org: r.try_get(1)?,
        status: BuildStatus::parse(&status)
            .ok_or_else(|| StoreError::Invalid(format!("bad build status {status:?}")))?,
        region: r.try_get(3)?,
        context_hash: r.try_get(4)?,
        dockerfile_path: r.try_get(5)?,
        artifact: r.try_get(6)?,
        python: r.try_get(7)?,
        builder: r.try_get(8)?,
        error_message: r.try_get(9)?,
        context_size: r.try_get(10)?,
        created_ms: r.try_get(11)?,
        started_ms: r.try_get(12)?,
        completed_ms: r.try_get(13)?,
        updated_ms: r.try_get(14)?,
        node_id: r.try_get(15)?,
    })
}

fn push_filter(q: &mut QueryBuilder<Postgres>, org: &str, f: &BuildFilter) {
    q.push(" WHERE org = ").push_bind(org.to_string());
    if let Some(h) = &f.context_hash {
        q.push(" AND context_hash = ").push_bind(h.clone());
    }
    if let Some(r) = &f.region {
        q.push(" AND region = ").push_bind(r.clone());
    }
    if let Some(s) = f.status {
        q.push(" AND status = ").push_bind(s.as_str());
    }
    if let Some(d) = &f.dockerfile_path {
        q.push(" AND dockerfile_path = ").push_bind(d.clone());
    }
}

#[async_trait]
impl BuildStore for PgStore {
    async fn insert_build(&self, b: &BuildRecord, limit: Option<u32>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(limit) = limit {
            super::lock_org_creates(&mut tx, Limited::Builds, &b.org).await?;
            super::within_limit(&mut tx, Limited::Builds, &b.org, limit).await?;
        }
        super::query_dyn(&format!(
            "INSERT INTO builds ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             $12, $13, $14, $15, $16)"
        ))
        .bind(b.id)
        .bind(&b.org)
        .bind(b.status.as_str())
        .bind(&b.region)
        .bind(&b.context_hash)
        .bind(&b.dockerfile_path)
        .bind(&b.artifact)
        .bind(&b.python)
        .bind(&b.builder)
        .bind(
            b.error_message
                .as_deref()
                .map(crate::store::codec::storable_text),
        )
        .bind(b.context_size)
        .bind(b.created_ms)
        .bind(b.started_ms)
        .bind(b.completed_ms)
        .bind(b.updated_ms)
        .bind(&b.node_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_build(&self, b: &BuildRecord) -> StoreResult<()> {
        let r = sqlx::query(
            "UPDATE builds SET status = $1, artifact = $2, python = $3, builder = $4, \
             error_message = $5, started_ms = $6, completed_ms = $7, updated_ms = $8 \
             WHERE id = $9 AND org = $10",
        )
        .bind(b.status.as_str())
        .bind(&b.artifact)
        .bind(&b.python)
        .bind(&b.builder)
        .bind(
            b.error_message
                .as_deref()
                .map(crate::store::codec::storable_text),
        )
        .bind(b.started_ms)
        .bind(b.completed_ms)
        .bind(b.updated_ms)
        .bind(b.id)
        .bind(&b.org)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn get_build(&self, org: &str, id: Uuid) -> StoreResult<Option<BuildRecord>> {
        let row = super::query_dyn(&format!(
            "SELECT {COLS} FROM builds WHERE id = $1 AND org = $2"
        ))
        .bind(id)
        .bind(org)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    async fn list_builds(
        &self,
        org: &str,
        f: &BuildFilter,
    ) -> StoreResult<(Vec<BuildRecord>, u64)> {
        let mut count = QueryBuilder::<Postgres>::new("SELECT COUNT(*) FROM builds");
        push_filter(&mut count, org, f);
        let total: i64 = count.build().fetch_one(&self.pool).await?.try_get(0)?;
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {COLS} FROM builds"));
        push_filter(&mut q, org, f);
        q.push(" ORDER BY created_ms DESC, id LIMIT ")
            .push_bind(i64::from(f.limit))
            .push(" OFFSET ")
            .push_bind(i64::from(f.offset));
        let rows = q.build().fetch_all(&self.pool).await?;
        let list = rows
            .iter()
            .map(build_from_row)
            .collect::<StoreResult<_>>()?;
        Ok((list, total as u64))
    }

    async fn unfinished_builds(&self) -> StoreResult<Vec<BuildRecord>> {
        let rows = super::query_dyn(&format!(
            "SELECT {COLS} FROM builds WHERE status IN ('pending', 'building') \
             ORDER BY created_ms"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(build_from_row).collect()
    }

    async fn use_build(
        &self,
        org: &str,
        id: Uuid,
        now_ms: i64,
    ) -> StoreResult<Option<BuildRecord>> {
        let row = super::query_dyn(&format!(
            "UPDATE builds SET last_used_ms = $1 WHERE id = $2 AND org = $3 RETURNING {COLS}"
        ))
        .bind(now_ms)
        .bind(id)
        .bind(org)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    async fn unused_builds(&self, cutoff_ms: i64) -> StoreResult<Vec<BuildRecord>> {
        let rows = super::query_dyn(&format!(
            "SELECT {COLS} FROM builds WHERE status NOT IN ('pending', 'building') \
             AND {UNUSED_SINCE} <= $1 ORDER BY {UNUSED_SINCE}, id"
        ))
        .bind(cutoff_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(build_from_row).collect()
    }

    async fn delete_unused_build(&self, id: Uuid, cutoff_ms: i64) -> StoreResult<bool> {
        let r = super::query_dyn(&format!(
            "DELETE FROM builds WHERE id = $1 AND status NOT IN ('pending', 'building') \
             AND {UNUSED_SINCE} <= $2"
        ))
        .bind(id)
        .bind(cutoff_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }
}
