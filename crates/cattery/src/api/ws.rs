//! The websocket transport (reference §A.5 "websocket", §F.3).
//!
//! `POST /start` with `transport: "websocket"` starts no bot: it records the session as
//! waiting for its client (listed, stoppable; ended `client_never_connected` when the token
//! expires unused, see `docs/lifecycle.md`) and answers a single-use token
//! (valid `--ws-token-ttl-seconds`, default [`TOKEN_TTL`], bound to agent and org), a `wsUrl` served by Cattery
//! (`ws://<host>/ws/generic/<agent>.<org>`, `wss://` behind TLS: see `crate::web`), the announced `sessionId`, and the body as
//! base64 JSON. When a client connects there, Cattery assigns an instance (warm or cold),
//! opens the instance's `/ws` with `x-daily-session-id` and `?body=`, and relays text and
//! binary frames both ways until either side closes.
//!
//! The token may come as `Authorization: Bearer`, `?token=`, or a trailing path segment, in
//! that order; a bad, expired or replayed token gets 403 at the handshake. Agents deployed with
//! `websocketAuth: "none"` accept connections without a token (telephony providers); the
//! default is `token`.
//!
//! Ending: a client close frame, a client that goes away (EOF or error), or a client silent
//! for the idle timeout (Cattery pings it; any frame or pong counts) ends the session with
//! `endReason: client_disconnected`; the agent closing ends it `completed` (its close frame is
//! forwarded to the client). When the platform ends the session (a `DELETE`, the drain, the
//! time limit), the relay sends the client a close frame before the connection goes: 1000
//! after a stop or the time limit, 1001 (going away) in the drain; the instance gets the same
//! close frame before its SIGTERM. Each close handshake is bounded by [`CLOSE_WAIT`], and a
//! send to a client that stopped reading is bounded by [`SEND_WAIT`], so a half-closed peer
//! can never keep a session alive (or hold a stop up).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{
    CloseFrame as AxCloseFrame, Message as AxMessage, WebSocket, WebSocketUpgrade,
};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use rand::RngCore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TCloseFrame;
use tokio_tungstenite::tungstenite::Message as TMessage;
use uuid::Uuid;

use super::error::ApiError;
use super::{ApiPath, AppState};
use crate::core::instance_http::{BotOutcome, Deliver, OutcomeFuture, RelayStop};
use crate::core::session::StartParams;
use crate::store::{Store, StoreResult, WsTokenRecord};

/// How long a websocket token stays valid by default (reference §A.5: 5 minutes).
pub const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Bound on each close handshake.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Bound on one frame send.
pub const SEND_WAIT: Duration = Duration::from_secs(5);

/// Websocket relays running in this process (a detached server waits for them to end).
static LIVE_RELAYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one relay in [`LIVE_RELAYS`] while it lives.
struct LiveRelay;

impl LiveRelay {
    fn enter() -> LiveRelay {
        LIVE_RELAYS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        LiveRelay
    }
}

