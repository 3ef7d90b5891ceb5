//! A start that finds no idle instance on the node that took it goes to a live node that has
//! one (docs/cluster.md, "Starts go to a warm instance"): two nodes on one PostgreSQL
//! database, `minAgents` 1, the process runtime, loopback. Without PostgreSQL's binaries these
//! tests say so and pass (see `postgres::PgCluster`).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{wait_for, Cluster, Server};
use crate::postgres::PgCluster;

/// Waits until `n` holds a ready warm instance of `agent` (its share is 1).
async fn warm_on(n: &Server, agent: &str) {
    wait_for(Duration::from_secs(20), "a warm instance", || async {
        let a = n.agent(agent).await;
        (a["ready"] == true && a["warmInstances"]["idle"].as_u64().unwrap_or(0) >= 1).then_some(())
    })
    .await;
}

/// `minAgents` 1 on two nodes: the warm instance is `n1`'s share. Starts sent to `n2` are
/// served warm by `n1` (its answer, `coldStart: false`, the session `n1`'s), and stopped
/// through either node. With `n1` SIGKILLed (still in the node list, its idle record still
/// there), a start sent to `n2` is served by `n2` itself, cold.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_without_a_local_idle_instance_is_served_warm_by_the_node_that_has_one() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut c = Cluster::new(&pg.url(), &["--node-timeout", "4"]);
    c.add_node()
        .await
        .deploy(
            "fwd",
            &[],
            json!({"autoScaling": {"minAgents": 1, "maxAgents": 4}}),
        )
        .await;
    c.add_node().await;
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    // The second start is a SmallWebRTC one: its fields reach the serving node (the session's
    // transport, the answer's `iceConfig`), and its later requests (`/api/offer` among them)
    // reach the owner through either node, as `/info` does here.
    let webrtc = json!({"transport": "webrtc", "enableDefaultIceServers": true, "body": {"k": 1}});
    for (stop_via, start) in [(1, json!({"body": {"k": "v"}})), (0, webrtc)] {
        warm_on(n1, "fwd").await;
        let t0 = Instant::now();
        let r = n2.start_session("fwd", start.clone()).await;
        eprintln!(
            "MEASURED a start through n2 served warm by n1: {:?}",
            t0.elapsed()
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["coldStart"], false, "{:?}", r.body);
        assert_eq!(
            r.body.get("iceConfig").is_some(),
            start["enableDefaultIceServers"] == true,
            "{:?}",
            r.body
        );
        let sid = r.body["sessionId"].as_str().unwrap().to_string();
        let s = n2.session("fwd", &sid).await;
        assert_eq!(s["nodeId"], "n1", "{s}");
        assert_eq!(s["transport"], start["transport"], "{s}");
        // The session's requests reach its instance through either node.
        for n in [n1, n2] {
            let r = n
                .req(
                    "GET",
                    &format!("/v1/public/fwd/sessions/{sid}/info"),
                    Some(&n.pk),
                    None,
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.body["sessionId"], sid.as_str(), "{:?}", r.body);
        }
        let via = &c.nodes[stop_via];
        assert_eq!(via.stop("fwd", &sid).await.status, 200);
        let s = n1.session("fwd", &sid).await;
        assert!(!s["endedAt"].is_null(), "{s}");
    }
    // n1 dies with its warm instance recorded idle: the forward finds no one, and n2 starts
    // the session itself, cold.
    warm_on(n1, "fwd").await;
    c.nodes[0].kill9();
    let n2 = &c.nodes[1];
    let t0 = Instant::now();
    let r = n2.start_session("fwd", json!({})).await;
    eprintln!(
        "MEASURED a start through n2, n1 killed, served cold by n2: {:?}",
        t0.elapsed()
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["coldStart"], true, "{:?}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    assert_eq!(n2.session("fwd", &sid).await["nodeId"], "n2");
    assert!(
        n2.log().contains("starting it here"),
        "n2 did not try n1 first: {}",
        n2.log()
    );
    assert_eq!(n2.stop("fwd", &sid).await.status, 200);
    // n1 comes back and removes what it left.
    c.nodes[0].spawn().await;
}
