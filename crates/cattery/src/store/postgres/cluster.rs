//! Capacity slots, websocket tokens and the change feed, for several nodes on one database.
//!
//! A reservation is one statement: the agent's `agent_capacity` row is inserted or incremented
//! only while `used < max` (`INSERT .. ON CONFLICT DO UPDATE .. WHERE`, which takes the row's
//! lock and re-checks the condition on its newest version, so concurrent reservers on any
//! node queue on that row and never pass `max`), and the slot row is inserted from its result.
//! Every release changes the slot rows and the count in one statement too.

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgConnection, Row};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::PgStore;
use crate::store::{AgentCounts, Change, ClusterStore, StoreResult, WsTokenRecord};

/// The channel of `migrations/postgres/0003`'s triggers.
const CHANNEL: &str = "cattery_changes";
/// The channel of `migrations/postgres/0012`'s session triggers (only while a node watches).
const SESSIONS_CHANNEL: &str = "cattery_sessions";

/// Frees the slot of instance `$1` and decrements its agent's count (one statement).
pub(super) const RELEASE_SQL: &str =
    "WITH d AS (DELETE FROM capacity_slots WHERE instance_id = $1 \
    RETURNING agent_id) UPDATE agent_capacity a SET used = a.used - 1 FROM d \
    WHERE a.agent_id = d.agent_id";

/// [`RELEASE_SQL`] on a connection (inside an instance's end or delete).
pub(super) async fn release(db: &mut PgConnection, instance: Uuid) -> StoreResult<()> {
    sqlx::query(RELEASE_SQL).bind(instance).execute(db).await?;
    Ok(())
}

fn token_from_row(r: &PgRow) -> StoreResult<WsTokenRecord> {
    Ok(WsTokenRecord {
        hash: r.try_get(0)?,
        org: r.try_get(1)?,
        agent: r.try_get(2)?,
        session_id: r.try_get(3)?,
        body: r.try_get(4)?,
        expires_ms: r.try_get(5)?,
    })
}

/// A notification of [`SESSIONS_CHANNEL`] (`<node>:<session id>:<org>`) as a change; `None`
/// for a payload that does not parse (ignored: it names no session this node could read).
fn session_change_of(payload: &str) -> Option<Change> {
    let (node, rest) = payload.split_once(':')?;
    let (id, org) = rest.split_once(':')?;
    Some(Change::Session {
        node: node.to_string(),
        org: org.to_string(),
        id: Uuid::parse_str(id).ok()?,
    })
}

/// A notification's payload as a change (unknown ones: reread everything).
fn change_of(payload: &str) -> Change {
    match payload.split_once(':') {
        Some(("agent", id)) => Uuid::parse_str(id).map_or(Change::Resync, Change::Agent),
        _ if payload == "key" => Change::Key,
        _ => Change::Resync,
    }
}

