//! A minimal HTTP/1.1 server side: request parsing (Content-Length bodies
//! only) and JSON responses.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// A parsed request.
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    pub path: String,
    /// The raw query string, without `?` (empty if none).
    pub query: String,
    pub version: String,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the connection may be reused after this request.
    pub fn keep_alive(&self) -> bool {
        if self.version == "HTTP/1.0" {
            self.header_has_token("connection", "keep-alive")
        } else {
            !self.header_has_token("connection", "close")
        }
    }

    /// Whether this is a websocket upgrade request.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.header_has_token("upgrade", "websocket") && self.header("sec-websocket-key").is_some()
    }
}

/// Why no request could be read.
pub enum ReadError {
    /// The client closed the connection between requests.
    Eof,
    /// A body without a Content-Length (chunked, or missing on a method
    /// that needs one). The connection cannot be reused.
    LengthRequired,
    /// A malformed request.
    Bad(&'static str),
    /// The connection failed.
    Io,
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads one request, body included.
pub fn read_request(r: &mut BufReader<TcpStream>) -> Result<Request, ReadError> {
    let mut line = Vec::new();
    let mut total = 0;
    let mut read_line = |line: &mut Vec<u8>| -> Result<usize, ReadError> {
        line.clear();
        let n = r.read_until(b'\n', line).map_err(|_| ReadError::Io)?;
        total += n;
        if total > MAX_HEAD {
            return Err(ReadError::Bad("request head too large"));
        }
        Ok(n)
    };

    // Request line; empty lines before it are ignored (RFC 9112 2.2).
    loop {
        if read_line(&mut line)? == 0 {
            return Err(ReadError::Eof);
        }
        if !trim_crlf(&line).is_empty() {
            break;
        }
    }
    let request_line = String::from_utf8_lossy(trim_crlf(&line)).into_owned();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad("unsupported HTTP version"));
    }

    let mut headers = Vec::new();
    loop {
        if read_line(&mut line)? == 0 {
            return Err(ReadError::Eof);
        }
        let l = trim_crlf(&line);
        if l.is_empty() {
            break;
        }
        let l = String::from_utf8_lossy(l);
        let Some((name, value)) = l.split_once(':') else {
            return Err(ReadError::Bad("malformed header line"));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }

    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        version: version.to_owned(),
        headers,
        body: Vec::new(),
    };

    if req.header("transfer-encoding").is_some() {
        return Err(ReadError::LengthRequired);
    }
    let len = match req.header("content-length") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ReadError::Bad("invalid Content-Length"))?,
        None if matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") => {
            return Err(ReadError::LengthRequired);
        }
        None => 0,
    };
    if len > MAX_BODY {
        return Err(ReadError::Bad("body too large"));
    }
    if len > 0 && req.header_has_token("expect", "100-continue") {
        let mut out = r.get_ref();
        out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| ReadError::Io)?;
    }
    req.body = vec![0; len];
    r.read_exact(&mut req.body).map_err(|_| ReadError::Io)?;
    Ok(req)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        411 => "Length Required",
        422 => "Unprocessable Entity",
        426 => "Upgrade Required",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a JSON response. `head_only` leaves out the body (for `HEAD`);
/// `close` announces that the connection will be closed.
pub fn respond(
    mut out: &TcpStream,
    status: u16,
    body: &str,
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let mut msg = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    if close {
        msg.push_str("Connection: close\r\n");
    }
    msg.push_str("\r\n");
    if !head_only {
        msg.push_str(body);
    }
    out.write_all(msg.as_bytes())?;
    out.flush()
}

/// A JSON string literal (with quotes) for `s`.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
