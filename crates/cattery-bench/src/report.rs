//! The report: figures (distributions), scalars (single values), scaling rows and errors,
//! printed as a table and written as JSON.

use serde::Serialize;

use crate::stats::Summary;
use crate::sys::Machine;

/// A target a figure or scalar is held to.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Which statistic is compared (`p50`, `p99`, `value`).
    pub stat: &'static str,
    /// `le` (at most) or `ge` (at least).
    pub op: &'static str,
    /// Bound, in the figure's unit.
    pub bound: f64,
}

impl Target {
    /// At most `bound`.
    pub fn le(stat: &'static str, bound: f64) -> Self {
        Target {
            stat,
            op: "le",
            bound,
        }
    }
    /// At least `bound`.
    pub fn ge(stat: &'static str, bound: f64) -> Self {
        Target {
            stat,
            op: "ge",
            bound,
        }
    }
    fn met(&self, v: f64) -> bool {
        match self.op {
            "le" => v <= self.bound,
            _ => v >= self.bound,
        }
    }
    fn show(&self) -> String {
        let op = if self.op == "le" { "<=" } else { ">=" };
        format!("{} {op} {}", self.stat, fmt_num(self.bound))
    }
}

/// A distribution over runs.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key (`warm_start_c8`).
    pub key: String,
    /// Group (`floor`, `warm start`...).
    pub group: String,
    /// Human label.
    pub label: String,
    /// Unit of every number (`ms`).
    pub unit: &'static str,
    /// The summary; `None` when no run succeeded.
    pub summary: Option<Summary>,
    /// Key of the floor figure this one is compared to, and the p50 ratio.
    pub floor: Option<String>,
    /// p50 of this figure divided by p50 of the floor.
    pub ratio_p50: Option<f64>,
    /// Targets and whether each was met.
    pub targets: Vec<(Target, Option<bool>)>,
    /// Notes (method, exclusions).
    pub note: Option<String>,
}

