//! The snapshot scenarios, written once against [`Target`]: each run of a
//! scenario is done on every target in turn (interleaved run by run), the
//! first `warmup` runs are not recorded, and a target that fails stops
//! that scenario for itself only.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::signals;
use crate::stats::{ms, Metrics};
use crate::target::{SnapKind, SnapshotFiles, Target};

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    Boot,
    Pause,
    SnapshotFull,
    SnapshotDiff,
    RestoreFile,
    SnapshotLive,
    RestoreUffd,
    RestoreReady,
    Clones,
    Devices,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Boot => "boot",
            Scenario::Pause => "pause",
            Scenario::SnapshotFull => "snapshot-full",
            Scenario::SnapshotDiff => "snapshot-diff",
            Scenario::RestoreFile => "restore-file",
            Scenario::SnapshotLive => "snapshot-live",
            Scenario::RestoreUffd => "restore-uffd",
            Scenario::RestoreReady => "restore-ready",
            Scenario::Clones => "clones",
            Scenario::Devices => "devices",
        }
    }

    /// What a reader needs to know to interpret the figures.
    pub fn notes(self) -> &'static [&'static str] {
        match self {
            Scenario::Boot => &[
                "vmm: the `vmm run` CLI as a separate process; times from spawn",
                "kernel timestamps are guest time; on kvm_pvm guest time and wall time drift apart",
            ],
            Scenario::Pause => &["each sample is one pause of a running guest (all vCPUs acknowledged)"],
            Scenario::SnapshotFull => &[
                "guest_visible_pause = snapshot + resume (from all vCPUs paused to running again); total = pause + snapshot + resume",
            ],
            Scenario::SnapshotDiff => &[
                "per run: full snapshot, host rewrites a random fraction of guest pages (same content, guest paused) through the vmm's memory() so its dirty bitmap records them, guest runs, then a diff snapshot",
                "firecracker: no host writes (its memory is in another process); its diff holds the guest's own writes only",
                "dense_*: a copy of the guest restored once (kept from run to run, like a sandbox snapshotted now and then) with every page holding data; per run a full snapshot, then a diff after rewriting diff_fraction of the pages at random (scattered 4 KiB pages, the worst case), then one after rewriting as many pages as one contiguous run (dense_contig_*)",
            ],
            Scenario::RestoreFile => &[
                "memory file restored MAP_PRIVATE from a snapshot just written (warm page cache)",
                "vmm: in-process build_from_snapshot + start_paused + resume; process_* = a new process doing the same (spawn included)",
                "firecracker: a new process (spawn included) + PUT /snapshot/load with resume_vm",
            ],
            Scenario::SnapshotLive => &[
                "live snapshot of the running guest: pause = guest-visible pause (state saved, memory write-protected); total = until both files are in place",
                "firecracker: no live snapshots",
            ],
            Scenario::RestoreUffd => &[
                "lazy restore through userfaultfd from the base snapshot; to_running = vCPUs running (first guest instruction), to_output = the guest's first console output",
                "nows = no working set (pages served on fault; the faults until first output become the working set); ws = that working set prefetched first",
                "firecracker: its Uffd backend needs an external page-fault handler (not run)",
            ],
            Scenario::RestoreReady => &[
                "its own guest: init is benches/guest/toucher.c, which touches a working set round after round without system calls and counts rounds in a status page; snapshotted mid-round, then restored each way in turn per run",
                "to_ready = restore start to the guest completing a round begun after the restore (its whole working set back), seen by the host polling the status page every 20 us",
                "nows = userfaultfd, every page on demand (the faults until ready become the working set); ws = userfaultfd with that working set prefetched before resuming; file = the memory file mapped MAP_PRIVATE",
                "fault_cost = (nows_to_ready - ws_to_ready) / (nows_faults - ws_faults): what a page served on demand costs the guest beyond a prefetched one",
                "firecracker: not run (its Uffd backend needs an external page-fault handler, and its guest memory is out of the harness's reach)",
            ],
            Scenario::Clones => &["N guests restored from one snapshot at once; total = common start to the last one running"],
            Scenario::Devices => crate::devices::NOTES,
        }
    }
}

