//! Loopback ports for instances.
//!
//! An agent binds its `$PORT` itself, possibly many seconds after the port was chosen (slow
//! imports), so the port must stay free meanwhile. A port handed out by the kernel for
//! `bind(0)` comes from the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), where
//! any other process's `bind(0)` or outgoing connection may take it in the meantime; a foreign
//! process answering `/readyz` there would then be taken for the instance. So:
//!
//! - ports are chosen at random **outside the ephemeral range** ([`PORT_FLOOR`] up to the
//!   range's start, or above its end), and must be bindable at the moment of choice;
//! - each is reserved **machine-wide** while its instance lives, by an exclusive `flock` on
//!   `<temp dir>/cattery-ports/<port>.lock`, so servers sharing a machine never pick the same
//!   one (the kernel drops the lock if the server dies; a restarted server takes it again when
//!   it re-adopts the instance);
//! - and the supervisor only trusts `/readyz` once the instance's own processes hold the
//!   listening socket ([`super::Instance::serves_port`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use parking_lot::Mutex;

/// Lowest port handed out (below it live well-known services).
pub const PORT_FLOOR: u16 = 20000;

/// The ports of one server's live instances, each with its machine-wide lock.
pub struct PortBook {
    lock_dir: Option<PathBuf>,
    held: Mutex<HashMap<u16, Option<File>>>,
    range: (u16, u16),
}

/// `[lo, hi]` of the kernel's ephemeral port range (Linux default 32768..=60999).
fn ephemeral_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

fn try_lock(dir: &std::path::Path, port: u16) -> Option<File> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{port}.lock")))
        .ok()?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(f)
}

impl PortBook {
    /// A new book; the lock directory is created if possible (without it, ports are still
    /// chosen outside the ephemeral range, only without the cross-server reservation).
    pub fn new() -> PortBook {
        let dir = std::env::temp_dir().join("cattery-ports");
        let lock_dir = fs::create_dir_all(&dir).ok().map(|_| dir);
        let (lo, hi) = ephemeral_range();
        // The larger free stretch outside [lo, hi].
        let below = (PORT_FLOOR, lo.saturating_sub(1));
        let above = (hi.saturating_add(1), u16::MAX);
        let size = |r: (u16, u16)| u32::from(r.1).saturating_sub(u32::from(r.0));
        let range = if size(below) >= size(above) {
            below
        } else {
            above
        };
        PortBook {
            lock_dir,
            held: Mutex::new(HashMap::new()),
            range,
        }
    }

    /// Reserves a free port. Errors: none could be found (after many tries).
    pub fn reserve(&self) -> std::io::Result<u16> {
        let (lo, hi) = self.range;
        if hi > lo + 100 {
            let span = u32::from(hi - lo) + 1;
            let start: u32 = rand::random::<u32>() % span;
            for i in 0..512u32 {
                let port = lo + ((start + i * 7919) % span) as u16;
                if let Some(p) = self.try_take(port) {
                    return Ok(p);
                }
            }
        }
        // A machine with no room outside the ephemeral range: let the kernel choose.
        for _ in 0..64 {
            let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
            if let Some(p) = self.try_take(port) {
                return Ok(p);
            }
        }
        Err(std::io::Error::other("no free loopback port"))
    }

    fn try_take(&self, port: u16) -> Option<u16> {
        let mut held = self.held.lock();
        if held.contains_key(&port) {
            return None;
        }
        let lock = match &self.lock_dir {
            Some(d) => Some(try_lock(d, port)?),
            None => None,
        };
        // Free right now (the lock alone does not keep other programs off it).
        drop(TcpListener::bind(("127.0.0.1", port)).ok()?);
        held.insert(port, lock);
        Some(port)
    }

    /// Takes back the port of a re-adopted instance (its agent already holds it).
    pub fn adopt(&self, port: u16) {
        let lock = self.lock_dir.as_ref().and_then(|d| try_lock(d, port));
        self.held.lock().insert(port, lock);
    }

    /// Releases a port (and its lock).
    pub fn release(&self, port: u16) {
        self.held.lock().remove(&port);
    }
}

impl Default for PortBook {
    fn default() -> Self {
        Self::new()
    }
}

/// Inodes of the sockets listening on TCP `port` (IPv4 and IPv6, any address).
///
/// Asks the kernel through netlink `sock_diag` for listening sockets on that port only: the
/// kernel walks just its listening hash and filters by port, so the cost does not grow with
/// the number of connections on the machine. `/proc/net/tcp{,6}` (the fallback when netlink
/// is unavailable) lists every socket, `TIME_WAIT` included: with a few thousand loopback
/// connections (churn, 1,000 sessions) one read cost milliseconds of kernel time, and it was
/// 40 % of the control plane's CPU in a start/stop churn.
pub fn listening_inodes(port: u16) -> Vec<u64> {
    match diag::listening_inodes(port) {
        Ok(v) => v,
        Err(_) => proc_listening_inodes(port),
    }
}

/// [`listening_inodes`] through `/proc/net/tcp{,6}` (state `0A` = LISTEN).
pub fn proc_listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                if let Ok(inode) = f[9].parse::<u64>() {
                    out.push(inode);
                }
            }
        }
    }
    out
}

