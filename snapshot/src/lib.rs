//! Snapshot support that knows nothing about KVM: the [`Persist`] trait every
//! component implements, the versioned and checksummed state-file format
//! ([`format`]), crash-safe file replacement ([`atomic`]) and guest-memory
//! files, full, diff and sparse ([`memory`]).

pub mod atomic;
pub mod format;
pub mod id;
pub mod memory;
mod page_bits;
pub mod uffd;

pub use atomic::{write_atomic, AtomicWriteError};
pub use format::{decode, encode, load_state, save_state, FormatError, StateFileError};
pub use id::SnapshotId;
pub use memory::{
    begin_live, merge_diff, prepare_live, read_into, write_diff, write_full, write_full_with,
    DiffLayout, DirtyBitmap, DirtyBitmapError, LiveCopy, LiveError, LiveJob, LivePrepared,
    LiveStats, MemoryError, MemoryLayout, MemoryWriteStats, MergeIds, RegionLayout, ScanMode,
    PAGE_SIZE,
};

/// Save and restore of one component's state.
///
/// Building a component for boot and restoring it from a snapshot take the same
/// path: `restore` receives the same constructor arguments a fresh build would,
/// plus the saved state. There is deliberately no default method, so no
/// component can skip its state silently.
pub trait Persist: Sized {
    /// The serializable state of the component.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What the component needs from its environment to be rebuilt
    /// (guest memory, event fds, host files, ...).
    type ConstructorArgs;
    /// Why a restore can fail.
    type Error;

    /// Captures the component's state. The component must be quiescent
    /// (vCPUs paused, queues not being processed).
    fn save(&self) -> Self::State;

    /// Rebuilds the component from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
