//! `createDailyRoom` against a stand-in for Daily's REST API on loopback: the requests Cattery
//! makes (Bearer key, room and token properties), Daily's documented answers and errors,
//! the room deleted when the session ends or its start fails; and the session surface
//! around it (`endState`, `startTimeMin`/`startTimeMax`, `iceConfig`, `websocketAuth`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::{delete, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::{api_with, assert_error, Answer};

/// One request Daily received: method, path, `Authorization`, JSON body.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: String,
    body: Value,
}

/// What the stand-in answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    /// Every call: 401 `authentication-error`, as Daily answers a bad key.
    BadKey,
    /// Rooms are made; tokens fail with 400.
    TokenFails,
}

#[derive(Clone)]
struct Daily {
    seen: Arc<Mutex<Vec<Seen>>>,
    mode: Arc<Mutex<Mode>>,
    url: String,
}

impl Daily {
    async fn start() -> Daily {
        let d = Daily {
            seen: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Ok)),
            url: String::new(),
        };
        let app = Router::new()
            .route("/v1/rooms", post(create_room))
            .route("/v1/rooms/{name}", delete(delete_room))
            .route("/v1/meeting-tokens", post(create_token))
            .with_state(d.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Daily { url, ..d }
    }

    fn set(&self, m: Mode) {
        *self.mode.lock() = m;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    fn record(&self, method: &str, path: String, h: &HeaderMap, body: Value) -> Mode {
        let auth = h
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        self.seen.lock().push(Seen {
            method: method.into(),
            path,
            auth,
            body,
        });
        *self.mode.lock()
    }

    /// Waits (bounded) for a `DELETE` of room `name`.
    async fn wait_deleted(&self, name: &str) {
        for _ in 0..200 {
            if self.deleted(name) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("room {name} was not deleted: {:?}", self.seen());
    }

    fn deleted(&self, name: &str) -> bool {
        self.seen()
            .iter()
            .any(|s| s.method == "DELETE" && s.path == format!("/rooms/{name}"))
    }
}

type Reply = (StatusCode, Json<Value>);

fn bad_key() -> Reply {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "authentication-error", "info": "the API key is not valid"})),
    )
}

async fn create_room(State(d): State<Daily>, h: HeaderMap, Json(b): Json<Value>) -> Reply {
    if d.record("POST", "/rooms".into(), &h, b.clone()) == Mode::BadKey {
        return bad_key();
    }
    let n = d.seen().iter().filter(|s| s.path == "/rooms").count();
    let name = format!("room{n}");
    (
        StatusCode::OK,
        Json(json!({
            "id": uuid::Uuid::new_v4(), "name": name, "api_created": true,
            "privacy": b["privacy"], "url": format!("https://cattery.daily.co/{name}"),
            "created_at": "2026-12-04T13:00:00.000Z", "config": b["properties"],
        })),
    )
}

async fn create_token(State(d): State<Daily>, h: HeaderMap, Json(b): Json<Value>) -> Reply {
    match d.record("POST", "/meeting-tokens".into(), &h, b.clone()) {
        Mode::BadKey => bad_key(),
        Mode::TokenFails => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid-request-error", "info": "exp must be in the future"})),
        ),
        Mode::Ok => {
            let owner = b["properties"]["is_owner"] == true;
            let room = b["properties"]["room_name"].as_str().unwrap_or("");
            let who = if owner { "bot" } else { "client" };
            (
                StatusCode::OK,
                Json(json!({"token": format!("tok-{who}-{room}")})),
            )
        }
    }
}

async fn delete_room(State(d): State<Daily>, h: HeaderMap, Path(name): Path<String>) -> Reply {
    if d.record("DELETE", format!("/rooms/{name}"), &h, Value::Null) == Mode::BadKey {
        return bad_key();
    }
    (StatusCode::OK, Json(json!({"deleted": true, "name": name})))
}

/// A Daily stand-in and an API whose Daily calls go to it, with `key` as the server's Daily key.
async fn with_daily(key: Option<&str>) -> (Daily, super::Api) {
    let daily = Daily::start().await;
    let url = daily.url.clone();
    let key = key.map(str::to_string);
    let a = api_with(|c| {
        c.sessions.daily_api_key = key;
        c.sessions.daily_api_url = url;
    })
    .await;
    (daily, a)
}

