use std::sync::{Arc, Mutex};

use snapshot::Persist;
use virtio_queue::{QueueOwnedT, QueueState, QueueT};

use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::ActiveState;

const FEATURES: u64 = (1 << crate::virtio::VIRTIO_F_VERSION_1) | 0b101;

/// A device with two queues that records what the transport does to it.
struct Dummy {
    acked: u64,
    active: Option<ActiveState>,
    activations: usize,
    resets: usize,
    config: [u8; 8],
    supports_reset: bool,
}

impl Dummy {
    fn new() -> Self {
        Self {
            acked: 0,
            active: None,
            activations: 0,
            resets: 0,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            supports_reset: true,
        }
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        if start + data.len() <= self.config.len() {
            self.config[start..start + data.len()].copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), crate::virtio::ActivateError> {
        self.activations += 1;
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queues,
        });
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, ActiveState::queue_states)
    }
    fn reset(&mut self) -> bool {
        if self.supports_reset {
            self.resets += 1;
            self.active = None;
        }
        self.supports_reset
    }
}

fn dummy() -> (Arc<Mutex<Dummy>>, Arc<Mutex<dyn VirtioDevice>>) {
    let d = Arc::new(Mutex::new(Dummy::new()));
    let dyn_d: Arc<Mutex<dyn VirtioDevice>> = d.clone();
    (d, dyn_d)
}

fn driver_ok(t: &mut MmioTransport) {
    let status = read_reg(t, 0x70);
    write_reg(t, 0x70, status | STATUS_DRIVER_OK);
}

fn queues() -> (TestQueue, TestQueue) {
    (TestQueue::new(0x10000, 16), TestQueue::new(0x20000, 16))
}

#[test]
fn identification_registers() {
    let mem = guest_memory(0x100000);
    let (_, dev) = dummy();
    let mut t = MmioTransport::new(mem, dev, Box::new(CountingInterrupt::default())).unwrap();
    assert_eq!(read_reg(&mut t, 0x0), 0x7472_6976);
    assert_eq!(read_reg(&mut t, 0x4), 2);
    assert_eq!(read_reg(&mut t, 0x8), 42);
    assert_eq!(read_reg(&mut t, 0xc), VENDOR_ID);
    assert_eq!(t.queue_notify_evts().len(), 2);
    // Wrong-size register accesses read as zero and change nothing.
    let mut two = [0xffu8; 2];
    t.read(0x0, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(0x70, &[1, 0]);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    // Unaligned.
    let mut four = [0xffu8; 4];
    t.read(0x2, &mut four);
    assert_eq!(four, [0; 4]);
}

#[test]
fn feature_select_and_negotiation() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let mut t = MmioTransport::new(mem, dev, Box::new(CountingInterrupt::default())).unwrap();
    write_reg(&mut t, 0x14, 0);
    assert_eq!(read_reg(&mut t, 0x10), FEATURES as u32);
    write_reg(&mut t, 0x14, 1);
    assert_eq!(read_reg(&mut t, 0x10), (FEATURES >> 32) as u32);
    write_reg(&mut t, 0x14, 7);
    assert_eq!(read_reg(&mut t, 0x10), 0);

    // Features outside the offer are refused: FEATURES_OK stays clear.
    assert!(!negotiate(&mut t, FEATURES | (1 << 20)));
    assert_eq!(d.lock().unwrap().acked, 0);
    // VERSION_1 is mandatory.
    assert!(!negotiate(&mut t, 0b1));
    assert!(negotiate(&mut t, FEATURES & !0b100));
    assert_eq!(d.lock().unwrap().acked, FEATURES & !0b100);

    // Driver features cannot change after FEATURES_OK.
    write_reg(&mut t, 0x24, 0);
    write_reg(&mut t, 0x20, 0);
    assert!(negotiate(&mut t, FEATURES));
}

