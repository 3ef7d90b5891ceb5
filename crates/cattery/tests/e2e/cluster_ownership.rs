//! Several `cattery serve` nodes on one PostgreSQL database (issue 12, `docs/cluster.md`):
//! ownership of sessions, stops and proxied requests forwarded to the owner with the cluster
//! secret, a node lost (SIGKILL) and taken over, a rolling restart. Process runtime, loopback.
//! Without PostgreSQL's binaries these tests say so and pass (see `postgres::PgCluster`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::cluster::CLUSTER_SECRET as SECRET;
use crate::common::{pid_alive, tagged_pids, wait_for, Cluster, Server};
use crate::postgres::PgCluster;

/// `n` nodes `n1..` on one database ([`Cluster`]: shared secrets key and cluster secret,
/// advertise URLs), node timeout `timeout_s`, and `extra` flags. The agent `agent` is deployed
/// on the first node before the others start (so every node knows it from its start,
/// whatever the propagation of agent changes).
async fn start_nodes(
    pg: &PgCluster,
    n: usize,
    timeout_s: &str,
    extra: &[&str],
    agent: (&str, Value),
) -> Cluster {
    let mut flags = vec!["--node-timeout", timeout_s];
    flags.extend_from_slice(extra);
    let mut c = Cluster::new(&pg.url(), &flags);
    c.add_node().await.deploy(agent.0, &[], agent.1).await;
    for _ in 1..n {
        c.add_node().await;
    }
    c
}

/// The pid of a session's agent process, through the session proxy of `via`.
async fn session_pid(via: &Server, agent: &str, sid: &str) -> (u16, Value) {
    let r = via
        .req(
            "GET",
            &format!("/v1/public/{agent}/sessions/{sid}/info"),
            Some(&via.pk),
            None,
        )
        .await;
    (r.status, r.body)
}

/// A session started on node 2 is listed on node 1, proxied through node 3, stopped through
/// node 1 (the answer comes only once its process is gone), stopped again through node 2
/// (the same 200), and ends once, `stopped`. Internal calls need the cluster secret: an org
/// key, or a wrong secret, gets 401.
#[tokio::test(flavor = "multi_thread")]
async fn any_node_lists_proxies_and_stops_another_nodes_session() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 3, "2", &[], ("fwd", json!({}))).await;
    let nodes = &cluster.nodes;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let sid = n2.start_ok("fwd").await;

    let listed = n1
        .req("GET", "/v1/agents/fwd/sessions", Some(&n1.sk), None)
        .await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert!(
        listed.body.to_string().contains(&sid),
        "node 1 does not list the session: {}",
        listed.body
    );
    // Each session names its owner, on every node.
    for n in [n1, n3] {
        assert_eq!(n.session("fwd", &sid).await["nodeId"], "n2");
    }

    let (st, info) = session_pid(n3, "fwd", &sid).await;
    assert_eq!(st, 200, "proxy through node 3: {info}");
    assert_eq!(info["sessionId"], json!(sid), "{info}");
    let pid = info["pid"].as_i64().unwrap() as i32;
    assert!(pid_alive(pid));
    // The bot's own route, through node 3: what reaches the bot never holds the cluster
    // secret node 3 added to reach node 2, nor its run (tenant code could use the secret to
    // call any node's internal routes).
    let echo = n3
        .req(
            "GET",
            &format!("/v1/public/fwd/sessions/{sid}/echo"),
            Some(&n3.pk),
            None,
        )
        .await;
    assert_eq!(echo.status, 200, "{:?}", echo.body);
    let seen = echo.body.to_string();
    assert!(seen.contains("x-daily-session-id"), "{seen}");
    assert!(!seen.contains("x-cattery-cluster-secret"), "{seen}");
    assert!(!seen.contains(SECRET), "{seen}");
    assert!(!seen.contains("x-cattery-node"), "{seen}");

    // Internal calls: never with an org's key, never with a wrong secret.
    let path = format!("/internal/v1/sessions/{sid}/stop");
    let r = n1.req("POST", &path, Some(&n1.sk), None).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.body["code"], "CLUSTER_UNAUTHORIZED");
    for (base, header) in [
        (&n2.base, "wrong-secret".to_string()),
        (&n2.base, format!("{SECRET}x")),
    ] {
        let r = n1
            .http
            .post(format!("{base}{path}"))
            .bearer_auth(&n1.sk)
            .header("x-cattery-cluster-secret", header)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = n1
            .http
            .get(format!("{base}/v1/public/fwd/sessions/{sid}/info"))
            .bearer_auth(&n1.pk)
            .header("x-cattery-cluster-secret", "wrong-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    assert!(
        pid_alive(pid),
        "a refused internal call stopped the session"
    );

    let t0 = Instant::now();
    let r = n1.stop("fwd", &sid).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "stop through node 1: {:?}", r.body);
    assert!(
        !pid_alive(pid),
        "DELETE answered while the process {pid} still runs"
    );
    let again = n2.stop("fwd", &sid).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body, r.body);
    eprintln!("forwarded stop took {took:?}");

    for n in nodes.iter() {
        let s = n.session("fwd", &sid).await;
        assert_eq!(s["endReason"], "stopped", "{s}");
    }
    let (st, _) = session_pid(n3, "fwd", &sid).await;
    assert_eq!(st, 404);
}

