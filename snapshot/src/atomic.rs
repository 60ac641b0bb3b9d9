//! Crash-safe replacement of a file.
//!
//! The new content goes to a uniquely named temporary file in the target's
//! directory, is fsynced, and is renamed over the target; then the directory is
//! fsynced so the rename itself is durable. A process killed at any point
//! leaves either the previous file or the complete new one, never a mix. The
//! temporary file is removed when the writer fails (or panics); only a process
//! killed mid-write leaves one behind, named `.<target>.<pid>.<n>.tmp`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Snapshot files hold guest memory and device state: readable by the owner only.
const FILE_MODE: u32 = 0o600;

/// How many names to try before giving up on finding a free temporary name.
const TEMP_NAME_ATTEMPTS: u32 = 16;

/// Why an atomic write failed, outside of the caller's own writer.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    /// The target path has no file name (e.g. `/` or `..`).
    #[error("cannot write atomically to {path}: it does not name a file")]
    InvalidPath {
        /// The rejected path.
        path: PathBuf,
    },
    /// No temporary file could be created beside the target.
    #[error("cannot create a temporary file {path}: {source}")]
    CreateTemp {
        /// The temporary file's path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The written data could not be flushed to stable storage.
    #[error("cannot sync {path} to disk: {source}")]
    Sync {
        /// The temporary file's path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The complete temporary file could not replace the target.
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        /// The temporary file's path.
        from: PathBuf,
        /// The target path.
        to: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The target was replaced, but the directory entry may not be durable yet.
    #[error("replaced {path}, but cannot sync its directory: {source}")]
    SyncDir {
        /// The target path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl From<AtomicWriteError> for io::Error {
    fn from(err: AtomicWriteError) -> Self {
        let kind = match &err {
            AtomicWriteError::InvalidPath { .. } => io::ErrorKind::InvalidInput,
            AtomicWriteError::CreateTemp { source, .. }
            | AtomicWriteError::Sync { source, .. }
            | AtomicWriteError::Rename { source, .. }
            | AtomicWriteError::SyncDir { source, .. } => source.kind(),
        };
        io::Error::new(kind, err)
    }
}

/// Replaces `path` atomically with what `write` puts in the file it is
/// given: a temporary file in the same directory, synced, renamed over
/// `path`, then the directory synced. On any error (or a panic in `write`)
/// the temporary file is removed and `path` is untouched.
pub fn write_atomic<T, E, F>(path: &Path, write: F) -> Result<T, E>
where
    F: FnOnce(&mut File) -> Result<T, E>,
    E: From<AtomicWriteError>,
{
    let mut pending = PendingFile::create(path)?;
    let value = write(pending.file())?;
    pending.commit()?;
    Ok(value)
}

/// A replacement for a file that is being written, possibly over a long
/// time or from another thread: [`PendingFile::commit`] puts it in place
/// atomically; dropping it uncommitted removes it and leaves the target
/// untouched.
pub struct PendingFile {
    file: File,
    target: PathBuf,
    dir: PathBuf,
    temp: TempGuard,
}

impl PendingFile {
    /// Creates the temporary file beside `path`.
    pub fn create(path: &Path) -> Result<Self, AtomicWriteError> {
        let file_name = path
            .file_name()
            .ok_or_else(|| AtomicWriteError::InvalidPath {
                path: path.to_path_buf(),
            })?;
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (file, temp) = create_temp(&dir, file_name)?;
        Ok(Self {
            file,
            target: path.to_path_buf(),
            dir,
            temp,
        })
    }

    /// The file being written.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the file, renames it over the target and syncs the directory.
    pub fn commit(self) -> Result<(), AtomicWriteError> {
        self.file
            .sync_all()
            .map_err(|source| AtomicWriteError::Sync {
                path: self.temp.path.clone(),
                source,
            })?;
        drop(self.file);
        fs::rename(&self.temp.path, &self.target).map_err(|source| AtomicWriteError::Rename {
            from: self.temp.path.clone(),
            to: self.target.clone(),
            source,
        })?;
        self.temp.disarm();
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| AtomicWriteError::SyncDir {
                path: self.target.clone(),
                source,
            })
    }
}

/// Removes the temporary file on drop unless it was renamed into place.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl TempGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the write already failed and that error is what the
            // caller needs to see.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Creates a new file with a name no other writer (thread or process) uses.
fn create_temp(
    dir: &Path,
    file_name: &std::ffi::OsStr,
) -> Result<(File, TempGuard), AtomicWriteError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let mut attempt = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut name = OsString::from(".");
        name.push(file_name);
        name.push(format!(".{pid}.{n}.tmp"));
        let path = dir.join(name);
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
        {
            Ok(file) => return Ok((file, TempGuard { path, armed: true })),
            // A stale file from a killed process with a recycled pid.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < TEMP_NAME_ATTEMPTS => {
                attempt += 1;
            }
            Err(source) => return Err(AtomicWriteError::CreateTemp { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;
    use vmm_sys_util::tempdir::TempDir;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_content_and_leaves_no_temp() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        fs::write(&path, b"old").unwrap();
        write_atomic(&path, |f| f.write_all(b"new content")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        assert_eq!(entries(dir.as_path()), vec!["state".to_string()]);
    }

    #[test]
    fn creates_missing_target_and_returns_value() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("fresh");
        let n: usize = write_atomic(&path, |f| f.write_all(b"abc").map(|()| 3)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(fs::read(&path).unwrap(), b"abc");
    }

    #[test]
    fn writer_error_keeps_old_file_and_removes_temp() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        fs::write(&path, b"old").unwrap();
        let err = write_atomic(&path, |f| {
            f.write_all(b"partial")?;
            Err::<(), _>(io::Error::other("writer failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "writer failed");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.as_path()), vec!["state".to_string()]);
    }

    #[test]
    fn writer_panic_removes_temp() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        fs::write(&path, b"old").unwrap();
        let result = std::panic::catch_unwind(|| {
            let _ = write_atomic(&path, |f| -> io::Result<()> {
                f.write_all(b"partial")?;
                panic!("writer panicked");
            });
        });
        assert!(result.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.as_path()), vec!["state".to_string()]);
    }

    #[test]
    fn missing_directory_is_reported_with_path() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("nope").join("state");
        let err = write_atomic(&path, |f| f.write_all(b"x")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn rejects_path_without_file_name() {
        let err = write_atomic(Path::new("/"), |f| f.write_all(b"x")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    const CHILD_ENV: &str = "SNAPSHOT_ATOMIC_KILL_TEST_TARGET";

    /// Runs only as the child of `killed_writer_leaves_old_file`: starts an
    /// atomic write and hangs in the middle of it until killed.
    #[test]
    #[ignore = "helper process for killed_writer_leaves_old_file"]
    fn child_hangs_mid_write() {
        let Some(target) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let target = PathBuf::from(target);
        let _ = write_atomic(&target, |f| -> io::Result<()> {
            f.write_all(&vec![0xab; 1 << 20])?;
            f.sync_all()?;
            fs::write(target.with_extension("ready"), b"")?;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
    }

    #[test]
    fn killed_writer_leaves_old_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        fs::write(&path, b"old").unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "atomic::tests::child_hangs_mid_write",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let ready = path.with_extension("ready");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "child never got mid-write"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"old");
        // The killed writer's temporary file is the only leftover.
        let names = entries(dir.as_path());
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names
            .iter()
            .any(|n| n.starts_with(".state.") && n.ends_with(".tmp")));
    }
}
