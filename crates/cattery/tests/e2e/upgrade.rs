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
