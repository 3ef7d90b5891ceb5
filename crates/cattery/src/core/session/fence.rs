//! Fencing (docs/cluster.md, "Node loss"): a node whose own heartbeat has not been recorded
//! for the node timeout may have been declared dead and taken over by another node, which
//! then ended its process sessions `lost` and adopted its Docker containers. Such a node is
//! **fenced**: it admits no start and refills no pool. Once the store takes its heartbeat
//! again, it reconciles with the store before anything else ([`Supervisor::rejoin`]): each
//! local instance whose record is gone or whose session is ended or another node's is
//! removed (its whole tree, at once: never two lives for one session), an instance another
//! node adopted is let go (not removed), the rest is kept. No end is written over another
//! node's (the store keeps the first end).
//!
//! The signal is the node's own clock: the time from the record of one heartbeat the store
//! took until the store took the next (a heartbeat made on time whose write stalls past the
//! timeout counts as late: the store showed the previous one meanwhile). It needs no answer from the store, so a node frozen (SIGSTOP, a VM paused)
//! or cut off from the database knows it is fenced as soon as it runs again, before its
//! next heartbeat. A node alone on its database (nobody to take it over) finds every record
//! still its own and keeps everything.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::state::{Cmd, InstanceCtl};
use super::Supervisor;
use crate::model::{now_ms, EndReason};

/// How long [`Supervisor::rejoin`] waits for the instances it removes.
const REJOIN_WAIT: Duration = Duration::from_secs(30);

/// The fence's state (under its own lock).
#[derive(Debug, Default)]
pub(super) struct Fence {
    /// When the record of the last heartbeat the store took was made.
    last_ok: Option<Instant>,
    /// A reconciliation is due (the last gap between heartbeats exceeded the timeout, or the
    /// last reconciliation failed).
    pending: bool,
    /// A reconciliation runs.
    running: bool,
    /// A heartbeat was late again while it ran (after it read the store): it lifts no fence.
    late_again: bool,
    /// Since when the store has taken every heartbeat of this node without a gap (none
    /// failed, none late): [`Fence::may_declare_dead`].
    steady_since: Option<Instant>,
    /// A heartbeat failed since the last one the store took: the next one starts a new
    /// steady period.
    broken: bool,
}

impl Fence {
    /// Notes a heartbeat whose record was made at `at` and that the store took by `now`;
    /// returns whether a reconciliation should start now. Until the store took it, the
    /// store showed the previous heartbeat: a takeover was possible once that one was older
    /// than the timeout, however early this one was made (its write may have stalled).
    fn recorded(&mut self, at: Instant, now: Instant, timeout: Duration) -> bool {
        let late = self
            .last_ok
            .is_some_and(|prev| now.max(at).saturating_duration_since(prev) > timeout);
        if late {
            self.pending = true;
            self.late_again = self.running;
        }
        if late || self.broken || self.steady_since.is_none() {
            self.steady_since = Some(at);
        }
        self.broken = false;
        self.last_ok = Some(self.last_ok.map_or(at, |prev| prev.max(at)));
        if self.pending && !self.running {
            self.running = true;
            return true;
        }
        false
    }

    /// Notes the end of a reconciliation: `ok` lifts the fence, unless a heartbeat was late
    /// again meanwhile (then the next heartbeat starts another).
    fn finished(&mut self, ok: bool) {
        self.running = false;
        if ok && !self.late_again {
            self.pending = false;
        }
        self.late_again = false;
    }

    /// Notes a heartbeat the store did not take (the database unreachable).
    fn failed(&mut self) {
        self.broken = true;
        self.steady_since = None;
    }

    /// Whether this node may declare another node dead at `now` from the age of its last
    /// heartbeat: only once the store has taken this node's own heartbeats without a gap for
    /// a whole node `timeout`. After a database outage every node's last heartbeat is stale,
    /// the living ones' too, and each needs a heartbeat period or two to record a new one: a
    /// node still stale a whole timeout after this one got the store back is dead, one that
    /// is not lives (the same rule as the watch's, `core::cluster::may_take_over`). Before the
    /// first heartbeat (no cluster bookkeeping) nothing restrains it, as for the fence.
    fn may_declare_dead(&self, now: Instant, timeout: Duration) -> bool {
        if self.last_ok.is_none() && !self.broken {
            return true;
        }
        !self.fenced(now, timeout)
            && self
                .steady_since
                .is_some_and(|s| now.saturating_duration_since(s) >= timeout)
    }

    /// Whether the node is fenced at `now`.
    fn fenced(&self, now: Instant, timeout: Duration) -> bool {
        self.pending
            || self
                .last_ok
                .is_some_and(|t| now.saturating_duration_since(t) > timeout)
    }
}

/// What [`Supervisor::rejoin`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rejoined {
    /// Instances removed (their session ended, or another node's, or their record gone).
    pub removed: usize,
    /// Instances let go: another node adopted them.
    pub released: usize,
    /// Instances kept.
    pub kept: usize,
}

