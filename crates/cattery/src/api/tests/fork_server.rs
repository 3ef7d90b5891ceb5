//! `forkServer` in an agent's status (issue 14): why a `local:` Python agent's instances are
//! spawned instead of forked is readable by the official clients' `GET` of the agent, on both
//! the documented and the CLI's org-scoped path; agents without a fork server have no such key.

use axum::http::StatusCode;
use serde_json::json;

use super::api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fork_server_fallback_reason_is_in_the_agent_status() {
    let a = api().await;
    let reason = "the bot is not safe to fork: 2 threads alive after importing bot.py (worker)";
    let script = format!("fork-fallback={reason}");
    a.deploy("threaded", &[&script], json!({})).await;
    a.deploy("plain", &[], json!({})).await;

    // Before any instance ran on this node there is nothing to report.
    let r = a.get("/v1/agents/threaded").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.get("forkServer").is_none(), "{}", r.body);

    let id = a.start_ok("threaded").await;
    let r = a.get("/v1/agents/threaded").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["forkServer"],
        json!({"state": "fallback", "reason": reason, "pid": null}),
        "{}",
        r.body
    );
    // The CLI's path (`{"body": ...}`) carries it too, next to what the CLI indexes.
    let r = a.get("/v1/organizations/default/services/threaded").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["body"]["forkServer"]["state"], "fallback");
    assert_eq!(r.body["body"]["ready"], true, "{}", r.body);

    // An agent without a fork server has no `forkServer` key.
    let pid = a.start_ok("plain").await;
    let r = a.get("/v1/agents/plain").await;
    assert!(r.body.get("forkServer").is_none(), "{}", r.body);

    assert_eq!(a.stop("threaded", &id).await.status, StatusCode::OK);
    assert_eq!(a.stop("plain", &pid).await.status, StatusCode::OK);
    // It stays after the session ended: it describes the agent, not one session.
    let r = a.get("/v1/agents/threaded").await;
    assert_eq!(r.body["forkServer"]["state"], "fallback", "{}", r.body);
}
