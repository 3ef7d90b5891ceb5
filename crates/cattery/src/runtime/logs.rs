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

/// How much of an instance's output is captured per second, on average: `lines` lines and
/// `bytes` bytes (`--log-rate-lines`, `--log-rate-bytes`; 0 = no limit). An instance may
/// write [`LOG_RATE_BURST_SECONDS`] seconds' worth at once; past that its lines are dropped
/// (and a tailer skips what waits unread) until the budget refills, and a `platform` line
/// says how much was dropped. One org's chatty or flooding instance so cannot fill the
/// server's memory, hold every other org's lines back behind its own in the store's queue,
/// or push their lines out of the retention cap at the store's full speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRate {
    /// Lines per second; 0: no limit.
    pub lines: u64,
    /// Bytes per second (of the stored text); 0: no limit.
    pub bytes: u64,
}

impl LogRate {
    /// No limit (tests, and `0` for both settings).
    pub const UNLIMITED: LogRate = LogRate { lines: 0, bytes: 0 };
    /// The defaults: 1,000 lines and 1 MiB a second.
    pub const DEFAULT: LogRate = LogRate {
        lines: 1000,
        bytes: 1 << 20,
    };
}

/// How many seconds of its [`LogRate`] an instance may write in one burst.
pub const LOG_RATE_BURST_SECONDS: f64 = 10.0;

/// An instance's budget against its [`LogRate`] (two token buckets), and what was dropped
/// since the last note.
#[derive(Debug)]
struct LogBudget {
    rate: LogRate,
    lines: f64,
    bytes: f64,
    at: std::time::Instant,
    dropped_lines: u64,
    dropped_bytes: u64,
    /// When the last note was sent.
    noted: Option<std::time::Instant>,
}

/// At most one note of dropped output per instance this often (and one when its output ends).
const NOTE_EVERY: Duration = Duration::from_secs(10);

impl LogBudget {
    fn new(rate: LogRate) -> LogBudget {
        LogBudget {
            rate,
            lines: rate.lines as f64 * LOG_RATE_BURST_SECONDS,
            bytes: rate.bytes as f64 * LOG_RATE_BURST_SECONDS,
            at: std::time::Instant::now(),
            dropped_lines: 0,
            dropped_bytes: 0,
            noted: None,
        }
    }

    fn refill(&mut self) {
        let now = std::time::Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        let fill =
            |v: f64, rate: u64| (v + dt * rate as f64).min(rate as f64 * LOG_RATE_BURST_SECONDS);
        self.lines = fill(self.lines, self.rate.lines);
        self.bytes = fill(self.bytes, self.rate.bytes);
    }

    /// Whether a line may be captured now (a long line may take the byte budget below 0: it
    /// is paid back before the next one).
    fn open(&mut self) -> bool {
        self.refill();
        (self.rate.lines == 0 || self.lines >= 1.0) && (self.rate.bytes == 0 || self.bytes > 0.0)
    }

    fn take(&mut self, len: usize) -> bool {
        if !self.open() {
            self.dropped_lines += 1;
            self.dropped_bytes += len as u64;
            return false;
        }
        self.lines -= 1.0;
        self.bytes -= len as f64;
        true
    }

    /// The note for what was dropped since the last one, if anything was and the last note
    /// is [`NOTE_EVERY`] old (or `now`).
    fn note(&mut self, now: bool) -> Option<String> {
        if self.dropped_lines == 0 && self.dropped_bytes == 0 {
            return None;
        }
        if !now && self.noted.is_some_and(|t| t.elapsed() < NOTE_EVERY) {
            return None;
        }
        self.noted = Some(std::time::Instant::now());
        let (lines, bytes) = (self.dropped_lines, self.dropped_bytes);
        self.dropped_lines = 0;
        self.dropped_bytes = 0;
        let r = self.rate;
        let limit = |v: u64, unit: &str| {
            if v == 0 {
                "no limit".to_string()
            } else {
                format!("{v} {unit}/s")
            }
        };
        Some(format!(
            "[cattery] {lines} line(s), {bytes} byte(s) of this instance's output dropped: over \
             the log rate limit ({} and {}, bursts of {LOG_RATE_BURST_SECONDS} s; \
             --log-rate-lines, --log-rate-bytes)",
            limit(r.lines, "lines"),
            limit(r.bytes, "bytes"),
        ))
    }
}

