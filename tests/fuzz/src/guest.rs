//! The guest side of the virtio fuzz targets.
//!
//! The fuzz input is what a hostile guest controls: the raw bytes of each split queue's
//! descriptor table and available ring, the buffers they point at, and the queue size it
//! programs into the transport. The layout of an input (every part is optional; missing bytes
//! read as zero):
//!
//! ```text
//! [0]        queue size the driver programs: byte % (MAX_QUEUE + 1) (0 and non-powers of two
//!            are invalid and must be refused by the transport)
//! [1..3]     host_len, u16 LE: the last host_len bytes of the input are the host side's
//!            bytes (a frame the TAP delivers, bytes a host program writes to a vsock socket)
//! then per queue, QUEUE_BYTES each:
//!            DESC_BYTES raw descriptor table (16 bytes per entry: addr u64, len u32,
//!            flags u16, next u16), then AVAIL_BYTES raw available ring (flags u16, idx u16,
//!            ring u16 * MAX_QUEUE)
//! then       the buffer area, copied to guest address DATA_ADDR
//! ```
//!
//! Guest memory is only `MEM_SIZE` bytes, so that random addresses often land inside it.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::interrupt::Interrupt;
use devices::virtio::mmio::{
    reg, MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// Largest queue size the fuzz driver lays out.
pub const MAX_QUEUE: u16 = 16;
/// Bytes of one descriptor table.
pub const DESC_BYTES: usize = 16 * MAX_QUEUE as usize;
/// Bytes of one available ring (flags, idx, ring; no used_event).
pub const AVAIL_BYTES: usize = 4 + 2 * MAX_QUEUE as usize;
/// Bytes of the input per queue.
pub const QUEUE_BYTES: usize = DESC_BYTES + AVAIL_BYTES;
/// Bytes of the input header.
pub const HEADER_BYTES: usize = 3;
/// Guest memory size.
pub const MEM_SIZE: usize = 0x4_0000;
/// Where the buffer area goes in guest memory.
pub const DATA_ADDR: u64 = 0x1_0000;
/// Largest buffer area.
pub const DATA_MAX: usize = MEM_SIZE - DATA_ADDR as usize;

/// Guest addresses of queue `index`: descriptor table, available ring, used ring (one page each).
pub fn queue_addrs(index: usize) -> (u64, u64, u64) {
    let base = 0x3000 * index as u64;
    (base, base + 0x1000, base + 0x2000)
}

/// A fuzz input taken apart.
pub struct GuestInput<'a> {
    /// Queue size the driver programs.
    pub queue_size: u16,
    /// Per queue: descriptor table and available ring bytes (possibly short).
    pub queues: Vec<&'a [u8]>,
    /// The buffer area.
    pub data: &'a [u8],
    /// Bytes the host side sends.
    pub host: &'a [u8],
}

impl<'a> GuestInput<'a> {
    /// Splits `input` for a device with `queues` queues.
    pub fn parse(input: &'a [u8], queues: usize) -> Self {
        let byte = |i: usize| input.get(i).copied().unwrap_or(0);
        let queue_size = u16::from(byte(0)) % (MAX_QUEUE + 1);
        let host_len = usize::from(u16::from_le_bytes([byte(1), byte(2)]));
        let rest = input.get(HEADER_BYTES..).unwrap_or(&[]);
        let host_len = host_len.min(rest.len());
        let (guest, host) = rest.split_at(rest.len() - host_len);
        let mut queue_parts = Vec::with_capacity(queues);
        let mut at = 0;
        for _ in 0..queues {
            let end = (at + QUEUE_BYTES).min(guest.len());
            queue_parts.push(&guest[at..end]);
            at = end;
        }
        let data = &guest[at..];
        let data = &data[..data.len().min(DATA_MAX)];
        Self {
            queue_size,
            queues: queue_parts,
            data,
            host,
        }
    }

    /// Fresh guest memory holding the queues and the buffer area.
    pub fn memory(&self) -> GuestMemoryMmap {
        // A fixed, valid range: cannot fail short of the host being out of memory, in which
        // case the fuzzer cannot run anyway.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("allocate guest memory");
        for (i, q) in self.queues.iter().enumerate() {
            let (desc, avail, _) = queue_addrs(i);
            let (d, a) = q.split_at(q.len().min(DESC_BYTES));
            write(&mem, desc, d);
            write(&mem, avail, a);
        }
        write(&mem, DATA_ADDR, self.data);
        mem
    }
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    // All writes are inside the fixed layout above.
    mem.write_slice(bytes, GuestAddress(addr))
        .expect("layout fits guest memory");
}

