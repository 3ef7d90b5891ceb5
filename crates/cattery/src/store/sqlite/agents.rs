//! Agents and their immutable deployments.

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Conn, Row, Val};
use super::SqliteStore;
use crate::model::{AgentRecord, DeploymentRecord, DeploymentSpec};
use crate::store::{AgentStore, StoreError, StoreResult};

const AGENT_COLS: &str = "id, org, name, region, min_agents, max_agents, desired_deployment_id, \
    created_ms, updated_ms, deleted_ms";
const DEP_COLS: &str = "id, agent_id, spec, created_ms";

fn agent_from_row(r: &Row<'_>) -> StoreResult<AgentRecord> {
    Ok(AgentRecord {
        id: r.uuid(0)?,
        org: r.string(1),
        name: r.string(2),
        region: r.string(3),
        min_agents: r.int(4).unwrap_or_default() as u32,
        max_agents: r.int(5).unwrap_or_default() as u32,
        desired_deployment_id: r.uuid(6)?,
        created_ms: r.int(7).unwrap_or_default(),
        updated_ms: r.int(8).unwrap_or_default(),
        deleted_ms: r.int(9),
    })
}

fn dep_from_row(r: &Row<'_>) -> StoreResult<DeploymentRecord> {
    let spec: DeploymentSpec = serde_json::from_str(&r.string(2))
        .map_err(|e| StoreError::Invalid(format!("bad deployment spec: {e}")))?;
    Ok(DeploymentRecord {
        id: r.uuid(0)?,
        agent_id: r.uuid(1)?,
        spec,
        created_ms: r.int(3).unwrap_or_default(),
    })
}

/// Inserts a deployment and, when it binds a secret set, snapshots the set's sealed values
/// into `deployment_secrets` in the same transaction (see the migration's comment).
fn insert_dep(db: &mut Conn, org: &str, dep: &DeploymentRecord) -> StoreResult<()> {
    let spec = serde_json::to_string(&dep.spec)
        .map_err(|e| StoreError::Invalid(format!("deployment spec: {e}")))?;
    db.exec(
        "INSERT INTO deployments (id, agent_id, spec, created_ms) VALUES (?, ?, ?, ?)",
        &[
            dep.id.into(),
            dep.agent_id.into(),
            Val::Text(&spec),
            dep.created_ms.into(),
        ],
    )?;
    if let Some(set) = &dep.spec.secret_set {
        let exists = db.query_int(
            "SELECT COUNT(*) FROM secret_sets WHERE org = ? AND name = ? AND kind = 'secret'",
            &[Val::Text(org), Val::Text(set)],
        )?;
        if exists == 0 {
            // Deleted while the deployment was being created.
            return Err(StoreError::Conflict);
        }
        db.exec(
            "INSERT INTO deployment_secrets (deployment_id, org, set_name, key, nonce, ciphertext) \
             SELECT ?, org, set_name, key, nonce, ciphertext FROM secrets \
             WHERE org = ? AND set_name = ?",
            &[dep.id.into(), Val::Text(org), Val::Text(set)],
        )?;
    }
    Ok(())
}

#[async_trait]
impl AgentStore for SqliteStore {
    async fn create_agent(
        &self,
        a: &AgentRecord,
        dep: &DeploymentRecord,
        limit: Option<u32>,
    ) -> StoreResult<()> {
        let (a, dep) = (a.clone(), dep.clone());
        self.write_tx(move |db| {
            // The one writer serializes the count with every other create.
            if let Some(limit) = limit {
                super::within_limit(
                    db,
                    "SELECT COUNT(*) FROM agents WHERE org = ? AND deleted_ms IS NULL",
                    &a.org,
                    limit,
                )?;
            }
            db.exec(
                "INSERT INTO agents (id, org, name, region, min_agents, max_agents, \
                 desired_deployment_id, created_ms, updated_ms, deleted_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                &[
                    a.id.into(),
                    Val::Text(&a.org),
                    Val::Text(&a.name),
                    Val::Text(&a.region),
                    i64::from(a.min_agents).into(),
                    i64::from(a.max_agents).into(),
                    a.desired_deployment_id.into(),
                    a.created_ms.into(),
                    a.updated_ms.into(),
                ],
            )?;
            insert_dep(db, &a.org, &dep)
        })
        .await
    }

    async fn update_agent(
        &self,
        a: &AgentRecord,
        dep: Option<&DeploymentRecord>,
    ) -> StoreResult<()> {
        let (a, dep) = (a.clone(), dep.cloned());
        self.write_tx(move |db| {
            let n = db.exec(
                "UPDATE agents SET min_agents = ?, max_agents = ?, desired_deployment_id = ?, \
                 updated_ms = ? WHERE id = ?",
                &[
                    i64::from(a.min_agents).into(),
                    i64::from(a.max_agents).into(),
                    a.desired_deployment_id.into(),
                    a.updated_ms.into(),
                    a.id.into(),
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            if let Some(dep) = &dep {
                insert_dep(db, &a.org, dep)?;
            }
            Ok(())
        })
        .await
    }

    async fn get_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>> {
        let sql = format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org = ? AND name = ? AND deleted_ms IS NULL"
        );
        self.read_now(|db| db.query_row(&sql, &[Val::Text(org), Val::Text(name)], agent_from_row))?
            .transpose()
    }

    async fn last_deleted_agent(&self, org: &str, name: &str) -> StoreResult<Option<AgentRecord>> {
        let sql = format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org = ? AND name = ? \
             AND deleted_ms IS NOT NULL ORDER BY deleted_ms DESC, created_ms DESC LIMIT 1"
        );
        self.read_now(|db| db.query_row(&sql, &[Val::Text(org), Val::Text(name)], agent_from_row))?
            .transpose()
    }

    async fn get_agent_by_id(&self, id: Uuid) -> StoreResult<Option<AgentRecord>> {
        let sql = format!("SELECT {AGENT_COLS} FROM agents WHERE id = ?");
        self.read_now(|db| db.query_row(&sql, &[id.into()], agent_from_row))?
            .transpose()
    }

    async fn list_agents(&self, org: &str) -> StoreResult<Vec<AgentRecord>> {
        let org = org.to_string();
        let sql = format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org = ? AND deleted_ms IS NULL \
             ORDER BY created_ms, name"
        );
        self.scan(move |db| db.query_all(&sql, &[Val::Text(&org)], agent_from_row))
            .await
    }

    async fn list_all_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let sql = format!("SELECT {AGENT_COLS} FROM agents WHERE deleted_ms IS NULL");
        self.scan(move |db| db.query_all(&sql, &[], agent_from_row))
            .await
    }

    async fn delete_agent(&self, id: Uuid, at_ms: i64) -> StoreResult<()> {
        self.write_tx(move |db| {
            let n = db.exec(
                "UPDATE agents SET deleted_ms = ?, updated_ms = ? WHERE id = ?",
                &[at_ms.into(), at_ms.into(), id.into()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn get_deployment(&self, id: Uuid) -> StoreResult<Option<DeploymentRecord>> {
        let sql = format!("SELECT {DEP_COLS} FROM deployments WHERE id = ?");
        self.read_now(|db| db.query_row(&sql, &[id.into()], dep_from_row))?
            .transpose()
    }

    async fn list_deployments(&self, agent_id: Uuid) -> StoreResult<Vec<DeploymentRecord>> {
        let sql = format!(
            "SELECT {DEP_COLS} FROM deployments WHERE agent_id = ? \
             ORDER BY created_ms DESC, rowid DESC"
        );
        self.scan(move |db| db.query_all(&sql, &[agent_id.into()], dep_from_row))
            .await
    }
}
