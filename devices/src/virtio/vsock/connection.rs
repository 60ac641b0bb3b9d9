//! One vsock stream between a guest port and a host Unix stream.
//!
//! Flow control (virtio 1.2, 5.10.6.3) both ways:
//! - guest -> host: we advertise `CONN_BUF_ALLOC` bytes of receive buffer.
//!   Bytes the host stream cannot take yet wait in `tx_buf`, which the
//!   guest's credit bounds by construction; `fwd_cnt` counts only bytes the
//!   host stream accepted, so a slow host reader throttles the guest. A guest
//!   that overruns its credit is reset.
//! - host -> guest: we read the host stream only as far as the guest's credit
//!   (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) minus what is already
//!   staged in `rx_buf`. With no credit or a full stage we drop read
//!   interest, so a readable socket never makes the event loop spin.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise to the guest per connection (bytes).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded-but-unannounced bytes after which we tell the guest about the
/// space it has regained. Must not exceed `CONN_BUF_ALLOC`, or a guest that
/// used all its credit would wait forever.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Host bytes staged for the guest per connection.
pub const RX_STAGE_CAP: usize = 64 * 1024;

/// Identifies a connection: the port on the host side (CID 2) and the
/// guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest.
    LocalInit,
    /// Connected: data may flow.
    Established,
    /// Finished. If an RST is pending it is sent before removal.
    Dead,
}

// Control packets waiting for an rx buffer.
const P_REQUEST: u8 = 1 << 0;
const P_RESPONSE: u8 = 1 << 1;
const P_RST: u8 = 1 << 2;
const P_SHUTDOWN: u8 = 1 << 3;
const P_CREDIT_UPDATE: u8 = 1 << 4;
const P_CREDIT_REQUEST: u8 = 1 << 5;

