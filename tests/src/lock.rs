//! Cross-process exclusive locks (flock on a file in the cache directory), so that parallel test
//! binaries build each artifact once and run one nested QEMU at a time.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{HarnessError, Result};

/// An exclusive lock held until dropped (closing the file releases it).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until the exclusive lock on `path` (created if missing) is held.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| HarnessError::io("create directory", parent, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| HarnessError::io("open lock file", path, e))?;
        loop {
            // SAFETY: flock on a file descriptor we own and keep open for the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(HarnessError::io("flock", path, err));
            }
        }
        Ok(FileLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_other_holders() {
        let dir = std::env::temp_dir().join(format!("vmm-tests-lock-{}", std::process::id()));
        let path = dir.join("l");
        let held = FileLock::acquire(&path).unwrap();
        // A second, non-blocking attempt on another descriptor must fail while held.
        let other = File::open(held.path()).unwrap();
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, -1);
        drop(held);
        // Free once dropped; a child another test forks at this moment holds a
        // copy of the descriptor until it execs, so allow it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            // SAFETY: flock on a descriptor we own.
            let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the lock is still held 5 s after it was dropped"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
