//! A private temporary directory for snapshot files and serial logs,
//! removed when the harness ends (also after a failed scenario).

use std::path::{Path, PathBuf};

use crate::error::{BenchError, Result};

/// A directory removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `<parent>/vmm-bench-<pid>-<n>` (mode 0700 by umask default).
    pub fn new_in(parent: &Path) -> Result<Self> {
        let pid = std::process::id();
        for n in 0..1000u32 {
            let path = parent.join(format!("vmm-bench-{pid}-{n}"));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(BenchError::file("creating temp dir", &path)(e)),
            }
        }
        Err(BenchError::Setup(format!(
            "no free temp dir name under {}",
            parent.display()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory (for inspecting files after a run).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// A subdirectory, created if missing.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).map_err(BenchError::file("creating dir", &p))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_unless_kept() {
        let t = TempDir::new_in(&std::env::temp_dir()).unwrap();
        let p = t.path().to_path_buf();
        std::fs::write(t.subdir("a").unwrap().join("f"), b"x").unwrap();
        drop(t);
        assert!(!p.exists());

        let mut t = TempDir::new_in(&std::env::temp_dir()).unwrap();
        t.keep();
        let p = t.path().to_path_buf();
        drop(t);
        assert!(p.is_dir());
        std::fs::remove_dir_all(p).unwrap();
    }
}
