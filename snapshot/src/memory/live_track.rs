//! The write tracker of a live snapshot's preparation: between write-
//! protecting guest memory (VM running) and the pause, guest writes to
//! protected pages trap here; each page is noted and unprotected at once so
//! the guest barely notices. At the pause the noted pages are protected
//! again (see `LivePrepared::freeze`), which costs a few ioctls instead of
//! write-protecting all of memory inside the pause.

use std::sync::Arc;
use std::thread::JoinHandle;

use userfaultfd::{Event, EventBuffer, Uffd};
use vmm_sys_util::eventfd::EventFd;

use super::live::LiveError;
use super::PAGE_SIZE;
use crate::page_bits;

/// Events read per `read` of the userfaultfd.
const EVENT_BATCH: usize = 64;
const PAGE: usize = PAGE_SIZE as usize;

/// One guest region as the tracker sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct TrackedRange {
    pub(super) host_addr: usize,
    pub(super) len: usize,
}

/// The running tracker thread. Dropped without [`Tracker::finish`] (the
/// preparation was abandoned by a panic), it tells the thread to end and
/// lets it go; closing the userfaultfd then lifts any protection left.
pub(super) struct Tracker {
    stop: EventFd,
    thread: Option<JoinHandle<Result<Vec<Vec<u64>>, LiveError>>>,
}

impl Tracker {
    /// Starts serving write faults on `uffd` for `ranges`. Must run before
    /// any of them is write-protected, or the guest would block.
    pub(super) fn start(uffd: Arc<Uffd>, ranges: Vec<TrackedRange>) -> Result<Self, LiveError> {
        let thread_err = |what: &str, e: std::io::Error| {
            LiveError::Uffd(format!("cannot {what} for the write tracker: {e}"))
        };
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| thread_err("create an eventfd", e))?;
        let thread_stop = stop
            .try_clone()
            .map_err(|e| thread_err("clone an eventfd", e))?;
        let thread = std::thread::Builder::new()
            .name("live-track".into())
            .spawn(move || track(&uffd, &ranges, &thread_stop))
            .map_err(|e| thread_err("start a thread", e))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the tracker once nothing writes guest memory any more (vCPUs
    /// paused, devices quiet): it answers the faults still queued, then
    /// returns one bitmap per range of the pages written since it started.
    pub(super) fn finish(mut self) -> Result<Vec<Vec<u64>>, LiveError> {
        self.stop
            .write(1)
            .map_err(|e| LiveError::Uffd(format!("cannot stop the write tracker: {e}")))?;
        let thread = self.thread.take().ok_or(LiveError::Panicked)?;
        thread.join().map_err(|_| LiveError::Panicked)?
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // Best effort: if the eventfd cannot be written the thread keeps
            // serving faults, which still never blocks the guest for long.
            let _ = self.stop.write(1);
        }
    }
}

/// The tracker thread: unprotects each faulting page and notes it, until
/// `stop` is signalled; then drains what is queued.
fn track(uffd: &Uffd, ranges: &[TrackedRange], stop: &EventFd) -> Result<Vec<Vec<u64>>, LiveError> {
    let mut touched: Vec<Vec<u64>> = ranges
        .iter()
        .map(|r| vec![0u64; (r.len / PAGE).div_ceil(64)])
        .collect();
    let mut events = EventBuffer::new(EVENT_BATCH);
    loop {
        let stopping = crate::uffd::wait(uffd, stop, -1)
            .map_err(|e| LiveError::Uffd(format!("write tracker: poll: {e}")))?
            .stop;
        // Drain everything queued, also when stopping: a fault read after
        // the pause is still one from before it.
        loop {
            let mut any = false;
            for event in uffd
                .read_events(&mut events)
                .map_err(|e| LiveError::Uffd(format!("write tracker: read events: {e}")))?
            {
                any = true;
                let event =
                    event.map_err(|e| LiveError::Uffd(format!("write tracker: event: {e}")))?;
                if let Event::Pagefault { addr, .. } = event {
                    release(uffd, ranges, &mut touched, addr as usize)?;
                }
            }
            if !any {
                break;
            }
        }
        if stopping {
            return Ok(touched);
        }
    }
}

/// Notes the page holding `addr` and lets its writer go.
fn release(
    uffd: &Uffd,
    ranges: &[TrackedRange],
    touched: &mut [Vec<u64>],
    addr: usize,
) -> Result<(), LiveError> {
    let page_addr = addr & !(PAGE - 1);
    if let Some(index) = ranges
        .iter()
        .position(|r| addr >= r.host_addr && addr < r.host_addr + r.len)
    {
        let page = ((page_addr - ranges[index].host_addr) / PAGE) as u64;
        page_bits::set(&mut touched[index], page);
    }
    uffd.remove_write_protection(page_addr as *mut libc::c_void, PAGE, true)
        .map_err(|e| LiveError::Protect {
            op: "unprotect (tracking)",
            addr: page_addr,
            reason: e.to_string(),
        })
}
