//! One container: its exit watch, log stream, stats, and removal.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error;
use bollard::query_parameters::{
    InspectContainerOptions, KillContainerOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{watch, OnceCell};

use super::stats::Sampler;
use super::DockerPlacement;
use crate::runtime::logs::{escape_bytes, StoredTail, MAX_LINE_BYTES};
use crate::runtime::{
    ExitInfo, GoneExit, Instance, LogSink, ResourceSample, RuntimeKind, TerminateReport,
};

/// Upper bound on waiting for a SIGKILLed container to stop (it normally takes a few ms).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Upper bound on the engine's answer to a signal.
const ENGINE_WAIT: Duration = Duration::from_secs(5);
/// Upper bound on removing a container in [`Instance::terminate`] (then: in the background).
const REMOVE_WAIT: Duration = Duration::from_secs(10);
/// Upper bound on reading the last log lines after the container stopped.
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How long a container's exit may take to be reported after its connections broke.
const EXIT_REPORT_WINDOW: Duration = Duration::from_secs(3);
/// Bytes of stderr (and of stdout) kept for [`Instance::stderr_tail`] and
/// [`Instance::last_output`].
const TAIL_BYTES: usize = 2048;

/// The last [`TAIL_BYTES`] of a container's stderr and of its stdout.
#[derive(Default)]
struct Tails {
    stderr: VecDeque<u8>,
    stdout: VecDeque<u8>,
}

fn escaped(t: &VecDeque<u8>) -> String {
    let (a, b) = t.as_slices();
    escape_bytes(&[a, b].concat())
}

/// A started or re-adopted container.
pub struct DockerInstance {
    docker: Docker,
    pl: DockerPlacement,
    exit_rx: watch::Receiver<Option<ExitInfo>>,
    /// Whether the engine reported an OOM kill (read when the exit is observed).
    oom: Arc<Mutex<Option<bool>>>,
    tails: Arc<Mutex<Tails>>,
    /// True once the log stream ended (every line up to the exit was read).
    logs_ended: watch::Receiver<bool>,
    logs_done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    sampler: Sampler,
    terminated: OnceCell<TerminateReport>,
}

/// How a stopped container ended, from its state: its exit, OOM kill and end time (`None`: it
/// never ran, or the engine does not say).
pub fn gone_exit(state: &bollard::models::ContainerState) -> Option<GoneExit> {
    let code = state.exit_code?;
    // A container created but never started has code 0 and the zero time.
    let ended_ms = state
        .finished_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis())
        .filter(|ms| *ms > 0);
    ended_ms?;
    Some(GoneExit {
        exit: exit_info(code),
        out_of_memory: state.oom_killed == Some(true),
        ended_ms,
    })
}

/// Exit code of a container (its init passes the child's code; 128+n is signal n).
pub fn exit_info(code: i64) -> ExitInfo {
    if (129..=128 + 64).contains(&code) {
        ExitInfo {
            code: None,
            signal: Some((code - 128) as i32),
        }
    } else {
        ExitInfo {
            code: Some(code as i32),
            signal: None,
        }
    }
}

impl DockerInstance {
    /// After the exit, waits (briefly) for the log stream to end, so the tails hold the
    /// container's last words.
    async fn drained(&self) {
        if self.exited().is_some() {
            let mut rx = self.logs_ended.clone();
            let _ = tokio::time::timeout(DRAIN_WAIT, rx.wait_for(|v| *v)).await;
        }
    }

    /// Wraps a running container: starts its exit watch and log stream. `since` is the
    /// earliest log time (unix s) to read; 0 = from its start.
    pub fn watch(docker: Docker, pl: DockerPlacement, logs: LogSink, since: i32) -> Arc<Self> {
        let (tx, exit_rx) = watch::channel(None);
        let oom = Arc::new(Mutex::new(None));
        let tails = Arc::new(Mutex::new(Tails::default()));
        let (ended_tx, logs_ended) = watch::channel(false);
        let follow = follow_logs(
            docker.clone(),
            pl.container_id.clone(),
            logs,
            tails.clone(),
            since,
            exit_rx.clone(),
        );
        let log_task = tokio::spawn(async move {
            follow.await;
            let _ = ended_tx.send(true);
        });
        tokio::spawn(watch_exit(
            docker.clone(),
            pl.container_id.clone(),
            tx,
            oom.clone(),
        ));
        Arc::new(DockerInstance {
            sampler: Sampler::new(docker.clone(), pl.container_id.clone()),
            docker,
            pl,
            exit_rx,
            oom,
            tails,
            logs_ended,
            logs_done: tokio::sync::Mutex::new(Some(log_task)),
            terminated: OnceCell::new(),
        })
    }

