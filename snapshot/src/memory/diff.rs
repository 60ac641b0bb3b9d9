//! Diff memory files: only the pages a dirty bitmap names, packed back to
//! back, and merging one onto its base.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use super::host::{buf_is_zero, zero_range, GatherWriter, HostRegion};
use super::trailer;
use super::{
    io_err, DirtyBitmap, MemoryError, MemoryLayout, MemoryWriteStats, MAX_RUN_BYTES, PAGE_SIZE,
};
use crate::atomic::write_atomic;
use crate::id::SnapshotId;

/// Bytes of diff read per step while merging.
const MERGE_CHUNK_BYTES: u64 = 8 << 20;

/// Where a diff file keeps its pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiffLayout {
    /// Each page at its offset in a full-length file (holes elsewhere): what
    /// diffs were before [`DiffLayout::Packed`], hence the default for state
    /// files that do not say.
    #[default]
    AtOffsets,
    /// The n-th page the bitmap names (region by region, in page order) at
    /// n × 4 KiB: the file is only as large as the diff and is written front
    /// to back, in a few large writes however scattered the pages are.
    Packed,
}

/// Writes the pages `dirty` names to `path`, atomically, in the
/// [`DiffLayout::Packed`] layout, ending with snapshot `id`'s trailer.
///
/// Dirty pages that are now zero are left as holes: the bitmap (kept in the
/// snapshot's state), not the file, says which pages the diff carries, and a
/// hole reads back as the zero page it stands for when merged.
pub fn write_diff<M: GuestMemoryBackend>(
    path: &Path,
    mem: &M,
    dirty: &DirtyBitmap,
    id: &SnapshotId,
) -> Result<MemoryWriteStats, MemoryError> {
    let started = Instant::now();
    let layout = MemoryLayout::from_memory(mem);
    layout.validate()?;
    dirty.check_layout(&layout)?;
    let hosts = mem
        .iter()
        .map(HostRegion::new)
        .collect::<Result<Vec<_>, _>>()?;
    let packed_len = dirty.count() * PAGE_SIZE;
    let mut stats = write_atomic(path, |file| {
        trailer::write(file, path, packed_len, id)?;
        let mut stats = MemoryWriteStats::default();
        let mut out = GatherWriter::new(file, MAX_RUN_BYTES as usize);
        // Index of the next page in the packed file.
        let mut slot = 0u64;
        for (index, host) in hosts.iter().enumerate() {
            for (start, len) in dirty.runs(index) {
                for page in start..start + len {
                    let offset = (page * PAGE_SIZE) as usize;
                    if host.is_zero(offset, PAGE_SIZE as usize) {
                        stats.zero_pages_skipped += 1;
                    } else {
                        let queued = out
                            .push(host, offset, PAGE_SIZE as usize, slot * PAGE_SIZE)
                            .map_err(|e| io_err("write", path, out.position())(e))?;
                        stats.bytes_written += queued as u64;
                        stats.pages_written += 1;
                    }
                    slot += 1;
                }
            }
        }
        out.flush()
            .map_err(|e| io_err("write", path, out.position())(e))?;
        Ok::<_, MemoryError>(stats)
    })?;
    stats.duration = started.elapsed();
    Ok(stats)
}

/// Which snapshots a merge involves, when their files carry ids (files
/// written before memory files had trailers do not).
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeIds {
    /// The snapshot the diff was taken against: the base file must be its.
    pub base: Option<SnapshotId>,
    /// The diff snapshot: the diff file must be its, and the merged base
    /// becomes its full memory file.
    pub diff: Option<SnapshotId>,
}

