//! Live snapshots of guest memory: the guest runs while its memory is
//! copied, and the file is still the image of the moment of the pause.
//!
//! [`prepare_live`], with the VM still running, notes which pages are
//! present and write-protects all of guest memory through userfaultfd; a
//! tracker thread unprotects each page the guest writes meanwhile and notes
//! it. [`LivePrepared::freeze`], with the VM paused, protects again the
//! pages written or populated since, notes the pages present at the pause,
//! and returns the [`LiveCopy`]. That keeps the expensive part (protecting
//! all of memory, ~12 ms for 1 GiB) out of the guest-visible pause.
//!
//! After the VM resumes, the copy thread writes pages out in chunks, lifting
//! the protection of each chunk once it is in the file. A guest (or device)
//! write to a page not copied yet traps to the same thread, which copies
//! that page first and then lets the write proceed. Pages absent at the
//! pause were zero then and stay holes, whatever the guest writes to them
//! later (an absent page is not write-protected, so it cannot be trapped,
//! and need not be).
//!
//! Only anonymous memory can be write-protected this way: a VM whose memory
//! maps a file (restored with MAP_PRIVATE) is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use userfaultfd::{Event, FaultKind, Uffd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::full::{Pagemap, PM_PRESENT, PM_SWAPPED};
use super::host::HostRegion;
use super::live_track::{TrackedRange, Tracker};
use super::trailer;
use super::{MemoryError, MemoryLayout, MemoryWriteStats, PAGE_SIZE};
use crate::atomic::PendingFile;
use crate::id::SnapshotId;
use crate::page_bits;

/// Pages copied between two looks at pending write faults.
const CHUNK_PAGES: u64 = 256;
/// Pagemap entries read at once (512 KiB).
const PAGEMAP_READ_PAGES: u64 = 1 << 16;
const PAGE: usize = PAGE_SIZE as usize;

/// Why a live copy could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("live snapshots need anonymous guest memory; region {0} maps a file (a VM restored from a memory file)")]
    FileBacked(usize),
    #[error("userfaultfd write-protect is not available: {0}")]
    Uffd(String),
    #[error("live copy: {op} at host address {addr:#x}: {reason}")]
    Protect {
        op: &'static str,
        addr: usize,
        reason: String,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the live copy thread panicked")]
    Panicked,
}

/// What a live copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStats {
    pub memory: MemoryWriteStats,
    /// Guest writes that had to wait for their page to be copied first.
    pub write_faults: u64,
    /// How long write-protecting all of memory took (VM running).
    pub protect: Duration,
    /// How long [`LivePrepared::freeze`] took (part of the pause).
    #[serde(default)]
    pub freeze: Duration,
    /// Pages written (or populated) between protecting and the pause, which
    /// the freeze protected again.
    #[serde(default)]
    pub reprotected_pages: u64,
}

struct Region {
    host_addr: usize,
    len: usize,
    file_offset: u64,
    /// One bit per page: present (its content must be saved). Until the
    /// freeze: present when memory was write-protected; after: at the pause.
    present: Vec<u64>,
    /// One bit per page: in the file (or known to be a hole).
    copied: Vec<u64>,
}

/// One bit per page of `host`: present in RAM or swapped out.
fn present_pages(pagemap: &Pagemap, host: &HostRegion<'_>) -> Result<Vec<u64>, MemoryError> {
    let pages = host.len() as u64 / PAGE_SIZE;
    let mut present = Vec::with_capacity(pages.div_ceil(64) as usize);
    let mut entries = Vec::new();
    let mut page = 0;
    while page < pages {
        // A multiple of 64, so each read fills whole words.
        let n = (pages - page).min(PAGEMAP_READ_PAGES);
        pagemap.read(host.addr() as u64 + page * PAGE_SIZE, n, &mut entries)?;
        present.extend(entries.chunks(64).map(|chunk| {
            chunk.iter().enumerate().fold(0u64, |word, (i, e)| {
                word | (u64::from(e & (PM_PRESENT | PM_SWAPPED) != 0) << i)
            })
        }));
        page += n;
    }
    Ok(present)
}

/// Runs of set bits among the first `pages` of `bits`, as `(first, len)`.
fn bit_runs(bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let pages = pages.min(bits.len() as u64 * 64);
    let mut runs = Vec::new();
    let mut page = 0;
    while page < pages {
        if !page_bits::get(bits, page) {
            page += 1;
            continue;
        }
        let start = page;
        while page < pages && page_bits::get(bits, page) {
            page += 1;
        }
        runs.push((start, page - start));
    }
    runs
}