impl Drop for LiveRelay {
    fn drop(&mut self) {
        LIVE_RELAYS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How many websocket relays this process runs.
pub fn live_relays() -> usize {
    LIVE_RELAYS.load(std::sync::atomic::Ordering::SeqCst)
}

/// A pending websocket session announced by `/start`.
#[derive(custom_debug::Debug, Clone)]
pub struct WsTicket {
    /// Org.
    pub org: String,
    /// Agent name.
    pub agent: String,
    /// Announced session id.
    pub session_id: Uuid,
    /// Start body as JSON bytes, if any.
    #[debug(with = crate::redact::hidden_some)]
    pub body: Option<Vec<u8>>,
    /// Expiry (Unix ms).
    pub expires_ms: i64,
}

/// Websocket transport state. Tokens live in the store (hashed), so a token issued by one
/// node is redeemed once on whichever node the client reaches (docs/cluster.md).
pub struct WsState {
    /// A client silent this long is treated as gone.
    pub idle_timeout: Duration,
    /// How long a token stays valid.
    pub token_ttl: Duration,
    /// Where clients reach this server (the scheme and host of `wsUrl`).
    pub public_url: crate::web::PublicUrl,
}

impl WsState {
    /// New state with a client idle timeout and a token lifetime.
    pub fn new(idle_timeout: Duration, token_ttl: Duration) -> Self {
        WsState {
            idle_timeout,
            token_ttl,
            public_url: crate::web::PublicUrl::default(),
        }
    }

    /// With the URL clients reach this server at (`--public-url`, TLS).
    #[must_use]
    pub fn with_public_url(mut self, public_url: crate::web::PublicUrl) -> Self {
        self.public_url = public_url;
        self
    }

    /// Issues a single-use token, stored by its hash.
    pub async fn issue(&self, store: &dyn Store, t: WsTicket) -> StoreResult<String> {
        let mut b = [0u8; 24];
        rand::rng().fill_bytes(&mut b);
        let tok = hex::encode(b);
        let rec = WsTokenRecord {
            hash: crate::core::keys::hash_key(&tok),
            org: t.org,
            agent: t.agent,
            session_id: t.session_id,
            body: t.body,
            expires_ms: t.expires_ms,
        };
        store.put_ws_token(&rec, crate::model::now_ms()).await?;
        Ok(tok)
    }

    /// Redeems a token for `org`/`agent` (single use across every node on the store; a
    /// token presented at another agent is refused and stays valid for its own).
    async fn redeem(
        &self,
        store: &dyn Store,
        tok: &str,
        org: &str,
        agent: &str,
    ) -> StoreResult<Option<WsTicket>> {
        let Some(t) = store
            .take_ws_token(&crate::core::keys::hash_key(tok), org, agent)
            .await?
        else {
            return Ok(None);
        };
        Ok((t.expires_ms > crate::model::now_ms()).then_some(WsTicket {
            org: t.org,
            agent: t.agent,
            session_id: t.session_id,
            body: t.body,
            expires_ms: t.expires_ms,
        }))
    }
}

/// The `/start` answer of the websocket transport.
#[derive(custom_debug::Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WsAnnounce {
    /// The start `body`, base64 of its JSON (only when one was given).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[debug(with = crate::redact::hidden_some)]
    pub body: Option<String>,
    /// The session the connection will start.
    pub session_id: Uuid,
    /// One-use token for the connection.
    #[debug(with = crate::redact::hidden)]
    pub token: String,
    /// Where to connect.
    pub ws_url: String,
}

/// `/start` for the websocket transport: records the session as waiting for its client,
/// issues the token, and answers where to connect (`base`: `ws://host` or
/// `wss://host/prefix`, see [`crate::web::PublicUrl`]). When the token expires unused, the
/// session ends `client_never_connected`.
pub async fn announce(
    st: &AppState,
    base: &str,
    org: &str,
    agent: &str,
    body: Option<&serde_json::Value>,
) -> Result<WsAnnounce, crate::core::CoreError> {
    let session_id = Uuid::new_v4();
    st.sup
        .record_waiting_session(org, agent, session_id)
        .await?;
    let body_bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    let ttl = st.ws.token_ttl;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let token = st
        .ws
        .issue(
            st.store.as_ref(),
            WsTicket {
                org: org.to_string(),
                agent: agent.to_string(),
                session_id,
                body: body_bytes.clone(),
                expires_ms: crate::model::now_ms().saturating_add(ttl_ms),
            },
        )
        .await
        .map_err(crate::core::CoreError::from)?;
    let (sup, org_s, agent_s) = (st.sup.clone(), org.to_string(), agent.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(ttl).await;
        if let Err(e) = sup
            .expire_waiting_session(&org_s, &agent_s, session_id, ttl)
            .await
        {
            tracing::warn!(session = %session_id, error = %e, "could not record a websocket session whose client never connected");
        }
    });
    Ok(WsAnnounce {
        body: body_bytes.map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        session_id,
        token,
        ws_url: format!("{base}/ws/generic/{agent}.{org}"),
    })
}

