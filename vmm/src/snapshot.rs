//! Whole-VM snapshots: what a snapshot holds ([`MicrovmState`]), taking one
//! from a paused VM, and building a new VM from one.
//!
//! Creating: devices, then vCPUs, then the VM (irqchip, PIT, clock) are
//! saved while every vCPU is paused; guest memory is written full (sparse)
//! or as a diff of the pages dirtied since the previous snapshot; the state
//! file is written last and atomically.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapshot::{DiffLayout, DirtyBitmap, MemoryLayout, MemoryWriteStats, SnapshotId};
use vm_memory::GuestMemoryBackend;

use crate::arch::vcpu_state::{self, VcpuState};
use crate::arch::vm_state::{self, VmState};
use crate::builder::{self, BuildError};
use crate::config::VmConfig;
use crate::device_manager::{DeviceManager, DevicesState, RestoreOverrides};
use crate::lazy::{LazyMemory, LazyOptions};
use crate::microvm::{LifecycleError, Microvm, MicrovmParts, VmState as LifecycleState};
use crate::stop::VmStop;
use crate::vm::{open_kvm, Vm};

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";

/// Full or diff memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory; zero pages are holes.
    #[default]
    Full,
    /// Only pages written since the previous snapshot (needs dirty tracking).
    Diff,
    /// All of guest memory, copied while the guest runs: the VM pauses only
    /// to save its state and write-protect memory (the VM must be running).
    Live,
}

/// What the memory file of a snapshot holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemoryFile {
    Full,
    /// The listed pages only; the rest come from the base it was taken on.
    Diff {
        dirty: DirtyBitmap,
        /// Where the file keeps them (absent in state files written before
        /// diffs were packed).
        #[serde(default)]
        layout: DiffLayout,
        /// The snapshot the pages changed since: the only base it merges
        /// onto (absent in state files written before snapshots had ids).
        #[serde(default)]
        base: Option<SnapshotId>,
    },
}

