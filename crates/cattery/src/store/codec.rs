//! Stored forms shared by the backends: end reasons and resource samples as text.

use crate::model::{EndReason, MetricSample};

/// An end reason from its stored name (an unknown name reads as `error`).
pub(crate) fn end_reason(s: &str) -> EndReason {
    match s {
        "completed" => EndReason::Completed,
        "stopped" => EndReason::Stopped,
        "stopped_during_start" => EndReason::StoppedDuringStart,
        "max_duration" => EndReason::MaxDuration,
        "start_failed" => EndReason::StartFailed,
        "client_disconnected" => EndReason::ClientDisconnected,
        "drained" => EndReason::Drained,
        "lost" => EndReason::Lost,
        "out_of_memory" => EndReason::OutOfMemory,
        "client_never_connected" => EndReason::ClientNeverConnected,
        _ => EndReason::Error,
    }
}

/// Stored form of samples: a JSON array of `{"t", "c", "m"}`.
pub(crate) fn samples_json(samples: &[MetricSample]) -> String {
    let v: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| serde_json::json!({"t": s.t, "c": s.cpu_millicores, "m": s.memory_bytes}))
        .collect();
    serde_json::Value::from(v).to_string()
}

/// Samples from their stored form (an unreadable entry is skipped).
pub(crate) fn samples_of(text: &str) -> Vec<MetricSample> {
    let Ok(serde_json::Value::Array(a)) = serde_json::from_str(text) else {
        return Vec::new();
    };
    a.iter()
        .filter_map(|e| {
            Some(MetricSample {
                t: e["t"].as_i64()?,
                cpu_millicores: e["c"].as_u64()?,
                memory_bytes: e["m"].as_u64()?,
            })
        })
        .collect()
}

/// Free text as stored (log lines, end messages, build errors; a log query alike, so it finds
/// them): a NUL byte, which PostgreSQL's text cannot hold (the whole statement fails, and with
/// it every line of a batch, whichever org's), becomes `\x00`, as the runtimes show bytes that
/// are not text. Every backend stores the same form.
pub(crate) fn storable_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\\x00"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}
