//! Serving guest memory on demand with userfaultfd.
//!
//! A restored VM's memory can be registered with userfaultfd instead of being
//! read up front: the first touch of each page traps to a [`PageServer`]
//! thread, which fills it from a [`PageSource`] (the snapshot's memory file)
//! with `UFFDIO_COPY`, or maps the zero page for holes. The server records the
//! order in which pages are first touched (the working set), and a later
//! restore can [`PageServer::prefetch`] that set in large copies before the
//! guest asks for it.

mod ioctl;
mod server;
mod source;
mod wait;
pub mod working_set;

use std::io;
use std::path::PathBuf;

pub use server::{PageServer, PageServerStats};
pub use source::{FilePageSource, PageSource};
pub use userfaultfd::Uffd;
pub(crate) use wait::wait;

use vm_memory::GuestMemoryBackend;

use crate::memory::host::HostRegion;
use crate::memory::{MemoryError, MemoryLayout};

/// Why the page server could not be set up or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// No userfaultfd could be created.
    #[error("cannot create a userfaultfd: {0}")]
    Create(#[source] userfaultfd::Error),
    /// A range could not be registered for missing-page faults.
    #[error(
        "cannot register {len:#x} bytes at host address {host_addr:#x} with userfaultfd: {source}"
    )]
    Register {
        /// Start of the range.
        host_addr: usize,
        /// Length of the range.
        len: usize,
        /// The underlying error.
        source: userfaultfd::Error,
    },
    /// Filling pages failed.
    #[error("cannot {op} {len:#x} bytes at host address {host_addr:#x}: {source}")]
    Fill {
        /// `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` or `UFFDIO_WAKE`.
        op: &'static str,
        /// Start of the range.
        host_addr: usize,
        /// Length of the range.
        len: usize,
        /// The underlying error.
        source: io::Error,
    },
    /// Events could not be read from the userfaultfd.
    #[error("cannot read userfaultfd events: {0}")]
    ReadEvents(#[source] userfaultfd::Error),
    /// The page source failed.
    #[error("cannot read {len:#x} bytes at offset {offset:#x} of the page source: {source}")]
    Source {
        /// Offset in the source.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// The underlying error.
        source: io::Error,
    },
    /// The memory file could not be opened or examined.
    #[error("cannot open page source {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A fault or prefetch address is outside every served region.
    #[error("{what} {value:#x} is outside the served memory")]
    OutOfRange {
        /// "host address" or "file offset".
        what: &'static str,
        /// The address or offset.
        value: u64,
    },
    /// Regions and source do not fit together.
    #[error("region at host address {host_addr:#x}: {reason}")]
    BadRegion {
        /// Start of the region.
        host_addr: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The server thread's machinery (poll, eventfd, thread spawn) failed.
    #[error("page server: cannot {op}: {source}")]
    Thread {
        /// What failed.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The server thread panicked.
    #[error("page server thread panicked")]
    Panicked,
    /// Guest memory has no usable host mapping.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// One host range served from the source: `len` bytes at `host_addr` hold
/// the source's bytes at `file_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UffdRegion {
    /// Host virtual address of the first byte (page aligned).
    pub host_addr: usize,
    /// Length in bytes (page aligned).
    pub len: usize,
    /// Offset of the first byte in the page source.
    pub file_offset: u64,
}

impl UffdRegion {
    /// The regions of `mem`, at the file offsets of its [`MemoryLayout`].
    pub fn from_memory<M: GuestMemoryBackend>(mem: &M) -> Result<Vec<Self>, UffdError> {
        let layout = MemoryLayout::from_memory(mem);
        mem.iter()
            .zip(&layout.regions)
            .map(|(region, rl)| {
                let host = HostRegion::new(region)?;
                Ok(Self {
                    host_addr: host.addr(),
                    len: host.len(),
                    file_offset: rl.file_offset,
                })
            })
            .collect()
    }
}

/// Creates a userfaultfd suited to the page server: non-blocking, close on
/// exec, reporting `MADV_DONTNEED`/`MADV_REMOVE` (balloon) as remove events,
/// and handling kernel-mode faults too (KVM touches guest memory from the
/// kernel).
pub fn create_uffd() -> Result<Uffd, UffdError> {
    userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(userfaultfd::FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(UffdError::Create)
}

#[cfg(test)]
mod tests;
