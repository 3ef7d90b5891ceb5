//! `cattery store copy` on the real binary (docs/cluster.md, "Moving from SQLite"): a server's
//! SQLite records moved onto a scratch PostgreSQL cluster of the test's own, and a node on it
//! that carries on with them. Without PostgreSQL's binaries the test says so and passes,
//! unless `CATTERY_REQUIRE_POSTGRES=1`.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{cattery_bin, wait_for, Server};
use crate::postgres::PgCluster;

/// The agent's log lines of session `sid` that contain `needle` (through the API).
async fn session_lines(s: &Server, agent: &str, sid: &str, needle: &str) -> Vec<String> {
    let mut lines = crate::python_bots::session_logs(s, agent, sid).await;
    lines.retain(|l| l.contains(needle));
    lines
}

/// Waits until session `sid`'s logs hold a line with `needle`; returns the lines.
async fn wait_line(s: &Server, agent: &str, sid: &str, needle: &str) -> Vec<String> {
    wait_for(Duration::from_secs(20), needle, || async {
        let l = session_lines(s, agent, sid, needle).await;
        (!l.is_empty()).then_some(l)
    })
    .await
}

/// How a `cattery store copy` is told its target database.
enum To<'a> {
    /// `--to URL`.
    Arg(&'a str),
    /// `CATTERY_DATABASE_URL` (keeps a password out of `ps`).
    Env(&'a str),
    /// Not at all.
    Nothing,
}

/// Runs `cattery store copy` from `data_dir` into `to`.
fn store_copy(data_dir: &std::path::Path, to: To<'_>) -> std::process::Output {
    let mut c = Command::new(cattery_bin());
    c.args(["store", "copy", "--data-dir"])
        .arg(data_dir)
        .env_remove("CATTERY_DATABASE_URL")
        .env_remove("CATTERY_SECRETS_KEY_FILE")
        .env_remove("CATTERY_CONFIG");
    match to {
        To::Arg(url) => c.args(["--to", url]),
        To::Env(url) => c.env("CATTERY_DATABASE_URL", url),
        To::Nothing => &mut c,
    };
    c.output().unwrap()
}

/// The default org's secret sets and the agent's sessions, as the API shows them (records
/// that change only when written to; an agent's own view counts its live instances).
async fn snapshot(s: &Server) -> Value {
    let mut v = json!({});
    for path in ["/v1/secrets", "/v1/agents/moved/sessions?limit=100"] {
        let r = s.req("GET", path, Some(&s.sk), None).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        v[path] = r.body;
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_server_moves_onto_postgres_and_carries_on() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    // A single node on SQLite: keys (made by `Server::start`), a secret set bound to an
    // agent, a session that logs its secret and ends.
    let mut old = Server::start(&[]).await;
    let value = "the moved value";
    let r = old
        .req(
            "PUT",
            "/v1/secrets/moving",
            Some(&old.sk),
            Some(json!({"secrets": [{"secretKey": "MY_KEY", "secretValue": value}]})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    old.deploy(
        "moved",
        &["--print-env", "MY_KEY"],
        json!({"secretSet": "moving"}),
    )
    .await;
    old.wait_ready("moved", Duration::from_secs(20)).await;
    let sid = old.start_ok("moved").await;
    let before = wait_line(&old, "moved", &sid, "env MY_KEY=").await;
    assert!(
        before[0].ends_with(&format!("env MY_KEY={value}")),
        "{before:?}"
    );
    assert_eq!(old.stop("moved", &sid).await.status, 200);
    old.wait_ended("moved", &sid, Duration::from_secs(20)).await;

    // A running server is refused.
    let out = store_copy(old.data_dir(), To::Arg(&pg.url()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a cattery serve is using"), "{err}");

    assert!(
        old.terminate(Duration::from_secs(30)).is_some(),
        "server did not stop"
    );
    // No target: refused, saying how to give one.
    let out = store_copy(old.data_dir(), To::Nothing);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--to postgres://..., CATTERY_DATABASE_URL"),
        "{err}"
    );
    // The target through the environment, where `ps` does not show its password.
    let out = store_copy(old.data_dir(), To::Env(&pg.url()));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "copy failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key_file = old.data_dir().join("secrets.key");
    assert!(
        stdout.contains(&format!(
            "{}: give that file (mode 0600) to every node as --secrets-key-file",
            key_file.display()
        )),
        "{stdout}"
    );
    assert!(!stdout.contains(value), "{stdout}");

    // A node on the PostgreSQL database with the old secrets key, addressed with the old keys.
    let key_arg = key_file.to_str().unwrap().to_string();
    let mut new = Server::start_with_env(
        &["--secrets-key-file", &key_arg],
        &[("CATTERY_DATABASE_URL", &pg.url())],
    )
    .await;
    new.sk = old.sk.clone();
    new.pk = old.pk.clone();
    let agents = new.req("GET", "/v1/agents", Some(&new.sk), None).await;
    assert_eq!(agents.status, 200, "{:?}", agents.body);
    assert!(
        agents.body.to_string().contains("\"moved\""),
        "{:?}",
        agents.body
    );
    let snap = snapshot(&new).await;
    assert!(
        snap["/v1/secrets"].to_string().contains("\"moving\""),
        "{snap}"
    );
    assert!(
        !snap.to_string().contains(value),
        "a secret value in {snap}"
    );
    // The old session, its end and its logs.
    let got = new.session("moved", &sid).await;
    assert!(!got["endedAt"].is_null(), "{got}");
    let lines = session_lines(&new, "moved", &sid, "env MY_KEY=").await;
    assert_eq!(lines, before);
    // A new session (started with the old public key) gets the copied secret's value.
    new.wait_ready("moved", Duration::from_secs(20)).await;
    let sid2 = new.start_ok("moved").await;
    let now = wait_line(&new, "moved", &sid2, "env MY_KEY=").await;
    assert!(now[0].ends_with(&format!("env MY_KEY={value}")), "{now:?}");
    assert_eq!(new.stop("moved", &sid2).await.status, 200);
    new.wait_ended("moved", &sid2, Duration::from_secs(20))
        .await;

    // A second copy into the database that now holds records: refused, nothing changed.
    let before = snapshot(&new).await;
    let out = store_copy(old.data_dir(), To::Arg(&pg.url()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the target database already holds records"),
        "{err}"
    );
    assert_eq!(snapshot(&new).await, before);
    assert!(new.terminate(Duration::from_secs(30)).is_some());
}
