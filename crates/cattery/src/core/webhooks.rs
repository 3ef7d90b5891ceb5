//! Outbound webhooks: an org's endpoints receive its events (`session.started`,
//! `session.ended`, `deployment.ready`, `deployment.failed`) as signed POSTs in the Standard
//! Webhooks format (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`, an
//! HMAC-SHA256 with the endpoint's `whsec_` secret; the `standardwebhooks` crate signs).
//!
//! The body is Pipecat Cloud's envelope: `{"event_type", "org", "created_at", "data"}` with
//! snake_case `data` (see docs/webhooks.md).
//!
//! Delivery: the engine emits an event ([`EventSink::emit`], never blocking); when an endpoint
//! of the org subscribes to it, one task writes a delivery per endpoint to the store, in
//! emission order (a bounded channel in front of it: when it is full, events are dropped and
//! counted in the log). The store is the queue, so queued events survive a restart or a
//! crash. The dispatcher takes the oldest pending delivery of each endpoint (never a later
//! one first, so events arrive in order), POSTs it, and on anything but 2xx tries it again
//! after 1 s, 2 s, 4 s, ... up to [`WebhookSettings::retry_max`], until
//! [`WebhookSettings::give_up_after`] has passed since the event. Each endpoint holds at most
//! [`WebhookSettings::max_pending`] pending deliveries. Finished deliveries are the delivery
//! log (`GET /v1/webhooks/{id}/deliveries`), kept for [`WebhookSettings::keep_log`].
//!
//! An endpoint's URL may carry a credential: logs name the endpoint by id only. Its secret is
//! stored sealed (`core::secrets`).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine as _;
use parking_lot::RwLock;
use rand::RngCore as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::secrets::SecretCipher;
use super::{CoreError, CoreResult};
use crate::model::{iso_ms, now_ms};
use crate::store::{DeliveryAttempt, DeliveryState, Store, WebhookDelivery, WebhookEndpointRecord};

/// Every event type an endpoint can receive.
pub const EVENT_TYPES: [&str; 4] = [
    "deployment.failed",
    "deployment.ready",
    "session.ended",
    "session.started",
];

/// Endpoints an org may have.
pub const MAX_ENDPOINTS_PER_ORG: usize = 20;
/// Events waiting to be queued in the store before new ones are dropped.
const CHANNEL: usize = 10_000;
/// Deliveries taken per round (at most one per endpoint).
const CLAIM_BATCH: i64 = 64;
/// How often the dispatcher looks for due deliveries when nothing wakes it.
const POLL: Duration = Duration::from_millis(250);
/// How often endpoints are read again from the store (other nodes may change them).
const RELOAD: Duration = Duration::from_secs(15);

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Pending deliveries one endpoint may hold; further events for it are dropped.
    pub max_pending: i64,
    /// How long one POST may take.
    pub timeout: Duration,
    /// Wait before the first retry; doubles each time.
    pub retry_first: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
    /// A delivery still failing this long after its event is given up.
    pub give_up_after: Duration,
    /// How long finished deliveries stay in the log.
    pub keep_log: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            max_pending: 10_000,
            timeout: Duration::from_secs(10),
            retry_first: Duration::from_secs(1),
            retry_max: Duration::from_secs(600),
            give_up_after: Duration::from_secs(24 * 3600),
            keep_log: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Where the engine reports what happened (implemented by [`Webhooks`]).
