//! The Docker runtime when the engine is slow or unreachable: the server talks to the real
//! engine through a proxy on a socket of the test's own (`--docker-host unix://...`), which
//! can hold requests (a slow container create or start) and cut every connection (an engine
//! restarting or gone for a while). The real engine itself is never stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::common::{wait_for, Server};
use crate::docker::{containers, deploy_image, have_docker, AGENT_IMAGE};
use crate::lifecycle_util::*;

const ENGINE: &str = "/var/run/docker.sock";

struct ProxyState {
    /// Requests whose line contains one of these wait until it is taken out.
    hold: watch::Sender<Vec<String>>,
    /// How many requests wait now.
    held: AtomicUsize,
    /// Every request line forwarded, in order.
    seen: Mutex<Vec<String>>,
    /// While set, connections are refused (accepted and closed at once).
    down: AtomicBool,
    /// The tasks of the open connections, aborted by [`EngineProxy::cut`].
    conns: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A proxy in front of the engine's socket (see the module docs).
pub struct EngineProxy {
    pub path: PathBuf,
    st: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// The request lines (`POST /v1.41/containers/create?name=... HTTP/1.1`) in a chunk of what a
/// client sent (a client sends one request at a time, its head in one write).
fn request_lines(chunk: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(chunk)
        .split("\r\n")
        .filter(|l| {
            l.ends_with(" HTTP/1.1")
                && ["GET ", "POST ", "DELETE ", "PUT ", "HEAD "]
                    .iter()
                    .any(|m| l.starts_with(m))
        })
        .map(str::to_string)
        .collect()
}

impl EngineProxy {
    pub async fn start(dir: &Path) -> EngineProxy {
        let path = dir.join("engine.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let st = Arc::new(ProxyState {
            hold: watch::channel(Vec::new()).0,
            held: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let st2 = st.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st2.down.load(Ordering::SeqCst) {
                    continue;
                }
                let h = tokio::spawn(Self::serve(st2.clone(), client));
                st2.conns.lock().push(h.abort_handle());
            }
        });
        EngineProxy { path, st, task }
    }

