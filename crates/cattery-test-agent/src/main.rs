//! `cattery-test-agent`: a small native agent that implements the Cattery
//! *instance contract*, with switches that lifecycle tests use to reproduce
//! faults. It is also the simplest example of what an agent has to do.
//!
//! # The instance contract (agent side)
//!
//! The agent listens on `127.0.0.1:$PORT` (env `PORT`, default 8080; env
//! `CATTERY_HOST` changes the address, e.g. `0.0.0.0` inside a container) and
//! speaks HTTP/1.1 with keep-alive. Request bodies need a `Content-Length`
//! (chunked or unknown-length bodies on `POST`/`PUT`/`PATCH` get `411`;
//! `Expect: 100-continue` is honoured).
//! Every response is JSON with `Content-Type: application/json` and a
//! `Content-Length`.
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /readyz` | `200 {"status":"ok","pid","startedAtUnixMs","readyAtUnixMs"}`; `503 {"status":"not ready"}` after `POST /control/not-ready` |
//! | `POST /control/not-ready` | `200 {"status":"ok"}`; `/readyz` fails from then on |
//! | `POST /control/read` | body: a path. Tries to read it as this process (a directory is listed, a file read): `200 {"path","ok":true,"bytes":N}` or `200 {"path","ok":false,"error"}`; isolation tests use it to try another instance's or the server's files |
//! | `POST /control/write` | body: a path. Writes a small file there as this process (`cattery-test-agent <pid>`): `200 {"path","ok":true,"bytes":N}` or `200 {"path","ok":false,"error"}`; isolation tests leave files in shared places with it |
//! | `POST /control/leave-kernel` | body: a tag. Leaves, as this process, a System V shared memory segment, a POSIX message queue and a key in each of its keyrings (session, user, user session, persistent), named after the tag: `200 {"shm":true,"mqueue":true,...}` (an error text for what failed) |
//! | `POST /control/find-kernel` | body: a tag. Looks for what `leave-kernel` left with that tag: `200 {"found":["shm",...]}`; isolation tests check that the next instance of a uid finds nothing |
//! | `GET /livez` | `200 {"status":"ok"}` |
//! | `GET /info` | `200 {"pid","pgid","uid","gid","startedAtUnixMs","readyAtUnixMs","sessionsServed","sessionId","childPid","rssBytes"}` |
//! | `POST /bot` | starts the session (see below) |
//! | `GET /ws` + websocket upgrade | starts a websocket session (see below) |
//! | anything else | `200 {"method","path","query","headers":{lower-case name: value},"body"}`, an echo of the request (the Session API a platform proxies to the bot); `HEAD` gets the same headers without a body |
//!
//! **`POST /bot`**: the body must be a JSON object (else `422`). The headers
//! `x-daily-session-id`, `x-daily-transport-type` and
//! `x-pcc-max-session-seconds` are read and logged as
//! `bot started session=<id> transport=<t|none> max_session_seconds=<v|none> body=<raw body>`.
//! The request stays open for the whole session and is answered `200 {}`
//! when the session ends naturally (`--bot-seconds`). The agent does *not*
//! enforce `x-pcc-max-session-seconds`; the platform must. A second session
//! in the same process is refused with
//! `409 {"error":"this instance already served a session","code":"409"}` and
//! logs `second session in same process` at `ERROR` (tests use this to
//! detect instance reuse). While the session runs the socket is checked
//! every 100 ms; when the platform closes it the agent logs
//! `transport closed, ending session` and exits 0 (see
//! `--ignore-transport-close`).
//!
//! **`GET /ws`**: an RFC 6455 websocket. The upgrade starts a session like
//! `/bot` (same 409 rule; the session id comes from `x-daily-session-id`,
//! the body from the base64 `body` query parameter). The agent echoes every
//! text/binary message, answers pings with pongs and sends a binary "audio"
//! frame of 320 zero bytes every 20 ms. A close frame from the client is
//! answered with a close frame; a close frame, EOF or a read error ends the
//! session like a closed `/bot` connection (exit 0). With `--bot-seconds S`
//! the agent sends a close frame itself after S seconds (and drops the
//! connection if the client has not answered it within 2 s); that is a
//! natural end and the process stays up.
//!
//! **Signals**: on `SIGTERM` the agent logs `received SIGTERM, exiting` and
//! exits 0 at once. The handler only writes a byte to a self-pipe; a watcher
//! thread does the logging.
//!
//! **Logging**: one line per event in the Pipecat base-image format,
//! `<ISO-8601 UTC time with ms>Z | <LEVEL> | test_agent:<fn>:<line> | <session id or NONE> - <message>`,
//! to stdout (`ERROR` and `WARNING` to stderr), flushed after every line.
//! At startup it logs `listening on 127.0.0.1:<port>` and `ready in <N> ms`.
//!
//! # Switches
//!
//! Seconds may be fractional. Unknown switches print usage to stderr and
//! exit 2.
//!
//! | Switch | Behaviour |
//! |---|---|
//! | `--startup-delay S` | log `starting, startup delay S s`, then sleep S seconds before binding the port (heavy imports) |
//! | `--ignore-sigterm` | `SIGTERM` only logs `ignoring SIGTERM` |
//! | `--hang-on-exit` | on `SIGTERM` log `shutting down` and start work that never finishes; the process does not exit |
//! | `--exit-after S` | S seconds after the session starts, log `exiting after S s with code N` and exit with `--exit-code N` (default 0) |
//! | `--exit-code N` | exit code for `--exit-after` |
//! | `--exit-on-start N` | write `fatal: crash on start` to stderr and exit N at once (a crash-looping agent) |
//! | `--spawn-child` | at start spawn `sh -c 'exec sleep 1000000000'` (one process: the shell becomes `sleep`) in its own session (`setsid`, stdio to /dev/null) that outlives a plain kill of the agent and of its process group; logs `spawned child pid=<pid>`, reported as `childPid` in `/info` |
//! | `--bind-port P` | also listen on `127.0.0.1:P` (accept and drop), to detect leaked processes holding ports |
//! | `--print-env K` | (repeatable) log `env K=<value or <unset>>` at session start |
//! | `--last-words` | on `SIGTERM` write `last words on stdout` to stdout and `last words on stderr` to stderr, then act per the other switches |
//! | `--rss-grow MB` | at session start allocate MB megabytes, touch every page and keep them |
//! | `--flood-seconds S` | at session start write lines `flood <n> xxx...` (about 200 bytes) to stdout as fast as it can for S seconds |
//! | `--ignore-transport-close` | when the `/bot` connection or the websocket closes, log `transport closed, ignoring` and keep running |
//! | `--bot-seconds S` | the session's natural length: answer `POST /bot` with `200 {}` (or close the websocket) after S seconds; the process stays up |

mod http;
mod kernel;
mod ws;

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::http::{ReadError, Request};

// ---------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------

/// The name of the enclosing function, for the `test_agent:<fn>:<line>` field.
macro_rules! function {
    () => {{
        fn f() {}
        fn type_name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        let name = type_name_of(f);
        let name = name.strip_suffix("::f").unwrap_or(name);
        name.rsplit("::")
            .find(|s| *s != "{{closure}}")
            .unwrap_or(name)
    }};
}

/// Logs one line at `INFO` to stdout.
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::write_log(false, "INFO", $crate::function!(), line!(), format_args!($($arg)*))
    };
}

/// Logs one line at `WARNING` to stderr.
macro_rules! warning {
    ($($arg:tt)*) => {
        $crate::write_log(true, "WARNING", $crate::function!(), line!(), format_args!($($arg)*))
    };
}

/// Logs one line at `ERROR` to stderr.
macro_rules! error {
    ($($arg:tt)*) => {
        $crate::write_log(true, "ERROR", $crate::function!(), line!(), format_args!($($arg)*))
    };
}

pub(crate) use {function, info, warning};

/// The id of the session this process serves, shown in every log line.
static SESSION_ID: Mutex<Option<String>> = Mutex::new(None);

fn session_id() -> Option<String> {
    SESSION_ID.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Writes one log line in the Pipecat base-image format and flushes it.
fn write_log(to_stderr: bool, level: &str, func: &str, line: u32, msg: fmt::Arguments<'_>) {
    let sid = session_id().unwrap_or_else(|| "NONE".to_owned());
    let text = format!(
        "{} | {level} | test_agent:{func}:{line} | {sid} - {msg}\n",
        iso_time(unix_ms())
    );
    // A closed stdout/stderr must not kill the agent: ignore write errors.
    if to_stderr {
        let mut err = io::stderr().lock();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
    } else {
        let mut out = io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2025-01-02T03:04:05.678Z` for a Unix time in milliseconds.