/// The Daily room Cattery made for a session of a node that is lost (SIGKILL) is deleted by
/// the node that takes the session over and ends it: the room is in the session's record,
/// not only in the lost node's memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_nodes_daily_rooms_are_deleted_by_the_node_that_takes_it_over() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let daily = crate::cli_compat::DailyStandIn::start().await;
    let mut cluster = Cluster::new(
        &pg.url(),
        &[
            "--node-timeout",
            "2",
            "--daily-api-key",
            "dk_e2e_key",
            "--daily-api-url",
            &daily.url,
        ],
    );
    cluster
        .add_node()
        .await
        .deploy("droom", &["--ignore-transport-close"], json!({}))
        .await;
    cluster.add_node().await;
    let nodes = &mut cluster.nodes;
    let r = nodes[1]
        .start_session("droom", json!({"createDailyRoom": true, "body": {}}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let room = r.body["dailyRoom"].as_str().unwrap();
    let room = room.rsplit('/').next().unwrap().to_string();
    nodes[1].kill9();
    let s = wait_for(
        Duration::from_secs(10),
        "the lost node's session to end",
        || async {
            let s = nodes[0].session("droom", &sid).await;
            (!s["endedAt"].is_null()).then_some(s)
        },
    )
    .await;
    assert_eq!(s["endReason"], "lost", "{s}");
    crate::cli_compat::wait_room_deleted(&daily, &room).await;
    // The node comes back and removes its lost session's process.
    nodes[1].spawn().await;
}

/// SIGKILL of a node with live sessions: within the node timeout + 5 s another node ends each
/// of them `lost`, saying the node was lost, and their capacity is free again; when the node
/// restarts, no process of those sessions is left (it removes them before anything else).
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_node_has_its_sessions_ended_and_leaves_no_process_on_return() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    // The agents outlive their node's connection (as upgrade.md asks of agents): without
    // `--ignore-transport-close` they end themselves when the killed node's `/bot` socket
    // closes, and the node's return would find nothing to remove.
    let mut cluster = Cluster::new(&pg.url(), &["--node-timeout", "2"]);
    cluster
        .add_node()
        .await
        .deploy(
            "lose",
            &["--ignore-transport-close"],
            json!({"autoScaling": {"minAgents": 0, "maxAgents": 2}}),
        )
        .await;
    for _ in 1..3 {
        cluster.add_node().await;
    }
    let nodes = &mut cluster.nodes;
    let mut sids = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..2 {
        let sid = nodes[1].start_ok("lose").await;
        let (st, info) = session_pid(&nodes[1], "lose", &sid).await;
        assert_eq!(st, 200, "{info}");
        pids.push(info["pid"].as_i64().unwrap() as i32);
        sids.push(sid);
    }
    nodes[1].kill9();
    let killed = Instant::now();
    // The processes outlive their server.
    assert!(pids.iter().all(|&p| pid_alive(p)));
    for sid in &sids {
        let s = wait_for(
            Duration::from_secs(7),
            "the lost node's session to end",
            || async {
                let s = nodes[0].session("lose", sid).await;
                (!s["endedAt"].is_null()).then_some(s)
            },
        )
        .await;
        assert_eq!(s["endReason"], "lost", "{s}");
        assert!(
            s.to_string().contains("node n2 was lost"),
            "the end does not say the node was lost: {s}"
        );
    }
    let ended_in = killed.elapsed();
    eprintln!("sessions of the lost node ended in {ended_in:?}");
    assert!(ended_in < Duration::from_secs(7));
    // A second stop of a lost session answers 200 as well.
    assert_eq!(nodes[2].stop("lose", &sids[0]).await.status, 200);
    // Capacity: maxAgents sessions start again on the live nodes.
    let mut fresh = Vec::new();
    for n in [0, 2] {
        fresh.push((n, nodes[n].start_ok("lose").await));
    }
    for (n, sid) in &fresh {
        assert_eq!(nodes[*n].stop("lose", sid).await.status, 200);
    }
    // The node comes back: the processes of its lost sessions are gone (never two lives).
    nodes[1].spawn().await;
    for &p in &pids {
        assert!(
            !pid_alive(p),
            "process {p} of a lost session runs on after its node came back"
        );
    }
    let sid = nodes[1].start_ok("lose").await;
    assert_eq!(nodes[0].stop("lose", &sid).await.status, 200);
    for s in &sids {
        assert_eq!(nodes[1].session("lose", s).await["endReason"], "lost");
    }
}

/// A draining node takes no lost node over: what it adopted would be stopped at its drain's
/// end. The lost node's session stays open for a node that does not drain, here the lost
/// node itself, which re-adopts it when it comes back.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_node_takes_no_lost_node_over() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut cluster = Cluster::new(&pg.url(), &["--node-timeout", "2"]);
    // Its sessions outlive their node's connection (as upgrade.md asks of agents).
    let limits = json!({"autoScaling": {"minAgents": 0, "maxAgents": 4}});
    let first = cluster.add_node().await;
    first
        .deploy("keep", &["--ignore-transport-close"], limits)
        .await;
    cluster.add_node().await;
    let nodes = &mut cluster.nodes;
    // A session keeps node 1's drain going (the drain timeout is 30 s).
    let busy = nodes[0].start_ok("keep").await;
    let sid = nodes[1].start_ok("keep").await;
    nodes[0].signal(15);
    wait_for(Duration::from_secs(10), "node 1 to drain", || async {
        let r = nodes[0].req("GET", "/ready", None, None).await;
        (r.status == 503).then_some(())
    })
    .await;
    nodes[1].kill9();
    // Three node timeouts: a node that does not drain has taken it over by then.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = nodes[0].session("keep", &sid).await;
    assert!(s["endedAt"].is_null(), "taken over by a draining node: {s}");
    nodes[1].spawn().await;
    let s = nodes[1].session("keep", &sid).await;
    assert!(s["endedAt"].is_null(), "re-adopted by its node: {s}");
    assert_eq!(nodes[1].stop("keep", &sid).await.status, 200);
    assert_eq!(nodes[1].stop("keep", &busy).await.status, 200);
}

/// One client's view of the trickle.
#[derive(Default)]
struct Trickle {
    answers: Vec<(String, u16, Value)>,
    started: Vec<String>,
    stopped: Vec<String>,
}

