//! The live paths, each next to the same traffic sent straight to an instance in the same
//! run: the Session API proxy (keep-alive clients at several concurrencies: latency and
//! requests per second) and the websocket relay (text echo round trip; arrival jitter of a
//! 50 frames/s stream of 20 ms frames in each direction, sent at the same time as a call does).
//!
//! The direct leg is a `cattery-test-agent` the bench spawns itself (same binary, `PORT` set,
//! tagged like the agents Cattery runs); the proxied leg is an instance Cattery runs.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::Ctx;
use crate::report::Target;
use crate::stats::{ms, summarize};

/// Nominal spacing of audio frames (20 ms of audio at 50 frames/s).
const FRAME: Duration = Duration::from_millis(20);
/// Uplink frame: 20 ms of 16 kHz 16-bit mono (the agent's own frames are 320 bytes).
const UPLINK_BYTES: usize = 640;

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

/// A test agent spawned by the bench (the direct leg); killed on drop.
struct Direct {
    child: Child,
    port: u16,
}

impl Direct {
    fn spawn(ctx: &Ctx) -> anyhow::Result<Direct> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&ctx.bins.agent)
            .env("PORT", port.to_string())
            .env("CATTERY_BENCH_TAG", &ctx.tag)
            .env("CATTERY_BENCH_AGENT", "live-direct")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the direct test agent")?;
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("the direct test agent did not listen within 10 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Direct { child, port })
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        crate::sys::signal(self.child.id() as i32, libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// One load run: `c` workers, each with its own keep-alive connection, `per_worker`
/// sequential requests (after one untimed request that opens the connection).
/// Returns the latencies (ms), requests per second over the timed part, and failures.
async fn load(
    url: &str,
    bearer: Option<&str>,
    c: usize,
    per_worker: usize,
) -> (Vec<f64>, f64, usize) {
    let mut clients = Vec::with_capacity(c);
    for _ in 0..c {
        let cl = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(1)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("building an HTTP client");
        clients.push(cl);
    }
    let one = |cl: reqwest::Client, url: String, bearer: Option<String>| async move {
        let mut req = cl.get(&url);
        if let Some(b) = &bearer {
            req = req.bearer_auth(b);
        }
        let t0 = Instant::now();
        let ok = match req.send().await {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        (ok, ms(t0.elapsed()))
    };
    // Open every connection first.
    let warm = clients
        .iter()
        .map(|cl| tokio::spawn(one(cl.clone(), url.to_string(), bearer.map(str::to_string))));
    futures_util::future::join_all(warm).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(c));
    let t0 = Instant::now();
    let workers = clients.into_iter().map(|cl| {
        let (url, bearer, barrier) = (url.to_string(), bearer.map(str::to_string), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let mut lat = Vec::with_capacity(per_worker);
            let mut failed = 0;
            for _ in 0..per_worker {
                let (ok, t) = one(cl.clone(), url.clone(), bearer.clone()).await;
                if ok {
                    lat.push(t);
                } else {
                    failed += 1;
                }
            }
            (lat, failed)
        })
    });
    let mut lat = Vec::new();
    let mut failed = 0;
    for r in futures_util::future::join_all(workers).await {
        match r {
            Ok((l, f)) => {
                lat.extend(l);
                failed += f;
            }
            Err(_) => failed += per_worker,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let rps = if secs > 0.0 {
        lat.len() as f64 / secs
    } else {
        0.0
    };
    (lat, rps, failed)
}

/// What one websocket run measured.
struct WsRun {
    /// Text echo round trips, ms.
    rtt: Vec<f64>,
    /// Arrival jitter of the agent's 50 frames/s stream, ms (lateness over the earliest).
    down: Vec<f64>,
    /// Delay variation of the bench's 50 frames/s stream, echoed back, ms (round trip of
    /// each frame minus the smallest).
    up: Vec<f64>,
}

/// Delay variation: each value minus the smallest.
fn over_min(v: &[f64]) -> Vec<f64> {
    let m = v.iter().copied().fold(f64::INFINITY, f64::min);
    v.iter().map(|x| x - m).collect()
}

/// Drives one websocket session: `pings` text echoes one after another, then `frames`
/// 20 ms frames each way at once (the agent sends 320-byte frames on its own every 20 ms;
/// the bench sends 640-byte frames every 20 ms, which the agent echoes).
async fn ws_run(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
    pings: usize,
    frames: usize,
) -> anyhow::Result<WsRun> {
    // A small read buffer (tungstenite zero-fills the whole buffer before each read).
    let conf = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(conf), true)
        .await
        .context("websocket connect")?;
    if let Some(s) = ws_tcp(&ws) {
        let _ = s.set_nodelay(true);
    }
    let (mut tx, mut rx) = ws.split();
    // Text echo round trips (the agent's audio frames arrive in between and are skipped).
    let mut rtt = Vec::with_capacity(pings);
    for i in 0..pings + 20 {
        let text = format!("ping {i}");
        let t0 = Instant::now();
        tx.send(Message::text(text.clone())).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => break,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => bail!("websocket read: {e}"),
                Ok(None) => bail!("websocket closed during the echo test"),
                Err(_) => bail!("no echo within 10 s"),
            }
        }
        if i >= 20 {
            rtt.push(ms(t0.elapsed()));
        }
    }
    // Both streams at once.
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = Vec::with_capacity(frames);
        let mut next = start;
        for i in 0..frames {
            tokio::time::sleep_until(next.into()).await;
            let mut payload = vec![0u8; UPLINK_BYTES];
            payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
            sent.push(start.elapsed());
            if tx.send(Message::binary(payload)).await.is_err() {
                break;
            }
            next += FRAME;
        }
        (tx, sent)
    });
    let mut down_at = Vec::with_capacity(frames);
    let mut up_at = vec![None; frames];
    let deadline = start + FRAME * frames as u32 + Duration::from_secs(5);
    while (down_at.len() < frames || up_at.iter().any(Option::is_none)) && Instant::now() < deadline
    {
        match tokio::time::timeout_at(deadline.into(), rx.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                let at = start.elapsed();
                if b.len() == UPLINK_BYTES {
                    let i = u64::from_be_bytes(b[..8].try_into().expect("8 bytes")) as usize;
                    if let Some(slot) = up_at.get_mut(i) {
                        *slot = Some(at);
                    }
                } else if down_at.len() < frames {
                    down_at.push(at);
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => bail!("websocket read: {e}"),
            Ok(None) => bail!("websocket closed during the stream test"),
            Err(_) => break,
        }
    }
    let (mut tx, sent) = sender.await?;
    let _ = tx.send(Message::Close(None)).await;
    // Downlink: lateness of frame i against the first frame plus i x 20 ms.
    let down: Vec<f64> = match down_at.first() {
        Some(first) => down_at
            .iter()
            .enumerate()
            .map(|(i, a)| ms(*a) - ms(*first) - i as f64 * ms(FRAME))
            .collect(),
        None => Vec::new(),
    };
    let up: Vec<f64> = sent
        .iter()
        .zip(&up_at)
        .filter_map(|(s, a)| a.map(|a| ms(a) - ms(*s)))
        .collect();
    if down.len() < frames || up.len() < frames {
        bail!(
            "stream test: {} of {frames} agent frames and {} of {frames} echoed frames arrived",
            down.len(),
            up.len()
        );
    }
    Ok(WsRun {
        rtt,
        down: over_min(&down),
        up: over_min(&up),
    })
}

