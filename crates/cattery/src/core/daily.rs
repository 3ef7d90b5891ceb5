//! Daily rooms for `createDailyRoom` (reference §J "Daily rooms"): a room per session, a
//! meeting token for the bot and one for the client, and the room deleted when the session
//! ends.
//!
//! Daily's REST API (`--daily-api-url`, default `https://api.daily.co/v1`; Bearer key):
//! `POST /rooms` `{privacy, properties}` -> `{name, url, ...}`; `POST /meeting-tokens`
//! `{properties}` -> `{token}`; `DELETE /rooms/{name}` -> `{deleted, name}`. Errors come as
//! `{error, info}` with a 4xx/5xx status; they become [`CoreError::Daily`] quoting them.
//!
//! The key is the org's `dailyApiKey` property, else the server's `--daily-api-key`. It is
//! sent to Daily only and never logged; neither is a token.
//!
//! A room is kept after its session when the agent's `keepDailyRooms` says so, else when the
//! org's `keepDailyRooms` property does ([`keep_room`]); it then lasts until its `exp`.
//!
//! The room's name is recorded with its session ([`crate::model::SessionRecord::daily_room`]),
//! and whichever process records the session's end deletes it ([`RoomDeleter`]): the server
//! that made it, the next one after a crash or an upgrade, or the node that takes over a lost
//! node's sessions. Only rooms Cattery made are recorded, never one the caller passed in.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{CoreError, CoreResult};
use crate::model::now_ms;

/// How long one call to Daily may take.
pub const DAILY_TIMEOUT: Duration = Duration::from_secs(15);

/// A room made for a session, with its tokens.
#[derive(custom_debug::Debug, Clone)]
pub struct DailyRoom {
    /// Room name (what deletes it).
    pub name: String,
    /// Room URL (`dailyRoom`, `x-daily-room-url`).
    pub url: String,
    /// The bot's owner token (`x-daily-room-token`).
    #[debug(with = crate::redact::hidden)]
    pub bot_token: String,
    /// The client's token (`dailyToken`).
    #[debug(with = crate::redact::hidden)]
    pub client_token: String,
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// An HTTP/1 client for HTTPS (rustls on ring, the system's root certificates) and plain
/// `http://` (stand-ins on loopback, webhook receivers).
pub fn https_client(
) -> hyper_util::client::legacy::Client<Https, http_body_util::Full<bytes::Bytes>> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(tls_over(http))
}

/// `http` with HTTPS on top (rustls on ring, trusting the system's root certificates, which
/// `SSL_CERT_FILE` can replace; none when there are none, with a warning), HTTP/1, and plain
/// `http://` URLs let through. `http` must not enforce the `http` scheme.
pub fn tls_over(http: hyper_util::client::legacy::connect::HttpConnector) -> Https {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider.clone())
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates: https:// requests will fail");
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        }
    };
    tls.https_or_http().enable_http1().wrap_connector(http)
}

/// Daily's REST API.
#[derive(Clone)]
pub struct Daily {
    http: hyper_util::client::legacy::Client<Https, http_body_util::Full<bytes::Bytes>>,
    base: String,
    default_key: Option<String>,
}

