//! The contract of [`Store`], as tests that run against any implementation: [`run_all`] takes
//! a factory of fresh, empty stores. SQLite runs it in its unit tests; a new backend calls it
//! the same way.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use uuid::Uuid;

use super::{
    AgentCounts, BuildFilter, BuildRecord, BuildStatus, DeliveryAttempt, DeliveryState, ForgetNode,
    LogFilter, NodeRecord, SealedValue, SecretSetKind, SecretSetRecord, SessionFilter, Store,
    StoreError, WebhookDelivery, WebhookEndpointRecord, WsTokenRecord,
};
use crate::model::{
    AgentRecord, ApiKeyRecord, DeploymentRecord, DeploymentSpec, EndReason, InstanceRecord,
    KeyKind, LogLine, MetricSample, SessionEnd, SessionRecord, SessionRoom,
};

/// A fresh store, and whatever must live as long as it (a temp dir).
pub type Fresh = (Box<dyn Any + Send>, Arc<dyn Store>);

/// Runs every case on its own fresh store from `factory`.
pub async fn run_all<F, Fut>(factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fresh>,
{
    macro_rules! case {
        ($name:ident) => {{
            let (_guard, store) = factory().await;
            $name(store.as_ref()).await;
        }};
    }
    case!(orgs);
    case!(keys);
    case!(agents_and_deployments);
    case!(sessions);
    case!(session_lists);
    case!(stop_requests);
    case!(instances);
    case!(sessions_with_instances);
    case!(session_daily_rooms);
    case!(secret_sets);
    case!(deployment_secret_snapshots);
    case!(logs);
    case!(text_with_nul);
    case!(log_pruning);
    case!(log_cap_shared_between_orgs);
    case!(nodes);
    case!(capacity_slots);
    case!(agent_counts);
    case!(concurrent_reservations);
    case!(instance_claims);
    case!(ws_tokens);
    case!(node_takeover);
    case!(forgetting_nodes);
    case!(waiting_websocket_sessions);
    case!(builds);
    case!(build_retention);
    case!(webhooks);
    case!(webhook_delivery_ids_are_queued_once);
    case!(org_limits);
    case!(secrets_key_rotation);
}

fn agent(org: &str, name: &str, created_ms: i64) -> (AgentRecord, DeploymentRecord) {
    let a = AgentRecord {
        id: Uuid::new_v4(),
        org: org.into(),
        name: name.into(),
        region: "local".into(),
        min_agents: 0,
        max_agents: 3,
        desired_deployment_id: Uuid::new_v4(),
        created_ms,
        updated_ms: created_ms,
        deleted_ms: None,
    };
    let d = DeploymentRecord {
        id: a.desired_deployment_id,
        agent_id: a.id,
        spec: DeploymentSpec {
            command: Some(vec!["/bin/true".into()]),
            agent_profile: "agent-1x".into(),
            ..Default::default()
        },
        created_ms,
    };
    (a, d)
}

pub(crate) async fn with_agent(s: &dyn Store, org: &str, name: &str) -> AgentRecord {
    s.ensure_org(org).await.unwrap();
    let (a, d) = agent(org, name, 1_000);
    s.create_agent(&a, &d, None).await.unwrap();
    a
}

fn session(a: &AgentRecord, created_ms: i64) -> SessionRecord {
    SessionRecord {
        id: Uuid::new_v4(),
        org: a.org.clone(),
        agent_id: a.id,
        deployment_id: a.desired_deployment_id,
        created_ms,
        updated_ms: created_ms,
        bot_start_ms: None,
        cold_start: Some(false),
        transport: Some("webrtc".into()),
        end: None,
        samples: Vec::new(),
        node_id: "n1".into(),
        daily_room: None,
    }
}

fn end(reason: EndReason, at: i64) -> SessionEnd {
    SessionEnd {
        ended_ms: at,
        reason,
        completion_status: "HTTP_COMPLETED".into(),
        exit_code: Some(0),
        exit_signal: None,
        message: Some(format!("{reason:?}")),
    }
}

fn instance(a: &AgentRecord) -> InstanceRecord {
    InstanceRecord {
        id: Uuid::new_v4(),
        agent_id: a.id,
        deployment_id: a.desired_deployment_id,
        session_id: None,
        runtime: "process".into(),
        placement: serde_json::json!({"pid": 42, "nested": {"port": 20001}, "list": [1, "x", null]}),
        created_ms: 5,
        node_id: "n1".into(),
    }
}

fn key(org: &str, kind: KeyKind, created_ms: i64) -> (ApiKeyRecord, Vec<u8>) {
    let id = Uuid::new_v4();
    let rec = ApiKeyRecord {
        id,
        org: org.into(),
        kind,
        name: format!("k{created_ms}"),
        prefix: format!("{}abc", kind.prefix()),
        created_ms,
        revoked_ms: None,
        public_key: Some(format!("{}{id}", kind.prefix())),
    };
    (rec, id.as_bytes().to_vec())
}

fn sealed(key: &str, v: u8) -> SealedValue {
    SealedValue {
        key: key.into(),
        nonce: vec![v; 24],
        ciphertext: vec![v, v, v],
    }
}

fn set(org: &str, name: &str, kind: SecretSetKind) -> SecretSetRecord {
    SecretSetRecord {
        org: org.into(),
        name: name.into(),
        kind,
        region: "local".into(),
        host: None,
        created_ms: 10,
        updated_ms: 10,
        keys: Vec::new(),
    }
}

pub(crate) fn line(a: &AgentRecord, ts_ns: i64, text: &str) -> LogLine {
    LogLine {
        org: a.org.clone(),
        agent_id: a.id,
        deployment_id: Some(a.desired_deployment_id),
        session_id: None,
        instance_id: None,
        ts_ns,
        stream: "stdout",
        line: text.into(),
    }
}

async fn orgs(s: &dyn Store) {
    s.ensure_org("b").await.unwrap();
    s.ensure_org("a").await.unwrap();
    s.ensure_org("b").await.unwrap();
    let orgs = s.list_orgs().await.unwrap();
    assert_eq!(orgs.len(), 2, "ensure_org is idempotent: {orgs:?}");
    let o = s.get_org("a").await.unwrap().unwrap();
    assert_eq!(o.name, "a");
    assert_eq!(o.properties, serde_json::json!({}));
    let props = serde_json::json!({"defaultRegion": "local"});
    s.set_org_properties("a", &props).await.unwrap();
    s.ensure_org("a").await.unwrap();
    assert_eq!(s.get_org("a").await.unwrap().unwrap().properties, props);
    assert!(s.get_org("zz").await.unwrap().is_none());
    assert!(matches!(
        s.set_org_properties("zz", &props).await,
        Err(StoreError::NotFound)
    ));
}

async fn keys(s: &dyn Store) {
    s.ensure_org("a").await.unwrap();
    s.ensure_org("b").await.unwrap();
    let (k1, h1) = key("a", KeyKind::Private, 2);
    let (k0, h0) = key("a", KeyKind::Public, 1);
    let (kb, hb) = key("b", KeyKind::Private, 3);
    s.insert_key(&k1, &h1, None).await.unwrap();
    s.insert_key(&k0, &h0, None).await.unwrap();
    s.insert_key(&kb, &hb, None).await.unwrap();
    let (mut dup, _) = key("a", KeyKind::Token, 4);
    dup.id = Uuid::new_v4();
    assert!(matches!(
        s.insert_key(&dup, &h1, None).await,
        Err(StoreError::Conflict)
    ));
    let (got, hash) = s.find_key(&h1).await.unwrap().unwrap();
    assert_eq!(
        (got.id, got.kind, hash),
        (k1.id, KeyKind::Private, h1.clone())
    );
    assert_eq!(got.public_key, None, "only public keys keep the key");
    let (pk, _) = s.find_key(&h0).await.unwrap().unwrap();
    assert_eq!(pk.public_key, k0.public_key);
    assert!(s.find_key(b"nope").await.unwrap().is_none());
    let ids = |v: Vec<ApiKeyRecord>| v.into_iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_keys("a", None).await.unwrap()), [k0.id, k1.id]);
    assert_eq!(
        ids(s.list_keys("a", Some(KeyKind::Private)).await.unwrap()),
        [k1.id]
    );
    assert!(!s.revoke_key("b", k1.id).await.unwrap(), "org scoped");
    assert!(s.revoke_key("a", k1.id).await.unwrap());
    let first = s.find_key(&h1).await.unwrap().unwrap().0.revoked_ms;
    assert!(first.is_some());
    assert!(s.revoke_key("a", k1.id).await.unwrap());
    assert_eq!(s.find_key(&h1).await.unwrap().unwrap().0.revoked_ms, first);
    assert!(!s.revoke_key("a", Uuid::new_v4()).await.unwrap());
}

async fn agents_and_deployments(s: &dyn Store) {
    s.ensure_org("a").await.unwrap();
    s.ensure_org("b").await.unwrap();
    let (a2, d2) = agent("a", "second", 20);
    let (a1, d1) = agent("a", "first", 10);
    s.create_agent(&a2, &d2, None).await.unwrap();
    s.create_agent(&a1, &d1, None).await.unwrap();
    let (same, same_d) = agent("a", "first", 30);
    assert!(matches!(
        s.create_agent(&same, &same_d, None).await,
        Err(StoreError::Conflict)
    ));
    assert!(
        s.get_deployment(same_d.id).await.unwrap().is_none(),
        "nothing of a failed create is kept"
    );
    let (other, other_d) = agent("b", "first", 30);
    s.create_agent(&other, &other_d, None).await.unwrap();
    assert_eq!(s.get_agent("a", "first").await.unwrap().unwrap().id, a1.id);
    assert_eq!(
        s.get_agent("b", "first").await.unwrap().unwrap().id,
        other.id
    );
    assert!(s.get_agent("c", "first").await.unwrap().is_none());
    let names = |v: Vec<AgentRecord>| v.into_iter().map(|a| a.name).collect::<Vec<_>>();
    assert_eq!(
        names(s.list_agents("a").await.unwrap()),
        ["first", "second"]
    );
    assert_eq!(s.list_all_agents().await.unwrap().len(), 3);
    let got = s.get_deployment(d1.id).await.unwrap().unwrap();
    assert_eq!((got.agent_id, got.spec), (a1.id, d1.spec.clone()));

    // Update: scaling alone, then with a new deployment.
    let mut up = a1.clone();
    up.max_agents = 7;
    up.updated_ms = 40;
    s.update_agent(&up, None).await.unwrap();
    let mut d3 = d1.clone();
    d3.id = Uuid::new_v4();
    d3.created_ms = 50;
    d3.spec.revision = 1;
    up.desired_deployment_id = d3.id;
    s.update_agent(&up, Some(&d3)).await.unwrap();
    let got = s.get_agent_by_id(a1.id).await.unwrap().unwrap();
    assert_eq!((got.max_agents, got.desired_deployment_id), (7, d3.id));
    let deps: Vec<Uuid> = s
        .list_deployments(a1.id)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(deps, [d3.id, d1.id], "newest first");
    let (ghost, _) = agent("a", "ghost", 1);
    assert!(matches!(
        s.update_agent(&ghost, None).await,
        Err(StoreError::NotFound)
    ));

    // Delete frees the name; the record stays readable by id.
    s.delete_agent(a1.id, 60).await.unwrap();
    assert!(s.get_agent("a", "first").await.unwrap().is_none());
    assert_eq!(names(s.list_agents("a").await.unwrap()), ["second"]);
    let gone = s.get_agent_by_id(a1.id).await.unwrap().unwrap();
    assert_eq!(gone.deleted_ms, Some(60));
    let last = |org: &'static str, name: &'static str| async move {
        s.last_deleted_agent(org, name).await.unwrap().map(|a| a.id)
    };
    assert_eq!(last("a", "first").await, Some(a1.id));
    assert_eq!(last("a", "second").await, None, "live");
    assert_eq!(last("b", "first").await, None, "another org");
    s.create_agent(&same, &same_d, None).await.unwrap();
    assert!(matches!(
        s.delete_agent(Uuid::new_v4(), 1).await,
        Err(StoreError::NotFound)
    ));
}