/// Sends to node `first`, else the next that answers (a load balancer skipping a node that
/// is down, or draining: a 503 `DRAINING` created nothing): the first other HTTP answer.
async fn send_any(
    http: &reqwest::Client,
    bases: &[String],
    first: usize,
    make: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
) -> (u16, Value) {
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut i = first;
    loop {
        match make(http, &bases[i % bases.len()])
            .timeout(Duration::from_secs(60))
            .send()
            .await
        {
            Ok(r) => {
                let st = r.status().as_u16();
                let body = r.json::<Value>().await.unwrap_or(Value::Null);
                if st == 503 && body["code"] == "DRAINING" {
                    i += 1;
                    continue;
                }
                return (st, body);
            }
            Err(e) => {
                assert!(Instant::now() < give_up, "no node answered: {e}");
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A rolling restart of all three nodes, one at a time (SIGTERM: the node drains, its
/// sessions are stopped through any node meanwhile, it leaves, and starts again), under a
/// steady trickle of starts and stops spread over the nodes (the client skips a node that is
/// down or draining, as a load balancer does): no 5xx, every session started is recorded and
/// ends `stopped` (none `lost`), and nothing runs once everything is stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_under_a_trickle_loses_nothing() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut cluster = start_nodes(
        &pg,
        3,
        "6",
        &[],
        (
            "roll",
            json!({"autoScaling": {"minAgents": 1, "maxAgents": 30}}),
        ),
    )
    .await;
    let nodes = &mut cluster.nodes;
    let tag = nodes[0].tag.clone();
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let (pk, sk, http) = (
        nodes[0].pk.clone(),
        nodes[0].sk.clone(),
        nodes[0].http.clone(),
    );
    let stop_at = Instant::now() + Duration::from_secs(40);
    let trickle = tokio::spawn(async move {
        let mut t = Trickle::default();
        let mut i = 0usize;
        // Sessions kept running for a while, so restarts find live ones.
        let mut held: std::collections::VecDeque<String> = Default::default();
        while Instant::now() < stop_at && t.started.len() < 150 {
            i += 1;
            let (st, b) = send_any(&http, &bases, i, |h, base| {
                h.post(format!("{base}/v1/public/roll/start"))
                    .bearer_auth(&pk)
                    .json(&json!({}))
            })
            .await;
            t.answers.push(("start".into(), st, b.clone()));
            if st == 200 {
                let sid = b["sessionId"].as_str().unwrap().to_string();
                t.started.push(sid.clone());
                held.push_back(sid);
            }
            if held.len() > 4 {
                let sid = held.pop_front().unwrap();
                let (st, b) = send_any(&http, &bases, i + 1, |h, base| {
                    h.delete(format!("{base}/v1/agents/roll/sessions/{sid}"))
                        .bearer_auth(&sk)
                })
                .await;
                t.answers.push((format!("stop {sid}"), st, b));
                if st == 200 {
                    t.stopped.push(sid);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for sid in held {
            let (st, b) = send_any(&http, &bases, 0, |h, base| {
                h.delete(format!("{base}/v1/agents/roll/sessions/{sid}"))
                    .bearer_auth(&sk)
            })
            .await;
            t.answers.push((format!("stop {sid}"), st, b));
            if st == 200 {
                t.stopped.push(sid);
            }
        }
        t
    });
    for n in nodes.iter_mut() {
        tokio::time::sleep(Duration::from_secs(4)).await;
        // The drain lasts until the trickle has stopped the node's sessions.
        n.terminate(Duration::from_secs(30));
        n.spawn().await;
    }
    let t = trickle.await.unwrap();
    eprintln!(
        "{} answers, {} started, {} stopped",
        t.answers.len(),
        t.started.len(),
        t.stopped.len()
    );
    for (what, st, b) in &t.answers {
        assert!(*st < 500, "{what}: {st} {b}");
    }
    assert!(t.started.len() >= 20, "too few starts: {}", t.started.len());
    assert_eq!(
        t.started.len(),
        t.stopped.len(),
        "a stop did not answer 200"
    );
    for sid in &t.started {
        let s = nodes[0].session("roll", sid).await;
        if s["endReason"] != "stopped" {
            for n in nodes.iter() {
                let log = n.log();
                let at = s["createdAt"].as_str().unwrap_or("")[..18].to_string();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains(sid.as_str()) || l.contains(&at))
                    .collect();
                eprintln!("--- {}:\n{}", n.args[1], lines.join("\n"));
            }
            panic!("session {sid} did not end stopped: {s}");
        }
    }
    // No leak: once every node has drained, nothing of the agent runs anywhere.
    for n in nodes.iter_mut() {
        n.terminate(Duration::from_secs(30));
    }
    wait_for(Duration::from_secs(10), "no agent process left", || async {
        tagged_pids(&tag).is_empty().then_some(())
    })
    .await;
}

/// The cost of forwarding a stop: sessions on node 2 stopped through node 2 (local) and
/// through node 1 (forwarded), alternately; prints both medians. Only a loose bound is
/// asserted (a debug build on a shared machine): forwarding must not cost a stop grace.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_stop_costs_about_a_local_one() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(
        &pg,
        2,
        "2",
        &[],
        (
            "cost",
            json!({"autoScaling": {"minAgents": 2, "maxAgents": 10}}),
        ),
    )
    .await;
    let nodes = &cluster.nodes;
    nodes[1].wait_ready("cost", Duration::from_secs(20)).await;
    let (mut local, mut forwarded) = (Vec::new(), Vec::new());
    for i in 0..30 {
        let sid = nodes[1].start_ok("cost").await;
        let via = if i % 2 == 0 { &nodes[1] } else { &nodes[0] };
        let t0 = Instant::now();
        let r = via.stop("cost", &sid).await;
        let took = t0.elapsed();
        assert_eq!(r.status, 200, "{:?}", r.body);
        if i % 2 == 0 {
            local.push(took);
        } else {
            forwarded.push(took);
        }
    }
    local.sort();
    forwarded.sort();
    let (l, f) = (local[local.len() / 2], forwarded[forwarded.len() / 2]);
    eprintln!("stop p50: local {l:?}, forwarded {f:?} (15 each)");
    assert!(
        f < l + Duration::from_millis(500),
        "local {l:?}, forwarded {f:?}"
    );
}

/// A node cut off (SIGSTOP: alive, but silent) for longer than the node timeout is taken
/// over: another node ends its process sessions `lost`, and a stop or a proxied request
/// forwarded to it meanwhile answers then. When it runs again (SIGCONT) it is
/// fenced until it has reconciled with the store: it removes the processes of the sessions
/// it lost (never two lives for one session) without writing a second end, then serves new
/// sessions as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_and_back_removes_what_it_lost_and_serves_again() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(
        &pg,
        3,
        "2",
        &[],
        (
            "cut",
            json!({"autoScaling": {"minAgents": 0, "maxAgents": 3}}),
        ),
    )
    .await;
    let nodes = &cluster.nodes;
    let mut sids = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..2 {
        let sid = nodes[1].start_ok("cut").await;
        let (st, info) = session_pid(&nodes[1], "cut", &sid).await;
        assert_eq!(st, 200, "{info}");
        pids.push(info["pid"].as_i64().unwrap() as i32);
        sids.push(sid);
    }
    nodes[1].freeze().await;
    // A stop and a proxied request sent to it through another node while it is frozen (its
    // kernel still takes the connections): both answer once it is declared dead, never hang.
    let t0 = Instant::now();
    let info = format!("/v1/public/cut/sessions/{}/info", sids[1]);
    let (stop, proxied) = tokio::join!(
        nodes[0].stop("cut", &sids[0]),
        nodes[0].req("GET", &info, Some(&nodes[0].pk), None)
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(stop.status, 200, "{:?}", stop.body);
    assert_eq!(proxied.status, 503, "{:?}", proxied.body);
    assert_eq!(
        proxied.body["code"], "NODE_UNREACHABLE",
        "{:?}",
        proxied.body
    );
    let mut ends = Vec::new();
    for sid in &sids {
        let s = wait_for(
            Duration::from_secs(10),
            "the cut-off node's session to end",
            || async {
                let s = nodes[0].session("cut", sid).await;
                (!s["endedAt"].is_null()).then_some(s)
            },
        )
        .await;
        assert_eq!(s["endReason"], "lost", "{s}");
        assert!(s.to_string().contains("node n2 was lost"), "{s}");
        ends.push(s);
    }
    // Its processes run on while their node is stopped.
    assert!(pids.iter().all(|&p| pid_alive(p)));
    nodes[1].signal(libc_sig::SIGCONT);
    let t0 = Instant::now();
    while pids.iter().any(|&p| pid_alive(p)) {
        if t0.elapsed() > Duration::from_secs(15) {
            let listed = nodes[0]
                .req("GET", "/v1/cluster/nodes", Some(&nodes[0].sk), None)
                .await;
            panic!(
                "the returning node did not remove the processes of its lost sessions: {}\n{}",
                listed.body,
                nodes[1].log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fenced until reconciled (503 NODE_FENCED), then it serves new sessions.
    let sid = wait_for(
        Duration::from_secs(15),
        "the returning node to take a new session",
        || async {
            let r = nodes[1].start_session("cut", json!({})).await;
            if r.status == 200 {
                return Some(r.body["sessionId"].as_str().unwrap().to_string());
            }
            assert_eq!(r.status, 503, "{:?}", r.body);
            assert_eq!(r.body["code"], "NODE_FENCED", "{:?}", r.body);
            None
        },
    )
    .await;
    let (st, info) = session_pid(&nodes[0], "cut", &sid).await;
    assert_eq!(st, 200, "{info}");
    let pid = info["pid"].as_i64().unwrap() as i32;
    let r = nodes[0].stop("cut", &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!pid_alive(pid));
    // One terminal state each: the first end stays, whatever node is asked.
    for (sid, first) in sids.iter().zip(&ends) {
        for n in nodes.iter() {
            let s = n.session("cut", sid).await;
            assert_eq!(s["endReason"], "lost", "{s}");
            assert_eq!(s["endedAt"], first["endedAt"], "{s}");
        }
        assert_eq!(nodes[1].stop("cut", sid).await.status, 200);
    }
    assert!(
        nodes[1].agent_pids().is_empty(),
        "{:?}",
        nodes[1].agent_pids()
    );
}

/// A start under way on a node that is frozen for longer than the node timeout: another node
/// takes it over and ends the session `lost` while its instance still starts. Once the node
/// runs again, the start is not answered 200 for that ended session (before, it delivered
/// the session and answered 200 with its id: a client told it had a session that had ended
/// seconds before): it answers 503, the session keeps its one `lost` end, and no process of
/// it is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_under_way_on_a_node_taken_over_meanwhile_is_not_answered_200() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut cluster = Cluster::new(&pg.url(), &["--node-timeout", "2"]);
    // The agent binds its port 1 s after it starts: the start waits that long. Its
    // processes carry the first node's tag, whichever node runs them.
    cluster
        .add_node()
        .await
        .deploy(
            "late",
            &["--startup-delay", "1"],
            json!({"autoScaling": {"minAgents": 0, "maxAgents": 2}}),
        )
        .await;
    cluster.add_node().await;
    let nodes = &cluster.nodes;
    let fault = async {
        // Frozen once its instance runs (the start waits for it to be ready), until another
        // node has ended the session `lost`.
        wait_for(Duration::from_secs(20), "the instance to run", || async {
            (!nodes[0].agent_pids().is_empty()).then_some(())
        })
        .await;
        nodes[1].freeze().await;
        let ended = wait_for(
            Duration::from_secs(15),
            "the frozen node's session to be ended lost",
            || async {
                let s = nodes[0].latest_session("late").await;
                (s["endReason"] == "lost").then_some(s)
            },
        )
        .await;
        nodes[1].signal(libc_sig::SIGCONT);
        ended
    };
    let (r, ended) = tokio::join!(nodes[1].start_session("late", json!({})), fault);
    assert_eq!(r.status, 503, "{:?}\n{}", r.body, nodes[1].log());
    assert_eq!(r.body["code"], "NODE_FENCED", "{:?}", r.body);
    let sid = ended["sessionId"].as_str().unwrap();
    nodes[0].wait_no_agent_pids(Duration::from_secs(15)).await;
    for n in nodes.iter() {
        let s = n.session("late", sid).await;
        assert_eq!(s["endReason"], "lost", "{s}");
        assert_eq!(s["endedAt"], ended["endedAt"], "{s}");
        assert!(s["botStartSeconds"].is_null(), "{s}");
    }
}

/// Signal numbers (Linux).
mod libc_sig {
    pub const SIGCONT: i32 = 18;
}

/// A session of `agent` started on `n` once it serves again after a database outage (503s
/// meanwhile, nothing else); its id.
async fn start_after_outage(n: &Server, agent: &str) -> String {
    wait_for(
        Duration::from_secs(30),
        "the node to take a new session after the outage",
        || async {
            let r = n.start_session(agent, json!({})).await;
            if r.status == 200 {
                return Some(r.body["sessionId"].as_str().unwrap().to_string());
            }
            assert_eq!(r.status, 503, "{:?}", r.body);
            None
        },
    )
    .await
}

/// A node alone on its database, cut off from it for longer than the node timeout: nobody
/// takes it over, so once the database is back it finds every record still its own and
/// keeps everything: its session runs on and ends normally, and it takes new sessions again.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_node_cut_off_from_its_database_keeps_its_sessions() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 1, "1", &[], ("alone", json!({}))).await;
    let nodes = &cluster.nodes;
    let n = &nodes[0];
    let sid = n.start_ok("alone").await;
    let (st, info) = session_pid(n, "alone", &sid).await;
    assert_eq!(st, 200, "{info}");
    let pid = info["pid"].as_i64().unwrap() as i32;
    pg.pg_stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.pg_start();
    let fresh = start_after_outage(n, "alone").await;
    assert!(
        pid_alive(pid),
        "the outage ended a session nobody took over"
    );
    let s = n.session("alone", &sid).await;
    assert!(s["endedAt"].is_null(), "{s}");
    for id in [&sid, &fresh] {
        let r = n.stop("alone", id).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(n.session("alone", id).await["endReason"], "stopped");
    }
    assert!(!pid_alive(pid));
}

/// Two live nodes cut off from their database together, for longer than the node timeout:
/// once it is back, neither takes the other over (both lived all along; their heartbeats were
/// stale only because nobody could write one), so both sessions run on and stop normally.
#[tokio::test(flavor = "multi_thread")]
async fn live_nodes_cut_off_from_their_database_together_take_nothing_over() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 2, "2", &[], ("both", json!({}))).await;
    let nodes = &cluster.nodes;
    let mut sessions = Vec::new();
    for n in nodes {
        let sid = n.start_ok("both").await;
        let (st, info) = session_pid(n, "both", &sid).await;
        assert_eq!(st, 200, "{info}");
        sessions.push((sid, info["pid"].as_i64().unwrap() as i32));
    }
    pg.pg_stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg.pg_start();
    for n in nodes {
        let probe = start_after_outage(n, "both").await;
        assert_eq!(n.stop("both", &probe).await.status, 200);
    }
    // Two and a half node timeouts more: long enough for a takeover to have happened.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (sid, pid) in &sessions {
        let s = nodes[0].session("both", sid).await;
        assert!(s["endedAt"].is_null(), "a live node's session ended: {s}");
        assert!(pid_alive(*pid), "a live node's session lost its process");
    }
    for (i, (sid, pid)) in sessions.iter().enumerate() {
        let r = nodes[1 - i].stop("both", sid).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(nodes[i].session("both", sid).await["endReason"], "stopped");
        assert!(!pid_alive(*pid));
    }
}

