//! Several `cattery serve` nodes on one database (docs/cluster.md): [`start_cluster`], or
//! [`Cluster::new`] and [`Cluster::add_node`] to do something between two nodes' starts.

use std::time::Duration;

use super::{free_port, Server};

/// The cluster secret (`--cluster-secret-file`) every node of a [`Cluster`] reads.
pub const CLUSTER_SECRET: &str = "0123456789abcdef0123456789abcdef-test-cluster";

/// Nodes on one PostgreSQL database, sharing one secrets key and one cluster secret.
/// Dropping it drains and stops every node (each [`Server`]'s drop).
pub struct Cluster {
    /// The nodes, `n1`, `n2`, ... in that order.
    pub nodes: Vec<Server>,
    /// Holds the shared `--secrets-key-file` and `--cluster-secret-file`.
    pub key_dir: tempfile::TempDir,
    url: String,
    extra: Vec<String>,
}

impl Cluster {
    /// A cluster with no node yet on the database at `database_url`; every node will get
    /// `extra` flags after the shared ones.
    pub fn new(database_url: &str, extra: &[&str]) -> Cluster {
        let key_dir = tempfile::tempdir().unwrap();
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 ^ 0x5a);
        super::write_private(&key_dir.path().join("secrets.key"), &key);
        std::fs::write(
            key_dir.path().join("cluster.secret"),
            format!("{CLUSTER_SECRET}\n"),
        )
        .unwrap();
        Cluster {
            nodes: Vec::new(),
            key_dir,
            url: database_url.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The environment every node gets (the database URL).
    pub fn nodes_env(&self) -> Vec<(String, String)> {
        vec![("CATTERY_DATABASE_URL".into(), self.url.clone())]
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &Server {
        &self.nodes[i]
    }

    /// Starts the next node, `n<k>` (1-based), with its own data dir and port,
    /// `--advertise-url` its loopback address, the shared `--secrets-key-file` and
    /// `--cluster-secret-file`, and the cluster's extra flags. It has its own default-org keys
    /// (`sk`, `pk`), valid on all nodes since they live in the database.
    pub async fn add_node(&mut self) -> &Server {
        let port = free_port();
        let dir = self.key_dir.path();
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            format!("n{}", self.nodes.len() + 1),
            "--advertise-url".into(),
            format!("http://127.0.0.1:{port}"),
            "--secrets-key-file".into(),
            dir.join("secrets.key").display().to_string(),
            "--cluster-secret-file".into(),
            dir.join("cluster.secret").display().to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        let mut s = Server {
            child: None,
            port,
            base: format!("http://127.0.0.1:{port}"),
            sk: String::new(),
            pk: String::new(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(32)
                // Never reuse a connection idle for the server's keep-alive timeout (10 s): the
                // server may close it as the request goes out (a reset, not a retry).
                .pool_idle_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            args,
            tag: uuid::Uuid::new_v4().to_string(),
            env: self.nodes_env(),
            nofile: None,
            inherited_fd: None,
            dir: tempfile::tempdir().unwrap(),
        };
        s.spawn().await;
        s.sk = s.key("private", "default");
        s.pk = s.key("public", "default");
        self.nodes.push(s);
        self.nodes.last().unwrap()
    }
}

/// Starts `n` nodes (`n1..`, see [`Cluster::add_node`]) on the database at `database_url`,
/// one after the other, each with `extra` flags.
pub async fn start_cluster(n: usize, database_url: &str, extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(database_url, extra);
    for _ in 0..n {
        c.add_node().await;
    }
    c
}
