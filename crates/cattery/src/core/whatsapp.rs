//! WhatsApp Business calling (Pipecat Cloud's WhatsApp guide): Meta's webhook for an agent,
//! `/v1/public/webhooks/{org}/{agent}/whatsapp`. Meta's verification handshake, which call
//! an event is about, which session a call gets, and what becomes of an event
//! ([`route_event`]): the handler only translates HTTP.
//!
//! A call's session id is derived from the org, the agent and Meta's call id (a UUIDv5), so
//! every node of a cluster finds the session of a call without a shared table: a `connect`
//! starts it, every later event of the call is forwarded to it, and once it has ended
//! (the bot ends the call on `terminate`) the call maps to nothing live.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use serde_json::Value;
use uuid::Uuid;

use crate::core::secrets::SecretCipher;
use crate::core::session::{StartParams, Supervisor};
use crate::core::CoreError;
use crate::model::SessionRecord;
use crate::store::Store;

/// The `object` of every WhatsApp Business webhook payload.
pub const OBJECT: &str = "whatsapp_business_account";

/// Namespace of the session ids of WhatsApp calls.
const NAMESPACE: Uuid = Uuid::from_u128(0x5b1e_7c0a_4f2d_4e57_9a36_77a3_0d1c_2e41);

/// Meta's verification request (`GET` with `hub.mode`, `hub.verify_token`, `hub.challenge`).
/// Returns the verify token and the challenge to echo, or why the request is not one.
pub fn verification<'a>(
    mode: Option<&'a str>,
    token: Option<&'a str>,
    challenge: Option<&'a str>,
) -> Result<(&'a str, &'a str), &'static str> {
    match (mode, token, challenge) {
        (Some("subscribe"), Some(t), Some(c)) if !t.is_empty() && !c.is_empty() => Ok((t, c)),
        (Some(m), _, _) if m != "subscribe" => Err("hub.mode must be subscribe"),
        _ => Err(
            "a verification request needs hub.mode=subscribe, hub.verify_token and hub.challenge",
        ),
    }
}

/// What a call event asks of the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// A new call (`event: connect`): start its session, then forward.
    Connect(String),
    /// The call ended (`event: terminate`): forward to its session, if live.
    Terminate(String),
    /// Any other event about a call: forward to its session, if live.
    Other(String),
}

impl CallEvent {
    /// Meta's id of the call.
    pub fn call_id(&self) -> &str {
        match self {
            CallEvent::Connect(c) | CallEvent::Terminate(c) | CallEvent::Other(c) => c,
        }
    }
}

/// The call a webhook payload is about: the first `entry[].changes[].value.calls[]` with an
/// `id` (as pipecat's `WhatsAppClient` handles the first call of a payload). `Ok(None)` for
/// a payload about no call (messages, message statuses).
///
/// Errors: the body is not a WhatsApp Business payload (`object` is not
/// `whatsapp_business_account`).
pub fn call_event(body: &Value) -> Result<Option<CallEvent>, String> {
    if body.get("object").and_then(Value::as_str) != Some(OBJECT) {
        return Err(format!(
            "not a WhatsApp Business webhook: `object` must be {OBJECT}"
        ));
    }
    let calls = body
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("changes").and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.pointer("/value/calls").and_then(Value::as_array))
        .flatten();
    for call in calls {
        let Some(id) = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        else {
            continue;
        };
        let id = id.to_string();
        return Ok(Some(match call.get("event").and_then(Value::as_str) {
            Some("connect") => CallEvent::Connect(id),
            Some("terminate") => CallEvent::Terminate(id),
            _ => CallEvent::Other(id),
        }));
    }
    Ok(None)
}

/// The secret of the agent's WhatsApp app, as its bot reads it.
pub const APP_SECRET: &str = "WHATSAPP_APP_SECRET";

/// The `WHATSAPP_APP_SECRET` of deployment `deployment` of an agent of `org`, from the
/// secrets snapshotted with it (what its instances get). `Ok(None)` when it has none.
///
/// Errors: the snapshot cannot be read, or the value cannot be opened (sealed under another
/// secrets key).
pub async fn app_secret(
    store: &Arc<dyn Store>,
    cipher: &SecretCipher,
    org: &str,
    deployment: Uuid,
) -> Result<Option<String>, String> {
    let snap = store
        .deployment_secrets(deployment)
        .await
        .map_err(|e| format!("cannot read the agent's secrets: {e}"))?;
    match snap.iter().find(|(_, v)| v.key == APP_SECRET) {
        Some((set, v)) => cipher.open(org, set, v).map(Some),
        None => Ok(None),
    }
}