/// A live copy being prepared: memory is write-protected and the VM may
/// still run; [`LivePrepared::freeze`] (VM paused) fixes the moment.
pub struct LivePrepared<M> {
    mem: M,
    uffd: Arc<Uffd>,
    regions: Vec<Region>,
    file: PendingFile,
    path: PathBuf,
    tracker: Option<Tracker>,
    protect: Duration,
}

/// A live copy set up while the VM is paused, not yet running.
pub struct LiveCopy<M> {
    mem: M,
    uffd: Arc<Uffd>,
    regions: Vec<Region>,
    file: PendingFile,
    path: PathBuf,
    protect: Duration,
    freeze: Duration,
    reprotected_pages: u64,
}

/// Prepares a live copy of `mem` into `path` while the VM runs: creates the
/// (not yet visible) file, notes present pages, starts the write tracker and
/// write-protects guest memory. Pause the VM, then call
/// [`LivePrepared::freeze`] (or [`LivePrepared::cancel`]).
pub fn prepare_live<M>(mem: &M, path: &Path, id: &SnapshotId) -> Result<LivePrepared<M>, LiveError>
where
    M: GuestMemoryBackend + Clone + Send + 'static,
{
    let t = Instant::now();
    let layout = MemoryLayout::from_memory(mem);
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(userfaultfd::FeatureFlags::PAGEFAULT_FLAG_WP)
        .create()
        .map_err(|e| LiveError::Uffd(e.to_string()))?;
    let uffd = Arc::new(uffd);
    let pagemap =
        Pagemap::open().ok_or_else(|| LiveError::Uffd("cannot open /proc/self/pagemap".into()))?;
    let mut regions = Vec::new();
    for (index, (region, lay)) in mem.iter().zip(&layout.regions).enumerate() {
        if region.file_offset().is_some() {
            return Err(LiveError::FileBacked(index));
        }
        let host = HostRegion::new(region)?;
        let words = (host.len() as u64 / PAGE_SIZE).div_ceil(64) as usize;
        regions.push(Region {
            host_addr: host.addr(),
            len: host.len(),
            file_offset: lay.file_offset,
            // Read before protecting: a page populated after this read is
            // found by the freeze's second read, whether or not the
            // protection below caught it.
            present: present_pages(&pagemap, &host)?,
            copied: vec![0u64; words],
        });
    }
    let mut file = PendingFile::create(path).map_err(MemoryError::from)?;
    trailer::write(file.file(), path, layout.total_size(), id)?;
    for r in &regions {
        uffd.register_with_mode(
            r.host_addr as *mut libc::c_void,
            r.len,
            userfaultfd::RegisterMode::WRITE_PROTECT,
        )
        .map_err(|e| LiveError::Protect {
            op: "register",
            addr: r.host_addr,
            reason: e.to_string(),
        })?;
    }
    let mut prepared = LivePrepared {
        mem: mem.clone(),
        uffd: uffd.clone(),
        regions,
        file,
        path: path.to_path_buf(),
        tracker: None,
        protect: Duration::ZERO,
    };
    // From here on, errors must lift what is registered: `cancel` does.
    let ranges = prepared
        .regions
        .iter()
        .map(|r| TrackedRange {
            host_addr: r.host_addr,
            len: r.len,
        })
        .collect();
    match Tracker::start(uffd.clone(), ranges) {
        Ok(tracker) => prepared.tracker = Some(tracker),
        Err(e) => {
            prepared.cancel();
            return Err(e);
        }
    }
    for r in &prepared.regions {
        if let Err(e) = uffd.write_protect(r.host_addr as *mut libc::c_void, r.len) {
            let err = LiveError::Protect {
                op: "write-protect",
                addr: r.host_addr,
                reason: e.to_string(),
            };
            prepared.cancel();
            return Err(err);
        }
    }
    prepared.protect = t.elapsed();
    Ok(prepared)
}

/// Call with every vCPU paused and devices quiet: write-protects memory,
/// notes present pages and creates the (not yet visible) file, all inside
/// the pause. [`prepare_live`] before the pause and [`LivePrepared::freeze`]
/// in it do the same with a much shorter pause.
pub fn begin_live<M>(mem: &M, path: &Path, id: &SnapshotId) -> Result<LiveCopy<M>, LiveError>
where
    M: GuestMemoryBackend + Clone + Send + 'static,
{
    prepare_live(mem, path, id)?.freeze()
}

