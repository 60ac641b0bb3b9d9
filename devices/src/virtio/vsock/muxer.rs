//! The host side of the hybrid vsock: one Unix listener for host-initiated
//! connections (`CONNECT <port>\n`), Unix connects to `<uds_path>_<port>`
//! for guest-initiated ones, and the table that routes packets between
//! guest ports and host streams.
//!
//! Streams are never closed while they may be in the event loop's epoll set:
//! they go to `graveyard`, and the event handler deregisters them before
//! dropping them (the event manager refuses a reused fd number otherwise).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::EventSet;

use super::connection::{ConnKey, Connection, RX_STAGE_CAP};
use super::packet::{Header, HOST_CID, OP_REQUEST, OP_RST};

/// Most connections at once; further requests are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host streams that have connected but not yet sent `CONNECT`.
pub const MAX_HANDSHAKES: usize = 64;
/// Most RSTs for unknown connections waiting for an rx buffer; when full,
/// the tx queue is not drained until rx catches up.
pub const MAX_RST_QUEUE: usize = 256;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First local port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A host stream that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Routes packets between guest ports and host Unix streams.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    rst_queue: VecDeque<Header>,
    rx_queue: VecDeque<ConnKey>,
    rx_queued: HashSet<ConnKey>,
    /// Host fds whose wanted epoll events may have changed.
    touched: HashSet<RawFd>,
    /// Streams to deregister from epoll, then close.
    graveyard: Vec<UnixStream>,
    next_local_port: u32,
    scratch: Vec<u8>,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rst_queue: VecDeque::new(),
            rx_queue: VecDeque::new(),
            rx_queued: HashSet::new(),
            touched: HashSet::new(),
            graveyard: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0u8; RX_STAGE_CAP],
        }
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the RST queue has no room for another reply.
    pub fn rst_queue_full(&self) -> bool {
        self.rst_queue.len() >= MAX_RST_QUEUE
    }

    pub fn has_rx_work(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }

    /// Drops every connection and pending handshake (driver or transport
    /// reset); host programs see EOF.
    pub fn reset_all(&mut self) {
        for (_, mut conn) in self.conns.drain() {
            conn.kill();
            self.graveyard.push(conn.into_stream());
        }
        for (_, hs) in self.handshakes.drain() {
            self.graveyard.push(hs.stream);
        }
        self.by_fd.clear();
        self.rst_queue.clear();
        self.rx_queue.clear();
        self.rx_queued.clear();
        self.touched.clear();
    }

    /// Streams to deregister and close.
    pub fn take_graveyard(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.graveyard)
    }

    /// Host fds whose epoll interest must be re-synced, with the events
    /// they want now (`None`: no longer ours, already in the graveyard).
    pub fn take_touched(&mut self) -> Vec<(RawFd, Option<EventSet>)> {
        let touched = std::mem::take(&mut self.touched);
        touched
            .into_iter()
            .map(|fd| {
                let wanted = if self.handshakes.contains_key(&fd) {
                    Some(EventSet::IN)
                } else {
                    self.by_fd
                        .get(&fd)
                        .and_then(|k| self.conns.get(k))
                        .map(Connection::wanted_events)
                };
                (fd, wanted)
            })
            .collect()
    }

    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        if self.rst_queue.len() >= MAX_RST_QUEUE {
            log::warn!("vsock: RST queue full, dropping reply to {hdr:?}");
            return;
        }
        self.rst_queue
            .push_back(Header::rst_reply(hdr, self.guest_cid));
    }

    /// Handles a validated packet from the guest.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.dst_cid != HOST_CID {
            log::debug!("vsock: packet for CID {} refused", hdr.dst_cid);
            self.reply_rst(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.recv_pkt(hdr, payload);
            self.after_change(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(key, hdr),
            OP_RST => {}
            _ => self.reply_rst(hdr),
        }
    }

    /// The guest connects to host port `key.local_port`: we connect to
    /// `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: connection limit reached, refusing {key:?}");
            self.reply_rst(hdr);
            return;
        }
        let mut path: OsString = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let conn = Connection::new_peer(stream, key, self.guest_cid, hdr);
                self.insert(key, conn);
            }
            Err(e) => {
                log::debug!(
                    "vsock: guest connect to {} failed: {e}",
                    Path::new(&path).display()
                );
                self.reply_rst(hdr);
            }
        }
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        self.by_fd.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    /// Lets a connection move data after anything changed it, then files it
    /// for rx, for epoll re-sync, or for removal.
    fn after_change(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.service(&mut self.scratch);
        let fd = conn.stream().as_raw_fd();
        if conn.is_removable() {
            if let Some(conn) = self.conns.remove(&key) {
                self.by_fd.remove(&fd);
                self.rx_queued.remove(&key);
                self.graveyard.push(conn.into_stream());
            }
            return;
        }
        if conn.has_rx_work() && self.rx_queued.insert(key) {
            self.rx_queue.push_back(key);
        }
        self.touched.insert(fd);
    }

    /// The next packet for the guest (payload appended to `out`), taking
    /// connections in turn.
    pub fn next_rx_packet(&mut self, max_payload: usize, out: &mut Vec<u8>) -> Option<Header> {
        if let Some(hdr) = self.rst_queue.pop_front() {
            return Some(hdr);
        }
        while let Some(key) = self.rx_queue.pop_front() {
            self.rx_queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.next_rx_packet(max_payload, out);
            self.after_change(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// Readiness of a host fd that is not the listener.
    pub fn on_host_event(&mut self, fd: RawFd, events: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.on_handshake_readable(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_host_event(events);
            }
            self.after_change(key);
        } else {
            log::debug!("vsock: event {events:?} for unknown fd {fd}");
        }
    }

    /// Accepts pending host connections; `active` false (no driver) closes
    /// them right away.
    pub fn on_listener_readable(&mut self, active: bool) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !active || self.handshakes.len() >= MAX_HANDSHAKES {
                        log::debug!("vsock: refusing host connection (active: {active})");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("vsock: cannot make host stream non-blocking: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.touched.insert(fd);
                    // The line may already be there.
                    self.on_handshake_readable(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. EMFILE: the pending connection stays queued; log
                    // and let the next event retry.
                    log::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte, so that nothing after
    /// it (the start of the data stream) is consumed.
    fn on_handshake_readable(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT".to_string()),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => break Err("line too long".into()),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        match outcome {
            Ok(peer_port) if self.conns.len() < MAX_CONNECTIONS => {
                let key = ConnKey {
                    local_port: self.alloc_local_port(),
                    peer_port,
                };
                let conn = Connection::new_local(hs.stream, key, self.guest_cid);
                self.insert(key, conn);
            }
            Ok(_) => {
                log::warn!("vsock: connection limit reached, closing host stream");
                self.graveyard.push(hs.stream);
            }
            Err(why) => {
                log::debug!("vsock: bad host handshake: {why}");
                self.graveyard.push(hs.stream);
            }
        }
    }

    /// A host port no live connection uses.
    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }
}

/// Parses `CONNECT <port>` (an optional trailing `\r` is tolerated).
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "line is not UTF-8".to_string())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text
        .strip_prefix("CONNECT ")
        .ok_or_else(|| format!("expected `CONNECT <port>`, got {text:?}"))?;
    port.trim()
        .parse::<u32>()
        .map_err(|e| format!("bad port {port:?}: {e}"))
}

/// Connects to a Unix stream socket without blocking: a Unix connect either
/// completes at once or fails (EAGAIN when the listener's backlog is full),
/// so the event loop never waits on a slow host program.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long or contains NUL for a Unix socket address",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; OwnedFd closes it on every path.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un and `len` does
    // not exceed its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT x").is_err());
        assert!(parse_connect(b"connect 1").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn nonblocking_connect() {
        let dir = std::env::temp_dir().join(format!("vsock-nbc-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("l");
        let _ = std::fs::remove_file(&path);
        assert!(connect_nonblocking(&path).is_err());
        let l = UnixListener::bind(&path).unwrap();
        let s = connect_nonblocking(&path).unwrap();
        let (_peer, _) = l.accept().unwrap();
        drop(s);
        let long = PathBuf::from("/".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
