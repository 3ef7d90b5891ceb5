//! One server, two runtimes: image agents run in containers ([`docker`](super::docker)),
//! `local:` and `command` agents as local processes ([`process`](super::process)). The engine
//! sees one [`Runtime`]; this one picks per deployment, per started spec and per record.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::docker::{runs_in_container, IMAGE_PROGRAM_PREFIX};
use super::{
    Adopted, Instance, InstanceSpec, LogSink, Prepared, Runtime, RuntimeError, RuntimeKind,
};
use crate::model::{DeploymentRecord, InstanceRecord};

/// Dispatches to the process or the Docker runtime.
pub struct MultiRuntime {
    process: Arc<dyn Runtime>,
    docker: Arc<dyn Runtime>,
}

impl MultiRuntime {
    /// Combines a process runtime and a container runtime.
    pub fn new(process: Arc<dyn Runtime>, docker: Arc<dyn Runtime>) -> Self {
        MultiRuntime { process, docker }
    }

    fn for_deployment(&self, dep: &DeploymentRecord) -> &Arc<dyn Runtime> {
        if runs_in_container(dep) {
            &self.docker
        } else {
            &self.process
        }
    }

    /// Whether a record's placement is a container's (process placements have a `pid`).
    fn is_container(rec: &InstanceRecord) -> bool {
        rec.runtime == RuntimeKind::Docker.as_str() || rec.placement.get("container_id").is_some()
    }
}

#[async_trait]
impl Runtime for MultiRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Auto
    }

    fn prepare(&self, dep: &DeploymentRecord) -> Result<Prepared, String> {
        self.for_deployment(dep).prepare(dep)
    }

    fn validate(&self, dep: &DeploymentRecord) -> Option<String> {
        self.for_deployment(dep).validate(dep)
    }

    fn deploy_error_may_clear(&self, dep: &DeploymentRecord) -> bool {
        self.for_deployment(dep).deploy_error_may_clear(dep)
    }

    async fn start(
        &self,
        spec: InstanceSpec,
        logs: LogSink,
    ) -> Result<Arc<dyn Instance>, RuntimeError> {
        if spec.program.starts_with(IMAGE_PROGRAM_PREFIX) {
            self.docker.start(spec, logs).await
        } else {
            self.process.start(spec, logs).await
        }
    }

    /// Hands the record to the runtime that made it, with its own kind as `runtime`.
    fn adoptable_by_any_node(&self, rec: &InstanceRecord) -> bool {
        Self::is_container(rec)
    }

    async fn adopt(&self, rec: &InstanceRecord, logs: LogSink) -> Adopted {
        let (rt, kind) = if Self::is_container(rec) {
            (&self.docker, RuntimeKind::Docker)
        } else {
            (&self.process, RuntimeKind::Process)
        };
        let mut own = rec.clone();
        own.runtime = kind.as_str().to_string();
        rt.adopt(&own, logs).await
    }

    async fn sweep(&self, keep: &HashSet<Uuid>) {
        self.process.sweep(keep).await;
        self.docker.sweep(keep).await;
    }

    fn fork_server(&self, agent: Uuid) -> Option<crate::runtime::ForkServerStatus> {
        self.process.fork_server(agent)
    }

    /// The process runtime's: only its instances see the host's files.
    fn as_instance(&self, f: &mut (dyn FnMut() + Send)) -> Result<(), String> {
        self.process.as_instance(f)
    }

    fn instance_uids(&self) -> Option<Arc<crate::runtime::process::uids::UidPool>> {
        self.process.instance_uids()
    }

    fn instance_namespaces(&self) -> Option<Arc<crate::runtime::process::namespace::Namespaces>> {
        self.process.instance_namespaces()
    }

    fn instance_cgroups(&self) -> Option<Arc<crate::runtime::process::cgroup::CgroupSupport>> {
        self.process.instance_cgroups()
    }

    fn isolation(&self) -> String {
        format!(
            "processes: {}; containers: {}",
            self.process.isolation(),
            self.docker.isolation()
        )
    }

    async fn shutdown(&self) {
        self.process.shutdown().await;
        self.docker.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeploymentSpec;

    fn dep(image: Option<&str>, command: Option<Vec<String>>) -> DeploymentRecord {
        DeploymentRecord {
            id: Uuid::new_v4(),
            agent_id: Uuid::new_v4(),
            spec: DeploymentSpec {
                image: image.map(str::to_string),
                command,
                ..Default::default()
            },
            created_ms: 0,
        }
    }

    #[test]
    fn images_go_to_containers_local_dirs_and_commands_to_processes() {
        assert!(runs_in_container(&dep(Some("org/bot:0.3"), None)));
        assert!(!runs_in_container(&dep(Some("local:/srv/bot"), None)));
        assert!(!runs_in_container(&dep(
            Some("org/bot:0.3"),
            Some(vec!["/bin/agent".into()])
        )));
        assert!(!runs_in_container(&dep(
            None,
            Some(vec!["/bin/agent".into()])
        )));
    }

    #[test]
    fn records_go_back_to_the_runtime_that_made_them() {
        let rec = |runtime: &str, placement: serde_json::Value| InstanceRecord {
            id: Uuid::new_v4(),
            agent_id: Uuid::new_v4(),
            deployment_id: Uuid::new_v4(),
            session_id: None,
            runtime: runtime.into(),
            placement,
            created_ms: 0,
            node_id: String::new(),
        };
        let container = serde_json::json!({"container_id": "abc", "name": "n", "port": 1,
                                           "image_id": "sha256:0", "created_ms": 0});
        let process =
            serde_json::json!({"pid": 1, "pid_start": 2, "port": 3, "cgroup": null, "dir": "/x"});
        assert!(MultiRuntime::is_container(&rec("auto", container)));
        assert!(MultiRuntime::is_container(&rec(
            "docker",
            serde_json::json!({})
        )));
        assert!(!MultiRuntime::is_container(&rec("auto", process.clone())));
        assert!(!MultiRuntime::is_container(&rec("process", process)));
    }
}
