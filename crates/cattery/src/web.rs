//! What a browser (or a reverse proxy in front of Cattery) needs: the `[web]` section of the
//! configuration, with its flags: CORS origins, TLS, and the public URL that the URLs Cattery
//! hands out (`wsUrl`) are built from. See docs/reverse-proxy.md.
//!
//! - **CORS** (`api::cors`): the public routes (`/v1/public/...`, `/ws/...`) allow
//!   `cors_public_origins` (default `*`, any origin: they take a public key, made to be shipped
//!   to browsers); every other route allows `cors_private_origins` (default none: a private key
//!   never belongs in a browser).
//! - **TLS**: with `tls_cert` and `tls_key` (PEM files) the server speaks HTTPS (rustls) and
//!   hands out `wss://` URLs.
//! - **Public URL**: behind a proxy, `public_url` (e.g. `https://voice.example.com`) fixes
//!   the scheme, host and path prefix of handed-out URLs; without it they follow the request:
//!   `Forwarded` (`proto=`, `host=`), then `X-Forwarded-Proto`/`X-Forwarded-Host`, then
//!   `Host` and whether this server speaks TLS.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::http::HeaderMap;
use serde::Deserialize;

/// `[web]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Origins allowed on the public routes; `*` is any origin.
    pub cors_public_origins: Vec<String>,
    /// Origins allowed on the private routes (none by default).
    pub cors_private_origins: Vec<String>,
    /// PEM certificate chain; with `tls_key`, the server speaks HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The URL clients reach this server at (scheme, host, optional path prefix).
    pub public_url: Option<String>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            cors_public_origins: vec!["*".into()],
            cors_private_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            public_url: None,
        }
    }
}

/// Flags of the `[web]` section (flattened into `cattery serve`'s).
#[derive(Debug, Default, clap::Args)]
pub struct WebArgs {
    /// Origins allowed to call the public routes from a browser (comma-separated; `*` = any)
    /// [default: *].
    #[arg(
        long,
        env = "CATTERY_CORS_PUBLIC_ORIGINS",
        value_delimiter = ',',
        help_heading = "Web"
    )]
    pub cors_public_origins: Option<Vec<String>>,
    /// Origins allowed to call the private routes from a browser (comma-separated; `*` = any)
    /// [default: none].
    #[arg(
        long,
        env = "CATTERY_CORS_PRIVATE_ORIGINS",
        value_delimiter = ',',
        help_heading = "Web"
    )]
    pub cors_private_origins: Option<Vec<String>>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "CATTERY_TLS_CERT", help_heading = "Web")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CATTERY_TLS_KEY", help_heading = "Web")]
    pub tls_key: Option<PathBuf>,
    /// The URL clients reach this server at, e.g. `https://voice.example.com`: handed-out URLs
    /// (`wsUrl`) are built from it [default: from the request's Forwarded/X-Forwarded-*/Host].
    #[arg(long, env = "CATTERY_PUBLIC_URL", help_heading = "Web")]
    pub public_url: Option<String>,
}

impl WebConfig {
    /// Overrides with what the flags and environment gave.
    pub fn apply(&mut self, a: WebArgs) {
        if let Some(v) = a.cors_public_origins {
            self.cors_public_origins = v;
        }
        if let Some(v) = a.cors_private_origins {
            self.cors_private_origins = v;
        }
        if a.tls_cert.is_some() {
            self.tls_cert = a.tls_cert;
        }
        if a.tls_key.is_some() {
            self.tls_key = a.tls_key;
        }
        if a.public_url.is_some() {
            self.public_url = a.public_url;
        }
    }

    /// Checks the section; the error names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (flag, list) in [
            ("cors-public-origins", &self.cors_public_origins),
            ("cors-private-origins", &self.cors_private_origins),
        ] {
            for o in list {
                if o != "*" && parse_origin(o).is_none() {
                    anyhow::bail!("--{flag}: {o:?} is not an origin (scheme://host[:port], or *)");
                }
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            anyhow::bail!("--tls-cert and --tls-key go together");
        }
        if let Some(u) = &self.public_url {
            if public_base(u).is_none() {
                anyhow::bail!("--public-url {u:?} must be an http:// or https:// URL");
            }
        }
        Ok(())
    }

    /// Whether the server speaks TLS.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }
}

/// `scheme://host[:port]` with no path: an origin as browsers send it.
fn parse_origin(o: &str) -> Option<()> {
    let (scheme, rest) = o.split_once("://")?;
    (!scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+')
        && !rest.is_empty()
        && !rest.contains('/'))
    .then_some(())
}

/// `(secure, host and path prefix)` of an `http(s)://` URL, without a trailing slash.
fn public_base(u: &str) -> Option<(bool, String)> {
    let (secure, rest) = if let Some(r) = u.strip_prefix("https://") {
        (true, r)
    } else {
        (false, u.strip_prefix("http://")?)
    };
    let rest = rest.trim_end_matches('/');
    (!rest.is_empty() && !rest.starts_with('/')).then(|| (secure, rest.to_string()))
}

/// Where clients reach this server, for the URLs it hands out.
#[derive(Debug, Clone, Default)]
pub struct PublicUrl {
    /// `--public-url`, parsed: (secure, host and prefix).
    fixed: Option<(bool, String)>,
    /// Whether this server speaks TLS itself.
    tls: bool,
}

