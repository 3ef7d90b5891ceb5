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
//!   `<lock root>/ports/<port>.lock` (`/run/cattery` as root, see [`super::locks`]), so
//!   servers sharing a machine never pick the same one (the kernel drops the lock if the
//!   server dies; a restarted server takes it again when it re-adopts the instance);
//! - and the session engine only trusts `/readyz` once the instance's own processes hold the
//!   listening socket ([`crate::runtime::Instance::owns_endpoint`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::net::TcpListener;
use std::path::PathBuf;

use nix::fcntl::Flock;
use parking_lot::Mutex;

/// Lowest port handed out (below it live well-known services).
pub const PORT_FLOOR: u16 = 20000;

/// The ports of one server's live instances, each with its machine-wide lock.
pub struct PortBook {
    lock_dir: Option<PathBuf>,
    held: Mutex<HashMap<u16, Option<Flock<File>>>>,
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

/// `[lo, hi]` of the ports instances are given on this machine: the larger stretch outside
/// the kernel's ephemeral range, from [`PORT_FLOOR`] up (20000..=32767 with Linux's default).
pub fn instance_ports() -> (u16, u16) {
    instance_range(ephemeral_range())
}

/// The larger stretch outside the ephemeral range `[lo, hi]`, from [`PORT_FLOOR`] up.
fn instance_range((lo, hi): (u16, u16)) -> (u16, u16) {
    let below = (PORT_FLOOR, lo.saturating_sub(1));
    let above = (hi.saturating_add(1), u16::MAX);
    let size = |r: (u16, u16)| u32::from(r.1).saturating_sub(u32::from(r.0));
    if size(below) >= size(above) {
        below
    } else {
        above
    }
}

/// What to tell the operator when a server's `--listen` port lies among the instance ports
/// `range`: while the server is down (a restart), an instance of another server on this
/// machine may be given that port and hold it for its whole session, and the server then
/// cannot listen again. `None` outside the range.
pub fn listen_port_warning(port: u16, range: (u16, u16)) -> Option<String> {
    (range.0..=range.1).contains(&port).then(|| {
        format!(
            "--listen port {port} is among the ports instances are given on this machine \
             ({}-{}): while this server is down (a restart), an instance of another server \
             here may take it and hold it for its session; listen on a port outside that \
             range (the default is 7870)",
            range.0, range.1
        )
    })
}

/// The machine-wide reservation of `port`; `None` when another server holds it.
fn try_lock(dir: &std::path::Path, port: u16) -> Option<Flock<File>> {
    super::locks::lock_file(&dir.join(format!("{port}.lock")), false)
}

impl PortBook {
    /// A new book; the lock directory is created if possible (without it, ports are still
    /// chosen outside the ephemeral range, only without the cross-server reservation).
    pub fn new() -> PortBook {
        PortBook {
            lock_dir: super::locks::lock_dir("ports"),
            held: Mutex::new(HashMap::new()),
            range: instance_range(ephemeral_range()),
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

    /// How many ports are held.
    #[cfg(test)]
    pub fn held_count(&self) -> usize {
        self.held.lock().len()
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

/// Netlink `sock_diag` (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`) through the
/// `netlink-packet-sock-diag` and `netlink-sys` crates: a dump of the TCP sockets in state
/// LISTEN whose source port is the one asked for (the kernel filters by that port).
mod diag {
    use std::io;

    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    fn dump(sock: &Socket, family: u8, port: u16, out: &mut Vec<u64>) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = u32::from(family);
        let mut socket_id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        socket_id.source_port = port;
        let mut req = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        sock.send(&buf, 0)?;
        let mut rx: Vec<u8> = Vec::with_capacity(16 * 1024);
        loop {
            rx.clear();
            let n = sock.recv(&mut rx, 0)?;
            if n == 0 {
                return Err(io::Error::other("netlink: empty answer"));
            }
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                    .map_err(|e| io::Error::other(format!("netlink: {e}")))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return Err(e
                            .code
                            .map(|c| io::Error::from_raw_os_error(-c.get()))
                            .unwrap_or_else(|| io::Error::other("netlink: error")))
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                        if r.header.state == TCP_LISTEN
                            && r.header.socket_id.source_port == port =>
                    {
                        out.push(u64::from(r.header.inode));
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    /// A `sock_diag` socket kept between checks (close-on-exec, as `netlink-sys` opens
    /// it): one per check cost four more system calls (`socket`, `bind`, `getsockname`,
    /// `close`) on every start. A check takes it out and puts it back when done, so checks
    /// at the same time never wait for each other (each one without the kept socket opens
    /// its own, and the one that finishes last closes it). Dropped after any error, so a
    /// socket left in an unknown state (a dump read halfway) is never asked again.
    pub(super) static SOCKET: parking_lot::Mutex<Option<Socket>> = parking_lot::Mutex::new(None);

    fn open() -> io::Result<Socket> {
        let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(sock)
    }

    fn query(sock: &Socket, port: u16) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        dump(sock, AF_INET, port, &mut out)?;
        match dump(sock, AF_INET6, port, &mut out) {
            Ok(()) => {}
            // A kernel without IPv6 has no AF_INET6 handler.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }

    /// Inodes of TCP sockets listening on `port`, IPv4 and IPv6.
    pub fn listening_inodes(port: u16) -> io::Result<Vec<u64>> {
        let kept = SOCKET.lock().take();
        let sock = match kept {
            Some(s) => s,
            None => open()?,
        };
        let out = query(&sock, port)?;
        SOCKET.lock().get_or_insert(sock);
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
    fn a_listen_port_among_the_instance_ports_is_warned_about() {
        let range = instance_range((32768, 60999));
        assert_eq!(range, (PORT_FLOOR, 32767));
        assert_eq!(instance_range((10000, 60999)), (60999 + 1, u16::MAX));
        for port in [7870, 19999, 32768, 45000] {
            assert_eq!(listen_port_warning(port, range), None, "{port}");
        }
        for port in [20000, 21873, 32767] {
            let w = listen_port_warning(port, range).expect("warned");
            assert!(
                w.contains(&port.to_string()) && w.contains("20000-32767"),
                "{w}"
            );
        }
    }

    #[test]
    fn the_kept_netlink_socket_answers_each_check_afresh() {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let Ok(first) = diag::listening_inodes(port) else {
            return; // no netlink here: the /proc fallback is used
        };
        assert_eq!(first.len(), 1);
        // Kept (another test's check may hold it for a moment).
        let kept = (0..200).any(|_| {
            let k = diag::SOCKET.lock().is_some();
            if !k {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            k
        });
        assert!(kept, "the socket is kept");
        let other = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port2 = other.local_addr().unwrap().port();
        assert_eq!(diag::listening_inodes(port2).unwrap().len(), 1);
        drop(l);
        assert_eq!(diag::listening_inodes(port).unwrap(), Vec::<u64>::new());
        assert_eq!(diag::listening_inodes(port2).unwrap().len(), 1);
    }

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
