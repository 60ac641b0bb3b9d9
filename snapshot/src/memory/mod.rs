//! Guest-memory files.
//!
//! A memory file is all guest regions back to back, region `i` at the sum of
//! the sizes of regions `0..i` ([`MemoryLayout`]). Full files are sparse: zero
//! pages are holes. Diff files hold only the pages of a [`DirtyBitmap`],
//! packed back to back ([`DiffLayout`]); [`merge_diff`] applies one onto its
//! base.

mod diff;
mod dirty;
mod full;
pub(crate) mod host;
mod layout;
mod live;
mod live_track;
#[cfg(test)]
pub(crate) mod test_util;
pub mod trailer;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::atomic::AtomicWriteError;

pub use diff::{merge_diff, write_diff, DiffLayout, MergeIds};
pub use dirty::{DirtyBitmap, DirtyBitmapError, DirtyRuns};
pub use full::{read_into, write_full, write_full_with, ScanMode};
pub use layout::{MemoryLayout, RegionLayout};
pub use live::{begin_live, prepare_live, LiveCopy, LiveError, LiveJob, LivePrepared, LiveStats};

/// Granularity of holes, dirty tracking and the pagemap: the x86_64 base page.
pub const PAGE_SIZE: u64 = 4096;

/// Largest single write from guest memory; bounds the time between progress
/// of separate runs without costing throughput.
const MAX_RUN_BYTES: u64 = 64 << 20;

/// Why a memory file could not be written, read or merged.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A file could not be opened.
    #[error("cannot open memory file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A read, write, hole punch, resize or sync failed.
    #[error("cannot {op} memory file {path} at offset {offset:#x}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// File offset of the operation.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// `/proc/self/pagemap` could not be read for a host range.
    #[error("cannot read /proc/self/pagemap for host address {host_addr:#x}: {source}")]
    Pagemap {
        /// Host virtual address of the first page asked for.
        host_addr: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// A guest region is not mapped contiguously in this process.
    #[error("guest memory region at {guest_addr:#x} has no host mapping")]
    NoHostMapping {
        /// Guest physical address of the region.
        guest_addr: u64,
    },
    /// The layout itself is inconsistent (e.g. from a damaged state file).
    #[error("invalid memory layout: region {index}: {reason}")]
    InvalidLayout {
        /// Index of the offending region.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Guest memory and the saved layout have a different number of regions.
    #[error("memory layout has {expected} regions but guest memory has {found}")]
    RegionCountMismatch {
        /// Regions in the layout.
        expected: usize,
        /// Regions in guest memory.
        found: usize,
    },
    /// A guest region differs from the saved layout.
    #[error(
        "memory region {index} differs from the layout: expected {expected:?}, found {found:?}"
    )]
    RegionMismatch {
        /// Index of the region.
        index: usize,
        /// The layout's region.
        expected: RegionLayout,
        /// The guest memory's region.
        found: RegionLayout,
    },
    /// A file is shorter than the memory it must hold.
    #[error("memory file {path} is too short: expected at least {expected} bytes, found {actual}")]
    FileTooShort {
        /// The file.
        path: PathBuf,
        /// Bytes needed.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The dirty bitmap does not fit the memory.
    #[error(transparent)]
    Bitmap(#[from] DirtyBitmapError),
    /// Replacing the memory file failed.
    #[error(transparent)]
    Atomic(#[from] AtomicWriteError),
    /// The memory file belongs to another snapshot (or names none).
    #[error("memory file {path} {} (expected snapshot {expected})", match found {
        Some(id) => format!("belongs to snapshot {id}"),
        None => "has no snapshot id".to_string(),
    })]
    WrongSnapshot {
        /// The file.
        path: PathBuf,
        /// The snapshot it should belong to.
        expected: crate::id::SnapshotId,
        /// The snapshot its trailer names.
        found: Option<crate::id::SnapshotId>,
    },
}

/// What writing or merging a memory file did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryWriteStats {
    /// Bytes of page data written to the file.
    pub bytes_written: u64,
    /// Pages written as data.
    pub pages_written: u64,
    /// Zero pages left as (or, when merging, turned into) holes.
    pub zero_pages_skipped: u64,
    /// Of `zero_pages_skipped`, pages the pagemap showed were never populated,
    /// so they were not even read.
    pub unpopulated_pages: u64,
    /// Wall-clock time of the whole operation, including fsync.
    pub duration: Duration,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a std::path::Path,
    offset: u64,
) -> impl FnOnce(io::Error) -> MemoryError + 'a {
    move |source| MemoryError::Io {
        op,
        path: path.to_path_buf(),
        offset,
        source,
    }
}

/// Number of pages covering `len` bytes (the last one may be partial).
fn pages_in(len: u64) -> u64 {
    len.div_ceil(PAGE_SIZE)
}
