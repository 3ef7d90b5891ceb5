//! Nodes (docs/cluster.md): every `cattery serve` is a node with an id and, optionally, an
//! address other nodes can reach. It heartbeats in the store; `GET /v1/cluster/nodes` lists
//! the nodes with their heartbeat age and instance counts.
//!
//! Ownership: every session and instance records the node that owns it. A stop of another
//! node's session is forwarded to it ([`HttpPeers`], authenticated with the cluster secret);
//! a node whose heartbeat is older than the node timeout is taken over by a live one
//! ([`spawn_watch`], `Supervisor::take_over`).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::model::now_ms;
use crate::store::{NodeRecord, Store};

/// This node: what it reports in its heartbeats.
#[derive(custom_debug::Debug, Clone)]
pub struct NodeIdentity {
    /// Node id.
    pub id: String,
    /// Where other nodes reach it.
    pub advertise_url: Option<String>,
    /// When this run started (ms).
    pub started_ms: i64,
    /// A node whose last heartbeat is older than this is dead.
    pub timeout: Duration,
    /// The cluster secret (`--cluster-secret-file`), if given.
    pub secret: Option<ClusterSecret>,
    /// What it writes in its heartbeat to show its secrets key
    /// (`SecretCipher::seal_check`), if anything.
    #[debug(with = crate::redact::hidden_some)]
    pub key_check: Option<Vec<u8>>,
}

/// The header that carries the cluster secret on calls between nodes.
pub const SECRET_HEADER: &str = "x-cattery-cluster-secret";

/// The header that names the calling node's run on calls between nodes: `<node id>
/// <started_ms>` ([`NodeIdentity::run`]). The called node checks it against its own store's
/// node list, so a node on another database (a restored copy) is refused even with the same
/// cluster secret. A call without it (a node of an earlier version, in a rolling upgrade) is
/// taken on the secret alone.
pub const NODE_HEADER: &str = "x-cattery-node";

/// The header that marks a start another node forwarded (with the cluster secret): the node
/// that gets it serves the start itself, warm or cold, and never forwards it again.
pub const FORWARDED_START_HEADER: &str = "x-cattery-forwarded-start";

/// The shared secret of a cluster's internal calls. Never printed (`Debug` hides it).
#[derive(Clone)]
pub struct ClusterSecret(Arc<str>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// Shortest secret accepted.
    pub const MIN_LEN: usize = 32;

    /// Reads the secret from `path` (surrounding whitespace ignored).
    ///
    /// Errors: unreadable file; shorter than [`ClusterSecret::MIN_LEN`]; not a valid HTTP
    /// header value (control characters).
    pub fn load_file(path: &std::path::Path) -> anyhow::Result<ClusterSecret> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read --cluster-secret-file {}: {e}", path.display())
        })?;
        Self::new(text.trim())
    }

    /// What this secret derives for node `id`, written in the node's heartbeat
    /// (`NodeRecord::secret_check`): SHA-256 over a fixed label, the id and the secret. Another
    /// node computes it with its own secret for that id: a different value means a different
    /// secret. The secret cannot be read back from it (at least 32 characters, and a hash).
    pub fn check_for(&self, id: &str) -> Vec<u8> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"cattery cluster secret check\0");
        h.update(id.as_bytes());
        h.update(b"\0");
        h.update(self.0.as_bytes());
        h.finalize().to_vec()
    }

    /// What this secret derives for the `org.cattery.cluster` label of the containers a node
    /// makes (`runtime::docker`): a node adopts another node's container only when its own
    /// secret derives the same value, so a node of another cluster on the same engine (one
    /// started on a restored copy of the database, with its own secret) never takes over a
    /// live cluster's containers. A hash: the secret cannot be read back from it.
    pub fn container_label(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"cattery container cluster\0");
        h.update(self.0.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// A secret from its text. Errors as [`ClusterSecret::load_file`].
    pub fn new(text: &str) -> anyhow::Result<ClusterSecret> {
        if text.len() < Self::MIN_LEN {
            anyhow::bail!(
                "the cluster secret must be at least {} characters (e.g. `openssl rand -hex 32`)",
                Self::MIN_LEN
            );
        }
        if axum::http::HeaderValue::from_str(text).is_err() {
            anyhow::bail!(
                "the cluster secret must be printable text (e.g. `openssl rand -hex 32`)"
            );
        }
        Ok(ClusterSecret(text.into()))
    }

    /// The secret, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is the secret, in time independent of where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_bytes();
        if given.len() != want.len() {
            return false;
        }
        given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl NodeIdentity {
    /// This run of the node as [`NODE_HEADER`] names it: `<id> <started_ms>`.
    pub fn run(&self) -> String {
        format!("{} {}", self.id, self.started_ms)
    }

    /// How often the node heartbeats: a fifth of the timeout, at least every 100 ms.
    pub fn heartbeat_every(&self) -> Duration {
        (self.timeout / 5).max(Duration::from_millis(100))
    }

    /// Whether node `n` is alive at `now` (ms) as this node sees it: it has not left
    /// (heartbeat 0) and its last heartbeat is within the node timeout.
    pub fn sees_alive(&self, n: &NodeRecord, now: i64) -> bool {
        let timeout_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        n.heartbeat_ms != 0 && now.saturating_sub(n.heartbeat_ms) <= timeout_ms
    }

    /// The live nodes among `nodes` at `now` (ms), this one excepted.
    pub fn live_peers<'a>(
        &'a self,
        nodes: &'a [NodeRecord],
        now: i64,
    ) -> impl Iterator<Item = &'a NodeRecord> + 'a {
        nodes
            .iter()
            .filter(move |n| n.id != self.id && self.sees_alive(n, now))
    }

    /// The heartbeat record with the given instance counts.
    pub fn record(&self, instances: i64, busy: i64) -> NodeRecord {
        NodeRecord {
            id: self.id.clone(),
            advertise_url: self.advertise_url.clone(),
            version: crate::build_info::full().into(),
            started_ms: self.started_ms,
            heartbeat_ms: now_ms(),
            instances,
            busy,
            key_check: self.key_check.clone(),
            secret_check: self.secret.as_ref().map(|s| s.check_for(&self.id)),
        }
    }
}

