//! Full memory files: all of guest memory, zero pages as holes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::host::{data_extents, HostRegion};
use super::trailer;
use super::{
    io_err, pages_in, MemoryError, MemoryLayout, MemoryWriteStats, MAX_RUN_BYTES, PAGE_SIZE,
};
use crate::atomic::write_atomic;
use crate::id::SnapshotId;

/// Pages looked up in `/proc/self/pagemap` per read (128 MiB of guest memory,
/// a 256 KiB buffer).
const PAGEMAP_CHUNK_PAGES: u64 = 32 * 1024;
/// Pagemap entry: page present in RAM.
pub(crate) const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry: page swapped out.
pub(crate) const PM_SWAPPED: u64 = 1 << 62;

/// How `write_full` decides that a page is zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanMode {
    /// Anonymous regions: pages the kernel never populated (neither present
    /// nor swapped in `/proc/self/pagemap`) are zero without being read; the
    /// rest are read. File-backed regions: every page is read, since an
    /// unpopulated page there holds the file's content.
    #[default]
    Auto,
    /// Read every page. Needed when an anonymous region is registered with
    /// userfaultfd and not fully served yet: its unpopulated pages are not
    /// zero, and reading them makes the page server fill them in.
    ContentOnly,
}

/// Writes all of `mem` to `path` as a sparse file ending with snapshot
/// `id`'s trailer, atomically; see [`ScanMode::Auto`] for how zero pages are
/// found.
pub fn write_full<M: GuestMemoryBackend>(
    path: &Path,
    mem: &M,
    id: &SnapshotId,
) -> Result<MemoryWriteStats, MemoryError> {
    write_full_with(path, mem, ScanMode::Auto, id)
}

/// Writes all of `mem` to `path` as a sparse file, atomically, finding zero
/// pages as `mode` says.
///
/// The guest must not run meanwhile (pages changed during the write may be
/// saved in either state).
pub fn write_full_with<M: GuestMemoryBackend>(
    path: &Path,
    mem: &M,
    mode: ScanMode,
    id: &SnapshotId,
) -> Result<MemoryWriteStats, MemoryError> {
    let started = Instant::now();
    let layout = MemoryLayout::from_memory(mem);
    layout.validate()?;
    let hosts = mem
        .iter()
        .map(HostRegion::new)
        .collect::<Result<Vec<_>, _>>()?;
    let any_anonymous = mem.iter().any(|r| r.file_offset().is_none());
    // Without the pagemap (no /proc, other page size) content scanning is
    // still correct, only slower.
    let pagemap = (mode == ScanMode::Auto && any_anonymous && host_page_size() == Some(PAGE_SIZE))
        .then(Pagemap::open)
        .flatten();

    let total = layout.total_size();
    let mut stats = write_atomic(path, |file| {
        trailer::write(file, path, total, id)?;
        let mut stats = MemoryWriteStats::default();
        for ((region, host), rl) in mem.iter().zip(&hosts).zip(&layout.regions) {
            let pagemap = pagemap.as_ref().filter(|_| region.file_offset().is_none());
            let mut out = RunWriter::new(file, path, host, rl.file_offset);
            scan_region(host, pagemap, &mut out, &mut stats)?;
            out.finish(&mut stats)?;
        }
        Ok::<_, MemoryError>(stats)
    })?;
    stats.duration = started.elapsed();
    Ok(stats)
}

/// Feeds every non-zero page of `host` to `out`.
fn scan_region(
    host: &HostRegion<'_>,
    pagemap: Option<&Pagemap>,
    out: &mut RunWriter<'_>,
    stats: &mut MemoryWriteStats,
) -> Result<(), MemoryError> {
    let pages = pages_in(host.len() as u64);
    let mut entries = Vec::new();
    let mut chunk_start = 0;
    while chunk_start < pages {
        let chunk = (pages - chunk_start).min(PAGEMAP_CHUNK_PAGES);
        if let Some(pm) = pagemap {
            pm.read(
                host.addr() as u64 + chunk_start * PAGE_SIZE,
                chunk,
                &mut entries,
            )?;
        }
        for i in 0..chunk {
            let page = chunk_start + i;
            let unpopulated = pagemap.is_some()
                && entries
                    .get(i as usize)
                    .is_some_and(|e| e & (PM_PRESENT | PM_SWAPPED) == 0);
            if unpopulated || host.is_zero((page * PAGE_SIZE) as usize, PAGE_SIZE as usize) {
                stats.zero_pages_skipped += 1;
                stats.unpopulated_pages += u64::from(unpopulated);
                out.flush(stats)?;
            } else {
                out.push(page, stats)?;
            }
        }
        chunk_start += chunk;
    }
    Ok(())
}

/// Coalesces consecutive pages of one region into large writes straight from
/// guest memory.
pub(super) struct RunWriter<'a> {
    file: &'a File,
    path: &'a Path,
    host: &'a HostRegion<'a>,
    file_base: u64,
    /// Pending pages `start..end`.
    run: Option<(u64, u64)>,
}

