//! Diff memory files: only the pages a dirty bitmap names, at their place in
//! a full file, and merging one onto its base.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use vm_memory::GuestMemoryBackend;

use super::full::RunWriter;
use super::host::{buf_is_zero, zero_range, HostRegion};
use super::{
    io_err, DirtyBitmap, MemoryError, MemoryLayout, MemoryWriteStats, MAX_RUN_BYTES, PAGE_SIZE,
};
use crate::atomic::write_atomic;

/// Bytes of diff read per step while merging.
const MERGE_CHUNK_BYTES: u64 = 8 << 20;

/// Writes the pages `dirty` names to `path`, atomically, each at its offset
/// in the full layout; the file has the full length and holes elsewhere.
///
/// Dirty pages that are now zero are left as holes too: the bitmap (kept in
/// the snapshot's state), not the file, says which pages the diff carries,
/// and a hole reads back as the zero page it stands for when merged.
pub fn write_diff<M: GuestMemoryBackend>(
    path: &Path,
    mem: &M,
    dirty: &DirtyBitmap,
) -> Result<MemoryWriteStats, MemoryError> {
    let started = Instant::now();
    let layout = MemoryLayout::from_memory(mem);
    layout.validate()?;
    dirty.check_layout(&layout)?;
    let hosts = mem
        .iter()
        .map(HostRegion::new)
        .collect::<Result<Vec<_>, _>>()?;
    let total = layout.total_size();
    let mut stats = write_atomic(path, |file| {
        file.set_len(total).map_err(io_err("resize", path, total))?;
        let mut stats = MemoryWriteStats::default();
        for (index, (host, rl)) in hosts.iter().zip(&layout.regions).enumerate() {
            let mut out = RunWriter::new(file, path, host, rl.file_offset);
            for (start, len) in dirty.runs(index).max_len(MAX_RUN_BYTES / PAGE_SIZE) {
                for page in start..start + len {
                    if host.is_zero((page * PAGE_SIZE) as usize, PAGE_SIZE as usize) {
                        stats.zero_pages_skipped += 1;
                    } else {
                        out.push(page, &mut stats)?;
                    }
                }
            }
            out.finish(&mut stats)?;
        }
        Ok::<_, MemoryError>(stats)
    })?;
    stats.duration = started.elapsed();
    Ok(stats)
}

/// Applies the diff at `diff_path` (written by [`write_diff`] with `dirty`)
/// onto the full memory file at `base_path`, in place, and fsyncs it.
///
/// Dirty pages that are zero become holes in the base (or written zeros where
/// the filesystem cannot punch holes). The base is modified in place: if the
/// merge is interrupted the base is a mix of old and new pages, but merging is
/// idempotent, so keep the diff and its bitmap until this returns and run it
/// again after a crash.
pub fn merge_diff(
    base_path: &Path,
    diff_path: &Path,
    dirty: &DirtyBitmap,
    layout: &MemoryLayout,
) -> Result<MemoryWriteStats, MemoryError> {
    let started = Instant::now();
    layout.validate()?;
    dirty.check_layout(layout)?;
    let total = layout.total_size();
    let base = OpenOptions::new()
        .read(true)
        .write(true)
        .open(base_path)
        .map_err(|source| MemoryError::Open {
            path: base_path.to_path_buf(),
            source,
        })?;
    let diff = File::open(diff_path).map_err(|source| MemoryError::Open {
        path: diff_path.to_path_buf(),
        source,
    })?;
    check_len(&base, base_path, total)?;
    check_len(&diff, diff_path, total)?;

    let mut stats = MemoryWriteStats::default();
    let mut buf = Vec::new();
    for (index, rl) in layout.regions.iter().enumerate() {
        for (start, len) in dirty.runs(index).max_len(MERGE_CHUNK_BYTES / PAGE_SIZE) {
            let offset = start * PAGE_SIZE;
            let bytes = ((start + len) * PAGE_SIZE).min(rl.size) - offset;
            let file_offset = rl.file_offset + offset;
            // At most MERGE_CHUNK_BYTES.
            buf.resize(bytes as usize, 0);
            diff.read_exact_at(&mut buf, file_offset).map_err(io_err(
                "read",
                diff_path,
                file_offset,
            ))?;
            apply(&base, base_path, &buf, file_offset, &mut stats)?;
        }
    }
    base.sync_all().map_err(io_err("sync", base_path, 0))?;
    stats.duration = started.elapsed();
    Ok(stats)
}

