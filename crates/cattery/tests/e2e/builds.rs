//! Builds (docs/builds.md): the official CLI, `pipecat cloud deploy` with no image, run from
//! a project directory the server knows nothing of. The CLI packs the directory, finds no
//! cached build, uploads to the server's own upload URL, starts a build and polls it; the
//! server builds a virtualenv from `requirements.txt` (here a wheel shipped in the context,
//! so pip needs no network) layered on the test Python; the agent runs the uploaded `bot.py`
//! with it. A second deploy of the same context reuses the build; a broken `requirements.txt`
//! fails the deploy with the build's message. With Docker there, the same deploy with the
//! default `--builder auto` builds the Dockerfile into an image on the local base image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{self, Server};

fn main_python() -> PathBuf {
    let p = std::env::var_os("CATTERY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::py_env_dir().join("main/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-python.sh first",
        p.display()
    );
    p
}

const BOT_PY: &str = r#"from loguru import logger

import cattery_marker


async def bot(args):
    logger.info(f"uploaded bot ran with marker {cattery_marker.MARKER}")
"#;

const DOCKERFILE: &str =
    "FROM dailyco/pipecat-base:latest\n\nCOPY . .\nRUN pip install --no-cache-dir -r requirements.txt\n";

/// A minimal wheel of package `cattery_marker` whose `MARKER` is `marker`, made with the
/// test Python's zipfile (a wheel is a zip with metadata).
fn write_wheel(dir: &Path, marker: &str) -> String {
    marker_wheel(dir, "0.1.0", "MARKER", marker)
}

/// A wheel of package `cattery_marker` at `version` whose module sets `var` to `value`, in
/// `dir`; returns its file name.
fn marker_wheel(dir: &Path, version: &str, var: &str, value: &str) -> String {
    let name = format!("cattery_marker-{version}-py3-none-any.whl");
    let script = r#"
import sys, zipfile
path, v, var, value = sys.argv[1:5]
with zipfile.ZipFile(path, "w") as z:
    z.writestr("cattery_marker/__init__.py", f"{var} = {value!r}\n")
    di = f"cattery_marker-{v}.dist-info"
    z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: cattery-marker\nVersion: {v}\n")
    z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: cattery-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{di}/RECORD", "")
"#;
    let out = Command::new(main_python())
        .arg("-c")
        .arg(script)
        .arg(dir.join(&name))
        .args([version, var, value])
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", out);
    name
}

/// A project directory: `bot.py`, `Dockerfile`, `requirements.txt` (the given text, or the
/// marker wheel), `pcc-deploy.toml` with no image.
fn project(agent: &str, requirements: Option<&str>, marker: &str) -> tempfile::TempDir {
    let d = common::open_tempdir();
    let p = d.path();
    std::fs::write(p.join("bot.py"), BOT_PY).unwrap();
    std::fs::write(p.join("Dockerfile"), DOCKERFILE).unwrap();
    let req = match requirements {
        Some(r) => r.to_string(),
        None => {
            std::fs::create_dir(p.join("wheels")).unwrap();
            let w = write_wheel(&p.join("wheels"), marker);
            format!("loguru\n./wheels/{w}\n")
        }
    };
    std::fs::write(p.join("requirements.txt"), req).unwrap();
    std::fs::write(
        p.join("pcc-deploy.toml"),
        format!("agent_name = \"{agent}\"\n\n[scaling]\nmin_agents = 0\nmax_agents = 2\n"),
    )
    .unwrap();
    d
}

