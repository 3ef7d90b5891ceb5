//! Capturing instance output line by line.
//!
//! An instance writes stdout and stderr to two files in its directory (not pipes: a pipe would
//! break, and SIGPIPE the agent, if the control plane restarted). A tailer reads new bytes as
//! they arrive (every 10 ms while output flows, backing off to 200 ms when idle), cuts them into
//! lines, escapes invalid UTF-8 as `\xNN`, and sends each line with its capture time and
//! attribution. On terminate the tailer drains both files to the end, so the last words of a
//! killed process are kept.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::model::{now_ns, LogLine};

/// Longest line kept as one record; longer ones are split (bytes).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Who a line belongs to. The supervisor sets `session_id` when a warm instance gets a session.
#[derive(Debug, Clone)]
pub struct LogAttribution {
    /// Org.
    pub org: String,
    /// Agent.
    pub agent_id: Uuid,
    /// Deployment.
    pub deployment_id: Uuid,
    /// Instance.
    pub instance_id: Uuid,
    /// Session, once assigned.
    pub session_id: Option<Uuid>,
}

/// Where captured lines go.
#[derive(Clone)]
pub struct LogSink {
    /// Channel to the log writer.
    pub tx: mpsc::UnboundedSender<LogLine>,
    /// Attribution, shared with the supervisor.
    pub attribution: Arc<Mutex<LogAttribution>>,
}

impl LogSink {
    /// Sends one line with the current attribution.
    pub fn send(&self, stream: &'static str, line: String) {
        let a = self.attribution.lock();
        let _ = self.tx.send(LogLine {
            org: a.org.clone(),
            agent_id: a.agent_id,
            deployment_id: Some(a.deployment_id),
            session_id: a.session_id,
            instance_id: Some(a.instance_id),
            ts_ns: now_ns(),
            stream,
            line,
        });
    }
}

/// Escapes bytes as UTF-8 text, with invalid sequences as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

struct Tail {
    path: PathBuf,
    stream: &'static str,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    /// Reads what is new; returns whether anything was read.
    fn poll(&mut self, sink: &LogSink, flush_partial: bool) -> bool {
        let mut got = false;
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    if n > 0 {
                        got = true;
                        self.offset += n as u64;
                        self.partial.extend_from_slice(&buf);
                    }
                }
            }
        }
        let mut start = 0;
        let data = std::mem::take(&mut self.partial);
        for (i, &c) in data.iter().enumerate() {
            if c == b'\n' {
                let mut line = &data[start..i];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                sink.send(self.stream, escape_bytes(line));
                start = i + 1;
            } else if i + 1 - start >= MAX_LINE_BYTES {
                sink.send(self.stream, escape_bytes(&data[start..=i]));
                start = i + 1;
            }
        }
        let rest = &data[start..];
        if flush_partial && !rest.is_empty() {
            sink.send(self.stream, escape_bytes(rest));
        } else {
            self.partial = rest.to_vec();
        }
        got
    }
}

/// Reads offsets saved by a tailer; `None` if absent.
pub fn read_offsets(file: &std::path::Path) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(file).ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Handle to a running tailer.
pub struct Tailer {
    stop: watch::Sender<bool>,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Tailer {
    /// Starts tailing `stdout.log` and `stderr.log` from the given offsets.
    /// After each read the offsets are saved to `offsets_file` (`"<stdout> <stderr>"`), so a
    /// restarted control plane resumes where this one stopped.
    pub fn start(
        stdout: PathBuf,
        stderr: PathBuf,
        offsets: (u64, u64),
        offsets_file: PathBuf,
        sink: LogSink,
    ) -> Tailer {
        let (stop, mut stop_rx) = watch::channel(false);
        let mut tails = [
            Tail {
                path: stdout,
                stream: "stdout",
                offset: offsets.0,
                partial: Vec::new(),
            },
            Tail {
                path: stderr,
                stream: "stderr",
                offset: offsets.1,
                partial: Vec::new(),
            },
        ];
        let handle = tokio::spawn(async move {
            let mut idle = Duration::from_millis(10);
            loop {
                let mut got = false;
                for t in tails.iter_mut() {
                    got |= t.poll(&sink, false);
                }
                if got {
                    let _ = std::fs::write(
                        &offsets_file,
                        format!(
                            "{} {}",
                            tails[0].offset - tails[0].partial.len() as u64,
                            tails[1].offset - tails[1].partial.len() as u64
                        ),
                    );
                }
                idle = if got {
                    Duration::from_millis(10)
                } else {
                    (idle * 2).min(Duration::from_millis(200))
                };
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = stop_rx.changed() => break,
                }
            }
            for t in tails.iter_mut() {
                t.poll(&sink, true);
            }
        });
        Tailer {
            stop,
            done: tokio::sync::Mutex::new(Some(handle)),
        }
    }

    /// Reads both files to the end (partial last lines included) and stops.
    pub async fn drain(&self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.done.lock().await.take() {
            let _ = h.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape_bytes;

    #[test]
    fn escapes_invalid_utf8() {
        assert_eq!(escape_bytes(b"ok \xff\xfe end"), "ok \\xff\\xfe end");
        assert_eq!(escape_bytes("héllo".as_bytes()), "héllo");
    }
}