async fn sessions(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let mut s1 = session(&a, 100);
    s1.transport = None;
    s.insert_session(&s1).await.unwrap();
    assert!(matches!(
        s.insert_session(&s1).await,
        Err(StoreError::Conflict)
    ));
    assert!(s.mark_delivered(s1.id, 42).await.unwrap());
    let got = s.get_session(s1.id).await.unwrap().unwrap();
    assert_eq!(
        (got.bot_start_ms, got.cold_start, got.end, got.transport),
        (Some(42), Some(false), None, None)
    );
    assert!(got.samples.is_empty());

    // First end wins.
    let e1 = end(EndReason::Stopped, 200);
    assert!(s.end_session(s1.id, &e1).await.unwrap());
    assert!(!s
        .end_session(s1.id, &end(EndReason::Error, 300))
        .await
        .unwrap());
    assert!(!s.end_session(Uuid::new_v4(), &e1).await.unwrap());
    assert!(
        !s.mark_delivered(s1.id, 99).await.unwrap(),
        "an ended session's delivery is not recorded"
    );
    assert!(!s.mark_delivered(Uuid::new_v4(), 1).await.unwrap());
    let got = s.get_session(s1.id).await.unwrap().unwrap();
    assert_eq!(got.end, Some(e1));
    assert_eq!(got.bot_start_ms, Some(42), "no delivery after the end");

    let samples = vec![
        MetricSample {
            t: 1,
            cpu_millicores: 10,
            memory_bytes: 1 << 40,
        },
        MetricSample {
            t: 2,
            cpu_millicores: 0,
            memory_bytes: 5,
        },
    ];
    s.set_session_samples(s1.id, &samples).await.unwrap();
    assert_eq!(
        s.get_session(s1.id).await.unwrap().unwrap().samples,
        samples
    );
    s.set_session_samples(s1.id, &samples[1..]).await.unwrap();
    assert_eq!(
        s.get_session(s1.id).await.unwrap().unwrap().samples,
        &samples[1..]
    );
    assert!(s.get_session(Uuid::new_v4()).await.unwrap().is_none());
}

async fn stop_requests(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let (s1, s2, ended) = (session(&a, 1), session(&a, 2), session(&a, 3));
    for x in [&s1, &s2, &ended] {
        s.insert_session(x).await.unwrap();
    }
    s.end_session(ended.id, &end(EndReason::OutOfMemory, 5))
        .await
        .unwrap();
    assert!(s.stop_requests().await.unwrap().is_empty());
    s.request_stop(s1.id, 100).await.unwrap();
    s.request_stop(s1.id, 200).await.unwrap();
    s.request_stop(ended.id, 100).await.unwrap();
    s.request_stop(Uuid::new_v4(), 100).await.unwrap();
    assert_eq!(
        s.stop_requests().await.unwrap(),
        [(s1.id, 100)],
        "first deadline kept"
    );
    s.end_session(s1.id, &end(EndReason::Stopped, 150))
        .await
        .unwrap();
    assert!(
        s.stop_requests().await.unwrap().is_empty(),
        "open sessions only"
    );
    let got = s.get_session(ended.id).await.unwrap().unwrap();
    assert_eq!(
        got.end.unwrap().reason,
        EndReason::OutOfMemory,
        "every end reason reads back"
    );
    assert!(s.get_session(s2.id).await.unwrap().unwrap().end.is_none());
}

async fn session_lists(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let b = with_agent(s, "a", "y").await;
    let mut all = Vec::new();
    for i in 0..6 {
        let mut x = session(&a, 100 + i / 2);
        x.cold_start = Some(i % 2 == 0);
        s.insert_session(&x).await.unwrap();
        all.push(x);
    }
    s.insert_session(&session(&b, 100)).await.unwrap();
    s.end_session(all[0].id, &end(EndReason::Completed, 500))
        .await
        .unwrap();
    s.end_session(all[3].id, &end(EndReason::Completed, 500))
        .await
        .unwrap();
    let page = |f: SessionFilter| async move {
        let (n, v) = s.list_sessions(a.id, &f).await.unwrap();
        (n, v.into_iter().map(|x| x.id).collect::<Vec<_>>())
    };
    let f = |limit, offset| SessionFilter {
        limit,
        offset,
        ..Default::default()
    };
    // Newest first; same time: the later inserted first.
    let newest: Vec<Uuid> = all.iter().rev().map(|x| x.id).collect();
    assert_eq!(page(f(100, 0)).await, (6, newest.clone()));
    assert_eq!(page(f(2, 1)).await, (6, newest[1..3].to_vec()));
    let active = page(SessionFilter {
        active: Some(true),
        ..f(100, 0)
    })
    .await;
    assert_eq!(active.0, 4);
    assert_eq!(
        active.1,
        [all[5].id, all[4].id, all[2].id, all[1].id].to_vec()
    );
    let ended = page(SessionFilter {
        active: Some(false),
        ..f(100, 0)
    })
    .await;
    assert_eq!(ended, (2, vec![all[3].id, all[0].id]));
    let cold = page(SessionFilter {
        cold: Some(true),
        ..f(100, 0)
    })
    .await;
    assert_eq!(cold, (3, vec![all[4].id, all[2].id, all[0].id]));
    let range = page(SessionFilter {
        start_ms: Some(101),
        end_ms: Some(101),
        ..f(100, 0)
    })
    .await;
    assert_eq!(range, (2, vec![all[3].id, all[2].id]));
    let other_dep = page(SessionFilter {
        deployment_id: Some(Uuid::new_v4()),
        ..f(100, 0)
    })
    .await;
    assert_eq!(other_dep, (0, vec![]));
    let open = s.list_open_sessions().await.unwrap();
    assert_eq!(open.len(), 5, "across agents");
    assert!(open.iter().all(|x| x.end.is_none()));
    s.end_session(all[5].id, &end(EndReason::Stopped, 600))
        .await
        .unwrap();
    let stopped = page(SessionFilter {
        end_reason: Some(EndReason::Stopped),
        ..f(100, 0)
    })
    .await;
    assert_eq!(stopped, (1, vec![all[5].id]));
    let completed = page(SessionFilter {
        end_reason: Some(EndReason::Completed),
        ..f(100, 0)
    })
    .await;
    assert_eq!(completed, (2, vec![all[3].id, all[0].id]));
    // A websocket caller who hung up: before delivery ended before the agent started, after
    // it completed the call (the end state the CLI filters by, `EndState::of`).
    let (early, late) = (session(&a, 103), session(&a, 103));
    for (x, status) in [(&early, "HTTP_ERROR"), (&late, "WS_CONNECTION_CLOSED")] {
        s.insert_session(x).await.unwrap();
        let e = SessionEnd {
            completion_status: status.into(),
            ..end(EndReason::ClientDisconnected, 700)
        };
        s.end_session(x.id, &e).await.unwrap();
    }
    let by_state = |e: crate::model::EndState| SessionFilter {
        end_state: Some(e),
        ..f(100, 0)
    };
    let before = page(by_state(crate::model::EndState::EndedBeforeAgentStart)).await;
    assert_eq!(before, (1, vec![early.id]));
    let completed = page(by_state(crate::model::EndState::Completed)).await;
    assert_eq!(completed, (3, vec![late.id, all[3].id, all[0].id]));
}

async fn instances(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let i1 = instance(&a);
    let mut i2 = instance(&a);
    i2.runtime = "other".into();
    s.put_instance(&i1).await.unwrap();
    s.put_instance(&i2).await.unwrap();
    let mut got = s.list_instances().await.unwrap();
    got.sort_by_key(|i| i.id != i1.id);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].placement, i1.placement, "placement kept as given");
    assert_eq!(
        (got[0].runtime.as_str(), got[1].runtime.as_str()),
        ("process", "other")
    );
    // Put replaces.
    let mut again = i1.clone();
    again.session_id = Some(Uuid::new_v4());
    again.placement = serde_json::json!({"pid": 7});
    s.put_instance(&again).await.unwrap();
    let got = s.list_instances().await.unwrap();
    let r = got.iter().find(|i| i.id == i1.id).unwrap();
    assert_eq!(
        (r.session_id, &r.placement),
        (again.session_id, &again.placement)
    );
    // A re-record updates its own record, never another node's, never a deleted one.
    let mut moved = again.clone();
    moved.placement = serde_json::json!({"pid": 8});
    assert!(s.update_instance(&moved).await.unwrap());
    let got = s.list_instances().await.unwrap();
    let r = got.iter().find(|i| i.id == i1.id).unwrap();
    assert_eq!(r.placement, moved.placement);
    let mut other_node = moved.clone();
    other_node.node_id = "n-other".into();
    other_node.placement = serde_json::json!({"pid": 9});
    assert!(!s.update_instance(&other_node).await.unwrap());
    let got = s.list_instances().await.unwrap();
    let r = got.iter().find(|i| i.id == i1.id).unwrap();
    assert_eq!(
        (&r.node_id, &r.placement),
        (&moved.node_id, &moved.placement)
    );
    s.delete_instance(i1.id).await.unwrap();
    s.delete_instance(i1.id).await.unwrap();
    assert!(!s.update_instance(&moved).await.unwrap());
    let got = s.list_instances().await.unwrap();
    assert_eq!(got.iter().map(|i| i.id).collect::<Vec<_>>(), [i2.id]);
}

