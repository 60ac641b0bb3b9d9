//! Editing a snapshot's memory file: giving a guest more real data than it has written, so that
//! a later snapshot of it is large (slow to write, or too big for a small filesystem).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::Value;

/// Guest page size.
const PAGE: usize = 4096;

/// (file offset, size) of the largest memory region in a state payload.
pub fn largest_region(payload: &Value) -> (u64, u64) {
    let regions = &payload["memory_layout"]["regions"];
    let r = regions
        .as_array()
        .and_then(|r| r.iter().max_by_key(|r| r["size"].as_u64()))
        .unwrap_or_else(|| panic!("no memory region in {regions}"));
    let field = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("region without {k}: {r}"))
    };
    (field("file_offset"), field("size"))
}

/// Writes a non-zero pattern (tagged by page index) into all-zero pages of `[from, to)` of
/// `path`, until `limit` bytes were written. Pages the guest never wrote are zero, and a kernel
/// must not rely on the content of memory it has not initialised, so the guest still runs.
/// Returns the bytes written.
pub fn fill_zero_pages(path: &Path, from: u64, to: u64, limit: u64) -> u64 {
    const CHUNK: usize = 1 << 20;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut off = from;
    while off < to && written < limit {
        let n = CHUNK.min((to - off) as usize);
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.read_exact(&mut buf[..n]).expect("read memory file");
        let mut changed = false;
        for (i, page) in buf[..n].chunks_mut(PAGE).enumerate() {
            if written >= limit {
                break;
            }
            if page.iter().all(|&b| b == 0) {
                let tag = (off / PAGE as u64 + i as u64).to_le_bytes();
                for (j, b) in page.iter_mut().enumerate() {
                    *b = tag[j % 8] ^ 0xA5;
                }
                changed = true;
                written += page.len() as u64;
            }
        }
        if changed {
            f.seek(SeekFrom::Start(off)).expect("seek");
            f.write_all(&buf[..n]).expect("write memory file");
        }
        off += n as u64;
    }
    f.sync_all().expect("sync memory file");
    written
}
