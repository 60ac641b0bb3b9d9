//! Length-prefixed framing: a 4-byte big-endian body length, then the body.
//!
//! The length is checked against [`MAX_FRAME_SIZE`] before any body byte is
//! read, and the body buffer grows only as bytes actually arrive, so a peer
//! that lies about the length cannot make us allocate more than it sends.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame body either side accepts or sends (32 MiB).
pub const MAX_FRAME_SIZE: usize = 32 * 1024 * 1024;

/// Size of the length prefix.
const HEADER_LEN: usize = 4;

/// Framing errors. `Io` covers the transport; the others are protocol faults.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The transport failed (includes read/write timeouts).
    #[error("frame I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The announced (or outgoing) body length exceeds [`MAX_FRAME_SIZE`].
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Length announced by the header or of the outgoing body.
        len: u64,
        /// The limit, [`MAX_FRAME_SIZE`].
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame: got {got} of {expected} bytes")]
    Truncated {
        /// Bytes received of the header or body.
        got: usize,
        /// Bytes that were announced (4 for a header).
        expected: usize,
    },
    /// The body is not valid JSON for the expected message type.
    #[error("malformed frame body: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads as many bytes as possible into `buf`; returns how many (less than
/// `buf.len()` only at end of stream).
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame body. Returns `Ok(None)` on a clean end of stream at a
/// frame boundary.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            got,
            expected: HEADER_LEN,
        });
    }
    let len = u32::from_be_bytes(header);
    let len_usize = usize::try_from(len).map_err(|_| FrameError::TooLarge {
        len: u64::from(len),
        max: MAX_FRAME_SIZE,
    })?;
    if len_usize > MAX_FRAME_SIZE {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_SIZE,
        });
    }
    let mut body = Vec::with_capacity(len_usize.min(64 * 1024));
    let got = r.take(u64::from(len)).read_to_end(&mut body)?;
    if got < len_usize {
        return Err(FrameError::Truncated {
            got,
            expected: len_usize,
        });
    }
    Ok(Some(body))
}

/// Writes one frame (header and body in a single write) and flushes.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    let buf = encode_frame(body)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Serializes `msg` as JSON and writes it as one frame.
pub fn send_message<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    write_frame(w, &body)
}

/// Reads one frame and parses it as `T`. `Ok(None)` on clean end of stream.
pub fn recv_message<R: Read + ?Sized, T: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    match read_frame(r)? {
        None => Ok(None),
        Some(body) => Ok(Some(serde_json::from_slice(&body)?)),
    }
}

/// Incremental frame parser for poll-driven connections, where bytes arrive
/// in arbitrary pieces and a read must never block in the middle of a frame.
/// Applies the same [`MAX_FRAME_SIZE`] check as [`read_frame`] as soon as a
/// header is complete.
///
/// Frames are taken from a read offset, so a buffer full of small frames is
/// not shifted once per frame; the consumed prefix is dropped when more bytes
/// are pushed (once per receive, in [`crate::conn::FramedSocket`]).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the first byte not yet returned as part of a frame.
    pos: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes, first dropping the frames already returned.
    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Drops the bytes already returned as frames (one shift of what is
    /// left, however many frames were taken).
    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
        }
        self.pos = 0;
    }

    /// The bytes received and not yet returned as frames.
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.pending().len()
    }

    /// How many more bytes the frame in progress needs (0 when nothing is
    /// buffered or a whole frame is ready); used to finish a frame the peer
    /// was in the middle of sending with a blocking read. A complete header
    /// announcing more than [`MAX_FRAME_SIZE`] is refused here too, so a
    /// peer cannot make the caller wait for gigabytes.
    pub fn missing(&self) -> Result<usize, FrameError> {
        let have = self.buffered();
        if have == 0 {
            return Ok(0);
        }
        match self.announced()? {
            None => Ok(HEADER_LEN - have),
            Some(len) => Ok((HEADER_LEN + len).saturating_sub(have)),
        }
    }

    /// The body length announced by the buffered header, once complete and
    /// checked against [`MAX_FRAME_SIZE`].
    fn announced(&self) -> Result<Option<usize>, FrameError> {
        let Some(header) = self.pending().get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut bytes = [0u8; HEADER_LEN];
        bytes.copy_from_slice(header);
        let len = u32::from_be_bytes(bytes);
        let too_large = || FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_SIZE,
        };
        match usize::try_from(len) {
            Ok(n) if n <= MAX_FRAME_SIZE => Ok(Some(n)),
            _ => Err(too_large()),
        }
    }

    /// The next complete frame body, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = self.announced()? else {
            return Ok(None);
        };
        let Some(body) = self.pending().get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let body = body.to_vec();
        self.pos += HEADER_LEN + len;
        if self.pos == self.buf.len() {
            // Everything was taken: start over without a copy.
            self.buf.clear();
            self.pos = 0;
        }
        Ok(Some(body))
    }
}

