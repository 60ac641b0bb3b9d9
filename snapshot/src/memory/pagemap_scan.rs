//! Which pages of a host range are present (or swapped out), as a bitmap:
//! with the `PAGEMAP_SCAN` ioctl (Linux 6.7+), which reports runs of such
//! pages, or by reading one `/proc/self/pagemap` entry per page on older
//! kernels. The live snapshot's freeze does this inside the pause, where
//! the ioctl is several times cheaper than reading 8 bytes per page.

use std::io;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::full::{Pagemap, PM_PRESENT, PM_SWAPPED};
use super::{MemoryError, PAGE_SIZE};

/// `PAGE_IS_PRESENT` and `PAGE_IS_SWAPPED` from `<linux/fs.h>`.
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Runs reported per ioctl.
const SCAN_RUNS: usize = 1024;
/// Pagemap entries read at once when the ioctl is missing (512 KiB).
const READ_PAGES: u64 = 1 << 16;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

ioctl_iowr_nr!(PAGEMAP_SCAN, b'f' as u32, 16, PmScanArg);

/// One bit per page of the `pages` pages from `host_addr` (page aligned):
/// set when the page is present in RAM or swapped out.
pub(crate) fn present_bits(
    pagemap: &Pagemap,
    host_addr: u64,
    pages: u64,
) -> Result<Vec<u64>, MemoryError> {
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    match scan(pagemap, host_addr, pages, &mut bits) {
        Ok(()) => return Ok(bits),
        // No such ioctl (before 6.7): read the entries instead.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            bits.fill(0);
        }
        Err(source) => return Err(MemoryError::Pagemap { host_addr, source }),
    }
    read(pagemap, host_addr, pages, &mut bits)?;
    Ok(bits)
}

/// Sets the bits of pages `first..first + len` (clamped to `bits`).
fn set_run(bits: &mut [u64], first: u64, len: u64) {
    let end = (first.saturating_add(len)).min(bits.len() as u64 * 64);
    let mut page = first;
    while page < end {
        let word = (page / 64) as usize;
        let bit = page % 64;
        let n = (64 - bit).min(end - page);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        bits[word] |= mask;
        page += n;
    }
}

fn scan(pagemap: &Pagemap, host_addr: u64, pages: u64, bits: &mut [u64]) -> io::Result<()> {
    let end = host_addr + pages * PAGE_SIZE;
    let mut runs = vec![PageRegion::default(); SCAN_RUNS];
    let mut start = host_addr;
    while start < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: runs.as_mut_ptr() as u64,
            vec_len: runs.len() as u64,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg; `vec` points to `vec_len`
        // writable page_region entries that outlive the call, and the kernel
        // writes no more than that.
        let ret = unsafe { ioctl_with_mut_ref(pagemap.file(), PAGEMAP_SCAN(), &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let filled = (ret as usize).min(runs.len());
        for r in &runs[..filled] {
            let (s, e) = (r.start.max(host_addr), r.end.min(end));
            if e > s {
                set_run(
                    bits,
                    (s - host_addr) / PAGE_SIZE,
                    (e - s).div_ceil(PAGE_SIZE),
                );
            }
        }
        if arg.walk_end <= start {
            return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        start = arg.walk_end;
    }
    Ok(())
}

fn read(
    pagemap: &Pagemap,
    host_addr: u64,
    pages: u64,
    bits: &mut [u64],
) -> Result<(), MemoryError> {
    let mut entries = Vec::new();
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(READ_PAGES);
        pagemap.read(host_addr + page * PAGE_SIZE, n, &mut entries)?;
        for (i, e) in entries.iter().enumerate() {
            if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                set_run(bits, page + i as u64, 1);
            }
        }
        page += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_util::{anon_memory, fill_page};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn scan_and_read_agree() {
        const PAGES: u64 = 3000;
        let mem = anon_memory(&[(0, (PAGES * PAGE_SIZE) as usize)]);
        // Written pages, a run across words, and pages only read (mapped to
        // the zero page, which counts as present).
        for p in [0, 5, 63, 64, 65, 1000, 2999] {
            fill_page(&mem, p * PAGE_SIZE, 1);
        }
        for p in 1500..1700 {
            fill_page(&mem, p * PAGE_SIZE, 2);
        }
        let _: u8 = mem.read_obj(GuestAddress(2500 * PAGE_SIZE)).unwrap();
        let region = mem.iter().next().unwrap();
        let addr = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as u64;
        let pagemap = Pagemap::open().unwrap();
        let got = present_bits(&pagemap, addr, PAGES).unwrap();
        if kernel_has_pagemap_scan() {
            // The ioctl itself must work here, not just the fallback.
            let mut scanned = vec![0u64; got.len()];
            scan(&pagemap, addr, PAGES, &mut scanned).unwrap();
            assert!(scanned == got);
        }
        let mut by_read = vec![0u64; got.len()];
        read(&pagemap, addr, PAGES, &mut by_read).unwrap();
        assert!(got == by_read, "PAGEMAP_SCAN and pagemap reads differ");
        let bit = |p: u64| got[(p / 64) as usize] & (1 << (p % 64)) != 0;
        for p in [0, 5, 63, 64, 65, 1000, 1500, 1699, 2500, 2999] {
            assert!(bit(p), "page {p} should be present");
        }
        // Without transparent huge pages these stay absent (with them, a
        // touched page may populate its 2 MiB neighbourhood).
        if !bit(1) {
            assert!(!bit(1700) && !bit(2000));
        }
        assert_eq!(region.len(), PAGES * PAGE_SIZE);
    }

    /// Linux 6.7 or later.
    fn kernel_has_pagemap_scan() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor) >= (6, 7)
    }

    #[test]
    fn set_run_spans_words_and_clamps() {
        let mut bits = vec![0u64; 2];
        set_run(&mut bits, 60, 10);
        assert_eq!(bits, vec![0xf << 60, 0b11_1111]);
        set_run(&mut bits, 120, 100);
        assert_eq!(bits[1] >> 56, 0xff);
    }
}