impl PublicUrl {
    /// From the configuration (validated).
    pub fn new(web: &WebConfig) -> PublicUrl {
        PublicUrl {
            fixed: web.public_url.as_deref().and_then(public_base),
            tls: web.tls(),
        }
    }

    /// The HTTP base URL (`http://host` or `https://host/prefix`) for a request with
    /// `headers`: where a client reaches this server (build upload URLs).
    pub fn http_base(&self, headers: &HeaderMap) -> String {
        let (secure, host) = match &self.fixed {
            Some((s, h)) => (*s, h.clone()),
            None => self.seen_by_client(headers),
        };
        format!("{}://{host}", if secure { "https" } else { "http" })
    }

    /// The websocket base URL (`ws://host` or `wss://host/prefix`) for a request with
    /// `headers`.
    pub fn ws_base(&self, headers: &HeaderMap) -> String {
        let (secure, host) = match &self.fixed {
            Some((s, h)) => (*s, h.clone()),
            None => self.seen_by_client(headers),
        };
        format!("{}://{host}", if secure { "wss" } else { "ws" })
    }

    /// `(secure, host)` as the client sees them: `Forwarded`, then `X-Forwarded-*`, then
    /// `Host` and this server's own TLS.
    fn seen_by_client(&self, headers: &HeaderMap) -> (bool, String) {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        // Only the first (client-most) element of each header counts.
        let first = |v: &str| v.split(',').next().unwrap_or("").trim().to_string();
        let mut proto = None;
        let mut host = None;
        if let Some(fwd) = get("forwarded") {
            for pair in first(fwd).split(';') {
                if let Some((k, v)) = pair.trim().split_once('=') {
                    let v = v.trim().trim_matches('"').to_string();
                    match k.trim().to_ascii_lowercase().as_str() {
                        "proto" => proto = Some(v),
                        "host" => host = Some(v),
                        _ => {}
                    }
                }
            }
        }
        let proto = proto.or_else(|| get("x-forwarded-proto").map(first));
        let host = host
            .or_else(|| get("x-forwarded-host").map(first))
            .or_else(|| get("host").map(str::to_string))
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic() && c != '/'))
            .unwrap_or_else(|| "127.0.0.1:7870".into());
        let secure = match proto.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("https" | "wss") => true,
            Some("http" | "ws") => false,
            _ => self.tls,
        };
        (secure, host)
    }
}

/// The TLS acceptor for `--tls-cert`/`--tls-key`, or `None` without them. Errors name the
/// file that could not be read or used.
pub fn tls_acceptor(web: &WebConfig) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let (Some(cert), Some(key)) = (&web.tls_cert, &web.tls_key) else {
        return Ok(None);
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("--tls-cert {}: no certificate in the file", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not make a usable certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn ws_urls_follow_the_proxy_headers() {
        let plain = PublicUrl::default();
        let h = headers(&[("host", "10.0.0.5:7870")]);
        assert_eq!(plain.ws_base(&h), "ws://10.0.0.5:7870");
        let h = headers(&[("host", "10.0.0.5:7870"), ("x-forwarded-proto", "https")]);
        assert_eq!(plain.ws_base(&h), "wss://10.0.0.5:7870");
        let h = headers(&[
            ("host", "10.0.0.5:7870"),
            ("x-forwarded-proto", "https, http"),
            ("x-forwarded-host", "voice.example.com"),
        ]);
        assert_eq!(plain.ws_base(&h), "wss://voice.example.com");
        let h = headers(&[
            ("host", "10.0.0.5:7870"),
            ("x-forwarded-proto", "http"),
            (
                "forwarded",
                "for=1.2.3.4;proto=https;host=\"a.example:8443\", proto=http",
            ),
        ]);
        assert_eq!(plain.ws_base(&h), "wss://a.example:8443");
        let tls = PublicUrl {
            fixed: None,
            tls: true,
        };
        assert_eq!(
            tls.ws_base(&headers(&[("host", "h:1")])),
            "wss://h:1",
            "a TLS server hands out wss:// by itself"
        );
    }

    #[test]
    fn public_url_wins_over_the_request() {
        let web = WebConfig {
            public_url: Some("https://voice.example.com/cattery/".into()),
            ..WebConfig::default()
        };
        web.validate().unwrap();
        let u = PublicUrl::new(&web);
        let h = headers(&[("host", "10.0.0.5:7870"), ("x-forwarded-proto", "http")]);
        assert_eq!(u.ws_base(&h), "wss://voice.example.com/cattery");
    }

    #[test]
    fn validate_names_the_flag() {
        let bad = |f: fn(&mut WebConfig)| {
            let mut w = WebConfig::default();
            f(&mut w);
            w.validate().unwrap_err().to_string()
        };
        assert!(bad(|w| w.cors_public_origins = vec!["example.com".into()])
            .contains("--cors-public-origins"));
        assert!(
            bad(|w| w.cors_private_origins = vec!["https://a.example/x".into()])
                .contains("--cors-private-origins")
        );
        assert!(bad(|w| w.tls_cert = Some("/c.pem".into())).contains("--tls-key"));
        assert!(bad(|w| w.public_url = Some("ftp://x".into())).contains("--public-url"));
        WebConfig::default().validate().unwrap();
    }
}