fn iso_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, sod) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms % 1000
    )
}

// ---------------------------------------------------------------------------
// Switches
// ---------------------------------------------------------------------------

const USAGE: &str = "\
usage: cattery-test-agent [switches]

A test agent implementing the Cattery instance contract (listens on 127.0.0.1:$PORT).

  --startup-delay S         sleep S seconds before binding the port
  --ignore-sigterm          log `ignoring SIGTERM` and keep running on SIGTERM
  --hang-on-exit            on SIGTERM log `shutting down` and never finish
  --exit-after S            exit S seconds after the session starts ...
  --exit-code N             ... with exit code N (default 0)
  --exit-on-start N         write `fatal: crash on start` to stderr and exit N
  --spawn-child             spawn `sh -c 'exec sleep 1000000000'` in its own session
  --bind-port P             also listen on 127.0.0.1:P (accept and drop)
  --print-env K             log `env K=<value>` at session start (repeatable)
  --last-words              on SIGTERM write a line to stdout and to stderr
  --rss-grow MB             allocate and touch MB megabytes at session start
  --flood-seconds S         write lines to stdout as fast as possible for S seconds
  --ignore-transport-close  keep running when the /bot connection or websocket closes
  --bot-seconds S           end the session naturally after S seconds
  --tick-ms N               during a session, log `tick <n>` (n = 1, 2, ...) every N ms
  -h, --help                show this help