/// The 403 of a connection without a token to an agent that is not `websocketAuth: "none"`,
/// unknown agents included (the answer does not tell which agents exist): how to get past it.
const NEEDS_TOKEN: &str =
    "this agent needs a websocket token (websocketAuth: token): pass ?token= \
     from a /start with transport websocket, or Twilio's customParameters _pipecatCloudToken, \
     or set the agent's websocketAuth to none (docs/daily.md, Telephony websockets)";

/// [`NEEDS_TOKEN`] as a close reason, which a close frame bounds to 123 bytes.
const NEEDS_TOKEN_TWILIO: &str =
    "this agent needs a websocket token: pass _pipecatCloudToken, or set websocketAuth none";

fn forbidden(msg: &str) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "403", msg).into_response()
}

/// `GET /ws/generic/{agent}.{org}` (token in header or query).
#[utoipa::path(get, path = "/ws/generic/{service}", tag = "sessions", operation_id = "websocket_connect",
    params(("service" = String, Path, description = "<agent>.<org>"),
           ("token" = Option<String>, Query, description = "the token from /start (or Authorization: Bearer)"),
           ("body" = Option<String>, Query, description = "base64 JSON body, for websocketAuth none")),
    responses((status = 101, description = "websocket session; frames are relayed to the bot"),
              (status = 400, description = "not a websocket upgrade", body = super::error::ErrorBody),
              (status = 403, description = "bad, expired or used token", body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody)))]
pub async fn connect(
    State(st): State<AppState>,
    ApiPath(service): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    handle(st, service, None, q, headers, up).await
}

/// `GET /ws/generic/{agent}.{org}/{token}`.
pub async fn connect_with_token(
    State(st): State<AppState>,
    ApiPath((service, token)): ApiPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    handle(st, service, Some(token), q, headers, up).await
}

async fn handle(
    st: AppState,
    service: String,
    path_token: Option<String>,
    q: HashMap<String, String>,
    headers: HeaderMap,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "400",
                format!("expected a websocket upgrade: {e}"),
            )
            .into_response()
        }
    };
    let Some((agent, org)) = service.split_once('.') else {
        return ApiError::not_found("404", "expected /ws/generic/<agent>.<org>").into_response();
    };
    let (agent, org) = (agent.to_string(), org.to_string());
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
        .or_else(|| q.get("token").cloned())
        .or(path_token);
    let (session_id, body) = match token {
        Some(t) => match st.ws.redeem(st.store.as_ref(), &t, &org, &agent).await {
            Ok(Some(ticket)) => (Some(ticket.session_id), ticket.body),
            Ok(None) => return forbidden("invalid, expired or already used websocket token"),
            Err(e) => return ApiError::from(crate::core::CoreError::from(e)).into_response(),
        },
        None => {
            if st.sup.websocket_auth(&org, &agent).as_deref() != Some("none") {
                return forbidden(NEEDS_TOKEN);
            }
            let body = q
                .get("body")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            (None, body)
        }
    };
    up.read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| run_session(st, socket, Vec::new(), org, agent, session_id, body))
}

