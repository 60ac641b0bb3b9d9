//! The `restore-ready` scenario: from a restore to a guest that is ready
//! again, with memory served lazily through userfaultfd without and with
//! the recorded working set prefetched, and mapped from the file for
//! reference.
//!
//! "Ready" has to be something the guest does, and it has to need the
//! guest's memory: a console line on kvm_pvm mostly measures the emulated
//! guest kernel. So this guest's init is `benches/guest/toucher.c`, which
//! keeps a working set of `ws_mib` MiB busy round after round without a
//! system call (guest user space runs natively on kvm_pvm but cannot make
//! system calls) and counts completed rounds in a status page. The host
//! snapshots it mid-round; after a restore the guest is ready when it
//! completes a round it began after the restore, i.e. when its whole
//! working set is back. The host polls the status page (a read of guest
//! memory that, on a lazy restore, the page server serves like any other).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::SerialOutput;
use vmm::lazy::LazyOptions;
use vmm::snapshot::{build_from_snapshot, MemoryBackend, RestoreParams, SnapshotType};
use vmm::VmConfig;

use crate::error::{BenchError, Result};
use crate::serial::LogWatch;
use crate::signals;
use crate::stats::{ms, Metrics};
use crate::target::SnapshotFiles;
use crate::vmm_target::{GuestSpec, VmGuard};

/// The toucher's source.
const TOUCHER_C: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/toucher.c");
/// The status page's magic words (see toucher.c).
const MAGIC: [u64; 4] = [
    0x564d_4d2d_5245_4144,
    !0x564d_4d2d_5245_4144,
    0x544f_5543_4845_5221,
    !0x544f_5543_4845_5221,
];
const PAGE: u64 = 4096;
/// Guest memory as the vmm maps it.
type Memory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// How often the host looks at the status page while waiting for ready.
const POLL: Duration = Duration::from_micros(20);
/// How often the event loop runs meanwhile (it notices a stopped guest).
const EVENT_LOOP_EVERY: Duration = Duration::from_millis(5);

/// Knobs of the scenario.
#[derive(Debug, Clone)]
pub struct ReadySettings {
    pub runs: usize,
    pub warmup: usize,
    /// The toucher's working set, MiB.
    pub ws_mib: u64,
    /// Limit for booting the guest until the toucher runs.
    pub boot_timeout: Duration,
    /// Limit for one restore to ready.
    pub ready_timeout: Duration,
}

/// The toucher's status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    round: u64,
    pages: u64,
    errors: u64,
}

/// How memory comes back in one restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// userfaultfd, every page on demand; records the working set.
    Lazy,
    /// userfaultfd, the recorded working set prefetched before resuming.
    LazyPrefetch,
    /// The memory file mapped MAP_PRIVATE.
    File,
}

impl Mode {
    fn prefix(self) -> &'static str {
        match self {
            Mode::Lazy => "nows",
            Mode::LazyPrefetch => "ws",
            Mode::File => "file",
        }
    }
}

/// One restore to ready.
#[derive(Debug, Clone)]
struct ReadyTiming {
    to_running: Duration,
    to_ready: Duration,
    faults: u64,
    served_mib: f64,
    prefetched_pages: u64,
    prefetch_ms: f64,
}

/// The snapshot every run restores, and where its status page is.
struct Base {
    files: SnapshotFiles,
    status_gpa: u64,
    /// Rounds completed when it was taken.
    round: u64,
    work: PathBuf,
}

