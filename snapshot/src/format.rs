//! The state-file format.
//!
//! ```text
//! offset  size  field
//! 0       8     magic  b"VMMSNAP\0"
//! 8       4     format version, u32 little endian
//! 12      8     payload length N, u64 little endian
//! 20      N     payload: serde_json of the whole VM state
//! 20+N    8     CRC-64/ECMA-182 of bytes 0..20+N, u64 little endian
//! ```
//!
//! The magic and version come first and stay put in every future version, so
//! an old vmm can always tell "this is a snapshot, but too new for me" apart
//! from corruption. Everything after the version is only interpreted once the
//! version is known to be supported.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::atomic::{write_atomic, AtomicWriteError};

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// The format version this vmm writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format version this vmm reads.
pub const MIN_FORMAT_VERSION: u32 = 1;

const VERSION_OFFSET: usize = MAGIC.len();
const LENGTH_OFFSET: usize = VERSION_OFFSET + 4;
/// Size of magic, version and payload length.
pub const HEADER_LEN: usize = LENGTH_OFFSET + 8;
/// Size of the trailing checksum.
pub const CRC_LEN: usize = 8;

/// CRC-64/ECMA-182 as used by the trailer.
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

/// Why bytes could not be decoded as a state file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The data does not start with the snapshot magic.
    #[error("not a vmm snapshot state file (bad magic {found:02x?}, expected {MAGIC:02x?})")]
    NotASnapshot {
        /// The first bytes found (up to 8).
        found: Vec<u8>,
    },
    /// The data ends before the header or the declared payload and checksum.
    #[error("state file is truncated: expected {expected} bytes, found {actual}")]
    Truncated {
        /// Bytes the header says the file must have (at least).
        expected: u64,
        /// Bytes actually present.
        actual: u64,
    },
    /// The data goes on after the checksum.
    #[error("state file has {} unexpected trailing bytes: expected {expected} bytes, found {actual}", actual - expected)]
    TrailingData {
        /// Bytes the header says the file must have.
        expected: u64,
        /// Bytes actually present.
        actual: u64,
    },
    /// The content does not match its checksum.
    #[error("state file is corrupt: checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    ChecksumMismatch {
        /// The CRC64 stored in the file.
        stored: u64,
        /// The CRC64 of the content.
        computed: u64,
    },
    /// The file was written by a newer vmm.
    #[error("state file format version {found} is newer than the newest this vmm supports ({supported}): this vmm is too old to load it, upgrade it")]
    VersionTooNew {
        /// Version in the file.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// The file's version is older than any this vmm still reads.
    #[error("state file format version {found} is older than the oldest this vmm supports ({min_supported})")]
    VersionTooOld {
        /// Version in the file.
        found: u32,
        /// Oldest version this build reads.
        min_supported: u32,
    },
    /// The checksum is right but the payload is not the expected state.
    #[error("state file payload (format version {version}) does not parse as VM state: {source}")]
    Payload {
        /// Version in the file.
        version: u32,
        /// What serde rejected, with line and column.
        source: serde_json::Error,
    },
    /// The state could not be serialized.
    #[error("cannot serialize VM state: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Why a state file could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The state could not be encoded.
    #[error("cannot save state to {path}: {source}")]
    Encode {
        /// The state file.
        path: PathBuf,
        /// The encoding error.
        source: FormatError,
    },
    /// Writing the temporary file failed.
    #[error("cannot write state file {path}: {source}")]
    Write {
        /// The state file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Replacing the state file failed.
    #[error(transparent)]
    Atomic(#[from] AtomicWriteError),
    /// The state file could not be read.
    #[error("cannot read state file {path}: {source}")]
    Read {
        /// The state file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The state file's content is not valid.
    #[error("cannot load state file {path}: {source}")]
    Decode {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        source: FormatError,
    },
}

/// Encodes `state` as a complete state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = serde_json::to_vec(state).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // usize always fits in u64 on the targets we build for.
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads the format version of a state file without checking the rest.
///
/// Lets a caller report what produced a file it cannot load.
pub fn peek_version(data: &[u8]) -> Result<u32, FormatError> {
    check_magic(data)?;
    read_u32(data, VERSION_OFFSET).ok_or(FormatError::Truncated {
        expected: HEADER_LEN as u64,
        actual: data.len() as u64,
    })
}

/// Decodes a complete state file.
///
/// Checks, in order: magic, header length, version, declared length against
/// the actual length, checksum, and finally the payload. Nothing is allocated
/// from the declared length.
pub fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, FormatError> {
    let actual = data.len() as u64;
    check_magic(data)?;
    let (Some(version), Some(payload_len)) = (
        read_u32(data, VERSION_OFFSET),
        read_u64(data, LENGTH_OFFSET),
    ) else {
        return Err(FormatError::Truncated {
            expected: HEADER_LEN as u64,
            actual,
        });
    };
    if version > FORMAT_VERSION {
        return Err(FormatError::VersionTooNew {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version < MIN_FORMAT_VERSION {
        return Err(FormatError::VersionTooOld {
            found: version,
            min_supported: MIN_FORMAT_VERSION,
        });
    }

    // Saturating: a huge declared length must read as "truncated", not wrap.
    let expected = payload_len.saturating_add((HEADER_LEN + CRC_LEN) as u64);
    if actual < expected {
        return Err(FormatError::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(FormatError::TrailingData { expected, actual });
    }
    // `expected == actual`, so it fits in usize.
    let crc_offset = data.len() - CRC_LEN;
    let stored = read_u64(data, crc_offset).ok_or(FormatError::Truncated { expected, actual })?;
    let computed = CRC64.checksum(&data[..crc_offset]);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    serde_json::from_slice(&data[HEADER_LEN..crc_offset])
        .map_err(|source| FormatError::Payload { version, source })
}

/// Writes `state` to `path` atomically (the old file survives any failure).
pub fn save_state<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let bytes = encode(state).map_err(|source| StateFileError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, |file| {
        file.write_all(&bytes)
            .map_err(|source| StateFileError::Write {
                path: path.to_path_buf(),
                source,
            })
    })
}

/// Largest state file [`load_state`] reads. Real ones are tens of KiB plus a
/// diff's dirty page runs; the bound keeps a wrong path (a device, a huge
/// file) from exhausting memory.
pub const MAX_STATE_FILE_BYTES: u64 = 256 << 20;

/// Reads and decodes the state file at `path`, which must be a regular file
/// of at most [`MAX_STATE_FILE_BYTES`] (a FIFO or device is refused without
/// blocking on it).
pub fn load_state<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let data = read_regular(path, MAX_STATE_FILE_BYTES).map_err(|source| StateFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&data).map_err(|source| StateFileError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

/// The content of `path`, a regular file of at most `max` bytes; a FIFO or
/// device is refused without blocking on it, a larger file before reading.
pub(crate) fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} bytes is more than the {max} such a file can be",
                meta.len()
            ),
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // One byte past the bound: a file growing meanwhile is still caught.
    file.take(max + 1).read_to_end(&mut data)?;
    Ok(data)
}

fn check_magic(data: &[u8]) -> Result<(), FormatError> {
    let n = data.len().min(MAGIC.len());
    if data[..n] != MAGIC[..n] {
        return Err(FormatError::NotASnapshot {
            found: data[..n].to_vec(),
        });
    }
    if n < MAGIC.len() {
        return Err(FormatError::Truncated {
            expected: HEADER_LEN as u64,
            actual: data.len() as u64,
        });
    }
    Ok(())
}

fn read_u32(data: &[u8], offset: usize) -> Option<u32> {
    let bytes = data.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u64(data: &[u8], offset: usize) -> Option<u64> {
    let bytes = data.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;
    use vmm_sys_util::tempdir::TempDir;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        regs: Vec<u64>,
        #[serde(default)]
        added_later: Option<u32>,
    }

    fn sample() -> State {
        State {
            name: "vm0".into(),
            regs: (0..64).map(|i| i * 0x1111_1111).collect(),
            added_later: None,
        }
    }

    /// Rebuilds a valid file around `payload` with `version` and a correct CRC.
    fn build(version: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        let crc = CRC64.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"VMMSNAP\0");
        assert_eq!(read_u32(&bytes, 8), Some(FORMAT_VERSION));
        let back: State = decode(&bytes).unwrap();
        assert_eq!(back, sample());
        assert_eq!(peek_version(&bytes).unwrap(), FORMAT_VERSION);
    }

    #[test]
    fn crc_is_ecma_182() {
        // Check value of CRC-64/ECMA-182 for "123456789".
        assert_eq!(CRC64.checksum(b"123456789"), 0x6c40_df5f_0b49_7347);
    }

    #[test]
    fn missing_field_with_default_is_accepted() {
        let bytes = build(FORMAT_VERSION, br#"{"name":"a","regs":[1]}"#);
        let back: State = decode(&bytes).unwrap();
        assert_eq!(back.added_later, None);
    }

    #[test]
    fn flipped_payload_byte_is_checksum_mismatch() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[HEADER_LEN + 5] ^= 0x01;
        let err = decode::<State>(&bytes).unwrap_err();
        assert!(matches!(err, FormatError::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"));
    }

    #[test]
    fn flipped_crc_byte_is_checksum_mismatch() {
        let mut bytes = encode(&sample()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        assert!(matches!(
            decode::<State>(&bytes),
            Err(FormatError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn flipped_length_byte_is_truncated_or_trailing() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[LENGTH_OFFSET] ^= 0x01;
        let err = decode::<State>(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Truncated { .. } | FormatError::TrailingData { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncation_at_every_point_is_reported() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            let err = decode::<State>(&bytes[..cut]).unwrap_err();
            let FormatError::Truncated { expected, actual } = err else {
                panic!("cut at {cut}: {err}");
            };
            assert_eq!(actual, cut as u64);
            if cut >= HEADER_LEN {
                assert_eq!(expected, bytes.len() as u64);
                assert!(err_text(&bytes[..cut])
                    .contains(&format!("expected {} bytes, found {cut}", bytes.len())));
            }
        }
    }

    fn err_text(data: &[u8]) -> String {
        decode::<State>(data).unwrap_err().to_string()
    }

    #[test]
    fn huge_declared_length_does_not_allocate() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[LENGTH_OFFSET..HEADER_LEN].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = decode::<State>(&bytes).unwrap_err();
        assert!(
            matches!(err, FormatError::Truncated { expected, .. } if expected == u64::MAX),
            "{err}"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&sample()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<State>(&bytes),
            Err(FormatError::TrailingData { .. })
        ));
    }

    #[test]
    fn wrong_magic_is_not_a_snapshot() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[0] = b'X';
        let err = decode::<State>(&bytes).unwrap_err();
        assert!(matches!(err, FormatError::NotASnapshot { .. }), "{err}");
        assert!(err.to_string().contains("not a vmm snapshot"));
        assert!(matches!(
            decode::<State>(b"{\"name\":1}"),
            Err(FormatError::NotASnapshot { .. })
        ));
        assert!(matches!(
            decode::<State>(b"V"),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            decode::<State>(b"ELF"),
            Err(FormatError::NotASnapshot { .. })
        ));
    }

    #[test]
    fn newer_version_says_vmm_is_too_old() {
        let payload = serde_json::to_vec(&sample()).unwrap();
        let bytes = build(FORMAT_VERSION + 1, &payload);
        let err = decode::<State>(&bytes).unwrap_err();
        assert!(
            matches!(err, FormatError::VersionTooNew { found, supported }
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("version {}", FORMAT_VERSION + 1)),
            "{text}"
        );
        assert!(text.contains("too old"), "{text}");
        // Even when the newer format changed the layout after the version.
        let mut bytes = bytes[..HEADER_LEN].to_vec();
        bytes.extend_from_slice(b"garbage");
        assert!(matches!(
            decode::<State>(&bytes),
            Err(FormatError::VersionTooNew { .. })
        ));
    }

    #[test]
    fn version_zero_is_too_old() {
        let payload = serde_json::to_vec(&sample()).unwrap();
        assert!(matches!(
            decode::<State>(&build(0, &payload)),
            Err(FormatError::VersionTooOld { found: 0, .. })
        ));
    }

    #[test]
    fn unparsable_payload_is_payload_error() {
        let bytes = build(FORMAT_VERSION, br#"{"name":"a","regs":"oops"}"#);
        let err = decode::<State>(&bytes).unwrap_err();
        assert!(
            matches!(err, FormatError::Payload { version: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("column"), "{err}");
    }

    #[test]
    fn unserializable_state_is_encode_error() {
        let mut map = BTreeMap::new();
        map.insert(vec![1u8], 1u8);
        assert!(matches!(encode(&map), Err(FormatError::Encode(_))));
    }

    #[test]
    fn save_and_load_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("vmstate");
        save_state(&path, &sample()).unwrap();
        let back: State = load_state(&path).unwrap();
        assert_eq!(back, sample());

        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        fs::write(&path, &bytes).unwrap();
        let err = load_state::<State>(&path).unwrap_err();
        assert!(
            matches!(
                &err,
                StateFileError::Decode {
                    source: FormatError::Truncated { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("vmstate"), "{err}");

        let missing = dir.as_path().join("missing");
        assert!(matches!(
            load_state::<State>(&missing),
            Err(StateFileError::Read { .. })
        ));
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = TempDir::new().unwrap();
        // A device would be read forever; a directory is no file either.
        for path in [Path::new("/dev/zero"), dir.as_path()] {
            let err = load_state::<State>(path).unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
        // A FIFO without a writer is refused at once instead of blocking.
        let fifo = dir.as_path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = load_state::<State>(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // A sparse file past the bound is refused before it is read.
        let big = dir.as_path().join("big");
        fs::File::create(&big)
            .unwrap()
            .set_len(MAX_STATE_FILE_BYTES + 1)
            .unwrap();
        let err = load_state::<State>(&big).unwrap_err();
        assert!(err.to_string().contains("more than the"), "{err}");
    }
}
