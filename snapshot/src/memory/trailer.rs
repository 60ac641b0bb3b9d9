//! The end of every memory file: which snapshot it belongs to.
//!
//! A snapshot is two files, and two files cannot be replaced in one atomic
//! step: a VMM killed between the two renames, or a state file that could
//! not be written, would leave one snapshot's state beside another's
//! memory, which restores into a corrupt guest. So the memory file ends
//! with the snapshot's id (the state file records it too), and a pair whose
//! ids differ is refused. The trailer lies past the guest's data, where no
//! mapping or page server ever reads.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{io_err, MemoryError};
use crate::id::{SnapshotId, ID_LEN};

const MAGIC: [u8; 8] = *b"VMMMEMID";
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);
/// Bytes of the trailer: magic, id, CRC64 of both.
pub const TRAILER_LEN: u64 = (MAGIC.len() + ID_LEN + 8) as u64;

fn encode(id: &SnapshotId) -> [u8; TRAILER_LEN as usize] {
    let mut out = [0u8; TRAILER_LEN as usize];
    out[..8].copy_from_slice(&MAGIC);
    out[8..8 + ID_LEN].copy_from_slice(id.as_bytes());
    let crc = CRC64.checksum(&out[..8 + ID_LEN]);
    out[8 + ID_LEN..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Writes the trailer for `id` at `data_len`, the end of the guest data,
/// and cuts the file there.
pub(crate) fn write(
    file: &File,
    path: &Path,
    data_len: u64,
    id: &SnapshotId,
) -> Result<(), MemoryError> {
    let len = data_len + TRAILER_LEN;
    file.set_len(len).map_err(io_err("resize", path, len))?;
    file.write_all_at(&encode(id), data_len).map_err(io_err(
        "write the snapshot id to",
        path,
        data_len,
    ))
}

/// The id in the trailer of `file`, or None when it has none (a file written
/// before memory files carried one, or not a memory file).
pub(crate) fn read(file: &File) -> io::Result<Option<SnapshotId>> {
    let len = file.metadata()?.len();
    if len < TRAILER_LEN {
        return Ok(None);
    }
    let mut buf = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut buf, len - TRAILER_LEN)?;
    if buf[..8] != MAGIC {
        return Ok(None);
    }
    let mut crc = [0u8; 8];
    crc.copy_from_slice(&buf[8 + ID_LEN..]);
    if u64::from_le_bytes(crc) != CRC64.checksum(&buf[..8 + ID_LEN]) {
        return Ok(None);
    }
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&buf[8..8 + ID_LEN]);
    Ok(Some(SnapshotId::from_bytes(id)))
}

/// Checks that the memory file at `path` belongs to snapshot `expected`.
pub fn check(path: &Path, expected: &SnapshotId) -> Result<(), MemoryError> {
    let file = File::open(path).map_err(|source| MemoryError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    check_file(&file, path, expected)
}

pub(crate) fn check_file(
    file: &File,
    path: &Path,
    expected: &SnapshotId,
) -> Result<(), MemoryError> {
    let found = read(file).map_err(io_err("read the snapshot id of", path, 0))?;
    if found.as_ref() != Some(expected) {
        return Err(MemoryError::WrongSnapshot {
            path: path.to_path_buf(),
            expected: *expected,
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn a_trailer_names_its_snapshot_and_nothing_else_does() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // No trailer: none found, and the check says so.
        file.set_len(8192).unwrap();
        assert_eq!(read(&file).unwrap(), None);
        let id = SnapshotId::from_bytes([7; ID_LEN]);
        let err = check(&path, &id).unwrap_err();
        assert!(err.to_string().contains("no snapshot id"), "{err}");

        write(&file, &path, 8192, &id).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8192 + TRAILER_LEN);
        assert_eq!(read(&file).unwrap(), Some(id));
        check(&path, &id).unwrap();
        let other = SnapshotId::from_bytes([8; ID_LEN]);
        let err = check(&path, &other).unwrap_err();
        assert!(err.to_string().contains(&id.to_string()), "{err}");

        // A damaged trailer is no trailer.
        file.write_all_at(&[0xff], 8192 + 10).unwrap();
        assert_eq!(read(&file).unwrap(), None);
    }
}
