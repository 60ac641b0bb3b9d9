//! In-process tests of the page server: anonymous memory registered with a
//! real userfaultfd, touched from other threads.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::memory::test_util::{anon_memory, fill_page, memory_bytes, Mem, TEST_ID};
use crate::memory::{write_full, PAGE_SIZE};

const PAGES: u64 = 256;
/// Pages with data in the memory file; the rest are holes.
const DATA_PAGES: [u64; 8] = [0, 1, 2, 5, 100, 200, 201, 255];

fn page_byte(page: u64) -> u8 {
    (page % 250) as u8 + 1
}

/// Writes the expected memory file and returns its bytes.
fn make_file(path: &Path) -> Vec<u8> {
    let src = anon_memory(&[(0, (PAGES * PAGE_SIZE) as usize)]);
    for p in DATA_PAGES {
        fill_page(&src, p * PAGE_SIZE, page_byte(p));
    }
    write_full(path, &src, &TEST_ID).unwrap();
    memory_bytes(&src)
}

/// Fresh guest memory served from `path`.
fn served(path: &Path) -> (Mem, PageServer) {
    let mem = anon_memory(&[(0, (PAGES * PAGE_SIZE) as usize)]);
    let regions = UffdRegion::from_memory(&mem).unwrap();
    let server = PageServer::spawn(
        create_uffd().unwrap(),
        regions,
        FilePageSource::open(path).unwrap(),
    )
    .unwrap();
    (mem, server)
}

fn read_page(mem: &Mem, page: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    buf
}

fn expected_page(page: u64) -> Vec<u8> {
    let b = if DATA_PAGES.contains(&page) {
        page_byte(page)
    } else {
        0
    };
    vec![b; PAGE_SIZE as usize]
}

#[test]
fn faults_are_served_from_file_and_recorded() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("memory");
    let content = make_file(&path);
    let (mem, server) = served(&path);
    server.start_recording();

    let order = [5u64, 0, 1, 50, 100];
    std::thread::scope(|s| {
        s.spawn(|| {
            for p in order {
                assert_eq!(read_page(&mem, p), expected_page(p), "page {p}");
            }
        });
    });
    assert_eq!(
        server.working_set(),
        order.iter().map(|p| p * PAGE_SIZE).collect::<Vec<_>>()
    );
    // Faults are counted before they are served; fills only after the
    // faulting thread was woken, so those counters are exact after `stop`.
    assert_eq!(server.stats().faults, 5);

    // Touch everything else from two threads at once.
    std::thread::scope(|s| {
        for half in 0..2 {
            let mem = &mem;
            s.spawn(move || {
                for p in (half..PAGES).step_by(2) {
                    assert_eq!(read_page(mem, p), expected_page(p), "page {p}");
                }
            });
        }
    });
    assert_eq!(memory_bytes(&mem), content);
    let ws = server.stop_recording();
    assert_eq!(ws.len() as u64, PAGES);
    let stats = server.stop().unwrap();
    assert_eq!(stats.faults, PAGES);
    assert_eq!(stats.bytes_copied, DATA_PAGES.len() as u64 * PAGE_SIZE);
    assert_eq!(stats.pages_copied, DATA_PAGES.len() as u64);
    assert_eq!(stats.zero_pages, PAGES - DATA_PAGES.len() as u64);
    // Served pages stay after the server is gone, and are writable.
    mem.write_obj(0x77u8, GuestAddress(5 * PAGE_SIZE)).unwrap();
    mem.write_obj(0x78u8, GuestAddress(7 * PAGE_SIZE)).unwrap();
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(5 * PAGE_SIZE + 1)).unwrap(),
        page_byte(5)
    );
}

#[test]
fn prefetched_pages_do_not_fault() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("memory");
    make_file(&path);
    let (mem, server) = served(&path);
    // A run across data and holes, and scattered pages.
    let ws: Vec<u64> = [199u64, 200, 201, 202, 5, 0, 1]
        .iter()
        .map(|p| p * PAGE_SIZE)
        .collect();
    assert_eq!(server.prefetch(&ws).unwrap(), 7);
    // Again: everything is present already.
    assert_eq!(server.prefetch(&ws).unwrap(), 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for p in [199u64, 200, 201, 202, 5, 0, 1] {
                assert_eq!(read_page(&mem, p), expected_page(p), "page {p}");
            }
        });
    });
    assert_eq!(server.stats().faults, 0);
    assert_eq!(server.stats().prefetched_pages, 7);
    assert_eq!(read_page(&mem, 2), expected_page(2));
    assert_eq!(server.stats().faults, 1);
    assert_eq!(
        server.stats().working_set_faults,
        0,
        "page 2 was not asked for"
    );
    assert!(matches!(
        server.prefetch(&[PAGES * PAGE_SIZE]),
        Err(UffdError::OutOfRange { .. })
    ));
}