/// Checks Meta's `X-Hub-Signature-256` (`sha256=` and the hex HMAC-SHA256 of the body, keyed
/// with the app secret).
pub fn check_signature(
    secret: &str,
    header: Option<&str>,
    body: &[u8],
) -> Result<(), &'static str> {
    let given = header.ok_or("no X-Hub-Signature-256 header")?.trim();
    let hex = given
        .strip_prefix("sha256=")
        .ok_or("X-Hub-Signature-256 does not start with sha256=")?;
    let given = crate::core::daily::hex_digest(&hex.to_ascii_lowercase())
        .ok_or("X-Hub-Signature-256 is not an HMAC-SHA256 digest")?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, body, &given)
        .map_err(|_| "X-Hub-Signature-256 does not match the agent's WHATSAPP_APP_SECRET")
}

/// The session id of call `call_id` to agent `agent` of org `org`.
pub fn session_of_call(org: &str, agent: &str, call_id: &str) -> Uuid {
    let name = format!("{org}\n{agent}\n{call_id}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

/// A call event as it came to an agent's URL: Meta's payload, parsed and raw, and its
/// `x-hub-signature-256`.
pub struct Inbound<'a> {
    pub org: &'a str,
    pub agent: &'a str,
    pub body: &'a Value,
    pub raw: &'a [u8],
    pub signature: Option<&'a str>,
    /// Passed on by another node that found the call's session on this one: it is served
    /// here, never passed on again.
    pub from_peer: bool,
}

/// Where an event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A payload about no call: answered `{"status": "ignored"}`, forwarded nowhere.
    Ignored,
    /// To the instance of session `0`, which runs on this node.
    Here(Uuid),
    /// Unchanged to `node`, which runs `session`.
    Owner { node: String, session: Uuid },
}

/// An event's route, with the call's gate held until it is dropped: the caller keeps it
/// while it forwards the event, so a call's events reach its instance one at a time.
pub struct Routed {
    pub route: Route,
    _gate: Option<CallGate>,
}

/// Why an event goes nowhere.
#[derive(Debug)]
pub enum Refused {
    /// Not a WhatsApp Business payload.
    NotWhatsApp(String),
    /// No such org or agent, or an event it does not take (unsigned or wrongly signed): the
    /// route has no key and must not tell which orgs exist, so both answer alike.
    Unknown,
    /// The call has no live session: it has `ended`, or never started.
    NoSession { call: String, ended: bool },
    /// From a start or the store (a 429 at `maxAgents`, a store that cannot answer; a
    /// `NotFound` is an agent that went away meanwhile).
    Core(CoreError),
}

impl From<CoreError> for Refused {
    fn from(e: CoreError) -> Self {
        Refused::Core(e)
    }
}

