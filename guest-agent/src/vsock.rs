//! Minimal AF_VSOCK listener (std has no vsock support).

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A listening `SOCK_STREAM` vsock socket.
pub struct VsockListener {
    fd: OwnedFd,
}

/// One accepted vsock connection. Reads and writes go straight to the socket
/// (`read(2)`/`write(2)` work on any connected stream socket).
pub struct VsockStream {
    inner: File,
    peer_cid: u32,
    peer_port: u32,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl VsockListener {
    /// Binds to `port` on any local CID and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; no memory is passed.
        let raw = cvt(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: `addr` is a valid sockaddr_vm and we pass its exact size;
        // the kernel only reads it during the call.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast::<libc::sockaddr>(),
                mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on a socket we own; no memory is passed.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(Self { fd })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: see bind; zero is a valid sockaddr_vm.
            let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
            let mut len = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
            // SAFETY: `addr` and `len` are valid and writable for the call and
            // `len` holds the buffer size, so the kernel cannot write past it.
            let rc = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&mut addr as *mut libc::sockaddr_vm).cast::<libc::sockaddr>(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            match cvt(rc) {
                Ok(raw) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return Ok(VsockStream {
                        inner: File::from(fd),
                        peer_cid: addr.svm_cid,
                        peer_port: addr.svm_port,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl VsockStream {
    /// The peer's context id (2 for the host).
    pub fn peer_cid(&self) -> u32 {
        self.peer_cid
    }

    /// The peer's port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binding needs only the vsock core module (no device or loopback
    /// transport), so it runs on most hosts; skipped where AF_VSOCK is absent.
    #[test]
    fn bind_and_port_conflict() {
        let port = 40_000 + (std::process::id() % 20_000);
        let listener = match VsockListener::bind(port) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                eprintln!("AF_VSOCK unsupported here; skipping");
                return;
            }
            Err(e) => panic!("bind failed: {e}"),
        };
        let again = VsockListener::bind(port)
            .err()
            .and_then(|e| e.raw_os_error());
        assert_eq!(again, Some(libc::EADDRINUSE));
        drop(listener);
        VsockListener::bind(port).unwrap();
    }
}
