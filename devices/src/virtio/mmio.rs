//! virtio-mmio transport (virtio 1.x, 4.2), modern devices only (Version 2).
//!
//! The transport owns the register file: feature negotiation, the status
//! state machine, queue configuration and the interrupt status. On DRIVER_OK
//! it validates the queues against guest memory and hands them, with their
//! notification eventfds, to the device.

mod persist;

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use persist::{
    MmioTransportConstructorArgs, MmioTransportState, PersistError, QueueConfigState,
};

use super::{ActiveQueue, VirtioDevice, VirtioInterrupt, INTERRUPT_STATUS_CONFIG_CHANGED};
use crate::bus::BusDevice;
use crate::interrupt::Interrupt;
use crate::GuestMemoryMmap;

/// Size of the register window of one device on the MMIO bus.
pub const MMIO_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id (no registered vendor).
pub const VENDOR_ID: u32 = 0;
/// Offset of QueueNotify: the VMM registers a KVM ioeventfd per queue here,
/// 4 bytes wide, with datamatch = queue index.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

/// Device status bits (virtio 1.x, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 0x01;
pub const STATUS_DRIVER: u32 = 0x02;
pub const STATUS_DRIVER_OK: u32 = 0x04;
pub const STATUS_FEATURES_OK: u32 = 0x08;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Register offsets (virtio 1.x, 4.2.2); public for tools that play the driver.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device offers no queues")]
    NoQueues,
    #[error("queue {index}: invalid maximum size {size} (must be a power of two, 1..=32768)")]
    InvalidMaxSize { index: usize, size: u16 },
    #[error("failed to create the notification eventfd of queue {index}: {source}")]
    EventFd {
        index: usize,
        source: std::io::Error,
    },
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is the device's line (an irqfd).
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Box<dyn Interrupt>,
    ) -> Result<Self, TransportError> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        if max_sizes.is_empty() {
            return Err(TransportError::NoQueues);
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            queues.push(
                Queue::new(size).map_err(|_| TransportError::InvalidMaxSize { index, size })?,
            );
            queue_evts.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| TransportError::EventFd { index, source })?,
            );
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(interrupt)),
            queues,
            queue_evts,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue, in queue order. The VMM registers each with KVM
    /// as an ioeventfd on [`NOTIFY_REG_OFFSET`] (base + 0x50, 4 bytes) with
    /// datamatch = the queue index.
    pub fn queue_notify_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device's interrupt (status register plus line).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn locked_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.locked_device().device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.locked_device().avail_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::warn!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            _ => log::warn!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status != STATUS_ACKNOWLEDGE | STATUS_DRIVER {
            log::warn!(
                "virtio-mmio: driver features written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => log::warn!("virtio-mmio: driver features select {sel} out of range; ignored"),
        }
    }

    /// QueueNotify writes only arrive here when no ioeventfd caught them;
    /// forward them to the same eventfd.
    fn notify_queue(&self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: failed to signal queue {value}: {e}");
                }
            }
            None => log::warn!("virtio-mmio: notify of nonexistent queue {value}"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Queues are configured after FEATURES_OK and before DRIVER_OK; a
        // driver tearing queues down after a reset may still clear QueueReady.
        let configuring = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK)
            == STATUS_FEATURES_OK
            && self.status & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0;
        let clearing_ready = offset == reg::QUEUE_READY && value == 0;
        if !configuring && !clearing_ready {
            log::warn!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let select = self.queue_select;
        let Some(queue) = self.selected_queue() else {
            log::warn!("virtio-mmio: queue register {offset:#x} written with queue {select} selected, which does not exist");
            return;
        };
        if !configuring {
            queue.set_ready(false);
            return;
        }
        if queue.ready() && offset != reg::QUEUE_READY {
            log::warn!("virtio-mmio: queue {select} reconfigured while ready; ignored");
            return;
        }
        let accepted = match offset {
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => queue.try_set_size(size).is_ok(),
                Err(_) => false,
            },
            reg::QUEUE_READY => match value {
                0 | 1 => {
                    queue.set_ready(value == 1);
                    true
                }
                _ => false,
            },
            reg::QUEUE_DESC_LOW => set_low(
                queue.desc_table(),
                value,
                |q, a| q.try_set_desc_table_address(a),
                queue,
            ),
            reg::QUEUE_DESC_HIGH => set_high(
                queue.desc_table(),
                value,
                |q, a| q.try_set_desc_table_address(a),
                queue,
            ),
            reg::QUEUE_AVAIL_LOW => set_low(
                queue.avail_ring(),
                value,
                |q, a| q.try_set_avail_ring_address(a),
                queue,
            ),
            reg::QUEUE_AVAIL_HIGH => set_high(
                queue.avail_ring(),
                value,
                |q, a| q.try_set_avail_ring_address(a),
                queue,
            ),
            reg::QUEUE_USED_LOW => set_low(
                queue.used_ring(),
                value,
                |q, a| q.try_set_used_ring_address(a),
                queue,
            ),
            reg::QUEUE_USED_HIGH => set_high(
                queue.used_ring(),
                value,
                |q, a| q.try_set_used_ring_address(a),
                queue,
            ),
            _ => true,
        };
        if !accepted {
            // The driver and the device now disagree on the queue layout;
            // running it would corrupt guest memory.
            log::error!(
                "virtio-mmio: invalid value {value:#x} for queue {select} register {offset:#x}"
            );
            self.set_needs_reset();
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value == old {
            return;
        }
        if value & STATUS_FAILED != 0 {
            // The driver gave up on the device; keep what we had plus FAILED.
            self.status |= STATUS_FAILED;
            return;
        }
        if value & old != old || old & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) != 0 {
            log::warn!("virtio-mmio: invalid status transition {old:#x} -> {value:#x}; ignored");
            return;
        }
        match (old, value & !old) {
            (0, STATUS_ACKNOWLEDGE) => self.status = value,
            (STATUS_ACKNOWLEDGE, STATUS_DRIVER) => self.status = value,
            (s, STATUS_FEATURES_OK) if s == STATUS_ACKNOWLEDGE | STATUS_DRIVER => {
                if self.features_acceptable() {
                    self.locked_device()
                        .set_acked_features(self.driver_features);
                    self.status = value;
                } else {
                    // Leaving FEATURES_OK clear tells the driver we refused.
                    log::warn!(
                        "virtio-mmio: driver features {:#x} refused",
                        self.driver_features
                    );
                }
            }
            (s, STATUS_DRIVER_OK)
                if s == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK =>
            {
                match self.activate() {
                    Ok(()) => self.status = value,
                    Err(e) => {
                        log::error!("virtio-mmio: activation failed: {e}");
                        self.set_needs_reset();
                    }
                }
            }
            _ => {
                log::warn!("virtio-mmio: invalid status transition {old:#x} -> {value:#x}; ignored")
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let avail = self.locked_device().avail_features();
        self.driver_features & !avail == 0
            && self.driver_features & (1 << super::VIRTIO_F_VERSION_1) != 0
    }

    fn set_needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.signal(INTERRUPT_STATUS_CONFIG_CHANGED) {
                log::error!("virtio-mmio: failed to signal config change: {e}");
            }
        }
    }

    /// Validates the queues and hands them to the device.
    fn activate(&mut self) -> Result<(), super::ActivateError> {
        let event_idx = self.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        let mut active = Vec::with_capacity(self.queues.len());
        for (index, (queue, evt)) in self.queues.iter().zip(&self.queue_evts).enumerate() {
            if !queue.ready() {
                return Err(super::ActivateError::Other(format!(
                    "queue {index} is not ready"
                )));
            }
            if !queue.is_valid(&self.mem) {
                return Err(super::ActivateError::Other(format!(
                    "queue {index} (size {}, desc {:#x}, avail {:#x}, used {:#x}) is outside guest memory",
                    queue.size(),
                    queue.desc_table(),
                    queue.avail_ring(),
                    queue.used_ring()
                )));
            }
            let mut copy = Queue::try_from(queue.state())
                .map_err(|e| super::ActivateError::Other(format!("queue {index}: {e}")))?;
            copy.set_event_idx(event_idx);
            active.push(ActiveQueue {
                queue: copy,
                notify: evt.try_clone()?,
            });
        }
        let mem = self.mem.clone();
        let interrupt = self.interrupt.clone();
        self.locked_device().activate(mem, interrupt, active)
    }

    /// Driver-initiated reset (status 0): the device and every register go
    /// back to their initial values.
    fn reset(&mut self) {
        {
            let mut device = self.locked_device();
            if device.is_activated() && !device.reset() {
                drop(device);
                log::error!("virtio-mmio: device does not support reset");
                self.status |= STATUS_FAILED;
                return;
            }
            device.set_acked_features(0);
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.interrupt.set_status(0);
    }
}

fn set_low(
    current: u64,
    value: u32,
    set: impl FnOnce(&mut Queue, vm_memory::GuestAddress) -> Result<(), virtio_queue::Error>,
    queue: &mut Queue,
) -> bool {
    let addr = (current & !0xffff_ffff) | u64::from(value);
    set(queue, vm_memory::GuestAddress(addr)).is_ok()
}

fn set_high(
    current: u64,
    value: u32,
    set: impl FnOnce(&mut Queue, vm_memory::GuestAddress) -> Result<(), virtio_queue::Error>,
    queue: &mut Queue,
) -> bool {
    let addr = (current & 0xffff_ffff) | (u64::from(value) << 32);
    set(queue, vm_memory::GuestAddress(addr)).is_ok()
}

/// Locks the device, recovering from a poisoned lock (a panic elsewhere must
/// not take every later register access down with it).
fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.locked_device().read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            log::warn!(
                "virtio-mmio: {}-byte read at {offset:#x}; registers are 32-bit aligned",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.locked_device()
                .write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: {}-byte write at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            log::warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