/// A stop sent through another node as soon as the database is back from an outage longer
/// than the node timeout: the owner's heartbeat is stale then only because nobody could write
/// one, so the stop waits for it to heartbeat again and is carried out by it (`stopped`, the
/// process gone at the 200), instead of taking the live owner over and ending its session
/// `lost` with its process still running. (Found by a three-node fault-injection trial.)
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_through_another_node_right_after_an_outage_reaches_the_live_owner() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 2, "2", &[], ("owned", json!({}))).await;
    let nodes = &cluster.nodes;
    let sid = nodes[0].start_ok("owned").await;
    let (st, info) = session_pid(&nodes[0], "owned", &sid).await;
    assert_eq!(st, 200, "{info}");
    let pid = info["pid"].as_i64().unwrap() as i32;
    pg.pg_stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg.pg_start();
    // A connection the restart broke fails once (503 STORAGE_UNAVAILABLE); anything else is
    // the stop's answer.
    let r = wait_for(Duration::from_secs(20), "the stop's answer", || async {
        let r = nodes[1].stop("owned", &sid).await;
        (r.status != 503 || r.body["code"] != "STORAGE_UNAVAILABLE").then_some(r)
    })
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!pid_alive(pid), "the 200 came while the process ran");
    let s = nodes[0].session("owned", &sid).await;
    assert_eq!(s["endReason"], "stopped", "{s}");
}

