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
use snapshot::{DirtyBitmap, LiveCopy, LiveJob, LivePrepared, LiveStats, MemoryLayout, SnapshotId};

use crate::microvm::{Microvm, VmState};
use crate::snapshot::{MemoryFile, MicrovmState, SnapshotError};

/// A live snapshot whose memory is being copied.
pub struct LiveSnapshot {
    id: SnapshotId,
    job: LiveJob,
    state_file: PendingFile,
    /// Dirty pages taken at the pause, given back if the snapshot fails.
    taken_dirty: Option<DirtyBitmap>,
    pause: Duration,
    started: Instant,
}

/// The outcome of a live snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSnapshotStats {
    pub id: SnapshotId,
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
        let id = SnapshotId::random().map_err(SnapshotError::Id)?;
        // Protecting all of memory is the slow part; the guest keeps running
        // meanwhile, and the pause only protects again what it wrote since.
        let prepared = snapshot::prepare_live(&self.mem, mem_path, &id)?;
        let paused_at = Instant::now();
        if let Err(e) = self.pause() {
            prepared.cancel();
            return Err(e.into());
        }
        let result = self.save_and_freeze(prepared, state_path, id);
        // The guest runs again whether or not the snapshot could start.
        let resumed = self.resume();
        let pause = paused_at.elapsed();
        let (copy, state_file, taken_dirty) = result?;
        // The copy thread starts once the vCPUs are on their way (starting
        // it first delays their wake-up by milliseconds on a busy host); a
        // guest write to a protected page meanwhile waits for it. If it
        // cannot start, the dropped copy closes its userfaultfd, which lifts
        // the protection.
        let job = match copy.spawn() {
            Ok(job) => job,
            Err(e) => {
                self.carry_dirty_pages(taken_dirty);
                return Err(e.into());
            }
        };
        self.live = Some(LiveSnapshot {
            id,
            job,
            state_file,
            taken_dirty,
            pause,
            started,
        });
        resumed?;
        Ok(pause)
    }

    /// While paused: saves the state into a pending file and fixes the
    /// moment of the memory copy. On error the protection is lifted.
    #[allow(clippy::type_complexity)]
    fn save_and_freeze(
        &mut self,
        prepared: LivePrepared<GuestMemoryMmap>,
        state_path: &Path,
        id: SnapshotId,
    ) -> Result<(LiveCopy<GuestMemoryMmap>, PendingFile, Option<DirtyBitmap>), SnapshotError> {
        let (state_file, taken_dirty) = match self.save_live_state(state_path, id) {
            Ok(saved) => saved,
            Err(e) => {
                prepared.cancel();
                return Err(e);
            }
        };
        match prepared.freeze() {
            Ok(copy) => Ok((copy, state_file, taken_dirty)),
            Err(e) => {
                self.carry_dirty_pages(taken_dirty);
                Err(e.into())
            }
        }
    }

    /// While paused: saves devices, vCPUs and the VM into a pending state
    /// file, and restarts dirty tracking; returns the dirty pages taken (the
    /// next diff is relative to this moment once the snapshot completes).
    fn save_live_state(
        &mut self,
        state_path: &Path,
        id: SnapshotId,
    ) -> Result<(PendingFile, Option<DirtyBitmap>), SnapshotError> {
        let (devices, vcpus, vm) = self.capture_state()?;
        let layout = MemoryLayout::from_memory(&self.mem);
        let taken_dirty = self.take_dirty_pages(&layout)?;
        let state = MicrovmState {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            id: Some(id),
            config: self.config.clone(),
            memory_layout: layout,
            memory_file: MemoryFile::Full,
            vm,
            vcpus,
            devices,
        };
        match pending_state_file(state_path, &state) {
            Ok(file) => Ok((file, taken_dirty)),
            Err(e) => {
                self.carry_dirty_pages(taken_dirty);
                Err(e)
            }
        }
    }

    /// The result of a finished live snapshot, once; None while it runs (or
    /// when there is none).
    pub fn poll_live_snapshot(&mut self) -> Option<Result<LiveSnapshotStats, SnapshotError>> {
        if !self.live.as_ref()?.job.is_finished() {
            return None;
        }
        let mut live = self.live.take()?;
        let taken_dirty = live.taken_dirty.take();
        let id = live.id;
        let result = live.finish();
        match &result {
            Ok(_) => self.snapshot_done(id),
            Err(_) => self.carry_dirty_pages(taken_dirty),
        }
        Some(result)
    }
}

/// `state` encoded into a pending (not yet visible) state file.
fn pending_state_file(
    state_path: &Path,
    state: &MicrovmState,
) -> Result<PendingFile, SnapshotError> {
    let bytes = snapshot::encode(state).map_err(|source| {
        SnapshotError::StateFile(snapshot::StateFileError::Encode {
            path: state_path.to_path_buf(),
            source,
        })
    })?;
    let mut state_file = PendingFile::create(state_path)
        .map_err(|e| SnapshotError::StateFile(snapshot::StateFileError::Atomic(e)))?;
    state_file.file().write_all(&bytes).map_err(|source| {
        SnapshotError::StateFile(snapshot::StateFileError::Write {
            path: state_path.to_path_buf(),
            source,
        })
    })?;
    Ok(state_file)
}

impl LiveSnapshot {
    fn finish(self) -> Result<LiveSnapshotStats, SnapshotError> {
        let copy = self.job.wait()?;
        // Memory is in place; the state file goes last. Should the VMM die
        // between the two, the ids in the files tell the pair apart.
        self.state_file
            .commit()
            .map_err(|e| SnapshotError::StateFile(snapshot::StateFileError::Atomic(e)))?;
        Ok(LiveSnapshotStats {
            id: self.id,
            pause: self.pause,
            total: self.started.elapsed(),
            copy,
        })
    }
}
