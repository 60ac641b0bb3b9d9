//! Snapshot state of the virtio-mmio transport.
//!
//! The transport saves its registers and the full configuration of every
//! queue. The positions (`next_avail`, `next_used`) of an activated device's
//! queues come from the device, which is the one advancing them. Restore
//! re-activates the device with queues positioned where they were.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use snapshot::Persist;
use virtio_queue::{Queue, QueueState, QueueT};

use super::{
    MmioTransport, TransportError, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK,
};
use crate::interrupt::Interrupt;
use crate::virtio::{ActivateError, VirtioDevice};
use crate::GuestMemoryMmap;

/// Configuration and position of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueConfigState {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl From<QueueConfigState> for QueueState {
    fn from(s: QueueConfigState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Saved registers of one virtio-mmio transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueConfigState>,
}

/// What a restored transport needs: the same as [`MmioTransport::new`].
/// `device` must be freshly restored and not activated.
pub struct MmioTransportConstructorArgs {
    pub mem: GuestMemoryMmap,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub interrupt: Box<dyn Interrupt>,
}

/// Why a transport could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("saved state has {saved} queues, device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("queue {index}: saved maximum size {saved} differs from the device's {device}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        device: u16,
    },
    #[error("queue {index}: invalid saved configuration: {source}")]
    InvalidQueue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("saved driver features {features:#x} are not offered by the device ({avail:#x})")]
    Features { features: u64, avail: u64 },
    #[error("device is already activated; restore needs a fresh device")]
    AlreadyActive,
    #[error("re-activating the device failed: {0}")]
    Activate(#[from] ActivateError),
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportConstructorArgs;
    type Error = PersistError;

    fn save(&self) -> MmioTransportState {
        let mut queues: Vec<QueueConfigState> =
            self.queues.iter().map(|q| q.state().into()).collect();
        let device = self.locked_device();
        if device.is_activated() {
            let states = device.queue_states();
            if states.len() == queues.len() {
                queues = states.into_iter().map(Into::into).collect();
            } else {
                log::error!(
                    "virtio-mmio: active device reported {} queues, transport has {}; saving transport copies",
                    states.len(),
                    queues.len()
                );
            }
        }
        MmioTransportState {
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error> {
        let mut transport = MmioTransport::new(args.mem, args.device, args.interrupt)?;
        if transport.locked_device().is_activated() {
            return Err(PersistError::AlreadyActive);
        }
        if state.queues.len() != transport.queues.len() {
            return Err(PersistError::QueueCount {
                saved: state.queues.len(),
                device: transport.queues.len(),
            });
        }
        for (index, (saved, queue)) in state.queues.iter().zip(&mut transport.queues).enumerate() {
            if saved.max_size != queue.max_size() {
                return Err(PersistError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    device: queue.max_size(),
                });
            }
            *queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|source| PersistError::InvalidQueue { index, source })?;
        }
        let avail = transport.locked_device().avail_features();
        if state.driver_features & !avail != 0 {
            return Err(PersistError::Features {
                features: state.driver_features,
                avail,
            });
        }
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.driver_features = state.driver_features;
        transport.queue_select = state.queue_select;
        transport.config_generation = state.config_generation;
        transport.interrupt.set_status(state.interrupt_status);
        if state.status & STATUS_FEATURES_OK != 0 {
            transport
                .locked_device()
                .set_acked_features(state.driver_features);
        }
        let running = state.status & STATUS_DRIVER_OK != 0
            && state.status & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0;
        if running {
            // The queues carry their saved positions into the device.
            transport.activate()?;
        }
        transport.status = state.status;
        Ok(transport)
    }
}
