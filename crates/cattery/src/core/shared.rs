//! What several nodes on one store keep in step (docs/cluster.md, "Shared state"): each
//! node's share of the warm pools, recomputed from the node list on every heartbeat, and the
//! agents its supervisor runs, updated from the store's change feed within milliseconds of a
//! change made through any node.

use std::sync::Arc;

use uuid::Uuid;

use super::cluster::{statuses, NodeIdentity};
use super::session::{ClusterView, Supervisor};
use crate::model::now_ms;
use crate::store::{Change, Store, StoreResult};

/// The tasks that keep this node in step with the others ([`Shared::start`]).
pub struct Shared {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Shared {
    /// Before the node's recovery: gives the supervisor this node's id and share, starts
    /// applying changes made through other nodes, and frees the capacity slots a crash of
    /// this node left without an instance.
    ///
    /// Errors: the store cannot be read or listened to.
    pub async fn start(
        store: Arc<dyn Store>,
        me: &NodeIdentity,
        sup: &Arc<Supervisor>,
    ) -> anyhow::Result<Shared> {
        use anyhow::Context;
        sup.set_cluster_view(view_of(me, Vec::new(), 0));
        if let Err(e) = refresh_view(store.as_ref(), me, sup).await {
            tracing::warn!(error = %e, "could not read the node list");
        }
        let feed = spawn_change_feed(store.clone(), Arc::downgrade(sup), || {})
            .await
            .context("listening for changes made on other nodes")?;
        let orphans = store
            .release_orphan_slots(&me.id, &[])
            .await
            .context("freeing capacity slots left by a previous run")?;
        if orphans > 0 {
            tracing::info!(
                orphans,
                "freed capacity slots of instances that never started"
            );
        }
        Ok(Shared {
            tasks: feed.into_iter().collect(),
        })
    }

    /// After the recovery: refreshes this node's share at every heartbeat period.
    #[must_use]
    pub fn after_recovery(
        mut self,
        store: Arc<dyn Store>,
        me: &NodeIdentity,
        sup: &Arc<Supervisor>,
    ) -> Shared {
        self.tasks
            .push(spawn_view_refresh(store, me.clone(), Arc::downgrade(sup)));
        self
    }

    /// Stops the tasks.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// This node's view of the live nodes: its index among them sorted by id (itself counted
/// even before its first heartbeat is stored).
pub fn view_of(me: &NodeIdentity, nodes: Vec<crate::store::NodeRecord>, now: i64) -> ClusterView {
    let mut live: Vec<String> = statuses(me, nodes, now)
        .into_iter()
        .filter(|n| n.alive && !n.this)
        .map(|n| n.id)
        .collect();
    live.push(me.id.clone());
    live.sort();
    live.dedup();
    ClusterView {
        index: live.iter().position(|n| *n == me.id).unwrap_or(0) as u32,
        nodes: live.len() as u32,
    }
}

/// Reads the node list once and gives the supervisor its view (and the list, for forwarded
/// stops).
pub async fn refresh_view(
    store: &dyn Store,
    me: &NodeIdentity,
    sup: &Arc<Supervisor>,
) -> StoreResult<()> {
    let nodes = store.list_nodes().await?;
    sup.remember_nodes(&nodes);
    sup.set_cluster_view(view_of(me, nodes, now_ms()));
    Ok(())
}

/// Refreshes the view at every heartbeat period until the handle is aborted (a node that
/// joins or dies changes every node's share within one period after it is seen).
pub fn spawn_view_refresh(
    store: Arc<dyn Store>,
    me: NodeIdentity,
    sup: std::sync::Weak<Supervisor>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(me.heartbeat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(sup) = sup.upgrade() else { break };
            if let Err(e) = refresh_view(store.as_ref(), &me, &sup).await {
                tracing::warn!(error = %e, "could not read the node list");
            }
        }
    })
}