    /// Signals the container: `Ok(true)` sent, `Ok(false)` nothing runs to signal, `Err`: the
    /// engine did not take it (an error, or no answer within [`ENGINE_WAIT`]).
    async fn kill(&self, signal: &str) -> Result<bool, ()> {
        let opts = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        let sent = tokio::time::timeout(
            ENGINE_WAIT,
            self.docker
                .kill_container(&self.pl.container_id, Some(opts)),
        )
        .await;
        match sent {
            Ok(Ok(())) => Ok(true),
            // 409: not running; 404: gone. Both mean nothing is left to signal.
            Ok(Err(Error::DockerResponseServerError { status_code, .. }))
                if status_code == 409 || status_code == 404 =>
            {
                Ok(false)
            }
            Ok(Err(e)) => {
                tracing::warn!(container = %self.pl.container_id, signal, error = %e, "cannot signal container");
                Err(())
            }
            Err(_) => {
                tracing::warn!(container = %self.pl.container_id, signal, "the engine did not answer a signal in time");
                Err(())
            }
        }
    }

    async fn exit_within(&self, d: Duration) -> bool {
        let mut rx = self.exit_rx.clone();
        let r = tokio::time::timeout(d, rx.wait_for(|v| v.is_some())).await;
        r.is_ok()
    }