/// Everything needed to rebuild a VM, except guest memory itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The vmm version that wrote the snapshot.
    pub vmm_version: String,
    /// This snapshot's id, also at the end of its memory file (absent in
    /// state files written before snapshots had ids).
    #[serde(default)]
    pub id: Option<SnapshotId>,
    /// The configuration the VM was built with.
    pub config: VmConfig,
    pub memory_layout: MemoryLayout,
    pub memory_file: MemoryFile,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused to snapshot it (it is {0:?})")]
    NotPaused(LifecycleState),
    #[error("diff snapshots need dirty page tracking (track_dirty_pages)")]
    NoDirtyTracking,
    #[error(
        "a diff snapshot holds the pages changed since an earlier snapshot of this VM (or the \
         one it was restored from), and there is none: take a Full snapshot first"
    )]
    NoDiffBase,
    #[error("choosing a snapshot id: {0}")]
    Id(std::io::Error),
    #[error("a live snapshot is taken of a running VM: resume it first")]
    LiveNeedsRunning,
    #[error("a live snapshot is still being written")]
    LiveInProgress,
    #[error("live snapshot: {0}")]
    Live(#[from] snapshot::LiveError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("saving vCPU {index}: {message}")]
    Vcpu { index: u8, message: String },
    #[error("saving VM state: {0}")]
    VmState(#[from] vcpu_state::StateError),
    #[error("reading the dirty log: {0}")]
    DirtyLog(String),
    #[error("populating lazily restored memory before the snapshot: {0}")]
    Populate(String),
    #[error("writing memory file {path}: {source}")]
    Memory {
        path: PathBuf,
        source: snapshot::MemoryError,
    },
    #[error("writing state file: {0}")]
    StateFile(#[from] snapshot::StateFileError),
}

/// Which snapshot was written, and how long each part took.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStats {
    pub id: SnapshotId,
    pub devices_vcpus_vm: Duration,
    pub memory: MemoryWriteStats,
    pub state_file: Duration,
    pub total: Duration,
}

impl Microvm {
    /// Writes a snapshot of the paused VM: state to `state_path`, memory to
    /// `mem_path`. Both files are replaced atomically.
    pub fn snapshot(
        &mut self,
        kind: SnapshotType,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<SnapshotStats, SnapshotError> {
        let t0 = Instant::now();
        if kind == SnapshotType::Live {
            return Err(SnapshotError::LiveNeedsRunning);
        }
        if self.state() != LifecycleState::Paused {
            return Err(SnapshotError::NotPaused(self.state()));
        }
        if kind == SnapshotType::Diff && !self.vm.dirty_tracking() {
            return Err(SnapshotError::NoDirtyTracking);
        }
        let base = self.dirty_baseline;
        if kind == SnapshotType::Diff && base.is_none() {
            return Err(SnapshotError::NoDiffBase);
        }
        let id = SnapshotId::random().map_err(SnapshotError::Id)?;
        let (devices, vcpus, vm) = self.capture_state()?;
        let t_state = t0.elapsed();

        if let Some(lazy) = &self.lazy {
            // Pages the page server has not filled yet are the memory
            // file's, not zero: bring them all in before writing.
            lazy.populate_all()
                .map_err(|e| SnapshotError::Populate(e.to_string()))?;
        }
        let layout = MemoryLayout::from_memory(&self.mem);
        let dirty = self.take_dirty_pages(&layout)?;
        let mem_err = |source| SnapshotError::Memory {
            path: mem_path.to_path_buf(),
            source,
        };
        let written = match (kind, &dirty) {
            (SnapshotType::Diff, Some(dirty)) => {
                snapshot::write_diff(mem_path, &self.mem, dirty, &id).map(|stats| {
                    let file = MemoryFile::Diff {
                        dirty: dirty.clone(),
                        layout: DiffLayout::Packed,
                        base,
                    };
                    (stats, file)
                })
            }
            (SnapshotType::Diff, None) => return Err(SnapshotError::NoDirtyTracking),
            // A file-mapped (restored) VM's untouched pages are the file's,
            // not zero: `write_full` scans them by content.
            (SnapshotType::Full | SnapshotType::Live, _) => {
                snapshot::write_full(mem_path, &self.mem, &id)
                    .map(|stats| (stats, MemoryFile::Full))
            }
        };
        let (memory, memory_file) = match written {
            Ok(w) => w,
            Err(e) => {
                self.carry_dirty_pages(dirty);
                return Err(mem_err(e));
            }
        };
        let state = MicrovmState {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            id: Some(id),
            config: self.config.clone(),
            memory_layout: layout,
            memory_file,
            vm,
            vcpus,
            devices,
        };
        let t_file = Instant::now();
        if let Err(e) = snapshot::save_state(state_path, &state) {
            self.carry_dirty_pages(dirty);
            return Err(e.into());
        }
        self.snapshot_done(id);
        Ok(SnapshotStats {
            id,
            devices_vcpus_vm: t_state,
            memory,
            state_file: t_file.elapsed(),
            total: t0.elapsed(),
        })
    }

    /// Saves devices, then vCPUs, then the VM; every vCPU must be paused.
    pub(crate) fn capture_state(
        &self,
    ) -> Result<(DevicesState, Vec<VcpuState>, VmState), SnapshotError> {
        let devices = self.devices.save();
        let vcpus = self.save_vcpus()?;
        let vm = vm_state::save(self.vm.fd())?;
        Ok((devices, vcpus, vm))
    }

    fn save_vcpus(&self) -> Result<Vec<VcpuState>, SnapshotError> {
        let slots: Vec<Arc<Mutex<Option<VcpuState>>>> =
            self.vcpus.iter().map(|_| Arc::default()).collect();
        for (handle, slot) in self.vcpus.iter().zip(&slots) {
            let slot = slot.clone();
            let msrs = self.msr_indices.clone();
            handle
                .with_fd("save state", move |fd| {
                    let state = vcpu_state::save(fd, &msrs).map_err(|e| e.to_string())?;
                    // Tell a kvmclock guest it was paused (no soft-lockup
                    // report on resume); guests without kvmclock refuse it.
                    let _ = fd.kvmclock_ctrl();
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
                    Ok(())
                })
                .map_err(|e| SnapshotError::Vcpu {
                    index: handle.index(),
                    message: e.to_string(),
                })?;
        }
        slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or(SnapshotError::Vcpu {
                        index: i as u8,
                        message: "no state returned".into(),
                    })
            })
            .collect()
    }

    /// Pages written since the last snapshot (KVM's log, which this read
    /// resets, plus the VMM's own writes, plus what an unfinished snapshot
    /// took), or None without dirty tracking. A snapshot that then fails
    /// gives them back with [`Microvm::carry_dirty_pages`].
    pub(crate) fn take_dirty_pages(
        &mut self,
        layout: &MemoryLayout,
    ) -> Result<Option<DirtyBitmap>, SnapshotError> {
        if !self.vm.dirty_tracking() {
            return Ok(None);
        }
        let mut words = Vec::with_capacity(layout.regions.len());
        for (slot, region) in layout.regions.iter().enumerate() {
            let log = self
                .vm
                .fd()
                .get_dirty_log(slot as u32, region.size as usize)
                .map_err(|e| SnapshotError::DirtyLog(format!("slot {slot}: {e}")))?;
            words.push(log);
        }
        let mut dirty = DirtyBitmap::from_words(layout, words)
            .map_err(|e| SnapshotError::DirtyLog(e.to_string()))?;
        dirty
            .or_with_memory_bitmaps(&self.mem)
            .map_err(|e| SnapshotError::DirtyLog(e.to_string()))?;
        for region in self.mem.iter() {
            region.bitmap().reset();
        }
        if let Some(carried) = self.carried_dirty.take() {
            dirty
                .or_with(&carried)
                .map_err(|e| SnapshotError::DirtyLog(e.to_string()))?;
        }
        Ok(Some(dirty))
    }

    /// Keeps pages taken for a snapshot that did not complete, so the next
    /// diff still holds them (KVM's log no longer does).
    pub(crate) fn carry_dirty_pages(&mut self, dirty: Option<DirtyBitmap>) {
        let Some(dirty) = dirty else {
            return;
        };
        let merged = match self.carried_dirty.take() {
            // The same VM, so the same layout: keep both.
            Some(mut carried) => match carried.or_with(&dirty) {
                Ok(()) => carried,
                Err(_) => dirty,
            },
            None => dirty,
        };
        self.carried_dirty = Some(merged);
    }

    /// A snapshot is complete: later diffs are relative to it.
    pub(crate) fn snapshot_done(&mut self, id: SnapshotId) {
        if self.vm.dirty_tracking() {
            self.dirty_baseline = Some(id);
        }
    }
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone)]
pub enum MemoryBackend {
    /// Mapped copy-on-write from the memory file (MAP_PRIVATE).
    File(PathBuf),
    /// Anonymous memory filled on demand from the memory file by the
    /// userfaultfd page server.
    Uffd { path: PathBuf, options: LazyOptions },
}