/// A second `cattery serve` with a live node's `--node-id` and another address is refused at
/// start, naming the node and its address, and the live node's session is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_a_live_nodes_id_is_refused() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 1, "10", &[], ("dup", json!({}))).await;
    let n1 = &cluster.nodes[0];
    let sid = n1.start_ok("dup").await;
    let (st, info) = session_pid(n1, "dup", &sid).await;
    assert_eq!(st, 200, "{info}");
    let pid = info["pid"].as_i64().unwrap() as i32;
    let port = crate::common::free_port();
    let err = start_refused(
        &pg,
        port,
        &[
            "--node-id",
            "n1",
            "--advertise-url",
            &format!("http://127.0.0.1:{port}"),
        ],
    )
    .await;
    assert!(
        err.contains(&format!(
            "node id n1 is in use by a live node at {}",
            n1.base
        )),
        "{err}"
    );
    assert!(pid_alive(pid));
    let s = n1.session("dup", &sid).await;
    assert!(s["endedAt"].is_null(), "{s}");
    assert_eq!(n1.stop("dup", &sid).await.status, 200);
    assert_eq!(n1.session("dup", &sid).await["endReason"], "stopped");
}

/// A node that cannot listen (its port is taken) exits before it writes a heartbeat: no
/// phantom live node at another node's address stays listed (it would take a warm-pool share,
/// and its id would be refused as in use), and the same id is not refused as in use.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_cannot_listen_leaves_no_heartbeat() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 1, "10", &[], ("taken", json!({}))).await;
    let n1 = &cluster.nodes[0];
    let err = start_refused(
        &pg,
        n1.port,
        &["--node-id", "n9", "--advertise-url", &n1.base],
    )
    .await;
    assert!(err.contains("cannot listen on"), "{err}");
    assert_eq!(
        node_count(n1).await,
        1,
        "the node that never served is listed"
    );
    // The same id on a free port is not taken for a live node's (this node has its own
    // secrets key, so it is refused for that, a check that comes after the id's).
    let port = crate::common::free_port();
    let err = start_refused(
        &pg,
        port,
        &[
            "--node-id",
            "n9",
            "--advertise-url",
            &format!("http://127.0.0.1:{port}"),
        ],
    )
    .await;
    assert!(!err.contains("is in use by a live node"), "{err}");
    assert!(err.contains("secrets key"), "{err}");
}

