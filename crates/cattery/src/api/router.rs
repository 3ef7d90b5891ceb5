//! Every route of the API, in one list, and the OpenAPI document generated from it.
//!
//! The documented routes are registered with `routes!`: each takes its path and methods from
//! its handler's `#[utoipa::path]`, so a documented route cannot drift from its description.
//! The others are plain axum routes: `/health`, `/metrics` (Prometheus, `api::metrics`), the
//! document itself, the proxy root and the websocket token form, and the CLI's org-scoped
//! surface (reference §A.2; see `api::org`).
//! One documented route is plain as well: the session proxy, whose axum path ends in a
//! wildcard (`{*path}`) that OpenAPI cannot express; its description is listed in
//! `api::openapi::ApiDoc`.

use std::sync::LazyLock;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::MAX_REQUEST_BYTES;
use super::{
    agents, builds, cluster, dialin, events, logs, metrics, openapi, org, proxy, secrets, sessions,
    webhooks, whatsapp, ws, AppState,
};

/// The CLI's agents ("services") of an org.
const SERVICES: &str = "/v1/organizations/{org}/services";
/// The CLI's secret sets of an org.
const SECRETS: &str = "/v1/organizations/{org}/secrets";

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        // The documented API (reference §A.3-§A.9).
        .routes(routes!(agents::list_agents, agents::create_agent))
        .routes(routes!(
            agents::get_agent,
            agents::update_agent,
            agents::delete_agent
        ))
        .routes(routes!(sessions::list_sessions))
        .routes(routes!(sessions::get_session, sessions::stop_session))
        .routes(routes!(sessions::start_session))
        .routes(routes!(logs::agent_logs))
        .routes(routes!(secrets::list_secret_sets))
        .routes(routes!(
            secrets::get_secret_set,
            secrets::put_secret_set,
            secrets::delete_secret_set
        ))
        .routes(routes!(secrets::delete_secret))
        .routes(routes!(org::regions))
        .routes(routes!(org::properties, org::update_properties))
        .routes(routes!(org::properties_schema))
        .routes(routes!(ws::connect))
        .routes(routes!(cluster::nodes))
        .routes(routes!(cluster::forget_node))
        .routes(routes!(webhooks::list_webhooks, webhooks::create_webhook))
        .routes(routes!(webhooks::get_webhook, webhooks::delete_webhook))
        .routes(routes!(webhooks::webhook_secret))
        .routes(routes!(webhooks::webhook_deliveries))
        .routes(routes!(dialin::dialin))
        .routes(routes!(whatsapp::whatsapp_verify, whatsapp::whatsapp_event))
        // Plain routes.
        .route("/health", get(health))
        .route("/metrics", get(metrics::scrape))
        .route("/v1/openapi.json", get(serve_openapi))
        .route("/ws/generic/{service}/{token}", get(ws::connect_with_token))
        // Telephony providers and the query form of the generic endpoint.
        .route("/ws/{provider}", get(ws::telephony))
        .route(
            "/v1/agents/{agent_name}/deployments",
            get(org::agent_deployments),
        )
        .merge(org_routes())
        // The dashboard's live session list (`api::events`).
        .route("/v1/sessions/events", get(events::session_events))
        // Internal calls between nodes (cluster secret only; docs/cluster.md).
        .route(
            "/internal/v1/sessions/{session_id}/stop",
            axum::routing::post(cluster::internal_stop),
        )
        // Readiness for a load balancer (docs/cluster.md); `/health` stays liveness.
        .route("/ready", get(ready))
}