";

/// The parsed command-line switches.
#[derive(Debug, Default)]
struct Options {
    startup_delay: Option<f64>,
    ignore_sigterm: bool,
    hang_on_exit: bool,
    exit_after: Option<f64>,
    exit_code: i32,
    exit_on_start: Option<i32>,
    spawn_child: bool,
    bind_port: Option<u16>,
    print_env: Vec<String>,
    last_words: bool,
    rss_grow_mb: Option<u64>,
    flood_seconds: Option<f64>,
    ignore_transport_close: bool,
    bot_seconds: Option<f64>,
    tick_ms: Option<u64>,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("cattery-test-agent: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

fn parse_seconds(name: &str, v: &str) -> f64 {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => s,
        _ => usage_error(&format!("{name} needs a number of seconds >= 0, got {v:?}")),
    }
}

fn parse_num<T: std::str::FromStr>(name: &str, v: &str) -> T {
    v.parse()
        .unwrap_or_else(|_| usage_error(&format!("{name}: invalid value {v:?}")))
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Options {
    let mut o = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // Accept both `--switch value` and `--switch=value`.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| usage_error(&format!("{name} needs a value")))
        };
        match name.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--startup-delay" => o.startup_delay = Some(parse_seconds(&name, &value())),
            "--exit-after" => o.exit_after = Some(parse_seconds(&name, &value())),
            "--bot-seconds" => o.bot_seconds = Some(parse_seconds(&name, &value())),
            "--flood-seconds" => o.flood_seconds = Some(parse_seconds(&name, &value())),
            "--exit-code" => o.exit_code = parse_num(&name, &value()),
            "--exit-on-start" => o.exit_on_start = Some(parse_num(&name, &value())),
            "--bind-port" => o.bind_port = Some(parse_num(&name, &value())),
            "--rss-grow" => o.rss_grow_mb = Some(parse_num(&name, &value())),
            "--tick-ms" => o.tick_ms = Some(parse_num(&name, &value())),
            "--print-env" => o.print_env.push(value()),
            "--ignore-sigterm"
            | "--hang-on-exit"
            | "--spawn-child"
            | "--last-words"
            | "--ignore-transport-close"
                if inline.is_some() =>
            {
                usage_error(&format!("{name} takes no value"))
            }
            "--ignore-sigterm" => o.ignore_sigterm = true,
            "--hang-on-exit" => o.hang_on_exit = true,
            "--spawn-child" => o.spawn_child = true,
            "--last-words" => o.last_words = true,
            "--ignore-transport-close" => o.ignore_transport_close = true,
            _ => usage_error(&format!("unknown switch {arg:?}")),
        }
    }
    o
}

