//! Builds.

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Row, Val};
use super::SqliteStore;
use crate::store::{BuildFilter, BuildRecord, BuildStatus, BuildStore, StoreError, StoreResult};

const COLS: &str = "id, org, status, region, context_hash, dockerfile_path, artifact, python, \
    builder, error_message, context_size, created_ms, started_ms, completed_ms, updated_ms, node_id";

/// A finished build's last use, else its completion (the retention counts from it).
const UNUSED_SINCE: &str = "COALESCE(last_used_ms, completed_ms, updated_ms)";

fn build_from_row(r: &Row<'_>) -> StoreResult<BuildRecord> {
    let status = r.string(2);
    Ok(BuildRecord {
        id: r.uuid(0)?,
        org: r.string(1),
        status: BuildStatus::parse(&status)
            .ok_or_else(|| StoreError::Invalid(format!("bad build status {status:?}")))?,
        region: r.string(3),
        context_hash: r.string(4),
        dockerfile_path: r.string(5),
        artifact: r.text(6),
        python: r.text(7),
        builder: r.text(8),
        error_message: r.text(9),
        context_size: r.int(10).unwrap_or_default(),
        created_ms: r.int(11).unwrap_or_default(),
        started_ms: r.int(12),
        completed_ms: r.int(13),
        updated_ms: r.int(14).unwrap_or_default(),
        node_id: r.string(15),
    })
}

/// `WHERE` clause and its parameters for `f` within `org`.
fn filter_sql(org: &str, f: &BuildFilter) -> (String, Vec<Val<'static>>) {
    let mut sql = String::from("org = ?");
    let mut params = vec![Val::Str(org.to_string())];
    if let Some(h) = &f.context_hash {
        sql.push_str(" AND context_hash = ?");
        params.push(Val::Str(h.clone()));
    }
    if let Some(r) = &f.region {
        sql.push_str(" AND region = ?");
        params.push(Val::Str(r.clone()));
    }
    if let Some(s) = f.status {
        sql.push_str(" AND status = ?");
        params.push(Val::Str(s.as_str().to_string()));
    }
    if let Some(d) = &f.dockerfile_path {
        sql.push_str(" AND dockerfile_path = ?");
        params.push(Val::Str(d.clone()));
    }
    (sql, params)
}

#[async_trait]
impl BuildStore for SqliteStore {
    async fn insert_build(&self, b: &BuildRecord, limit: Option<u32>) -> StoreResult<()> {
        let mut b = b.clone();
        b.error_message = b
            .error_message
            .map(|m| crate::store::codec::storable_text(&m).into_owned());
        self.write(move |db| {
            // The one writer serializes the count with every other insert (the count writes
            // nothing, so a refusal leaves nothing behind).
            if let Some(limit) = limit {
                super::within_limit(
                    db,
                    "SELECT COUNT(*) FROM builds WHERE org = ?",
                    &b.org,
                    limit,
                )?;
            }
            db.exec(
                &format!(
                    "INSERT INTO builds ({COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
                     ?, ?, ?)"
                ),
                &[
                    b.id.into(),
                    Val::Text(&b.org),
                    Val::Text(b.status.as_str()),
                    Val::Text(&b.region),
                    Val::Text(&b.context_hash),
                    Val::Text(&b.dockerfile_path),
                    b.artifact.as_ref().into(),
                    b.python.as_ref().into(),
                    b.builder.as_ref().into(),
                    b.error_message.as_ref().into(),
                    b.context_size.into(),
                    b.created_ms.into(),
                    b.started_ms.into(),
                    b.completed_ms.into(),
                    b.updated_ms.into(),
                    Val::Text(&b.node_id),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn update_build(&self, b: &BuildRecord) -> StoreResult<()> {
        let mut b = b.clone();
        b.error_message = b
            .error_message
            .map(|m| crate::store::codec::storable_text(&m).into_owned());
        self.write(move |db| {
            let n = db.exec(
                "UPDATE builds SET status = ?, artifact = ?, python = ?, builder = ?, \
                 error_message = ?, started_ms = ?, completed_ms = ?, updated_ms = ? \
                 WHERE id = ? AND org = ?",
                &[
                    Val::Text(b.status.as_str()),
                    b.artifact.as_ref().into(),
                    b.python.as_ref().into(),
                    b.builder.as_ref().into(),
                    b.error_message.as_ref().into(),
                    b.started_ms.into(),
                    b.completed_ms.into(),
                    b.updated_ms.into(),
                    b.id.into(),
                    Val::Text(&b.org),
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn get_build(&self, org: &str, id: Uuid) -> StoreResult<Option<BuildRecord>> {
        let org = org.to_string();
        self.read_now(move |db| {
            db.query_row(
                &format!("SELECT {COLS} FROM builds WHERE id = ? AND org = ?"),
                &[id.into(), Val::Text(&org)],
                build_from_row,
            )?
            .transpose()
        })
    }

    async fn list_builds(
        &self,
        org: &str,
        f: &BuildFilter,
    ) -> StoreResult<(Vec<BuildRecord>, u64)> {
        let (cond, mut params) = filter_sql(org, f);
        let (limit, offset) = (i64::from(f.limit), i64::from(f.offset));
        self.scan(move |db| {
            let total = db.query_int(
                &format!("SELECT COUNT(*) FROM builds WHERE {cond}"),
                &params,
            )?;
            params.push(Val::Int(limit));
            params.push(Val::Int(offset));
            let list = db.query_all(
                &format!(
                    "SELECT {COLS} FROM builds WHERE {cond} ORDER BY created_ms DESC, id \
                     LIMIT ? OFFSET ?"
                ),
                &params,
                build_from_row,
            )?;
            Ok((list, total as u64))
        })
        .await
    }

    async fn unfinished_builds(&self) -> StoreResult<Vec<BuildRecord>> {
        self.scan(|db| {
            db.query_all(
                &format!(
                    "SELECT {COLS} FROM builds WHERE status IN ('pending', 'building') \
                     ORDER BY created_ms"
                ),
                &[],
                build_from_row,
            )
        })
        .await
    }

    async fn use_build(
        &self,
        org: &str,
        id: Uuid,
        now_ms: i64,
    ) -> StoreResult<Option<BuildRecord>> {
        let org = org.to_string();
        self.write(move |db| {
            db.exec(
                "UPDATE builds SET last_used_ms = ? WHERE id = ? AND org = ?",
                &[now_ms.into(), id.into(), Val::Text(&org)],
            )?;
            db.query_row(
                &format!("SELECT {COLS} FROM builds WHERE id = ? AND org = ?"),
                &[id.into(), Val::Text(&org)],
                build_from_row,
            )?
            .transpose()
        })
        .await
    }

    async fn unused_builds(&self, cutoff_ms: i64) -> StoreResult<Vec<BuildRecord>> {
        self.scan(move |db| {
            db.query_all(
                &format!(
                    "SELECT {COLS} FROM builds WHERE status NOT IN ('pending', 'building') \
                     AND {UNUSED_SINCE} <= ? ORDER BY {UNUSED_SINCE}, id"
                ),
                &[cutoff_ms.into()],
                build_from_row,
            )
        })
        .await
    }

    async fn delete_unused_build(&self, id: Uuid, cutoff_ms: i64) -> StoreResult<bool> {
        self.write(move |db| {
            let n = db.exec(
                &format!(
                    "DELETE FROM builds WHERE id = ? AND status NOT IN ('pending', 'building') \
                     AND {UNUSED_SINCE} <= ?"
                ),
                &[id.into(), cutoff_ms.into()],
            )?;
            Ok(n > 0)
        })
        .await
    }
}
