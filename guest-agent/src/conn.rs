//! A framed connection driven by `poll(2)`: receives without blocking into a
//! [`FrameDecoder`] and queues outgoing frames, sending what the socket takes.
//!
//! Terminal sessions need this on both sides: the agent must keep reading the
//! pty while the host is slow to read, and the host must keep reading output
//! while it sends keystrokes. With blocking sends on both ends a large paste
//! and a chatty program could each wait for the other forever.

use std::io;
use std::os::fd::BorrowedFd;

use serde::Serialize;

use crate::frame::{encode_frame, FrameDecoder, FrameError};
use crate::sys;

/// Most bytes taken from the socket per [`FramedSocket::receive`] call, so a
/// flood from one side cannot starve the other direction.
const RECEIVE_BUDGET: usize = 256 * 1024;

/// Framed I/O over a connected stream socket borrowed for one session. The
/// socket itself stays in blocking mode: the non-blocking calls use
/// `MSG_DONTWAIT`, so the connection works as before once the session ends.
pub struct FramedSocket<'a> {
    fd: BorrowedFd<'a>,
    decoder: FrameDecoder,
    out: Vec<u8>,
    out_pos: usize,
}

impl<'a> FramedSocket<'a> {
    /// Wraps a connected socket.
    pub fn new(fd: BorrowedFd<'a>) -> Self {
        Self {
            fd,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// The socket, for polling.
    pub fn fd(&self) -> BorrowedFd<'a> {
        self.fd
    }

    /// Takes what has arrived, without blocking. `Ok(false)` once the peer
    /// has closed its side.
    pub fn receive(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        let mut taken = 0;
        while taken < RECEIVE_BUDGET {
            match sys::recv_nonblocking(self.fd, &mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                    taken += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The next complete frame received, if any.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        self.decoder.next_frame()
    }

    /// Bytes received that do not form a complete frame yet.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// Reads, blocking, the rest of a frame the peer is in the middle of
    /// sending, so the stream is at a frame boundary when the session hands
    /// it back. Returns false if the peer closed the connection instead. A
    /// header announcing more than [`crate::frame::MAX_FRAME_SIZE`] is
    /// refused ([`FrameError::TooLarge`]) as soon as it is complete, before
    /// any body byte is waited for.
    pub fn finish_partial_frame(&mut self) -> Result<bool, FrameError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let missing = self.decoder.missing()?.min(buf.len());
            if missing == 0 {
                return Ok(true);
            }
            match sys::recv_blocking(self.fd, &mut buf[..missing]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Queues one message as a frame; nothing is sent yet.
    pub fn queue<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let body = serde_json::to_vec(msg)?;
        let frame = encode_frame(&body)?;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out.extend_from_slice(&frame);
        Ok(())
    }

    /// Bytes queued and not yet sent.
    pub fn queued(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Sends as much of the queue as the socket takes now.
    pub fn send_ready(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match sys::send_nonblocking(self.fd, &self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        Ok(())
    }

    /// Sends the whole queue, waiting for the socket as long as it takes.
    pub fn flush(&mut self) -> io::Result<()> {
        loop {
            self.send_ready()?;
            if self.queued() == 0 {
                return Ok(());
            }
            let mut fds = [sys::pollfd(Some(self.fd), libc::POLLOUT)];
            sys::poll(&mut fds, None)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn queue_send_receive_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = FramedSocket::new(a.as_fd());
        let mut rx = FramedSocket::new(b.as_fd());
        assert!(rx.receive().unwrap());
        assert_eq!(rx.next_frame().unwrap(), None);
        tx.queue(&"one").unwrap();
        tx.queue(&vec![2u8; 300_000]).unwrap();
        assert!(tx.queued() > 300_000);
        // Larger than the socket buffer: alternate sending and receiving.
        let mut got = Vec::new();
        while got.len() < 2 {
            tx.send_ready().unwrap();
            assert!(rx.receive().unwrap());
            while let Some(f) = rx.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(tx.queued(), 0);
        assert_eq!(got[0], b"\"one\"");
        let v: Vec<u8> = serde_json::from_slice(&got[1]).unwrap();
        assert_eq!(v.len(), 300_000);
        drop(tx);
        drop(a);
        assert!(!rx.receive().unwrap());
    }

    #[test]
    fn partial_frame_is_finished_with_a_blocking_read() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut frame = encode_frame(b"hello").unwrap();
        let tail = frame.split_off(6);
        std::io::Write::write_all(&mut a, &frame).unwrap();
        let mut rx = FramedSocket::new(b.as_fd());
        rx.receive().unwrap();
        assert_eq!(rx.next_frame().unwrap(), None);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            std::io::Write::write_all(&mut a, &tail).unwrap();
            a
        });
        assert!(rx.finish_partial_frame().unwrap());
        assert_eq!(rx.next_frame().unwrap().unwrap(), b"hello");
        drop(writer.join().unwrap());
        // At a frame boundary there is nothing to finish, even with the peer gone.
        assert_eq!(rx.buffered(), 0);
        assert!(rx.finish_partial_frame().unwrap());
    }

    #[test]
    fn partial_oversize_header_is_refused_without_waiting_for_the_body() {
        let (mut a, b) = UnixStream::pair().unwrap();
        // Without the check this would wait for 4 GiB; fail instead of hanging.
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        std::io::Write::write_all(&mut a, &[0xff, 0xff]).unwrap();
        let mut rx = FramedSocket::new(b.as_fd());
        rx.receive().unwrap();
        assert_eq!(rx.next_frame().unwrap(), None);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // The rest of the header and a little of the announced body.
            std::io::Write::write_all(&mut a, &[0xff, 0xff, b'x', b'y']).unwrap();
            a
        });
        match rx.finish_partial_frame() {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u64::from(u32::MAX));
                assert_eq!(max, crate::frame::MAX_FRAME_SIZE);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        drop(writer.join().unwrap());
    }
}
