//! The server's own log ([`init_log`]) and its Prometheus metrics.
//!
//! Metrics: every series Cattery exports, recorded through the `metrics` facade and
//! rendered by `metrics-exporter-prometheus` at `GET /metrics` (`api::metrics`).
//!
//! Counters and histograms are recorded where things happen (the session engine, the store,
//! the log writer) through the functions below, so each series' name and labels live here
//! alone. Gauges of the engine's state (pools, instances, live sessions) are read from a
//! snapshot of the engine at each scrape ([`Metrics::render`]), never kept up to date on the
//! side.
//!
//! Label cardinality is bounded: labels are an org and an agent name (the operator's own
//! agents), a state, an end reason, a store operation; never a session, instance or
//! deployment id.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;

/// `cattery_build_info{version, commit}`: always 1 (`commit` is `unknown` for a build from a
/// source tarball).
pub const BUILD_INFO: &str = "cattery_build_info";
/// Sessions delivered to their instance, by org, agent and `cold` (`true` for a cold start).
pub const SESSIONS_STARTED: &str = "cattery_sessions_started_total";
/// Sessions whose end was recorded, by org, agent and `reason` (the session's `endReason`).
pub const SESSIONS_ENDED: &str = "cattery_sessions_ended_total";
/// Live sessions (promised to or served by an instance), by org and agent.
pub const SESSIONS_ACTIVE: &str = "cattery_sessions_active";
/// Start requests answered 429 because the agent was at `maxAgents`, by org and agent.
pub const SESSIONS_AT_CAPACITY: &str = "cattery_sessions_at_capacity_total";
/// Seconds from a start request to the session's delivery, by org, agent and `cold`.
pub const START_SECONDS: &str = "cattery_session_start_seconds";
/// Seconds a stop (`DELETE` of a session) took, until the instance was gone and the end
/// recorded, by org and agent.
pub const STOP_SECONDS: &str = "cattery_session_stop_seconds";
/// An agent's warm pool, by org, agent and `state` (`idle`, `starting`, `busy`).
pub const POOL_INSTANCES: &str = "cattery_pool_instances";
/// An agent's `minAgents`, by org and agent.
pub const POOL_MIN: &str = "cattery_pool_min_agents";
/// An agent's `maxAgents`, by org and agent.
pub const POOL_MAX: &str = "cattery_pool_max_agents";
/// Every instance not yet gone, by `state` (`starting`, `claimed`, `idle`, `busy`, `ending`).
pub const INSTANCES: &str = "cattery_instances";
/// Seconds a store operation took as its caller saw it, by `op`.
pub const STORE_SECONDS: &str = "cattery_store_operation_seconds";
/// Captured log lines that could not be stored (the store refused their batch).
pub const LOG_LINES_DROPPED: &str = "cattery_log_lines_dropped_total";

/// Instance states, as the `state` label of [`INSTANCES`].
pub const INSTANCE_STATES: [&str; 5] = ["starting", "claimed", "idle", "busy", "ending"];

const START_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const STOP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const STORE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The process's recorder handle: installed as the global `metrics` recorder on first use.
/// One per process (in-process tests share it: they look at their own agents' series).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(START_SECONDS.into()), START_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(STOP_SECONDS.into()), STOP_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(STORE_SECONDS.into()), STORE_BUCKETS)
            })
            .expect("static, non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        BUILD_INFO,
        "Cattery's version and the commit it was built from (always 1)"
    );
    describe_counter!(SESSIONS_STARTED, "Sessions delivered to their instance");
    describe_counter!(SESSIONS_ENDED, "Sessions ended, by endReason");
    describe_gauge!(SESSIONS_ACTIVE, "Live sessions");
    describe_counter!(
        SESSIONS_AT_CAPACITY,
        "Start requests answered 429 (agent at maxAgents)"
    );
    describe_histogram!(
        START_SECONDS,
        Unit::Seconds,
        "Time from a start request to the session's delivery"
    );
    describe_histogram!(
        STOP_SECONDS,
        Unit::Seconds,
        "Time a session stop took, until its instance was gone and its end recorded"
    );
    describe_gauge!(POOL_INSTANCES, "An agent's instances by pool state");
    describe_gauge!(POOL_MIN, "An agent's minAgents");
    describe_gauge!(POOL_MAX, "An agent's maxAgents");
    describe_gauge!(INSTANCES, "Instances not yet gone, by state");
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Store operation latency as the caller saw it"
    );
    describe_counter!(LOG_LINES_DROPPED, "Captured log lines the store refused");
}

