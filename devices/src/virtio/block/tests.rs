use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use snapshot::Persist;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::request::*;
use super::*;
use crate::virtio::mmio::{MmioTransport, MmioTransportConstructorArgs};
use crate::virtio::test_utils::*;
use crate::virtio::VirtioDevice;
use crate::GuestMemoryMmap;

const MEM_SIZE: usize = 0x100000;
const HDR: u64 = 0x40000;
const DATA: u64 = 0x41000;
const STATUS: u64 = 0x50000;
const DISK_SECTORS: u64 = 16;

fn features(read_only: bool) -> u64 {
    let mut f = (1u64 << 32) | (1 << 9) | (1 << 2);
    if read_only {
        f |= 1 << 5;
    }
    f
}

/// A disk whose sector n is filled with byte n.
fn disk_file() -> TempFile {
    let f = TempFile::new().unwrap();
    for s in 0..DISK_SECTORS {
        f.as_file().write_all(&[s as u8; 512]).unwrap();
    }
    f
}

struct Harness {
    mem: GuestMemoryMmap,
    q: TestQueue,
    block: Arc<Mutex<Block>>,
    transport: MmioTransport,
    irq: CountingInterrupt,
    file: TempFile,
}

fn harness_with(config: impl FnOnce(&TempFile) -> BlockConfig) -> Harness {
    let mem = guest_memory(MEM_SIZE);
    let file = disk_file();
    let block = Arc::new(Mutex::new(Block::new(config(&file)).unwrap()));
    let q = TestQueue::new(0x10000, 16);
    let read_only = block.lock().unwrap().config().read_only;
    let (transport, irq) = activate(&mem, block.clone(), features(read_only), &[&q]);
    Harness {
        mem,
        q,
        block,
        transport,
        irq,
        file,
    }
}

fn harness() -> Harness {
    harness_with(|f| BlockConfig {
        path: f.as_path().to_path_buf(),
        read_only: false,
        id: Some("disk-0".into()),
    })
}

