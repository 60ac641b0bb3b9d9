//! virtio-blk: a hostile guest's descriptor chains against a real disk file.
//!
//! The device is built and activated through the virtio-mmio transport, added to a real
//! `EventManager`, and its request queue processed the way the VMM's event loop does
//! (activation event, then queue notifications). Input layout: `vmm_fuzz::guest`.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::block::{Block, BlockConfig};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::guest::{activate, notify_all, GuestInput};
use vmm_fuzz::ScratchDir;

/// Sectors of the disk (16: small enough to re-create per input, big enough for multi-sector
/// requests).
const DISK_BYTES: u64 = 16 * 512;

fn disk() -> &'static (ScratchDir, std::path::PathBuf) {
    static DISK: OnceLock<(ScratchDir, std::path::PathBuf)> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = ScratchDir::new("blk").expect("scratch dir");
        let path = dir.0.join("disk.img");
        (dir, path)
    })
}

fuzz_target!(|data: &[u8]| {
    let input = GuestInput::parse(data, 1);
    let mem = input.memory();
    let (_, path) = disk();
    // Known content per input, so one input's writes do not change the next one's reads.
    let content: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 512) as u8).collect();
    std::fs::write(path, &content).expect("write disk");
    // The last byte of the buffer area (when any) picks read-only, to reach the refusal path.
    let read_only = input.data.last().is_some_and(|b| b & 1 == 1);
    let block = Block::new(BlockConfig {
        path: path.clone(),
        read_only,
        id: Some("fuzz".into()),
    })
    .expect("open disk");
    let block = Arc::new(Mutex::new(block));
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().expect("event manager");
    em.add_subscriber(block.clone());
    let (transport, active) = activate(&mem, block.clone(), 1, input.queue_size);
    if !active {
        return;
    }
    // Activation event: registrations, then the queue is served once.
    let _ = em.run_with_timeout(0);
    // A doorbell, as the guest's QueueNotify write: served again (nothing new must appear).
    notify_all(&transport);
    let _ = em.run_with_timeout(0);
    // The disk never grows or shrinks, whatever the guest asked.
    let len = std::fs::metadata(path).expect("stat disk").len();
    assert_eq!(len, DISK_BYTES, "guest requests changed the disk size");
    if read_only {
        assert_eq!(
            std::fs::read(path).expect("read disk"),
            content,
            "a read-only disk was written"
        );
    }
});