/// The org-scoped surface of the official CLI (`api::org`), `/v1/users` and `/v1/organizations`.
fn org_routes() -> OpenApiRouter<AppState> {
    let s = |rest: &str| format!("{SERVICES}{rest}");
    let sec = |rest: &str| format!("{SECRETS}{rest}");
    OpenApiRouter::new()
        .route("/v1/organizations", get(org::list_organizations))
        .route("/v1/users", get(org::current_user))
        .route(
            SERVICES,
            get(org::list_services)
                .post(org::create_service)
                .put(org::update_service),
        )
        .route(
            &s("/{name}"),
            get(org::get_service).delete(org::delete_service),
        )
        .route(&s("/{name}/deployments"), get(org::list_deployments))
        .route(&s("/{name}/logs"), get(logs::org_agent_logs))
        .route(&s("/{name}/sessions"), get(org::list_sessions))
        .route(
            &s("/{name}/sessions/{session_id}"),
            get(org::get_session).delete(org::stop_session),
        )
        .route(SECRETS, get(secrets::org_list_secret_sets))
        .route(
            &sec("/{set_name}"),
            get(secrets::org_get_secret_set)
                .put(secrets::org_put_secret_set)
                .delete(secrets::org_delete_secret_set),
        )
        .route(
            &sec("/{set_name}/{secret_key}"),
            delete(secrets::org_delete_secret),
        )
        .route("/v1/organizations/{org}/regions", get(org::org_regions))
        .route(
            "/v1/organizations/{org}/properties",
            get(org::org_properties).patch(org::org_update_properties),
        )
        .route(
            "/v1/organizations/{org}/properties/schema",
            get(org::org_properties_schema),
        )
        .route(
            "/v1/organizations/{org}/apiKeys",
            get(org::list_api_keys).post(org::create_api_key),
        )
        .route(
            "/v1/organizations/{org}/apiKeys/{id}",
            delete(org::revoke_api_key),
        )
        .route("/v1/organizations/{org}/daily", get(org::daily_key))
        .route(
            "/v1/organizations/{org}/agent-profiles",
            get(org::agent_profiles),
        )
        .merge(build_routes())
}

/// Builds (`api::builds`): the documented `/v1/builds` form, the CLI's org form, and the
/// upload endpoint (its own size cap, enforced while it streams to disk).
fn build_routes() -> OpenApiRouter<AppState> {
    const ORG: &str = "/v1/organizations/{org}/builds";
    OpenApiRouter::new()
        .routes(routes!(builds::list_builds, builds::create_build))
        .routes(routes!(builds::create_upload_url))
        .route(
            "/v1/builds/uploads/{upload_id}",
            post(builds::upload_multipart)
                .put(builds::upload_raw)
                .layer(DefaultBodyLimit::disable()),
        )
        .routes(routes!(builds::get_build))
        .routes(routes!(builds::build_logs))
        .route(
            ORG,
            get(builds::org_list_builds).post(builds::org_create_build),
        )
        .route(
            &format!("{ORG}/upload-url"),
            post(builds::org_create_upload_url),
        )
        .route(&format!("{ORG}/{{id}}"), get(builds::org_get_build))
        .route(&format!("{ORG}/{{id}}/logs"), get(builds::org_build_logs))
}

/// The OpenAPI document, generated from [`routes`].
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
        let mut doc = routes().into_openapi();
        document_bad_requests(&mut doc);
        doc
    });
    &DOC
}

/// Says on every operation that it may answer 400: a path or query none of its routes can
/// take (a NUL byte, [`refuse_nul`]; a path parameter that does not parse) is refused so on
/// every route, whatever else the operation documents.
fn document_bad_requests(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Content, Ref, ResponseBuilder};
    for item in doc.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in ops.into_iter().flatten() {
            op.responses
                .responses
                .entry("400".to_string())
                .or_insert_with(|| {
                    ResponseBuilder::new()
                        .description("A path or query the route cannot take")
                        .content(
                            "application/json",
                            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
                        )
                        .build()
                        .into()
                });
        }
    }
}

