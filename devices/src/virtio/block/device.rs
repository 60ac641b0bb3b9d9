//! The virtio-blk device: features, configuration space and queue handling.

use std::fs::OpenOptions;
use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{process_chain, Disk};
use super::{BlockConfig, BlockError, ID_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::virtio::{
    ActivateError, ActiveQueue, ActiveState, QueueEventRegistrations, VirtioDevice,
    VirtioInterrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

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
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    config_space: [u8; CONFIG_SPACE_LEN],
    /// Signalled on activation and reset so the event loop re-registers.
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<ActiveState>,
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
            avail_features,
            acked_features: 0,
            config_space,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            active: None,
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
        let Some(active) = self.active.as_mut() else {
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

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "virtio-blk: {}-byte write to read-only config space at {offset:#x}; ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        self.activate_evt.write(1)?;
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queues,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, ActiveState::queue_states)
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        // Let the event loop drop the queue registrations.
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("virtio-blk: failed to signal reset to the event loop: {e}");
        }
        true
    }
}
