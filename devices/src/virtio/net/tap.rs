//! A TAP interface opened through /dev/net/tun.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

const TUN_DEVICE: &str = "/dev/net/tun";
/// IFNAMSIZ minus the terminating NUL.
const MAX_NAME_LEN: usize = 15;

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {0:?}: 1 to 15 characters, no '/', ':', whitespace or NUL")]
    InvalidName(String),
    #[error("failed to open {TUN_DEVICE}: {0}")]
    OpenTun(io::Error),
    #[error("TUNSETIFF for TAP {name}: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("TUNSETVNETHDRSZ for TAP {name}: {source}")]
    SetVnetHdrSize { name: String, source: io::Error },
}

/// The host end of the guest's network interface: a nonblocking fd that
/// reads and writes one frame (with its virtio-net header) per call.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to TAP `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), creating
    /// it if it does not exist, with a 12-byte virtio-net header.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && !name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
        if !valid {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::OpenTun)?;

        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: `file` is an open tun fd and `ifr` a valid, initialized
        // ifreq that outlives the call; TUNSETIFF reads and writes only it.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
        // points to a live local.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// Wraps an fd with TAP semantics (one frame per read/write,
    /// nonblocking), e.g. one end of a datagram socketpair in tests.
    pub fn from_file(file: File, name: String) -> Self {
        Self { file, name }
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
