//! Ends the store has not accepted yet, and other writes that must land sooner or later
//! ([`write_again`]).
//!
//! An instance is gone before its end is written. When that write fails (a full disk, an I/O
//! error), the end is kept here and written again with backoff until the store takes it, so a
//! storage fault never loses it (after a restart it would otherwise be recorded `lost`). A
//! stop waits a bounded time for the write: it answers only once the end is committed, or
//! with the store's error (503) while it is not. A later stop waits for it too, instead of
//! recording the session `lost`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use uuid::Uuid;

use crate::model::{MetricSample, SessionEnd};
use crate::store::{Store, StoreError, StoreResult};

/// The first wait before writing an end again; doubled after each failure up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How long a stop waits for its end to be committed before answering the store's error.
pub(super) const STOP_COMMIT_WAIT: Duration = Duration::from_secs(3);

/// Writes again, with the ends' backoff, a write the store refused for now (`Full`,
/// `Unavailable`), until it takes it or refuses it for good (logged). For writes that must
/// land sooner or later and change nothing once landed: a delivery's time (without it, a
/// restart takes the delivered session for one still starting and ends it `lost`), a freed
/// capacity slot (else held until the server restarts), a failed start's end (else the
/// session stays open until then). `what` names the write in the log.
pub(super) fn write_again<F, Fut>(what: &'static str, subject: Uuid, mut write: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = StoreResult<()>> + Send,
{
    tokio::spawn(async move {
        let mut wait = RETRY_FIRST;
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
            match write().await {
                Ok(()) => {
                    tracing::info!(id = %subject, "{what} is recorded after a storage fault");
                    return;
                }
                Err(e) if e.is_transient() => {}
                Err(e) => {
                    tracing::error!(id = %subject, error = %e, "could not record {what}");
                    return;
                }
            }
        }
    });
}

/// Where the write of one end stands.
#[derive(Clone)]
enum Commit {
    /// Not written yet; the last error.
    Pending(StoreError),
    /// Written.
    Done,
}

/// The ends being written again, by session.
#[derive(Default, Clone)]
pub(super) struct PendingEnds {
    map: Arc<Mutex<HashMap<Uuid, watch::Receiver<Commit>>>>,
}

impl PendingEnds {
    /// Keeps writing the end of instance `instance` (and of its session, if any) until the
    /// store accepts it; `first` is the error of the write that failed. Errors that no retry
    /// can mend (bad data, a missing record) end the retries.
    pub fn retry(
        &self,
        store: Arc<dyn Store>,
        instance: Uuid,
        session: Option<(Uuid, SessionEnd, Vec<MetricSample>)>,
        first: StoreError,
    ) {
        let (tx, rx) = watch::channel(Commit::Pending(first));
        let sid = session.as_ref().map(|s| s.0);
        if let Some(sid) = sid {
            self.map.lock().insert(sid, rx);
        }
        let map = self.map.clone();
        tokio::spawn(async move {
            let mut wait = RETRY_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
                let s = session
                    .as_ref()
                    .map(|(id, end, samples)| (*id, end, &samples[..]));
                match store.end_instance(instance, s).await {
                    Ok(_) => {
                        tracing::info!(instance = %instance, "the end of the instance is recorded after a storage fault");
                        break;
                    }
                    Err(e) if e.is_transient() => {
                        tx.send_replace(Commit::Pending(e));
                    }
                    Err(e) => {
                        tracing::error!(instance = %instance, error = %e, "could not record the end of the instance");
                        tx.send_replace(Commit::Pending(e));
                        if let Some(sid) = sid {
                            map.lock().remove(&sid);
                        }
                        return;
                    }
                }
            }
            if let Some(sid) = sid {
                map.lock().remove(&sid);
            }
            tx.send_replace(Commit::Done);
        });
    }

    /// Waits (up to `max` in all) until every end being written is committed; logs those that
    /// are not (the next start records them `lost`).
    pub async fn all_committed(&self, max: Duration) {
        let all: Vec<(Uuid, watch::Receiver<Commit>)> = self
            .map
            .lock()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let deadline = tokio::time::Instant::now() + max;
        for (sid, mut rx) in all {
            let wait = rx.wait_for(|c| matches!(c, Commit::Done));
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                tracing::error!(session = %sid, "the end of the session could not be recorded before exiting");
            }
        }
    }

    /// Whether the end of `session` is still being written.
    pub fn has(&self, session: Uuid) -> bool {
        self.map.lock().contains_key(&session)
    }

    /// Waits (up to `max`) until the end of `session` is committed: `Ok` at once when none is
    /// pending, else the store's last error if it is still not written.
    pub async fn committed(&self, session: Uuid, max: Duration) -> StoreResult<()> {
        let Some(mut rx) = self.map.lock().get(&session).cloned() else {
            return Ok(());
        };
        let _ = tokio::time::timeout(max, rx.wait_for(|c| matches!(c, Commit::Done))).await;
        let c = rx.borrow().clone();
        match c {
            Commit::Done => Ok(()),
            Commit::Pending(e) => Err(e),
        }
    }
}
