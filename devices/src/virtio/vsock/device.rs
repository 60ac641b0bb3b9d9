//! The virtio-vsock device: config space, queues and packet movement between
//! the guest's rings and the [`Muxer`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use event_manager::EventSet;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use virtio_queue::{Reader, Writer};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::{self, Header, HDR_SIZE, MAX_PKT_PAYLOAD};
use super::{VsockConfig, VsockError};
use crate::virtio::{
    ActivateError, ActiveQueue, Features, VirtioDevice, VirtioInterrupt, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

/// Queue indices (virtio 1.2, 5.10.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// Feature bits offered: a modern device, nothing optional.
pub(super) const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// What the device holds once the driver set DRIVER_OK.
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<VirtioInterrupt>,
    pub queues: Vec<Queue>,
    pub evts: Vec<EventFd>,
}

/// A virtio-vsock device whose host side is a Unix socket (Firecracker's
/// "hybrid" vsock). Share it as `Arc<Mutex<Vsock>>` between the transport
/// and the event manager.
pub struct Vsock {
    pub(super) guest_cid: u64,
    /// Offered ([`AVAIL_FEATURES`]) and accepted feature bits.
    pub(super) features: Features,
    pub(super) active: Option<Active>,
    pub(super) muxer: Muxer,
    /// Signalled by `activate` / `transport_reset` (any thread) so the event
    /// loop registers fds and reaps closed streams.
    pub(super) kick_evt: EventFd,
    /// Queue eventfds currently in the epoll set.
    pub(super) registered_evts: Vec<RawFd>,
    /// Eventfds to deregister, then close (after a driver reset).
    pub(super) evt_graveyard: Vec<EventFd>,
    pub(super) listener_registered: bool,
    /// Host streams in the epoll set and the events they are polled for.
    pub(super) host_interest: HashMap<RawFd, EventSet>,
    /// A TRANSPORT_RESET event waits for an event-queue buffer.
    pub(super) reset_pending: bool,
    payload: Vec<u8>,
    rx_scratch: Vec<u8>,
}

