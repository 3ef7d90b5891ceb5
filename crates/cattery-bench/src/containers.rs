//! `cattery-bench containers`: the Docker runtime measured against the engine itself, in the
//! same run.
//!
//! The floor is what any platform pays to run one container from an image: the engine's create
//! and start (done here directly with bollard, with the options Cattery uses: an init as PID 1,
//! port 8080 published on a free 127.0.0.1 port, dropped capabilities), then polling the
//! agent's `/readyz` until it answers; and for stops, the engine's kill and remove. Cattery's
//! figures are then the same operations through its API:
//!
//! - cold start: `POST /start` with no warm container, answered after the session was delivered;
//!   its overhead is its p50 minus the floor's p50;
//! - warm start from a pool of ready containers, next to the same start served by the process
//!   runtime (the target is within 1 ms of it);
//! - stop of a cooperative container (SIGTERM, exit, removal, end recorded);
//! - churn (start + stop cycles per second) with containers;
//! - control-plane memory per live container.
//!
//! Needs a reachable engine and the `cattery-test/agent` image (`scripts/docker-images.sh`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use serde_json::{json, Value};

use crate::report::{Report, Target};
use crate::server::Server;
use crate::stats::{ms, summarize};

/// Label on the floor's own containers (removed at the end, and by the next run if this one
/// was killed).
const FLOOR_LABEL: &str = "org.cattery.bench-floor";