impl<'a> RunWriter<'a> {
    pub(super) fn new(
        file: &'a File,
        path: &'a Path,
        host: &'a HostRegion<'a>,
        file_base: u64,
    ) -> Self {
        Self {
            file,
            path,
            host,
            file_base,
            run: None,
        }
    }

    /// Adds one page, writing out the pending run first if `page` does not
    /// extend it or it is already as large as a write gets.
    pub(super) fn push(
        &mut self,
        page: u64,
        stats: &mut MemoryWriteStats,
    ) -> Result<(), MemoryError> {
        match &mut self.run {
            Some((start, end)) if *end == page && (*end - *start) * PAGE_SIZE < MAX_RUN_BYTES => {
                *end += 1;
                Ok(())
            }
            _ => {
                self.flush(stats)?;
                self.run = Some((page, page + 1));
                Ok(())
            }
        }
    }

    /// Writes the pending run, if any.
    pub(super) fn flush(&mut self, stats: &mut MemoryWriteStats) -> Result<(), MemoryError> {
        let Some((start, end)) = self.run.take() else {
            return Ok(());
        };
        let offset = start * PAGE_SIZE;
        let len = (end * PAGE_SIZE)
            .min(self.host.len() as u64)
            .saturating_sub(offset);
        let file_offset = self.file_base + offset;
        self.host
            .write_to(self.file, offset as usize, len as usize, file_offset)
            .map_err(io_err("write", self.path, file_offset))?;
        stats.bytes_written += len;
        stats.pages_written += end - start;
        Ok(())
    }

    /// Writes whatever is pending.
    pub(super) fn finish(mut self, stats: &mut MemoryWriteStats) -> Result<(), MemoryError> {
        self.flush(stats)
    }
}

/// `/proc/self/pagemap`, one 64-bit entry per virtual page of this process.
pub(crate) struct Pagemap {
    file: File,
}

impl Pagemap {
    pub(crate) fn open() -> Option<Self> {
        File::open("/proc/self/pagemap")
            .ok()
            .map(|file| Self { file })
    }

    /// Reads the entries of `pages` pages from `host_addr` into `out`.
    pub(crate) fn read(
        &self,
        host_addr: u64,
        pages: u64,
        out: &mut Vec<u64>,
    ) -> Result<(), MemoryError> {
        // Straight into `out` (reused between calls): this runs inside the
        // pause of a live snapshot, where copying 8 bytes per page twice
        // shows.
        out.clear();
        out.resize(pages as usize, 0);
        // SAFETY: the bytes of `out`'s initialized `pages` u64 (any byte
        // pattern is a valid u64); the slice is dropped before `out` is used
        // again.
        let raw =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 8) };
        self.file
            .read_exact_at(raw, host_addr / PAGE_SIZE * 8)
            .map_err(|source| MemoryError::Pagemap { host_addr, source })?;
        Ok(())
    }
}

fn host_page_size() -> Option<u64> {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok()
}

