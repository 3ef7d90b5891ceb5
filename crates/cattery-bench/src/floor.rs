//! The physical floor, measured on the same machine in the same run: fork/exec of a trivial
//! program, one loopback HTTP request/response on a keep-alive connection, and the test
//! agent's own start and exit when run directly (no platform in between).

use std::convert::Infallible;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;

use crate::stats::ms;

/// A trivial program to fork/exec.
pub fn true_program() -> &'static str {
    if Path::new("/bin/true").exists() {
        "/bin/true"
    } else {
        "/usr/bin/true"
    }
}

/// Times `n` runs of fork/exec/wait of `/bin/true`. With `like_cattery`, the child runs a
/// `pre_exec` hook calling `setsid()` (how Cattery's runtime spawned before it moved to
/// `clone(CLONE_VM | CLONE_VFORK)`), which forces the fork path (std otherwise uses
/// `posix_spawn`/`vfork`). Blocking: call from a blocking thread.
pub fn fork_exec(n: usize, like_cattery: bool) -> Vec<f64> {
    let prog = true_program();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cmd = Command::new(prog);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if like_cattery {
            // SAFETY: setsid(2) is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        let t0 = Instant::now();
        match cmd.spawn().and_then(|mut c| c.wait()) {
            Ok(_) => out.push(ms(t0.elapsed())),
            Err(e) => eprintln!("[bench] fork/exec failed: {e}"),
        }
    }
    out
}

/// Starts a minimal HTTP/1.1 server (hyper, one current-thread runtime on its own OS thread)
/// answering every request with `200 {"status":"ok"}`. Returns its port. The thread lives
/// as long as the process.
pub fn start_floor_server() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("floor-http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("floor server runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("floor server listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(|_req| async {
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(b"{\"status\":\"ok\"}")))
                                    .expect("static response"),
                            )
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })?;
    Ok(port)
}

/// Times `n` sequential `GET url` round trips on one keep-alive client (after `warmup`
/// untimed ones).
pub async fn http_round_trips(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    warmup: usize,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n + warmup {
        let t0 = Instant::now();
        let ok = match client.get(url).send().await {
            Ok(r) => r.bytes().await.is_ok(),
            Err(_) => false,
        };
        if ok && i >= warmup {
            out.push(ms(t0.elapsed()));
        }
    }
    out
}

/// The test agent run directly (no platform): `(spawn to accepting connections, SIGTERM to
/// reaped)` in ms for each of `n` runs. Blocking: call from a blocking thread.
pub fn agent_direct(agent: &Path, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut ready = Vec::new();
    let mut exit = Vec::new();
    for _ in 0..n {
        let Ok(port) = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
        else {
            continue;
        };
        let t0 = Instant::now();
        let child = Command::new(agent)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { continue };
        let mut up = false;
        while t0.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if up {
            ready.push(ms(t0.elapsed()));
        }
        let t1 = Instant::now();
        crate::sys::signal(child.id() as i32, libc::SIGTERM);
        let _ = child.wait();
        if up {
            exit.push(ms(t1.elapsed()));
        }
    }
    (ready, exit)
}
