//! `GET /v1/sessions/events`: a server-sent event stream of the caller's org's session changes
//! (private key or user token), so a live list (the dashboard's) updates itself without
//! reading the whole list again.
//!
//! Events:
//! - `ready` (data `{}`), first: the stream is watching; a client that reads its list after
//!   this event misses no change;
//! - `session` (data: the session as `GET /v1/agents/{name}/sessions/{id}` answers it, without
//!   `resourceMetrics`), once when a session starts, again once it is delivered, and once it
//!   has ended (its end recorded);
//! - `resync` (data `{}`), on several nodes only: changes made through other nodes may have
//!   been missed (this node's change feed lost its connection and listens again): the client
//!   reads its list again, as after `ready`.
//!
//! The engine names each session whose record changed (`Supervisor::session_changes`), and on
//! PostgreSQL the store's change feed names those changed through other nodes
//! (`Supervisor::changes_elsewhere`, docs/cluster.md); the stream reads only those of the
//! caller's org, and sends each state once, whichever way it heard of it. A stream that lags
//! behind many changes reads the org's live sessions again. The stream's key is checked again
//! every [`KEY_RECHECK`]: once it is revoked the stream ends (the client's next request is a
//! 401), rather than telling a revoked key the org's sessions for as long as it stays open.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::auth::{Caller, PrivateAuth};
use super::error::ApiError;
use super::schema::Session;
use super::AppState;
use crate::core::session::Elsewhere;
use crate::core::{keys, lookup};

/// Events buffered for a slow client before the stream waits for it.
const BUFFER: usize = 256;

/// How often an open stream checks that its key is still live.
const KEY_RECHECK: Duration = Duration::from_secs(2);

/// `GET /v1/sessions/events`. Errors: 403 `ORG_LIMIT_REACHED` when the org has
/// `event_streams_per_org` streams open on this node (`core::limits`).
pub async fn session_events(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let permit = st.limits.open_stream(&c.org)?;
    let (tx, rx) = mpsc::channel::<Event>(BUFFER);
    tokio::spawn(async move {
        // The stream counts against its org until its watcher ends (the client went away).
        let _permit = permit;
        watch_org(st, c, tx).await;
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// What the stream last told the client about a session that has not ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Told1 {
    Started,
    Delivered,
}

/// Ended sessions remembered so that a repeated change is not sent twice (cleared past this).
const ENDED_MEMORY: usize = 10_000;

/// What a stream has told its client, to send each state once.
#[derive(Default)]
struct Told {
    /// Sessions not ended, by what was told.
    live: HashMap<Uuid, Told1>,
    /// Ended sessions told about (cleared past [`ENDED_MEMORY`]).
    ended: HashSet<Uuid>,
    /// Sessions last named by another node's change (the backstop below leaves them to the
    /// change feed: this node's engine knows nothing of them).
    elsewhere: HashSet<Uuid>,
}

/// Sends the caller's org's session changes to `tx` until the client goes away, the server
/// stops serving ([`AppState::closing`]) or the caller's key is revoked.
async fn watch_org(st: AppState, caller: Caller, tx: mpsc::Sender<Event>) {
    let org = caller.org.clone();
    let mut changes = st.sup.session_changes();
    let mut elsewhere = st.sup.changes_elsewhere();
    // Before `ready`: from then on every node announces its changes to this one.
    let _watching = st.sup.watch_sessions().await;
    if tx
        .send(Event::default().event("ready").data("{}"))
        .await
        .is_err()
    {
        return;
    }
    let mut told = Told::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut recheck = tokio::time::interval(KEY_RECHECK);
    loop {
        let mut due: HashSet<Uuid> = HashSet::new();
        tokio::select! {
            r = changes.recv() => match r {
                Ok((o, id)) => if o == org {
                    due.insert(id);
                    told.elsewhere.remove(&id);
                },
                Err(RecvError::Lagged(_)) => {
                    due.extend(st.sup.live_sessions(&org));
                    due.extend(told.live.keys());
                }
                Err(RecvError::Closed) => return,
            },
            r = elsewhere.recv() => match r {
                Ok(Elsewhere::Changed { org: o, id }) => if o == org {
                    due.insert(id);
                    told.elsewhere.insert(id);
                },
                // Written through this node: its engine named it, except a session it serves
                // no instance of (a takeover's or a stop's `lost` end), which the backstop
                // leaves to the feed when the stream heard of it from another node.
                Ok(Elsewhere::Own { org: o, id }) => if o == org && told.elsewhere.contains(&id) {
                    due.insert(id);
                },
                // Changes of other nodes may have been missed: the client reads its list again.
                Ok(Elsewhere::Gap) | Err(RecvError::Lagged(_)) => {
                    if tx.send(Event::default().event("resync").data("{}")).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            },
            // Backstop: a session of this node told about that left the live set whose end is
            // written late (the store was failing), and one told only "started".
            _ = tick.tick() => {
                let live: HashSet<Uuid> = st.sup.live_sessions(&org).into_iter().collect();
                due.extend(
                    told.live
                        .iter()
                        .filter(|(id, t)| {
                            !told.elsewhere.contains(id) && (!live.contains(id) || **t == Told1::Started)
                        })
                        .map(|(id, _)| *id),
                );
            }
            // A store that fails keeps the stream: the key is checked again next time.
            _ = recheck.tick() => {
                if let Ok(false) = keys::is_live(st.store.as_ref(), &org, caller.kind, caller.key_id).await {
                    return;
                }
            }
            () = tx.closed() => return,
            // The server stops serving: end the stream (the client reconnects elsewhere).
            () = st.closing.cancelled() => return,
        }
        while let Ok((o, id)) = changes.try_recv() {
            if o == org {
                due.insert(id);
                told.elsewhere.remove(&id);
            }
        }
        for id in due {
            if told.ended.contains(&id) {
                continue;
            }
            let Ok(Some((agent, s))) = lookup::org_session(&st.store, &org, id).await else {
                continue;
            };
            if !told.tell(id, &s) {
                continue;
            }
            let data = serde_json::to_string(&Session::of(&s, &agent)).unwrap_or_default();
            if tx
                .send(Event::default().event("session").data(data))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

impl Told {
    /// Whether session `id`, as read now, is news to the client (then it counts as told).
    fn tell(&mut self, id: Uuid, s: &crate::model::SessionRecord) -> bool {
        let now = if s.end.is_some() {
            None
        } else if s.bot_start_ms.is_some() {
            Some(Told1::Delivered)
        } else {
            Some(Told1::Started)
        };
        match now {
            Some(t) if self.live.get(&id) == Some(&t) => false,
            Some(t) => {
                self.live.insert(id, t);
                true
            }
            None => {
                self.live.remove(&id);
                self.elsewhere.remove(&id);
                if self.ended.len() >= ENDED_MEMORY {
                    self.ended.clear();
                }
                self.ended.insert(id)
            }
        }
    }
}
