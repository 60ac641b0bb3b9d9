//! The virtio-net device: features, configuration space, and moving frames
//! between the queues and the TAP.

use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::{NetConfig, NetError, Tap, MAX_FRAME_LEN, QUEUE_SIZE, VNET_HDR_LEN};
use crate::virtio::{
    DeviceCore, QueueEventRegistrations, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

const VIRTIO_NET_F_MAC: u32 = 5;

pub(super) const RX_QUEUE: usize = 0;
pub(super) const TX_QUEUE: usize = 1;
/// Frames moved per wakeup, so a busy interface cannot starve the other
/// devices of the event loop.
const BUDGET: usize = 256;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Frame and chain counters (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    /// Frames larger than the receive buffer offered for them.
    pub rx_dropped_too_big: u64,
    /// Reads shorter than a virtio-net header.
    pub rx_dropped_short: u64,
    pub rx_bad_chains: u64,
    pub tx_frames: u64,
    /// Frames the TAP refused (full, down, or invalid).
    pub tx_dropped: u64,
    pub tx_bad_chains: u64,
}

/// A virtio-net device backed by a TAP.
pub struct Net {
    pub(super) config: NetConfig,
    pub(super) tap: Tap,
    config_space: [u8; 6],
    /// Features, activation state and the event loop's wakeup.
    pub(super) core: DeviceCore,
    pub(super) registrations: QueueEventRegistrations,
    /// Whether the TAP fd is in the epoll set: it is taken out while the
    /// guest offers no receive buffers, or level-triggered readiness would
    /// spin the event loop.
    pub(super) tap_registered: bool,
    /// A frame read from the TAP and not yet delivered (`rx_len` bytes).
    rx_frame: Vec<u8>,
    rx_len: usize,
    tx_frame: Vec<u8>,
    pub(super) counters: NetCounters,
}

impl Net {
    /// Attaches to (or creates) the TAP named in `config`.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        Self::with_tap(config, tap)
    }

    /// Builds the device over an already opened TAP.
    pub fn with_tap(config: NetConfig, tap: Tap) -> Result<Self, NetError> {
        let mut avail_features = 1u64 << VIRTIO_F_VERSION_1;
        let mut config_space = [0u8; 6];
        if let Some(mac) = config.mac {
            avail_features |= 1 << VIRTIO_NET_F_MAC;
            config_space = mac.0;
        }
        Ok(Self {
            config,
            tap,
            config_space,
            core: DeviceCore::new(avail_features).map_err(NetError::EventFd)?,
            registrations: QueueEventRegistrations::default(),
            tap_registered: false,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            tx_frame: vec![0; MAX_FRAME_LEN],
            counters: NetCounters::default(),
        })
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Frame counters.
    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    /// Moves frames from the TAP into receive buffers until the TAP is
    /// drained, the guest runs out of buffers, or the budget is spent.
    /// Returns false when it stopped for lack of buffers (the caller then
    /// stops polling the TAP until the guest adds some).
    pub(super) fn process_rx(&mut self) -> bool {
        let Some(active) = self.core.active.as_mut() else {
            return true;
        };
        let mem = &active.mem;
        let Some(rxq) = active.queues.get_mut(RX_QUEUE) else {
            return true;
        };
        let mut used = false;
        let mut have_buffers = true;
        for _ in 0..BUDGET {
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        self.counters.rx_dropped_short += 1;
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("virtio-net: read from TAP {}: {e}", self.tap.name());
                        break;
                    }
                }
            }
            let chain = match rxq.queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::warn!("virtio-net: cannot read the rx available ring: {e}");
                    None
                }
            };
            let Some(chain) = chain else {
                have_buffers = false;
                break;
            };
            let head = chain.head_index();
            let frame = &mut self.rx_frame[..self.rx_len];
            // No offloads are negotiated: flags 0, no GSO, one buffer.
            frame[..NUM_BUFFERS_OFFSET].fill(0);
            frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let len = match write_frame(mem, chain, frame) {
                Ok(()) => {
                    self.counters.rx_frames += 1;
                    self.rx_len = 0;
                    frame.len() as u32
                }
                Err(RxError::TooSmall) => {
                    self.counters.rx_dropped_too_big += 1;
                    self.rx_len = 0;
                    0
                }
                Err(RxError::BadChain) => {
                    // Keep the frame for the next buffer.
                    self.counters.rx_bad_chains += 1;
                    0
                }
            };
            if let Err(e) = rxq.queue.add_used(mem, head, len) {
                log::warn!("virtio-net: failed to add rx used entry {head}: {e}");
                continue;
            }
            used = true;
        }
        if used && needs_notification(mem, &mut rxq.queue) {
            active.signal_used("virtio-net");
        }
        have_buffers
    }

    /// Sends every available transmit chain to the TAP. Returns false when
    /// the budget ran out with chains left.
    pub(super) fn process_tx(&mut self) -> bool {
        let Some(active) = self.core.active.as_mut() else {
            return true;
        };
        let mem = &active.mem;
        let Some(txq) = active.queues.get_mut(TX_QUEUE) else {
            return true;
        };
        let mut used = false;
        let mut done = false;
        for _ in 0..BUDGET {
            let chain = match txq.queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::warn!("virtio-net: cannot read the tx available ring: {e}");
                    None
                }
            };
            let Some(chain) = chain else {
                done = true;
                break;
            };
            let head = chain.head_index();
            match read_frame(mem, chain, &mut self.tx_frame) {
                Some(len) if len >= VNET_HDR_LEN => {
                    let frame = &mut self.tx_frame[..len];
                    // Offloads were not negotiated: whatever the guest put
                    // in the header, the host sees a plain frame.
                    frame[..NUM_BUFFERS_OFFSET].fill(0);
                    match self.tap.write_frame(frame) {
                        Ok(_) => self.counters.tx_frames += 1,
                        Err(e) => {
                            self.counters.tx_dropped += 1;
                            log::debug!("virtio-net: TAP {} refused a frame: {e}", self.tap.name());
                        }
                    }
                }
                _ => self.counters.tx_bad_chains += 1,
            }
            if let Err(e) = txq.queue.add_used(mem, head, 0) {
                log::warn!("virtio-net: failed to add tx used entry {head}: {e}");
                continue;
            }
            used = true;
        }
        if used && needs_notification(mem, &mut txq.queue) {
            active.signal_used("virtio-net");
        }
        done
    }
}