impl MemoryBackend {
    /// The memory file.
    pub fn path(&self) -> &Path {
        match self {
            MemoryBackend::File(p) | MemoryBackend::Uffd { path: p, .. } => p,
        }
    }
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreParams {
    pub state_path: PathBuf,
    pub memory: MemoryBackend,
    /// Keep tracking dirty pages (for diff snapshots of the restored VM).
    pub track_dirty_pages: bool,
    /// Where the restored guest's console goes.
    pub serial: crate::config::SerialOutput,
    /// Host resources to use instead of the saved ones.
    pub overrides: RestoreOverrides,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading snapshot state: {0}")]
    StateFile(#[from] snapshot::StateFileError),
    #[error("snapshot {path} holds a diff; merge it onto its base memory file first")]
    DiffNotLoadable { path: PathBuf },
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("lazy restore: {0}")]
    Lazy(String),
    #[error("memory file {path}: {reason}")]
    MemoryFile { path: PathBuf, reason: String },
}

/// The memory file must cover the snapshot's whole layout.
fn check_memory_file(path: &Path, layout: &MemoryLayout) -> Result<(), RestoreError> {
    let err = |reason: String| RestoreError::MemoryFile {
        path: path.to_path_buf(),
        reason,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len();
    let need = layout.total_size();
    if len < need {
        return Err(err(format!(
            "has {len} bytes, the snapshot's memory needs {need}"
        )));
    }
    Ok(())
}

/// Builds a new VM from a snapshot; its vCPUs start paused.
pub fn build_from_snapshot(params: &RestoreParams) -> Result<Microvm, RestoreError> {
    let state: MicrovmState = snapshot::load_state(&params.state_path)?;
    if let MemoryFile::Diff { .. } = state.memory_file {
        return Err(RestoreError::DiffNotLoadable {
            path: params.state_path.clone(),
        });
    }
    state
        .config
        .validate_limits()
        .map_err(|e| RestoreError::Inconsistent(e.to_string()))?;
    state
        .memory_layout
        .validate()
        .map_err(|e| RestoreError::Inconsistent(e.to_string()))?;
    let mem_bytes = state.config.mem_mib << 20;
    if state.memory_layout.total_size() != mem_bytes {
        return Err(RestoreError::Inconsistent(format!(
            "the memory layout holds {} bytes for a {} MiB VM",
            state.memory_layout.total_size(),
            state.config.mem_mib
        )));
    }
    check_memory_file(params.memory.path(), &state.memory_layout)?;
    if let Some(id) = &state.id {
        snapshot::memory::trailer::check(params.memory.path(), id)
            .map_err(|e| RestoreError::Inconsistent(e.to_string()))?;
    }
    if state.vcpus.is_empty() || state.vcpus.len() != usize::from(state.config.vcpus) {
        return Err(RestoreError::Inconsistent(format!(
            "{} vCPU states for a {}-vCPU VM",
            state.vcpus.len(),
            state.config.vcpus
        )));
    }
    let mut config = state.config.clone();
    config.track_dirty_pages = params.track_dirty_pages;
    config.serial = params.serial.clone();

    let t = Instant::now();
    let phase = |what: &str| log::debug!("restore: {what} done at {:?}", t.elapsed());
    let kvm = open_kvm().map_err(BuildError::from)?;
    let regions: Vec<(u64, u64, u64)> = state
        .memory_layout
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size, r.file_offset))
        .collect();
    let (mem, lazy) = match &params.memory {
        MemoryBackend::File(path) => (
            crate::memory::map_file_private(path, &regions).map_err(BuildError::from)?,
            None,
        ),
        MemoryBackend::Uffd { path, options } => {
            let ranges: Vec<(u64, u64)> = regions.iter().map(|r| (r.0, r.1)).collect();
            let mem = crate::memory::anonymous_regions(&ranges).map_err(BuildError::from)?;
            let lazy = LazyMemory::start(&mem, path, options)
                .map_err(|e| RestoreError::Lazy(e.to_string()))?;
            (mem, Some(lazy))
        }
    };
    phase("memory mapped");
    let vm = Vm::new(&kvm, &mem, config.track_dirty_pages).map_err(BuildError::from)?;
    phase("VM created, memory registered");
    let console = builder::console_for(&config)?;
    let stop = Arc::new(VmStop::new().map_err(|e| BuildError::EventLoop(e.to_string()))?);
    let mut devices = DeviceManager::new(&vm, console.clone(), &stop, Some(&state.devices))
        .map_err(BuildError::from)?;
    let unknown = params.overrides.unknown_ids(&state.devices.virtio);
    if !unknown.is_empty() {
        return Err(RestoreError::Inconsistent(format!(
            "overrides name devices the snapshot does not have: {}",
            unknown.join(", ")
        )));
    }
    devices
        .restore_virtio(&vm, &mem, &state.devices.virtio, &params.overrides)
        .map_err(BuildError::from)?;
    phase("devices restored");
    // The clock, irqchip and PIT first: writing the kvmclock MSRs of a vCPU
    // makes KVM fill in the guest's wall-clock data from the VM clock, which
    // must already be the guest's.
    vm_state::restore(vm.fd(), &state.vm).map_err(BuildError::from)?;
    phase("VM state restored");
    let vcpus = builder::create_vcpus(&vm, &devices, &stop, config.vcpus, |index, fd| {
        vcpu_state::restore(fd, &state.vcpus[usize::from(index)]).map_err(BuildError::from)
    })?;
    phase("vCPUs restored");
    let msr_indices = Arc::new(builder::msr_indices(&kvm)?);
    let mut microvm = Microvm::new(MicrovmParts {
        config,
        vm,
        mem,
        devices,
        console,
        stop,
        vcpus,
        msr_indices,
        lazy,
    })?;
    // Its memory is that snapshot's: diffs of it are relative to it.
    if let Some(id) = state.id {
        microvm.snapshot_done(id);
    }
    Ok(microvm)
}