pub trait EventSink: Send + Sync {
    /// Reports event `event_type` of `org` with its `data`; returns at once.
    fn emit(&self, org: &str, event_type: &'static str, data: Value);

    /// Like [`EventSink::emit`], for an event that happens once however many nodes (or
    /// restarts) report it: `key` names it (e.g. the deployment id), and the store queues
    /// it once per endpoint.
    fn emit_once(&self, org: &str, event_type: &'static str, key: &str, data: Value);
}

/// One event on its way to the store.
struct Event {
    org: String,
    event_type: &'static str,
    data: Value,
    at_ms: i64,
    /// For an event reported once: its name, which fixes each delivery's id.
    once: Option<String>,
}

/// An endpoint as the dispatcher uses it: its secret opened.
struct Live {
    org: String,
    url: String,
    secret: String,
    events: Vec<String>,
}

/// An endpoint as the API shows it (never its secret).
#[derive(custom_debug::Debug, Clone)]
pub struct EndpointView {
    /// Id.
    pub id: Uuid,
    /// URL (may hold a credential: `Debug` shows its scheme and host).
    #[debug(with = crate::redact::url)]
    pub url: String,
    /// Event types it receives.
    pub events: Vec<String>,
    /// Description.
    pub description: String,
    /// Creation time (ms).
    pub created_ms: i64,
}

impl EndpointView {
    fn of(r: &WebhookEndpointRecord) -> Self {
        EndpointView {
            id: r.id,
            url: r.url.clone(),
            events: r.events.clone(),
            description: r.description.clone(),
            created_ms: r.created_ms,
        }
    }
}

/// What creates an endpoint.
#[derive(custom_debug::Debug, Clone, Default)]
pub struct NewEndpoint {
    /// `http://` or `https://` URL.
    #[debug(with = crate::redact::url)]
    pub url: String,
    /// Event types (`None`: all of them).
    pub events: Option<Vec<String>>,
    /// Description.
    pub description: Option<String>,
    /// A `whsec_` secret to use (`None`: a new one).
    #[debug(with = crate::redact::hidden_some)]
    pub secret: Option<String>,
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
type Client = hyper_util::client::legacy::Client<Https, http_body_util::Full<bytes::Bytes>>;

/// The webhook service: endpoints, the queue's writer and the dispatcher. One per server.
pub struct Webhooks {
    store: Arc<dyn Store>,
    cipher: Arc<SecretCipher>,
    cfg: WebhookSettings,
    endpoints: RwLock<HashMap<Uuid, Arc<Live>>>,
    tx: mpsc::Sender<Event>,
    wake: Arc<Notify>,
    http: Client,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

/// The sealing context of an endpoint's secret.
pub(crate) fn sealed_as(id: Uuid) -> String {
    format!("webhook:{id}")
}

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// Checks an endpoint URL: `http` or `https` with a host, at most 2000 characters, no
/// whitespace. Errors: 400 (the message never quotes the URL).
pub fn check_url(url: &str) -> CoreResult<()> {
    let bad = |why: &str| CoreError::bad_request(format!("url: {why}"));
    if url.len() > 2000 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("at most 2000 characters, without spaces"));
    }
    let uri: axum::http::Uri = url
        .parse()
        .map_err(|_| bad("not a valid http:// or https:// URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("only http:// and https:// URLs are accepted")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    Ok(())
}

/// The event types of a request: all when absent; each known, at least one, sorted, no
/// duplicates. Errors: 400 naming the known types.
pub fn check_events(events: Option<&[String]>) -> CoreResult<Vec<String>> {
    let Some(events) = events else {
        return Ok(EVENT_TYPES.iter().map(|e| e.to_string()).collect());
    };
    if let Some(e) = events.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
        return Err(CoreError::bad_request(format!(
            "events: unknown event type {e:?}; known: {}",
            EVENT_TYPES.join(", ")
        )));
    }
    let mut v = events.to_vec();
    v.sort();
    v.dedup();
    if v.is_empty() {
        return Err(CoreError::bad_request(
            "events: give at least one event type (or leave it out for all); to stop an endpoint, delete it",
        ));
    }
    Ok(v)
}

/// Wait before retry number `n` (1 = the first retry): `first`, doubling, at most `max`.
pub fn backoff(n: i64, first: Duration, max: Duration) -> Duration {
    let shift = n.clamp(1, 30) - 1;
    first.saturating_mul(1u32 << shift).min(max)
}

/// The body of an event: Pipecat Cloud's envelope.
pub fn envelope(org: &str, event_type: &str, at_ms: i64, data: &Value) -> String {
    json!({"event_type": event_type, "org": org, "created_at": iso_ms(at_ms), "data": data})
        .to_string()
}

impl Webhooks {
    /// Starts the service: runs the queue's writer and the dispatcher until the service is
    /// dropped. Events are only sent once [`Webhooks::load`] has read the endpoints.
    pub fn start(
        store: Arc<dyn Store>,
        cipher: Arc<SecretCipher>,
        cfg: WebhookSettings,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let w = Arc::new(Webhooks {
            store,
            cipher,
            cfg,
            endpoints: RwLock::new(HashMap::new()),
            tx,
            wake: Arc::new(Notify::new()),
            http: super::daily::https_client(),
        });
        tokio::spawn(writer(Arc::downgrade(&w), rx));
        tokio::spawn(dispatcher(Arc::downgrade(&w), w.wake.clone()));
        w
    }

    /// Reads every endpoint from the store (at start, before the engine recovers, so the
    /// events of the recovery reach them; again every 15 s for changes made by other nodes).
    /// Errors: the store cannot be read.
    pub async fn load(&self) -> CoreResult<()> {
        self.reload().await?;
        self.wake.notify_one();
        Ok(())
    }

    async fn reload(&self) -> CoreResult<()> {
        let all = self.store.list_webhook_endpoints(None).await?;
        let mut map = HashMap::new();
        for r in &all {
            if let Some(l) = self.live(r) {
                map.insert(r.id, Arc::new(l));
            }
        }
        *self.endpoints.write() = map;
        Ok(())
    }

    fn live(&self, r: &WebhookEndpointRecord) -> Option<Live> {
        match self.cipher.open(&r.org, &sealed_as(r.id), &r.secret) {
            Ok(secret) => Some(Live {
                org: r.org.clone(),
                url: r.url.clone(),
                secret,
                events: r.events.clone(),
            }),
            Err(e) => {
                tracing::error!(endpoint = %r.id, error = %e, "cannot open a webhook endpoint's secret; it receives nothing");
                None
            }
        }
    }

    /// Creates an endpoint of `org`; answers it and its secret (shown this once, and by
    /// [`Webhooks::secret`]). Errors: 400 for a bad URL, events, description or secret, or
    /// past [`MAX_ENDPOINTS_PER_ORG`].
    pub async fn create(&self, org: &str, req: NewEndpoint) -> CoreResult<(EndpointView, String)> {
        check_url(&req.url)?;
        let events = check_events(req.events.as_deref())?;
        let description = req.description.unwrap_or_default();
        if description.contains('\0') {
            return Err(CoreError::bad_request(
                "description: must not contain a NUL byte",
            ));
        }
        if description.chars().count() > 500 {
            return Err(CoreError::bad_request(
                "description: at most 500 characters",
            ));
        }
        let secret = match req.secret {
            None => new_secret(),
            Some(s) => {
                let ok = s.starts_with("whsec_")
                    && base64::engine::general_purpose::STANDARD
                        .decode(&s["whsec_".len()..])
                        .is_ok_and(|k| (24..=64).contains(&k.len()));
                if !ok {
                    return Err(CoreError::bad_request(
                        "secret: whsec_ followed by 24 to 64 bytes in base64",
                    ));
                }
                s
            }
        };
        if self.store.list_webhook_endpoints(Some(org)).await?.len() >= MAX_ENDPOINTS_PER_ORG {
            return Err(CoreError::bad_request(format!(
                "an org has at most {MAX_ENDPOINTS_PER_ORG} webhook endpoints"
            )));
        }
        let id = Uuid::new_v4();
        let rec = WebhookEndpointRecord {
            id,
            org: org.to_string(),
            url: req.url,
            events,
            description,
            secret: self.cipher.seal(org, &sealed_as(id), "secret", &secret),
            created_ms: now_ms(),
        };
        self.store.insert_webhook_endpoint(&rec).await?;
        if let Some(l) = self.live(&rec) {
            self.endpoints.write().insert(id, Arc::new(l));
        }
        tracing::info!(org, endpoint = %id, "webhook endpoint created");
        Ok((EndpointView::of(&rec), secret))
    }

    /// The endpoints of `org`, oldest first.
    pub async fn list(&self, org: &str) -> CoreResult<Vec<EndpointView>> {
        Ok(self
            .store
            .list_webhook_endpoints(Some(org))
            .await?
            .iter()
            .map(EndpointView::of)
            .collect())
    }

    async fn record(&self, org: &str, id: Uuid) -> CoreResult<WebhookEndpointRecord> {
        self.store
            .list_webhook_endpoints(Some(org))
            .await?
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| CoreError::NotFound(format!("webhook endpoint {id} not found")))
    }

    /// One endpoint of `org`. Errors: 404.
    pub async fn get(&self, org: &str, id: Uuid) -> CoreResult<EndpointView> {
        Ok(EndpointView::of(&self.record(org, id).await?))
    }

    /// The signing secret of `org`'s endpoint. Errors: 404; 500 when it cannot be opened.
    pub async fn secret(&self, org: &str, id: Uuid) -> CoreResult<String> {
        let r = self.record(org, id).await?;
        self.cipher
            .open(org, &sealed_as(id), &r.secret)
            .map_err(|e| CoreError::Store(crate::store::StoreError::Invalid(e)))
    }

    /// Deletes `org`'s endpoint with its queue and log. Errors: 404.
    pub async fn delete(&self, org: &str, id: Uuid) -> CoreResult<()> {
        if !self.store.delete_webhook_endpoint(org, id).await? {
            return Err(CoreError::NotFound(format!(
                "webhook endpoint {id} not found"
            )));
        }
        self.endpoints.write().remove(&id);
        tracing::info!(org, endpoint = %id, "webhook endpoint deleted");
        Ok(())
    }

    /// The delivery log of `org`'s endpoint, newest first. Errors: 404.
    pub async fn deliveries(
        &self,
        org: &str,
        id: Uuid,
        limit: i64,
    ) -> CoreResult<Vec<WebhookDelivery>> {
        self.record(org, id).await?;
        Ok(self
            .store
            .list_webhook_deliveries(org, id, limit.clamp(1, 1000))
            .await?)
    }

    /// The deliveries of event `ev`: one per endpoint of its org that receives it.
    fn rows_for(&self, ev: &Event) -> Vec<WebhookDelivery> {
        let eps = self.endpoints.read();
        let mut targets: Vec<Uuid> = eps
            .iter()
            .filter(|(_, e)| e.org == ev.org && e.events.iter().any(|t| t == ev.event_type))
            .map(|(id, _)| *id)
            .collect();
        targets.sort();
        if targets.is_empty() {
            return Vec::new();
        }
        let payload = envelope(&ev.org, ev.event_type, ev.at_ms, &ev.data);
        targets
            .into_iter()
            .map(|endpoint_id| WebhookDelivery {
                id: delivery_id(endpoint_id, ev.event_type, ev.once.as_deref()),
                seq: 0,
                endpoint_id,
                org: ev.org.clone(),
                event_type: ev.event_type.to_string(),
                payload: payload.clone(),
                created_ms: ev.at_ms,
                state: DeliveryState::Pending,
                attempts: 0,
                next_attempt_ms: ev.at_ms,
                last_status: None,
                last_error: None,
                finished_ms: None,
            })
            .collect()
    }

    /// One attempt of one delivery, recorded in the store.
    async fn deliver(&self, d: WebhookDelivery) {
        let ep = self.endpoints.read().get(&d.endpoint_id).cloned();
        let now = now_ms();
        let Some(ep) = ep else {
            // Deleted meanwhile (its rows go with it) or unreadable: given up.
            let a = DeliveryAttempt {
                state: DeliveryState::Failed,
                next_attempt_ms: now,
                status: None,
                error: Some("the endpoint is gone or its secret cannot be read".into()),
                at_ms: now,
            };
            let _ = self.store.record_webhook_attempt(d.id, &a).await;
            return;
        };
        let (status, error) = match self.post(&ep, &d).await {
            Ok(s) if (200..300).contains(&s) => (Some(i64::from(s)), None),
            Ok(s) => (
                Some(i64::from(s)),
                Some(format!("the endpoint answered HTTP {s}")),
            ),
            Err(e) => (None, Some(e)),
        };
        let at = now_ms();
        let a = match error {
            None => DeliveryAttempt {
                state: DeliveryState::Delivered,
                next_attempt_ms: at,
                status,
                error: None,
                at_ms: at,
            },
            Some(error) => {
                let give_up = at - d.created_ms >= self.cfg.give_up_after.as_millis() as i64;
                let wait = backoff(d.attempts + 1, self.cfg.retry_first, self.cfg.retry_max);
                tracing::debug!(endpoint = %d.endpoint_id, delivery = %d.id, attempt = d.attempts + 1, %error, "webhook delivery failed");
                if give_up {
                    tracing::warn!(endpoint = %d.endpoint_id, delivery = %d.id, event = %d.event_type, "webhook delivery given up");
                }
                DeliveryAttempt {
                    state: if give_up {
                        DeliveryState::Failed
                    } else {
                        DeliveryState::Pending
                    },
                    next_attempt_ms: at + wait.as_millis() as i64,
                    status,
                    error: Some(error),
                    at_ms: at,
                }
            }
        };
        if let Err(e) = self.store.record_webhook_attempt(d.id, &a).await {
            // The lease runs out and it is tried again: at least once, never lost.
            tracing::warn!(delivery = %d.id, error = %e, "could not record a webhook attempt");
        }
    }

    /// POSTs a delivery; answers the status, or why there was none (never the URL).
    async fn post(&self, ep: &Live, d: &WebhookDelivery) -> Result<u16, String> {
        let msg_id = format!("msg_{}", d.id.simple());
        let ts = now_ms() / 1000;
        let signature = standardwebhooks::Webhook::new(&ep.secret)
            .and_then(|w| w.sign(&msg_id, ts, d.payload.as_bytes()))
            .map_err(|e| format!("cannot sign: {e}"))?;
        let req = axum::http::Request::builder()
            .method(axum::http::Method::POST)
            .uri(&ep.url)
            .header("content-type", "application/json")
            .header(
                "user-agent",
                format!("Cattery-Webhooks/{}", crate::build_info::full()),
            )
            .header("webhook-id", &msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(http_body_util::Full::new(bytes::Bytes::from(
                d.payload.clone(),
            )))
            .map_err(|_| "the endpoint URL cannot be requested".to_string())?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
            })?;
            let status = resp.status().as_u16();
            drain_answer(resp.into_body()).await;
            Ok::<_, String>(status)
        };
        tokio::time::timeout(self.cfg.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", self.cfg.timeout.as_secs()))?
    }
}

/// Most of an endpoint's answer body read: only its status counts.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Reads an endpoint's answer body (and drops it) so that its connection can be reused, up
/// to [`MAX_ANSWER_BYTES`]: a longer body (or one that never ends) is left unread, and its
/// connection closed, so an endpoint cannot make the server hold what it sends.
async fn drain_answer<B: hyper::body::Body + Unpin>(mut body: B) {
    use http_body_util::BodyExt as _;
    let mut read = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            read += bytes::Buf::remaining(data);
            if read > MAX_ANSWER_BYTES {
                return;
            }
        }
    }
}