// ---------------------------------------------------------------------------
// Process state
// ---------------------------------------------------------------------------

/// Everything the connection threads share.
struct Agent {
    opts: Options,
    started_at_ms: u64,
    ready_at_ms: AtomicU64,
    not_ready: AtomicBool,
    /// Set by the first `/bot` or `/ws`; a second one gets 409.
    session_taken: AtomicBool,
    sessions_served: AtomicU64,
    child_pid: Option<u32>,
}

static AGENT: OnceLock<Agent> = OnceLock::new();

fn agent() -> &'static Agent {
    AGENT
        .get()
        .expect("agent state is set before any thread starts")
}

fn main() {
    let started_at_ms = unix_ms();
    let opts = parse_args(std::env::args().skip(1));

    if let Some(code) = opts.exit_on_start {
        error!("fatal: crash on start");
        std::process::exit(code);
    }

    match opts.startup_delay {
        Some(s) => info!("starting, startup delay {s} s"),
        None => info!("starting"),
    }

    // Signals first, so a SIGTERM during the startup delay is handled too.
    match install_sigterm_pipe() {
        Ok(fd) => {
            thread::spawn(move || watch_sigterm(fd));
        }
        Err(e) => {
            error!("cannot install the SIGTERM handler: {e}");
            std::process::exit(1);
        }
    }

    let child_pid = if opts.spawn_child {
        match spawn_child() {
            Ok(pid) => Some(pid),
            Err(e) => {
                error!("cannot spawn the child: {e}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };

    let delay = opts.startup_delay;
    let bind_port = opts.bind_port;
    let _ = AGENT.set(Agent {
        opts,
        started_at_ms,
        ready_at_ms: AtomicU64::new(0),
        not_ready: AtomicBool::new(false),
        session_taken: AtomicBool::new(false),
        sessions_served: AtomicU64::new(0),
        child_pid,
    });

    if let Some(s) = delay {
        thread::sleep(Duration::from_secs_f64(s));
    }

    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.trim().parse().unwrap_or_else(|_| {
            error!("PORT is not a port number: {p:?}");
            std::process::exit(2)
        }),
        Err(_) => 8080,
    };

    if let Some(p) = bind_port {
        match TcpListener::bind(("127.0.0.1", p)) {
            Ok(extra) => {
                info!("also listening on 127.0.0.1:{p} (--bind-port)");
                thread::spawn(move || {
                    for conn in extra.incoming() {
                        drop(conn);
                    }
                });
            }
            Err(e) => {
                error!("cannot bind 127.0.0.1:{p}: {e}");
                std::process::exit(1);
            }
        }
    }

    // The runner's variable: a container's published port reaches only a non-loopback address.
    let host: std::net::IpAddr = match std::env::var("CATTERY_HOST") {
        Ok(h) => h.trim().parse().unwrap_or_else(|_| {
            error!("CATTERY_HOST is not an IP address: {h:?}");
            std::process::exit(2)
        }),
        Err(_) => std::net::Ipv4Addr::LOCALHOST.into(),
    };
    let listener = match TcpListener::bind((host, port)) {
        Ok(l) => l,
        Err(e) => {
            error!("cannot bind {host}:{port}: {e}");
            // Who holds it (diagnostics for port clashes): the kernel's socket table rows.
            let hex = format!(":{port:04X} ");
            for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
                for l in std::fs::read_to_string(file).unwrap_or_default().lines() {
                    if l.contains(&hex) {
                        error!("{file}: {}", l.trim());
                    }
                }
            }
            std::process::exit(1);
        }
    };
    let ready_at = unix_ms();
    agent().ready_at_ms.store(ready_at, Ordering::SeqCst);
    info!("listening on {host}:{port}");
    info!("ready in {} ms", ready_at.saturating_sub(started_at_ms));

    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || handle_connection(stream));
            }
            Err(e) => {
                warning!("accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------

/// Write end of the self-pipe; the signal handler writes one byte to it.
static SIGTERM_PIPE: AtomicI32 = AtomicI32::new(-1);

#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn errno_location() -> *mut libc::c_int {
    libc::__errno_location()
}

#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
unsafe fn errno_location() -> *mut libc::c_int {
    libc::__error()
}

/// The SIGTERM handler: async-signal-safe, it only writes to the self-pipe.
extern "C" fn on_sigterm(_signal: libc::c_int) {
    let fd = SIGTERM_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; errno is restored so the
        // interrupted code does not see it change.
        unsafe {
            let errno = errno_location();
            let saved = *errno;
            let byte = 1u8;
            libc::write(fd, (&byte as *const u8).cast(), 1);
            *errno = saved;
        }
    }
}

/// Creates the self-pipe, installs the SIGTERM handler and returns the read
/// end.
fn install_sigterm_pipe() -> io::Result<libc::c_int> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: plain libc calls on fds this function owns.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        for fd in fds {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // Never block in the handler, even if many signals pile up.
        let flags = libc::fcntl(fds[1], libc::F_GETFL);
        libc::fcntl(fds[1], libc::F_SETFL, flags | libc::O_NONBLOCK);
        SIGTERM_PIPE.store(fds[1], Ordering::SeqCst);

        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fds[0])
}

