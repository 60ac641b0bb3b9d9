//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and its validation.
//!
//! The header is 44 little-endian bytes. It is parsed by hand from a byte
//! array so that nothing a guest writes can be misinterpreted through an
//! unaligned or packed struct.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;

/// The well-known CID of the host.
pub const HOST_CID: u64 = 2;

/// The only socket type we support (VIRTIO_VSOCK_TYPE_STREAM).
pub const TYPE_STREAM: u16 = 1;

/// Largest payload of one packet; the same bound Linux uses
/// (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// Packet operations (VIRTIO_VSOCK_OP_*).
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8; HDR_SIZE], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u16_at(b: &[u8; HDR_SIZE], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u64_at(b: &[u8; HDR_SIZE], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

impl Header {
    /// Decodes the wire layout.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A RST answering `hdr` (a packet from the guest), addressed back to it.
    pub fn rst_reply(hdr: &Header, guest_cid: u64) -> Self {
        Self {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }
}

/// Why a packet from the guest was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain holds {0} readable bytes, less than the {HDR_SIZE}-byte header")]
    ShortHeader(usize),
    #[error("payload length {len} exceeds the {MAX_PKT_PAYLOAD}-byte maximum")]
    PayloadTooLarge { len: u32 },
    #[error("payload length {len} exceeds the {avail} bytes the descriptor chain holds")]
    PayloadTruncated { len: u32, avail: usize },
    #[error("source CID {src_cid} is not the guest's CID {guest_cid}")]
    BadSrcCid { src_cid: u64, guest_cid: u64 },
    #[error("socket type {0} is not stream")]
    BadType(u16),
    #[error("unknown operation {0}")]
    BadOp(u16),
    #[error("control operation {op} carries a {len}-byte payload")]
    PayloadOnControl { op: u16, len: u32 },
}

/// Checks a header from the guest against the chain it came in.
/// `payload_avail` is how many readable bytes follow the header.
pub fn validate(hdr: &Header, payload_avail: usize, guest_cid: u64) -> Result<(), PacketError> {
    if hdr.len as usize > MAX_PKT_PAYLOAD {
        return Err(PacketError::PayloadTooLarge { len: hdr.len });
    }
    if hdr.len as usize > payload_avail {
        return Err(PacketError::PayloadTruncated {
            len: hdr.len,
            avail: payload_avail,
        });
    }
    if hdr.src_cid != guest_cid {
        return Err(PacketError::BadSrcCid {
            src_cid: hdr.src_cid,
            guest_cid,
        });
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(PacketError::BadType(hdr.type_));
    }
    match hdr.op {
        OP_RW => Ok(()),
        OP_REQUEST | OP_RESPONSE | OP_RST | OP_SHUTDOWN | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {
            if hdr.len != 0 {
                Err(PacketError::PayloadOnControl {
                    op: hdr.op,
                    len: hdr.len,
                })
            } else {
                Ok(())
            }
        }
        op => Err(PacketError::BadOp(op)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len: 10,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn roundtrip_and_layout() {
        let h = good();
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        // Spot-check offsets of the wire layout.
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
    }

    #[test]
    fn validation() {
        assert_eq!(validate(&good(), 10, 3), Ok(()));
        assert_eq!(
            validate(&good(), 9, 3),
            Err(PacketError::PayloadTruncated { len: 10, avail: 9 })
        );
        assert!(matches!(
            validate(&good(), 10, 4),
            Err(PacketError::BadSrcCid { .. })
        ));
        let big = Header {
            len: MAX_PKT_PAYLOAD as u32 + 1,
            ..good()
        };
        assert!(matches!(
            validate(&big, usize::MAX, 3),
            Err(PacketError::PayloadTooLarge { .. })
        ));
        let dgram = Header { type_: 3, ..good() };
        assert_eq!(validate(&dgram, 10, 3), Err(PacketError::BadType(3)));
        let bad_op = Header { op: 99, ..good() };
        assert_eq!(validate(&bad_op, 10, 3), Err(PacketError::BadOp(99)));
        let ctl = Header {
            op: OP_REQUEST,
            ..good()
        };
        assert!(matches!(
            validate(&ctl, 10, 3),
            Err(PacketError::PayloadOnControl { .. })
        ));
    }
}
