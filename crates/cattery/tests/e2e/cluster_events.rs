//! Session events from every node (docs/cluster.md, "Session events from every node"): the
//! event stream of one node (`GET /v1/sessions/events`, the dashboard's live list) tells of
//! sessions started and stopped through the other nodes, once each, and never of another
//! org's; a node whose change feed lost its connection tells its streams to read their lists
//! again. Skipped (passing) without PostgreSQL, unless `CATTERY_REQUIRE_POSTGRES=1`.

use std::time::Duration;

use serde_json::json;

use crate::common::{start_cluster, wait_for};
use crate::postgres::PgCluster;

/// A server-sent event stream, read as it arrives.
struct Stream {
    resp: reqwest::Response,
    text: String,
}

impl Stream {
    async fn open(base: &str, key: &str) -> Stream {
        let resp = reqwest::Client::new()
            .get(format!("{base}/v1/sessions/events"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut s = Stream {
            resp,
            text: String::new(),
        };
        assert!(s.read_until(|t| t.contains("event: ready"), 10).await);
        s
    }

    /// Reads until `done` holds for what arrived so far, for at most `secs`; whether it held.
    async fn read_until(&mut self, done: impl Fn(&str) -> bool, secs: u64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !done(&self.text) {
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Ok(Ok(Some(c))) => self.text.push_str(&String::from_utf8_lossy(&c)),
                _ => return false,
            }
        }
        true
    }

    /// The `session` events about `sid` so far (their data).
    fn events_of(&self, sid: &str) -> Vec<serde_json::Value> {
        events_of(&self.text, sid)
    }
}

/// The `session` events about `sid` in `text` (their data).
fn events_of(text: &str, sid: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter(|b| b.contains("event: session"))
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("data:")))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
        .filter(|v| v["sessionId"] == sid)
        .collect()
}

fn ended(v: &serde_json::Value) -> bool {
    !v["endedAt"].is_null()
}

/// Three nodes: a stream on node 1 sees a session started on node 2 and its end when it is
/// stopped through node 3, and a session of its own node once per state; another org's stream
/// on node 1 sees neither; after node 1's change feed lost its connection, the stream says
/// `resync` and then still sees what other nodes do.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_on_one_node_tells_of_sessions_on_every_node_and_of_its_org_only() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let c = start_cluster(3, &pg.url(), &["--node-timeout", "2"]).await;
    let (n1, n2, n3) = (c.node(0), c.node(1), c.node(2));
    n1.deploy(
        "ev",
        &[],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 4}}),
    )
    .await;
    let other_sk = n1.key("private", "other");
    let mut own = Stream::open(&n1.base, &n1.sk).await;
    let mut other = Stream::open(&n1.base, &other_sk).await;

    // Started on node 2 (once node 2 knows the agent), stopped through node 3.
    let sid = wait_for(Duration::from_secs(10), "a start on node 2", || async {
        let r = n2.start_session("ev", json!({})).await;
        (r.status == 200).then(|| r.body["sessionId"].as_str().unwrap().to_string())
    })
    .await;
    assert!(
        own.read_until(|t| t.contains(&sid), 10).await,
        "node 1's stream did not tell of node 2's session: {}",
        own.text
    );
    assert_eq!(n3.stop("ev", &sid).await.status, 200);
    assert!(
        own.read_until(|t| events_of(t, &sid).iter().any(ended), 10)
            .await,
        "node 1's stream did not tell of the end: {}",
        own.text
    );

    // Node 1's own session, stopped through node 2 (forwarded to node 1): once per state.
    let mine = n1.start_ok("ev").await;
    assert_eq!(n2.stop("ev", &mine).await.status, 200);
    assert!(
        own.read_until(|t| events_of(t, &mine).iter().any(ended), 10)
            .await,
        "node 1's stream did not tell of its own session's end: {}",
        own.text
    );
    // Whatever else arrives within a second (a duplicate from the feed would).
    own.read_until(|_| false, 1).await;
    let mine_events = own.events_of(&mine);
    assert_eq!(
        mine_events.iter().filter(|v| ended(v)).count(),
        1,
        "{mine_events:?}"
    );
    let remote_events = own.events_of(&sid);
    assert_eq!(
        remote_events.iter().filter(|v| ended(v)).count(),
        1,
        "{remote_events:?}"
    );

    // The other org saw nothing of either.
    other.read_until(|_| false, 2).await;
    assert!(
        !other.text.contains(&sid) && !other.text.contains(&mine),
        "another org's stream told of the sessions: {}",
        other.text
    );

    // Node 1's (and every node's) listening connection is cut: its stream says `resync`
    // once the feed listens again, and then tells of node 3's sessions as before.
    pg.psql(&[
        "-c",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
    ]);
    assert!(
        own.read_until(|t| t.contains("event: resync"), 15).await,
        "no resync after the feed's connection was cut: {}",
        own.text
    );
    let again = n3.start_ok("ev").await;
    assert!(
        own.read_until(|t| t.contains(&again), 10).await,
        "node 3's session not told after the resync: {}",
        own.text
    );
    assert_eq!(n3.stop("ev", &again).await.status, 200);
}