    async fn serve(st: Arc<ProxyState>, client: UnixStream) {
        let Ok(engine) = UnixStream::connect(ENGINE).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut er, mut ew) = engine.into_split();
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut er, &mut cw).await;
        });
        st.conns.lock().push(back.abort_handle());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for line in request_lines(&buf[..n]) {
                let mut rx = st.hold.subscribe();
                let held = |v: &Vec<String>| v.iter().any(|h| line.contains(h.as_str()));
                if held(&rx.borrow_and_update()) {
                    st.held.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.wait_for(|v| !held(v)).await;
                    st.held.fetch_sub(1, Ordering::SeqCst);
                }
                st.seen.lock().push(line);
            }
            if ew.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        back.abort();
    }

    /// The server's address for the proxy.
    pub fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Holds every request whose line contains `pattern` until [`EngineProxy::release`].
    pub fn hold(&self, pattern: &str) {
        self.st.hold.send_modify(|v| v.push(pattern.to_string()));
    }

    /// Lets every held request go.
    pub fn release(&self) {
        self.st.hold.send_replace(Vec::new());
    }

    pub fn held(&self) -> usize {
        self.st.held.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<String> {
        self.st.seen.lock().clone()
    }

    /// Cuts every open connection (as an engine restart does).
    pub fn cut(&self) {
        for h in self.st.conns.lock().drain(..) {
            h.abort();
        }
    }

    /// Down: every open connection cut, new ones refused. Up again with `down(false)`.
    pub fn down(&self, down: bool) {
        self.st.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// Waits until `n` requests are held.
    pub async fn wait_held(&self, n: usize) {
        wait_for(Duration::from_secs(30), "a held engine request", || async {
            (self.held() >= n).then_some(())
        })
        .await
    }
}

/// A server (with `extra` flags) whose Docker engine is the real one behind an
/// [`EngineProxy`], and the directory of the proxy's socket; `None` without Docker.
async fn behind_a_proxy(extra: &[&str]) -> Option<(tempfile::TempDir, EngineProxy, Server)> {
    if !have_docker(&[AGENT_IMAGE]) {
        return None;
    }
    let dir = crate::common::open_tempdir();
    let proxy = EngineProxy::start(dir.path()).await;
    let host = proxy.host();
    let mut args = vec!["--docker-host", host.as_str()];
    args.extend_from_slice(extra);
    let s = Server::start(&args).await;
    Some((dir, proxy, s))
}

/// Starts a session in the background; its answer's status.
fn start_in_background(s: &Server, agent: &str) -> tokio::task::JoinHandle<u16> {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/public/{agent}/start", s.base);
    let pk = s.pk.clone();
    tokio::spawn(async move {
        http.post(url)
            .bearer_auth(pk)
            .json(&json!({}))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    })
}

/// The lines of the requests that started a container.
fn container_starts(p: &EngineProxy) -> Vec<String> {
    p.seen()
        .into_iter()
        .filter(|l| l.starts_with("POST ") && l.contains("/containers/") && l.contains("/start "))
        .collect()
}

/// Lets the held requests go, waits for the server's next container removal through the
/// proxy (what the engine made of them is only there once they are answered), then for no
/// container of the server to be left.
/// How many container removals the engine was sent.
fn removals(proxy: &EngineProxy) -> usize {
    proxy
        .seen()
        .iter()
        .filter(|l| l.starts_with("DELETE ") && l.contains("/containers/"))
        .count()
}

async fn release_and_wait_removed(proxy: &EngineProxy, s: &Server) {
    let before = removals(proxy);
    proxy.release();
    wait_for(Duration::from_secs(40), "a container removal", || async {
        (removals(proxy) > before).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(30), "no container left", || async {
        containers(s).is_empty().then_some(())
    })
    .await;
}

/// A stop while the engine is slow to create or start the session's container answers once
/// what the engine made is removed (the stop's promise), and the container is never started
/// once its start was given up. An engine that does not answer at all does not hold the stop
/// (nor the start timeout's 504) beyond the engine wait (10 s): the removal then goes on in
/// the background, once the engine answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_or_the_start_timeout_does_not_wait_for_a_slow_engine() {
    let Some((_dir, proxy, s)) = behind_a_proxy(&["--start-timeout-seconds", "4"]).await else {
        return;
    };
    deploy_image(
        &s,
        "slow-engine",
        "",
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 3}}),
    )
    .await;
    s.wait_ready("slow-engine", Duration::from_secs(60)).await;

    for step in ["/containers/create", "/start "] {
        // A stop while the engine is creating (then: starting) the container, which the
        // engine finishes a moment later.
        proxy.hold(step);
        let start = start_in_background(&s, "slow-engine");
        proxy.wait_held(1).await;
        let sid = wait_active_session(&s, "slow-engine").await;
        let starts_before = container_starts(&proxy).len();
        let removals_before = removals(&proxy);
        let stop = {
            let (base, sk) = (s.base.clone(), s.sk.clone());
            let url = format!("{base}/v1/agents/slow-engine/sessions/{sid}");
            tokio::spawn(async move {
                reqwest::Client::new()
                    .delete(url)
                    .bearer_auth(sk)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.release();
        let code = tokio::time::timeout(Duration::from_secs(30), stop)
            .await
            .unwrap_or_else(|_| panic!("the stop during the engine's {step} did not answer"))
            .unwrap()
            .unwrap();
        assert_eq!(code, 200);
        assert!(
            removals(&proxy) > removals_before && containers(&s).is_empty(),
            "{step}: the stop answered before its container was removed"
        );
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), start)
                .await
                .expect("the start answers with its stop")
                .unwrap(),
            409
        );
        assert_eq!(
            s.session("slow-engine", &sid).await["endReason"],
            "stopped_during_start"
        );
        if step == "/containers/create" {
            assert_eq!(
                container_starts(&proxy).len(),
                starts_before,
                "a container whose start was given up was started"
            );
        }
    }

    // An engine that holds the create: the stop answers within the engine wait.
    proxy.hold("/containers/create");
    let start = start_in_background(&s, "slow-engine");
    proxy.wait_held(1).await;
    let sid = wait_active_session(&s, "slow-engine").await;
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(40), s.stop("slow-engine", &sid))
        .await
        .expect("the stop waited for the engine past its bound");
    assert_eq!(r.status, 200, "{:?}", r.body);
    eprintln!(
        "a stop against a held create answered in {:?}",
        t0.elapsed()
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), start).await;
    release_and_wait_removed(&proxy, &s).await;

    // The start timeout while the engine holds the create.
    proxy.hold("/containers/create");
    let start = start_in_background(&s, "slow-engine");
    proxy.wait_held(1).await;
    let code = tokio::time::timeout(Duration::from_secs(40), start)
        .await
        .expect("the start timeout answers while the engine is slow")
        .unwrap();
    assert_eq!(code, 504);
    release_and_wait_removed(&proxy, &s).await;
}