impl std::fmt::Debug for Daily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daily")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Daily {
    /// A client of Daily at `base` (no trailing slash needed), with the server's default key.
    /// HTTPS uses rustls (ring) with the system's root certificates; `http://` is for
    /// stand-ins on loopback.
    pub fn new(base: &str, default_key: Option<String>) -> Self {
        let http = https_client();
        Daily {
            http,
            base: base.trim_end_matches('/').to_string(),
            default_key: default_key.filter(|k| !k.trim().is_empty()),
        }
    }

    /// The key in effect for an org whose `dailyApiKey` property is `org_key`.
    pub fn key_for(&self, org_key: Option<&str>) -> Option<String> {
        org_key
            .filter(|k| !k.trim().is_empty())
            .map(str::to_string)
            .or_else(|| self.default_key.clone())
    }

    /// Daily's REST base URL in use (`--daily-api-url`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether the server has a default key.
    pub fn has_default_key(&self) -> bool {
        self.default_key.is_some()
    }

    /// The server's default key.
    pub fn default_key(&self) -> Option<&str> {
        self.default_key.as_deref()
    }

    /// Creates a private room for a session of at most `max_s` seconds and the two tokens.
    /// `room_props` (`dailyRoomProperties`) go over the defaults, with `exp` no later than
    /// the session's end; `token_props` (`dailyMeetingTokenProperties`) go into the client's
    /// token. If a token cannot be made, the room is deleted again.
    ///
    /// Errors: [`CoreError::BadRequest`] for properties that are not objects,
    /// [`CoreError::Daily`] for any failure of Daily.
    pub async fn create_room(
        &self,
        key: &str,
        max_s: u32,
        room_props: Option<&Value>,
        token_props: Option<&Value>,
    ) -> CoreResult<DailyRoom> {
        let exp_max = now_ms() / 1000 + i64::from(max_s);
        let props = room_properties(room_props, exp_max)?;
        let exp = props["exp"].as_i64().unwrap_or(exp_max);
        let room = self
            .call(
                key,
                axum::http::Method::POST,
                "/rooms",
                Some(json!({"privacy": "private", "properties": props})),
            )
            .await?;
        let (Some(name), Some(url)) = (room["name"].as_str(), room["url"].as_str()) else {
            return Err(CoreError::Daily {
                status: 502,
                message: "Daily created a room but its answer has no name or url".into(),
            });
        };
        let (name, url) = (name.to_string(), url.to_string());
        let tokens = async {
            let bot = self
                .token(
                    key,
                    json!({"room_name": name, "exp": exp, "is_owner": true,
                           "user_name": "Pipecat bot", "eject_at_token_exp": true}),
                )
                .await?;
            let client = self
                .token(key, client_token_properties(token_props, &name, exp)?)
                .await?;
            Ok::<_, CoreError>((bot, client))
        }
        .await;
        match tokens {
            Ok((bot_token, client_token)) => Ok(DailyRoom {
                name,
                url,
                bot_token,
                client_token,
            }),
            Err(e) => {
                self.delete_room(key, &name).await;
                Err(e)
            }
        }
    }

    async fn token(&self, key: &str, properties: Value) -> CoreResult<String> {
        let v = self
            .call(
                key,
                axum::http::Method::POST,
                "/meeting-tokens",
                Some(json!({"properties": properties})),
            )
            .await?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CoreError::Daily {
                status: 502,
                message: "Daily's meeting-token answer has no token".into(),
            })
    }

    /// Deletes room `name`; a failure is logged (the room expires by itself at its `exp`).
    pub async fn delete_room(&self, key: &str, name: &str) {
        let path = format!("/rooms/{}", urlencode(name));
        match self
            .call(key, axum::http::Method::DELETE, &path, None)
            .await
        {
            Ok(_) => tracing::debug!(room = name, "Daily room deleted"),
            Err(CoreError::Daily { status: 404, .. }) => {}
            Err(e) => tracing::warn!(room = name, error = %e, "could not delete the Daily room"),
        }
    }

    async fn call(
        &self,
        key: &str,
        method: axum::http::Method,
        path: &str,
        body: Option<Value>,
    ) -> CoreResult<Value> {
        let unreachable = |why: String| CoreError::Daily {
            status: 502,
            message: format!("could not reach Daily's API: {why}"),
        };
        let req = axum::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| unreachable(e.to_string()))?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                // The error's source says why (refused, TLS, DNS); never the key.
                let why =
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                unreachable(why)
            })?;
            let status = resp.status().as_u16();
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, CoreError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(DAILY_TIMEOUT, exchange)
            .await
            .map_err(|_| CoreError::Daily {
                status: 502,
                message: format!(
                    "Daily's API did not answer within {} s",
                    DAILY_TIMEOUT.as_secs()
                ),
            })??;
        let text = String::from_utf8_lossy(&bytes);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(v);
        }
        Err(CoreError::Daily {
            status,
            message: daily_message(status, &v, &text),
        })
    }
}

/// Daily's error in words: `Daily API error 401 (authentication-error): <info>`.
fn daily_message(status: u16, v: &Value, text: &str) -> String {
    let kind = v["error"].as_str().unwrap_or("error");
    let info = v["info"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| text.chars().take(300).collect());
    format!("Daily API error {status} ({kind}): {info}")
}

/// Deletes the rooms of ended sessions ([`crate::core::session::RoomRemover`]) with the
/// Daily key in effect for the session's org when it ends (its `dailyApiKey`, else the
/// server's `--daily-api-key`).
pub struct RoomDeleter {
    /// Daily's API.
    pub daily: Arc<Daily>,
    /// Where the org's key is read.
    pub store: Arc<dyn crate::store::Store>,
    /// Opens the org's sealed key.
    pub cipher: Arc<crate::core::secrets::SecretCipher>,
}