/// A single value.
#[derive(Debug, Clone, Serialize)]
pub struct Scalar {
    /// Stable key.
    pub key: String,
    /// Group.
    pub group: String,
    /// Human label.
    pub label: String,
    /// Value.
    pub value: f64,
    /// Unit.
    pub unit: &'static str,
    /// Target and whether it was met.
    pub target: Option<(Target, bool)>,
    /// Notes.
    pub note: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `full`, `quick`, or `soak`.
    pub mode: String,
    /// Start of the run (RFC 3339, UTC).
    pub started_at: String,
    /// Wall time of the run, seconds.
    pub duration_s: f64,
    /// Whether the binaries were built with optimisations (release).
    pub release_build: bool,
    /// `git describe`-like commit of the tree, when known.
    pub commit: Option<String>,
    /// The machine.
    pub machine: Machine,
    /// Load averages (1, 5, 15 min) when the run started.
    pub load_start: [f64; 3],
    /// Load averages (1, 5, 15 min) when the run ended.
    pub load_end: [f64; 3],
    /// Average busy CPUs of the whole machine during the run (every process, ours included).
    pub machine_busy_cores: f64,
    #[serde(skip)]
    ticks_start: (u64, u64),
    /// Distributions.
    pub figures: Vec<Figure>,
    /// Single values.
    pub scalars: Vec<Scalar>,
    /// Free-form tables (`concurrency_scaling`, `api_scaling`...), each a list of rows.
    pub tables: serde_json::Map<String, serde_json::Value>,
    /// Errors: anything that is not a timing (5xx, leaks, lost records, failures).
    pub errors: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new(mode: &str, machine: Machine) -> Self {
        Report {
            mode: mode.into(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            duration_s: 0.0,
            release_build: !cfg!(debug_assertions),
            commit: git_commit(),
            machine,
            load_start: crate::sys::loadavg(),
            load_end: [f64::NAN; 3],
            machine_busy_cores: f64::NAN,
            ticks_start: crate::sys::system_ticks(),
            figures: Vec::new(),
            scalars: Vec::new(),
            tables: serde_json::Map::new(),
            errors: Vec::new(),
        }
    }

    /// Adds a figure; returns it for targets and floors.
    pub fn figure(
        &mut self,
        key: &str,
        group: &str,
        label: &str,
        summary: Option<Summary>,
    ) -> &mut Figure {
        self.figures.push(Figure {
            key: key.into(),
            group: group.into(),
            label: label.into(),
            unit: "ms",
            summary,
            floor: None,
            ratio_p50: None,
            targets: Vec::new(),
            note: None,
        });
        self.figures.last_mut().expect("just pushed")
    }

    /// Adds a scalar.
    #[allow(clippy::too_many_arguments)]
    pub fn scalar(
        &mut self,
        key: &str,
        group: &str,
        label: &str,
        value: f64,
        unit: &'static str,
        target: Option<Target>,
        note: Option<String>,
    ) {
        let target = target.map(|t| {
            let met = t.met(value);
            (t, met)
        });
        self.scalars.push(Scalar {
            key: key.into(),
            group: group.into(),
            label: label.into(),
            value,
            unit,
            target,
            note,
        });
    }

    /// Records an error (makes the run fail).
    pub fn error(&mut self, e: impl Into<String>) {
        let e = e.into();
        eprintln!("[bench] ERROR: {e}");
        self.errors.push(e);
    }

    /// Fills every figure's floor ratio and target verdicts, and the machine's load.
    pub fn finish(&mut self) {
        self.load_end = crate::sys::loadavg();
        let (b1, t1) = crate::sys::system_ticks();
        let (b0, t0) = self.ticks_start;
        if t1 > t0 {
            self.machine_busy_cores =
                (b1 - b0) as f64 / (t1 - t0) as f64 * self.machine.cpus as f64;
        }
        let floors: Vec<(String, f64)> = self
            .figures
            .iter()
            .filter_map(|f| f.summary.map(|s| (f.key.clone(), s.p50)))
            .collect();
        for f in &mut self.figures {
            if let (Some(fl), Some(s)) = (&f.floor, f.summary) {
                f.ratio_p50 = floors
                    .iter()
                    .find(|(k, _)| k == fl)
                    .filter(|(_, v)| *v > 0.0)
                    .map(|(_, v)| s.p50 / v);
            }
            for (t, met) in &mut f.targets {
                *met = f.summary.map(|s| {
                    let v = match t.stat {
                        "p99" => s.p99,
                        "max" => s.max,
                        "min" => s.min,
                        _ => s.p50,
                    };
                    t.met(v)
                });
            }
        }
    }

    /// The table as text.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Cattery bench ({} run, {} build) on {} x {} ({} MiB, {} {}), {}; took {:.0} s\n",
            self.mode,
            if self.release_build {
                "release"
            } else {
                "DEBUG"
            },
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.mem_total_mib,
            self.machine.os,
            self.machine.kernel,
            self.started_at,
            self.duration_s
        ));
        out.push_str(&format!(
            "load average {:.2} at start, {:.2} at end; the machine was busy {:.2} of {} cores on average (all processes)\n\n",
            self.load_start[0], self.load_end[0], self.machine_busy_cores, self.machine.cpus
        ));
        out.push_str(&format!(
            "{:<52} {:>6} {:>9} {:>9} {:>9} {:>9}  {:>9}  {}\n",
            "figure (ms)", "runs", "min", "p50", "p99", "max", "x floor", "target"
        ));
        let mut group = "";
        for f in &self.figures {
            if f.group != group {
                group = &f.group;
                out.push_str(&format!("-- {group}\n"));
            }
            let (runs, min, p50, p99, max) = match f.summary {
                Some(s) => (
                    s.runs.to_string(),
                    fmt_num(s.min),
                    fmt_num(s.p50),
                    fmt_num(s.p99),
                    fmt_num(s.max),
                ),
                None => ("0".into(), "-".into(), "-".into(), "-".into(), "-".into()),
            };
            let ratio = f.ratio_p50.map(|r| format!("{r:.1}x")).unwrap_or_default();
            let targets = f
                .targets
                .iter()
                .map(|(t, met)| {
                    format!(
                        "{} {}",
                        t.show(),
                        match met {
                            Some(true) => "MET",
                            Some(false) => "MISSED",
                            None => "n/a",
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "{:<52} {:>6} {:>9} {:>9} {:>9} {:>9}  {:>9}  {}\n",
                f.label, runs, min, p50, p99, max, ratio, targets
            ));
        }
        if !self.scalars.is_empty() {
            out.push_str(&format!(
                "\n{:<60} {:>12} {:<10} {}\n",
                "value", "", "unit", "target"
            ));
            let mut group = "";
            for s in &self.scalars {
                if s.group != group {
                    group = &s.group;
                    out.push_str(&format!("-- {group}\n"));
                }
                let t = s
                    .target
                    .as_ref()
                    .map(|(t, met)| format!("{} {}", t.show(), if *met { "MET" } else { "MISSED" }))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "{:<60} {:>12} {:<10} {}\n",
                    s.label,
                    fmt_num(s.value),
                    s.unit,
                    t
                ));
            }
        }
        for (name, rows) in &self.tables {
            out.push_str(&format!("\n{name}:\n"));
            if let Some(rows) = rows.as_array() {
                out.push_str(&render_rows(rows));
            }
        }
        out.push_str(&format!(
            "\nerrors: {}\n",
            if self.errors.is_empty() {
                "none".to_string()
            } else {
                self.errors.join("; ")
            }
        ));
        out
    }
}

/// Renders JSON object rows as an aligned text table (columns from the first row).
fn render_rows(rows: &[serde_json::Value]) -> String {
    let Some(first) = rows.first().and_then(|r| r.as_object()) else {
        return String::new();
    };
    let cols: Vec<&String> = first.keys().collect();
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::Number(n) => n.as_f64().map(fmt_num).unwrap_or_default(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for r in rows {
        for (i, c) in cols.iter().enumerate() {
            widths[i] = widths[i].max(cell(&r[c.as_str()]).len());
        }
    }
    let mut out = String::new();
    let line = |vals: Vec<String>| {
        vals.iter()
            .enumerate()
            .map(|(i, v)| format!("{:>w$}", v, w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    out.push_str(&line(cols.iter().map(|c| c.to_string()).collect()));
    out.push('\n');
    for r in rows {
        out.push_str(&line(cols.iter().map(|c| cell(&r[c.as_str()])).collect()));
        out.push('\n');
    }
    out
}

/// A number with about three significant digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn git_commit() -> Option<String> {
    let dir = std::env::current_exe().ok()?;
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(dir.parent()?)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}