/// A delivery's id: random, or for an event reported once, fixed by its endpoint, type and
/// key (so a second report of it is a duplicate the store drops).
fn delivery_id(endpoint: Uuid, event_type: &str, once: Option<&str>) -> Uuid {
    match once {
        None => Uuid::new_v4(),
        Some(key) => Uuid::new_v5(&endpoint, format!("{event_type}/{key}").as_bytes()),
    }
}

impl EventSink for Webhooks {
    fn emit(&self, org: &str, event_type: &'static str, data: Value) {
        self.queue(org, event_type, None, data);
    }

    fn emit_once(&self, org: &str, event_type: &'static str, key: &str, data: Value) {
        self.queue(org, event_type, Some(key.to_string()), data);
    }
}

impl Webhooks {
    fn queue(&self, org: &str, event_type: &'static str, once: Option<String>, data: Value) {
        let wanted = self
            .endpoints
            .read()
            .values()
            .any(|e| e.org == org && e.events.iter().any(|t| t == event_type));
        if !wanted {
            return;
        }
        let ev = Event {
            org: org.to_string(),
            event_type,
            data,
            at_ms: now_ms(),
            once,
        };
        if self.tx.try_send(ev).is_err() {
            tracing::warn!(org, event = event_type, "webhook queue full: event dropped");
        }
    }
}

