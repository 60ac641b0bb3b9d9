//! Test helpers that play the guest driver: split queues laid out by hand in
//! guest memory, and the register sequence a Linux driver performs on the
//! virtio-mmio transport.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use super::VirtioDevice;
use crate::bus::BusDevice;
use crate::interrupt::Interrupt;
use crate::GuestMemoryMmap;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// Guest memory of `size` bytes at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// An interrupt line that counts how often it was raised.
#[derive(Clone, Default)]
pub struct CountingInterrupt(pub Arc<AtomicUsize>);

impl CountingInterrupt {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One split queue as the driver sees it. Descriptor table, available ring
/// and used ring are each placed on their own 4 KiB page from `base`.
pub struct TestQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

/// A buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn rd(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

pub fn wr(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

impl TestQueue {
    pub fn new(base: u64, size: u16) -> Self {
        Self {
            size,
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x1000 * (1 + u64::from(size) * 16 / 0x1000)),
            used: GuestAddress(base + 0x1000 * (2 + u64::from(size) * 16 / 0x1000)),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Writes one raw descriptor.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc.0 + u64::from(index) * 16;
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes `bufs` as a linked chain into free descriptors; returns the head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.set_desc(mem, index, b.addr, b.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        head
    }

    /// Makes descriptor chain `head` available to the device.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, self.avail.unchecked_add(4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Adds and publishes a chain.
    pub fn push(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.add_chain(mem, bufs);
        self.publish(mem, head);
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor head, length written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + u64::from(i % self.size) * 8);
        (
            mem.read_obj(at).unwrap(),
            mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }
}

use vm_memory::Address;

pub fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Runs the driver side of initialization up to FEATURES_OK, accepting
/// `features` (which must include VERSION_1 to succeed).
pub fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
    write_reg(t, 0x70, 0);
    write_reg(t, 0x70, STATUS_ACKNOWLEDGE);
    write_reg(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(t, 0x24, 0);
    write_reg(t, 0x20, features as u32);
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, (features >> 32) as u32);
    write_reg(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    read_reg(t, 0x70) & STATUS_FEATURES_OK != 0
}

/// Programs queue `index` from `q` and marks it ready.
pub fn setup_queue(t: &mut MmioTransport, index: u32, q: &TestQueue) {
    write_reg(t, 0x30, index);
    write_reg(t, 0x38, u32::from(q.size));
    write_reg(t, 0x80, q.desc.0 as u32);
    write_reg(t, 0x84, (q.desc.0 >> 32) as u32);
    write_reg(t, 0x90, q.avail.0 as u32);
    write_reg(t, 0x94, (q.avail.0 >> 32) as u32);
    write_reg(t, 0xa0, q.used.0 as u32);
    write_reg(t, 0xa4, (q.used.0 >> 32) as u32);
    write_reg(t, 0x44, 1);
}

/// The whole driver initialization: features, queues, DRIVER_OK. Returns the
/// transport and the interrupt counter.
pub fn activate(
    mem: &GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    features: u64,
    queues: &[&TestQueue],
) -> (MmioTransport, CountingInterrupt) {
    let irq = CountingInterrupt::default();
    let mut t = MmioTransport::new(mem.clone(), device, Box::new(irq.clone())).unwrap();
    assert!(negotiate(&mut t, features));
    for (i, q) in queues.iter().enumerate() {
        setup_queue(&mut t, i as u32, q);
    }
    write_reg(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    assert_eq!(read_reg(&mut t, 0x70) & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    (t, irq)
}
