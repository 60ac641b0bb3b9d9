//! The vmm under test, driven in-process through its library: the guest
//! is built with `build_for_boot`, snapshots are `Microvm::snapshot`, and
//! restores are `build_from_snapshot` + `start_paused` + `resume` (also from
//! a separate process: this binary's hidden `restore-child` command).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::SerialOutput;
use vmm::snapshot::{build_from_snapshot, MemoryBackend, RestoreParams, SnapshotType};
use vmm::{Microvm, VmConfig};

use crate::error::{BenchError, Result};
use crate::rng::Rng;
use crate::serial::LogWatch;
use crate::signals;
use crate::target::{
    ClonesTiming, DenseDiff, LiveTiming, RestoreTiming, SnapKind, SnapshotDetail, SnapshotFiles,
    Target, UffdTiming,
};

/// Page size of guest memory as the snapshot files see it.
const PAGE: u64 = 4096;
/// Event-loop tick of the library (`Microvm::run_once` blocks up to this).
const TICK: Duration = Duration::from_millis(100);

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Kernel command line; None = the vmm's default.
    pub cmdline: Option<String>,
}

/// How far into boot the guest runs before measurements start.
#[derive(Debug, Clone)]
pub struct WarmSpec {
    /// Console text that ends the warm-up; None = run for `max`.
    pub marker: Option<String>,
    /// Warm-up ends after this long even without the marker.
    pub max: Duration,
}

impl WarmSpec {
    /// Whether the console shows the marker.
    pub fn reached(&self, log: &LogWatch) -> bool {
        self.marker
            .as_deref()
            .is_some_and(|m| log.find(m).is_some())
    }

    /// Watches the console from `start` until the marker shows or `max`
    /// passes; `step` runs between looks (drive the VM, check it is alive).
    /// Whether the marker was seen.
    pub fn wait(
        &self,
        log: &mut LogWatch,
        start: Instant,
        mut step: impl FnMut(&mut LogWatch) -> Result<()>,
    ) -> Result<bool> {
        loop {
            signals::check()?;
            log.poll();
            if self.reached(log) {
                return Ok(true);
            }
            if start.elapsed() >= self.max {
                return Ok(false);
            }
            step(log)?;
        }
    }
}

/// How the warm-up ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WarmOutcome {
    pub marker: Option<String>,
    pub marker_seen: bool,
    pub wall_ms: f64,
    /// printk timestamp of the last console line at the end of the warm-up.
    pub kernel_secs: Option<f64>,
}

impl WarmOutcome {
    /// The outcome of a warm-up that began at `start` and whose console is `log`.
    pub fn new(warm: &WarmSpec, marker_seen: bool, start: Instant, log: &LogWatch) -> Self {
        WarmOutcome {
            marker: warm.marker.clone(),
            marker_seen,
            wall_ms: crate::stats::ms(start.elapsed()),
            kernel_secs: log
                .text()
                .lines()
                .rev()
                .find_map(crate::serial::printk_secs),
        }
    }
}

/// Stops a VM's vCPUs when dropped, so an early return never leaks them.
pub struct VmGuard(pub Microvm);

impl Drop for VmGuard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// The vmm, in-process.
pub struct VmmTarget {
    vm: Option<VmGuard>,
    /// The dense copy of `dense_diff`, kept from one run to the next.
    dense: Option<VmGuard>,
    /// This binary, for process restores.
    bench_exe: PathBuf,
    /// Upper bound for any one restore.
    launch_timeout: Duration,
}

