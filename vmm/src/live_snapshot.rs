//! Live snapshots of a running VM: the guest-visible pause covers saving
//! vCPU, VM and device state and write-protecting guest memory; memory is
//! then copied while the guest runs (see `snapshot::begin_live`). The state
//! and memory files appear, atomically, when the copy is complete.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use snapshot::atomic::PendingFile;
use snapshot::{LiveJob, LiveStats, MemoryLayout};

use crate::microvm::{Microvm, VmState};
use crate::snapshot::{MemoryFile, MicrovmState, SnapshotError};

/// A live snapshot whose memory is being copied.
pub struct LiveSnapshot {
    job: LiveJob,
    state_file: PendingFile,
    pause: Duration,
    started: Instant,
}

/// The outcome of a live snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSnapshotStats {
    /// How long the guest was paused.
    pub pause: Duration,
    /// From the pause to both files in place.
    pub total: Duration,
    pub copy: LiveStats,
}

impl Microvm {
    /// Starts a live snapshot of the running VM; returns the guest-visible
    /// pause. [`Microvm::poll_live_snapshot`] reports the end.
    pub fn begin_live_snapshot(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<Duration, SnapshotError> {
        if self.live.is_some() {
            return Err(SnapshotError::LiveInProgress);
        }
        if self.state() != VmState::Running {
            return Err(SnapshotError::LiveNeedsRunning);
        }
        if self.lazy.is_some() {
            return Err(SnapshotError::Live(snapshot::LiveError::Uffd(
                "this VM's memory is served by the page server (Uffd restore); take a Full snapshot".into(),
            )));
        }
        let started = Instant::now();
        self.pause()?;
        let result = self.protect_and_save(state_path, mem_path);
        // The guest runs again whether or not the snapshot could start.
        let resumed = self.resume();
        let (job, state_file) = result?;
        resumed?;
        let pause = started.elapsed();
        self.live = Some(LiveSnapshot {
            job,
            state_file,
            pause,
            started,
        });
        Ok(pause)
    }

    /// While paused: saves the state into a pending file and write-protects
    /// memory for the copy.
    fn protect_and_save(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<(LiveJob, PendingFile), SnapshotError> {
        let (devices, vcpus, vm) = self.capture_state()?;
        let layout = MemoryLayout::from_memory(&self.mem);
        // The next diff is relative to this moment.
        self.take_dirty_pages(&layout)?;
        let state = MicrovmState {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.config.clone(),
            memory_layout: layout,
            memory_file: MemoryFile::Full,
            vm,
            vcpus,
            devices,
        };
        let state_err = |source: std::io::Error| {
            SnapshotError::StateFile(snapshot::StateFileError::Write {
                path: state_path.to_path_buf(),
                source,
            })
        };
        let bytes = snapshot::encode(&state).map_err(|source| {
            SnapshotError::StateFile(snapshot::StateFileError::Encode {
                path: state_path.to_path_buf(),
                source,
            })
        })?;
        let mut state_file = PendingFile::create(state_path)
            .map_err(|e| SnapshotError::StateFile(snapshot::StateFileError::Atomic(e)))?;
        state_file.file().write_all(&bytes).map_err(state_err)?;
        let copy = snapshot::begin_live(&self.mem, mem_path)?;
        // Once protected, the copy must run even if nothing else does.
        Ok((copy.spawn()?, state_file))
    }

    /// The result of a finished live snapshot, once; None while it runs (or
    /// when there is none).
    pub fn poll_live_snapshot(&mut self) -> Option<Result<LiveSnapshotStats, SnapshotError>> {
        if !self.live.as_ref()?.job.is_finished() {
            return None;
        }
        let live = self.live.take()?;
        Some(live.finish())
    }
}

impl LiveSnapshot {
    fn finish(self) -> Result<LiveSnapshotStats, SnapshotError> {
        let copy = self.job.wait()?;
        // Memory is in place; the state file goes last, so a state file
        // never names memory that is not there.
        self.state_file
            .commit()
            .map_err(|e| SnapshotError::StateFile(snapshot::StateFileError::Atomic(e)))?;
        Ok(LiveSnapshotStats {
            pause: self.pause,
            total: self.started.elapsed(),
            copy,
        })
    }
}
