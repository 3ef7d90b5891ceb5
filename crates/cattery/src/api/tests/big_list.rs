//! The dashboard's list stays paged with 10,000 sessions of one agent (issue 15: "fast with
//! 10,000 sessions in the list (paged)"): the first, a middle and the last page answer 50 rows
//! and the total, each well within a bound. The rows are written straight into the SQLite file
//! in one transaction (writing 10,000 through the engine would time the engine, not the list).

use std::time::{Duration, Instant};

use serde_json::json;

use super::api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sessions_list_in_pages() {
    const N: i64 = 10_000;
    let a = api().await;
    a.deploy("big", &[], json!({})).await;
    let db = a._dir.path().join(crate::store::sqlite::DB_FILE);
    {
        let mut c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        let (agent, dep): (String, String) = c
            .query_row(
                "SELECT id, desired_deployment_id FROM agents WHERE name = 'big'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let tx = c.transaction().unwrap();
        {
            let mut ins = tx
                .prepare(
                    "INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms, \
                     ended_ms, bot_start_ms, cold_start, completion_status, end_reason, transport) \
                     VALUES (?, 'default', ?, ?, ?, ?, ?, 12, 0, 'HTTP_COMPLETED', ?, NULL)",
                )
                .unwrap();
            for i in 0..N {
                let at = 1_700_000_000_000 + i * 1000;
                let reason = if i % 10 == 0 { "stopped" } else { "completed" };
                ins.execute(rusqlite::params![
                    uuid::Uuid::new_v4().to_string(),
                    agent,
                    dep,
                    at,
                    at + 500,
                    at + 500,
                    reason
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let bound = Duration::from_secs(3);
    for (offset, rows) in [(0, 50), (5_000, 50), (N - 50, 50), (N - 10, 10)] {
        let t0 = Instant::now();
        let r = a
            .get(&format!("/v1/agents/big/sessions?limit=50&offset={offset}"))
            .await;
        let took = t0.elapsed();
        assert_eq!(r.body["total_count"], N, "{}", r.body);
        assert_eq!(r.body["sessions"].as_array().unwrap().len(), rows);
        eprintln!("10,000 sessions: the page at offset {offset} in {took:?}");
        assert!(took < bound, "the page at offset {offset} took {took:?}");
    }
    // Newest first across pages; a filter pages the same way.
    let first = a.get("/v1/agents/big/sessions?limit=1").await;
    let last = a
        .get(&format!("/v1/agents/big/sessions?limit=1&offset={}", N - 1))
        .await;
    assert!(
        first.body["sessions"][0]["createdAt"].as_str()
            > last.body["sessions"][0]["createdAt"].as_str()
    );
    let t0 = Instant::now();
    let r = a
        .get("/v1/agents/big/sessions?limit=50&offset=950&endReason=stopped")
        .await;
    assert_eq!(r.body["total_count"], N / 10, "{}", r.body);
    assert_eq!(r.body["sessions"].as_array().unwrap().len(), 50);
    assert!(
        t0.elapsed() < bound,
        "filtered page took {:?}",
        t0.elapsed()
    );
}
