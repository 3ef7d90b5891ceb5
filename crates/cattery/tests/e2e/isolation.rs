//! Agents cannot read each other or the control plane (issue 16, item 3), on the real binary:
//! org A's agent tries, through the test agent's `POST /control/read` route, to read org B's
//! instance environment (where its secret is), the server's environment, `secrets.key`, the
//! database, the data directory and B's instance directories. Everything is refused; the
//! control plane's own checks (modes, uids, environment allowlist) hold too.
//!
//! Needs root (instances switch uids); as another user the test only checks that the server
//! says at start that instances are not separated.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::common;
use crate::common::Server;
use serde_json::{json, Value};

const RANGE: std::ops::RangeInclusive<u32> = 2_000_000_000..=2_000_065_535;

/// `GET /info` of a session's test agent through the Session API proxy.
async fn info(s: &Server, pk: &str, agent: &str, sid: &str) -> Value {
    let r = s
        .req(
            "GET",
            &format!("/v1/public/{agent}/sessions/{sid}/info"),
            Some(pk),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Asks a session's test agent to act on `path` as the agent (`POST /control/{what}`: `read`,
/// or `write` a small file); returns its answer.
async fn as_agent(s: &Server, pk: &str, agent: &str, sid: &str, what: &str, path: &str) -> Value {
    let url = format!("/v1/public/{agent}/sessions/{sid}/control/{what}");
    let r = s
        .raw("POST", &url, Some(pk), path.as_bytes().to_vec())
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Asks a session's test agent to read `path`; returns its answer.
async fn try_read(s: &Server, pk: &str, agent: &str, sid: &str, path: &str) -> Value {
    as_agent(s, pk, agent, sid, "read", path).await
}

/// The environment of a process, as root reads it.
fn environ(pid: i64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| String::from_utf8_lossy(kv).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_read_another_orgs_instance_nor_the_control_plane() {
    if !nix::unistd::geteuid().is_root() {
        let s = Server::start(&[]).await;
        assert!(s.log().contains("NOT separated"), "{}", s.log());
        return;
    }
    let s = Server::start_with_env(&[], &[("SERVER_ONLY_SECRET", "server-env-value")]).await;
    let data = s.data_dir().to_path_buf();

    // Org B: a secret set and an agent bound to it, with a running session.
    let (sk_b, pk_b) = (s.key("private", "org-b"), s.key("public", "org-b"));
    let secret = "org-b-secret-value-7d1c";
    let r = s
        .req(
            "PUT",
            "/v1/secrets/b-secrets",
            Some(&sk_b),
            Some(json!({"secrets": [{"secretKey": "B_SECRET", "secretValue": secret}]})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let cmd = vec![common::test_agent().display().to_string()];
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&sk_b),
            Some(
                json!({"serviceName": "bagent", "command": cmd, "secretSet": "b-secrets",
                         "env": {"CATTERY_TEST_TAG": s.tag}}),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = s
        .req(
            "POST",
            "/v1/public/bagent/start",
            Some(&pk_b),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid_b = r.body["sessionId"].as_str().unwrap().to_string();

    // Org A (the default org): the would-be thief.
    s.deploy("aagent", &[], json!({})).await;
    let sid_a = s.start_ok("aagent").await;

    let a = info(&s, &s.pk, "aagent", &sid_a).await;
    let b = info(&s, &pk_b, "bagent", &sid_b).await;
    let (uid_a, uid_b) = (a["uid"].as_u64().unwrap(), b["uid"].as_u64().unwrap());
    assert_ne!(uid_a, uid_b, "two instances never share a uid");
    for (uid, gid) in [(uid_a, a["gid"].as_u64()), (uid_b, b["gid"].as_u64())] {
        assert!(RANGE.contains(&(uid as u32)), "uid {uid} outside the range");
        assert_eq!(Some(uid), gid, "the gid is the uid's number");
    }

    // B's environment holds its secret and nothing of the server's; its HOME is private.
    let pid_b = b["pid"].as_i64().unwrap();
    let env_b = environ(pid_b);
    assert!(env_b.contains(&format!("B_SECRET={secret}")), "{env_b:?}");
    assert!(
        !env_b.iter().any(|kv| kv.starts_with("SERVER_ONLY_SECRET=")),
        "the server's environment leaked into the instance: {env_b:?}"
    );
    let get = |k: &str| {
        env_b
            .iter()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap()
    };
    let (home_b, tmp_b) = (get("HOME"), get("TMPDIR"));
    let dir_b = std::path::Path::new(&home_b)
        .parent()
        .unwrap()
        .to_path_buf();
    for d in [&home_b, &tmp_b] {
        let m = std::fs::metadata(d).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (uid_b as u32, 0o700), "{d}");
    }

    assert_control_plane_closed(&data);

    // A's own environment is readable to A (the probe works)...
    let own = try_read(&s, &s.pk, "aagent", &sid_a, "/proc/self/environ").await;
    assert_eq!(own["ok"], true, "{own}");
    // ... and everything else is refused.
    let server_pid = s.pid();
    let targets = [
        format!("/proc/{pid_b}/environ"),
        format!("/proc/{server_pid}/environ"),
        data.join("secrets.key").display().to_string(),
        data.join("cattery.db").display().to_string(),
        data.display().to_string(),
        data.join("instances").display().to_string(),
        dir_b.display().to_string(),
        dir_b.join("stdout.log").display().to_string(),
        dir_b.join("exit-status").display().to_string(),
        home_b.clone(),
        tmp_b.clone(),
    ];
    for t in &targets {
        let r = try_read(&s, &s.pk, "aagent", &sid_a, t).await;
        assert_eq!(r["ok"], false, "org A's agent read {t}: {r}");
        // Another uid's process is not even listed in the instance's own /proc.
        let e = r["error"].as_str().unwrap_or("");
        let hidden = t.starts_with("/proc/") && e.contains("No such file");
        assert!(e.contains("ermission denied") || hidden, "{t}: {r}");
    }

    // And nothing of B's reached A's logs.
    let logs = s
        .req("GET", "/v1/agents/aagent/logs", Some(&s.sk), None)
        .await;
    assert!(!logs.body.to_string().contains(secret));

    assert_eq!(s.stop("aagent", &sid_a).await.status, 200);
    let r = s
        .req(
            "DELETE",
            &format!("/v1/agents/bagent/sessions/{sid_b}"),
            Some(&sk_b),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    assert!(!dir_b.exists(), "the instance directory is removed");
}

/// The control plane's files are closed: the data dir can only be passed through, and its files
/// are the server's alone.
fn assert_control_plane_closed(data: &std::path::Path) {
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(data), 0o711, "data dir");
    for f in ["secrets.key", "cattery.db", "server-id"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
}

/// A descriptor the server inherited from whoever started it (a shell's redirect, a service
/// manager's socket) stays the server's: no instance, which runs an org's code, gets it.
#[tokio::test(flavor = "multi_thread")]
async fn descriptors_the_server_inherited_do_not_reach_instances() {
    use std::os::fd::AsRawFd;
    const FD: i32 = 97;
    let held = tempfile::tempdir().unwrap();
    let path = held.path().join("held-by-the-server");
    std::fs::write(&path, "only for the server").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let mut s = Server::unstarted(&[], &[], None);
    s.inherited_fd = Some((file.as_raw_fd(), FD));
    let s = s.start_now().await;
    // The server has it...
    let link = std::fs::read_link(format!("/proc/{}/fd/{FD}", s.pid())).unwrap();
    assert_eq!(link, path);

    // ... its instance has not.
    s.deploy("fds", &[], json!({})).await;
    let sid = s.start_ok("fds").await;
    let seen = try_read(&s, &s.pk, "fds", &sid, &format!("/proc/self/fd/{FD}")).await;
    assert_eq!(
        seen["ok"], false,
        "the instance got the server's fd {FD}: {seen}"
    );
    let error = seen["error"].as_str().unwrap();
    assert!(error.contains("No such file"), "not absent: {seen}");
    assert_eq!(s.stop("fds", &sid).await.status, 200);
}

/// Asks a session's test agent to write a small file at `path`; returns its answer.
async fn try_write(s: &Server, pk: &str, agent: &str, sid: &str, path: &str) -> Value {
    as_agent(s, pk, agent, sid, "write", path).await
}

/// Org B's agent of the test agent, deployed, and a session of it started once a uid is free
/// (the tests give every instance one uid, so B's waits for A's to be given back): B's private
/// key, public key and session id.
async fn org_b_session(s: &Server) -> (String, String, String) {
    let (sk_b, pk_b) = (s.key("private", "org-b"), s.key("public", "org-b"));
    let cmd = vec![common::test_agent().display().to_string()];
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&sk_b),
            Some(json!({"serviceName": "bagent", "command": cmd,
                        "env": {"CATTERY_TEST_TAG": s.tag}})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid_b = common::wait_for(
        Duration::from_secs(10),
        "a start under the freed uid",
        || {
            let pk_b = &pk_b;
            async move {
                let r = s
                    .req(
                        "POST",
                        "/v1/public/bagent/start",
                        Some(pk_b),
                        Some(json!({})),
                    )
                    .await;
                (r.status == 200).then(|| r.body["sessionId"].as_str().unwrap().to_string())
            }
        },
    )
    .await;
    (sk_b, pk_b, sid_b)
}

/// The shared world-writable places are each instance's own: org A's agent writes to `/tmp`,
/// `/var/tmp`, `/dev/shm` and `/run/lock` (not `$TMPDIR`) and ends; org B's agent, given the same uid (a
/// one-uid range), finds none of it, and nothing reached the host's own directories. Nor does
/// an agent see processes of other uids in `/proc` (the server's command line).
#[tokio::test(flavor = "multi_thread")]
async fn what_an_agent_leaves_in_tmp_or_dev_shm_is_gone_for_the_next_instance_of_its_uid() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    // One uid for every instance, outside the default range other tests draw from.
    let uid = 2_000_100_000 + (std::process::id() % 500);
    let range = format!("{uid}-{uid}");
    let s = Server::start(&["--instance-uids", &range]).await;
    let places: Vec<String> = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"]
        .iter()
        .filter(|d| std::path::Path::new(d).is_dir())
        .map(|d| format!("{d}/cattery-leftover-{}", s.tag))
        .collect();

    // Org A (the default org) leaves files in each place, then ends.
    s.deploy("aagent", &[], json!({})).await;
    let sid_a = s.start_ok("aagent").await;
    let a = info(&s, &s.pk, "aagent", &sid_a).await;
    assert_eq!(a["uid"].as_u64(), Some(u64::from(uid)));
    for p in &places {
        let w = try_write(&s, &s.pk, "aagent", &sid_a, p).await;
        assert_eq!(w["ok"], true, "{w}");
        let r = try_read(&s, &s.pk, "aagent", &sid_a, p).await;
        assert_eq!(r["ok"], true, "A reads back its own file: {r}");
    }
    let leaked: Vec<&String> = places
        .iter()
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
    assert_eq!(s.stop("aagent", &sid_a).await.status, 200);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;

    // Org B, under the same uid (once A's is given back).
    let (sk_b, pk_b, sid_b) = org_b_session(&s).await;
    let b = info(&s, &pk_b, "bagent", &sid_b).await;
    assert_eq!(b["uid"].as_u64(), Some(u64::from(uid)), "the same uid as A");
    let mut seen = Vec::new();
    for p in &places {
        let r = try_read(&s, &pk_b, "bagent", &sid_b, p).await;
        if r["ok"] != false {
            seen.push(r);
        }
    }
    // The server's command line (and any other uid's process) is hidden.
    let server = format!("/proc/{}/cmdline", s.pid());
    let proc_r = try_read(&s, &pk_b, "bagent", &sid_b, &server).await;
    let own = try_read(&s, &pk_b, "bagent", &sid_b, "/proc/self/cmdline").await;
    let _ = s
        .req(
            "DELETE",
            &format!("/v1/agents/bagent/sessions/{sid_b}"),
            Some(&sk_b),
            None,
        )
        .await;
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    for p in &places {
        let _ = std::fs::remove_file(p);
    }
    assert!(seen.is_empty(), "org B read org A's leftovers: {seen:?}");
    assert!(leaked.is_empty(), "A's files reached the host: {leaked:?}");
    assert_eq!(own["ok"], true, "{own}");
    assert_eq!(
        proc_r["ok"], false,
        "B sees the server's command line: {proc_r}"
    );
    assert!(
        s.log()
            .contains("private /tmp, /var/tmp, /dev/shm and /run/lock"),
        "{}",
        s.log()
    );
}

/// What an agent leaves in the kernel rather than in a file is gone for the next instance of
/// its uid too: a System V shared memory segment and a POSIX message queue (each instance has
/// an IPC namespace of its own, gone with its last process) and keys in its session, user,
/// user session and persistent keyrings (each instance gets a session keyring of its own, and
/// its uid's keyrings are emptied before its code runs). Org A's agent leaves each and ends;
/// org B's agent, given the same uid (a one-uid range), finds none.
#[tokio::test(flavor = "multi_thread")]
async fn what_an_agent_leaves_in_the_kernel_is_gone_for_the_next_instance_of_its_uid() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let uid = 2_000_100_000 + 500 + (std::process::id() % 500);
    let range = format!("{uid}-{uid}");
    let s = Server::start(&["--instance-uids", &range]).await;
    let tag = format!("kernel-{}", s.tag);

    s.deploy("aagent", &[], json!({})).await;
    let sid_a = s.start_ok("aagent").await;
    let a = info(&s, &s.pk, "aagent", &sid_a).await;
    assert_eq!(a["uid"].as_u64(), Some(u64::from(uid)));
    let left = as_agent(&s, &s.pk, "aagent", &sid_a, "leave-kernel", &tag).await;
    for what in ["shm", "mqueue", "session", "user", "userSession"] {
        assert_eq!(left[what], true, "A could not leave {what}: {left}");
    }
    let own = as_agent(&s, &s.pk, "aagent", &sid_a, "find-kernel", &tag).await;
    assert!(
        own["found"].as_array().is_some_and(|f| f.len() >= 5),
        "A finds what it left: {own}"
    );
    assert_eq!(s.stop("aagent", &sid_a).await.status, 200);
    s.wait_no_agent_pids(Duration::from_secs(10)).await;

    let (sk_b, pk_b, sid_b) = org_b_session(&s).await;
    let b = info(&s, &pk_b, "bagent", &sid_b).await;
    assert_eq!(b["uid"].as_u64(), Some(u64::from(uid)), "the same uid as A");
    let found = as_agent(&s, &pk_b, "bagent", &sid_b, "find-kernel", &tag).await;
    let _ = s
        .req(
            "DELETE",
            &format!("/v1/agents/bagent/sessions/{sid_b}"),
            Some(&sk_b),
            None,
        )
        .await;
    s.wait_no_agent_pids(Duration::from_secs(10)).await;
    assert_eq!(found["found"], json!([]), "org B found org A's leftovers");
}

/// Pids of the processes running under `uid`.
fn pids_of_uid(uid: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            (e.metadata().ok()?.uid() == uid).then_some(pid)
        })
        .collect()
}

/// Without cgroups an instance's processes are found by their process group and the
/// environment tag; a process that leaves both (`setsid`, then an exec with an empty
/// environment) must still end with the session, or it would keep running under the uid
/// the next instance (of any org) is given, and read that instance's environment. So no
/// process of the instance's uid outlives it.
#[tokio::test(flavor = "multi_thread")]
async fn without_cgroups_nothing_under_an_instances_uid_outlives_it() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let s = Server::start_with_env(&[], &[("CATTERY_NO_CGROUPS", "1")]).await;
    let agent = common::test_agent().display().to_string();
    let script =
        "setsid /usr/bin/env -i /bin/sleep 100000 </dev/null >/dev/null 2>&1 & exec \"$0\"";
    s.deploy(
        "untagged",
        &[],
        json!({"command": ["/bin/sh", "-c", script, agent]}),
    )
    .await;
    let sid = s.start_ok("untagged").await;
    let i = info(&s, &s.pk, "untagged", &sid).await;
    let uid = i["uid"].as_u64().unwrap() as u32;
    assert!(RANGE.contains(&uid), "{i}");
    assert!(pids_of_uid(uid).len() >= 2, "the untagged sleeper runs");
    assert_eq!(s.stop("untagged", &sid).await.status, 200);
    common::wait_for(
        Duration::from_secs(10),
        "no process of the uid",
        || async move { pids_of_uid(uid).is_empty().then_some(()) },
    )
    .await;
}

/// A deploy's answer about an org's paths (its `command`, `workingDir`, `local:` directory)
/// tells no more of the host's files than an instance could see: a program, a directory and a
/// bot directory behind a directory only its owner may enter (another org's files, `/root`)
/// get the answer a missing one next to them gets, the directory that blocks both named. As
/// the server (root) it told them apart: "cannot reach the program" for one that exists, "does
/// not exist" for one that does not.
#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_tells_nothing_of_files_an_instance_cannot_see() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        return; // Instances get uids of their own only when the server runs as root.
    }
    let s = Server::start(&[]).await;
    let private = tempfile::tempdir().unwrap();
    let hidden = private.path();
    std::fs::set_permissions(hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
    let prog = hidden.join("there");
    std::fs::write(&prog, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(hidden.join("there.d")).unwrap();
    std::fs::write(hidden.join("there.d/bot.py"), "").unwrap();

    let mut n = 0;
    let mut answer = |spec: Value| {
        n += 1;
        let name = format!("probe{n}");
        let s = &s;
        async move {
            let a = s.deploy(&name, &[], spec).await;
            assert_eq!(a["ready"], false, "{a}");
            a["errors"][0]["message"].as_str().unwrap().to_string()
        }
    };
    let at = |name: &str| hidden.join(name).display().to_string();
    let agent = common::test_agent().display().to_string();
    let cases = [
        (
            "a program",
            json!({"command": [at("there")]}),
            json!({"command": [at("gone")]}),
        ),
        (
            "a working directory",
            json!({"command": [&agent], "workingDir": at("there.d")}),
            json!({"command": [&agent], "workingDir": at("gone.d")}),
        ),
        (
            "a `local:` bot directory",
            json!({"command": null, "image": format!("local:{}", at("there.d"))}),
            json!({"command": null, "image": format!("local:{}", at("gone.d"))}),
        ),
    ];
    for (what, existing, missing) in cases {
        let seen = answer(existing).await;
        let unseen = answer(missing).await;
        assert_eq!(
            seen.replace("there", "X"),
            unseen.replace("gone", "X"),
            "{what}: the answers differ"
        );
        if what != "a `local:` bot directory" {
            let blocked = format!(
                "{} (mode 700) does not let other users through",
                hidden.display()
            );
            assert!(seen.contains(&blocked), "{what}: {seen}");
        }
    }
    // What an instance can see is still told apart: a file that is not executable.
    let open = common::open_tempdir();
    let plain = open.path().join("plain");
    std::fs::write(&plain, "").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let msg = answer(json!({"command": [plain]})).await;
    assert!(msg.contains("is not an executable file"), "{msg}");
}

/// A `local:` bot directory's fingerprint, whose change makes a new deployment, counts only
/// what an instance could read: files in a subdirectory only root may enter, or a bot
/// directory reached through a link into a directory only its owner may enter (`/root`,
/// another org's), change nothing of the deployment when they change, so its id tells the
/// org nothing of them. As the server (root) the walk read them, and a redeploy after such a
/// file changed made a new deployment. An edit an instance can see still does.
#[tokio::test(flavor = "multi_thread")]
async fn a_local_bots_deployment_does_not_change_with_files_an_instance_cannot_see() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        return; // Instances get uids of their own only when the server runs as root.
    }
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let s = Server::start(&[]).await;
    let open = common::open_tempdir();
    let bot = open.path().join("bot");
    std::fs::create_dir_all(bot.join("private")).unwrap();
    mode(&bot, 0o755);
    std::fs::write(bot.join("bot.py"), "").unwrap();
    mode(&bot.join("bot.py"), 0o644);
    std::fs::write(bot.join("private/notes"), "a").unwrap();
    mode(&bot.join("private"), 0o700);
    let hidden = tempfile::tempdir().unwrap();
    mode(hidden.path(), 0o700);
    std::fs::create_dir(hidden.path().join("bot")).unwrap();
    std::fs::write(hidden.path().join("bot/bot.py"), "").unwrap();
    let linked = open.path().join("linked");
    std::os::unix::fs::symlink(hidden.path().join("bot"), &linked).unwrap();

    let deployed = |r: common::Resp| {
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["activeDeploymentId"].as_str().unwrap().to_string()
    };
    let cases = [
        ("hides", &bot, bot.join("private/notes")),
        ("links", &linked, hidden.path().join("bot/bot.py")),
    ];
    for (name, dir, unseen) in cases {
        let image = json!({"image": format!("local:{}", dir.display())});
        let body = json!({"serviceName": name, "command": null, "image": image["image"]});
        let first = deployed(s.req("POST", "/v1/agents", Some(&s.sk), Some(body)).await);
        std::fs::write(&unseen, "changed where no instance can see").unwrap();
        let url = format!("/v1/agents/{name}");
        let again = deployed(s.req("POST", &url, Some(&s.sk), Some(image.clone())).await);
        assert_eq!(
            again, first,
            "{name}: a change no instance can see made a new deployment"
        );
        if name == "hides" {
            std::fs::write(bot.join("bot.py"), "# edited\n").unwrap();
            let edited = deployed(s.req("POST", &url, Some(&s.sk), Some(image)).await);
            assert_ne!(
                edited, first,
                "an edit an instance can see makes a new deployment"
            );
        }
    }
}