/// The Daily room Cattery made for a session is kept with it, whichever write stored the
/// session (a cold start's insert, a warm start's claim), and read back by every read of
/// sessions (one, the open ones after a restart, those a takeover hands over), ended or not.
async fn session_daily_rooms(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let room = |name: &str, keep: bool| {
        Some(SessionRoom {
            name: name.into(),
            keep,
        })
    };
    let mut cold = session(&a, 10);
    cold.daily_room = room("cold-room", false);
    cold.node_id = "dead".into();
    s.insert_session(&cold).await.unwrap();
    let inst = instance(&a);
    s.put_instance(&inst).await.unwrap();
    let mut warm = session(&a, 11);
    warm.daily_room = room("warm-room", true);
    warm.node_id = "dead".into();
    assert!(s.insert_session_for_instance(&warm, inst.id).await.unwrap());
    let mut plain = session(&a, 12);
    plain.node_id = "dead".into();
    s.insert_session(&plain).await.unwrap();
    let rooms = |list: Vec<SessionRecord>| {
        let mut v: Vec<_> = list.into_iter().map(|x| (x.id, x.daily_room)).collect();
        v.sort_by_key(|(id, _)| *id);
        v
    };
    let want = rooms(vec![cold.clone(), warm.clone(), plain.clone()]);
    assert_eq!(rooms(s.list_open_sessions().await.unwrap()), want);
    for x in [&cold, &warm, &plain] {
        let got = s.get_session(x.id).await.unwrap().unwrap();
        assert_eq!(got.daily_room, x.daily_room);
    }
    s.heartbeat(&node("dead", 100)).await.unwrap();
    let t = s.take_over_node("dead", "me", 100).await.unwrap().unwrap();
    assert_eq!(rooms(t.sessions), want);
    // Still there once the session has ended (the end's writer reads it to delete the room).
    s.end_session(cold.id, &end(EndReason::Lost, 20))
        .await
        .unwrap();
    let got = s.get_session(cold.id).await.unwrap().unwrap();
    assert_eq!(got.daily_room, cold.daily_room);
}

async fn sessions_with_instances(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let inst = instance(&a);
    s.put_instance(&inst).await.unwrap();
    let s1 = session(&a, 10);
    assert!(s.insert_session_for_instance(&s1, inst.id).await.unwrap());
    let rec = s.list_instances().await.unwrap().pop().unwrap();
    assert_eq!(rec.session_id, Some(s1.id));
    assert!(s.get_session(s1.id).await.unwrap().is_some());
    // A taken session id: nothing changes.
    let other = instance(&a);
    s.put_instance(&other).await.unwrap();
    assert!(matches!(
        s.insert_session_for_instance(&s1, other.id).await,
        Err(StoreError::Conflict)
    ));
    let recs = s.list_instances().await.unwrap();
    assert_eq!(
        recs.iter().find(|r| r.id == other.id).unwrap().session_id,
        None
    );
    // A missing instance: the session is stored, no record appears.
    let s2 = session(&a, 11);
    assert!(!s
        .insert_session_for_instance(&s2, Uuid::new_v4())
        .await
        .unwrap());
    assert!(s.get_session(s2.id).await.unwrap().is_some());
    assert_eq!(s.list_instances().await.unwrap().len(), 2);

    // The end: the record goes, the end (first wins) and the samples are kept.
    let samples = [MetricSample {
        t: 3,
        cpu_millicores: 250,
        memory_bytes: 1 << 20,
    }];
    let e = end(EndReason::Stopped, 20);
    assert!(s
        .end_instance(inst.id, Some((s1.id, &e, &samples[..])))
        .await
        .unwrap());
    let later = end(EndReason::Error, 30);
    assert!(!s
        .end_instance(inst.id, Some((s1.id, &later, &[])))
        .await
        .unwrap());
    let got = s.get_session(s1.id).await.unwrap().unwrap();
    assert_eq!(got.end, Some(e.clone()));
    assert_eq!(got.samples, samples, "empty samples keep the stored ones");
    assert!(s
        .list_instances()
        .await
        .unwrap()
        .iter()
        .all(|r| r.id != inst.id));
    assert!(!s.end_instance(other.id, None).await.unwrap());
    assert!(s.list_instances().await.unwrap().is_empty());
    // Samples are saved even when the end was recorded before.
    s.end_session(s2.id, &e).await.unwrap();
    assert!(!s
        .end_instance(Uuid::new_v4(), Some((s2.id, &later, &samples[..])))
        .await
        .unwrap());
    let got = s.get_session(s2.id).await.unwrap().unwrap();
    assert_eq!((got.end, got.samples), (Some(e), samples.to_vec()));
}