fn ws_tcp(
    ws: &tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<&tokio::net::TcpStream> {
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => Some(s),
        _ => None,
    }
}

impl Ctx {
    /// The session proxy and the websocket relay, each next to direct.
    pub async fn live(&mut self) -> anyhow::Result<()> {
        self.live_proxy().await?;
        self.live_relay().await
    }

    async fn live_proxy(&mut self) -> anyhow::Result<()> {
        let name = "live-proxy";
        self.srv.deploy(name, &[], 1, 4, 1.0, &self.tag).await?;
        self.srv.wait_idle(name, 1, Duration::from_secs(60)).await?;
        let r = self.srv.start_session(name).await;
        let sid = r
            .body
            .get("sessionId")
            .and_then(Value::as_str)
            .map(str::to_string)
            .filter(|_| r.ok())
            .with_context(|| format!("starting a session: HTTP {} {}", r.status, r.body))?;
        let direct = Direct::spawn(self)?;
        let direct_url = format!("http://127.0.0.1:{}/echo?x=1", direct.port);
        let proxy_url = format!("{}/v1/public/{name}/sessions/{sid}/echo?x=1", self.srv.base);
        let pk = self.srv.pk.clone();
        for (c, per) in self.plan.proxy.clone() {
            log(format!(
                "live: session proxy vs direct, concurrency {c}, {per} requests each"
            ));
            let (dl, drps, dfail) = load(&direct_url, Some(&pk), c, per).await;
            let (pl, prps, pfail) = load(&proxy_url, Some(&pk), c, per).await;
            if dfail > 0 {
                self.report
                    .error(format!("direct requests at c={c}: {dfail} failed"));
            }
            if pfail > 0 {
                self.report
                    .error(format!("proxied requests at c={c}: {pfail} failed"));
            }
            let dkey = format!("direct_http_c{c}");
            let f = self.report.figure(
                &dkey,
                "session proxy",
                &format!("straight to the instance, keep-alive, c={c}"),
                summarize(&dl),
            );
            f.note = Some(format!(
                "GET /echo on a test agent the bench spawned; {c} clients, one connection each"
            ));
            let f = self.report.figure(
                &format!("proxy_http_c{c}"),
                "session proxy",
                &format!("through the session proxy, keep-alive, c={c}"),
                summarize(&pl),
            );
            f.floor = Some(dkey.clone());
            f.note = Some(format!(
                "GET /v1/public/{{agent}}/sessions/{{id}}/echo, same request; {c} clients, one connection each"
            ));
            if let (Some(p), Some(d)) = (summarize(&pl), summarize(&dl)) {
                let target = (c == 1).then(|| Target::le("value", 0.1));
                self.report.scalar(
                    &format!("proxy_overhead_p50_c{c}"),
                    "session proxy",
                    &format!("proxy overhead over direct, p50, c={c}"),
                    p.p50 - d.p50,
                    "ms",
                    target,
                    None,
                );
            }
            self.report.scalar(
                &format!("direct_rps_c{c}"),
                "session proxy",
                &format!("straight to the instance, requests/s, c={c}"),
                drps,
                "req/s",
                None,
                None,
            );
            self.report.scalar(
                &format!("proxy_rps_c{c}"),
                "session proxy",
                &format!("through the proxy, requests/s, c={c}"),
                prps,
                "req/s",
                None,
                Some(format!(
                    "{:.2} of direct",
                    if drps > 0.0 { prps / drps } else { 0.0 }
                )),
            );
        }
        drop(direct);
        let s = self.srv.stop_session(name, &sid).await;
        if !s.ok() {
            self.report.error(format!(
                "stopping the proxy session: HTTP {} {}",
                s.status, s.body
            ));
        }
        self.retire(name).await;
        Ok(())
    }

