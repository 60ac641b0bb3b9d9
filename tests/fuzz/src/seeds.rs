//! Valid inputs for the corpus (written by the `gen_seeds` binary) and the state-file sealing
//! the snapshot target uses. Seeds give the fuzzer well-formed starting points it would take
//! long to find by itself: correct chains, packets, HTTP requests, state files.

use crate::guest::{AVAIL_BYTES, DATA_ADDR, DESC_BYTES, MAX_QUEUE};

/// State-file magic, version and CRC (snapshot/src/format.rs), written independently here so a
/// sealed payload reaches the JSON decoder.
const STATE_MAGIC: &[u8; 8] = b"VMMSNAP\0";
const STATE_VERSION: u32 = 1;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

/// Wraps `payload` in a valid state-file header and CRC64 trailer.
pub fn seal_state(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 28);
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Descriptor flags (virtio 1.x, 2.7.5).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One raw descriptor.
#[derive(Clone, Copy, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One queue of a seed: descriptor table and published heads.
#[derive(Clone, Default)]
pub struct SeedQueue {
    pub descs: Vec<Desc>,
    pub heads: Vec<u16>,
}

impl SeedQueue {
    /// Appends `bufs` (guest address, length, device-writable) as a linked chain and
    /// publishes it.
    pub fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> &mut Self {
        let head = self.descs.len() as u16;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = head + i as u16;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.descs.push(Desc {
                addr,
                len,
                flags,
                next: index + 1,
            });
        }
        self.heads.push(head);
        self
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        for d in self.descs.iter().take(usize::from(MAX_QUEUE)) {
            out.extend_from_slice(&d.addr.to_le_bytes());
            out.extend_from_slice(&d.len.to_le_bytes());
            out.extend_from_slice(&d.flags.to_le_bytes());
            out.extend_from_slice(&d.next.to_le_bytes());
        }
        out.resize(start + DESC_BYTES, 0);
        let avail = out.len();
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.heads.len() as u16).to_le_bytes());
        for h in self.heads.iter().take(usize::from(MAX_QUEUE)) {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out.resize(avail + AVAIL_BYTES, 0);
    }
}

/// A whole device input (see `crate::guest` for the layout).
pub struct DeviceSeed {
    pub queue_size: u8,
    pub queues: Vec<SeedQueue>,
    /// Bytes at guest address [`DATA_ADDR`] and on.
    pub data: Vec<u8>,
    pub host: Vec<u8>,
}

impl DeviceSeed {
    /// An empty seed for `queues` queues of the largest size.
    pub fn new(queues: usize) -> Self {
        Self {
            queue_size: MAX_QUEUE as u8,
            queues: vec![SeedQueue::default(); queues],
            data: Vec::new(),
            host: Vec::new(),
        }
    }

    /// Puts `bytes` at guest address `addr` (inside the buffer area) and returns `addr`.
    pub fn put(&mut self, addr: u64, bytes: &[u8]) -> u64 {
        let at = usize::try_from(addr - DATA_ADDR).unwrap_or(usize::MAX);
        if self.data.len() < at + bytes.len() {
            self.data.resize(at + bytes.len(), 0);
        }
        self.data[at..at + bytes.len()].copy_from_slice(bytes);
        addr
    }

    /// The fuzz input.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.queue_size];
        out.extend_from_slice(&(self.host.len() as u16).to_le_bytes());
        for q in &self.queues {
            q.encode(&mut out);
        }
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.host);
        out
    }
}

/// Guest address of the buffer area plus `off`.
pub fn data(off: u64) -> u64 {
    DATA_ADDR + off
}
