//! Validation and execution of one virtio-blk request (virtio 1.x, 5.2.6).
//!
//! A request is a descriptor chain: a 16-byte device-readable header
//! (type, reserved, sector), data descriptors (device-writable for IN and
//! GET_ID, device-readable for OUT), and a 1-byte device-writable status.
//! Everything in the chain is guest-controlled and checked before use.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, Permissions, ReadVolatile, VolatileMemoryError, WriteVolatile,
};

use super::{ID_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::GuestMemoryMmap;

pub(super) const VIRTIO_BLK_T_IN: u32 = 0;
pub(super) const VIRTIO_BLK_T_OUT: u32 = 1;
pub(super) const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub(super) const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub(super) const VIRTIO_BLK_S_OK: u8 = 0;
pub(super) const VIRTIO_BLK_S_IOERR: u8 = 1;
pub(super) const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const HEADER_LEN: u32 = 16;
/// No indirect descriptors are offered, so a chain is at most a queue long.
const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;

/// The host side of the disk.
pub(super) struct Disk {
    pub file: File,
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES],
}

/// Why a request failed; logged, reported to the guest as IOERR.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("descriptor chain is longer than {MAX_CHAIN_DESCS} or does not terminate")]
    ChainTooLong,
    #[error("descriptor chain breaks off (next index or descriptor outside the table)")]
    BrokenChain,
    #[error("chain has no header and status")]
    TooShort,
    #[error("header descriptor must be device-readable and {HEADER_LEN} bytes (len {len}, write-only {write})")]
    BadHeader { len: u32, write: bool },
    #[error("failed to read the request header at {addr:#x}")]
    HeaderRead { addr: u64 },
    #[error("data descriptor {index} has the wrong direction for request type {rtype}")]
    DataDirection { index: usize, rtype: u32 },
    #[error("data length {len} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength { len: u64 },
    #[error("sectors [{sector}, +{len} bytes) exceed the disk capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("data buffer [{addr:#x}, +{len:#x}) is outside guest memory")]
    BadBuffer { addr: u64, len: u32 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("disk I/O at byte offset {offset}: {source}")]
    Io { offset: u64, source: io::Error },
}

/// What the guest is told about a request.
struct Completion {
    status: u8,
    /// Bytes written into device-writable data buffers.
    data_len: u32,
}

/// Serves one chain; returns the length to put in the used ring. Never
/// fails: a broken request completes with IOERR when its status byte can be
/// written, and with length 0 (nothing written) otherwise.
pub(super) fn process_chain(
    disk: &mut Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let mut descs: Vec<Descriptor> = Vec::new();
    let mut broken = None;
    for desc in chain {
        if descs.len() == MAX_CHAIN_DESCS {
            broken = Some(RequestError::ChainTooLong);
            break;
        }
        descs.push(desc);
    }
    // The chain iterator stops silently at a loop (after a queue's worth of
    // descriptors) or at an unreadable descriptor: the last one still says
    // there is a next.
    if broken.is_none() && descs.last().is_some_and(|d| d.has_next()) {
        broken = Some(if descs.len() >= MAX_CHAIN_DESCS {
            RequestError::ChainTooLong
        } else {
            RequestError::BrokenChain
        });
    }
    if let Some(e) = broken {
        log::warn!("virtio-blk: dropping request: {e}");
        return 0;
    }

    let status_addr = match descs.last() {
        Some(d)
            if descs.len() >= 2
                && d.is_write_only()
                && d.len() == 1
                && mem.check_range(d.addr(), 1, Permissions::Write) =>
        {
            d.addr()
        }
        _ => {
            log::warn!("virtio-blk: request without a writable 1-byte status descriptor; dropped");
            return 0;
        }
    };

    let completion = match execute(disk, mem, &descs[..descs.len() - 1]) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("virtio-blk: request failed: {e}");
            Completion {
                status: VIRTIO_BLK_S_IOERR,
                data_len: 0,
            }
        }
    };
    match mem.write_obj(completion.status, status_addr) {
        Ok(()) => completion.data_len.saturating_add(1),
        Err(e) => {
            log::warn!(
                "virtio-blk: failed to write status at {:#x}: {e}",
                status_addr.0
            );
            0
        }
    }
}

