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
//!
//! A lock file lives as long as its entry (or a sandbox's creation), so
//! `locks/` does not grow with every snapshot ever taken: it is created only
//! under store.lock (for an entry that exists, or a sandbox about to be
//! created), and unlinked under store.lock by whoever holds it exclusively
//! when the entry is removed (or its creation did not happen). Someone who
//! opened the file before it was unlinked gets the lock on a file nobody
//! else will see again; so every lock is checked, once held, to still be
//! the file at its path, and taken again otherwise ([`Lock`]). The sweep
//! also unlinks lock files of entries that are gone (left by a crash, or by
//! older versions, which never unlinked them).

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

    /// Exclusive lock on the set of names (creation, removal, reaping, and
    /// the creation and unlinking of lock files).
    pub fn lock_store(&self) -> Result<StoreLock> {
        let path = self.root.join("locks").join("store.lock");
        Lock::acquire(&path, true, || create_lock_file(&path)).map(|l| StoreLock { _held: l })
    }

    /// Exclusive lock on an existing sandbox, waiting for it;
    /// [`Error::NoSandbox`] (and no lock file made) when there is none. The
    /// caller must not hold the store lock.
    pub fn lock_sandbox(&self, name: &str) -> Result<Lock> {
        let path = self.lock_path(Kind::Sandbox, name)?;
        Lock::acquire(&path, true, || self.open_sandbox_lock(name, &path, false))
    }

    /// Exclusive lock on sandbox `name`, which the caller is about to create
    /// (it may exist meanwhile: check again once this is held). The caller
    /// must not hold the store lock.
    pub fn lock_new_sandbox(&self, name: &str) -> Result<Lock> {
        let path = self.lock_path(Kind::Sandbox, name)?;
        Lock::acquire(&path, true, || self.open_sandbox_lock(name, &path, true))
    }

    /// An existing sandbox's lock if nobody holds it (None when busy).
    pub fn try_lock_sandbox(&self, name: &str) -> Result<Option<Lock>> {
        let path = self.lock_path(Kind::Sandbox, name)?;
        Lock::try_acquire(&path, || self.open_sandbox_lock(name, &path, false))
    }

    /// Shared lock on a snapshot: it is being read (a sandbox is made from
    /// it). Taken under the store lock, so it never waits (removers hold a
    /// snapshot's lock only under that lock too) and the snapshot cannot be
    /// removed between being found and being locked.
    pub fn lock_snapshot_shared(&self, _store: &StoreLock, name: &str) -> Result<Lock> {
        let path = self.existing_snapshot_lock(name)?;
        Lock::acquire(&path, false, || create_lock_file(&path))
    }

    /// Exclusive lock on a snapshot if no reader holds it (None when busy),
    /// for removing it.
    pub fn try_lock_snapshot(&self, _store: &StoreLock, name: &str) -> Result<Option<Lock>> {
        let path = self.existing_snapshot_lock(name)?;
        Lock::try_acquire(&path, || create_lock_file(&path))
    }

    /// The lock file of an existing snapshot ([`Error::NoSnapshot`] else).
    fn existing_snapshot_lock(&self, name: &str) -> Result<PathBuf> {
        let path = self.lock_path(Kind::Snapshot, name)?;
        if !self.entry_exists(Kind::Snapshot, name) {
            return Err(Kind::Snapshot.not_found(name));
        }
        Ok(path)
    }

    /// Opens a sandbox's lock file. A missing one is created under the
    /// store lock, and only for a sandbox that exists or is being created
    /// (`creating`): removals unlink lock files under that lock, so none is
    /// made again for a sandbox just removed.
    fn open_sandbox_lock(&self, name: &str, path: &Path, creating: bool) -> Result<File> {
        if let Some(file) = open_lock_file(path)? {
            return Ok(file);
        }
        let _store = self.lock_store()?;
        if !creating && !self.entry_exists(Kind::Sandbox, name) {
            return Err(Kind::Sandbox.not_found(name));
        }
        create_lock_file(path)
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

    /// Whether entry `name` (a valid name) is there, as anything.
    fn entry_exists(&self, kind: Kind, name: &str) -> bool {
        self.root
            .join(kind.dir())
            .join(name)
            .symlink_metadata()
            .is_ok()
    }

    /// Fails unless `lock` is the exclusive lock of entry `name`.
    fn check_holder(&self, kind: Kind, name: &str, lock: &Lock) -> Result<()> {
        if lock.exclusive && lock.path == self.lock_path(kind, name)? {
            return Ok(());
        }
        Err(Error::Failed(format!(
            "removing {} {name}: its lock is not held",
            kind.what()
        )))
    }

    /// Unlinks the lock file of a sandbox whose creation did not happen
    /// (nothing is unlinked when the entry exists). Best effort: a file left
    /// behind is swept later.
    pub fn discard_lock(&self, kind: Kind, name: &str, _store: &StoreLock, lock: &Lock) {
        if self.entry_exists(kind, name) || self.check_holder(kind, name, lock).is_err() {
            return;
        }
        if let Err(e) = lock.unlink() {
            log::warn!("{e}");
        }
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

    /// Removes entry `name` and its files (see [`Store::take_entry`]).
    pub fn remove_entry(
        &self,
        kind: Kind,
        name: &str,
        store: &StoreLock,
        lock: &Lock,
    ) -> Result<()> {
        self.take_entry(kind, name, store, lock)?.delete()
    }

    /// Removes entry `name` at once: renames it away and unlinks its lock
    /// file, which `lock` (its exclusive lock, taken after the store lock
    /// `_store`) holds. Its files are deleted by [`Trash::delete`], which
    /// need not hold the store lock. `name` is the one asked for, never one
    /// read from a file.
    pub fn take_entry(
        &self,
        kind: Kind,
        name: &str,
        _store: &StoreLock,
        lock: &Lock,
    ) -> Result<Trash> {
        names::validate(kind.what(), name)?;
        self.check_holder(kind, name, lock)?;
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
        // The entry is gone; a lock file left by a failure here is swept.
        if let Err(e) = lock.unlink() {
            log::warn!("{e}");
        }
        Ok(Trash(trash))
    }

    /// Deletes hidden directories left by interrupted creations and
    /// removals whose process is gone, and unlinks lock files of entries
    /// that do not exist and that nobody holds; returns how many.
    pub fn sweep(&self, store: &StoreLock) -> usize {
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
        swept + self.sweep_locks(store)
    }

    /// Unlinks orphaned lock files. A sandbox's creator may hold one before
    /// its entry exists: held, it is left; not yet held (opened, not locked),
    /// the creator finds it unlinked once it has it and takes a new one.
    fn sweep_locks(&self, _store: &StoreLock) -> usize {
        let Ok(entries) = std::fs::read_dir(self.root.join("locks")) else {
            return 0;
        };
        let mut swept = 0;
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some((kind, name)) = lock_owner(&file_name) else {
                continue;
            };
            if self.entry_exists(kind, name) {
                continue;
            }
            let path = entry.path();
            let open = || open_lock_file(&path)?.ok_or_else(|| kind.not_found(name));
            if let Ok(Some(lock)) = Lock::try_acquire(&path, open) {
                if lock.unlink().is_ok() {
                    log::info!(
                        "removed {}, the lock of a {} gone",
                        path.display(),
                        kind.what()
                    );
                    swept += 1;
                }
            }
        }
        swept
    }
}

