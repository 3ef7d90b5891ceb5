//! Capturing instance output line by line.
//!
//! An instance writes stdout and stderr to two files in its directory (not pipes: a pipe would
//! break, and SIGPIPE the agent, if the control plane restarted). A tailer reads new bytes as
//! they arrive (every 10 ms while output flows, backing off to 200 ms when idle), cuts them into
//! lines, escapes invalid UTF-8 as `\xNN`, and sends each line with its capture time and
//! attribution. On terminate the tailer drains both files to the end, so the last words of a
//! killed process are kept.

use std::os::unix::fs::FileExt;
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

/// Bytes read per `pread` while catching up.
const READ_CHUNK: usize = 64 * 1024;

/// Output already captured (and its offset saved) is given back to the file system in steps
/// of this size, by punching a hole over it: a chatty instance that lives for hours keeps at
/// most about this much of its output in memory when instance directories are on a tmpfs
/// (`runtime/process/rundir.rs`). The file's size and offsets stay as they were.
const RELEASE_STEP: u64 = 1 << 20;

struct Tail {
    path: PathBuf,
    /// Kept open for the tailer's life (opened on first use): a poll that finds nothing new is
    /// one `pread`, not an open, a seek, a read and a close.
    file: Option<std::fs::File>,
    stream: &'static str,
    offset: u64,
    partial: Vec<u8>,
    /// Bytes from the start already given back ([`RELEASE_STEP`]).
    released: u64,
}

impl Tail {
    fn new(path: PathBuf, stream: &'static str, offset: u64) -> Tail {
        Tail {
            path,
            file: None,
            stream,
            offset,
            partial: Vec::new(),
            released: 0,
        }
    }

    /// Gives back whole [`RELEASE_STEP`]s of what was read, up to the offset last saved
    /// (`saved`): a restarted server resumes from there and never reads the hole.
    fn release_read(&mut self, saved: u64) {
        let upto = saved & !(RELEASE_STEP - 1);
        if upto <= self.released {
            return;
        }
        if let Some(f) = &self.file {
            use nix::fcntl::{fallocate, FallocateFlags};
            let how = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if fallocate(f, how, 0, upto as i64).is_ok() {
                self.released = upto;
            }
        }
    }