/// Runs `pipecat cloud ARGS` in `cwd` against `s` with a CLI token of the default org; returns
/// whether it succeeded and its output.
async fn pipecat(s: &Server, cwd: &Path, args: &[&str]) -> (bool, String) {
    let program = main_python().with_file_name("pipecat");
    let home = common::open_tempdir();
    let token = s.key("token", "default");
    let base = s.base.clone();
    let cwd = cwd.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(program);
        for (k, _) in std::env::vars() {
            if k.starts_with("PIPECAT_") || k.starts_with("PCC_") {
                c.env_remove(k);
            }
        }
        let out = c
            .arg("cloud")
            .arg("--output")
            .arg("plain")
            .args(&args)
            .current_dir(&cwd)
            .env("HOME", home.path())
            .env("PIPECAT_API_HOST", &base)
            .env("PIPECAT_TOKEN", token)
            .env("PIPECAT_ORG", "default")
            .env("PIPECAT_CONFIG_PATH", home.path().join("creds.toml"))
            .env("NO_COLOR", "1")
            .env("COLUMNS", "250")
            .output()
            .unwrap();
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

async fn builds(s: &Server) -> Vec<serde_json::Value> {
    let r = s
        .req("GET", "/v1/builds?limit=100", Some(&s.sk), None)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["builds"].as_array().unwrap().clone()
}

/// Waits (at most 60 s) until agent `agent`'s log has a line containing `want`; returns the
/// whole log, one text.
async fn wait_for_agent_log(s: &Server, agent: &str, want: &str) -> String {
    common::wait_for(
        Duration::from_secs(60),
        &format!("{want:?} in {agent}'s log"),
        || async move {
            let log = crate::python_bots::agent_logs(s, agent).await.join("\n");
            log.contains(want).then_some(log)
        },
    )
    .await
}

/// The local stand-in for Pipecat Cloud's base image (scripts/docker-images.sh), or `None`
/// (the test is skipped) when it or a Docker engine is missing; with `CATTERY_REQUIRE_DOCKER`
/// set, a missing one fails the test instead.
fn docker_base() -> Option<&'static str> {
    const BASE: &str = "cattery-test/pipecat-base:latest";
    if docker(&["image", "inspect", "--format", "{{.Id}}", BASE]).is_some() {
        return Some(BASE);
    }
    assert!(
        std::env::var_os("CATTERY_REQUIRE_DOCKER").is_none(),
        "CATTERY_REQUIRE_DOCKER is set, but {BASE} is missing"
    );
    eprintln!("SKIPPED: no Docker engine or no {BASE} (scripts/docker-images.sh)");
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn official_cli_deploys_without_an_image() {
    let py = main_python();
    // The local builder, also where Docker is there (the Docker builder has its own test).
    let s = Server::start(&["--python", py.to_str().unwrap(), "--builder", "venv"]).await;
    let proj = project("built-bot", None, "m-41d7");

    // First deploy: no cached build, upload, build, deploy.
    let (ok, out) = pipecat(&s, proj.path(), &["deploy", "--yes"]).await;
    assert!(ok, "deploy failed:\n{out}\n{}", s.log());
    assert!(out.contains("No cached build found"), "{out}");
    assert!(out.contains("Build Complete"), "{out}");
    let list = builds(&s).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let b = &list[0];
    assert_eq!(b["status"], "success", "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let hash = b["contextHash"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 16, "{b}");

    // `build logs` shows the build; `build status` its state and hash.
    let (ok, logs) = pipecat(&s, proj.path(), &["build", "logs", &id]).await;
    assert!(ok, "{logs}");
    assert!(logs.contains("pip install -r requirements.txt"), "{logs}");
    assert!(
        logs.contains("cattery_marker") || logs.contains("cattery-marker"),
        "{logs}"
    );
    assert!(logs.contains("Build complete"), "{logs}");
    let (ok, st) = pipecat(&s, proj.path(), &["build", "status", &id]).await;
    assert!(ok && st.contains("success") && st.contains(&hash), "{st}");
    let (ok, ls) = pipecat(&s, proj.path(), &["build", "list"]).await;
    assert!(ok && ls.contains(&id), "{ls}");

    // The agent is ready and a session runs the uploaded bot.py in the built environment.
    let a = s.wait_ready("built-bot", Duration::from_secs(60)).await;
    assert_eq!(a["deployment"]["buildId"], id.as_str(), "{a}");
    let sid = s.start_ok("built-bot").await;
    wait_for_agent_log(&s, "built-bot", "uploaded bot ran with marker m-41d7").await;
    let _ = s.stop("built-bot", &sid).await;

    // Second deploy of the same context: the cached build, nothing uploaded or built.
    let (ok, out) = pipecat(&s, proj.path(), &["deploy", "--yes", "--force"]).await;
    assert!(ok, "second deploy failed:\n{out}");
    assert!(out.contains("Cached Build Found"), "{out}");
    assert!(out.contains(&id), "{out}");
    let list = builds(&s).await;
    assert_eq!(list.len(), 1, "no second build: {list:?}");
    assert_eq!(list[0]["contextHash"], hash.as_str());

    // A broken requirements.txt fails the deploy with pip's reason; the agent is unchanged.
    let bad = project("broken-bot", Some("this is not a requirement !!!\n"), "x");
    let (ok, out) = pipecat(&s, bad.path(), &["deploy", "--yes"]).await;
    assert!(
        !ok,
        "a broken requirements.txt must fail the deploy:\n{out}"
    );
    assert!(out.contains("Build failed"), "{out}");
    assert!(
        out.contains("pip install -r requirements.txt failed"),
        "{out}"
    );
    assert!(out.contains("Invalid requirement"), "{out}");
    let r = s
        .req("GET", "/v1/agents/broken-bot", Some(&s.sk), None)
        .await;
    assert_eq!(r.status, 404, "no agent for a failed build: {:?}", r.body);
    let failed: Vec<_> = builds(&s)
        .await
        .into_iter()
        .filter(|b| b["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    // Deploying the failed build by id answers Pipecat Cloud's 400.
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(serde_json::json!({"serviceName": "by-id", "buildId": failed[0]["id"]})),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["code"], "GENERIC_BAD_REQUEST");
    assert!(
        r.body["error"].as_str().unwrap().contains("not ready"),
        "{:?}",
        r.body
    );
}

/// The texts the official CLI prints through rich's markup print whole: a failed build's
/// `errorMessage` (in `deploy`'s `Build failed: ...` and in `build status`) and a line of
/// `build logs`, each holding `[runner]` (which rich would read as a tag and drop) and `[/x]`
/// (a closing tag that matches none, which stops the CLI with a `MarkupError`). The API
/// gives other clients the texts unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn the_official_cli_prints_bracketed_texts_whole() {
    let py = main_python();
    let s = Server::start(&["--python", py.to_str().unwrap(), "--builder", "venv"]).await;
    // pip refuses the requirement (a path that does not exist), quoting it in the build's
    // errorMessage.
    let text = "./pipecat-ai[runner]/b[/x]/c";
    let proj = project("bracketed", Some(&format!("{text}\n")), "x");
    let (ok, out) = pipecat(&s, proj.path(), &["deploy", "--yes"]).await;
    assert!(!ok, "the build must fail:\n{out}");
    assert!(!out.contains("MarkupError"), "{out}");
    assert!(out.contains("Build failed"), "{out}");
    assert!(out.contains(text), "the errorMessage printed cut:\n{out}");
    let list = builds(&s).await;
    let msg = list[0]["errorMessage"].as_str().unwrap_or_default();
    assert!(msg.contains(text) && !msg.contains('\\'), "{msg}");

    // A step (the context's own `venv` module, found first by `python -m venv`) prints a
    // line the CLI's `build logs` prints as markup, and fails saying it again. (Built through
    // the API: the CLI leaves a `venv` directory out of what it uploads.)
    let step = "print('STEP says pipecat-ai[runner] and [/x]', flush=True)\n\
                print('add pipecat-ai[runner] [/x]', flush=True)\nraise SystemExit(3)\n";
    let context = tar_gz(&[
        ("bot.py", "async def bot(args):\n    pass\n"),
        ("venv/__init__.py", ""),
        ("venv/__main__.py", step),
    ]);
    let (build, log) = build_through_the_api(&s, context).await;
    assert_eq!(build["status"], "failed", "{build}\n{log}");
    let id = build["id"].as_str().unwrap();
    let (ok, st) = pipecat(&s, proj.path(), &["build", "status", id]).await;
    assert!(ok && st.contains("add pipecat-ai[runner] [/x]"), "{st}");
    let (ok, logs) = pipecat(&s, proj.path(), &["build", "logs", id]).await;
    assert!(
        ok && logs.contains("STEP says pipecat-ai[runner] and [/x]"),
        "{logs}"
    );
}

fn docker(args: &[&str]) -> Option<String> {
    let out = Command::new("docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// With Docker there (and the local base image, scripts/docker-images.sh), the same deploy
/// builds the Dockerfile into an image, `FROM dailyco/pipecat-base` mapped to
/// `cattery-test/pipecat-base`, and the agent runs it in a container.
#[tokio::test(flavor = "multi_thread")]
async fn official_cli_deploys_a_dockerfile_with_the_docker_builder() {
    let Some(base) = docker_base() else {
        return;
    };
    let s = Server::start(&["--build-base-image", base]).await;
    let proj = project("docker-built", None, "d-9c2e");
    let (ok, out) = pipecat(&s, proj.path(), &["deploy", "--yes"]).await;
    let list = builds(&s).await;
    let tag = list
        .first()
        .and_then(|b| b["imageUri"].as_str())
        .map(str::to_string);
    let cleanup = |tag: &Option<String>| {
        if let Some(t) = tag {
            let _ = docker(&["rmi", "-f", t]);
        }
    };
    if !ok {
        cleanup(&tag);
        panic!("deploy failed:\n{out}\n{}", s.log());
    }
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["builder"], "docker", "{list:?}");
    assert!(
        tag.as_deref().unwrap_or("").starts_with("cattery-build:"),
        "{list:?}"
    );
    let (ok, logs) = pipecat(
        &s,
        proj.path(),
        &["build", "logs", list[0]["id"].as_str().unwrap()],
    )
    .await;
    assert!(
        ok && logs.contains("dailyco/pipecat-base is built as"),
        "{logs}"
    );
    s.wait_ready("docker-built", Duration::from_secs(90)).await;
    let sid = s.start_ok("docker-built").await;
    wait_for_agent_log(&s, "docker-built", "uploaded bot ran with marker d-9c2e").await;
    let _ = s.stop("docker-built", &sid).await;
    let _ = s
        .req("DELETE", "/v1/agents/docker-built", Some(&s.sk), None)
        .await;
    drop(s);
    cleanup(&tag);
}

/// The build retention (`--build-retention-hours`, counted from the build's last use): a
/// build the agent's current deployment runs is kept past the retention; once the agent is
/// deleted, the build's record and directory go.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_no_deployment_runs_is_deleted_after_its_retention() {
    let py = main_python();
    // 0.003 h = 10.8 s, looked at every 1.08 s: longer than the CLI takes between the end of
    // the build (it polls every 5 s) and its deploy, which uses the build.
    let s = Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--builder",
        "venv",
        "--build-retention-hours",
        "0.003",
    ])
    .await;
    let proj = project("kept-bot", None, "m-ret");
    let (ok, out) = pipecat(&s, proj.path(), &["deploy", "--yes"]).await;
    assert!(ok, "deploy failed:\n{out}\n{}", s.log());
    let list = builds(&s).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["id"].as_str().unwrap().to_string();
    let dir = s.data_dir().join("builds").join(&id);
    assert!(dir.join("venv").is_dir());
    s.wait_ready("kept-bot", Duration::from_secs(60)).await;
    // Past the retention (and a few looks), kept: the agent runs it.
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert_eq!(builds(&s).await.len(), 1, "a build in use is kept");
    assert!(dir.join("venv").is_dir());
    let r = s
        .req("DELETE", "/v1/agents/kept-bot", Some(&s.sk), None)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    common::wait_for(Duration::from_secs(30), "the build deleted", || {
        let (s, dir) = (&s, &dir);
        // The log line comes after the directory is removed.
        async move {
            (builds(s).await.is_empty()
                && !dir.exists()
                && s.log().contains("deleted a build past its retention"))
            .then_some(())
        }
    })
    .await;
    let r = s
        .req("GET", &format!("/v1/builds/{id}"), Some(&s.sk), None)
        .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(s.log().contains("deleted a build past its retention"));
}