impl Vsock {
    /// Creates the device and binds its host listener at `config.uds_path`
    /// (a stale socket file there is removed first).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        let (guest_cid, uds_path) = (config.guest_cid, config.uds_path.as_path());
        if guest_cid < 3 || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let listener = bind_listener(uds_path)?;
        let kick_evt = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        Ok(Self {
            guest_cid,
            features: Features::new(AVAIL_FEATURES),
            active: None,
            muxer: Muxer::new(guest_cid, uds_path.to_path_buf(), listener),
            kick_evt,
            registered_evts: Vec::new(),
            evt_graveyard: Vec::new(),
            listener_registered: false,
            host_interest: HashMap::new(),
            reset_pending: false,
            payload: Vec::with_capacity(MAX_PKT_PAYLOAD),
            rx_scratch: Vec::with_capacity(MAX_PKT_PAYLOAD),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where the host listener is bound.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Live connections (for diagnostics and tests).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Drops every connection and tells the guest driver with a
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET event, so it resets its sockets.
    /// Call after a snapshot restore (restore already arranges it; calling
    /// again is harmless). Safe from any thread.
    pub fn transport_reset(&mut self) {
        self.muxer.reset_all();
        self.reset_pending = true;
        self.try_send_reset_event();
        // The event loop reaps the closed streams.
        if let Err(e) = self.kick_evt.write(1) {
            log::warn!("vsock: cannot signal the event loop: {e}");
        }
    }

    /// Writes a pending TRANSPORT_RESET event into the event queue.
    pub(super) fn try_send_reset_event(&mut self) {
        if !self.reset_pending {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[EVENT_QUEUE];
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= 4 => w
                    .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                    .map(|_| 4)
                    .unwrap_or(0),
                Ok(_) => 0,
                Err(e) => {
                    log::warn!("vsock: bad event-queue buffer: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                log::warn!("vsock: event queue add_used failed: {e}");
            }
            used = true;
            if written == 4 {
                self.reset_pending = false;
                break;
            }
            log::warn!("vsock: event-queue buffer too small, skipped");
        }
        if used {
            signal_used(active, EVENT_QUEUE);
        }
        if self.reset_pending {
            log::debug!("vsock: no event buffer for TRANSPORT_RESET yet; retrying on notify");
        }
    }

    /// Drains the tx queue and fills the rx queue until neither can move,
    /// then interrupts the guest if it has used buffers.
    pub fn process_queues(&mut self) {
        if self.active.is_none() {
            return;
        }
        loop {
            let tx = self.process_tx();
            let rx = self.process_rx();
            // TX stops when the RST queue is full; rx may have made room.
            // Without progress on either (e.g. an avail index the queue
            // refuses), stop: looping again would spin forever.
            if (!tx && !rx) || self.muxer.rst_queue_full() || !self.tx_has_avail() {
                break;
            }
        }
    }

    fn tx_has_avail(&self) -> bool {
        let Some(active) = self.active.as_ref() else {
            return false;
        };
        let q = &active.queues[TX_QUEUE];
        match q.avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            Err(_) => false,
        }
    }

    /// Consumes packets the guest sent. Malformed ones are logged and
    /// dropped. Returns whether any chain was consumed.
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut used = false;
        loop {
            if self.muxer.rst_queue_full() {
                break;
            }
            let mem = &active.mem;
            let queue = &mut active.queues[TX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match read_packet(mem, chain, self.guest_cid, &mut self.payload) {
                Ok(hdr) => self.muxer.handle_guest_packet(&hdr, &self.payload),
                Err(e) => log::warn!("vsock: dropping tx packet (head {head}): {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::warn!("vsock: tx add_used failed: {e}");
            }
            used = true;
        }
        if used {
            signal_used(active, TX_QUEUE);
        }
        used
    }

    /// Fills guest rx buffers with pending packets. Returns whether any
    /// buffer was used.
    pub fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut used = false;
        while self.muxer.has_rx_work() {
            let mem = &active.mem;
            let queue = &mut active.queues[RX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_SIZE => w,
                Ok(w) => {
                    log::warn!(
                        "vsock: rx buffer {head} of {} bytes cannot hold a header",
                        w.available_bytes()
                    );
                    used |= add_used(queue, mem, head, 0);
                    continue;
                }
                Err(e) => {
                    log::warn!("vsock: bad rx buffer {head}: {e}");
                    used |= add_used(queue, mem, head, 0);
                    continue;
                }
            };
            let max = (writer.available_bytes() - HDR_SIZE).min(MAX_PKT_PAYLOAD);
            self.rx_scratch.clear();
            let Some(mut hdr) = self.muxer.next_rx_packet(max, &mut self.rx_scratch) else {
                // Only stale entries were queued: give the buffer back.
                queue.go_to_previous_position();
                break;
            };
            hdr.len = self.rx_scratch.len() as u32;
            let len = match writer
                .write_all(&hdr.to_bytes())
                .and_then(|_| writer.write_all(&self.rx_scratch))
            {
                Ok(()) => (HDR_SIZE + self.rx_scratch.len()) as u32,
                Err(e) => {
                    // Cannot happen: the size was checked above.
                    log::error!("vsock: writing rx packet failed: {e}");
                    0
                }
            };
            used |= add_used(queue, mem, head, len);
        }
        if used {
            signal_used(active, RX_QUEUE);
        }
        used
    }
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    if let Err(e) = queue.add_used(mem, head, len) {
        log::warn!("vsock: add_used failed: {e}");
    }
    true
}

fn signal_used(active: &mut Active, idx: usize) {
    match active.queues[idx].needs_notification(&active.mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = active.interrupt.signal_used_queue() {
                log::warn!("vsock: cannot signal the guest: {e}");
            }
        }
    }
}

/// Why a tx chain was dropped.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("bad descriptor chain: {0}")]
    Chain(#[from] virtio_queue::Error),
    #[error("malformed packet: {0}")]
    Packet(#[from] packet::PacketError),
    #[error("reading guest memory: {0}")]
    Read(#[from] std::io::Error),
}

/// Reads and validates one packet from a tx chain; the payload lands in
/// `payload`.
fn read_packet(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    guest_cid: u64,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError> {
    let mut reader = Reader::new(mem, chain)?;
    let avail = reader.available_bytes();
    if avail < HDR_SIZE {
        return Err(packet::PacketError::ShortHeader(avail).into());
    }
    let mut raw = [0u8; HDR_SIZE];
    reader.read_exact(&mut raw)?;
    let hdr = Header::from_bytes(&raw);
    packet::validate(&hdr, reader.available_bytes(), guest_cid)?;
    payload.clear();
    payload.resize(hdr.len as usize, 0);
    reader.read_exact(payload)?;
    Ok(hdr)
}

/// Binds the host listener, replacing a stale socket file (and nothing
/// else: a regular file or directory at the path is an error, not data to
/// delete).
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::FileTypeExt;
    let stale = |source| VsockError::RemoveStale {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(stale)?,
        Ok(_) => {
            return Err(stale(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(stale(source)),
    }
    let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| VsockError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.features.avail()
    }

    fn acked_features(&self) -> u64 {
        self.features.acked()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.features.set_acked(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        crate::virtio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "vsock: guest wrote {} bytes to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        // Re-activation (the transport replaying DRIVER_OK after a restore)
        // replaces the previous queues; their eventfds leave the epoll set.
        if let Some(old) = self.active.take() {
            self.evt_graveyard.extend(old.evts);
        }
        let (queues, evts) = queues.into_iter().map(|q| (q.queue, q.notify)).unzip();
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
            evts,
        });
        // Registration happens on the event-loop thread.
        self.kick_evt.write(1)?;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(Queue::state).collect())
            .unwrap_or_default()
    }

    fn reset(&mut self) -> bool {
        if let Some(old) = self.active.take() {
            self.evt_graveyard.extend(old.evts);
        }
        self.muxer.reset_all();
        self.features.clear_acked();
        self.reset_pending = false;
        if let Err(e) = self.kick_evt.write(1) {
            log::warn!("vsock: cannot signal the event loop: {e}");
        }
        true
    }
}

#[cfg(test)]
mod bind_tests {
    use super::*;

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        drop(bind_listener(&path).unwrap());
        // The socket file outlives its listener: a restore binds again.
        drop(bind_listener(&path).unwrap());
        // A file that is not a socket is kept, and said so.
        let file = dir.as_path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let err = bind_listener(&file).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
