//! Session changes made through other nodes, for this node's event streams (`api::events`,
//! docs/cluster.md "Session events from every node").
//!
//! The engine names its own changes at once ([`Supervisor::session_changes`]). Changes made
//! through other nodes come from the store's change feed (`core::shared`), which announces
//! them only while some node has a stream open: a stream registers this node as watching
//! ([`Supervisor::watch_sessions`]) before it tells its client `ready`, the first stream of
//! the node writes the registration and renews it, the last one to close withdraws it.
//! A feed that may have missed changes (its connection came back, or a stream lagged) is a
//! [`Elsewhere::Gap`]: the stream tells its client to read its list again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use uuid::Uuid;

use super::Supervisor;
use crate::store::SESSION_WATCH_LEASE;

/// Changes from other nodes kept for a slow stream before it lags (and resyncs).
const ELSEWHERE_BUFFER: usize = 4096;
/// A registration that could not be written is tried again this often.
const RETRY: Duration = Duration::from_secs(1);

/// What the change feed says about sessions changed through other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elsewhere {
    /// Session `id` of `org` was stored, delivered or ended through another node.
    Changed {
        /// The session's org.
        org: String,
        /// The session.
        id: Uuid,
    },
    /// Session `id` of `org` was changed through this node. Its engine names most such
    /// changes itself ([`Supervisor::session_changes`]), but not all (the `lost` end a
    /// takeover or a restart writes for a session no instance serves here): news only to a
    /// stream that heard of the session from another node, which this node's engine never
    /// names to it.
    Own {
        /// The session's org.
        org: String,
        /// The session.
        id: Uuid,
    },
    /// Changes may have been missed (the feed reconnected, or this node's registration was
    /// written late): a stream's client reads its list again.
    Gap,
}

/// This node's streams and its registration in the store.
pub(super) struct SessionWatch {
    elsewhere: broadcast::Sender<Elsewhere>,
    /// Whether the store has a change feed (several nodes may share it): set by the feed.
    feed: std::sync::atomic::AtomicBool,
    state: tokio::sync::Mutex<Streams>,
}

impl Default for SessionWatch {
    fn default() -> Self {
        SessionWatch {
            elsewhere: broadcast::channel(ELSEWHERE_BUFFER).0,
            feed: std::sync::atomic::AtomicBool::new(false),
            state: tokio::sync::Mutex::default(),
        }
    }
}

/// Open streams, and the task that keeps their registration while there is one.
#[derive(Default)]
struct Streams {
    open: usize,
    renew: Option<tokio::task::JoinHandle<()>>,
}

impl Streams {
    /// A stream opens: whether it is the first (it registers the node).
    fn join(&mut self) -> bool {
        self.open += 1;
        self.open == 1
    }

    /// A stream closed: whether it was the last (the registration is withdrawn).
    fn leave(&mut self) -> bool {
        self.open = self.open.saturating_sub(1);
        self.open == 0
    }
}

/// Held by an open stream; dropping it closes the stream's part of the registration.
pub struct Watching {
    sup: Option<std::sync::Weak<Supervisor>>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let Some(sup) = self.sup.take().and_then(|s| s.upgrade()) else {
            return;
        };
        tokio::spawn(async move { sup.stream_closed().await });
    }
}

/// Whether a session change the feed announces, written through `writer`, is news to node
/// `me`: its own writes were named by its engine at once.
fn from_elsewhere(me: &str, writer: &str) -> bool {
    writer != me
}

impl Supervisor {
    /// Session changes made through other nodes (and gaps), while this node watches
    /// ([`Supervisor::watch_sessions`]).
    pub fn changes_elsewhere(&self) -> broadcast::Receiver<Elsewhere> {
        self.watching.elsewhere.subscribe()
    }

    /// From the store's change feed: the store has one, so other nodes may change sessions.
    pub fn set_change_feed(&self) {
        self.watching
            .feed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the store has a change feed ([`Supervisor::set_change_feed`]): other nodes
    /// may change what this one holds.
    pub(super) fn has_change_feed(&self) -> bool {
        self.watching.feed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From the change feed: session `id` of `org` was changed through node `writer`. Passed
    /// on to the streams as another node's change, or as this node's own
    /// ([`Elsewhere::Own`]: its engine named it already, unless it was a session this node
    /// serves no instance of).
    pub fn session_changed_through(&self, writer: &str, org: String, id: Uuid) {
        let change = if from_elsewhere(&self.cfg.node_id, writer) {
            Elsewhere::Changed { org, id }
        } else {
            Elsewhere::Own { org, id }
        };
        // No stream is fine.
        let _ = self.watching.elsewhere.send(change);
    }

    /// From the change feed: changes may have been missed (it listens again).
    pub fn session_changes_missed(&self) {
        let _ = self.watching.elsewhere.send(Elsewhere::Gap);
    }

    /// A stream opens: once this returns, every node announces its session changes to this
    /// one (the node's registration is written, unless the store could not take it: then it
    /// is tried again every second and a [`Elsewhere::Gap`] follows once it is written). A
    /// store without a change feed (one node) needs nothing. Keep the guard while the stream
    /// is open.
    pub async fn watch_sessions(&self) -> Watching {
        if !self.watching.feed.load(std::sync::atomic::Ordering::SeqCst) {
            return Watching { sup: None };
        }
        let mut st = self.watching.state.lock().await;
        if st.join() {
            let ok = self.register().await;
            st.renew = Some(self.spawn_renew(ok));
        }
        Watching {
            sup: Some(self.this.clone()),
        }
    }

    /// Writes this node's registration; whether the store took it.
    async fn register(&self) -> bool {
        match self.store.watch_sessions(&self.cfg.node_id, true).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register this node's session streams; other nodes' session changes reach them once it is written");
                false
            }
        }
    }

    /// Renews the registration within its lease while a stream is open; one not yet
    /// written is tried every second, and its first success is a gap for the streams.
    fn spawn_renew(&self, written: bool) -> tokio::task::JoinHandle<()> {
        let sup = self.this.clone();
        tokio::spawn(async move {
            let mut written = written;
            loop {
                tokio::time::sleep(if written {
                    SESSION_WATCH_LEASE / 3
                } else {
                    RETRY
                })
                .await;
                let Some(sup) = sup.upgrade() else { return };
                let ok = sup.register().await;
                if ok && !written {
                    sup.session_changes_missed();
                }
                written = ok;
            }
        })
    }

    /// A stream closed: the last one withdraws the registration.
    async fn stream_closed(self: Arc<Self>) {
        let mut st = self.watching.state.lock().await;
        if st.leave() {
            if let Some(t) = st.renew.take() {
                t.abort();
            }
            if let Err(e) = self.store.watch_sessions(&self.cfg.node_id, false).await {
                // Its lease runs out by itself.
                tracing::debug!(error = %e, "cannot withdraw this node's session streams");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stream_registers_and_the_last_withdraws() {
        let mut s = Streams::default();
        assert!(s.join());
        assert!(!s.join());
        assert!(!s.leave());
        assert!(s.leave());
        // Again from none.
        assert!(s.join());
        assert!(s.leave());
        assert!(s.leave(), "never below none");
        assert_eq!(s.open, 0);
    }

    #[test]
    fn only_changes_written_through_another_node_are_news() {
        assert!(!from_elsewhere("n1", "n1"));
        assert!(from_elsewhere("n1", "n2"));
        // A writer that names no node (`cattery` commands, an earlier version).
        assert!(from_elsewhere("n1", ""));
    }
}
