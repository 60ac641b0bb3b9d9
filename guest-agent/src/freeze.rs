//! Filesystem freeze/thaw (FIFREEZE/FITHAW) with a thaw watchdog.
//!
//! A guest must never stay frozen because the host died mid-snapshot, so every
//! freeze arms a watchdog thread that thaws on its own at the deadline, and the
//! agent thaws every block-backed filesystem when it starts. Nothing here
//! writes to disk; logging goes to stderr (the console).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::proto::{FreezeRequest, DEFAULT_FREEZE_TIMEOUT_MS, MAX_FREEZE_TIMEOUT_MS};

/// `_IOWR('X', 119, int)` from linux/fs.h.
const FIFREEZE: u32 = 0xC004_5877;
/// `_IOWR('X', 120, int)` from linux/fs.h.
const FITHAW: u32 = 0xC004_5878;

/// Pause between watchdog thaw attempts after a failure.
const WATCHDOG_RETRY: Duration = Duration::from_secs(1);

/// Freeze/thaw failures.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// A freeze is already in effect; thaw first.
    #[error("filesystems already frozen: {0:?}")]
    AlreadyFrozen(Vec<String>),
    /// No mountpoint qualifies (or an empty list was given).
    #[error("no filesystem to freeze")]
    NothingToFreeze,
    /// Mountpoints must be absolute paths.
    #[error("mountpoint {0:?} is not absolute")]
    NotAbsolute(String),
    /// Watchdog timeout of zero or above the maximum.
    #[error("freeze timeout {0} ms is outside 1..={MAX_FREEZE_TIMEOUT_MS} ms")]
    InvalidTimeout(u64),
    /// Reading `/proc/mounts` failed.
    #[error("reading /proc/mounts: {0}")]
    Mounts(io::Error),
    /// FIFREEZE failed; everything frozen before it was thawed again.
    #[error("freezing {mountpoint}: {source}")]
    Freeze {
        /// The mountpoint that failed.
        mountpoint: String,
        /// Underlying error (EBUSY: already frozen by someone else;
        /// EOPNOTSUPP: the filesystem cannot freeze).
        source: io::Error,
    },
    /// FITHAW failed for some mountpoints; they stay recorded as frozen and
    /// the watchdog retries.
    #[error("thaw failed: {0}")]
    Thaw(String),
}

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount source, e.g. `/dev/vda`.
    pub source: String,
    /// Where it is mounted (octal escapes decoded).
    pub mountpoint: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Decodes the `\ooo` octal escapes the kernel uses for space, tab, newline