/// A step that takes more memory than `--build-memory-mb` (here the context's own `venv`
/// module, run by `python -m venv`; a package's setup code could do the same) is killed in
/// its cgroup: the build fails, its `errorMessage` and its log name the limit, and the server
/// goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_step_past_the_memory_limit_fails_the_build_naming_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (build steps get cgroups only from a root server)");
        return;
    }
    let py = main_python();
    let s = Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--builder",
        "venv",
        "--build-memory-mb",
        "64",
    ])
    .await;
    let context = tar_gz(&[
        ("bot.py", "async def bot(args):\n    pass\n"),
        ("venv/__init__.py", ""),
        (
            "venv/__main__.py",
            &step_running("b = b'x' * (512 << 20)\nprint('STEP survived', flush=True)"),
        ),
    ]);
    let (build, log) = build_through_the_api(&s, context).await;
    if log.contains("the server cannot make cgroups here") || log.contains("memory limit is not") {
        eprintln!("skipped: no memory cgroup for build steps here\n{log}");
        return;
    }
    assert_eq!(build["status"], "failed", "{build}\n{log}");
    let msg = build["errorMessage"].as_str().unwrap_or_default();
    assert!(
        msg.contains("the step passed the build memory limit of 64 MiB (--build-memory-mb)"),
        "{msg}"
    );
    assert!(!log.contains("STEP survived"), "{log}");
    assert!(
        log.contains("[cattery] the step passed the build memory limit of 64 MiB"),
        "{log}"
    );
    let r = s.req("GET", "/health", None, None).await;
    assert_eq!(r.status, 200);
}

/// The `venv` module of a build context: `python -m venv`, run in the context, finds it
/// first (the way pip runs a source package's own build code). It reports what the build
/// step may do, leaves a detached process behind, then hands over to the real `venv`.
const STEP_PROBE: &str = r#"import os, resource, subprocess, sys
print(f"STEP uid={os.getuid()}", flush=True)
print(f"STEP nproc={resource.getrlimit(resource.RLIMIT_NPROC)[0]}", flush=True)
try:
    open(os.path.join(os.getcwd(), "..", "..", "..", "secrets.key"), "rb").read()
    print("STEP secrets.key read", flush=True)
except OSError as e:
    print(f"STEP secrets.key refused ({e.__class__.__name__})", flush=True)
mine = ("CATTERY_BUILD_STEP",)  # the platform's marker of the step's processes
print("STEP env=[" + ",".join(sorted(k for k in os.environ if k.startswith("CATTERY_") and k not in mine)) + "]", flush=True)
p = subprocess.Popen(["sleep", "300"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"STEP left pid={p.pid}", flush=True)
here = os.getcwd()
sys.path[:] = [x for x in sys.path if x not in ("", here)]
for m in [m for m in sys.modules if m == "venv" or m.startswith("venv.")]:
    del sys.modules[m]
import runpy
runpy.run_module("venv", run_name="__main__", alter_sys=True)
"#;

/// A gzipped tar of `files` (path, text).
fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
    let files: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()))
        .collect();
    tar_gz_bytes(&files)
}

