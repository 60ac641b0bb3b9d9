//! Raw access to the host mapping of a guest region, for the few operations
//! that must not go through a bounce buffer: zero checks, `pwrite` straight
//! from guest memory and `pread` straight into it.
//!
//! Guest memory may be changed concurrently by a running guest or device, so
//! it is only ever read with volatile loads or handed to the kernel, never
//! turned into a Rust reference.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};

use super::MemoryError;

/// The host mapping of one guest region, borrowed from the region.
pub(crate) struct HostRegion<'a> {
    ptr: *mut u8,
    len: usize,
    _region: PhantomData<&'a ()>,
}

impl<'a> HostRegion<'a> {
    /// Borrows the mapping of `region`; fails if it has none.
    pub(crate) fn new<R: GuestMemoryRegion>(region: &'a R) -> Result<Self, MemoryError> {
        let no_mapping = || MemoryError::NoHostMapping {
            guest_addr: region.start_addr().0,
        };
        let len = usize::try_from(region.len()).map_err(|_| no_mapping())?;
        if len == 0 {
            return Ok(Self {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len,
                _region: PhantomData,
            });
        }
        let ptr = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| no_mapping())?;
        // The mapping is contiguous iff the last byte maps right after the first.
        let last = region
            .get_host_address(MemoryRegionAddress(region.len() - 1))
            .map_err(|_| no_mapping())?;
        if (last as usize).wrapping_sub(ptr as usize) != len - 1 {
            return Err(no_mapping());
        }
        Ok(Self {
            ptr,
            len,
            _region: PhantomData,
        })
    }

    /// Host virtual address of the first byte.
    pub(crate) fn addr(&self) -> usize {
        self.ptr as usize
    }

    /// Length of the mapping in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Clamps `offset..offset+len` to the mapping.
    fn clamp(&self, offset: usize, len: usize) -> (usize, usize) {
        let start = offset.min(self.len);
        (start, len.min(self.len - start))
    }

    /// Whether `len` bytes at `offset` are all zero (out-of-range bytes are
    /// ignored).
    pub(crate) fn is_zero(&self, offset: usize, len: usize) -> bool {
        let (offset, len) = self.clamp(offset, len);
        // SAFETY: `offset..offset+len` lies within the mapping, which lives as
        // long as the borrowed region.
        let start = unsafe { self.ptr.add(offset) };
        let head = start.align_offset(8).min(len);
        let words = (len - head) / 8;
        let tail = len - head - words * 8;
        for i in 0..head {
            // SAFETY: in range as computed above; volatile because the guest
            // may write concurrently.
            if unsafe { std::ptr::read_volatile(start.add(i)) } != 0 {
                return false;
            }
        }
        // SAFETY: `head` bytes in, the pointer is 8-aligned and `words` whole
        // words follow within the range.
        let aligned = unsafe { start.add(head) }.cast::<u64>();
        let mut i = 0;
        while i < words {
            // Unrolled by four to keep several loads in flight.
            let n = (words - i).min(4);
            let mut acc = 0u64;
            for j in 0..n {
                // SAFETY: word `i + j` is within the range and aligned.
                acc |= unsafe { std::ptr::read_volatile(aligned.add(i + j)) };
            }
            if acc != 0 {
                return false;
            }
            i += n;
        }
        for i in 0..tail {
            // SAFETY: the tail bytes end exactly at `offset + len`.
            if unsafe { std::ptr::read_volatile(start.add(head + words * 8 + i)) } != 0 {
                return false;
            }
        }
        true
    }

    /// Writes `len` bytes of guest memory at `offset` to `file` at
    /// `file_offset`, straight from the mapping.
    pub(crate) fn write_to(
        &self,
        file: &File,
        offset: usize,
        len: usize,
        file_offset: u64,
    ) -> io::Result<()> {
        self.transfer(
            offset,
            len,
            file_offset,
            io::ErrorKind::WriteZero,
            |ptr, n, pos| {
                // SAFETY: `ptr..ptr+n` lies inside the mapping (see `transfer`);
                // the kernel copies from it and reports faults as EFAULT rather
                // than crashing.
                unsafe { libc::pwrite(file.as_raw_fd(), ptr.cast::<libc::c_void>(), n, pos) }
            },
        )
    }

    /// Fills `len` bytes of guest memory at `offset` from `file` at
    /// `file_offset`, straight into the mapping.
    pub(crate) fn read_from(
        &self,
        file: &File,
        offset: usize,
        len: usize,
        file_offset: u64,
    ) -> io::Result<()> {
        self.transfer(
            offset,
            len,
            file_offset,
            io::ErrorKind::UnexpectedEof,
            |ptr, n, pos| {
                // SAFETY: `ptr..ptr+n` lies inside the mapping (see `transfer`),
                // which is writable guest memory owned by the borrowed region.
                unsafe { libc::pread(file.as_raw_fd(), ptr.cast::<libc::c_void>(), n, pos) }
            },
        )
    }

    /// The retry loop shared by [`Self::write_to`] and [`Self::read_from`]:
    /// calls `op(ptr, n, pos)` (a pwrite or pread) on the rest of the range
    /// until it is done, retrying EINTR; a zero return is `on_zero`.
    fn transfer(
        &self,
        offset: usize,
        len: usize,
        file_offset: u64,
        on_zero: io::ErrorKind,
        mut op: impl FnMut(*mut u8, usize, libc::off_t) -> isize,
    ) -> io::Result<()> {
        let (offset, len) = self.clamp(offset, len);
        let mut done = 0;
        while done < len {
            let pos = to_off_t(file_offset, done)?;
            // SAFETY: `offset + done < offset + len`, which `clamp` keeps
            // within the mapping.
            let ptr = unsafe { self.ptr.add(offset + done) };
            match op(ptr, len - done, pos) {
                n if n > 0 => done += n as usize,
                0 => return Err(on_zero.into()),
                _ => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Most pieces in one `pwritev` (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Gathers pieces of guest memory bound for consecutive bytes of a file and
/// writes each batch with one `pwritev`: many scattered pages cost a few
/// system calls instead of one each.
pub(crate) struct GatherWriter<'a> {
    file: &'a File,
    /// Pending pieces, in file order; pointers into mappings borrowed for `'a`.
    iov: Vec<libc::iovec>,
    /// File offset of the first pending byte.
    at: u64,
    /// Pending bytes.
    pending: usize,
    /// Largest batch, in bytes.
    max_batch: usize,
    _regions: PhantomData<&'a ()>,
}

impl<'a> GatherWriter<'a> {
    /// Writes to `file` in batches of at most `max_batch` bytes.
    pub(crate) fn new(file: &'a File, max_batch: usize) -> Self {
        Self {
            file,
            iov: Vec::new(),
            at: 0,
            pending: 0,
            max_batch,
            _regions: PhantomData,
        }
    }

    /// File offset of the first byte not written yet, for error reports.
    pub(crate) fn position(&self) -> u64 {
        self.at
    }

    /// Queues `len` bytes of `host` at `offset` (clamped to the mapping) for
    /// `file_offset`, writing out what is pending first if this piece does
    /// not continue it. Returns the bytes queued.
    pub(crate) fn push(
        &mut self,
        host: &HostRegion<'a>,
        offset: usize,
        len: usize,
        file_offset: u64,
    ) -> io::Result<usize> {
        let (offset, len) = host.clamp(offset, len);
        if len == 0 {
            return Ok(0);
        }
        let continues = file_offset == self.at + self.pending as u64;
        if !self.iov.is_empty()
            && (!continues || self.iov.len() >= MAX_IOVECS || self.pending >= self.max_batch)
        {
            self.flush()?;
        }
        if self.iov.is_empty() {
            self.at = file_offset;
        }
        // SAFETY: `offset..offset+len` lies within the mapping (clamped), which
        // stays mapped for `'a`.
        let base = unsafe { host.ptr.add(offset) };
        match self.iov.last_mut() {
            // Adjacent in guest memory too: one longer piece.
            Some(last) if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == base => {
                last.iov_len += len;
            }
            _ => self.iov.push(libc::iovec {
                iov_base: base.cast::<libc::c_void>(),
                iov_len: len,
            }),
        }
        self.pending += len;
        Ok(len)
    }

    /// Writes everything pending.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let mut first = 0;
        while first < self.iov.len() {
            let pos = to_off_t(self.at, 0)?;
            let count = (self.iov.len() - first) as libc::c_int;
            // SAFETY: every iovec points into a guest mapping that outlives
            // `'a` (see `push`); the kernel only reads from them and reports
            // faults as EFAULT.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    self.iov[first..].as_ptr(),
                    count,
                    pos,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            // Skip what was written; a partial piece keeps its rest.
            let mut n = n as usize;
            self.at += n as u64;
            self.pending -= n;
            while n > 0 {
                let piece = &mut self.iov[first];
                if n >= piece.iov_len {
                    n -= piece.iov_len;
                    first += 1;
                } else {
                    piece.iov_base = piece.iov_base.cast::<u8>().wrapping_add(n).cast();
                    piece.iov_len -= n;
                    n = 0;
                }
            }
        }
        self.iov.clear();
        Ok(())
    }
}

fn to_off_t(base: u64, done: usize) -> io::Result<libc::off_t> {
    base.checked_add(done as u64)
        .and_then(|v| libc::off_t::try_from(v).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "file offset overflows off_t"))
}

/// Makes `len` bytes at `offset` of `file` read as zero, as a hole when the
/// filesystem can punch one and as written zeros otherwise.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows off_t"))?;
    let l = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length overflows off_t"))?;
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Whether a buffer is all zero.
pub(crate) fn buf_is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of an initialized byte slice.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The ranges holding data (not holes) of `file` within `start..end`, in
/// order. Filesystems without hole reporting show everything as data.
pub(crate) fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when there is no more data.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows off_t"))?;
    // SAFETY: plain syscall on a valid fd. It moves the shared file position,
    // which nothing in this crate relies on (all I/O is positional).
    let ret = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if ret >= 0 {
        return Ok(Some(ret as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}