/// An interrupt line that goes nowhere.
pub struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Plays a Linux driver's initialization on the transport: accepts every offered feature,
/// programs `queues` queues of `size` at [`queue_addrs`] and sets DRIVER_OK. Returns the
/// transport (which must outlive the device's use of its queue eventfds) and whether the
/// device ended up activated; a refused queue size leaves it inactive, which is fine.
pub fn activate(
    mem: &GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    queues: usize,
    size: u16,
) -> (MmioTransport, bool) {
    let mut t = MmioTransport::new(mem.clone(), device, Box::new(NoInterrupt))
        .expect("device has valid queues");
    write_reg(&mut t, reg::STATUS, 0);
    write_reg(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
    write_reg(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in 0..2 {
        write_reg(&mut t, reg::DEVICE_FEATURES_SEL, sel);
        let f = read_reg(&mut t, reg::DEVICE_FEATURES);
        write_reg(&mut t, reg::DRIVER_FEATURES_SEL, sel);
        write_reg(&mut t, reg::DRIVER_FEATURES, f);
    }
    let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    write_reg(&mut t, reg::STATUS, features_ok);
    for i in 0..queues {
        let (desc, avail, used) = queue_addrs(i);
        write_reg(&mut t, reg::QUEUE_SEL, i as u32);
        write_reg(&mut t, reg::QUEUE_NUM, u32::from(size));
        write_reg(&mut t, reg::QUEUE_DESC_LOW, desc as u32);
        write_reg(&mut t, reg::QUEUE_DESC_HIGH, 0);
        write_reg(&mut t, reg::QUEUE_AVAIL_LOW, avail as u32);
        write_reg(&mut t, reg::QUEUE_AVAIL_HIGH, 0);
        write_reg(&mut t, reg::QUEUE_USED_LOW, used as u32);
        write_reg(&mut t, reg::QUEUE_USED_HIGH, 0);
        write_reg(&mut t, reg::QUEUE_READY, 1);
    }
    write_reg(&mut t, reg::STATUS, features_ok | STATUS_DRIVER_OK);
    let active = read_reg(&mut t, reg::STATUS) & STATUS_DRIVER_OK != 0;
    (t, active)
}

/// Rings every queue's doorbell, as the guest's QueueNotify write does through the ioeventfd.
pub fn notify_all(t: &MmioTransport) {
    for evt in t.queue_notify_evts() {
        let _ = evt.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds::{data, DeviceSeed};
    use devices::virtio::block::{Block, BlockConfig};
    use event_manager::{EventManager, SubscriberOps};

    /// The harness really drives the device: a read request from a seed completes, with the
    /// disk's bytes in the guest buffer and status OK in the status byte.
    #[test]
    fn a_seed_request_completes_through_the_transport() {
        let dir = crate::ScratchDir::new("guest-test").unwrap();
        let disk = dir.0.join("disk");
        std::fs::write(&disk, vec![7u8; 4096]).unwrap();
        let mut seed = DeviceSeed::new(1);
        let (hdr, buf, status) = (data(0), data(0x100), data(0x1000));
        let mut h = 0u32.to_le_bytes().to_vec(); // VIRTIO_BLK_T_IN
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&1u64.to_le_bytes());
        seed.put(hdr, &h);
        seed.put(status, &[0xff]);
        seed.queues[0].chain(&[(hdr, 16, false), (buf, 512, true), (status, 1, true)]);
        let bytes = seed.encode();
        let input = GuestInput::parse(&bytes, 1);
        assert_eq!(input.queue_size, MAX_QUEUE);
        let mem = input.memory();
        let block = Arc::new(Mutex::new(
            Block::new(BlockConfig {
                path: disk,
                read_only: false,
                id: None,
            })
            .unwrap(),
        ));
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(block.clone());
        let (_t, active) = activate(&mem, block, 1, input.queue_size);
        assert!(active);
        em.run_with_timeout(0).unwrap();
        let used_idx: u16 = mem.read_obj(GuestAddress(queue_addrs(0).2 + 2)).unwrap();
        assert_eq!(used_idx, 1);
        let s: u8 = mem.read_obj(GuestAddress(status)).unwrap();
        assert_eq!(s, 0, "VIRTIO_BLK_S_OK");
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
        assert!(got.iter().all(|&b| b == 7));
    }

    #[test]
    fn short_inputs_read_as_zero() {
        let input = GuestInput::parse(&[5], 3);
        assert_eq!(input.queue_size, 5);
        assert!(input.host.is_empty() && input.data.is_empty());
        assert_eq!(input.queues.len(), 3);
        let host = GuestInput::parse(&[16, 2, 0, 9, 8, 7], 1);
        assert_eq!(host.host, &[8, 7]);
        assert_eq!(host.queues[0], &[9]);
    }
}
