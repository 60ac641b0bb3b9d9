//! Live snapshots of a running VM. Before the pause, guest memory is
//! write-protected while the guest runs (`snapshot::prepare_live`); the
//! guest-visible pause covers saving vCPU, VM and device state and fixing
//! the moment of the copy (`LivePrepared::freeze`: the pages written since
//! the protection are protected again); memory is then copied while the
//! guest runs. The state and memory files appear, atomically, when the copy
//! is complete.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use serde::Serialize;
use snapshot::atomic::PendingFile;
use snapshot::{LiveCopy, LiveJob, LivePrepared, LiveStats, MemoryLayout};

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
    /// From the start (write-protecting memory, before the pause) to both
    /// files in place.
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
        // Protecting all of memory is the slow part; the guest keeps running
        // meanwhile, and the pause only protects again what it wrote since.
        let prepared = snapshot::prepare_live(&self.mem, mem_path)?;
        let paused_at = Instant::now();
        if let Err(e) = self.pause() {
            prepared.cancel();
            return Err(e.into());
        }
        let result = self.save_and_freeze(prepared, state_path);
        // The guest runs again whether or not the snapshot could start.
        let resumed = self.resume();
        let pause = paused_at.elapsed();
        let (copy, state_file) = result?;
        // The copy thread starts once the vCPUs are on their way (starting
        // it first delays their wake-up by milliseconds on a busy host); a
        // guest write to a protected page meanwhile waits for it. If it
        // cannot start, the dropped copy closes its userfaultfd, which lifts
        // the protection.
        let job = copy.spawn()?;
        resumed?;
        self.live = Some(LiveSnapshot {
            job,
            state_file,
            pause,
            started,
        });
        Ok(pause)
    }

    /// While paused: saves the state into a pending file and fixes the
    /// moment of the memory copy. On error the protection is lifted.
    fn save_and_freeze(
        &mut self,
        prepared: LivePrepared<GuestMemoryMmap>,
        state_path: &Path,
    ) -> Result<(LiveCopy<GuestMemoryMmap>, PendingFile), SnapshotError> {
        let state_file = match self.save_live_state(state_path) {
            Ok(file) => file,
            Err(e) => {
                prepared.cancel();
                return Err(e);
            }
        };
        Ok((prepared.freeze()?, state_file))
    }

    /// While paused: saves devices, vCPUs and the VM into a pending state
    /// file, and restarts dirty tracking.
    fn save_live_state(&mut self, state_path: &Path) -> Result<PendingFile, SnapshotError> {
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
        Ok(state_file)
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
