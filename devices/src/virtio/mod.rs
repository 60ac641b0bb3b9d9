//! Virtio devices and the virtio-mmio transport that exposes them to the guest.
//!
//! A device implements [`VirtioDevice`]; the [`mmio`] transport owns the
//! register file, feature negotiation and queue configuration, and hands the
//! device its queues on activation. Queue notifications arrive on eventfds
//! (KVM ioeventfds on the QueueNotify register) handled in the VMM's event
//! loop; interrupts leave through an [`crate::interrupt::Interrupt`].

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::Interrupt;
use crate::GuestMemoryMmap;

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