/// An entry renamed away by [`Store::take_entry`], to be deleted (by a later
/// sweep if this process ends first).
#[must_use = "the entry's files stay until deleted"]
#[derive(Debug)]
pub struct Trash(PathBuf);

impl Trash {
    /// Deletes the removed entry's files.
    pub fn delete(self) -> Result<()> {
        std::fs::remove_dir_all(&self.0).map_err(|e| Error::io("removing", &self.0, e))
    }
}

/// The entry whose lock file `file_name` is (`KIND-NAME.lock`).
fn lock_owner(file_name: &str) -> Option<(Kind, &str)> {
    let stem = file_name.strip_suffix(".lock")?;
    [Kind::Sandbox, Kind::Snapshot]
        .into_iter()
        .find_map(|kind| {
            let name = stem.strip_prefix(kind.what())?.strip_prefix('-')?;
            names::validate("", name).is_ok().then_some((kind, name))
        })
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

/// Refuses metadata that names another entry than the directory it was
/// read from (`sandboxes/a` copied or renamed by hand to `sandboxes/b`):
/// locks and removal go by the directory's name, so acting on it by the
/// name inside would touch the other entry.
pub fn check_entry_name(kind: Kind, dir_name: &str, meta_name: &str, meta: &Path) -> Result<()> {
    if meta_name == dir_name {
        return Ok(());
    }
    let what = kind.what();
    Err(Error::Corrupt {
        what: "reading",
        path: meta.to_path_buf(),
        reason: format!(
            "it is the metadata of {what} {meta_name:?}, not {dir_name:?}: its directory was \
             copied or renamed by hand; move it back or delete it"
        ),
    })
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
    file: File,
    path: PathBuf,
    exclusive: bool,
}

/// The store lock ([`Store::lock_store`]), asked for by what must run
/// under it.
#[derive(Debug)]
pub struct StoreLock {
    _held: Lock,
}

/// Opens an existing lock file (None when there is none).
fn open_lock_file(path: &Path) -> Result<Option<File>> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("opening lock", path, e)),
    }
}