#[test]
fn prefetch_all_while_guest_touches_memory() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("memory");
    let content = make_file(&path);
    let (mem, server) = served(&path);
    std::thread::scope(|s| {
        s.spawn(|| {
            for p in (0..PAGES).rev() {
                assert_eq!(read_page(&mem, p), expected_page(p), "page {p}");
            }
        });
        s.spawn(|| server.prefetch_all().unwrap());
    });
    assert_eq!(memory_bytes(&mem), content);
    let stats = server.stop().unwrap();
    assert_eq!(stats.pages_copied + stats.zero_pages, PAGES, "{stats:?}");
    // Each page is filled exactly once, by whichever side got there first;
    // a fault that lost the race is still counted as a fault.
    assert!(stats.prefetched_pages <= PAGES, "{stats:?}");
    assert!(stats.faults + stats.prefetched_pages >= PAGES, "{stats:?}");
}

/// Drops a page's content as a balloon driver would (MADV_DONTNEED).
fn release_page(mem: &Mem, page: u64) {
    let region = mem.iter().next().unwrap();
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap();
    // SAFETY: the page lies in the region's live mapping; MADV_DONTNEED only
    // drops its content.
    let ret = unsafe {
        libc::madvise(
            host.add((page * PAGE_SIZE) as usize).cast(),
            PAGE_SIZE as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(ret, 0);
}

#[test]
fn faults_on_pages_a_prefetch_asked_for_are_counted_apart() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("memory");
    make_file(&path);
    let (mem, server) = served(&path);
    assert_eq!(server.prefetch(&[7 * PAGE_SIZE]).unwrap(), 1);
    // Released after the prefetch, so the guest's next touch faults on a
    // page of the working set.
    release_page(&mem, 7);
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(read_page(&mem, 7), vec![0; PAGE_SIZE as usize]);
            assert_eq!(read_page(&mem, 8), expected_page(8));
        });
    });
    let stats = server.stop().unwrap();
    assert_eq!(
        (stats.faults, stats.working_set_faults),
        (2, 1),
        "{stats:?}"
    );
}

#[test]
fn removed_pages_read_as_zero_afterwards() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("memory");
    make_file(&path);
    let (mem, server) = served(&path);
    assert_eq!(read_page(&mem, 5), expected_page(5));
    assert_eq!(read_page(&mem, 100), expected_page(100));
    for page in [5u64, 100] {
        release_page(&mem, page);
    }
    // The released page must come back as zero, not as the file's data,
    // both through a fault and through prefetch.
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(read_page(&mem, 5), vec![0; PAGE_SIZE as usize]));
    });
    server.prefetch(&[100 * PAGE_SIZE]).unwrap();
    assert_eq!(read_page(&mem, 100), vec![0; PAGE_SIZE as usize]);
    let stats = server.stop().unwrap();
    assert_eq!(stats.removed_pages, 2);
    assert_eq!(stats.faults, 3, "{stats:?}");
}

#[test]
fn bad_regions_are_rejected() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("memory");
    make_file(&path);
    let mem = anon_memory(&[(0, (2 * PAGES * PAGE_SIZE) as usize)]);
    let regions = UffdRegion::from_memory(&mem).unwrap();
    // Twice as large as the file.
    let err = PageServer::spawn(
        create_uffd().unwrap(),
        regions.clone(),
        FilePageSource::open(&path).unwrap(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, UffdError::BadRegion { .. }), "{err}");
    let mut misaligned = regions[0];
    misaligned.host_addr += 1;
    misaligned.len = PAGE_SIZE as usize;
    assert!(matches!(
        PageServer::spawn(
            create_uffd().unwrap(),
            vec![misaligned],
            FilePageSource::open(&path).unwrap()
        ),
        Err(UffdError::BadRegion { .. })
    ));
    assert!(matches!(
        FilePageSource::open(&dir.as_path().join("missing")),
        Err(UffdError::Open { .. })
    ));
}

#[test]
fn source_errors_stop_the_server() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("memory");
    make_file(&path);
    let source = FilePageSource::open(&path).unwrap();
    // Cut the file after opening so data pages can no longer be read.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let mem = anon_memory(&[(0, (PAGES * PAGE_SIZE) as usize)]);
    let regions = UffdRegion::from_memory(&mem).unwrap();
    let server = PageServer::spawn(create_uffd().unwrap(), regions, source).unwrap();
    let err = server.prefetch(&[5 * PAGE_SIZE]).unwrap_err();
    assert!(
        matches!(err, UffdError::Source { offset, .. } if offset == 5 * PAGE_SIZE),
        "{err}"
    );
    server.stop().unwrap();
}
