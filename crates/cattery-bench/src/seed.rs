//! Seeding ended sessions into a stopped server's store, so API latency can be measured at
//! 1,000 and 100,000 stored sessions without running that many sessions. Writes go through
//! the server's own store (`cattery::store`), never raw SQL.

use std::path::Path;

use anyhow::Context;
use cattery::model::{EndReason, SessionEnd, SessionRecord};
use cattery::store::prelude::*;
use cattery::store::sqlite::SqliteStore;
use cattery::store::SessionFilter;
use futures_util::future::try_join_all;
use uuid::Uuid;

/// Sessions written at once (the store group-commits them).
const IN_FLIGHT: usize = 256;
/// Session ids returned for the lookups.
const IDS: i64 = 2000;

/// Adds ended sessions for `agent_id` until it has `upto` rows; returns `(rows now, up to
/// 2,000 session ids of the agent from pages at random offsets)`. `db` is the server's
/// `cattery.db`; the server must be stopped.
pub async fn seed_sessions(
    db: &Path,
    org: &str,
    agent_id: &str,
    deployment_id: &str,
    upto: u64,
) -> anyhow::Result<(u64, Vec<String>)> {
    let dir = db.parent().context("data dir of the database")?;
    let store = SqliteStore::open(dir)
        .await
        .with_context(|| format!("opening the store in {}", dir.display()))?;
    let agent = Uuid::parse_str(agent_id).context("agent id")?;
    let deployment = Uuid::parse_str(deployment_id).context("deployment id")?;
    let count = |store: SqliteStore| async move {
        let f = SessionFilter {
            limit: 0,
            ..Default::default()
        };
        store
            .list_sessions(agent, &f)
            .await
            .map(|(n, _)| n.max(0) as u64)
    };
    let have = count(store.clone()).await?;
    if upto > have {
        let now = chrono::Utc::now().timestamp_millis();
        let n = (upto - have) as i64;
        let mut i = 0i64;
        while i < n {
            let batch = (i..n.min(i + IN_FLIGHT as i64)).map(|i| {
                // Spread over the past, 37 ms apart, older than anything live.
                let created = now - 86_400_000 - (n - i) * 37;
                let rec = SessionRecord {
                    id: Uuid::new_v4(),
                    org: org.to_string(),
                    agent_id: agent,
                    deployment_id: deployment,
                    created_ms: created,
                    updated_ms: created,
                    bot_start_ms: Some(4),
                    cold_start: Some(i % 10 == 0),
                    transport: None,
                    end: None,
                    samples: Vec::new(),
                    node_id: String::new(),
                    daily_room: None,
                };
                let end = SessionEnd {
                    ended_ms: created + 60_000,
                    reason: EndReason::Completed,
                    completion_status: "HTTP_COMPLETED".into(),
                    exit_code: Some(0),
                    exit_signal: None,
                    message: None,
                };
                let store = store.clone();
                async move {
                    store.insert_session(&rec).await?;
                    store.end_session(rec.id, &end).await
                }
            });
            try_join_all(batch).await?;
            i += IN_FLIGHT as i64;
        }
    }
    let total = count(store.clone()).await?;
    let mut ids = Vec::new();
    let pages = 20;
    let per = IDS / pages;
    for _ in 0..pages {
        let max = (total as i64 - per).max(0);
        let offset = if max > 0 {
            rand::random_range(0..=max)
        } else {
            0
        };
        let f = SessionFilter {
            limit: per,
            offset,
            ..Default::default()
        };
        let (_, page) = store.list_sessions(agent, &f).await?;
        ids.extend(page.into_iter().map(|s| s.id.to_string()));
    }
    ids.sort();
    ids.dedup();
    Ok((total, ids))
}
