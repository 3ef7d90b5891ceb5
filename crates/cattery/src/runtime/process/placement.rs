//! Where a process instance lives: the process runtime's own placement record.

/// Where a process instance lives, stored as [`crate::model::InstanceRecord::placement`] (its
/// JSON form, opaque to the engine and the store) and read back by
/// [`super::ProcessRuntime`]'s `adopt` after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcessPlacement {
    /// Main pid.
    pub pid: i32,
    /// Main process start time (clock ticks since boot).
    pub pid_start: u64,
    /// Port.
    pub port: u16,
    /// cgroup v2 directory.
    pub cgroup: Option<String>,
    /// Instance directory.
    pub dir: String,
}