/// Boots the toucher guest, snapshots it, and restores it `warmup + runs`
/// times in each mode, interleaved. Returns the metrics and details for
/// the record.
pub fn run(
    spec: &GuestSpec,
    s: &ReadySettings,
    work: &Path,
) -> Result<(Metrics, serde_json::Value)> {
    let ws_pages = s.ws_mib * (1 << 20) / PAGE;
    let init = compile_toucher(work, ws_pages)?;
    let initrd = work.join("toucher.cpio");
    write_initrd(&initrd, &init)?;
    let (base, boot) = boot_and_snapshot(spec, s, &initrd, work)?;

    let mut m = Metrics::default();
    for run in 0..s.warmup + s.runs {
        signals::check()?;
        let mut times = Vec::new();
        for mode in [Mode::Lazy, Mode::LazyPrefetch, Mode::File] {
            let t = restore_to_ready(&base, mode, s.ready_timeout)?;
            times.push((mode, t));
        }
        if run < s.warmup {
            continue;
        }
        for (mode, t) in &times {
            let p = mode.prefix();
            m.push_ms(&format!("{p}_to_running"), t.to_running);
            m.push_ms(&format!("{p}_to_ready"), t.to_ready);
            if *mode != Mode::File {
                m.push(&format!("{p}_faults"), "faults", t.faults as f64);
                m.push(&format!("{p}_served"), "MiB", t.served_mib);
            }
            if *mode == Mode::LazyPrefetch {
                m.push("ws_prefetched_pages", "pages", t.prefetched_pages as f64);
                m.push("ws_prefetch", "ms", t.prefetch_ms);
            }
        }
        let get = |mode: Mode| times.iter().find(|(k, _)| *k == mode).map(|(_, t)| t);
        if let (Some(nows), Some(ws)) = (get(Mode::Lazy), get(Mode::LazyPrefetch)) {
            m.push(
                "speedup_to_ready",
                "ratio",
                ms(nows.to_ready) / ms(ws.to_ready).max(1e-6),
            );
            // What a page served on demand costs the guest beyond one that
            // was prefetched.
            if nows.faults > ws.faults {
                let extra = ms(nows.to_ready) - ms(ws.to_ready);
                m.push(
                    "fault_cost",
                    "us",
                    extra * 1e3 / (nows.faults - ws.faults) as f64,
                );
            }
        }
    }
    let details = serde_json::json!({
        "ws_mib": s.ws_mib,
        "ws_pages": ws_pages,
        "status_gpa": base.status_gpa,
        "round_at_snapshot": base.round,
        "boot_to_ready_s": boot.as_secs_f64(),
    });
    base.files.remove();
    let _ = std::fs::remove_file(snapshot::uffd::working_set::path_for(&base.files.mem));
    Ok((m, details))
}

