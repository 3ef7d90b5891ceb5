//! The texts the official CLI prints through rich's markup, made to print whole.
//!
//! `pipecat cloud` (and the legacy `pcc`) print much of what the API answers inside rich
//! markup (`console.print(f"...{text}")`, `console.error`, `Panel`), where a `[word]` of the
//! text is read as a tag: `pipecat-ai[runner]` prints as `pipecat-ai`, and a closing tag that
//! matches none (`[/bin/sh -c ...]`, Docker Engine 20.10's failed step) stops the CLI with a
//! `MarkupError` traceback. So, for a request from the CLI (its `User-Agent`,
//! `PipecatCloudCLI/<version>`), every field it prints that way is escaped as rich's own
//! `rich.markup.escape` does (`\[runner]`, which rich prints as `[runner]`), here and nowhere
//! else. The fields, read from the CLI's source (pipecatcloud 1.4 and 0.7.2):
//!
//! - an error body's `error` and `message` (`api_error`, every command);
//! - a build's `errorMessage` (`deploy`'s `Build failed: ...`, `build status`);
//! - an agent's `errors[].message` / `.error`, its revisions' `health` (`reason`, `message`,
//!   `headline`, `lastTerminationReason`) and `conditions[].message` / `.reason` (`agent
//!   status`, `deploy`'s wait);
//! - a deploy's `warning`;
//! - each line of `build logs` (`{"logs": [line]}`) that the CLI prints as markup: the ones
//!   naming none of `error`, `failed`, `warning`, `success`, `complete` (those it prints as
//!   plain, styled text).
//!
//! Agent logs (`{"logs": [{"log", ...}]}`) and tables in plain output are printed as they
//! are, and other clients (the dashboard, `curl`) get every text unchanged. The pipecatcloud
//! SDK sends the CLI's `User-Agent` too: its `AgentStartError` then shows the escaped text.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// The `User-Agent` prefix of the official CLI (and of the SDK, which shares its client).
const CLI_AGENT: &str = "PipecatCloudCLI/";

/// `text` as `rich.markup.escape` writes it: a backslash before each `[` that opens what
/// rich would read as a tag (`[` then a lowercase letter, `#`, `/` or `@`, up to the next
/// `]` with no `[` between), the backslashes already before it doubled; and a trailing odd
/// backslash doubled, so it escapes nothing the CLI writes after the text.
pub fn rich_escape(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 8);
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        let opens_tag = b[i] == b'['
            && b.get(i + 1)
                .is_some_and(|c| c.is_ascii_lowercase() || b"#/@".contains(c));
        let closes = opens_tag
            .then(|| b[i + 1..].iter().position(|&c| c == b']' || c == b'['))
            .flatten()
            .filter(|&j| b[i + 1 + j] == b']');
        let Some(j) = closes else {
            i += 1;
            continue;
        };
        let mut run = i;
        while run > copied && b[run - 1] == b'\\' {
            run -= 1;
        }
        out.push_str(&text[copied..i]);
        out.push_str(&text[run..i]);
        out.push('\\');
        out.push_str(&text[i..i + 2 + j]);
        i += 2 + j;
        copied = i;
    }
    out.push_str(&text[copied..]);
    if out.ends_with('\\') && !out.ends_with("\\\\") {
        out.push('\\');
    }
    out
}

/// Whether a request comes from the official CLI.
fn from_the_cli(headers: &HeaderMap) -> bool {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with(CLI_AGENT))
}

/// Escapes in `body` (an answer's JSON; `failed`: an error's) each field the CLI prints
/// through markup (the module's list).
pub fn escape_for_the_cli(body: &mut Value, failed: bool) {
    let Some(top) = body.as_object_mut() else {
        return;
    };
    let keys: &[&str] = if failed {
        &["error", "message"]
    } else {
        &["warning"]
    };
    escape_keys(top, keys);
    if let Some(Value::Array(lines)) = top.get_mut("logs") {
        for line in lines {
            if let Value::String(s) = line {
                if printed_as_markup(s) {
                    *s = rich_escape(s);
                }
            }
        }
    }
    escape_nested(body);
}

/// Whether the CLI's `build logs` prints `line` as markup (else as a styled `Text`).
fn printed_as_markup(line: &str) -> bool {
    let l = line.to_lowercase();
    !["error", "failed", "warning", "success", "complete"]
        .iter()
        .any(|w| l.contains(w))
}

/// Escapes the string values of `keys` in `o`.
fn escape_keys(o: &mut serde_json::Map<String, Value>, keys: &[&str]) {
    for k in keys {
        if let Some(Value::String(s)) = o.get_mut(*k) {
            *s = rich_escape(s);
        }
    }
}

