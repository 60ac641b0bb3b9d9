//! virtio-blk backed by a host file.
//!
//! One request queue; requests are served synchronously (pread/pwrite and
//! fdatasync on the host file) in the VMM's event loop.

mod device;
mod event_handler;
mod persist;
mod request;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use device::Block;
pub use persist::{BlockConstructorArgs, BlockState, PersistError};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;

/// How a disk is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Host file backing the disk.
    pub path: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Serial returned to GET_ID (at most 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("failed to open disk {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to read the size of disk {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk id {id:?} is longer than {ID_BYTES} bytes")]
    IdTooLong { id: String },
    #[error("failed to create the activation eventfd: {0}")]
    EventFd(std::io::Error),
}

#[cfg(test)]
mod tests;