/// and backslash in `/proc/mounts`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/mounts` text; malformed lines are skipped.
pub fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let source = f.next()?;
            let mountpoint = f.next()?;
            let fstype = f.next()?;
            let options = f.next()?;
            Some(MountEntry {
                source: unescape(source),
                mountpoint: unescape(mountpoint),
                fstype: fstype.to_string(),
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Block-backed mounts as reachable by path: when several mounts share a
/// mountpoint only the last (topmost) is visible, and a block device mounted
/// twice (bind mounts) appears once, at its first mountpoint.
fn visible_block_mounts(text: &str) -> Vec<MountEntry> {
    let all = parse_mounts(text);
    let mut visible: Vec<MountEntry> = Vec::new();
    for (i, m) in all.iter().enumerate() {
        let shadowed = all[i + 1..].iter().any(|n| n.mountpoint == m.mountpoint);
        if shadowed || !m.source.starts_with("/dev/") {
            continue;
        }
        if visible.iter().any(|v| v.source == m.source) {
            continue;
        }
        visible.push(m.clone());
    }
    visible
}

/// Mountpoints a default `freeze` acts on: visible, block-backed, writable.
pub fn freeze_candidates(proc_mounts: &str) -> Vec<String> {
    visible_block_mounts(proc_mounts)
        .into_iter()
        .filter(|m| !m.options.iter().any(|o| o == "ro"))
        .map(|m| m.mountpoint)
        .collect()
}

/// Mountpoints a recovery thaw tries: every visible block-backed mount,
/// read-only ones included (one may have been remounted while frozen).
pub fn thaw_candidates(proc_mounts: &str) -> Vec<String> {
    visible_block_mounts(proc_mounts)
        .into_iter()
        .map(|m| m.mountpoint)
        .collect()
}

/// The filesystem operations the controller needs; real ioctls in the guest,
/// a recording fake in tests.
pub trait FsOps: Send + Sync {
    /// Contents of `/proc/mounts`.
    fn mounts(&self) -> io::Result<String>;
    /// Freezes the filesystem mounted at `mountpoint`.
    fn freeze(&self, mountpoint: &str) -> io::Result<()>;
    /// Thaws it; EINVAL means it was not frozen.
    fn thaw(&self, mountpoint: &str) -> io::Result<()>;
}

/// FIFREEZE/FITHAW on the real system.
pub struct SystemFs;

fn fs_ioctl(mountpoint: &str, request: u32) -> io::Result<()> {
    // O_RDONLY on a directory: opening for read writes nothing, even on a
    // frozen filesystem.
    let dir = File::open(Path::new(mountpoint))?;
    // SAFETY: the fd is open for the duration of the call; FIFREEZE/FITHAW
    // take an int argument that the kernel ignores, so passing 0 touches no
    // memory of ours.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as libc::Ioctl, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl FsOps for SystemFs {
    fn mounts(&self) -> io::Result<String> {
        std::fs::read_to_string("/proc/mounts")
    }

    fn freeze(&self, mountpoint: &str) -> io::Result<()> {
        fs_ioctl(mountpoint, FIFREEZE)
    }

    fn thaw(&self, mountpoint: &str) -> io::Result<()> {
        fs_ioctl(mountpoint, FITHAW)
    }
}

fn not_frozen(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

#[derive(Default)]
struct State {
    /// What we froze, in freeze order.
    frozen: Vec<String>,
    /// Bumped by every freeze and complete thaw; a watchdog only acts on the
    /// generation it was armed for.
    generation: u64,
}

struct Inner {
    ops: Box<dyn FsOps>,
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent
        // (plain assignments), so keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Thaws the recorded set in reverse order; failures stay recorded.
    fn thaw_recorded(&self, st: &mut State) -> Result<Vec<String>, FreezeError> {
        let mut thawed = Vec::new();
        let mut failed = Vec::new();
        let mut messages = Vec::new();
        for mp in st.frozen.iter().rev() {
            match self.ops.thaw(mp) {
                Ok(()) => thawed.push(mp.clone()),
                Err(e) if not_frozen(&e) => thawed.push(mp.clone()),
                Err(e) => {
                    messages.push(format!("{mp}: {e}"));
                    failed.push(mp.clone());
                }
            }
        }
        failed.reverse();
        st.frozen = failed;
        if st.frozen.is_empty() {
            st.generation += 1;
            self.changed.notify_all();
        }
        if messages.is_empty() {
            Ok(thawed)
        } else {
            Err(FreezeError::Thaw(messages.join("; ")))
        }
    }
}

/// Tracks what the agent froze and thaws it on request or at the deadline.
pub struct FreezeController {
    inner: Arc<Inner>,
}

impl FreezeController {
    /// A controller acting on the real system.
    pub fn system() -> Self {
        Self::new(Box::new(SystemFs))
    }

    /// A controller over the given filesystem operations.
    pub fn new(ops: Box<dyn FsOps>) -> Self {
        Self {
            inner: Arc::new(Inner {
                ops,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// True while a freeze is in effect.
    pub fn is_frozen(&self) -> bool {
        !self.inner.lock().frozen.is_empty()
    }

    /// Freezes the requested (or default) mountpoints and arms the watchdog.
    /// On failure, whatever was frozen is thawed again.
    pub fn freeze(&self, req: &FreezeRequest) -> Result<Vec<String>, FreezeError> {
        let timeout_ms = req.timeout_ms.unwrap_or(DEFAULT_FREEZE_TIMEOUT_MS);
        if timeout_ms == 0 || timeout_ms > MAX_FREEZE_TIMEOUT_MS {
            return Err(FreezeError::InvalidTimeout(timeout_ms));
        }
        let mut st = self.inner.lock();
        if !st.frozen.is_empty() {
            return Err(FreezeError::AlreadyFrozen(st.frozen.clone()));
        }
        let targets = match &req.mountpoints {
            Some(list) => {
                let mut out: Vec<String> = Vec::new();
                for mp in list {
                    if !Path::new(mp).is_absolute() {
                        return Err(FreezeError::NotAbsolute(mp.clone()));
                    }
                    if !out.contains(mp) {
                        out.push(mp.clone());
                    }
                }
                out
            }
            None => freeze_candidates(&self.inner.ops.mounts().map_err(FreezeError::Mounts)?),
        };
        if targets.is_empty() {
            return Err(FreezeError::NothingToFreeze);
        }
        for (i, mp) in targets.iter().enumerate() {
            if let Err(source) = self.inner.ops.freeze(mp) {
                for done in targets[..i].iter().rev() {
                    if let Err(e) = self.inner.ops.thaw(done) {
                        eprintln!("vmm-agent: rollback thaw of {done} failed: {e}");
                    }
                }
                return Err(FreezeError::Freeze {
                    mountpoint: mp.clone(),
                    source,
                });
            }
        }
        st.frozen = targets.clone();
        st.generation += 1;
        let generation = st.generation;
        drop(st);
        self.arm_watchdog(generation, Duration::from_millis(timeout_ms));
        Ok(targets)
    }

    fn arm_watchdog(&self, generation: u64, timeout: Duration) {
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("freeze-watchdog".into())
            .spawn(move || watchdog(&inner, generation, timeout));
        if let Err(e) = spawned {
            // Without a watchdog the guest could stay frozen: refuse instead.
            eprintln!("vmm-agent: cannot start freeze watchdog ({e}); thawing now");
            let mut st = self.inner.lock();
            if let Err(e) = self.inner.thaw_recorded(&mut st) {
                eprintln!("vmm-agent: {e}");
            }
        }
    }

    /// Thaws what this agent froze; if nothing is recorded, tries every
    /// block-backed filesystem (ignoring ones that were not frozen) so a
    /// freeze left by a dead agent can be undone. Returns what was thawed.
    pub fn thaw(&self) -> Result<Vec<String>, FreezeError> {
        let mut st = self.inner.lock();
        if !st.frozen.is_empty() {
            return self.inner.thaw_recorded(&mut st);
        }
        drop(st);
        self.thaw_all()
    }

    /// Thaws every block-backed filesystem; EINVAL (not frozen) is ignored,
    /// other failures are logged. Used at startup.
    pub fn thaw_all(&self) -> Result<Vec<String>, FreezeError> {
        let mounts = self.inner.ops.mounts().map_err(FreezeError::Mounts)?;
        let mut thawed = Vec::new();
        for mp in thaw_candidates(&mounts) {
            match self.inner.ops.thaw(&mp) {
                Ok(()) => thawed.push(mp),
                Err(e) if not_frozen(&e) => {}
                Err(e) => eprintln!("vmm-agent: thaw {mp}: {e}"),
            }
        }
        Ok(thawed)
    }
}

/// Sleeps until the deadline unless the freeze it guards ended; then thaws.
fn watchdog(inner: &Inner, generation: u64, timeout: Duration) {
    let deadline = Instant::now().checked_add(timeout);
    let mut st = inner.lock();
    loop {
        if st.generation != generation || st.frozen.is_empty() {
            return;
        }
        let now = Instant::now();
        let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
        if left.is_zero() {
            break;
        }
        st = match inner.changed.wait_timeout(st, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
    eprintln!(
        "vmm-agent: freeze watchdog fired after {} ms, thawing {:?}",
        timeout.as_millis(),
        st.frozen
    );
    // Keep trying until thawed or someone else ends this freeze.
    while st.generation == generation && !st.frozen.is_empty() {
        match inner.thaw_recorded(&mut st) {
            Ok(_) => return,
            Err(e) => eprintln!("vmm-agent: watchdog {e}; retrying"),
        }
        st = match inner.changed.wait_timeout(st, WATCHDOG_RETRY) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
}

#[cfg(test)]
#[path = "freeze_tests.rs"]
mod tests;
