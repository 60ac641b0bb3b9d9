//! virtio-vsock: a hostile guest's tx packets (headers, ops, ports, credit) and rx buffers,
//! with real Unix sockets on the host side.
//!
//! A host program listens on `<uds>_1024` (guest connections to port 1024 reach it; other
//! ports get RST) and, when the input has host bytes, one host program connects to `<uds>`
//! and writes them (`CONNECT <port>\n` and data). The device runs in a real `EventManager`
//! for a few rounds. Input layout: `vmm_fuzz::guest` (queues rx, tx, event).
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use devices::virtio::vsock::{Vsock, VsockConfig};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::guest::{activate, notify_all, GuestInput};
use vmm_fuzz::ScratchDir;

/// Rounds of the event loop per input.
const ROUNDS: usize = 4;

fuzz_target!(|data: &[u8]| {
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects (a host stream
    // closed under the device must not kill the fuzzer; the VMM's Rust main ignores SIGPIPE).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let input = GuestInput::parse(data, 3);
    let mem = input.memory();
    let dir = ScratchDir::new("vsock").expect("scratch dir");
    let uds = dir.0.join("v.sock");
    let host_listener = UnixListener::bind(dir.0.join("v.sock_1024")).expect("bind");
    host_listener.set_nonblocking(true).expect("nonblocking");
    let vsock = Vsock::new(&VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    })
    .expect("vsock device");
    let vsock = Arc::new(Mutex::new(vsock));
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().expect("event manager");
    em.add_subscriber(vsock.clone());
    let (transport, active) = activate(&mem, vsock.clone(), 3, input.queue_size);
    if !active {
        return;
    }
    let mut host = None;
    if !input.host.is_empty() {
        if let Ok(mut s) = UnixStream::connect(&uds) {
            let _ = s.set_nonblocking(true);
            let _ = s.write(input.host);
            host = Some(s);
        }
    }
    let mut accepted = Vec::new();
    for _ in 0..ROUNDS {
        let _ = em.run_with_timeout(0);
        notify_all(&transport);
        while let Ok((mut s, _)) = host_listener.accept() {
            let _ = s.set_nonblocking(true);
            let _ = s.write(b"hello from the host\n");
            accepted.push(s);
        }
    }
    // Processing the queues directly (the event handler's own calls) must agree.
    vsock.lock().expect("vsock lock").process_queues();
    drop(host);
    drop(accepted);
    let _ = em.run_with_timeout(0);
});
