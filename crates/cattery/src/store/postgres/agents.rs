//! Agents and their immutable deployments.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{json_of, Limited, PgStore};
use crate::model::{AgentRecord, DeploymentRecord};
use crate::store::{AgentStore, StoreError, StoreResult};

const AGENT_COLS: &str = "id, org, name, region, min_agents, max_agents, desired_deployment_id, \
    created_ms, updated_ms, deleted_ms";
const DEP_COLS: &str = "id, agent_id, spec, created_ms";

fn agent_from_row(r: &PgRow) -> StoreResult<AgentRecord> {
    Ok(AgentRecord {
        id: r.try_get(0)?,
        org: r.try_get(1)?,
        name: r.try_get(2)?,
        region: r.try_get(3)?,
        min_agents: u32::try_from(r.try_get::<i64, _>(4)?).unwrap_or_default(),
        max_agents: u32::try_from(r.try_get::<i64, _>(5)?).unwrap_or_default(),
        desired_deployment_id: r.try_get(6)?,
        created_ms: r.try_get(7)?,
        updated_ms: r.try_get(8)?,
        deleted_ms: r.try_get(9)?,
    })
}

fn dep_from_row(r: &PgRow) -> StoreResult<DeploymentRecord> {
    let spec: String = r.try_get(2)?;
    Ok(DeploymentRecord {
        id: r.try_get(0)?,
        agent_id: r.try_get(1)?,
        spec: json_of(&spec, "deployment spec")?,
        created_ms: r.try_get(3)?,
    })
}

/// Inserts a deployment and snapshots its bound secret set's sealed values (the set's row is
/// read `FOR SHARE`, so a concurrent delete waits for this transaction or makes it fail).
async fn insert_dep(db: &mut PgConnection, org: &str, dep: &DeploymentRecord) -> StoreResult<()> {
    let spec = serde_json::to_string(&dep.spec)
        .map_err(|e| StoreError::Invalid(format!("deployment spec: {e}")))?;
    sqlx::query("INSERT INTO deployments (id, agent_id, spec, created_ms) VALUES ($1, $2, $3, $4)")
        .bind(dep.id)
        .bind(dep.agent_id)
        .bind(&spec)
        .bind(dep.created_ms)
        .execute(&mut *db)
        .await?;
    if let Some(set) = &dep.spec.secret_set {
        let exists = sqlx::query(
            "SELECT 1 FROM secret_sets WHERE org = $1 AND name = $2 AND kind = 'secret' FOR SHARE",
        )
        .bind(org)
        .bind(set)
        .fetch_optional(&mut *db)
        .await?;
        if exists.is_none() {
            return Err(StoreError::Conflict);
        }
        sqlx::query(
            "INSERT INTO deployment_secrets (deployment_id, org, set_name, key, nonce, ciphertext) \
             SELECT $1, org, set_name, key, nonce, ciphertext FROM secrets \
             WHERE org = $2 AND set_name = $3",
        )
        .bind(dep.id)
        .bind(org)
        .bind(set)
        .execute(&mut *db)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl AgentStore for PgStore {
    async fn create_agent(
        &self,
        a: &AgentRecord,
        dep: &DeploymentRecord,
        limit: Option<u32>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(limit) = limit {
            super::lock_org_creates(&mut tx, Limited::Agents, &a.org).await?;
            super::within_limit(&mut tx, Limited::Agents, &a.org, limit).await?;
        }
        sqlx::query(
            "INSERT INTO agents (id, org, name, region, min_agents, max_agents, \
             desired_deployment_id, created_ms, updated_ms, deleted_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL)",
        )
        .bind(a.id)
        .bind(&a.org)
        .bind(&a.name)
        .bind(&a.region)
        .bind(i64::from(a.min_agents))
        .bind(i64::from(a.max_agents))
        .bind(a.desired_deployment_id)
        .bind(a.created_ms)
        .bind(a.updated_ms)
        .execute(&mut *tx)
        .await?;
        insert_dep(&mut tx, &a.org, dep).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_agent(
        &self,
        a: &AgentRecord,
        dep: Option<&DeploymentRecord>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE agents SET min_agents = $1, max_agents = $2, desired_deployment_id = $3, \
             updated_ms = $4 WHERE id = $5",
        )
        .bind(i64::from(a.min_agents))
        .bind(i64::from(a.max_agents))
        .bind(a.desired_deployment_id)
        .bind(a.updated_ms)
        .bind(a.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        if let Some(dep) = dep {
            insert_dep(&mut tx, &a.org, dep).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>> {
        let sql = format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org = $1 AND name = $2 AND deleted_ms IS NULL"
        );
        let row = super::query_dyn(&sql)
            .bind(org)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn last_deleted_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>> {
        let sql = format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org = $1 AND name = $2 \
             AND deleted_ms IS NOT NULL ORDER BY deleted_ms DESC, created_ms DESC LIMIT 1"
        );
        let row = super::query_dyn(&sql)
            .bind(org)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn get_agent_by_id(&self, id: Uuid) -> StoreResult<Option<AgentRecord>> {
        let sql = format!("SELECT {AGENT_COLS} FROM agents WHERE id = $1");
        let row = super::query_dyn(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(&self, org: &str) -> StoreResult<Vec<AgentRecord>> {
        let sql = format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org = $1 AND deleted_ms IS NULL \
             ORDER BY created_ms, name"
        );
        let rows = super::query_dyn(&sql)
            .bind(org)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn list_all_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let sql = format!("SELECT {AGENT_COLS} FROM agents WHERE deleted_ms IS NULL");
        let rows = super::query_dyn(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn delete_agent(&self, id: Uuid, at_ms: i64) -> StoreResult<()> {
        let n = sqlx::query("UPDATE agents SET deleted_ms = $1, updated_ms = $1 WHERE id = $2")
            .bind(at_ms)
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn get_deployment(&self, id: Uuid) -> StoreResult<Option<DeploymentRecord>> {
        let sql = format!("SELECT {DEP_COLS} FROM deployments WHERE id = $1");
        let row = super::query_dyn(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dep_from_row).transpose()
    }

    async fn list_deployments(&self, agent_id: Uuid) -> StoreResult<Vec<DeploymentRecord>> {
        let sql = format!(
            "SELECT {DEP_COLS} FROM deployments WHERE agent_id = $1 \
             ORDER BY created_ms DESC, seq DESC"
        );
        let rows = super::query_dyn(&sql)
            .bind(agent_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(dep_from_row).collect()
    }
}