/// One frame (header and body) as bytes, for senders that queue output.
pub fn encode_frame(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let too_large = || FrameError::TooLarge {
        len: body.len() as u64,
        max: MAX_FRAME_SIZE,
    };
    if body.len() > MAX_FRAME_SIZE {
        return Err(too_large());
    }
    let len = u32::try_from(body.len()).map_err(|_| too_large())?;
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn round_trip_several_frames() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, b"").unwrap();
        write_frame(&mut buf, &[7u8; 70_000]).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 5]);
        let mut r = Cursor::new(buf);
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), b"hello");
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), b"");
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), vec![7u8; 70_000]);
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn oversize_header_rejected_before_reading_body() {
        let len = (MAX_FRAME_SIZE as u32) + 1;
        let mut r = Cursor::new(len.to_be_bytes().to_vec());
        match read_frame(&mut r) {
            Err(FrameError::TooLarge { len: l, max }) => {
                assert_eq!(l, u64::from(len));
                assert_eq!(max, MAX_FRAME_SIZE);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn max_size_frame_accepted_and_oversize_write_refused() {
        let body = vec![1u8; MAX_FRAME_SIZE];
        let mut buf = Vec::new();
        write_frame(&mut buf, &body).unwrap();
        let got = read_frame(&mut Cursor::new(buf)).unwrap().unwrap();
        assert_eq!(got.len(), MAX_FRAME_SIZE);
        let too_big = vec![0u8; MAX_FRAME_SIZE + 1];
        assert!(matches!(
            write_frame(&mut Vec::new(), &too_big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_header_and_body_rejected() {
        let mut r = Cursor::new(vec![0u8, 0]);
        assert!(matches!(
            read_frame(&mut r),
            Err(FrameError::Truncated {
                got: 2,
                expected: 4
            })
        ));
        let mut data = 10u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc");
        assert!(matches!(
            read_frame(&mut Cursor::new(data)),
            Err(FrameError::Truncated {
                got: 3,
                expected: 10
            })
        ));
    }

    #[test]
    fn typed_messages_round_trip_and_bad_json_is_an_error() {
        let mut buf = Vec::new();
        send_message(&mut buf, &vec![1u32, 2, 3]).unwrap();
        write_frame(&mut buf, b"{not json").unwrap();
        let mut r = Cursor::new(buf);
        let v: Vec<u32> = recv_message(&mut r).unwrap().unwrap();
        assert_eq!(v, vec![1, 2, 3]);
        assert!(matches!(
            recv_message::<_, Vec<u32>>(&mut r),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn decoder_reassembles_frames_split_anywhere() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"first").unwrap();
        write_frame(&mut wire, b"").unwrap();
        write_frame(&mut wire, b"third frame").unwrap();
        for step in [1, 3, 4, 7, wire.len()] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(
                got,
                vec![b"first".to_vec(), vec![], b"third frame".to_vec()]
            );
            assert_eq!(d.buffered(), 0);
            assert_eq!(d.missing().unwrap(), 0);
        }
        let mut d = FrameDecoder::new();
        d.push(&wire[..2]);
        assert_eq!(d.missing().unwrap(), 2);
        d.push(&wire[2..6]);
        assert_eq!(d.missing().unwrap(), 3);
    }

    #[test]
    fn decoder_keeps_a_partial_frame_after_taking_whole_ones() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"one").unwrap();
        write_frame(&mut wire, b"two").unwrap();
        write_frame(&mut wire, b"three").unwrap();
        let cut = wire.len() - 2;
        let mut d = FrameDecoder::new();
        d.push(&wire[..cut]);
        assert_eq!(d.next_frame().unwrap().unwrap(), b"one");
        assert_eq!(d.next_frame().unwrap().unwrap(), b"two");
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.buffered(), 4 + 3);
        assert_eq!(d.missing().unwrap(), 2);
        // The next push drops the two frames taken, keeping the partial one.
        d.push(&wire[cut..]);
        assert_eq!(d.buf.len(), 4 + 5);
        assert_eq!(d.next_frame().unwrap().unwrap(), b"three");
        assert_eq!((d.buffered(), d.buf.len(), d.pos), (0, 0, 0));
    }

    #[test]
    fn decoder_takes_many_small_frames_in_linear_time() {
        // 500k empty frames in one 2 MB buffer: shifting the rest of the
        // buffer per frame moves 500 GB (seconds even at memory speed); an
        // offset moves nothing (milliseconds).
        const N: usize = 500_000;
        let wire = vec![0u8; N * HEADER_LEN];
        let mut d = FrameDecoder::new();
        d.push(&wire);
        let start = std::time::Instant::now();
        let mut n = 0;
        while let Some(f) = d.next_frame().unwrap() {
            assert!(f.is_empty());
            n += 1;
        }
        assert_eq!(n, N);
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "decoding {N} frames took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn decoder_rejects_oversize_header() {
        let mut d = FrameDecoder::new();
        d.push(&((MAX_FRAME_SIZE as u32) + 1).to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        assert!(matches!(d.missing(), Err(FrameError::TooLarge { .. })));
        // A header still incomplete only asks for the rest of the header.
        let mut d = FrameDecoder::new();
        d.push(&[0xff, 0xff]);
        assert_eq!(d.missing().unwrap(), 2);
        d.push(&[0xff, 0xff, 1, 2, 3]);
        match d.missing() {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u64::from(u32::MAX), MAX_FRAME_SIZE));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
}
