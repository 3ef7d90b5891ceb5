//! Captured log lines: batched appends, filtered pages, pruning by age and by count.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::PgStore;
use crate::model::LogLine;
use crate::store::{LogFilter, LogStore, StoreResult};

fn line_from_row(r: &PgRow) -> StoreResult<LogLine> {
    let stream: String = r.try_get(6)?;
    Ok(LogLine {
        org: r.try_get(0)?,
        agent_id: r.try_get(1)?,
        deployment_id: r.try_get(2)?,
        session_id: r.try_get(3)?,
        instance_id: r.try_get(4)?,
        ts_ns: r.try_get(5)?,
        stream: match stream.as_str() {
            "stdout" => "stdout",
            "stderr" => "stderr",
            _ => "platform",
        },
        line: r.try_get(7)?,
    })
}

/// Appends the `WHERE` terms of a log query.
fn push_filter(q: &mut QueryBuilder<Postgres>, agent_id: Uuid, f: &LogFilter) {
    q.push(" WHERE agent_id = ").push_bind(agent_id);
    if let Some(d) = f.deployment_id {
        q.push(" AND deployment_id = ").push_bind(d);
    }
    if let Some(s) = f.session_id {
        q.push(" AND session_id = ").push_bind(s);
    }
    if let Some(text) = &f.query {
        q.push(" AND strpos(line, ")
            .push_bind(crate::store::codec::storable_text(text).into_owned())
            .push(") > 0");
    }
    if let Some(t) = f.start_ns {
        q.push(" AND ts_ns >= ").push_bind(t);
    }
    if let Some(t) = f.end_ns {
        q.push(" AND ts_ns <= ").push_bind(t);
    }
}

/// Appends `lines` in one statement whatever their number (one array per column, unnested in
/// order, so one prepared statement serves every batch size); with `prune_over`, in the same
/// statement, the delete of every line but the newest `prune_over` (as
/// [`LogStore::prune_logs_over`], counted from this batch's newest line; the delete cannot
/// see the batch's own lines, so it never removes them).
async fn insert(
    pool: &sqlx::PgPool,
    lines: &[LogLine],
    prune_over: Option<i64>,
) -> StoreResult<()> {
    const INSERT: &str = "INSERT INTO logs (org, agent_id, deployment_id, session_id, \
        instance_id, ts_ns, stream, line) \
        SELECT o, a, d, s, i, t, st, l FROM unnest($1::TEXT[], $2::UUID[], $3::UUID[], \
        $4::UUID[], $5::UUID[], $6::BIGINT[], $7::TEXT[], $8::TEXT[]) \
        WITH ORDINALITY AS u(o, a, d, s, i, t, st, l, n) ORDER BY n";
    let sql = match prune_over {
        None => std::borrow::Cow::Borrowed(INSERT),
        Some(_) => std::borrow::Cow::Owned(format!(
            "WITH i AS ({INSERT} RETURNING seq) \
             DELETE FROM logs WHERE seq <= (SELECT MAX(seq) FROM i) - $9"
        )),
    };
    let mut q = super::query_dyn(&sql)
        .bind(lines.iter().map(|l| l.org.as_str()).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.agent_id).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.deployment_id).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.session_id).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.instance_id).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.ts_ns).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.stream).collect::<Vec<_>>())
        .bind(
            lines
                .iter()
                .map(|l| crate::store::codec::storable_text(&l.line))
                .collect::<Vec<_>>(),
        );
    if let Some(max) = prune_over {
        q = q.bind(max);
    }
    q.execute(pool).await?;
    Ok(())
}

#[async_trait]
impl LogStore for PgStore {
    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        // One statement, atomic by itself.
        insert(&self.pool, lines, None).await
    }

    async fn append_logs_capped(&self, lines: &[LogLine], max_lines: u64) -> StoreResult<()> {
        let max = i64::try_from(max_lines).unwrap_or(i64::MAX);
        if !lines.is_empty() && max > 0 && (lines.len() as u64) < max_lines {
            // The batch and the prune in one statement (one round trip).
            return insert(&self.pool, lines, Some(max)).await;
        }
        self.append_logs(lines).await?;
        if max_lines > 0 {
            if let Err(e) = self.prune_logs_over(max_lines).await {
                tracing::warn!(error = %e, "could not prune log lines over the size cap");
            }
        }
        Ok(())
    }

    async fn query_logs(&self, agent_id: Uuid, f: &LogFilter) -> StoreResult<(i64, Vec<LogLine>)> {
        let mut count = QueryBuilder::<Postgres>::new("SELECT COUNT(*) FROM logs");
        push_filter(&mut count, agent_id, f);
        let total: i64 = count.build().fetch_one(&self.pool).await?.try_get(0)?;
        let order = if f.desc { "DESC" } else { "ASC" };
        let mut select = QueryBuilder::<Postgres>::new(
            "SELECT org, agent_id, deployment_id, session_id, instance_id, ts_ns, stream, line \
             FROM logs",
        );
        push_filter(&mut select, agent_id, f);
        select
            .push(format!(" ORDER BY ts_ns {order}, seq {order} LIMIT "))
            .push_bind(f.limit)
            .push(" OFFSET ")
            .push_bind(f.offset);
        let rows = select.build().fetch_all(&self.pool).await?;
        let lines = rows.iter().map(line_from_row).collect::<StoreResult<_>>()?;
        Ok((total, lines))
    }

    async fn prune_logs(&self, before_ns: i64) -> StoreResult<u64> {
        Ok(sqlx::query("DELETE FROM logs WHERE ts_ns < $1")
            .bind(before_ns)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn prune_logs_over(&self, max_lines: u64) -> StoreResult<u64> {
        let max_lines = i64::try_from(max_lines).unwrap_or(i64::MAX);
        Ok(sqlx::query(
            "DELETE FROM logs WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM logs) - $1",
        )
        .bind(max_lines)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