/// Captured lines waiting for the log writer, all instances together: past
/// [`MAX_QUEUED_LINES`] a line is dropped (and counted in `cattery_log_lines_dropped_total`)
/// instead of queued, so a store that cannot keep up with every instance's output together
/// costs lines, never the server's memory. Counted by [`LogSink::send_bytes`] and the writer's
/// [`LogSink::written`].
static QUEUED_LINES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// See [`QUEUED_LINES`]: about 100 MiB of lines of 1 KiB.
pub const MAX_QUEUED_LINES: usize = 100_000;

/// What the store holds of an instance's output when it is adopted after a restart: the
/// latest second (unix s) one of its stored `stdout`/`stderr` lines is stamped in, and how
/// many of its stored lines are stamped in that second and in the one before. A runtime whose
/// lines carry the time they were written (a container engine's stamps) resumes its capture
/// right after them: no line twice, none lost (`runtime/docker/container.rs`, `LogResume`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredTail {
    /// The latest second a stored line is stamped in; `None`: none is stored.
    pub second: Option<i64>,
    /// Stored lines stamped in `second`.
    pub in_second: usize,
    /// Stored lines stamped in the second before `second`.
    pub in_before: usize,
}

impl StoredTail {
    /// From the stamps (ns) of an instance's stored output lines: all of them, or at least
    /// every one from the second before the latest.
    pub fn of(stamps: impl IntoIterator<Item = i64> + Clone) -> StoredTail {
        let sec = |ts: i64| ts.div_euclid(1_000_000_000);
        let Some(second) = stamps.clone().into_iter().map(sec).max() else {
            return StoredTail::default();
        };
        let count = |s: i64| stamps.clone().into_iter().filter(|&t| sec(t) == s).count();
        StoredTail {
            second: Some(second),
            in_second: count(second),
            in_before: count(second - 1),
        }
    }
}

/// Where captured lines go.
#[derive(Clone)]
pub struct LogSink {
    /// Channel to the log writer.
    pub tx: mpsc::UnboundedSender<LogLine>,
    /// Attribution, shared with the supervisor.
    pub attribution: Arc<Mutex<LogAttribution>>,
    /// The instance's budget against its [`LogRate`].
    budget: Arc<Mutex<LogBudget>>,
    /// What the store held of the instance's output when it was adopted (`None`: a new
    /// instance, or the store could not say).
    stored: Option<StoredTail>,
}

impl LogSink {
    /// A sink for one instance's lines, at most `rate`.
    pub fn new(
        tx: mpsc::UnboundedSender<LogLine>,
        attribution: Arc<Mutex<LogAttribution>>,
        rate: LogRate,
    ) -> LogSink {
        LogSink {
            tx,
            attribution,
            budget: Arc::new(Mutex::new(LogBudget::new(rate))),
            stored: None,
        }
    }

    /// This sink, for an adopted instance of whose output the store holds `stored`.
    pub fn resuming(mut self, stored: StoredTail) -> LogSink {
        self.stored = Some(stored);
        self
    }

    /// What the store held of the instance's output when it was adopted, if known.
    pub fn stored(&self) -> Option<StoredTail> {
        self.stored
    }

    /// A sink into `tx` for lines of no particular instance (org `o`, nil ids), at `rate`:
    /// for tests.
    #[cfg(test)]
    pub(crate) fn of_no_instance(tx: mpsc::UnboundedSender<LogLine>, rate: LogRate) -> LogSink {
        LogSink::new(
            tx,
            Arc::new(Mutex::new(LogAttribution {
                org: "o".into(),
                agent_id: Uuid::nil(),
                deployment_id: Uuid::nil(),
                instance_id: Uuid::nil(),
                session_id: None,
            })),
            rate,
        )
    }

    /// Sends one line of `stream` (its raw bytes, escaped by [`escape_bytes`]) with the
    /// current attribution, if the instance's budget allows it (else it is counted, for the
    /// next note) and the writer's queue has room.
    pub fn send_bytes(&self, stream: &'static str, line: &[u8]) {
        self.send_bytes_at(stream, line, None)
    }

    /// [`LogSink::send_bytes`], stamped `ts_ns` (the time the instance wrote it, when the
    /// runtime knows it: a container engine's stamp) rather than the time it is captured.
    pub fn send_bytes_at(&self, stream: &'static str, line: &[u8], ts_ns: Option<i64>) {
        let note = {
            let mut b = self.budget.lock();
            if !b.take(line.len()) {
                return;
            }
            b.note(false)
        };
        if let Some(n) = note {
            self.queue("platform", n, None);
        }
        self.queue(stream, escape_bytes(line), ts_ns);
    }

