//! WhatsApp Business calling (Pipecat Cloud's WhatsApp guide): Meta's webhook for an agent,
//! `/v1/public/webhooks/{org}/{agent}/whatsapp`. The pure part: Meta's verification
//! handshake, which call an event is about, and which session a call gets.
//!
//! A call's session id is derived from the org, the agent and Meta's call id (a UUIDv5), so
//! every node of a cluster finds the session of a call without a shared table: a `connect`
//! starts it, every later event of the call is forwarded to it, and once it has ended
//! (the bot ends the call on `terminate`) the call maps to nothing live.

use serde_json::Value;
use uuid::Uuid;

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

/// The agent's `WHATSAPP_APP_SECRET`, from the secrets of its latest deployment (what its
/// instances get). `Ok(None)` when that deployment has none.
///
/// Errors: the snapshot cannot be read, or the value cannot be opened (sealed under another
/// secrets key).
pub async fn app_secret(
    store: &std::sync::Arc<dyn crate::store::Store>,
    cipher: &crate::core::secrets::SecretCipher,
    agent: &crate::model::AgentRecord,
) -> Result<Option<String>, String> {
    let snap = store
        .deployment_secrets(agent.desired_deployment_id)
        .await
        .map_err(|e| format!("cannot read the agent's secrets: {e}"))?;
    match snap.iter().find(|(_, v)| v.key == APP_SECRET) {
        Some((set, v)) => cipher.open(&agent.org, set, v).map(Some),
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
