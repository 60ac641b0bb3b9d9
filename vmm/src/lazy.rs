//! Lazy restore: guest memory filled on demand by the userfaultfd page
//! server instead of mapped from the memory file, with the snapshot's
//! working set prefetched in bulk first and the rest filled in the
//! background.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use serde::Serialize;
use snapshot::uffd::{self, working_set, FilePageSource, PageServer, PageServerStats, UffdRegion};

/// How a lazily restored VM uses its working set.
#[derive(Debug, Clone, Default)]
pub struct LazyOptions {
    /// Prefetch the saved working set (`<memory>.ws`) before resuming.
    pub prefetch: bool,
    /// Record the pages touched in the first this-many ms and save them as
    /// the working set (0: do not record; [`LazyMemory::save_working_set`]
    /// saves on demand, e.g. when the guest agent first answers).
    pub record_ms: u64,
    /// Fill every remaining page in the background after the prefetch.
    pub background_fill: bool,
}

/// Why lazy restore failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("page server: {0}")]
    Uffd(#[from] uffd::UffdError),
    #[error(transparent)]
    WorkingSet(#[from] working_set::WorkingSetError),
}

/// What the page server did, for the API and benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct LazyStats {
    pub server: PageServerStats,
    /// Pages prefetched from the working set before resuming.
    pub prefetched: u64,
    pub prefetch_ms: f64,
    /// Pages in the working set recorded by this restore (0 while recording).
    pub recorded: usize,
}

/// The page server of one VM and its working-set bookkeeping.
pub struct LazyMemory {
    server: Arc<PageServer>,
    ws_path: PathBuf,
    /// The working set this restore prefetched; a new record extends it.
    prefetched_set: Vec<u64>,
    record_until: Option<Instant>,
    prefetched: u64,
    prefetch_time: Duration,
    recorded: usize,
    /// The working set was saved (recording is over).
    saved: bool,
    filler: Option<JoinHandle<Result<u64, uffd::UffdError>>>,
    background_fill: bool,
}

impl LazyMemory {
    /// Registers `mem` (fresh anonymous memory in the snapshot's layout)
    /// with a page server reading `mem_path`, and prefetches the saved
    /// working set if asked and present.
    pub fn start(
        mem: &GuestMemoryMmap,
        mem_path: &Path,
        opts: &LazyOptions,
    ) -> Result<Self, LazyError> {
        let source = FilePageSource::open(mem_path)?;
        let regions = UffdRegion::from_memory(mem)?;
        let size: u64 = regions.iter().map(|r| r.len as u64).sum();
        let server = Arc::new(PageServer::spawn(uffd::create_uffd()?, regions, source)?);
        let ws_path = working_set::path_for(mem_path);
        let mut lazy = Self {
            server,
            ws_path,
            prefetched_set: Vec::new(),
            record_until: None,
            prefetched: 0,
            prefetch_time: Duration::ZERO,
            recorded: 0,
            saved: false,
            filler: None,
            background_fill: opts.background_fill,
        };
        if opts.prefetch && lazy.ws_path.exists() {
            let t = Instant::now();
            let pages = working_set::load(&lazy.ws_path, size)?;
            lazy.prefetched = lazy.server.prefetch(&pages)?;
            lazy.prefetch_time = t.elapsed();
            lazy.prefetched_set = pages;
        }
        // Always record: a timed record ends by itself, otherwise
        // `save_working_set` (the guest is ready) ends it.
        lazy.server.start_recording();
        if opts.record_ms > 0 {
            lazy.record_until = Some(Instant::now() + Duration::from_millis(opts.record_ms));
        }
        Ok(lazy)
    }

    /// Starts filling the remaining pages in the background (after the
    /// guest resumed, so it does not wait for them).
    pub fn start_background_fill(&mut self) {
        if !self.background_fill || self.filler.is_some() {
            return;
        }
        let server = self.server.clone();
        match std::thread::Builder::new()
            .name("page-fill".into())
            .spawn(move || server.prefetch_all())
        {
            Ok(t) => self.filler = Some(t),
            Err(e) => log::warn!("background page fill not started: {e}"),
        }
    }

    /// Periodic work from the event loop: ends a timed recording. Returns an
    /// error when the page server has died (the guest would hang on its next
    /// missing page).
    pub fn tick(&mut self) -> Result<(), String> {
        if self.server.is_finished() {
            return Err(
                "the userfaultfd page server stopped; guest memory can no longer be served".into(),
            );
        }
        if self.record_until.is_some_and(|t| Instant::now() >= t) {
            if let Err(e) = self.save_working_set() {
                log::warn!("{e}");
            }
        }
        Ok(())
    }

    /// Stops recording and writes the working set beside the memory file:
    /// the prefetched set (whose pages never fault) followed by the pages
    /// that faulted since. Once only: a later call (a timed record that
    /// ended, then the API asking again) returns the saved size and leaves
    /// the file alone, where writing again would replace it with nothing.
    pub fn save_working_set(&mut self) -> Result<usize, LazyError> {
        if self.saved {
            return Ok(self.recorded);
        }
        self.record_until = None;
        let faulted = self.server.stop_recording();
        let mut pages = std::mem::take(&mut self.prefetched_set);
        let known: std::collections::HashSet<u64> = pages.iter().copied().collect();
        pages.extend(faulted.into_iter().filter(|p| !known.contains(p)));
        if let Err(e) = working_set::save(&self.ws_path, &pages) {
            // Kept for another try.
            self.prefetched_set = pages;
            return Err(e.into());
        }
        self.saved = true;
        self.recorded = pages.len();
        log::info!(
            "saved a working set of {} pages to {}",
            pages.len(),
            self.ws_path.display()
        );
        Ok(pages.len())
    }

    /// Makes every page present (before a snapshot of this VM: pages never
    /// served are not zero, they are the memory file's).
    pub fn populate_all(&self) -> Result<u64, LazyError> {
        Ok(self.server.prefetch_all()?)
    }

    /// Counters so far.
    pub fn stats(&self) -> LazyStats {
        LazyStats {
            server: self.server.stats(),
            prefetched: self.prefetched,
            prefetch_ms: self.prefetch_time.as_secs_f64() * 1e3,
            recorded: self.recorded,
        }
    }
}