/// One node in `GET /v1/cluster/nodes`.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Node id.
    pub id: String,
    /// Where other nodes reach it (`--advertise-url`), if given.
    pub advertise_url: Option<String>,
    /// Cattery version (Cargo's: nodes built from different commits may show the same).
    pub version: String,
    /// The commit its binary was built from (`cattery --version`); `null` when unknown (a
    /// binary built from a source tarball, or a node of a release before commits were shown).
    #[schema(example = "6e78597a1b2c")]
    pub commit: Option<String>,
    /// When its current run started (ms).
    pub started_ms: i64,
    /// Milliseconds since its last heartbeat (by this node's clock); `null` for a node that
    /// left.
    pub heartbeat_age_ms: Option<i64>,
    /// Whether its last heartbeat is within the node timeout.
    pub alive: bool,
    /// `alive`; `dead` (no heartbeat for the node timeout: lost, or stopped without a drain,
    /// such as `--on-stop detach`); or `left` (drained and stopped cleanly).
    #[schema(example = "alive")]
    pub state: &'static str,
    /// Live instances at its last heartbeat (a dead node's: what it had then, not what a
    /// takeover left of them).
    pub instances: i64,
    /// Of them, serving a session.
    pub busy: i64,
    /// Whether it is the node that answered.
    #[serde(rename = "self")]
    pub this: bool,
}

/// The nodes as seen from `me` at `now` (ms), by id.
pub fn statuses(me: &NodeIdentity, nodes: Vec<NodeRecord>, now: i64) -> Vec<NodeStatus> {
    nodes
        .into_iter()
        .map(|n| {
            let (version, commit) = crate::build_info::split(&n.version);
            let (version, commit) = (version.to_string(), commit.map(str::to_string));
            let age = now.saturating_sub(n.heartbeat_ms).max(0);
            let left = n.heartbeat_ms == 0;
            let alive = me.sees_alive(&n, now);
            NodeStatus {
                this: n.id == me.id,
                alive,
                state: match (left, alive) {
                    (true, _) => "left",
                    (false, true) => "alive",
                    (false, false) => "dead",
                },
                heartbeat_age_ms: (!left).then_some(age),
                id: n.id,
                advertise_url: n.advertise_url,
                version,
                commit,
                started_ms: n.started_ms,
                instances: n.instances,
                busy: n.busy,
            }
        })
        .collect()
}

/// The live nodes other than `me` among `nodes` at `now` (ms).
pub fn other_live_nodes(me: &NodeIdentity, nodes: Vec<NodeRecord>, now: i64) -> Vec<NodeStatus> {
    statuses(me, nodes, now)
        .into_iter()
        .filter(|n| n.alive && !n.this)
        .collect()
}

/// How a node connects to another: `http://` or `https://` advertise URLs (TLS with rustls,
/// trusting the system's root certificates, which `SSL_CERT_FILE` can replace), no delay,
/// at most 1 s to connect.
pub type PeerConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// How long a pooled connection to another node may sit idle before it is dropped: within
/// the peer's keep-alive timeout (its header-read timeout, 10 s by default), since a request
/// sent on a connection the peer is closing fails without a retry (a forwarded stop would
/// answer 502). Every client to other nodes (forwarded stops, the session proxy) uses it.
pub const PEER_POOL_IDLE: Duration = Duration::from_secs(5);

/// A [`PeerConnector`].
pub fn peer_connector() -> PeerConnector {
    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    c.enforce_http(false);
    crate::core::daily::tls_over(c)
}

/// An HTTP client's error with its causes, `outer: cause: cause`: hyper's own text alone
/// (`client error (SendRequest)`) does not say what happened (a refused connection, one closed
/// before the answer, a TLS failure).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// The other nodes over HTTP or HTTPS (their advertise URLs): a forwarded stop is
/// `POST {url}/internal/v1/sessions/{id}/stop` with the cluster secret in [`SECRET_HEADER`].
pub struct HttpPeers {
    secret: ClusterSecret,
    /// This node's run ([`NODE_HEADER`]), when it has one to name.
    run: Option<String>,
    http: hyper_util::client::legacy::Client<PeerConnector, http_body_util::Full<bytes::Bytes>>,
}

impl HttpPeers {
    /// Peers reached with `secret`, as the node run `run` ([`NodeIdentity::run`]; `None`
    /// sends no [`NODE_HEADER`], as a node of an earlier version does).
    pub fn new(secret: ClusterSecret, run: Option<String>) -> HttpPeers {
        HttpPeers {
            secret,
            run,
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(PEER_POOL_IDLE)
                .build(peer_connector()),
        }
    }
}

impl HttpPeers {
    fn stop_request(
        &self,
        url: &str,
        session: uuid::Uuid,
    ) -> Result<axum::http::Request<http_body_util::Full<bytes::Bytes>>, String> {
        let req = axum::http::Request::post(format!(
            "{}/internal/v1/sessions/{session}/stop",
            url.trim_end_matches('/')
        ))
        .header(SECRET_HEADER, self.secret.expose());
        match &self.run {
            Some(run) => req.header(NODE_HEADER, run.as_str()),
            None => req,
        }
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())
    }
}