/// The session of an accepted client socket: holds it (with `pre`, frames already read from
/// it, relayed first) while an instance is assigned, then relays until either side ends.
async fn run_session(
    st: AppState,
    socket: WebSocket,
    pre: Vec<AxMessage>,
    org: String,
    agent: String,
    session_id: Option<Uuid>,
    body: Option<Vec<u8>>,
) {
    let idle = st.ws.idle_timeout;
    {
        let body_b64 = body
            .as_ref()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        // Until delivery the client socket is held by a watcher that keeps its early frames and
        // reports a client that goes away, which cancels the start (docs/lifecycle.md, L18).
        let (claim_tx, claim_rx) = tokio::sync::oneshot::channel::<Claim>();
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(hold_client(socket, pre, claim_rx, gone_tx));
        let deliver: Deliver = Box::new(move |addr, headers, stop| {
            Box::pin(async move {
                let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
                claim_tx
                    .send(reply_tx)
                    .map_err(|_| "client socket gone".to_string())?;
                let (client, early) = reply_rx.await.map_err(|_| {
                    "the client went away before the session was delivered".to_string()
                })?;
                let mut url = format!("ws://{addr}/ws");
                if let Some(b) = body_b64 {
                    url.push_str("?body=");
                    url.push_str(&urlencode(&b));
                }
                let mut req = url.into_client_request().map_err(|e| e.to_string())?;
                for (k, v) in headers {
                    if let (Ok(k), Ok(v)) = (
                        axum::http::HeaderName::from_bytes(k.as_bytes()),
                        axum::http::HeaderValue::from_str(&v),
                    ) {
                        req.headers_mut().insert(k, v);
                    }
                }
                // Nagle off on the instance leg too (the client leg is set at accept): a voice
                // frame must not wait for the ACK of the one before it.
                let (inst, _) = tokio_tungstenite::connect_async_with_config(
                    req,
                    Some(instance_leg_config()),
                    true,
                )
                .await
                .map_err(|e| format!("instance /ws refused: {e}"))?;
                Ok(Box::pin(relay(client, early, inst, idle, stop)) as OutcomeFuture)
            })
        });
        let params = StartParams {
            body: bytes::Bytes::from(body.unwrap_or_else(|| b"{}".to_vec())),
            deliver: Some(deliver),
            session_id,
            transport: Some("websocket".into()),
            client_gone: Some(Box::pin(async move {
                if gone_rx.await.is_err() {
                    // The watcher handed the socket over: from then on the relay watches it.
                    std::future::pending::<()>().await;
                }
            })),
            ..Default::default()
        };
        if let Err(e) = st.sup.start_session(&org, &agent, params).await {
            tracing::info!(agent = %agent, error = %e, "websocket session could not start");
        }
    }
}

/// Read buffer of each relay leg. tungstenite zero-fills its whole read buffer before every
/// read (128 KiB by default): with voice frames of a few hundred bytes that memset was 45% of
/// the server's instructions in the relay benchmark. Larger messages still arrive whole (the
/// buffer grows to the frame's length).
const READ_BUFFER: usize = 8 * 1024;

/// The instance leg's websocket settings.
fn instance_leg_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
}

/// Most early client bytes kept while the instance starts; later frames are dropped.
const MAX_EARLY_BYTES: usize = 4 * 1024 * 1024;

/// A request for the client socket and the frames it sent before delivery.
type Claim = tokio::sync::oneshot::Sender<(WebSocket, Vec<AxMessage>)>;

/// Holds the client socket while its instance starts: keeps its frames (up to
/// [`MAX_EARLY_BYTES`]), hands socket and frames over when the session is delivered, and
/// signals `gone` if the client closes or drops first.
async fn hold_client(
    mut socket: WebSocket,
    pre: Vec<AxMessage>,
    mut claim: tokio::sync::oneshot::Receiver<Claim>,
    gone: tokio::sync::oneshot::Sender<()>,
) {
    let mut bytes = pre.iter().map(frame_len).sum::<usize>();
    let mut early = pre;
    loop {
        tokio::select! {
            c = &mut claim => {
                if let Ok(reply) = c {
                    let _ = reply.send((socket, early));
                }
                return;
            }
            m = socket.recv() => match m {
                Some(Ok(AxMessage::Close(_))) | None | Some(Err(_)) => {
                    let _ = gone.send(());
                    return;
                }
                Some(Ok(m)) => {
                    let n = frame_len(&m);
                    if n > 0 && bytes + n <= MAX_EARLY_BYTES {
                        bytes += n;
                        early.push(m);
                    }
                }
            }
        }
    }
}

