//! virtio-net backed by a TAP device.
//!
//! Two queues (receive, transmit). Frames carry the 12-byte
//! `virtio_net_hdr_v1`, which the TAP (IFF_VNET_HDR, header size 12)
//! understands as well, so frames move between guest and TAP unchanged apart
//! from the header, which is normalized: no offloads are negotiated.

mod device;
mod event_handler;
mod persist;
mod tap;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use device::{Net, NetCounters};
pub use persist::{NetConstructorArgs, NetState, PersistError};
pub use tap::{Tap, TapError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame moved in either direction, header included: a 64 KiB IP
/// packet plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65550;

/// How a network interface is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Host TAP interface name; created if it does not exist.
    pub tap: String,
    /// Guest MAC address; without one the guest picks a random address.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

/// An Ethernet MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex byte pairs like aa:bb:cc:dd:ee:ff")]
pub struct MacAddrParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacAddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrParseError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut bytes {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("failed to create the activation eventfd: {0}")]
    EventFd(std::io::Error),
}

#[cfg(test)]
mod tests;