/// A node started on a restored copy of the cluster's database, with the same cluster secret
/// and secrets key, while the cluster runs: the copy's node list names the live nodes, but
/// they do not find the new node in their own database, so it is refused at start (before,
/// it started, and its stops and proxied requests reached the live cluster's sessions).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_on_a_restored_copy_of_the_database_is_refused_by_the_live_cluster() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 1, "10", &[], ("copied", json!({}))).await;
    let n1 = &cluster.nodes[0];
    let sid = n1.start_ok("copied").await;
    let copy = pg.url_of("restored");
    pg.psql(&["-c", "CREATE DATABASE restored"]);
    pg.copy_database("postgres", "restored");
    let dir = cluster.key_dir.path();
    let port = crate::common::free_port();
    let err = start_refused_on(
        &copy,
        port,
        &[
            "--node-id",
            "restored-1",
            "--advertise-url",
            &format!("http://127.0.0.1:{port}"),
            "--secrets-key-file",
            &dir.join("secrets.key").display().to_string(),
            "--cluster-secret-file",
            &dir.join("cluster.secret").display().to_string(),
        ],
    )
    .await;
    assert!(
        err.contains("does not find this node in its database"),
        "{err}"
    );
    assert!(n1.session("copied", &sid).await["endedAt"].is_null());
    // Its own advertise URL reaches it, and it says so.
    wait_for(Duration::from_secs(20), "the advertise URL's check", || {
        let log = n1.log();
        async move { log.contains("--advertise-url reaches it").then_some(()) }
    })
    .await;
    assert!(!n1.log().contains("does not reach it"), "{}", n1.log());
    assert_eq!(n1.stop("copied", &sid).await.status, 200);
}

/// A node whose `--advertise-url` does not reach it (here a port nothing listens on; in the
/// trial, `https://` in front of a plain HTTP listener) says so in an ERROR once it serves,
/// naming the URL, instead of leaving it to the first stop another node forwards to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_advertise_url_does_not_reach_it_says_so() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let keys = Cluster::new(&pg.url(), &[]);
    let dir = keys.key_dir.path();
    let wrong = format!("http://127.0.0.1:{}", crate::common::free_port());
    let s = Server::start_with_env(
        &[
            "--advertise-url",
            &wrong,
            "--secrets-key-file",
            &dir.join("secrets.key").display().to_string(),
            "--cluster-secret-file",
            &dir.join("cluster.secret").display().to_string(),
        ],
        &[("CATTERY_DATABASE_URL", &pg.url())],
    )
    .await;
    wait_for(Duration::from_secs(20), "the advertise URL's check", || {
        let log = s.log();
        async move { log.contains("does not reach it").then_some(()) }
    })
    .await;
    assert!(s.log().contains(&wrong), "{}", s.log());
}

/// Runs `cattery serve` on `port` with `args` on `pg`'s database and expects it to refuse to
/// start (exit with an error within 60 s); returns its stderr.
async fn start_refused(pg: &PgCluster, port: u16, args: &[&str]) -> String {
    start_refused_on(&pg.url(), port, args).await
}