#[test]
fn status_state_machine_rejects_skips() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let mut t = MmioTransport::new(mem, dev, Box::new(CountingInterrupt::default())).unwrap();
    // DRIVER_OK straight away is refused.
    write_reg(&mut t, 0x70, STATUS_DRIVER_OK);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    write_reg(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    write_reg(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(read_reg(&mut t, 0x70), STATUS_ACKNOWLEDGE);
    // Clearing bits without a reset is refused.
    write_reg(&mut t, 0x70, STATUS_DRIVER);
    assert_eq!(read_reg(&mut t, 0x70), STATUS_ACKNOWLEDGE);
    // FAILED is always accepted.
    write_reg(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_FAILED);
    assert_eq!(read_reg(&mut t, 0x70), STATUS_ACKNOWLEDGE | STATUS_FAILED);
    assert!(!d.lock().unwrap().is_activated());
}

#[test]
fn activation_hands_queues_to_device() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let (q0, q1) = queues();
    let (mut t, _irq) = activate(&mem, dev, FEATURES, &[&q0, &q1]);
    let dev = d.lock().unwrap();
    let active = dev.active.as_ref().unwrap();
    assert_eq!(active.queues.len(), 2);
    assert_eq!(active.queues[1].queue.desc_table(), q1.desc.0);
    assert_eq!(active.queues[1].queue.avail_ring(), q1.avail.0);
    assert_eq!(active.queues[1].queue.used_ring(), q1.used.0);
    assert_eq!(active.queues[0].queue.size(), 16);
    drop(dev);
    // Queue registers are frozen once the device runs.
    write_reg(&mut t, 0x30, 0);
    write_reg(&mut t, 0x38, 8);
    assert_eq!(
        d.lock().unwrap().active.as_ref().unwrap().queues[0]
            .queue
            .size(),
        16
    );
}

#[test]
fn queue_notify_write_signals_eventfd() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let (q0, q1) = queues();
    let (mut t, _irq) = activate(&mem, dev, FEATURES, &[&q0, &q1]);
    write_reg(&mut t, 0x50, 1);
    // The device's copy is a dup of the transport's eventfd.
    assert_eq!(
        d.lock().unwrap().active.as_ref().unwrap().queues[1]
            .notify
            .read()
            .unwrap(),
        1
    );
    assert!(t.queue_notify_evts()[0].read().is_err());
    // Nonexistent queue: ignored.
    write_reg(&mut t, 0x50, 9);
}

