//! The page server thread and prefetching.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use userfaultfd::{Event, EventBuffer, IoctlFlags, Uffd};
use vmm_sys_util::eventfd::EventFd;

use super::ioctl::{self, Progress};
use super::{PageSource, UffdError, UffdRegion};
use crate::memory::PAGE_SIZE;
use crate::page_bits;

/// Events read per `read(2)` on the userfaultfd.
const EVENT_BATCH: usize = 64;
/// Largest single `UFFDIO_COPY` while prefetching (2 MiB).
const MAX_PREFETCH_PAGES: u64 = 512;
/// Poll timeout while faults wait for the address space to settle (ms).
const RETRY_MS: libc::c_int = 1;

const PAGE: usize = PAGE_SIZE as usize;

/// What the server has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageServerStats {
    /// Missing-page faults received.
    pub faults: u64,
    /// Pages filled with data from the source (faults and prefetch).
    pub pages_copied: u64,
    /// Bytes filled with data from the source.
    pub bytes_copied: u64,
    /// Pages filled with the zero page (holes and removed pages).
    pub zero_pages: u64,
    /// Pages filled by [`PageServer::prefetch`] before the guest asked.
    pub prefetched_pages: u64,
    /// Faults on pages a prefetch was asked for: pages of the working set
    /// the prefetch did not fill in time (0 when it did its job, whatever
    /// else the guest touched).
    #[serde(default)]
    pub working_set_faults: u64,
    /// Pages the guest released (`MADV_DONTNEED`/`MADV_REMOVE`), which read
    /// as zero from then on.
    pub removed_pages: u64,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    pages_copied: AtomicU64,
    bytes_copied: AtomicU64,
    zero_pages: AtomicU64,
    prefetched_pages: AtomicU64,
    working_set_faults: AtomicU64,
    removed_pages: AtomicU64,
}

/// State changed by fills and remove events, under one lock so a prefetch
/// never refills a page the guest released with stale source data.
struct FillState {
    /// Per region, one bit per page: released by the guest, zero from now on.
    removed: Vec<Vec<u64>>,
    /// Per region, one bit per page: asked for by [`PageServer::prefetch`].
    wanted: Vec<Vec<u64>>,
    /// Bounce buffer for source reads.
    buf: Vec<u8>,
}

struct Inner {
    uffd: Uffd,
    regions: Vec<UffdRegion>,
    source: Box<dyn PageSource>,
    fill: Mutex<FillState>,
    counters: Counters,
    recording: AtomicBool,
    working_set: Mutex<Vec<u64>>,
}

/// Outcome of one fill attempt.
enum Fill {
    /// Done; this many pages were newly filled (others were already present).
    Done(u64),
    /// The address space is changing (a remove event is pending): try again
    /// after reading events.
    Blocked,
}

/// Serves missing-page faults on registered guest memory from a
/// [`PageSource`], on its own thread.
///
/// Stop it only once every page is populated ([`PageServer::prefetch_all`]) or
/// the guest is gone: closing the userfaultfd makes pages that were never
/// served read as zero.
pub struct PageServer {
    inner: Arc<Inner>,
    stop: EventFd,
    thread: Option<JoinHandle<Result<(), UffdError>>>,
}