async fn start_daily(a: &super::Api, name: &str, extra: Value) -> Answer {
    let mut body = json!({"createDailyRoom": true, "body": {"x": 1}});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    a.call(
        Method::POST,
        &format!("/v1/public/{name}/start"),
        Some(&a.pk),
        Some(body),
    )
    .await
}

/// A room and two tokens per session, with the server's key; the properties merged and
/// bounded by the session's length; the room deleted when the session is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_daily_room_makes_a_room_and_deletes_it_at_the_end() {
    let (daily, a) = with_daily(Some("dk_server_key_0001")).await;
    a.deploy("room", &[], json!({"maxSessionDuration": 600}))
        .await;
    let before = crate::model::now_ms() / 1000;
    let r = start_daily(
        &a,
        "room",
        json!({"dailyRoomProperties": {"enable_dialout": true, "exp": 4102444800_i64,
                                       "sip": {"display_name": "bot", "sip_mode": "dial-in"}},
               "dailyMeetingTokenProperties": {"user_name": "caller"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["dailyRoom"], "https://cattery.daily.co/room1");
    assert_eq!(r.body["dailyToken"], "tok-client-room1");
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let seen = daily.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.auth == "Bearer dk_server_key_0001"),
        "{seen:?}"
    );
    let room = &seen[0].body;
    assert_eq!(room["privacy"], "private");
    let exp = room["properties"]["exp"].as_i64().unwrap();
    assert!(
        exp >= before + 600 && exp <= before + 602,
        "exp {exp} is the session's end"
    );
    assert_eq!(room["properties"]["enable_dialout"], true);
    assert_eq!(room["properties"]["sip"]["sip_mode"], "dial-in");
    assert_eq!(room["properties"]["eject_at_room_exp"], true);
    let bot = &seen[1].body["properties"];
    assert_eq!(
        (bot["room_name"].as_str(), bot["is_owner"].as_bool()),
        (Some("room1"), Some(true))
    );
    let client = &seen[2].body["properties"];
    assert_eq!(client["user_name"], "caller");
    assert_eq!(client["room_name"], "room1");
    assert_eq!(client["exp"].as_i64(), Some(exp));
    let s = a.get(&format!("/v1/agents/room/sessions/{sid}")).await;
    assert_eq!(s.body["transport"], "daily", "{}", s.body);
    assert!(!daily.deleted("room1"));
    assert_eq!(a.stop("room", &sid).await.status, StatusCode::OK);
    daily.wait_deleted("room1").await;
}

/// `transport: "daily"` makes a room as `createDailyRoom: true` does (the contract: "daily
/// (or createDailyRoom:true)"); an explicit `createDailyRoom: false` with it joins no new room
/// (the caller passes its own room in the body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_transport_makes_a_room_unless_told_not_to() {
    let (daily, a) = with_daily(Some("dk_server_key_0001")).await;
    a.deploy("dt", &[], json!({})).await;
    let start = |body: Value| a.call(Method::POST, "/v1/public/dt/start", Some(&a.pk), Some(body));
    let r = start(json!({"transport": "daily", "body": {"x": 1}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["dailyRoom"], "https://cattery.daily.co/room1",
        "{}",
        r.body
    );
    assert_eq!(r.body["dailyToken"], "tok-client-room1", "{}", r.body);
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    assert_eq!(daily.seen().len(), 3, "a room and two tokens");
    let r = start(json!({"transport": "daily", "createDailyRoom": false, "body": {}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.get("dailyRoom").is_none(), "{}", r.body);
    assert_eq!(daily.seen().len(), 3, "no room made");
    assert_eq!(a.stop("dt", &sid).await.status, StatusCode::OK);
    daily.wait_deleted("room1").await;
}

/// The org's `dailyApiKey` property wins over the server's key, is shown masked, and
/// `GET .../daily` answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_daily_api_key_property() {
    let (daily, a) = with_daily(None).await;
    a.deploy("keyed", &[], json!({})).await;
    let r = start_daily(&a, "keyed", json!({})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    assert!(
        r.body["error"].as_str().unwrap().contains("dailyApiKey"),
        "{}",
        r.body
    );
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"dailyApiKey": "dk_org_secret_9876"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["properties"]["dailyApiKey"]["currentValue"],
        "****9876"
    );
    let r = a.get("/v1/properties").await;
    assert_eq!(
        r.body["properties"]["dailyApiKey"], "****9876",
        "{}",
        r.body
    );
    assert!(!r.body.to_string().contains("dk_org_secret"), "{}", r.body);
    let r = a.get("/v1/organizations/default/daily").await;
    assert_eq!(r.body["apiKey"], "dk_org_secret_9876", "{}", r.body);
    let r = start_daily(&a, "keyed", json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(daily
        .seen()
        .iter()
        .all(|s| s.auth == "Bearer dk_org_secret_9876"));
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"dailyApiKey": 5})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"dailyApiKey": ""})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body["properties"].get("dailyApiKey").is_none(),
        "{}",
        r.body
    );
}

