//! `read_file` and atomic `write_file`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::MAX_READ_FILE;

/// File operation failures, each naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Paths must be absolute: the agent's working directory is not the
    /// caller's business.
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    /// The file is bigger than the caller's (or the protocol's) limit.
    #[error("{path}: file is larger than the limit of {max} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit.
        max: u64,
    },
    /// Mode bits outside 0o7777.
    #[error("invalid file mode {0:#o}")]
    InvalidMode(u32),
    /// A system call failed.
    #[error("{path}: {context}: {source}")]
    Io {
        /// The file or directory involved.
        path: String,
        /// What was being done.
        context: &'static str,
        /// Underlying error.
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, context: &'static str) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        path: path.display().to_string(),
        context,
        source,
    }
}

fn absolute(path: &str) -> Result<&Path, FileError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(FileError::NotAbsolute(path.to_string()))
    }
}

/// Reads the whole file, failing if it exceeds `max_bytes` (default and cap
/// [`MAX_READ_FILE`]). Works for files that report size 0, such as `/proc`.
pub fn read_file(path: &str, max_bytes: Option<u64>) -> Result<Vec<u8>, FileError> {
    let p = absolute(path)?;
    let max = max_bytes.unwrap_or(MAX_READ_FILE).min(MAX_READ_FILE);
    let f = File::open(p).map_err(io_err(p, "open"))?;
    let mut data = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io_err(p, "read"))?;
    if data.len() as u64 > max {
        return Err(FileError::TooLarge {
            path: path.to_string(),
            max,
        });
    }
    Ok(data)
}

/// Distinguishes temp files of concurrent writes from this process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temp file unless the rename happened.
struct TempGuard {
    path: Option<PathBuf>,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Replaces `path` atomically: write a temp file in the same directory, fsync
/// it, rename it over the target, fsync the directory. Readers see either the
/// old or the new contents, and after success the new contents are durable.
pub fn write_file(path: &str, data: &[u8], mode: u32) -> Result<u64, FileError> {
    let p = absolute(path)?;
    if mode > 0o7777 {
        return Err(FileError::InvalidMode(mode));
    }
    let name = p
        .file_name()
        .ok_or_else(|| FileError::Io {
            path: path.to_string(),
            context: "path has no file name",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?
        .to_string_lossy()
        .into_owned();
    // An absolute path with a file name always has a parent.
    let dir = p.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(
        ".{name}.vmm-agent.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp, "create temp file"))?;
    let mut guard = TempGuard {
        path: Some(tmp.clone()),
    };
    // The umask may have masked bits off at creation.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp, "chmod temp file"))?;
    f.write_all(data).map_err(io_err(&tmp, "write temp file"))?;
    f.sync_all().map_err(io_err(&tmp, "fsync temp file"))?;
    drop(f);
    fs::rename(&tmp, p).map_err(io_err(p, "rename temp file over target"))?;
    guard.path = None;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))?;
    Ok(data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "guest-agent-files-{tag}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_then_read_back_with_mode_and_no_leftovers() {
        let dir = scratch_dir("rw");
        let target = dir.join("f.txt");
        let t = target.to_str().unwrap();
        assert_eq!(write_file(t, b"first", 0o600).unwrap(), 5);
        assert_eq!(read_file(t, None).unwrap(), b"first");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        write_file(t, b"second, longer", 0o755).unwrap();
        assert_eq!(read_file(t, None).unwrap(), b"second, longer");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let entries: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "temp file left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_limits_and_errors() {
        let dir = scratch_dir("lim");
        let target = dir.join("big");
        fs::write(&target, vec![0u8; 100]).unwrap();
        let t = target.to_str().unwrap();
        assert_eq!(read_file(t, Some(100)).unwrap().len(), 100);
        assert!(matches!(
            read_file(t, Some(99)),
            Err(FileError::TooLarge { max: 99, .. })
        ));
        assert!(matches!(
            read_file("relative/path", None),
            Err(FileError::NotAbsolute(_))
        ));
        let missing = dir.join("missing");
        match read_file(missing.to_str().unwrap(), None) {
            Err(FileError::Io { path, source, .. }) => {
                assert!(path.ends_with("missing"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Size-0 pseudo files are read fully.
        assert!(!read_file("/proc/self/status", None).unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_errors() {
        let dir = scratch_dir("werr");
        let in_missing_dir = dir.join("nodir").join("f");
        assert!(matches!(
            write_file(in_missing_dir.to_str().unwrap(), b"x", 0o644),
            Err(FileError::Io { .. })
        ));
        assert!(matches!(
            write_file(dir.join("f").to_str().unwrap(), b"x", 0o17777),
            Err(FileError::InvalidMode(_))
        ));
        assert!(matches!(
            write_file("rel", b"x", 0o644),
            Err(FileError::NotAbsolute(_))
        ));
        // Renaming over a directory fails and leaves no temp file.
        let sub = dir.join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("keep"), b"").unwrap();
        assert!(write_file(sub.to_str().unwrap(), b"x", 0o644).is_err());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