    /// Whether the instance's budget lets a line through now: a tailer skips what waits
    /// unread while it does not.
    pub fn open(&self) -> bool {
        self.budget.lock().open()
    }

    /// How much a tail may read at once: [`READ_MAX`], or [`READ_CHUNK`] while the instance
    /// is over its rate (it dropped output since its last note), so that a flood costs the
    /// server a small read and a skip per poll, not a large read cut into lines it drops.
    fn read_allowance(&self) -> usize {
        let b = self.budget.lock();
        if b.dropped_lines > 0 || b.dropped_bytes > 0 {
            READ_CHUNK
        } else {
            READ_MAX
        }
    }

    /// Counts `bytes` of output skipped unread as dropped.
    fn skipped(&self, bytes: u64) {
        self.budget.lock().dropped_bytes += bytes;
    }

    /// Sends the note for what was dropped since the last one, whatever the budget (the
    /// instance's output ends).
    pub fn flush_note(&self) {
        let note = self.budget.lock().note(true);
        if let Some(n) = note {
            self.queue("platform", n, None);
        }
    }

    fn queue(&self, stream: &'static str, line: String, ts_ns: Option<i64>) {
        use std::sync::atomic::Ordering;
        if QUEUED_LINES.load(Ordering::Relaxed) >= MAX_QUEUED_LINES {
            crate::telemetry::log_lines_dropped(1);
            return;
        }
        let a = self.attribution.lock();
        let sent = self.tx.send(LogLine {
            org: a.org.clone(),
            agent_id: a.agent_id,
            deployment_id: Some(a.deployment_id),
            session_id: a.session_id,
            instance_id: Some(a.instance_id),
            ts_ns: ts_ns.unwrap_or_else(now_ns),
            stream,
            line,
        });
        if sent.is_ok() {
            QUEUED_LINES.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The writer took `n` lines off the channel. Lines sent by others than a sink (the
    /// platform's own) are not counted, so the count never goes below 0.
    pub fn written(n: usize) {
        use std::sync::atomic::Ordering;
        let _ = QUEUED_LINES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
            Some(q.saturating_sub(n))
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

/// Most bytes one poll of a tail reads (a backlog is read over several polls, 10 ms apart):
/// bounds what a tailer holds in memory at once.
const READ_MAX: usize = 4 << 20;

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
    /// Whether the last poll read to the end of the file.
    at_end: bool,
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
            at_end: true,
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

    /// Reads what is after `offset` into `partial`, in [`READ_CHUNK`] pieces, at most
    /// `max` bytes at a time (the rest at the next poll). Returns whether it read to the end.
    fn catch_up(&mut self, f: &std::fs::File, max: usize) -> std::io::Result<bool> {
        while self.partial.len() < max {
            let start = self.partial.len();
            self.partial.resize(start + READ_CHUNK, 0);
            let r = f.read_at(&mut self.partial[start..], self.offset);
            self.partial.truncate(start + *r.as_ref().unwrap_or(&0));
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(0) => return Ok(true),
                Ok(n) => self.offset += n as u64,
            }
        }
        Ok(false)
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
            if !sink.open() {
                got |= self.skip(&f, sink);
                self.file = Some(f);
                return got;
            }
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
            self.at_end = true;
            if n > 0 {
                got = true;
                self.offset += n as u64;
                self.partial.extend_from_slice(&small[..n]);
                if n == small.len() {
                    // More may be waiting: read it in large chunks.
                    let max = sink.read_allowance();
                    self.at_end = self.catch_up(&f, max).unwrap_or(true);
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
                sink.send_bytes(self.stream, line);
                start = i + 1;
            } else if i + 1 - start >= MAX_LINE_BYTES {
                sink.send_bytes(self.stream, &data[start..=i]);
                start = i + 1;
            }
        }
        let rest = &data[start..];
        if flush_partial && self.at_end && !rest.is_empty() {
            sink.send_bytes(self.stream, rest);
        } else {
            self.partial = rest.to_vec();
        }
        if !sink.open() {
            // This read went over the rate: what was written meanwhile goes too, or an
            // instance writing faster than a tail reads would keep its output in memory (its
            // own, on a tmpfs) until killed for it.
            if let Some(f) = self.file.take() {
                self.skip(&f, sink);
                self.file = Some(f);
            }
        }
        got
    }

    /// Over the log rate: what waits is skipped unread (neither read into memory nor cut
    /// into lines), and counted for the note. Returns whether anything was skipped.
    fn skip(&mut self, f: &std::fs::File, sink: &LogSink) -> bool {
        self.at_end = true;
        let len = f.metadata().map(|m| m.len()).unwrap_or(self.offset);
        if len <= self.offset {
            return false;
        }
        sink.skipped(len - self.offset + self.partial.len() as u64);
        self.offset = len;
        self.partial.clear();
        true
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
                    // The rest, over the rate limit or not: it is bounded by what the last
                    // polls left (at most a poll's worth, or a burst).
                    for _ in 0..1024 {
                        t.poll(&sink, true);
                        if t.at_end {
                            break;
                        }
                    }
                }
                sink.flush_note();
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
        let sink = LogSink::of_no_instance(tx, LogRate::UNLIMITED);
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

    /// Output past an instance's log rate is dropped, and what waits unread in its files is
    /// skipped without being read; the note of what was dropped comes at the end.
    #[tokio::test]
    async fn output_over_the_rate_is_skipped_and_noted() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
        let mut o = std::fs::File::create(&out).unwrap();
        std::fs::File::create(&err).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let rate = LogRate {
            lines: 10,
            bytes: 0,
        };
        let sink = LogSink::of_no_instance(tx, rate);
        // 200,000 lines (20 MB) at once, then the tailer.
        let line = format!("{}\n", "z".repeat(99));
        let chunk = line.repeat(1000);
        for _ in 0..200 {
            o.write_all(chunk.as_bytes()).unwrap();
        }
        let size = std::fs::metadata(&out).unwrap().len();
        let tailer = Tailer::start(out, err, (0, 0), dir.path().join("offsets"), sink);
        tokio::time::sleep(Duration::from_millis(300)).await;
        tailer.drain().await;
        let mut lines = 0;
        let mut note = None;
        while let Ok(l) = rx.try_recv() {
            if l.stream == "platform" {
                note = Some(l.line);
            } else {
                lines += 1;
            }
        }
        // The burst (10 s of 10 lines), and a few more as the budget refills.
        assert!((100..=110).contains(&lines), "{lines} lines sent");
        let note = note.expect("a note of what was dropped");
        assert!(
            note.contains("dropped: over the log rate limit (10 lines/s and no limit"),
            "{note}"
        );
        assert_eq!(
            read_offsets(&dir.path().join("offsets")).unwrap().0,
            size,
            "all of it was taken"
        );
    }

    /// A read that goes over the rate skips what waits behind it at once: an instance that
    /// writes faster than a tail reads does not keep its output (in its own memory, on a
    /// tmpfs) until it is killed for it.
    #[test]
    fn a_read_over_the_rate_skips_the_rest() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdout.log");
        let mut o = std::fs::File::create(&out).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = LogSink::of_no_instance(
            tx,
            LogRate {
                lines: 10,
                bytes: 0,
            },
        );
        let chunk = format!("{}\n", "z".repeat(99)).repeat(1000);
        for _ in 0..(3 * READ_MAX / chunk.len()) {
            o.write_all(chunk.as_bytes()).unwrap();
        }
        let size = std::fs::metadata(&out).unwrap().len();
        let mut t = Tail::new(out, "stdout", 0);
        assert!(t.poll(&sink, false));
        assert_eq!(t.offset, size, "nothing waits unread");
        let mut lines = 0;
        while let Ok(l) = rx.try_recv() {
            lines += usize::from(l.stream == "stdout");
        }
        // The burst, and what the budget refilled while the poll went on.
        assert!((100..=110).contains(&lines), "{lines} lines");
        // Still over the rate: the next poll cuts a chunk (and its first small read) into
        // lines, to let through what the budget refilled, not 4 MiB, and skips the rest.
        let before = {
            let mut b = sink.budget.lock();
            if b.note(true).is_some() {
                b.dropped_lines = 1;
            }
            b.noted = Some(std::time::Instant::now());
            b.dropped_lines
        };
        for _ in 0..(3 * READ_MAX / chunk.len()) {
            o.write_all(chunk.as_bytes()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(150));
        assert!(t.poll(&sink, false));
        let cut = sink.budget.lock().dropped_lines - before;
        assert!(
            cut <= ((2048 + READ_CHUNK) / 100 + 1) as u64,
            "{cut} lines cut and dropped"
        );
        assert_eq!(
            t.offset,
            std::fs::metadata(dir.path().join("stdout.log"))
                .unwrap()
                .len()
        );
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
        let sink = LogSink::of_no_instance(tx, LogRate::UNLIMITED);
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
