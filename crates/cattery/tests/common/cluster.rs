//! Several `cattery serve` nodes on one database (docs/cluster.md): [`start_cluster`].

use std::time::Duration;

use super::{free_port, Server};

/// Nodes on one PostgreSQL database, sharing one secrets key. Dropping it drains and stops
/// every node (each [`Server`]'s drop).
pub struct Cluster {
    /// The nodes, `node-1`, `node-2`, ... in that order.
    pub nodes: Vec<Server>,
    /// Holds the shared `--secrets-key-file`.
    pub key_dir: tempfile::TempDir,
}

impl Cluster {
    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &Server {
        &self.nodes[i]
    }
}

/// Starts `n` nodes on the database at `database_url`, one after the other, each with its own
/// data dir and port, `--node-id node-<i>` (1-based), `--advertise-url` its loopback address,
/// one shared `--secrets-key-file`, and `extra` flags. Every node has its own default-org
/// keys (`sk`, `pk`), valid on all nodes since they live in the database.
pub async fn start_cluster(n: usize, database_url: &str, extra: &[&str]) -> Cluster {
    let key_dir = tempfile::tempdir().unwrap();
    let keyfile = key_dir.path().join("secrets.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&keyfile)
            .unwrap();
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 ^ 0x5a);
        std::io::Write::write_all(&mut f, &key).unwrap();
    }
    let mut nodes = Vec::with_capacity(n);
    for i in 1..=n {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            format!("node-{i}"),
            "--advertise-url".into(),
            format!("http://127.0.0.1:{port}"),
            "--secrets-key-file".into(),
            keyfile.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Server {
            child: None,
            port,
            base: format!("http://127.0.0.1:{port}"),
            sk: String::new(),
            pk: String::new(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(32)
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            args,
            tag: uuid::Uuid::new_v4().to_string(),
            env: vec![("CATTERY_DATABASE_URL".into(), database_url.into())],
            nofile: None,
            dir: tempfile::tempdir().unwrap(),
        };
        s.spawn().await;
        s.sk = s.key("private", "default");
        s.pk = s.key("public", "default");
        nodes.push(s);
    }
    Cluster { nodes, key_dir }
}