/// Waits for SIGTERMs on the self-pipe and acts on them.
fn watch_sigterm(read_fd: libc::c_int) {
    // SAFETY: the read end is owned by this thread from here on.
    let mut pipe = unsafe { File::from_raw_fd(read_fd) };
    let mut hanging = false;
    loop {
        let mut byte = [0u8; 1];
        match pipe.read(&mut byte) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        // The handler may run before AGENT is set (during startup).
        let opts = AGENT.get().map(|a| &a.opts);
        let flag = |f: fn(&Options) -> bool| opts.is_some_and(f);
        if flag(|o| o.last_words) {
            info!("last words on stdout");
            warning!("last words on stderr");
        }
        if flag(|o| o.ignore_sigterm) {
            info!("ignoring SIGTERM");
        } else if flag(|o| o.hang_on_exit) {
            if !hanging {
                hanging = true;
                info!("shutting down");
                // Shutdown work that never finishes.
                thread::spawn(|| loop {
                    thread::sleep(Duration::from_secs(3600));
                });
            } else {
                info!("received SIGTERM again, still shutting down");
            }
        } else {
            info!("received SIGTERM, exiting");
            std::process::exit(0);
        }
    }
}

// ---------------------------------------------------------------------------
// --spawn-child
// ---------------------------------------------------------------------------

/// Spawns `sh -c 'exec sleep 1000000000'` in a new session, so that it
/// survives a kill of this process (and of its process group). `exec` keeps
/// it one process, so `childPid` is the process to look for (some shells,
/// e.g. dash, would otherwise fork `sleep` as a second process).
fn spawn_child() -> io::Result<u32> {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exec sleep 1000000000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    info!("spawned child pid={pid}");
    // Reap it in the background, so that killing it does not leave a zombie
    // that still looks alive to `kill(pid, 0)`.
    thread::spawn(move || {
        if let Ok(status) = child.wait() {
            info!("child pid={pid} ended: {status}");
        }
    });
    Ok(pid)
}