impl VmmTarget {
    /// Boots a guest (dirty tracking on, for diff snapshots), lets it run
    /// per `warm`, and leaves it paused.
    pub fn boot(
        spec: &GuestSpec,
        warm: &WarmSpec,
        work: &Path,
        launch_timeout: Duration,
    ) -> Result<(Self, WarmOutcome)> {
        let serial = work.join("vmm-base-serial.log");
        let mut cfg = VmConfig::new(&spec.kernel);
        cfg.mem_mib = spec.mem_mib;
        cfg.vcpus = spec.vcpus;
        cfg.cmdline = spec.cmdline.clone();
        cfg.serial = SerialOutput::File(serial.clone());
        cfg.track_dirty_pages = true;
        let bench_exe = std::env::current_exe().map_err(BenchError::io("locating vmm-bench"))?;

        let start = Instant::now();
        let built = vmm::build_for_boot(&cfg).map_err(BenchError::vmm("building the VM"));
        signals::install();
        let mut vm = VmGuard(built?);
        vm.0.start().map_err(BenchError::vmm("starting the VM"))?;
        let mut log = LogWatch::new(&serial, start);
        let marker_seen = warm.wait(&mut log, start, |log| match vm.0.run_once() {
            Some(reason) => {
                log.poll();
                Err(BenchError::GuestStopped(format!(
                    "{reason:?} during warm-up; console: {}",
                    log.tail(3)
                )))
            }
            None => Ok(()),
        })?;
        vm.0.pause()
            .map_err(BenchError::vmm("pausing after warm-up"))?;
        let outcome = WarmOutcome::new(warm, marker_seen, start, &log);
        Ok((
            Self {
                vm: Some(vm),
                dense: None,
                bench_exe,
                launch_timeout,
            },
            outcome,
        ))
    }

    fn vm(&mut self) -> Result<&mut Microvm> {
        self.vm
            .as_mut()
            .map(|g| &mut g.0)
            .ok_or_else(|| BenchError::Setup("the vmm guest was shut down".into()))
    }
}

/// Restores a snapshot in this process and resumes it; the VM is returned
/// running.
fn restore_running(files: &SnapshotFiles, serial: &Path) -> Result<(Microvm, RestoreTiming)> {
    let t0 = Instant::now();
    let params = RestoreParams {
        state_path: files.state.clone(),
        memory: MemoryBackend::File(files.mem.clone()),
        track_dirty_pages: false,
        serial: SerialOutput::File(serial.to_path_buf()),
        overrides: Default::default(),
    };
    let built = build_from_snapshot(&params).map_err(BenchError::vmm("restoring"));
    signals::install();
    let mut vm = built?;
    let t_build = t0.elapsed();
    let started = vm.start_paused().and_then(|()| vm.resume());
    if let Err(e) = started {
        vm.shutdown();
        return Err(BenchError::Vmm(format!("resuming the restored VM: {e}")));
    }
    let total = t0.elapsed();
    Ok((
        vm,
        RestoreTiming {
            to_running: total,
            phases: vec![("build", t_build), ("start_resume", total - t_build)],
        },
    ))
}

/// Fills every page of guest memory with pseudo-random data (or only
/// `fraction` of the pages, chosen at random).
/// Which guest pages [`scribble`] rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// Pages drawn at random (the worst case for a diff: scattered 4 KiB runs).
    Scattered,
    /// The same number of pages as one run at a random start.
    Contiguous,
}

fn scribble(
    mem: &vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>,
    fraction: f64,
    seed: u64,
    pattern: Pattern,
) -> Result<u64> {
    let regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().0, r.len() / PAGE))
        .collect();
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; PAGE as usize];
    let count = ((total as f64) * fraction.min(1.0)).round() as u64;
    let pages: Vec<u64> = if count >= total {
        (0..total).collect()
    } else if pattern == Pattern::Contiguous {
        let start = Rng::new(seed ^ 0x5eed).next_u64() % (total - count + 1);
        (start..start + count).collect()
    } else {
        Rng::new(seed ^ 0x5eed).sample_distinct(total, count)
    };
    for index in &pages {
        let addr = page_address(&regions, *index)
            .ok_or_else(|| BenchError::Setup(format!("page {index} outside guest memory")))?;
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        mem.write_slice(&buf, GuestAddress(addr))
            .map_err(|e| BenchError::Vmm(format!("guest page {addr:#x}: {e}")))?;
    }
    Ok(pages.len() as u64)
}

/// Runs a restored VM's event loop for `d`; fails if the guest stopped.
fn check_alive(vm: &mut Microvm, d: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < d {
        if let Some(reason) = vm.run_once() {
            return Err(BenchError::GuestStopped(format!(
                "restored guest stopped: {reason:?}"
            )));
        }
    }
    Ok(())
}