/// Whether a request failed because its connection was closed before any answer came: the
/// peer closed it (hyper's incomplete message) or reset it. A connection that could not be
/// opened is not this: nothing was sent, and another attempt would meet the same refusal.
fn closed_before_answer(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionReset {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

#[async_trait::async_trait]
impl crate::core::session::Peers for HttpPeers {
    async fn stop(
        &self,
        url: &str,
        session: uuid::Uuid,
    ) -> Result<crate::core::session::PeerStop, String> {
        use crate::core::session::PeerStop;
        use http_body_util::BodyExt;
        let mut resent = false;
        let r = loop {
            match self.http.request(self.stop_request(url, session)?).await {
                Ok(r) => break r,
                // A pooled connection the peer closed as the request went out (its keep-alive
                // timeout ran out, or it was restarted): a stop is idempotent (a second one
                // answers the same), so it is sent once more, on a new connection.
                Err(e) if !resent && closed_before_answer(&e) => resent = true,
                Err(e) => return Err(error_chain(&e)),
            }
        };
        let status = r.status().as_u16();
        match status {
            200 => return Ok(PeerStop::Stopped),
            409 => return Ok(PeerStop::NotOwner),
            401 => return Ok(PeerStop::Refused),
            404 => return Ok(PeerStop::Unknown),
            _ => {}
        }
        let body = r
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        // Only the peer's own refusal of this node's run; a 403 from something in between (a
        // proxy, a firewall) is an error like any other, retried.
        let code = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_string));
        if status == 403 && code.as_deref() == Some("NODE_UNKNOWN") {
            return Ok(PeerStop::Stranger);
        }
        Err(format!("node at {url} answered {status}: {body}"))
    }
}

/// Watches the other nodes until the returned handle is aborted: every heartbeat interval,
/// each node whose last heartbeat is older than the timeout is taken over
/// (`Supervisor::take_over`; the store lets one node at a time do it). A dead node is tried
/// once per heartbeat it left (a node that is dead does not gain records). Nothing is taken
/// over while this node cannot read the node list, is fenced or drains, nor until a whole
/// timeout after it last could not read it ([`may_take_over`]).
pub fn spawn_watch(
    store: Arc<dyn Store>,
    sup: std::sync::Weak<crate::core::session::Supervisor>,
    me: NodeIdentity,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(me.heartbeat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout_ms = i64::try_from(me.timeout.as_millis()).unwrap_or(i64::MAX);
        let mut done: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        let mut healthy_since: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            let Some(sup) = sup.upgrade() else { break };
            let Ok(nodes) = store.list_nodes().await else {
                healthy_since = None;
                continue;
            };
            if sup.is_fenced() {
                healthy_since = None;
                continue;
            }
            // Takeovers a store error cut short: this node owns their records now.
            if let Err(e) = sup.finish_takeovers().await {
                tracing::warn!(error = %e, "could not finish a takeover; trying again");
            }
            let since = *healthy_since.get_or_insert_with(std::time::Instant::now);
            // A draining node takes nothing over: it would stop what it adopted at its drain's
            // end (a shared engine's containers included), or leave it to a later takeover.
            if !may_take_over(since, std::time::Instant::now(), me.timeout) || sup.is_draining() {
                continue;
            }
            let stale_ms = now_ms() - timeout_ms;
            for n in nodes {
                if n.id == me.id
                    || n.heartbeat_ms > stale_ms
                    || done.get(&n.id) == Some(&n.heartbeat_ms)
                {
                    continue;
                }
                match sup.take_over(&n.id, stale_ms).await {
                    Ok(_) => {
                        done.insert(n.id, n.heartbeat_ms);
                    }
                    Err(e) => {
                        tracing::warn!(node = %n.id, error = %e, "could not take over a dead node");
                    }
                }
            }
        }
    })
}

/// Whether a node that has reached the store and recorded its own heartbeats without a gap
/// since `since` may take over dead nodes at `now`: only after a whole node `timeout` of it.
/// After a database outage longer than the timeout every node's last heartbeat is stale, the
/// living ones' too, and each needs a heartbeat interval or two to record a new one; a node
/// still stale a whole timeout after this one got the store back is dead, one that is not
/// lives. Without this, the first node back took the others over and ended their live
/// sessions `lost`. A node that is really lost during an outage is taken over one timeout
/// later than otherwise.
pub fn may_take_over(
    since: std::time::Instant,
    now: std::time::Instant,
    timeout: Duration,
) -> bool {
    now.saturating_duration_since(since) >= timeout
}

/// Why this node may not start with its id: another live node (its heartbeat within the
/// node timeout) already uses it at another address. Two processes with one node id would
/// each take the other's records for their own (the second "re-adopts" the first's sessions,
/// and a stop forwarded to it kills the first's process). A restart of the same node (same
/// `--advertise-url`: two live processes cannot both serve one address) is not a conflict,
/// nor is a node that left (heartbeat 0). `None`: the id is free.
pub fn id_in_use(me: &NodeIdentity, nodes: &[NodeRecord], now: i64) -> Option<String> {
    let n = nodes.iter().find(|n| n.id == me.id)?;
    if !me.sees_alive(n, now) || n.advertise_url == me.advertise_url {
        return None;
    }
    let age = now.saturating_sub(n.heartbeat_ms);
    Some(format!(
        "node id {} is in use by a live node at {} (its last heartbeat {} ms ago); give every \
         node its own --node-id (or none: each data dir then has its own). If that was this \
         node with another --advertise-url, start it again once its last heartbeat is older \
         than the node timeout ({} s)",
        me.id,
        n.advertise_url
            .as_deref()
            .unwrap_or("an address it did not advertise"),
        age.max(0),
        me.timeout.as_secs_f64()
    ))
}

