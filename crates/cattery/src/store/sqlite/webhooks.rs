//! Webhook endpoints and their delivery queue and log.

use async_trait::async_trait;
use uuid::Uuid;

use super::conn::{Row, Val};
use super::SqliteStore;
use crate::store::{
    DeliveryAttempt, DeliveryState, SealedValue, StoreError, StoreResult, WebhookDelivery,
    WebhookEndpointRecord, WebhookStore,
};

const ENDPOINT_COLS: &str = "id, org, url, events, description, nonce, ciphertext, created_ms";
const DELIVERY_COLS: &str = "id, seq, endpoint_id, org, event_type, payload, created_ms, state, \
     attempts, next_attempt_ms, last_status, last_error, finished_ms";

fn endpoint_from_row(r: &Row<'_>) -> StoreResult<WebhookEndpointRecord> {
    Ok(WebhookEndpointRecord {
        id: r.uuid(0)?,
        org: r.string(1),
        url: r.string(2),
        events: r
            .string(3)
            .split(',')
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect(),
        description: r.string(4),
        secret: SealedValue {
            key: "secret".into(),
            nonce: r.blob(5),
            ciphertext: r.blob(6),
        },
        created_ms: r.int(7).unwrap_or_default(),
    })
}

fn delivery_from_row(r: &Row<'_>) -> StoreResult<WebhookDelivery> {
    let state = r.string(7);
    Ok(WebhookDelivery {
        id: r.uuid(0)?,
        seq: r.int(1).unwrap_or_default(),
        endpoint_id: r.uuid(2)?,
        org: r.string(3),
        event_type: r.string(4),
        payload: r.string(5),
        created_ms: r.int(6).unwrap_or_default(),
        state: DeliveryState::parse(&state)
            .ok_or_else(|| StoreError::Invalid(format!("delivery state {state:?}")))?,
        attempts: r.int(8).unwrap_or_default(),
        next_attempt_ms: r.int(9).unwrap_or_default(),
        last_status: r.int(10),
        last_error: r.text(11),
        finished_ms: r.int(12),
    })
}

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn insert_webhook_endpoint(&self, e: &WebhookEndpointRecord) -> StoreResult<()> {
        let e = e.clone();
        self.write_tx(move |db| {
            let events = e.events.join(",");
            db.exec(
                &format!("INSERT INTO webhook_endpoints ({ENDPOINT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                &[
                    e.id.into(),
                    Val::Text(&e.org),
                    Val::Text(&e.url),
                    Val::Text(&events),
                    Val::Text(&e.description),
                    Val::Blob(&e.secret.nonce),
                    Val::Blob(&e.secret.ciphertext),
                    e.created_ms.into(),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn list_webhook_endpoints(
        &self,
        org: Option<&str>,
    ) -> StoreResult<Vec<WebhookEndpointRecord>> {
        let org = org.map(str::to_string);
        self.scan(move |db| {
            db.query_all(
                &format!(
                    "SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE ?1 IS NULL OR org = ?1 \
                     ORDER BY created_ms, id"
                ),
                &[org.as_ref().into()],
                endpoint_from_row,
            )
        })
        .await
    }

    async fn delete_webhook_endpoint(&self, org: &str, id: Uuid) -> StoreResult<bool> {
        let org = org.to_string();
        self.write_tx(move |db| {
            db.atomic(|db| {
                let n = db.exec(
                    "DELETE FROM webhook_endpoints WHERE id = ? AND org = ?",
                    &[id.into(), Val::Text(&org)],
                )?;
                if n > 0 {
                    db.exec(
                        "DELETE FROM webhook_deliveries WHERE endpoint_id = ?",
                        &[id.into()],
                    )?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn enqueue_webhook_deliveries(
        &self,
        ds: &[WebhookDelivery],
        max_pending: i64,
    ) -> StoreResult<u64> {
        let ds = ds.to_vec();
        self.write(move |db| {
            db.atomic(|db| {
                let mut n = 0;
                for d in &ds {
                    n += db.exec(
                        "INSERT INTO webhook_deliveries (id, endpoint_id, org, event_type, payload, \
                         created_ms, state, attempts, next_attempt_ms) \
                         SELECT ?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7 \
                         WHERE EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = ?2) \
                         AND (SELECT COUNT(*) FROM webhook_deliveries \
                              WHERE state = 'pending' AND endpoint_id = ?2) < ?8 \
                         ON CONFLICT (id) DO NOTHING",
                        &[
                            d.id.into(),
                            d.endpoint_id.into(),
                            Val::Text(&d.org),
                            Val::Text(&d.event_type),
                            Val::Text(&d.payload),
                            d.created_ms.into(),
                            d.next_attempt_ms.into(),
                            max_pending.into(),
                        ],
                    )?;
                }
                Ok(n)
            })
        })
        .await
    }

    async fn claim_webhook_deliveries(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        self.write(move |db| {
            let mut v = db.query_all(
                &format!(
                    "UPDATE webhook_deliveries SET next_attempt_ms = ?2 \
                     WHERE next_attempt_ms <= ?1 AND seq IN ( \
                       SELECT d.seq FROM webhook_deliveries d \
                       JOIN (SELECT MIN(seq) AS seq FROM webhook_deliveries \
                             WHERE state = 'pending' GROUP BY endpoint_id) h ON d.seq = h.seq \
                       WHERE d.next_attempt_ms <= ?1 ORDER BY d.seq LIMIT ?3) \
                     RETURNING {DELIVERY_COLS}"
                ),
                &[now_ms.into(), lease_until_ms.into(), limit.into()],
                delivery_from_row,
            )?;
            v.sort_by_key(|d| d.seq);
            Ok(v)
        })
        .await
    }

    async fn record_webhook_attempt(&self, id: Uuid, a: &DeliveryAttempt) -> StoreResult<()> {
        let a = a.clone();
        self.write(move |db| {
            let finished = (a.state != DeliveryState::Pending).then_some(a.at_ms);
            db.exec(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, state = ?, \
                 next_attempt_ms = ?, last_status = ?, last_error = ?, finished_ms = ? \
                 WHERE id = ?",
                &[
                    Val::Text(a.state.as_str()),
                    a.next_attempt_ms.into(),
                    a.status.into(),
                    a.error.as_ref().into(),
                    finished.into(),
                    id.into(),
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn list_webhook_deliveries(
        &self,
        org: &str,
        endpoint_id: Uuid,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        let org = org.to_string();
        self.scan(move |db| {
            db.query_all(
                &format!(
                    "SELECT {DELIVERY_COLS} FROM webhook_deliveries \
                     WHERE endpoint_id = ? AND org = ? ORDER BY seq DESC LIMIT ?"
                ),
                &[endpoint_id.into(), Val::Text(&org), limit.into()],
                delivery_from_row,
            )
        })
        .await
    }

    async fn prune_webhook_deliveries(&self, before_ms: i64) -> StoreResult<u64> {
        self.write(move |db| {
            db.exec(
                "DELETE FROM webhook_deliveries WHERE state != 'pending' AND finished_ms < ?",
                &[before_ms.into()],
            )
        })
        .await
    }
}
