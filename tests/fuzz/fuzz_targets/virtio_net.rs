//! virtio-net: a hostile guest's rx and tx descriptor chains, with a socket pair standing in
//! for the TAP (the device's own tests do the same through the public `Tap::from_file`).
//!
//! The host side of the input (see `vmm_fuzz::guest`) is delivered as one frame from the
//! "network", so the receive path writes into buffers the guest described. Frames the guest
//! transmits are read back and checked against the device's limits.
#![no_main]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use devices::virtio::net::{Net, NetConfig, Tap, MAX_FRAME_LEN, VNET_HDR_LEN};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::guest::{activate, notify_all, GuestInput};

fuzz_target!(|data: &[u8]| {
    let input = GuestInput::parse(data, 2);
    let mem = input.memory();
    let (ours, peer) = UnixDatagram::pair().expect("socketpair");
    ours.set_nonblocking(true).expect("nonblocking");
    peer.set_nonblocking(true).expect("nonblocking");
    let fd: OwnedFd = ours.into();
    let tap = Tap::from_file(fd.into(), "fuzz".into());
    let config = NetConfig {
        tap: "fuzz".into(),
        mac: Some("02:00:00:00:00:01".parse().expect("mac")),
    };
    let net = Arc::new(Mutex::new(Net::with_tap(config, tap).expect("net device")));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().expect("event manager");
    em.add_subscriber(net.clone());
    let (transport, active) = activate(&mem, net.clone(), 2, input.queue_size);
    if !active {
        return;
    }
    if !input.host.is_empty() {
        let _ = peer.send(input.host);
    }
    let _ = em.run_with_timeout(0);
    notify_all(&transport);
    let _ = em.run_with_timeout(0);
    let _ = em.run_with_timeout(0);
    // Whatever the guest transmitted: a header and at most the largest frame.
    let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
    while let Ok(n) = peer.recv(&mut buf) {
        assert!(
            (VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&n),
            "transmitted a {n}-byte frame"
        );
    }
});
