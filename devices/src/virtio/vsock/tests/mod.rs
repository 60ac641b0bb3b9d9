//! Tests that play the guest driver against the device: split queues in a
//! `GuestMemoryMmap`, packets built by hand, a real `EventManager` running
//! the device, and real Unix sockets on the host side.

mod basic;
mod stress;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{Header, HDR_SIZE, HOST_CID, TYPE_STREAM};
use super::{Vsock, VsockConfig};
use crate::virtio::test_utils::{guest_memory, rd, wr, CountingInterrupt, TestQueue};
use crate::virtio::{ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::GuestMemoryMmap;

pub const CID: u64 = 3;
const RX_SIZE: u16 = 128;
const TX_SIZE: u16 = 64;
const EV_SIZE: u16 = 8;
/// Linux's rx buffer: 4 KiB of payload after the header, one descriptor.
pub const RX_BUF: u32 = 4096 + HDR_SIZE as u32;
const RX_BUFS: u64 = 0x10_0000;
const TX_HDRS: u64 = 0x30_0000;
const TX_DATA: u64 = 0x40_0000;
const EV_BUFS: u64 = 0x90_0000;

/// A directory removed when the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vsock-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The driver side: three queues and their buffers in guest memory.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub rxq: TestQueue,
    pub txq: TestQueue,
    pub evq: TestQueue,
    rx_seen: u16,
    tx_seen: u16,
    ev_seen: u16,
    tx_next_desc: u16,
    rx_next_desc: u16,
    /// Descriptor counts of tx chains not yet used, oldest first.
    tx_inflight: std::collections::VecDeque<u16>,
}

impl Guest {
    fn new() -> Self {
        Self {
            mem: guest_memory(16 << 20),
            rxq: TestQueue::new(0, RX_SIZE),
            txq: TestQueue::new(0x1_0000, TX_SIZE),
            evq: TestQueue::new(0x2_0000, EV_SIZE),
            rx_seen: 0,
            tx_seen: 0,
            ev_seen: 0,
            tx_next_desc: 0,
            rx_next_desc: 0,
            tx_inflight: Default::default(),
        }
    }

    fn queue(tq: &TestQueue) -> ActiveQueue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(tq.size);
        q.try_set_desc_table_address(tq.desc).unwrap();
        q.try_set_avail_ring_address(tq.avail).unwrap();
        q.try_set_used_ring_address(tq.used).unwrap();
        q.set_ready(true);
        ActiveQueue {
            queue: q,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// Posts `n` rx buffers of `RX_BUF` bytes.
    pub fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            // One-descriptor chains: the head index names the buffer.
            let idx = self.rx_next_desc;
            self.rxq.push(&self.mem, &[wr(rx_addr(idx), RX_BUF)]);
            self.rx_next_desc = (idx + 1) % RX_SIZE;
        }
    }

    /// Posts one rx chain laid out by the caller.
    pub fn post_rx_raw(&mut self, bufs: &[crate::virtio::test_utils::Buf]) {
        self.rxq.push(&self.mem, bufs);
        self.rx_next_desc = (self.rx_next_desc + bufs.len() as u16) % RX_SIZE;
    }

    /// Whether a tx chain of `descs` descriptors fits beside those in flight.
    pub fn tx_room(&mut self, descs: u16) -> bool {
        self.reap_tx();
        self.tx_inflight.iter().sum::<u16>() + descs <= TX_SIZE
    }

    fn reap_tx(&mut self) {
        let used = self.txq.used_idx(&self.mem);
        while self.tx_seen != used {
            self.tx_seen = self.tx_seen.wrapping_add(1);
            self.tx_inflight.pop_front();
        }
    }

    /// Queues a packet on tx: header and payload in separate descriptors.
    pub fn send(&mut self, hdr: &Header, payload: &[u8]) {
        let mut raw = hdr.to_bytes().to_vec();
        self.send_raw(&mut raw, payload);
    }

    /// Queues raw header bytes (possibly malformed) and a payload.
    pub fn send_raw(&mut self, hdr: &mut Vec<u8>, payload: &[u8]) {
        let descs = if payload.is_empty() { 1 } else { 2 };
        assert!(self.tx_room(descs), "tx queue full");
        let d = self.tx_next_desc;
        let haddr = TX_HDRS + u64::from(d) * 64;
        hdr.truncate(64);
        self.mem.write_slice(hdr, GuestAddress(haddr)).unwrap();
        let mut bufs = vec![rd(haddr, hdr.len() as u32)];
        if !payload.is_empty() {
            let paddr = TX_DATA + u64::from(d) * 0x1_0000;
            self.mem.write_slice(payload, GuestAddress(paddr)).unwrap();
            bufs.push(rd(paddr, payload.len() as u32));
        }
        self.txq.push(&self.mem, &bufs);
        self.tx_next_desc = (d + descs) % TX_SIZE;
        self.tx_inflight.push_back(descs);
    }

    /// Packets the device put on rx since the last call; each buffer is
    /// posted again when `repost`.
    pub fn recv(&mut self, repost: bool) -> Vec<(Header, Vec<u8>)> {
        let used = self.rxq.used_idx(&self.mem);
        let mut out = Vec::new();
        while self.rx_seen != used {
            let (head, len) = self.rxq.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = rx_addr(head as u16);
            if (len as usize) < HDR_SIZE {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(hdr.len as usize + HDR_SIZE, len as usize, "used len");
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_SIZE as u64))
                .unwrap();
            out.push((hdr, data));
            if repost {
                self.post_rx(1);
            }
        }
        out
    }

    /// Posts event buffers.
    pub fn post_events(&mut self, n: u16) {
        for i in 0..n {
            self.evq
                .push(&self.mem, &[wr(EV_BUFS + u64::from(i) * 16, 8)]);
        }
    }

    /// Event ids the device wrote since the last call.
    pub fn events(&mut self) -> Vec<u32> {
        let used = self.evq.used_idx(&self.mem);
        let mut out = Vec::new();
        while self.ev_seen != used {
            let (head, len) = self.evq.used_elem(&self.mem, self.ev_seen);
            self.ev_seen = self.ev_seen.wrapping_add(1);
            assert_eq!(len, 4);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(EV_BUFS + u64::from(head) * 16))
                .unwrap();
            out.push(id);
        }
        out
    }
}