/// Writes events to the store in emission order, retrying while the store is unavailable.
async fn writer(w: Weak<Webhooks>, mut rx: mpsc::Receiver<Event>) {
    while let Some(ev) = rx.recv().await {
        let Some(w) = w.upgrade() else { return };
        let rows = w.rows_for(&ev);
        if rows.is_empty() {
            continue;
        }
        let mut wait = Duration::from_millis(100);
        loop {
            match w
                .store
                .enqueue_webhook_deliveries(&rows, w.cfg.max_pending)
                .await
            {
                Ok(n) => {
                    if (n as usize) < rows.len() {
                        tracing::warn!(org = %ev.org, event = ev.event_type, dropped = rows.len() - n as usize, "webhook endpoint queue full: event dropped for it");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not queue a webhook event; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        w.wake.notify_one();
    }
}

/// Takes due deliveries and sends them (one at a time per endpoint, endpoints at once),
/// until the service is dropped.
async fn dispatcher(w: Weak<Webhooks>, wake: Arc<Notify>) {
    let mut reloaded = tokio::time::Instant::now();
    let mut pruned = tokio::time::Instant::now();
    loop {
        let notified = wake.notified();
        {
            let Some(w) = w.upgrade() else { return };
            if reloaded.elapsed() >= RELOAD {
                reloaded = tokio::time::Instant::now();
                if let Err(e) = w.reload().await {
                    tracing::warn!(error = %e, "could not read webhook endpoints");
                }
            }
            if pruned.elapsed() >= Duration::from_secs(3600) {
                pruned = tokio::time::Instant::now();
                let before = now_ms() - w.cfg.keep_log.as_millis() as i64;
                if let Err(e) = w.store.prune_webhook_deliveries(before).await {
                    tracing::warn!(error = %e, "could not prune the webhook delivery log");
                }
            }
            if !w.endpoints.read().is_empty() {
                let now = now_ms();
                let lease = now + w.cfg.timeout.as_millis() as i64 * 3;
                match w
                    .store
                    .claim_webhook_deliveries(now, lease, CLAIM_BATCH)
                    .await
                {
                    Ok(batch) if !batch.is_empty() => {
                        futures_util::future::join_all(batch.into_iter().map(|d| w.deliver(d)))
                            .await;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not read the webhook queue"),
                }
            }
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event reported once has the same delivery id however often (and on whichever
    /// node) it is reported, so the store queues it once (the store conformance suite checks
    /// that a queued id is not queued again); other events get a new id every time.
    #[test]
    fn an_event_reported_once_has_one_delivery_id_per_endpoint() {
        let (e1, e2) = (Uuid::new_v4(), Uuid::new_v4());
        let ready = |e, key| delivery_id(e, "deployment.ready", Some(key));
        assert_eq!(ready(e1, "d1"), ready(e1, "d1"));
        assert_ne!(ready(e1, "d1"), ready(e2, "d1"));
        assert_ne!(ready(e1, "d1"), ready(e1, "d2"));
        assert_ne!(
            ready(e1, "d1"),
            delivery_id(e1, "deployment.failed", Some("d1"))
        );
        assert_ne!(
            delivery_id(e1, "session.ended", None),
            delivery_id(e1, "session.ended", None)
        );
    }

    /// A receiver that answers 200 and then streams a body without end: the attempt reads
    /// a bounded part of it and answers the status at once, never holding (in memory) what
    /// the endpoint sends until the timeout.
    #[tokio::test]
    async fn an_endless_answer_body_is_not_read_to_its_end() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let _ = c.read(&mut buf).await;
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
            c.write_all(head.as_bytes()).await.unwrap();
            let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
            // 8 MiB, then silence (a body that never ends).
            for _ in 0..128 {
                if c.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(dir.path())
                .await
                .unwrap(),
        );
        let cfg = WebhookSettings {
            timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let w = Webhooks::start(store, Arc::new(SecretCipher::from_key(&[1; 32])), cfg);
        let ep = Live {
            org: "acme".into(),
            url: format!("http://{addr}/hook"),
            secret: new_secret(),
            events: vec!["session.ended".into()],
        };
        let d = WebhookDelivery {
            id: Uuid::new_v4(),
            seq: 0,
            endpoint_id: Uuid::new_v4(),
            org: "acme".into(),
            event_type: "session.ended".into(),
            payload: "{}".into(),
            created_ms: now_ms(),
            state: DeliveryState::Pending,
            attempts: 0,
            next_attempt_ms: 0,
            last_status: None,
            last_error: None,
            finished_ms: None,
        };
        let begun = std::time::Instant::now();
        assert_eq!(w.post(&ep, &d).await, Ok(200));
        assert!(
            begun.elapsed() < Duration::from_secs(2),
            "the attempt waited for the body's end: {:?}",
            begun.elapsed()
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (f, m) = (Duration::from_secs(1), Duration::from_secs(600));
        let waits: Vec<u64> = (1..=12).map(|n| backoff(n, f, m).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(backoff(1000, f, m), m);
    }

    #[test]
    fn urls_and_events_are_checked() {
        assert!(check_url("https://hooks.example.com/x?token=abc").is_ok());
        assert!(check_url("http://127.0.0.1:8080/").is_ok());
        for bad in [
            "ftp://x/",
            "hooks.example.com",
            "https:///x",
            "http://a b/",
            "",
        ] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.starts_with("url:"), "{bad}: {e}");
        }
        assert_eq!(check_events(None).unwrap().len(), EVENT_TYPES.len());
        let v = check_events(Some(&["session.ended".into(), "session.ended".into()])).unwrap();
        assert_eq!(v, ["session.ended"]);
        assert!(check_events(Some(&[])).is_err());
        assert!(check_events(Some(&["build.succeeded".into()])).is_err());
    }

    #[test]
    fn the_body_is_pipecat_clouds_envelope_and_the_signature_verifies() {
        let body = envelope("acme", "session.started", 0, &json!({"session_id": "s"}));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"event_type": "session.started", "org": "acme",
                   "created_at": "1970-01-01T00:00:00.000Z", "data": {"session_id": "s"}})
        );
        let secret = new_secret();
        assert!(secret.starts_with("whsec_"));
        let w = standardwebhooks::Webhook::new(&secret).unwrap();
        let ts = now_ms() / 1000;
        let sig = w.sign("msg_1", ts, body.as_bytes()).unwrap();
        let mut h = axum::http::HeaderMap::new();
        h.insert("webhook-id", "msg_1".parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", sig.parse().unwrap());
        w.verify(body.as_bytes(), &h).unwrap();
        assert!(w.verify(b"{}", &h).is_err());
    }
}