/// A connection's state machine, buffers and credit counters.
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    state: State,
    pending: u8,
    shutdown_flags: u32,
    shutdown_sent: bool,

    // guest -> host
    /// Bytes for the host stream that precede guest data and are not
    /// counted in `fwd_cnt` (the `OK <port>\n` handshake reply).
    ctl_out: Vec<u8>,
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_shutdown: u32,
    host_write_closed: bool,

    // host -> guest
    rx_buf: VecDeque<u8>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    host_eof: bool,
    host_hup: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: State, pending: u8) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            state,
            pending,
            shutdown_flags: 0,
            shutdown_sent: false,
            ctl_out: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shutdown: 0,
            host_write_closed: false,
            rx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_eof: false,
            host_hup: false,
        }
    }

    /// A host-initiated connection: a REQUEST goes to the guest first.
    pub fn new_local(stream: UnixStream, key: ConnKey, guest_cid: u64) -> Self {
        Self::new(stream, key, guest_cid, State::LocalInit, P_REQUEST)
    }

    /// A guest-initiated connection the host accepted: RESPONSE goes first.
    pub fn new_peer(stream: UnixStream, key: ConnKey, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(stream, key, guest_cid, State::Established, P_RESPONSE);
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Whether the connection is finished and has nothing left to send.
    pub fn is_removable(&self) -> bool {
        self.state == State::Dead && self.pending & P_RST == 0
    }

    /// Bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// How many more host bytes we may stage now.
    fn read_budget(&self) -> usize {
        let credit = self.peer_credit() as usize;
        RX_STAGE_CAP
            .saturating_sub(self.rx_buf.len())
            .min(credit.saturating_sub(self.rx_buf.len()))
    }

    fn has_tx_pending(&self) -> bool {
        !self.ctl_out.is_empty() || !self.tx_buf.is_empty()
    }

    /// Readiness the host stream should be polled for; empty means it must
    /// not be in the epoll set at all (a hung-up socket reports HUP even with
    /// no interest, which would spin the loop).
    pub fn wanted_events(&self) -> EventSet {
        if self.state == State::Dead || self.host_hup {
            return EventSet::empty();
        }
        let mut ev = EventSet::empty();
        if self.can_read_host() && self.read_budget() > 0 {
            ev |= EventSet::IN;
        }
        if self.has_tx_pending() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Whether `next_rx_packet` would produce a packet (kept in step with it,
    /// so the rx scheduler never spins on a connection that has nothing).
    pub fn has_rx_work(&self) -> bool {
        if self.pending & P_RST != 0 {
            return true;
        }
        if self.state == State::Dead {
            return false;
        }
        let data =
            self.state == State::Established && !self.rx_buf.is_empty() && self.peer_credit() > 0;
        let shutdown = self.pending & P_SHUTDOWN != 0 && self.rx_buf.is_empty();
        let control = self.pending & (P_REQUEST | P_RESPONSE | P_CREDIT_UPDATE | P_CREDIT_REQUEST);
        data || shutdown || control != 0
    }

    /// Ends the connection with an RST to the guest; the host side sees EOF.
    pub fn kill(&mut self) {
        self.close(true);
    }

    fn close(&mut self, send_rst: bool) {
        self.state = State::Dead;
        self.pending = if send_rst { P_RST } else { 0 };
        self.rx_buf = VecDeque::new();
        self.tx_buf = VecDeque::new();
        self.ctl_out = Vec::new();
        // The fd itself is closed later, once it is out of the epoll set;
        // shutting it down now gives the host program its EOF right away.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Host readiness reported by epoll.
    pub fn on_host_event(&mut self, events: EventSet) {
        if events.contains(EventSet::ERROR) {
            log::debug!("vsock {:?}: host socket error, resetting", self.key);
            self.kill();
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            // Leave epoll; remaining data is pulled in `service`.
            self.host_hup = true;
        }
    }

    /// Handles a validated packet the guest sent on this connection.
    pub fn recv_pkt(&mut self, hdr: &Header, payload: &[u8]) {
        if self.state == State::Dead {
            if hdr.op == OP_RST {
                self.pending = 0;
            }
            return;
        }
        if hdr.op == OP_RST {
            log::debug!("vsock {:?}: reset by guest", self.key);
            self.close(false);
            return;
        }
        self.update_peer_credit(hdr);
        match (self.state, hdr.op) {
            (State::LocalInit, OP_RESPONSE) => {
                self.state = State::Established;
                self.ctl_out = format!("OK {}\n", self.key.local_port).into_bytes();
            }
            (State::Established, OP_RW) => self.recv_data(payload),
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => self.pending |= P_CREDIT_UPDATE,
            (State::Established, OP_SHUTDOWN) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown & SHUTDOWN_RCV != 0 {
                    // The guest will read no more: drop what we staged.
                    self.rx_buf = VecDeque::new();
                }
            }
            (_, op) => {
                log::debug!(
                    "vsock {:?}: unexpected op {op} in state {:?}, resetting",
                    self.key,
                    self.state
                );
                self.kill();
            }
        }
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        if hdr.buf_alloc != self.peer_buf_alloc || hdr.fwd_cnt != self.peer_fwd_cnt.0 {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    fn recv_data(&mut self, payload: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            log::debug!("vsock {:?}: data after SHUTDOWN(SEND), resetting", self.key);
            self.kill();
            return;
        }
        if self.tx_buf.len() + payload.len() > CONN_BUF_ALLOC as usize {
            log::warn!(
                "vsock {:?}: guest overran its credit ({} buffered + {} new > {}), resetting",
                self.key,
                self.tx_buf.len(),
                payload.len(),
                CONN_BUF_ALLOC
            );
            self.kill();
            return;
        }
        let mut written = 0;
        if !self.has_tx_pending() {
            // Fast path: straight to the host, no staging.
            written = match write_some(&mut self.stream, payload) {
                Ok(n) => n,
                Err(e) => {
                    log::debug!("vsock {:?}: host write failed: {e}", self.key);
                    self.kill();
                    return;
                }
            };
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.tx_buf.extend(&payload[written..]);
        self.note_forwarded();
    }

    fn note_forwarded(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// Moves bytes between the host stream and the buffers as far as
    /// readiness, credit and buffer space allow, and advances the close
    /// handshake. Cheap when there is nothing to do.
    pub fn service(&mut self, scratch: &mut [u8]) {
        if self.state == State::Dead {
            return;
        }
        self.flush_to_host();
        if self.state == State::Dead {
            return;
        }
        self.fill_from_host(scratch);
        self.advance_close();
    }

    fn flush_to_host(&mut self) {
        while !self.ctl_out.is_empty() {
            match write_some(&mut self.stream, &self.ctl_out) {
                Ok(0) => return,
                Ok(n) => {
                    self.ctl_out.drain(..n);
                }
                Err(e) => {
                    log::debug!("vsock {:?}: host write failed: {e}", self.key);
                    self.kill();
                    return;
                }
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match write_some(&mut self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) => {
                    log::debug!("vsock {:?}: host write failed: {e}", self.key);
                    self.kill();
                    return;
                }
            }
        }
        self.note_forwarded();
    }

    fn fill_from_host(&mut self, scratch: &mut [u8]) {
        while self.can_read_host() {
            let budget = self.read_budget().min(scratch.len());
            if budget == 0 {
                if self.peer_credit() == 0 && !self.credit_requested {
                    // Linux updates credit on its own as it reads; asking is
                    // the safety net against a driver that waits to be asked.
                    self.pending |= P_CREDIT_REQUEST;
                    self.credit_requested = true;
                }
                return;
            }
            match self.stream.read(&mut scratch[..budget]) {
                Ok(0) => self.host_eof = true,
                Ok(n) => self.rx_buf.extend(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock {:?}: host read failed: {e}", self.key);
                    self.kill();
                    return;
                }
            }
        }
    }

    fn advance_close(&mut self) {
        if self.state != State::Established {
            return;
        }
        let flushed = !self.has_tx_pending();
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && flushed && !self.host_write_closed {
            // The guest sends no more: pass the EOF on to the host.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_closed = true;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && flushed {
            // The guest closed and everything it sent reached the host: the
            // guest waits for our RST to finish the close.
            self.kill();
            return;
        }
        if self.host_eof && self.rx_buf.is_empty() && !self.shutdown_sent {
            // The host sends no more; if it hung up it receives no more either.
            self.shutdown_flags = SHUTDOWN_SEND | if self.host_hup { SHUTDOWN_RCV } else { 0 };
            self.pending |= P_SHUTDOWN;
            self.shutdown_sent = true;
        }
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, its payload appended to `out` (at most
    /// `max_payload` bytes). `len` in the returned header is set.
    pub fn next_rx_packet(&mut self, max_payload: usize, out: &mut Vec<u8>) -> Option<Header> {
        if self.pending & P_RST != 0 {
            self.pending = 0;
            return Some(self.header(OP_RST));
        }
        if self.state == State::Dead {
            return None;
        }
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            return Some(self.header(OP_REQUEST));
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            return Some(self.header(OP_RESPONSE));
        }
        if self.state == State::Established && !self.rx_buf.is_empty() {
            let n = max_payload
                .min(self.rx_buf.len())
                .min(self.peer_credit() as usize);
            if n > 0 {
                out.extend(self.rx_buf.drain(..n));
                self.rx_cnt += Wrapping(n as u32);
                // Every packet carries our credit, so no separate update.
                self.pending &= !P_CREDIT_UPDATE;
                let mut hdr = self.header(OP_RW);
                hdr.len = n as u32;
                return Some(hdr);
            }
        }
        if self.pending & P_SHUTDOWN != 0 && self.rx_buf.is_empty() {
            self.pending &= !P_SHUTDOWN;
            self.pending &= !P_CREDIT_UPDATE;
            let mut hdr = self.header(OP_SHUTDOWN);
            hdr.flags = self.shutdown_flags;
            return Some(hdr);
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            self.pending &= !P_CREDIT_UPDATE;
            return Some(self.header(OP_CREDIT_UPDATE));
        }
        if self.pending & P_CREDIT_REQUEST != 0 {
            self.pending &= !P_CREDIT_REQUEST;
            return Some(self.header(OP_CREDIT_REQUEST));
        }
        None
    }
}

/// One non-blocking write: `Ok(0)` means the socket would block.
fn write_some(stream: &mut UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