/// Daily's 401 is a clear 502 quoting Daily, with no session and no instance; a failed
/// token deletes the room it was for; a start at maxAgents makes no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_errors_leave_nothing_behind() {
    let (daily, a) = with_daily(Some("dk_bad")).await;
    a.deploy("errs", &[], json!({"autoScaling": {"maxAgents": 1}}))
        .await;
    daily.set(Mode::BadKey);
    let r = start_daily(&a, "errs", json!({})).await;
    assert_error(&r, StatusCode::BAD_GATEWAY, "DAILY_UNAUTHORIZED");
    let msg = r.body["error"].as_str().unwrap();
    assert!(
        msg.contains("401") && msg.contains("the API key is not valid"),
        "{msg}"
    );
    assert!(
        !msg.contains("dk_bad"),
        "the key stays out of answers: {msg}"
    );
    assert_eq!(a.fake.starts(), 0);
    assert_eq!(
        a.get("/v1/agents/errs/sessions").await.body["total_count"],
        0
    );

    daily.set(Mode::TokenFails);
    let r = start_daily(&a, "errs", json!({})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "DAILY_BAD_REQUEST");
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("exp must be in the future"));
    daily.wait_deleted("room2").await;
    assert_eq!(a.fake.starts(), 0);

    daily.set(Mode::Ok);
    let first = start_daily(&a, "errs", json!({})).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    // At maxAgents the start is refused before Daily is asked for a room.
    let r = start_daily(&a, "errs", json!({})).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert!(
        !daily.deleted("room3"),
        "the running session keeps its room"
    );
    let r = start_daily(&a, "errs", json!({"dailyRoomProperties": "big"})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let r = start_daily(&a, "nope", json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(
        daily.seen().iter().filter(|s| s.path == "/rooms").count(),
        3
    );
}

/// An `exp` already past (beyond the clock skew), in the room's or the client token's
/// properties, is a 400 `{error, code}` that names it, before Daily is asked for anything
/// (no room made for nobody to join); one a few seconds past (another clock) still starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exp_already_past_is_a_clear_400_before_daily_is_asked() {
    let (daily, a) = with_daily(Some("dk_server_key_0001")).await;
    a.deploy("past", &[], json!({})).await;
    let now = crate::model::now_ms() / 1000;
    for (field, exp) in [
        ("dailyRoomProperties", json!(now - 3600)),
        ("dailyMeetingTokenProperties", json!(now as f64 - 120.5)),
    ] {
        let r = start_daily(&a, "past", json!({ field: {"exp": exp} })).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
        let msg = r.body["error"].as_str().unwrap();
        assert!(
            msg.contains(&format!("{field}.exp")) && msg.contains("in the past"),
            "{msg}"
        );
    }
    assert!(daily.seen().is_empty(), "{:?}", daily.seen());
    assert_eq!(a.fake.starts(), 0);
    let r = start_daily(&a, "past", json!({"dailyRoomProperties": {"exp": now - 5}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// `endState` on every session and its filter; `startTimeMin`/`startTimeMax`;
/// `iceConfig` from `--ice-servers`; `websocketAuth` shows the enforced default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_state_start_time_ice_and_websocket_auth() {
    let a = api_with(|c| {
        c.sessions.ice_servers = vec!["stun:stun.example.org:3478".into()];
    })
    .await;
    a.deploy("es", &[], json!({})).await;
    a.deploy("done", &["bot-ms=0", "exit-ms=0:0"], json!({}))
        .await;
    let stopped = a.start_ok("es").await;
    assert_eq!(a.stop("es", &stopped).await.status, StatusCode::OK);
    let r = a
        .call(
            Method::POST,
            "/v1/public/es/start",
            Some(&a.pk),
            Some(json!({"enableDefaultIceServers": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["iceConfig"],
        json!({"iceServers": [{"urls": ["stun:stun.example.org:3478"]}]})
    );
    let active = r.body["sessionId"].as_str().unwrap().to_string();
    let states = |r: &Answer| -> Vec<(String, String)> {
        r.body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["sessionId"].as_str().unwrap().to_string(),
                    s["endState"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let r = a.get("/v1/agents/es/sessions").await;
    assert_eq!(
        states(&r),
        vec![
            (active.clone(), "active".to_string()),
            (stopped.clone(), "terminated".to_string())
        ]
    );
    let r = a.get("/v1/agents/es/sessions?endState=terminated").await;
    assert_eq!(
        states(&r),
        vec![(stopped.clone(), "terminated".to_string())]
    );
    assert_eq!(r.body["total_count"], 1);
    let r = a
        .get("/v1/organizations/default/services/es/sessions?endState=active")
        .await;
    assert_eq!(states(&r), vec![(active.clone(), "active".to_string())]);
    let r = a.get("/v1/agents/es/sessions?endState=completed").await;
    assert_eq!(r.body["total_count"], 0, "{}", r.body);
    let r = a.get("/v1/agents/es/sessions?endState=sleeping").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "400");
    let r = a.get("/v1/agents/es/sessions?startTimeMin=3600").await;
    assert_eq!(
        r.body["total_count"], 0,
        "nobody waited an hour: {}",
        r.body
    );
    let r = a
        .get("/v1/agents/es/sessions?startTimeMin=0&startTimeMax=3600")
        .await;
    assert_eq!(r.body["total_count"], 2, "{}", r.body);
    let r = a.get("/v1/agents/es/sessions?startTimeMax=-1").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "400");

    let done = a.start_ok("done").await;
    for _ in 0..200 {
        let s = a.get(&format!("/v1/agents/done/sessions/{done}")).await;
        if s.body["endState"] != "active" {
            assert_eq!(s.body["endState"], "completed", "{}", s.body);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = a.get("/v1/agents/done/sessions?endState=completed").await;
    assert_eq!(r.body["total_count"], 1, "{}", r.body);

    let r = a.get("/v1/agents/es").await;
    assert_eq!(r.body["websocketAuth"], "token", "{}", r.body);
    assert_eq!(a.stop("es", &active).await.status, StatusCode::OK);
}

/// `flow_config` must be text; with the websocket transport it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_config_shape() {
    let a = api_with(|_| {}).await;
    a.deploy("flow", &[], json!({})).await;
    let r = a
        .call(
            Method::POST,
            "/v1/public/flow/start",
            Some(&a.pk),
            Some(json!({"flow_config": {"initial_node": "x"}})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let r = a
        .call(
            Method::POST,
            "/v1/public/flow/start",
            Some(&a.pk),
            Some(json!({"flow_config": "initial_node: x", "transport": "websocket"})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    let r = a
        .call(
            Method::POST,
            "/v1/public/flow/start",
            Some(&a.pk),
            Some(json!({"flow_config": "initial_node: x", "body": {"a": 1}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// `keepDailyRooms`: the org's property keeps the rooms of ended sessions, an agent's own
/// setting wins over it, and a start that fails still deletes its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_daily_rooms_of_the_org_and_the_agent() {
    let (daily, a) = with_daily(Some("dk_server_key_0001")).await;
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"keepDailyRooms": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["properties"]["keepDailyRooms"]["currentValue"],
        "true"
    );
    assert_eq!(
        a.get("/v1/properties").await.body["properties"]["keepDailyRooms"],
        true
    );
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"keepDailyRooms": "yes"})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    a.deploy("kept", &[], json!({"autoScaling": {"maxAgents": 1}}))
        .await;
    a.deploy("gone", &[], json!({"keepDailyRooms": false}))
        .await;
    assert_eq!(a.get("/v1/agents/gone").await.body["keepDailyRooms"], false);
    let kept = start_daily(&a, "kept", json!({})).await;
    assert_eq!(kept.body["dailyRoom"], "https://cattery.daily.co/room1");
    let gone = start_daily(&a, "gone", json!({})).await;
    assert_eq!(gone.body["dailyRoom"], "https://cattery.daily.co/room2");
    // A start refused at maxAgents makes no room (none to keep).
    let r = start_daily(&a, "kept", json!({})).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(
        daily.seen().iter().filter(|s| s.path == "/rooms").count(),
        2
    );
    let sid = |r: &Answer| r.body["sessionId"].as_str().unwrap().to_string();
    assert_eq!(a.stop("kept", &sid(&kept)).await.status, StatusCode::OK);
    assert_eq!(a.stop("gone", &sid(&gone)).await.status, StatusCode::OK);
    daily.wait_deleted("room2").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!daily.deleted("room1"), "{:?}", daily.seen());
}

/// Daily's pinless dial-in webhook: Daily's configuration test answers 200 and starts
/// nothing; a call makes a SIP dial-in room and a session whose body is pipecat's
/// `DailyDialinRequest`, delivered with the room; bad payloads and unknown agents are 4xx
/// and make no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_dialin_webhook_starts_a_session_in_a_sip_room() {
    let (daily, a) = with_daily(Some("dk_server_key_0001")).await;
    let url = daily.url.clone();
    a.deploy("phone", &[], json!({})).await;
    let a = &a;
    let hook = |org: &str, agent: &str, body: Value| {
        let path = format!("/v1/public/webhooks/{org}/{agent}/dialin");
        async move { a.call(Method::POST, &path, None, Some(body)).await }
    };
    let r = hook("default", "phone", json!({"test": "test"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"status": "success"}));
    assert_eq!(a.fake.starts(), 0);
    let r = hook("default", "phone", json!({"To": "+1555"})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    // An unknown agent and an unknown org answer the same (no key on this route: it must not
    // tell which orgs exist), tests included, and make no room.
    let call = json!({"callId": "c", "callDomain": "d"});
    let no_agent = hook("default", "nobody", call.clone()).await;
    assert_error(&no_agent, StatusCode::NOT_FOUND, "NOT_FOUND");
    for (org, agent, body) in [
        ("nope", "phone", call.clone()),
        ("nope", "nobody", call.clone()),
        ("nope", "phone", json!({"test": "test"})),
        ("default", "nobody", json!({"test": "test"})),
    ] {
        let r = hook(org, agent, body).await;
        assert_eq!(
            (r.status, &r.body),
            (no_agent.status, &no_agent.body),
            "{org}/{agent}"
        );
    }
    assert!(daily.seen().is_empty(), "{:?}", daily.seen());

    let call = json!({"To": "+15550001111", "From": "+15550002222", "callId": "call-1",
                      "callDomain": "dom-1", "sipHeaders": {"X-Tenant": "t1"}});
    let r = hook("default", "phone", call).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "success");
    assert_eq!(r.body["dailyRoom"], "https://cattery.daily.co/room1");
    let sid = r.body["sessionId"].as_str().unwrap().to_string();
    let room = &daily.seen()[0];
    assert_eq!(room.path, "/rooms");
    assert_eq!(
        room.body["properties"]["sip"],
        json!({"display_name": "+15550002222", "sip_mode": "dial-in", "num_endpoints": 1})
    );
    let got = super::delivered(a).await;
    assert_eq!(got.len(), 1);
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(
        body,
        json!({"dialin_settings": {"call_id": "call-1", "call_domain": "dom-1",
                                   "To": "+15550001111", "From": "+15550002222",
                                   "sip_headers": {"X-Tenant": "t1"}},
               "daily_api_key": "dk_server_key_0001", "daily_api_url": url})
    );
    assert_eq!(
        got[0].headers["x-daily-room-url"],
        "https://cattery.daily.co/room1"
    );
    assert_eq!(got[0].headers["x-daily-room-token"], "tok-bot-room1");
    let s = a.get(&format!("/v1/agents/phone/sessions/{sid}")).await;
    assert_eq!(s.body["transport"], "daily", "{}", s.body);
    assert_eq!(a.stop("phone", &sid).await.status, StatusCode::OK);
    daily.wait_deleted("room1").await;
}

/// The org's `dailyApiKey` is stored sealed: no file of the data dir holds it, and it is
/// still used and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_daily_api_key_is_stored_sealed() {
    let (daily, a) = with_daily(None).await;
    let r = a
        .call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({"dailyApiKey": "dk_sealed_plaintext_5150"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    a.deploy("sealed", &[], json!({})).await;
    let r = start_daily(&a, "sealed", json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(daily
        .seen()
        .iter()
        .all(|s| s.auth == "Bearer dk_sealed_plaintext_5150"));
    let r = a.get("/v1/organizations/default/daily").await;
    assert_eq!(r.body["apiKey"], "dk_sealed_plaintext_5150");
    for e in std::fs::read_dir(a._dir.path()).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
        assert!(
            !bytes
                .windows(b"dk_sealed_plaintext".len())
                .any(|w| w == b"dk_sealed_plaintext"),
            "the key is stored in plain text"
        );
    }
}

/// A private key of org `org`, made for the test.
pub(super) async fn org_private_key(a: &super::Api, org: &str) -> String {
    let store = a.state.store.clone();
    store.ensure_org(org).await.unwrap();
    let (_, sk) =
        crate::core::keys::issue_key(store.as_ref(), org, crate::model::KeyKind::Private, "sk")
            .await
            .unwrap();
    sk
}

/// Sets the `dailyApiKey` property of the org of `sk`.
async fn set_daily_key(a: &super::Api, sk: &str, key: &str) {
    let body = json!({ "dailyApiKey": key });
    let r = a
        .call(Method::PATCH, "/v1/properties", Some(sk), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// The server's `--daily-api-key` is the operator's whole Daily account: the default org
/// reads it from `GET .../daily` (the official CLI's `whoami`), another org only its own
/// `dailyApiKey` (404 without one), though its rooms are made with the server's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_org_never_reads_the_servers_daily_key() {
    let (daily, a) = with_daily(Some("dk_server_operator_1234")).await;
    let r = a.get("/v1/organizations/default/daily").await;
    assert_eq!(r.body["apiKey"], "dk_server_operator_1234", "{}", r.body);
    let acme_sk = org_private_key(&a, "acme").await;
    let acme_daily = || {
        a.call(
            Method::GET,
            "/v1/organizations/acme/daily",
            Some(&acme_sk),
            None,
        )
    };
    let r = acme_daily().await;
    assert_error(&r, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert!(!r.body.to_string().contains("dk_server"), "{}", r.body);
    let r = a
        .call(Method::GET, "/v1/properties", Some(&acme_sk), None)
        .await;
    assert!(!r.body.to_string().contains("dk_server"), "{}", r.body);
    // Its own key, once set, is its to read.
    set_daily_key(&a, &acme_sk, "dk_acme_own_5678").await;
    let r = acme_daily().await;
    assert_eq!(r.body["apiKey"], "dk_acme_own_5678", "{}", r.body);
    drop(daily);
}

/// Dial-in hands the Daily key to the bot (it forwards the held call with it): another org
/// than the default one needs a key of its own, and its bot never gets the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialin_of_another_org_needs_its_own_daily_key() {
    let (daily, a) = with_daily(Some("dk_server_operator_1234")).await;
    let acme_sk = org_private_key(&a, "acme").await;
    let body = json!({"serviceName": "phone", "command": ["fake"]});
    let r = a
        .call(Method::POST, "/v1/agents", Some(&acme_sk), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let call = json!({"callId": "c", "callDomain": "d"});
    let hook = || {
        a.call(
            Method::POST,
            "/v1/public/webhooks/acme/phone/dialin",
            None,
            Some(call.clone()),
        )
    };
    let r = hook().await;
    assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("own Daily API key"),
        "{}",
        r.body
    );
    assert!(daily.seen().is_empty(), "no room: {:?}", daily.seen());
    assert!(a.fake.delivered().is_empty());
    set_daily_key(&a, &acme_sk, "dk_acme_own_5678").await;
    let r = hook().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let got = super::delivered(&a).await;
    assert!(got[0].body.contains("dk_acme_own_5678"), "{}", got[0].body);
    assert!(!got[0].body.contains("dk_server"), "{}", got[0].body);
}

/// An org that sets `dailyDialinHmac` takes only dial-in requests Daily signed with it: an
/// unsigned, forged or replayed one answers as an unknown agent does and makes no room and
/// no session; a signed one (the configuration test too) goes through. The secret is stored
/// sealed and shown masked; one that is not base64 is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_dialin_when_the_org_has_dailys_hmac() {
    use base64::Engine as _;
    let (daily, a) = with_daily(Some("dk_server_key_0001")).await;
    a.deploy("phone", &[], json!({})).await;
    let secret = "ZGlhbGluLWhtYWMtcGxhaW50ZXh0LTQyNDI="; // "dialin-hmac-plaintext-4242"
    let set = |v: Value| {
        a.call(
            Method::PATCH,
            "/v1/properties",
            Some(&a.sk),
            Some(json!({ "dailyDialinHmac": v })),
        )
    };
    for bad in [json!("not base64!"), json!(7), json!("=")] {
        let r = set(bad.clone()).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
    }
    let r = set(json!(secret)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["properties"]["dailyDialinHmac"]["currentValue"],
        "****NDI="
    );
    let r = a.get("/v1/properties").await;
    assert!(!r.body.to_string().contains(secret), "{}", r.body);

    let sign = |ts: &str, body: &str| {
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(secret).unwrap());
        b64.encode(ring::hmac::sign(&key, format!("{ts}.{body}").as_bytes()).as_ref())
    };
    let now = (crate::model::now_ms() / 1000).to_string();
    let hook = |agent: &'static str, body: Value, ts: String, sig: Option<String>| {
        let app = a.app.clone();
        async move {
            let mut h = vec![("content-type", "application/json".to_string())];
            if let Some(sig) = sig {
                h.push(("x-pinless-timestamp", ts));
                h.push(("x-pinless-signature", sig));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let path = format!("/v1/public/webhooks/default/{agent}/dialin");
            let (status, _, body) = super::raw(&app, Method::POST, &path, &h, Some(body)).await;
            Answer { status, body }
        }
    };
    let call = json!({"To": "+15550001111", "From": "+15550002222", "callId": "call-1",
                      "callDomain": "dom-1"});
    let no_agent = hook("nobody", call.clone(), now.clone(), None).await;
    assert_error(&no_agent, StatusCode::NOT_FOUND, "NOT_FOUND");
    let stale = (crate::model::now_ms() / 1000 - 600).to_string();
    let forged = json!({"To": "+1", "From": "+2", "callId": "x", "callDomain": "y"});
    for (what, body, ts, sig) in [
        ("unsigned", call.clone(), now.clone(), None),
        ("unsigned test", json!({"test": "test"}), now.clone(), None),
        (
            "another body",
            forged,
            now.clone(),
            Some(sign(&now, &call.to_string())),
        ),
        (
            "replayed",
            call.clone(),
            stale.clone(),
            Some(sign(&stale, &call.to_string())),
        ),
        (
            "garbage",
            call.clone(),
            now.clone(),
            Some("AAAA".to_string()),
        ),
    ] {
        let r = hook("phone", body, ts, sig).await;
        assert_eq!(
            (r.status, &r.body),
            (no_agent.status, &no_agent.body),
            "{what}"
        );
    }
    assert!(daily.seen().is_empty(), "{:?}", daily.seen());
    assert_eq!(a.fake.starts(), 0);

    let test = json!({"test": "test"});
    let r = hook(
        "phone",
        test.clone(),
        now.clone(),
        Some(sign(&now, &test.to_string())),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = hook(
        "phone",
        call.clone(),
        now.clone(),
        Some(sign(&now, &call.to_string())),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(super::delivered(&a).await.len(), 1);
    for e in std::fs::read_dir(a._dir.path()).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
        let plain = b"dialin-hmac-plaintext";
        assert!(
            !bytes.windows(plain.len()).any(|w| w == plain)
                && !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret is stored in plain text"
        );
    }
    // Unset, the route takes unsigned requests again.
    assert_eq!(set(Value::Null).await.status, StatusCode::OK);
    let r = hook("phone", test, now, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// An org whose `dailyDialinHmac` is stored but cannot be opened (sealed under another
/// secrets key) takes no dial-in request at all: its webhooks stay refused, never open to
/// anyone, until the secret is set again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_dialin_hmac_refuses_every_dialin() {
    let (daily, a) = with_daily(Some("dk_server_key_0001")).await;
    a.deploy("phone", &[], json!({})).await;
    let sealed_elsewhere = json!({ "dailyDialinHmac": {
        "nonce": "AAAAAAAAAAAAAAAA", "ciphertext": "c2VhbGVkIHVuZGVyIGFub3RoZXIga2V5IQ==" } });
    a.state
        .store
        .set_org_properties(crate::serve::DEFAULT_ORG, &sealed_elsewhere)
        .await
        .unwrap();
    let hook = |agent: &str, body: Value| {
        let app = a.app.clone();
        let path = format!("/v1/public/webhooks/default/{agent}/dialin");
        async move {
            let h = [("content-type", "application/json")];
            let (status, _, body) = super::raw(&app, Method::POST, &path, &h, Some(body)).await;
            Answer { status, body }
        }
    };
    let no_agent = hook("nobody", json!({"test": "test"})).await;
    assert_error(&no_agent, StatusCode::NOT_FOUND, "NOT_FOUND");
    let call = json!({"To": "+15550001111", "From": "+15550002222", "callId": "call-1",
                      "callDomain": "dom-1"});
    for body in [json!({"test": "test"}), call] {
        let r = hook("phone", body).await;
        assert_eq!((r.status, &r.body), (no_agent.status, &no_agent.body));
    }
    assert!(daily.seen().is_empty(), "{:?}", daily.seen());
    assert_eq!(a.fake.starts(), 0);
}

/// `agent profiles list`'s catalog, and `deploy --architecture`: the host's is accepted, the
/// other one and nonsense are 400s naming the host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_profiles_and_architecture() {
    let a = api_with(|_| {}).await;
    let r = a.get("/v1/organizations/default/agent-profiles").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let p = r.body["agentProfiles"].as_array().unwrap();
    assert_eq!(p.len(), 3);
    assert_eq!(
        p[1],
        json!({"api_name": "agent-2x", "display_name": "Agent 2x",
               "resources": {"cpu": "1000m", "memory": "2Gi"}, "custom": false, "enabled": true})
    );
    let host = crate::core::orgs::host_architecture();
    a.deploy("arch", &[], json!({"architecture": host})).await;
    let other = if host == "amd64" { "arm64" } else { "amd64" };
    for bad in [other, "sparc"] {
        let r = a
            .call(
                Method::POST,
                "/v1/agents",
                Some(&a.sk),
                Some(json!({"serviceName": "arch2", "command": ["fake"], "architecture": bad})),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
        assert!(
            r.body["error"].as_str().unwrap().contains("architecture"),
            "{}",
            r.body
        );
    }
}

/// `resources` (`deploy --resources`): explicit CPU and memory replace the profile's limits,
/// shown in agent status and in the deployment's manifest; `agentProfile` alone clears them;
/// malformed, out of bounds, half given or given with `agentProfile` is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_resources_replace_the_profile() {
    let a = api_with(|_| {}).await;
    a.deploy(
        "sized",
        &[],
        json!({"resources": {"cpu": "2", "memory": "4Gi"}}),
    )
    .await;
    let s = a.get("/v1/agents/sized").await;
    assert_eq!(
        s.body["resources"],
        json!({"cpu": "2", "memory": "4Gi"}),
        "{}",
        s.body
    );
    assert!(s.body["warning"].is_null(), "{}", s.body);
    let d = a.get("/v1/agents/sized/deployments").await;
    let text = d.body.to_string();
    assert!(
        text.contains("\"cpu\":\"2\"") && text.contains("\"memory\":\"4Gi\""),
        "{text}"
    );
    for (bad, why) in [
        (json!({"resources": {"cpu": "2"}}), "both cpu and memory"),
        (
            json!({"resources": {"cpu": "lots", "memory": "1Gi"}}),
            "resources.cpu",
        ),
        (
            json!({"resources": {"cpu": "1", "memory": "1Pi"}}),
            "resources.memory",
        ),
        (
            json!({"resources": {"cpu": "1", "memory": "1Gi"}, "agentProfile": "agent-2x"}),
            "not both",
        ),
    ] {
        let r = a
            .call(
                Method::POST,
                "/v1/agents/sized",
                Some(&a.sk),
                Some(bad.clone()),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "GENERIC_BAD_REQUEST");
        assert!(
            r.body["error"].as_str().unwrap().contains(why),
            "{bad}: {}",
            r.body
        );
    }
    let r = a
        .call(
            Method::POST,
            "/v1/agents/sized",
            Some(&a.sk),
            Some(json!({"agentProfile": "agent-2x"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(a
        .get("/v1/agents/sized")
        .await
        .body
        .get("resources")
        .is_none());
}