/// Decides what becomes of a call event: checks the org, the agent and Meta's signature,
/// maps the call to its session, starts that session for a `connect` of a new call, and
/// says where the event goes.
///
/// - A live session: to it, on this node or the node that runs it.
/// - A `connect` of a call without a session: a new session (a start like any other,
///   `transport: webrtc`, body `{}`), then to it. When another node started the same
///   session meanwhile (two copies of one `connect` at two nodes at once: both found no
///   session, and the other's record came first), this start fails (the id is taken, or
///   that node holds the agent's last slot) and leaves nothing behind, and the event goes
///   to the other's session, as a copy that came later would.
/// - Anything else: [`Refused::NoSession`].
///
/// The signature is checked with the `WHATSAPP_APP_SECRET` of the deployment that serves
/// the event: the one the call's session runs (a redeploy with a new app secret does not
/// refuse a live call's events), else the one a session started now would run. A payload
/// about no call is checked against the latter.
pub async fn route_event(
    sup: &Arc<Supervisor>,
    store: &Arc<dyn Store>,
    cipher: &SecretCipher,
    ev: &Inbound<'_>,
) -> Result<Routed, Refused> {
    let event = call_event(ev.body).map_err(Refused::NotWhatsApp)?;
    let unknown = |e: CoreError| match e {
        CoreError::NotFound(_) => Refused::Unknown,
        e => Refused::Core(e),
    };
    // An unknown org has no agents: the agent's lookup answers for both.
    let agent = crate::core::lookup::agent_of(store, ev.org, ev.agent)
        .await
        .map_err(unknown)?;
    let for_new = sup
        .current_deployment(ev.org, ev.agent)
        .unwrap_or(agent.desired_deployment_id);
    let Some(event) = event else {
        check_signed(store, cipher, ev, for_new).await?;
        return Ok(Routed {
            route: Route::Ignored,
            _gate: None,
        });
    };
    let call = event.call_id();
    let sid = session_of_call(ev.org, ev.agent, call);
    // Meta re-sends a connect it has no answer for yet: the copies of a call's events wait
    // for each other here, so the first one starts the session and the others find it.
    let gate = CallGate::enter(sid).await;
    let mut session = session_record(store, ev, sid).await?;
    let mut checked = None;
    loop {
        let deployment = session.as_ref().map_or(for_new, |s| s.deployment_id);
        if checked != Some(deployment) {
            check_signed(store, cipher, ev, deployment).await?;
            checked = Some(deployment);
        }
        match (&event, session) {
            (_, Some(rec)) if rec.end.is_none() => {
                let route = if !ev.from_peer && !sup.owns(&rec.node_id) && !sup.serves(sid) {
                    Route::Owner {
                        node: rec.node_id,
                        session: sid,
                    }
                } else {
                    Route::Here(sid)
                };
                return Ok(Routed {
                    route,
                    _gate: Some(gate),
                });
            }
            (CallEvent::Connect(_), None) => {
                let params = StartParams {
                    body: bytes::Bytes::from_static(b"{}"),
                    transport: Some("webrtc".into()),
                    session_id: Some(sid),
                    ..Default::default()
                };
                let started = match sup.check_startable(ev.org, ev.agent) {
                    Ok(()) => {
                        #[cfg(test)]
                        test_hooks::before_start_of(sid).await;
                        sup.start_session(ev.org, ev.agent, params).await
                    }
                    Err(e) => Err(e),
                };
                match started {
                    Ok(out) => {
                        tracing::info!(org = ev.org, agent = ev.agent, session.id = %out.session_id, call, "WhatsApp call: session started");
                        return Ok(Routed {
                            route: Route::Here(sid),
                            _gate: Some(gate),
                        });
                    }
                    // Another node's copy of this connect may have started the session after
                    // this one looked (the gate is per node): then this start failed on the
                    // session's id, or at `maxAgents` because that node holds the slot, or
                    // here for a reason of this node's own (draining). A failed start leaves
                    // nothing behind; if the session is there now, the event goes to it,
                    // checked against its deployment.
                    Err(e) => {
                        session = session_record(store, ev, sid).await?;
                        if session.is_none() {
                            return Err(e.into());
                        }
                        tracing::info!(org = ev.org, agent = ev.agent, session.id = %sid, call, "WhatsApp call: session started by another node meanwhile");
                    }
                }
            }
            (_, ended) => {
                return Err(Refused::NoSession {
                    call: call.to_string(),
                    ended: ended.is_some(),
                })
            }
        }
    }
}