fn frame_len(m: &AxMessage) -> usize {
    match m {
        AxMessage::Text(t) => t.len(),
        AxMessage::Binary(b) => b.len(),
        _ => 0,
    }
}

/// Longest wait for a telephony connection to say which agent it wants (Twilio's `start`).
pub const IDENTIFY_WAIT: Duration = Duration::from_secs(5);
/// Most frames read while waiting for it.
const IDENTIFY_FRAMES: usize = 8;

/// `GET /ws/{provider}?serviceHost={agent}.{org}[&token=][&body=]` for `twilio`, `telnyx`,
/// `plivo`, `exotel` and `generic` (reference §J "Telephony websockets"): the query form of
/// the generic endpoint, every frame relayed, the provider's opening messages included.
/// Twilio, which drops query strings, may instead name the agent as the
/// `_pipecatCloudServiceHost` custom parameter of its `start` message (and a token as
/// `_pipecatCloudToken`); a connection that does not say within [`IDENTIFY_WAIT`] is closed.
pub async fn telephony(
    State(st): State<AppState>,
    ApiPath(provider): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !matches!(
        provider.as_str(),
        "twilio" | "telnyx" | "plivo" | "exotel" | "generic"
    ) {
        return ApiError::not_found("404", format!("no websocket endpoint /ws/{provider}"))
            .into_response();
    }
    if let Some(service) = q.get("serviceHost").filter(|s| !s.is_empty()).cloned() {
        return handle(st, service, None, q, headers, up).await;
    }
    if provider != "twilio" {
        return ApiError::bad_request(format!("/ws/{provider} needs ?serviceHost=<agent>.<org>"))
            .into_response();
    }
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "400",
                format!("expected a websocket upgrade: {e}"),
            )
            .into_response()
        }
    };
    up.read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| twilio_by_parameter(st, socket))
}

/// Reads Twilio's opening messages until its `start` names the agent, then runs the session
/// with them relayed first; closes a connection that does not say in time (1008), or whose
/// token is missing or bad for a `websocketAuth: token` agent.
async fn twilio_by_parameter(st: AppState, mut socket: WebSocket) {
    let mut pre = Vec::new();
    let deadline = tokio::time::Instant::now() + IDENTIFY_WAIT;
    let mut found = None;
    while found.is_none() && pre.len() < IDENTIFY_FRAMES {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(m @ AxMessage::Text(_)))) => {
                if let AxMessage::Text(t) = &m {
                    found = twilio_service_host(t.as_str());
                }
                pre.push(m);
            }
            Ok(Some(Ok(AxMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return,
            Ok(Some(Ok(_))) => {}
            Err(_) => break,
        }
    }
    let close = |socket: WebSocket, why: &'static str| async move {
        let mut socket = socket;
        let frame = AxCloseFrame {
            code: 1008,
            reason: why.into(),
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, socket.send(AxMessage::Close(Some(frame)))).await;
    };
    let Some((service, token)) = found else {
        return close(socket, "no _pipecatCloudServiceHost in the start message").await;
    };
    let Some((agent, org)) = service.split_once('.') else {
        return close(socket, "_pipecatCloudServiceHost must be <agent>.<org>").await;
    };
    let (agent, org) = (agent.to_string(), org.to_string());
    let (session_id, body) = match token {
        Some(t) => match st.ws.redeem(st.store.as_ref(), &t, &org, &agent).await {
            Ok(Some(ticket)) => (Some(ticket.session_id), ticket.body),
            Ok(None) => {
                return close(socket, "invalid, expired or already used websocket token").await
            }
            Err(_) => return close(socket, "storage unavailable, try again").await,
        },
        None if st.sup.websocket_auth(&org, &agent).as_deref() != Some("none") => {
            return close(socket, NEEDS_TOKEN_TWILIO).await
        }
        None => (None, None),
    };
    run_session(st, socket, pre, org, agent, session_id, body).await;
}

