//! The state directory: where sandboxes and snapshots live, how their
//! metadata is written (atomically: temporary file, fsync, rename, fsync of
//! the directory) and how commands exclude each other (flock).
//!
//! ```text
//! STATE/config.json              optional defaults (see config.rs)
//! STATE/locks/store.lock         held while names are created or removed and by the reaper
//! STATE/locks/sandbox-NAME.lock  held while a sandbox changes (create, start, stop, snapshot)
//! STATE/locks/snapshot-NAME.lock shared while a sandbox is made from the snapshot (or a diff
//!                                built on it), exclusive (under store.lock) to remove it
//! STATE/sandboxes/NAME/          meta.json disk.ext4 api.sock vsock.sock serial.log vmm.log
//!                                history.log [vmstate memory (restored from a diff)]
//! STATE/snapshots/NAME/          meta.json vmstate memory disk [disk.map: disk holds only changed chunks]
//! STATE/{sandboxes,snapshots}/.new-NAME-PID-N, .rm-NAME-PID-N   being created / removed
//! ```
//!
//! An entry (sandbox or snapshot directory) always has its meta.json: it is
//! prepared under a hidden name and renamed into place, and removed by being
//! renamed away first. An interruption leaves only a hidden directory, which
//! [`Store::sweep`] deletes once its process is gone.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{Error, Result};
use super::names;
use super::process;

/// Metadata file name in a sandbox or snapshot directory.
pub const META_FILE: &str = "meta.json";

/// Prefixes of hidden directories beside the entries: one being created and
/// one being removed (never valid names, so never listed).
const STAGING_PREFIX: &str = ".new-";
const TRASH_PREFIX: &str = ".rm-";

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

    /// The directory holding all sandboxes or all snapshots.
    pub fn entries_dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir())
    }

    /// Exclusive lock on the set of names (creation, removal, reaping).
    pub fn lock_store(&self) -> Result<Lock> {
        Lock::acquire(&self.root.join("locks").join("store.lock"), true)
    }

    /// Exclusive lock on one sandbox, waiting for it.
    pub fn lock_sandbox(&self, name: &str) -> Result<Lock> {
        Lock::acquire(&self.lock_path(Kind::Sandbox, name)?, true)
    }

    /// The sandbox's lock if nobody holds it (None when busy).
    pub fn try_lock_sandbox(&self, name: &str) -> Result<Option<Lock>> {
        Lock::try_acquire(&self.lock_path(Kind::Sandbox, name)?)
    }

    /// Shared lock on a snapshot: it is being read (a sandbox is made from
    /// it); take it under [`Store::lock_store`] after checking it exists.
    pub fn lock_snapshot_shared(&self, name: &str) -> Result<Lock> {
        Lock::acquire(&self.lock_path(Kind::Snapshot, name)?, false)
    }

    /// Exclusive lock on a snapshot if no reader holds it (None when busy),
    /// for removing it; take it under [`Store::lock_store`].
    pub fn try_lock_snapshot(&self, name: &str) -> Result<Option<Lock>> {
        Lock::try_acquire(&self.lock_path(Kind::Snapshot, name)?)
    }

    /// The lock file of an entry; the name is checked so no lock file is
    /// made outside `locks/`.
    fn lock_path(&self, kind: Kind, name: &str) -> Result<PathBuf> {
        names::validate(kind.what(), name)?;
        Ok(self
            .root
            .join("locks")
            .join(format!("{}-{name}.lock", kind.what())))
    }

    /// Names of the entries under `sandboxes/` or `snapshots/`, sorted
    /// (with or without metadata: a directory left without it by an older
    /// version is listed so it can be seen and removed).
    pub fn names(&self, kind: Kind) -> Result<Vec<String>> {
        let dir = self.root.join(kind.dir());
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("listing", &dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", &dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if names::validate("", &name).is_ok() && entry.path().is_dir() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Creates entry `name` with `meta` as its meta.json, all at once (see
    /// the module doc); returns its directory. A taken name is
    /// [`Error::Exists`].
    pub fn create_entry<T: Serialize>(&self, kind: Kind, name: &str, meta: &T) -> Result<PathBuf> {
        names::validate(kind.what(), name)?;
        let parent = self.root.join(kind.dir());
        let dir = parent.join(name);
        let exists = || Error::Exists {
            what: kind.what(),
            name: name.to_string(),
        };
        if dir.symlink_metadata().is_ok() {
            return Err(exists());
        }
        let staging = parent.join(hidden_name(STAGING_PREFIX, name));
        std::fs::create_dir(&staging).map_err(|e| Error::io("creating", &staging, e))?;
        let placed = write_json_atomic(&staging.join(META_FILE), meta).and_then(|()| {
            // Renaming onto an empty directory replaces it; anything else
            // in the way fails.
            std::fs::rename(&staging, &dir).map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR) => exists(),
                _ => Error::io("creating", &dir, e),
            })?;
            sync_dir(&parent)
        });
        if let Err(e) = placed {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        Ok(dir)
    }

    /// Removes entry `name` and its files: renamed away first, so it
    /// disappears at once, then deleted.
    pub fn remove_entry(&self, kind: Kind, name: &str) -> Result<()> {
        names::validate(kind.what(), name)?;
        let parent = self.root.join(kind.dir());
        let dir = parent.join(name);
        let trash = parent.join(hidden_name(TRASH_PREFIX, name));
        std::fs::rename(&dir, &trash).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                kind.not_found(name)
            } else {
                Error::io("removing", &dir, e)
            }
        })?;
        let _ = sync_dir(&parent);
        std::fs::remove_dir_all(&trash).map_err(|e| Error::io("removing", &trash, e))
    }

    /// Deletes hidden directories left by interrupted creations and
    /// removals whose process is gone; returns how many.
    pub fn sweep(&self) -> usize {
        let mut swept = 0;
        for kind in [Kind::Sandbox, Kind::Snapshot] {
            let Ok(entries) = std::fs::read_dir(self.root.join(kind.dir())) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = hidden_owner(&name) else {
                    continue;
                };
                if !process::alive(pid, &[]) && std::fs::remove_dir_all(entry.path()).is_ok() {
                    log::info!("removed {} left by process {pid}", entry.path().display());
                    swept += 1;
                }
            }
        }
        swept
    }
}

