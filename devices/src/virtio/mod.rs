//! Virtio devices and the virtio-mmio transport that exposes them to the guest.
//!
//! A device implements [`VirtioDevice`]; the [`mmio`] transport owns the
//! register file, feature negotiation and queue configuration, and hands the
//! device its queues on activation. Queue notifications arrive on eventfds
//! (KVM ioeventfds on the QueueNotify register) handled in the VMM's event
//! loop; interrupts leave through an [`crate::interrupt::Interrupt`].

pub mod block;
pub mod common;
pub mod mmio;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::QueueState;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::Interrupt;
use crate::GuestMemoryMmap;

pub use common::{DeviceCore, Features, FeaturesChanged};

/// Device type ids (virtio 1.x, 5 "Device Types").
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// VIRTIO_F_VERSION_1: every device here is a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Interrupt status bits (virtio-mmio InterruptStatus register).
pub const INTERRUPT_STATUS_USED_RING: u32 = 0x1;
pub const INTERRUPT_STATUS_CONFIG_CHANGED: u32 = 0x2;

/// A queue handed to a device on activation, with the eventfd the guest's
/// notifications arrive on.
pub struct ActiveQueue {
    pub queue: virtio_queue::Queue,
    pub notify: EventFd,
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, driver configured {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("activation failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("activation failed: {0}")]
    Other(String),
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// Virtio device type id (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of `avail_features`).
    fn acked_features(&self) -> u64;
    /// Records the driver's accepted features.
    fn set_acked_features(&mut self, features: u64);
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: the driver set DRIVER_OK.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Whether the device has been activated.
    fn is_activated(&self) -> bool;
    /// The state of the queues the device runs (one per queue, in order), for
    /// snapshots: the device advances `next_avail`/`next_used`, so only it
    /// knows where the queues are. Empty when not activated.
    fn queue_states(&self) -> Vec<QueueState>;
    /// Stops the device after a driver reset; returns false if unsupported.
    fn reset(&mut self) -> bool {
        false
    }
}

/// The interrupt of one virtio-mmio device: the InterruptStatus register it
/// shares with the transport, plus the line that signals the guest.
pub struct VirtioInterrupt {
    status: std::sync::atomic::AtomicU32,
    line: Box<dyn Interrupt>,
}

impl VirtioInterrupt {
    /// A fresh interrupt with no pending status bits.
    pub fn new(line: Box<dyn Interrupt>) -> Self {
        Self {
            status: std::sync::atomic::AtomicU32::new(0),
            line,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn signal(&self, bits: u32) -> std::io::Result<()> {
        self.status
            .fetch_or(bits, std::sync::atomic::Ordering::SeqCst);
        self.line.trigger()
    }

    /// Signals that used buffers are available.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(INTERRUPT_STATUS_USED_RING)
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Clears bits the driver acknowledged (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status
            .fetch_and(!bits, std::sync::atomic::Ordering::SeqCst);
    }

    /// Restores InterruptStatus (snapshot restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What an activated device runs with: handed over by the transport on
/// DRIVER_OK and dropped on reset.
pub struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<VirtioInterrupt>,
    pub queues: Vec<ActiveQueue>,
}

impl ActiveState {
    /// The queue states, for [`VirtioDevice::queue_states`].
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(|q| q.queue.state()).collect()
    }

    /// Raises the used-ring interrupt, logging (not failing) if the line is
    /// broken: there is nobody to return an error to in the event loop.
    pub fn signal_used(&self, device: &str) {
        if let Err(e) = self.interrupt.signal_used_queue() {
            log::error!("{device}: failed to signal used queue: {e}");
        }
    }
}

/// The queue eventfds a device has registered with the event manager.
///
/// Activation and reset happen on a vCPU thread (through the transport), but
/// registrations can only change in the event loop. The device keeps its own
/// duplicates of the eventfds here so the registered fds stay open until the
/// event loop removes them, whatever happened to the queues meanwhile.
#[derive(Default)]
pub struct QueueEventRegistrations {
    evts: Vec<EventFd>,
}

impl QueueEventRegistrations {
    /// Removes every registered queue eventfd.
    pub fn clear(&mut self, ops: &mut EventOps) {
        for evt in self.evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                log::warn!("failed to unregister queue eventfd: {e:?}");
            }
        }
    }

    /// Registers the notification eventfd of each queue, with the queue
    /// index plus `data_base` as event data.
    pub fn register(
        &mut self,
        ops: &mut EventOps,
        queues: &[ActiveQueue],
        data_base: u32,
    ) -> std::io::Result<()> {
        for (i, q) in (0u32..).zip(queues) {
            let evt = q.notify.try_clone()?;
            ops.add(Events::with_data(&evt, data_base + i, EventSet::IN))
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            self.evts.push(evt);
        }
        Ok(())
    }

    /// Makes queue `index` look notified, so the event loop comes back to
    /// it (work left over after a budget ran out).
    pub fn kick(&self, index: usize) {
        if let Some(evt) = self.evts.get(index) {
            if let Err(e) = evt.write(1) {
                log::error!("failed to re-signal queue {index}: {e}");
            }
        }
    }

    /// Consumes pending notifications of queue `index`; false if that queue
    /// is not registered.
    pub fn ack(&self, index: usize) -> bool {
        match self.evts.get(index) {
            Some(evt) => {
                // A nonblocking read: EAGAIN just means a spurious wakeup.
                let _ = evt.read();
                true
            }
            None => false,
        }
    }
}

/// Copies the part of a device configuration space at `offset` into `data`;
/// bytes beyond the space read as zero (guest reads are not trusted).
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= space.len() {
        return;
    }
    let n = data.len().min(space.len() - start);
    data[..n].copy_from_slice(&space[start..start + n]);
}