impl PageServer {
    /// Registers `regions` with `uffd` for missing-page faults and starts
    /// serving them from `source`.
    ///
    /// Regions must be page aligned, lie within the source, and be mapped
    /// private anonymous memory whose pages are not populated yet (pages
    /// already present are simply never faulted).
    pub fn spawn<S: PageSource + 'static>(
        uffd: Uffd,
        regions: Vec<UffdRegion>,
        source: S,
    ) -> Result<Self, UffdError> {
        for r in &regions {
            check_region(r, source.size())?;
        }
        for r in &regions {
            let ioctls = uffd
                .register(r.host_addr as *mut libc::c_void, r.len)
                .map_err(|source| UffdError::Register {
                    host_addr: r.host_addr,
                    len: r.len,
                    source,
                })?;
            if !ioctls.contains(IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE) {
                return Err(UffdError::BadRegion {
                    host_addr: r.host_addr,
                    reason: "userfaultfd cannot copy or zero pages there (not anonymous memory?)",
                });
            }
        }
        let page_bitmaps = || -> Vec<Vec<u64>> {
            regions
                .iter()
                .map(|r| vec![0u64; (r.len / PAGE).div_ceil(64)])
                .collect()
        };
        let (removed, wanted) = (page_bitmaps(), page_bitmaps());
        let inner = Arc::new(Inner {
            uffd,
            regions,
            source: Box::new(source),
            fill: Mutex::new(FillState {
                removed,
                wanted,
                buf: Vec::new(),
            }),
            counters: Counters::default(),
            recording: AtomicBool::new(false),
            working_set: Mutex::new(Vec::new()),
        });
        let thread_err = |op| move |source| UffdError::Thread { op, source };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err("create an eventfd"))?;
        let thread_stop = stop.try_clone().map_err(thread_err("clone an eventfd"))?;
        let thread_inner = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("uffd-pages".into())
            .spawn(move || serve(&thread_inner, &thread_stop))
            .map_err(thread_err("spawn the thread"))?;
        Ok(Self {
            inner,
            stop,
            thread: Some(thread),
        })
    }

    /// Starts recording, in order, the source offsets of pages the guest
    /// faults on (the working set); clears any earlier record.
    pub fn start_recording(&self) {
        lock(&self.inner.working_set).clear();
        self.inner.recording.store(true, Ordering::SeqCst);
    }

    /// Stops recording and returns the working set.
    pub fn stop_recording(&self) -> Vec<u64> {
        self.inner.recording.store(false, Ordering::SeqCst);
        std::mem::take(&mut *lock(&self.inner.working_set))
    }

    /// The working set recorded so far.
    pub fn working_set(&self) -> Vec<u64> {
        lock(&self.inner.working_set).clone()
    }

    /// Fills the pages at the given source offsets now, in the given order,
    /// coalescing consecutive pages into large copies. Pages already present
    /// are skipped. Returns how many pages were newly filled.
    pub fn prefetch(&self, offsets: &[u64]) -> Result<u64, UffdError> {
        let mut filled = 0;
        let mut i = 0;
        while i < offsets.len() {
            let start = offsets[i] / PAGE_SIZE * PAGE_SIZE;
            let (region, first_page) = self.inner.locate_offset(start)?;
            let region_pages = (self.inner.regions[region].len / PAGE) as u64;
            let mut n = 1u64;
            while i + (n as usize) < offsets.len()
                && n < MAX_PREFETCH_PAGES
                && first_page + n < region_pages
                && offsets[i + n as usize] / PAGE_SIZE == start / PAGE_SIZE + n
            {
                n += 1;
            }
            filled += self.inner.prefetch_run(region, first_page, n, true)?;
            i += n as usize;
        }
        Ok(filled)
    }

    /// Fills every page not present yet, e.g. to finish populating memory in
    /// the background or before the server is stopped.
    pub fn prefetch_all(&self) -> Result<u64, UffdError> {
        let mut filled = 0;
        for (region, r) in self.inner.regions.iter().enumerate() {
            let pages = (r.len / PAGE) as u64;
            let mut page = 0;
            while page < pages {
                let n = (pages - page).min(MAX_PREFETCH_PAGES);
                filled += self.inner.prefetch_run(region, page, n, false)?;
                page += n;
            }
        }
        Ok(filled)
    }

    /// Counters so far.
    pub fn stats(&self) -> PageServerStats {
        let c = &self.inner.counters;
        PageServerStats {
            faults: c.faults.load(Ordering::Relaxed),
            pages_copied: c.pages_copied.load(Ordering::Relaxed),
            bytes_copied: c.bytes_copied.load(Ordering::Relaxed),
            zero_pages: c.zero_pages.load(Ordering::Relaxed),
            prefetched_pages: c.prefetched_pages.load(Ordering::Relaxed),
            working_set_faults: c.working_set_faults.load(Ordering::Relaxed),
            removed_pages: c.removed_pages.load(Ordering::Relaxed),
        }
    }

    /// Whether the server thread has ended (it only ends on its own after an
    /// error, which [`PageServer::stop`] returns).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the server thread and returns its final counters, or the error
    /// that ended it.
    pub fn stop(mut self) -> Result<PageServerStats, UffdError> {
        self.join()?;
        Ok(self.stats())
    }

    fn join(&mut self) -> Result<(), UffdError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.write(1).map_err(|source| UffdError::Thread {
            op: "signal the thread to stop",
            source,
        })?;
        thread.join().map_err(|_| UffdError::Panicked)?
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        // Errors were the caller's to collect with `stop`.
        let _ = self.join();
    }
}

