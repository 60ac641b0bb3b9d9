//! The snapshot state-file format, read and written here independently of the snapshot crate
//! (snapshot/src/format.rs), so tests check the format rather than trust the code under test:
//! magic 8 bytes, format version 4 (LE), payload length 8 (LE), JSON payload, CRC64 8 (LE).

use std::path::Path;

use serde_json::Value;

/// Magic, version and length.
pub const HEADER_LEN: usize = 20;
/// The CRC64 trailer.
pub const CRC_LEN: usize = 8;
/// The magic bytes.
const MAGIC: &[u8; 8] = b"VMMSNAP\0";

/// CRC-64/ECMA-182 (poly 0x42F0E1EBA9EA3693, init 0, no reflection, no final xor): the state
/// file trailer over header and payload.
pub fn crc64_ecma(data: &[u8]) -> u64 {
    const POLY: u64 = 0x42F0_E1EB_A9EA_3693;
    let mut crc = 0u64;
    for &b in data {
        crc ^= u64::from(b) << 56;
        for _ in 0..8 {
            crc = if crc & (1 << 63) != 0 {
                (crc << 1) ^ POLY
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A state file taken apart and checked.
#[derive(Debug)]
pub struct StateFile {
    /// The format version in the header.
    pub version: u32,
    /// The JSON payload (`MicrovmState`).
    pub payload: Value,
}

/// Takes a state file apart, asserting magic, length field and CRC; `what` names it in
/// failures.
pub fn decode_state(bytes: &[u8], what: &str) -> StateFile {
    assert!(
        bytes.len() >= HEADER_LEN + CRC_LEN,
        "{what}: {} bytes",
        bytes.len()
    );
    assert_eq!(&bytes[..8], MAGIC, "{what}: magic");
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    assert_eq!(
        bytes.len(),
        HEADER_LEN + len + CRC_LEN,
        "{what}: length field"
    );
    let body_end = HEADER_LEN + len;
    let stored = u64::from_le_bytes(bytes[body_end..].try_into().expect("8 bytes"));
    assert_eq!(
        crc64_ecma(&bytes[..body_end]),
        stored,
        "{what}: CRC64 trailer"
    );
    let payload = serde_json::from_slice(&bytes[HEADER_LEN..body_end])
        .unwrap_or_else(|e| panic!("{what}: payload is not JSON: {e}"));
    StateFile { version, payload }
}

/// The checked payload of the state file at `path`.
pub fn read_state(path: &Path) -> StateFile {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    decode_state(&bytes, &path.display().to_string())
}

/// Recomputes the CRC of a state file whose header or payload was edited.
pub fn reseal(bytes: &mut [u8]) {
    let body_end = bytes.len() - CRC_LEN;
    let crc = crc64_ecma(&bytes[..body_end]);
    bytes[body_end..].copy_from_slice(&crc.to_le_bytes());
}

/// A sealed state file of `version` holding `payload`.
pub fn encode_state(version: u32, payload: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(payload).expect("serialize payload");
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&[0; CRC_LEN]);
    reseal(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_the_reference_check_value() {
        assert_eq!(crc64_ecma(b"123456789"), 0x6C40_DF5F_0B49_7347);
    }

    #[test]
    fn encode_then_decode() {
        let v = serde_json::json!({"a": [1, 2]});
        let s = decode_state(&encode_state(3, &v), "t");
        assert_eq!((s.version, s.payload), (3, v));
    }
}