/// `PREFIX NAME-PID-N`: unique per process and call.
fn hidden_name(prefix: &str, name: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{name}-{}-{seq}", std::process::id())
}

/// The process that made hidden directory `name`, if it is one.
fn hidden_owner(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(STAGING_PREFIX)
        .or_else(|| name.strip_prefix(TRASH_PREFIX))?;
    let mut parts = rest.rsplitn(3, '-');
    let _seq: u64 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|n| !n.is_empty())?;
    Some(pid)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing", dir, e))
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

    pub fn what(self) -> &'static str {
        match self {
            Kind::Sandbox => "sandbox",
            Kind::Snapshot => "snapshot",
        }
    }

    pub fn not_found(self, name: &str) -> Error {
        match self {
            Kind::Sandbox => Error::NoSandbox(name.to_string()),
            Kind::Snapshot => Error::NoSnapshot(name.to_string()),
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
        // A directory without metadata (an older version's interrupted
        // creation) is listed so it can be seen and removed; hidden ones are not.
        std::fs::create_dir_all(store.sandbox_dir("nometa")).unwrap();
        std::fs::create_dir_all(store.sandbox_dir(".new-x-1-0")).unwrap();
        assert_eq!(store.names(Kind::Sandbox).unwrap(), ["a", "b", "nometa"]);
        assert!(store.names(Kind::Snapshot).unwrap().is_empty());

        // No lock file outside locks/, and none for a bad name.
        for bad in ["../x", "", "A"] {
            assert_eq!(store.lock_sandbox(bad).unwrap_err().exit_code(), 1);
            assert!(store.try_lock_snapshot(bad).is_err());
        }
        assert!(!t.0.join("x.lock").exists() && !t.0.join("locks/sandbox-.lock").exists());
        // Readers share a snapshot; a remover cannot have it meanwhile.
        let r1 = store.lock_snapshot_shared("s").unwrap();
        let r2 = store.lock_snapshot_shared("s").unwrap();
        assert!(store.try_lock_snapshot("s").unwrap().is_none());
        drop((r1, r2));
        assert!(store.try_lock_snapshot("s").unwrap().is_some());
    }

    #[test]
    fn entries_appear_and_vanish_whole() {
        let t = TempDir::new("store-entries");
        let store = Store::open(&t.0).unwrap();
        let m = M {
            a: 1,
            s: "x".into(),
        };
        let dir = store.create_entry(Kind::Snapshot, "s", &m).unwrap();
        assert_eq!(dir, store.snapshot_dir("s"));
        assert_eq!(read_json::<M>(&dir.join(META_FILE)).unwrap(), Some(m));
        let e = store
            .create_entry(
                Kind::Snapshot,
                "s",
                &M {
                    a: 2,
                    s: "y".into(),
                },
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "snapshot s already exists");
        assert_eq!(read_json::<M>(&dir.join(META_FILE)).unwrap().unwrap().a, 1);
        assert!(store
            .create_entry(
                Kind::Sandbox,
                "../s",
                &M {
                    a: 3,
                    s: "z".into()
                }
            )
            .is_err());
        // Only the entry is there: no staging directory left behind.
        let listing = |k: &str| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(t.0.join(k))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(listing("snapshots"), ["s"]);
        assert!(listing("sandboxes").is_empty());

        std::fs::write(dir.join("memory"), "m").unwrap();
        store.remove_entry(Kind::Snapshot, "s").unwrap();
        assert!(listing("snapshots").is_empty());
        let e = store.remove_entry(Kind::Snapshot, "s").unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");

        // What interrupted processes left is swept once they are gone.
        let dead = u32::MAX;
        let live = std::process::id();
        for n in [
            format!(".new-a-b-{dead}-0"),
            format!(".rm-c-{dead}-7"),
            format!(".new-d-{live}-1"),
            ".other".to_string(),
        ] {
            std::fs::create_dir_all(t.0.join("sandboxes").join(n).join("sub")).unwrap();
        }
        assert_eq!(store.sweep(), 2);
        assert_eq!(
            listing("sandboxes"),
            [
                ".new-d-".to_string() + &live.to_string() + "-1",
                ".other".into()
            ]
        );
        assert_eq!(hidden_owner(".new-a-b-12-3"), Some(12));
        assert_eq!(hidden_owner(".new--12-3"), None);
        assert_eq!(hidden_owner("a-12-3"), None);
    }
}
