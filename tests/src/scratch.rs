//! Per-test scratch directories and the in-process lock for heavy tests.
//!
//! Scratch directories live under the cargo target directory (not /tmp: memory files are large
//! and sparse, and tmpfs would hold them in RAM) and carry the process id, so two runs of one
//! binary do not collide. A passing test removes its directory; `VMM_TESTS_KEEP` keeps it for
//! inspection.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::paths::scratch_dir;

/// A fresh (emptied) directory `<scratch>/<binary>-<name>-<pid>` for one test.
pub fn scratch(binary: &str, name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("{binary}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
    dir
}

/// Removes a passed test's scratch directory unless `VMM_TESTS_KEEP` is set.
pub fn cleanup(dir: &Path) {
    if std::env::var_os("VMM_TESTS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One heavy test (a VM, a nested host) at a time in this process: the machine has two cores
/// shared with everyone else, and the timings tests print only mean something one at a time.
/// A test that panicked while holding it does not poison it for the others.
pub fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}
