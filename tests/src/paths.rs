//! Where things are: the workspace, its cargo target directory, the artifact cache.

use std::path::{Path, PathBuf};

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // This crate lives at <workspace>/tests.
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// The cargo target directory: `CARGO_TARGET_DIR` when set (as the test binary itself was built
/// there), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The artifact cache shared with the resources/ scripts: `VMM_CACHE`, default `~/.cache/vmm`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMM_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("vmm")
}

/// The resources/ directory holding the build scripts.
pub fn resources_dir() -> PathBuf {
    workspace_root().join("resources")
}

/// Where the harness keeps logs and per-run scratch files: `<target>/vmm-tests`.
pub fn scratch_dir() -> PathBuf {
    target_dir().join("vmm-tests")
}

/// A path as UTF-8 text for command lines and JSON bodies (test paths always are).
pub fn utf8(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("path is not UTF-8: {}", p.display()))
}
