//! The state directory: where sandboxes and snapshots live, how their
//! metadata is written (atomically: temporary file, fsync, rename, fsync of
//! the directory) and how commands exclude each other (flock).
//!
//! ```text
//! STATE/config.json              optional defaults (see config.rs)
//! STATE/locks/store.lock         held while names are created or removed and by the reaper
//! STATE/locks/sandbox-NAME.lock  held while a sandbox changes (start, stop, snapshot)
//! STATE/sandboxes/NAME/          meta.json disk.ext4 api.sock vsock.sock serial.log vmm.log
//!                                history.log [vmstate memory (restored from a diff)]
//! STATE/snapshots/NAME/          meta.json vmstate memory disk [disk.map: disk holds only changed chunks]
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{Error, Result};
use super::names;

/// Metadata file name in a sandbox or snapshot directory.
pub const META_FILE: &str = "meta.json";

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// What the default state directory is: `$XDG_DATA_HOME/vmm`, else
/// `~/.local/share/vmm` (`VMM_STATE_DIR` and `--state-dir` override it).
pub fn default_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vmm");
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local").join("share").join("vmm")
}

impl Store {
    /// Opens (creating if needed) the state directory at `root`. The path is
    /// made absolute: sandboxes' VMM processes get paths inside it.
    pub fn open(root: &Path) -> Result<Self> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io("resolving", root, e))?
                .join(root)
        };
        for sub in ["sandboxes", "snapshots", "locks"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.root.join("sandboxes").join(name)
    }

    pub fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.root.join("snapshots").join(name)
    }

    /// Exclusive lock on the set of names (creation, removal, reaping).
    pub fn lock_store(&self) -> Result<Lock> {
        Lock::acquire(&self.root.join("locks").join("store.lock"), true)
    }

    /// Exclusive lock on one sandbox, waiting for it.
    pub fn lock_sandbox(&self, name: &str) -> Result<Lock> {
        Lock::acquire(&self.sandbox_lock_path(name), true)
    }

    /// The sandbox's lock if nobody holds it (None when busy).
    pub fn try_lock_sandbox(&self, name: &str) -> Result<Option<Lock>> {
        Lock::try_acquire(&self.sandbox_lock_path(name))
    }

    fn sandbox_lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("sandbox-{name}.lock"))
    }

    /// Names of the entries under `sandboxes/` or `snapshots/` that have
    /// metadata, sorted.
    pub fn names(&self, kind: Kind) -> Result<Vec<String>> {
        let dir = self.root.join(kind.dir());
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("listing", &dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", &dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if names::validate("", &name).is_ok() && entry.path().join(META_FILE).is_file() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Sandboxes or snapshots.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Sandbox,
    Snapshot,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Sandbox => "sandboxes",
            Kind::Snapshot => "snapshots",
        }
    }
}

/// Writes `value` as JSON to `path` so that readers see the old or the new
/// file, never a partial one, also across a crash.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{seq}", std::process::id()));
    let text = serde_json::to_vec_pretty(value).map_err(|e| Error::Corrupt {
        what: "encoding",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("writing", path, e)
    })
}

/// Reads a JSON file; a missing file is `Ok(None)`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| Error::Corrupt {
            what: "reading",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// An flock held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    fn open(path: &Path) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("opening lock", path, e))
    }

    fn acquire(path: &Path, exclusive: bool) -> Result<Self> {
        let file = Self::open(path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Lock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("locking", path, err));
            }
        }
    }

    fn try_acquire(path: &Path) -> Result<Option<Self>> {
        let file = Self::open(path)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(Lock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(Error::io("locking", path, err))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::Deserialize;

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "vmm-cli-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct M {
        a: u32,
        s: String,
    }

    #[test]
    fn atomic_json_round_trip_and_no_leftovers() {
        let t = TempDir::new("store");
        let p = t.0.join("meta.json");
        assert!(read_json::<M>(&p).unwrap().is_none());
        for i in 0..20 {
            write_json_atomic(
                &p,
                &M {
                    a: i,
                    s: "x".repeat(i as usize),
                },
            )
            .unwrap();
        }
        let m: M = read_json(&p).unwrap().unwrap();
        assert_eq!(
            m,
            M {
                a: 19,
                s: "x".repeat(19)
            }
        );
        let names: Vec<_> = std::fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["meta.json"], "temporary files left behind");
        std::fs::write(&p, "{\"a\":").unwrap();
        let e = read_json::<M>(&p).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
    }

    #[test]
    fn concurrent_writers_never_expose_partial_files() {
        let t = TempDir::new("store-race");
        let p = t.0.join("meta.json");
        write_json_atomic(
            &p,
            &M {
                a: 0,
                s: String::new(),
            },
        )
        .unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        write_json_atomic(
                            &p,
                            &M {
                                a: w * 100 + i,
                                s: "y".repeat(500),
                            },
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            let m: M = read_json(&p).unwrap().unwrap();
            assert!(m.s.is_empty() || m.s.len() == 500);
        }
        for w in writers {
            w.join().unwrap();
        }
    }

    #[test]
    fn locks_exclude_and_names_list() {
        let t = TempDir::new("store-lock");
        let store = Store::open(&t.0).unwrap();
        let held = store.lock_sandbox("dev").unwrap();
        assert!(store.try_lock_sandbox("dev").unwrap().is_none());
        assert!(store.try_lock_sandbox("other").unwrap().is_some());
        drop(held);
        assert!(store.try_lock_sandbox("dev").unwrap().is_some());

        for n in ["b", "a", "Bad_Name"] {
            let d = store.sandbox_dir(n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(META_FILE), "{}").unwrap();
        }
        std::fs::create_dir_all(store.sandbox_dir("nometa")).unwrap();
        assert_eq!(store.names(Kind::Sandbox).unwrap(), ["a", "b"]);
        assert!(store.names(Kind::Snapshot).unwrap().is_empty());
    }
}
