//! The dashboard: a browser UI at `/dashboard` over the API (see `docs/dashboard.md`).
//!
//! Three static files compiled into the binary (`include_str!`): no build step, no network
//! at run time. A fourth, `talk.js`, is the "Talk to a bot" bundle of Pipecat's client
//! packages, built from npm by `crates/cattery/dashboard-talk/build.sh` and committed (CI checks
//! that it matches its sources); the page loads it only when Talk is pressed. The page keeps the signed-in key in the tab's `sessionStorage` and sends it
//! as `Authorization: Bearer` to the same API the CLI uses; no cookie is ever set, so a
//! request from another site carries no credential (nothing to forge: CSRF-safe by
//! construction). Every answer here carries a strict Content-Security-Policy (scripts and
//! connections to this origin only, no inline script) and refuses to be framed.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const TALK_JS: &str = include_str!("assets/talk.js");

/// The policy of every dashboard answer.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn talk_js() -> Response {
    asset("text/javascript; charset=utf-8", TALK_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// `/` (a redirect), `/dashboard` and its two assets. Generic over the state so it merges
/// into the API's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
        .route("/dashboard/talk.js", get(talk_js))
}

#[cfg(test)]
mod tests {
    /// The page loads only its own two assets: nothing from another origin, no inline script
    /// (the policy would block it).
    #[test]
    fn assets_are_self_contained() {
        for (name, text) in [
            ("index.html", super::INDEX_HTML),
            ("app.js", super::APP_JS),
            ("app.css", super::APP_CSS),
        ] {
            for bad in ["http://", "https://", "//cdn", "onclick=", "onload="] {
                assert!(!text.contains(bad), "{name} contains {bad:?}");
            }
        }
        assert!(super::INDEX_HTML.contains(r#"<script src="/dashboard/app.js""#));
        assert_eq!(super::INDEX_HTML.matches("<script").count(), 1);
    }

    /// The talk bundle loads nothing from elsewhere: Daily's call object (which fetches its
    /// code from Daily's servers) is not in it, and the only URLs in its text are the
    /// bundled packages' own project links (in license comments and error messages).
    #[test]
    fn talk_bundle_is_self_contained() {
        let js = super::TALK_JS;
        assert!(js.starts_with("// Built by crates/cattery/dashboard-talk/build.sh"));
        assert!(js.contains("window.CatteryTalk"));
        assert!(js.contains("SmallWebRTC"));
        for bad in ["c.daily.co", "http://", "//cdn", "import(", "importScripts"] {
            assert!(!js.contains(bad), "talk.js contains {bad:?}");
        }
        for (at, _) in js.match_indices("https://") {
            let rest = &js[at..];
            assert!(
                rest.starts_with("https://github.com/"),
                "talk.js names a URL that is not a project link: {}",
                &rest[..rest.len().min(60)]
            );
        }
    }
}