/// Creates agent `name` running build `id` (as `pipecat cloud deploy` does with a build id).
async fn deploy_build(s: &Server, name: &str, id: &str) {
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&s.sk),
            Some(serde_json::json!({"serviceName": name, "buildId": id})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// Uploads `context` and builds it through the API (as the CLI does); returns the finished
/// build and its log.
async fn build_through_the_api(s: &Server, context: Vec<u8>) -> (serde_json::Value, String) {
    let r = s
        .req(
            "POST",
            "/v1/builds/upload-url",
            Some(&s.sk),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let upload = r.body["uploadId"].as_str().unwrap().to_string();
    let token = r.body["uploadFields"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .raw(
            "PUT",
            &format!("/v1/builds/uploads/{upload}?token={token}"),
            None,
            context,
        )
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let r = s
        .req(
            "POST",
            "/v1/builds",
            Some(&s.sk),
            Some(serde_json::json!({"uploadId": upload})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["build"]["id"].as_str().unwrap().to_string();
    let build = common::wait_for(Duration::from_secs(120), "the build to end", || {
        let (s, id) = (s, &id);
        async move {
            let r = s
                .req("GET", &format!("/v1/builds/{id}"), Some(&s.sk), None)
                .await;
            let b = r.body["build"].clone();
            (!matches!(b["status"].as_str(), Some("pending" | "building"))).then_some(b)
        }
    })
    .await;
    let r = s
        .req(
            "GET",
            &format!("/v1/builds/{id}/logs?limit=1000"),
            Some(&s.sk),
            None,
        )
        .await;
    let log = r.body["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    (build, log)
}

/// A build's steps run the org's code (here a `venv` module in the context, found first by
/// `python -m venv`; pip runs a source package's setup code the same way). Run by a root
/// server, they get an unprivileged uid of the instance pool, not the server's (so neither
/// the secrets key nor the database), nothing of the server's environment (its Daily key),
/// and nothing they leave running outlives the build; the built files then belong to the
/// server, so a later instance that draws the same uid cannot change them.
#[tokio::test(flavor = "multi_thread")]
async fn a_builds_steps_run_unprivileged_without_the_servers_environment() {
    let Some(s) =
        isolated_builds_server(&[("CATTERY_DAILY_API_KEY", "daily-key-of-the-server")]).await
    else {
        return;
    };
    let context = tar_gz(&[
        ("bot.py", "async def bot(args):\n    pass\n"),
        ("venv/__init__.py", ""),
        ("venv/__main__.py", STEP_PROBE),
    ]);
    let (build, log) = build_through_the_api(&s, context).await;
    assert_eq!(build["status"], "success", "{build}\n{log}");
    let line = |what: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("STEP {what}")))
            .unwrap_or_else(|| panic!("no `STEP {what}` line in the build log:\n{log}"))
            .to_string()
    };
    let uid: u32 = line("uid=").parse().unwrap();
    assert!(uid >= 2_000_000_000, "the step ran as uid {uid}:\n{log}");
    assert_eq!(
        line("nproc="),
        "512",
        "a step's processes and threads are capped (a fork bomb):\n{log}"
    );
    assert!(
        log.contains("STEP secrets.key refused"),
        "a build step read the server's secrets key:\n{log}"
    );
    assert_eq!(
        line("env="),
        "[]",
        "the step saw the server's variables:\n{log}"
    );
    let left: i32 = line("left pid=").parse().unwrap();
    assert!(
        !common::pid_alive(left),
        "a process the build left behind still runs (pid {left})"
    );
    let dir = s
        .data_dir()
        .join("builds")
        .join(build["id"].as_str().unwrap());
    use std::os::unix::fs::MetadataExt;
    for p in ["app", "app/bot.py", "venv", "venv/bin/python"] {
        let m = std::fs::symlink_metadata(dir.join(p)).unwrap();
        assert_eq!(m.uid(), 0, "{p} belongs to uid {}, not the server", m.uid());
    }
    assert!(!dir.join("home").exists(), "the steps' home is removed");
}

/// A server building with the venv builder, whose steps run under instance uids (with
/// `env`), or `None` (the test is skipped) when not run as root: only a root server gives
/// steps uids of their own.
async fn isolated_builds_server(env: &[(&str, &str)]) -> Option<Server> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (steps run under instance uids only for a root server)");
        return None;
    }
    let py = main_python();
    Some(
        Server::start_with_env(
            &["--python", py.to_str().unwrap(), "--builder", "venv"],
            env,
        )
        .await,
    )
}

/// A build's files are seen only by the instances that run it: org B's agent, given the full
/// path of a file in org A's build (its id leaked), finds nothing there, nor A's build log,
/// while A's agent runs from its build (the build's Python and its `app/`) and reads its own
/// file.
#[tokio::test(flavor = "multi_thread")]
async fn another_orgs_agent_cannot_read_a_build_by_its_path() {
    let Some(s) = isolated_builds_server(&[]).await else {
        return;
    };
    let bot = "import asyncio, os\nfrom loguru import logger\n\n\
               async def bot(args):\n    here = os.path.dirname(os.path.abspath(__file__))\n    \
               text = open(os.path.join(here, 'hardcoded.txt')).read().strip()\n    \
               logger.info(f'own build read: {text}')\n    await asyncio.sleep(60)\n";
    let secret = "org-a-hardcoded-value-5e2f";
    let context = tar_gz(&[("bot.py", bot), ("hardcoded.txt", secret)]);
    let (build, log) = build_through_the_api(&s, context).await;
    assert_eq!(build["status"], "success", "{build}\n{log}");
    let dir = build_dir(&s, &build);
    let file = dir.join("app/hardcoded.txt");
    assert!(file.exists());

    // Org A's agent runs from its build.
    let id = build["id"].as_str().unwrap();
    deploy_build(&s, "a-built", id).await;
    let sid_a = s.start_ok("a-built").await;
    let want = format!("own build read: {secret}");
    wait_for_agent_log(&s, "a-built", &want).await;

    // Org B's test agent tries A's build by its full path.
    let (sk_b, pk_b) = (s.key("private", "org-b"), s.key("public", "org-b"));
    let cmd = vec![common::test_agent().display().to_string()];
    let r = s
        .req(
            "POST",
            "/v1/agents",
            Some(&sk_b),
            Some(serde_json::json!({"serviceName": "b-agent", "command": cmd,
                                    "env": {"CATTERY_TEST_TAG": s.tag}})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = s
        .req(
            "POST",
            "/v1/public/b-agent/start",
            Some(&pk_b),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid_b = r.body["sessionId"].as_str().unwrap().to_string();
    let read = |path: PathBuf| {
        let (s, pk_b, sid_b) = (&s, &pk_b, &sid_b);
        async move {
            let url = format!("/v1/public/b-agent/sessions/{sid_b}/control/read");
            let r = s
                .raw(
                    "POST",
                    &url,
                    Some(pk_b),
                    path.display().to_string().into_bytes(),
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body
        }
    };
    // The probe works: B reads what is its to read.
    let own = read(PathBuf::from("/proc/self/environ")).await;
    assert_eq!(own["ok"], true, "{own}");
    for p in [
        file.clone(),
        dir.join("app/bot.py"),
        dir.join("venv/pyvenv.cfg"),
        dir.join("build.log"),
        dir.join("app"),
    ] {
        let r = read(p.clone()).await;
        assert_eq!(r["ok"], false, "org B's agent read {}: {r}", p.display());
        let e = r["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("No such file") || e.contains("ermission denied"),
            "{}: {r}",
            p.display()
        );
    }

    assert_eq!(s.stop("a-built", &sid_a).await.status, 200);
    let r = s
        .req(
            "DELETE",
            &format!("/v1/agents/b-agent/sessions/{sid_b}"),
            Some(&sk_b),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
}

/// A `venv` module for a build context that runs `code` (Python, with `os` imported) and
/// then hands over to the real `venv`, as [`STEP_PROBE`] does.
fn step_running(code: &str) -> String {
    format!(
        "import os, sys\n{code}\nhere = os.getcwd()\nsys.path[:] = [x for x in sys.path if x not in (\"\", here)]\n\
         for m in [m for m in sys.modules if m == \"venv\" or m.startswith(\"venv.\")]:\n    del sys.modules[m]\n\
         import runpy\nrunpy.run_module(\"venv\", run_name=\"__main__\", alter_sys=True)\n"
    )
}

/// The build's own directory on the server.
fn build_dir(s: &Server, build: &serde_json::Value) -> PathBuf {
    s.data_dir()
        .join("builds")
        .join(build["id"].as_str().unwrap())
}

/// Every path under `root` (itself included), links not followed.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if std::fs::symlink_metadata(root).is_ok_and(|m| m.is_dir()) {
        for e in std::fs::read_dir(root).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

/// A build's steps may make a file or directory writable by every user; what the build
/// leaves (given back to the server, opened to all) is writable by no uid but the server's,
/// so no instance (the next one to draw the build's uid, or any other) can change the built
/// bot or its virtualenv, nor swap an entry for a symlink while the server walks the tree.
#[tokio::test(flavor = "multi_thread")]
async fn a_built_tree_is_left_writable_by_no_other_uid() {
    let Some(s) = isolated_builds_server(&[]).await else {
        return;
    };
    let probe = step_running(
        "os.makedirs('shared/deeper', exist_ok=True)\n\
         open('shared/deeper/f', 'w').write('x')\n\
         open('bot2.py', 'w').write('x')\n\
         for p, m in [('shared', 0o3777), ('shared/deeper', 0o777), ('shared/deeper/f', 0o666), ('bot2.py', 0o777)]:\n    os.chmod(p, m)",
    );
    let context = tar_gz(&[
        ("bot.py", "async def bot(args):\n    pass\n"),
        ("venv/__init__.py", ""),
        ("venv/__main__.py", &probe),
    ]);
    let (build, log) = build_through_the_api(&s, context).await;
    assert_eq!(build["status"], "success", "{build}\n{log}");
    let dir = build_dir(&s, &build);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("app/shared"), 0o755);
    assert_eq!(mode("app/shared/deeper/f"), 0o644);
    assert_eq!(mode("app/bot2.py"), 0o755);
    for p in walk(&dir.join("app"))
        .into_iter()
        .chain(walk(&dir.join("venv")))
    {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            continue;
        }
        assert_eq!(m.uid(), 0, "{} belongs to uid {}", p.display(), m.uid());
        assert_eq!(
            m.mode() & 0o7022,
            0,
            "{} is left with mode {:o}",
            p.display(),
            m.mode() & 0o7777
        );
    }
}

/// A build whose files cannot all be given back (a hard link among them) fails, and leaves
/// nothing its uid owns: not its home (what the steps wrote there, pip's cache), nor its
/// context or virtualenv; the next instance to draw that uid finds nothing of the build.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_refused_for_a_hard_link_leaves_nothing_its_uid_owns() {
    let Some(s) = isolated_builds_server(&[]).await else {
        return;
    };
    let probe = step_running(
        "open(os.path.join(os.environ['HOME'], 'private'), 'w').write('the org\\'s own')\n\
         os.link('bot.py', 'zz-second-name.py')\n\
         print(f'STEP uid={os.getuid()}', flush=True)",
    );
    let context = tar_gz(&[
        ("bot.py", "async def bot(args):\n    pass\n"),
        ("venv/__init__.py", ""),
        ("venv/__main__.py", &probe),
    ]);
    let (build, log) = build_through_the_api(&s, context).await;
    assert_eq!(build["status"], "failed", "{build}\n{log}");
    assert!(
        build["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("hard link"),
        "{build}"
    );
    let uid: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("STEP uid="))
        .unwrap_or_else(|| panic!("no `STEP uid=` line in the build log:\n{log}"))
        .parse()
        .unwrap();
    let dir = build_dir(&s, &build);
    use std::os::unix::fs::MetadataExt;
    let left: Vec<PathBuf> = walk(&dir)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() == uid))
        .collect();
    assert!(
        left.is_empty(),
        "the failed build left {} files of its uid {uid}: {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );
    assert!(!dir.join("home").exists(), "the steps' home is removed");
}

/// Uploads `context` through the API as the CLI does (an upload URL, then its bytes): the
/// upload id.
async fn uploaded(s: &Server, context: Vec<u8>) -> String {
    let r = s
        .req(
            "POST",
            "/v1/builds/upload-url",
            Some(&s.sk),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let upload = r.body["uploadId"].as_str().unwrap().to_string();
    let token = r.body["uploadFields"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/builds/uploads/{upload}?token={token}");
    let r = s.raw("PUT", &path, None, context).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    upload
}

/// One org cannot take the build machinery from the others: it holds at most
/// `--build-uploads-per-org` upload URLs not yet built and has at most `--builds-per-org`
/// builds pending or building, past which it is answered 429 `{error, code}` (the refused
/// upload stays usable). A build cut by the server's death (SIGKILL mid-build) ends `failed`
/// at the next start and keeps only its log: nothing its steps made (which its build uid
/// owned) is left.
#[tokio::test(flavor = "multi_thread")]
async fn an_orgs_uploads_and_builds_are_bounded_and_a_killed_build_is_cleared() {
    let py = main_python();
    let mut s = Server::start(&[
        "--python",
        py.to_str().unwrap(),
        "--builder",
        "venv",
        "--builds-per-org",
        "1",
        "--build-uploads-per-org",
        "2",
    ])
    .await;
    // A build whose first step (`python -m venv`, the context's own `venv` found first) takes
    // 300 s: it stays `building` for the test, and runs on when the server dies.
    let slow = tar_gz(&[
        ("bot.py", "async def bot(args):\n    pass\n"),
        ("venv/__init__.py", ""),
        (
            "venv/__main__.py",
            "import os, time\nprint(f'STEP pid={os.getpid()}', flush=True)\ntime.sleep(300)\n",
        ),
    ]);
    let first = uploaded(&s, slow).await;
    let second = uploaded(&s, tar_gz(&[("bot.py", "# another context\n")])).await;
    let r = s
        .req(
            "POST",
            "/v1/builds/upload-url",
            Some(&s.sk),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.body["code"], "429");
    let msg = r.body["error"].as_str().unwrap();
    assert!(msg.contains("build_uploads_per_org = 2"), "{msg}");
    let r = s
        .req(
            "POST",
            "/v1/builds",
            Some(&s.sk),
            Some(serde_json::json!({"uploadId": first})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let build = r.body["build"].clone();
    let id = build["id"].as_str().unwrap().to_string();
    let r = s
        .req(
            "POST",
            "/v1/builds",
            Some(&s.sk),
            Some(serde_json::json!({"uploadId": second})),
        )
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.body["code"], "429");
    let msg = r.body["error"].as_str().unwrap();
    assert!(msg.contains("builds_per_org = 1"), "{msg}");
    // Mid-build (its steps have made the virtualenv's directory and the build's home), the
    // server dies; at its next start the build has failed and only its log is left.
    let dir = build_dir(&s, &build);
    common::wait_for(Duration::from_secs(60), "the build's steps to run", || {
        let dir = dir.clone();
        async move { (dir.join("venv").exists() && dir.join("home").exists()).then_some(()) }
    })
    .await;
    let log = common::wait_for(Duration::from_secs(60), "the step's pid in the log", || {
        let path = dir.join("build.log");
        async move {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            text.lines()
                .find_map(|l| l.strip_prefix("STEP pid=")?.trim().parse::<i32>().ok())
        }
    })
    .await;
    let step = log;
    s.kill9();
    assert!(common::pid_alive(step), "the step ended with the server");
    s.spawn().await;
    let r = s
        .req("GET", &format!("/v1/builds/{id}"), Some(&s.sk), None)
        .await;
    assert_eq!(r.body["build"]["status"], "failed", "{:?}", r.body);
    if std::fs::read_to_string(dir.join("build.log"))
        .unwrap()
        .contains("the server cannot make cgroups here")
    {
        eprintln!("no cgroups for build steps here: what they leave is not checked");
    } else {
        // Killed by its cgroup at the start (before the server answers).
        common::wait_for(
            Duration::from_secs(10),
            "the cut step to end",
            || async move { (!common::pid_alive(step)).then_some(()) },
        )
        .await;
    }
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["build.log"]);
}

/// A wheel of package `cattery_marker` at `version`, whose `VERSION` says it, in `dir`.
fn write_versioned_wheel(dir: &Path, version: &str) -> String {
    marker_wheel(dir, version, "VERSION", version)
}

/// A gzipped tar of every regular file under `root` (relative paths).
fn tar_gz_dir(root: &Path) -> Vec<u8> {
    let files: Vec<(String, Vec<u8>)> = walk(root)
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect();
    tar_gz_bytes(&files)
}

const LOCKED_BOT_PY: &str = r#"from loguru import logger

import cattery_marker


async def bot(args):
    logger.info(f"locked bot ran with cattery_marker {cattery_marker.VERSION}")
"#;

/// Pipecat's quickstart shape, offline: `bot.py`, a Dockerfile running `uv sync --locked`, a
/// `pyproject.toml` needing `cattery-marker`, from a wheel in the context, and the `uv.lock`
/// the base environment's uv makes of it: it pins 0.1.0, while `wheels/` also has 0.2.0,
/// which pip picks for the bare requirement.
fn locked_project() -> tempfile::TempDir {
    let d = common::open_tempdir();
    let p = d.path();
    std::fs::write(p.join("bot.py"), LOCKED_BOT_PY).unwrap();
    std::fs::write(
        p.join("Dockerfile"),
        "FROM dailyco/pipecat-base:latest\nRUN --mount=type=bind,source=uv.lock,target=uv.lock \\\n    \
         --mount=type=bind,source=pyproject.toml,target=pyproject.toml \\\n    \
         uv sync --locked --no-install-project --no-dev\nCOPY ./bot.py bot.py\n",
    )
    .unwrap();
    std::fs::create_dir(p.join("wheels")).unwrap();
    let w = write_versioned_wheel(&p.join("wheels"), "0.1.0");
    write_versioned_wheel(&p.join("wheels"), "0.2.0");
    std::fs::write(
        p.join("pyproject.toml"),
        format!(
            "[project]\nname = \"locked-bot\"\nversion = \"0.1.0\"\nrequires-python = \">=3.10\"\n\
             dependencies = [\"cattery-marker\"]\n\n\
             [tool.uv.sources]\ncattery-marker = {{ path = \"wheels/{w}\" }}\n"
        ),
    )
    .unwrap();
    uv(p, &["lock"]);
    d
}

/// The `uv.lock` of a project needing `six` from a git tag.
const GIT_LOCK: &str = r#"version = 1
revision = 3
requires-python = ">=3.10"

[[package]]
name = "git-bot"
version = "0.1.0"
source = { virtual = "." }
dependencies = [
    { name = "six" },
]

[package.metadata]
requires-dist = [{ name = "six", git = "https://github.com/benjaminp/six?tag=1.16.0" }]

[[package]]
name = "six"
version = "1.16.0"
source = { git = "https://github.com/benjaminp/six?tag=1.16.0#65486e4383f9f411da95937451205d3c7b61b9e1" }
"#;

/// Replaces `from` with `to` in the file `path`.
fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(from),
        "{} has no {from:?}:\n{text}",
        path.display()
    );
    std::fs::write(path, text.replace(from, to)).unwrap();
}

/// A context with `uv.lock` (Pipecat's quickstart shape) installs exactly the locked set,
/// offline: the session's bot sees the locked version of its dependency, not the newer one pip
/// would pick for `pyproject.toml`'s bare requirement (pip finds both, `PIP_FIND_LINKS`). A lock
/// that no longer matches `pyproject.toml`, one whose `requires-python` the base's Python does
/// not satisfy, and one naming a wheel the context lacks fail the build with uv's message.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_context_installs_the_locked_set() {
    let py = main_python();
    let s = Server::start_with_env(
        &["--python", py.to_str().unwrap(), "--builder", "venv"],
        &[("PIP_FIND_LINKS", "wheels"), ("PIP_NO_INDEX", "1")],
    )
    .await;
    let proj = locked_project();
    let (build, log) = build_through_the_api(&s, tar_gz_dir(proj.path())).await;
    assert_eq!(build["status"], "success", "{build}\n{log}");
    assert!(log.contains("Installing uv.lock"), "{log}");
    assert!(
        log.contains("The local builder does not run the 2 RUN/COPY/ADD step(s) of Dockerfile"),
        "{log}"
    );
    assert!(log.contains("uv export --locked"), "{log}");
    let id = build["id"].as_str().unwrap();
    deploy_build(&s, "locked-bot", id).await;
    let sid = s.start_ok("locked-bot").await;
    let logs = wait_for_agent_log(&s, "locked-bot", "locked bot ran with cattery_marker").await;
    assert!(
        logs.contains("locked bot ran with cattery_marker 0.1.0"),
        "the bot did not get the locked version:\n{logs}"
    );
    let _ = s.stop("locked-bot", &sid).await;

    // A stale lock: pyproject.toml now takes the other wheel (`uv sync --locked` fails). A
    // change uv can check without an index: a new registry package would send it to one.
    let stale = locked_project();
    edit(
        &stale.path().join("pyproject.toml"),
        "cattery_marker-0.1.0-py3",
        "cattery_marker-0.2.0-py3",
    );
    // A lock for a newer Python than the base's.
    let newer = locked_project();
    for f in ["pyproject.toml", "uv.lock"] {
        edit(&newer.path().join(f), "\">=3.10\"", "\">=3.99\"");
    }
    // A lock naming a wheel the context does not have.
    let missing = locked_project();
    std::fs::remove_file(
        missing
            .path()
            .join("wheels/cattery_marker-0.1.0-py3-none-any.whl"),
    )
    .unwrap();
    // A lock with a git source: pip cannot check it against a hash, and refuses it (before
    // any fetch). The lock is written out: making it would need the network.
    let git = common::open_tempdir();
    std::fs::write(git.path().join("bot.py"), LOCKED_BOT_PY).unwrap();
    std::fs::write(
        git.path().join("pyproject.toml"),
        "[project]\nname = \"git-bot\"\nversion = \"0.1.0\"\nrequires-python = \">=3.10\"\n\
         dependencies = [\"six\"]\n\n[tool.uv.sources]\n\
         six = { git = \"https://github.com/benjaminp/six\", tag = \"1.16.0\" }\n",
    )
    .unwrap();
    std::fs::write(git.path().join("uv.lock"), GIT_LOCK).unwrap();
    let (export, pip) = (
        "uv export --locked (uv.lock) failed",
        "pip install of the locked set (uv.lock) failed",
    );
    for (proj, what, want) in [
        (
            &stale,
            export,
            "needs to be updated, but `--locked` was provided",
        ),
        (
            &newer,
            export,
            "incompatible with the project's Python requirement",
        ),
        (&missing, export, "cattery_marker-0.1.0-py3-none-any.whl"),
        (&git, pip, "hash version control repositories"),
    ] {
        let (build, log) = build_through_the_api(&s, tar_gz_dir(proj.path())).await;
        assert_eq!(build["status"], "failed", "{build}\n{log}");
        let e = build["errorMessage"].as_str().unwrap_or_default();
        assert!(
            e.starts_with(what) && e.contains(want),
            "{what:?} / {want:?} not in {e:?}\n{log}"
        );
        assert!(log.contains(want), "{log}");
    }
}

/// Runs the base environment's uv in `dir` with `args`, offline; asserts it succeeds.
fn uv(dir: &Path, args: &[&str]) {
    let out = Command::new(main_python())
        .args(["-m", "uv"])
        .args(args)
        .args(["--offline", "--python"])
        .arg(main_python())
        .current_dir(dir)
        .env("UV_PYTHON_DOWNLOADS", "never")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uv {args:?} (scripts/setup-python.sh installs uv in the test Python): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pipecat's quickstart Dockerfile (`uv sync --locked` with a cache mount and bind mounts of
/// `uv.lock` and `pyproject.toml`, which need BuildKit), plus a bind mount of the context's
/// `wheels/` and `UV_OFFLINE=1`: the sync installs the marker wheel from the context and
/// reaches no index.
const UV_DOCKERFILE: &str = "FROM dailyco/pipecat-base:latest
ENV CATTERY_TEST_RUN=RUN_ID
ENV UV_COMPILE_BYTECODE=1
ENV UV_LINK_MODE=copy
ENV UV_OFFLINE=1
RUN --mount=type=cache,target=/root/.cache/uv \\
    --mount=type=bind,source=uv.lock,target=uv.lock \\
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \\
    --mount=type=bind,source=wheels,target=wheels \\
    uv sync --locked --no-install-project --no-dev
COPY ./*.py .
";

/// The bot of the uv project: the marker from the wheel the sync installed, and whether the
/// sync, exact as uv's default is, removed what the lock does not name (pipecat-ai).
const UV_BOT_PY: &str = r#"import importlib.util

from loguru import logger

import cattery_marker


async def bot(args):
    gone = importlib.util.find_spec("pipecat") is None
    logger.info(f"uv-synced bot ran with marker {cattery_marker.MARKER}, pipecat removed: {gone}")
"#;

/// A uv project like Pipecat's quickstart whose lock the base image already satisfies but
/// for the marker wheel: `pyproject.toml` names what the runner needs (fastapi, uvicorn,
/// loguru) and the wheel, pinned by `constraint-dependencies` to the versions `base` has (and
/// locked for Linux alone: the wheelhouse has no other platform's wheels), and `uv.lock` is
/// made by the base image's own `uv lock`, offline, from the wheelhouse
/// scripts/docker-images.sh installed the base from. Returns the context's files.
fn uv_project(base: &str, marker: &str) -> Vec<(String, Vec<u8>)> {
    uv_project_needing(base, marker, &["fastapi", "uvicorn", "loguru"])
}

/// [`uv_project`] whose `pyproject.toml` needs `deps` (and the marker wheel).
fn uv_project_needing(base: &str, marker: &str, deps: &[&str]) -> Vec<(String, Vec<u8>)> {
    let dir = common::open_tempdir();
    let p = dir.path();
    std::fs::create_dir(p.join("wheels")).unwrap();
    let wheel = write_wheel(&p.join("wheels"), marker);
    let freeze = docker(&["run", "--rm", "--network", "none", base, "pip", "freeze"])
        .expect("pip freeze in the base image");
    let pins: Vec<String> = freeze
        .lines()
        .filter(|l| l.contains("==") && !l.starts_with('#'))
        .map(|l| format!("{l:?}"))
        .collect();
    let pyproject = format!(
        "[project]\nname = \"quickstart\"\nversion = \"0.1.0\"\nrequires-python = \">=3.11\"\n\
         dependencies = [{}\"cattery-marker\"]\n\n\
         [tool.uv]\nenvironments = [\"sys_platform == 'linux'\"]\nconstraint-dependencies = [{}]\n\n\
         [tool.uv.sources]\ncattery-marker = {{ path = \"wheels/{wheel}\" }}\n",
        deps.iter().map(|d| format!("{d:?}, ")).collect::<String>(),
        pins.join(", ")
    );
    std::fs::write(p.join("pyproject.toml"), &pyproject).unwrap();
    let wheelhouse = std::env::var_os("CATTERY_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cattery"))
        .join("wheels");
    let (w, c) = (
        format!("{}:/wheelhouse:ro", wheelhouse.display()),
        format!("{}:/w", p.display()),
    );
    let locked = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &w,
        "-v",
        &c,
        "-w",
        "/w",
        base,
        "uv",
        "lock",
        "--offline",
        "--no-index",
        "--find-links",
        "/wheelhouse",
    ]);
    assert!(
        locked.is_some() && p.join("uv.lock").exists(),
        "uv lock from {} failed",
        wheelhouse.display()
    );
    let mut files = vec![
        // A value of this run's own before the steps: none of them can come from the cache of
        // another build of the same project on this engine (the log would then have no `RUN`).
        (
            "Dockerfile".to_string(),
            UV_DOCKERFILE
                .replace("RUN_ID", &uuid::Uuid::new_v4().simple().to_string())
                .into_bytes(),
        ),
        ("bot.py".into(), UV_BOT_PY.as_bytes().to_vec()),
        ("pyproject.toml".into(), pyproject.into_bytes()),
        ("uv.lock".into(), std::fs::read(p.join("uv.lock")).unwrap()),
    ];
    files.push((
        format!("wheels/{wheel}"),
        std::fs::read(p.join("wheels").join(&wheel)).unwrap(),
    ));
    files
}

/// A gzipped tar of binary `files`.
fn tar_gz_bytes(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Pipecat's quickstart shape on the Docker builder: `RUN --mount=type=cache` and
/// `--mount=type=bind,source=...` need BuildKit, which the builder uses; `uv sync --locked`
/// runs in the stand-in base image (uv on PATH, its venv /app/.venv) without any index; the
/// build's log shows BuildKit's steps; the agent runs the synced environment and serves a
/// session. A failing step fails the build with the engine's message.
#[tokio::test(flavor = "multi_thread")]
async fn a_uv_quickstart_dockerfile_with_run_mounts_builds_with_buildkit() {
    let Some(base) = docker_base() else {
        return;
    };
    let s = Server::start(&["--builder", "docker", "--build-base-image", base]).await;
    let context = tar_gz_bytes(&uv_project(base, "uv-51a7"));
    let (build, log) = build_through_the_api(&s, context).await;
    let tag = build["imageUri"].as_str().map(str::to_string);
    let cleanup = |tag: &Option<String>| {
        if let Some(t) = tag {
            let _ = docker(&["rmi", "-f", t]);
        }
    };
    if build["status"] != "success" {
        cleanup(&tag);
        panic!("{build}\n{log}\n{}", s.log());
    }
    assert!(log.contains("(BuildKit)"), "{log}");
    assert!(
        log.lines().any(|l| l.starts_with('#')
            && l.contains("RUN --mount=type=cache")
            && l.contains("uv sync --locked")),
        "{log}"
    );
    assert!(log.contains("cattery-marker"), "uv's output: {log}");
    let id = build["id"].as_str().unwrap();
    deploy_build(&s, "uv-built", id).await;
    s.wait_ready("uv-built", Duration::from_secs(90)).await;
    let sid = s.start_ok("uv-built").await;
    wait_for_agent_log(
        &s,
        "uv-built",
        "uv-synced bot ran with marker uv-51a7, pipecat removed: True",
    )
    .await;
    let _ = s.stop("uv-built", &sid).await;
    let _ = s
        .req("DELETE", "/v1/agents/uv-built", Some(&s.sk), None)
        .await;

    // A failing step under BuildKit: the build fails with the engine's message, and the log
    // has the step's own output and its error.
    let failing = "FROM dailyco/pipecat-base:latest\nRUN --mount=type=cache,target=/root/.cache/x echo step-output-7f && exit 3\n";
    let (failed, flog) = build_through_the_api(
        &s,
        tar_gz(&[("Dockerfile", failing), ("bot.py", UV_BOT_PY)]),
    )
    .await;
    drop(s);
    cleanup(&tag);
    assert_eq!(failed["status"], "failed", "{failed}\n{flog}");
    let err = failed["errorMessage"].as_str().unwrap_or_default();
    assert!(
        err.starts_with("docker build failed: ") && err.contains("exit code: 3"),
        "{failed}"
    );
    // The engine's message names only the command and its code: the step's telling line follows.
    assert!(err.ends_with("(step-output-7f)"), "{failed}");
    assert!(
        flog.contains("step-output-7f") && flog.contains("ERROR:"),
        "{flog}"
    );
}

/// A Dockerfile whose `uv sync --locked` leaves out what the base image's runner imports (a
/// lock without `pipecat-ai[runner]`: here only loguru and the marker) builds, but no
/// session of it could start: the build fails instead, naming what is missing, and the
/// official CLI's deploy says so (with the `[runner]` of the hint whole). Neither the image
/// nor the check's container is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_docker_build_without_the_runners_packages_fails_saying_so() {
    let Some(base) = docker_base() else {
        return;
    };
    let dir = common::open_tempdir();
    for (path, data) in uv_project_needing(base, "nr-3b1c", &["loguru"]) {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    std::fs::write(
        dir.path().join("pcc-deploy.toml"),
        "agent_name = \"no-runner\"\n\n[scaling]\nmin_agents = 0\nmax_agents = 1\n",
    )
    .unwrap();
    let s = Server::start(&["--builder", "docker", "--build-base-image", base]).await;
    let (ok, out) = pipecat(&s, dir.path(), &["deploy", "--yes"]).await;
    let list = builds(&s).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let tag = format!("cattery-build:{id}");
    if docker(&["image", "inspect", &tag]).is_some() {
        let _ = docker(&["rmi", "-f", &tag]);
        panic!("the image of a failed build is left:\n{out}\n{list:?}");
    }
    assert!(!ok, "the deploy must fail:\n{out}");
    assert_eq!(list[0]["status"], "failed", "{list:?}");
    let msg = list[0]["errorMessage"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("the built image cannot import fastapi and uvicorn")
            && msg.contains("No module named"),
        "{msg}"
    );
    assert!(out.contains("Build failed"), "{out}");
    assert!(
        out.contains("pipecat-ai[runner] brings both"),
        "the CLI did not print the errorMessage whole:\n{out}"
    );
    let r = s
        .req("GET", "/v1/agents/no-runner", Some(&s.sk), None)
        .await;
    assert_eq!(r.status, 404, "no agent for a failed build: {:?}", r.body);
    let (_, log) = pipecat(&s, dir.path(), &["build", "logs", &id]).await;
    assert!(log.contains("Checking that the image can run"), "{log}");
    let name = format!("name=cattery-build-check-{id}");
    let left = docker(&["ps", "-aq", "--filter", &name]).unwrap();
    assert!(left.is_empty(), "the check's container is left: {left}");
}

/// `--build-network host`: a Docker build's `RUN` steps use the host's network (here they
/// reach a listener on the host's loopback, which the engine's default network cannot), for
/// a machine whose package index is reachable only from the host's network.
#[tokio::test(flavor = "multi_thread")]
async fn a_docker_builds_steps_use_the_build_network() {
    let Some(base) = docker_base() else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dockerfile = format!(
        "FROM dailyco/pipecat-base:latest\nRUN python -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 5); print('reached the host on {port}')\"\n"
    );
    let context = || tar_gz(&[("Dockerfile", &dockerfile), ("bot.py", UV_BOT_PY)]);
    let s = Server::start(&[
        "--builder",
        "docker",
        "--build-base-image",
        base,
        "--build-network",
        "host",
    ])
    .await;
    let (build, log) = build_through_the_api(&s, context()).await;
    drop(s);
    if let Some(t) = build["imageUri"].as_str() {
        let _ = docker(&["rmi", "-f", t]);
    }
    assert_eq!(build["status"], "success", "{build}\n{log}");
    assert!(
        log.contains(&format!("reached the host on {port}")),
        "{log}"
    );
    drop(listener);
}