#[async_trait]
impl ClusterStore for PgStore {
    async fn reserve_slot(
        &self,
        agent_id: Uuid,
        max: u32,
        instance_id: Uuid,
        node: &str,
    ) -> StoreResult<bool> {
        if max == 0 {
            return Ok(false);
        }
        let n = sqlx::query(
            "WITH c AS (INSERT INTO agent_capacity AS a (agent_id, used) VALUES ($1, 1) \
             ON CONFLICT (agent_id) DO UPDATE SET used = a.used + 1 WHERE a.used < $2 \
             RETURNING a.agent_id) \
             INSERT INTO capacity_slots (instance_id, agent_id, node_id, created_ms) \
             SELECT $3, c.agent_id, $4, $5 FROM c",
        )
        .bind(agent_id)
        .bind(i64::from(max))
        .bind(instance_id)
        .bind(node)
        .bind(crate::model::now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn release_slot(&self, instance_id: Uuid) -> StoreResult<()> {
        sqlx::query(RELEASE_SQL)
            .bind(instance_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn slots_held(&self, agent_id: Uuid) -> StoreResult<u32> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT used FROM agent_capacity WHERE agent_id = $1")
                .bind(agent_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(u32::try_from(n.unwrap_or(0)).unwrap_or(u32::MAX))
    }

    async fn agent_counts(
        &self,
        agent_id: Uuid,
        deployment: Uuid,
        node: &str,
    ) -> StoreResult<AgentCounts> {
        // One statement: the open sessions through the partial index `sessions_active`, the
        // other nodes' instance records (live instances only: a few rows per node) counted in
        // one pass.
        let (open, promised, unpromised, total): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM sessions WHERE agent_id = $1 AND ended_ms IS NULL), \
             COUNT(*) FILTER (WHERE session_id IS NOT NULL), \
             COUNT(*) FILTER (WHERE session_id IS NULL AND deployment_id = $2), \
             COUNT(*) \
             FROM instances WHERE agent_id = $1 AND node_id <> $3",
        )
        .bind(agent_id)
        .bind(deployment)
        .bind(node)
        .fetch_one(&self.pool)
        .await?;
        let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(AgentCounts {
            open_sessions: n(open),
            others_promised: n(promised),
            others_unpromised: n(unpromised),
            others_total: n(total),
        })
    }

    async fn nodes_with_unpromised(
        &self,
        agent_id: Uuid,
        deployment: Uuid,
        node: &str,
    ) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT node_id FROM instances WHERE agent_id = $1 AND deployment_id = $2 \
             AND session_id IS NULL AND node_id <> $3 ORDER BY node_id",
        )
        .bind(agent_id)
        .bind(deployment)
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    async fn release_orphan_slots(&self, node: &str, keep: &[Uuid]) -> StoreResult<u64> {
        let n = sqlx::query(
            "WITH d AS (DELETE FROM capacity_slots s WHERE s.node_id = $1 \
             AND NOT (s.instance_id = ANY($2)) \
             AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = s.instance_id) \
             RETURNING agent_id), \
             g AS (SELECT agent_id, COUNT(*) AS n FROM d GROUP BY agent_id) \
             UPDATE agent_capacity a SET used = a.used - g.n FROM g WHERE a.agent_id = g.agent_id \
             RETURNING g.n",
        )
        .bind(node)
        .bind(keep)
        .fetch_all(&self.pool)
        .await?;
        let mut total = 0u64;
        for r in &n {
            total += u64::try_from(r.try_get::<i64, _>(0)?).unwrap_or(0);
        }
        Ok(total)
    }

    async fn put_ws_token(&self, t: &WsTokenRecord, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "WITH gone AS (DELETE FROM ws_tokens WHERE expires_ms < $7) \
             INSERT INTO ws_tokens (hash, org, agent, session_id, body, expires_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.hash)
        .bind(&t.org)
        .bind(&t.agent)
        .bind(t.session_id)
        .bind(&t.body)
        .bind(t.expires_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_ws_token(
        &self,
        hash: &[u8],
        org: &str,
        agent: &str,
    ) -> StoreResult<Option<WsTokenRecord>> {
        let row = sqlx::query(
            "DELETE FROM ws_tokens WHERE hash = $1 AND org = $2 AND agent = $3 \
             RETURNING hash, org, agent, session_id, body, expires_ms",
        )
        .bind(hash)
        .bind(org)
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn revoke_ws_tokens(&self, org: &str, agent: &str, session: Uuid) -> StoreResult<bool> {
        let n =
            sqlx::query("DELETE FROM ws_tokens WHERE session_id = $1 AND org = $2 AND agent = $3")
                .bind(session)
                .bind(org)
                .bind(agent)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(n > 0)
    }

    async fn watch_changes(&self) -> StoreResult<Option<mpsc::Receiver<Change>>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen_all([CHANNEL, SESSIONS_CHANNEL]).await?;
        let (tx, rx) = mpsc::channel(1024);
        let keys = self.keys.clone();
        keys.enable(true);
        tokio::spawn(async move {
            loop {
                let change = match listener.try_recv().await {
                    Ok(Some(n)) => {
                        // A notification came through: the feed is live (again).
                        keys.enable(true);
                        if n.channel() == SESSIONS_CHANNEL {
                            match session_change_of(n.payload()) {
                                Some(c) => c,
                                None => continue,
                            }
                        } else {
                            change_of(n.payload())
                        }
                    }
                    // The connection was lost and has been made again (sqlx reconnects and
                    // listens again before it answers `None`): whatever was sent meanwhile is
                    // missed, and the key cache is off until a notification shows the feed
                    // works again.
                    Ok(None) => {
                        keys.enable(false);
                        Change::Resync
                    }
                    Err(e) => {
                        keys.enable(false);
                        tracing::warn!(error = %e, "change feed: cannot listen; retrying");
                        listen_again(&mut listener).await;
                        Change::Resync
                    }
                };
                if change == Change::Key {
                    keys.clear();
                }
                let sent = match tx.try_send(change) {
                    Ok(()) => true,
                    // A slow reader: it rereads everything.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tx.send(Change::Resync).await.is_ok()
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                };
                if !sent {
                    break;
                }
            }
        });
        Ok(Some(rx))
    }

    async fn watch_sessions(&self, node: &str, on: bool) -> StoreResult<()> {
        if on {
            sqlx::query(
                "INSERT INTO session_watchers (node_id, until) \
                 VALUES ($1, now() + make_interval(secs => $2)) \
                 ON CONFLICT (node_id) DO UPDATE SET until = EXCLUDED.until",
            )
            .bind(node)
            .bind(crate::store::SESSION_WATCH_LEASE.as_secs_f64())
            .execute(&self.pool)
            .await?;
        } else {
            sqlx::query("DELETE FROM session_watchers WHERE node_id = $1")
                .bind(node)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }
}

/// Waits until `listener` listens again (a statement on it makes its connection again and
/// listens to its channels first), trying every second: a [`Change::Resync`] sent after this
/// misses nothing, where one sent before the connection is back would miss what comes
/// between.
async fn listen_again(listener: &mut PgListener) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        match sqlx::query("SELECT 1").execute(&mut *listener).await {
            Ok(_) => return,
            Err(e) => tracing::debug!(error = %e, "change feed: still cannot listen"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_read_as_changes() {
        let id = Uuid::new_v4();
        assert_eq!(change_of(&format!("agent:{id}")), Change::Agent(id));
        assert_eq!(change_of("key"), Change::Key);
        assert_eq!(change_of("agent:nope"), Change::Resync);
        assert_eq!(change_of("other"), Change::Resync);
    }

    #[test]
    fn session_notifications_name_the_writer_the_session_and_its_org() {
        let id = Uuid::new_v4();
        assert_eq!(
            session_change_of(&format!("n1:{id}:acme:eu")),
            Some(Change::Session {
                node: "n1".into(),
                org: "acme:eu".into(),
                id
            })
        );
        // A writer that names no node.
        assert_eq!(
            session_change_of(&format!(":{id}:o")),
            Some(Change::Session {
                node: String::new(),
                org: "o".into(),
                id
            })
        );
        assert_eq!(session_change_of("n1:nope:o"), None);
        assert_eq!(session_change_of("n1"), None);
    }
}
