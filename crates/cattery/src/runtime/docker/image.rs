//! Image resolution at deploy time: the pull policy, registry credentials, and the mapping of
//! engine errors to Pipecat Cloud's deployment error codes.

use bollard::auth::DockerCredentials;
use bollard::errors::Error;
use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

/// When the runtime pulls an image at deploy (`--image-pull-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pull only when the engine does not have the reference (default).
    #[default]
    Missing,
    /// Pull on every deploy (a moved tag is picked up by a redeploy).
    Always,
    /// Never pull: the image must already be on the engine.
    Never,
}

impl PullPolicy {
    /// Parses `missing`, `always` or `never`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "missing" | "if-not-present" | "IfNotPresent" => Some(PullPolicy::Missing),
            "always" | "Always" => Some(PullPolicy::Always),
            "never" | "Never" => Some(PullPolicy::Never),
            _ => None,
        }
    }
}

/// Registry credentials from an image pull secret set: the registry host and base64 of
/// `user:password`.
#[derive(custom_debug::Debug, Clone)]
pub struct PullSecret {
    /// Registry host (`ghcr.io`, `127.0.0.1:5999`).
    pub host: String,
    /// base64 of `user:password`.
    #[debug(with = crate::redact::hidden)]
    pub value: String,
}

/// Prefix of a deploy error about an image that does not exist.
pub const IMAGE_NOT_FOUND: &str = "PCC_IMAGE_NOT_FOUND";
/// Prefix of a deploy error about a pull the registry refused.
pub const IMAGE_PULL_UNAUTHORIZED: &str = "PCC_IMAGE_PULL_UNAUTHORIZED";

/// Splits a reference into what the pull API wants: `repo` and `tag` (a digest reference
/// `repo@sha256:...` is passed whole as `repo`, with no tag).
pub fn split_reference(reference: &str) -> (String, Option<String>) {
    if reference.contains('@') {
        return (reference.to_string(), None);
    }
    let last_slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    match reference[last_slash..].rfind(':') {
        Some(i) => (
            reference[..last_slash + i].to_string(),
            Some(reference[last_slash + i + 1..].to_string()),
        ),
        None => (reference.to_string(), Some("latest".to_string())),
    }
}

/// The registry host of a reference (`docker.io` when it names none).
pub fn registry_of(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "docker.io".to_string(),
    }
}