/// `GET /v1/openapi.json`.
async fn serve_openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi())
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness, for a load balancer's health check: 200 `{"status": "ready"}` while this node
/// takes new sessions; 503 `{"error", "code": "DRAINING"}` from the start of a drain (its
/// sessions go on, stoppable through any node), 503 `NODE_FENCED` while it reconciles after
/// late heartbeats. `/health` answers 200 as long as the process serves (liveness).
async fn ready(
    axum::extract::State(st): axum::extract::State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if st.sup.is_draining() {
        return Err(crate::core::CoreError::Draining.into());
    }
    if st.sup.is_fenced() {
        return Err(crate::core::CoreError::Fenced.into());
    }
    Ok(Json(serde_json::json!({"status": "ready"})))
}

/// 404 for a path no route takes. A path that starts with `//` is what a client makes of an
/// API host given with a trailing slash (`PIPECAT_API_HOST=http://host:7870/`: the clients
/// append `/v1/...` as is), so its answer says so.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    if uri.path().starts_with("//") {
        return ApiError::not_found(
            "404",
            "no such route: the path starts with // (is the client's API host, such as \
             PIPECAT_API_HOST, given with a trailing slash? give it without one)",
        );
    }
    ApiError::not_found("404", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "405",
        "method not allowed on this route",
    )
}

/// The session proxy's routes: a request there is the bot's (it changes nothing of
/// Cattery's), so it is cut with its client's connection ([`run_to_completion`]).
fn proxy_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/public/{agent_name}/sessions/{session_id}",
            any(proxy::proxy_root),
        )
        .route(
            "/v1/public/{agent_name}/sessions/{session_id}/{*path}",
            any(proxy::proxy),
        )
}

/// Runs a request that may change Cattery's records (every method but `GET`, `HEAD` and
/// `OPTIONS`) on a task of its own, to its end even when its client leaves: hyper drops a
/// request's handler when its client closes the connection (EOF while the answer is
/// pending), and a handler cut between two steps (a store write and the engine's state, a
/// Daily room made and its session not yet started) would leave half a change behind. Its
/// answer is dropped if nobody is left to read it. Reads, and the session proxy (whose
/// requests are the bot's), are still cut with their connection, so the connection cap
/// (`--max-connections`) bounds them.
async fn run_to_completion(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::Method;
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    // The router catches a handler's panic; the task fails only when the runtime shuts down.
    tokio::spawn(next.run(req)).await.unwrap_or_else(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SHUTTING_DOWN",
            "the server is shutting down",
        )
        .into_response()
    })
}

/// Refuses a request whose path or query holds a NUL byte (`%00`) with 400: no name, id or
/// filter of this API may hold one, and a store may not take it as text (PostgreSQL refuses
/// the whole statement, which would answer 503). The session proxy's routes are not under it
/// (their path and query are the bot's).
async fn refuse_nul(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let has_nul = |s: &str| {
        s.as_bytes()
            .windows(3)
            .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
    };
    let uri = req.uri();
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        return ApiError::bad_request("the request's path or query holds a NUL byte (%00)")
            .into_response();
    }
    next.run(req).await
}

