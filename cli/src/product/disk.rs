//! Copying disk images and memory files cheaply: a reflink (FICLONE: the
//! copy shares blocks with the source until either is written) where the
//! filesystem supports it (btrfs, XFS, bcachefs), else a sparse copy that
//! copies only the data ranges (SEEK_DATA / SEEK_HOLE) and leaves holes.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

pub mod diff;

/// `_IOW(0x94, 9, int)`: clone all of a file's extents into another.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Copy chunk for the read/write fallback.
const CHUNK: usize = 1 << 20;

/// How a disk was stored: copied (reflink or sparse), or as the chunks
/// changed since the parent snapshot (`diff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    Reflink,
    Sparse,
    Diff,
}

/// Copies `src` to a new file `dst` (which must not exist) and fsyncs it.
pub fn copy_file(src: &Path, dst: &Path) -> Result<CopyMethod> {
    let input = File::open(src).map_err(|e| Error::io("opening", src, e))?;
    let len = input
        .metadata()
        .map_err(|e| Error::io("reading", src, e))?
        .len();
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| Error::io("creating", dst, e))?;
    let result = copy_open(&input, &output, len, dst);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy_open(input: &File, output: &File, len: u64, dst: &Path) -> Result<CopyMethod> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(output.as_raw_fd(), FICLONE, input.as_raw_fd()) };
    let method = if rc == 0 {
        CopyMethod::Reflink
    } else {
        output
            .set_len(len)
            .map_err(|e| Error::io("sizing", dst, e))?;
        sparse_copy(input, output, len).map_err(|e| Error::io("copying to", dst, e))?;
        CopyMethod::Sparse
    };
    output
        .sync_all()
        .map_err(|e| Error::io("syncing", dst, e))?;
    Ok(method)
}

/// The data ranges of `f` (offset, end), or the whole file when the
/// filesystem cannot tell.
fn data_ranges(f: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos: u64 = 0;
    let fd = f.as_raw_fd();
    while pos < len {
        let at = libc::off_t::try_from(pos)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(ranges),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if ranges.is_empty() => {
                    Ok(vec![(0, len)])
                }
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if hole <= data {
            break;
        }
        ranges.push((data, hole));
        pos = hole;
    }
    Ok(ranges)
}

fn sparse_copy(input: &File, output: &File, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_ranges(input, len)? {
        let mut off = start;
        while off < end {
            let want = usize::try_from(end - off).unwrap_or(CHUNK).min(CHUNK);
            let n = input.read_at(&mut buf[..want], off)?;
            if n == 0 {
                break; // the source shrank under us
            }
            let chunk = &buf[..n];
            // Zero blocks stay holes, so memory files stay sparse too.
            if chunk.iter().any(|&b| b != 0) {
                output.write_all_at(chunk, off)?;
            }
            off += n as u64;
        }
    }
    // Leave the read position alone for callers that share the descriptor.
    let mut f = input;
    f.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// Bytes a file really occupies (allocated blocks).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .unwrap_or(0)
}

/// Allocated bytes of every file directly in `dir`.
pub fn dir_allocated_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| allocated_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::TempDir;
    use super::*;

    #[test]
    fn copies_are_equal_and_holes_stay_holes() {
        let t = TempDir::new("disk");
        let src = t.0.join("src.img");
        let f = File::create(&src).unwrap();
        let len = 64u64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 5000], 10 << 20).unwrap();
        f.write_all_at(b"tail", len - 4).unwrap();
        f.sync_all().unwrap();
        drop(f);

        let dst = t.0.join("dst.img");
        let method = copy_file(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Either shared extents or far fewer blocks than the apparent size.
        if method == CopyMethod::Sparse {
            assert!(allocated_bytes(&dst) < 4 << 20, "{}", allocated_bytes(&dst));
        }
        // The destination must be new.
        let e = copy_file(&src, &dst).unwrap_err().to_string();
        assert!(e.contains("creating"), "{e}");
        assert!(copy_file(&t.0.join("missing"), &t.0.join("x")).is_err());
        assert!(!t.0.join("x").exists());
    }

    #[test]
    fn sparse_path_handles_data_written_as_zeros() {
        let t = TempDir::new("disk-zero");
        let src = t.0.join("src");
        std::fs::write(&src, vec![0u8; 3 * CHUNK + 17]).unwrap();
        let out = t.0.join("out");
        let input = File::open(&src).unwrap();
        let output = File::create(&out).unwrap();
        let len = input.metadata().unwrap().len();
        output.set_len(len).unwrap();
        sparse_copy(&input, &output, len).unwrap();
        drop(output);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
        assert_eq!(allocated_bytes(&out), 0);
        assert_eq!(data_ranges(&input, 0).unwrap(), vec![]);
    }
}