/// Applies the store's change feed to the supervisor until the feed ends: an agent changed
/// through any node is read again and registered, updated or removed here; a session changed
/// through another node is passed on to this node's event streams, and a feed that may have
/// missed changes tells them so (`Supervisor::session_changes_missed`). `None` when the
/// store has no feed (SQLite: one node). `on_key` runs for every key change (caches).
pub async fn spawn_change_feed(
    store: Arc<dyn Store>,
    sup: std::sync::Weak<Supervisor>,
    on_key: impl Fn() + Send + 'static,
) -> StoreResult<Option<tokio::task::JoinHandle<()>>> {
    let Some(mut rx) = store.watch_changes().await? else {
        return Ok(None);
    };
    if let Some(s) = sup.upgrade() {
        s.set_change_feed();
    }
    Ok(Some(tokio::spawn(async move {
        while let Some(change) = rx.recv().await {
            let Some(sup) = sup.upgrade() else { break };
            let r = match change {
                Change::Agent(id) => apply_agent(store.as_ref(), &sup, id).await,
                Change::Key => {
                    on_key();
                    Ok(())
                }
                Change::Session { node, org, id } => {
                    sup.session_changed_through(&node, org, id);
                    Ok(())
                }
                Change::Resync => {
                    on_key();
                    sup.session_changes_missed();
                    resync(store.as_ref(), &sup).await
                }
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not apply a change made on another node; rereading all agents in 1 s");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if let Err(e) = resync(store.as_ref(), &sup).await {
                    tracing::warn!(error = %e, "could not reread the agents");
                }
            }
        }
    })))
}

/// Registers agent `id` as the store has it now (removed when deleted).
async fn apply_agent(store: &dyn Store, sup: &Arc<Supervisor>, id: Uuid) -> StoreResult<()> {
    let Some(agent) = store.get_agent_by_id(id).await? else {
        return Ok(());
    };
    if agent.deleted_ms.is_some() {
        sup.remove_agent(id);
        return Ok(());
    }
    if let Some(dep) = store.get_deployment(agent.desired_deployment_id).await? {
        sup.upsert_agent(agent, dep);
    }
    Ok(())
}

/// Rereads every agent (changes may have been missed).
async fn resync(store: &dyn Store, sup: &Arc<Supervisor>) -> StoreResult<()> {
    let agents = store.list_all_agents().await?;
    let live: std::collections::HashSet<Uuid> = agents.iter().map(|a| a.id).collect();
    for id in sup.agent_ids() {
        if !live.contains(&id) {
            sup.remove_agent(id);
        }
    }
    for a in agents {
        if let Some(dep) = store.get_deployment(a.desired_deployment_id).await? {
            sup.upsert_agent(a, dep);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_live_node_gets_its_place_and_shares_add_up() {
        let me = |id: &str| NodeIdentity {
            id: id.into(),
            advertise_url: None,
            started_ms: 0,
            timeout: Duration::from_secs(10),
            secret: None,
            key_check: None,
        };
        let rec = |id: &str, hb: i64| crate::store::NodeRecord {
            heartbeat_ms: hb,
            ..me(id).record(0, 0)
        };
        let now = 100_000;
        let nodes = vec![
            rec("c", now),
            rec("a", now),
            rec("b", now - 1),
            rec("dead", 5),
        ];
        let views: Vec<ClusterView> = ["a", "b", "c"]
            .iter()
            .map(|id| view_of(&me(id), nodes.clone(), now))
            .collect();
        assert_eq!(
            views.iter().map(|v| (v.index, v.nodes)).collect::<Vec<_>>(),
            [(0, 3), (1, 3), (2, 3)]
        );
        for min in 0..10 {
            let shares: Vec<u32> = views.iter().map(|v| v.share(min)).collect();
            assert_eq!(shares.iter().sum::<u32>(), min, "{shares:?}");
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
        assert_eq!(views[0].share(4), 2);
        assert_eq!(views[2].share(4), 1);
        // Not yet in the list (before its first heartbeat): counted all the same.
        let v = view_of(&me("d"), nodes, now);
        assert_eq!((v.index, v.nodes), (3, 4));
        // Alone.
        assert_eq!(view_of(&me("a"), vec![], now).share(5), 5);
    }
}
