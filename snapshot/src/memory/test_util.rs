//! Guest memories and file checks shared by the memory tests.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::MemoryLayout;

pub(crate) type Mem = GuestMemoryMmap<AtomicBitmap>;

/// The snapshot id test memory files are written with.
pub(crate) const TEST_ID: crate::id::SnapshotId = crate::id::SnapshotId::from_bytes([0x5a; 16]);

/// Anonymous memory with the VMM's bitmap type, regions `(guest addr, size)`.
pub(crate) fn anon_memory(ranges: &[(u64, usize)]) -> Mem {
    let ranges: Vec<_> = ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn private_file_region(path: &Path, size: usize, guest_addr: u64) -> GuestRegionMmap<AtomicBitmap> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .unwrap();
    GuestRegionMmap::new(mapping, GuestAddress(guest_addr)).unwrap()
}

/// One region mapped MAP_PRIVATE from `path`, as a restored VM's memory is.
pub(crate) fn private_file_memory(path: &Path, size: usize) -> Mem {
    GuestMemoryMmap::from_regions(vec![private_file_region(path, size, 0)]).unwrap()
}

/// A file-backed region at 0 and an anonymous one at 4 GiB.
pub(crate) fn mixed_memory(path: &Path, file_size: usize, anon_size: usize) -> Mem {
    let anon = GuestRegionMmap::from_range(GuestAddress(0x1_0000_0000), anon_size, None).unwrap();
    GuestMemoryMmap::from_regions(vec![private_file_region(path, file_size, 0), anon]).unwrap()
}

/// Fills the page at `addr` with `byte`.
pub(crate) fn fill_page(mem: &Mem, addr: u64, byte: u8) {
    mem.write_slice(&[byte; 4096], GuestAddress(addr)).unwrap();
}

/// All bytes of guest memory in file order.
pub(crate) fn memory_bytes(mem: &Mem) -> Vec<u8> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let mut buf = vec![0u8; region.len() as usize];
        mem.read_slice(&mut buf, region.start_addr()).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

pub(crate) fn assert_file_equals_memory(path: &Path, mem: &Mem) {
    let file = std::fs::read(path).unwrap();
    let expected = memory_bytes(mem);
    let total = MemoryLayout::from_memory(mem).total_size();
    assert_eq!(
        file.len() as u64,
        total + super::trailer::TRAILER_LEN,
        "guest data and the snapshot id trailer"
    );
    assert!(
        file[..total as usize] == expected[..],
        "file content differs from guest memory"
    );
}

pub(crate) fn assert_memories_equal(a: &Mem, b: &Mem) {
    assert!(memory_bytes(a) == memory_bytes(b), "memories differ");
}

/// File size and bytes actually allocated on disk.
pub(crate) fn size_and_allocated(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.len(), meta.blocks() * 512)
}