/// The log filter when `CATTERY_LOG` is unset: `info`, but PostgreSQL's notices only from
/// `WARNING` up (the NOTICE "relation \"_sqlx_migrations\" already exists, skipping" came at
/// every start on PostgreSQL).
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// Installs the server's log on stderr, filtered by `CATTERY_LOG` (default [`DEFAULT_LOG_FILTER`]), as text
/// or as one JSON object per line (tracing's JSON formatter, with the current span's fields:
/// the request id of the request a line was logged for, see `api::trace`).
pub fn init_log(format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CATTERY_LOG")
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log that cannot be written (its disk is full) must not panic the task that logged
        // (`eprintln!` of the write error does).
        .log_internal_errors(false);
    match format {
        crate::config::LogFormat::Text => b
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        crate::config::LogFormat::Json => b
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// A session was delivered `took` after its start request.
pub fn session_started(org: &str, agent: &str, cold: bool, took: Duration) {
    let labels = [
        ("org", org.to_string()),
        ("agent", agent.to_string()),
        ("cold", cold.to_string()),
    ];
    counter!(SESSIONS_STARTED, &labels).increment(1);
    histogram!(START_SECONDS, &labels).record(took.as_secs_f64());
}

/// A session's end was recorded with `reason` (its `endReason`).
pub fn session_ended(org: &str, agent: &str, reason: &'static str) {
    counter!(SESSIONS_ENDED, "org" => org.to_string(), "agent" => agent.to_string(), "reason" => reason)
        .increment(1);
}

/// A start was answered 429: the agent is at `maxAgents`.
pub fn session_at_capacity(org: &str, agent: &str) {
    counter!(SESSIONS_AT_CAPACITY, "org" => org.to_string(), "agent" => agent.to_string())
        .increment(1);
}

/// A stop took `took`.
pub fn session_stopped(org: &str, agent: &str, took: Duration) {
    histogram!(STOP_SECONDS, "org" => org.to_string(), "agent" => agent.to_string())
        .record(took.as_secs_f64());
}

/// A store operation of kind `op` took `took`.
pub fn store_op(op: &'static str, took: Duration) {
    histogram!(STORE_SECONDS, "op" => op).record(took.as_secs_f64());
}

/// `n` captured log lines could not be stored.
pub fn log_lines_dropped(n: usize) {
    counter!(LOG_LINES_DROPPED).increment(n as u64);
}

/// One agent's pool at a scrape.
#[derive(Debug, Clone, Default)]
pub struct PoolGauges {
    /// Org.
    pub org: String,
    /// Agent name.
    pub agent: String,
    /// Ready idle instances of the current deployment.
    pub idle: u32,
    /// Starting instances of the current deployment (claimed or not).
    pub starting: u32,
    /// Busy instances.
    pub busy: u32,
    /// Live sessions.
    pub active_sessions: u32,
    /// `minAgents`.
    pub min_agents: u32,
    /// `maxAgents`.
    pub max_agents: u32,
}

/// The engine's state at a scrape.
#[derive(Debug, Clone, Default)]
pub struct EngineGauges {
    /// Every agent with a pool.
    pub pools: Vec<PoolGauges>,
    /// Instances by state, in the order of [`INSTANCE_STATES`].
    pub instances: [u32; 5],
}

/// The `/metrics` endpoint's state: the handle, the optional token, and the agents seen at
/// earlier scrapes (an agent that is gone has its gauges set to 0 rather than left at their
/// last value).
pub struct Metrics {
    handle: &'static PrometheusHandle,
    /// Bearer token `/metrics` requires (`--metrics-token`); `None`: open.
    pub token: Option<String>,
    seen: Mutex<HashSet<(String, String)>>,
}

impl Metrics {
    /// The endpoint's state over the process's recorder (installed now if not yet).
    pub fn new(token: Option<String>) -> Metrics {
        let handle = handle();
        gauge!(
            BUILD_INFO,
            "version" => crate::build_info::VERSION,
            "commit" => crate::build_info::COMMIT.unwrap_or("unknown")
        )
        .set(1.0);
        Metrics {
            handle,
            token: token.filter(|t| !t.is_empty()),
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Sets the engine's gauges from `g`, then renders every series in the Prometheus text
    /// exposition format.
    pub fn render(&self, g: &EngineGauges) -> String {
        let mut seen = self.seen.lock();
        let mut now = HashSet::with_capacity(g.pools.len());
        for p in &g.pools {
            set_pool(p);
            now.insert((p.org.clone(), p.agent.clone()));
        }
        for (org, agent) in seen.difference(&now) {
            set_pool(&PoolGauges {
                org: org.clone(),
                agent: agent.clone(),
                ..Default::default()
            });
        }
        *seen = now;
        drop(seen);
        for (state, n) in INSTANCE_STATES.iter().zip(g.instances) {
            gauge!(INSTANCES, "state" => *state).set(f64::from(n));
        }
        self.handle.run_upkeep();
        self.handle.render()
    }
}

fn set_pool(p: &PoolGauges) {
    let (org, agent) = (p.org.clone(), p.agent.clone());
    for (state, n) in [("idle", p.idle), ("starting", p.starting), ("busy", p.busy)] {
        gauge!(POOL_INSTANCES, "org" => org.clone(), "agent" => agent.clone(), "state" => state)
            .set(f64::from(n));
    }
    gauge!(SESSIONS_ACTIVE, "org" => org.clone(), "agent" => agent.clone())
        .set(f64::from(p.active_sessions));
    gauge!(POOL_MIN, "org" => org.clone(), "agent" => agent.clone()).set(f64::from(p.min_agents));
    gauge!(POOL_MAX, "org" => org, "agent" => agent).set(f64::from(p.max_agents));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histograms_with_buckets_and_zeroes_gone_agents() {
        let m = Metrics::new(None);
        session_started("t-org", "t-render", true, Duration::from_millis(30));
        let mut g = EngineGauges::default();
        g.pools.push(PoolGauges {
            org: "t-org".into(),
            agent: "t-render".into(),
            idle: 2,
            max_agents: 5,
            ..Default::default()
        });
        let text = m.render(&g);
        assert!(
            text.contains("cattery_session_start_seconds_bucket{"),
            "{text}"
        );
        assert!(
            text.contains(r#"cattery_pool_instances{org="t-org",agent="t-render",state="idle"} 2"#),
            "{text}"
        );
        let info = format!(
            r#"cattery_build_info{{version="{}",commit="{}"}} 1"#,
            crate::build_info::VERSION,
            crate::build_info::COMMIT.unwrap_or("unknown")
        );
        assert!(text.contains(&info), "{text}");
        let text = m.render(&EngineGauges::default());
        assert!(
            text.contains(r#"cattery_pool_instances{org="t-org",agent="t-render",state="idle"} 0"#),
            "{text}"
        );
    }
}

#[cfg(test)]
mod log_filter_tests {
    use super::DEFAULT_LOG_FILTER;
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    /// The default filter keeps the server's INFO lines and PostgreSQL's warnings, but not
    /// its notices.
    #[test]
    fn the_default_filter_drops_postgres_notices_only() {
        let sub = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
        tracing::subscriber::with_default(sub, || {
            assert!(tracing::enabled!(target: "cattery::serve", Level::INFO));
            assert!(!tracing::enabled!(target: "sqlx::postgres::notice", Level::INFO));
            assert!(tracing::enabled!(target: "sqlx::postgres::notice", Level::WARN));
        });
    }
}
