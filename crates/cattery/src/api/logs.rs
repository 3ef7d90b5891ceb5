//! Agent logs (reference §A.4 and §E): `GET /v1/agents/{name}/logs` and the CLI's
//! `GET /v1/organizations/{org}/services/{name}/logs`.
//!
//! Every line an instance writes to stdout or stderr is kept with its capture time, stream,
//! deployment, instance and (once assigned) session; `stream: "platform"` lines are Cattery's
//! own records (instance started, session delivered, how a session ended). Retention:
//! `--log-retention-days` (age) and `--log-retention-max-lines` (size); see `docs/logs.md`.
//!
//! Query parameters, all optional:
//!
//! | name | meaning | default |
//! |---|---|---|
//! | `limit` | page size, 1 to [`MAX_LIMIT`] | 10 |
//! | `offset` | lines to skip | 0 |
//! | `order` | `asc` or `desc` by time | `desc` (newest first) |
//! | `deploymentId`, `sessionId` | only lines of that deployment / session (UUIDs) | |
//! | `query` | only lines containing this text (case-sensitive) | |
//! | `startTime`, `endTime` | only lines captured in `[startTime, endTime]`, Unix seconds (an integer `endTime` includes its whole second) | |
//!
//! Answer: `{"total": {"value", "relation": "eq"}, "logs": [{"log", "timestamp" (ISO-8601,
//! ns), "deploymentId", "sessionId", "instanceId", "stream"}]}`. Invalid parameters answer
//! 400 `{error, code: "GENERIC_BAD_REQUEST"}`; an unknown agent 404 `NOT_FOUND`.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use uuid::Uuid;

use super::auth::{OrgAuth, PrivateAuth};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::schema::{LogItem, LogPage, LogTotal};
use super::{ApiPath, AppState};
use crate::core::lookup;
use crate::store::LogFilter;

/// Largest `limit`.
pub const MAX_LIMIT: i64 = 10_000;
/// Default `limit` (reference §A.4).
pub const DEFAULT_LIMIT: i64 = 10;
/// Latest accepted `startTime`/`endTime` (Unix s): beyond it nanoseconds overflow 64 bits.
const MAX_UNIX_S: f64 = 9_000_000_000.0;

fn bad(msg: String) -> ApiError {
    ApiError::bad_request(msg)
}

/// Query parameter `k` as an integer in `min..=max` (`default` when absent). Errors: 400
/// naming the parameter and its range.
fn count(
    q: &HashMap<String, String>,
    k: &str,
    default: i64,
    (min, max): (i64, i64),
) -> ApiResult<i64> {
    match q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "{k} must be an integer between {min} and {max}, not {v:?}"
                ))
            }),
    }
}

/// Parses a Unix-seconds time into ns: `(start of it, end of it)`; an integer covers its
/// whole second.
fn unix_time(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<(i64, i64)>> {
    let Some(v) = q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let invalid = || {
        bad(format!(
            "Invalid timestamp format: {k} must be Unix seconds (e.g. 1735689600), not {v:?}"
        ))
    };
    if let Ok(s) = v.parse::<i64>() {
        if !(0..=MAX_UNIX_S as i64).contains(&s) {
            return Err(invalid());
        }
        return Ok(Some((s * 1_000_000_000, s * 1_000_000_000 + 999_999_999)));
    }
    if let Some(ns) = decimal_ns(v) {
        if !(0..=MAX_UNIX_S as i64 * 1_000_000_000).contains(&ns) {
            return Err(invalid());
        }
        return Ok(Some((ns, ns)));
    }
    let f = v.parse::<f64>().map_err(|_| invalid())?;
    if !f.is_finite() || !(0.0..=MAX_UNIX_S).contains(&f) {
        return Err(invalid());
    }
    let ns = (f * 1e9) as i64;
    Ok(Some((ns, ns)))
}

/// `<seconds>.<fraction>` as exact nanoseconds (digits past the ninth dropped), or `None`
/// for any other form. A line's own timestamp given back as `startTime` (to follow the logs
/// from it) then finds that line: through an `f64` it could land up to a few hundred ns later.
fn decimal_ns(v: &str) -> Option<i64> {
    let (secs, frac) = v.split_once('.')?;
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if secs.is_empty() || secs.len() > 12 || !digits(secs) || !digits(frac) {
        return None;
    }
    let nanos: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    Some(secs.parse::<i64>().ok()? * 1_000_000_000 + nanos.parse::<i64>().ok()?)
}

fn uuid_param(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<Uuid>> {
    match q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(v) => Uuid::parse_str(v)
            .map(Some)
            .map_err(|_| bad(format!("{k} must be a UUID, not {v:?}"))),
    }
}

/// Turns the query string into a [`LogFilter`]. Errors: 400 naming the parameter.
pub fn parse_filter(q: &HashMap<String, String>) -> ApiResult<LogFilter> {
    let limit = count(q, "limit", DEFAULT_LIMIT, (1, MAX_LIMIT))?;
    let desc = match q
        .get("order")
        .map(|s| s.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("desc") => true,
        Some("asc") => false,
        Some(o) => return Err(bad(format!("order must be asc or desc, not {o:?}"))),
    };
    let start = unix_time(q, "startTime")?;
    let end = unix_time(q, "endTime")?;
    if let (Some(s), Some(e)) = (start, end) {
        if s.0 > e.1 {
            return Err(bad("startTime must not be after endTime".into()));
        }
    }
    Ok(LogFilter {
        limit,
        offset: count(q, "offset", 0, (0, i64::MAX / 2))?,
        desc,
        deployment_id: uuid_param(q, "deploymentId")?,
        session_id: uuid_param(q, "sessionId")?,
        instance_id: None,
        query: q.get("query").filter(|s| !s.is_empty()).cloned(),
        start_ns: start.map(|s| s.0),
        end_ns: end.map(|e| e.1),
    })
}

async fn logs_in(
    st: &AppState,
    org: &str,
    name: &str,
    q: &HashMap<String, String>,
) -> ApiResult<Json<LogPage>> {
    let f = parse_filter(q)?;
    let agent = lookup::agent_or_deleted(&st.store, org, name)
        .await
        .map_err(|e| ApiError::from(e).with_not_found_code("NOT_FOUND"))?;
    let (total, lines) = lookup::logs_of(&st.store, &agent, &f).await?;
    Ok(Json(LogPage {
        logs: lines.iter().map(LogItem::of).collect(),
        total: LogTotal {
            relation: "eq",
            value: total,
        },
    }))
}

/// Get an agent's logs.
#[utoipa::path(get, path = "/v1/agents/{agent_name}/logs", tag = "agents", operation_id = "agent_logs",
    params(("agent_name" = String, Path, description = "Agent name"),
           ("limit" = Option<i64>, Query, description = "page size, 1..=10000, default 10"),
           ("offset" = Option<i64>, Query, description = "lines to skip"),
           ("order" = Option<String>, Query, description = "asc | desc (default)"),
           ("deploymentId" = Option<String>, Query, description = "only this deployment"),
           ("sessionId" = Option<String>, Query, description = "only this session"),
           ("query" = Option<String>, Query, description = "only lines containing this text"),
           ("startTime" = Option<i64>, Query, description = "captured at or after (Unix s)"),
           ("endTime" = Option<i64>, Query, description = "captured at or before (Unix s)")),
    responses((status = 200, description = "{\"total\": {value, relation}, \"logs\": [{log, timestamp, deploymentId, sessionId, stream}]}", body = LogPage),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("PrivateKeyAuth" = [])))]
