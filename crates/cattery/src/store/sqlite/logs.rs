//! Captured log lines: group-committed appends, filtered pages, pruning by age and by count.

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Row, Val};
use super::SqliteStore;
use crate::model::LogLine;
use crate::store::{LogFilter, LogStore, StoreResult};

/// Log lines per multi-row `INSERT` (8 bound values each, far below SQLite's 32,766 limit).
const LOG_ROWS_PER_INSERT: usize = 128;

fn line_from_row(r: &Row<'_>) -> StoreResult<LogLine> {
    Ok(LogLine {
        org: r.string(0),
        agent_id: r.uuid(1)?,
        deployment_id: r.opt_uuid(2)?,
        session_id: r.opt_uuid(3)?,
        instance_id: r.opt_uuid(4)?,
        ts_ns: r.int(5).unwrap_or_default(),
        stream: match r.string(6).as_str() {
            "stdout" => "stdout",
            "stderr" => "stderr",
            _ => "platform",
        },
        line: r.string(7),
    })
}

/// The SQL of one multi-row insert of `n` lines.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO logs (org, agent_id, deployment_id, session_id, instance_id, ts_ns, stream, \
         line) VALUES ",
    );
    for i in 0..n {
        sql.push_str(if i == 0 {
            "(?, ?, ?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?, ?, ?)"
        });
    }
    sql
}

/// Keeps the newest `?` lines: `seq` grows by arrival, so they are those with
/// `seq > max(seq) - ?`: one index lookup and one range delete on the primary key.
const PRUNE_OVER: &str =
    "DELETE FROM logs WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM logs) - ?";

/// Inserts `lines`: one multi-row `INSERT` per chunk of 128, 64, 32... rows (at most eight
/// statement shapes to keep prepared, instead of one per batch size). Not atomic by itself.
fn insert_lines(db: &mut super::conn::Conn, lines: &[LogLine]) -> StoreResult<()> {
    let mut rest = lines;
    while !rest.is_empty() {
        let n = if rest.len() >= LOG_ROWS_PER_INSERT {
            LOG_ROWS_PER_INSERT
        } else {
            1 << rest.len().ilog2()
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let texts: Vec<_> = chunk
            .iter()
            .map(|l| crate::store::codec::storable_text(&l.line))
            .collect();
        let mut params = Vec::with_capacity(chunk.len() * 8);
        for (l, text) in chunk.iter().zip(&texts) {
            params.push(Val::Text(&l.org));
            params.push(l.agent_id.into());
            params.push(l.deployment_id.into());
            params.push(l.session_id.into());
            params.push(l.instance_id.into());
            params.push(l.ts_ns.into());
            params.push(Val::Text(l.stream));
            params.push(Val::Text(text));
        }
        db.exec(&insert_sql(chunk.len()), &params)?;
    }
    Ok(())
}

#[async_trait]
impl LogStore for SqliteStore {
    async fn append_logs(&self, lines: &[LogLine]) -> StoreResult<()> {
        self.append_logs_capped(lines, 0).await
    }

    /// One group-committed write: the lines (atomically), then the size cap's prune in the
    /// same transaction (not a transaction of its own on a blocking thread, as
    /// [`LogStore::prune_logs_over`] is). A failed prune is logged and left to the next batch.
    async fn append_logs_capped(&self, lines: &[LogLine], max_lines: u64) -> StoreResult<()> {
        if lines.is_empty() {
            if max_lines > 0 {
                if let Err(e) = self.prune_logs_over(max_lines).await {
                    tracing::warn!(error = %e, "could not prune log lines over the size cap");
                }
            }
            return Ok(());
        }
        let lines = lines.to_vec();
        let max_lines = i64::try_from(max_lines).unwrap_or(i64::MAX);
        self.write(move |db| {
            // One savepoint: the lines all or none, and alone (outside a group) one commit.
            db.atomic(|db| {
                insert_lines(db, &lines)?;
                if max_lines > 0 {
                    // A failed statement undoes only itself; a fault that rolls the whole
                    // transaction back fails the savepoint's release, and so the lines.
                    if let Err(e) = db.exec(PRUNE_OVER, &[max_lines.into()]) {
                        tracing::warn!(error = %e, "could not prune log lines over the size cap");
                    }
                }
                Ok(())
            })
        })
        .await
    }

    async fn query_logs(&self, agent_id: Uuid, f: &LogFilter) -> StoreResult<(i64, Vec<LogLine>)> {
        let filter = "agent_id = ?1 AND (?2 IS NULL OR deployment_id = ?2) \
            AND (?3 IS NULL OR session_id = ?3) AND (?4 IS NULL OR instr(line, ?4) > 0) \
            AND (?5 IS NULL OR ts_ns >= ?5) AND (?6 IS NULL OR ts_ns <= ?6)";
        let count_sql = format!("SELECT COUNT(*) FROM logs WHERE {filter}");
        let order = if f.desc { "DESC" } else { "ASC" };
        let select_sql = format!(
            "SELECT org, agent_id, deployment_id, session_id, instance_id, ts_ns, stream, line \
             FROM logs WHERE {filter} ORDER BY ts_ns {order}, seq {order} LIMIT ?7 OFFSET ?8"
        );
        let f = f.clone();
        self.scan(move |db| {
            let query = f.query.as_deref().map(crate::store::codec::storable_text);
            let mut params: Vec<Val<'_>> = vec![
                agent_id.into(),
                f.deployment_id.into(),
                f.session_id.into(),
                query.as_deref().into(),
                f.start_ns.into(),
                f.end_ns.into(),
            ];
            let total = db.query_int(&count_sql, &params)?;
            params.push(f.limit.into());
            params.push(f.offset.into());
            let lines = db.query_all(&select_sql, &params, line_from_row)?;
            Ok((total, lines))
        })
        .await
    }

    async fn prune_logs(&self, before_ns: i64) -> StoreResult<u64> {
        self.write_tx(move |db| db.exec("DELETE FROM logs WHERE ts_ns < ?", &[before_ns.into()]))
            .await
    }

    async fn prune_logs_over(&self, max_lines: u64) -> StoreResult<u64> {
        // `seq` grows by arrival, so the newest `max_lines` rows are those with
        // seq > max(seq) - max_lines: one index lookup and one range delete on the primary key.
        let max_lines = i64::try_from(max_lines).unwrap_or(i64::MAX);
        self.write_tx(move |db| db.exec(PRUNE_OVER, &[max_lines.into()]))
            .await
    }
}