    /// Reads everything after `offset` into `partial`, in [`READ_CHUNK`] pieces.
    fn catch_up(&mut self, f: &std::fs::File) -> std::io::Result<()> {
        loop {
            let start = self.partial.len();
            self.partial.resize(start + READ_CHUNK, 0);
            let r = f.read_at(&mut self.partial[start..], self.offset);
            self.partial.truncate(start + *r.as_ref().unwrap_or(&0));
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(0) => return Ok(()),
                Ok(n) => self.offset += n as u64,
            }
        }
    }

    /// Reads what is new; returns whether anything was read.
    fn poll(&mut self, sink: &LogSink, flush_partial: bool) -> bool {
        let mut got = false;
        if self.file.is_none() {
            // Writable too, to give back what was read (`release_read`).
            self.file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .or_else(|_| std::fs::File::open(&self.path))
                .ok();
        }
        if let Some(f) = self.file.take() {
            // Usually nothing is new: one small read into a stack buffer, so an idle tail
            // keeps no buffer of its own (1,000 sessions are 2,000 tails).
            let mut small = [0u8; 2048];
            let n = loop {
                match f.read_at(&mut small, self.offset) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(n) => break n,
                    Err(_) => break 0,
                }
            };
            if n > 0 {
                got = true;
                self.offset += n as u64;
                self.partial.extend_from_slice(&small[..n]);
                if n == small.len() {
                    // More may be waiting: read it in large chunks.
                    let _ = self.catch_up(&f);
                }
            }
            self.file = Some(f);
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

/// Whether tailers still read. A tailer holds it (shared) while it reads, sends and saves its
/// offsets, so once [`freeze_capture`] returns, every line read is in the log channel and every
/// saved offset names only lines sent.
static CAPTURING: parking_lot::RwLock<bool> = parking_lot::const_rwlock(true);

/// Stops every tailer of this process from reading (the server is detaching: the next server
/// resumes from the saved offsets). Returns once no tailer is mid-read.
pub fn freeze_capture() {
    *CAPTURING.write() = false;
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
            Tail::new(stdout, "stdout", offsets.0),
            Tail::new(stderr, "stderr", offsets.1),
        ];
        let handle = tokio::spawn(async move {
            let mut idle = Duration::from_millis(10);
            loop {
                let mut got = false;
                {
                    let capturing = CAPTURING.read();
                    if *capturing {
                        for t in tails.iter_mut() {
                            got |= t.poll(&sink, false);
                        }
                    }
                    if got {
                        let saved = tails.each_ref().map(|t| t.offset - t.partial.len() as u64);
                        if std::fs::write(&offsets_file, format!("{} {}", saved[0], saved[1]))
                            .is_ok()
                        {
                            for (t, s) in tails.iter_mut().zip(saved) {
                                t.release_read(s);
                            }
                        }
                    }
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
            let capturing = CAPTURING.read();
            if *capturing {
                for t in tails.iter_mut() {
                    t.poll(&sink, true);
                }
            }
            drop(capturing);
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
    use super::*;

    #[tokio::test]
    async fn tails_lines_partial_lines_and_the_rest_on_drain() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
        let mut o = std::fs::File::create(&out).unwrap();
        let mut e = std::fs::File::create(&err).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = LogSink {
            tx,
            attribution: Arc::new(Mutex::new(LogAttribution {
                org: "o".into(),
                agent_id: Uuid::nil(),
                deployment_id: Uuid::nil(),
                instance_id: Uuid::nil(),
                session_id: None,
            })),
        };
        o.write_all(b"skipped\n").unwrap();
        let tailer = Tailer::start(out, err, (8, 0), dir.path().join("offsets"), sink);
        o.write_all(b"one\r\ntw").unwrap();
        e.write_all(b"err \xff\n").unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let l = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            got.push((l.stream, l.line));
        }
        got.sort();
        assert_eq!(
            got,
            [
                ("stderr", "err \\xff".to_string()),
                ("stdout", "one".to_string())
            ]
        );
        // The partial line waits for its end; a big write arrives whole.
        let big = "x".repeat(100_000);
        o.write_all(format!("o\n{big}\nlast").as_bytes()).unwrap();
        let l = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.line, "two");
        let mut lens = 0;
        while lens < big.len() {
            let l = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(l.line.len() <= MAX_LINE_BYTES);
            lens += l.line.len();
        }
        assert_eq!(lens, big.len());
        tailer.drain().await;
        assert_eq!(rx.recv().await.unwrap().line, "last");
        let offsets = read_offsets(&dir.path().join("offsets")).unwrap();
        assert_eq!(offsets, (8 + 7 + 2 + 100_001, 6), "complete lines only");
    }

    #[test]
    fn escapes_invalid_utf8() {
        assert_eq!(escape_bytes(b"ok \xff\xfe end"), "ok \\xff\\xfe end");
        assert_eq!(escape_bytes("héllo".as_bytes()), "héllo");
    }

    #[tokio::test]
    async fn captured_output_is_given_back_and_offsets_stay() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
        let mut o = std::fs::File::create(&out).unwrap();
        std::fs::File::create(&err).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = LogSink {
            tx,
            attribution: Arc::new(Mutex::new(LogAttribution {
                org: "o".into(),
                agent_id: Uuid::nil(),
                deployment_id: Uuid::nil(),
                instance_id: Uuid::nil(),
                session_id: None,
            })),
        };
        let tailer = Tailer::start(out.clone(), err, (0, 0), dir.path().join("offsets"), sink);
        let line = format!("{}\n", "y".repeat(1023));
        let lines = 3 * 1024 + 10;
        for _ in 0..lines {
            o.write_all(line.as_bytes()).unwrap();
        }
        o.sync_all().unwrap();
        for _ in 0..lines {
            let l = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(l.line.len(), 1023);
        }
        // The next poll saves the offsets and punches the hole: wait for it.
        let total = (lines * 1024) as u64;
        let t = std::time::Instant::now();
        loop {
            let m = std::fs::metadata(&out).unwrap();
            assert_eq!(m.len(), total, "the size stays");
            if m.blocks() * 512 < 2 << 20 || t.elapsed() > Duration::from_secs(5) {
                assert!(
                    m.blocks() * 512 < 2 << 20,
                    "{} bytes still allocated",
                    m.blocks() * 512
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Later output is still captured after the hole.
        o.write_all(b"after\n").unwrap();
        let l = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.line, "after");
        tailer.drain().await;
        let offsets = read_offsets(&dir.path().join("offsets")).unwrap();
        assert_eq!(offsets.0, total + 6);
    }
}
