//! Captured log lines: batched appends, filtered pages, pruning by age and by count.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::PgStore;
use crate::model::LogLine;
use crate::store::{LogFilter, LogStore, StoreResult};

/// Log lines per multi-row `INSERT` (8 bound values each, far below PostgreSQL's 65,535).
const LOG_ROWS_PER_INSERT: usize = 512;

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
fn push_filter(q: &mut QueryBuilder<'_, Postgres>, agent_id: Uuid, f: &LogFilter) {
    q.push(" WHERE agent_id = ").push_bind(agent_id);
    if let Some(d) = f.deployment_id {
        q.push(" AND deployment_id = ").push_bind(d);
    }
    if let Some(s) = f.session_id {
        q.push(" AND session_id = ").push_bind(s);
    }
    if let Some(text) = &f.query {
        q.push(" AND strpos(line, ")
            .push_bind(text.clone())
            .push(") > 0");
    }
    if let Some(t) = f.start_ns {
        q.push(" AND ts_ns >= ").push_bind(t);
    }
    if let Some(t) = f.end_ns {
        q.push(" AND ts_ns <= ").push_bind(t);
    }
}

/// `lines` in chunks of [`LOG_ROWS_PER_INSERT`], 256, 128, ... 1 rows: at most ten statement
/// shapes for each connection to keep prepared, instead of one per batch size.
fn chunks(lines: &[LogLine]) -> Vec<&[LogLine]> {
    let mut out = Vec::new();
    let mut rest = lines;
    while !rest.is_empty() {
        let n = if rest.len() >= LOG_ROWS_PER_INSERT {
            LOG_ROWS_PER_INSERT
        } else {
            1 << rest.len().ilog2()
        };
        let (chunk, tail) = rest.split_at(n);
        out.push(chunk);
        rest = tail;
    }
    out
}

/// A multi-row `INSERT` of `chunk`; with `prune_over`, in the same statement, the delete of
/// every line but the newest `prune_over` (as [`LogStore::prune_logs_over`], counted from
/// this chunk's newest line).
fn insert(chunk: &[LogLine], prune_over: Option<i64>) -> QueryBuilder<'_, Postgres> {
    let mut q = QueryBuilder::<Postgres>::new(if prune_over.is_some() {
        "WITH i AS (INSERT INTO logs (org, agent_id, deployment_id, session_id, instance_id, \
         ts_ns, stream, line) "
    } else {
        "INSERT INTO logs (org, agent_id, deployment_id, session_id, instance_id, ts_ns, \
         stream, line) "
    });
    q.push_values(chunk, |mut b, l| {
        b.push_bind(&l.org)
            .push_bind(l.agent_id)
            .push_bind(l.deployment_id)
            .push_bind(l.session_id)
            .push_bind(l.instance_id)
            .push_bind(l.ts_ns)
            .push_bind(l.stream)
            .push_bind(&l.line);
    });
    if let Some(max) = prune_over {
        q.push(" RETURNING seq) DELETE FROM logs WHERE seq <= (SELECT MAX(seq) FROM i) - ")
            .push_bind(max);
    }
    q
}

#[async_trait]
impl LogStore for PgStore {
    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let chunks = chunks(lines);
        if let [one] = chunks[..] {
            // One statement is atomic by itself: no transaction (two round trips fewer).
            return Ok(insert(one, None)
                .build()
                .execute(&self.pool)
                .await
                .map(drop)?);
        }
        let mut tx = self.pool.begin().await?;
        for chunk in chunks {
            insert(chunk, None).build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn append_logs_capped(&self, lines: &[LogLine], max_lines: u64) -> StoreResult<()> {
        let max = i64::try_from(max_lines).unwrap_or(i64::MAX);
        let chunks = chunks(lines);
        match chunks[..] {
            // The batch and the prune in one statement: the prune keeps the newest `max`
            // lines counting this batch's (it cannot see them, so it never removes them:
            // a batch is never larger than the cap here).
            [one] if max > 0 && (one.len() as u64) < max_lines => Ok(insert(one, Some(max))
                .build()
                .execute(&self.pool)
                .await
                .map(drop)?),
            _ => {
                self.append_logs(lines).await?;
                if max_lines > 0 {
                    if let Err(e) = self.prune_logs_over(max_lines).await {
                        tracing::warn!(error = %e, "could not prune log lines over the size cap");
                    }
                }
                Ok(())
            }
        }
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