fn rx_addr(idx: u16) -> u64 {
    RX_BUFS + u64::from(idx) * 0x2000
}

/// A guest-to-host header with our CID.
pub fn ghdr(op: u16, src_port: u32, dst_port: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// The device in a real event manager, with the guest beside it.
pub struct Harness {
    pub em: EventManager<Arc<Mutex<Vsock>>>,
    pub dev: Arc<Mutex<Vsock>>,
    pub guest: Guest,
    pub irq: CountingInterrupt,
    notify: Vec<EventFd>,
    /// Keeps the socket directory alive.
    _dir: TempDir,
    pub uds: PathBuf,
}

impl Harness {
    /// An activated device with `rx_bufs` rx buffers posted.
    pub fn new(rx_bufs: u16) -> Self {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let dev = Vsock::new(&VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        Self::with_device(dev, dir, uds, rx_bufs)
    }

    pub fn with_device(dev: Vsock, dir: TempDir, uds: PathBuf, rx_bufs: u16) -> Self {
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let irq = CountingInterrupt::default();
        let mut h = Self {
            em,
            dev,
            guest: Guest::new(),
            irq,
            notify: Vec::new(),
            _dir: dir,
            uds,
        };
        h.activate(rx_bufs);
        h
    }

    /// Plays a driver (re)initialising the device on fresh rings, with
    /// `rx_bufs` rx buffers posted.
    pub fn activate(&mut self, rx_bufs: u16) {
        let mut guest = Guest::new();
        guest.post_rx(rx_bufs);
        let queues: Vec<ActiveQueue> = [&guest.rxq, &guest.txq, &guest.evq]
            .into_iter()
            .map(Guest::queue)
            .collect();
        self.notify = queues
            .iter()
            .map(|q| q.notify.try_clone().unwrap())
            .collect();
        let interrupt = Arc::new(VirtioInterrupt::new(Box::new(self.irq.clone())));
        self.dev
            .lock()
            .unwrap()
            .activate(guest.mem.clone(), interrupt, queues)
            .unwrap();
        self.guest = guest;
        self.turn(10);
    }

    /// One event-loop iteration (waits at most `ms`); returns the number of
    /// events dispatched.
    pub fn turn(&mut self, ms: i32) -> usize {
        self.em.run_with_timeout(ms).unwrap()
    }

    pub fn notify_tx(&self) {
        self.notify[1].write(1).unwrap();
    }

    pub fn notify_rx(&self) {
        self.notify[0].write(1).unwrap();
    }

    pub fn notify_ev(&self) {
        self.notify[2].write(1).unwrap();
    }

    /// Sends a packet and lets the device process it.
    pub fn send(&mut self, hdr: &Header, payload: &[u8]) {
        self.guest.send(hdr, payload);
        self.notify_tx();
        self.turn(10);
    }

    /// Runs the loop until the guest received `n` packets (or panics after
    /// a few seconds).
    pub fn recv_n(&mut self, n: usize) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while out.len() < n {
            assert!(Instant::now() < deadline, "got only {out:?}, want {n}");
            self.turn(20);
            out.extend(self.guest.recv(true));
        }
        out
    }

    /// Connects a host program and sends `CONNECT port`; returns the stream
    /// and the REQUEST the guest got.
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        std::io::Write::write_all(&mut s, format!("CONNECT {port}\n").as_bytes()).unwrap();
        let pkts = self.recv_n(1);
        (s, pkts[0].0)
    }

    /// Lets the loop run a little and returns what the guest got.
    pub fn settle(&mut self) -> Vec<(Header, Vec<u8>)> {
        for _ in 0..5 {
            self.turn(10);
        }
        self.guest.recv(true)
    }
}