/// Escapes, at any depth of `v`, every `errorMessage`, the texts of `errors` and
/// `conditions` items, and those of a `health`.
fn escape_nested(v: &mut Value) {
    match v {
        Value::Object(o) => {
            escape_keys(o, &["errorMessage"]);
            for (k, item_keys) in [
                ("errors", &["message", "error"][..]),
                ("conditions", &["message", "reason"][..]),
            ] {
                if let Some(Value::Array(items)) = o.get_mut(k) {
                    for item in items.iter_mut().filter_map(Value::as_object_mut) {
                        escape_keys(item, item_keys);
                    }
                }
            }
            if let Some(Value::Object(h)) = o.get_mut("health") {
                escape_keys(
                    h,
                    &["reason", "message", "headline", "lastTerminationReason"],
                );
            }
            o.values_mut().for_each(escape_nested);
        }
        Value::Array(items) => items.iter_mut().for_each(escape_nested),
        _ => {}
    }
}

/// Middleware: the answer to a request from the official CLI, with what it prints through
/// markup escaped ([`escape_for_the_cli`]). Other answers, and answers that are not JSON,
/// pass as they are.
pub async fn for_the_cli(req: Request, next: Next) -> Response {
    if !from_the_cli(req.headers()) {
        return next.run(req).await;
    }
    let res = next.run(req).await;
    let json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !json {
        return res;
    }
    let failed = !res.status().is_success();
    let (mut parts, body) = res.into_parts();
    // The answer's JSON is already in memory (the API's handlers answer `Json`).
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return super::error::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "500",
            "the answer could not be read",
        )
        .into_response();
    };
    let out = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut v) => {
            escape_for_the_cli(&mut v, failed);
            serde_json::to_vec(&v).map_or(bytes, Into::into)
        }
        Err(_) => bytes,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same as `rich.markup.escape` (rich 13.9), case by case.
    #[test]
    fn escapes_as_rich_does() {
        for (text, want) in [
            ("pipecat-ai[runner]", "pipecat-ai\\[runner]"),
            (
                "executor failed running [/bin/sh -c x]: exit code: 2",
                "executor failed running \\[/bin/sh -c x]: exit code: 2",
            ),
            ("#5 [2/3] RUN x [", "#5 [2/3] RUN x ["),
            ("[Bold] [@x] [#f00] [ a]", "[Bold] \\[@x] \\[#f00] [ a]"),
            ("[a [b] c", "[a \\[b] c"),
            ("a\\[b]", "a\\\\\\[b]"),
            ("ends in \\", "ends in \\\\"),
            ("ends in \\\\", "ends in \\\\"),
            ("[x]\\[y]", "\\[x]\\\\\\[y]"),
            ("é[ü] [ü]", "é[ü] [ü]"),
            ("no brackets", "no brackets"),
        ] {
            assert_eq!(rich_escape(text), want, "{text:?}");
        }
    }

    #[test]
    fn only_the_fields_the_cli_prints_as_markup_are_escaped() {
        let mut err = serde_json::json!({"error": "a [x] b", "code": "[x]", "message": "[y]"});
        escape_for_the_cli(&mut err, true);
        assert_eq!(
            err,
            serde_json::json!({"error": "a \\[x] b", "code": "[x]", "message": "\\[y]"})
        );
        let mut agent = serde_json::json!({
            "name": "n", "image": "i[x]", "warning": "[w]",
            "errors": [{"code": "PCC_X", "message": "m[x]"}],
            "conditions": [{"type": "Degraded", "message": "[c]", "reason": "[r]"}],
            "currentRevision": {"health": {"reason": "[r]", "message": "[m]", "state": "[s]"}},
            "build": {"errorMessage": "pipecat-ai[runner]", "id": "[id]"},
        });
        escape_for_the_cli(&mut agent, false);
        assert_eq!(
            agent,
            serde_json::json!({
                "name": "n", "image": "i[x]", "warning": "\\[w]",
                "errors": [{"code": "PCC_X", "message": "m\\[x]"}],
                "conditions": [{"type": "Degraded", "message": "\\[c]", "reason": "\\[r]"}],
                "currentRevision": {"health": {"reason": "\\[r]", "message": "\\[m]", "state": "[s]"}},
                "build": {"errorMessage": "pipecat-ai\\[runner]", "id": "[id]"},
            })
        );
        // Build logs: the lines the CLI prints as markup; agent logs' items are objects.
        let mut logs =
            serde_json::json!({"logs": ["Collecting a[b]", "ERROR: a[b]", "Build complete [x]"]});
        escape_for_the_cli(&mut logs, false);
        assert_eq!(
            logs,
            serde_json::json!({"logs": ["Collecting a\\[b]", "ERROR: a[b]", "Build complete [x]"]})
        );
        let mut agent_logs = serde_json::json!({"logs": [{"log": "[x]", "message": "[x]"}]});
        escape_for_the_cli(&mut agent_logs, false);
        assert_eq!(
            agent_logs,
            serde_json::json!({"logs": [{"log": "[x]", "message": "[x]"}]})
        );
    }
}