/// What to measure and how often.
pub struct ContainerPlan {
    /// The image the agent runs.
    pub image: String,
    /// Cold starts (and floor runs).
    pub cold_runs: usize,
    /// Warm starts per runtime.
    pub warm_runs: usize,
    /// Churn duration.
    pub churn_seconds: f64,
    /// Churn workers.
    pub churn_workers: usize,
    /// Live containers for the memory figure.
    pub live: usize,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn sid(v: &Value) -> Option<String> {
    v.get("sessionId")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Runs every container phase; errors go into the report.
pub async fn run(srv: &Arc<Server>, tag: &str, plan: &ContainerPlan, report: &mut Report) {
    let docker = match Docker::connect_with_local_defaults() {
        Ok(d) => d.negotiate_version().await.ok(),
        Err(_) => None,
    };
    let Some(docker) = docker else {
        report.error("no Docker engine answers (scripts/docker-ci.sh start)");
        return;
    };
    if docker.inspect_image(&plan.image).await.is_err() {
        report.error(format!(
            "image {} is missing (scripts/docker-images.sh agent)",
            plan.image
        ));
        return;
    }
    remove_floor_containers(&docker).await;
    for name in ["floor", "cold", "warm", "churn", "memory"] {
        let t = Instant::now();
        let res = match name {
            "floor" => floor(&docker, plan, report).await,
            "cold" => cold(srv, tag, plan, report).await,
            "warm" => warm(srv, tag, plan, report).await,
            "churn" => churn(srv, tag, plan, report).await,
            _ => memory(srv, tag, plan, report).await,
        };
        if let Err(e) = res {
            report.error(format!("containers {name} failed: {e:#}"));
        }
        log(format!(
            "containers {name} took {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }
    remove_floor_containers(&docker).await;
}

async fn remove_floor_containers(docker: &Docker) {
    let opts = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&HashMap::from([("label", vec![FLOOR_LABEL])]))
        .build();
    if let Ok(list) = docker.list_containers(Some(opts)).await {
        for c in list {
            if let Some(id) = c.id {
                let _ = docker
                    .remove_container(
                        &id,
                        Some(
                            RemoveContainerOptionsBuilder::default()
                                .force(true)
                                .v(true)
                                .build(),
                        ),
                    )
                    .await;
            }
        }
    }
}

fn floor_body(image: &str) -> ContainerCreateBody {
    let port_key = "8080/tcp".to_string();
    ContainerCreateBody {
        image: Some(image.to_string()),
        env: Some(vec!["PORT=8080".into(), "CATTERY_HOST=0.0.0.0".into()]),
        labels: Some(HashMap::from([(FLOOR_LABEL.to_string(), "1".to_string())])),
        exposed_ports: Some(vec![port_key.clone()]),
        host_config: Some(HostConfig {
            init: Some(true),
            port_bindings: Some(HashMap::from([(
                port_key,
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                }]),
            )])),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The engine alone: create + start + inspect (for the port) + `/readyz` answered; then kill
/// and remove.
async fn floor(docker: &Docker, plan: &ContainerPlan, rep: &mut Report) -> anyhow::Result<()> {
    log(format!(
        "containers floor: engine create/start/ready x{}",
        plan.cold_runs
    ));
    let http = crate::server::client();
    let (mut ready, mut remove) = (vec![], vec![]);
    for _ in 0..plan.cold_runs {
        let t0 = Instant::now();
        let c = docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().build()),
                floor_body(&plan.image),
            )
            .await
            .context("create")?;
        docker.start_container(&c.id, None).await.context("start")?;
        let ins = docker
            .inspect_container(&c.id, None::<InspectContainerOptions>)
            .await?;
        let port: u16 = ins
            .network_settings
            .and_then(|n| n.ports)
            .and_then(|p| p.get("8080/tcp").cloned().flatten())
            .and_then(|b| b.into_iter().find_map(|b| b.host_port))
            .and_then(|p| p.parse().ok())
            .context("no published port")?;
        let url = format!("http://127.0.0.1:{port}/readyz");
        loop {
            if let Ok(resp) = http.get(&url).send().await {
                if resp.status().is_success() {
                    break;
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the floor container never became ready");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ready.push(ms(t0.elapsed()));
        let t1 = Instant::now();
        docker
            .remove_container(
                &c.id,
                Some(
                    RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .v(true)
                        .build(),
                ),
            )
            .await?;
        remove.push(ms(t1.elapsed()));
    }
    let f = rep.figure(
        "containers_floor_ready",
        "containers",
        "engine alone: create + start + /readyz answered",
        summarize(&ready),
    );
    f.note = Some("bollard, the options Cattery uses; polled every 2 ms".into());
    let f = rep.figure(
        "containers_floor_remove",
        "containers",
        "engine alone: kill + remove (force, volumes)",
        summarize(&remove),
    );
    f.note = Some("SIGKILL: no grace".into());
    Ok(())
}

async fn deploy_image(
    srv: &Server,
    name: &str,
    image: &str,
    min: u32,
    max: u32,
    tag: &str,
) -> anyhow::Result<()> {
    let body = json!({
        "serviceName": name,
        "image": image,
        "autoScaling": {"minAgents": min, "maxAgents": max},
        "stopGraceSeconds": 5,
        "env": {"CATTERY_BENCH_TAG": tag, "CATTERY_BENCH_AGENT": name},
    });
    srv.create_agent(name, &body).await
}

async fn wait_ready(srv: &Server, name: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let r = srv.get(&format!("/v1/agents/{name}")).await;
        if r.body["ready"] == json!(true) {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("agent {name} not ready: {}", r.body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One start and its stop; returns both round trips.
async fn start_stop(srv: &Server, name: &str) -> anyhow::Result<(f64, f64)> {
    let r = srv.start_session(name).await;
    if !r.ok() {
        bail!("start {name}: HTTP {} {}", r.status, r.body);
    }
    let id = sid(&r.body).context("no sessionId")?;
    let s = srv.stop_session(name, &id).await;
    if !s.ok() {
        bail!("stop {name}: HTTP {} {}", s.status, s.body);
    }
    Ok((r.ms, s.ms))
}

async fn cold(
    srv: &Arc<Server>,
    tag: &str,
    plan: &ContainerPlan,
    rep: &mut Report,
) -> anyhow::Result<()> {
    log(format!("containers cold start x{}", plan.cold_runs));
    deploy_image(srv, "c-cold", &plan.image, 0, 4, tag).await?;
    wait_ready(srv, "c-cold").await?;
    let (mut start, mut stop) = (vec![], vec![]);
    for _ in 0..plan.cold_runs {
        let (a, b) = start_stop(srv, "c-cold").await?;
        start.push(a);
        stop.push(b);
    }
    srv.undeploy("c-cold").await;
    let f = rep.figure(
        "containers_cold",
        "containers",
        "cold start: POST /start to answered (session delivered)",
        summarize(&start),
    );
    f.floor = Some("containers_floor_ready".into());
    f.note = Some("no warm container; target: at most 20 ms over the engine's own".into());
    if let (Some(c), Some(fl)) = (
        summarize(&start),
        rep.figures
            .iter()
            .find(|f| f.key == "containers_floor_ready")
            .and_then(|f| f.summary),
    ) {
        let over = c.p50 - fl.p50;
        rep.scalar(
            "containers_cold_overhead_p50",
            "containers",
            "cold start overhead over the engine alone, p50",
            over,
            "ms",
            Some(Target::le("value", 20.0)),
            Some("p50 of cold start minus p50 of the floor, same run".into()),
        );
    }
    let f = rep.figure(
        "containers_stop",
        "containers",
        "stop of a cooperative container: DELETE to 200 (instance gone, end recorded)",
        summarize(&stop),
    );
    f.floor = Some("containers_floor_remove".into());
    f.note = Some("SIGTERM, the agent exits, container removed, end recorded".into());
    Ok(())
}

async fn warm(
    srv: &Arc<Server>,
    tag: &str,
    plan: &ContainerPlan,
    rep: &mut Report,
) -> anyhow::Result<()> {
    log(format!(
        "containers warm start x{} (containers and processes)",
        plan.warm_runs
    ));
    deploy_image(srv, "c-warm", &plan.image, 1, 4, tag).await?;
    srv.deploy("p-warm", &[], 1, 4, 5.0, tag).await?;
    let (mut cont, mut proc_) = (vec![], vec![]);
    for _ in 0..plan.warm_runs {
        // Interleaved, so both see the same machine load.
        for (name, into) in [("c-warm", &mut cont), ("p-warm", &mut proc_)] {
            srv.wait_idle(name, 1, Duration::from_secs(60)).await?;
            let (a, _) = start_stop(srv, name).await?;
            into.push(a);
        }
    }
    srv.undeploy("c-warm").await;
    srv.undeploy("p-warm").await;
    let f = rep.figure(
        "containers_warm_process",
        "containers",
        "warm start, process runtime (same run): POST /start to answered",
        summarize(&proc_),
    );
    f.note = Some("the reference for the container pool's warm start".into());
    let f = rep.figure(
        "containers_warm",
        "containers",
        "warm start from a pool of ready containers: POST /start to answered",
        summarize(&cont),
    );
    f.floor = Some("containers_warm_process".into());
    f.note = Some("target: p50 within 1 ms of the process runtime's".into());
    if let (Some(c), Some(p)) = (summarize(&cont), summarize(&proc_)) {
        rep.scalar(
            "containers_warm_minus_process_p50",
            "containers",
            "warm start, containers minus processes, p50",
            c.p50 - p.p50,
            "ms",
            Some(Target::le("value", 1.0)),
            None,
        );
    }
    Ok(())
}

async fn churn(
    srv: &Arc<Server>,
    tag: &str,
    plan: &ContainerPlan,
    rep: &mut Report,
) -> anyhow::Result<()> {
    let workers = plan.churn_workers.max(1);
    log(format!(
        "containers churn: {workers} workers for {:.0} s",
        plan.churn_seconds
    ));
    deploy_image(
        srv,
        "c-churn",
        &plan.image,
        workers as u32,
        (workers * 2) as u32,
        tag,
    )
    .await?;
    srv.wait_idle("c-churn", workers as u64, Duration::from_secs(120))
        .await?;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.churn_seconds);
    let t0 = Instant::now();
    let mut tasks = vec![];
    for _ in 0..workers {
        let srv = srv.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut errs) = (0u64, vec![]);
            while Instant::now() < deadline {
                match start_stop(&srv, "c-churn").await {
                    Ok(_) => n += 1,
                    Err(e) => {
                        errs.push(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (n, errs)
        }));
    }
    let (mut cycles, mut errors) = (0u64, vec![]);
    for t in tasks {
        let (n, e) = t.await?;
        cycles += n;
        errors.extend(e);
    }
    let secs = t0.elapsed().as_secs_f64();
    srv.undeploy("c-churn").await;
    // A 429 at the cap is the platform working as documented while the pool refills; anything
    // else is an error of the run.
    let (busy, other): (Vec<_>, Vec<_>) = errors.into_iter().partition(|e| e.contains("HTTP 429"));
    for e in other.iter().take(5) {
        rep.error(format!("containers churn: {e}"));
    }
    rep.scalar(
        "containers_churn_cycles_per_s",
        "containers",
        "churn with containers: start + stop cycles per second",
        cycles as f64 / secs,
        "/s",
        None,
        Some(format!(
            "{workers} workers, {cycles} cycles in {secs:.1} s; {} starts answered 429 while the pool refilled",
            busy.len()
        )),
    );
    Ok(())
}

async fn memory(
    srv: &Arc<Server>,
    tag: &str,
    plan: &ContainerPlan,
    rep: &mut Report,
) -> anyhow::Result<()> {
    let n = plan.live.max(1);
    log(format!("containers memory: {n} live sessions"));
    deploy_image(srv, "c-live", &plan.image, 0, n as u32, tag).await?;
    wait_ready(srv, "c-live").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = srv.rss();
    let mut ids = vec![];
    for _ in 0..n {
        let r = srv.start_session("c-live").await;
        if !r.ok() {
            bail!("start c-live: HTTP {} {}", r.status, r.body);
        }
        ids.push(sid(&r.body).context("no sessionId")?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = srv.rss();
    for id in &ids {
        let s = srv.stop_session("c-live", id).await;
        if !s.ok() {
            bail!("stop c-live: HTTP {} {}", s.status, s.body);
        }
    }
    srv.undeploy("c-live").await;
    rep.scalar(
        "containers_rss_per_live_kib",
        "containers",
        "control-plane RSS per live container",
        (after.saturating_sub(before)) as f64 / n as f64 / 1024.0,
        "KiB",
        None,
        Some(format!(
            "server RSS {:.1} MiB with none, {:.1} MiB with {n} live",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        )),
    );
    Ok(())
}
