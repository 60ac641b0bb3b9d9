//! What a scenario drives: a VM monitor under test ("target"), one guest of
//! one size booted once and kept paused between measurements. The vmm
//! (in-process, through its library) and Firecracker (a process, through its
//! API socket) implement the same operations, so every scenario is written
//! once and the two are measured run by run, interleaved.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Result;

/// Full or diff memory snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapKind {
    Full,
    Diff,
}

/// Where a snapshot's two files go.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub mem: PathBuf,
}

impl SnapshotFiles {
    /// `<dir>/<name>.state` and `<dir>/<name>.mem`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            state: dir.join(format!("{name}.state")),
            mem: dir.join(format!("{name}.mem")),
        }
    }

    /// Deletes both files (a fresh file per run, for both targets alike).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.mem);
    }
}

/// What a target reports about a snapshot beyond its duration.
#[derive(Debug, Clone, Default)]
pub struct SnapshotDetail {
    /// Memory bytes written, when the target reports it.
    pub mem_bytes_written: Option<u64>,
    /// Pages in a diff, when the target reports it.
    pub pages_written: Option<u64>,
}

/// Timing of one restore to a running guest.
#[derive(Debug, Clone)]
pub struct RestoreTiming {
    /// From the first call (or process spawn) to a running guest.
    pub to_running: Duration,
    /// Named parts of `to_running`.
    pub phases: Vec<(&'static str, Duration)>,
}

/// Timing of N concurrent restores.
#[derive(Debug, Clone)]
pub struct ClonesTiming {
    /// From the common start to the last guest running.
    pub total: Duration,
    /// Each clone's own start-to-running time.
    pub per_vm: Vec<Duration>,
}

/// A live snapshot of the running guest.
#[derive(Debug, Clone)]
pub struct LiveTiming {
    /// How long the guest was paused.
    pub pause: Duration,
    /// Until both files were in place.
    pub total: Duration,
    pub bytes: u64,
    pub write_faults: u64,
}

/// A lazy (userfaultfd) restore.
#[derive(Debug, Clone)]
pub struct UffdTiming {
    /// To vCPUs running (the guest's first instruction), prefetch included.
    pub to_running: Duration,
    /// To the guest's first console output after the restore.
    pub to_output: Duration,
    pub faults: u64,
    pub prefetched_pages: u64,
    pub served_mib: f64,
}

/// Full and diff snapshot of the same densely populated guest.
#[derive(Debug, Clone)]
pub struct DenseDiff {
    pub full: Duration,
    pub full_bytes: u64,
    pub diff: Duration,
    pub diff_bytes: u64,
    pub touched_pages: u64,
    /// A second diff after rewriting the same number of pages as one
    /// contiguous run (a workload filling a buffer), for contrast with the
    /// scattered pages above.
    pub contiguous_diff: Duration,
    pub contiguous_diff_bytes: u64,
}

/// A booted guest on one VM monitor.
pub trait Target {
    /// "vmm" or "firecracker".
    fn name(&self) -> &'static str;
    fn pause(&mut self) -> Result<()>;
    fn resume(&mut self) -> Result<()>;
    /// Snapshots the paused guest.
    fn snapshot(&mut self, kind: SnapKind, files: &SnapshotFiles) -> Result<SnapshotDetail>;
    /// Lets the running guest run for `d`, failing if it stopped.
    fn run_for(&mut self, d: Duration) -> Result<()>;
    /// Rewrites `fraction` of guest pages, chosen at random, from the host
    /// (paused guest; same content, so the guest is unharmed). Returns the
    /// number of pages, or None when the target cannot do it.
    fn touch_memory(&mut self, fraction: f64, seed: u64) -> Result<Option<u64>>;
    /// A live snapshot of the running guest (None if unsupported).
    fn live_snapshot(&mut self, files: &SnapshotFiles) -> Result<Option<LiveTiming>>;
    /// Restores `files` lazily through userfaultfd, prefetching the saved
    /// working set when `prefetch` (else recording one), until the guest's
    /// next console output (None if unsupported).
    fn restore_uffd(
        &self,
        files: &SnapshotFiles,
        work: &Path,
        prefetch: bool,
    ) -> Result<Option<UffdTiming>>;
    /// On a copy of `base` (never resumed; made by the first call and kept
    /// for the next, like a sandbox snapshotted now and then), with every
    /// page of memory holding data: a full snapshot, then `fraction` of the
    /// pages rewritten, then a diff snapshot. None when the target cannot
    /// reach the guest's memory.
    fn dense_diff(
        &mut self,
        base: &SnapshotFiles,
        work: &Path,
        fraction: f64,
        seed: u64,
    ) -> Result<Option<DenseDiff>>;
    /// Restores `files` into a new guest, runs it to running, checks it is
    /// alive for `check` when given (not timed), and tears it down.
    fn restore(
        &self,
        files: &SnapshotFiles,
        work: &Path,
        check: Option<Duration>,
    ) -> Result<RestoreTiming>;
    /// The same restore from a separate, newly spawned process, when the
    /// target's `restore` is not already one.
    fn restore_process(&self, files: &SnapshotFiles, work: &Path) -> Result<Option<RestoreTiming>>;
    /// Restores `n` guests from `files` concurrently.
    fn clones(&self, files: &SnapshotFiles, n: usize, work: &Path) -> Result<ClonesTiming>;
    /// Stops the guest for good.
    fn shutdown(&mut self);
}