/// What this node lacks to be reached by the other live nodes among `nodes` (at `now`, ms):
/// without `--advertise-url` they cannot forward a stop or a proxied request for its sessions
/// to it, and without the cluster secret it forwards nothing and accepts no internal call, so
/// such calls answer 503 `NODE_UNREACHABLE` on every node but the owner. `None` when it lacks
/// nothing, or when no other node is alive (one node on PostgreSQL needs neither).
pub fn unreachable_by_peers(me: &NodeIdentity, nodes: &[NodeRecord], now: i64) -> Option<String> {
    let others = me.live_peers(nodes, now).count();
    let mut missing = Vec::new();
    if me.advertise_url.is_none() {
        missing.push("--advertise-url");
    }
    if me.secret.is_none() {
        missing.push("--cluster-secret-file");
    }
    if others == 0 || missing.is_empty() {
        return None;
    }
    Some(format!(
        "{others} other live node(s) share this database, but this node has no {}: a stop or \
         proxied request for one of its sessions that reaches another node answers 503 \
         NODE_UNREACHABLE instead of reaching it (docs/cluster.md)",
        missing.join(" and no ")
    ))
}

/// Why this node may not start with the secrets key of `cipher`: a live node among `nodes` (at
/// `now`, ms) sealed its heartbeat's key check with another key. Nodes on one database must
/// share one secrets key (`--secrets-key-file`): a value one seals, the others cannot open.
/// [`crate::core::secrets::check_key_opens_stored`] catches a key that differs from the one of
/// the secrets already stored; this catches one that differs from a live node's before any
/// secret is stored. `None`: no live node has another key.
pub fn secrets_key_differs(
    me: &NodeIdentity,
    nodes: &[NodeRecord],
    now: i64,
    cipher: &crate::core::secrets::SecretCipher,
) -> Option<String> {
    let other = me.live_peers(nodes, now).find(|n| {
        n.key_check
            .as_deref()
            .is_some_and(|c| !cipher.opens_check(c))
    })?;
    Some(format!(
        "this node's secrets key is not the one of live node {}: give every node the same \
         --secrets-key-file (a secret one node seals, the others cannot open)",
        other.id
    ))
}

/// A live node among `nodes` (at `now`, ms) whose heartbeat shows another cluster secret
/// than this node's ([`ClusterSecret::check_for`]), as the message this node refuses to start
/// with; `None` if there is none. Only a node with a secret has one to compare; a node that
/// shows none (no secret, or an earlier version) is not held against it.
pub fn cluster_secret_differs(me: &NodeIdentity, nodes: &[NodeRecord], now: i64) -> Option<String> {
    let mine = me.secret.as_ref()?;
    let other = me.live_peers(nodes, now).find(|n| {
        n.secret_check
            .as_deref()
            .is_some_and(|c| c != mine.check_for(&n.id).as_slice())
    })?;
    Some(format!(
        "live node {} has another cluster secret than this node: every node needs the same \
         --cluster-secret-file",
        other.id
    ))
}

/// Why this node must not join the live nodes among `nodes` (at `now`, ms): another secrets
/// key ([`secrets_key_differs`]) or another cluster secret ([`cluster_secret_differs`]), as
/// the message it refuses to start with. Checked before the first heartbeat and again after
/// it ([`announce`]).
pub fn refusal(
    me: &NodeIdentity,
    nodes: &[NodeRecord],
    now: i64,
    cipher: &crate::core::secrets::SecretCipher,
) -> Option<String> {
    secrets_key_differs(me, nodes, now, cipher).or_else(|| cluster_secret_differs(me, nodes, now))
}

/// Writes this node's first heartbeat (which shows its secrets key, `key_check`, and its
/// cluster secret, `secret_check`) and then reads the node list again: two nodes that start
/// together with different keys or secrets each saw no other when they checked
/// ([`secrets_key_differs`] and [`cluster_secret_differs`] on `before`, the list read then),
/// but each writes its heartbeat before this second read, so at least one of them sees the
/// other's here and refuses. A refused node takes its heartbeat back: the row it had in
/// `before` is written again (a restart within the timeout keeps its records), else the row
/// is removed.
///
/// Errors: a live node's key or secret is not this node's (the message of
/// [`secrets_key_differs`] or [`cluster_secret_differs`]); the store failed.
pub async fn announce(
    store: &dyn crate::store::Store,
    me: &NodeIdentity,
    cipher: &crate::core::secrets::SecretCipher,
    before: &[NodeRecord],
) -> anyhow::Result<()> {
    use anyhow::Context;
    store
        .heartbeat(&me.record(0, 0))
        .await
        .context("recording this node's first heartbeat")?;
    let nodes = store.list_nodes().await.context("reading the node list")?;
    let Some(why) = refusal(me, &nodes, now_ms(), cipher) else {
        return Ok(());
    };
    take_back(store, me, before).await;
    anyhow::bail!(why)
}

/// Takes back the heartbeat [`announce`] wrote, for a node that does not start after all:
/// its row as it was in `before` (a restart: the heartbeat ages and the node is taken over
/// in time), or none (a new node: no phantom live node is left behind).
pub async fn take_back(store: &dyn crate::store::Store, me: &NodeIdentity, before: &[NodeRecord]) {
    let undo = match before.iter().find(|n| n.id == me.id) {
        Some(prev) => store.heartbeat(prev).await.map(|()| None),
        None => store.forget_node(&me.id, i64::MAX).await.map(Some),
    };
    match undo {
        Ok(
            None | Some(crate::store::ForgetNode::Forgotten | crate::store::ForgetNode::Unknown),
        ) => {}
        Ok(Some(kept)) => tracing::warn!(node = %me.id, ?kept,
            "could not take back this node's heartbeat: it stays listed until it is older than \
             the node timeout, and then is taken over"),
        Err(e) => {
            tracing::warn!(error = %e, node = %me.id, "could not take back this node's heartbeat");
        }
    }
}

