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

/// Adds `n` lines to `org`'s count.
const COUNT_ADD: &str = "INSERT INTO log_counts (org, lines) VALUES (?1, ?2) \
    ON CONFLICT (org) DO UPDATE SET lines = lines + excluded.lines";

/// Deletes `org`'s `?2` oldest lines (by arrival, on the `(org, seq)` index).
const DELETE_OLDEST: &str = "DELETE FROM logs WHERE seq IN \
    (SELECT seq FROM logs WHERE org = ?1 ORDER BY seq LIMIT ?2)";

/// Adds each org's lines in `lines` to its count in `log_counts`.
fn count_added(db: &mut super::conn::Conn, lines: &[LogLine]) -> StoreResult<()> {
    let mut per_org: Vec<(&str, i64)> = Vec::new();
    for l in lines {
        match per_org.iter_mut().find(|(o, _)| *o == l.org) {
            Some((_, n)) => *n += 1,
            None => per_org.push((&l.org, 1)),
        }
    }
    for (org, n) in per_org {
        db.exec(COUNT_ADD, &[Val::Text(org), n.into()])?;
    }
    Ok(())
}

/// The log cap's prune (docs/logs.md, "Retention"): if the lines of all orgs together are
/// more than `max_lines`, deletes the oldest lines of the orgs holding the most
/// ([`crate::store::log_cap::cuts`]), keeping their counts. Returns the lines deleted.
fn prune_over(db: &mut super::conn::Conn, max_lines: u64) -> StoreResult<u64> {
    if max_lines == 0 {
        return Ok(0);
    }
    let counts = db.query_all("SELECT org, lines FROM log_counts", &[], |r| {
        Ok((r.string(0), r.int(1).unwrap_or_default()))
    })?;
    let mut removed = 0;
    for (org, n) in crate::store::log_cap::cuts(&counts, max_lines) {
        let gone = db.exec(DELETE_OLDEST, &[Val::Text(&org), n.into()])?;
        let gone_i = i64::try_from(gone).unwrap_or(i64::MAX);
        db.exec(COUNT_ADD, &[Val::Text(&org), (-gone_i).into()])?;
        removed += gone;
    }
    Ok(removed)
}

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
        self.write(move |db| {
            // One savepoint: the lines all or none, and alone (outside a group) one commit.
            db.atomic(|db| {
                insert_lines(db, &lines)?;
                count_added(db, &lines)?;
                // A failed prune is undone alone; a fault that rolls the whole transaction
                // back fails the savepoint's release, and so the lines.
                let pruned = db.atomic(|db| prune_over(db, max_lines));
                if let Err(e) = pruned {
                    tracing::warn!(error = %e, "could not prune log lines over the size cap");
                }
                Ok(())
            })
        })
        .await
    }

    async fn query_logs(&self, agent_id: Uuid, f: &LogFilter) -> StoreResult<(i64, Vec<LogLine>)> {
        let filter = "agent_id = ?1 AND (?2 IS NULL OR deployment_id = ?2) \
            AND (?3 IS NULL OR session_id = ?3) AND (?4 IS NULL OR instr(line, ?4) > 0) \
            AND (?5 IS NULL OR ts_ns >= ?5) AND (?6 IS NULL OR ts_ns <= ?6) \
            AND (?7 IS NULL OR instance_id = ?7)";
        let count_sql = format!("SELECT COUNT(*) FROM logs WHERE {filter}");
        let order = if f.desc { "DESC" } else { "ASC" };
        let select_sql = format!(
            "SELECT org, agent_id, deployment_id, session_id, instance_id, ts_ns, stream, line \
             FROM logs WHERE {filter} ORDER BY ts_ns {order}, seq {order} LIMIT ?8 OFFSET ?9"
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
                f.instance_id.into(),
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
        // The deleted lines' orgs, counted as they are deleted, keep `log_counts` exact.
        self.write_tx(move |db| {
            let mut per_org: std::collections::HashMap<String, i64> = Default::default();
            let removed = db.for_each(
                "DELETE FROM logs WHERE ts_ns < ? RETURNING org",
                &[before_ns.into()],
                |r| *per_org.entry(r.string(0)).or_default() += 1,
            )?;
            for (org, n) in per_org {
                db.exec(COUNT_ADD, &[Val::Text(&org), (-n).into()])?;
            }
            db.exec("DELETE FROM log_counts WHERE lines <= 0", &[])?;
            Ok(removed)
        })
        .await
    }

    async fn prune_logs_over(&self, max_lines: u64) -> StoreResult<u64> {
        self.write_tx(move |db| prune_over(db, max_lines)).await
    }
}
