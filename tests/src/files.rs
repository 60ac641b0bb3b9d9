//! Looking at files the VMM and guest write: waiting for console output, checksums, listings.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::tail;
use crate::vmm_process::VmmProcess;

/// How often waiting loops poll a file.
const POLL: Duration = Duration::from_millis(50);

/// The file's text, empty when it does not exist (yet).
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The file's length, 0 when it does not exist (yet).
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Waits until `path` (a console log) contains `needle`. Panics with the log's tail when `vm`
/// ends first or `timeout` passes.
pub fn wait_for_text(vm: &mut VmmProcess, path: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !read_lossy(path).contains(needle) {
        if let Some(st) = vm.try_wait() {
            panic!(
                "vmm {} ended ({st}) before {needle:?} appeared: {}\n{}",
                vm.name(),
                vm.stderr(),
                tail(&read_lossy(path), 20)
            );
        }
        assert!(
            Instant::now() < deadline,
            "vmm {}: no {needle:?} after {timeout:?}:\n{}",
            vm.name(),
            tail(&read_lossy(path), 20)
        );
        std::thread::sleep(POLL);
    }
}

/// Waits until `path` holds more than `len` bytes (the guest printed on). Panics when `vm` ends
/// first or `within` passes.
pub fn wait_for_growth(vm: &mut VmmProcess, path: &Path, len: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while file_len(path) <= len {
        vm.assert_alive("while the guest should run");
        assert!(
            Instant::now() < deadline,
            "vmm {}: the guest printed nothing in {within:?}:\n{}",
            vm.name(),
            tail(&read_lossy(path), 10)
        );
        std::thread::sleep(POLL);
    }
}

/// SHA-256 of a file as hex, by the system's `sha256sum` (no hashing crate for one use).
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The names in a directory, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Bytes at the end of every memory file naming its snapshot: "VMMMEMID", a 16-byte id, a
/// CRC64 of both.
pub const MEMORY_TRAILER_LEN: usize = 32;

/// Whether two memory files hold the same guest memory: the same bytes but for the trailers
/// that name their (different) snapshots, which both must have.
pub fn same_guest_memory(a: &Path, b: &Path) -> bool {
    let (da, db) = (
        fs::read(a).unwrap_or_else(|e| panic!("read {}: {e}", a.display())),
        fs::read(b).unwrap_or_else(|e| panic!("read {}: {e}", b.display())),
    );
    for (path, data) in [(a, &da), (b, &db)] {
        let at = data.len().saturating_sub(MEMORY_TRAILER_LEN);
        assert_eq!(
            data.get(at..at + 8),
            Some(&b"VMMMEMID"[..]),
            "{} has no snapshot id trailer",
            path.display()
        );
    }
    da.len() == db.len()
        && da[..da.len() - MEMORY_TRAILER_LEN] == db[..db.len() - MEMORY_TRAILER_LEN]
}

/// Whether two files have the same content.
pub fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    if fa.metadata().expect("stat").len() != fb.metadata().expect("stat").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).expect("read");
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}
