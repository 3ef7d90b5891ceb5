//! Upgrading the server without dropping calls (`--on-stop detach`, docs/upgrade.md): the old
//! server exits leaving instances and session records as they are, the next one re-adopts
//! them, and their captured output has no gap.

use std::time::Duration;

use serde_json::json;

use crate::common::{pid_alive, Server};
use crate::lifecycle_util::{session_logs, session_pid, wait_log, LogRec};

/// The tick numbers (`tick <n>`, from the test agent's `--tick-ms`) in a session's logs.
fn ticks(logs: &[LogRec]) -> Vec<u64> {
    let mut t: Vec<u64> = logs
        .iter()
        .filter_map(|r| {
            r.log
                .rsplit_once(" - tick ")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .collect();
    t.sort_unstable();
    t
}

/// A live `/bot` session survives `SIGTERM` under `--on-stop detach` and a new `cattery serve`
/// on the same data dir: same process, still listed active, stoppable afterwards, the server
/// logs its re-adoption, and its numbered output lines are all captured once, none missing.
#[tokio::test(flavor = "multi_thread")]
async fn detach_then_restart_keeps_bot_session_and_its_logs() {
    let mut s = Server::start(&["--on-stop", "detach"]).await;
    s.deploy(
        "talk",
        &["--ignore-transport-close", "--tick-ms", "20"],
        json!({"maxSessionDuration": 300, "stopGraceSeconds": 1}),
    )
    .await;
    let sid = s.start_ok("talk").await;
    let pid = session_pid(&s, "talk", &sid).await;
    wait_log(&s, "talk", &sid, "tick 10").await;
    let before = ticks(&session_logs(&s, "talk", &sid).await);

    let st = s
        .terminate(Duration::from_secs(30))
        .expect("old server exits");
    assert!(st.success(), "detach exits 0: {st:?}");
    assert!(pid_alive(pid), "the instance outlives the detached server");
    let log = s.log();
    assert!(log.contains("detached"), "{log}");
    assert!(!log.contains("drained"), "{log}");

    s.spawn().await;
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("re-adopted a running session") && l.contains(&sid)),
        "one server log line per re-adopted session:\n{log}"
    );
    assert_eq!(s.session("talk", &sid).await["status"], "active");
    assert_eq!(session_pid(&s, "talk", &sid).await, pid);
    // Output goes on being captured after the restart.
    let last_before = *before.last().unwrap_or(&0);
    let want = format!("tick {}", last_before + 25);
    wait_log(&s, "talk", &sid, &want).await;

    assert_eq!(s.stop("talk", &sid).await.status, 200);
    assert!(!pid_alive(pid));
    // The end's platform line is written after the instance's last output.
    let all = ticks(&wait_log(&s, "talk", &sid, "reason=stopped").await);
    let expected: Vec<u64> = (1..=*all.last().unwrap()).collect();
    assert_eq!(all, expected, "every tick captured exactly once");
    assert!(all.len() as u64 > last_before + 20);
}

/// A live websocket call survives an upgrade: the detached server keeps relaying the calls
/// already connected (the data dir and the port go to the next server at once) and exits when
/// the last one ends; the new server re-adopts the session, whose logs have no gap.
#[tokio::test(flavor = "multi_thread")]
async fn detach_then_restart_keeps_a_websocket_call() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mut s = Server::start(&["--on-stop", "detach"]).await;
    s.deploy(
        "wsup",
        &["--ignore-transport-close", "--tick-ms", "20"],
        json!({"maxSessionDuration": 300, "stopGraceSeconds": 1}),
    )
    .await;
    let (sid, mut ws) = s.ws_call("wsup").await;
    // Echo of a text frame, skipping the agent's audio frames.
    async fn echo<S>(ws: &mut S, text: &str)
    where
        S: futures_util::Sink<Message>
            + futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
        <S as futures_util::Sink<Message>>::Error: std::fmt::Debug,
    {
        ws.send(Message::Text(text.into())).await.unwrap();
        let t0 = std::time::Instant::now();
        loop {
            assert!(t0.elapsed() < Duration::from_secs(10), "no echo of {text}");
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => return,
                Ok(Some(Ok(_))) => {}
                other => panic!("websocket ended waiting for {text}: {other:?}"),
            }
        }
    }
    echo(&mut ws, "before").await;
    wait_log(&s, "wsup", &sid, "tick 10").await;
    let pid = session_pid(&s, "wsup", &sid).await;

    let mut old = s.detach_relaying_and_restart(&sid).await;
    echo(&mut ws, "after").await;
    assert!(pid_alive(pid));
    assert!(
        old.try_wait().unwrap().is_none(),
        "the old server relays until the call ends"
    );
    let want = {
        let t = ticks(&session_logs(&s, "wsup", &sid).await);
        format!("tick {}", t.last().copied().unwrap_or(0) + 25)
    };
    wait_log(&s, "wsup", &sid, &want).await;
    ws.close(None).await.unwrap();
    let t0 = std::time::Instant::now();
    while old.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the old server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let g = s.wait_ended("wsup", &sid, Duration::from_secs(20)).await;
    assert!(
        !["lost", "drained"].contains(&g["endReason"].as_str().unwrap_or("")),
        "{g}"
    );
    let t = ticks(&session_logs(&s, "wsup", &sid).await);
    let expected: Vec<u64> = (1..=*t.last().unwrap()).collect();
    assert_eq!(t, expected, "every tick captured exactly once");
}

/// A session that ended while no server ran (here: `cattery-test-agent` without
/// `--ignore-transport-close` ends its session when the detached server's `/bot` request
/// closes) is ended `lost` by the next server, which says so in its own log and in the
/// session's logs, as it does for the sessions it re-adopts.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_ended_at_the_restart_is_named_in_the_logs() {
    let mut s = Server::start(&["--on-stop", "detach"]).await;
    s.deploy("plain", &[], json!({"stopGraceSeconds": 1})).await;
    let sid = s.start_ok("plain").await;
    let pid = session_pid(&s, "plain", &sid).await;
    let st = s
        .terminate(Duration::from_secs(30))
        .expect("old server exits");
    assert!(st.success(), "detach exits 0: {st:?}");
    // The agent ends its session once the /bot request is gone (bounded wait).
    for _ in 0..100 {
        if !pid_alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !pid_alive(pid),
        "the test agent ends its session without /bot"
    );

    s.spawn().await;
    let session = s.session("plain", &sid).await;
    assert_eq!(session["endReason"], "lost", "{session}");
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ended a session found without its instance")
                && l.contains(&sid)
                && l.contains("lost")),
        "one server log line per session ended at the restart:\n{log}"
    );
    wait_log(&s, "plain", &sid, "ended after a restart: reason=lost").await;
}
