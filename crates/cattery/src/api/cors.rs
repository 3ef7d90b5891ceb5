//! CORS around the router (tower-http's `CorsLayer`), by route: the public routes
//! (`/v1/public/...`, the websocket `/ws/...`) allow `--cors-public-origins` (default any
//! origin), every other route `--cors-private-origins` (default none). Preflights are answered
//! here; a private route's preflight from an origin not allowed carries no
//! `Access-Control-Allow-*` header, so the browser refuses the call.
//!
//! Requests without `Origin` (not from a browser page) pass by untouched: a plain `OPTIONS`
//! reaches its route as before.
//!
//! Browsers do not preflight websockets but send `Origin`: a websocket handshake from an
//! origin the public list does not allow is refused with 403.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer, ExposeHeaders};

use super::error::ApiError;
use crate::web::WebConfig;

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// Whether `path` is a public route (public key or websocket token).
fn is_public(path: &str) -> bool {
    path.starts_with("/v1/public/") || path.starts_with("/ws/")
}

/// Origins as configured: `*` anywhere in the list is any origin.
enum Origins {
    Any,
    List(Vec<HeaderValue>),
}

impl Origins {
    fn new(list: &[String]) -> Origins {
        if list.iter().any(|o| o == "*") {
            return Origins::Any;
        }
        Origins::List(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
                .collect(),
        )
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        match self {
            Origins::Any => true,
            Origins::List(l) => l.iter().any(|o| o == origin),
        }
    }

    fn cors_layer(&self) -> CorsLayer {
        let allow = match self {
            Origins::Any => AllowOrigin::any(),
            Origins::List(l) => AllowOrigin::list(l.clone()),
        };
        CorsLayer::new()
            .allow_origin(allow)
            // `Authorization` is never covered by a `*` in Allow-Headers: mirror what is asked.
            .allow_headers(AllowHeaders::mirror_request())
            .allow_methods(AllowMethods::mirror_request())
            .expose_headers(ExposeHeaders::any())
            .max_age(PREFLIGHT_MAX_AGE)
    }
}

/// `router` with CORS by route, per `web`.
pub fn wrap(router: Router, web: &WebConfig) -> Router {
    let plain = router.clone();
    let public_origins = std::sync::Arc::new(Origins::new(&web.cors_public_origins));
    let public = public_origins.cors_layer().layer(router.clone());
    let private = Origins::new(&web.cors_private_origins)
        .cors_layer()
        .layer(router);
    let svc = tower::service_fn(move |req: Request| {
        let (plain, public, private, public_origins) = (
            plain.clone(),
            public.clone(),
            private.clone(),
            public_origins.clone(),
        );
        async move {
            // No `Origin`: not a browser's cross-origin call, nothing for CORS to do (an
            // `OPTIONS` reaches its route, the session proxy forwards it to the bot).
            if !req.headers().contains_key(header::ORIGIN) {
                return plain.oneshot(req).await;
            }
            if !is_public(req.uri().path()) {
                return private.oneshot(req).await;
            }
            let refused_ws_origin = req.method() == Method::GET
                && req.headers().contains_key(header::UPGRADE)
                && req
                    .headers()
                    .get(header::ORIGIN)
                    .is_some_and(|o| !public_origins.allows(o));
            if refused_ws_origin {
                return Ok(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "403",
                    "websocket connections from this origin are not allowed (--cors-public-origins)",
                )
                .into_response());
            }
            public.oneshot(req).await
        }
    });
    Router::new().fallback_service(svc)
}
