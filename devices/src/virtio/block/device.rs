//! The virtio-blk device: features, configuration space and queue handling.

use std::fs::OpenOptions;

use virtio_queue::{QueueOwnedT, QueueT};

use super::request::{process_chain, Disk};
use super::{BlockConfig, BlockError, ID_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::virtio::{
    DeviceCore, QueueEventRegistrations, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

/// The driver may use up to `seg_max` data segments per request.
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Data segments per request the driver may use: a queue minus header and
/// status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// capacity (u64) + size_max (u32) + seg_max (u32); later fields are only
/// read by drivers when their feature is offered.
const CONFIG_SPACE_LEN: usize = 16;

/// A virtio-blk device backed by a host file.
pub struct Block {
    pub(super) config: BlockConfig,
    pub(super) disk: Disk,
    config_space: [u8; CONFIG_SPACE_LEN],
    /// Features, activation state and the event loop's wakeup.
    pub(super) core: DeviceCore,
    pub(super) registrations: QueueEventRegistrations,
}

impl Block {
    /// Opens the backing file (read-only when `config.read_only`).
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: config.path.clone(),
                source,
            })?
            .len();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "virtio-blk: {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the tail is not visible to the guest",
                config.path.display()
            );
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(s) = &config.id {
            if s.len() > ID_BYTES {
                return Err(BlockError::IdTooLong { id: s.clone() });
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let capacity_sectors = size / SECTOR_SIZE;

        let mut avail_features =
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if config.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config_space = [0u8; CONFIG_SPACE_LEN];
        config_space[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Self {
            disk: Disk {
                file,
                capacity_sectors,
                read_only: config.read_only,
                id,
            },
            config,
            config_space,
            core: DeviceCore::new(avail_features).map_err(BlockError::EventFd)?,
            registrations: QueueEventRegistrations::default(),
        })
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    /// Serves every available request, then interrupts the guest once if
    /// anything completed.
    pub fn process_queue(&mut self) {
        let Some(active) = self.core.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.first_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut completed = false;
        loop {
            let chain = match q.queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::warn!("virtio-blk: cannot read the available ring: {e}");
                    None
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let len = process_chain(&mut self.disk, mem, chain);
            if let Err(e) = q.queue.add_used(mem, head, len) {
                // E.g. a head index beyond the queue: skip it, serve the rest.
                log::warn!("virtio-blk: failed to add used entry {head}: {e}");
                continue;
            }
            completed = true;
        }
        if completed {
            match q.queue.needs_notification(mem) {
                Ok(false) => {}
                Ok(true) | Err(_) => active.signal_used("virtio-blk"),
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    crate::virtio::common::delegate_to_device_core!(core);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "virtio-blk: {}-byte write to read-only config space at {offset:#x}; ignored",
            data.len()
        );
    }

    fn reset(&mut self) -> bool {
        // The event loop then drops the queue registrations.
        self.core.reset("virtio-blk");
        true
    }
}
