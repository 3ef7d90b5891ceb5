//! `Debug` without secrets. A type that holds a secret value (an API key, a token, a
//! signing secret, an HMAC key, sealed or check material, a registry password, an instance's
//! environment) derives `custom_debug::Debug` and marks each such field
//! `#[debug(with = crate::redact::hidden)]` (or [`hidden_some`], [`env_names`]): `{:?}` of it
//! then shows that the field is there, never its value, so no log line made from it can
//! carry the secret.

use std::fmt;

/// What a hidden value prints as.
pub const REDACTED: &str = "<redacted>";

/// Formats any value as [`REDACTED`].
pub fn hidden<T>(_: &T, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(REDACTED)
}

/// Formats an optional value as `Some(<redacted>)` or `None`: whether it is set, not what.
pub fn hidden_some<T>(v: &Option<T>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match v {
        Some(_) => write!(f, "Some({REDACTED})"),
        None => f.write_str("None"),
    }
}

/// Formats an environment (`NAME`, value) as its names alone.
#[allow(clippy::ptr_arg)] // the derive passes the field as it is
pub fn env_names(v: &Vec<(String, String)>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.debug_list().entries(v.iter().map(|(k, _)| k)).finish()
}

/// A map whose keys may be shown and whose values may not (an environment, form fields).
pub trait KeyNames {
    /// The keys, sorted.
    fn key_names(&self) -> Vec<&str>;
}

impl<V> KeyNames for std::collections::BTreeMap<String, V> {
    fn key_names(&self) -> Vec<&str> {
        self.keys().map(String::as_str).collect()
    }
}

impl<V, S> KeyNames for std::collections::HashMap<String, V, S> {
    fn key_names(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }
}

/// Formats a map (an environment, form fields holding a token) as its keys alone.
pub fn map_keys<M: KeyNames>(v: &M, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.debug_list().entries(v.key_names()).finish()
}

/// Formats an optional map as [`map_keys`] does, or `None`.
pub fn map_keys_some<M: KeyNames>(v: &Option<M>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match v {
        Some(m) => {
            f.write_str("Some(")?;
            map_keys(m, f)?;
            f.write_str(")")
        }
        None => f.write_str("None"),
    }
}

/// A URL as it may be logged: its scheme, host and port; a user and password, path or query
/// (where a webhook receiver's credential goes) are replaced by [`REDACTED`], and a URL that
/// does not parse is hidden whole.
pub fn url_origin(url: &str) -> String {
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return REDACTED.to_string();
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return REDACTED.to_string();
    };
    let mut out = format!("{scheme}://");
    let userinfo = uri.authority().is_some_and(|a| a.as_str().contains('@'));
    if userinfo {
        out.push_str(REDACTED);
        out.push('@');
    }
    out.push_str(host);
    if let Some(port) = uri.port_u16() {
        out.push_str(&format!(":{port}"));
    }
    let rest = uri.path_and_query().map_or("", |p| p.as_str());
    if !rest.is_empty() && rest != "/" {
        out.push('/');
        out.push_str(REDACTED);
    }
    out
}

/// Formats a URL as [`url_origin`] does.
#[allow(clippy::ptr_arg)] // the derive passes the field as it is
pub fn url(v: &String, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{:?}", url_origin(v))
}

/// The org properties that hold a secret (sealed, or in clear as written before they were
/// sealed).
const SECRET_PROPERTIES: [&str; 2] = ["dailyApiKey", "dailyDialinHmac"];

