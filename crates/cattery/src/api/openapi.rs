//! The OpenAPI 3 description, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        for (name, desc) in [
            (
                "PrivateKeyAuth",
                "A private key (sk_...) or a user token (pcc_pat_...)",
            ),
            ("PublicKeyAuth", "A public key (pk_...)"),
        ] {
            c.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(desc))
                        .build(),
                ),
            );
        }
    }
}

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "Cattery", description = "Self-hosted, Pipecat Cloud compatible session platform"),
    paths(
        super::agents::create_agent, super::agents::list_agents, super::agents::get_agent,
        super::agents::update_agent, super::agents::delete_agent,
        super::sessions::start_session, super::sessions::list_sessions, super::sessions::get_session,
        super::sessions::stop_session,
        super::proxy::proxy, super::ws::connect,
        super::logs::agent_logs,
        super::secrets::list_secret_sets, super::secrets::get_secret_set,
        super::secrets::put_secret_set, super::secrets::delete_secret_set,
        super::secrets::delete_secret,
        super::org::regions, super::org::properties, super::org::properties_schema,
        super::org::update_properties,
    ),
    components(schemas(super::error::ErrorBody, crate::core::agents::AgentRequest,
        super::sessions::StartRequest, super::sessions::StartResponse, super::sessions::StopResponse,
        crate::core::secrets::UpsertRequest, crate::core::secrets::SecretPair)),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// `GET /v1/openapi.json`.
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
