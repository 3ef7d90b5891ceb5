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
