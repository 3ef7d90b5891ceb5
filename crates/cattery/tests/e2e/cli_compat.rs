//! Compatibility suite (issue #4): the official Pipecat Cloud clients, unchanged, against a
//! live Cattery. Each test runs real CLI commands as subprocesses and checks their exit codes
//! and output:
//!
//! - the current CLI, `pipecat cloud ...` (`pipecat-ai[cli]` + `pipecatcloud` 1.x, venv
//!   `~/.cache/cattery-py/main`, `/var/cache/cattery-py/main` as root), in plain and `--output json` modes;
//! - the legacy `pcc` (`pipecatcloud==0.7.2`, venv `pcc` beside it);
//! - the SDK's `pipecatcloud.session.Session(...).start()` from both.
//!
//! Auth is exercised both ways the clients support: `PIPECAT_API_HOST` + `PIPECAT_TOKEN`
//! (with and without `PIPECAT_ORG`, which makes the CLI discover the org) and a
//! `PIPECAT_CONFIG_PATH` file (written by hand, or by `pcc auth use-pat`).
//!
//! The venvs come from `scripts/setup-python.sh` (run by `.ci/run`); a missing venv fails the
//! tests rather than skipping them. [`COMMANDS`] lists every command the suite runs, and
//! `docs/compatibility.md` must list exactly the same ones (checked by
//! `compatibility_doc_matches_the_suite`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{wait_for, Server};
use serde_json::{json, Value};

/// Every (client, command, mode) the suite runs. Keep `docs/compatibility.md` in step.
const COMMANDS: &[(&str, &str, &str)] = &[
    (CUR, "organizations list", "plain"),
    (CUR, "organizations list", "json"),
    (CUR, "organizations keys create", "plain"),
    (CUR, "organizations keys create", "json"),
    (CUR, "organizations keys list", "plain"),
    (CUR, "organizations keys list", "json"),
    (CUR, "organizations keys revoke", "tty"),
    (CUR, "organizations properties list", "plain"),
    (CUR, "organizations properties list", "json"),
    (CUR, "organizations properties schema", "plain"),
    (CUR, "organizations properties schema", "json"),
    (CUR, "organizations properties set", "plain"),
    (CUR, "organizations properties set", "json"),
    (CUR, "regions list", "plain"),
    (CUR, "regions list", "json"),
    (CUR, "auth whoami", "plain"),
    (CUR, "auth whoami", "json"),
    (CUR, "secrets set", "plain"),
    (CUR, "secrets set", "json"),
    (CUR, "secrets list", "plain"),
    (CUR, "secrets list", "json"),
    (CUR, "secrets list NAME", "plain"),
    (CUR, "secrets list NAME", "json"),
    (CUR, "secrets image-pull-secret", "plain"),
    (CUR, "secrets image-pull-secret", "json"),
    (CUR, "secrets unset", "plain"),
    (CUR, "secrets unset", "json"),
    (CUR, "secrets delete", "plain"),
    (CUR, "secrets delete", "json"),
    (CUR, "deploy --yes (create)", "plain"),
    (CUR, "deploy --yes (update)", "plain"),
    (CUR, "deploy --yes --force", "plain"),
    (CUR, "deploy --yes (create)", "json"),
    (CUR, "deploy --yes (update)", "json"),
    (CUR, "deploy --yes --force", "json"),
    (CUR, "deploy --yes --resources --architecture", "json"),
    (CUR, "agent list", "plain"),
    (CUR, "agent list", "json"),
    (CUR, "agent status", "plain"),
    (CUR, "agent status", "json"),
    (CUR, "agent status", "rich"),
    (CUR, "agent deployments", "plain"),
    (CUR, "agent deployments", "json"),
    (CUR, "agent start --api-key --force", "plain"),
    (CUR, "agent start --api-key --force --data", "plain"),
    (CUR, "agent start --api-key --force", "json"),
    (CUR, "agent start --api-key --force --data", "json"),
    (CUR, "agent start --api-key --force --use-daily", "plain"),
    (CUR, "agent sessions --end-state", "plain"),
    (CUR, "organizations default-region", "plain"),
    (CUR, "agent profiles list", "plain"),
    (CUR, "agent sessions", "plain"),
    (CUR, "agent sessions", "json"),
    (CUR, "agent sessions --id", "plain"),
    (CUR, "agent sessions --id", "json"),
    (CUR, "agent logs", "plain"),
    (CUR, "agent logs", "json"),
    (CUR, "agent logs --session-id", "plain"),
    (CUR, "agent logs --session-id", "json"),
    (CUR, "agent stop --session-id --force", "plain"),
    (CUR, "agent stop --session-id --force", "json"),
    (CUR, "agent delete --force", "plain"),
    (CUR, "agent delete --force", "json"),
    (PCC, "auth use-pat", "rich"),
    (PCC, "organizations list", "rich"),
    (PCC, "organizations keys create --default", "rich"),
    (PCC, "organizations keys list", "rich"),
    (PCC, "organizations keys revoke", "tty"),
    (PCC, "organizations properties list", "rich"),
    (PCC, "organizations properties set", "rich"),
    (PCC, "regions list", "rich"),
    (PCC, "secrets set", "rich"),
    (PCC, "secrets list", "rich"),
    (PCC, "secrets list NAME", "rich"),
    (PCC, "secrets image-pull-secret", "rich"),
    (PCC, "secrets unset", "rich"),
    (PCC, "secrets delete", "rich"),
    (PCC, "deploy --yes (create)", "rich"),
    (PCC, "deploy --yes (update)", "rich"),
    (PCC, "deploy --yes --force", "rich"),
    (PCC, "agent list", "rich"),
    (PCC, "agent status", "rich"),
    (PCC, "agent deployments", "rich"),
    (PCC, "agent start --force (default key)", "rich"),
    (PCC, "agent start --api-key --force --data", "rich"),
    (PCC, "agent sessions", "rich"),
    (PCC, "agent sessions --id", "rich"),
    (PCC, "agent logs --session-id", "rich"),
    (PCC, "agent stop --session-id --force", "rich"),
    (PCC, "agent delete --force", "rich"),
    (SDK1, "Session(...).start()", "python"),
    (SDK0, "Session(...).start()", "python"),
    (SDK1, "Session(use_daily=True).start()", "python"),
    // Builds, run by `builds::official_cli_deploys_without_an_image` and (Docker)
    // `builds::official_cli_deploys_a_dockerfile_with_the_docker_builder`.
    (CUR, "deploy --yes (no image: upload and build)", "plain"),
    (
        CUR,
        "deploy --yes --force (no image: cached build)",
        "plain",
    ),
    (CUR, "deploy --yes (no image: failed build)", "plain"),
    (CUR, "build logs", "plain"),
    (CUR, "build status", "plain"),
    (CUR, "build list", "plain"),
    (CUR, "deploy --yes (no image: Docker build)", "plain"),
];

const CUR: &str = "pipecat cloud (pipecatcloud 1.x)";
const PCC: &str = "pcc (pipecatcloud 0.7.2)";
const SDK1: &str = "SDK pipecatcloud 1.x";
const SDK0: &str = "SDK pipecatcloud 0.7.2";

/// Per-command timeout; `deploy` polls every 5 s and is ready at the first poll here.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// Python of a venv made by `scripts/setup-python.sh`; panics (fails the test) when missing.
fn venv_python(var: &str, name: &str) -> PathBuf {
    let py = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| common::py_env_dir().join(name).join("bin/python"));
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup-python.sh (the compatibility suite needs both client \
         venvs and fails without them)",
        py.display()
    );
    py
}

fn main_python() -> PathBuf {
    venv_python("CATTERY_TEST_PYTHON", "main")
}

fn pcc_python() -> PathBuf {
    venv_python("CATTERY_TEST_PCC_PYTHON", "pcc")
}

/// How a CLI finds its server and credentials.
enum Auth {
    /// `PIPECAT_TOKEN` and, if given, `PIPECAT_ORG`.
    Env(String, Option<String>),
    /// `PIPECAT_CONFIG_PATH` only (the file may be written by the CLI itself).
    ConfigFile,
}