impl<M> LivePrepared<M>
where
    M: GuestMemoryBackend + Send + 'static,
{
    /// Call with every vCPU paused and devices quiet: stops the write
    /// tracker, protects again every page written since [`prepare_live`] and
    /// every page populated since, and notes the pages present now, whose
    /// content the copy saves. On error, the protection is lifted.
    pub fn freeze(mut self) -> Result<LiveCopy<M>, LiveError> {
        let t = Instant::now();
        let touched = match self.tracker.take().map(Tracker::finish) {
            Some(Ok(touched)) => touched,
            Some(Err(e)) => {
                self.cancel();
                return Err(e);
            }
            None => Vec::new(),
        };
        let reprotected = match self.reprotect(&touched) {
            Ok(n) => n,
            Err(e) => {
                self.cancel();
                return Err(e);
            }
        };
        let LivePrepared {
            mem,
            uffd,
            regions,
            file,
            path,
            protect,
            ..
        } = self;
        Ok(LiveCopy {
            mem,
            uffd,
            regions,
            file,
            path,
            protect,
            freeze: t.elapsed(),
            reprotected_pages: reprotected,
        })
    }

    /// Protects the pages `touched` (one bitmap per region, from the
    /// tracker) and those present now but not at [`prepare_live`]; records
    /// the present pages. Returns how many pages it protected.
    fn reprotect(&mut self, touched: &[Vec<u64>]) -> Result<u64, LiveError> {
        let pagemap = Pagemap::open()
            .ok_or_else(|| LiveError::Uffd("cannot open /proc/self/pagemap".into()))?;
        let mut count = 0;
        for (index, region) in self.mem.iter().enumerate() {
            let host = HostRegion::new(region)?;
            let now = present_pages(&pagemap, &host)?;
            let r = &mut self.regions[index];
            let mut due: Vec<u64> = now
                .iter()
                .zip(&r.present)
                .map(|(now, before)| now & !before)
                .collect();
            if let Some(t) = touched.get(index) {
                for (d, t) in due.iter_mut().zip(t) {
                    *d |= t;
                }
            }
            r.present = now;
            for (start, len) in bit_runs(&due, r.len as u64 / PAGE_SIZE) {
                let addr = r.host_addr + (start * PAGE_SIZE) as usize;
                self.uffd
                    .write_protect(addr as *mut libc::c_void, (len * PAGE_SIZE) as usize)
                    .map_err(|e| LiveError::Protect {
                        op: "write-protect again",
                        addr,
                        reason: e.to_string(),
                    })?;
                count += len;
            }
        }
        Ok(count)
    }

    /// Abandons the copy (the pause failed): stops the tracker and lifts the
    /// protection; the file is removed.
    pub fn cancel(mut self) {
        unregister_all(&self.uffd, &self.regions);
        if let Some(tracker) = self.tracker.take() {
            // Best effort: nothing is protected any more.
            let _ = tracker.finish();
        }
    }
}

/// Lifts the protection of every region (and wakes any waiting writer).
fn unregister_all(uffd: &Uffd, regions: &[Region]) {
    for r in regions {
        // Best effort: nothing more can be done if it fails, and the
        // userfaultfd's release when it is closed does the same.
        let _ = uffd.unregister(r.host_addr as *mut libc::c_void, r.len);
    }
}

