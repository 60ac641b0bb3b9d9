//! Snapshot identity: a random 128-bit id, recorded in a snapshot's state
//! file and at the end of its memory file ([`crate::memory::trailer`]), so
//! that the two halves of a snapshot are recognised as belonging together.

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes in an id.
pub const ID_LEN: usize = 16;

/// The identity of one snapshot.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId([u8; ID_LEN]);

impl SnapshotId {
    /// A fresh id from the kernel's random source.
    pub fn random() -> io::Result<Self> {
        let mut bytes = [0u8; ID_LEN];
        let mut filled = 0;
        while filled < ID_LEN {
            // SAFETY: the pointer and length describe the unfilled tail of
            // `bytes`, which the kernel writes and nothing else aliases.
            let n = unsafe {
                libc::getrandom(
                    bytes[filled..].as_mut_ptr().cast::<libc::c_void>(),
                    ID_LEN - filled,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            filled += n as usize;
        }
        Ok(Self(bytes))
    }

    /// The id with these bytes.
    pub const fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
        Self(bytes)
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

/// Why a string is not a snapshot id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot id {0:?} is not {n} hex digits", n = ID_LEN * 2)]
pub struct ParseIdError(String);

impl FromStr for SnapshotId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError(s.chars().take(64).collect());
        if s.len() != ID_LEN * 2 || !s.is_ascii() {
            return Err(bad());
        }
        let mut bytes = [0u8; ID_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(bytes))
    }
}

impl Serialize for SnapshotId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SnapshotId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_round_trip_as_hex() {
        let a = SnapshotId::random().unwrap();
        let b = SnapshotId::random().unwrap();
        assert_ne!(a, b);
        let text = a.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<SnapshotId>().unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), a);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in ["", "00", &"g".repeat(32), &"0".repeat(31), &"é".repeat(16)] {
            assert!(bad.parse::<SnapshotId>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<SnapshotId>("\"xyz\"").is_err());
    }
}