impl Target for VmmTarget {
    fn name(&self) -> &'static str {
        "vmm"
    }

    fn pause(&mut self) -> Result<()> {
        self.vm()?
            .pause()
            .map(|_| ())
            .map_err(BenchError::vmm("pause"))
    }

    fn resume(&mut self) -> Result<()> {
        self.vm()?.resume().map_err(BenchError::vmm("resume"))
    }

    fn snapshot(&mut self, kind: SnapKind, files: &SnapshotFiles) -> Result<SnapshotDetail> {
        let kind = match kind {
            SnapKind::Full => SnapshotType::Full,
            SnapKind::Diff => SnapshotType::Diff,
        };
        let stats = self
            .vm()?
            .snapshot(kind, &files.state, &files.mem)
            .map_err(BenchError::vmm("snapshot"))?;
        Ok(SnapshotDetail {
            mem_bytes_written: Some(stats.memory.bytes_written),
            pages_written: Some(stats.memory.pages_written),
        })
    }

    fn run_for(&mut self, d: Duration) -> Result<()> {
        let vm = self.vm()?;
        if d < TICK {
            // A tick would overshoot; the next pause notices a dead guest.
            std::thread::sleep(d);
            return Ok(());
        }
        let t = Instant::now();
        while t.elapsed() < d {
            signals::check()?;
            if let Some(reason) = vm.run_once() {
                return Err(BenchError::GuestStopped(format!("{reason:?}")));
            }
        }
        Ok(())
    }

    fn touch_memory(&mut self, fraction: f64, seed: u64) -> Result<Option<u64>> {
        let mem = self.vm()?.memory();
        let regions: Vec<(u64, u64)> = mem
            .iter()
            .map(|r| (r.start_addr().0, r.len() / PAGE))
            .collect();
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let count = ((total as f64) * fraction).round() as u64;
        let mut buf = vec![0u8; PAGE as usize];
        for index in Rng::new(seed).sample_distinct(total, count) {
            let addr = page_address(&regions, index)
                .ok_or_else(|| BenchError::Setup(format!("page {index} outside guest memory")))?;
            let addr = GuestAddress(addr);
            // The guest is paused: writing back what was read leaves it
            // intact while the VMM's dirty bitmap records the write.
            mem.read_slice(&mut buf, addr)
                .and_then(|()| mem.write_slice(&buf, addr))
                .map_err(|e| BenchError::Vmm(format!("guest page {:#x}: {e}", addr.0)))?;
        }
        Ok(Some(count))
    }

    fn live_snapshot(&mut self, files: &SnapshotFiles) -> Result<Option<LiveTiming>> {
        let vm = self.vm()?;
        let pause = vm
            .begin_live_snapshot(&files.state, &files.mem)
            .map_err(BenchError::vmm("live snapshot"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(reason) = vm.run_once() {
                return Err(BenchError::GuestStopped(format!(
                    "during a live snapshot: {reason}"
                )));
            }
            if let Some(done) = vm.poll_live_snapshot() {
                let stats = done.map_err(BenchError::vmm("live snapshot"))?;
                return Ok(Some(LiveTiming {
                    pause,
                    total: stats.total,
                    bytes: stats.copy.memory.bytes_written,
                    write_faults: stats.copy.write_faults,
                }));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Vmm(
                    "live snapshot did not finish in 120 s".into(),
                ));
            }
        }
    }

    fn restore_uffd(
        &self,
        files: &SnapshotFiles,
        work: &Path,
        prefetch: bool,
    ) -> Result<Option<UffdTiming>> {
        let ws = snapshot::uffd::working_set::path_for(&files.mem);
        if !prefetch {
            let _ = std::fs::remove_file(&ws);
        }
        let serial = work.join("vmm-uffd-serial.log");
        let t0 = Instant::now();
        let params = RestoreParams {
            state_path: files.state.clone(),
            memory: MemoryBackend::Uffd {
                path: files.mem.clone(),
                options: vmm::lazy::LazyOptions {
                    prefetch,
                    record_ms: 0,
                    background_fill: false,
                },
            },
            track_dirty_pages: false,
            serial: SerialOutput::File(serial.clone()),
            overrides: Default::default(),
        };
        let mut vm =
            VmGuard(build_from_snapshot(&params).map_err(BenchError::vmm("lazy restore"))?);
        vm.0.start_paused()
            .and_then(|()| vm.0.resume())
            .map_err(|e| BenchError::Vmm(format!("resuming the lazy restore: {e}")))?;
        // The page server records what the guest touches from here on; the set
        // is saved once the guest has printed (its "ready" here).
        let to_running = t0.elapsed();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) == 0 {
            if let Some(reason) = vm.0.run_once_for(Duration::from_millis(1)) {
                return Err(BenchError::GuestStopped(format!(
                    "lazily restored guest: {reason}"
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Vmm(
                    "no console output within 60 s of a lazy restore".into(),
                ));
            }
        }
        let to_output = t0.elapsed();
        let lazy =
            vm.0.lazy_memory()
                .ok_or_else(|| BenchError::Vmm("restored VM has no page server".into()))?;
        if !prefetch {
            lazy.save_working_set()
                .map_err(BenchError::vmm("working set"))?;
        }
        let stats = lazy.stats();
        Ok(Some(UffdTiming {
            to_running,
            to_output,
            faults: stats.server.faults,
            prefetched_pages: stats.prefetched,
            served_mib: stats.server.bytes_copied as f64 / (1 << 20) as f64,
        }))
    }

    fn dense_diff(
        &mut self,
        base: &SnapshotFiles,
        work: &Path,
        fraction: f64,
        seed: u64,
    ) -> Result<Option<DenseDiff>> {
        if self.dense.is_none() {
            let params = RestoreParams {
                state_path: base.state.clone(),
                memory: MemoryBackend::File(base.mem.clone()),
                track_dirty_pages: true,
                serial: SerialOutput::File(work.join("vmm-dense-serial.log")),
                overrides: Default::default(),
            };
            let mut vm =
                VmGuard(build_from_snapshot(&params).map_err(BenchError::vmm("restoring"))?);
            vm.0.start_paused()
                .map_err(|e| BenchError::Vmm(format!("starting the copy paused: {e}")))?;
            scribble(vm.0.memory(), 1.0, seed, Pattern::Scattered)?;
            self.dense = Some(vm);
        }
        let Some(VmGuard(vm)) = self.dense.as_mut() else {
            return Err(BenchError::Setup("the dense copy is gone".into()));
        };
        let full_files = SnapshotFiles::in_dir(work, "dense-full");
        let diff_files = SnapshotFiles::in_dir(work, "dense-diff");
        let t = Instant::now();
        let full = vm
            .snapshot(SnapshotType::Full, &full_files.state, &full_files.mem)
            .map_err(BenchError::vmm("dense full snapshot"))?;
        let full_time = t.elapsed();
        let touched = scribble(
            vm.memory(),
            fraction,
            seed.wrapping_add(1),
            Pattern::Scattered,
        )?;
        let t = Instant::now();
        let diff = vm
            .snapshot(SnapshotType::Diff, &diff_files.state, &diff_files.mem)
            .map_err(BenchError::vmm("dense diff snapshot"))?;
        let diff_time = t.elapsed();
        diff_files.remove();
        scribble(
            vm.memory(),
            fraction,
            seed.wrapping_add(2),
            Pattern::Contiguous,
        )?;
        let t = Instant::now();
        let contiguous = vm
            .snapshot(SnapshotType::Diff, &diff_files.state, &diff_files.mem)
            .map_err(BenchError::vmm("dense contiguous diff snapshot"))?;
        let contiguous_time = t.elapsed();
        full_files.remove();
        diff_files.remove();
        Ok(Some(DenseDiff {
            full: full_time,
            full_bytes: full.memory.bytes_written,
            diff: diff_time,
            diff_bytes: diff.memory.bytes_written,
            touched_pages: touched,
            contiguous_diff: contiguous_time,
            contiguous_diff_bytes: contiguous.memory.bytes_written,
        }))
    }

    fn restore(
        &self,
        files: &SnapshotFiles,
        work: &Path,
        check: Option<Duration>,
    ) -> Result<RestoreTiming> {
        let (vm, timing) = restore_running(files, &work.join("vmm-restore-serial.log"))?;
        let mut vm = VmGuard(vm);
        if let Some(d) = check {
            check_alive(&mut vm.0, d)?;
        }
        Ok(timing)
    }

    fn restore_process(&self, files: &SnapshotFiles, work: &Path) -> Result<Option<RestoreTiming>> {
        let t0 = Instant::now();
        let mut child = Command::new(&self.bench_exe)
            .arg("restore-child")
            .arg("--state")
            .arg(&files.state)
            .arg("--mem")
            .arg(&files.mem)
            .arg("--serial")
            .arg(work.join("vmm-child-serial.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(BenchError::io("spawning vmm-bench restore-child"))?;
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let line = stdout.and_then(|s| std::io::BufReader::new(s).lines().next()?.ok());
            let _ = tx.send((line, Instant::now()));
        });
        let result = rx.recv_timeout(self.launch_timeout);
        let grace = if result.is_ok() {
            Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
        let status = crate::process::wait_or_kill(&mut child, grace);
        let (line, at) = match result {
            Ok((Some(line), at)) => (line, at),
            Ok((None, _)) => {
                let stderr = crate::process::read_stderr(&mut child);
                return Err(BenchError::Child {
                    what: "restore-child".into(),
                    detail: format!("no output ({status:?}): {stderr}"),
                });
            }
            Err(_) => {
                return Err(BenchError::Timeout {
                    what: "restore-child to report a running guest".into(),
                    after: self.launch_timeout,
                })
            }
        };
        let inner = parse_child_line(&line).ok_or_else(|| BenchError::Child {
            what: "restore-child".into(),
            detail: format!("unexpected output {line:?}"),
        })?;
        let total = at - t0;
        Ok(Some(RestoreTiming {
            to_running: total,
            phases: vec![
                ("in_child", inner),
                ("spawn_exec", total.saturating_sub(inner)),
            ],
        }))
    }

    fn clones(&self, files: &SnapshotFiles, n: usize, work: &Path) -> Result<ClonesTiming> {
        let barrier = Arc::new(Barrier::new(n + 1));
        let start = Instant::now();
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let files = files.clone();
                let serial = work.join(format!("vmm-clone-{i}-serial.log"));
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let result = restore_running(&files, &serial);
                    let done = start.elapsed();
                    // Every clone stays up until all are running.
                    barrier.wait();
                    result.map(|(vm, timing)| {
                        drop(VmGuard(vm));
                        (timing.to_running, done)
                    })
                })
            })
            .collect();
        barrier.wait();
        let mut total = Duration::ZERO;
        let mut per_vm = Vec::with_capacity(n);
        let mut first_error = None;
        for h in handles {
            match h.join() {
                Ok(Ok((own, done))) => {
                    per_vm.push(own);
                    total = total.max(done);
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(BenchError::Setup("a clone thread panicked".into()));
                }
            }
        }
        signals::install();
        match first_error {
            Some(e) => Err(e),
            None => Ok(ClonesTiming { total, per_vm }),
        }
    }

    fn shutdown(&mut self) {
        self.dense = None;
        self.vm = None;
    }
}