impl<M> LiveCopy<M>
where
    M: GuestMemoryBackend + Send + 'static,
{
    /// Starts copying (after the VM resumed). The file appears at its path,
    /// atomically, when the copy completes.
    pub fn spawn(self) -> Result<LiveJob, LiveError> {
        std::thread::Builder::new()
            .name("live-snapshot".into())
            .spawn(move || self.run())
            .map(|thread| LiveJob { thread })
            .map_err(|e| LiveError::Uffd(format!("cannot start the copy thread: {e}")))
    }

    /// Abandons the copy (the pause failed): lifts the protection.
    pub fn cancel(self) {
        unregister_all(&self.uffd, &self.regions);
    }

    fn run(mut self) -> Result<LiveStats, LiveError> {
        let t = Instant::now();
        let mut stats = LiveStats {
            protect: self.protect,
            freeze: self.freeze,
            reprotected_pages: self.reprotected_pages,
            ..Default::default()
        };
        let result = self.copy_all(&mut stats);
        // Whatever happened, the guest must not stay write-protected.
        unregister_all(&self.uffd, &self.regions);
        result?;
        let LiveCopy { file, .. } = self;
        file.commit().map_err(MemoryError::from)?;
        stats.memory.duration = t.elapsed();
        Ok(stats)
    }

    fn copy_all(&mut self, stats: &mut LiveStats) -> Result<(), LiveError> {
        for index in 0..self.regions.len() {
            let pages = self.regions[index].len as u64 / PAGE_SIZE;
            let mut page = 0;
            while page < pages {
                self.serve_faults(stats)?;
                let n = (pages - page).min(CHUNK_PAGES);
                for p in page..page + n {
                    self.copy_page(index, p, stats)?;
                }
                let r = &self.regions[index];
                let addr = r.host_addr + (page * PAGE_SIZE) as usize;
                self.uffd
                    .remove_write_protection(
                        addr as *mut libc::c_void,
                        (n * PAGE_SIZE) as usize,
                        true,
                    )
                    .map_err(|e| LiveError::Protect {
                        op: "unprotect",
                        addr,
                        reason: e.to_string(),
                    })?;
                page += n;
            }
        }
        self.serve_faults(stats)
    }

    /// Copies page `page` of region `index` if it is due; zero pages stay
    /// holes.
    fn copy_page(
        &mut self,
        index: usize,
        page: u64,
        stats: &mut LiveStats,
    ) -> Result<(), LiveError> {
        let r = &self.regions[index];
        if page_bits::get(&r.copied, page) {
            return Ok(());
        }
        if page_bits::get(&r.present, page) {
            let region = self
                .mem
                .iter()
                .nth(index)
                .ok_or(MemoryError::NoHostMapping { guest_addr: 0 })?;
            let host = HostRegion::new(region)?;
            let offset = (page * PAGE_SIZE) as usize;
            if host.is_zero(offset, PAGE) {
                stats.memory.zero_pages_skipped += 1;
            } else {
                let file_offset = r.file_offset + page * PAGE_SIZE;
                host.write_to(self.file.file(), offset, PAGE, file_offset)
                    .map_err(|source| MemoryError::Io {
                        op: "write",
                        path: self.path.clone(),
                        offset: file_offset,
                        source,
                    })?;
                stats.memory.pages_written += 1;
                stats.memory.bytes_written += PAGE_SIZE;
            }
        } else {
            stats.memory.unpopulated_pages += 1;
        }
        page_bits::set(&mut self.regions[index].copied, page);
        Ok(())
    }

    /// Copies the pages of pending write faults, then lets the writers go.
    fn serve_faults(&mut self, stats: &mut LiveStats) -> Result<(), LiveError> {
        loop {
            let event = self
                .uffd
                .read_event()
                .map_err(|e| LiveError::Uffd(e.to_string()))?;
            let Some(Event::Pagefault { kind, addr, .. }) = event else {
                if event.is_none() {
                    return Ok(());
                }
                continue;
            };
            let addr = addr as usize;
            let Some(index) = self
                .regions
                .iter()
                .position(|r| addr >= r.host_addr && addr < r.host_addr + r.len)
            else {
                continue;
            };
            let page_addr = addr & !(PAGE - 1);
            let page = ((page_addr - self.regions[index].host_addr) / PAGE) as u64;
            if kind == FaultKind::WriteProtected {
                stats.write_faults += 1;
            }
            self.copy_page(index, page, stats)?;
            self.uffd
                .remove_write_protection(page_addr as *mut libc::c_void, PAGE, true)
                .map_err(|e| LiveError::Protect {
                    op: "unprotect",
                    addr: page_addr,
                    reason: e.to_string(),
                })?;
        }
    }
}

/// A running live copy.
pub struct LiveJob {
    thread: JoinHandle<Result<LiveStats, LiveError>>,
}