/// An engine that does not answer while a session is stopped: the stop still answers (the
/// container cannot be removed yet), and the container is removed as soon as the engine
/// answers again, not left to the next restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_the_engine_could_not_remove_is_removed_once_it_answers() {
    let Some((_dir, proxy, s)) = behind_a_proxy(&["--stop-grace-seconds", "1"]).await else {
        return;
    };
    deploy_image(&s, "unreachable", "--ignore-transport-close", json!({})).await;
    let sid = s.start_ok("unreachable").await;
    info_served(&s, "unreachable", &sid).await;
    assert_eq!(containers(&s).len(), 1);
    proxy.down(true);
    let r = s.stop("unreachable", &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(containers(&s).len(), 1, "the engine could not be reached");
    proxy.down(false);
    wait_for(Duration::from_secs(40), "the container removed", || async {
        containers(&s).is_empty().then_some(())
    })
    .await;
}

/// A restart while the engine does not answer records the sessions `lost` (their containers
/// cannot be found); once the engine answers, image agents are ready again without a
/// redeploy, and the lost sessions' containers are removed (not left to the next restart),
/// while a session started meanwhile keeps its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_without_an_engine_removes_the_lost_sessions_containers_later() {
    let Some((_dir, proxy, mut s)) = behind_a_proxy(&[]).await else {
        return;
    };
    deploy_image(
        &s,
        "survivor",
        "--ignore-transport-close",
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 3}}),
    )
    .await;
    let sid = s.start_ok("survivor").await;
    info_served(&s, "survivor", &sid).await;
    let before = containers(&s);
    assert_eq!(before.len(), 1);
    s.kill9();
    proxy.down(true);
    s.spawn().await;
    let g = s
        .wait_ended("survivor", &sid, Duration::from_secs(30))
        .await;
    assert_eq!(g["endReason"], "lost", "{g}");
    proxy.down(false);
    // The agent is ready again once the engine answers (no redeploy); a session of this run,
    // started before the sweep reached the engine, keeps its container.
    let fresh = wait_for(Duration::from_secs(30), "a start", || async {
        let r = s.start_session("survivor", json!({})).await;
        (r.status == 200).then(|| r.body["sessionId"].as_str().unwrap().to_string())
    })
    .await;
    info_served(&s, "survivor", &fresh).await;
    wait_for(
        Duration::from_secs(40),
        "the lost session's container removed",
        || async { (!containers(&s).contains(&before[0])).then_some(()) },
    )
    .await;
    assert_eq!(
        containers(&s).len(),
        1,
        "the new session's container is kept"
    );
    assert!(s.session("survivor", &fresh).await["endReason"].is_null());
    assert_eq!(s.stop("survivor", &fresh).await.status, 200);
    assert!(containers(&s).is_empty());
}

