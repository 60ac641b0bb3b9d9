use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use snapshot::Persist;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mmio::{MmioTransport, MmioTransportConstructorArgs};
use crate::virtio::test_utils::*;
use crate::virtio::VirtioDevice;
use crate::GuestMemoryMmap;

const MEM_SIZE: usize = 0x100000;
const BUF: u64 = 0x40000;
const FEATURES: u64 = (1 << 32) | (1 << 5);

fn socket_tap() -> (Tap, UnixDatagram) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let fd: OwnedFd = ours.into();
    (Tap::from_file(fd.into(), "sock".into()), peer)
}

fn config() -> NetConfig {
    NetConfig {
        tap: "sock".into(),
        mac: Some("02:00:00:00:00:01".parse().unwrap()),
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    rxq: TestQueue,
    txq: TestQueue,
    net: Arc<Mutex<Net>>,
    transport: MmioTransport,
    irq: CountingInterrupt,
    peer: UnixDatagram,
}

fn harness() -> Harness {
    let mem = guest_memory(MEM_SIZE);
    let (tap, peer) = socket_tap();
    let net = Arc::new(Mutex::new(Net::with_tap(config(), tap).unwrap()));
    let rxq = TestQueue::new(0x10000, 16);
    let txq = TestQueue::new(0x20000, 16);
    let (transport, irq) = activate(&mem, net.clone(), FEATURES, &[&rxq, &txq]);
    Harness {
        mem,
        rxq,
        txq,
        net,
        transport,
        irq,
        peer,
    }
}

/// A frame with a header full of garbage (offload bits the guest did not
/// negotiate) and a recognizable payload.
fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xeeu8; VNET_HDR_LEN];
    f.extend((0..payload_len).map(|i| seed.wrapping_add(i as u8)));
    f
}

fn normalized(f: &[u8]) -> Vec<u8> {
    let mut f = f.to_vec();
    f[..10].fill(0);
    f[10..12].copy_from_slice(&1u16.to_le_bytes());
    f
}

#[test]
fn mac_address_parsing() {
    let mac: MacAddr = "aa:BB:0c:dd:ee:0f".parse().unwrap();
    assert_eq!(mac.0, [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f]);
    assert_eq!(mac.to_string(), "aa:bb:0c:dd:ee:0f");
    for bad in [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "aa:bb:cc:dd:ee:f",
        "aa-bb-cc-dd-ee-ff",
        "gg:bb:cc:dd:ee:ff",
        "+a:bb:cc:dd:ee:ff",
    ] {
        let err = bad.parse::<MacAddr>().unwrap_err();
        assert!(err.to_string().contains("aa:bb:cc:dd:ee:ff"), "{err}");
    }
    let json = serde_json::to_string(&config()).unwrap();
    assert!(json.contains("\"02:00:00:00:00:01\""));
    assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), config());
    assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t","mac":"nope"}"#).is_err());
    assert_eq!(
        serde_json::from_str::<NetConfig>(r#"{"tap":"t"}"#)
            .unwrap()
            .mac,
        None
    );
}

#[test]
fn features_and_config_space() {
    let h = harness();
    let net = h.net.lock().unwrap();
    assert_eq!(net.avail_features(), FEATURES);
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    drop(net);
    let (tap, _peer) = socket_tap();
    let no_mac = Net::with_tap(
        NetConfig {
            tap: "x".into(),
            mac: None,
        },
        tap,
    )
    .unwrap();
    assert_eq!(no_mac.avail_features(), 1 << 32);
}

#[test]
fn transmit_gathers_chains() {
    let mut h = harness();
    let f = frame(100, 1);
    h.mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    // Header and payload in separate descriptors, payload split too.
    h.txq
        .push(&h.mem, &[rd(BUF, 12), rd(BUF + 12, 50), rd(BUF + 62, 50)]);
    assert!(h.net.lock().unwrap().process_tx());
    let mut got = vec![0u8; MAX_FRAME_LEN];
    let n = h.peer.recv(&mut got).unwrap();
    let mut expect = f.clone();
    expect[..10].fill(0);
    assert_eq!(&got[..n], &expect[..]);
    assert_eq!(h.txq.used_idx(&h.mem), 1);
    assert_eq!(h.txq.used_elem(&h.mem, 0), (0, 0));
    assert_eq!(h.irq.count(), 1);
    assert_eq!(h.net.lock().unwrap().counters().tx_frames, 1);
}

