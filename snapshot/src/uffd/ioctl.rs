//! `UFFDIO_COPY` and `UFFDIO_ZEROPAGE` with exact progress reporting.
//!
//! The userfaultfd crate folds partial progress of `UFFDIO_ZEROPAGE` into a
//! bare EAGAIN and misreads the negative progress field newer kernels return
//! when the address space is changing, so these two are issued directly.

use std::io;

use userfaultfd::Uffd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

/// `struct uffdio_copy` from `<linux/userfaultfd.h>`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

ioctl_iowr_nr!(UFFDIO_COPY, 0xAA, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, 0xAA, 0x04, UffdioZeropage);

/// What one fill ioctl achieved.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Progress {
    /// The whole range was filled (and waiters woken).
    All,
    /// This many bytes from the start were filled before a page that was
    /// already present; waiters on them were woken.
    Partial(usize),
    /// The first page is already present; nothing was done.
    Exists,
    /// The address space is changing (an event is pending); nothing was done.
    Blocked,
}

fn progress(ret: libc::c_int, field: i64) -> io::Result<Progress> {
    if ret == 0 {
        return Ok(Progress::All);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) if field > 0 => Ok(Progress::Partial(field as usize)),
        Some(libc::EAGAIN) => Ok(Progress::Blocked),
        Some(libc::EEXIST) => Ok(Progress::Exists),
        _ => Err(err),
    }
}

/// Fills `src.len()` bytes at host address `dst` with `src` and wakes
/// threads faulting there.
///
/// # Safety
///
/// `dst..dst + src.len()` must be registered with `uffd` (the kernel only
/// fills missing pages there, so memory in use is never overwritten).
pub(super) unsafe fn copy(uffd: &Uffd, dst: usize, src: &[u8]) -> io::Result<Progress> {
    let mut arg = UffdioCopy {
        dst: dst as u64,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `arg` is a valid uffdio_copy; the kernel reads `src.len()`
    // bytes of `src` and writes only missing pages of the registered
    // destination, which the caller vouches for.
    let ret = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_COPY(), &mut arg) };
    progress(ret, arg.copy)
}

/// Maps the zero page over `len` bytes at host address `dst` and wakes
/// threads faulting there.
///
/// # Safety
///
/// As for [`copy`].
pub(super) unsafe fn zeropage(uffd: &Uffd, dst: usize, len: usize) -> io::Result<Progress> {
    let mut arg = UffdioZeropage {
        range: UffdioRange {
            start: dst as u64,
            len: len as u64,
        },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `arg` is a valid uffdio_zeropage; only missing pages of the
    // registered range are filled.
    let ret = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_ZEROPAGE(), &mut arg) };
    progress(ret, arg.zeropage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020_aa04);
    }
}
