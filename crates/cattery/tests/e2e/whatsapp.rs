//! WhatsApp calling against the real binary and test agent (which echoes any route it does
//! not know): Meta's verification with the org's public key, a connect that starts a webrtc
//! session and reaches the instance's `/whatsapp` with `x-daily-session-id` and Meta's body
//! and signature unchanged, a terminate that reaches the same session, and nothing once the
//! session has ended.

use serde_json::json;

use crate::common::{Resp, Server};

fn event(kind: &str, call: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{
        "id": "waba-1", "changes": [{"field": "calls", "value": {
            "messaging_product": "whatsapp", "calls": [{"id": call, "event": kind,
            "from": "15550001111", "to": "15550002222", "timestamp": "1700000000",
            "direction": "USER_INITIATED", "session": {"sdp": "v=0", "sdp_type": "offer"}}]}}]}]}))
    .unwrap()
}

async fn post(s: &Server, agent: &str, raw: &[u8]) -> Resp {
    let r = s
        .http
        .post(format!(
            "{}/v1/public/webhooks/default/{agent}/whatsapp",
            s.base
        ))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", "sha256=0123")
        .body(raw.to_vec())
        .send()
        .await
        .expect("request");
    Server::resp(r).await
}

#[tokio::test(flavor = "multi_thread")]
async fn whatsapp_call_reaches_the_instance_of_its_session() {
    let s = Server::start(&[]).await;
    s.deploy("wa", &[], json!({})).await;

    let verify = |token: &str| {
        format!(
            "/v1/public/webhooks/default/wa/whatsapp?hub.mode=subscribe&hub.verify_token={token}\
             &hub.challenge=1158201444"
        )
    };
    let r = s.req("GET", &verify(&s.pk), None, None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.content_type.starts_with("text/plain"),
        "{}",
        r.content_type
    );
    assert_eq!(r.body, json!(1158201444));
    let r = s.req("GET", &verify(&s.sk), None, None).await;
    assert_eq!((r.status, &r.body["code"]), (403, &json!("FORBIDDEN")));

    let connect = event("connect", "wacid.E2E");
    let r = post(&s, "wa", &connect).await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.body, s.log());
    // The test agent's echo: what the instance received.
    assert_eq!(r.body["method"], "POST", "{:?}", r.body);
    assert_eq!(r.body["path"], "/whatsapp", "{:?}", r.body);
    assert_eq!(r.body["headers"]["x-hub-signature-256"], "sha256=0123");
    assert_eq!(
        r.body["body"].as_str().unwrap().as_bytes(),
        connect.as_slice()
    );
    let sid = r.body["headers"]["x-daily-session-id"]
        .as_str()
        .unwrap()
        .to_string();
    let session = s.session("wa", &sid).await;
    assert_eq!(session["transport"], "webrtc", "{session:?}");
    assert!(session["endedAt"].is_null(), "{session:?}");

    let terminate = event("terminate", "wacid.E2E");
    let r = post(&s, "wa", &terminate).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["headers"]["x-daily-session-id"], sid.as_str());

    assert_eq!(s.stop("wa", &sid).await.status, 200);
    let r = post(&s, "wa", &terminate).await;
    assert_eq!((r.status, &r.body["code"]), (404, &json!("NOT_FOUND")));
}
