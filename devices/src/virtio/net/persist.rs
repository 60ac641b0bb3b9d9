//! Snapshot state of virtio-net. Queues are saved and re-activated by the
//! transport; the device saves its configuration and negotiated features.
//! Frames in flight in the host (TAP queue, a frame read but not delivered)
//! are not saved: to the guest that is ordinary packet loss.

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use super::{Net, NetConfig, NetError};
use crate::virtio::FeaturesChanged;

/// Saved state of a network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub config: NetConfig,
    pub avail_features: u64,
    pub acked_features: u64,
    /// Whether the driver had activated the device (the transport state
    /// re-activates it).
    pub activated: bool,
}

/// What a restored network device needs from the VMM.
#[derive(Debug, Clone, Default)]
pub struct NetConstructorArgs {
    /// Attach to this TAP instead of the saved one (e.g. when restoring
    /// several clones of one snapshot side by side).
    pub tap_override: Option<String>,
}

/// Why a network device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    FeaturesChanged(#[from] FeaturesChanged),
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetConstructorArgs;
    type Error = PersistError;

    fn save(&self) -> NetState {
        NetState {
            config: self.config.clone(),
            avail_features: self.core.features.avail(),
            acked_features: self.core.features.acked(),
            activated: self.core.is_activated(),
        }
    }

    fn restore(args: NetConstructorArgs, state: &NetState) -> Result<Self, PersistError> {
        let mut config = state.config.clone();
        if let Some(tap) = args.tap_override {
            config.tap = tap;
        }
        let net = Net::new(config)?;
        Self::finish_restore(net, state)
    }
}

impl Net {
    /// The part of restore after the TAP is open (shared with tests, which
    /// use a socketpair instead of a TAP).
    pub(super) fn finish_restore(mut net: Net, state: &NetState) -> Result<Net, PersistError> {
        net.core
            .features
            .restore(state.avail_features, state.acked_features)?;
        Ok(net)
    }
}