/// The engine's credentials for `secret`, when it names the reference's registry.
fn credentials(secret: Option<&PullSecret>) -> Option<DockerCredentials> {
    use base64::Engine;
    let s = secret?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(s.value.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    let host = s
        .host
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    Some(DockerCredentials {
        username: Some(user.to_string()),
        password: Some(pass.to_string()),
        serveraddress: Some(host),
        ..Default::default()
    })
}

/// A deploy error for a failed pull or a missing image, with Pipecat Cloud's code as prefix
/// (`PCC_IMAGE_NOT_FOUND: ...`). Docker Hub answers an unknown and a private repository alike
/// ("pull access denied ... may require 'docker login'"): without credentials that is "not
/// found", with credentials "unauthorized".
pub fn pull_error(reference: &str, e: &Error, had_credentials: bool) -> String {
    let (status, msg) = match e {
        Error::DockerResponseServerError {
            status_code,
            message,
        } => (Some(*status_code), message.clone()),
        Error::DockerStreamError { error } => (None, error.clone()),
        other => (None, other.to_string()),
    };
    let m = msg.to_ascii_lowercase();
    let ambiguous = m.contains("pull access denied") || m.contains("may require");
    let unauthorized = says_unauthorized(&m) || (m.contains("denied") && !ambiguous);
    let not_found = status == Some(404)
        || m.contains("manifest unknown")
        || m.contains("not found")
        || m.contains("repository does not exist");
    if ambiguous {
        return if had_credentials {
            format!("{IMAGE_PULL_UNAUTHORIZED}: the registry refused to pull {reference} with the imagePullSecretSet's credentials: {msg}")
        } else {
            format!("{IMAGE_NOT_FOUND}: image {reference} was not found (or is private: set imagePullSecretSet): {msg}")
        };
    }
    if unauthorized {
        format!("{IMAGE_PULL_UNAUTHORIZED}: the registry refused to pull {reference}: {msg}")
    } else if not_found {
        format!("{IMAGE_NOT_FOUND}: image {reference} was not found: {msg}")
    } else {
        format!("cannot pull image {reference}: {msg}")
    }
}

/// The local image id of `reference`, `Ok(None)` when the engine does not have it. Errors:
/// the engine failed, or the image has nothing to run (neither `CMD` nor `ENTRYPOINT`: every
/// container of it would fail to start).
async fn local_id(docker: &Docker, reference: &str) -> Result<Option<String>, String> {
    match docker.inspect_image(reference).await {
        Ok(img) => {
            let runs_something = img.config.as_ref().is_none_or(|c| {
                c.cmd.as_ref().is_some_and(|v| !v.is_empty())
                    || c.entrypoint.as_ref().is_some_and(|v| !v.is_empty())
            });
            if !runs_something {
                return Err(format!(
                    "PCC_UNKNOWN_ERROR: image {reference} has no command to run (neither CMD \
                     nor ENTRYPOINT): build it FROM a Pipecat base image, or give it a CMD"
                ));
            }
            Ok(img.id)
        }
        Err(Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(format!("cannot inspect image {reference}: {e}")),
    }
}

/// Whether an engine's or registry's (lowercased) message says the credentials were refused
/// or missing.
fn says_unauthorized(m: &str) -> bool {
    m.contains("unauthorized")
        || m.contains("authentication required")
        || m.contains("no basic auth credentials")
}

/// Whether the registry refused access (as opposed to not knowing the image, or not
/// answering).
fn refused(e: &Error) -> bool {
    let (status, msg) = match e {
        Error::DockerResponseServerError {
            status_code,
            message,
        } => (Some(*status_code), message.to_ascii_lowercase()),
        other => (None, other.to_string().to_ascii_lowercase()),
    };
    matches!(status, Some(401 | 403)) || says_unauthorized(&msg) || msg.contains("denied")
}

/// For an image the engine already has (pull policy `missing`): asks the reference's registry
/// for its manifest with the deployment's credentials, or none (no layer is downloaded), as
/// a pull would have. So a private image that one agent pulled with its credentials serves
/// no other deployment (of any org) that could not pull it itself. Not checked: references
/// without a registry host (Docker Hub's, and images built on this machine); an image the
/// registry does not know (a local build tagged with the registry's name); a registry that
/// does not answer (logged, and the cached image is used). Errors: the registry refused (the
/// deploy errors of [`pull_error`]).
async fn check_access(
    docker: &Docker,
    reference: &str,
    secret: Option<&PullSecret>,
) -> Result<(), String> {
    if registry_of(reference) == "docker.io" {
        return Ok(());
    }
    let creds = credentials(secret);
    let had = creds.is_some();
    match docker.inspect_registry_image(reference, creds).await {
        Ok(_) => Ok(()),
        Err(e) if refused(&e) => Err(pull_error(reference, &e, had)),
        Err(e) => {
            tracing::warn!(image = %reference, error = %e, "could not check with the registry that this deployment may pull the image the engine has; using it");
            Ok(())
        }
    }
}

/// Pulls `reference`; errors are deploy errors ([`pull_error`]).
async fn pull(docker: &Docker, reference: &str, secret: Option<&PullSecret>) -> Result<(), String> {
    let (repo, tag) = split_reference(reference);
    let mut opts = CreateImageOptionsBuilder::default().from_image(&repo);
    if let Some(t) = &tag {
        opts = opts.tag(t);
    }
    let creds = credentials(secret);
    let had = creds.is_some();
    let mut s = docker.create_image(Some(opts.build()), None, creds);
    while let Some(item) = s.next().await {
        if let Err(e) = item {
            return Err(pull_error(reference, &e, had));
        }
    }
    Ok(())
}

/// Resolves `reference` to an image id (`sha256:...`) under `policy`, pulling when the
/// policy says so. Errors: deploy errors, prefixed with a Pipecat Cloud code where one applies.
pub async fn resolve(
    docker: &Docker,
    reference: &str,
    policy: PullPolicy,
    secret: Option<&PullSecret>,
) -> Result<String, String> {
    if policy == PullPolicy::Missing {
        if let Some(id) = local_id(docker, reference).await? {
            check_access(docker, reference, secret).await?;
            return Ok(id);
        }
    }
    if policy == PullPolicy::Never {
        return match local_id(docker, reference).await? {
            Some(id) => Ok(id),
            None => Err(format!(
                "{IMAGE_NOT_FOUND}: image {reference} is not on the Docker engine, and the pull policy is never"
            )),
        };
    }
    pull(docker, reference, secret).await?;
    local_id(docker, reference).await?.ok_or_else(|| {
        format!("{IMAGE_NOT_FOUND}: image {reference} is not on the engine after its pull")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_repo_and_tag() {
        assert_eq!(
            split_reference("org/bot:0.3"),
            ("org/bot".into(), Some("0.3".into()))
        );
        assert_eq!(
            split_reference("127.0.0.1:5999/org/agent"),
            ("127.0.0.1:5999/org/agent".into(), Some("latest".into()))
        );
        assert_eq!(
            split_reference("127.0.0.1:5999/org/agent:0.3"),
            ("127.0.0.1:5999/org/agent".into(), Some("0.3".into()))
        );
        assert_eq!(split_reference("a/b@sha256:00").1, None);
        assert_eq!(registry_of("127.0.0.1:5999/org/a:1"), "127.0.0.1:5999");
        assert_eq!(registry_of("org/a:1"), "docker.io");
        assert_eq!(registry_of("ghcr.io/o/a"), "ghcr.io");
    }

    #[test]
    fn engine_errors_map_to_pipecat_cloud_codes() {
        let server = |code: u16, m: &str| Error::DockerResponseServerError {
            status_code: code,
            message: m.into(),
        };
        let cases = [
            (server(404, "manifest for r:0.9 not found: manifest unknown"), false, IMAGE_NOT_FOUND),
            (server(500, "Head \"http://r/v2/m/manifests/0.3\": no basic auth credentials"), false, IMAGE_PULL_UNAUTHORIZED),
            (server(500, "unauthorized: authentication required"), true, IMAGE_PULL_UNAUTHORIZED),
            (server(404, "pull access denied for x, repository does not exist or may require 'docker login'"), false, IMAGE_NOT_FOUND),
            (server(404, "pull access denied for x, repository does not exist or may require 'docker login'"), true, IMAGE_PULL_UNAUTHORIZED),
        ];
        for (e, creds, code) in cases {
            let m = pull_error("r", &e, creds);
            assert!(m.starts_with(code), "{m}");
        }
        let m = pull_error("r", &server(500, "dial tcp: connection refused"), false);
        assert!(m.starts_with("cannot pull image r: "), "{m}");
    }

    #[test]
    fn credentials_come_from_base64_user_password() {
        use base64::Engine;
        let v = base64::engine::general_purpose::STANDARD.encode("cattery:s3:cret");
        let c = credentials(Some(&PullSecret {
            host: "http://127.0.0.1:5999/".into(),
            value: v,
        }))
        .unwrap();
        assert_eq!(c.username.as_deref(), Some("cattery"));
        assert_eq!(c.password.as_deref(), Some("s3:cret"));
        assert_eq!(c.serveraddress.as_deref(), Some("127.0.0.1:5999"));
    }
}