/// Validates and performs a request; `descs` is the chain without status.
fn execute(
    disk: &mut Disk,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Result<Completion, RequestError> {
    let (header, data) = descs.split_first().ok_or(RequestError::TooShort)?;
    if header.is_write_only() || header.len() != HEADER_LEN {
        return Err(RequestError::BadHeader {
            len: header.len(),
            write: header.is_write_only(),
        });
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::HeaderRead {
            addr: header.addr().0,
        })?;
    let rtype = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let ok = |data_len| Completion {
        status: VIRTIO_BLK_S_OK,
        data_len,
    };
    match rtype {
        VIRTIO_BLK_T_IN => {
            let (offset, len) = check_data(disk, mem, data, rtype, sector, true)?;
            seek(&mut disk.file, offset)?;
            for d in data {
                file_to_guest(mem, &mut disk.file, d.addr(), d.len())
                    .map_err(|source| RequestError::Io { offset, source })?;
            }
            // check_data bounded the total by the disk capacity and the
            // chain iterator bounds it by u32.
            Ok(ok(u32::try_from(len).unwrap_or(u32::MAX)))
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let (offset, _) = check_data(disk, mem, data, rtype, sector, false)?;
            seek(&mut disk.file, offset)?;
            for d in data {
                guest_to_file(mem, &mut disk.file, d.addr(), d.len())
                    .map_err(|source| RequestError::Io { offset, source })?;
            }
            Ok(ok(0))
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.file
                .sync_data()
                .map_err(|source| RequestError::Io { offset: 0, source })?;
            Ok(ok(0))
        }
        VIRTIO_BLK_T_GET_ID => {
            check_buffers(mem, data, rtype, true)?;
            let mut written = 0usize;
            for d in data {
                if written == ID_BYTES {
                    break;
                }
                let n = (d.len() as usize).min(ID_BYTES - written);
                mem.write_slice(&disk.id[written..written + n], d.addr())
                    .map_err(|_| RequestError::BadBuffer {
                        addr: d.addr().0,
                        len: d.len(),
                    })?;
                written += n;
            }
            Ok(ok(written as u32))
        }
        _ => Ok(Completion {
            status: VIRTIO_BLK_S_UNSUPP,
            data_len: 0,
        }),
    }
}

/// Checks direction and guest-memory bounds of every data buffer.
fn check_buffers(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    rtype: u32,
    writable: bool,
) -> Result<u64, RequestError> {
    let mut total = 0u64;
    for (index, d) in data.iter().enumerate() {
        if d.is_write_only() != writable {
            return Err(RequestError::DataDirection { index, rtype });
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestError::BadBuffer {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        total += u64::from(d.len());
    }
    Ok(total)
}

/// Checks an IN/OUT request; returns its byte offset and length on disk.
fn check_data(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    rtype: u32,
    sector: u64,
    writable: bool,
) -> Result<(u64, u64), RequestError> {
    let len = check_buffers(mem, data, rtype, writable)?;
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength { len });
    }
    let out_of_range = || RequestError::OutOfRange {
        sector,
        len,
        capacity: disk.capacity_sectors,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = offset.checked_add(len).ok_or_else(out_of_range)?;
    if end > disk.capacity_sectors * SECTOR_SIZE {
        return Err(out_of_range());
    }
    Ok((offset, len))
}

fn seek(file: &mut File, offset: u64) -> Result<(), RequestError> {
    file.seek(SeekFrom::Start(offset))
        .map(|_| ())
        .map_err(|source| RequestError::Io { offset, source })
}

fn volatile_to_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Reads `len` bytes from the file's current offset into guest memory,
/// retrying short reads; EOF before `len` is an error.
pub(super) fn file_to_guest(
    mem: &GuestMemoryMmap,
    file: &mut File,
    addr: GuestAddress,
    len: u32,
) -> io::Result<()> {
    let slices = mem
        .get_slices(addr, len as usize, Permissions::Write)
        .map_err(|e| io::Error::other(e.to_string()))?;
    for slice in slices {
        let mut slice = slice.map_err(|e| io::Error::other(e.to_string()))?;
        while !slice.is_empty() {
            match file.read_volatile(&mut slice) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => slice = slice.offset(n).map_err(volatile_to_io)?,
                Err(e) => {
                    let e = volatile_to_io(e);
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Writes `len` bytes of guest memory at the file's current offset.
pub(super) fn guest_to_file(
    mem: &GuestMemoryMmap,
    file: &mut File,
    addr: GuestAddress,
    len: u32,
) -> io::Result<()> {
    let slices = mem
        .get_slices(addr, len as usize, Permissions::Read)
        .map_err(|e| io::Error::other(e.to_string()))?;
    for slice in slices {
        let mut slice = slice.map_err(|e| io::Error::other(e.to_string()))?;
        while !slice.is_empty() {
            match file.write_volatile(&slice) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => slice = slice.offset(n).map_err(volatile_to_io)?,
                Err(e) => {
                    let e = volatile_to_io(e);
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
    Ok(())
}