fn check_region(r: &UffdRegion, source_size: u64) -> Result<(), UffdError> {
    let bad = |reason| UffdError::BadRegion {
        host_addr: r.host_addr,
        reason,
    };
    let misaligned = |v: u64| v & (PAGE_SIZE - 1) != 0;
    if misaligned(r.host_addr as u64) || misaligned(r.len as u64) || misaligned(r.file_offset) {
        return Err(bad("address, length or file offset is not page aligned"));
    }
    if r.len == 0 {
        return Err(bad("region is empty"));
    }
    if r.host_addr.checked_add(r.len).is_none() {
        return Err(bad("region wraps the address space"));
    }
    if r.file_offset
        .checked_add(r.len as u64)
        .is_none_or(|end| end > source_size)
    {
        return Err(bad("region reaches past the end of the page source"));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected data stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The server thread: waits for events or the stop signal.
fn serve(inner: &Inner, stop: &EventFd) -> Result<(), UffdError> {
    let mut events = EventBuffer::new(EVENT_BATCH);
    let mut deferred: Vec<usize> = Vec::new();
    loop {
        let timeout = if deferred.is_empty() { -1 } else { RETRY_MS };
        let ready = super::wait(&inner.uffd, stop, timeout)
            .map_err(|source| UffdError::Thread { op: "poll", source })?;
        if ready.stop {
            return Ok(());
        }
        if ready.broken {
            return Err(UffdError::Thread {
                op: "poll the userfaultfd",
                source: std::io::Error::other("error condition on the userfaultfd"),
            });
        }
        for addr in std::mem::take(&mut deferred) {
            inner.serve_fault(addr, false, &mut deferred)?;
        }
        if ready.events {
            for event in inner
                .uffd
                .read_events(&mut events)
                .map_err(UffdError::ReadEvents)?
            {
                match event.map_err(UffdError::ReadEvents)? {
                    Event::Pagefault { addr, .. } => {
                        inner.serve_fault(addr as usize, true, &mut deferred)?
                    }
                    Event::Remove { start, end } => inner.remove(start as usize, end as usize),
                    // Not requested at creation; nothing to do.
                    _ => {}
                }
            }
        }
    }
}

impl Inner {
    /// Region index and page index within it of a host address.
    fn locate_addr(&self, addr: usize) -> Result<(usize, u64), UffdError> {
        self.regions
            .iter()
            .position(|r| addr >= r.host_addr && addr - r.host_addr < r.len)
            .map(|i| (i, ((addr - self.regions[i].host_addr) / PAGE) as u64))
            .ok_or(UffdError::OutOfRange {
                what: "host address",
                value: addr as u64,
            })
    }

    /// Region index and page index within it of a source offset.
    fn locate_offset(&self, offset: u64) -> Result<(usize, u64), UffdError> {
        self.regions
            .iter()
            .position(|r| offset >= r.file_offset && offset - r.file_offset < r.len as u64)
            .map(|i| (i, (offset - self.regions[i].file_offset) / PAGE_SIZE))
            .ok_or(UffdError::OutOfRange {
                what: "file offset",
                value: offset,
            })
    }

    fn serve_fault(
        &self,
        addr: usize,
        first: bool,
        deferred: &mut Vec<usize>,
    ) -> Result<(), UffdError> {
        let (region, page) = self.locate_addr(addr)?;
        if first {
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
            if self.recording.load(Ordering::Relaxed) {
                let offset = self.regions[region].file_offset + page * PAGE_SIZE;
                lock(&self.working_set).push(offset);
            }
        }
        let mut state = lock(&self.fill);
        if first && page_bits::get(&state.wanted[region], page) {
            self.counters
                .working_set_faults
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Fill::Blocked = self.fill_run(&mut state, region, page, 1)? {
            deferred.push(addr);
        }
        Ok(())
    }

    /// Fills a run ahead of the guest; `wanted` marks it as working set.
    fn prefetch_run(
        &self,
        region: usize,
        first_page: u64,
        pages: u64,
        wanted: bool,
    ) -> Result<u64, UffdError> {
        let mut state = lock(&self.fill);
        if wanted {
            for page in first_page..first_page + pages {
                page_bits::set(&mut state.wanted[region], page);
            }
        }
        // A blocked prefetch is dropped: those pages will fault instead.
        let filled = match self.fill_run(&mut state, region, first_page, pages)? {
            Fill::Done(n) => n,
            Fill::Blocked => 0,
        };
        self.counters
            .prefetched_pages
            .fetch_add(filled, Ordering::Relaxed);
        Ok(filled)
    }

    fn remove(&self, start: usize, end: usize) {
        let mut state = lock(&self.fill);
        for (i, r) in self.regions.iter().enumerate() {
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_addr + r.len);
            if lo >= hi {
                continue;
            }
            let first = (lo - r.host_addr) / PAGE;
            let last = (hi - r.host_addr).div_ceil(PAGE);
            for page in first..last {
                page_bits::set(&mut state.removed[i], page as u64);
            }
            self.counters
                .removed_pages
                .fetch_add((last - first) as u64, Ordering::Relaxed);
        }
    }

    fn reads_as_zero(&self, state: &FillState, region: usize, page: u64) -> bool {
        page_bits::get(&state.removed[region], page)
            || self
                .source
                .is_zero_page(self.regions[region].file_offset + page * PAGE_SIZE)
    }

    /// Fills pages `first..first + pages` of a region, in runs of zero pages
    /// and runs of data pages.
    fn fill_run(
        &self,
        state: &mut FillState,
        region: usize,
        first: u64,
        pages: u64,
    ) -> Result<Fill, UffdError> {
        let r = self.regions[region];
        let end = first + pages;
        let mut filled = 0;
        let mut page = first;
        while page < end {
            let zero = self.reads_as_zero(state, region, page);
            let mut stop = page + 1;
            while stop < end && self.reads_as_zero(state, region, stop) == zero {
                stop += 1;
            }
            let host = r.host_addr + page as usize * PAGE;
            let len = (stop - page) as usize * PAGE;
            let outcome = if zero {
                self.zero(host, len)?
            } else {
                let offset = r.file_offset + page * PAGE_SIZE;
                state.buf.resize(len, 0);
                self.source
                    .read_at(offset, &mut state.buf)
                    .map_err(|source| UffdError::Source {
                        offset,
                        len,
                        source,
                    })?;
                self.copy(host, &state.buf)?
            };
            let Fill::Done(n) = outcome else {
                return Ok(Fill::Blocked);
            };
            filled += n;
            if zero {
                self.counters.zero_pages.fetch_add(n, Ordering::Relaxed);
            } else {
                self.counters.pages_copied.fetch_add(n, Ordering::Relaxed);
                self.counters
                    .bytes_copied
                    .fetch_add(n * PAGE_SIZE, Ordering::Relaxed);
            }
            page = stop;
        }
        Ok(Fill::Done(filled))
    }

    /// `UFFDIO_COPY` of `src` to `dst`, waking faulting threads.
    fn copy(&self, dst: usize, src: &[u8]) -> Result<Fill, UffdError> {
        self.fill_with("UFFDIO_COPY", dst, src.len(), |at, done| {
            // SAFETY: the range lies in a region registered with this
            // userfaultfd (checked at spawn).
            unsafe { ioctl::copy(&self.uffd, at, &src[done..]) }
        })
    }

    /// `UFFDIO_ZEROPAGE` over `len` bytes at `dst`, waking faulting threads.
    fn zero(&self, dst: usize, len: usize) -> Result<Fill, UffdError> {
        self.fill_with("UFFDIO_ZEROPAGE", dst, len, |at, done| {
            // SAFETY: as for `copy`.
            unsafe { ioctl::zeropage(&self.uffd, at, len - done) }
        })
    }

    /// Drives one fill ioctl over `len` bytes at `dst` to completion,
    /// skipping pages that are already present.
    fn fill_with(
        &self,
        op: &'static str,
        dst: usize,
        len: usize,
        mut fill: impl FnMut(usize, usize) -> std::io::Result<Progress>,
    ) -> Result<Fill, UffdError> {
        let mut done = 0;
        let mut filled = 0;
        while done < len {
            let at = dst + done;
            match fill(at, done).map_err(|source| UffdError::Fill {
                op,
                host_addr: at,
                len: len - done,
                source,
            })? {
                Progress::All => {
                    filled += len - done;
                    done = len;
                }
                Progress::Partial(n) => {
                    // Never trust the kernel's count past the range.
                    let n = n.min(len - done);
                    filled += n;
                    done += n;
                }
                Progress::Exists => {
                    // Filled meanwhile (by prefetch or a racing fault): wake
                    // anyone still waiting on it and move on.
                    self.wake(at, PAGE)?;
                    done += PAGE;
                }
                Progress::Blocked if filled == 0 => return Ok(Fill::Blocked),
                // Report what was done; the rest faults or is retried later.
                Progress::Blocked => break,
            }
        }
        Ok(Fill::Done((filled / PAGE) as u64))
    }

    fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        self.uffd
            .wake(addr as *mut libc::c_void, len)
            .map_err(|e| UffdError::Fill {
                op: "UFFDIO_WAKE",
                host_addr: addr,
                len,
                source: std::io::Error::other(e),
            })
    }
}