/// Netlink `sock_diag` (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`): a dump of the TCP
/// sockets in state LISTEN whose source port is the one asked for.
mod diag {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 0x2;
    const NLMSG_DONE: u16 = 0x3;
    const TCP_LISTEN: u32 = 10;
    /// `sizeof(struct nlmsghdr)`.
    const NLMSG_HDR: usize = 16;
    /// `sizeof(struct inet_diag_msg)`: family, state, timer, retrans (4), sockid (48),
    /// expires, rqueue, wqueue, uid, inode (20).
    const DIAG_MSG: usize = 72;

    #[repr(C)]
    struct Request {
        // struct nlmsghdr
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
        // struct inet_diag_req_v2
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        // struct inet_diag_sockid
        sport: u16,
        dport: u16,
        src: [u32; 4],
        dst: [u32; 4],
        ifindex: u32,
        cookie: [u32; 2],
    }

    fn dump(sock: &OwnedFd, family: u8, port: u16, out: &mut Vec<u64>) -> io::Result<()> {
        let req = Request {
            len: std::mem::size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST | NLM_F_DUMP,
            seq: u32::from(family),
            pid: 0,
            family,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: 1 << TCP_LISTEN,
            sport: port.to_be(),
            dport: 0,
            src: [0; 4],
            dst: [0; 4],
            ifindex: 0,
            cookie: [0; 2],
        };
        // SAFETY: sending a plain-old-data request from a live buffer of its own size.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                (&req as *const Request).cast(),
                std::mem::size_of::<Request>(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: receiving into a buffer we own, at most its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let data = &buf[..n as usize];
            if data.is_empty() {
                return Err(io::Error::other("netlink: empty answer"));
            }
            let mut off = 0;
            while off + NLMSG_HDR <= data.len() {
                let u32_at = |o: usize| u32::from_ne_bytes(data[o..o + 4].try_into().unwrap());
                let len = u32_at(off) as usize;
                let kind = u16::from_ne_bytes(data[off + 4..off + 6].try_into().unwrap());
                if len < NLMSG_HDR || off + len > data.len() {
                    return Err(io::Error::other("netlink: bad message length"));
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = if len >= NLMSG_HDR + 4 {
                            -(u32_at(off + NLMSG_HDR) as i32)
                        } else {
                            libc::EIO
                        };
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + DIAG_MSG => {
                        let m = off + NLMSG_HDR;
                        let state = data[m + 1];
                        let sport = u16::from_be_bytes([data[m + 4], data[m + 5]]);
                        let inode = u32_at(m + 68);
                        if u32::from(state) == TCP_LISTEN && sport == port {
                            out.push(u64::from(inode));
                        }
                    }
                    _ => {}
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Inodes of TCP sockets listening on `port`, IPv4 and IPv6.
    pub fn listening_inodes(port: u16) -> io::Result<Vec<u64>> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut out = Vec::new();
        dump(&sock, libc::AF_INET as u8, port, &mut out)?;
        match dump(&sock, libc::AF_INET6 as u8, port, &mut out) {
            Ok(()) => {}
            // A kernel without IPv6 has no AF_INET6 handler.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }
}

/// Whether one of `pids` has one of the socket `inodes` open.
pub fn pids_hold_socket(pids: &[i32], inodes: &[u64]) -> bool {
    if inodes.is_empty() {
        return false;
    }
    for pid in pids {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(target) = fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    if inodes.contains(&n) {
                        return true;
                    }
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_ownership_is_seen() {
        let book = PortBook::new();
        let (lo, hi) = ephemeral_range();
        let a = book.reserve().unwrap();
        let b = book.reserve().unwrap();
        assert_ne!(a, b);
        assert!(!(lo..=hi).contains(&a), "{a} in {lo}..={hi}");
        // Another book (another server) cannot take a held port.
        let other = PortBook::new();
        if book.lock_dir.is_some() {
            assert!(other.try_take(a).is_none());
        }
        let l = TcpListener::bind(("127.0.0.1", a)).unwrap();
        let inodes = listening_inodes(a);
        assert!(!inodes.is_empty());
        // netlink and /proc agree (when netlink works here).
        if let Ok(mut v) = diag::listening_inodes(a) {
            let mut p = proc_listening_inodes(a);
            v.sort_unstable();
            p.sort_unstable();
            assert_eq!(v, p);
        }
        let l6 = std::net::TcpListener::bind(("::1", a));
        if let Ok(l6) = &l6 {
            let port6 = l6.local_addr().unwrap().port();
            let mut v = listening_inodes(port6);
            let mut p = proc_listening_inodes(port6);
            v.sort_unstable();
            p.sort_unstable();
            assert_eq!(v, p);
            assert_eq!(v.len(), 2, "the IPv4 and the IPv6 listener");
        }
        assert!(pids_hold_socket(&[std::process::id() as i32], &inodes));
        assert!(!pids_hold_socket(&[1], &inodes) || std::process::id() == 1);
        drop(l);
        book.release(a);
        assert!(other.try_take(a).is_some());
    }
}
