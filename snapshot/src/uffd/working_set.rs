//! The working set of a restored guest on disk: the memory-file offsets of
//! the pages it touched first, in order, so the next restore of the same
//! snapshot can prefetch them in bulk.
//!
//! Format: magic `VMMWSET1`, page count (u64 LE), then one u64 LE offset per
//! page. Written atomically.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::atomic::write_atomic;
use crate::memory::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"VMMWSET1";
/// Refuse sets larger than this many pages (16 TiB of guest memory).
const MAX_PAGES: u64 = 1 << 32;

/// Why a working-set file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error("working set {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("working set {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The working-set file that belongs to memory file `mem_path`.
pub fn path_for(mem_path: &Path) -> PathBuf {
    let mut name = mem_path.as_os_str().to_owned();
    name.push(".ws");
    PathBuf::from(name)
}

/// Writes `offsets` (page-aligned memory-file offsets) atomically.
pub fn save(path: &Path, offsets: &[u64]) -> Result<(), WorkingSetError> {
    let mut bytes = Vec::with_capacity(16 + 8 * offsets.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    for o in offsets {
        bytes.extend_from_slice(&o.to_le_bytes());
    }
    write_atomic(path, |f| f.write_all(&bytes)).map_err(|source: io::Error| WorkingSetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a working set; every offset must be page aligned and below
/// `mem_size`.
pub fn load(path: &Path, mem_size: u64) -> Result<Vec<u64>, WorkingSetError> {
    let invalid = |reason: String| WorkingSetError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = crate::format::read_regular(path, 16 + 8 * MAX_PAGES).map_err(|source| {
        WorkingSetError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(invalid("bad magic".into()));
    }
    let mut count = [0u8; 8];
    count.copy_from_slice(&bytes[8..16]);
    let count = u64::from_le_bytes(count);
    if count > MAX_PAGES || bytes.len() as u64 != 16 + 8 * count {
        return Err(invalid(format!(
            "{count} pages declared, {} bytes present",
            bytes.len()
        )));
    }
    bytes[16..]
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let o = u64::from_le_bytes(b);
            if o % PAGE_SIZE != 0 || o >= mem_size {
                Err(invalid(format!(
                    "offset {o:#x} is not a page of a {mem_size:#x}-byte memory"
                )))
            } else {
                Ok(o)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let dir = std::env::temp_dir().join(format!("ws-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = dir.join("memory");
        let path = path_for(&mem);
        assert_eq!(path, dir.join("memory.ws"));
        save(&path, &[0x3000, 0, 0x1000]).unwrap();
        assert_eq!(load(&path, 0x4000).unwrap(), vec![0x3000, 0, 0x1000]);
        assert!(matches!(
            load(&path, 0x3000),
            Err(WorkingSetError::Invalid { .. })
        ));
        save(&path, &[0x1001]).unwrap();
        assert!(load(&path, 0x4000)
            .unwrap_err()
            .to_string()
            .contains("not a page"));
        let mut raw = std::fs::read(&path).unwrap();
        raw.truncate(20);
        std::fs::write(&path, &raw).unwrap();
        assert!(load(&path, 0x4000)
            .unwrap_err()
            .to_string()
            .contains("pages declared"));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load(&path, 0x4000)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