#[test]
fn invalid_queue_size_sets_needs_reset() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let (q0, q1) = queues();
    let mut t = MmioTransport::new(mem, dev, Box::new(CountingInterrupt::default())).unwrap();
    assert!(negotiate(&mut t, FEATURES));
    write_reg(&mut t, 0x30, 0);
    assert_eq!(read_reg(&mut t, 0x34), 16);
    write_reg(&mut t, 0x38, 12); // not a power of two
    assert_ne!(read_reg(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    setup_queue(&mut t, 0, &q0);
    setup_queue(&mut t, 1, &q1);
    driver_ok(&mut t);
    assert!(!d.lock().unwrap().is_activated());

    // Too big is rejected as well, after a reset.
    assert!(negotiate(&mut t, FEATURES));
    assert_eq!(read_reg(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    write_reg(&mut t, 0x38, 32);
    assert_ne!(read_reg(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    // Selecting a queue that does not exist reads as max 0.
    write_reg(&mut t, 0x30, 5);
    assert_eq!(read_reg(&mut t, 0x34), 0);
}

#[test]
fn queue_outside_memory_is_not_activated() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let q0 = TestQueue::new(0x10000, 16);
    let q1 = TestQueue::new(0xff000, 16); // rings beyond the end of memory
    let mut t = MmioTransport::new(mem, dev, Box::new(CountingInterrupt::default())).unwrap();
    assert!(negotiate(&mut t, FEATURES));
    setup_queue(&mut t, 0, &q0);
    setup_queue(&mut t, 1, &q1);
    driver_ok(&mut t);
    let status = read_reg(&mut t, 0x70);
    assert_eq!(status & STATUS_DRIVER_OK, 0);
    assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(!d.lock().unwrap().is_activated());

    // A queue that was never made ready is refused too.
    assert!(negotiate(&mut t, FEATURES));
    setup_queue(&mut t, 0, &q0);
    driver_ok(&mut t);
    assert!(!d.lock().unwrap().is_activated());
}

#[test]
fn reset_clears_device_and_registers() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let (q0, q1) = queues();
    let (mut t, irq) = activate(&mem, dev, FEATURES, &[&q0, &q1]);
    t.interrupt().signal_used_queue().unwrap();
    assert_eq!(irq.count(), 1);
    assert_eq!(read_reg(&mut t, 0x60), 1);
    write_reg(&mut t, 0x64, 1);
    assert_eq!(read_reg(&mut t, 0x60), 0);
    t.interrupt().signal_used_queue().unwrap();

    write_reg(&mut t, 0x70, 0);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    assert_eq!(read_reg(&mut t, 0x60), 0);
    write_reg(&mut t, 0x30, 0);
    assert_eq!(read_reg(&mut t, 0x44), 0);
    {
        let dev = d.lock().unwrap();
        assert_eq!(dev.resets, 1);
        assert!(!dev.is_activated());
        assert_eq!(dev.acked, 0);
    }
    // And the device can be brought up again.
    assert!(negotiate(&mut t, FEATURES));
    setup_queue(&mut t, 0, &q0);
    setup_queue(&mut t, 1, &q1);
    driver_ok(&mut t);
    assert_eq!(d.lock().unwrap().activations, 2);
}

#[test]
fn reset_of_device_without_reset_support_fails_it() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    d.lock().unwrap().supports_reset = false;
    let (q0, q1) = queues();
    let (mut t, _) = activate(&mem, dev, FEATURES, &[&q0, &q1]);
    write_reg(&mut t, 0x70, 0);
    assert_ne!(read_reg(&mut t, 0x70) & STATUS_FAILED, 0);
}

#[test]
fn config_space_passthrough() {
    let mem = guest_memory(0x100000);
    let (_, dev) = dummy();
    let mut t = MmioTransport::new(mem, dev, Box::new(CountingInterrupt::default())).unwrap();
    let mut b = [0u8; 2];
    t.read(0x102, &mut b);
    assert_eq!(b, [3, 4]);
    t.write(0x100, &[9]);
    let mut b = [0u8; 8];
    t.read(0x100, &mut b);
    assert_eq!(b, [9, 2, 3, 4, 5, 6, 7, 8]);
    // Beyond the device's space reads as zero.
    t.read(0x1f8, &mut b);
    assert_eq!(b, [0; 8]);
    assert_eq!(read_reg(&mut t, 0xfc), 0);
}

#[test]
fn snapshot_restore_keeps_queue_positions() {
    let mem = guest_memory(0x100000);
    let (d, dev) = dummy();
    let (mut q0, q1) = queues();
    let (mut t, _) = activate(&mem, dev, FEATURES, &[&q0, &q1]);
    // The "device" consumes two chains from queue 0.
    q0.push(&mem, &[rd(0x50000, 4)]);
    q0.push(&mem, &[rd(0x50000, 4)]);
    {
        let mut dev = d.lock().unwrap();
        let active = dev.active.as_mut().unwrap();
        let q = &mut active.queues[0].queue;
        for _ in 0..2 {
            let chain = q.iter(&active.mem).unwrap().next().unwrap();
            q.add_used(&active.mem, chain.head_index(), 0).unwrap();
        }
    }
    t.interrupt().signal_used_queue().unwrap();
    write_reg(&mut t, 0x30, 1);
    let state = t.save();
    assert_eq!(state.queues[0].next_avail, 2);
    assert_eq!(state.queues[0].next_used, 2);
    assert_eq!(state.interrupt_status, 1);

    // Through serde, as the snapshot file would.
    let state: MmioTransportState =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let (d2, dev2) = dummy();
    let mut t2 = MmioTransport::restore(
        MmioTransportConstructorArgs {
            mem: mem.clone(),
            device: dev2,
            interrupt: Box::new(CountingInterrupt::default()),
        },
        &state,
    )
    .unwrap();
    assert_eq!(read_reg(&mut t2, 0x70), state.status);
    assert_eq!(read_reg(&mut t2, 0x60), 1);
    assert_eq!(read_reg(&mut t2, 0x44), 1); // queue 1 selected and ready
    let dev2 = d2.lock().unwrap();
    assert_eq!(dev2.acked, FEATURES);
    let active = dev2.active.as_ref().unwrap();
    assert_eq!(active.queues[0].queue.next_avail(), 2);
    assert_eq!(active.queues[0].queue.next_used(), 2);
    assert_eq!(active.queues[1].queue.used_ring(), q1.used.0);

    // A state with the wrong number of queues is refused.
    let mut bad = state.clone();
    bad.queues.pop();
    let (_, dev3) = dummy();
    assert!(matches!(
        MmioTransport::restore(
            MmioTransportConstructorArgs {
                mem,
                device: dev3,
                interrupt: Box::new(CountingInterrupt::default()),
            },
            &bad,
        ),
        Err(PersistError::QueueCount { .. })
    ));
}