impl crate::core::session::RoomRemover for RoomDeleter {
    fn remove(&self, org: &str, session: uuid::Uuid, room: &str) {
        let (daily, store, cipher) = (self.daily.clone(), self.store.clone(), self.cipher.clone());
        let (org, room) = (org.to_string(), room.to_string());
        tokio::spawn(async move {
            let org_key = match store.get_org(&org).await {
                Ok(rec) => rec.and_then(|r| crate::core::orgs::daily_api_key_of(&r, &cipher)),
                Err(e) => {
                    // Not guessed: the server's key may be another Daily account's.
                    tracing::warn!(session = %session, room, error = %e,
                        "could not read the org's Daily key to delete the session's room; it expires at its exp");
                    return;
                }
            };
            match daily.key_for(org_key.as_deref()) {
                Some(key) => daily.delete_room(&key, &room).await,
                None => tracing::warn!(session = %session, room,
                    "no Daily API key to delete the session's room with; it expires at its exp"),
            }
        });
    }
}

/// How far before this server's clock (`now_s`) a start's `exp` may be: the caller's clock
/// and the server's may differ by this much.
pub const EXP_CLOCK_SKEW_S: i64 = 30;

/// Checks a start's `dailyRoomProperties` and `dailyMeetingTokenProperties` (objects, or
/// absent) before anything else is done for it: an `exp` in either is a Unix time in seconds
/// that has not passed at `now_s` (by more than [`EXP_CLOCK_SKEW_S`]). Daily takes a room or
/// a token whose `exp` has passed, and nobody can join with it: the bot would fail to join.
/// Errors: [`CoreError::BadRequest`].
pub fn check_properties(
    room_props: Option<&Value>,
    token_props: Option<&Value>,
    now_s: i64,
) -> CoreResult<()> {
    for (given, what) in [
        (room_props, "dailyRoomProperties"),
        (token_props, "dailyMeetingTokenProperties"),
    ] {
        let Some(exp) = exp_of(&object(given, what)?, what)? else {
            continue;
        };
        if exp < now_s.saturating_sub(EXP_CLOCK_SKEW_S) {
            return Err(CoreError::bad_request(format!(
                "{what}.exp ({exp}) is {} s in the past: no one could join with it; give a \
                 Unix time in seconds in the future, or leave exp out (the room then lasts \
                 the session's maxSessionDuration)",
                now_s - exp
            )));
        }
    }
    Ok(())
}

/// The `exp` of room or token properties `m` (of `what`), in whole seconds: a Unix time,
/// given as a JSON number (pipecat's `DailyRoomProperties` sends `time.time() + ...`, a
/// float); `None` when absent. Errors: not a number, or not after 1970.
fn exp_of(m: &Map<String, Value>, what: &str) -> CoreResult<Option<i64>> {
    match m.get("exp") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|e| e.is_finite() && *e >= 1.0)
            // Whole seconds; a time past i64's range saturates (and is capped anyway).
            .map(|e| Some(e as i64))
            .ok_or_else(|| {
                CoreError::bad_request(format!(
                    "{what}.exp must be a Unix time in seconds (a positive number), not {v}"
                ))
            }),
    }
}

fn object(v: Option<&Value>, what: &str) -> CoreResult<Map<String, Value>> {
    match v {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(CoreError::bad_request(format!(
            "{what} must be a JSON object"
        ))),
    }
}

/// Room properties: the defaults (`exp` at the session's end, everyone ejected then), the
/// given ones over them, and `exp` never later than `exp_max`.
pub fn room_properties(given: Option<&Value>, exp_max: i64) -> CoreResult<Value> {
    let mut m = Map::new();
    m.insert("exp".into(), json!(exp_max));
    m.insert("eject_at_room_exp".into(), json!(true));
    let given = object(given, "dailyRoomProperties")?;
    let exp = exp_of(&given, "dailyRoomProperties")?.map_or(exp_max, |e| e.min(exp_max));
    m.extend(given);
    m.insert("exp".into(), json!(exp));
    Ok(Value::Object(m))
}