#[test]
fn malformed_transmit_chains_are_dropped() {
    let mut h = harness();
    // Device-writable buffer in a tx chain.
    h.txq.push(&h.mem, &[rd(BUF, 12), wr(BUF + 12, 50)]);
    // Outside guest memory.
    h.txq
        .push(&h.mem, &[rd(BUF, 12), rd(MEM_SIZE as u64 - 10, 50)]);
    // Larger than any frame.
    h.txq.push(&h.mem, &[rd(BUF, 40000), rd(BUF, 40000)]);
    // Shorter than a header.
    h.txq.push(&h.mem, &[rd(BUF, 8)]);
    // A descriptor loop.
    let head = h.txq.add_chain(&h.mem, &[rd(BUF, 12), rd(BUF, 12)]);
    h.txq
        .set_desc(&h.mem, head + 1, BUF, 12, VRING_DESC_F_NEXT, head);
    h.txq.publish(&h.mem, head);
    assert!(h.net.lock().unwrap().process_tx());
    assert_eq!(h.txq.used_idx(&h.mem), 5);
    for i in 0..5 {
        assert_eq!(h.txq.used_elem(&h.mem, i).1, 0);
    }
    let mut got = [0u8; 64];
    assert!(h.peer.recv(&mut got).is_err(), "nothing reaches the TAP");
    let c = h.net.lock().unwrap().counters().clone();
    assert_eq!((c.tx_frames, c.tx_bad_chains), (0, 5));
}

#[test]
fn receive_into_buffers() {
    let mut h = harness();
    let f = frame(60, 7);
    h.peer.send(&f).unwrap();
    h.rxq.push(&h.mem, &[wr(BUF, 40), wr(BUF + 0x1000, 1500)]);
    assert!(h.net.lock().unwrap().process_rx());
    assert_eq!(h.rxq.used_idx(&h.mem), 1);
    assert_eq!(h.rxq.used_elem(&h.mem, 0), (0, f.len() as u32));
    let mut got = vec![0u8; f.len()];
    h.mem.read_slice(&mut got[..40], GuestAddress(BUF)).unwrap();
    h.mem
        .read_slice(&mut got[40..], GuestAddress(BUF + 0x1000))
        .unwrap();
    assert_eq!(got, normalized(&f));
    assert_eq!(h.irq.count(), 1);
}

#[test]
fn receive_drops_oversized_frames_and_survives_bad_chains() {
    let mut h = harness();
    let big = frame(200, 1);
    let small = frame(20, 2);
    h.peer.send(&big).unwrap();
    h.peer.send(&small).unwrap();
    // Too small for `big`: the frame is dropped, the buffer returned empty.
    h.rxq.push(&h.mem, &[wr(BUF, 100)]);
    // Device-readable: the chain is returned, `small` waits for the next.
    h.rxq.push(&h.mem, &[rd(BUF + 0x1000, 100)]);
    h.rxq.push(&h.mem, &[wr(BUF + 0x2000, 100)]);
    assert!(h.net.lock().unwrap().process_rx());
    assert_eq!(h.rxq.used_idx(&h.mem), 3);
    assert_eq!(h.rxq.used_elem(&h.mem, 0).1, 0);
    assert_eq!(h.rxq.used_elem(&h.mem, 1).1, 0);
    assert_eq!(h.rxq.used_elem(&h.mem, 2).1, small.len() as u32);
    let mut got = vec![0u8; small.len()];
    h.mem
        .read_slice(&mut got, GuestAddress(BUF + 0x2000))
        .unwrap();
    assert_eq!(got, normalized(&small));
    let c = h.net.lock().unwrap().counters().clone();
    assert_eq!(
        (c.rx_frames, c.rx_dropped_too_big, c.rx_bad_chains),
        (1, 1, 1)
    );
}

