//! Guest memory: anonymous private mappings for a fresh boot, or private
//! mappings of a snapshot's memory file for restore.

use std::fs::File;
use std::path::Path;

use devices::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout;

/// Page size assumed by dirty tracking and memory files.
pub const PAGE_SIZE: usize = 4096;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} MiB is out of range (min 16 MiB, max {max} MiB)", max = MAX_MEM_MIB)]
    InvalidSize(u64),
    #[error("cannot map {size:#x} bytes of guest memory at {addr:#x}: {source}")]
    Mmap {
        addr: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory regions are invalid: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
    #[error("memory file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("memory file {path} has {actual} bytes, the snapshot's memory needs {expected}")]
    FileSize {
        path: String,
        expected: u64,
        actual: u64,
    },
}

/// Upper bound on guest memory (bounded by the 1 TiB a single memory file or
/// KVM slot can reasonably describe on the hosts we target).
pub const MAX_MEM_MIB: u64 = 1 << 20;

fn check_size(mem_mib: u64) -> Result<u64, MemoryError> {
    if !(16..=MAX_MEM_MIB).contains(&mem_mib) {
        return Err(MemoryError::InvalidSize(mem_mib));
    }
    Ok(mem_mib << 20)
}

fn bitmap_region(
    builder: MmapRegionBuilder<AtomicBitmap>,
    addr: u64,
    size: u64,
) -> Result<GuestRegionMmap, MemoryError> {
    let region = builder
        .build()
        .map_err(|source| MemoryError::Mmap { addr, size, source })?;
    GuestRegionMmap::new(region, GuestAddress(addr)).ok_or(MemoryError::Mmap {
        addr,
        size,
        source: vm_memory::mmap::MmapRegionError::InvalidPointer,
    })
}

/// Anonymous guest RAM of `mem_mib` MiB laid out around the MMIO gap.
pub fn create_anonymous(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let size = check_size(mem_mib)?;
    anonymous_regions(&layout::ram_ranges(size))
}

/// Anonymous guest RAM with the given `(guest_addr, size)` regions (a
/// snapshot's layout, for lazy restore).
pub fn anonymous_regions(ranges: &[(u64, u64)]) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ranges
        .iter()
        .map(|&(addr, len)| {
            let builder = MmapRegionBuilder::new_with_bitmap(
                len as usize,
                AtomicBitmap::with_len(len as usize),
            )
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE);
            bitmap_region(builder, addr, len)
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

/// Guest RAM mapped copy-on-write (MAP_PRIVATE) from a memory file whose
/// layout is `(guest_addr, size, file_offset)` per region: pages are read
/// from the page cache on first touch and the file is never modified.
pub fn map_file_private(
    path: &Path,
    regions: &[(u64, u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let file_err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(file_err)?;
    let actual = file.metadata().map_err(file_err)?.len();
    let expected = regions.iter().map(|r| r.2 + r.1).max().unwrap_or(0);
    if actual < expected {
        return Err(MemoryError::FileSize {
            path: path.display().to_string(),
            expected,
            actual,
        });
    }
    let file = std::sync::Arc::new(file);
    let mapped = regions
        .iter()
        .map(|&(addr, len, offset)| {
            let builder = MmapRegionBuilder::new_with_bitmap(
                len as usize,
                AtomicBitmap::with_len(len as usize),
            )
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE);
            bitmap_region(builder, addr, len)
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Regions)
}

/// `(guest_addr, size)` of every region, in order.
pub fn region_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Total guest RAM in bytes.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn anonymous_memory_has_the_layout_and_is_writable() {
        let mem = create_anonymous(64).unwrap();
        assert_eq!(region_ranges(&mem), vec![(0, 64 << 20)]);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn rejects_silly_sizes() {
        assert!(matches!(
            create_anonymous(0),
            Err(MemoryError::InvalidSize(0))
        ));
        assert!(matches!(
            create_anonymous(MAX_MEM_MIB + 1),
            Err(MemoryError::InvalidSize(_))
        ));
    }

    #[test]
    fn file_mapping_is_private_and_checked_for_size() {
        let path = std::env::temp_dir().join(format!("vmm-memfile-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 32 << 20]).unwrap();
        let mem = map_file_private(&path, &[(0, 16 << 20, 16 << 20)]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        drop(mem);
        assert_eq!(
            std::fs::read(&path).unwrap()[16 << 20],
            7,
            "file must not change"
        );
        let too_big = map_file_private(&path, &[(0, 32 << 20, 16 << 20)]);
        assert!(matches!(too_big, Err(MemoryError::FileSize { .. })));
        std::fs::remove_file(&path).unwrap();
    }
}