/// [`start_refused`] on the database at `url`.
async fn start_refused_on(url: &str, port: u16, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(crate::common::cattery_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .args(args)
        .env("CATTERY_DATABASE_URL", url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if began.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cattery serve {args:?} started (it should have been refused)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

/// A node started with another `--secrets-key-file` than a live node's is refused at start,
/// naming that node, even before any secret is stored (nothing would show the difference
/// until a secret one node sealed failed to open on the other).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_another_secrets_key_is_refused() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut cluster = start_nodes(&pg, 1, "10", &[], ("keyed", json!({}))).await;
    let keys = tempfile::tempdir().unwrap();
    let other = keys.path().join("other.key");
    crate::common::write_private(&other, &[0x42u8; 32]);
    let port = crate::common::free_port();
    let err = start_refused(
        &pg,
        port,
        &[
            "--node-id",
            "n2",
            "--secrets-key-file",
            other.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        err.contains("this node's secrets key is not the one of live node n1"),
        "{err}"
    );
    // The refused node wrote nothing: the cluster has one node. With the cluster's key, a
    // second node joins.
    assert_eq!(node_count(&cluster.nodes[0]).await, 1);
    cluster.add_node().await;
    assert_eq!(node_count(&cluster.nodes[0]).await, 2);
}

/// A node whose `--cluster-secret-file` differs from the cluster's is refused at start, from
/// what a live node's heartbeat shows of its secret, instead of at the first forwarded call;
/// it leaves no heartbeat behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_another_cluster_secret_is_refused() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let cluster = start_nodes(&pg, 1, "10", &[], ("secret", json!({}))).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("cluster.secret");
    std::fs::write(&wrong, format!("{SECRET}-not-the-same\n")).unwrap();
    let key = cluster.key_dir.path().join("secrets.key");
    let port = crate::common::free_port();
    let err = start_refused(
        &pg,
        port,
        &[
            "--node-id",
            "n2",
            "--advertise-url",
            &format!("http://127.0.0.1:{port}"),
            "--secrets-key-file",
            key.to_str().unwrap(),
            "--cluster-secret-file",
            wrong.to_str().unwrap(),
        ],
    )
    .await;
    // Seen in n1's heartbeat, before any call to it.
    assert!(
        err.contains("live node n1 has another cluster secret than this node"),
        "{err}"
    );
    assert_eq!(node_count(&cluster.nodes[0]).await, 1);
}

/// How many nodes `n` lists.
async fn node_count(n: &Server) -> usize {
    let r = n.req("GET", "/v1/cluster/nodes", Some(&n.sk), None).await;
    r.body["nodes"].as_array().unwrap().len()
}

/// What a load balancer polls: `/ready` answers 200 while the node takes new sessions and 503
/// `DRAINING` from the start of its drain, while `/health` (liveness) stays 200 and the
/// draining node's session is still stoppable.
#[tokio::test(flavor = "multi_thread")]
async fn ready_answers_503_while_the_node_drains_and_health_stays_200() {
    let s = Server::start(&[]).await;
    s.deploy("lb", &[], json!({})).await;
    let r = s.req("GET", "/ready", None, None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"status": "ready"}));
    let sid = s.start_ok("lb").await;
    s.signal(15);
    let r = wait_for(Duration::from_secs(10), "/ready to answer 503", || async {
        let r = s.req("GET", "/ready", None, None).await;
        (r.status != 200).then_some(r)
    })
    .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.body["code"], "DRAINING", "{:?}", r.body);
    assert!(r.body["error"].is_string(), "{:?}", r.body);
    assert_eq!(s.req("GET", "/health", None, None).await.status, 200);
    let r = s.start_session("lb", json!({})).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(s.stop("lb", &sid).await.status, 200);
}

/// A node whose drain finds no session left goes on answering as draining for its
/// `--drain-linger-seconds` (starts and `/ready` 503, so a load balancer's check takes it out
/// before its port closes under a start), and a second signal cuts that short.
#[tokio::test(flavor = "multi_thread")]
async fn a_drained_node_answers_draining_for_its_linger_and_a_second_signal_ends_it() {
    let mut s = Server::start(&["--drain-linger-seconds", "60"]).await;
    s.deploy("lb", &[], json!({})).await;
    s.signal(15);
    // With no session to wait for, the drain itself ends within a few hundred ms: without
    // the linger the server is gone by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = s.req("GET", "/ready", None, None).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.body["code"], "DRAINING", "{:?}", r.body);
    let r = s.start_session("lb", json!({})).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(
        s.terminate(Duration::from_secs(20)).is_some(),
        "a second signal ends the linger"
    );
}

