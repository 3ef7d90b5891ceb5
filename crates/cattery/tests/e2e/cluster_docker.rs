//! Several nodes on one PostgreSQL database and one shared Docker engine (issue 12,
//! `docs/cluster.md` "Node loss"): a node with a live container session is lost (SIGKILL) or
//! cut off (SIGSTOP); another node adopts the container, so the session stays active and
//! stoppable through any node; the lost node, when it comes back, neither removes nor
//! re-adopts it. Without PostgreSQL's binaries, the Docker engine or the test image these
//! tests say so and pass (`CATTERY_REQUIRE_DOCKER` makes a missing engine fail them).

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{wait_for, Cluster, Server};
use crate::postgres::PgCluster;

const AGENT_IMAGE: &str = "cattery-test/agent:latest";

fn docker(args: &[&str]) -> Option<String> {
    let out = Command::new("/usr/bin/docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the engine and the test image are there; otherwise skips (or fails under
/// `CATTERY_REQUIRE_DOCKER`).
fn have_docker() -> bool {
    let missing = if docker(&["info", "--format", "{{.ServerVersion}}"]).is_none() {
        Some("no Docker engine answers (scripts/docker-ci.sh start)".to_string())
    } else if docker(&["image", "inspect", "--format", "{{.Id}}", AGENT_IMAGE]).is_none() {
        Some(format!(
            "image {AGENT_IMAGE} is missing (scripts/docker-images.sh)"
        ))
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var_os("CATTERY_REQUIRE_DOCKER").is_some() => {
            panic!("CATTERY_REQUIRE_DOCKER is set, but {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

/// The container's state (`running`, `exited`, ...), `None` once it is gone.
fn container_state(id: &str) -> Option<String> {
    docker(&["inspect", "--format", "{{.State.Status}}", id]).map(|s| s.trim().to_string())
}

/// The ids of the containers a node made (by its server label).
fn containers_of(s: &Server) -> Vec<String> {
    let sid = std::fs::read_to_string(s.data_dir().join("server-id")).unwrap();
    let f = format!("label=org.cattery.server={}", sid.trim());
    docker(&["ps", "-a", "-q", "--no-trunc", "--filter", &f])
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Three nodes `n1..n3` on `pg` (node timeout 2 s), the image agent `dock` deployed (and its
/// image ready) before the second node starts.
async fn three_nodes(pg: &PgCluster) -> Cluster {
    let mut c = Cluster::new(&pg.url(), &["--node-timeout", "2"]);
    let first = c.add_node().await;
    first
        .deploy(
            "dock",
            &[],
            json!({"command": null, "image": AGENT_IMAGE,
                   "env": {"CATTERY_TEST_AGENT_ARGS": "--ignore-transport-close"},
                   "autoScaling": {"minAgents": 0, "maxAgents": 2}}),
        )
        .await;
    let a = first.wait_ready("dock", Duration::from_secs(60)).await;
    assert_eq!(a["errors"], json!([]), "{a}");
    c.add_node().await;
    c.add_node().await;
    c
}

/// The session's `/info` through `via`'s session proxy (forwarded to its owner); status 0
/// when no answer came within 3 s (a request forwarded to a frozen owner waits for it).
async fn info(via: &Server, sid: &str) -> (u16, Value) {
    let r = via
        .http
        .get(format!("{}/v1/public/dock/sessions/{sid}/info", via.base))
        .bearer_auth(&via.pk)
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    match r {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

/// A live session on node 2 and its container's id.
async fn session_on_node_2(c: &Cluster) -> (String, String) {
    let n2 = c.node(1);
    let sid = n2.start_ok("dock").await;
    let (st, i) = info(n2, &sid).await;
    assert_eq!(st, 200, "{i}");
    let ids = containers_of(n2);
    assert_eq!(ids.len(), 1, "{ids:?}");
    (sid, ids[0].clone())
}

/// Waits until a live node serves the session again (its proxy answers from the container,
/// the container that ran before), i.e. until the container was adopted.
async fn wait_adopted(c: &Cluster, sid: &str, started: &Value) {
    wait_for(
        Duration::from_secs(15),
        "another node to adopt the container",
        || async {
            let (st, i) = info(c.node(0), sid).await;
            (st == 200).then_some(i)
        },
    )
    .await;
    let (_, i) = info(c.node(2), sid).await;
    assert_eq!(
        i["startedAtUnixMs"], started["startedAtUnixMs"],
        "same container: {i}"
    );
    for n in [0, 2] {
        let s = c.node(n).session("dock", sid).await;
        assert!(s["endedAt"].is_null(), "the adopted session ended: {s}");
    }
}

/// Node 2's reported instance count, as node 1 lists it.
async fn instances_of_node_2(c: &Cluster) -> Option<i64> {
    let r = c
        .node(0)
        .req("GET", "/v1/cluster/nodes", Some(&c.node(0).sk), None)
        .await;
    r.body["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == "n2" && n["alive"] == true)?["instances"]
        .as_i64()
}

/// Stops the session through `via`: 200 only once the container is gone; one end, `stopped`.
async fn stop_through(c: &Cluster, via: usize, sid: &str, container: &str) {
    let r = c.node(via).stop("dock", sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"status": "terminated", "session_id": sid}));
    assert_eq!(
        container_state(container),
        None,
        "container left after the 200"
    );
    for n in &c.nodes {
        assert_eq!(n.session("dock", sid).await["endReason"], "stopped");
    }
    assert_eq!(c.node(1).stop("dock", sid).await.status, 200);
}

/// SIGKILL of the node running a container session: another node adopts the container (the
/// session stays active, listed and proxied from every node); the node restarts and neither
/// removes nor re-adopts it; a stop through the restarted node answers 200 only once the
/// container is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_nodes_container_is_adopted_and_stoppable_through_any_node() {
    if !have_docker() {
        return;
    }
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut c = three_nodes(&pg).await;
    let (sid, container) = session_on_node_2(&c).await;
    let (_, started) = info(c.node(1), &sid).await;
    c.nodes[1].kill9();
    wait_adopted(&c, &sid, &started).await;
    assert_eq!(container_state(&container).as_deref(), Some("running"));
    for n in [0, 2] {
        let listed = c
            .node(n)
            .req("GET", "/v1/agents/dock/sessions", Some(&c.node(n).sk), None)
            .await;
        assert!(listed.body.to_string().contains(&sid), "{}", listed.body);
    }
    c.nodes[1].spawn().await;
    // Back and heartbeating, with no instance of its own: it re-adopted nothing.
    wait_for(
        Duration::from_secs(10),
        "node 2 to heartbeat again",
        || async { instances_of_node_2(&c).await.filter(|&n| n == 0) },
    )
    .await;
    assert_eq!(
        container_state(&container).as_deref(),
        Some("running"),
        "the restarted node removed the adopted container"
    );
    let (st, i) = info(c.node(1), &sid).await;
    assert_eq!(st, 200, "{i}");
    assert_eq!(i["startedAtUnixMs"], started["startedAtUnixMs"]);
    stop_through(&c, 1, &sid, &container).await;
}

/// SIGSTOP of the node running a container session, for longer than the node timeout:
/// another node adopts the container; when the node runs again (SIGCONT) it lets the
/// container go (neither removes it nor keeps supervising it); the session is stoppable
/// through any node.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_node_lets_go_of_its_adopted_container() {
    if !have_docker() {
        return;
    }
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let c = three_nodes(&pg).await;
    let (sid, container) = session_on_node_2(&c).await;
    let (_, started) = info(c.node(1), &sid).await;
    c.node(1).freeze().await;
    wait_adopted(&c, &sid, &started).await;
    c.node(1).signal(18); // SIGCONT
    wait_for(
        Duration::from_secs(15),
        "node 2 to let the container go",
        || async { instances_of_node_2(&c).await.filter(|&n| n == 0) },
    )
    .await;
    assert_eq!(
        container_state(&container).as_deref(),
        Some("running"),
        "the returning node removed the adopted container"
    );
    let s = c.node(1).session("dock", &sid).await;
    assert!(s["endedAt"].is_null(), "{s}");
    let (st, i) = info(c.node(1), &sid).await;
    assert_eq!(st, 200, "{i}");
    assert_eq!(i["startedAtUnixMs"], started["startedAtUnixMs"]);
    stop_through(&c, 2, &sid, &container).await;
}

/// A node of another cluster (its own cluster secret, as for a node on a restored copy of the
/// database, docs/cluster.md "Backups") on the same engine takes over a lost node: it leaves
/// that node's container alone (ends its session `lost` on its side, neither adopts nor
/// removes it), so nothing it does later (a stop, its drain) can reach a container of the
/// cluster the container belongs to.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_another_cluster_secret_does_not_adopt_the_clusters_containers() {
    if !have_docker() {
        return;
    }
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut c = Cluster::new(&pg.url(), &["--node-timeout", "2"]);
    let first = c.add_node().await;
    first
        .deploy(
            "dock",
            &[],
            json!({"command": null, "image": AGENT_IMAGE,
                   "env": {"CATTERY_TEST_AGENT_ARGS": "--ignore-transport-close"},
                   "autoScaling": {"minAgents": 0, "maxAgents": 2}}),
        )
        .await;
    first.wait_ready("dock", Duration::from_secs(60)).await;
    let sid = first.start_ok("dock").await;
    let ids = containers_of(first);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let container = ids[0].clone();
    // Removed at the end, also when the test fails: no node removes it.
    struct RemoveOnDrop(String);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = docker(&["rm", "-f", &self.0]);
        }
    }
    let _remove = RemoveOnDrop(container.clone());
    c.nodes[0].kill9();
    // Once n1 is dead (a live node with another secret would refuse the new one), a node
    // with another cluster secret joins the database and takes n1 over.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::fs::write(
        c.key_dir.path().join("cluster.secret"),
        "another-cluster-secret-0123456789abcdef0123456789\n",
    )
    .unwrap();
    c.add_node().await;
    let s = wait_for(
        Duration::from_secs(15),
        "n2 to take n1's session over",
        || async {
            let s = c.node(1).session("dock", &sid).await;
            (!s["endedAt"].is_null()).then_some(s)
        },
    )
    .await;
    assert_eq!(s["endReason"], "lost", "{s}");
    assert_eq!(
        container_state(&container).as_deref(),
        Some("running"),
        "the other cluster's container was not left alone"
    );
}