/// Fills `mem` from a memory file written for the same layout.
///
/// `mem` must be freshly mapped (all zero): holes in the file are skipped, so
/// their pages stay unpopulated instead of being faulted in.
pub fn read_into<M: GuestMemoryBackend>(path: &Path, mem: &M) -> Result<(), MemoryError> {
    let layout = MemoryLayout::from_memory(mem);
    layout.validate()?;
    let file = File::open(path).map_err(|source| MemoryError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let actual = file.metadata().map_err(io_err("stat", path, 0))?.len();
    if actual < layout.total_size() {
        return Err(MemoryError::FileTooShort {
            path: path.to_path_buf(),
            expected: layout.total_size(),
            actual,
        });
    }
    for (region, rl) in mem.iter().zip(&layout.regions) {
        let host = HostRegion::new(region)?;
        let end = rl.file_offset + rl.size;
        let extents = data_extents(&file, rl.file_offset, end).map_err(io_err(
            "find data in",
            path,
            rl.file_offset,
        ))?;
        for (start, stop) in extents {
            host.read_from(
                &file,
                (start - rl.file_offset) as usize,
                (stop - start) as usize,
                start,
            )
            .map_err(io_err("read", path, start))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_util::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn sparse_anonymous_memory_round_trip() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let mem = anon_memory(&[(0, 64 << 20), (0x1_0000_0000, 8 << 20)]);
        // A few scattered pages, a multi-page run, a page across a region
        // boundary in the file, and a page written then zeroed (populated
        // but zero).
        fill_page(&mem, 0, 0x11);
        fill_page(&mem, 0x5000, 0x22);
        mem.write_slice(&[0x33; 3 * 4096], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress((64 << 20) - 4))
            .unwrap();
        mem.write_obj(0x1234u16, GuestAddress(0x1_0000_0000 + 0x7000 + 100))
            .unwrap();
        fill_page(&mem, 0x20_0000, 0x44);
        fill_page(&mem, 0x20_0000, 0);

        let stats = write_full(&path, &mem, &TEST_ID).unwrap();
        let total_pages = (72 << 20) / 4096;
        assert_eq!(stats.pages_written, 1 + 1 + 3 + 1 + 1);
        assert_eq!(stats.bytes_written, stats.pages_written * 4096);
        assert_eq!(stats.zero_pages_skipped, total_pages - stats.pages_written);
        // The pagemap let us skip untouched pages unread. (With transparent
        // huge pages set to "always", a touched page populates its whole
        // 2 MiB neighbourhood, so only most of them are unpopulated.)
        assert!(
            stats.unpopulated_pages > stats.zero_pages_skipped - 6 * 512,
            "{stats:?}"
        );
        assert_file_equals_memory(&path, &mem);
        let (size, allocated) = size_and_allocated(&path);
        assert_eq!(size, (72 << 20) + trailer::TRAILER_LEN);
        assert!(allocated <= 65 * 4096, "allocated {allocated} bytes");
        // Exactly the written pages are data (before the trailer).
        let file = File::open(&path).unwrap();
        let extents = data_extents(&file, 0, 72 << 20).unwrap();
        let data: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert_eq!(data, stats.bytes_written, "{extents:x?}");

        // Reading back into fresh memory gives the same bytes.
        let fresh = anon_memory(&[(0, 64 << 20), (0x1_0000_0000, 8 << 20)]);
        read_into(&path, &fresh).unwrap();
        assert_memories_equal(&mem, &fresh);
    }

    #[test]
    fn content_only_mode_gives_same_file() {
        let dir = TempDir::new().unwrap();
        let mem = anon_memory(&[(0, 4 << 20)]);
        fill_page(&mem, 0x3000, 0x55);
        let auto = dir.as_path().join("auto");
        let scan = dir.as_path().join("scan");
        let a = write_full(&auto, &mem, &TEST_ID).unwrap();
        let s = write_full_with(&scan, &mem, ScanMode::ContentOnly, &TEST_ID).unwrap();
        assert_eq!(s.unpopulated_pages, 0);
        assert_eq!(a.pages_written, 1);
        assert_eq!(s.pages_written, 1);
        assert_eq!(std::fs::read(&auto).unwrap(), std::fs::read(&scan).unwrap());
    }

    #[test]
    fn file_backed_private_region_is_scanned_by_content() {
        let dir = TempDir::new().unwrap();
        // The backing file has data in pages the process never touches: the
        // pagemap shows them as not present, yet they are not zero.
        let backing = dir.as_path().join("backing");
        let mut content = vec![0u8; 1 << 20];
        content[0x2000..0x3000].fill(0xaa);
        content[0x9000 + 17] = 0xbb;
        content[0x40000..0x42000].fill(0xcc);
        std::fs::write(&backing, &content).unwrap();
        let mem = private_file_memory(&backing, 1 << 20);
        // Copy-on-write one file page, zero another, dirty a hole page.
        fill_page(&mem, 0x2000, 0x11);
        fill_page(&mem, 0x40000, 0);
        fill_page(&mem, 0x80000, 0x77);

        let path = dir.as_path().join("memory");
        let stats = write_full(&path, &mem, &TEST_ID).unwrap();
        assert_eq!(stats.unpopulated_pages, 0);
        assert_eq!(stats.pages_written, 4, "{stats:?}");
        assert_file_equals_memory(&path, &mem);
        let out = std::fs::read(&path).unwrap();
        assert_eq!(out[0x9000 + 17], 0xbb);
        assert_eq!(out[0x41000], 0xcc);
        assert!(out[0x40000..0x41000].iter().all(|&b| b == 0));
        // The backing file is untouched (MAP_PRIVATE).
        assert_eq!(std::fs::read(&backing).unwrap(), content);
    }

    #[test]
    fn mixed_anonymous_and_file_backed_regions() {
        let dir = TempDir::new().unwrap();
        let backing = dir.as_path().join("backing");
        let mut content = vec![0u8; 256 << 10];
        content[0x1000..0x2000].fill(0x5a);
        std::fs::write(&backing, &content).unwrap();
        let mem = mixed_memory(&backing, 256 << 10, 1 << 20);
        fill_page(&mem, 0x1_0000_0000 + 0x4000, 0x66);
        let path = dir.as_path().join("memory");
        let stats = write_full(&path, &mem, &TEST_ID).unwrap();
        assert_eq!(stats.pages_written, 2);
        assert_file_equals_memory(&path, &mem);
    }

    #[test]
    fn unwritable_target_is_reported_and_previous_file_kept() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        std::fs::write(&path, b"previous").unwrap();
        let mem = anon_memory(&[(0, 1 << 20)]);
        let missing = dir.as_path().join("missing-dir").join("memory");
        let err = write_full(&missing, &mem, &TEST_ID).unwrap_err();
        assert!(matches!(err, MemoryError::Atomic(_)), "{err}");
        assert!(err.to_string().contains("missing-dir"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"previous");
    }

    #[test]
    fn read_into_rejects_short_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let mem = anon_memory(&[(0, 1 << 20)]);
        assert!(matches!(
            read_into(&path, &mem),
            Err(MemoryError::FileTooShort {
                expected: 0x100000,
                actual: 4096,
                ..
            })
        ));
    }
}