/// Formats an org's properties object with the values of its secret properties hidden.
pub fn org_properties(v: &serde_json::Value, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for k in SECRET_PROPERTIES {
            if let Some(p) = o.get_mut(k) {
                *p = serde_json::Value::String(REDACTED.into());
            }
        }
    }
    fmt::Debug::fmt(&v, f)
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    const SECRET: &str = "s3cr3t-value-never-printed";

    /// `{:?}` of `v` (also pretty) shows neither the secret nor a recognisable part of it,
    /// and says where one was hidden.
    fn assert_hidden(v: &impl std::fmt::Debug) {
        for text in [format!("{v:?}"), format!("{v:#?}")] {
            assert!(!text.contains(&SECRET[..10]), "{text}");
            assert!(text.contains(super::REDACTED), "{text}");
        }
    }

    #[test]
    fn api_keys() {
        let rec = crate::model::ApiKeyRecord {
            id: Uuid::new_v4(),
            org: "o".into(),
            kind: crate::model::KeyKind::Public,
            name: "pk".into(),
            prefix: "pk_abc".into(),
            created_ms: 1,
            revoked_ms: None,
            public_key: Some(SECRET.into()),
        };
        assert_hidden(&rec);
        assert!(format!("{rec:?}").contains("pk_abc"), "{rec:?}");
    }

    #[test]
    fn daily_api_keys_and_dialin_hmac_keys() {
        assert_hidden(&crate::api::schema::DailyKey {
            api_key: SECRET.into(),
        });
        assert_hidden(&crate::api::schema::PropertyValues {
            default_region: "local".into(),
            daily_api_key: Some(SECRET.into()),
            keep_daily_rooms: None,
            daily_dialin_hmac: Some(SECRET.into()),
        });
        assert_hidden(&crate::core::orgs::DefaultRegionProperty {
            current: "local".into(),
            default: "local".into(),
            available: vec!["local".into()],
            daily_api_key: Some(SECRET.into()),
            keep_daily_rooms: None,
            daily_dialin_hmac: Some(SECRET.into()),
        });
        let mut c = crate::config::Config::default();
        c.sessions.daily_api_key = Some(SECRET.into());
        assert_hidden(&c);
        let args = crate::config::ServeArgs {
            daily_api_key: Some(SECRET.into()),
            ..Default::default()
        };
        assert_hidden(&args);
    }

    #[test]
    fn server_tokens_and_database_urls() {
        let mut c = crate::config::Config::default();
        c.server.metrics_token = Some(SECRET.into());
        assert_hidden(&c);
        let args = crate::config::ServeArgs {
            metrics_token: Some(SECRET.into()),
            database_url: Some(format!("postgres://u:{SECRET}@db/cattery")),
            ..Default::default()
        };
        assert_hidden(&args);
    }

    #[test]
    fn webhook_signing_secrets() {
        assert_hidden(&crate::api::webhooks::WebhookSecret {
            secret: SECRET.into(),
        });
        assert_hidden(&crate::api::webhooks::CreateWebhook {
            secret: Some(SECRET.into()),
            ..Default::default()
        });
        assert_hidden(&crate::core::webhooks::NewEndpoint {
            secret: Some(SECRET.into()),
            ..Default::default()
        });
    }

    #[test]
    fn sealed_material() {
        assert_hidden(&crate::store::SealedValue {
            key: "NAME".into(),
            nonce: vec![0; 12],
            ciphertext: SECRET.as_bytes().to_vec(),
        });
        // The bytes as a Debug of Vec<u8> would show them.
        let v = crate::store::SealedValue {
            key: "NAME".into(),
            nonce: vec![],
            ciphertext: vec![201, 202, 203],
        };
        assert!(!format!("{v:?}").contains("201"), "{v:?}");
    }

    #[test]
    fn secret_set_values() {
        let pair: crate::core::secrets::SecretPair =
            serde_json::from_value(serde_json::json!({"secretKey": "K", "secretValue": SECRET}))
                .unwrap();
        assert_hidden(&pair);
        let req: crate::core::secrets::UpsertRequest = serde_json::from_value(
            serde_json::json!({"secretKey": "K", "secretValue": SECRET, "secrets": [
                {"secretKey": "K2", "secretValue": SECRET}]}),
        )
        .unwrap();
        assert_hidden(&req);
    }

    #[test]
    fn registry_credentials() {
        assert_hidden(&crate::runtime::docker::image::PullSecret {
            host: "ghcr.io".into(),
            value: SECRET.into(),
        });
    }

    #[test]
    fn session_and_upload_tokens() {
        assert_hidden(&crate::core::daily::DailyRoom {
            name: "r".into(),
            url: "https://x.daily.co/r".into(),
            bot_token: SECRET.into(),
            client_token: SECRET.into(),
        });
        assert_hidden(&crate::core::builds::NewUpload {
            id: Uuid::new_v4(),
            token: SECRET.into(),
            expires_ms: 1,
        });
    }

    #[test]
    fn agent_environments_show_their_names_alone() {
        let mut spec = crate::model::DeploymentSpec::default();
        spec.env.insert("OPENAI_API_KEY".into(), SECRET.into());
        let req: crate::core::agents::AgentRequest =
            serde_json::from_value(serde_json::json!({"env": {"OPENAI_API_KEY": SECRET}})).unwrap();
        let prepared = crate::runtime::Prepared {
            program: "/bin/true".into(),
            args: vec![],
            working_dir: None,
            env: vec![("OPENAI_API_KEY".into(), SECRET.into())],
        };
        for text in [
            format!("{spec:?}"),
            format!("{spec:#?}"),
            format!("{req:?}"),
            format!("{prepared:?}"),
        ] {
            assert!(
                !text.contains(&SECRET[..10]) && text.contains("OPENAI_API_KEY"),
                "{text}"
            );
        }
        let none = crate::core::agents::AgentRequest::default();
        assert!(format!("{none:?}").contains("env: None"), "{none:?}");
    }

    #[test]
    fn session_start_bodies() {
        let req: crate::api::sessions::StartRequest = serde_json::from_value(
            serde_json::json!({"body": {"apiKey": SECRET}, "flow_config": SECRET}),
        )
        .unwrap();
        assert_hidden(&req);
        let body = Some(serde_json::to_vec(&serde_json::json!({"apiKey": SECRET})).unwrap());
        assert_hidden(&crate::api::ws::WsTicket {
            org: "o".into(),
            agent: "a".into(),
            session_id: Uuid::nil(),
            body: body.clone(),
            expires_ms: 1,
        });
        assert_hidden(&crate::store::WsTokenRecord {
            hash: vec![],
            org: "o".into(),
            agent: "a".into(),
            session_id: Uuid::nil(),
            body,
            expires_ms: 1,
        });
        assert_hidden(&crate::api::ws::WsAnnounce {
            body: Some(SECRET.into()),
            session_id: Uuid::nil(),
            token: SECRET.into(),
            ws_url: "ws://h/ws".into(),
        });
    }

    #[test]
    fn webhook_urls_show_their_scheme_and_host() {
        let url = format!("https://hooks.example.com:8443/services/{SECRET}?token={SECRET}");
        let rec = crate::store::WebhookEndpointRecord {
            id: Uuid::nil(),
            org: "o".into(),
            url: url.clone(),
            events: vec![],
            description: String::new(),
            secret: crate::store::SealedValue {
                key: "k".into(),
                nonce: vec![],
                ciphertext: vec![],
            },
            created_ms: 1,
        };
        assert_hidden(&rec);
        assert!(
            format!("{rec:?}").contains("https://hooks.example.com:8443/<redacted>"),
            "{rec:?}"
        );
        assert_hidden(&crate::api::webhooks::CreateWebhook {
            url: url.clone(),
            ..Default::default()
        });
        assert_hidden(&crate::core::webhooks::NewEndpoint {
            url: url.clone(),
            ..Default::default()
        });
        assert_hidden(&crate::core::webhooks::EndpointView {
            id: Uuid::nil(),
            url: url.clone(),
            events: vec![],
            description: String::new(),
            created_ms: 1,
        });
        assert_hidden(&crate::api::webhooks::Webhook {
            id: Uuid::nil(),
            url,
            events: vec![],
            description: String::new(),
            created_at: String::new(),
            secret: None,
        });
    }

    #[test]
    fn urls_keep_what_says_where_and_hide_the_rest() {
        use super::url_origin;
        assert_eq!(url_origin("https://h.example/"), "https://h.example");
        assert_eq!(url_origin("http://10.0.0.1:80"), "http://10.0.0.1:80");
        assert_eq!(
            url_origin(&format!("https://u:{SECRET}@h.example/x")),
            "https://<redacted>@h.example/<redacted>"
        );
        assert_eq!(
            url_origin(&format!("https://h/?k={SECRET}")),
            "https://h/<redacted>"
        );
        assert_eq!(url_origin(&format!("not a url {SECRET}")), "<redacted>");
        assert_eq!(url_origin(&format!("/{SECRET}")), "<redacted>");
    }

    #[test]
    fn org_daily_properties() {
        let props = serde_json::json!({"defaultRegion": "local", "dailyApiKey": SECRET,
            "dailyDialinHmac": {"nonce": "bm9uY2U=", "ciphertext": SECRET}});
        let rec = crate::store::OrgRecord {
            name: "o".into(),
            verbose_name: "o".into(),
            properties: props,
            created_ms: 1,
        };
        assert_hidden(&rec);
        assert!(format!("{rec:?}").contains("defaultRegion"), "{rec:?}");
    }

    #[test]
    fn an_instance_environment_shows_its_names_alone() {
        let spec = crate::runtime::InstanceSpec {
            instance_id: Uuid::new_v4(),
            program: "/bin/true".into(),
            args: vec![],
            working_dir: None,
            env: vec![("API_TOKEN".into(), SECRET.into())],
            limits: None,
            agent: None,
            deployment: None,
            abandoned: tokio_util::sync::CancellationToken::new(),
        };
        let text = format!("{spec:?}");
        assert!(
            !text.contains(&SECRET[..10]) && text.contains("API_TOKEN"),
            "{text}"
        );
    }
}