/// The client's token: the given properties, bound to the room and expiring with it.
pub fn client_token_properties(given: Option<&Value>, room: &str, exp: i64) -> CoreResult<Value> {
    let mut m = object(given, "dailyMeetingTokenProperties")?;
    m.insert("room_name".into(), json!(room));
    let e = exp_of(&m, "dailyMeetingTokenProperties")?.map_or(exp, |e| e.min(exp));
    m.insert("exp".into(), json!(e));
    Ok(Value::Object(m))
}

/// Whether a session's room outlives it: the agent's `keepDailyRooms` when set, else the
/// org's property (default false: deleted at the session's end).
pub fn keep_room(agent: Option<bool>, org: bool) -> bool {
    agent.unwrap_or(org)
}

/// The room properties of a PSTN/SIP dial-in: SIP in `dial-in` mode, one SIP endpoint, the
/// caller's number as its display name.
pub fn dialin_room_properties(from: Option<&str>) -> Value {
    json!({"sip": {"display_name": from.unwrap_or("sip-caller"), "sip_mode": "dial-in",
                   "num_endpoints": 1}})
}

/// The `/bot` body of a dial-in session: pipecat's `DailyDialinRequest` (`dialin_settings`
/// from Daily's webhook, and the key and URL the bot's `pinlessCallUpdate` needs).
pub fn dialin_body(call: &Value, key: &str, api_url: &str) -> CoreResult<Value> {
    let field = |a: &str, b: &str| call.get(a).or_else(|| call.get(b)).cloned();
    let text = |a: &str, b: &str| {
        field(a, b).and_then(|v| match v {
            Value::String(s) if !s.is_empty() => Some(s),
            _ => None,
        })
    };
    let (Some(call_id), Some(call_domain)) =
        (text("callId", "call_id"), text("callDomain", "call_domain"))
    else {
        return Err(CoreError::bad_request(
            "a dial-in webhook needs callId and callDomain (Daily's pinless dial-in payload)",
        ));
    };
    let mut settings = json!({"call_id": call_id, "call_domain": call_domain});
    for k in ["To", "From"] {
        if let Some(v) = text(k, &k.to_lowercase()) {
            settings[k] = Value::String(v);
        }
    }
    if let Some(h @ Value::Object(_)) = field("sipHeaders", "sip_headers") {
        settings["sip_headers"] = h;
    }
    Ok(json!({"dialin_settings": settings, "daily_api_key": key, "daily_api_url": api_url}))
}

/// How far a signed dial-in request's `X-Pinless-Timestamp` may be from this machine's clock.
pub const DIALIN_SIGNATURE_SKEW_S: i64 = 300;

