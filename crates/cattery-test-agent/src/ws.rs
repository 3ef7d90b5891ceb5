//! The `/ws` websocket session (RFC 6455): handshake, echo, ping/pong,
//! 20 ms "audio" frames and close handling.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;

use crate::http::{self, Request};
use crate::{agent, info, start_session, transport_closed, warning, Flow};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// Largest frame or message accepted from the client.
const MAX_MESSAGE: u64 = 16 * 1024 * 1024;
/// One audio frame: 20 ms of silence.
const AUDIO_BYTES: usize = 320;
const AUDIO_PERIOD: Duration = Duration::from_millis(20);

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    STANDARD.encode(sha.digest().bytes())
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// The session body from the base64 `body` query parameter, as text.
fn body_from_query(query: &str) -> String {
    let Some(raw) = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "body")
        .map(|(_, v)| v)
    else {
        return String::new();
    };
    // `+` is a base64 digit here, not an encoded space.
    let encoded = percent_decode(&raw.replace('+', "%2B"));
    let decoded = [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(&encoded).ok());
    match decoded {
        Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        None => {
            warning!("the body query parameter is not base64; logging it as is");
            String::from_utf8_lossy(&encoded).into_owned()
        }
    }
}

/// One frame as sent by the client (unmasked).
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

fn read_frame(r: &mut impl Read) -> io::Result<Frame> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        r.read_exact(&mut b)?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Frame {
        fin,
        opcode,
        payload,
    })
}

/// An unmasked server frame with FIN set.
fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    encode_frame(OP_CLOSE, &payload)
}

/// The write half, shared by the reader (echo, pong, close) and the audio
/// thread.
type Writer = Arc<Mutex<TcpStream>>;

fn send(w: &Writer, frame: &[u8]) -> io::Result<()> {
    let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
    s.write_all(frame)
}

/// Serves a websocket upgrade request on `/ws` until the session ends.
pub(crate) fn serve(
    reader: &mut BufReader<TcpStream>,
    stream: TcpStream,
    req: &Request,
) -> io::Result<Flow> {
    let body = body_from_query(&req.query);
    if !start_session(req, &body) {
        let err = r#"{"error":"this instance already served a session","code":"409"}"#;
        http::respond(&stream, 409, err, false, !req.keep_alive())?;
        return Ok(Flow::Continue);
    }

    let key = req.header("sec-websocket-key").unwrap_or_default();
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    // Accept the first subprotocol offered, if any.
    if let Some(proto) = req
        .header("sec-websocket-protocol")
        .and_then(|p| p.split(',').next())
    {
        response.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", proto.trim()));
    }
    response.push_str("\r\n");
    (&stream).write_all(response.as_bytes())?;
    info!("websocket connected");

    let writer: Writer = Arc::new(Mutex::new(stream));
    let stop = Arc::new(AtomicBool::new(false));
    // Set when the agent ends the session itself (--bot-seconds).
    let closing = Arc::new(AtomicBool::new(false));
    {
        let (writer, stop, closing) = (writer.clone(), stop.clone(), closing.clone());
        thread::spawn(move || audio_loop(&writer, &stop, &closing));
    }

    let ended_by_client = read_loop(reader, &writer, &closing);
    stop.store(true, Ordering::SeqCst);
    if ended_by_client {
        transport_closed();
    } else {
        info!("websocket closed");
    }
    let _ = writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown(Shutdown::Both);
    Ok(Flow::Close)
}

/// Reads client frames until the connection ends. Returns true if the
/// client ended it (close frame, EOF or error), false if the agent did.
fn read_loop(reader: &mut BufReader<TcpStream>, writer: &Writer, closing: &AtomicBool) -> bool {
    // A fragmented text/binary message being reassembled.
    let mut message: Option<(u8, Vec<u8>)> = None;
    loop {
        let frame = match read_frame(reader) {
            Ok(f) => f,
            Err(e) => {
                if closing.load(Ordering::SeqCst) {
                    return false;
                }
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    info!("websocket peer went away without a close frame");
                } else {
                    info!("websocket read failed: {e}");
                }
                return true;
            }
        };
        match frame.opcode {
            OP_TEXT | OP_BINARY | OP_CONT => {
                let (opcode, mut data) = match (frame.opcode, message.take()) {
                    (OP_CONT, Some(m)) => m,
                    (OP_CONT, None) => {
                        warning!("websocket continuation without a message");
                        let _ = send(writer, &close_frame(1002, "protocol error"));
                        return true;
                    }
                    (op, _) => (op, Vec::new()),
                };
                data.extend_from_slice(&frame.payload);
                if data.len() as u64 > MAX_MESSAGE {
                    let _ = send(writer, &close_frame(1009, "message too big"));
                    return true;
                }
                if frame.fin {
                    if send(writer, &encode_frame(opcode, &data)).is_err() {
                        return !closing.load(Ordering::SeqCst);
                    }
                } else {
                    message = Some((opcode, data));
                }
            }
            OP_PING => {
                let _ = send(writer, &encode_frame(OP_PONG, &frame.payload));
            }
            OP_PONG => {}
            OP_CLOSE => {
                if closing.load(Ordering::SeqCst) {
                    // The client's answer to our close frame.
                    return false;
                }
                let code = frame
                    .payload
                    .get(..2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]));
                match code {
                    Some(c) => info!("websocket close frame received, code {c}"),
                    None => info!("websocket close frame received"),
                }
                let _ = send(writer, &close_frame(code.unwrap_or(1000), ""));
                return true;
            }
            op => {
                warning!("websocket frame with unknown opcode {op}");
                let _ = send(writer, &close_frame(1002, "protocol error"));
                return true;
            }
        }
    }
}

/// Sends 320 zero bytes every 20 ms; with `--bot-seconds`, closes the
/// websocket when the session's time is up.
fn audio_loop(writer: &Writer, stop: &AtomicBool, closing: &AtomicBool) {
    let bot_seconds = agent().opts.bot_seconds;
    let start = Instant::now();
    let deadline = bot_seconds.map(|s| start + Duration::from_secs_f64(s));
    let frame = encode_frame(OP_BINARY, &[0u8; AUDIO_BYTES]);
    let mut next = start;
    loop {
        if let Some(d) = deadline {
            if Instant::now() >= d {
                closing.store(true, Ordering::SeqCst);
                info!(
                    "session finished after {} s, closing websocket",
                    bot_seconds.unwrap_or(0.0)
                );
                let _ = send(writer, &close_frame(1000, "session ended"));
                // Don't wait for the client's close frame forever: a
                // shutdown wakes up the reader (the socket stays open until
                // the last clone is dropped, so this cannot hit another
                // connection).
                thread::sleep(Duration::from_secs(2));
                let s = writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
        }
        if stop.load(Ordering::SeqCst) || send(writer, &frame).is_err() {
            return;
        }
        next += AUDIO_PERIOD;
        let wake = deadline.map_or(next, |d| d.min(next));
        thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn body_query_parameter() {
        assert_eq!(body_from_query("a=1&body=eyJ4IjoxfQ%3D%3D"), r#"{"x":1}"#);
        assert_eq!(body_from_query("body=eyJ4IjoxfQ=="), r#"{"x":1}"#);
        assert_eq!(body_from_query("x=1"), "");
    }
}