/// Applies the diff at `diff_path` (written with `dirty` in `diff_layout`)
/// onto the full memory file at `base_path`, in place, and fsyncs it. With
/// `ids`, both files are checked first, and the merged file is marked as the
/// diff snapshot's.
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
    diff_layout: DiffLayout,
    layout: &MemoryLayout,
    ids: MergeIds,
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
    let diff_len = match diff_layout {
        DiffLayout::AtOffsets => total,
        DiffLayout::Packed => dirty.count() * PAGE_SIZE,
    };
    check_len(&diff, diff_path, diff_len)?;
    if let Some(id) = &ids.diff {
        trailer::check_file(&diff, diff_path, id)?;
    }
    if let Some(id) = &ids.base {
        trailer::check_file(&base, base_path, id)?;
    }

    let mut stats = MemoryWriteStats::default();
    let mut buf = Vec::new();
    // Index of the run's first page in a packed diff.
    let mut slot = 0u64;
    for (index, rl) in layout.regions.iter().enumerate() {
        for (start, len) in dirty.runs(index).max_len(MERGE_CHUNK_BYTES / PAGE_SIZE) {
            let offset = start * PAGE_SIZE;
            let bytes = ((start + len) * PAGE_SIZE).min(rl.size) - offset;
            let file_offset = rl.file_offset + offset;
            let diff_offset = match diff_layout {
                DiffLayout::AtOffsets => file_offset,
                DiffLayout::Packed => slot * PAGE_SIZE,
            };
            slot += len;
            // At most MERGE_CHUNK_BYTES.
            buf.resize(bytes as usize, 0);
            diff.read_exact_at(&mut buf, diff_offset).map_err(io_err(
                "read",
                diff_path,
                diff_offset,
            ))?;
            apply(&base, base_path, &buf, file_offset, &mut stats)?;
        }
    }
    if let Some(id) = &ids.diff {
        trailer::write(&base, base_path, total, id)?;
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
    use crate::memory::trailer::TRAILER_LEN;
    use crate::memory::write_full;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};
    use vmm_sys_util::tempdir::TempDir;

    const A: u64 = 0x1_0000_0000;

    /// A packed diff merged without id checks.
    fn merge_packed(
        base: &Path,
        diff: &Path,
        dirty: &DirtyBitmap,
        layout: &MemoryLayout,
    ) -> Result<MemoryWriteStats, MemoryError> {
        merge_diff(
            base,
            diff,
            dirty,
            DiffLayout::Packed,
            layout,
            MergeIds::default(),
        )
    }

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
        write_full(&base, &mem, &TEST_ID).unwrap();
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
        let stats = write_diff(&diff, &mem, &dirty, &TEST_ID).unwrap();
        // The two zeroed pages are holes; the bitmap carries them.
        assert_eq!(stats.zero_pages_skipped, 2);
        assert_eq!(stats.pages_written, dirty.count() - 2);
        assert_eq!(stats.bytes_written, (dirty.count() - 2) * PAGE_SIZE);
        // Packed: as large as the diff. The zeroed pages are holes at their
        // slots: 0x3000 is the third dirty page of region 0; A + 0x10000 the
        // first of region 1, after region 0's 74.
        let (size, allocated) = size_and_allocated(&diff);
        assert_eq!(size, dirty.count() * PAGE_SIZE + TRAILER_LEN);
        assert!(allocated <= size + 4096, "diff allocates {allocated}");
        let diff_file = File::open(&diff).unwrap();
        let extents = data_extents(&diff_file, 0, size).unwrap();
        for slot in [2, 74] {
            let hole = (slot * PAGE_SIZE, (slot + 1) * PAGE_SIZE);
            assert!(
                !extents.iter().any(|&(s, e)| s < hole.1 && e > hole.0),
                "slot {slot} should be a hole: {extents:x?}"
            );
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        diff_file.read_exact_at(&mut page, 0).unwrap();
        assert!(page.iter().all(|&b| b == 0x99), "slot 0 holds page 0x1000");

        let layout = MemoryLayout::from_memory(&mem);
        let merged = merge_packed(&base, &diff, &dirty, &layout).unwrap();
        assert_eq!(merged.zero_pages_skipped, 2);
        assert_eq!(merged.pages_written, dirty.count() - 2);

        write_full(&later_full, &mem, &TEST_ID).unwrap();
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
        merge_packed(&base, &diff, &dirty, &layout).unwrap();
        assert_file_equals_memory(&base, &mem);
    }

    #[test]
    fn merge_checks_which_snapshots_the_files_belong_to() {
        let dir = TempDir::new().unwrap();
        let (base, diff) = (dir.as_path().join("base"), dir.as_path().join("diff"));
        let (base_id, diff_id, other) = (
            SnapshotId::from_bytes([1; 16]),
            SnapshotId::from_bytes([2; 16]),
            SnapshotId::from_bytes([3; 16]),
        );
        let mem = anon_memory(&[(0, 1 << 20)]);
        fill_page(&mem, 0x1000, 0x11);
        write_full(&base, &mem, &base_id).unwrap();
        reset_bitmaps(&mem);
        fill_page(&mem, 0x1000, 0x22);
        let mut dirty = DirtyBitmap::clean_for(&mem);
        dirty.or_with_memory_bitmaps(&mem).unwrap();
        write_diff(&diff, &mem, &dirty, &diff_id).unwrap();
        let layout = MemoryLayout::from_memory(&mem);
        let before = std::fs::read(&base).unwrap();
        let merge = |ids| merge_diff(&base, &diff, &dirty, DiffLayout::Packed, &layout, ids);

        // A diff taken against another snapshot, or a diff file of another
        // snapshot, is refused and the base is left as it was.
        for ids in [
            MergeIds {
                base: Some(other),
                diff: Some(diff_id),
            },
            MergeIds {
                base: Some(base_id),
                diff: Some(other),
            },
        ] {
            let err = merge(ids).unwrap_err();
            assert!(matches!(err, MemoryError::WrongSnapshot { .. }), "{err}");
            assert!(std::fs::read(&base).unwrap() == before);
        }
        merge(MergeIds {
            base: Some(base_id),
            diff: Some(diff_id),
        })
        .unwrap();
        assert_file_equals_memory(&base, &mem);
        // The merged file is now the diff snapshot's full memory.
        trailer::check(&base, &diff_id).unwrap();
    }

    #[test]
    fn diffs_in_the_older_layout_still_merge() {
        let dir = TempDir::new().unwrap();
        let (base, at_offsets) = (dir.as_path().join("base"), dir.as_path().join("old"));
        let mem = anon_memory(&[(0, 4 << 20), (A, 1 << 20)]);
        fill_page(&mem, 0x5000, 0x11);
        write_full(&base, &mem, &TEST_ID).unwrap();
        reset_bitmaps(&mem);
        fill_page(&mem, 0x5000, 0x22);
        fill_page(&mem, A + 0x3000, 0x33);
        let mut dirty = DirtyBitmap::clean_for(&mem);
        dirty.or_with_memory_bitmaps(&mem).unwrap();
        // A full file holds every page at its offset: an at-offsets diff for
        // any bitmap.
        write_full(&at_offsets, &mem, &TEST_ID).unwrap();
        let layout = MemoryLayout::from_memory(&mem);
        let stats = merge_diff(
            &base,
            &at_offsets,
            &dirty,
            DiffLayout::AtOffsets,
            &layout,
            MergeIds::default(),
        )
        .unwrap();
        assert_eq!(stats.pages_written, 2);
        assert_file_equals_memory(&base, &mem);
    }

    #[test]
    fn scattered_pages_beyond_one_batch_are_packed_in_order() {
        let dir = TempDir::new().unwrap();
        let (base, diff) = (dir.as_path().join("base"), dir.as_path().join("diff"));
        // Every other page of 16 MiB: 2048 pieces that are not adjacent in
        // memory, more than one pwritev takes.
        let mem = anon_memory(&[(0, 16 << 20)]);
        write_full(&base, &mem, &TEST_ID).unwrap();
        reset_bitmaps(&mem);
        for page in (0..4096u64).step_by(2) {
            fill_page(&mem, page * PAGE_SIZE, (page / 2 % 251) as u8 + 1);
        }
        let mut dirty = DirtyBitmap::clean_for(&mem);
        dirty.or_with_memory_bitmaps(&mem).unwrap();
        assert_eq!(dirty.count(), 2048);
        let stats = write_diff(&diff, &mem, &dirty, &TEST_ID).unwrap();
        assert_eq!(stats.pages_written, 2048);
        let packed = std::fs::read(&diff).unwrap();
        assert_eq!(packed.len() as u64, 2048 * PAGE_SIZE + TRAILER_LEN);
        for (slot, page) in packed.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let want = (slot % 251) as u8 + 1;
            assert!(page.iter().all(|&b| b == want), "slot {slot}");
        }
        let layout = MemoryLayout::from_memory(&mem);
        merge_packed(&base, &diff, &dirty, &layout).unwrap();
        assert_file_equals_memory(&base, &mem);
    }

    #[test]
    fn diff_of_clean_bitmap_holds_only_its_id() {
        let dir = TempDir::new().unwrap();
        let diff = dir.as_path().join("diff");
        let mem = anon_memory(&[(0, 1 << 20)]);
        fill_page(&mem, 0, 1);
        let stats = write_diff(&diff, &mem, &DirtyBitmap::clean_for(&mem), &TEST_ID).unwrap();
        assert_eq!(stats.pages_written, 0);
        let (size, allocated) = size_and_allocated(&diff);
        assert_eq!(size, TRAILER_LEN, "only the snapshot id");
        assert!(allocated <= 4096, "{allocated}");
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
            write_diff(&diff, &mem, &wrong, &TEST_ID),
            Err(MemoryError::Bitmap(_))
        ));
        assert!(!diff.exists());

        let layout = MemoryLayout::from_memory(&mem);
        let dirty = DirtyBitmap::all_dirty(&layout);
        write_full(&base, &mem, &TEST_ID).unwrap();
        std::fs::write(&diff, [0u8; 4096]).unwrap();
        let err = merge_packed(&base, &diff, &dirty, &layout).unwrap_err();
        assert!(
            matches!(err, MemoryError::FileTooShort { expected, actual: 4096, .. } if expected == 1 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("diff"), "{err}");
        let missing = dir.as_path().join("missing");
        assert!(matches!(
            merge_diff(
                &missing,
                &diff,
                &dirty,
                DiffLayout::Packed,
                &layout,
                MergeIds::default()
            ),
            Err(MemoryError::Open { .. })
        ));
        assert!(matches!(
            merge_diff(
                &base,
                &diff,
                &wrong,
                DiffLayout::Packed,
                &layout,
                MergeIds::default()
            ),
            Err(MemoryError::Bitmap(_))
        ));
        // Unused regions of `other` keep clippy quiet about the binding.
        assert_eq!(other.iter().next().map(|r| r.len()), Some(2 << 20));
    }
}