/// Why a diff could not be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("reading diff snapshot state: {0}")]
    StateFile(#[from] snapshot::StateFileError),
    #[error("snapshot {0} is not a diff snapshot")]
    NotADiff(PathBuf),
    #[error("merging memory: {0}")]
    Memory(#[from] snapshot::MemoryError),
}

/// Applies the diff memory file of the diff snapshot at `state_path` onto
/// `base_mem`, then rewrites that state file as a full snapshot whose memory
/// is the merged base: afterwards (`state_path`, `base_mem`) is loadable.
pub fn merge_diff_snapshot(
    state_path: &Path,
    base_mem: &Path,
    diff_mem: &Path,
) -> Result<MemoryWriteStats, MergeError> {
    let mut state: MicrovmState = snapshot::load_state(state_path)?;
    let MemoryFile::Diff {
        dirty,
        layout,
        base,
    } = &state.memory_file
    else {
        return Err(MergeError::NotADiff(state_path.to_path_buf()));
    };
    let ids = snapshot::MergeIds {
        base: *base,
        diff: state.id,
    };
    let stats = snapshot::merge_diff(
        base_mem,
        diff_mem,
        dirty,
        *layout,
        &state.memory_layout,
        ids,
    )?;
    state.memory_file = MemoryFile::Full;
    snapshot::save_state(state_path, &state)?;
    Ok(stats)
}