/// Guest physical address of the `index`-th page over `regions` (start,
/// pages).
fn page_address(regions: &[(u64, u64)], mut index: u64) -> Option<u64> {
    for &(start, pages) in regions {
        if index < pages {
            return Some(start + index * PAGE);
        }
        index -= pages;
    }
    None
}

/// The line `restore-child` prints once its guest runs.
pub fn child_line(elapsed: Duration) -> String {
    format!("running {}", elapsed.as_nanos())
}

fn parse_child_line(line: &str) -> Option<Duration> {
    let nanos: u64 = line.strip_prefix("running ")?.trim().parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Body of `vmm-bench restore-child`: restore, resume, report, shut down.
pub fn restore_child(state: &Path, mem: &Path, serial: &Path) -> Result<()> {
    let files = SnapshotFiles {
        state: state.to_path_buf(),
        mem: mem.to_path_buf(),
    };
    let (vm, timing) = restore_running(&files, serial)?;
    let _vm = VmGuard(vm);
    println!("{}", child_line(timing.to_running));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_map_across_regions() {
        let regions = [(0, 2), (0x1_0000_0000, 3)];
        assert_eq!(page_address(&regions, 0), Some(0));
        assert_eq!(page_address(&regions, 1), Some(PAGE));
        assert_eq!(page_address(&regions, 2), Some(0x1_0000_0000));
        assert_eq!(page_address(&regions, 4), Some(0x1_0000_0000 + 2 * PAGE));
        assert_eq!(page_address(&regions, 5), None);
    }

    #[test]
    fn child_line_round_trips() {
        let d = Duration::from_micros(12_345);
        assert_eq!(parse_child_line(&child_line(d)), Some(d));
        assert_eq!(parse_child_line("garbage"), None);
    }
}