pub async fn agent_logs(
    State(st): State<AppState>,
    PrivateAuth(c): PrivateAuth,
    ApiPath(name): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<LogPage>> {
    logs_in(&st, &c.org, &name, &q).await
}

/// `GET /v1/organizations/{org}/services/{name}/logs`.
pub async fn org_agent_logs(
    State(st): State<AppState>,
    OrgAuth(c): OrgAuth,
    ApiPath((_org, name)): ApiPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<LogPage>> {
    logs_in(&st, &c.org, &name, &q).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_ranges() {
        let f = parse_filter(&q(&[])).unwrap();
        assert_eq!((f.limit, f.offset, f.desc), (DEFAULT_LIMIT, 0, true));
        let f = parse_filter(&q(&[("order", "ASC"), ("limit", "100"), ("offset", "5")])).unwrap();
        assert_eq!((f.limit, f.offset, f.desc), (100, 5, false));
        let f = parse_filter(&q(&[("startTime", "10"), ("endTime", "20")])).unwrap();
        assert_eq!(f.start_ns, Some(10_000_000_000));
        assert_eq!(f.end_ns, Some(20_999_999_999));
        let f = parse_filter(&q(&[("startTime", "10.5")])).unwrap();
        assert_eq!(f.start_ns, Some(10_500_000_000));
        // A line's timestamp given back to the nanosecond is that nanosecond (an f64 has
        // about 256 ns of precision at today's times: this one became 37 ns later, past the
        // line), so following the logs from it finds it.
        let f = parse_filter(&q(&[("startTime", "1796603448.523934683")])).unwrap();
        assert_eq!(f.start_ns, Some(1_796_603_448_523_934_683));
        let f = parse_filter(&q(&[("startTime", "1796603448.6191194299")])).unwrap();
        assert_eq!(f.start_ns, Some(1_796_603_448_619_119_429));
        let f = parse_filter(&q(&[("startTime", "1796603448.")])).unwrap();
        assert_eq!(f.start_ns, Some(1_796_603_448_000_000_000));
        let f = parse_filter(&q(&[("startTime", "1.7e9")])).unwrap();
        assert_eq!(f.start_ns, Some(1_700_000_000_000_000_000));
    }

    #[test]
    fn invalid_params_are_400() {
        for bad in [
            ("limit", "0"),
            ("limit", "-1"),
            ("limit", "10001"),
            ("limit", "ten"),
            ("offset", "-3"),
            ("order", "up"),
            ("sessionId", "nope"),
            ("deploymentId", "1234"),
            ("startTime", "yesterday"),
            ("startTime", "-5"),
            ("endTime", "1e300"),
            ("endTime", "9000000001.5"),
            ("startTime", "1.2.3"),
        ] {
            let e = parse_filter(&q(&[bad])).unwrap_err();
            assert_eq!(e.status, 400, "{bad:?}");
        }
        let e = parse_filter(&q(&[("startTime", "20"), ("endTime", "10")])).unwrap_err();
        assert_eq!(e.status, 400);
    }
}