#[test]
fn event_loop_pauses_tap_without_buffers() {
    let mut h = harness();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(h.net.clone());
    em.run_with_timeout(100).unwrap(); // activation
    assert!(h.net.lock().unwrap().tap_registered);

    // A frame arrives, the guest has no buffers: the frame is held and the
    // TAP leaves the epoll set, so the loop does not spin on it.
    let f1 = frame(30, 3);
    let f2 = frame(40, 4);
    h.peer.send(&f1).unwrap();
    h.peer.send(&f2).unwrap();
    em.run_with_timeout(100).unwrap();
    assert!(!h.net.lock().unwrap().tap_registered);
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);

    // The guest adds buffers and notifies: both frames arrive.
    h.rxq.push(&h.mem, &[wr(BUF, 100)]);
    h.rxq.push(&h.mem, &[wr(BUF + 0x1000, 100)]);
    write_reg(&mut h.transport, 0x50, 0);
    em.run_with_timeout(100).unwrap();
    assert_eq!(h.rxq.used_idx(&h.mem), 2);
    assert_eq!(h.rxq.used_elem(&h.mem, 0).1, f1.len() as u32);
    assert_eq!(h.rxq.used_elem(&h.mem, 1).1, f2.len() as u32);
    assert!(h.net.lock().unwrap().tap_registered);

    // Transmit through a QueueNotify write.
    h.mem.write_slice(&frame(10, 9), GuestAddress(BUF)).unwrap();
    h.txq.push(&h.mem, &[rd(BUF, 22)]);
    write_reg(&mut h.transport, 0x50, 1);
    em.run_with_timeout(100).unwrap();
    let mut got = [0u8; 64];
    assert_eq!(h.peer.recv(&mut got).unwrap(), 22);

    // Reset: TAP and queues leave the epoll set.
    write_reg(&mut h.transport, 0x70, 0);
    em.run_with_timeout(100).unwrap();
    assert!(!h.net.lock().unwrap().tap_registered);
    h.peer.send(&f1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
}

#[test]
fn snapshot_restore_keeps_queue_positions() {
    let mut h = harness();
    h.peer.send(&frame(30, 1)).unwrap();
    h.rxq.push(&h.mem, &[wr(BUF, 100)]);
    h.net.lock().unwrap().process_rx();
    // Posted, not consumed, at snapshot time.
    h.rxq.push(&h.mem, &[wr(BUF + 0x1000, 100)]);

    let net_state = h.net.lock().unwrap().save();
    let transport_state = h.transport.save();
    let net_state: NetState =
        serde_json::from_str(&serde_json::to_string(&net_state).unwrap()).unwrap();
    assert!(net_state.activated);

    let (tap, peer) = socket_tap();
    let restored = Net::finish_restore(
        Net::with_tap(net_state.config.clone(), tap).unwrap(),
        &net_state,
    )
    .unwrap();
    let net = Arc::new(Mutex::new(restored));
    let _t = MmioTransport::restore(
        MmioTransportConstructorArgs {
            mem: h.mem.clone(),
            device: net.clone(),
            interrupt: Box::new(CountingInterrupt::default()),
        },
        &transport_state,
    )
    .unwrap();
    assert_eq!(net.lock().unwrap().acked_features(), FEATURES);
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(net.clone());
    em.run_with_timeout(100).unwrap();
    let f = frame(44, 5);
    peer.send(&f).unwrap();
    em.run_with_timeout(100).unwrap();
    // The frame lands in the second buffer, as the guest expects.
    assert_eq!(h.rxq.used_idx(&h.mem), 2);
    assert_eq!(h.rxq.used_elem(&h.mem, 1), (1, f.len() as u32));

    // Restoring with a MAC that changes the offered features is refused.
    let mut other = net_state.clone();
    other.config.mac = None;
    let (tap, _peer) = socket_tap();
    assert!(matches!(
        Net::finish_restore(
            Net::with_tap(other.config.clone(), tap).unwrap(),
            &net_state
        ),
        Err(PersistError::FeaturesChanged(_))
    ));
}

#[test]
fn tap_name_validation() {
    for bad in ["", "a/b", "has space", "sixteen-chars-xx"] {
        assert!(
            matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
            "{bad}"
        );
    }
}

