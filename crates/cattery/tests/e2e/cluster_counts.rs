//! An agent's status on several nodes (docs/cluster.md, "An agent's status: the cluster's
//! counts, this node's health"): `activeSessionCount`, `warmInstances` and `readyReplicas`
//! are the cluster's whichever node answers. Skipped (passing) without PostgreSQL, unless
//! `CATTERY_REQUIRE_POSTGRES=1`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{wait_for, Cluster, Server};
use crate::postgres::PgCluster;

/// The counts one node shows of agent `name`: (`activeSessionCount`, `warmInstances` idle,
/// busy, total, `currentRevision.readyReplicas`).
fn counts(a: &Value) -> (u64, u64, u64, u64, u64) {
    let w = &a["warmInstances"];
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    (
        n(&a["activeSessionCount"]),
        n(&w["idle"]),
        n(&w["busy"]),
        n(&w["total"]),
        n(&a["currentRevision"]["readyReplicas"]),
    )
}

/// How long `GET /v1/agents/{name}` takes on `n`, 200 times in a row (printed, never asserted).
async fn time_status(n: &Server, name: &str) -> Duration {
    let t0 = Instant::now();
    for _ in 0..200 {
        let r = n
            .req("GET", &format!("/v1/agents/{name}"), Some(&n.sk), None)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    t0.elapsed()
}

/// `minAgents` 3 on three nodes (one warm instance each) shows 3 warm instances on every
/// node, not each node's one; sessions started through node 1 and node 2 are counted by node
/// 3, and no more once they are stopped. Health stays each node's (`ready` on all three).
#[tokio::test(flavor = "multi_thread")]
async fn an_agents_status_counts_every_nodes_sessions_and_warm_instances() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut c = Cluster::new(&pg.url(), &["--node-timeout", "2"]);
    c.add_node().await;
    let n1 = c.node(0);
    n1.deploy(
        "counted",
        &[],
        json!({"autoScaling": {"minAgents": 3, "maxAgents": 6}}),
    )
    .await;
    // One node: its pool (read from memory), all three warm instances.
    wait_for(
        Duration::from_secs(20),
        "3 warm on node 1 alone",
        || async { (counts(&n1.agent("counted").await) == (0, 3, 0, 3, 3)).then_some(()) },
    )
    .await;
    let alone = time_status(n1, "counted").await;

    c.add_node().await;
    c.add_node().await;
    let (n1, n2, n3) = (c.node(0), c.node(1), c.node(2));
    // Shares of 1 + 1 + 1: every node shows the 3 (each node's one from memory, the
    // others' from their records), and each is ready.
    for n in [n1, n2, n3] {
        let a = wait_for(Duration::from_secs(20), "3 warm in the cluster", || async {
            let a = n.agent("counted").await;
            (counts(&a) == (0, 3, 0, 3, 3) && n1.agent_pids().len() == 3).then_some(a)
        })
        .await;
        assert_eq!(a["ready"], true, "{a}");
        assert_eq!(a["warmInstances"]["starting"], 0, "{a}");
    }
    let three = time_status(n1, "counted").await;
    eprintln!(
        "MEASURED 200 x GET /v1/agents/counted on node 1: alone {alone:?}, \
         with 3 live nodes {three:?}"
    );

    // A session through node 1 and one through node 2, read from node 3: both counted, the
    // pools refilled to 3 warm (5 instances in all).
    let s1 = n1.start_ok("counted").await;
    let s2 = n2.start_ok("counted").await;
    for n in [n3, n1] {
        wait_for(
            Duration::from_secs(20),
            "2 sessions and 3 warm in the cluster",
            || async { (counts(&n.agent("counted").await) == (2, 3, 2, 5, 5)).then_some(()) },
        )
        .await;
    }
    assert_eq!(n3.stop("counted", &s1).await.status, 200);
    assert_eq!(n3.stop("counted", &s2).await.status, 200);
    wait_for(Duration::from_secs(20), "no session left", || async {
        (counts(&n2.agent("counted").await) == (0, 3, 0, 3, 3)).then_some(())
    })
    .await;
}