/// The ticks (`tick <n>`) of a session's log, in order.
async fn ticks(s: &Server, agent: &str, sid: &str) -> Vec<u64> {
    session_logs(s, agent, sid)
        .await
        .iter()
        .filter_map(|r| {
            let (_, n) = r.log.split_once("tick ")?;
            n.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The engine's connections break (an engine restart that keeps its containers, a socket
/// proxy restarting): a running session's output is still captured afterwards, each line
/// once, none lost, and its session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_logs_are_followed_again_after_the_engines_connections_break() {
    let Some((_dir, proxy, s)) = behind_a_proxy(&[]).await else {
        return;
    };
    deploy_image(
        &s,
        "chatty",
        "--tick-ms 200 --ignore-transport-close",
        json!({}),
    )
    .await;
    let sid = s.start_ok("chatty").await;
    wait_log(&s, "chatty", &sid, "tick 3").await;
    proxy.down(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.down(false);
    let before = *ticks(&s, "chatty", &sid).await.last().unwrap();
    let want = before + 15;
    let got = wait_for(Duration::from_secs(20), "ticks after the break", || async {
        let t = ticks(&s, "chatty", &sid).await;
        t.contains(&want).then_some(t)
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    assert!(
        got.iter().all(|t| seen.insert(*t)),
        "a line captured twice: {got:?}"
    );
    // And none lost: the lines written while the stream was broken are read afterwards.
    let first = got[0];
    assert!(
        (first..=want).all(|t| seen.contains(&t)),
        "a line lost: {got:?}"
    );
    assert!(s.session("chatty", &sid).await["endReason"].is_null());
    assert_eq!(s.stop("chatty", &sid).await.status, 200);
    assert!(containers(&s).is_empty());
}
/// A container removed behind the server's back (`docker rm -f`): a session on it ends (its
/// slot is free at once for the next start), a warm one is replaced, and nothing is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_removed_behind_the_servers_back_ends_its_session() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let s = Server::start(&[]).await;
    deploy_image(
        &s,
        "removed",
        "--ignore-transport-close",
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 1}}),
    )
    .await;
    let sid = s.start_ok("removed").await;
    info_served(&s, "removed", &sid).await;
    let c = containers(&s);
    assert_eq!(c.len(), 1);
    crate::docker::docker(&["rm", "-f", &c[0]]).expect("docker rm -f");
    let g = s.wait_ended("removed", &sid, Duration::from_secs(30)).await;
    assert_eq!(g["endReason"], "error", "{g}");
    let r = s.stop("removed", &sid).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let next = s.start_ok("removed").await;
    info_served(&s, "removed", &next).await;
    assert_eq!(s.stop("removed", &next).await.status, 200);
    assert!(containers(&s).is_empty());

    // A warm container removed: replaced.
    deploy_image(
        &s,
        "warm",
        "",
        json!({"autoScaling": {"minAgents": 1, "maxAgents": 2}}),
    )
    .await;
    let first = crate::docker::wait_containers(&s, 1, Duration::from_secs(30)).await;
    s.wait_ready("warm", Duration::from_secs(30)).await;
    crate::docker::docker(&["rm", "-f", &first[0]]).expect("docker rm -f");
    wait_for(Duration::from_secs(30), "a new warm container", || async {
        let now = containers(&s);
        (now.len() == 1 && now[0] != first[0]).then_some(())
    })
    .await;
    let w = s.start_ok("warm").await;
    info_served(&s, "warm", &w).await;
    assert_eq!(s.stop("warm", &w).await.status, 200);
}

/// An engine that takes requests but does not answer them (hung, overloaded) while a session
/// is stopped: the stop answers within moments of its grace, not after the engine client's
/// timeouts (two minutes per request), and the container is removed once the engine answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_does_not_wait_for_an_engine_that_does_not_answer() {
    let Some((_dir, proxy, s)) = behind_a_proxy(&["--stop-grace-seconds", "1"]).await else {
        return;
    };
    deploy_image(&s, "hung", "--ignore-transport-close", json!({})).await;
    let sid = s.start_ok("hung").await;
    info_served(&s, "hung", &sid).await;
    // Every request from now on waits (the ones in flight, the exit watch and the log
    // stream, go on).
    proxy.hold(" /");
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(40), s.stop("hung", &sid))
        .await
        .expect("the stop waited for the engine");
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert_eq!(s.session("hung", &sid).await["endReason"], "stopped");
    release_and_wait_removed(&proxy, &s).await;
}

/// A drain while the engine is still creating a session's container: the start answers
/// `503 DRAINING`, and the server waits for the engine's answer and removes what it made
/// before it exits (nothing left for a restart that may never come).
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_removes_the_container_of_a_start_the_engine_was_still_making() {
    let Some((_dir, proxy, mut s)) = behind_a_proxy(&["--drain-timeout-seconds", "1"]).await else {
        return;
    };
    deploy_image(&s, "draining", "", json!({})).await;
    proxy.hold("/containers/create");
    let start = start_in_background(&s, "draining");
    proxy.wait_held(1).await;
    s.signal(libc::SIGTERM);
    let code = tokio::time::timeout(Duration::from_secs(20), start)
        .await
        .expect("the start answers at the drain")
        .unwrap();
    assert_eq!(code, 503);
    proxy.release();
    wait_server_exit(&mut s, Duration::from_secs(30)).await;
    let seen = proxy.seen();
    let created = seen
        .iter()
        .position(|l| l.contains("/containers/create"))
        .expect("the create reached the engine");
    assert!(
        seen[created..]
            .iter()
            .any(|l| l.starts_with("DELETE ") && l.contains("/containers/")),
        "the server exited without removing the container: {seen:?}"
    );
    assert!(containers(&s).is_empty());
}