async fn secret_sets(s: &dyn Store) {
    s.ensure_org("a").await.unwrap();
    s.ensure_org("b").await.unwrap();
    let zeta = set("a", "zeta", SecretSetKind::Secret);
    s.upsert_secret_set(&zeta, &[sealed("B", 1), sealed("A", 2)], false, None)
        .await
        .unwrap();
    assert!(s.secret_set_exists("a", "zeta").await.unwrap());
    assert!(
        !s.secret_set_exists("b", "zeta").await.unwrap(),
        "org scoped"
    );
    let got = s.get_secret_set("a", "zeta").await.unwrap().unwrap();
    assert_eq!(got.keys, ["A", "B"]);
    assert_eq!(got.kind, SecretSetKind::Secret);
    // Upsert: add and overwrite, keep the rest.
    let mut touch = zeta.clone();
    touch.updated_ms = 20;
    s.upsert_secret_set(&touch, &[sealed("B", 9), sealed("C", 3)], false, None)
        .await
        .unwrap();
    let vals = s.secret_values("a", "zeta").await.unwrap();
    assert_eq!(vals, [sealed("A", 2), sealed("B", 9), sealed("C", 3)]);
    let got = s.get_secret_set("a", "zeta").await.unwrap().unwrap();
    assert_eq!((got.created_ms, got.updated_ms), (10, 20));
    // Replace all.
    s.upsert_secret_set(&touch, &[sealed("D", 4)], true, None)
        .await
        .unwrap();
    assert_eq!(
        s.secret_values("a", "zeta").await.unwrap(),
        [sealed("D", 4)]
    );
    // Another kind or region under the same name: conflict, nothing written.
    let mut pull = set("a", "zeta", SecretSetKind::ImagePullSecret);
    pull.host = Some("registry.example/".into());
    assert!(matches!(
        s.upsert_secret_set(&pull, &[sealed("E", 5)], true, None)
            .await,
        Err(StoreError::Conflict)
    ));
    let mut far = touch.clone();
    far.region = "elsewhere".into();
    assert!(matches!(
        s.upsert_secret_set(&far, &[], false, None).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        s.secret_values("a", "zeta").await.unwrap(),
        [sealed("D", 4)]
    );
    let mut pull = set("a", "alpha", SecretSetKind::ImagePullSecret);
    pull.host = Some("registry.example/".into());
    s.upsert_secret_set(&pull, &[sealed("credentials", 6)], true, None)
        .await
        .unwrap();
    s.upsert_secret_set(&set("b", "beta", SecretSetKind::Secret), &[], false, None)
        .await
        .unwrap();
    let list = s.list_secret_sets("a").await.unwrap();
    let names: Vec<(&str, Vec<String>)> = list
        .iter()
        .map(|x| (x.name.as_str(), x.keys.clone()))
        .collect();
    assert_eq!(
        names,
        [
            ("alpha", vec!["credentials".to_string()]),
            ("zeta", vec!["D".to_string()])
        ]
    );
    assert_eq!(list[0].host.as_deref(), Some("registry.example/"));
    // Deletes.
    assert!(!s.delete_secret("a", "zeta", "nope").await.unwrap());
    assert!(s.delete_secret("a", "zeta", "D").await.unwrap());
    assert!(s
        .get_secret_set("a", "zeta")
        .await
        .unwrap()
        .unwrap()
        .keys
        .is_empty());
    assert!(
        !s.delete_secret_set("b", "zeta").await.unwrap(),
        "org scoped"
    );
    assert!(s.delete_secret_set("a", "zeta").await.unwrap());
    assert!(!s.delete_secret_set("a", "zeta").await.unwrap());
    assert!(s.get_secret_set("a", "zeta").await.unwrap().is_none());
    assert!(s.secret_values("a", "zeta").await.unwrap().is_empty());
}

async fn deployment_secret_snapshots(s: &dyn Store) {
    s.ensure_org("a").await.unwrap();
    s.upsert_secret_set(
        &set("a", "keys", SecretSetKind::Secret),
        &[sealed("K", 1)],
        false,
        None,
    )
    .await
    .unwrap();
    let (a, mut d) = agent("a", "x", 1);
    d.spec.secret_set = Some("keys".into());
    s.create_agent(&a, &d, None).await.unwrap();
    s.upsert_secret_set(
        &set("a", "keys", SecretSetKind::Secret),
        &[sealed("K", 2), sealed("L", 3)],
        false,
        None,
    )
    .await
    .unwrap();
    let snap = s.deployment_secrets(d.id).await.unwrap();
    assert_eq!(
        snap,
        [("keys".to_string(), sealed("K", 1))],
        "taken at creation"
    );
    let (_, plain) = agent("a", "y", 1);
    assert!(s.deployment_secrets(plain.id).await.unwrap().is_empty());
    // A redeploy snapshots the current values; deleting the set keeps the snapshots.
    let mut d2 = d.clone();
    d2.id = Uuid::new_v4();
    d2.spec.revision = 1;
    let mut up = a.clone();
    up.desired_deployment_id = d2.id;
    s.update_agent(&up, Some(&d2)).await.unwrap();
    assert_eq!(s.deployment_secrets(d2.id).await.unwrap().len(), 2);
    s.delete_secret_set("a", "keys").await.unwrap();
    assert_eq!(s.deployment_secrets(d.id).await.unwrap().len(), 1);
    // A deployment bound to a set that is gone is refused, and nothing of it is kept.
    let mut d3 = d.clone();
    d3.id = Uuid::new_v4();
    up.desired_deployment_id = d3.id;
    assert!(matches!(
        s.update_agent(&up, Some(&d3)).await,
        Err(StoreError::Conflict)
    ));
    assert!(s.get_deployment(d3.id).await.unwrap().is_none());
    assert_eq!(
        s.get_agent_by_id(a.id)
            .await
            .unwrap()
            .unwrap()
            .desired_deployment_id,
        d2.id
    );
}

async fn logs(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let b = with_agent(s, "a", "y").await;
    let sid = Uuid::new_v4();
    let mut lines = vec![
        line(&a, 30, "third"),
        line(&a, 10, "first"),
        line(&a, 20, "second needle"),
    ];
    lines[2].session_id = Some(sid);
    let iid = Uuid::new_v4();
    lines[0].instance_id = Some(iid);
    s.append_logs(&lines).await.unwrap();
    s.append_logs(&[line(&a, 20, "second too"), line(&b, 15, "other agent")])
        .await
        .unwrap();
    s.append_logs(&[]).await.unwrap();
    let q = |f: LogFilter| async move {
        let (n, v) = s.query_logs(a.id, &f).await.unwrap();
        (n, v.into_iter().map(|l| l.line).collect::<Vec<_>>())
    };
    let all = LogFilter {
        limit: 100,
        ..Default::default()
    };
    // By time, then by arrival.
    assert_eq!(
        q(all.clone()).await,
        (
            4,
            vec![
                "first".into(),
                "second needle".into(),
                "second too".into(),
                "third".into()
            ]
        )
    );
    assert_eq!(
        q(LogFilter {
            desc: true,
            limit: 2,
            offset: 1,
            ..all.clone()
        })
        .await,
        (4, vec!["second too".into(), "second needle".into()])
    );
    assert_eq!(
        q(LogFilter {
            session_id: Some(sid),
            ..all.clone()
        })
        .await,
        (1, vec!["second needle".into()])
    );
    assert_eq!(
        q(LogFilter {
            instance_id: Some(iid),
            ..all.clone()
        })
        .await,
        (1, vec!["third".into()])
    );
    assert_eq!(
        q(LogFilter {
            query: Some("needle".into()),
            ..all.clone()
        })
        .await
        .0,
        1
    );
    assert_eq!(
        q(LogFilter {
            start_ns: Some(20),
            end_ns: Some(20),
            ..all.clone()
        })
        .await
        .0,
        2
    );
    assert_eq!(
        q(LogFilter {
            deployment_id: Some(Uuid::new_v4()),
            ..all.clone()
        })
        .await
        .0,
        0
    );
    let (_, got) = s.query_logs(a.id, &all).await.unwrap();
    assert_eq!(got[1].session_id, Some(sid));
    assert_eq!(got[1].deployment_id, Some(a.desired_deployment_id));
    assert_eq!(got[1].stream, "stdout");
}

/// Free text an instance or a bot wrote (a log line, a session's end message) may hold a NUL
/// byte: it is stored as `\x00` on every backend, and never fails the write, nor the other
/// lines of its batch (another org's among them).
async fn text_with_nul(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let b = with_agent(s, "b", "y").await;
    s.append_logs(&[line(&a, 10, "bad\0byte"), line(&b, 20, "other org's")])
        .await
        .unwrap();
    s.append_logs_capped(&[line(&a, 30, "\0"), line(&b, 40, "again")], 1000)
        .await
        .unwrap();
    let texts = |org: &AgentRecord, query: Option<&str>| {
        let (id, query) = (org.id, query.map(str::to_string));
        async move {
            let f = LogFilter {
                limit: 100,
                query,
                ..Default::default()
            };
            let (_, v) = s.query_logs(id, &f).await.unwrap();
            v.into_iter().map(|l| l.line).collect::<Vec<_>>()
        }
    };
    assert_eq!(texts(&a, None).await, ["bad\\x00byte", "\\x00"]);
    assert_eq!(texts(&b, None).await, ["other org's", "again"]);
    assert_eq!(texts(&a, Some("d\0b")).await, ["bad\\x00byte"]);
    let s1 = session(&a, 100);
    s.insert_session(&s1).await.unwrap();
    let mut e = end(EndReason::Error, 200);
    e.message = Some("bot said \0".into());
    assert!(s.end_session(s1.id, &e).await.unwrap());
    let got = s.get_session(s1.id).await.unwrap().unwrap().end.unwrap();
    assert_eq!(got.message.as_deref(), Some("bot said \\x00"));
}

async fn log_pruning(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let lines: Vec<LogLine> = (0..10)
        .map(|i| line(&a, i * 10, &format!("l{i}")))
        .collect();
    s.append_logs(&lines).await.unwrap();
    assert_eq!(s.prune_logs(30).await.unwrap(), 3, "strictly older");
    assert_eq!(s.prune_logs(30).await.unwrap(), 0);
    assert_eq!(s.prune_logs_over(4).await.unwrap(), 3);
    assert_eq!(s.prune_logs_over(4).await.unwrap(), 0);
    let (n, got) = s
        .query_logs(
            a.id,
            &LogFilter {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(n, 4);
    assert_eq!(
        got.into_iter().map(|l| l.line).collect::<Vec<_>>(),
        ["l6", "l7", "l8", "l9"]
    );
    // The log writer's step: a batch, then the cap (counting the batch's lines); a batch as
    // large as the cap or larger; no cap.
    let all = |s: &'static str| LogFilter {
        limit: 100,
        query: Some(s.into()),
        ..Default::default()
    };
    let texts = |v: Vec<LogLine>| v.into_iter().map(|l| l.line).collect::<Vec<_>>();
    s.append_logs_capped(&[line(&a, 100, "c0"), line(&a, 101, "c1")], 5)
        .await
        .unwrap();
    let (_, got) = s.query_logs(a.id, &all("")).await.unwrap();
    assert_eq!(texts(got), ["l7", "l8", "l9", "c0", "c1"]);
    let big: Vec<LogLine> = (0..7)
        .map(|i| line(&a, 200 + i, &format!("b{i}")))
        .collect();
    s.append_logs_capped(&big, 5).await.unwrap();
    let (_, got) = s.query_logs(a.id, &all("")).await.unwrap();
    assert_eq!(texts(got), ["b2", "b3", "b4", "b5", "b6"]);
    s.append_logs_capped(&big[..3], 0).await.unwrap();
    let (n, _) = s.query_logs(a.id, &all("")).await.unwrap();
    assert_eq!(n, 8);
    s.append_logs_capped(&[], 5).await.unwrap();
    let (n, _) = s.query_logs(a.id, &all("")).await.unwrap();
    assert_eq!(n, 5, "the cap holds after any batch, an empty one too");
}

/// The log cap is shared: over it, the org holding the most loses its oldest lines, so an org
/// within its share keeps every line whatever another logs; the counts the prune decides on
/// follow every write that adds or deletes lines (batches, the age limit, the cap itself).
async fn log_cap_shared_between_orgs(s: &dyn Store) {
    let quiet = with_agent(s, "quiet", "q").await;
    let loud = with_agent(s, "loud", "l").await;
    let mid = with_agent(s, "mid", "m").await;
    let all = LogFilter {
        limit: 1000,
        ..Default::default()
    };
    let texts = |a: &AgentRecord| {
        let id = a.id;
        let all = all.clone();
        async move {
            let (n, v) = s.query_logs(id, &all).await.unwrap();
            assert_eq!(n as usize, v.len());
            v.into_iter().map(|l| l.line).collect::<Vec<_>>()
        }
    };
    let batch = |a: &AgentRecord, from: i64, n: i64| -> Vec<LogLine> {
        (from..from + n)
            .map(|i| line(a, i, &format!("{}{i}", a.org)))
            .collect()
    };
    // Cap 30, three orgs: a share of 10. The quiet org writes 4 lines, the middle one 12.
    s.append_logs_capped(&batch(&quiet, 0, 4), 30)
        .await
        .unwrap();
    s.append_logs_capped(&batch(&mid, 10, 12), 30)
        .await
        .unwrap();
    // The loud org writes 400 lines in batches of 20, 7 and 1 (some mixed with the others').
    for i in 0..20 {
        let mut b = batch(&loud, 100 + i * 20, 20);
        if i == 5 {
            b.extend(batch(&quiet, 50, 1));
        }
        s.append_logs_capped(&b, 30).await.unwrap();
    }
    for i in 0..5 {
        s.append_logs_capped(&batch(&loud, 600 + i * 7, 7), 30)
            .await
            .unwrap();
    }
    s.append_logs_capped(&batch(&loud, 700, 1), 30)
        .await
        .unwrap();
    assert_eq!(
        texts(&quiet).await,
        ["quiet0", "quiet1", "quiet2", "quiet3", "quiet50"]
    );
    // The loud org came down to 13 lines, its newest; the middle one (12, over the share
    // of 10 but under the loud one's level) lost none.
    assert_eq!(
        texts(&mid).await,
        batch(&mid, 10, 12)
            .into_iter()
            .map(|l| l.line)
            .collect::<Vec<_>>()
    );
    let l = texts(&loud).await;
    assert_eq!(l.len(), 13, "{l:?}");
    assert_eq!(
        l.first().map(String::as_str),
        Some("loud623"),
        "the oldest went first"
    );
    // The age limit deletes lines of every org (all but the loud org's 13, captured at 600 and
    // later), and the counts follow: the cap then counts only what is left.
    assert_eq!(s.prune_logs(600).await.unwrap(), 17);
    assert!(texts(&quiet).await.is_empty() && texts(&mid).await.is_empty());
    assert_eq!(s.prune_logs_over(13).await.unwrap(), 0);
    s.append_logs_capped(&batch(&quiet, 800, 2), 15)
        .await
        .unwrap();
    assert_eq!(texts(&loud).await.len(), 13);
    assert_eq!(s.prune_logs_over(14).await.unwrap(), 1);
    assert_eq!(texts(&quiet).await.len(), 2);
    assert_eq!(texts(&loud).await.len(), 12);
}

async fn nodes(s: &dyn Store) {
    assert!(s.list_nodes().await.unwrap().is_empty());
    let mut b = NodeRecord {
        id: "node-b".into(),
        advertise_url: Some("http://10.0.0.2:7870".into()),
        version: "0.1.0".into(),
        started_ms: 10,
        heartbeat_ms: 11,
        instances: 3,
        busy: 1,
        key_check: Some(vec![7; 40]),
        secret_check: Some(vec![9; 32]),
    };
    let a = NodeRecord {
        id: "node-a".into(),
        advertise_url: None,
        ..b.clone()
    };
    s.heartbeat(&b).await.unwrap();
    s.heartbeat(&a).await.unwrap();
    // A later heartbeat replaces every field.
    b.heartbeat_ms = 20;
    b.instances = 0;
    b.busy = 0;
    b.advertise_url = None;
    b.key_check = None;
    b.secret_check = None;
    s.heartbeat(&b).await.unwrap();
    assert_eq!(s.list_nodes().await.unwrap(), [a, b]);
}

/// An agent's counts: its open sessions on every node (ended ones and other agents' left
/// out), and the instance records of the other nodes by promise (unpromised ones of the
/// current deployment only), this node's own left out.
async fn agent_counts(s: &dyn Store) {
    let a = with_agent(s, "o", "counted").await;
    let b = with_agent(s, "o", "other").await;
    let dep = a.desired_deployment_id;
    let none = AgentCounts::default();
    assert_eq!(s.agent_counts(a.id, dep, "n1").await.unwrap(), none);
    // Sessions: two open (on two nodes), one ended, one of another agent.
    let mut open1 = session(&a, 10);
    open1.node_id = "n1".into();
    let mut open2 = session(&a, 11);
    open2.node_id = "n2".into();
    let ended = session(&a, 12);
    for r in [&open1, &open2, &ended, &session(&b, 13)] {
        s.insert_session(r).await.unwrap();
    }
    s.end_session(ended.id, &end(EndReason::Stopped, 20))
        .await
        .unwrap();
    // Instances: on n2 one promised, two unpromised (one of an old deployment); on n3 one
    // unpromised; on n1 (the asking node) two, which are not counted; another agent's on n2.
    let on = |node: &str, session: Option<Uuid>, deployment: Uuid| {
        let mut i = instance(&a);
        i.node_id = node.into();
        i.session_id = session;
        i.deployment_id = deployment;
        i
    };
    let old = Uuid::new_v4();
    let mut other = instance(&b);
    other.node_id = "n2".into();
    for i in [
        on("n2", Some(open2.id), dep),
        on("n2", None, dep),
        on("n2", None, old),
        on("n3", None, dep),
        on("n1", Some(open1.id), dep),
        on("n1", None, dep),
        other,
    ] {
        s.put_instance(&i).await.unwrap();
    }
    let want = AgentCounts {
        open_sessions: 2,
        others_promised: 1,
        others_unpromised: 2,
        others_total: 4,
    };
    assert_eq!(s.agent_counts(a.id, dep, "n1").await.unwrap(), want);
    // Asked by n2: n1's and n3's records.
    let want = AgentCounts {
        open_sessions: 2,
        others_promised: 1,
        others_unpromised: 2,
        others_total: 3,
    };
    assert_eq!(s.agent_counts(a.id, dep, "n2").await.unwrap(), want);
    // Where a start may be forwarded: the other nodes with an unpromised record of the
    // deployment, sorted, each once (the asking node's own and promised ones left out).
    let nodes = |by: &'static str, d: Uuid| async move {
        s.nodes_with_unpromised(a.id, d, by).await.unwrap()
    };
    assert_eq!(nodes("n1", dep).await, ["n2", "n3"]);
    assert_eq!(nodes("n2", dep).await, ["n1", "n3"]);
    assert_eq!(nodes("n3", old).await, ["n2"]);
    assert!(nodes("n2", old).await.is_empty());
    // Another agent's: its own record on n2 only.
    let of_b = |by: &'static str| s.nodes_with_unpromised(b.id, b.desired_deployment_id, by);
    assert_eq!(of_b("n1").await.unwrap(), ["n2"]);
    assert!(of_b("n2").await.unwrap().is_empty());
}

/// Slots: reserved below the maximum only, freed with the instance's record (its end or its
/// delete) or alone, orphans of a node freed except those kept or recorded.
async fn capacity_slots(s: &dyn Store) {
    let a = with_agent(s, "o", "slots").await;
    let b = with_agent(s, "o", "other").await;
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    assert!(s.reserve_slot(a.id, 3, ids[0], "n1").await.unwrap());
    assert!(s.reserve_slot(a.id, 3, ids[1], "n2").await.unwrap());
    assert!(s.reserve_slot(a.id, 3, ids[2], "n1").await.unwrap());
    assert!(!s.reserve_slot(a.id, 3, ids[3], "n2").await.unwrap());
    assert_eq!(s.slots_held(a.id).await.unwrap(), 3);
    // Per agent; a maximum of 0 admits none.
    assert!(s.reserve_slot(b.id, 1, ids[3], "n2").await.unwrap());
    assert!(!s.reserve_slot(b.id, 0, Uuid::new_v4(), "n2").await.unwrap());
    assert_eq!(s.slots_held(b.id).await.unwrap(), 1);
    // One slot per instance.
    assert!(matches!(
        s.reserve_slot(a.id, 9, ids[0], "n1").await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.slots_held(a.id).await.unwrap(), 3);
    // A lowered maximum: no new slot until enough are freed.
    assert!(!s.reserve_slot(a.id, 2, Uuid::new_v4(), "n1").await.unwrap());
    // Freed by the instance's end, by its delete, or alone (twice is fine).
    let mut inst = instance(&a);
    inst.id = ids[0];
    s.put_instance(&inst).await.unwrap();
    s.end_instance(ids[0], None).await.unwrap();
    assert_eq!(s.slots_held(a.id).await.unwrap(), 2);
    inst.id = ids[1];
    s.put_instance(&inst).await.unwrap();
    s.delete_instance(ids[1]).await.unwrap();
    assert_eq!(s.slots_held(a.id).await.unwrap(), 1);
    s.release_slot(ids[2]).await.unwrap();
    s.release_slot(ids[2]).await.unwrap();
    assert_eq!(s.slots_held(a.id).await.unwrap(), 0);
    // Orphans of node n1: those with no instance record and not kept.
    let (recorded, kept, orphan, elsewhere) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    for (id, node) in [
        (recorded, "n1"),
        (kept, "n1"),
        (orphan, "n1"),
        (elsewhere, "n2"),
    ] {
        assert!(s.reserve_slot(a.id, 9, id, node).await.unwrap());
    }
    inst.id = recorded;
    s.put_instance(&inst).await.unwrap();
    assert_eq!(s.release_orphan_slots("n1", &[kept]).await.unwrap(), 1);
    assert_eq!(s.slots_held(a.id).await.unwrap(), 3);
    assert_eq!(s.release_orphan_slots("n1", &[kept]).await.unwrap(), 0);
}

/// Reservers racing from many tasks (several nodes) never hold more than the maximum.
async fn concurrent_reservations(s: &dyn Store) {
    let a = with_agent(s, "o", "race").await;
    for round in 0..3 {
        let got = futures_util::future::join_all((0..24).map(|i| {
            s.reserve_slot(
                a.id,
                8,
                Uuid::new_v4(),
                if i % 3 == 0 { "n1" } else { "n2" },
            )
        }))
        .await;
        let admitted = got.into_iter().filter(|r| *r.as_ref().unwrap()).count();
        assert_eq!(admitted, if round == 0 { 8 } else { 0 }, "round {round}");
        assert_eq!(s.slots_held(a.id).await.unwrap(), 8);
    }
}

/// An instance is claimed by one session only: a second claim by another session is refused
/// and writes nothing, also when both race.
async fn instance_claims(s: &dyn Store) {
    let a = with_agent(s, "o", "claims").await;
    let inst = instance(&a);
    s.put_instance(&inst).await.unwrap();
    let (s1, s2) = (session(&a, 10), session(&a, 11));
    assert!(s.insert_session_for_instance(&s1, inst.id).await.unwrap());
    assert!(matches!(
        s.insert_session_for_instance(&s2, inst.id).await,
        Err(StoreError::Conflict)
    ));
    assert!(s.get_session(s2.id).await.unwrap().is_none());
    let rec = s.list_instances().await.unwrap().pop().unwrap();
    assert_eq!(rec.session_id, Some(s1.id));
    // Racing claims of one idle instance: exactly one wins.
    let inst = instance(&a);
    s.put_instance(&inst).await.unwrap();
    let sessions: Vec<_> = (0..8).map(|i| session(&a, 20 + i)).collect();
    let got = futures_util::future::join_all(
        sessions
            .iter()
            .map(|x| s.insert_session_for_instance(x, inst.id)),
    )
    .await;
    let won: Vec<_> = got
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Ok(true)))
        .map(|(i, _)| sessions[i].id)
        .collect();
    assert_eq!(won.len(), 1, "{got:?}");
    assert!(got
        .iter()
        .all(|r| matches!(r, Ok(true) | Err(StoreError::Conflict))));
    let rec = s
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == inst.id)
        .unwrap();
    assert_eq!(rec.session_id, Some(won[0]));
    // A refused claim wrote nothing: the losers' sessions are not recorded.
    for x in sessions.iter().filter(|x| x.id != won[0]) {
        assert!(s.get_session(x.id).await.unwrap().is_none());
    }
}

