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
    if let Some(i) = f.instance_id {
        q.push(" AND instance_id = ").push_bind(i);
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
/// order, so one prepared statement serves every batch size); the statement's trigger adds
/// them to their orgs' counts in `log_counts` (migration 0013). With `counts`, the statement
/// answers every org's count of lines with this batch's (what the log cap's prune decides on,
/// read without a second round trip); else nothing.
async fn insert(
    pool: &sqlx::PgPool,
    lines: &[LogLine],
    counts: bool,
) -> StoreResult<Vec<(String, i64)>> {
    const INSERT: &str = "INSERT INTO logs (org, agent_id, deployment_id, session_id, \
        instance_id, ts_ns, stream, line) \
        SELECT o, a, d, s, i, t, st, l FROM unnest($1::TEXT[], $2::UUID[], $3::UUID[], \
        $4::UUID[], $5::UUID[], $6::BIGINT[], $7::TEXT[], $8::TEXT[]) \
        WITH ORDINALITY AS u(o, a, d, s, i, t, st, l, n) ORDER BY n";
    let sql = if counts {
        // The statement's snapshot sees neither its lines nor its trigger's counts: the
        // stored counts plus the batch's.
        std::borrow::Cow::Owned(format!(
            "WITH i AS ({INSERT} RETURNING org), \
             b AS (SELECT org, COUNT(*) AS n FROM i GROUP BY org) \
             SELECT COALESCE(k.org, b.org), COALESCE(k.lines, 0) + COALESCE(b.n, 0) \
             FROM log_counts k FULL JOIN b ON b.org = k.org"
        ))
    } else {
        std::borrow::Cow::Borrowed(INSERT)
    };
    let rows = super::query_dyn(&sql)
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
        )
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// The advisory lock (one-key form is sqlx's migration lock; this is the two-key form) that
/// one node holds while it prunes for the log cap: "Cat" and a number, as the per-org limits'.
const PRUNE_LOCK: (i32, i32) = (0x4361_7410, 0);

/// The log cap's prune (docs/logs.md, "Retention") when `counts` (lines per org, as the
/// caller last read them) are over `max_lines`: deletes the oldest lines of the orgs holding
/// the most ([`crate::store::log_cap::cuts`]), one statement per org cut (its trigger takes
/// them off the org's count). Returns the lines deleted.
///
/// One node prunes at a time, across the cluster: under a transaction-scoped advisory lock,
/// the counts are read again and the cuts made on them, so two nodes that read the same counts
/// do not both cut the same excess. A node that finds the lock taken prunes nothing: the
/// holder works on fresher counts, and the next batch prunes what is left. The deletes run
/// outside the lock's transaction, each on its own, so a prune never holds one org's count
/// row while it waits for another's (an append's trigger updates every org of its batch in
/// one statement).
async fn prune_counted(
    pool: &sqlx::PgPool,
    counts: &[(String, i64)],
    max_lines: u64,
) -> StoreResult<u64> {
    if crate::store::log_cap::cuts(counts, max_lines).is_empty() {
        return Ok(0);
    }
    let mut lock = pool.begin().await?;
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, $2)")
        .bind(PRUNE_LOCK.0)
        .bind(PRUNE_LOCK.1)
        .fetch_one(&mut *lock)
        .await?;
    if !held {
        return Ok(0);
    }
    let counts: Vec<(String, i64)> = sqlx::query_as("SELECT org, lines FROM log_counts")
        .fetch_all(&mut *lock)
        .await?;
    let mut removed = 0;
    for (org, n) in crate::store::log_cap::cuts(&counts, max_lines) {
        removed += sqlx::query(
            "DELETE FROM logs WHERE seq IN \
             (SELECT seq FROM logs WHERE org = $1 ORDER BY seq LIMIT $2)",
        )
        .bind(&org)
        .bind(n)
        .execute(pool)
        .await?
        .rows_affected();
    }
    lock.commit().await?;
    Ok(removed)
}

#[async_trait]
impl LogStore for PgStore {
    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        // One statement, atomic by itself.
        insert(&self.pool, lines, false).await.map(drop)
    }

    /// The batch and the counts in one statement; a second only when over the cap.
    async fn append_logs_capped(&self, lines: &[LogLine], max_lines: u64) -> StoreResult<()> {
        if lines.is_empty() || max_lines == 0 {
            self.append_logs(lines).await?;
            if max_lines > 0 {
                if let Err(e) = self.prune_logs_over(max_lines).await {
                    tracing::warn!(error = %e, "could not prune log lines over the size cap");
                }
            }
            return Ok(());
        }
        let counts = insert(&self.pool, lines, true).await?;
        if let Err(e) = prune_counted(&self.pool, &counts, max_lines).await {
            tracing::warn!(error = %e, "could not prune log lines over the size cap");
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
        if max_lines == 0 {
            return Ok(0);
        }
        let counts: Vec<(String, i64)> = sqlx::query_as("SELECT org, lines FROM log_counts")
            .fetch_all(&self.pool)
            .await?;
        prune_counted(&self.pool, &counts, max_lines).await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::conformance::{line, with_agent};
    use crate::store::postgres::tests::test_database_url;
    use crate::store::postgres::PgStore;
    use crate::store::LogStore;

    /// Two nodes that read the same counts, over the cap, and prune one after the other (or at
    /// once): the excess is cut once, not once per node. Before the prune lock and its fresh
    /// read, the second node cut the same 20 lines again and left 10 of a cap of 30.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_pruning_on_the_same_counts_cut_the_excess_once() {
        let Some(url) = test_database_url() else {
            return;
        };
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let a = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
        let b = PgStore::open(&url, 4, Some(&schema)).await.unwrap();
        let agent = with_agent(&a, "loud", "l").await;
        let lines: Vec<_> = (0..50).map(|i| line(&agent, i, &format!("l{i}"))).collect();
        a.append_logs(&lines).await.unwrap();
        let counts: Vec<(String, i64)> = sqlx::query_as("SELECT org, lines FROM log_counts")
            .fetch_all(&a.pool)
            .await
            .unwrap();
        assert_eq!(counts, [("loud".to_string(), 50)]);
        let first = super::prune_counted(&a.pool, &counts, 30).await.unwrap();
        let second = super::prune_counted(&b.pool, &counts, 30).await.unwrap();
        assert_eq!((first, second), (20, 0));
        // At once, on counts both read before either cut: still the excess, once.
        a.append_logs(&lines).await.unwrap();
        let counts: Vec<(String, i64)> = sqlx::query_as("SELECT org, lines FROM log_counts")
            .fetch_all(&a.pool)
            .await
            .unwrap();
        let (x, y) = tokio::join!(
            super::prune_counted(&a.pool, &counts, 30),
            super::prune_counted(&b.pool, &counts, 30)
        );
        assert_eq!(x.unwrap() + y.unwrap(), 50);
        let (n, _) = a
            .query_logs(
                agent.id,
                &crate::store::LogFilter {
                    limit: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(n, 30);
    }
}