/// Two servers (two data dirs) on one engine: each only ever touches its own containers; a
/// restart's sweep of one leaves the other's running sessions alone.
#[tokio::test(flavor = "multi_thread")]
async fn two_servers_on_one_engine_touch_only_their_own_containers() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let mut a = Server::start(&[]).await;
    let b = Server::start(&[]).await;
    assert_ne!(crate::docker::server_id(&a), crate::docker::server_id(&b));
    for s in [&a, &b] {
        deploy_image(s, "same-name", "--ignore-transport-close", json!({})).await;
    }
    let sa = a.start_ok("same-name").await;
    let sb = b.start_ok("same-name").await;
    info_served(&a, "same-name", &sa).await;
    info_served(&b, "same-name", &sb).await;
    let (ca, cb) = (containers(&a), containers(&b));
    assert_eq!((ca.len(), cb.len()), (1, 1));
    assert_ne!(ca, cb);
    a.kill9();
    a.spawn().await;
    assert_eq!(containers(&a), ca, "a's session is re-adopted");
    assert_eq!(containers(&b), cb, "b's container is not a's to sweep");
    assert_eq!(a.stop("same-name", &sa).await.status, 200);
    assert!(containers(&a).is_empty());
    assert_eq!(containers(&b), cb);
    assert!(b.session("same-name", &sb).await["endReason"].is_null());
    assert_eq!(b.stop("same-name", &sb).await.status, 200);
    assert!(containers(&b).is_empty());
}

/// A server that never ran a container (no image was ever resolved on its data dir: the
/// embedded default on a machine without Docker) has nothing of its own to sweep from an
/// engine: one that does not answer is not warned about at every start, and no background
/// retry waits for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_ran_a_container_does_not_wait_for_an_engine() {
    let dir = crate::common::open_tempdir();
    let host = format!("unix://{}", dir.path().join("no-engine.sock").display());
    let s = Server::start(&["--docker-host", &host]).await;
    s.deploy("plain", &[], json!({})).await;
    let sid = s.start_ok("plain").await;
    assert_eq!(s.stop("plain", &sid).await.status, 200);
    let log = s.log();
    assert!(!log.contains("cannot sweep"), "{log}");
}

/// The server is SIGKILLed while a session's container keeps writing, and started again a
/// few seconds later: the lines the container wrote while no server ran are captured once the
/// next server adopts it, each once, none lost. (The next server followed the container's
/// output from one second before its own start, so those lines were never captured.)
#[tokio::test(flavor = "multi_thread")]
async fn lines_a_container_writes_while_no_server_runs_are_captured_after_a_restart() {
    if !have_docker(&[AGENT_IMAGE]) {
        return;
    }
    let mut s = Server::start(&[]).await;
    deploy_image(
        &s,
        "chatty",
        "--tick-ms 100 --ignore-transport-close",
        json!({}),
    )
    .await;
    let sid = s.start_ok("chatty").await;
    wait_log(&s, "chatty", &sid, "tick 5").await;
    s.kill9();
    // The container writes about 30 lines while no server runs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.spawn().await;
    let before = *ticks(&s, "chatty", &sid).await.last().unwrap();
    let want = before + 20;
    let got = wait_for(
        Duration::from_secs(30),
        "ticks after the restart",
        || async {
            let t = ticks(&s, "chatty", &sid).await;
            t.contains(&want).then_some(t)
        },
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    assert!(
        got.iter().all(|t| seen.insert(*t)),
        "a line captured twice: {got:?}"
    );
    assert!(
        (1..=want).all(|t| seen.contains(&t)),
        "a line lost: {got:?}"
    );
    assert!(s.session("chatty", &sid).await["endReason"].is_null());
    assert_eq!(s.stop("chatty", &sid).await.status, 200);
    assert!(containers(&s).is_empty());
}