/// One client, set up against one server, with its own HOME, config path and working dir.
struct Cli {
    client: &'static str,
    program: Vec<PathBuf>,
    json_flag: bool,
    home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

/// What a command did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Asserts that the command succeeded and that its stdout shows each of `needles`.
    fn shows(&self, what: &str, needles: &[&str]) {
        ok(self, what);
        for n in needles {
            assert!(
                self.stdout.contains(n),
                "{what}: no {n:?} in:\n{}",
                self.text()
            );
        }
    }
    fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl Cli {
    fn new(client: &'static str, s: &Server, auth: Auth) -> Cli {
        let (program, json_flag) = if client == CUR {
            (
                vec![main_python().with_file_name("pipecat"), "cloud".into()],
                true,
            )
        } else {
            (vec![pcc_python().with_file_name("pcc")], false)
        };
        assert!(program[0].exists(), "{} missing", program[0].display());
        let home = common::open_tempdir();
        let mut env = vec![
            ("HOME".to_string(), home.path().display().to_string()),
            ("PIPECAT_API_HOST".into(), s.base.clone()),
            (
                "PIPECAT_CONFIG_PATH".into(),
                home.path().join("creds.toml").display().to_string(),
            ),
            ("COLUMNS".into(), "250".into()),
            ("NO_COLOR".into(), "1".into()),
            ("TERM".into(), "dumb".into()),
            ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ];
        if let Auth::Env(token, org) = auth {
            env.push(("PIPECAT_TOKEN".into(), token));
            if let Some(o) = org {
                env.push(("PIPECAT_ORG".into(), o));
            }
        }
        Cli {
            client,
            program,
            json_flag,
            home,
            env,
        }
    }

    fn dir(&self) -> &Path {
        self.home.path()
    }

    /// Writes the user config file (mode 0600, as the CLI wants it).
    fn write_config(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir().join("creds.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .args(args)
            .current_dir(self.dir());
        for (k, _) in std::env::vars() {
            if k.starts_with("PIPECAT_") || k.starts_with("PCC_") {
                c.env_remove(k);
            }
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn check_listed(&self, label: &str, mode: &str) {
        assert!(
            COMMANDS.contains(&(self.client, label, mode)),
            "({}, {label}, {mode}) is not in COMMANDS / docs/compatibility.md",
            self.client
        );
    }

    /// Runs `args` (plain mode for the current CLI, the default rich mode for `pcc`).
    fn run(&self, label: &str, args: &[&str]) -> Out {
        let mode = if self.json_flag { "plain" } else { "rich" };
        self.check_listed(label, mode);
        let mut full = Vec::new();
        if self.json_flag {
            full.extend(["--output", "plain"]);
        }
        full.extend_from_slice(args);
        run_with_timeout(self.command(&full), &format!("{} {label}", self.client))
    }

    /// Runs `args` with `--output json` (current CLI only).
    fn run_json(&self, label: &str, args: &[&str]) -> Out {
        assert!(self.json_flag, "json mode is for the current CLI");
        self.check_listed(label, "json");
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        run_with_timeout(
            self.command(&full),
            &format!("{} {label} (json)", self.client),
        )
    }

    /// Runs `args` in the given output mode (current CLI only).
    fn run_mode(&self, label: &str, mode: &str, args: &[&str]) -> Out {
        self.check_listed(label, mode);
        let mut full = vec!["--output", mode];
        full.extend_from_slice(args);
        run_with_timeout(
            self.command(&full),
            &format!("{} {label} ({mode})", self.client),
        )
    }

    /// Runs an interactive command in a pseudo-terminal, answering each `?` prompt with the
    /// next of `answers` (e.g. "\r" picks the first choice of a menu).
    fn run_tty(&self, label: &str, answers: &[&str], args: &[&str]) -> Out {
        self.check_listed(label, "tty");
        let mut argv: Vec<String> = self
            .program
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut py = Command::new(main_python());
        py.arg("-c")
            .arg(PTY_RUNNER)
            .arg(answers.join("|"))
            .args(&argv);
        py.current_dir(self.dir());
        for (k, _) in std::env::vars() {
            if k.starts_with("PIPECAT_") || k.starts_with("PCC_") {
                py.env_remove(k);
            }
        }
        py.envs(self.env.iter().map(|(k, v)| (k, v)));
        run_with_timeout(py, &format!("{} {label} (tty)", self.client))
    }
}

/// Runs a program in a pty and answers prompts (stdlib only).
const PTY_RUNNER: &str = r#"
import os, pty, select, sys, time
answers = [a for a in sys.argv[1].split("|") if a] if len(sys.argv) > 1 else []
argv = sys.argv[2:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
out = b""
deadline = time.time() + 90
while time.time() < deadline:
    r, _, _ = select.select([fd], [], [], 0.1)
    if not r:
        continue
    try:
        chunk = os.read(fd, 65536)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
    if answers and b"?" in chunk:
        time.sleep(0.3)
        os.write(fd, answers.pop(0).encode())
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode("utf-8", "replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;

fn run_with_timeout(mut c: Command, what: &str) -> Out {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > CLI_TIMEOUT {
            // Only the child we started, by its own handle.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {CLI_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Out {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    eprintln!(
        "$ {what} -> {}\n{}{}",
        out.code,
        tail(&out.stdout, 3000),
        tail(&out.stderr, 1500)
    );
    out
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn ok(o: &Out, what: &str) {
    assert_eq!(o.code, 0, "{what} failed:\n{}", o.text());
}

fn session_id_in(o: &Out) -> String {
    let text = o.text();
    let i = text
        .find("Session ID: ")
        .unwrap_or_else(|| panic!("no session id in:\n{text}"));
    text[i + "Session ID: ".len()..]
        .chars()
        .take(36)
        .collect::<String>()
}

/// A directory with a Pipecat `bot.py`: it logs its body and `MY_SECRET`, then runs for
/// `body.seconds` (default 600) seconds.
fn bot_dir(root: &Path) -> PathBuf {
    let d = root.join("bot");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("bot.py"),
        r#"import asyncio
import os

from loguru import logger


async def bot(args):
    body = getattr(args, "body", None) or {}
    logger.info(f"bot started body={body} MY_SECRET={os.environ.get('MY_SECRET', '<unset>')}")
    seconds = body.get("seconds", 600) if isinstance(body, dict) else 600
    await asyncio.sleep(float(seconds))
    logger.info("bot done")
"#,
    )
    .unwrap();
    d
}

fn write_deploy_toml(
    dir: &Path,
    agent: &str,
    bot: &Path,
    secret_set: Option<&str>,
    pull: Option<&str>,
) {
    let mut t = format!(
        "agent_name = \"{agent}\"\nimage = \"local:{}\"\n",
        bot.display()
    );
    if let Some(s) = secret_set {
        t.push_str(&format!("secret_set = \"{s}\"\n"));
    }
    if let Some(p) = pull {
        t.push_str(&format!("image_credentials = \"{p}\"\n"));
    }
    t.push_str("\n[scaling]\nmin_agents = 0\nmax_agents = 3\n");
    std::fs::write(dir.join("pcc-deploy.toml"), t).unwrap();
}

async fn start_server(extra: &[&str]) -> Server {
    let py = main_python();
    let mut args = vec!["--python", py.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

async fn agent_json(s: &Server, name: &str) -> Value {
    s.req("GET", &format!("/v1/agents/{name}"), Some(&s.sk), None)
        .await
        .body
}

#[tokio::test(flavor = "multi_thread")]
async fn current_cli_organizations_keys_properties_regions() {
    let s = start_server(&["--regions", "local,edge"]).await;
    // PIPECAT_TOKEN without PIPECAT_ORG: the CLI discovers the org with GET /v1/organizations.
    let cli = Cli::new(CUR, &s, Auth::Env(s.key("token", "default"), None));

    let o = cli.run("organizations list", &["organizations", "list"]);
    o.shows("organizations list", &["default"]);
    let o = cli.run_json("organizations list", &["organizations", "list"]);
    o.shows("organizations list json", &["\"default\""]);

    let o = cli.run(
        "organizations keys create",
        &["organizations", "keys", "create", "--name", "ci-key"],
    );
    ok(&o, "keys create");
    let created = o
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("pk_"))
        .unwrap_or_else(|| panic!("no pk_ key in {}", o.text()))
        .to_string();
    let o = cli.run_json(
        "organizations keys create",
        &["organizations", "keys", "create", "--name", "json-key"],
    );
    ok(&o, "keys create json");
    assert!(o.json()["key"].as_str().unwrap().starts_with("pk_"));
    let o = cli.run(
        "organizations keys list",
        &["organizations", "keys", "list"],
    );
    o.shows("keys list", &[&created, "ci-key"]);
    let o = cli.run_json(
        "organizations keys list",
        &["organizations", "keys", "list"],
    );
    o.shows("keys list json", &[&created]);

    cur_keys_start_revoke_properties(&s, &cli, &created).await;
    cur_default_region(&s, &cli).await;
}

/// The created key starts sessions; keys revoke; properties.
async fn cur_keys_start_revoke_properties(s: &Server, cli: &Cli, created: &str) {
    // The created key starts sessions. `keys revoke` opens a menu of the active keys; the
    // first is the server's own `pk` (created first), which then fails at once.
    s.deploy("keyed", &[], json!({})).await;
    let r = s
        .req(
            "POST",
            "/v1/public/keyed/start",
            Some(created),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let o = cli.run_tty(
        "organizations keys revoke",
        &["\r"],
        &["organizations", "keys", "revoke"],
    );
    o.shows("keys revoke", &["Success", "revoked"]);
    let r = s
        .req(
            "POST",
            "/v1/public/keyed/start",
            Some(&s.pk),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 401, "revoked key still works: {:?}", r.body);
    let r = s
        .req(
            "POST",
            "/v1/public/keyed/start",
            Some(created),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let o = cli.run_json(
        "organizations keys list",
        &["organizations", "keys", "list"],
    );
    let listed = o.json();
    let revoked = listed.to_string().contains("\"revoked\":true");
    assert!(revoked, "{listed}");

    let o = cli.run(
        "organizations properties list",
        &["organizations", "properties", "list"],
    );
    o.shows("properties list", &["defaultRegion", "local"]);
    let o = cli.run(
        "organizations properties schema",
        &["organizations", "properties", "schema"],
    );
    o.shows("properties schema", &["defaultRegion", "string"]);
    let o = cli.run_json(
        "organizations properties schema",
        &["organizations", "properties", "schema"],
    );
    ok(&o, "properties schema json");
    assert_eq!(
        o.json()["defaultRegion"]["availableValues"],
        json!(["local", "edge"])
    );
    let o = cli.run_json(
        "organizations properties set",
        &[
            "organizations",
            "properties",
            "set",
            "defaultRegion",
            "local",
        ],
    );
    ok(&o, "properties set json");
    let o = cli.run(
        "organizations properties set",
        &[
            "organizations",
            "properties",
            "set",
            "defaultRegion",
            "edge",
        ],
    );
    ok(&o, "properties set");
    let o = cli.run_json(
        "organizations properties list",
        &["organizations", "properties", "list"],
    );
    o.shows("properties list json", &["edge"]);
}

/// New agents follow the org defaultRegion.
async fn cur_default_region(s: &Server, cli: &Cli) {
    // New agents follow the org's defaultRegion.
    let d = s.deploy("in-edge", &[], json!({})).await;
    assert_eq!(d["region"], "edge");
    let o = cli.run(
        "organizations properties set",
        &[
            "organizations",
            "properties",
            "set",
            "defaultRegion",
            "mars",
        ],
    );
    assert_ne!(o.code, 0, "an unknown region must fail:\n{}", o.text());
    assert!(o.text().contains("not available"), "{}", o.text());

    let o = cli.run("regions list", &["regions", "list"]);
    o.shows("regions list", &["local", "edge"]);
    let o = cli.run_json("regions list", &["regions", "list"]);
    o.shows("regions list json", &["display_name"]);

    let o = cli.run("auth whoami", &["auth", "whoami"]);
    o.shows("whoami", &["default"]);
    let o = cli.run_json("auth whoami", &["auth", "whoami"]);
    ok(&o, "whoami json");
}

#[tokio::test(flavor = "multi_thread")]
async fn current_cli_secrets() {
    let s = start_server(&[]).await;
    // A config file written by hand: token, org and nothing else.
    let token = s.key("token", "default");
    let cli = Cli::new(CUR, &s, Auth::ConfigFile);
    cli.write_config(&format!("token = \"{token}\"\norg = \"default\"\n"));

    let o = cli.run(
        "secrets set",
        &[
            "secrets",
            "set",
            "app-secrets",
            "API_KEY=v=1 \"x\"",
            "OTHER=two",
            "--skip",
        ],
    );
    o.shows("secrets set", &["created successfully in local"]);
    let o = cli.run(
        "secrets set",
        &["secrets", "set", "app-secrets", "THIRD=3", "--skip"],
    );
    o.shows("secrets set (modify)", &["modified"]);
    let o = cli.run_json(
        "secrets set",
        &["secrets", "set", "json-set", "J=1", "K=2", "--skip"],
    );
    ok(&o, "secrets set json");
    assert!(o.stderr.contains("Success"), "{}", o.text());
    cur_secret_names_and_image_pull(&s, &cli).await;
}

/// The server is the stricter gate on names; image pull secrets.
async fn cur_secret_names_and_image_pull(s: &Server, cli: &Cli) {
    // The server is the stricter gate on names (the CLI allows upper case and '_').
    let o = cli.run(
        "secrets set",
        &["secrets", "set", "Bad_Name", "K=v", "--skip"],
    );
    assert_ne!(o.code, 0, "{}", o.text());
    assert!(o.text().contains("invalid secret set name"), "{}", o.text());

    let o = cli.run("secrets list", &["secrets", "list"]);
    o.shows("secrets list", &["app-secrets"]);
    let o = cli.run_json("secrets list", &["secrets", "list"]);
    ok(&o, "secrets list json");
    assert_eq!(o.json()["secretSets"][0]["name"], "app-secrets");
    let o = cli.run("secrets list NAME", &["secrets", "list", "app-secrets"]);
    ok(&o, "secrets list NAME");
    for k in ["API_KEY", "OTHER", "THIRD"] {
        assert!(o.stdout.contains(k), "{k}: {}", o.text());
    }
    assert!(!o.text().contains("v=1"), "a value was shown");
    let o = cli.run_json("secrets list NAME", &["secrets", "list", "app-secrets"]);
    ok(&o, "secrets list NAME json");
    assert_eq!(o.json()["secrets"].as_array().unwrap().len(), 3);

    let o = cli.run(
        "secrets image-pull-secret",
        &[
            "secrets",
            "image-pull-secret",
            "my-pull",
            "https://index.docker.io/v1",
            "user:token",
            "--skip",
        ],
    );
    ok(&o, "image-pull-secret");
    let o = cli.run_json(
        "secrets image-pull-secret",
        &[
            "secrets",
            "image-pull-secret",
            "json-pull",
            "ghcr.io",
            "user:token",
            "--skip",
        ],
    );
    ok(&o, "image-pull-secret json");
    let sets = s.req("GET", "/v1/secrets", Some(&s.sk), None).await.body;
    assert!(sets["sets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "my-pull" && x["type"] == "imagePullSecret"));

    let o = cli.run(
        "secrets unset",
        &["secrets", "unset", "app-secrets", "OTHER", "--skip"],
    );
    ok(&o, "secrets unset");
    let o = cli.run(
        "secrets unset",
        &["secrets", "unset", "app-secrets", "NOPE", "--skip"],
    );
    assert_ne!(o.code, 0, "{}", o.text());
    let o = cli.run_json(
        "secrets unset",
        &["secrets", "unset", "json-set", "K", "--skip"],
    );
    ok(&o, "secrets unset json");
    for set in ["json-set", "json-pull"] {
        let o = cli.run_json("secrets delete", &["secrets", "delete", set, "--skip"]);
        ok(&o, "secrets delete json");
    }
    let one = s
        .req("GET", "/v1/secrets/app-secrets", Some(&s.sk), None)
        .await
        .body;
    assert_eq!(
        one["secrets"],
        json!([{"fieldName": "API_KEY"}, {"fieldName": "THIRD"}])
    );
    let o = cli.run(
        "secrets delete",
        &["secrets", "delete", "my-pull", "--skip"],
    );
    ok(&o, "secrets delete");
    let o = cli.run(
        "secrets delete",
        &["secrets", "delete", "app-secrets", "--skip"],
    );
    ok(&o, "secrets delete");
    let o = cli.run(
        "secrets delete",
        &["secrets", "delete", "app-secrets", "--skip"],
    );
    assert_ne!(o.code, 0, "deleting a missing set must fail:\n{}", o.text());
    let o = cli.run("secrets list", &["secrets", "list"]);
    assert_ne!(o.code, 0, "no sets left:\n{}", o.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn current_cli_agent_lifecycle() {
    let s = start_server(&[]).await;
    let cli = Cli::new(
        CUR,
        &s,
        Auth::Env(s.key("token", "default"), Some("default".into())),
    );
    let bot = bot_dir(cli.dir());
    let o = cli.run(
        "secrets set",
        &[
            "secrets",
            "set",
            "bot-secrets",
            "MY_SECRET=from-the-set",
            "--skip",
        ],
    );
    ok(&o, "secrets set");
    write_deploy_toml(cli.dir(), "cli-agent", &bot, Some("bot-secrets"), None);

    let o = cli.run("deploy --yes (create)", &["deploy", "--yes"]);
    o.shows("deploy create", &["is ready"]);
    let a = agent_json(&s, "cli-agent").await;
    assert_eq!(a["secretSet"], "bot-secrets");
    let dep1 = a["desiredDeploymentId"].as_str().unwrap().to_string();
    let o = cli.run("deploy --yes (update)", &["deploy", "--yes"]);
    o.shows("deploy update", &["nothing changed"]);
    assert_eq!(
        agent_json(&s, "cli-agent").await["desiredDeploymentId"],
        dep1.as_str()
    );
    let o = cli.run("deploy --yes --force", &["deploy", "--yes", "--force"]);
    ok(&o, "deploy --force");
    let dep2 = agent_json(&s, "cli-agent").await["desiredDeploymentId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(dep1, dep2, "--force makes a new deployment");

    cur_agent_queries(&cli, &dep1, &dep2).await;

    // Sessions: one without data (runs 600 s), one with data (ends after 1 s), one in json.
    let o = cli.run(
        "agent start --api-key --force",
        &["agent", "start", "cli-agent", "--api-key", &s.pk, "--force"],
    );
    ok(&o, "agent start");
    let long = session_id_in(&o);
    let o = cli.run(
        "agent start --api-key --force --data",
        &[
            "agent",
            "start",
            "cli-agent",
            "--api-key",
            &s.pk,
            "--force",
            "--data",
            "{\"seconds\": 1}",
        ],
    );
    ok(&o, "agent start --data");
    let short = session_id_in(&o);
    let o = cli.run_json(
        "agent start --api-key --force",
        &[
            "agent",
            "start",
            "cli-agent",
            "--api-key",
            &s.pk,
            "--force",
            "--data",
            "{\"seconds\": 0}",
        ],
    );
    o.shows("agent start json", &["sessionId"]);
    s.wait_ended("cli-agent", &short, Duration::from_secs(30))
        .await;

    let o = cli.run("agent sessions", &["agent", "sessions", "cli-agent"]);
    o.shows("agent sessions", &[&long, &short]);
    let o = cli.run_json("agent sessions", &["agent", "sessions", "cli-agent"]);
    ok(&o, "agent sessions json");
    assert_eq!(o.json()["sessions"].as_array().unwrap().len(), 3);
    let o = cli.run(
        "agent sessions --id",
        &["agent", "sessions", "cli-agent", "--id", &long],
    );
    o.shows("agent sessions --id", &[&long, "Active"]);
    let o = cli.run_json(
        "agent sessions --id",
        &["agent", "sessions", "cli-agent", "--id", &short],
    );
    ok(&o, "agent sessions --id json");
    assert_eq!(o.json()["sessionId"], short.as_str());
    assert!(o.json()["endedAt"].is_string());

    cur_logs_and_stops(&s, &cli, &long, &short).await;

    cur_json_deploy_and_delete(&s, &cli, &bot).await;
}

/// agent list, status and deployments, text, json and rich.
async fn cur_agent_queries(cli: &Cli, dep1: &str, dep2: &str) {
    let o = cli.run("agent list", &["agent", "list"]);
    o.shows("agent list", &["cli-agent", dep2]);
    let o = cli.run_json("agent list", &["agent", "list"]);
    ok(&o, "agent list json");
    assert_eq!(o.json()["agents"][0]["name"], "cli-agent");
    let o = cli.run("agent status", &["agent", "status", "cli-agent"]);
    o.shows("agent status", &["Ready: True", "Min Agents: 0"]);
    let o = cli.run_json("agent status", &["agent", "status", "cli-agent"]);
    ok(&o, "agent status json");
    assert_eq!(o.json()["ready"], true);
    let o = cli.run_mode("agent status", "rich", &["agent", "status", "cli-agent"]);
    o.shows("agent status rich", &["Ready"]);
    let o = cli.run("agent status", &["agent", "status", "no-such-agent"]);
    assert_eq!(o.code, 1, "{}", o.text());
    assert!(
        o.text().contains("No deployment data found"),
        "{}",
        o.text()
    );
    let o = cli.run("agent deployments", &["agent", "deployments", "cli-agent"]);
    o.shows("agent deployments", &[dep1, dep2]);
    let o = cli.run_json("agent deployments", &["agent", "deployments", "cli-agent"]);
    ok(&o, "agent deployments json");
    assert_eq!(o.json()["deployments"].as_array().unwrap().len(), 2);
}

/// Logs (the secret arrived as an env var; lines found by session id), then stops.
async fn cur_logs_and_stops(s: &Server, cli: &Cli, long: &str, short: &str) {
    // Logs: the secret arrived as an env var; the session's lines are found by its id.
    let o = wait_for(
        Duration::from_secs(20),
        "the bot's first log line",
        || async {
            let o = cli.run(
                "agent logs --session-id",
                &["agent", "logs", "cli-agent", "--session-id", long],
            );
            (o.code == 0 && o.stdout.contains("MY_SECRET=from-the-set")).then_some(o)
        },
    )
    .await;
    assert!(o.stdout.contains("bot started body={}"), "{}", o.text());
    assert!(
        !o.stdout.contains(short),
        "another session's lines: {}",
        o.text()
    );
    let o = cli.run_json(
        "agent logs --session-id",
        &["agent", "logs", "cli-agent", "--session-id", short],
    );
    ok(&o, "agent logs json");
    let logs = o.json();
    assert!(logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["sessionId"] == short));
    assert!(logs.to_string().contains("'seconds': 1"), "{logs}");
    let o = cli.run("agent logs", &["agent", "logs", "cli-agent", "-n", "5"]);
    ok(&o, "agent logs");

    let o = cli.run(
        "agent stop --session-id --force",
        &[
            "agent",
            "stop",
            "cli-agent",
            "--session-id",
            long,
            "--force",
        ],
    );
    o.shows("agent stop", &["stopped successfully"]);
    let ended = s.session("cli-agent", long).await;
    assert_eq!(ended["endReason"], "stopped", "{ended}");

    let o = cli.run(
        "agent delete --force",
        &["agent", "delete", "cli-agent", "--force"],
    );
    ok(&o, "agent delete");
    assert_eq!(
        s.req("GET", "/v1/agents/cli-agent", Some(&s.sk), None)
            .await
            .status,
        404
    );
    let o = cli.run(
        "agent delete --force",
        &["agent", "delete", "cli-agent", "--force"],
    );
    assert_eq!(o.code, 1, "deleting again reports not found:\n{}", o.text());
    let o = cli.run(
        "agent start --api-key --force",
        &["agent", "start", "cli-agent", "--api-key", &s.pk, "--force"],
    );
    assert_eq!(o.code, 1, "{}", o.text());
}

/// json mode for deploy and delete.
async fn cur_json_deploy_and_delete(s: &Server, cli: &Cli, bot: &Path) {
    // json mode for deploy and delete.
    write_deploy_toml(cli.dir(), "json-agent", bot, None, None);
    let o = cli.run_json("deploy --yes (create)", &["deploy", "--yes"]);
    ok(&o, "deploy json");
    assert_eq!(o.json()["ready"], true, "{}", o.text());
    let o = cli.run_json("deploy --yes (update)", &["deploy", "--yes"]);
    ok(&o, "deploy update json");
    assert_eq!(o.json()["ready"], true, "{}", o.text());
    let o = cli.run_json("deploy --yes --force", &["deploy", "--yes", "--force"]);
    ok(&o, "deploy --force json");
    let dep = o.json()["deploymentId"].as_str().unwrap().to_string();
    assert_eq!(
        agent_json(s, "json-agent").await["desiredDeploymentId"],
        dep.as_str()
    );
    // Explicit sizing and the host's architecture: honoured, and shown in status.
    let host = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    };
    let o = cli.run_json(
        "deploy --yes --resources --architecture",
        &[
            "deploy",
            "--yes",
            "--resources",
            "cpu=500m,memory=1Gi",
            "--architecture",
            host,
        ],
    );
    ok(&o, "deploy --resources --architecture json");
    assert_eq!(
        agent_json(s, "json-agent").await["resources"],
        json!({"cpu": "500m", "memory": "1Gi"})
    );
    let o = cli.run_json(
        "agent start --api-key --force --data",
        &[
            "agent",
            "start",
            "json-agent",
            "--api-key",
            &s.pk,
            "--force",
            "--data",
            "{\"seconds\": 30}",
        ],
    );
    ok(&o, "agent start --data json");
    let sid = o.json()["sessionId"].as_str().unwrap().to_string();
    let o = cli.run_json(
        "agent stop --session-id --force",
        &[
            "agent",
            "stop",
            "json-agent",
            "--session-id",
            &sid,
            "--force",
        ],
    );
    ok(&o, "agent stop json");
    assert_eq!(s.session("json-agent", &sid).await["endReason"], "stopped");
    let o = cli.run_json("agent logs", &["agent", "logs", "json-agent", "-n", "3"]);
    ok(&o, "agent logs json");
    assert_eq!(o.json()["logs"].as_array().unwrap().len(), 3);
    let o = cli.run_json(
        "agent delete --force",
        &["agent", "delete", "json-agent", "--force"],
    );
    ok(&o, "agent delete json");
}

#[tokio::test(flavor = "multi_thread")]
async fn current_cli_status_of_a_crash_looping_agent() {
    let s = start_server(&[]).await;
    let cli = Cli::new(
        CUR,
        &s,
        Auth::Env(s.key("token", "default"), Some("default".into())),
    );
    s.deploy(
        "crasher",
        &["--exit-on-start", "3"],
        json!({"autoScaling": {"minAgents": 1, "maxAgents": 1}}),
    )
    .await;
    wait_for(Duration::from_secs(30), "crash loop", || async {
        (agent_json(&s, "crasher").await["healthState"] == "crash_loop").then_some(())
    })
    .await;
    let o = cli.run("agent status", &["agent", "status", "crasher"]);
    o.shows("agent status", &["Ready: False"]);
    assert!(
        o.stdout.contains("Error: PCC_UNKNOWN_ERROR"),
        "{}",
        o.text()
    );
    assert!(o.stdout.contains("exit code 3"), "{}", o.text());
    let o = cli.run_mode("agent status", "rich", &["agent", "status", "crasher"]);
    o.shows("agent status rich", &["CrashLoopBackOff"]);
    assert!(o.stdout.contains("exit code 3"), "{}", o.text());
    // The revision's phase says it failed, not that it is being created (issue 17).
    assert!(o.stdout.contains("Failed"), "{}", o.text());
    assert!(!o.stdout.contains("Creating"), "{}", o.text());
    let o = cli.run(
        "agent start --api-key --force",
        &["agent", "start", "crasher", "--api-key", &s.pk, "--force"],
    );
    assert_eq!(o.code, 1, "{}", o.text());
    assert!(o.text().contains("not in a healthy state"), "{}", o.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_pcc_full_flow() {
    let s = start_server(&[]).await;
    let token = s.key("token", "default");
    let cli = Cli::new(PCC, &s, Auth::ConfigFile);
    // `auth use-pat` validates the token with GET /v1/organizations and writes the config.
    let o = cli.run("auth use-pat", &["auth", "use-pat", &token]);
    ok(&o, "auth use-pat");
    let cfg = std::fs::read_to_string(cli.dir().join("creds.toml")).expect("config written");
    assert!(cfg.contains(&token) && cfg.contains("default"), "{cfg}");

    let o = cli.run("organizations list", &["organizations", "list"]);
    o.shows("organizations list", &["default"]);
    let o = cli.run(
        "organizations keys create --default",
        &[
            "organizations",
            "keys",
            "create",
            "--name",
            "pcc-key",
            "--default",
        ],
    );
    ok(&o, "keys create");
    let cfg = std::fs::read_to_string(cli.dir().join("creds.toml")).unwrap();
    assert!(cfg.contains("default_public_key = \"pk_"), "{cfg}");
    let o = cli.run(
        "organizations keys list",
        &["organizations", "keys", "list"],
    );
    o.shows("keys list", &["pcc-key"]);
    // The menu's first active key is the server's own `pk`.
    let o = cli.run_tty(
        "organizations keys revoke",
        &["\r"],
        &["organizations", "keys", "revoke"],
    );
    o.shows("keys revoke", &["revoked"]);
    let listed = s
        .req(
            "GET",
            "/v1/organizations/default/apiKeys",
            Some(&token),
            None,
        )
        .await
        .body;
    assert_eq!(listed["public"][0]["revoked"], true, "{listed}");
    assert_eq!(listed["public"][1]["revoked"], false, "{listed}");
    let o = cli.run(
        "organizations properties list",
        &["organizations", "properties", "list"],
    );
    o.shows("properties list", &["defaultRegion"]);
    let o = cli.run(
        "organizations properties set",
        &[
            "organizations",
            "properties",
            "set",
            "defaultRegion",
            "local",
        ],
    );
    ok(&o, "properties set");
    let o = cli.run("regions list", &["regions", "list"]);
    o.shows("regions list", &["local"]);

    let o = cli.run(
        "secrets set",
        &[
            "secrets",
            "set",
            "pcc-secrets",
            "MY_SECRET=legacy",
            "DROP=me",
            "--skip",
        ],
    );
    ok(&o, "secrets set");
    let o = cli.run("secrets list", &["secrets", "list"]);
    o.shows("secrets list", &["pcc-secrets"]);
    let o = cli.run("secrets list NAME", &["secrets", "list", "pcc-secrets"]);
    o.shows("secrets list NAME", &["MY_SECRET", "DROP"]);
    let o = cli.run(
        "secrets unset",
        &["secrets", "unset", "pcc-secrets", "DROP", "--skip"],
    );
    ok(&o, "secrets unset");
    let o = cli.run(
        "secrets image-pull-secret",
        &[
            "secrets",
            "image-pull-secret",
            "pcc-pull",
            "https://index.docker.io/v1/",
            "u:p",
            "--skip",
        ],
    );
    ok(&o, "image-pull-secret");

    pcc_deploy_and_sessions(&s, &cli).await;
}

/// Deploy with a pull secret, sessions, keys and logs through pcc.
async fn pcc_deploy_and_sessions(s: &Server, cli: &Cli) {
    // pcc's deploy checks the pull secret with GET .../secrets/pcc-pull, answered 400 "400".
    let bot = bot_dir(cli.dir());
    write_deploy_toml(
        cli.dir(),
        "pcc-agent",
        &bot,
        Some("pcc-secrets"),
        Some("pcc-pull"),
    );
    let o = cli.run("deploy --yes (create)", &["deploy", "--yes"]);
    o.shows("deploy create", &["is ready"]);
    let a = agent_json(s, "pcc-agent").await;
    assert_eq!(a["imagePullSecretSet"], "pcc-pull");
    let dep1 = a["desiredDeploymentId"].as_str().unwrap().to_string();
    let o = cli.run("deploy --yes (update)", &["deploy", "--yes"]);
    ok(&o, "deploy update");
    let o = cli.run("deploy --yes --force", &["deploy", "--yes", "--force"]);
    ok(&o, "deploy --force");
    assert_ne!(
        agent_json(s, "pcc-agent").await["desiredDeploymentId"],
        dep1.as_str()
    );

    let o = cli.run("agent list", &["agent", "list"]);
    o.shows("agent list", &["pcc-agent"]);
    let o = cli.run("agent status", &["agent", "status", "pcc-agent"]);
    o.shows("agent status", &["Ready"]);
    let o = cli.run("agent deployments", &["agent", "deployments", "pcc-agent"]);
    ok(&o, "agent deployments");

    // The default key from the config file, then an explicit one with data.
    let o = cli.run(
        "agent start --force (default key)",
        &["agent", "start", "pcc-agent", "--force"],
    );
    ok(&o, "agent start");
    let long = session_id_in(&o);
    // `s.pk` was revoked above; any other public key of the org will do.
    let pk = s.key("public", "default");
    let o = cli.run(
        "agent start --api-key --force --data",
        &[
            "agent",
            "start",
            "pcc-agent",
            "--api-key",
            &pk,
            "--force",
            "--data",
            "{\"seconds\": 1}",
        ],
    );
    ok(&o, "agent start --data");
    let short = session_id_in(&o);
    s.wait_ended("pcc-agent", &short, Duration::from_secs(30))
        .await;
    let o = cli.run("agent sessions", &["agent", "sessions", "pcc-agent"]);
    ok(&o, "agent sessions");
    let o = cli.run(
        "agent sessions --id",
        &["agent", "sessions", "pcc-agent", "--id", &long],
    );
    o.shows("agent sessions --id", &[&long]);
    wait_for(
        Duration::from_secs(20),
        "the secret in the logs",
        || async {
            let o = cli.run(
                "agent logs --session-id",
                &["agent", "logs", "pcc-agent", "--session-id", &long],
            );
            (o.code == 0 && o.stdout.contains("MY_SECRET=legacy")).then_some(())
        },
    )
    .await;
    let o = cli.run(
        "agent stop --session-id --force",
        &[
            "agent",
            "stop",
            "pcc-agent",
            "--session-id",
            &long,
            "--force",
        ],
    );
    ok(&o, "agent stop");
    assert_eq!(s.session("pcc-agent", &long).await["endReason"], "stopped");
    let o = cli.run(
        "agent delete --force",
        &["agent", "delete", "pcc-agent", "--force"],
    );
    ok(&o, "agent delete");
    let o = cli.run(
        "secrets delete",
        &["secrets", "delete", "pcc-secrets", "--skip"],
    );
    ok(&o, "secrets delete");
    let o = cli.run(
        "secrets delete",
        &["secrets", "delete", "pcc-pull", "--skip"],
    );
    ok(&o, "secrets delete pull");
}

const SDK_SCRIPT: &str = r#"
import asyncio, json, sys
from pipecatcloud.exception import AgentStartError
from pipecatcloud.session import Session, SessionParams

async def main():
    out = {}
    r = await Session(agent_name=sys.argv[1], api_key=sys.argv[2],
                      params=SessionParams(data={"seconds": 0}, use_daily=False)).start()
    out["ok"] = r
    for name, key in [("no-such-agent", sys.argv[2]), (sys.argv[1], "pk_not_a_key")]:
        try:
            await Session(agent_name=name, api_key=key).start()
            out[name + key] = "no error"
        except AgentStartError as e:
            out[name + key] = str(e)
    print(json.dumps(out))

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread")]
async fn sdk_session_start() {
    let s = start_server(&[]).await;
    let home = common::open_tempdir();
    let bot = bot_dir(home.path());
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(json!({"serviceName": "sdk-agent", "image": format!("local:{}", bot.display())})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    for (client, py) in [(SDK1, main_python()), (SDK0, pcc_python())] {
        assert!(COMMANDS.contains(&(client, "Session(...).start()", "python")));
        let mut c = Command::new(py);
        c.arg("-c")
            .arg(SDK_SCRIPT)
            .arg("sdk-agent")
            .arg(&s.pk)
            .env("HOME", home.path())
            .env("PIPECAT_API_HOST", &s.base);
        let o = run_with_timeout(c, client);
        ok(&o, client);
        let v: Value = serde_json::from_str(o.stdout.trim().lines().last().unwrap()).unwrap();
        let sid = v["ok"]["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        s.wait_ended("sdk-agent", &sid, Duration::from_secs(30))
            .await;
        assert!(
            v[format!("no-such-agent{}", s.pk)]
                .as_str()
                .unwrap()
                .starts_with("404"),
            "{v}"
        );
        assert!(
            v["sdk-agentpk_not_a_key"]
                .as_str()
                .unwrap()
                .starts_with("401"),
            "{v}"
        );
    }
    sdk_at_capacity_and_a_trailing_slash(&s, home.path()).await;
}

/// One SDK start (`Session(agent, key).start()`); prints the answer or the `AgentStartError`.
const SDK_ONE_START: &str = r#"
import asyncio, json, sys
from pipecatcloud.exception import AgentStartError
from pipecatcloud.session import Session

async def main():
    try:
        print(json.dumps({"ok": await Session(agent_name=sys.argv[1], api_key=sys.argv[2]).start()}))
    except AgentStartError as e:
        print(json.dumps({"error": str(e), "code": e.error_code}))

asyncio.run(main())
"#;

/// What a user's code gets from the current SDK at `maxAgents` (an `AgentStartError` with
/// code `429`), and with `PIPECAT_API_HOST` given with a trailing slash (a 404 that says so).
async fn sdk_at_capacity_and_a_trailing_slash(s: &Server, home: &Path) {
    let sdk = |host: String| {
        let mut c = Command::new(main_python());
        c.arg("-c")
            .arg(SDK_ONE_START)
            .arg("sdk-agent")
            .arg(&s.pk)
            .env("HOME", home)
            .env("PIPECAT_API_HOST", host);
        let o = run_with_timeout(c, SDK1);
        ok(&o, SDK1);
        serde_json::from_str::<Value>(o.stdout.trim().lines().last().unwrap()).unwrap()
    };
    let r = s
        .req(
            "POST",
            "/v1/agents/sdk-agent",
            Some(&s.sk),
            Some(json!({"autoScaling": {"minAgents": 0, "maxAgents": 1}})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let busy = s
        .start_session("sdk-agent", json!({"body": {"seconds": 120}}))
        .await;
    assert_eq!(busy.status, 200, "{:?}", busy.body);
    let v = sdk(s.base.clone());
    assert_eq!(v["code"], "429", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("429 - agent sdk-agent is at capacity"),
        "{v}"
    );
    let v = sdk(format!("{}/", s.base));
    assert_eq!(v["code"], "404", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("trailing slash"),
        "{v}"
    );
    let sid = busy.body["sessionId"].as_str().unwrap();
    assert_eq!(s.stop("sdk-agent", sid).await.status, 200);
}

/// The org-scoped services path of the default org.
const S: &str = "/v1/organizations/default/services";

/// Contract details the clients depend on, checked over plain HTTP.
#[tokio::test(flavor = "multi_thread")]
async fn org_surface_contract() {
    let s = Server::start(&[]).await;
    let token = s.key("token", "default");
    let other = s.key("token", "elsewhere");
    s.deploy("svc", &[], json!({})).await;

    let r = s.req("GET", &format!("{S}/svc"), Some(&token), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body["body"]["name"], "svc",
        "GET service is wrapped in body"
    );
    for k in [
        "ready",
        "available",
        "autoScaling",
        "deployment",
        "currentRevision",
        "errors",
        "conditions",
    ] {
        assert!(r.body["body"].get(k).is_some(), "{k} missing");
    }
    let list = s.req("GET", S, Some(&token), None).await;
    for k in [
        "name",
        "region",
        "id",
        "activeDeploymentId",
        "createdAt",
        "updatedAt",
    ] {
        assert!(
            list.body["services"][0].get(k).is_some(),
            "{k} missing in list"
        );
    }
    // The private key works on the org surface too; public keys and other orgs do not.
    assert_eq!(s.req("GET", S, Some(&s.sk), None).await.status, 200);
    assert_eq!(s.req("GET", S, Some(&s.pk), None).await.status, 401);
    let r = s.req("GET", S, Some(&other), None).await;
    assert_eq!(
        (r.status, r.body["code"].clone()),
        (404, json!("NOT_FOUND"))
    );
    assert_eq!(
        s.req("GET", &format!("{S}/svc"), Some(&other), None)
            .await
            .status,
        404
    );
    // Tokens cannot start sessions.
    assert_eq!(
        s.req(
            "POST",
            "/v1/public/svc/start",
            Some(&token),
            Some(json!({}))
        )
        .await
        .status,
        401
    );

    // Update is PUT on the collection with serviceName; without it, a 400.
    let r = s
        .req(
            "PUT",
            S,
            Some(&token),
            Some(json!({"serviceName": "svc", "autoScaling": {"minAgents": 0, "maxAgents": 7}})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["autoScaling"]["maxReplicas"], 7);
    let r = s
        .req("PUT", S, Some(&token), Some(json!({"image": "x:1"})))
        .await;
    assert_eq!(
        (r.status, r.body["code"].clone()),
        (400, json!("GENERIC_BAD_REQUEST"))
    );
    let r = s
        .req(
            "PUT",
            S,
            Some(&token),
            Some(json!({"serviceName": "nope", "image": "x:1"})),
        )
        .await;
    assert_eq!(r.status, 404);

    let r = s
        .req("GET", &format!("{S}/svc/deployments"), Some(&token), None)
        .await;
    assert_eq!(r.status, 200);
    let deps = r.body["deployments"].as_array().unwrap();
    assert_eq!(deps.len(), 1);
    assert!(deps[0]["manifest"]["spec"]["dailyNodeType"].is_string());
    assert_eq!(
        s.req("GET", &format!("{S}/nope/deployments"), Some(&token), None)
            .await
            .status,
        404
    );

    org_sessions(&s, &token).await;

    org_regions_properties_users_daily(&s, &token).await;

    org_api_keys(&s, &token).await;
}

/// Sessions through the org paths.
async fn org_sessions(s: &Server, token: &str) {
    // Sessions through the org paths.
    let sid = s.start_ok("svc").await;
    let r = s
        .req("GET", &format!("{S}/svc/sessions"), Some(token), None)
        .await;
    assert_eq!(r.body["sessions"][0]["sessionId"], sid.as_str());
    let r = s
        .req("GET", &format!("{S}/svc/sessions/{sid}"), Some(token), None)
        .await;
    assert_eq!(r.body["sessionId"], sid.as_str());
    let r = s
        .req(
            "DELETE",
            &format!("{S}/svc/sessions/{sid}"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(r.body, json!({"status": "terminated", "session_id": sid}));
}

/// Regions, properties, users, daily.
async fn org_regions_properties_users_daily(s: &Server, token: &str) {
    // Regions, properties, users, daily.
    let r = s
        .req(
            "GET",
            "/v1/organizations/default/regions",
            Some(token),
            None,
        )
        .await;
    assert_eq!(r.body["regions"][0]["code"], "local");
    assert!(r.body["regions"][0]["display_name"].is_string());
    assert_eq!(
        s.req("GET", "/v1/regions", Some(&s.sk), None).await.body,
        r.body
    );
    let r = s.req("GET", "/v1/properties", Some(&s.sk), None).await;
    assert_eq!(r.body, json!({"properties": {"defaultRegion": "local"}}));
    let r = s
        .req("GET", "/v1/properties/schema", Some(&s.sk), None)
        .await;
    for k in [
        "type",
        "description",
        "default",
        "currentValue",
        "readOnly",
        "availableValues",
    ] {
        assert!(
            r.body["properties"]["defaultRegion"].get(k).is_some(),
            "{k}"
        );
    }
    for bad in [
        json!({}),
        json!({"nope": 1}),
        json!({"defaultRegion": "mars"}),
        json!({"defaultRegion": 3}),
        json!([1]),
    ] {
        let r = s
            .req("PATCH", "/v1/properties", Some(&s.sk), Some(bad))
            .await;
        assert_eq!(
            (r.status, r.body["code"].clone()),
            (400, json!("GENERIC_BAD_REQUEST"))
        );
    }
    let r = s
        .req(
            "PATCH",
            "/v1/organizations/default/properties",
            Some(token),
            Some(json!({"defaultRegion": "local"})),
        )
        .await;
    assert_eq!(
        r.body["properties"]["defaultRegion"]["currentValue"],
        "local"
    );
    let r = s.req("GET", "/v1/users", Some(token), None).await;
    assert!(r.body["user"]["userId"].is_string());
    let r = s
        .req("GET", "/v1/organizations/default/daily", Some(token), None)
        .await;
    assert_eq!(r.status, 404);
}

/// apiKeys: create answers the key once; list shows public keys whole; revoke is soft.
async fn org_api_keys(s: &Server, token: &str) {
    // apiKeys: create answers the key once; list shows public keys whole; revoke is soft.
    let r = s
        .req(
            "POST",
            "/v1/organizations/default/apiKeys",
            Some(token),
            Some(json!({"name": "k", "type": "public"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let key = r.body["key"].as_str().unwrap().to_string();
    let id = r.body["id"].as_str().unwrap().to_string();
    for bad in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "x", "type": "root"}),
    ] {
        let r = s
            .req(
                "POST",
                "/v1/organizations/default/apiKeys",
                Some(token),
                Some(bad),
            )
            .await;
        assert_eq!(r.status, 400);
    }
    let r = s
        .req(
            "GET",
            "/v1/organizations/default/apiKeys",
            Some(token),
            None,
        )
        .await;
    assert!(r.body["public"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["key"] == key.as_str()));
    assert!(
        !r.body.to_string().contains(token),
        "tokens are never listed"
    );
    assert!(
        !r.body.to_string().contains(&s.sk),
        "private keys are never listed whole"
    );
    let r = s
        .req(
            "DELETE",
            &format!("/v1/organizations/default/apiKeys/{id}"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "OK");
    assert_eq!(
        s.req("POST", "/v1/public/svc/start", Some(&key), Some(json!({})))
            .await
            .status,
        401
    );
    assert_eq!(
        s.req(
            "DELETE",
            "/v1/organizations/default/apiKeys/not-a-uuid",
            Some(token),
            None
        )
        .await
        .status,
        400
    );
    assert_eq!(
        s.req(
            "DELETE",
            &format!("/v1/organizations/default/apiKeys/{}", uuid::Uuid::new_v4()),
            Some(token),
            None
        )
        .await
        .status,
        404
    );

    // Deletes answer non-empty JSON.
    let r = s
        .req("DELETE", &format!("{S}/svc"), Some(token), None)
        .await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"status": "OK"})));
    let r = s.req("GET", &format!("{S}/svc"), Some(token), None).await;
    assert_eq!(
        (r.status, r.body["code"].clone()),
        (404, json!("NOT_FOUND"))
    );
}

/// `docs/compatibility.md` lists exactly the commands in [`COMMANDS`], each as passing.
#[test]
fn compatibility_doc_matches_the_suite() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/compatibility.md"),
    )
    .expect("docs/compatibility.md");
    let mut rows = Vec::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | client | `command` | mode | status | test |
        if cells.len() >= 6 && cells[2].starts_with('`') {
            rows.push((
                cells[1].to_string(),
                cells[2].trim_matches('`').to_string(),
                cells[3].to_string(),
                cells[4].to_string(),
            ));
        }
    }
    for (client, cmd, mode) in COMMANDS {
        let row = rows
            .iter()
            .find(|r| r.0 == *client && r.1 == *cmd && r.2 == *mode)
            .unwrap_or_else(|| {
                panic!("docs/compatibility.md lacks | {client} | `{cmd}` | {mode} |")
            });
        assert_eq!(row.3, "pass", "{client} {cmd} {mode}");
    }
    for r in &rows {
        assert!(
            COMMANDS.contains(&(r.0.as_str(), r.1.as_str(), r.2.as_str())),
            "docs/compatibility.md lists {r:?}, which the suite does not run"
        );
    }
}

/// A stand-in for Daily's REST API on loopback: rooms, meeting tokens, room deletion, in
/// Daily's documented shapes; `bad_key` makes every call a 401 `authentication-error`.
pub(crate) struct DailyStandIn {
    pub(crate) url: String,
    pub(crate) seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String, Value)>>>,
    bad_key: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DailyStandIn {
    pub(crate) async fn start() -> DailyStandIn {
        use axum::extract::{Path as AxPath, State};
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{delete, post};
        use axum::Json;
        type St = (
            std::sync::Arc<std::sync::Mutex<Vec<(String, String, Value)>>>,
            std::sync::Arc<std::sync::atomic::AtomicBool>,
        );
        type Reply = (StatusCode, Json<Value>);
        fn check(st: &St, h: &HeaderMap, what: String, body: Value) -> Option<Reply> {
            let auth = h
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            st.0.lock().unwrap().push((what, auth.clone(), body));
            (st.1.load(std::sync::atomic::Ordering::SeqCst) || auth != "Bearer dk_e2e_key").then(
                || {
                    (
                        StatusCode::UNAUTHORIZED,
                        Json(json!({"error": "authentication-error", "info": "invalid API key"})),
                    )
                },
            )
        }
        async fn room(State(st): State<St>, h: HeaderMap, Json(b): Json<Value>) -> Reply {
            if let Some(e) = check(&st, &h, "POST /rooms".into(), b.clone()) {
                return e;
            }
            let name = format!("r{}", st.0.lock().unwrap().len());
            (
                StatusCode::OK,
                Json(json!({"id": "0b1d", "name": name, "api_created": true,
                    "privacy": b["privacy"], "url": format!("https://cattery.daily.co/{name}"),
                    "created_at": "2026-12-04T13:00:00.000Z", "config": b["properties"]})),
            )
        }
        async fn token(State(st): State<St>, h: HeaderMap, Json(b): Json<Value>) -> Reply {
            if let Some(e) = check(&st, &h, "POST /meeting-tokens".into(), b.clone()) {
                return e;
            }
            let p = &b["properties"];
            let who = if p["is_owner"] == true {
                "bot"
            } else {
                "client"
            };
            let room = p["room_name"].as_str().unwrap_or("");
            (
                StatusCode::OK,
                Json(json!({"token": format!("tok-{who}-{room}")})),
            )
        }
        async fn del(State(st): State<St>, h: HeaderMap, AxPath(n): AxPath<String>) -> Reply {
            if let Some(e) = check(&st, &h, format!("DELETE /rooms/{n}"), Value::Null) {
                return e;
            }
            (StatusCode::OK, Json(json!({"deleted": true, "name": n})))
        }
        let st: St = Default::default();
        let app = axum::Router::new()
            .route("/v1/rooms", post(room))
            .route("/v1/rooms/{name}", delete(del))
            .route("/v1/meeting-tokens", post(token))
            .with_state(st.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        DailyStandIn {
            url,
            seen: st.0,
            bad_key: st.1,
        }
    }

    pub(crate) fn deleted(&self, room: &str) -> bool {
        let want = format!("DELETE /rooms/{room}");
        self.seen.lock().unwrap().iter().any(|(w, _, _)| *w == want)
    }
}

/// A real Pipecat bot that reports the session arguments it was given through its own
/// `/args` route (the Session API), then runs until stopped.
fn daily_bot_dir(root: &Path) -> PathBuf {
    let d = root.join("daily-bot");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("bot.py"),
        r#"import asyncio

from pipecat.runner.types import DailyRunnerArguments
from pipecatcloud_system import app

SEEN = {}


@app.get("/args")
async def args_route():
    return SEEN


async def bot(args):
    SEEN.clear()
    SEEN.update(
        kind=type(args).__name__,
        daily=isinstance(args, DailyRunnerArguments),
        room_url=getattr(args, "room_url", None),
        token=getattr(args, "token", None),
        body=getattr(args, "body", None),
        flow_config=getattr(args, "flow_config", None),
    )
    await asyncio.sleep(600)
"#,
    )
    .unwrap();
    d
}

const SDK_DAILY_SCRIPT: &str = r#"
import asyncio, json, sys
from pipecatcloud.exception import AgentStartError
from pipecatcloud.session import Session, SessionParams

async def main():
    try:
        r = await Session(agent_name=sys.argv[1], api_key=sys.argv[2],
                          params=SessionParams(data={"caller": "sdk"}, use_daily=True)).start()
        print(json.dumps({"ok": r}))
    except AgentStartError as e:
        print(json.dumps({"error": str(e)}))

asyncio.run(main())
"#;

/// What the bot of session `sid` reports through its `/args` route.
async fn bot_args(s: &Server, agent: &str, sid: &str) -> Value {
    wait_for(Duration::from_secs(60), "the bot's /args", || async {
        let r = s
            .req(
                "GET",
                &format!("/v1/public/{agent}/sessions/{sid}/args"),
                Some(&s.pk),
                None,
            )
            .await;
        (r.status == 200 && r.body["kind"].is_string()).then_some(r.body)
    })
    .await
}

/// A `createDailyRoom` start (the SDK's `use_daily=True`) at `maxAgents` is answered 429
/// before Daily is asked for anything: no room, no tokens, no deletion for a refused start.
#[tokio::test(flavor = "multi_thread")]
async fn a_daily_start_at_max_agents_asks_nothing_of_daily() {
    let daily = DailyStandIn::start().await;
    let s = Server::start(&[
        "--daily-api-key",
        "dk_e2e_key",
        "--daily-api-url",
        &daily.url,
    ])
    .await;
    s.deploy(
        "dcap",
        &[],
        json!({"autoScaling": {"minAgents": 0, "maxAgents": 1}}),
    )
    .await;
    let start = json!({"createDailyRoom": true, "body": {}});
    let first = s.start_session("dcap", start.clone()).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let calls = || daily.seen.lock().unwrap().len();
    let before = calls();
    assert_eq!(before, 3, "a room and its two tokens");
    let r = s.start_session("dcap", start).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.body["code"], "429");
    assert_eq!(r.body["status"], 429);
    assert_eq!(calls(), before, "{:?}", daily.seen.lock().unwrap());
    let sid = first.body["sessionId"].as_str().unwrap();
    assert_eq!(s.stop("dcap", sid).await.status, 200);
}

pub(crate) async fn wait_room_deleted(d: &DailyStandIn, room: &str) {
    wait_for(Duration::from_secs(20), "the room's deletion", || async {
        d.deleted(room).then_some(())
    })
    .await
}

/// The rooms Cattery made are deleted even when their sessions outlive the server that made
/// them: with two `createDailyRoom` sessions running, the server is SIGKILLed and one agent
/// dies while no server runs. The next server records that session `lost` and deletes its
/// room at once; it re-adopts the other, whose room goes when it is stopped. A room the
/// caller made (`createDailyRoom: false`, the room in `body`) is never deleted.
#[tokio::test(flavor = "multi_thread")]
async fn daily_rooms_of_sessions_that_outlive_their_server_are_deleted() {
    let daily = DailyStandIn::start().await;
    let mut s = Server::start(&[
        "--daily-api-key",
        "dk_e2e_key",
        "--daily-api-url",
        &daily.url,
    ])
    .await;
    s.deploy(
        "droom",
        &["--ignore-transport-close"],
        json!({"autoScaling": {"maxAgents": 4}}),
    )
    .await;
    let mut started = Vec::new();
    for _ in 0..2 {
        let r = s
            .start_session("droom", json!({"createDailyRoom": true, "body": {}}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let sid = r.body["sessionId"].as_str().unwrap().to_string();
        let room = r.body["dailyRoom"].as_str().unwrap();
        let room = room.rsplit('/').next().unwrap().to_string();
        let info = s
            .req(
                "GET",
                &format!("/v1/public/droom/sessions/{sid}/info"),
                Some(&s.pk),
                None,
            )
            .await;
        assert_eq!(info.status, 200, "{:?}", info.body);
        let pid = info.body["pid"].as_i64().expect("pid") as i32;
        started.push((sid, room, pid));
    }
    let own = s
        .start_session(
            "droom",
            json!({"createDailyRoom": false,
                   "body": {"room_url": "https://cattery.daily.co/callers-own"}}),
        )
        .await;
    assert_eq!(own.status, 200, "{:?}", own.body);
    let own_sid = own.body["sessionId"].as_str().unwrap().to_string();
    let [(kept_sid, kept_room, _), (lost_sid, lost_room, lost_pid)] = &started[..] else {
        unreachable!()
    };

    s.kill9();
    common::unsafe_kill(*lost_pid, 9);
    wait_for(Duration::from_secs(10), "the agent's exit", || async {
        (!common::pid_alive(*lost_pid)).then_some(())
    })
    .await;
    s.spawn().await;

    let g = s.session("droom", lost_sid).await;
    assert_eq!(g["endReason"], "lost", "{g}");
    wait_room_deleted(&daily, lost_room).await;
    assert_eq!(s.session("droom", kept_sid).await["status"], "active");
    assert!(
        !daily.deleted(kept_room),
        "{:?}",
        daily.seen.lock().unwrap()
    );
    assert_eq!(s.stop("droom", kept_sid).await.status, 200);
    wait_room_deleted(&daily, kept_room).await;
    assert_eq!(s.stop("droom", &own_sid).await.status, 200);
    let calls: Vec<String> = daily
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.0.clone())
        .collect();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("DELETE")).count(),
        2,
        "only the rooms Cattery made, each once: {calls:?}"
    );
}

/// `createDailyRoom` with the official clients: the SDK's `use_daily=True` and
/// `pipecat cloud agent start --use-daily` get `dailyRoom` and `dailyToken`, a real Pipecat bot
/// gets `DailySessionArguments` with that room and the bot's token, the room is deleted at
/// the end, and Daily's 401 is a clear error with no session. Also `flow_config` reaching the
/// bot, `agent sessions --end-state terminated` and `organizations default-region`.
#[tokio::test(flavor = "multi_thread")]
async fn daily_rooms_with_the_official_clients() {
    let daily = DailyStandIn::start().await;
    let s = start_server(&[
        "--daily-api-key",
        "dk_e2e_key",
        "--daily-api-url",
        &daily.url,
    ])
    .await;
    let home = common::open_tempdir();
    let bot = daily_bot_dir(home.path());
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(
                json!({"serviceName": "dbot", "image": format!("local:{}", bot.display()),
                        "autoScaling": {"maxAgents": 4}}),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // The SDK.
    assert!(COMMANDS.contains(&(SDK1, "Session(use_daily=True).start()", "python")));
    let v = sdk_daily_start(&s, home.path());
    let room_url = v["ok"]["dailyRoom"]
        .as_str()
        .expect("dailyRoom")
        .to_string();
    let room = room_url.rsplit('/').next().unwrap().to_string();
    assert_eq!(v["ok"]["dailyToken"], format!("tok-client-{room}"), "{v}");
    let sid = v["ok"]["sessionId"].as_str().unwrap().to_string();
    let args = bot_args(&s, "dbot", &sid).await;
    assert_eq!(args["kind"], "DailySessionArguments", "{args}");
    assert_eq!(args["daily"], true, "{args}");
    assert_eq!(args["room_url"], room_url.as_str());
    assert_eq!(args["token"], format!("tok-bot-{room}"));
    assert_eq!(args["body"], json!({"caller": "sdk"}));
    assert!(!daily.deleted(&room));
    assert_eq!(s.stop("dbot", &sid).await.status, 200);
    wait_room_deleted(&daily, &room).await;

    // The CLI.
    let cli = Cli::new(CUR, &s, Auth::Env(s.key("token", "default"), None));
    let o = cli.run(
        "agent start --api-key --force --use-daily",
        &[
            "agent",
            "start",
            "dbot",
            "--api-key",
            &s.pk,
            "--force",
            "--use-daily",
        ],
    );
    ok(&o, "agent start --use-daily");
    let text = o.text();
    let at = text
        .find("https://cattery.daily.co/")
        .expect("the room link");
    let link: String = text[at..].split_whitespace().next().unwrap().to_string();
    let (cli_room_url, cli_token) = link.split_once("?t=").expect("room?t=token");
    let cli_room = cli_room_url.rsplit('/').next().unwrap().to_string();
    assert_eq!(cli_token, format!("tok-client-{cli_room}"), "{text}");
    let cli_sid = session_id_in(&o);
    let args = bot_args(&s, "dbot", &cli_sid).await;
    assert_eq!(
        (args["room_url"].as_str(), args["daily"].as_bool()),
        (Some(cli_room_url), Some(true))
    );

    let flow_sid = flow_config_reaches_the_bot(&s).await;

    // `agent sessions --end-state terminated`: the stopped ones, not the running one.
    let o = cli.run(
        "agent sessions --end-state",
        &["agent", "sessions", "dbot", "--end-state", "terminated"],
    );
    ok(&o, "agent sessions --end-state");
    let text = o.text();
    assert!(text.contains(&sid) && text.contains(&flow_sid), "{text}");
    assert!(
        !text.contains(&cli_sid),
        "the running session is not terminated:\n{text}"
    );
    assert_eq!(s.stop("dbot", &cli_sid).await.status, 200);
    wait_room_deleted(&daily, &cli_room).await;

    daily_refusal_and_default_region(&s, &daily, home.path(), &cli).await;
}

/// The SDK's `Session(..., use_daily=True).start()` on agent `dbot`: `{"ok": answer}` or
/// `{"error": str(AgentStartError)}`.
fn sdk_daily_start(s: &Server, home: &Path) -> Value {
    let mut c = Command::new(main_python());
    c.arg("-c")
        .arg(SDK_DAILY_SCRIPT)
        .arg("dbot")
        .arg(&s.pk)
        .env("HOME", home)
        .env("PIPECAT_API_HOST", &s.base);
    let o = run_with_timeout(c, SDK1);
    ok(&o, SDK1);
    serde_json::from_str::<Value>(o.stdout.trim().lines().last().unwrap()).unwrap()
}

/// `flow_config` of a start reaches the bot as `args.flow_config`, its body as `args.body`;
/// returns the (stopped) session.
async fn flow_config_reaches_the_bot(s: &Server) -> String {
    // flow_config reaches the bot as args.flow_config, its body as args.body.
    let r = s
        .req(
            "POST",
            "/v1/public/dbot/start",
            Some(&s.pk),
            Some(json!({"body": {"n": 1}, "flow_config": "initial_node: greet\n"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let flow_sid = r.body["sessionId"].as_str().unwrap().to_string();
    let args = bot_args(s, "dbot", &flow_sid).await;
    assert_eq!(args["kind"], "PipecatSessionArguments", "{args}");
    assert_eq!(args["flow_config"], "initial_node: greet\n");
    assert_eq!(args["body"], json!({"n": 1}));
    assert_eq!(s.stop("dbot", &flow_sid).await.status, 200);

    flow_sid
}

/// Daily refusing the key is a clear error with no session, from the SDK and the CLI; then
/// `organizations default-region` shows and sets the region.
async fn daily_refusal_and_default_region(
    s: &Server,
    daily: &DailyStandIn,
    home: &Path,
    cli: &Cli,
) {
    // Daily refuses the key: a clear error, no session, no instance.
    daily
        .bad_key
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let before = s
        .req("GET", "/v1/agents/dbot/sessions", Some(&s.sk), None)
        .await
        .body["total_count"]
        .clone();
    let v = sdk_daily_start(s, home);
    let e = v["error"].as_str().expect("an AgentStartError");
    assert!(
        e.starts_with("DAILY_UNAUTHORIZED - Daily API error 401"),
        "{e}"
    );
    assert!(
        e.contains("invalid API key") && !e.contains("dk_e2e_key"),
        "{e}"
    );
    let after = s
        .req("GET", "/v1/agents/dbot/sessions", Some(&s.sk), None)
        .await
        .body["total_count"]
        .clone();
    assert_eq!(before, after, "no session for a refused room");
    let o = cli.run(
        "agent start --api-key --force --use-daily",
        &[
            "agent",
            "start",
            "dbot",
            "--api-key",
            &s.pk,
            "--force",
            "--use-daily",
        ],
    );
    assert_ne!(o.code, 0, "{}", o.text());
    assert!(!o.text().contains("dk_e2e_key"));

    // `organizations default-region`: shows, then sets.
    let o = cli.run(
        "organizations default-region",
        &["organizations", "default-region"],
    );
    ok(&o, "organizations default-region");
    assert!(o.text().contains("Default region: local"), "{}", o.text());
    let o = cli.run(
        "organizations default-region",
        &["organizations", "default-region", "local"],
    );
    ok(&o, "organizations default-region local");
    assert!(o.text().contains("local"), "{}", o.text());

    // `agent profiles list`: the fixed catalog with its limits.
    let o = cli.run("agent profiles list", &["agent", "profiles", "list"]);
    ok(&o, "agent profiles list");
    for want in [
        "agent-1x", "agent-2x", "agent-3x", "1000m", "2Gi", "platform",
    ] {
        assert!(o.text().contains(want), "{want}: {}", o.text());
    }
    assert!(
        !s.log().contains("dk_e2e_key"),
        "the Daily key is never logged"
    );
}

/// A websocket session recorded at `/start` (issue 17) as the official CLI sees it: listed by
/// `agent sessions` while it waits for its client, and found by `agent sessions --end-state
/// ended_before_agent_start` once its token expired (`endReason: client_never_connected`).
#[tokio::test(flavor = "multi_thread")]
async fn websocket_session_waiting_then_never_connected_in_the_official_cli() {
    let s = start_server(&["--ws-token-ttl-seconds", "2"]).await;
    s.deploy("wscli", &[], json!({})).await;
    let r = s
        .start_session("wscli", json!({"transport": "websocket"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let cli = Cli::new(CUR, &s, Auth::Env(s.key("token", "default"), None));
    let o = cli.run("agent sessions", &["agent", "sessions", "wscli"]);
    ok(&o, "agent sessions");
    assert!(
        o.text().contains(&sid),
        "listed while waiting:\n{}",
        o.text()
    );

    let g = s.wait_ended("wscli", &sid, Duration::from_secs(15)).await;
    assert_eq!(g["endReason"], "client_never_connected", "{g:?}");
    let o = cli.run(
        "agent sessions --end-state",
        &[
            "agent",
            "sessions",
            "wscli",
            "--end-state",
            "ended_before_agent_start",
        ],
    );
    ok(&o, "agent sessions --end-state ended_before_agent_start");
    assert!(o.text().contains(&sid), "{}", o.text());
    let o = cli.run(
        "agent sessions --end-state",
        &["agent", "sessions", "wscli", "--end-state", "completed"],
    );
    ok(&o, "agent sessions --end-state completed");
    assert!(!o.text().contains(&sid), "{}", o.text());
}