// ---------------------------------------------------------------------------
// HTTP routes
// ---------------------------------------------------------------------------

/// What a connection does after a request was handled.
enum Flow {
    /// Read the next request (unless the client asked to close).
    Continue,
    /// Drop the connection.
    Close,
}

fn handle_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream);
    loop {
        let req = match http::read_request(&mut reader) {
            Ok(req) => req,
            Err(ReadError::Eof) | Err(ReadError::Io) => return,
            Err(ReadError::LengthRequired) => {
                let body = r#"{"error":"a Content-Length is required","code":"411"}"#;
                let _ = http::respond(reader.get_ref(), 411, body, false, true);
                return;
            }
            Err(ReadError::Bad(why)) => {
                let body = format!(r#"{{"error":{},"code":"400"}}"#, http::json_str(why));
                let _ = http::respond(reader.get_ref(), 400, &body, false, true);
                return;
            }
        };
        let close = !req.keep_alive();
        let flow = match route(&mut reader, &req, close) {
            Ok(flow) => flow,
            Err(_) => return,
        };
        if close || matches!(flow, Flow::Close) {
            return;
        }
    }
}

fn route(reader: &mut BufReader<TcpStream>, req: &Request, close: bool) -> io::Result<Flow> {
    let a = agent();
    let head = req.method == "HEAD";
    let get = req.method == "GET" || head;
    let out = reader.get_ref();
    match (req.method.as_str(), req.path.as_str()) {
        (_, "/readyz") if get => {
            if a.not_ready.load(Ordering::SeqCst) {
                http::respond(out, 503, r#"{"status":"not ready"}"#, head, close)?;
            } else {
                let body = format!(
                    r#"{{"status":"ok","pid":{},"startedAtUnixMs":{},"readyAtUnixMs":{}}}"#,
                    std::process::id(),
                    a.started_at_ms,
                    a.ready_at_ms.load(Ordering::SeqCst)
                );
                http::respond(out, 200, &body, head, close)?;
            }
        }
        (_, "/livez") if get => http::respond(out, 200, r#"{"status":"ok"}"#, head, close)?,
        (_, "/info") if get => http::respond(out, 200, &info_json(), head, close)?,
        ("POST", "/control/not-ready") => {
            a.not_ready.store(true, Ordering::SeqCst);
            info!("marked not ready");
            http::respond(out, 200, r#"{"status":"ok"}"#, false, close)?;
        }
        ("POST", "/control/read") => {
            let path = String::from_utf8_lossy(&req.body).into_owned();
            let r = match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => std::fs::read_dir(&path).map(|d| d.count()),
                Ok(_) => std::fs::read(&path).map(|b| b.len()),
                Err(e) => Err(e),
            };
            let body = match r {
                Ok(n) => format!(
                    r#"{{"path":{},"ok":true,"bytes":{n}}}"#,
                    http::json_str(&path)
                ),
                Err(e) => format!(
                    r#"{{"path":{},"ok":false,"error":{}}}"#,
                    http::json_str(&path),
                    http::json_str(&e.to_string())
                ),
            };
            info!("read {path}: {body}");
            http::respond(out, 200, &body, false, close)?;
        }
        ("POST", "/control/write") => {
            let path = String::from_utf8_lossy(&req.body).into_owned();
            let text = format!("cattery-test-agent {}\n", std::process::id());
            let body = match std::fs::write(&path, &text) {
                Ok(()) => format!(
                    r#"{{"path":{},"ok":true,"bytes":{}}}"#,
                    http::json_str(&path),
                    text.len()
                ),
                Err(e) => format!(
                    r#"{{"path":{},"ok":false,"error":{}}}"#,
                    http::json_str(&path),
                    http::json_str(&e.to_string())
                ),
            };
            info!("write {path}: {body}");
            http::respond(out, 200, &body, false, close)?;
        }
        ("POST", "/control/leave-kernel") => {
            let tag = String::from_utf8_lossy(&req.body).into_owned();
            let parts: Vec<String> = kernel::leave(&tag)
                .into_iter()
                .map(|(what, r)| {
                    let v = match r {
                        Ok(()) => "true".to_string(),
                        Err(e) => http::json_str(&e),
                    };
                    format!("{}:{v}", http::json_str(&what))
                })
                .collect();
            let body = format!("{{{}}}", parts.join(","));
            info!("left in the kernel: {body}");
            http::respond(out, 200, &body, false, close)?;
        }
        ("POST", "/control/find-kernel") => {
            let tag = String::from_utf8_lossy(&req.body).into_owned();
            let found: Vec<String> = kernel::find(&tag)
                .iter()
                .map(|f| http::json_str(f))
                .collect();
            let body = format!(r#"{{"found":[{}]}}"#, found.join(","));
            info!("found in the kernel: {body}");
            http::respond(out, 200, &body, false, close)?;
        }
        ("POST", "/bot") => return handle_bot(reader, req, close),
        ("GET", "/ws") => {
            let stream = reader.get_ref().try_clone()?;
            if !req.is_websocket_upgrade() {
                let body = r#"{"error":"/ws needs a websocket upgrade","code":"426"}"#;
                http::respond(&stream, 426, body, false, close)?;
                return Ok(Flow::Continue);
            }
            return ws::serve(reader, stream, req);
        }
        _ => {
            info!("session api request {} {}", req.method, req.target);
            http::respond(out, 200, &echo_json(req), head, close)?;
        }
    }
    Ok(Flow::Continue)
}

fn info_json() -> String {
    let a = agent();
    // SAFETY: getpgrp(2) cannot fail.
    let pgid = unsafe { libc::getpgrp() };
    format!(
        concat!(
            r#"{{"pid":{},"pgid":{},"uid":{},"gid":{},"startedAtUnixMs":{},"readyAtUnixMs":{},"#,
            r#""sessionsServed":{},"sessionId":{},"childPid":{},"rssBytes":{}}}"#
        ),
        std::process::id(),
        pgid,
        // SAFETY: getuid(2) and getgid(2) cannot fail.
        unsafe { libc::getuid() },
        unsafe { libc::getgid() },
        a.started_at_ms,
        a.ready_at_ms.load(Ordering::SeqCst),
        a.sessions_served.load(Ordering::SeqCst),
        session_id().map_or("null".to_owned(), |s| http::json_str(&s)),
        a.child_pid.map_or("null".to_owned(), |p| p.to_string()),
        rss_bytes().map_or("null".to_owned(), |b| b.to_string()),
    )
}

/// Resident set size from `/proc/self/statm` (Linux only).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

fn echo_json(req: &Request) -> String {
    // Repeated headers are joined with ", ", in arrival order.
    let mut merged: Vec<(&str, String)> = Vec::new();
    for (name, value) in &req.headers {
        match merged.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => {
                v.push_str(", ");
                v.push_str(value);
            }
            None => merged.push((name, value.clone())),
        }
    }
    let headers = merged
        .iter()
        .map(|(n, v)| format!("{}:{}", http::json_str(n), http::json_str(v)))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"{{"method":{},"path":{},"query":{},"headers":{{{headers}}},"body":{}}}"#,
        http::json_str(&req.method),
        http::json_str(&req.path),
        http::json_str(&req.query),
        http::json_str(&String::from_utf8_lossy(&req.body)),
    )
}

// ---------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------

/// Claims the one session this process may serve. Returns false (and logs
/// the reuse) if a session was already started.
fn start_session(req: &Request, body: &str) -> bool {
    let a = agent();
    let sid = req.header("x-daily-session-id");
    if a.session_taken.swap(true, Ordering::SeqCst) {
        error!(
            "second session in same process (session={})",
            sid.unwrap_or("none")
        );
        return false;
    }
    *SESSION_ID.lock().unwrap_or_else(|e| e.into_inner()) = sid.map(str::to_owned);
    a.sessions_served.fetch_add(1, Ordering::SeqCst);
    info!(
        "bot started session={} transport={} max_session_seconds={} body={}",
        sid.unwrap_or("none"),
        req.header("x-daily-transport-type").unwrap_or("none"),
        req.header("x-pcc-max-session-seconds").unwrap_or("none"),
        body.replace('\r', "\\r").replace('\n', "\\n"),
    );
    for key in &a.opts.print_env {
        match std::env::var_os(key) {
            Some(v) => info!("env {key}={}", v.to_string_lossy()),
            None => info!("env {key}=<unset>"),
        }
    }
    if let Some(mb) = a.opts.rss_grow_mb {
        grow_rss(mb);
    }
    if let Some(s) = a.opts.flood_seconds {
        // A flood of output, written straight to stdout in large writes.
        thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs_f64(s);
            let pad = "x".repeat(190);
            let mut out = io::BufWriter::with_capacity(1 << 20, io::stdout().lock());
            let mut n = 0u64;
            while Instant::now() < until {
                for _ in 0..1000 {
                    n += 1;
                    let _ = writeln!(out, "flood {n} {pad}");
                }
            }
            let _ = out.flush();
        });
    }
    if let Some(ms) = a.opts.tick_ms {
        // Numbered lines: a test finds a gap in the captured logs by a missing number.
        thread::spawn(move || {
            for n in 1u64.. {
                thread::sleep(Duration::from_millis(ms.max(1)));
                info!("tick {n}");
            }
        });
    }
    if let Some(s) = a.opts.exit_after {
        let code = a.opts.exit_code;
        thread::spawn(move || {
            thread::sleep(Duration::from_secs_f64(s));
            info!("exiting after {s} s with code {code}");
            std::process::exit(code);
        });
    }
    true
}