fn needs_notification(mem: &GuestMemoryMmap, queue: &mut virtio_queue::Queue) -> bool {
    queue.needs_notification(mem).unwrap_or(true)
}

enum RxError {
    /// The chain is valid but shorter than the frame.
    TooSmall,
    /// A descriptor is device-readable, outside memory, or the chain breaks.
    BadChain,
}

/// Collects a chain's descriptors; None if it loops or breaks off.
fn collect_chain(chain: DescriptorChain<&GuestMemoryMmap>) -> Option<Vec<Descriptor>> {
    let descs: Vec<Descriptor> = chain.take(usize::from(QUEUE_SIZE) + 1).collect();
    if descs.len() > usize::from(QUEUE_SIZE) || descs.last().is_none_or(|d| d.has_next()) {
        return None;
    }
    Some(descs)
}

/// Copies `frame` into a receive chain after validating all of it.
fn write_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<(), RxError> {
    let descs = collect_chain(chain).ok_or(RxError::BadChain)?;
    let mut capacity = 0usize;
    for d in &descs {
        if !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize, Permissions::Write) {
            return Err(RxError::BadChain);
        }
        capacity = capacity.saturating_add(d.len() as usize);
    }
    if capacity < frame.len() {
        return Err(RxError::TooSmall);
    }
    let mut off = 0;
    for d in &descs {
        if off == frame.len() {
            break;
        }
        let n = (d.len() as usize).min(frame.len() - off);
        mem.write_slice(&frame[off..off + n], d.addr())
            .map_err(|_| RxError::BadChain)?;
        off += n;
    }
    Ok(())
}

/// Gathers a transmit chain into `buf`; None if the chain is malformed,
/// touches memory outside the guest, or exceeds the buffer.
fn read_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Option<usize> {
    let descs = collect_chain(chain)?;
    let mut len = 0usize;
    for d in &descs {
        let n = d.len() as usize;
        if d.is_write_only() || n > buf.len() - len {
            return None;
        }
        mem.read_slice(&mut buf[len..len + n], d.addr()).ok()?;
        len += n;
    }
    Some(len)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    crate::virtio::common::delegate_to_device_core!(core);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only legacy drivers write the MAC here; we serve modern ones.
        log::warn!(
            "virtio-net: {}-byte write to config space at {offset:#x}; ignored",
            data.len()
        );
    }

    fn reset(&mut self) -> bool {
        // A frame read but not delivered belongs to the old driver.
        self.rx_len = 0;
        // The event loop then drops the TAP and queue registrations.
        self.core.reset("virtio-net");
        true
    }
}