    /// Removes the container (force: it is killed if it still runs). An engine that does not
    /// take it within [`REMOVE_WAIT`] (tried every 200 ms) gets it again in the background
    /// until it does ([`remove_until_gone`]): no container outlives its instance for longer
    /// than its engine is unreachable.
    async fn remove(&self) {
        let deadline = Instant::now() + REMOVE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e =
                match tokio::time::timeout(left, remove_once(&self.docker, &self.pl.container_id))
                    .await
                {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer".to_string(),
                };
            if left < Duration::from_millis(400) {
                tracing::error!(container = %self.pl.container_id, error = %e, "cannot remove container; trying again in the background until the engine takes it");
                super::spawn_cleanup(remove_until_gone(
                    self.docker.clone(),
                    self.pl.container_id.clone(),
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn do_terminate(&self, grace: Duration) -> TerminateReport {
        let t0 = Instant::now();
        let mut report = TerminateReport {
            sent_sigterm: false,
            killed: false,
            exit: None,
            took_ms: 0,
        };
        // Whether the engine took every signal (one that does not answer is not waited for
        // again: the forced removal kills the container once it answers).
        let mut engine_ok = true;
        if self.exited().is_none() {
            // Our own timer, not the engine's stop: it takes whole seconds only, and its
            // answer comes after the grace (a client timeout could cut a long one).
            if !grace.is_zero() {
                report.sent_sigterm = self.kill("SIGTERM").await.unwrap_or_else(|()| {
                    engine_ok = false;
                    false
                });
            }
            if grace.is_zero() || !self.exit_within(grace).await {
                match self.kill("SIGKILL").await {
                    Ok(killed) => {
                        report.killed = killed;
                        if !self.exit_within(KILL_WAIT).await {
                            tracing::error!(container = %self.pl.container_id, "container did not stop after SIGKILL");
                        }
                    }
                    Err(()) => engine_ok = false,
                }
            }
        }
        report.exit = self.exited();
        // The log stream ends when the container stops: every line up to the last words.
        // (While an engine that does not answer keeps it running, the lines so far are kept.)
        if let Some(h) = self.logs_done.lock().await.take() {
            let abort = h.abort_handle();
            let wait = if engine_ok || report.exit.is_some() {
                DRAIN_WAIT
            } else {
                Duration::ZERO
            };
            if tokio::time::timeout(wait, h).await.is_err() {
                abort.abort();
            }
        }
        self.remove().await;
        report.took_ms = t0.elapsed().as_millis() as u64;
        report
    }
}

/// Removes a container with its anonymous volumes (force: killed if it still runs); gone
/// already is done too.
pub(super) async fn remove_once(docker: &Docker, id: &str) -> Result<(), Error> {
    let opts = RemoveContainerOptionsBuilder::default()
        .v(true)
        .force(true)
        .build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(())
        | Err(Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a container, trying again (1 s doubling to 30 s) until the engine takes it.
pub(super) async fn remove_until_gone(docker: Docker, id: String) {
    let mut backoff = Duration::from_secs(1);
    loop {
        tokio::time::sleep(backoff).await;
        match remove_once(&docker, &id).await {
            Ok(()) => {
                tracing::info!(container = %id, "removed a container the engine could not remove before");
                return;
            }
            Err(e) => tracing::debug!(container = %id, error = %e, "cannot remove container yet"),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Waits for the container's exit (one long request; re-inspected when the stream breaks,
/// e.g. an engine restart) and records its exit and OOM flag.
async fn watch_exit(
    docker: Docker,
    id: String,
    tx: watch::Sender<Option<ExitInfo>>,
    oom: Arc<Mutex<Option<bool>>>,
) {
    let mut backoff = Duration::from_millis(100);
    let exit = loop {
        let opts = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut w = docker.wait_container(&id, Some(opts));
        match w.next().await {
            Some(Ok(r)) => break Some(r.status_code),
            Some(Err(Error::DockerContainerWaitError { code, .. })) => break Some(code),
            Some(Err(Error::DockerResponseServerError {
                status_code: 404, ..
            })) => break None,
            _ => {}
        }
        // The wait broke: ask again what state the container is in.
        match docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => {
                let st = c.state.unwrap_or_default();
                if st.running != Some(true) && st.status.is_some() {
                    *oom.lock() = st.oom_killed;
                    break st.exit_code;
                }
            }
            Err(Error::DockerResponseServerError {
                status_code: 404, ..
            }) => break None,
            Err(_) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    if oom.lock().is_none() {
        if let Ok(c) = docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        {
            *oom.lock() = c.state.and_then(|s| s.oom_killed);
        }
    }
    let _ = tx.send(Some(exit.map(exit_info).unwrap_or_default()));
}

/// Where a container's log stream stands, so that a stream followed again after it broke
/// sends every entry once. The engine answers a request from a whole second with the
/// entries of its log file stamped in that second or later, in file order, which is not
/// stamp order: the parts of a line longer than the engine's buffer share one stamp, and
/// stdout's and stderr's entries are stamped apart (one may be stamped after another that
/// is written after it). So an entry is never judged by its stamp against the last one
/// read; a request made again starts a second before the latest second read (for an entry
/// written late), and the entries at its head that were read already are counted off.
#[derive(Debug, Default)]
struct LogResume {
    /// The latest second (unix s) an entry read was stamped in.
    second: Option<i64>,
    /// How many entries read were stamped in `second`.
    in_second: usize,
    /// How many entries read were stamped in the second before `second`.
    in_before: usize,
    /// Entries at the head of this request that an earlier one read: not sent again.
    skip: usize,
}

impl LogResume {
    /// Resuming after what the store holds of the container's output (its lines carry the
    /// engine's stamps): the same counts as if this run had read those lines itself.
    fn after(stored: StoredTail) -> LogResume {
        LogResume {
            second: stored.second,
            in_second: stored.in_second,
            in_before: stored.in_before,
            skip: 0,
        }
    }

    /// The `since` (unix s) of the next log request: `initial` for the first one.
    fn next_request(&mut self, initial: i32) -> i32 {
        let Some(second) = self.second else {
            self.skip = 0;
            return initial;
        };
        let from = i32::try_from(second - 1).unwrap_or(i32::MAX).max(initial);
        // Every entry read stamped at `from` or later is at the head of the answer, in the
        // order it was read (the first request's entries are all stamped at `initial` or
        // later, so none was read from the second before when `from` is `initial`).
        self.skip = self.in_second
            + if i64::from(from) < second {
                self.in_before
            } else {
                0
            };
        from
    }

    /// Whether the next entry of the stream, stamped `ts` (engine time, ns), is to be sent
    /// (it was not read before).
    fn admit(&mut self, ts: Option<i64>) -> bool {
        // Without a stamp (never with `timestamps`), it cannot be placed: sent.
        let Some(ts) = ts else { return true };
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        let sec = ts.div_euclid(1_000_000_000);
        match self.second {
            Some(s) if sec == s => self.in_second += 1,
            Some(s) if sec == s - 1 => self.in_before += 1,
            Some(s) if sec < s => {}
            prev => {
                self.in_before = if prev == Some(sec - 1) {
                    self.in_second
                } else {
                    0
                };
                self.second = Some(sec);
                self.in_second = 1;
            }
        }
        true
    }
}

/// Sends the container's stdout and stderr to `sink` line by line, keeping the last bytes of
/// stderr; returns when the container stopped (the stream ends) or is gone. A stream that
/// breaks while the container runs (an engine restart, a broken connection) is followed
/// again from the last lines read ([`LogResume`]: no line twice), once the engine answers.
async fn follow_logs(
    docker: Docker,
    id: String,
    sink: LogSink,
    tail: Arc<Mutex<Tails>>,
    since: i32,
    exited: watch::Receiver<Option<ExitInfo>>,
) {
    // An adopted container's capture resumes right after what the store holds of it.
    let mut read = sink.stored().map(LogResume::after).unwrap_or_default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let from = read.next_request(since);
        match follow_once(&docker, &id, &sink, &tail, from, &mut read).await {
            // Ended with the container's exit: every line was read.
            Ok(()) if exited.borrow().is_some() => return,
            Ok(()) => match docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
            {
                Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {}
                Ok(_)
                | Err(Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => return,
                Err(_) => {}
            },
            Err(Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return,
            Err(e) => {
                tracing::debug!(container = %id, error = %e, "log stream broke; following again")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One log request, from `since` (unix s), skipping what `read` says was read before.
/// `Ok`: the stream ended; `Err`: it broke.
async fn follow_once(
    docker: &Docker,
    id: &str,
    sink: &LogSink,
    tail: &Mutex<Tails>,
    since: i32,
    read: &mut LogResume,
) -> Result<(), Error> {
    let opts = LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .since(since)
        .build();
    let mut s = docker.logs(id, Some(opts));
    while let Some(item) = s.next().await {
        let (stream, bytes) = match item? {
            LogOutput::StdOut { message } => ("stdout", message),
            LogOutput::StdErr { message } => ("stderr", message),
            _ => continue,
        };
        // `<RFC 3339 time with ns> <line>`
        let (ts, mut line) = match bytes.iter().position(|b| *b == b' ') {
            Some(i) => (
                std::str::from_utf8(&bytes[..i])
                    .ok()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .and_then(|t| t.timestamp_nanos_opt()),
                &bytes[i + 1..],
            ),
            None => (None, &bytes[..]),
        };
        if !read.admit(ts) {
            continue;
        }
        {
            let mut tails = tail.lock();
            let t = if stream == "stderr" {
                &mut tails.stderr
            } else {
                &mut tails.stdout
            };
            t.extend(line.iter().copied());
            let excess = t.len().saturating_sub(TAIL_BYTES);
            t.drain(..excess);
        }
        if line.last() == Some(&b'\n') {
            line = &line[..line.len() - 1];
        }
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        for part in line.chunks(MAX_LINE_BYTES) {
            // Stamped as the engine stamped it: a restart resumes from the stored stamps.
            sink.send_bytes_at(stream, part, ts);
        }
    }
    Ok(())
}

#[async_trait]
impl Instance for DockerInstance {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    fn placement(&self) -> serde_json::Value {
        serde_json::to_value(&self.pl).unwrap_or_default()
    }

    fn endpoint(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.pl.port))
    }

    fn describe(&self) -> String {
        let short: String = self.pl.container_id.chars().take(12).collect();
        format!("container {short}")
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit_rx.clone();
        let r = match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => ExitInfo::default(),
        };
        r
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit_rx.borrow()
    }

    /// The engine reports an exit after containerd's event reached it: a few hundred ms on a
    /// loaded machine.
    fn exit_report_window(&self) -> Duration {
        EXIT_REPORT_WINDOW
    }

    async fn terminate(&self, grace: Duration) -> TerminateReport {
        *self
            .terminated
            .get_or_init(|| self.do_terminate(grace))
            .await
    }

    async fn sample(&self) -> Option<ResourceSample> {
        if self.terminated.initialized() || self.exited().is_some() {
            return None;
        }
        self.sampler.sample()
    }

    /// After the exit, waits (briefly) for the log stream to end, so the tail holds the
    /// container's last words.
    async fn stderr_tail(&self) -> String {
        self.drained().await;
        escaped(&self.tails.lock().stderr)
    }

    async fn last_output(&self) -> (&'static str, String) {
        self.drained().await;
        let t = self.tails.lock();
        crate::runtime::last_words(escaped(&t.stderr), || escaped(&t.stdout))
    }

    async fn out_of_memory(&self) -> bool {
        if let Some(v) = *self.oom.lock() {
            return v;
        }
        let ins = self
            .docker
            .inspect_container(&self.pl.container_id, None::<InspectContainerOptions>);
        tokio::time::timeout(ENGINE_WAIT, ins)
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_containers_state_says_how_it_ended() {
        let st = |code: Option<i64>, oom: bool, at: &str| bollard::models::ContainerState {
            exit_code: code,
            oom_killed: Some(oom),
            finished_at: Some(at.into()),
            ..Default::default()
        };
        let g = gone_exit(&st(Some(3), false, "2026-12-05T10:00:01.5Z")).unwrap();
        assert_eq!(g.exit.code, Some(3));
        assert!(!g.out_of_memory);
        assert_eq!(g.ended_ms, Some(1_796_464_801_500));
        let g = gone_exit(&st(Some(137), true, "2026-12-05T10:00:01.123456789Z")).unwrap();
        assert_eq!((g.exit.signal, g.out_of_memory), (Some(9), true));
        // Created, never started: nothing to say.
        assert_eq!(gone_exit(&st(Some(0), false, "0001-01-01T00:00:00Z")), None);
        assert_eq!(gone_exit(&st(None, false, "2026-12-05T10:00:01Z")), None);
    }

    #[test]
    fn init_exit_codes_above_128_are_signals() {
        assert_eq!(exit_info(0).code, Some(0));
        assert_eq!(exit_info(3).code, Some(3));
        assert_eq!(exit_info(137).signal, Some(9));
        assert_eq!(exit_info(143).signal, Some(15));
        assert_eq!(exit_info(255).code, Some(255));
    }

    /// What a log request from `since` (unix s) returns of an engine's log file: its entries
    /// (their stamps, ns) in file order, those stamped before `since` left out.
    fn replay(file: &[i64], since: i32) -> Vec<i64> {
        let from = i64::from(since) * 1_000_000_000;
        file.iter().copied().filter(|t| *t >= from).collect()
    }

    /// Every entry of a container's log is sent once, in a stream that never breaks and
    /// across breaks: the parts of a line longer than the engine's buffer share one stamp,
    /// and stdout's and stderr's entries are stamped apart, so the file is not in stamp
    /// order.
    #[test]
    fn log_entries_are_sent_once_whatever_their_stamps() {
        let s = 1_800_000_000_i64 * 1_000_000_000;
        let file = vec![
            s + 100,
            s + 200,
            s + 200, // the rest of a long line
            s + 200, // and its end
            s + 400, // stderr, stamped after...
            s + 300, // ...stdout, written after it
            s + 999_999_999,
            s + 1_000_000_100, // the next second
            s + 1_000_000_050,
            s + 1_000_000_200,
            s + 1_000_000_200,
            s + 2_000_000_000,
        ];
        let initial = 1_799_999_990;
        // Read whole.
        let mut r = LogResume::default();
        let since = r.next_request(initial);
        let got: Vec<i64> = replay(&file, since)
            .into_iter()
            .filter(|t| r.admit(Some(*t)))
            .collect();
        assert_eq!(got, file, "one stream");
        // Broken after each entry, then followed again (twice for the last cut).
        for cut in 1..file.len() {
            let mut r = LogResume::default();
            let since = r.next_request(initial);
            let mut got: Vec<i64> = replay(&file, since)[..cut]
                .iter()
                .copied()
                .filter(|t| r.admit(Some(*t)))
                .collect();
            let since = r.next_request(initial);
            let again = replay(&file, since);
            let more = cut.min(again.len());
            got.extend(again[..more].iter().copied().filter(|t| r.admit(Some(*t))));
            let since = r.next_request(initial);
            got.extend(
                replay(&file, since)
                    .into_iter()
                    .filter(|t| r.admit(Some(*t))),
            );
            assert_eq!(got, file, "broken after {cut} entries");
        }
        // Stored up to each entry by a server that then died; the next server, from what the
        // store holds alone, reads the rest: each entry once, none lost.
        for cut in 0..=file.len() {
            let stored = StoredTail::of(file[..cut].iter().copied());
            let mut r = LogResume::after(stored);
            let since = r.next_request(0);
            let mut got = file[..cut].to_vec();
            got.extend(
                replay(&file, since)
                    .into_iter()
                    .filter(|t| r.admit(Some(*t))),
            );
            assert_eq!(got, file, "stored up to {cut} entries");
        }
    }
}