/// Allocates `mb` MiB, touches every page and leaks the memory.
fn grow_rss(mb: u64) {
    let len = usize::try_from(mb).unwrap_or(usize::MAX / 2 / (1 << 20)) << 20;
    let mut block = vec![0u8; len].into_boxed_slice();
    for i in (0..len).step_by(4096) {
        // SAFETY: `i < len`; the volatile write keeps the touch from being
        // optimised away.
        unsafe { std::ptr::write_volatile(block.as_mut_ptr().add(i), 1) };
    }
    Box::leak(block);
    info!("allocated {mb} MB");
}

/// The client transport (the `/bot` connection or the websocket) closed.
/// Exits 0 unless `--ignore-transport-close`.
fn transport_closed() {
    if agent().opts.ignore_transport_close {
        info!("transport closed, ignoring");
    } else {
        info!("transport closed, ending session");
        std::process::exit(0);
    }
}

fn handle_bot(reader: &mut BufReader<TcpStream>, req: &Request, close: bool) -> io::Result<Flow> {
    let out = reader.get_ref();
    let body = String::from_utf8_lossy(&req.body);
    if !body.trim_start().starts_with('{') {
        let err = r#"{"error":"the body must be a JSON object","code":"422"}"#;
        http::respond(out, 422, err, false, close)?;
        return Ok(Flow::Continue);
    }
    if !start_session(req, &body) {
        let err = r#"{"error":"this instance already served a session","code":"409"}"#;
        http::respond(out, 409, err, false, close)?;
        return Ok(Flow::Continue);
    }

    let bot_seconds = agent().opts.bot_seconds;
    let deadline = bot_seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let stream = reader.get_ref();
    stream.set_nonblocking(true)?;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stream.set_nonblocking(false)?;
            info!("session finished after {} s", bot_seconds.unwrap_or(0.0));
            http::respond(stream, 200, "{}", false, close)?;
            return Ok(Flow::Continue);
        }
        if peer_closed(stream) {
            transport_closed();
            return Ok(Flow::Close);
        }
        let mut nap = Duration::from_millis(100);
        if let Some(d) = deadline {
            nap = nap.min(d.saturating_duration_since(Instant::now()));
        }
        thread::sleep(nap);
    }
}

/// Whether the peer of a non-blocking socket has gone away. Anything the
/// client sends during the session is read and dropped, so that a later
/// close is still seen.
fn peer_closed(mut stream: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}