/// The record of session `sid` of the event's agent, if there is one.
async fn session_record(
    store: &Arc<dyn Store>,
    ev: &Inbound<'_>,
    sid: Uuid,
) -> Result<Option<SessionRecord>, Refused> {
    match crate::core::lookup::session_of(store, ev.org, ev.agent, sid).await {
        Ok((_, rec)) => Ok(Some(rec)),
        Err(CoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// An agent whose deployment `deployment` holds `WHATSAPP_APP_SECRET` takes only events
/// Meta signed with it. A refusal answers as an unknown agent does and says why in the log;
/// a secret that cannot be read refuses every event.
async fn check_signed(
    store: &Arc<dyn Store>,
    cipher: &SecretCipher,
    ev: &Inbound<'_>,
    deployment: Uuid,
) -> Result<(), Refused> {
    let why = match app_secret(store, cipher, ev.org, deployment).await {
        Ok(None) => return Ok(()),
        Ok(Some(s)) => match check_signature(&s, ev.signature, ev.raw) {
            Ok(()) => return Ok(()),
            Err(why) => why,
        },
        Err(_) => {
            "the agent's WHATSAPP_APP_SECRET cannot be read (sealed under another secrets key?)"
        }
    };
    tracing::warn!(org = ev.org, agent = ev.agent, %deployment, reason = why, "WhatsApp webhook refused");
    Err(Refused::Unknown)
}

/// The events of a call taken one at a time on this node (two starts of one session id
/// would collide); an entry lives while someone holds or waits for it.
static CALLS: LazyLock<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Mutex::default);

struct CallGate {
    sid: Uuid,
    gate: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl CallGate {
    async fn enter(sid: Uuid) -> CallGate {
        let gate = CALLS.lock().entry(sid).or_default().clone();
        let guard = Some(gate.clone().lock_owned().await);
        CallGate { sid, gate, guard }
    }
}

impl Drop for CallGate {
    fn drop(&mut self) {
        self.guard.take();
        let mut calls = CALLS.lock();
        // Ours and the map's: nobody else holds or waits for this call.
        if Arc::strong_count(&self.gate) == 2 {
            calls.remove(&self.sid);
        }
    }
}

/// Tests' hooks into [`route_event`].
#[cfg(test)]
pub(crate) mod test_hooks {
    use super::*;
    use futures_util::future::BoxFuture;

    static BEFORE_START: LazyLock<Mutex<HashMap<Uuid, BoxFuture<'static, ()>>>> =
        LazyLock::new(Mutex::default);

    /// Runs `f` once, when a `connect` of session `sid` found no session and is about to
    /// start one (another node's start landing in between).
    pub(crate) fn before_start(sid: Uuid, f: BoxFuture<'static, ()>) {
        BEFORE_START.lock().insert(sid, f);
    }

    pub(super) async fn before_start_of(sid: Uuid) {
        let f = BEFORE_START.lock().remove(&sid);
        if let Some(f) = f {
            f.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(event: &str, id: &str) -> Value {
        json!({"object": OBJECT, "entry": [{"id": "waba", "changes": [{"field": "calls",
            "value": {"messaging_product": "whatsapp", "calls": [{"id": id, "event": event,
            "from": "15550001111", "to": "15550002222", "timestamp": "1"}]}}]}]})
    }

    #[test]
    fn call_events() {
        assert_eq!(
            call_event(&payload("connect", "wacid.1")).unwrap(),
            Some(CallEvent::Connect("wacid.1".into()))
        );
        assert_eq!(
            call_event(&payload("terminate", "wacid.1")).unwrap(),
            Some(CallEvent::Terminate("wacid.1".into()))
        );
        assert_eq!(
            call_event(&payload("ringing", "wacid.1")).unwrap(),
            Some(CallEvent::Other("wacid.1".into()))
        );
        let messages = json!({"object": OBJECT, "entry": [{"changes": [{"field": "messages",
            "value": {"messages": [{"id": "m"}]}}]}]});
        assert_eq!(call_event(&messages).unwrap(), None);
        assert_eq!(call_event(&json!({"object": OBJECT})).unwrap(), None);
        assert!(call_event(&json!({"object": "page", "entry": []})).is_err());
        assert!(call_event(&json!([])).is_err());
    }

    #[test]
    fn a_call_has_one_session_per_agent() {
        let a = session_of_call("o", "a", "wacid.1");
        assert_eq!(a, session_of_call("o", "a", "wacid.1"));
        assert_ne!(a, session_of_call("o", "b", "wacid.1"));
        assert_ne!(a, session_of_call("p", "a", "wacid.1"));
        assert_ne!(a, session_of_call("o", "a", "wacid.2"));
    }

    #[test]
    fn signatures() {
        let body = br#"{"object":"whatsapp_business_account"}"#;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"app-secret");
        let tag = ring::hmac::sign(&key, body);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let good = format!("sha256={hex}");
        assert_eq!(check_signature("app-secret", Some(&good), body), Ok(()));
        let upper = format!("sha256={}", hex.to_uppercase());
        assert_eq!(check_signature("app-secret", Some(&upper), body), Ok(()));
        assert!(check_signature("other", Some(&good), body).is_err());
        assert!(check_signature("app-secret", Some(&good), b"{}").is_err());
        assert!(check_signature("app-secret", Some(&hex), body).is_err());
        assert!(check_signature("app-secret", Some("sha256=zz"), body).is_err());
        assert!(check_signature("app-secret", None, body).is_err());
    }

    #[test]
    fn verification_params() {
        let s = Some("subscribe");
        assert_eq!(verification(s, Some("k"), Some("42")), Ok(("k", "42")));
        assert!(verification(Some("unsubscribe"), Some("k"), Some("42")).is_err());
        assert!(verification(s, None, Some("42")).is_err());
        assert!(verification(s, Some("k"), None).is_err());
        assert!(verification(s, Some(""), Some("42")).is_err());
        assert!(verification(None, None, None).is_err());
    }
}