/// What to do with one local instance, given the store's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Keep,
    Release,
    Remove,
}

/// The decision for one instance. `record_owner`: the node its durable record names (`None`:
/// no record); `recorded`: this node wrote (or found) that record; `session`: the session it
/// serves or is promised to, with the node that owns it if it is still open (`None` inside:
/// ended or unknown); `adoptable`: the runtime lets another node reach it.
pub(super) fn verdict(
    me: &str,
    record_owner: Option<&str>,
    recorded: bool,
    session: Option<Option<&str>>,
    adoptable: bool,
) -> Verdict {
    let mine = |n: &str| n.is_empty() || n == me;
    match record_owner {
        // Adopted by the node that took this one over: it supervises it now.
        Some(n) if !mine(n) => {
            if adoptable {
                Verdict::Release
            } else {
                Verdict::Remove
            }
        }
        Some(_) => match session {
            Some(Some(owner)) if mine(owner) => Verdict::Keep,
            Some(_) => Verdict::Remove,
            None => Verdict::Keep,
        },
        // Its record was dropped by a takeover: its session (if any) is ended elsewhere.
        None if recorded => Verdict::Remove,
        // Not recorded yet (a start under way): its record will name this node.
        None => match session {
            Some(Some(owner)) if !mine(owner) => Verdict::Remove,
            _ => Verdict::Keep,
        },
    }
}

impl Supervisor {
    /// Notes that the store took (just now) a heartbeat whose record was made at `at` (this
    /// node's clock); returns whether [`Supervisor::rejoin`] should run now (the store took
    /// it more than the node timeout after the previous one was made, or a previous
    /// reconciliation failed). The
    /// caller runs it, then reports with [`Supervisor::rejoined`].
    pub fn heartbeat_recorded(&self, at: Instant) -> bool {
        self.fence
            .lock()
            .recorded(at, Instant::now(), self.cfg.node_timeout)
    }

    /// Notes a heartbeat the store did not take: this node declares no other node dead
    /// until its own heartbeats have been taken again without a gap for a node timeout
    /// ([`Supervisor::may_declare_dead`]).
    pub fn heartbeat_failed(&self) {
        self.fence.lock().failed();
    }

    /// Whether this node may take another node whose heartbeat is stale for dead (a stop of
    /// its session takes it over at once): only once the store has taken this node's own
    /// heartbeats without a gap (none failed, none late) for a whole node timeout, so that a
    /// database outage, which leaves every node's heartbeat stale, is not taken for the loss
    /// of the nodes that live through it.
    pub fn may_declare_dead(&self) -> bool {
        self.fence
            .lock()
            .may_declare_dead(Instant::now(), self.cfg.node_timeout)
    }

    /// Whether this node is fenced: its last heartbeat the store took is older than the
    /// node timeout (by its own clock), or it has not reconciled since. A fenced node admits
    /// no start (503 `NODE_FENCED`) and refills no warm pool.
    pub fn is_fenced(&self) -> bool {
        self.fence
            .lock()
            .fenced(Instant::now(), self.cfg.node_timeout)
    }

    /// Reports the end of a [`Supervisor::rejoin`] started after
    /// [`Supervisor::heartbeat_recorded`]: `ok` lifts the fence (if no heartbeat since was
    /// late again), else it is tried again at the next heartbeat.
    pub fn rejoined(self: &Arc<Self>, ok: bool) {
        let lifted = {
            let mut f = self.fence.lock();
            f.finished(ok);
            !f.pending
        };
        if lifted {
            self.reconcile_all();
        }
    }

