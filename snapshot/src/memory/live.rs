//! Live snapshots of guest memory: the guest runs while its memory is
//! copied, and the file is still the image of the moment of the pause.
//!
//! While the VM is paused, [`begin_live`] notes which pages are present and
//! write-protects all of guest memory through userfaultfd. After the VM
//! resumes, the copy thread writes pages out in chunks, lifting the
//! protection of each chunk once it is in the file. A guest (or device)
//! write to a page not copied yet traps to the same thread, which copies
//! that page first and then lets the write proceed. Pages absent at the
//! pause were zero then and stay holes, whatever the guest writes to them
//! later (an absent page is not write-protected, so it cannot be trapped,
//! and need not be).
//!
//! Only anonymous memory can be write-protected this way: a VM whose memory
//! maps a file (restored with MAP_PRIVATE) is refused.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use userfaultfd::{Event, FaultKind, Uffd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::full::{Pagemap, PM_PRESENT, PM_SWAPPED};
use super::host::HostRegion;
use super::{MemoryError, MemoryLayout, MemoryWriteStats, PAGE_SIZE};
use crate::atomic::PendingFile;

/// Pages copied between two looks at pending write faults.
const CHUNK_PAGES: u64 = 256;
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
    /// How long write-protecting memory took (part of the pause).
    pub protect: Duration,
}

struct Region {
    host_addr: usize,
    len: usize,
    file_offset: u64,
    /// One bit per page: present at the pause (its content must be saved).
    present: Vec<u64>,
    /// One bit per page: in the file (or known to be a hole).
    copied: Vec<u64>,
}

fn bit(bits: &[u64], page: u64) -> bool {
    bits[(page / 64) as usize] & (1 << (page % 64)) != 0
}

fn set(bits: &mut [u64], page: u64) {
    bits[(page / 64) as usize] |= 1 << (page % 64);
}

/// A live copy set up while the VM is paused, not yet running.
pub struct LiveCopy<M> {
    mem: M,
    uffd: Uffd,
    regions: Vec<Region>,
    file: PendingFile,
    path: PathBuf,
    protect: Duration,
}

/// Call with every vCPU paused and devices quiet: records present pages,
/// write-protects guest memory and creates the (not yet visible) file.
pub fn begin_live<M>(mem: &M, path: &Path) -> Result<LiveCopy<M>, LiveError>
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
    let pagemap =
        Pagemap::open().ok_or_else(|| LiveError::Uffd("cannot open /proc/self/pagemap".into()))?;
    let mut regions = Vec::new();
    let mut entries = Vec::new();
    for (index, (region, lay)) in mem.iter().zip(&layout.regions).enumerate() {
        if region.file_offset().is_some() {
            return Err(LiveError::FileBacked(index));
        }
        let host = HostRegion::new(region)?;
        let pages = host.len() as u64 / PAGE_SIZE;
        let words = pages.div_ceil(64) as usize;
        let mut present = vec![0u64; words];
        let mut page = 0;
        while page < pages {
            let n = (pages - page).min(1 << 16);
            pagemap.read(host.addr() as u64 + page * PAGE_SIZE, n, &mut entries)?;
            for (i, e) in entries.iter().enumerate() {
                if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                    set(&mut present, page + i as u64);
                }
            }
            page += n;
        }
        let addr = host.addr();
        let protect_err = |op, e: userfaultfd::Error| LiveError::Protect {
            op,
            addr,
            reason: e.to_string(),
        };
        uffd.register_with_mode(
            addr as *mut libc::c_void,
            host.len(),
            userfaultfd::RegisterMode::WRITE_PROTECT,
        )
        .map_err(|e| protect_err("register", e))?;
        uffd.write_protect(addr as *mut libc::c_void, host.len())
            .map_err(|e| protect_err("write-protect", e))?;
        regions.push(Region {
            host_addr: addr,
            len: host.len(),
            file_offset: lay.file_offset,
            present,
            copied: vec![0u64; words],
        });
    }
    let mut file = PendingFile::create(path).map_err(MemoryError::from)?;
    file.file()
        .set_len(layout.total_size())
        .map_err(|source| MemoryError::Io {
            op: "resize",
            path: path.to_path_buf(),
            offset: 0,
            source,
        })?;
    Ok(LiveCopy {
        mem: mem.clone(),
        uffd,
        regions,
        file,
        path: path.to_path_buf(),
        protect: t.elapsed(),
    })
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
        for r in &self.regions {
            let _ = self
                .uffd
                .unregister(r.host_addr as *mut libc::c_void, r.len);
        }
    }

    fn run(mut self) -> Result<LiveStats, LiveError> {
        let t = Instant::now();
        let mut stats = LiveStats {
            protect: self.protect,
            ..Default::default()
        };
        let result = self.copy_all(&mut stats);
        // Whatever happened, the guest must not stay write-protected.
        for r in &self.regions {
            let _ = self
                .uffd
                .unregister(r.host_addr as *mut libc::c_void, r.len);
        }
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
        if bit(&r.copied, page) {
            return Ok(());
        }
        if bit(&r.present, page) {
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
        set(&mut self.regions[index].copied, page);
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
    use crate::memory::test_util::{anon_memory, fill_page, private_file_memory};
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
        let copy = begin_live(&mem, &path).unwrap();
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
        assert_eq!(file.len() as u64, PAGES * PAGE_SIZE);
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

    #[test]
    fn file_backed_memory_is_refused_and_nothing_is_written() {
        let backing = tmp("backing");
        std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
        let mem = private_file_memory(&backing, 1 << 20);
        let path = backing.with_file_name("out");
        assert!(matches!(
            begin_live(&mem, &path),
            Err(LiveError::FileBacked(0))
        ));
        assert!(!path.exists());
        std::fs::remove_dir_all(backing.parent().unwrap()).unwrap();
    }
}
