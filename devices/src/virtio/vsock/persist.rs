//! Snapshot state of the vsock device.
//!
//! The transport saves the queues (through `VirtioDevice::queue_states`)
//! and re-activates the device on restore. Connections are not saved: the
//! host programs on the other end live outside the snapshot. A device that
//! was active is restored with a TRANSPORT_RESET event pending, sent as soon
//! as the transport re-activates it, so the guest driver drops its stale
//! sockets.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use super::device::{Vsock, AVAIL_FEATURES};
use super::{VsockConfig, VsockError};

/// What a vsock snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub config: VsockConfig,
    pub acked_features: u64,
    /// Whether the driver had activated the device.
    pub activated: bool,
}

/// What restoring a vsock device needs from the VMM.
#[derive(Clone, Debug, Default)]
pub struct VsockConstructorArgs {
    /// Listen here instead of the saved path (e.g. a restored clone that
    /// runs beside the original VM).
    pub uds_path_override: Option<PathBuf>,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockConstructorArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            config: VsockConfig {
                guest_cid: self.guest_cid,
                uds_path: self.uds_path().to_path_buf(),
            },
            acked_features: self.features.acked(),
            activated: self.active.is_some(),
        }
    }

    fn restore(args: VsockConstructorArgs, state: &VsockState) -> Result<Self, VsockError> {
        let mut config = state.config.clone();
        if let Some(path) = args.uds_path_override {
            config.uds_path = path;
        }
        if state.acked_features & !AVAIL_FEATURES != 0 {
            return Err(VsockError::Features {
                saved: state.acked_features,
                avail: AVAIL_FEATURES,
            });
        }
        let mut dev = Vsock::new(&config)?;
        dev.features.set_acked(state.acked_features);
        // The guest believes its old connections are alive: reset them once
        // the transport hands the queues back.
        dev.reset_pending = state.activated;
        Ok(dev)
    }
}
