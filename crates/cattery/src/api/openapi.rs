//! The OpenAPI 3 description's frame: info, security schemes, request schemas, and the one
//! documented route that `api::router` registers as a plain route (the session proxy). The
//! paths themselves come from the route list in `api::router` (`router::openapi`).

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
    paths(super::proxy::proxy),
    components(schemas(super::error::ErrorBody, crate::core::agents::AgentRequest,
        super::sessions::StartRequest, super::sessions::StartResponse, super::sessions::StopResponse,
        crate::core::secrets::UpsertRequest, crate::core::secrets::SecretPair)),
    modifiers(&Security)
)]
pub struct ApiDoc;
