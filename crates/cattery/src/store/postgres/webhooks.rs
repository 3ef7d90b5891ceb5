//! Webhook endpoints and their delivery queue and log.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::PgStore;
use crate::store::{
    DeliveryAttempt, DeliveryState, SealedValue, StoreError, StoreResult, WebhookDelivery,
    WebhookEndpointRecord, WebhookStore,
};

const ENDPOINT_COLS: &str = "id, org, url, events, description, nonce, ciphertext, created_ms";
const DELIVERY_COLS: &str = "id, seq, endpoint_id, org, event_type, payload, created_ms, state, \
     attempts, next_attempt_ms, last_status, last_error, finished_ms";

fn endpoint_from_row(r: &PgRow) -> StoreResult<WebhookEndpointRecord> {
    let events: String = r.try_get(3)?;
    Ok(WebhookEndpointRecord {
        id: r.try_get(0)?,
        org: r.try_get(1)?,
        url: r.try_get(2)?,
        events: events
            .split(',')
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect(),
        description: r.try_get(4)?,
        secret: SealedValue {
            key: "secret".into(),
            nonce: r.try_get(5)?,
            ciphertext: r.try_get(6)?,
        },
        created_ms: r.try_get(7)?,
    })
}

fn delivery_from_row(r: &PgRow) -> StoreResult<WebhookDelivery> {
    let state: String = r.try_get(7)?;
    Ok(WebhookDelivery {
        id: r.try_get(0)?,
        seq: r.try_get(1)?,
        endpoint_id: r.try_get(2)?,
        org: r.try_get(3)?,
        event_type: r.try_get(4)?,
        payload: r.try_get(5)?,
        created_ms: r.try_get(6)?,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| StoreError::Invalid(format!("delivery state {state:?}")))?,
        attempts: r.try_get(8)?,
        next_attempt_ms: r.try_get(9)?,
        last_status: r.try_get(10)?,
        last_error: r.try_get(11)?,
        finished_ms: r.try_get(12)?,
    })
}

#[async_trait]
impl WebhookStore for PgStore {
    async fn insert_webhook_endpoint(&self, e: &WebhookEndpointRecord) -> StoreResult<()> {
        super::query_dyn(&format!(
            "INSERT INTO webhook_endpoints ({ENDPOINT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(e.id)
        .bind(&e.org)
        .bind(&e.url)
        .bind(e.events.join(","))
        .bind(&e.description)
        .bind(&e.secret.nonce)
        .bind(&e.secret.ciphertext)
        .bind(e.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_webhook_endpoints(
        &self,
        org: Option<&str>,
    ) -> StoreResult<Vec<WebhookEndpointRecord>> {
        let rows = super::query_dyn(&format!(
            "SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE $1::TEXT IS NULL OR org = $1 \
             ORDER BY created_ms, id"
        ))
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(endpoint_from_row).collect()
    }

    async fn delete_webhook_endpoint(&self, org: &str, id: Uuid) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1 AND org = $2")
            .bind(id)
            .bind(org)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            sqlx::query("DELETE FROM webhook_deliveries WHERE endpoint_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn enqueue_webhook_deliveries(
        &self,
        ds: &[WebhookDelivery],
        max_pending: i64,
    ) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for d in ds {
            // The endpoint's row is locked so two nodes count its pending deliveries in turn.
            n += sqlx::query(
                "WITH e AS (SELECT id FROM webhook_endpoints WHERE id = $2 FOR UPDATE) \
                 INSERT INTO webhook_deliveries (id, endpoint_id, org, event_type, payload, \
                 created_ms, state, attempts, next_attempt_ms) \
                 SELECT $1, e.id, $3, $4, $5, $6, 'pending', 0, $7 FROM e \
                 WHERE (SELECT COUNT(*) FROM webhook_deliveries \
                        WHERE state = 'pending' AND endpoint_id = $2) < $8 \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(d.id)
            .bind(d.endpoint_id)
            .bind(&d.org)
            .bind(&d.event_type)
            .bind(&d.payload)
            .bind(d.created_ms)
            .bind(d.next_attempt_ms)
            .bind(max_pending)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn claim_webhook_deliveries(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        // `next_attempt_ms <= $1` is checked again on the locked row, so of two nodes
        // claiming at once only the first takes a delivery.
        let rows = super::query_dyn(&format!(
            "UPDATE webhook_deliveries SET next_attempt_ms = $2 \
             WHERE next_attempt_ms <= $1 AND seq IN ( \
               SELECT d.seq FROM webhook_deliveries d \
               JOIN (SELECT MIN(seq) AS seq FROM webhook_deliveries \
                     WHERE state = 'pending' GROUP BY endpoint_id) h ON d.seq = h.seq \
               WHERE d.next_attempt_ms <= $1 ORDER BY d.seq LIMIT $3) \
             RETURNING {DELIVERY_COLS}"
        ))
        .bind(now_ms)
        .bind(lease_until_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut v = rows
            .iter()
            .map(delivery_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        v.sort_by_key(|d| d.seq);
        Ok(v)
    }

    async fn record_webhook_attempt(&self, id: Uuid, a: &DeliveryAttempt) -> StoreResult<()> {
        let finished = (a.state != DeliveryState::Pending).then_some(a.at_ms);
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = $1, \
             next_attempt_ms = $2, last_status = $3, last_error = $4, finished_ms = $5 \
             WHERE id = $6",
        )
        .bind(a.state.as_str())
        .bind(a.next_attempt_ms)
        .bind(a.status)
        .bind(&a.error)
        .bind(finished)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_webhook_deliveries(
        &self,
        org: &str,
        endpoint_id: Uuid,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        let rows = super::query_dyn(&format!(
            "SELECT {DELIVERY_COLS} FROM webhook_deliveries \
             WHERE endpoint_id = $1 AND org = $2 ORDER BY seq DESC LIMIT $3"
        ))
        .bind(endpoint_id)
        .bind(org)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn prune_webhook_deliveries(&self, before_ms: i64) -> StoreResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM webhook_deliveries WHERE state <> 'pending' AND finished_ms < $1",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
