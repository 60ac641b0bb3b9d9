//! Where served pages come from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::UffdError;
use crate::memory::host::data_extents;
use crate::memory::PAGE_SIZE;

/// The content of guest memory in memory-file layout.
pub trait PageSource: Send + Sync {
    /// Bytes the source covers.
    fn size(&self) -> u64;

    /// Whether the page at `offset` is known to be all zero, so it can be
    /// served by mapping the zero page without reading. `false` is always
    /// correct, only slower.
    fn is_zero_page(&self, offset: u64) -> bool;

    /// Reads `buf.len()` bytes at `offset` (possibly several pages).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A sparse memory file: holes are zero pages, found once at open with
/// `SEEK_DATA`/`SEEK_HOLE`. The file must not change while it is served.
#[derive(Debug)]
pub struct FilePageSource {
    file: File,
    size: u64,
    /// Sorted, disjoint `[start, end)` ranges holding data.
    extents: Vec<(u64, u64)>,
}

impl FilePageSource {
    /// Opens the memory file at `path`.
    pub fn open(path: &Path) -> Result<Self, UffdError> {
        let open_err = |source| UffdError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        Self::from_file(file).map_err(open_err)
    }

    /// Serves from an open memory file.
    pub fn from_file(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        let extents = data_extents(&file, 0, size)?;
        Ok(Self {
            file,
            size,
            extents,
        })
    }

    /// Bytes of the file that hold data (not holes).
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|(s, e)| e - s).sum()
    }
}

impl PageSource for FilePageSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_zero_page(&self, offset: u64) -> bool {
        let end = offset.saturating_add(PAGE_SIZE);
        // First extent ending after `offset`: the only one that can overlap.
        let i = self.extents.partition_point(|&(_, e)| e <= offset);
        self.extents.get(i).is_none_or(|&(s, _)| s >= end)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn holes_are_zero_pages() {
        let tmp = TempFile::new().unwrap();
        let file = tmp.as_file();
        file.set_len(64 * PAGE_SIZE).unwrap();
        file.write_all_at(&[1; 4096], 3 * PAGE_SIZE).unwrap();
        file.write_all_at(&[2; 8192], 10 * PAGE_SIZE).unwrap();
        file.write_all_at(&[3], 63 * PAGE_SIZE + 100).unwrap();
        let src = FilePageSource::open(tmp.as_path()).unwrap();
        assert_eq!(src.size(), 64 * PAGE_SIZE);
        let data: Vec<u64> = (0..64)
            .filter(|&p| !src.is_zero_page(p * PAGE_SIZE))
            .collect();
        assert_eq!(data, vec![3, 10, 11, 63]);
        assert_eq!(src.data_bytes(), 4 * PAGE_SIZE);
        let mut buf = vec![0; 4096];
        src.read_at(10 * PAGE_SIZE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 2));
        assert!(src.read_at(64 * PAGE_SIZE, &mut buf).is_err());
    }
}
