//! Shared pieces of the fuzz targets: a guest driver that lays out split virtqueues whose
//! content comes from the fuzz input and activates a device through the real virtio-mmio
//! transport, and a fake VMM loop for the API server.
//!
//! Every target calls the project's real parsing code through its public API; nothing here
//! re-implements a parser.

pub mod api;
pub mod guest;
pub mod seeds;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A per-process scratch directory (sockets, disk files), removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates `<tmp>/vmm-fuzz-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-fuzz-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