    /// Reconciles this node's instances with the store after it was fenced (module docs):
    /// removes at once (no grace) each instance whose record is gone or another node's (and
    /// not reachable by it), or whose session is ended or another node's; lets go, without
    /// removing it or writing anything, each instance another node adopted; keeps the rest.
    /// Waits (bounded) until the removed instances are gone.
    pub async fn rejoin(self: &Arc<Self>) -> anyhow::Result<Rejoined> {
        let records: HashMap<Uuid, crate::model::InstanceRecord> = self
            .store
            .list_instances()
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let open: HashMap<Uuid, String> = self
            .store
            .list_open_sessions()
            .await?
            .into_iter()
            .map(|s| (s.id, s.node_id))
            .collect();
        let all: Vec<Arc<InstanceCtl>> = {
            let st = self.state.lock();
            st.pools
                .values()
                .flat_map(|p| p.instances.values().cloned())
                .collect()
        };
        let mut done = Rejoined::default();
        let mut gone = Vec::new();
        for c in all {
            let rec = records.get(&c.id);
            let session = c.session().map(|s| open.get(&s).map(String::as_str));
            let adoptable = rec.is_some_and(|r| self.runtime.adoptable_by_any_node(r));
            let v = verdict(
                &self.cfg.node_id,
                rec.map(|r| r.node_id.as_str()),
                c.recorded.load(Ordering::SeqCst),
                session,
                adoptable,
            );
            match v {
                Verdict::Keep => done.kept += 1,
                Verdict::Release => {
                    c.released.store(true, Ordering::SeqCst);
                    let _ = c.cmd_tx.send(Cmd::Stop(EndReason::Lost));
                    tracing::warn!(instance = %c.id, "another node adopted this instance while this node was fenced: let go");
                    done.released += 1;
                    gone.push(c);
                }
                Verdict::Remove => {
                    // At once: its session lives on nowhere (or elsewhere).
                    *c.stop_deadline_ms.lock() = Some(now_ms());
                    let _ = c.cmd_tx.send(Cmd::Stop(EndReason::Lost));
                    tracing::warn!(instance = %c.id, session = ?c.session(),
                        "removing an instance whose session this node lost while it was fenced");
                    done.removed += 1;
                    gone.push(c);
                }
            }
        }
        let all_gone = futures_util::future::join_all(gone.into_iter().map(|c| async move {
            let mut d = c.done.clone();
            let _ = d.wait_for(|v| *v).await;
        }));
        if tokio::time::timeout(REJOIN_WAIT, all_gone).await.is_err() {
            anyhow::bail!("instances removed after the fence were not gone in {REJOIN_WAIT:?}");
        }
        tracing::warn!(
            removed = done.removed,
            released = done.released,
            kept = done.kept,
            "reconciled with the store after this node's heartbeats were late (fenced)"
        );
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_rises_after_a_late_heartbeat_and_falls_after_a_reconciliation() {
        let t = Duration::from_secs(2);
        let t0 = Instant::now();
        let mut f = Fence::default();
        assert!(!f.fenced(t0, t), "not fenced before the first heartbeat");
        assert!(!f.recorded(t0, t0, t));
        assert!(!f.fenced(t0 + t, t));
        assert!(f.fenced(t0 + t + Duration::from_millis(1), t));
        // On time: no reconciliation.
        assert!(!f.recorded(t0 + Duration::from_secs(1), t0 + Duration::from_secs(1), t));
        assert!(!f.fenced(t0 + Duration::from_secs(2), t));
        // Late: one reconciliation, fenced until it reports.
        let late = t0 + Duration::from_secs(4);
        assert!(f.recorded(late, late, t));
        assert!(f.fenced(late, t));
        assert!(
            !f.recorded(
                late + Duration::from_millis(400),
                late + Duration::from_millis(400),
                t
            ),
            "one at a time"
        );
        f.finished(false); // failed: tried again at the next heartbeat
        assert!(f.recorded(
            late + Duration::from_millis(800),
            late + Duration::from_millis(800),
            t
        ));
        f.finished(true);
        assert!(!f.fenced(late + Duration::from_millis(900), t));
        // Made on time, taken by the store after the timeout (its write stalled): the store
        // showed the previous heartbeat meanwhile, so a takeover was possible.
        let last = late + Duration::from_millis(800);
        let stalled = last + Duration::from_millis(400);
        assert!(f.recorded(stalled, last + Duration::from_millis(2500), t));
        // Late again while that reconciliation runs: it lifts no fence; the next heartbeat
        // starts another.
        let again = stalled + Duration::from_secs(3);
        assert!(!f.recorded(again, again, t));
        f.finished(true);
        assert!(f.fenced(again, t));
        let next = again + Duration::from_millis(400);
        assert!(f.recorded(next, next, t));
        f.finished(true);
        assert!(!f.fenced(next, t));
    }

    #[test]
    fn a_fenced_node_keeps_what_is_its_own_and_lets_go_what_another_node_adopted() {
        use Verdict::*;
        // Still its own, session open and its own: kept (a database outage, nobody took over).
        assert_eq!(verdict("a", Some("a"), true, Some(Some("a")), false), Keep);
        assert_eq!(verdict("a", Some("a"), true, None, false), Keep);
        assert_eq!(verdict("a", Some(""), true, Some(Some("")), false), Keep);
        // Taken over: record dropped (process runtime), session ended elsewhere.
        assert_eq!(verdict("a", None, true, Some(None), false), Remove);
        assert_eq!(verdict("a", None, true, None, false), Remove);
        // Adopted by another node (Docker): let go, never removed.
        assert_eq!(
            verdict("a", Some("b"), true, Some(Some("b")), true),
            Release
        );
        // Another node's record it cannot reach: removed.
        assert_eq!(
            verdict("a", Some("b"), true, Some(Some("b")), false),
            Remove
        );
        // Its record, but the session is ended or another node's.
        assert_eq!(verdict("a", Some("a"), true, Some(None), false), Remove);
        assert_eq!(
            verdict("a", Some("a"), true, Some(Some("b")), false),
            Remove
        );
        // A start under way, not recorded yet: kept, unless its session went elsewhere.
        assert_eq!(verdict("a", None, false, None, false), Keep);
        assert_eq!(verdict("a", None, false, Some(Some("a")), false), Keep);
        assert_eq!(verdict("a", None, false, Some(Some("b")), false), Remove);
    }
}