/// A websocket token is taken once (also when takers race), only for its own org and agent; expired ones are forgotten when
/// another is stored; a session's tokens can be revoked.
async fn ws_tokens(s: &dyn Store) {
    let tok = |n: u8, expires_ms: i64| WsTokenRecord {
        hash: vec![n; 32],
        org: "o".into(),
        agent: "a".into(),
        session_id: Uuid::new_v4(),
        body: (n % 2 == 0).then(|| b"{\"x\":1}".to_vec()),
        expires_ms,
    };
    let t1 = tok(1, 10_000);
    s.put_ws_token(&t1, 1_000).await.unwrap();
    assert!(matches!(
        s.put_ws_token(&t1, 1_000).await,
        Err(StoreError::Conflict)
    ));
    let t2 = tok(2, 10_000);
    s.put_ws_token(&t2, 1_000).await.unwrap();
    // Presented for another agent or org: refused, and still there for its own.
    assert_eq!(s.take_ws_token(&t2.hash, "o", "other").await.unwrap(), None);
    assert_eq!(s.take_ws_token(&t2.hash, "p", "a").await.unwrap(), None);
    let got =
        futures_util::future::join_all((0..6).map(|_| s.take_ws_token(&t2.hash, "o", "a"))).await;
    let taken: Vec<_> = got.into_iter().filter_map(|r| r.unwrap()).collect();
    assert_eq!(taken, std::slice::from_ref(&t2));
    assert_eq!(s.take_ws_token(&t2.hash, "o", "a").await.unwrap(), None);
    // Revocation by session, org and agent.
    assert!(!s
        .revoke_ws_tokens("o", "other", t1.session_id)
        .await
        .unwrap());
    assert!(s.revoke_ws_tokens("o", "a", t1.session_id).await.unwrap());
    assert_eq!(s.take_ws_token(&t1.hash, "o", "a").await.unwrap(), None);
    // Expired ones go when another is stored.
    let t3 = tok(3, 5_000);
    s.put_ws_token(&t3, 1_000).await.unwrap();
    s.put_ws_token(&tok(4, 90_000), 6_000).await.unwrap();
    assert_eq!(s.take_ws_token(&t3.hash, "o", "a").await.unwrap(), None);
    assert!(s.take_ws_token(&[4; 32], "o", "a").await.unwrap().is_some());
}

/// A node record `id` with its last heartbeat at `hb` (ms).
fn node(id: &str, hb: i64) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        advertise_url: None,
        version: "0.1.0".into(),
        started_ms: 1,
        heartbeat_ms: hb,
        instances: 0,
        busy: 0,
        key_check: None,
        secret_check: None,
    }
}