/// `curl` with the test certificate trusted: (status, JSON body or `Null`).
fn curl_tls(
    cert: &std::path::Path,
    method: &str,
    url: &str,
    key: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-m", "30", "-w", "\n%{http_code}", "-X", method])
        .arg("--cacert")
        .arg(cert)
        .args(["-H", &format!("Authorization: Bearer {key}")]);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
    }
    let out = cmd.arg(url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// Node `n<i>` of `c` serving HTTPS only (`--tls-cert`/`--tls-key`), with an `https://`
/// advertise URL; `SSL_CERT_FILE` makes it trust the test certificate when it calls a peer.
async fn tls_node(
    c: &Cluster,
    i: usize,
    (ca, cert, key): (&std::path::Path, &std::path::Path, &std::path::Path),
) -> Server {
    let port = crate::common::free_port();
    let dir = c.key_dir.path();
    let args: Vec<String> = vec![
        "--node-id".into(),
        format!("n{i}"),
        "--advertise-url".into(),
        format!("https://127.0.0.1:{port}"),
        "--secrets-key-file".into(),
        dir.join("secrets.key").display().to_string(),
        "--cluster-secret-file".into(),
        dir.join("cluster.secret").display().to_string(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    let mut s = Server {
        child: None,
        port,
        base: format!("https://127.0.0.1:{port}"),
        sk: String::new(),
        pk: String::new(),
        http: reqwest::Client::new(),
        args,
        tag: uuid::Uuid::new_v4().to_string(),
        env: c.nodes_env(),
        nofile: None,
        inherited_fd: None,
        dir: tempfile::tempdir().unwrap(),
    };
    let log = std::fs::File::create(s.dir.path().join("server.log")).unwrap();
    let child = std::process::Command::new(crate::common::cattery_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(s.dir.path())
        .args(&s.args)
        .env("CATTERY_LOG", "info,cattery=debug")
        .env("SSL_CERT_FILE", ca)
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log))
        .spawn()
        .unwrap();
    s.child = Some(child);
    wait_for(Duration::from_secs(30), "cattery listening", || async {
        s.log().contains("cattery listening").then_some(())
    })
    .await;
    s.sk = s.key("private", "default");
    s.pk = s.key("public", "default");
    s
}

/// `https://` advertise URLs: nodes serving TLS only forward a proxied request and a stop to
/// each other over HTTPS (the stop answers 200 only once the process is gone).
#[tokio::test(flavor = "multi_thread")]
async fn nodes_with_https_advertise_urls_forward_over_tls() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    // A test CA and a certificate for 127.0.0.1 it signed (rustls refuses a CA certificate
    // as a server's own).
    let certs = tempfile::tempdir().unwrap();
    let p = |f: &str| certs.path().join(f);
    let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(
        p("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .current_dir(certs.path())
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=cattery-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext",
        "-out",
        "cert.pem",
    ]);
    let c = Cluster::new(&pg.url(), &[]);
    let n1 = tls_node(&c, 1, (&ca, &cert, &key)).await;
    let n2 = tls_node(&c, 2, (&ca, &cert, &key)).await;
    let cmd = json!([crate::common::test_agent().display().to_string()]);
    let body = json!({"serviceName": "tls", "command": cmd, "env": {"CATTERY_TEST_TAG": n2.tag}});
    let (st, b) = curl_tls(
        &ca,
        "POST",
        &format!("{}/v1/agents", n1.base),
        &n1.sk,
        Some(&body),
    );
    assert_eq!(st, 200, "{b}");
    let sid = wait_for(
        Duration::from_secs(15),
        "node 2 to start a session",
        || async {
            let (st, b) = curl_tls(
                &ca,
                "POST",
                &format!("{}/v1/public/tls/start", n2.base),
                &n2.pk,
                Some(&json!({})),
            );
            (st == 200).then(|| b["sessionId"].as_str().unwrap().to_string())
        },
    )
    .await;
    let (st, info) = curl_tls(
        &ca,
        "GET",
        &format!("{}/v1/public/tls/sessions/{sid}/info", n1.base),
        &n1.pk,
        None,
    );
    assert_eq!(st, 200, "proxied through node 1 over https: {info}");
    let pid = info["pid"].as_i64().unwrap() as i32;
    assert!(pid_alive(pid));
    let (st, b) = curl_tls(
        &ca,
        "DELETE",
        &format!("{}/v1/agents/tls/sessions/{sid}", n1.base),
        &n1.sk,
        None,
    );
    assert_eq!(st, 200, "stop forwarded over https: {b}");
    assert!(
        !pid_alive(pid),
        "DELETE answered while the process {pid} still runs"
    );
}

/// A node detaching (`--on-stop detach`) on a shared database counts the sessions it leaves
/// running for its next server: its own, not the other nodes'. The other node's session runs
/// on, untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_detaching_node_counts_its_own_sessions_only() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut cluster = start_nodes(&pg, 2, "10", &["--on-stop", "detach"], ("det", json!({}))).await;
    let on_n1 = cluster.nodes[0].start_ok("det").await;
    let on_n1_too = cluster.nodes[0].start_ok("det").await;
    let on_n2 = cluster.nodes[1].start_ok("det").await;
    let (st, info) = session_pid(&cluster.nodes[1], "det", &on_n2).await;
    assert_eq!(st, 200, "{info}");
    let pid = info["pid"].as_i64().unwrap() as i32;
    let n2 = &mut cluster.nodes[1];
    let st = n2.terminate(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "detach exits 0: {st:?}");
    let log = n2.log();
    assert!(
        log.lines().any(
            |l| l.contains("detached: instances left running") && l.contains("open_sessions=1")
        ),
        "{log}"
    );
    assert!(pid_alive(pid), "the detached node's instance runs on");
    let n1 = &cluster.nodes[0];
    for sid in [&on_n1, &on_n1_too] {
        assert!(n1.session("det", sid).await["endedAt"].is_null());
        assert_eq!(n1.stop("det", sid).await.status, 200);
    }
    // The detached node's instance is its next server's to re-adopt; stopped here by pid
    // (this test's own process).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Two nodes started at the same moment with different secrets keys on an empty database:
/// however their starts interleave, they never both run (each writes its heartbeat before it
/// reads the others' again: `core::cluster::announce`).
#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_started_together_with_different_keys_never_both_run() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let key = d.path().join("secrets.key");
        crate::common::write_private(&key, &[i as u8 + 1; 32]);
        let port = crate::common::free_port();
        let child = std::process::Command::new(crate::common::cattery_bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--node-id",
            ])
            .arg(format!("n{i}"))
            .arg("--data-dir")
            .arg(d.path().join("data"))
            .arg("--secrets-key-file")
            .arg(&key)
            .env("CATTERY_DATABASE_URL", pg.url())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        nodes.push((child, port));
    }
    // Each either exits (refused) or answers; bounded.
    let began = Instant::now();
    let (mut running, mut refused) = (Vec::new(), Vec::new());
    for (mut child, port) in nodes {
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                assert!(!st.success(), "{err}");
                refused.push(err);
                break;
            }
            let up = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
            if up.is_ok_and(|r| r.status() == 200) {
                running.push(child);
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "a node neither ran nor exited"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let both = refused.is_empty();
    // Stopped by pid (ours) before any failure.
    for mut c in running {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(!both, "two nodes with different secrets keys both run");
    assert!(
        refused.iter().all(|e| e.contains("secrets key")),
        "{refused:?}"
    );
}