/// Checks the signature of a pinless dial-in request as Daily makes it: HMAC-SHA256, keyed
/// with the base64-decoded `hmac` of the number's `pinless_dialin` configuration, over
/// `"{X-Pinless-Timestamp}.{raw body}"`, sent base64 in `X-Pinless-Signature` (a hex digest
/// is accepted too). The timestamp, a Unix time (seconds, or milliseconds), must be within
/// [`DIALIN_SIGNATURE_SKEW_S`] of `now_s`, so a captured request cannot be replayed later.
/// `Err` says why it is refused (for the log: never the secret or the signature).
pub fn check_dialin_signature(
    secret_b64: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_s: i64,
) -> Result<(), &'static str> {
    use base64::Engine as _;
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err("no X-Pinless-Timestamp and X-Pinless-Signature headers");
    };
    let (ts, sig) = (ts.trim(), sig.trim());
    let mut t = ts
        .parse::<i64>()
        .map_err(|_| "X-Pinless-Timestamp is not a Unix time")?;
    if t > 10_000_000_000 {
        t /= 1000;
    }
    if now_s.abs_diff(t) > DIALIN_SIGNATURE_SKEW_S.unsigned_abs() {
        return Err("X-Pinless-Timestamp is more than 5 minutes from this server's clock");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret_b64.trim())
        .map_err(|_| "the org's dailyDialinHmac is not base64")?;
    let given = match b64.decode(sig) {
        Ok(b) if b.len() == 32 => b,
        _ => hex_digest(sig).ok_or("X-Pinless-Signature is not an HMAC-SHA256 digest")?,
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut msg = Vec::with_capacity(ts.len() + 1 + body.len());
    msg.extend_from_slice(ts.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    ring::hmac::verify(&key, &msg, &given)
        .map_err(|_| "X-Pinless-Signature does not match the org's dailyDialinHmac")
}

/// A 64-character hex SHA-256 digest's bytes.
pub(crate) fn hex_digest(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    (0..32)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Daily's signature: base64 HMAC-SHA256 over "timestamp.body" with the decoded secret.
    fn daily_signs(secret_b64: &str, ts: &str, body: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(secret_b64).unwrap());
        let msg = [ts.as_bytes(), b".", body].concat();
        b64.encode(ring::hmac::sign(&key, &msg).as_ref())
    }

    #[test]
    fn dialin_signatures_are_checked_as_daily_makes_them() {
        let secret = "c2VjcmV0LW9mLXRoZS1udW1iZXI="; // "secret-of-the-number"
        let body = br#"{"To":"+1555","From":"+1666","callId":"c","callDomain":"d"}"#;
        let now = 1_800_000_000;
        let ts = now.to_string();
        let sig = daily_signs(secret, &ts, body);
        let check = |ts: Option<&str>, sig: Option<&str>, body: &[u8], now: i64| {
            check_dialin_signature(secret, ts, sig, body, now)
        };
        assert_eq!(check(Some(&ts), Some(&sig), body, now), Ok(()));
        // The same signature as a hex digest, and a timestamp in milliseconds.
        let hex: String = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &sig)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(check(Some(&ts), Some(&hex), body, now), Ok(()));
        let ms = format!("{now}123");
        assert_eq!(
            check(Some(&ms), Some(&daily_signs(secret, &ms, body)), body, now),
            Ok(())
        );
        // Anything else is refused: no headers, another body, another timestamp, another
        // secret, garbage, and a genuine request replayed 6 minutes later.
        assert!(check(None, None, body, now).is_err());
        assert!(check(Some(&ts), None, body, now).is_err());
        assert!(check(
            Some(&ts),
            Some(&sig),
            br#"{"callId":"x","callDomain":"d"}"#,
            now
        )
        .is_err());
        assert!(check(Some("1800000001"), Some(&sig), body, now).is_err());
        let other = daily_signs("b3RoZXI=", &ts, body);
        assert!(check(Some(&ts), Some(&other), body, now).is_err());
        assert!(check(Some(&ts), Some("not-a-signature"), body, now).is_err());
        assert!(check(Some(&ts), Some(&sig), body, now + 360).is_err());
        assert_eq!(check(Some(&ts), Some(&sig), body, now + 240), Ok(()));
        // A timestamp that is not a Unix time has no window to check: refused, signed or not.
        let odd = "2027-01-15T08:00:00Z";
        assert!(check(Some(odd), Some(&daily_signs(secret, odd, body)), body, now).is_err());
    }

    #[test]
    fn room_exp_never_outlives_the_session() {
        let p = room_properties(None, 1000).unwrap();
        assert_eq!(p, json!({"exp": 1000, "eject_at_room_exp": true}));
        let p = room_properties(
            Some(&json!({"exp": 5000, "enable_dialout": true, "sip": {"sip_mode": "dial-in"}})),
            1000,
        )
        .unwrap();
        assert_eq!(p["exp"], 1000);
        assert_eq!(p["enable_dialout"], true);
        assert_eq!(p["sip"]["sip_mode"], "dial-in");
        let p =
            room_properties(Some(&json!({"exp": 900, "eject_at_room_exp": false})), 1000).unwrap();
        assert_eq!(
            (p["exp"].clone(), p["eject_at_room_exp"].clone()),
            (json!(900), json!(false))
        );
        assert!(room_properties(Some(&json!([1])), 1000).is_err());
        // A float (`time.time() + 600`, as pipecat's helpers send it) is whole seconds.
        let p = room_properties(Some(&json!({"exp": 900.75})), 1000).unwrap();
        assert_eq!(p["exp"], 900);
        // Not a Unix time: refused, never passed on nor silently replaced.
        for bad in [
            json!(-5),
            json!(0),
            json!("soon"),
            json!(true),
            json!({"at": 1}),
        ] {
            let given = json!({ "exp": bad });
            assert!(room_properties(Some(&given), 1000).is_err(), "{given}");
            assert!(
                check_properties(Some(&given), None, 500).is_err(),
                "{given}"
            );
            assert!(
                check_properties(None, Some(&given), 500).is_err(),
                "{given}"
            );
            assert!(
                client_token_properties(Some(&given), "r1", 5).is_err(),
                "{given}"
            );
        }
        assert!(check_properties(Some(&json!({"exp": null})), None, 500).is_ok());
    }

    #[test]
    fn an_exp_already_past_is_refused_beyond_the_clock_skew() {
        let now = 1_800_000_000;
        let skew = EXP_CLOCK_SKEW_S;
        for what in ["room", "token"] {
            let check = |exp: Value| {
                let p = json!({ "exp": exp });
                match what {
                    "room" => check_properties(Some(&p), None, now),
                    _ => check_properties(None, Some(&p), now),
                }
            };
            // The future, now, and a past within the skew (another clock): sent to Daily.
            for ok in [
                json!(now + 600),
                json!(now),
                json!(now - skew),
                json!(now - 1),
            ] {
                assert!(check(ok.clone()).is_ok(), "{what} {ok}");
            }
            // Past by more than the skew (a float as pipecat sends it, too): refused.
            for past in [json!(now - skew - 1), json!(now as f64 - 3600.5), json!(1)] {
                let e = check(past.clone()).unwrap_err();
                let msg = e.to_string();
                assert!(
                    matches!(e, CoreError::BadRequest { .. }),
                    "{what} {past}: {e:?}"
                );
                assert!(
                    msg.contains(".exp (") && msg.contains("in the past"),
                    "{msg}"
                );
            }
        }
        // The room's exp is checked even when the token's is fine, and the other way round.
        let past = json!({"exp": now - 3600});
        let future = json!({"exp": now + 3600});
        assert!(check_properties(Some(&past), Some(&future), now).is_err());
        assert!(check_properties(Some(&future), Some(&past), now).is_err());
    }

    #[test]
    fn client_token_is_bound_to_the_room() {
        let p = client_token_properties(
            Some(&json!({"user_name": "ann", "room_name": "other", "exp": 99999})),
            "r1",
            500,
        )
        .unwrap();
        assert_eq!(
            p,
            json!({"user_name": "ann", "room_name": "r1", "exp": 500})
        );
        assert!(client_token_properties(Some(&json!("x")), "r1", 5).is_err());
    }

    #[test]
    fn the_agent_decides_whether_rooms_are_kept_then_the_org() {
        assert!(!keep_room(None, false));
        assert!(keep_room(None, true));
        assert!(!keep_room(Some(false), true));
        assert!(keep_room(Some(true), false));
    }

    #[test]
    fn dialin_body_is_pipecats_daily_dialin_request() {
        let call = json!({"To": "+15550001", "From": "+15550002", "callId": "c-1",
                          "callDomain": "d-1", "sipHeaders": {"X-A": "1"}});
        let b = dialin_body(&call, "dk", "https://api.daily.co/v1").unwrap();
        assert_eq!(
            b,
            json!({"dialin_settings": {"call_id": "c-1", "call_domain": "d-1", "To": "+15550001",
                                       "From": "+15550002", "sip_headers": {"X-A": "1"}},
                   "daily_api_key": "dk", "daily_api_url": "https://api.daily.co/v1"})
        );
        let snake = dialin_body(&json!({"call_id": "c", "call_domain": "d"}), "k", "u").unwrap();
        assert_eq!(
            snake["dialin_settings"],
            json!({"call_id": "c", "call_domain": "d"})
        );
        assert!(dialin_body(&json!({"callId": "c"}), "k", "u").is_err());
        assert_eq!(
            dialin_room_properties(Some("+1555"))["sip"],
            json!({"display_name": "+1555", "sip_mode": "dial-in", "num_endpoints": 1})
        );
    }

    #[test]
    fn key_of_the_org_wins() {
        let d = Daily::new("http://127.0.0.1:1/", Some("server".into()));
        assert_eq!(d.key_for(Some("org")).as_deref(), Some("org"));
        assert_eq!(d.key_for(Some(" ")).as_deref(), Some("server"));
        assert_eq!(d.key_for(None).as_deref(), Some("server"));
        assert_eq!(
            Daily::new("http://x", Some(String::new())).key_for(None),
            None
        );
    }

    #[test]
    fn daily_errors_are_quoted() {
        let m = daily_message(
            401,
            &json!({"error": "authentication-error", "info": "bad key"}),
            "",
        );
        assert_eq!(m, "Daily API error 401 (authentication-error): bad key");
        assert_eq!(
            daily_message(500, &Value::Null, "oops"),
            "Daily API error 500 (error): oops"
        );
    }
}