/// Ownership: records keep their node; a stale node is taken over once, all its instances and
/// open sessions at once (never its ended ones, never another node's); a fresh one never.
async fn node_takeover(s: &dyn Store) {
    let a = with_agent(s, "o", "a").await;
    s.heartbeat(&node("dead", 100)).await.unwrap();
    s.heartbeat(&node("live", 10_000)).await.unwrap();
    let mut open = session(&a, 1);
    open.node_id = "dead".into();
    let mut ended = session(&a, 2);
    ended.node_id = "dead".into();
    let mut other = session(&a, 3);
    other.node_id = "live".into();
    for x in [&open, &ended, &other] {
        s.insert_session(x).await.unwrap();
    }
    s.end_session(ended.id, &end(EndReason::Completed, 5))
        .await
        .unwrap();
    let mut inst = instance(&a);
    inst.node_id = "dead".into();
    inst.session_id = Some(open.id);
    let mut theirs = instance(&a);
    theirs.node_id = "live".into();
    s.put_instance(&inst).await.unwrap();
    s.put_instance(&theirs).await.unwrap();
    assert_eq!(
        s.get_session(open.id).await.unwrap().unwrap().node_id,
        "dead"
    );

    // Not stale at 99: nothing moves.
    assert!(s.take_over_node("dead", "me", 99).await.unwrap().is_none());
    assert!(s
        .take_over_node("nobody", "me", 1 << 40)
        .await
        .unwrap()
        .is_none());
    let t = s.take_over_node("dead", "me", 100).await.unwrap().unwrap();
    assert_eq!(
        t.instances
            .iter()
            .map(|i| (i.id, i.node_id.as_str()))
            .collect::<Vec<_>>(),
        [(inst.id, "me")]
    );
    assert_eq!(
        t.sessions
            .iter()
            .map(|x| (x.id, x.node_id.as_str()))
            .collect::<Vec<_>>(),
        [(open.id, "me")]
    );
    assert_eq!(s.get_session(open.id).await.unwrap().unwrap().node_id, "me");
    assert_eq!(
        s.get_session(ended.id).await.unwrap().unwrap().node_id,
        "dead"
    );
    assert_eq!(
        s.get_session(other.id).await.unwrap().unwrap().node_id,
        "live"
    );
    let mut owners: Vec<(Uuid, String)> = s
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i.node_id))
        .collect();
    owners.sort();
    let mut want = vec![(inst.id, "me".to_string()), (theirs.id, "live".to_string())];
    want.sort();
    assert_eq!(owners, want);
    // A second taker finds nothing left.
    let t = s.take_over_node("dead", "me2", 100).await.unwrap().unwrap();
    assert!(t.instances.is_empty() && t.sessions.is_empty());
}

/// A node is forgotten only once it is stale (or left: heartbeat 0) and owns no instance
/// record and no open session; a heartbeat afterwards records it again.
async fn forgetting_nodes(s: &dyn Store) {
    let a = with_agent(s, "o", "a").await;
    for n in [node("left", 0), node("dead", 100), node("live", 10_000)] {
        s.heartbeat(&n).await.unwrap();
    }
    let mut open = session(&a, 1);
    open.node_id = "dead".into();
    s.insert_session(&open).await.unwrap();
    let mut inst = instance(&a);
    inst.node_id = "dead".into();
    s.put_instance(&inst).await.unwrap();
    let ids = |v: Vec<NodeRecord>| v.into_iter().map(|n| n.id).collect::<Vec<_>>();

    assert_eq!(
        s.forget_node("nobody", 500).await.unwrap(),
        ForgetNode::Unknown
    );
    assert_eq!(s.forget_node("live", 500).await.unwrap(), ForgetNode::Alive);
    assert_eq!(s.forget_node("dead", 99).await.unwrap(), ForgetNode::Alive);
    assert_eq!(
        s.forget_node("dead", 500).await.unwrap(),
        ForgetNode::Owns {
            instances: 1,
            sessions: 1
        }
    );
    assert_eq!(
        s.forget_node("left", 500).await.unwrap(),
        ForgetNode::Forgotten
    );
    assert_eq!(ids(s.list_nodes().await.unwrap()), ["dead", "live"]);
    // Once taken over (and its ended session is no longer open), it can go.
    s.end_session(open.id, &end(EndReason::Completed, 5))
        .await
        .unwrap();
    s.take_over_node("dead", "live", 500)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.forget_node("dead", 500).await.unwrap(),
        ForgetNode::Forgotten
    );
    assert_eq!(ids(s.list_nodes().await.unwrap()), ["live"]);
    assert_eq!(
        s.forget_node("dead", 500).await.unwrap(),
        ForgetNode::Unknown
    );
    // A forgotten node that heartbeats again is listed again.
    s.heartbeat(&node("left", 20_000)).await.unwrap();
    assert_eq!(ids(s.list_nodes().await.unwrap()), ["left", "live"]);
}

/// A websocket session recorded at `/start` (no `coldStart`) is taken over by the insert of
/// its start when the client connects: deployment and `coldStart` set, creation time kept;
/// an ended one, or one of another agent, is not.
async fn waiting_websocket_sessions(s: &dyn Store) {
    let a = with_agent(s, "a", "x").await;
    let mut w = session(&a, 100);
    w.cold_start = None;
    w.transport = Some("websocket".into());
    s.insert_session(&w).await.unwrap();
    let got = s.get_session(w.id).await.unwrap().unwrap();
    assert!(got.waiting_for_client());
    let f = SessionFilter {
        active: Some(true),
        ..Default::default()
    };
    assert_eq!(s.list_sessions(a.id, &f).await.unwrap().0, 1);

    let mut started = w.clone();
    started.created_ms = 500;
    started.updated_ms = 500;
    started.cold_start = Some(true);
    started.deployment_id = Uuid::new_v4();
    s.insert_session(&started).await.unwrap();
    let got = s.get_session(w.id).await.unwrap().unwrap();
    assert_eq!(
        (
            got.created_ms,
            got.updated_ms,
            got.cold_start,
            got.deployment_id
        ),
        (100, 500, Some(true), started.deployment_id)
    );
    assert!(!got.waiting_for_client());
    // Taken over once only.
    assert!(matches!(
        s.insert_session(&started).await,
        Err(StoreError::Conflict)
    ));

    // Ended while waiting: never taken over.
    let mut gone = session(&a, 200);
    gone.cold_start = None;
    gone.transport = Some("websocket".into());
    s.insert_session(&gone).await.unwrap();
    assert!(s
        .end_session(gone.id, &end(EndReason::ClientNeverConnected, 300))
        .await
        .unwrap());
    let mut late = gone.clone();
    late.cold_start = Some(false);
    assert!(matches!(
        s.insert_session(&late).await,
        Err(StoreError::Conflict)
    ));
    let got = s.get_session(gone.id).await.unwrap().unwrap();
    assert_eq!(got.end.unwrap().reason, EndReason::ClientNeverConnected);
    assert_eq!(got.cold_start, None);
    let f = SessionFilter {
        end_reason: Some(EndReason::ClientNeverConnected),
        ..Default::default()
    };
    assert_eq!(s.list_sessions(a.id, &f).await.unwrap().0, 1);

    // Another agent's start with the same id does not take it.
    let b = with_agent(s, "a", "y").await;
    let mut w2 = session(&a, 400);
    w2.cold_start = None;
    w2.transport = Some("websocket".into());
    s.insert_session(&w2).await.unwrap();
    let mut other = w2.clone();
    other.agent_id = b.id;
    other.cold_start = Some(true);
    assert!(matches!(
        s.insert_session(&other).await,
        Err(StoreError::Conflict)
    ));

    // The end of a session still waiting: written once; refused for one a start took over
    // (its end comes from its instance), for any other session and for an unknown one.
    let never = end(EndReason::ClientNeverConnected, 700);
    assert!(s.end_waiting_session(w2.id, &never).await.unwrap());
    assert!(!s.end_waiting_session(w2.id, &never).await.unwrap());
    assert_eq!(
        s.get_session(w2.id)
            .await
            .unwrap()
            .unwrap()
            .end
            .unwrap()
            .reason,
        EndReason::ClientNeverConnected
    );
    assert!(!s.end_waiting_session(w.id, &never).await.unwrap());
    assert_eq!(s.get_session(w.id).await.unwrap().unwrap().end, None);
    let plain = session(&a, 800);
    s.insert_session(&plain).await.unwrap();
    assert!(!s.end_waiting_session(plain.id, &never).await.unwrap());
    assert_eq!(s.get_session(plain.id).await.unwrap().unwrap().end, None);
    assert!(!s.end_waiting_session(Uuid::new_v4(), &never).await.unwrap());
}

fn build(org: &str, hash: &str, created_ms: i64) -> BuildRecord {
    BuildRecord {
        node_id: "n1".into(),
        id: Uuid::new_v4(),
        org: org.into(),
        status: BuildStatus::Pending,
        region: "local".into(),
        context_hash: hash.into(),
        dockerfile_path: "Dockerfile".into(),
        artifact: None,
        python: None,
        builder: None,
        error_message: None,
        context_size: 1234,
        created_ms,
        started_ms: None,
        completed_ms: None,
        updated_ms: created_ms,
    }
}

