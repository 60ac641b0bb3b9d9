//! virtio-vsock with a hybrid (Unix socket) host side, as in Firecracker.
//!
//! - Host-initiated: a host program connects to `uds_path`, writes
//!   `CONNECT <port>\n`, and once the guest accepts reads `OK <hostport>\n`;
//!   then the stream carries the connection's bytes both ways. A refused
//!   connection is closed.
//! - Guest-initiated: a guest connecting to CID 2 port `P` is connected to a
//!   host program listening on `<uds_path>_<P>`; with none there it gets RST.
//!
//! The VMM builds the device with [`Vsock::new`], hands it to the virtio-mmio
//! transport and adds the same `Arc<Mutex<Vsock>>` to its event manager; the
//! device registers its own fds (queue notifications, listener, streams) from
//! the event loop. After a snapshot restore the guest gets a transport-reset
//! event (see [`persist`]).

mod connection;
mod device;
mod event_handler;
mod muxer;
mod packet;
pub mod persist;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use device::{Vsock, EVENT_QUEUE, EVENT_TRANSPORT_RESET, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
pub use persist::{VsockConstructorArgs, VsockState};

/// How a VM's vsock device is configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id; 0-2 are reserved, and Linux takes 32 bits.
    pub guest_cid: u64,
    /// Host Unix socket the device listens on; guest-initiated connections
    /// go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (must be 3..=u32::MAX)")]
    InvalidCid(u64),
    #[error("replacing the vsock socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding vsock socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating vsock eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("snapshot acked vsock features {saved:#x}, the device offers only {avail:#x}")]
    Features { saved: u64, avail: u64 },
}
