//! Snapshot state of virtio-blk. Queues are saved and re-activated by the
//! transport; the device saves its configuration and negotiated features.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use super::{Block, BlockConfig, BlockError};
use crate::virtio::FeaturesChanged;

/// Saved state of a block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub config: BlockConfig,
    pub avail_features: u64,
    pub acked_features: u64,
    pub capacity_sectors: u64,
    /// Whether the driver had activated the device (the transport state
    /// re-activates it).
    pub activated: bool,
}

/// What a restored block device needs from the VMM.
#[derive(Debug, Clone, Default)]
pub struct BlockConstructorArgs {
    /// Serve the disk from this file instead of the saved path (e.g. a disk
    /// copied with the snapshot).
    pub path_override: Option<PathBuf>,
}

/// Why a block device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("disk {path} has {now} sectors, the snapshot saw {saved}")]
    CapacityChanged { path: PathBuf, saved: u64, now: u64 },
    #[error(transparent)]
    FeaturesChanged(#[from] FeaturesChanged),
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockConstructorArgs;
    type Error = PersistError;

    fn save(&self) -> BlockState {
        BlockState {
            config: self.config.clone(),
            avail_features: self.core.features.avail(),
            acked_features: self.core.features.acked(),
            capacity_sectors: self.disk.capacity_sectors,
            activated: self.core.is_activated(),
        }
    }

    fn restore(args: BlockConstructorArgs, state: &BlockState) -> Result<Self, PersistError> {
        let mut config = state.config.clone();
        if let Some(path) = args.path_override {
            config.path = path;
        }
        let mut block = Block::new(config)?;
        // The guest's driver cached both; a different disk would surprise it.
        if block.disk.capacity_sectors != state.capacity_sectors {
            return Err(PersistError::CapacityChanged {
                path: block.config.path.clone(),
                saved: state.capacity_sectors,
                now: block.disk.capacity_sectors,
            });
        }
        block
            .core
            .features
            .restore(state.avail_features, state.acked_features)?;
        Ok(block)
    }
}