/// Checks this node's cluster secret with one live node among `nodes` (at `now`, ms) that has
/// an advertise URL, by an internal call every node answers: the stop of the nil session,
/// which no node has (404 once the secret is accepted). A node with another secret would
/// otherwise be found only at the first stop or proxied request forwarded to or from it.
/// Nothing to check without a secret or a live peer; a peer that does not answer within 2 s
/// is logged and not held against this node.
///
/// Called after this node's first heartbeat ([`announce`]), so that the peer finds this
/// node's run in its store when both use the same database.
///
/// Errors: the peer refused this node's secret (401), or does not know this node's run
/// (403: another database).
pub async fn check_secret_with_peers(
    me: &NodeIdentity,
    nodes: &[NodeRecord],
    now: i64,
) -> anyhow::Result<()> {
    use crate::core::session::PeerStop;
    let Some(secret) = &me.secret else {
        return Ok(());
    };
    let Some((peer, url)) = me
        .live_peers(nodes, now)
        .find_map(|n| Some((n.id.as_str(), n.advertise_url.as_deref()?)))
    else {
        return Ok(());
    };
    match probe(me, secret, url, Duration::from_secs(2)).await {
        Ok(Ok(PeerStop::Refused)) => anyhow::bail!(
            "live node {peer} at {url} refused this node's cluster secret: every node needs \
             the same --cluster-secret-file"
        ),
        Ok(Ok(PeerStop::Stranger)) => anyhow::bail!(
            "live node {peer} at {url} does not find this node in its database: the two use \
             different databases (this one's node list names another cluster's nodes, as a \
             restored copy of its database does); give this node a database of its own \
             cluster, or wait until those nodes' heartbeats are older than --node-timeout"
        ),
        // `Unknown`: the peer accepted the secret and has no nil session.
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(node = peer, error = %e, "could not check the cluster secret with another node");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(node = peer, %url, "could not check the cluster secret with another node: no answer within 2 s");
            Ok(())
        }
    }
}

/// Checks, once this node serves, that its own `--advertise-url` reaches a node of this
/// cluster, by the internal call the others make (the stop of the nil session, 404 once the
/// secret and this node's run are accepted). A URL that does not (a wrong port, `https://`
/// in front of a plain HTTP listener) would otherwise show only when another node forwards a
/// stop to it and retries until the stop's time is up: it is logged as an ERROR naming the
/// URL and what went wrong. Nothing to check without an advertise URL or a cluster secret.
/// Only on a shared database (`shared`): a node alone on SQLite has no peers.
pub fn spawn_advertise_check(me: &NodeIdentity, shared: bool) {
    if shared {
        let me = me.clone();
        tokio::spawn(async move { check_own_advertise_url(&me).await });
    }
}

/// The internal call every node answers, as node `me` with `secret` to the node at `url`:
/// the stop of the nil session, which no node has (`Unknown` once the secret and `me`'s run
/// are accepted). `Err` when no answer came `within`.
async fn probe(
    me: &NodeIdentity,
    secret: &ClusterSecret,
    url: &str,
    within: Duration,
) -> Result<Result<crate::core::session::PeerStop, String>, tokio::time::error::Elapsed> {
    use crate::core::session::Peers;
    let peers = HttpPeers::new(secret.clone(), Some(me.run()));
    tokio::time::timeout(within, peers.stop(url, uuid::Uuid::nil())).await
}

/// [`spawn_advertise_check`]'s check.
pub async fn check_own_advertise_url(me: &NodeIdentity) {
    use crate::core::session::PeerStop;
    let (Some(url), Some(secret)) = (me.advertise_url.as_deref(), &me.secret) else {
        return;
    };
    let why = match probe(me, secret, url, Duration::from_secs(5)).await {
        Ok(Ok(PeerStop::Unknown)) => {
            tracing::info!(%url, "this node's --advertise-url reaches it");
            return;
        }
        Ok(Ok(other)) => format!("it answered the nil session's stop with {other:?}"),
        Ok(Err(e)) => e,
        Err(_) => "no answer within 5 s".into(),
    };
    tracing::error!(%url, reason = %why, "this node's --advertise-url does not reach it: other \
        nodes cannot forward stops or requests for its sessions (check the scheme, host and port)");
}

/// Heartbeats until the returned handle is aborted: the first at once, then every
/// [`NodeIdentity::heartbeat_every`], with the engine's live and busy instance counts. A failed
/// heartbeat (the database down) is logged and retried at the next tick. Each heartbeat the
/// store takes is reported to the engine (`Supervisor::heartbeat_recorded`): after one that
/// came later than the node timeout, the node may have been taken over, and it reconciles
/// with the store (`Supervisor::rejoin`) before it takes new sessions again.
pub fn spawn_heartbeats(
    store: Arc<dyn Store>,
    me: NodeIdentity,
    sup: std::sync::Weak<crate::core::session::Supervisor>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(me.heartbeat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether this node said it is fenced since its last recorded heartbeat.
        let mut said_fenced = false;
        loop {
            tick.tick().await;
            let Some(s) = sup.upgrade() else { break };
            let (instances, busy) = s.instance_counts();
            let made = tokio::time::Instant::now();
            let rec = me.record(i64::from(instances), i64::from(busy));
            if let Err(e) = store.heartbeat(&rec).await {
                tracing::warn!(error = %e, node = %me.id, "heartbeat not recorded");
                s.heartbeat_failed();
                if !said_fenced && s.is_fenced() {
                    said_fenced = true;
                    tracing::warn!(node = %me.id, timeout_s = me.timeout.as_secs_f64(),
                        "fenced: no heartbeat recorded for longer than the node timeout; this node admits no start (503 NODE_FENCED) and /ready answers 503 until the store takes a heartbeat again and the node has reconciled");
                }
                continue;
            }
            said_fenced = false;
            if s.heartbeat_recorded(made) {
                tracing::warn!(node = %me.id,
                    "this node's heartbeats were late (longer than the node timeout): it may have been taken over; reconciling with the store");
                tokio::spawn(async move {
                    let ok = match s.rejoin().await {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::error!(error = %e, "could not reconcile with the store after late heartbeats; trying again");
                            false
                        }
                    };
                    s.rejoined(ok);
                });
            }
        }
    })
}

