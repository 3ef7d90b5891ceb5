//! CPU and memory of a container. The engine's stats collector publishes once a second, so a
//! one-shot stats request can wait up to a second; a session's sampler must never wait that
//! long (it runs in the session's loop). So: the container's cgroup files on this host when the
//! engine is local (cgroup v1 `cgroupfs` or `systemd` layout, or v2), read in microseconds;
//! else the engine's stats, refreshed in the background, the last one answered at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bollard::query_parameters::StatsOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;
use parking_lot::Mutex;

use crate::runtime::ResourceSample;

const CG: &str = "/sys/fs/cgroup";

/// Where a container's counters live.
#[derive(Debug, Clone)]
enum Source {
    /// cgroup v1: `cpuacct.usage` (ns) and `memory.usage_in_bytes` / `memory.stat`.
    V1 { cpuacct: PathBuf, memory: PathBuf },
    /// cgroup v2: `cpu.stat` (`usage_usec`), `memory.current` / `memory.stat`.
    V2(PathBuf),
}

/// Finds the container's cgroup on this host, if the engine runs here.
fn find(id: &str) -> Option<Source> {
    let v1 = |ctl: &str| {
        [
            format!("{CG}/{ctl}/docker/{id}"),
            format!("{CG}/{ctl}/system.slice/docker-{id}.scope"),
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
    };
    if let (Some(cpuacct), Some(memory)) =
        (v1("cpuacct").or_else(|| v1("cpu,cpuacct")), v1("memory"))
    {
        return Some(Source::V1 { cpuacct, memory });
    }
    [
        format!("{CG}/system.slice/docker-{id}.scope"),
        format!("{CG}/docker/{id}"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.join("memory.current").is_file())
    .map(Source::V2)
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn stat_field(p: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(p)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

fn read(src: &Source) -> Option<ResourceSample> {
    match src {
        Source::V1 { cpuacct, memory } => {
            let cpu_ns = read_u64(&cpuacct.join("cpuacct.usage"))?;
            let usage = read_u64(&memory.join("memory.usage_in_bytes"))?;
            let inactive =
                stat_field(&memory.join("memory.stat"), "total_inactive_file").unwrap_or(0);
            Some(ResourceSample {
                cpu_ns,
                memory_bytes: usage.saturating_sub(inactive),
            })
        }
        Source::V2(d) => {
            let cpu_ns = stat_field(&d.join("cpu.stat"), "usage_usec")? * 1000;
            let usage = read_u64(&d.join("memory.current"))?;
            let inactive = stat_field(&d.join("memory.stat"), "inactive_file").unwrap_or(0);
            Some(ResourceSample {
                cpu_ns,
                memory_bytes: usage.saturating_sub(inactive),
            })
        }
    }
}

/// One engine stats reading (as `docker stats` computes memory: usage minus inactive file).
async fn engine_stats(docker: &Docker, id: &str) -> Option<ResourceSample> {
    let opts = StatsOptionsBuilder::default()
        .stream(false)
        .one_shot(true)
        .build();
    let st = docker.stats(id, Some(opts)).next().await?.ok()?;
    let cpu_ns = st.cpu_stats?.cpu_usage?.total_usage?;
    let m = st.memory_stats?;
    let stats = m.stats.unwrap_or_default();
    let inactive = stats
        .get("total_inactive_file")
        .or_else(|| stats.get("inactive_file"))
        .copied()
        .unwrap_or(0);
    Some(ResourceSample {
        cpu_ns,
        memory_bytes: m.usage?.saturating_sub(inactive),
    })
}

/// The sampler of one container.
pub struct Sampler {
    docker: Docker,
    id: String,
    /// The container's cgroup on this host (looked up once it exists).
    source: Mutex<Option<Option<Source>>>,
    /// Last engine reading, and whether a refresh is in flight.
    cached: Arc<Mutex<Option<ResourceSample>>>,
    refreshing: Arc<AtomicBool>,
}

impl Sampler {
    /// A sampler of container `id`.
    pub fn new(docker: Docker, id: String) -> Self {
        Sampler {
            docker,
            id,
            source: Mutex::new(None),
            cached: Arc::new(Mutex::new(None)),
            refreshing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The current sample; never waits for the engine.
    pub fn sample(&self) -> Option<ResourceSample> {
        let src = self
            .source
            .lock()
            .get_or_insert_with(|| find(&self.id))
            .clone();
        if let Some(s) = src.as_ref().and_then(read) {
            return Some(s);
        }
        if !self.refreshing.swap(true, Ordering::AcqRel) {
            let (docker, id) = (self.docker.clone(), self.id.clone());
            let (cached, refreshing) = (self.cached.clone(), self.refreshing.clone());
            tokio::spawn(async move {
                if let Some(s) = engine_stats(&docker, &id).await {
                    *cached.lock() = Some(s);
                }
                refreshing.store(false, Ordering::Release);
            });
        }
        *self.cached.lock()
    }
}