/// Runs only where /dev/net/tun exists and we may create interfaces (root);
/// otherwise it says so and passes.
#[test]
fn real_tap_round_trip() {
    use std::process::Command;
    let name = format!("vmmt{}", std::process::id() % 100_000);
    let tap = match Tap::open(&name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIPPED real_tap_round_trip: cannot create TAP {name}: {e}");
            return;
        }
    };
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let octet = 100 + std::process::id() % 100;
    let host_ip = format!("10.213.{octet}.1/24");
    if !ip(&["addr", "add", &host_ip, "dev", &name]) || !ip(&["link", "set", &name, "up"]) {
        eprintln!("SKIPPED real_tap_round_trip: cannot configure {name} with ip(8)");
        return;
    }
    let mem = guest_memory(MEM_SIZE);
    let net = Arc::new(Mutex::new(Net::with_tap(config(), tap).unwrap()));
    let mut rxq = TestQueue::new(0x10000, 16);
    let mut txq = TestQueue::new(0x20000, 16);
    let (_t, _irq) = activate(&mem, net.clone(), FEATURES, &[&rxq, &txq]);

    // Host -> guest: a UDP packet to a neighbour makes the host ARP for it
    // through the TAP.
    for i in 0..4 {
        rxq.push(&mem, &[wr(BUF + i * 0x1000, 2048)]);
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let _ = sock.send_to(b"x", format!("10.213.{octet}.2:9"));
    let mut received = 0;
    for _ in 0..100 {
        net.lock().unwrap().process_rx();
        received = rxq.used_idx(&mem);
        if received > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(received > 0, "no frame from the host within 2 s");
    let (_, len) = rxq.used_elem(&mem, 0);
    let mut f = vec![0u8; len as usize];
    mem.read_slice(&mut f, GuestAddress(BUF)).unwrap();
    // Ethernet type at 12 (after the 12-byte vnet header): ARP or IPv6 ND
    // or IPv4, all fine; the broadcast or multicast bit must be set for
    // ARP requests.
    assert!(len as usize > VNET_HDR_LEN + 14);

    // Guest -> host: a broadcast ARP request shows up in the TAP's rx
    // statistics.
    let stats = format!("/sys/class/net/{name}/statistics/rx_packets");
    let before: u64 = std::fs::read_to_string(&stats)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut arp = vec![0u8; VNET_HDR_LEN];
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 213, octet as u8, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 213, octet as u8, 1]);
    mem.write_slice(&arp, GuestAddress(BUF + 0x10000)).unwrap();
    txq.push(&mem, &[rd(BUF + 0x10000, arp.len() as u32)]);
    assert!(net.lock().unwrap().process_tx());
    assert_eq!(net.lock().unwrap().counters().tx_frames, 1);
    let after: u64 = std::fs::read_to_string(&stats)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(after, before + 1);
}

/// A net state as snapshots wrote it before the feature and activation
/// plumbing moved into `DeviceCore`: it must still restore, and a device
/// saves the same JSON it did then.
#[test]
fn snapshot_state_from_before_device_core_restores() {
    let json = |activated: bool| {
        format!(
            r#"{{"config":{{"tap":"sock","mac":"02:00:00:00:00:01"}},"avail_features":4294967328,"acked_features":4294967328,"activated":{activated}}}"#
        )
    };
    let state: NetState = serde_json::from_str(&json(true)).unwrap();
    let (tap, _peer) = socket_tap();
    let net =
        Net::finish_restore(Net::with_tap(state.config.clone(), tap).unwrap(), &state).unwrap();
    assert_eq!(net.avail_features(), FEATURES);
    assert_eq!(net.acked_features(), FEATURES);
    assert!(!net.is_activated());
    assert_eq!(
        serde_json::to_string(&net.save()).unwrap(),
        json(false),
        "saved state changed shape"
    );

    let mut other = state.clone();
    other.avail_features = 1 << 32;
    let (tap, _peer) = socket_tap();
    let Err(err) = Net::finish_restore(Net::with_tap(state.config.clone(), tap).unwrap(), &other)
    else {
        panic!("restored with other features");
    };
    assert_eq!(
        err.to_string(),
        "device now offers features 0x100000020, the snapshot had 0x100000000"
    );
}
