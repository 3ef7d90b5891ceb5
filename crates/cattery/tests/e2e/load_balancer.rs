//! Nodes behind the load balancer recipe of `docs/cluster.md` (`deploy/haproxy/cattery.cfg`,
//! with this test's addresses): two nodes on one PostgreSQL database, every request through
//! HAProxy; and one node behind the recipe with TLS ended at the balancer. Without `haproxy`
//! installed the tests say so and pass, unless `CATTERY_REQUIRE_HAPROXY` is set (as `.ci/run`
//! does).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{free_port, py_env_dir, test_agent, wait_for, Cluster, Server};
use crate::postgres::PgCluster;

/// HAProxy running the recipe's configuration in front of `nodes` (base URLs); killed (by its
/// pid) when dropped.
struct Haproxy {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// With `tls` (a file holding a certificate and its key), the recipe's TLS `bind` line
    /// instead of its plain one.
    fn start(nodes: &[String], tls: Option<&Path>) -> Option<Haproxy> {
        let Some(bin) = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            assert!(
                std::env::var_os("CATTERY_REQUIRE_HAPROXY").is_none(),
                "CATTERY_REQUIRE_HAPROXY is set but haproxy is not installed"
            );
            eprintln!("haproxy is not installed: the load balancer test is skipped");
            return None;
        };
        let recipe = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/haproxy/cattery.cfg"),
        )
        .unwrap();
        let port = free_port();
        // The recipe as written, but for its addresses: this test's port, and each group of
        // `server` lines (`node-N`, `alive-N`) for this test's nodes.
        let mut cfg = String::new();
        let mut groups = Vec::new();
        let mut bound = false;
        for line in recipe.lines() {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("server ") {
                let mut words = rest.split_whitespace();
                let name = words.next().unwrap();
                let prefix = name
                    .trim_end_matches(|c: char| c.is_ascii_digit())
                    .to_string();
                let _addr = words.next();
                let flags = words.collect::<Vec<_>>().join(" ");
                if !groups.contains(&prefix) {
                    for (i, n) in nodes.iter().enumerate() {
                        let addr = n.trim_start_matches("http://");
                        cfg.push_str(&format!("    server {prefix}{} {addr} {flags}\n", i + 1));
                    }
                    groups.push(prefix);
                }
                continue;
            }
            if t.starts_with("bind :") && tls.is_none() {
                cfg.push_str(&format!("    bind 127.0.0.1:{port}\n"));
                bound = true;
                continue;
            }
            if t.starts_with("bind :") {
                continue;
            }
            if let (Some(pem), Some(rest)) = (tls, t.strip_prefix("# bind :443 ssl crt ")) {
                let (_path, flags) = rest.split_once(' ').unwrap();
                let pem = pem.display();
                cfg.push_str(&format!(
                    "    bind 127.0.0.1:{port} ssl crt {pem} {flags}\n"
                ));
                bound = true;
                continue;
            }
            cfg.push_str(line);
            cfg.push('\n');
        }
        assert_eq!(groups, ["node-", "alive-"], "{cfg}");
        assert!(bound, "the recipe's bind line: {cfg}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        Some(Haproxy {
            child,
            base: format!("{scheme}://127.0.0.1:{port}"),
            _dir: dir,
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request through the balancer: status and JSON body (`Value::Null` when the body is not
/// JSON).
async fn via(lb: &Haproxy, method: &str, path: &str, key: &str) -> (u16, Value) {
    let http = reqwest::Client::new();
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut rb = http
        .request(m, format!("{}{path}", lb.base))
        .bearer_auth(key)
        .timeout(Duration::from_secs(60));
    if method == "POST" {
        rb = rb.json(&json!({}));
    }
    let r = rb.send().await.expect("request through the balancer");
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// Through the recipe's HAProxy: starts spread over both nodes; while node 2 drains, every
/// start succeeds (its 503s are sent on to node 1 and its `/ready` takes it out) and every
/// stop answers 200, node 2's own sessions included; while the database is down a start gets
/// Cattery's own 503 `{error, code}` and not a balancer's page, also once the outage outlasts
/// the node timeout and no node is ready; then service comes back.
#[tokio::test(flavor = "multi_thread")]
async fn the_load_balancer_recipe_routes_around_a_drain_and_passes_an_outage_on() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let mut c = Cluster::new(&pg.url(), &["--node-timeout", "5"]);
    c.add_node().await.deploy("lb", &[], json!({})).await;
    c.add_node().await;
    let bases: Vec<String> = c.nodes.iter().map(|n| n.base.clone()).collect();
    let Some(lb) = Haproxy::start(&bases, None) else {
        return;
    };
    let (pk, sk) = (c.nodes[0].pk.clone(), c.nodes[0].sk.clone());
    wait_for(Duration::from_secs(10), "the balancer serving", || async {
        let r = reqwest::get(format!("{}/ready", lb.base)).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    // Starts through the balancer land on both nodes.
    let mut sessions = Vec::new();
    for _ in 0..6 {
        let (st, body) = via(&lb, "POST", "/v1/public/lb/start", &pk).await;
        assert_eq!(st, 200, "{body}");
        sessions.push(body["sessionId"].as_str().unwrap().to_string());
    }
    // Node 2's heartbeat (every second here) counts its busy instances.
    wait_for(Duration::from_secs(10), "sessions on node 2", || async {
        let r = c.nodes[0]
            .req("GET", "/v1/cluster/nodes", Some(&sk), None)
            .await;
        let nodes = r.body["nodes"].as_array()?.clone();
        let n2 = nodes.iter().find(|n| n["self"] == false)?;
        (n2["busy"].as_i64()? >= 1).then_some(())
    })
    .await;

    // Node 2 drains (its sessions keep it running): no start through the balancer fails.
    c.nodes[1].signal(15); // SIGTERM
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(3) {
        let (st, body) = via(&lb, "POST", "/v1/public/lb/start", &pk).await;
        assert_eq!(st, 200, "a start while node 2 drains: {body}");
        sessions.push(body["sessionId"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every session stops with 200, node 2's too (forwarded to it while it drains).
    for s in sessions.drain(..) {
        let (st, body) = via(&lb, "DELETE", &format!("/v1/agents/lb/sessions/{s}"), &sk).await;
        assert_eq!(st, 200, "stop {s}: {body}");
    }
    // Its sessions gone, node 2 leaves (a second SIGTERM finds nothing left to stop).
    let st = c.nodes[1].terminate(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "node 2's drain: {st:?}");

    // The database down: Cattery's own 503, with its error body, through the balancer; also
    // once the outage outlasts the node timeout and the node fences itself (its `/ready`
    // answers 503, so no node is in rotation and the nodes alive take the traffic).
    pg.pg_stop();
    let (st, body) = via(&lb, "POST", "/v1/public/lb/start", &pk).await;
    assert_eq!(st, 503, "{body}");
    assert!(
        body["error"].is_string() && body["code"].is_string(),
        "a 503 of Cattery's: {body}"
    );
    let n1 = &c.nodes[0];
    wait_for(Duration::from_secs(30), "node 1 fenced", || async {
        let r = reqwest::get(format!("{}/ready", n1.base)).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    // The node says so in its log, once.
    wait_for(
        Duration::from_secs(10),
        "node 1 saying it is fenced",
        || async {
            n1.log()
                .contains("fenced: no heartbeat recorded")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // HAProxy's next checks
    let (st, body) = via(&lb, "POST", "/v1/public/lb/start", &pk).await;
    assert_eq!(st, 503, "{body}");
    assert!(
        body["error"].is_string() && body["code"].is_string(),
        "a 503 of Cattery's while no node is ready: {body}"
    );
    pg.pg_start();
    let sid = wait_for(Duration::from_secs(30), "service back", || async {
        let (st, body) = via(&lb, "POST", "/v1/public/lb/start", &pk).await;
        (st == 200).then(|| body["sessionId"].as_str().unwrap().to_string())
    })
    .await;
    let (st, body) = via(&lb, "DELETE", &format!("/v1/agents/lb/sessions/{sid}"), &sk).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        c.nodes[0]
            .log()
            .matches("fenced: no heartbeat recorded")
            .count(),
        1,
        "said once per outage"
    );
}

/// A start through the balancer over https that sends its own `Forwarded`,
/// `X-Forwarded-Proto` and `X-Forwarded-Host`: prints the `wsUrl` it is handed, or the status
/// of `GET /ready` with `ready` as the fourth argument.
const SPOOF_SCRIPT: &str = r#"
import json, ssl, sys, urllib.request
base, pk, cafile = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=cafile)
if sys.argv[4:] == ["ready"]:
    try:
        print(urllib.request.urlopen(base + "/ready", context=ctx, timeout=5).status)
    except Exception as e:
        print(e)
    sys.exit(0)
req = urllib.request.Request(base + "/v1/public/tls/start", method="POST",
                             data=json.dumps({"transport": "websocket"}).encode(),
                             headers={"Authorization": "Bearer " + pk,
                                      "Content-Type": "application/json",
                                      "Forwarded": "proto=http;host=evil.example",
                                      "X-Forwarded-Proto": "http",
                                      "X-Forwarded-Host": "evil.example"})
with urllib.request.urlopen(req, context=ctx) as r:
    print(json.load(r)["wsUrl"])
"#;

/// The recipe with TLS ended at the balancer (its commented `bind ... ssl` line): the official
/// SDK starts a session through it over https; the `wsUrl` Cattery hands out is `wss://` on the
/// balancer's address and frames pass through it; a client's own `Forwarded` and
/// `X-Forwarded-*` headers do not change that URL.
#[tokio::test(flavor = "multi_thread")]
async fn the_load_balancer_recipe_ends_tls_and_hands_out_wss_urls() {
    let py = py_env_dir().join("main/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup-python.sh",
        py.display()
    );
    let s = Server::start(&[]).await;
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = crate::web::test_certificate(certs.path());
    let pem = certs.path().join("haproxy.pem");
    let chain = std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&key).unwrap();
    std::fs::write(&pem, chain).unwrap();
    let Some(lb) = Haproxy::start(std::slice::from_ref(&s.base), Some(&pem)) else {
        return;
    };
    let python = |args: &[&str]| {
        let home = tempfile::tempdir().unwrap();
        let out = Command::new(&py)
            .args(args)
            .env("HOME", home.path())
            .env("PIPECAT_API_HOST", &lb.base)
            .env("SSL_CERT_FILE", &cert)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let cafile = cert.display().to_string();
    wait_for(
        Duration::from_secs(20),
        "the balancer serving https",
        || async {
            let out = python(&["-c", SPOOF_SCRIPT, &lb.base, "", &cafile, "ready"]);
            (out == "200").then_some(())
        },
    )
    .await;
    let cmd = json!([
        test_agent().display().to_string(),
        "--ignore-transport-close"
    ]);
    let out = python(&[
        "-c",
        crate::web::TLS_SCRIPT,
        &lb.base,
        &s.sk,
        &s.pk,
        &cmd.to_string(),
        &cafile,
    ]);
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let wss = format!(
        "wss://{}/ws/generic/tls.",
        lb.base.trim_start_matches("https://")
    );
    assert!(v["wsUrl"].as_str().unwrap().starts_with(&wss), "{v}");
    assert!(v["frame_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["sdk_session"]["endedAt"].is_null(), "{v}");

    let url = python(&["-c", SPOOF_SCRIPT, &lb.base, &s.pk, &cafile]);
    assert!(
        url.starts_with(&wss),
        "a client's own forwarding headers: {url}"
    );
}