impl Harness {
    fn header(&self, rtype: u32, sector: u64) {
        self.mem.write_obj(rtype, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Publishes `bufs`, runs the queue, returns (used len, status byte).
    fn run(&mut self, bufs: &[Buf]) -> (u32, u8) {
        let before = self.q.used_idx(&self.mem);
        self.q.push(&self.mem, bufs);
        self.block.lock().unwrap().process_queue();
        let after = self.q.used_idx(&self.mem);
        assert_eq!(
            after,
            before.wrapping_add(1),
            "exactly one request completes"
        );
        let (_, len) = self.q.used_elem(&self.mem, before);
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(&mut self, rtype: u32, sector: u64, data: &[Buf]) -> (u32, u8) {
        self.header(rtype, sector);
        let mut bufs = vec![rd(HDR, 16)];
        bufs.extend_from_slice(data);
        bufs.push(wr(STATUS, 1));
        self.run(&bufs)
    }
}

#[test]
fn config_space_and_features() {
    let h = harness();
    let dev = h.block.lock().unwrap();
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg = [0u8; 4];
    dev.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), u32::from(QUEUE_SIZE) - 2);
    assert_eq!(dev.avail_features(), features(false));
    assert_eq!(dev.device_type(), crate::virtio::TYPE_BLOCK);
}

#[test]
fn read_write_flush_get_id() {
    let mut h = harness();
    // Read sectors 2..4 into two buffers.
    let (len, status) = h.request(VIRTIO_BLK_T_IN, 2, &[wr(DATA, 512), wr(DATA + 0x1000, 512)]);
    assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK));
    let mut buf = [0u8; 512];
    h.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [2u8; 512]);
    h.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(buf, [3u8; 512]);
    assert_eq!(h.irq.count(), 1);

    // Write sector 5 from guest memory.
    h.mem
        .write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    let (len, status) = h.request(VIRTIO_BLK_T_OUT, 5, &[rd(DATA, 1024)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
    let mut disk = h.file.as_file();
    disk.seek(SeekFrom::Start(5 * 512)).unwrap();
    let mut back = vec![0u8; 1536];
    disk.read_exact(&mut back).unwrap();
    assert!(back[..1024].iter().all(|&b| b == 0xab));
    assert!(back[1024..].iter().all(|&b| b == 7));

    let (len, status) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));

    let (len, status) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[wr(DATA, 20)]);
    assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"disk-0\0");

    // The last sector is readable, one past it is not.
    let (_, status) = h.request(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, &[wr(DATA, 512)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let (len, status) = h.request(VIRTIO_BLK_T_IN, DISK_SECTORS, &[wr(DATA, 512)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
    // Writes past the end must not grow the file.
    let (len, status) = h.request(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, &[rd(DATA, 1024)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(
        h.file.as_file().metadata().unwrap().len(),
        DISK_SECTORS * 512
    );
}

#[test]
fn unsupported_request_type() {
    let mut h = harness();
    // DISCARD (11) is not offered.
    let (len, status) = h.request(11, 0, &[rd(DATA, 16)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_UNSUPP));
}

#[test]
fn read_only_disk_rejects_writes() {
    let mut h = harness_with(|f| BlockConfig {
        path: f.as_path().to_path_buf(),
        read_only: true,
        id: None,
    });
    assert_ne!(h.block.lock().unwrap().avail_features() & (1 << 5), 0);
    h.mem
        .write_slice(&[0xabu8; 512], GuestAddress(DATA))
        .unwrap();
    let (len, status) = h.request(VIRTIO_BLK_T_OUT, 1, &[rd(DATA, 512)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
    let mut disk = h.file.as_file();
    disk.seek(SeekFrom::Start(512)).unwrap();
    let mut back = [0u8; 512];
    disk.read_exact(&mut back).unwrap();
    assert_eq!(back, [1u8; 512]);
    // Reads still work.
    let (_, status) = h.request(VIRTIO_BLK_T_IN, 1, &[wr(DATA, 512)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn malformed_requests_get_ioerr() {
    let mut h = harness();
    // Header too short.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.run(&[rd(HDR, 8), wr(DATA, 512), wr(STATUS, 1)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Header writable.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.run(&[wr(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Header outside guest memory.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.run(&[rd(MEM_SIZE as u64 - 8, 16), wr(DATA, 512), wr(STATUS, 1)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Sector overflow (checked arithmetic).
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 1] {
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, sector, &[wr(DATA, 512)]),
            (1, VIRTIO_BLK_S_IOERR)
        );
    }
    // Length not a multiple of the sector size.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, &[wr(DATA, 100)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Read into a device-readable buffer; write from a device-writable one.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, &[rd(DATA, 512)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[wr(DATA, 512)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Data buffer outside guest memory, or straddling its end.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, &[wr(0x1_0000_0000, 512)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[rd(MEM_SIZE as u64 - 256, 512)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // The disk was not touched by any of these.
    let mut disk = h.file.as_file();
    disk.seek(SeekFrom::Start(0)).unwrap();
    let mut back = [0u8; 512];
    disk.read_exact(&mut back).unwrap();
    assert_eq!(back, [0u8; 512]);
}

#[test]
fn requests_without_usable_status_are_consumed_silently() {
    let mut h = harness();
    // No status descriptor at all: header only.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[rd(HDR, 16)]).0, 0);
    // Status descriptor device-readable.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[rd(HDR, 16), rd(STATUS, 1)]), (0, 0xff));
    // Status descriptor too long.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[rd(HDR, 16), wr(STATUS, 4)]), (0, 0xff));
    // Status outside guest memory.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[rd(HDR, 16), wr(MEM_SIZE as u64, 1)]).0, 0);
    // A write whose status cannot be reported is not performed.
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.mem
        .write_slice(&[0xcdu8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(h.run(&[rd(HDR, 16), rd(DATA, 512), rd(STATUS, 1)]).0, 0);
    let mut disk = h.file.as_file();
    disk.seek(SeekFrom::Start(0)).unwrap();
    let mut back = [0u8; 512];
    disk.read_exact(&mut back).unwrap();
    assert_eq!(back, [0u8; 512]);
}

#[test]
fn descriptor_loops_and_broken_links_terminate() {
    let mut h = harness();
    h.header(VIRTIO_BLK_T_IN, 0);
    // A three-descriptor loop: 0 -> 1 -> 2 -> 0.
    let base =
        h.q.add_chain(&h.mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    let last = (base + 2) % h.q.size;
    h.q.set_desc(
        &h.mem,
        last,
        STATUS,
        1,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        base,
    );
    h.q.publish(&h.mem, base);
    h.block.lock().unwrap().process_queue();
    assert_eq!(h.q.used_idx(&h.mem), 1);
    assert_eq!(h.q.used_elem(&h.mem, 0).1, 0);
    assert_eq!(h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);

    // A link to a descriptor index beyond the queue.
    let head = h.q.add_chain(&h.mem, &[rd(HDR, 16), wr(STATUS, 1)]);
    h.q.set_desc(&h.mem, head, HDR, 16, VRING_DESC_F_NEXT, 100);
    h.q.publish(&h.mem, head);
    h.block.lock().unwrap().process_queue();
    assert_eq!(h.q.used_idx(&h.mem), 2);
    assert_eq!(h.q.used_elem(&h.mem, 1).1, 0);

    // Chains that use the whole queue are fine when they terminate: a read
    // with 14 one-sector buffers.
    let mut data: Vec<Buf> = (0..14).map(|i| wr(DATA + i * 512, 512)).collect();
    data.insert(0, rd(HDR, 16));
    data.push(wr(STATUS, 1));
    assert_eq!(h.run(&data), (14 * 512 + 1, VIRTIO_BLK_S_OK));

    // Device still healthy.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 3, &[wr(DATA, 512)]),
        (513, VIRTIO_BLK_S_OK)
    );
}

#[test]
fn bad_head_index_does_not_block_later_requests() {
    let mut h = harness();
    // A head index beyond the queue, then a valid request.
    h.q.publish(&h.mem, 200);
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 2, &[wr(DATA, 512)]),
        (513, VIRTIO_BLK_S_OK)
    );
}

#[test]
fn avail_index_too_far_ahead_is_ignored() {
    let h = harness();
    // The driver claims 100 new entries in a 16-entry queue.
    h.mem.write_obj(100u16, h.q.avail.unchecked_add(2)).unwrap();
    h.block.lock().unwrap().process_queue();
    assert_eq!(h.q.used_idx(&h.mem), 0);
}

use vm_memory::Address;

#[test]
fn event_loop_activation_and_notification() {
    let mut h = harness();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    // A request posted before the event loop knows the device: served on
    // activation processing.
    h.header(VIRTIO_BLK_T_IN, 4);
    h.q.push(&h.mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    em.add_subscriber(h.block.clone());
    em.run_with_timeout(100).unwrap();
    assert_eq!(h.q.used_idx(&h.mem), 1);

    // A QueueNotify write (no ioeventfd here) reaches the device via the
    // eventfd.
    h.header(VIRTIO_BLK_T_IN, 6);
    h.q.push(&h.mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    write_reg(&mut h.transport, 0x50, 0);
    em.run_with_timeout(100).unwrap();
    assert_eq!(h.q.used_idx(&h.mem), 2);
    let mut buf = [0u8; 512];
    h.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [6u8; 512]);

    // After a reset the queue eventfd leaves the epoll set: a notify no
    // longer wakes the loop.
    write_reg(&mut h.transport, 0x70, 0);
    em.run_with_timeout(100).unwrap();
    write_reg(&mut h.transport, 0x50, 0);
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
}

#[test]
fn snapshot_restore_continues_where_it_stopped() {
    let mut h = harness();
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 1, &[wr(DATA, 512)]),
        (513, VIRTIO_BLK_S_OK)
    );
    // A request posted but not yet served when the snapshot is taken.
    h.header(VIRTIO_BLK_T_IN, 9);
    h.q.push(&h.mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);

    let block_state = h.block.lock().unwrap().save();
    let transport_state = h.transport.save();
    assert!(block_state.activated);
    let block_state: BlockState =
        serde_json::from_str(&serde_json::to_string(&block_state).unwrap()).unwrap();

    let block = Arc::new(Mutex::new(
        Block::restore(BlockConstructorArgs::default(), &block_state).unwrap(),
    ));
    assert!(!block.lock().unwrap().is_activated());
    let _transport = MmioTransport::restore(
        MmioTransportConstructorArgs {
            mem: h.mem.clone(),
            device: block.clone(),
            interrupt: Box::new(CountingInterrupt::default()),
        },
        &transport_state,
    )
    .unwrap();
    assert!(block.lock().unwrap().is_activated());
    assert_eq!(block.lock().unwrap().acked_features(), features(false));

    // The event loop serves the pending request once the device is added.
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(block.clone());
    em.run_with_timeout(100).unwrap();
    assert_eq!(h.q.used_idx(&h.mem), 2);
    assert_eq!(h.q.used_elem(&h.mem, 1).1, 513);
    let mut buf = [0u8; 512];
    h.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [9u8; 512]);

    // Restoring onto a disk of another size is refused.
    let other = TempFile::new().unwrap();
    other.as_file().write_all(&[0u8; 1024]).unwrap();
    assert!(matches!(
        Block::restore(
            BlockConstructorArgs {
                path_override: Some(other.as_path().to_path_buf())
            },
            &block_state
        ),
        Err(PersistError::CapacityChanged { .. })
    ));
}

#[test]
fn construction_errors() {
    assert!(matches!(
        Block::new(BlockConfig {
            path: "/nonexistent/disk.img".into(),
            read_only: false,
            id: None
        }),
        Err(BlockError::Open { .. })
    ));
    let f = disk_file();
    assert!(matches!(
        Block::new(BlockConfig {
            path: f.as_path().to_path_buf(),
            read_only: false,
            id: Some("x".repeat(21))
        }),
        Err(BlockError::IdTooLong { .. })
    ));
}

/// A block state as snapshots wrote it before the feature and activation
/// plumbing moved into `DeviceCore`: it must still restore, and a device
/// saves the same JSON it did then.
#[test]
fn snapshot_state_from_before_device_core_restores() {
    let f = disk_file();
    let path = serde_json::to_string(f.as_path()).unwrap();
    let json = |activated: bool| {
        format!(
            r#"{{"config":{{"path":{path},"read_only":false,"id":"d0"}},"avail_features":4294967812,"acked_features":4294967300,"capacity_sectors":16,"activated":{activated}}}"#
        )
    };
    let state: BlockState = serde_json::from_str(&json(true)).unwrap();
    let block = Block::restore(BlockConstructorArgs::default(), &state).unwrap();
    assert_eq!(block.avail_features(), features(false));
    assert_eq!(block.acked_features(), (1 << 32) | (1 << 2));
    assert!(!block.is_activated());
    assert_eq!(
        serde_json::to_string(&block.save()).unwrap(),
        json(false),
        "saved state changed shape"
    );

    // Features the device no longer offers are refused, with the old message.
    let mut other = state.clone();
    other.avail_features = 1 << 32;
    let Err(err) = Block::restore(BlockConstructorArgs::default(), &other) else {
        panic!("restored with other features");
    };
    assert!(matches!(err, PersistError::FeaturesChanged(_)));
    assert_eq!(
        err.to_string(),
        "device now offers features 0x100000204, the snapshot had 0x100000000"
    );
}