impl LiveJob {
    /// Whether the copy has ended (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the copy and returns its outcome.
    pub fn wait(self) -> Result<LiveStats, LiveError> {
        self.thread.join().map_err(|_| LiveError::Panicked)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_util::{anon_memory, fill_page, private_file_memory, Mem, TEST_ID};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("live-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("memory")
    }

    #[test]
    fn image_is_the_moment_of_the_pause_while_the_guest_writes() {
        const PAGES: u64 = 2048;
        let mem = anon_memory(&[(0, (PAGES * PAGE_SIZE) as usize)]);
        // Even pages hold 1 at the pause; odd pages were never touched.
        for p in (0..PAGES).step_by(2) {
            fill_page(&mem, p * PAGE_SIZE, 1);
        }
        let path = tmp("consistent");
        let copy = begin_live(&mem, &path, &TEST_ID).unwrap();
        // The "guest" resumes and keeps stamping 2 on every page.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(Ordering::SeqCst) {
                    for p in 0..PAGES {
                        mem.write_obj(2u8, GuestAddress(p * PAGE_SIZE + 7)).unwrap();
                    }
                    rounds += 1;
                }
                rounds
            })
        };
        let stats = copy.spawn().unwrap().wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        assert!(writer.join().unwrap() > 0);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len() as u64, PAGES * PAGE_SIZE + trailer::TRAILER_LEN);
        for p in 0..PAGES {
            let page = &file[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize];
            let expected = if p % 2 == 0 { 1 } else { 0 };
            assert!(
                page.iter().all(|&b| b == expected),
                "page {p} is not as at the pause"
            );
        }
        assert_eq!(stats.memory.pages_written, PAGES / 2);
        assert_eq!(stats.memory.unpopulated_pages, PAGES / 2);
        // And the guest's writes all went through.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(7)).unwrap(), 2);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// Writes `byte` at offset 7 of each page in `pages` from another
    /// thread, as a vCPU would, and waits for it (a protected page blocks
    /// its writer until the tracker or the copy lets it go).
    fn write_pages(mem: &Mem, pages: impl Iterator<Item = u64> + Send + 'static, byte: u8) {
        let mem = mem.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for p in pages {
                mem.write_obj(byte, GuestAddress(p * PAGE_SIZE + 7))
                    .unwrap();
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("guest writes blocked: a page stayed write-protected");
    }

    #[test]
    fn writes_between_prepare_and_freeze_are_in_the_image() {
        const PAGES: u64 = 4096;
        let mem = anon_memory(&[(0, (PAGES * PAGE_SIZE) as usize)]);
        for p in (0..PAGES).step_by(2) {
            fill_page(&mem, p * PAGE_SIZE, 1);
        }
        let path = tmp("window");
        let prepared = prepare_live(&mem, &path, &TEST_ID).unwrap();
        // The guest runs on: it rewrites present (protected) pages and
        // populates absent ones (not protected when memory was).
        write_pages(&mem, (0..PAGES).step_by(4), 3);
        write_pages(&mem, (1..PAGES).step_by(8), 5);
        // The pause: this is the image the file must hold.
        let mut expected = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        mem.read_slice(&mut expected, GuestAddress(0)).unwrap();
        let copy = prepared.freeze().unwrap();
        // After the pause every page is written again, also the pages that
        // were written or populated before it.
        let job = copy.spawn().unwrap();
        write_pages(&mem, 0..PAGES, 9);
        let stats = job.wait().unwrap();
        let file = std::fs::read(&path).unwrap();
        assert!(
            file[..expected.len()] == expected[..],
            "the file is not the image of the pause"
        );
        // Rewritten pages, plus every odd page: written, or mapped to the
        // zero page by reading `expected` (present now, so protected too).
        assert_eq!(stats.reprotected_pages, PAGES / 4 + PAGES / 2);
        assert_eq!(stats.memory.pages_written, PAGES / 2 + PAGES / 8);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE_SIZE + 7)).unwrap(), 9);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn cancel_after_prepare_lifts_protection_and_leaves_no_file() {
        let mem = anon_memory(&[(0, 1 << 20)]);
        fill_page(&mem, 0, 1);
        let path = tmp("cancel");
        let prepared = prepare_live(&mem, &path, &TEST_ID).unwrap();
        prepared.cancel();
        write_pages(&mem, 0..256, 2);
        assert!(!path.exists());
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 0, "the temporary file was left behind");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn dropping_a_preparation_never_blocks_the_guest() {
        let mem = anon_memory(&[(0, 1 << 20)]);
        fill_page(&mem, 0, 1);
        let path = tmp("dropped");
        drop(prepare_live(&mem, &path, &TEST_ID).unwrap());
        // Whether the tracker is still draining or the closed userfaultfd
        // has lifted the protection, writes go through.
        std::thread::sleep(std::time::Duration::from_millis(50));
        write_pages(&mem, 0..256, 2);
        assert!(!path.exists());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn bit_runs_finds_runs() {
        let mut bits = vec![0u64; 3];
        for p in [0, 1, 2, 63, 64, 130] {
            page_bits::set(&mut bits, p);
        }
        page_bits::set(&mut bits, 1000); // Out of range: ignored.
        assert_eq!(bit_runs(&bits, 140), vec![(0, 3), (63, 2), (130, 1)]);
        assert_eq!(bit_runs(&bits, 64), vec![(0, 3), (63, 1)]);
    }

    #[test]
    fn file_backed_memory_is_refused_and_nothing_is_written() {
        let backing = tmp("backing");
        std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
        let mem = private_file_memory(&backing, 1 << 20);
        let path = backing.with_file_name("out");
        assert!(matches!(
            begin_live(&mem, &path, &TEST_ID),
            Err(LiveError::FileBacked(0))
        ));
        assert!(!path.exists());
        std::fs::remove_dir_all(backing.parent().unwrap()).unwrap();
    }
}