/// `api` with its writes run to their end ([`run_to_completion`]), and `cut` beside it, as is.
fn with_writes_run_to_completion<S: Clone + Send + Sync + 'static>(
    api: Router<S>,
    cut: Router<S>,
) -> Router<S> {
    api.route_layer(axum::middleware::from_fn(run_to_completion))
        .merge(cut)
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    let router = router
        .route_layer(axum::middleware::from_fn(refuse_nul))
        // What the official CLI prints as markup, escaped (not the session proxy's answers,
        // which are the bot's).
        .layer(axum::middleware::from_fn(super::cli_text::for_the_cli));
    let router = with_writes_run_to_completion(router, proxy_routes())
        .route_layer(axum::middleware::from_fn(super::trace::record_route))
        // The dashboard: `/` redirects to `/dashboard` (`crate::dashboard`).
        .merge(crate::dashboard::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "500", "internal error")
                .into_response()
        }))
        .with_state(state);
    super::trace::with_request_ids(router)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use axum::routing::{get, post};
    use axum::Router;
    use tokio::io::AsyncWriteExt;

    use crate::http_server::{serve, HttpLimits};

    /// A handler that takes 300 ms and then marks that it ran to its end.
    fn slow(
        done: &Arc<AtomicBool>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = &'static str> + Send>>
           + Clone
           + Send
           + Sync
           + 'static {
        let done = done.clone();
        move || {
            let done = done.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                done.store(true, Ordering::SeqCst);
                "done"
            })
        }
    }

    /// Clients that send a request and close their connection at once, on a real socket:
    /// the API's `POST` runs to its end; a `GET`, and a `POST` through the routes kept apart
    /// (the session proxy's), are cut.
    #[tokio::test]
    async fn a_request_that_may_write_runs_to_its_end_when_its_client_leaves() {
        let flags: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
        let api = Router::new()
            .route("/w", post(slow(&flags[0])))
            .route("/r", get(slow(&flags[1])));
        let cut = Router::new().route("/p", post(slow(&flags[2])));
        let app = super::with_writes_run_to_completion(api, cut);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 16,
        };
        tokio::spawn(serve(listener, app, limits, None, std::future::pending()));
        for req in [
            "POST /w HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
            "GET /r HTTP/1.1\r\nhost: x\r\n\r\n",
            "POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        ] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(req.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(c); // the client leaves before the answer
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let ran: Vec<bool> = flags.iter().map(|f| f.load(Ordering::SeqCst)).collect();
        assert_eq!(
            ran,
            [true, false, false],
            "ran to the end: POST /w, GET /r, POST /p"
        );
    }

    /// The committed OpenAPI document (`openapi.snapshot.json` beside this file). A change of
    /// the document fails here until the snapshot is regenerated on purpose:
    /// `CATTERY_UPDATE_SNAPSHOTS=1 cargo test -p cattery --lib openapi_snapshot`.
    #[test]
    fn openapi_snapshot() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/api/openapi.snapshot.json");
        let doc = serde_json::to_string_pretty(super::openapi()).unwrap() + "\n";
        if std::env::var_os("CATTERY_UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, &doc).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            doc == want,
            "the OpenAPI document differs from {}; if the change is intended, regenerate it with \
             CATTERY_UPDATE_SNAPSHOTS=1 cargo test -p cattery --lib openapi_snapshot",
            path.display()
        );
    }

    /// The document describes exactly these operations (the 21 of before it was generated
    /// from the route list, then the webhooks, dial-in, WhatsApp and builds routes).
    #[test]
    fn documented_operations() {
        let mut ids: Vec<String> = super::openapi()
            .paths
            .paths
            .values()
            .flat_map(|item| {
                [
                    &item.get,
                    &item.put,
                    &item.post,
                    &item.delete,
                    &item.options,
                    &item.head,
                    &item.patch,
                    &item.trace,
                ]
                .into_iter()
                .flatten()
                .filter_map(|op| op.operation_id.clone())
                .collect::<Vec<_>>()
            })
            .collect();
        ids.sort();
        ids.dedup();
        let mut want = [
            "agent_logs",
            "create_agent",
            "delete_agent",
            "delete_secret",
            "delete_secret_set",
            "forget_cluster_node",
            "get_agent",
            "get_properties",
            "get_properties_schema",
            "get_secret_set",
            "get_session",
            "list_agents",
            "list_cluster_nodes",
            "list_regions",
            "list_secret_sets",
            "list_sessions",
            "session_proxy",
            "start_session",
            "stop_session",
            "update_agent",
            "update_properties",
            "upsert_secret_set",
            "websocket_connect",
            "create_webhook",
            "daily_dialin",
            "whatsapp_event",
            "whatsapp_verify",
            "delete_webhook",
            "get_webhook",
            "get_webhook_secret",
            "list_webhook_deliveries",
            "list_webhooks",
            "build_logs",
            "create_build",
            "create_upload_url",
            "get_build",
            "list_builds",
        ];
        want.sort();
        assert_eq!(ids, want);
    }
}
