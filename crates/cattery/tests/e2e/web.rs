//! Browser-ready API (docs/reverse-proxy.md): CORS on the public routes (preflights over plain
//! HTTP, and a cross-origin start from headless Chromium), a private route refused
//! cross-origin, and TLS: the official SDK starts a session over `https` trusting a test
//! certificate, and the websocket URL it gets is `wss://`, which works.
//!
//! The browser test needs node, `/usr/bin/chromium` and playwright-core (looked up in
//! `$CATTERY_PLAYWRIGHT_DIR/node_modules`, default `~/.cache/cattery/playwright`, where
//! `scripts/setup-playwright.sh` installs it). Without them it says so and passes, unless
//! `CATTERY_REQUIRE_BROWSER` is set, when it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{
    cattery_bin, free_port, have_browser, playwright_dir, py_env_dir, test_agent, wait_for, Server,
    CHROMIUM,
};

/// A raw request to the server with extra headers: (status, headers).
async fn call(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap) {
    let mut rb = s.http.request(method, format!("{}{path}", s.base));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    (r.status().as_u16(), r.headers().clone())
}

/// Preflights and cross-origin calls over plain HTTP against the real server: the public
/// start is allowed from any origin by default, a private route from none; with a configured
/// public origin only that one is allowed.
#[tokio::test(flavor = "multi_thread")]
async fn cors_preflights_on_the_real_server() {
    let s = Server::start(&["--cors-private-origins", "https://admin.example"]).await;
    s.deploy("pub", &[], json!({})).await;
    let page = "http://127.0.0.1:1";
    let pre = |origin: &'static str| {
        [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
        ]
    };
    let (st, h) = call(
        &s,
        reqwest::Method::OPTIONS,
        "/v1/public/pub/start",
        &pre(page),
    )
    .await;
    assert!((200..300).contains(&st), "preflight answered {st}");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let (st, h) = call(&s, reqwest::Method::OPTIONS, "/v1/agents", &pre(page)).await;
    assert!(
        !h.contains_key("access-control-allow-origin"),
        "private route allowed {page}: {st} {h:?}"
    );
    let (_, h) = call(
        &s,
        reqwest::Method::OPTIONS,
        "/v1/agents",
        &pre("https://admin.example"),
    )
    .await;
    assert_eq!(h["access-control-allow-origin"], "https://admin.example");
}

/// A page on another loopback port starts a session with a public key from headless
/// Chromium (preflight and call); the same page's call to a private route is refused by the
/// browser.
#[tokio::test(flavor = "multi_thread")]
async fn browser_cross_origin_start() {
    if !have_browser() {
        return;
    }
    let s = Server::start(&[]).await;
    s.deploy("web", &["--ignore-transport-close"], json!({}))
        .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/cors.cjs");
    let out = Command::new("node")
        .arg(&script)
        .env("NODE_PATH", playwright_dir().join("node_modules"))
        .env("CATTERY_URL", &s.base)
        .env("CATTERY_PK", &s.pk)
        .env("CATTERY_SK", &s.sk)
        .env("CATTERY_AGENT", "web")
        .env("CATTERY_CHROMIUM", CHROMIUM)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cors.cjs failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(v["start"]["status"], 200, "{v}");
    let sid = v["start"]["body"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no sessionId: {v}"))
        .to_string();
    assert_eq!(s.session("web", &sid).await["status"], "active");
    assert!(
        v["private"]["error"].is_string(),
        "the browser let the page read a private route: {v}"
    );
    assert_eq!(s.stop("web", &sid).await.status, 200);
}

/// A self-signed certificate for 127.0.0.1 (openssl): (cert, key).
pub(crate) fn test_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// Deploys over https, starts a `/bot` session with the official SDK, then a websocket
/// session: its `wsUrl` must be `wss://`, and a client trusting the certificate gets frames
/// through it. Prints one JSON line.
pub(crate) const TLS_SCRIPT: &str = r#"
import asyncio, json, ssl, sys, urllib.request
import websockets
from pipecatcloud.session import Session, SessionParams

base, sk, pk, agent_cmd, cafile = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=cafile)

def call(method, path, key, body):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, method=method, data=data,
                                 headers={"Authorization": "Bearer " + key,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx) as r:
        return json.load(r)

async def main():
    out = {}
    call("POST", "/v1/agents", sk, {"serviceName": "tls", "command": json.loads(agent_cmd)})
    r = await Session(agent_name="tls", api_key=pk,
                      params=SessionParams(data={"hello": "tls"}, use_daily=False)).start()
    out["sdk"] = r
    out["sdk_session"] = call("GET", "/v1/agents/tls/sessions/" + r["sessionId"], sk, None)
    ws = call("POST", "/v1/public/tls/start", pk, {"transport": "websocket"})
    out["wsUrl"] = ws["wsUrl"]
    async with websockets.connect(ws["wsUrl"] + "?token=" + ws["token"], ssl=ctx) as c:
        frame = await asyncio.wait_for(c.recv(), 10)
        out["frame_bytes"] = len(frame)
    print(json.dumps(out))

asyncio.run(main())
"#;

/// With `--tls-cert`/`--tls-key` the official SDK starts a session over https (trusting a test
/// certificate through `SSL_CERT_FILE`), and the websocket URL is `wss://` and works.
#[tokio::test(flavor = "multi_thread")]
async fn tls_sdk_start_and_wss_url() {
    let py = py_env_dir().join("main/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup-python.sh",
        py.display()
    );
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(certs.path());
    let port = free_port();
    let mut s = Server {
        child: None,
        port,
        dir: tempfile::tempdir().unwrap(),
        base: format!("https://127.0.0.1:{port}"),
        sk: String::new(),
        pk: String::new(),
        http: reqwest::Client::new(),
        args: Vec::new(),
        tag: uuid::Uuid::new_v4().to_string(),
        env: Vec::new(),
        nofile: None,
        inherited_fd: None,
    };
    let log = std::fs::File::create(s.dir.path().join("server.log")).unwrap();
    let child = Command::new(cattery_bin())
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(s.dir.path())
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("CATTERY_LOG", "info,cattery=debug")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    s.child = Some(child);
    wait_for(Duration::from_secs(30), "cattery listening", || async {
        s.log().contains("cattery listening").then_some(())
    })
    .await;
    s.sk = s.key("private", "default");
    s.pk = s.key("public", "default");
    let cmd = json!([
        test_agent().display().to_string(),
        "--ignore-transport-close"
    ]);
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(&py)
        .arg("-c")
        .arg(TLS_SCRIPT)
        .arg(&s.base)
        .arg(&s.sk)
        .arg(&s.pk)
        .arg(cmd.to_string())
        .arg(&cert)
        .env("HOME", home.path())
        .env("PIPECAT_API_HOST", &s.base)
        .env("SSL_CERT_FILE", &cert)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    let v: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    let sid = v["sdk"]["sessionId"]
        .as_str()
        .expect("sessionId")
        .to_string();
    assert!(
        v["wsUrl"]
            .as_str()
            .unwrap()
            .starts_with(&format!("wss://127.0.0.1:{port}/ws/generic/tls.")),
        "{v}"
    );
    assert!(v["frame_bytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["sdk_session"]["sessionId"], sid.as_str(), "{v}");
    assert!(v["sdk_session"]["endedAt"].is_null(), "{v}");
    assert!(
        s.log().contains("https://127.0.0.1"),
        "the banner names https"
    );
}