/// Opens a lock file, creating it if missing (see [`Store`] for who may).
fn create_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("opening lock", path, e))
}

/// flock `op` on `file`, again after a signal; false when `LOCK_NB` found
/// it held.
fn flock(file: &File, op: libc::c_int, path: &Path) -> Result<bool> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => return Ok(false),
            _ => return Err(Error::io("locking", path, err)),
        }
    }
}

/// Whether `file` is (still) the file at `path`.
fn is_at(file: &File, path: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = file
        .metadata()
        .map_err(|e| Error::io("checking lock", path, e))?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("checking lock", path, e)),
    }
}

impl Lock {
    /// Waits for the lock on the file `open` gives. A lock won on a file
    /// that was unlinked meanwhile (its entry removed) excludes nobody: it
    /// is dropped and the file now at `path` locked instead (`open` decides
    /// whether one may be made).
    fn acquire(path: &Path, exclusive: bool, open: impl Fn() -> Result<File>) -> Result<Self> {
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            let file = open()?;
            flock(&file, op, path)?;
            if is_at(&file, path)? {
                return Ok(Lock {
                    file,
                    path: path.to_path_buf(),
                    exclusive,
                });
            }
        }
    }

    /// The exclusive lock if nobody holds it (None when busy); checked as
    /// in [`Lock::acquire`].
    fn try_acquire(path: &Path, open: impl Fn() -> Result<File>) -> Result<Option<Self>> {
        loop {
            let file = open()?;
            if !flock(&file, libc::LOCK_EX | libc::LOCK_NB, path)? {
                return Ok(None);
            }
            if is_at(&file, path)? {
                return Ok(Some(Lock {
                    file,
                    path: path.to_path_buf(),
                    exclusive: true,
                }));
            }
        }
    }

    /// Unlinks the held lock file (exclusive holders, under the store lock,
    /// once the entry is gone): whoever waits on it then finds it unlinked
    /// and locks the file at its path anew, if one may be made.
    fn unlink(&self) -> Result<()> {
        if !self.exclusive || !is_at(&self.file, &self.path)? {
            return Ok(());
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing lock", &self.path, e)),
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

    fn m(a: u32) -> M {
        M { a, s: "x".into() }
    }

    /// Removes an entry as the commands do (its lock, the store lock).
    pub fn remove(store: &Store, kind: Kind, name: &str) -> Result<()> {
        match kind {
            Kind::Sandbox => {
                let lock = store.lock_sandbox(name)?;
                let held = store.lock_store()?;
                store.remove_entry(kind, name, &held, &lock)
            }
            Kind::Snapshot => {
                let held = store.lock_store()?;
                let lock = store
                    .try_lock_snapshot(&held, name)?
                    .ok_or_else(|| Error::Invalid(format!("snapshot {name} is pinned")))?;
                store.remove_entry(kind, name, &held, &lock)
            }
        }
    }

    fn lock_files(t: &TempDir) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(t.0.join("locks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn locks_exclude_and_names_list() {
        let t = TempDir::new("store-lock");
        let store = Store::open(&t.0).unwrap();
        // No lock file for a sandbox that does not exist (unless being
        // created).
        assert!(matches!(
            store.lock_sandbox("dev"),
            Err(Error::NoSandbox(_))
        ));
        assert!(matches!(
            store.try_lock_sandbox("dev"),
            Err(Error::NoSandbox(_))
        ));
        assert!(lock_files(&t).iter().all(|f| f == "store.lock"));
        let held = store.lock_new_sandbox("dev").unwrap();
        store.create_entry(Kind::Sandbox, "dev", &m(1)).unwrap();
        store.create_entry(Kind::Sandbox, "other", &m(1)).unwrap();
        assert!(store.try_lock_sandbox("dev").unwrap().is_none());
        assert!(store.try_lock_sandbox("other").unwrap().is_some());
        drop(held);
        assert!(store.try_lock_sandbox("dev").unwrap().is_some());
        remove(&store, Kind::Sandbox, "dev").unwrap();
        remove(&store, Kind::Sandbox, "other").unwrap();

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
            assert_eq!(store.lock_new_sandbox(bad).unwrap_err().exit_code(), 1);
            let held = store.lock_store().unwrap();
            assert!(store.try_lock_snapshot(&held, bad).is_err());
        }
        assert!(!t.0.join("x.lock").exists() && !t.0.join("locks/sandbox-.lock").exists());
        // Readers share a snapshot; a remover cannot have it meanwhile.
        let held = store.lock_store().unwrap();
        assert!(matches!(
            store.lock_snapshot_shared(&held, "s"),
            Err(Error::NoSnapshot(_))
        ));
        store.create_entry(Kind::Snapshot, "s", &m(1)).unwrap();
        let r1 = store.lock_snapshot_shared(&held, "s").unwrap();
        let r2 = store.lock_snapshot_shared(&held, "s").unwrap();
        assert!(store.try_lock_snapshot(&held, "s").unwrap().is_none());
        // Only an exclusive holder removes.
        let e = store
            .remove_entry(Kind::Snapshot, "s", &held, &r1)
            .unwrap_err();
        assert!(e.to_string().contains("its lock is not held"), "{e}");
        drop((r1, r2));
        assert!(store.try_lock_snapshot(&held, "s").unwrap().is_some());
    }

    /// Removing an entry unlinks its lock file, so `locks/` holds files only
    /// for entries that exist.
    #[test]
    fn removals_leave_no_lock_files() {
        let t = TempDir::new("store-unlink");
        let store = Store::open(&t.0).unwrap();
        for i in 0..3 {
            let name = format!("s{i}");
            store.create_entry(Kind::Snapshot, &name, &m(i)).unwrap();
            let held = store.lock_store().unwrap();
            drop(store.lock_snapshot_shared(&held, &name).unwrap());
        }
        store.create_entry(Kind::Sandbox, "dev", &m(1)).unwrap();
        drop(store.lock_sandbox("dev").unwrap());
        assert_eq!(
            lock_files(&t),
            [
                "sandbox-dev.lock",
                "snapshot-s0.lock",
                "snapshot-s1.lock",
                "snapshot-s2.lock",
                "store.lock"
            ]
        );
        for i in 0..3 {
            remove(&store, Kind::Snapshot, &format!("s{i}")).unwrap();
        }
        remove(&store, Kind::Sandbox, "dev").unwrap();
        assert_eq!(lock_files(&t), ["store.lock"]);

        // A creation that did not happen leaves no lock file either; one
        // that did keeps its file.
        let lock = store.lock_new_sandbox("new").unwrap();
        let held = store.lock_store().unwrap();
        store.discard_lock(Kind::Sandbox, "new", &held, &lock);
        assert_eq!(lock_files(&t), ["store.lock"]);
        drop((held, lock));
        let lock = store.lock_new_sandbox("new").unwrap();
        store.create_entry(Kind::Sandbox, "new", &m(1)).unwrap();
        let held = store.lock_store().unwrap();
        store.discard_lock(Kind::Sandbox, "new", &held, &lock);
        assert_eq!(lock_files(&t), ["sandbox-new.lock", "store.lock"]);
    }

    /// A waiter that wins a lock file after it was unlinked does not keep
    /// that lock: it locks the file now at the path (when one may be made)
    /// so it never holds a lock beside someone holding a fresh file.
    #[test]
    fn a_lock_unlinked_while_waited_for_is_taken_again() {
        let t = TempDir::new("store-relock");
        let store = Store::open(&t.0).unwrap();
        let path = store.lock_path(Kind::Sandbox, "dev").unwrap();
        // A waiter that opened the file before `waiting` fires; `creating`
        // as for `lock_new_sandbox`.
        // It opens the file twice: the one unlinked, then the one at the path.
        let waiter = |creating: bool| {
            let (tx, waiting) = std::sync::mpsc::channel();
            let (store, path) = (store.clone(), path.clone());
            let handle = std::thread::spawn(move || {
                let opens = std::sync::atomic::AtomicU32::new(0);
                let got = Lock::acquire(&path, true, || {
                    opens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let f = store.open_sandbox_lock("dev", &path, creating);
                    let _ = tx.send(());
                    f
                });
                (got, opens.into_inner())
            });
            waiting.recv().unwrap();
            // Let it get to flock (a late one finds the file gone at once).
            std::thread::sleep(std::time::Duration::from_millis(50));
            handle
        };

        // The sandbox is removed meanwhile: the waiter finds no sandbox and
        // makes no lock file for it.
        store.create_entry(Kind::Sandbox, "dev", &m(1)).unwrap();
        let lock = store.lock_sandbox("dev").unwrap();
        let w = waiter(false);
        let held = store.lock_store().unwrap();
        store
            .remove_entry(Kind::Sandbox, "dev", &held, &lock)
            .unwrap();
        drop((held, lock));
        let (got, opens) = w.join().unwrap();
        assert!(matches!(got, Err(Error::NoSandbox(_))), "{got:?}");
        assert_eq!(opens, 2);
        assert!(!path.exists());

        // A creation did not happen: a waiter that creates the sandbox
        // locks a new file, and it is the one everybody else sees.
        let lock = store.lock_new_sandbox("dev").unwrap();
        let w = waiter(true);
        let held = store.lock_store().unwrap();
        store.discard_lock(Kind::Sandbox, "dev", &held, &lock);
        drop((held, lock));
        let (got, opens) = w.join().unwrap();
        let got = got.unwrap();
        assert_eq!(opens, 2);
        assert!(is_at(&got.file, &path).unwrap());
        assert!(Lock::try_acquire(&path, || create_lock_file(&path))
            .unwrap()
            .is_none());
        drop(got);
        assert!(Lock::try_acquire(&path, || create_lock_file(&path))
            .unwrap()
            .is_some());
    }

    /// The sweep unlinks lock files of entries that are gone (older
    /// versions never unlinked them), but not one a creator holds.
    #[test]
    fn sweep_unlinks_orphaned_lock_files() {
        let t = TempDir::new("store-sweep-locks");
        let store = Store::open(&t.0).unwrap();
        store.create_entry(Kind::Sandbox, "dev", &m(1)).unwrap();
        store.create_entry(Kind::Snapshot, "kept", &m(1)).unwrap();
        for f in [
            "sandbox-dev.lock",
            "sandbox-gone.lock",
            "snapshot-kept.lock",
            "snapshot-old-1.lock",
            "snapshot-Bad.lock",
            "notes.txt",
        ] {
            std::fs::write(t.0.join("locks").join(f), "").unwrap();
        }
        let creating = store.lock_new_sandbox("being-made").unwrap();
        let held = store.lock_store().unwrap();
        assert_eq!(store.sweep(&held), 2);
        assert_eq!(
            lock_files(&t),
            [
                "notes.txt",
                "sandbox-being-made.lock",
                "sandbox-dev.lock",
                "snapshot-Bad.lock",
                "snapshot-kept.lock",
                "store.lock"
            ]
        );
        drop(creating);
        assert_eq!(store.sweep(&held), 1);
        assert_eq!(lock_owner("sandbox-a-b.lock").map(|(_, n)| n), Some("a-b"));
        assert!(lock_owner("store.lock").is_none() && lock_owner("sandbox-.lock").is_none());
    }

    #[test]
    fn metadata_must_name_its_directory() {
        let p = Path::new("/s/sandboxes/b/meta.json");
        assert!(check_entry_name(Kind::Sandbox, "b", "b", p).is_ok());
        let e = check_entry_name(Kind::Sandbox, "b", "a", p).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            "reading /s/sandboxes/b/meta.json: it is the metadata of sandbox \"a\", not \"b\": \
             its directory was copied or renamed by hand; move it back or delete it"
        );
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
        remove(&store, Kind::Snapshot, "s").unwrap();
        assert!(listing("snapshots").is_empty());
        let e = remove(&store, Kind::Snapshot, "s").unwrap_err();
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
        assert_eq!(store.sweep(&store.lock_store().unwrap()), 2);
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