/// Knobs of the snapshot scenarios.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    pub warmup: usize,
    pub pause_cycles: usize,
    pub pause_gap: Duration,
    pub diff_fraction: f64,
    pub diff_run: Duration,
    pub clones: usize,
    pub restore_check: Duration,
    pub seed: u64,
}

/// One target taking part, with its own file directory.
pub struct Slot {
    pub target: Box<dyn Target>,
    pub dir: PathBuf,
    /// A full snapshot restores and clones start from.
    pub base: Option<SnapshotFiles>,
}

/// Runs `scenario` on every slot; one result per slot, in slot order.
pub fn run(scenario: Scenario, slots: &mut [Slot], s: &Settings) -> Vec<Result<Metrics>> {
    let mut results: Vec<Result<Metrics>> = slots.iter().map(|_| Ok(Metrics::default())).collect();
    for run in 0..s.warmup + s.runs {
        for (slot, result) in slots.iter_mut().zip(results.iter_mut()) {
            let Ok(metrics) = result else { continue };
            let mut sample = Metrics::default();
            let outcome =
                signals::check().and_then(|()| one_run(scenario, slot, s, run, &mut sample));
            match outcome {
                Ok(()) if run >= s.warmup => {
                    for (name, m) in sample.0 {
                        for v in m.samples {
                            metrics.push(&name, m.unit, v);
                        }
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    // Leave the guest paused for the next scenario.
                    let _ = slot.target.pause();
                    *result = Err(e);
                }
            }
        }
    }
    results
}

fn one_run(
    scenario: Scenario,
    slot: &mut Slot,
    s: &Settings,
    run: usize,
    m: &mut Metrics,
) -> Result<()> {
    match scenario {
        Scenario::Boot | Scenario::RestoreReady | Scenario::Devices => Err(BenchError::Setup(
            format!("{} is not a snapshot scenario", scenario.name()),
        )),
        Scenario::Pause => pause_run(slot.target.as_mut(), s, m),
        Scenario::SnapshotFull => {
            let files = SnapshotFiles::in_dir(&slot.dir, "full");
            full_run(slot.target.as_mut(), &files, m)?;
            slot.base = Some(files);
            Ok(())
        }
        Scenario::SnapshotDiff => diff_run(slot, s, run, m),
        Scenario::SnapshotLive => {
            let files = SnapshotFiles::in_dir(&slot.dir, "live");
            files.remove();
            let t = slot.target.as_mut();
            t.resume()?;
            let live = t.live_snapshot(&files);
            t.pause()?;
            if let Some(l) = live? {
                m.push_ms("guest_visible_pause", l.pause);
                m.push_ms("total", l.total);
                m.push("mem_bytes_written", "bytes", l.bytes as f64);
                m.push("write_faults", "faults", l.write_faults as f64);
            }
            files.remove();
            Ok(())
        }
        Scenario::RestoreUffd => {
            let base = ensure_base(slot)?;
            let t = slot.target.as_ref();
            if let Some(cold) = t.restore_uffd(&base, &slot.dir, false)? {
                if let Some(warm) = t.restore_uffd(&base, &slot.dir, true)? {
                    for (tag, u) in [("nows", &cold), ("ws", &warm)] {
                        m.push_ms(&format!("{tag}_to_running"), u.to_running);
                        m.push_ms(&format!("{tag}_to_output"), u.to_output);
                        m.push(&format!("{tag}_faults"), "faults", u.faults as f64);
                        m.push(&format!("{tag}_served"), "MiB", u.served_mib);
                    }
                    m.push("ws_prefetched_pages", "pages", warm.prefetched_pages as f64);
                    if warm.to_output > Duration::ZERO {
                        m.push(
                            "speedup_to_output",
                            "ratio",
                            ms(cold.to_output) / ms(warm.to_output),
                        );
                    }
                }
            }
            Ok(())
        }
        Scenario::RestoreFile => {
            let base = ensure_base(slot)?;
            // The first (warm-up) run also checks the restored guest runs.
            let check = (run == 0).then_some(s.restore_check);
            let t = slot.target.restore(&base, &slot.dir, check)?;
            m.push_ms("restore_to_running", t.to_running);
            for (name, d) in &t.phases {
                m.push_ms(&format!("restore_{name}"), *d);
            }
            if let Some(t) = slot.target.restore_process(&base, &slot.dir)? {
                m.push_ms("process_restore_to_running", t.to_running);
                for (name, d) in &t.phases {
                    m.push_ms(&format!("process_{name}"), *d);
                }
            }
            Ok(())
        }
        Scenario::Clones => {
            let base = ensure_base(slot)?;
            let t = slot.target.clones(&base, s.clones, &slot.dir)?;
            m.push_ms("total", t.total);
            for d in &t.per_vm {
                m.push_ms("per_vm", *d);
            }
            Ok(())
        }
    }
}

/// The guest runs, then many pause/resume cycles a few ms apart.
fn pause_run(t: &mut dyn Target, s: &Settings, m: &mut Metrics) -> Result<()> {
    t.resume()?;
    t.run_for(Duration::from_millis(20))?;
    for _ in 0..s.pause_cycles {
        let t0 = Instant::now();
        t.pause()?;
        let t1 = Instant::now();
        t.resume()?;
        m.push_ms("pause", t1 - t0);
        m.push_ms("resume", t1.elapsed());
        std::thread::sleep(s.pause_gap);
    }
    t.pause()
}

/// Pause + full snapshot + resume of a running guest.
fn full_run(t: &mut dyn Target, files: &SnapshotFiles, m: &mut Metrics) -> Result<()> {
    files.remove();
    t.resume()?;
    t.run_for(Duration::from_millis(20))?;
    let t0 = Instant::now();
    t.pause()?;
    let t1 = Instant::now();
    let detail = t.snapshot(SnapKind::Full, files)?;
    let t2 = Instant::now();
    t.resume()?;
    let t3 = Instant::now();
    t.pause()?;
    m.push_ms("pause", t1 - t0);
    m.push_ms("snapshot", t2 - t1);
    m.push_ms("resume", t3 - t2);
    m.push_ms("guest_visible_pause", t3 - t1);
    m.push_ms("total", t3 - t0);
    if let Some(b) = detail.mem_bytes_written {
        m.push("mem_bytes_written", "bytes", b as f64);
    }
    push_file_sizes(files, m)
}

/// Full snapshot, host writes, guest runs, diff snapshot; compares times.
fn diff_run(slot: &mut Slot, s: &Settings, run: usize, m: &mut Metrics) -> Result<()> {
    let t = slot.target.as_mut();
    let base = SnapshotFiles::in_dir(&slot.dir, "diff-base");
    let diff = SnapshotFiles::in_dir(&slot.dir, "diff");
    base.remove();
    diff.remove();
    let t0 = Instant::now();
    t.snapshot(SnapKind::Full, &base)?;
    m.push_ms("full_snapshot", t0.elapsed());
    let t0 = Instant::now();
    if let Some(pages) = t.touch_memory(s.diff_fraction, s.seed.wrapping_add(run as u64))? {
        m.push_ms("host_touch", t0.elapsed());
        m.push("host_touched_pages", "pages", pages as f64);
    }
    t.resume()?;
    t.run_for(s.diff_run)?;
    t.pause()?;
    let t0 = Instant::now();
    let detail = t.snapshot(SnapKind::Diff, &diff)?;
    let d = t0.elapsed();
    m.push_ms("diff_snapshot", d);
    if let Some(p) = detail.pages_written {
        m.push("diff_pages_written", "pages", p as f64);
    }
    if let Some(b) = detail.mem_bytes_written {
        m.push("diff_mem_bytes_written", "bytes", b as f64);
    }
    let full = m
        .get("full_snapshot")
        .and_then(|f| f.samples.last().copied());
    if let Some(full) = full.filter(|f| *f > 0.0) {
        m.push("diff_over_full", "ratio", ms(d) / full);
    }
    let alloc = allocated(&diff.mem)?;
    m.push("diff_mem_file_allocated", "bytes", alloc as f64);
    // The comparison: a guest whose memory is all in use, full vs
    // diff of the same state after rewriting `diff_fraction` of it.
    let seed = s.seed.wrapping_add(1000 + run as u64);
    if let Some(d) = t.dense_diff(&base, &slot.dir, s.diff_fraction, seed)? {
        m.push_ms("dense_full_snapshot", d.full);
        m.push_ms("dense_diff_snapshot", d.diff);
        m.push("dense_full_bytes_written", "bytes", d.full_bytes as f64);
        m.push("dense_diff_bytes_written", "bytes", d.diff_bytes as f64);
        m.push("dense_touched_pages", "pages", d.touched_pages as f64);
        m.push_ms("dense_contig_diff_snapshot", d.contiguous_diff);
        m.push(
            "dense_contig_diff_bytes_written",
            "bytes",
            d.contiguous_diff_bytes as f64,
        );
        if d.full > Duration::ZERO {
            m.push("dense_diff_over_full", "ratio", ms(d.diff) / ms(d.full));
            m.push(
                "dense_contig_diff_over_full",
                "ratio",
                ms(d.contiguous_diff) / ms(d.full),
            );
        }
    }
    Ok(())
}

/// The slot's base snapshot, taking one (of the paused guest) if needed.
fn ensure_base(slot: &mut Slot) -> Result<SnapshotFiles> {
    if let Some(b) = &slot.base {
        if b.state.exists() && b.mem.exists() {
            return Ok(b.clone());
        }
    }
    let files = SnapshotFiles::in_dir(&slot.dir, "base");
    files.remove();
    slot.target.snapshot(SnapKind::Full, &files)?;
    slot.base = Some(files.clone());
    Ok(files)
}

fn push_file_sizes(files: &SnapshotFiles, m: &mut Metrics) -> Result<()> {
    let mem = std::fs::metadata(&files.mem).map_err(BenchError::file("stat", &files.mem))?;
    let state = std::fs::metadata(&files.state).map_err(BenchError::file("stat", &files.state))?;
    m.push("mem_file_size", "bytes", mem.len() as f64);
    m.push("mem_file_allocated", "bytes", (mem.blocks() * 512) as f64);
    m.push("state_file_size", "bytes", state.len() as f64);
    Ok(())
}

fn allocated(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(BenchError::file("stat", path))?;
    Ok(meta.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::target::{ClonesTiming, RestoreTiming, SnapshotDetail};

    /// A target that logs calls and can be told to fail on its Nth pause.
    struct Fake {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        pauses: usize,
        fail_on_pause: Option<usize>,
    }

    impl Fake {
        fn note(&self, what: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{what}", self.name));
        }
    }

    impl Target for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn pause(&mut self) -> Result<()> {
            self.pauses += 1;
            self.note("pause");
            if Some(self.pauses) == self.fail_on_pause {
                return Err(BenchError::Setup("pause failed".into()));
            }
            Ok(())
        }
        fn resume(&mut self) -> Result<()> {
            self.note("resume");
            Ok(())
        }
        fn snapshot(&mut self, kind: SnapKind, files: &SnapshotFiles) -> Result<SnapshotDetail> {
            self.note(&format!("snapshot-{kind:?}"));
            std::fs::write(&files.state, b"s").unwrap();
            std::fs::write(&files.mem, vec![1u8; 8192]).unwrap();
            Ok(SnapshotDetail {
                mem_bytes_written: Some(8192),
                pages_written: Some(2),
            })
        }
        fn run_for(&mut self, _: Duration) -> Result<()> {
            Ok(())
        }
        fn live_snapshot(
            &mut self,
            _: &SnapshotFiles,
        ) -> Result<Option<crate::target::LiveTiming>> {
            Ok(None)
        }

        fn restore_uffd(
            &self,
            _: &SnapshotFiles,
            _: &Path,
            _: bool,
        ) -> Result<Option<crate::target::UffdTiming>> {
            Ok(None)
        }

        fn dense_diff(
            &mut self,
            _base: &SnapshotFiles,
            _work: &Path,
            _fraction: f64,
            _seed: u64,
        ) -> Result<Option<crate::target::DenseDiff>> {
            Ok(None)
        }

        fn touch_memory(&mut self, _: f64, _: u64) -> Result<Option<u64>> {
            Ok(Some(1))
        }
        fn restore(
            &self,
            _: &SnapshotFiles,
            _: &Path,
            check: Option<Duration>,
        ) -> Result<RestoreTiming> {
            self.note(&format!("restore-check-{}", check.is_some()));
            Ok(RestoreTiming {
                to_running: Duration::from_millis(3),
                phases: vec![("build", Duration::from_millis(2))],
            })
        }
        fn restore_process(&self, _: &SnapshotFiles, _: &Path) -> Result<Option<RestoreTiming>> {
            Ok(None)
        }
        fn clones(&self, _: &SnapshotFiles, n: usize, _: &Path) -> Result<ClonesTiming> {
            Ok(ClonesTiming {
                total: Duration::from_millis(5),
                per_vm: vec![Duration::from_millis(4); n],
            })
        }
        fn shutdown(&mut self) {}
    }

    fn settings() -> Settings {
        Settings {
            runs: 3,
            warmup: 1,
            pause_cycles: 2,
            pause_gap: Duration::ZERO,
            diff_fraction: 0.1,
            diff_run: Duration::ZERO,
            clones: 3,
            restore_check: Duration::ZERO,
            seed: 1,
        }
    }

    fn slots(dir: &Path, log: &Arc<Mutex<Vec<String>>>, fail_b: Option<usize>) -> Vec<Slot> {
        [("a", None), ("b", fail_b)]
            .into_iter()
            .map(|(name, fail_on_pause)| Slot {
                target: Box::new(Fake {
                    name,
                    log: log.clone(),
                    pauses: 0,
                    fail_on_pause,
                }),
                dir: dir.to_path_buf(),
                base: None,
            })
            .collect()
    }

    #[test]
    fn runs_interleave_and_warmup_is_not_recorded() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut slots = slots(dir.path(), &log, None);
        let results = run(Scenario::Pause, &mut slots, &settings());
        for r in &results {
            let m = r.as_ref().unwrap();
            // 3 recorded runs x 2 cycles.
            assert_eq!(m.get("pause").unwrap().samples.len(), 6);
        }
        let log = log.lock().unwrap();
        let owners: Vec<&str> = log.iter().map(|l| &l[..1]).collect();
        // Each run is one target's block of calls, alternating a, b, a, b.
        let mut blocks: Vec<&str> = owners.clone();
        blocks.dedup();
        assert_eq!(blocks, ["a", "b", "a", "b", "a", "b", "a", "b"]);
        // Every run leaves the guest paused.
        assert!(log.last().unwrap().ends_with("pause"));
    }

    #[test]
    fn a_failing_target_does_not_stop_the_other() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut slots = slots(dir.path(), &log, Some(4));
        let results = run(Scenario::Pause, &mut slots, &settings());
        assert!(results[0].is_ok());
        let err = results[1].as_ref().unwrap_err();
        assert!(err.to_string().contains("pause failed"));
    }

    #[test]
    fn restore_takes_a_base_snapshot_and_checks_once() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut slots = slots(dir.path(), &log, None);
        let results = run(Scenario::RestoreFile, &mut slots, &settings());
        let m = results[0].as_ref().unwrap();
        assert_eq!(m.get("restore_to_running").unwrap().samples, vec![3.0; 3]);
        assert_eq!(m.get("restore_build").unwrap().samples.len(), 3);
        let log = log.lock().unwrap();
        let a: Vec<&String> = log.iter().filter(|l| l.starts_with("a:")).collect();
        assert_eq!(
            a,
            [
                "a:snapshot-Full",
                "a:restore-check-true",
                "a:restore-check-false",
                "a:restore-check-false",
                "a:restore-check-false"
            ]
        );
    }

    #[test]
    fn diff_and_full_record_sizes_and_ratio() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut slots = slots(dir.path(), &log, None);
        let full = run(Scenario::SnapshotFull, &mut slots, &settings());
        let m = full[0].as_ref().unwrap();
        assert_eq!(m.get("mem_file_size").unwrap().samples, vec![8192.0; 3]);
        assert_eq!(m.get("state_file_size").unwrap().samples, vec![1.0; 3]);
        assert!(slots[0].base.is_some());
        let diff = run(Scenario::SnapshotDiff, &mut slots, &settings());
        let m = diff[1].as_ref().unwrap();
        assert_eq!(m.get("diff_pages_written").unwrap().samples, vec![2.0; 3]);
        assert_eq!(m.get("host_touched_pages").unwrap().samples, vec![1.0; 3]);
        assert_eq!(m.get("diff_over_full").unwrap().samples.len(), 3);
        let clones = run(Scenario::Clones, &mut slots, &settings());
        assert_eq!(
            clones[0]
                .as_ref()
                .unwrap()
                .get("per_vm")
                .unwrap()
                .samples
                .len(),
            9
        );
    }
}