/// Records that this node left after a clean drain (no instance of it runs any more): its
/// last heartbeat becomes 0, so every node sees it dead at once and another node may start on
/// the database without waiting for the node timeout. Not used by `--on-stop detach`, whose
/// instances live on for the next server of this node.
pub async fn leave(store: &dyn Store, me: &NodeIdentity) {
    let mut rec = me.record(0, 0);
    rec.heartbeat_ms = 0;
    if let Err(e) = store.heartbeat(&rec).await {
        tracing::warn!(error = %e, node = %me.id, "could not record that this node left");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::session::{PeerStop, Peers};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that reads each request on a new connection and, for the first `close`
    /// connections, closes it without an answer (as a node whose keep-alive timeout ends as
    /// the request arrives); then answers 200. Returns its URL and the connections it saw.
    async fn closing_peer(close: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let k = c.read(&mut buf).await.unwrap();
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                if i >= close {
                    let _ = c
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
                drop(c);
            }
        });
        (url, seen)
    }

    fn peers() -> HttpPeers {
        HttpPeers::new(ClusterSecret::new(&"s".repeat(32)).unwrap(), None)
    }

    #[tokio::test]
    async fn a_forwarded_stop_whose_connection_is_closed_unanswered_is_sent_once_more() {
        let (url, seen) = closing_peer(1).await;
        let r = peers().stop(&url, uuid::Uuid::new_v4()).await;
        assert!(matches!(r, Ok(PeerStop::Stopped)), "{r:?}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Only once: a peer that keeps closing is an error that names what happened.
        let (url, seen) = closing_peer(usize::MAX).await;
        let r = peers().stop(&url, uuid::Uuid::new_v4()).await;
        let e = r.expect_err("closed twice");
        assert!(
            e.contains("connection closed before message completed"),
            "{e}"
        );
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A refused connection is not sent again.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", free.local_addr().unwrap());
        drop(free);
        assert!(peers().stop(&url, uuid::Uuid::new_v4()).await.is_err());
    }

    #[test]
    fn pooled_peer_connections_are_dropped_within_the_default_keep_alive() {
        let keep_alive = crate::config::ServerConfig::default().header_read_timeout_seconds;
        assert!(PEER_POOL_IDLE.as_secs_f64() < keep_alive);
    }

    fn me() -> NodeIdentity {
        NodeIdentity {
            id: "a".into(),
            advertise_url: None,
            started_ms: 0,
            timeout: Duration::from_secs(10),
            secret: None,
            key_check: None,
        }
    }

    #[test]
    fn a_node_is_alive_until_its_heartbeat_is_older_than_the_timeout() {
        let me = me();
        let at = |id: &str, hb: i64| NodeRecord {
            heartbeat_ms: hb,
            id: id.into(),
            ..me.record(0, 0)
        };
        let now = 100_000;
        let st = statuses(
            &me,
            vec![at("a", now), at("b", now - 10_000), at("c", now - 10_001)],
            now,
        );
        assert_eq!(
            st.iter()
                .map(|n| (n.id.as_str(), n.alive, n.this))
                .collect::<Vec<_>>(),
            [("a", true, true), ("b", true, false), ("c", false, false)]
        );
        assert_eq!(
            st.iter().map(|n| n.state).collect::<Vec<_>>(),
            ["alive", "alive", "dead"]
        );
        // A clock behind ours reads as age 0, never negative.
        assert_eq!(
            statuses(&me, vec![at("b", now + 5)], now)[0].heartbeat_age_ms,
            Some(0)
        );
        // A node that left (`leave`: heartbeat 0) is neither alive nor aged by the epoch.
        let gone = &statuses(&me, vec![at("b", 0)], now)[0];
        assert_eq!(
            (gone.alive, gone.state, gone.heartbeat_age_ms),
            (false, "left", None)
        );
        let others = other_live_nodes(&me, vec![at("a", now), at("b", now - 5)], now);
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].id, "b");
    }

    #[test]
    fn the_cluster_secret_is_long_printable_and_hidden() {
        assert!(ClusterSecret::new("short").is_err());
        assert!(ClusterSecret::new(&format!("{}\n", "a".repeat(40))).is_err());
        let s = ClusterSecret::new(&"k".repeat(40)).unwrap();
        assert!(s.matches("k".repeat(40).as_bytes()));
        assert!(!s.matches("k".repeat(39).as_bytes()));
        assert!(!s.matches(format!("{}j", "k".repeat(39)).as_bytes()));
        assert_eq!(format!("{:?}", s), "ClusterSecret(..)");
    }

    /// The node list splits a recorded version into Cargo's version and the commit, so nodes
    /// of one Cargo version built from different commits can be told apart; a node of an
    /// earlier release (the Cargo version alone) shows no commit.
    #[test]
    fn the_node_list_shows_each_nodes_commit() {
        let me = me();
        let now = 1_000_000;
        let rec = |id: &str, version: &str| NodeRecord {
            id: id.into(),
            version: version.into(),
            heartbeat_ms: now,
            ..me.record(0, 0)
        };
        assert_eq!(me.record(0, 0).version, crate::build_info::full());
        let listed = statuses(
            &me,
            vec![
                me.record(0, 0),
                rec("old", "0.1.0"),
                rec("new", "0.1.0+abcdef123456"),
            ],
            now,
        );
        let got: Vec<(&str, &str, Option<&str>)> = listed
            .iter()
            .map(|n| (n.id.as_str(), n.version.as_str(), n.commit.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("a", crate::build_info::VERSION, crate::build_info::COMMIT),
                ("old", "0.1.0", None),
                ("new", "0.1.0", Some("abcdef123456")),
            ]
        );
        let json = serde_json::to_value(&listed[1]).unwrap();
        assert!(json["commit"].is_null(), "{json}");
    }

    #[test]
    fn heartbeats_come_five_times_per_timeout() {
        assert_eq!(me().heartbeat_every(), Duration::from_secs(2));
    }

    /// A second process with a live node's id and another address is refused; a restart of
    /// the same node (same address), a node that left, or one dead for the timeout is not.
    #[test]
    fn a_live_nodes_id_at_another_address_is_in_use() {
        let mut me = me();
        me.advertise_url = Some("http://10.0.0.2:7860".into());
        let now = 1_000_000;
        let rec = |url: Option<&str>, hb: i64| NodeRecord {
            id: me.id.clone(),
            advertise_url: url.map(str::to_string),
            version: String::new(),
            started_ms: 0,
            heartbeat_ms: hb,
            instances: 0,
            busy: 0,
            key_check: None,
            secret_check: None,
        };
        let other = Some("http://10.0.0.1:7860");
        let err = id_in_use(&me, &[rec(other, now - 500)], now).unwrap();
        assert!(
            err.contains("is in use by a live node at http://10.0.0.1:7860"),
            "{err}"
        );
        assert!(id_in_use(&me, &[rec(Some("http://10.0.0.2:7860"), now - 500)], now).is_none());
        assert!(id_in_use(&me, &[rec(other, 0)], now).is_none());
        assert!(id_in_use(&me, &[rec(other, now - 10_001)], now).is_none());
        assert!(id_in_use(&me, &[], now).is_none());
        let mut stranger = rec(other, now);
        stranger.id = "someone-else".into();
        assert!(id_in_use(&me, &[stranger], now).is_none());
    }

    /// A node that other live nodes cannot reach is named at start with what it lacks; a
    /// lone node on PostgreSQL (or one whose only peers are dead or left) lacks nothing.
    #[test]
    fn a_node_other_live_nodes_cannot_reach_says_what_it_lacks() {
        let mut me = me();
        let now = 1_000_000;
        let peer = |id: &str, hb: i64| NodeRecord {
            id: id.into(),
            heartbeat_ms: hb,
            ..me.record(0, 0)
        };
        let live = [peer("a", now), peer("b", now - 100)];
        let err = unreachable_by_peers(&me, &live, now).unwrap();
        assert!(
            err.starts_with("1 other live node(s)")
                && err.contains("no --advertise-url and no --cluster-secret-file"),
            "{err}"
        );
        assert!(unreachable_by_peers(&me, &[peer("a", now)], now).is_none());
        assert!(unreachable_by_peers(&me, &[peer("b", 0), peer("c", now - 10_001)], now).is_none());
        me.advertise_url = Some("http://10.0.0.2:7860".into());
        let err = unreachable_by_peers(&me, &live, now).unwrap();
        assert!(err.contains("has no --cluster-secret-file:"), "{err}");
        me.secret = Some(ClusterSecret::new(&"k".repeat(40)).unwrap());
        assert!(unreachable_by_peers(&me, &live, now).is_none());
    }

    /// A node whose secrets key is not a live node's is named at start; a node that shows no
    /// key, or is dead or left, or this node's own earlier run, is not compared.
    #[test]
    fn a_secrets_key_that_is_not_a_live_nodes_is_refused() {
        use crate::core::secrets::SecretCipher;
        let mine = SecretCipher::from_key(&[1; 32]);
        let theirs = SecretCipher::from_key(&[2; 32]);
        let me = me();
        let now = 1_000_000;
        let peer = |id: &str, hb: i64, c: Option<&SecretCipher>| NodeRecord {
            id: id.into(),
            heartbeat_ms: hb,
            key_check: c.map(SecretCipher::seal_check),
            ..me.record(0, 0)
        };
        let err = secrets_key_differs(
            &me,
            &[
                peer("b", now, Some(&mine)),
                peer("c", now - 100, Some(&theirs)),
            ],
            now,
            &mine,
        )
        .unwrap();
        assert!(err.contains("not the one of live node c"), "{err}");
        for nodes in [
            vec![peer("b", now, Some(&mine))],
            vec![peer("b", now, None)],
            vec![peer("b", 0, Some(&theirs))],
            vec![peer("b", now - 10_001, Some(&theirs))],
            vec![peer("a", now, Some(&theirs))],
        ] {
            assert!(secrets_key_differs(&me, &nodes, now, &mine).is_none());
        }
    }

    /// Two nodes that start together with different secrets keys, each having checked an
    /// empty node list: the first to announce itself runs, the second sees its heartbeat and
    /// refuses, and takes its own heartbeat back (a new node's row goes; a restarting node's
    /// earlier row is written again, so its records are not taken over).
    #[tokio::test]
    async fn of_two_nodes_starting_together_with_different_keys_one_refuses() {
        use crate::core::secrets::SecretCipher;
        use crate::store::{self, OpenMode};
        let dir = tempfile::tempdir().unwrap();
        let st = store::open(&Default::default(), dir.path(), OpenMode::Create)
            .await
            .unwrap();
        let node = |id: &str, c: &SecretCipher| NodeIdentity {
            id: id.into(),
            key_check: Some(c.seal_check()),
            ..me()
        };
        let (ka, kb) = (
            SecretCipher::from_key(&[1; 32]),
            SecretCipher::from_key(&[2; 32]),
        );
        let (a, b) = (node("a", &ka), node("b", &kb));
        // Both checked before either heartbeat: nothing to refuse then.
        let before = st.list_nodes().await.unwrap();
        assert!(secrets_key_differs(&a, &before, now_ms(), &ka).is_none());
        assert!(secrets_key_differs(&b, &before, now_ms(), &kb).is_none());
        announce(st.as_ref(), &a, &ka, &before).await.unwrap();
        let err = announce(st.as_ref(), &b, &kb, &before).await.unwrap_err();
        assert!(
            format!("{err}").contains("not the one of live node a"),
            "{err}"
        );
        assert_eq!(
            node_ids(st.as_ref()).await,
            ["a"],
            "the refused node's heartbeat is taken back"
        );
        // A restarting node refused the same way keeps its earlier row as it was.
        let earlier = NodeRecord {
            heartbeat_ms: now_ms() - 1_000,
            ..b.record(0, 0)
        };
        st.heartbeat(&earlier).await.unwrap();
        let before = st.list_nodes().await.unwrap();
        assert!(announce(st.as_ref(), &b, &kb, &before).await.is_err());
        let got = st.list_nodes().await.unwrap();
        assert_eq!(got.iter().find(|n| n.id == "b"), Some(&earlier));
        // A third node with a's key runs beside a, but not beside b's live row.
        let c = node("c", &ka);
        let err = announce(st.as_ref(), &c, &ka, &before).await.unwrap_err();
        assert!(format!("{err}").contains("live node b"), "{err}");
        st.forget_node("b", i64::MAX).await.unwrap();
        announce(st.as_ref(), &c, &ka, &[]).await.unwrap();
    }

    /// A live node whose heartbeat shows another cluster secret is named at start; one that
    /// shows the same, or none (no secret, an earlier version), or is dead, is not; a node
    /// without a secret compares nothing. The check names the secret without holding it.
    #[test]
    fn a_cluster_secret_that_is_not_a_live_nodes_is_refused() {
        let (s1, s2) = ("a".repeat(40), "b".repeat(40));
        let me = NodeIdentity {
            secret: Some(ClusterSecret::new(&s1).unwrap()),
            ..me()
        };
        let now = 1_000_000;
        let peer = |id: &str, hb: i64, secret: Option<&str>| NodeRecord {
            id: id.into(),
            heartbeat_ms: hb,
            secret_check: secret.map(|s| ClusterSecret::new(s).unwrap().check_for(id)),
            ..me.record(0, 0)
        };
        let err = cluster_secret_differs(
            &me,
            &[peer("b", now, Some(&s1)), peer("c", now, Some(&s2))],
            now,
        )
        .unwrap();
        assert!(
            err.contains("live node c has another cluster secret"),
            "{err}"
        );
        for nodes in [
            vec![peer("b", now, Some(&s1))],
            vec![peer("b", now, None)],
            vec![peer("b", now - 10_001, Some(&s2))],
        ] {
            assert!(cluster_secret_differs(&me, &nodes, now).is_none());
        }
        let without = NodeIdentity {
            secret: None,
            ..me.clone()
        };
        assert!(cluster_secret_differs(&without, &[peer("c", now, Some(&s2))], now).is_none());
        // Per node id, and never the secret itself.
        let check = ClusterSecret::new(&s1).unwrap().check_for("b");
        assert_ne!(check, ClusterSecret::new(&s1).unwrap().check_for("c"));
        assert!(!check
            .windows(8)
            .any(|w| s1.as_bytes().windows(8).any(|x| x == w)));
    }

    /// Two nodes that start together with different cluster secrets, each having checked an
    /// empty node list: the second to announce itself sees the first's heartbeat and refuses,
    /// and takes its heartbeat back.
    #[tokio::test]
    async fn of_two_nodes_starting_together_with_different_cluster_secrets_one_refuses() {
        use crate::core::secrets::SecretCipher;
        use crate::store::{self, OpenMode};
        let dir = tempfile::tempdir().unwrap();
        let st = store::open(&Default::default(), dir.path(), OpenMode::Create)
            .await
            .unwrap();
        let key = SecretCipher::from_key(&[1; 32]);
        let node = |id: &str, secret: &str| NodeIdentity {
            id: id.into(),
            key_check: Some(key.seal_check()),
            secret: Some(ClusterSecret::new(secret).unwrap()),
            ..me()
        };
        let (a, b) = (node("a", &"a".repeat(40)), node("b", &"b".repeat(40)));
        let before = st.list_nodes().await.unwrap();
        assert!(cluster_secret_differs(&b, &before, now_ms()).is_none());
        announce(st.as_ref(), &a, &key, &before).await.unwrap();
        let err = announce(st.as_ref(), &b, &key, &before).await.unwrap_err();
        assert!(
            format!("{err}").contains("live node a has another cluster secret"),
            "{err}"
        );
        assert_eq!(
            node_ids(st.as_ref()).await,
            ["a"],
            "the refused node's heartbeat is taken back"
        );
        // A node with a's secret joins.
        announce(st.as_ref(), &node("c", &"a".repeat(40)), &key, &before)
            .await
            .unwrap();
    }

    /// The ids of the nodes `st` lists.
    async fn node_ids(st: &dyn crate::store::Store) -> Vec<String> {
        st.list_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.id)
            .collect()
    }

    /// A node takes others over only once it has had the store for a whole node timeout: the
    /// live nodes' heartbeats, stale after a database outage, have had time to come back.
    #[test]
    fn no_takeover_until_a_whole_timeout_after_the_store_came_back() {
        let t = Duration::from_secs(10);
        let since = std::time::Instant::now();
        assert!(!may_take_over(since, since, t));
        assert!(!may_take_over(since, since + Duration::from_secs(9), t));
        assert!(may_take_over(since, since + t, t));
        assert!(may_take_over(since, since + Duration::from_secs(60), t));
    }
}