/// Compiles toucher.c for a working set of `pages` pages.
fn compile_toucher(work: &Path, pages: u64) -> Result<PathBuf> {
    let out = work.join("toucher");
    let result = Command::new("gcc")
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .arg(format!("-DWS_PAGES={pages}"))
        .arg("-o")
        .arg(&out)
        .arg(TOUCHER_C)
        .output()
        .map_err(BenchError::io("running gcc"))?;
    if !result.status.success() {
        return Err(BenchError::Setup(format!(
            "gcc {TOUCHER_C} failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        )));
    }
    Ok(out)
}

/// An initramfs holding only `/init`.
fn write_initrd(path: &Path, init: &Path) -> Result<()> {
    let file = std::fs::File::create(path).map_err(BenchError::file("creating", path))?;
    let mut cpio = vmm_tests::cpio::CpioWriter::new(std::io::BufWriter::new(file));
    let cpio_err = |e| BenchError::Setup(format!("writing {}: {e}", path.display()));
    cpio.file_from("init", init, 0o755).map_err(cpio_err)?;
    cpio.finish()
        .map_err(cpio_err)?
        .into_inner()
        .map_err(|e| BenchError::Setup(format!("writing {}: {}", path.display(), e.error())))?
        .sync_all()
        .map_err(BenchError::file("writing", path))
}

/// Boots the guest until the toucher has completed two rounds, pauses it,
/// and takes the full snapshot every run restores. Returns it and the
/// boot's duration.
fn boot_and_snapshot(
    spec: &GuestSpec,
    s: &ReadySettings,
    initrd: &Path,
    work: &Path,
) -> Result<(Base, Duration)> {
    let serial = work.join("ready-boot-serial.log");
    let mut cfg = VmConfig::new(&spec.kernel);
    cfg.initrd = Some(initrd.to_path_buf());
    cfg.mem_mib = spec.mem_mib;
    cfg.vcpus = spec.vcpus;
    cfg.cmdline = spec.cmdline.clone();
    cfg.serial = SerialOutput::File(serial.clone());
    let start = Instant::now();
    let built = vmm::build_for_boot(&cfg).map_err(BenchError::vmm("building the toucher VM"));
    signals::install();
    let mut vm = VmGuard(built?);
    vm.0.start()
        .map_err(BenchError::vmm("starting the toucher VM"))?;
    let mut log = LogWatch::new(&serial, start);
    let mut next_scan = Instant::now();
    let found = loop {
        signals::check()?;
        if let Some(reason) = vm.0.run_once() {
            log.poll();
            return Err(BenchError::GuestStopped(format!(
                "toucher guest: {reason:?}; console: {}",
                log.tail(5)
            )));
        }
        if Instant::now() >= next_scan {
            next_scan = Instant::now() + Duration::from_secs(2);
            if let Some(gpa) = find_status(vm.0.memory()) {
                if read_status(vm.0.memory(), gpa)?.round >= 2 {
                    break gpa;
                }
            }
        }
        if start.elapsed() > s.boot_timeout {
            log.poll();
            return Err(BenchError::Setup(format!(
                "the toucher's status page did not show up within {:?} of boot; console: {}",
                s.boot_timeout,
                log.tail(5)
            )));
        }
    };
    let boot = start.elapsed();
    vm.0.pause()
        .map_err(BenchError::vmm("pausing the toucher VM"))?;
    let status = read_status(vm.0.memory(), found)?;
    check_status(&status, spec, s)?;
    let files = SnapshotFiles::in_dir(work, "ready");
    vm.0.snapshot(SnapshotType::Full, &files.state, &files.mem)
        .map_err(BenchError::vmm("snapshot of the toucher VM"))?;
    Ok((
        Base {
            files,
            status_gpa: found,
            round: status.round,
            work: work.to_path_buf(),
        },
        boot,
    ))
}

fn check_status(status: &Status, spec: &GuestSpec, s: &ReadySettings) -> Result<()> {
    let want = s.ws_mib * (1 << 20) / PAGE;
    if status.pages != want || status.errors != 0 {
        return Err(BenchError::Setup(format!(
            "toucher status in the {} MiB guest: {status:?} (expected {want} pages, no errors)",
            spec.mem_mib
        )));
    }
    Ok(())
}

/// Restores the base snapshot in `mode`, resumes it and waits until the
/// toucher completes a round begun after the restore.
fn restore_to_ready(base: &Base, mode: Mode, timeout: Duration) -> Result<ReadyTiming> {
    let ws = snapshot::uffd::working_set::path_for(&base.files.mem);
    if mode == Mode::Lazy {
        // This run records the working set the next prefetching run uses.
        let _ = std::fs::remove_file(&ws);
    }
    let memory = match mode {
        Mode::File => MemoryBackend::File(base.files.mem.clone()),
        Mode::Lazy | Mode::LazyPrefetch => MemoryBackend::Uffd {
            path: base.files.mem.clone(),
            options: LazyOptions {
                prefetch: mode == Mode::LazyPrefetch,
                record_ms: 0,
                background_fill: false,
            },
        },
    };
    let params = RestoreParams {
        state_path: base.files.state.clone(),
        memory,
        track_dirty_pages: false,
        serial: SerialOutput::File(base.work.join("ready-restore-serial.log")),
        overrides: Default::default(),
    };
    let t0 = Instant::now();
    let built = build_from_snapshot(&params).map_err(BenchError::vmm("restoring the toucher"));
    signals::install();
    let mut vm = VmGuard(built?);
    vm.0.start_paused()
        .and_then(|()| vm.0.resume())
        .map_err(|e| BenchError::Vmm(format!("resuming the restored toucher: {e}")))?;
    let to_running = t0.elapsed();
    // A round was under way at the snapshot: the round after it is the
    // first the guest does wholly after the restore.
    let target = base.round + 2;
    let mut next_loop = Instant::now();
    let status = loop {
        let status = read_status(vm.0.memory(), base.status_gpa)?;
        if status.round >= target {
            break status;
        }
        if Instant::now() >= next_loop {
            next_loop = Instant::now() + EVENT_LOOP_EVERY;
            if let Some(reason) = vm.0.run_once_for(Duration::ZERO) {
                return Err(BenchError::GuestStopped(format!(
                    "restored toucher ({}): {reason:?}",
                    mode.prefix()
                )));
            }
            if t0.elapsed() > timeout {
                return Err(BenchError::Vmm(format!(
                    "restored toucher ({}) not ready within {timeout:?}: round {} of {target}",
                    mode.prefix(),
                    status.round
                )));
            }
        }
        std::thread::sleep(POLL);
    };
    let to_ready = t0.elapsed();
    if status.errors != 0 {
        return Err(BenchError::Vmm(format!(
            "restored toucher ({}) found {} pages not as it left them",
            mode.prefix(),
            status.errors
        )));
    }
    let mut timing = ReadyTiming {
        to_running,
        to_ready,
        faults: 0,
        served_mib: 0.0,
        prefetched_pages: 0,
        prefetch_ms: 0.0,
    };
    if let Some(lazy) = vm.0.lazy_memory() {
        if mode == Mode::Lazy {
            lazy.save_working_set()
                .map_err(BenchError::vmm("saving the working set"))?;
        }
        let stats = lazy.stats();
        timing.faults = stats.server.faults;
        timing.served_mib = stats.server.bytes_copied as f64 / (1 << 20) as f64;
        timing.prefetched_pages = stats.prefetched;
        timing.prefetch_ms = stats.prefetch_ms;
    }
    Ok(timing)
}

/// The guest-physical address of the toucher's status page, if it is in
/// memory yet.
fn find_status(mem: &Memory) -> Option<u64> {
    mem.iter().find_map(|region| {
        let start = region.start_addr().0;
        (0..region.len() / PAGE)
            .map(|page| start + page * PAGE)
            .find(|&addr| mem.read_obj::<[u64; 4]>(GuestAddress(addr)).ok() == Some(MAGIC))
    })
}

fn read_status(mem: &Memory, gpa: u64) -> Result<Status> {
    let words: [u64; 7] = mem
        .read_obj(GuestAddress(gpa))
        .map_err(|e| BenchError::Vmm(format!("reading the status page at {gpa:#x}: {e}")))?;
    if words[..4] != MAGIC {
        return Err(BenchError::Vmm(format!(
            "the toucher's status page at {gpa:#x} lost its magic"
        )));
    }
    Ok(Status {
        round: words[4],
        pages: words[5],
        errors: words[6],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])
            .unwrap()
    }

    fn put_status(mem: &Memory, gpa: u64, magic: [u64; 4], round: u64) {
        let words = [magic[0], magic[1], magic[2], magic[3], round, 4096, 0];
        mem.write_obj(words, GuestAddress(gpa)).unwrap();
    }

    #[test]
    fn the_status_page_is_found_by_its_whole_magic() {
        let mem = memory();
        assert_eq!(find_status(&mem), None);
        // Three words of four are not the status page.
        let mut partial = MAGIC;
        partial[3] = 0;
        put_status(&mem, 0x3000, partial, 9);
        assert_eq!(find_status(&mem), None);
        let gpa = (1 << 32) + 0x5000;
        put_status(&mem, gpa, MAGIC, 7);
        assert_eq!(find_status(&mem), Some(gpa));
        let status = read_status(&mem, gpa).unwrap();
        assert_eq!(
            status,
            Status {
                round: 7,
                pages: 4096,
                errors: 0
            }
        );
        // A page that lost its magic is an error, not a status.
        put_status(&mem, gpa, partial, 8);
        assert!(read_status(&mem, gpa).is_err());
    }
}