/// Writes `buf` to `file` at `file_offset`, page by page grouped into runs of
/// non-zero pages (written) and zero pages (punched).
fn apply(
    file: &File,
    path: &Path,
    buf: &[u8],
    file_offset: u64,
    stats: &mut MemoryWriteStats,
) -> Result<(), MemoryError> {
    let page = PAGE_SIZE as usize;
    let mut pos = 0;
    while pos < buf.len() {
        let zero = buf_is_zero(&buf[pos..(pos + page).min(buf.len())]);
        let mut end = (pos + page).min(buf.len());
        while end < buf.len() && buf_is_zero(&buf[end..(end + page).min(buf.len())]) == zero {
            end = (end + page).min(buf.len());
        }
        let at = file_offset + pos as u64;
        let pages = (end - pos).div_ceil(page) as u64;
        if zero {
            zero_range(file, at, (end - pos) as u64).map_err(io_err(
                "punch a hole in",
                path,
                at,
            ))?;
            stats.zero_pages_skipped += pages;
        } else {
            file.write_all_at(&buf[pos..end], at)
                .map_err(io_err("write", path, at))?;
            stats.bytes_written += (end - pos) as u64;
            stats.pages_written += pages;
        }
        pos = end;
    }
    Ok(())
}

fn check_len(file: &File, path: &Path, expected: u64) -> Result<(), MemoryError> {
    let actual = file.metadata().map_err(io_err("stat", path, 0))?.len();
    if actual < expected {
        return Err(MemoryError::FileTooShort {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::host::data_extents;
    use crate::memory::test_util::*;
    use crate::memory::write_full;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};
    use vmm_sys_util::tempdir::TempDir;

    const A: u64 = 0x1_0000_0000;

    fn reset_bitmaps(mem: &Mem) {
        for region in mem.iter() {
            region.get_mmap().bitmap().reset();
        }
    }

    #[test]
    fn diff_then_merge_equals_full_snapshot_of_later_memory() {
        let dir = TempDir::new().unwrap();
        let base = dir.as_path().join("base");
        let diff = dir.as_path().join("diff");
        let later_full = dir.as_path().join("later");
        let mem = anon_memory(&[(0, 16 << 20), (A, 4 << 20)]);
        fill_page(&mem, 0x1000, 0x11);
        fill_page(&mem, 0x2000, 0x22);
        fill_page(&mem, 0x3000, 0x33);
        fill_page(&mem, A + 0x10000, 0x44);
        write_full(&base, &mem).unwrap();
        reset_bitmaps(&mem);

        // Changed, unchanged-but-dirty, non-zero to zero (both regions), new
        // page, a run crossing 64-page words, and the last partial write.
        fill_page(&mem, 0x1000, 0x99);
        mem.write_slice(&[0x22; 16], GuestAddress(0x2000)).unwrap();
        fill_page(&mem, 0x3000, 0);
        fill_page(&mem, A + 0x10000, 0);
        fill_page(&mem, 0x8000, 0x55);
        mem.write_slice(&vec![0x66; 70 * 4096], GuestAddress(0x3f000))
            .unwrap();
        mem.write_obj(7u64, GuestAddress(A + (4 << 20) - 8))
            .unwrap();

        let mut dirty = DirtyBitmap::clean_for(&mem);
        dirty.or_with_memory_bitmaps(&mem).unwrap();
        assert_eq!(dirty.count(), 1 + 1 + 1 + 1 + 1 + 70 + 1);
        let stats = write_diff(&diff, &mem, &dirty).unwrap();
        // The two zeroed pages are holes; the bitmap carries them.
        assert_eq!(stats.zero_pages_skipped, 2);
        assert_eq!(stats.pages_written, dirty.count() - 2);
        assert_eq!(stats.bytes_written, (dirty.count() - 2) * PAGE_SIZE);
        let (size, allocated) = size_and_allocated(&diff);
        assert_eq!(size, 20 << 20);
        assert!(allocated < (1 << 20), "diff allocates {allocated}");
        let diff_file = File::open(&diff).unwrap();
        let extents = data_extents(&diff_file, 0, size).unwrap();
        assert!(
            !extents.iter().any(|&(s, e)| s <= 0x3000 && e >= 0x4000),
            "the zeroed page should be a hole: {extents:x?}"
        );

        let layout = MemoryLayout::from_memory(&mem);
        let merged = merge_diff(&base, &diff, &dirty, &layout).unwrap();
        assert_eq!(merged.zero_pages_skipped, 2);
        assert_eq!(merged.pages_written, dirty.count() - 2);

        write_full(&later_full, &mem).unwrap();
        assert!(std::fs::read(&base).unwrap() == std::fs::read(&later_full).unwrap());
        assert_file_equals_memory(&base, &mem);
        // The page that became zero is a hole again in the base.
        let base_file = File::open(&base).unwrap();
        let extents = data_extents(&base_file, 0, size).unwrap();
        assert!(
            !extents.iter().any(|&(s, e)| s < 0x4000 && e > 0x3000),
            "{extents:x?}"
        );

        // Merging again changes nothing (idempotent after a crash).
        merge_diff(&base, &diff, &dirty, &layout).unwrap();
        assert_file_equals_memory(&base, &mem);
    }

    #[test]
    fn diff_of_clean_bitmap_is_all_holes() {
        let dir = TempDir::new().unwrap();
        let diff = dir.as_path().join("diff");
        let mem = anon_memory(&[(0, 1 << 20)]);
        fill_page(&mem, 0, 1);
        let stats = write_diff(&diff, &mem, &DirtyBitmap::clean_for(&mem)).unwrap();
        assert_eq!(stats.pages_written, 0);
        let (size, allocated) = size_and_allocated(&diff);
        assert_eq!((size, allocated), (1 << 20, 0));
    }

    #[test]
    fn mismatched_inputs_are_rejected() {
        let dir = TempDir::new().unwrap();
        let base = dir.as_path().join("base");
        let diff = dir.as_path().join("diff");
        let mem = anon_memory(&[(0, 1 << 20)]);
        let other = anon_memory(&[(0, 2 << 20)]);
        let wrong = DirtyBitmap::clean_for(&other);
        assert!(matches!(
            write_diff(&diff, &mem, &wrong),
            Err(MemoryError::Bitmap(_))
        ));
        assert!(!diff.exists());

        let layout = MemoryLayout::from_memory(&mem);
        let dirty = DirtyBitmap::all_dirty(&layout);
        write_full(&base, &mem).unwrap();
        std::fs::write(&diff, [0u8; 4096]).unwrap();
        let err = merge_diff(&base, &diff, &dirty, &layout).unwrap_err();
        assert!(
            matches!(err, MemoryError::FileTooShort { expected, actual: 4096, .. } if expected == 1 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("diff"), "{err}");
        let missing = dir.as_path().join("missing");
        assert!(matches!(
            merge_diff(&missing, &diff, &dirty, &layout),
            Err(MemoryError::Open { .. })
        ));
        assert!(matches!(
            merge_diff(&base, &diff, &wrong, &layout),
            Err(MemoryError::Bitmap(_))
        ));
        // Unused regions of `other` keep clippy quiet about the binding.
        assert_eq!(other.iter().next().map(|r| r.len()), Some(2 << 20));
    }
}