async fn builds(s: &dyn Store) {
    let mut a = build("o1", "aaaa", 10);
    let b = build("o1", "bbbb", 20);
    let other = build("o2", "aaaa", 30);
    for x in [&a, &b, &other] {
        s.insert_build(x, None).await.unwrap();
    }
    assert!(matches!(
        s.insert_build(&a, None).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.get_build("o1", a.id).await.unwrap().as_ref(), Some(&a));
    assert_eq!(s.get_build("o2", a.id).await.unwrap(), None);
    assert_eq!(s.unfinished_builds().await.unwrap().len(), 3);
    // Every mutable field is replaced.
    a.status = BuildStatus::Success;
    a.artifact = Some("local:/x/app".into());
    a.python = Some("/x/venv/bin/python".into());
    a.builder = Some("venv".into());
    a.started_ms = Some(11);
    a.completed_ms = Some(12);
    a.updated_ms = 12;
    s.update_build(&a).await.unwrap();
    assert_eq!(s.get_build("o1", a.id).await.unwrap().as_ref(), Some(&a));
    let mut ghost = build("o1", "cccc", 1);
    assert!(matches!(
        s.update_build(&ghost).await,
        Err(StoreError::NotFound)
    ));
    ghost.id = other.id;
    assert!(
        matches!(s.update_build(&ghost).await, Err(StoreError::NotFound)),
        "another org's build is not changed"
    );
    let all = BuildFilter {
        limit: 10,
        ..Default::default()
    };
    let (list, total) = s.list_builds("o1", &all).await.unwrap();
    assert_eq!(total, 2);
    assert_eq!(list, [b.clone(), a.clone()], "newest first, one org only");
    let (list, total) = s
        .list_builds(
            "o1",
            &BuildFilter {
                context_hash: Some("aaaa".into()),
                status: Some(BuildStatus::Success),
                region: Some("local".into()),
                dockerfile_path: Some("Dockerfile".into()),
                limit: 1,
                offset: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!((list, total), (vec![a.clone()], 1));
    let (list, total) = s
        .list_builds(
            "o1",
            &BuildFilter {
                limit: 1,
                offset: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((list, total), (vec![a.clone()], 2));
    let pending: Vec<Uuid> = s
        .unfinished_builds()
        .await
        .unwrap()
        .iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(pending, [b.id, other.id]);
}

/// Retention: finished builds not used (else completed) since a time, every org, oldest
/// first; a use (a deploy taking the build) moves it; a deletion is conditional on it.
async fn build_retention(s: &dyn Store) {
    let done = |x: &BuildRecord, status, at| BuildRecord {
        status,
        completed_ms: Some(at),
        updated_ms: at,
        ..x.clone()
    };
    let a = done(&build("o1", "aaaa", 10), BuildStatus::Success, 12);
    let b = done(&build("o1", "bbbb", 20), BuildStatus::Failed, 40);
    let other = done(&build("o2", "aaaa", 30), BuildStatus::Timeout, 50);
    for x in [&a, &b, &other] {
        s.insert_build(x, None).await.unwrap();
    }
    assert_eq!(
        s.get_build("o1", a.id).await.unwrap().unwrap().node_id,
        "n1"
    );
    let ids = |v: Vec<BuildRecord>| v.into_iter().map(|x| x.id).collect::<Vec<_>>();
    assert_eq!(ids(s.unused_builds(40).await.unwrap()), [a.id, b.id]);
    assert_eq!(ids(s.unused_builds(11).await.unwrap()), Vec::<Uuid>::new());
    let running = build("o1", "dddd", 60);
    s.insert_build(&running, None).await.unwrap();
    assert_eq!(
        ids(s.unused_builds(i64::MAX).await.unwrap()),
        [a.id, b.id, other.id],
        "an unfinished build is never listed"
    );
    assert!(!s.delete_unused_build(running.id, i64::MAX).await.unwrap());
    // A use at 45 moves `a` after `b`, and keeps it from a deletion up to 44.
    let got = s.use_build("o1", a.id, 45).await.unwrap().unwrap();
    assert_eq!(got.id, a.id);
    assert_eq!(
        s.use_build("o2", a.id, 46).await.unwrap(),
        None,
        "another org's"
    );
    assert_eq!(ids(s.unused_builds(44).await.unwrap()), [b.id]);
    assert_eq!(ids(s.unused_builds(45).await.unwrap()), [b.id, a.id]);
    assert!(
        !s.delete_unused_build(a.id, 44).await.unwrap(),
        "used since"
    );
    assert!(s.delete_unused_build(a.id, 45).await.unwrap());
    assert!(!s.delete_unused_build(a.id, 45).await.unwrap());
    assert_eq!(s.get_build("o1", a.id).await.unwrap(), None);
    assert_eq!(s.use_build("o1", a.id, 47).await.unwrap(), None, "deleted");
    assert_eq!(
        ids(s.unused_builds(i64::MAX).await.unwrap()),
        [b.id, other.id]
    );
}

fn endpoint(org: &str, created_ms: i64) -> WebhookEndpointRecord {
    WebhookEndpointRecord {
        id: Uuid::new_v4(),
        org: org.into(),
        url: "http://127.0.0.1:9/hook?token=t".into(),
        events: vec!["session.ended".into(), "session.started".into()],
        description: "ops".into(),
        secret: SealedValue {
            key: "secret".into(),
            nonce: vec![1; 24],
            ciphertext: vec![2; 40],
        },
        created_ms,
    }
}

fn delivery(e: &WebhookEndpointRecord, n: i64) -> WebhookDelivery {
    WebhookDelivery {
        id: Uuid::new_v4(),
        seq: 0,
        endpoint_id: e.id,
        org: e.org.clone(),
        event_type: "session.started".into(),
        payload: format!("{{\"n\":{n}}}"),
        created_ms: n,
        state: DeliveryState::Pending,
        attempts: 0,
        next_attempt_ms: n,
        last_status: None,
        last_error: None,
        finished_ms: None,
    }
}

/// Endpoints by org; the queue: in order per endpoint, only each endpoint's oldest pending
/// delivery claimed (leased), bounded, kept as the log once finished, pruned by age.
/// A delivery whose id is already queued or delivered (an event reported once, reported
/// again by a second node or after a restart) is dropped, alone or in a batch.
async fn webhook_delivery_ids_are_queued_once(s: &dyn Store) {
    let e = endpoint("acme", 1);
    s.insert_webhook_endpoint(&e).await.unwrap();
    let (d1, d2) = (delivery(&e, 1), delivery(&e, 2));
    assert_eq!(
        s.enqueue_webhook_deliveries(std::slice::from_ref(&d1), 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.enqueue_webhook_deliveries(std::slice::from_ref(&d1), 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.enqueue_webhook_deliveries(&[d1.clone(), d2.clone()], 10)
            .await
            .unwrap(),
        1
    );
    let ok = DeliveryAttempt {
        state: DeliveryState::Delivered,
        next_attempt_ms: 0,
        status: Some(200),
        error: None,
        at_ms: 5,
    };
    s.record_webhook_attempt(d1.id, &ok).await.unwrap();
    assert_eq!(
        s.enqueue_webhook_deliveries(std::slice::from_ref(&d1), 10)
            .await
            .unwrap(),
        0
    );
    let log = s.list_webhook_deliveries("acme", e.id, 10).await.unwrap();
    assert_eq!(log.iter().map(|d| d.id).collect::<Vec<_>>(), [d2.id, d1.id]);
}

async fn webhooks(s: &dyn Store) {
    let a = endpoint("acme", 1);
    let b = endpoint("acme", 2);
    let other = endpoint("other", 3);
    for e in [&a, &b, &other] {
        s.insert_webhook_endpoint(e).await.unwrap();
    }
    assert!(matches!(
        s.insert_webhook_endpoint(&a).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        s.list_webhook_endpoints(Some("acme")).await.unwrap(),
        [a.clone(), b.clone()]
    );
    assert_eq!(s.list_webhook_endpoints(None).await.unwrap().len(), 3);

    let qa: Vec<_> = (1..=3).map(|n| delivery(&a, n)).collect();
    let mut gone = delivery(&a, 4);
    gone.endpoint_id = Uuid::new_v4();
    let mut batch = qa.clone();
    batch.push(delivery(&b, 5));
    batch.push(gone);
    // Bounded: at most 3 pending per endpoint; an unknown endpoint gets nothing.
    assert_eq!(s.enqueue_webhook_deliveries(&batch, 3).await.unwrap(), 4);
    assert_eq!(
        s.enqueue_webhook_deliveries(&[delivery(&a, 6)], 3)
            .await
            .unwrap(),
        0
    );

    // Heads only, due only; a claim leases them.
    let c = s.claim_webhook_deliveries(4, 100, 10).await.unwrap();
    let ids: Vec<_> = c.iter().map(|d| d.id).collect();
    assert_eq!(ids, [qa[0].id]);
    assert_eq!(c[0].payload, "{\"n\":1}");
    assert_eq!(c[0].next_attempt_ms, 100);
    assert!(c[0].seq > 0);
    let c = s.claim_webhook_deliveries(5, 100, 10).await.unwrap();
    assert_eq!(c.len(), 1, "a's head is leased; b's is due");
    assert_eq!(c[0].endpoint_id, b.id);
    assert!(s
        .claim_webhook_deliveries(50, 200, 10)
        .await
        .unwrap()
        .is_empty());

    // A failed attempt keeps it at the head; a success lets the next one go.
    let fail = DeliveryAttempt {
        state: DeliveryState::Pending,
        next_attempt_ms: 150,
        status: Some(503),
        error: Some("503 Service Unavailable".into()),
        at_ms: 101,
    };
    s.record_webhook_attempt(qa[0].id, &fail).await.unwrap();
    assert!(s
        .claim_webhook_deliveries(99, 300, 10)
        .await
        .unwrap()
        .is_empty());
    let c = s.claim_webhook_deliveries(150, 300, 10).await.unwrap();
    assert_eq!(
        c.iter().map(|d| d.id).collect::<Vec<_>>(),
        [qa[0].id, batch[3].id],
        "by queue order"
    );
    assert_eq!(c[0].attempts, 1);
    let ok = DeliveryAttempt {
        state: DeliveryState::Delivered,
        next_attempt_ms: 0,
        status: Some(200),
        error: None,
        at_ms: 160,
    };
    s.record_webhook_attempt(qa[0].id, &ok).await.unwrap();
    let c = s.claim_webhook_deliveries(160, 400, 10).await.unwrap();
    assert_eq!(c.iter().map(|d| d.id).collect::<Vec<_>>(), [qa[1].id]);

    // The log: newest first, this org's only.
    let log = s.list_webhook_deliveries("acme", a.id, 10).await.unwrap();
    assert_eq!(
        log.iter().map(|d| d.id).collect::<Vec<_>>(),
        [qa[2].id, qa[1].id, qa[0].id]
    );
    let first = &log[2];
    assert_eq!(
        (
            first.state,
            first.attempts,
            first.last_status,
            first.finished_ms
        ),
        (DeliveryState::Delivered, 2, Some(200), Some(160))
    );
    assert_eq!(first.last_error, None);
    assert!(s
        .list_webhook_deliveries("other", a.id, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.list_webhook_deliveries("acme", a.id, 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // Pruning takes finished deliveries only.
    assert_eq!(s.prune_webhook_deliveries(161).await.unwrap(), 1);
    assert_eq!(
        s.list_webhook_deliveries("acme", a.id, 10)
            .await
            .unwrap()
            .len(),
        2
    );

    // Deleting an endpoint takes its deliveries; another org cannot delete it.
    assert!(!s.delete_webhook_endpoint("other", a.id).await.unwrap());
    assert!(s.delete_webhook_endpoint("acme", a.id).await.unwrap());
    assert!(!s.delete_webhook_endpoint("acme", a.id).await.unwrap());
    assert!(s
        .list_webhook_deliveries("acme", a.id, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.list_webhook_endpoints(Some("acme")).await.unwrap(), [b]);
}

/// Per-org limits: a create given a limit is refused at it (nothing written), counts only what
/// the limit counts (live agents, keys not revoked, sets: a new set only), one org's records
/// only; without one it is not limited. Then [`org_limits_across`] on this one store.
async fn org_limits(s: &dyn Store) {
    s.ensure_org("a").await.unwrap();
    s.ensure_org("b").await.unwrap();
    // Keys: both kinds count, revoked ones do not.
    let (k1, h1) = key("a", KeyKind::Private, 1);
    let (k2, h2) = key("a", KeyKind::Public, 2);
    let (k3, h3) = key("a", KeyKind::Private, 3);
    s.insert_key(&k1, &h1, Some(2)).await.unwrap();
    s.insert_key(&k2, &h2, Some(2)).await.unwrap();
    assert!(matches!(
        s.insert_key(&k3, &h3, Some(2)).await,
        Err(StoreError::LimitReached)
    ));
    assert!(s.find_key(&h3).await.unwrap().is_none(), "nothing written");
    let (kb, hb) = key("b", KeyKind::Private, 4);
    s.insert_key(&kb, &hb, Some(1)).await.unwrap();
    assert!(s.revoke_key("a", k1.id).await.unwrap());
    s.insert_key(&k3, &h3, Some(2)).await.unwrap();
    let (k4, h4) = key("a", KeyKind::Private, 5);
    s.insert_key(&k4, &h4, None).await.unwrap();
    assert_eq!(s.list_keys("a", None).await.unwrap().len(), 4);

    // Agents: deleted ones do not count.
    let (a1, d1) = agent("a", "one", 1);
    let (a2, d2) = agent("a", "two", 2);
    s.create_agent(&a1, &d1, Some(1)).await.unwrap();
    assert!(matches!(
        s.create_agent(&a2, &d2, Some(1)).await,
        Err(StoreError::LimitReached)
    ));
    assert!(s.get_agent("a", "two").await.unwrap().is_none());
    assert!(s.get_deployment(d2.id).await.unwrap().is_none());
    let (b1, bd1) = agent("b", "one", 3);
    s.create_agent(&b1, &bd1, Some(1)).await.unwrap();
    s.delete_agent(a1.id, 10).await.unwrap();
    s.create_agent(&a2, &d2, Some(1)).await.unwrap();
    let (a3, d3) = agent("a", "three", 4);
    s.create_agent(&a3, &d3, None).await.unwrap();
    assert_eq!(s.list_agents("a").await.unwrap().len(), 2);

    // Secret sets: an existing set is written at the limit, a new one is refused.
    let x = set("a", "x", SecretSetKind::Secret);
    let y = set("a", "y", SecretSetKind::Secret);
    s.upsert_secret_set(&x, &[sealed("K", 1)], false, Some(1))
        .await
        .unwrap();
    s.upsert_secret_set(&x, &[sealed("L", 2)], false, Some(1))
        .await
        .unwrap();
    assert_eq!(
        s.get_secret_set("a", "x").await.unwrap().unwrap().keys,
        ["K", "L"]
    );
    assert!(matches!(
        s.upsert_secret_set(&y, &[sealed("K", 3)], false, Some(1))
            .await,
        Err(StoreError::LimitReached)
    ));
    assert!(!s.secret_set_exists("a", "y").await.unwrap());
    assert!(s.secret_values("a", "y").await.unwrap().is_empty());
    s.upsert_secret_set(&set("b", "x", SecretSetKind::Secret), &[], false, Some(1))
        .await
        .unwrap();
    assert!(s.delete_secret_set("a", "x").await.unwrap());
    s.upsert_secret_set(&y, &[sealed("K", 3)], false, Some(1))
        .await
        .unwrap();
    s.upsert_secret_set(&x, &[], false, None).await.unwrap();
    assert_eq!(s.list_secret_sets("a").await.unwrap().len(), 2);

    // Builds: every kept build counts, whatever its state.
    let kept = |org: &str| {
        let org = org.to_string();
        async move {
            let f = BuildFilter {
                limit: 100,
                ..Default::default()
            };
            s.list_builds(&org, &f).await.unwrap().1
        }
    };
    let done = BuildRecord {
        status: BuildStatus::Failed,
        completed_ms: Some(2),
        ..build("a", "b1", 1)
    };
    s.insert_build(&done, Some(2)).await.unwrap();
    s.insert_build(&build("a", "b2", 2), Some(2)).await.unwrap();
    let refused = build("a", "b3", 3);
    assert!(matches!(
        s.insert_build(&refused, Some(2)).await,
        Err(StoreError::LimitReached)
    ));
    assert!(s.get_build("a", refused.id).await.unwrap().is_none());
    s.insert_build(&build("b", "b1", 4), Some(1)).await.unwrap();
    s.insert_build(&refused, None).await.unwrap();
    assert_eq!(kept("a").await, 3);

    org_limits_across(&[s, s]).await;
}

/// Concurrent creates of one org at limit N, spread over `stores` (nodes on one database),
/// admit exactly N of each kind; the others are refused with `LimitReached` and write nothing.
pub async fn org_limits_across(stores: &[&dyn Store]) {
    const LIMIT: u32 = 5;
    const TRIES: usize = 16;
    let org = "racing";
    stores[0].ensure_org(org).await.unwrap();
    let on = |i: usize| stores[i % stores.len()];
    let admitted = |got: Vec<Result<(), StoreError>>, what: &str| {
        assert!(
            got.iter()
                .all(|r| matches!(r, Ok(()) | Err(StoreError::LimitReached))),
            "{what}: {got:?}"
        );
        got.iter().filter(|r| r.is_ok()).count()
    };

    let keys: Vec<_> = (0..TRIES)
        .map(|i| key(org, KeyKind::Private, i as i64))
        .collect();
    let got = futures_util::future::join_all(
        keys.iter()
            .enumerate()
            .map(|(i, (k, h))| on(i).insert_key(k, h, Some(LIMIT))),
    )
    .await;
    assert_eq!(admitted(got, "keys"), LIMIT as usize);
    assert_eq!(
        stores[0].list_keys(org, None).await.unwrap().len(),
        LIMIT as usize
    );

    let agents: Vec<_> = (0..TRIES)
        .map(|i| agent(org, &format!("a{i}"), i as i64))
        .collect();
    let got = futures_util::future::join_all(
        agents
            .iter()
            .enumerate()
            .map(|(i, (a, d))| on(i).create_agent(a, d, Some(LIMIT))),
    )
    .await;
    assert_eq!(admitted(got, "agents"), LIMIT as usize);
    assert_eq!(
        stores[0].list_agents(org).await.unwrap().len(),
        LIMIT as usize
    );

    let sets: Vec<_> = (0..TRIES)
        .map(|i| set(org, &format!("s{i}"), SecretSetKind::Secret))
        .collect();
    let got = futures_util::future::join_all(
        sets.iter()
            .enumerate()
            .map(|(i, x)| on(i).upsert_secret_set(x, &[], false, Some(LIMIT))),
    )
    .await;
    assert_eq!(admitted(got, "secret sets"), LIMIT as usize);
    assert_eq!(
        stores[0].list_secret_sets(org).await.unwrap().len(),
        LIMIT as usize
    );

    let builds: Vec<_> = (0..TRIES)
        .map(|i| build(org, &format!("h{i}"), i as i64))
        .collect();
    let got = futures_util::future::join_all(
        builds
            .iter()
            .enumerate()
            .map(|(i, b)| on(i).insert_build(b, Some(LIMIT))),
    )
    .await;
    assert_eq!(admitted(got, "builds"), LIMIT as usize);
    let f = BuildFilter {
        limit: 100,
        ..Default::default()
    };
    assert_eq!(
        stores[0].list_builds(org, &f).await.unwrap().1,
        u64::from(LIMIT)
    );
}

/// `reseal_all` through `core::secrets::rotate_key`: every kind of sealed value (a secret
/// set's, an image pull secret's, a deployment's snapshot, a webhook secret, a sealed org
/// property, the nodes' key checks) opens with the new key and not the old one after a
/// rotation; a value that does not open with the old key, found after others were re-sealed,
/// fails the rotation and leaves every row as it was.
async fn secrets_key_rotation(s: &dyn Store) {
    use crate::core::orgs::{open_sealed_property, sealed_property};
    use crate::core::secrets::{rotate_key, SecretCipher};
    use crate::core::webhooks::sealed_as;
    let key = |b: u8| SecretCipher::from_key(&[b; 32]);
    let (old, new) = (key(1), key(2));
    s.ensure_org("a").await.unwrap();
    s.upsert_secret_set(
        &set("a", "keys", SecretSetKind::Secret),
        &[
            old.seal("a", "keys", "K", "kv"),
            old.seal("a", "keys", "L", "lv"),
        ],
        false,
        None,
    )
    .await
    .unwrap();
    s.upsert_secret_set(
        &set("a", "pull", SecretSetKind::ImagePullSecret),
        &[old.seal("a", "pull", "secretValue", "user:pass")],
        false,
        None,
    )
    .await
    .unwrap();
    let (ag, mut d) = agent("a", "x", 1);
    d.spec.secret_set = Some("keys".into());
    s.create_agent(&ag, &d, None).await.unwrap();
    let did = d.id;
    let mut hook = endpoint("a", 1);
    hook.secret = old.seal("a", &sealed_as(hook.id), "secret", "whsec_x");
    s.insert_webhook_endpoint(&hook).await.unwrap();
    let props = serde_json::json!({
        "defaultRegion": "local",
        "dailyApiKey": sealed_property("a", "dailyApiKey", "daily-k", &old),
    });
    s.set_org_properties("a", &props).await.unwrap();
    let node = |id: &str, check: Option<Vec<u8>>| NodeRecord {
        id: id.into(),
        advertise_url: None,
        version: "0.1.0".into(),
        started_ms: 1,
        heartbeat_ms: 2,
        instances: 0,
        busy: 0,
        key_check: check,
        secret_check: None,
    };
    s.heartbeat(&node("n1", Some(old.seal_check())))
        .await
        .unwrap();
    s.heartbeat(&node("n2", None)).await.unwrap();

    // Opens every value with `c`: the plaintexts, or None if any does not open.
    let open_all = |c: SecretCipher| async move {
        let mut out = Vec::new();
        for v in s.secret_values("a", "keys").await.unwrap() {
            out.push(c.open("a", "keys", &v).ok()?);
        }
        let pull = &s.secret_values("a", "pull").await.unwrap()[0];
        out.push(c.open("a", "pull", pull).ok()?);
        for (set, v) in s.deployment_secrets(did).await.unwrap() {
            out.push(c.open("a", &set, &v).ok()?);
        }
        let h = s.list_webhook_endpoints(Some("a")).await.unwrap();
        out.push(c.open("a", &sealed_as(h[0].id), &h[0].secret).ok()?);
        let o = s.get_org("a").await.unwrap().unwrap();
        assert_eq!(o.properties["defaultRegion"], "local", "plain ones kept");
        out.push(open_sealed_property(
            "a",
            "dailyApiKey",
            &o.properties["dailyApiKey"],
            &c,
        )?);
        let nodes = s.list_nodes().await.unwrap();
        assert!(
            nodes[1].key_check.is_none(),
            "a node without a check keeps none"
        );
        if !c.opens_check(nodes[0].key_check.as_deref()?) {
            return None;
        }
        Some(out)
    };
    let plain: Vec<String> = ["kv", "lv", "user:pass", "kv", "lv", "whsec_x", "daily-k"]
        .map(String::from)
        .into();
    assert_eq!(open_all(key(1)).await.as_ref(), Some(&plain));

    // A value sealed with a third key (a webhook's, re-sealed after the sets and snapshots)
    // fails the whole rotation: every value still opens with the old key.
    let mut stray = endpoint("a", 2);
    stray.secret = key(3).seal("a", &sealed_as(stray.id), "secret", "whsec_y");
    s.insert_webhook_endpoint(&stray).await.unwrap();
    let before = s.secret_values("a", "keys").await.unwrap();
    let err = rotate_key(s, key(1), key(2)).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("webhook endpoint {}", stray.id)),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(!err.contains("whsec_"), "no value in the message: {err}");
    assert_eq!(s.secret_values("a", "keys").await.unwrap(), before);
    assert_eq!(open_all(key(1)).await.as_ref(), Some(&plain));
    assert!(open_all(key(2)).await.is_none());
    assert!(s.delete_webhook_endpoint("a", stray.id).await.unwrap());

    let n = rotate_key(s, old, new).await.unwrap();
    assert_eq!(
        n, 7,
        "3 set values, 2 snapshot values, 1 webhook, 1 org's properties"
    );
    assert_eq!(open_all(key(2)).await.as_ref(), Some(&plain));
    assert!(
        open_all(key(1)).await.is_none(),
        "the old key opens nothing"
    );
    assert!(key(1)
        .open("a", "keys", &s.secret_values("a", "keys").await.unwrap()[0])
        .is_err());
}