/// `(service host, token)` from a Twilio `start` message's custom parameters.
pub fn twilio_service_host(text: &str) -> Option<(String, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["event"] != "start" {
        return None;
    }
    let p = &v["start"]["customParameters"];
    let host = p["_pipecatCloudServiceHost"].as_str()?.to_string();
    let token = p["_pipecatCloudToken"].as_str().map(str::to_string);
    Some((host, token))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn to_instance(m: AxMessage) -> Option<TMessage> {
    match m {
        AxMessage::Text(t) => Some(TMessage::Text(t.as_str().into())),
        AxMessage::Binary(b) => Some(TMessage::Binary(b)),
        _ => None,
    }
}

fn to_client(m: TMessage) -> Option<AxMessage> {
    match m {
        TMessage::Text(t) => Some(AxMessage::Text(t.as_str().into())),
        TMessage::Binary(b) => Some(AxMessage::Binary(b)),
        _ => None,
    }
}

/// Relays frames between the client and the instance until one side ends, or until the
/// platform ends the session (`stop`: [`close_both`]).
async fn relay<S>(
    client: WebSocket,
    early: Vec<AxMessage>,
    inst: tokio_tungstenite::WebSocketStream<S>,
    idle: Duration,
    stop: RelayStop,
) -> BotOutcome
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let _live = LiveRelay::enter();
    // A dropped sender is no stop (the session's task is aborted then).
    let stop = async move {
        match stop.await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let (mut cs, mut cr) = client.split();
    let (mut is, mut ir) = inst.split();
    for m in early.into_iter().filter_map(to_instance) {
        if !matches!(
            tokio::time::timeout(SEND_WAIT, is.send(m)).await,
            Ok(Ok(()))
        ) {
            let _ = tokio::time::timeout(CLOSE_WAIT, cs.send(AxMessage::Close(None))).await;
            return BotOutcome::WsClosed { by_client: false };
        }
    }
    let mut last_heard = Instant::now();
    let mut ping = tokio::time::interval((idle / 3).max(Duration::from_millis(100)));
    ping.tick().await;
    loop {
        tokio::select! {
            m = cr.next() => match m {
                Some(Ok(AxMessage::Close(f))) => {
                    let frame = f.map(|f| TCloseFrame { code: CloseCode::from(f.code), reason: f.reason.as_str().into() });
                    let _ = tokio::time::timeout(CLOSE_WAIT, is.send(TMessage::Close(frame))).await;
                    let _ = tokio::time::timeout(CLOSE_WAIT, is.close()).await;
                    return BotOutcome::WsClosed { by_client: true };
                }
                Some(Ok(m)) => {
                    last_heard = Instant::now();
                    if let Some(m) = to_instance(m) {
                        match tokio::time::timeout(SEND_WAIT, is.send(m)).await {
                            Ok(Ok(())) => {}
                            _ => {
                                let _ = tokio::time::timeout(CLOSE_WAIT, cs.send(AxMessage::Close(None))).await;
                                return BotOutcome::WsClosed { by_client: false };
                            }
                        }
                    }
                }
                None | Some(Err(_)) => {
                    let _ = tokio::time::timeout(CLOSE_WAIT, is.close()).await;
                    return BotOutcome::WsClosed { by_client: true };
                }
            },
            m = ir.next() => match m {
                Some(Ok(TMessage::Close(f))) => {
                    let frame = f.map(|f| AxCloseFrame { code: u16::from(f.code), reason: f.reason.as_str().into() });
                    let _ = tokio::time::timeout(CLOSE_WAIT, cs.send(AxMessage::Close(frame.clone()))).await;
                    return agent_closed(frame.as_ref());
                }
                Some(Ok(m)) => {
                    if let Some(m) = to_client(m) {
                        match tokio::time::timeout(SEND_WAIT, cs.send(m)).await {
                            Ok(Ok(())) => {}
                            _ => {
                                let _ = tokio::time::timeout(CLOSE_WAIT, is.close()).await;
                                return BotOutcome::WsClosed { by_client: true };
                            }
                        }
                    }
                }
                None | Some(Err(_)) => {
                    let _ = tokio::time::timeout(CLOSE_WAIT, cs.send(AxMessage::Close(None))).await;
                    return BotOutcome::WsClosed { by_client: false };
                }
            },
            (code, reason) = &mut stop => {
                close_both((&mut cs, &mut cr), &mut is, code, reason).await;
                return BotOutcome::WsClosed { by_client: false };
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > idle {
                    let _ = tokio::time::timeout(CLOSE_WAIT, is.close()).await;
                    return BotOutcome::WsClosed { by_client: true };
                }
                if tokio::time::timeout(SEND_WAIT, cs.send(AxMessage::Ping(bytes::Bytes::new()))).await.map(|r| r.is_err()).unwrap_or(true) {
                    let _ = tokio::time::timeout(CLOSE_WAIT, is.close()).await;
                    return BotOutcome::WsClosed { by_client: true };
                }
            }
        }
    }
}

/// How a session ends whose agent closed its websocket with `frame`: 1011 (internal error,
/// the runner's close when `bot()` raised) is the agent's error, anything else its end.
fn agent_closed(frame: Option<&AxCloseFrame>) -> BotOutcome {
    match frame {
        Some(f) if f.code == 1011 => BotOutcome::WsAgentError(f.reason.to_string()),
        _ => BotOutcome::WsClosed { by_client: false },
    }
}

/// The platform ends a relayed session (a stop, the drain, the time limit): the client gets
/// a close frame with `code` and `reason` (and its answer is read, so the close handshake
/// completes), the instance a close frame with the same code; all within [`CLOSE_WAIT`],
/// so a client that does not answer never holds the stop up for longer.
async fn close_both<C, R, I>(
    (cs, cr): (&mut C, &mut R),
    is: &mut I,
    code: u16,
    reason: &'static str,
) where
    C: futures_util::Sink<AxMessage> + Unpin,
    R: futures_util::Stream<Item = Result<AxMessage, axum::Error>> + Unpin,
    I: futures_util::Sink<TMessage> + Unpin,
{
    let until = tokio::time::Instant::now() + CLOSE_WAIT;
    let to_client = AxCloseFrame {
        code,
        reason: reason.into(),
    };
    let to_instance = TCloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let sent = tokio::time::timeout_at(until, cs.send(AxMessage::Close(Some(to_client)))).await;
    let _ = tokio::time::timeout_at(until, is.send(TMessage::Close(Some(to_instance)))).await;
    if matches!(sent, Ok(Ok(()))) {
        // The client's close frame in answer (frames it sent meanwhile are dropped).
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, cr.next()).await {
            if matches!(m, AxMessage::Close(_)) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twilio_service_host;

    #[test]
    fn twilio_start_names_the_agent() {
        let start = r#"{"event":"start","start":{"streamSid":"MZ1","customParameters":
            {"_pipecatCloudServiceHost":"bot.acme","_pipecatCloudToken":"t1"}}}"#;
        assert_eq!(
            twilio_service_host(start),
            Some(("bot.acme".into(), Some("t1".into())))
        );
        let no_token = r#"{"event":"start","start":{"customParameters":{"_pipecatCloudServiceHost":"bot.acme"}}}"#;
        assert_eq!(
            twilio_service_host(no_token),
            Some(("bot.acme".into(), None))
        );
        for other in [
            r#"{"event":"connected","protocol":"Call"}"#,
            r#"{"event":"start","start":{"customParameters":{}}}"#,
            "not json",
        ] {
            assert_eq!(twilio_service_host(other), None, "{other}");
        }
    }
}