    async fn live_relay(&mut self) -> anyhow::Result<()> {
        let name = "live-ws";
        let (pings, frames) = self.plan.relay;
        self.srv.deploy(name, &[], 1, 4, 1.0, &self.tag).await?;
        self.srv.wait_idle(name, 1, Duration::from_secs(60)).await?;

        log(format!(
            "live: websocket direct, {pings} echoes and {frames} frames each way"
        ));
        let direct = Direct::spawn(self)?;
        let req = format!("ws://127.0.0.1:{}/ws", direct.port).into_client_request()?;
        let d = ws_run(req, pings, frames).await;
        drop(direct);

        log(format!(
            "live: websocket relay, {pings} echoes and {frames} frames each way"
        ));
        let r = self
            .srv
            .call(
                reqwest::Method::POST,
                &format!("/v1/public/{name}/start"),
                crate::server::Key::Public,
                Some(&json!({"transport": "websocket"})),
            )
            .await;
        let (Some(url), Some(token)) = (
            r.body.get("wsUrl").and_then(Value::as_str),
            r.body.get("token").and_then(Value::as_str),
        ) else {
            bail!("websocket start: HTTP {} {}", r.status, r.body);
        };
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let p = ws_run(req, pings, frames).await;

        let (d, p) = match (d, p) {
            (Ok(d), Ok(p)) => (d, p),
            (d, p) => {
                for e in [d.err(), p.err()].into_iter().flatten() {
                    self.report.error(format!("websocket run: {e:#}"));
                }
                self.retire(name).await;
                return Ok(());
            }
        };
        let pairs: [(&str, &str, &Vec<f64>, &Vec<f64>); 3] = [
            ("ws_rtt", "text echo round trip", &d.rtt, &p.rtt),
            (
                "ws_down_jitter",
                "agent to client stream, 50 frames/s: arrival jitter",
                &d.down,
                &p.down,
            ),
            (
                "ws_up_jitter",
                "client stream, 50 frames/s, echoed: delay variation",
                &d.up,
                &p.up,
            ),
        ];
        for (key, label, dv, pv) in pairs {
            let dkey = format!("direct_{key}");
            self.report.figure(
                &dkey,
                "websocket relay",
                &format!("straight to the instance: {label}"),
                summarize(dv),
            );
            let f = self.report.figure(
                &format!("relay_{key}"),
                "websocket relay",
                &format!("through the relay: {label}"),
                summarize(pv),
            );
            f.floor = Some(dkey);
            if let (Some(ps), Some(ds)) = (summarize(pv), summarize(dv)) {
                self.report.scalar(
                    &format!("relay_overhead_p99_{key}"),
                    "websocket relay",
                    &format!("relay adds, p99: {label}"),
                    ps.p99 - ds.p99,
                    "ms",
                    Some(Target::le("value", 1.0)),
                    None,
                );
            }
        }
        self.retire(name).await;
        Ok(())
    }
}
