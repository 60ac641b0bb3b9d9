//! Connection setup, data, credit, close and error paths.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use snapshot::Persist;

use super::super::connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use super::super::packet::*;
use super::super::{Vsock, VsockConfig, VsockConstructorArgs, VsockError, EVENT_TRANSPORT_RESET};
use super::*;
use crate::virtio::test_utils::wr;

const GPORT: u32 = 52;

/// Host connect + guest accept; returns the host stream and host port.
fn established(h: &mut Harness, guest_buf_alloc: u32) -> (UnixStream, u32) {
    let (mut s, req) = h.host_connect(GPORT);
    h.send(
        &ghdr(OP_RESPONSE, GPORT, req.src_port, guest_buf_alloc, 0),
        &[],
    );
    let mut line = [0u8; 64];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let expect = format!("OK {}\n", req.src_port);
    let n = s.read(&mut line).unwrap();
    assert_eq!(&line[..n], expect.as_bytes());
    (s, req.src_port)
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// EOF (or reset) on the host stream within a few seconds.
fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF, got {other:?}"),
    }
}

#[test]
fn host_initiated_connect_and_data() {
    let mut h = Harness::new(16);
    let (mut s, req) = h.host_connect(GPORT);
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
    assert_eq!(req.dst_port, GPORT);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(req.type_, TYPE_STREAM);
    let host_port = req.src_port;

    h.send(&ghdr(OP_RESPONSE, GPORT, host_port, 65536, 0), &[]);
    assert_eq!(
        read_exactly(&mut s, format!("OK {host_port}\n").len()),
        format!("OK {host_port}\n").as_bytes()
    );

    s.write_all(b"hello guest").unwrap();
    let pkts = h.recv_n(1);
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (host_port, GPORT));
    assert_eq!(pkts[0].1, b"hello guest");

    let mut rw = ghdr(OP_RW, GPORT, host_port, 65536, 11);
    rw.len = 10;
    h.send(&rw, b"hello host");
    assert_eq!(read_exactly(&mut s, 10), b"hello host");
    assert_eq!(h.dev.lock().unwrap().connection_count(), 1);
    assert!(h.irq.count() > 0);
}

#[test]
fn data_after_connect_line_is_kept() {
    let mut h = Harness::new(16);
    let mut s = UnixStream::connect(&h.uds).unwrap();
    // The line and the first data in one write.
    s.write_all(b"CONNECT 52\nearly bytes").unwrap();
    let req = h.recv_n(1)[0].0;
    assert_eq!(req.op, OP_REQUEST);
    h.send(&ghdr(OP_RESPONSE, GPORT, req.src_port, 65536, 0), &[]);
    let pkts = h.recv_n(1);
    assert_eq!(pkts[0].1, b"early bytes");
}

#[test]
fn bad_connect_line_closes_stream() {
    let mut h = Harness::new(16);
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"HELLO 52\n").unwrap();
    h.settle();
    assert_eof(&mut s);
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(&[b'x'; 100]).unwrap();
    h.settle();
    assert_eof(&mut s);
    assert!(h.guest.recv(true).is_empty());
}

#[test]
fn guest_refuses_host_connect() {
    let mut h = Harness::new(16);
    let (mut s, req) = h.host_connect(GPORT);
    h.send(&ghdr(OP_RST, GPORT, req.src_port, 0, 0), &[]);
    assert_eof(&mut s);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
    // Nothing is sent back for an RST.
    assert!(h.settle().is_empty());
}

#[test]
fn credit_limits_host_to_guest() {
    let mut h = Harness::new(32);
    let (mut s, host_port) = established(&mut h, 1000);
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&data).unwrap();

    let mut got = Vec::new();
    let mut fwd = 0u32;
    while got.len() < data.len() {
        let pkts = h.settle();
        let mut requested = false;
        for (hdr, payload) in pkts {
            match hdr.op {
                OP_RW => got.extend(payload),
                OP_CREDIT_REQUEST => requested = true,
                op => panic!("unexpected op {op}"),
            }
        }
        // Never more than the credit the guest granted.
        assert!(
            got.len() as u32 <= fwd + 1000,
            "{} > {}",
            got.len(),
            fwd + 1000
        );
        if (got.len() as u32) < data.len() as u32 {
            assert_eq!(got.len() as u32, fwd + 1000, "device stalled below credit");
            assert!(requested, "device did not ask for credit");
            // No credit: the readable host socket must not spin the loop.
            assert_eq!(h.turn(50), 0);
        }
        fwd = got.len() as u32;
        h.send(&ghdr(OP_CREDIT_UPDATE, GPORT, host_port, 1000, fwd), &[]);
    }
    assert_eq!(got, data);
}

#[test]
fn guest_to_host_credit_update_and_request() {
    let mut h = Harness::new(16);
    let (mut s, host_port) = established(&mut h, 65536);
    // A credit request is answered with our counters.
    h.send(&ghdr(OP_CREDIT_REQUEST, GPORT, host_port, 65536, 0), &[]);
    let p = h.recv_n(1);
    assert_eq!(p[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!((p[0].0.buf_alloc, p[0].0.fwd_cnt), (CONN_BUF_ALLOC, 0));

    // Forwarding past the threshold produces an update on its own.
    let chunk = vec![0xabu8; 32 * 1024];
    let mut sent = 0u32;
    while sent < CREDIT_UPDATE_THRESHOLD {
        let mut rw = ghdr(OP_RW, GPORT, host_port, 65536, 0);
        rw.len = chunk.len() as u32;
        h.send(&rw, &chunk);
        sent += rw.len;
    }
    let got = read_exactly(&mut s, sent as usize);
    assert!(got.iter().all(|&b| b == 0xab));
    let p = h.recv_n(1);
    assert_eq!(p[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(p[0].0.fwd_cnt, sent);
}

#[test]
fn slow_host_reader_throttles_and_overrun_resets() {
    let mut h = Harness::new(16);
    let (mut s, host_port) = established(&mut h, 65536);
    // The host does not read: the device buffers up to the credit it gave,
    // then a guest ignoring credit is reset.
    let chunk = vec![1u8; 64 * 1024];
    let mut rst = false;
    for _ in 0..64 {
        let mut rw = ghdr(OP_RW, GPORT, host_port, 65536, 0);
        rw.len = chunk.len() as u32;
        h.send(&rw, &chunk);
        let pkts = h.guest.recv(true);
        if pkts.iter().any(|(p, _)| p.op == OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "credit overrun was not reset");
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
    // The host sees the data that was forwarded, then EOF.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    assert!(all.iter().all(|&b| b == 1));
}

#[test]
fn guest_initiated_connect_data_and_close() {
    let mut h = Harness::new(16);
    let mut path = h.uds.clone().into_os_string();
    path.push("_1234");
    let listener = UnixListener::bind(&path).unwrap();
    h.send(&ghdr(OP_REQUEST, 5000, 1234, 65536, 0), &[]);
    let p = h.recv_n(1);
    assert_eq!(p[0].0.op, OP_RESPONSE);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (1234, 5000));
    let (mut s, _) = listener.accept().unwrap();

    let mut rw = ghdr(OP_RW, 5000, 1234, 65536, 0);
    rw.len = 4;
    h.send(&rw, b"ping");
    assert_eq!(read_exactly(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let p = h.recv_n(1);
    assert_eq!((p[0].0.op, p[0].1.as_slice()), (OP_RW, &b"pong"[..]));

    // Graceful close by the guest: data first, then RST, host sees EOF.
    rw.len = 3;
    h.send(&rw, b"bye");
    let mut sd = ghdr(OP_SHUTDOWN, 5000, 1234, 65536, 4);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(&sd, &[]);
    let p = h.recv_n(1);
    assert_eq!(p[0].0.op, OP_RST);
    assert_eq!(read_exactly(&mut s, 3), b"bye");
    assert_eof(&mut s);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut h = Harness::new(16);
    h.send(&ghdr(OP_REQUEST, 5000, 999, 65536, 0), &[]);
    let p = h.recv_n(1);
    assert_eq!(p[0].0.op, OP_RST);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (999, 5000));
    // A connect to another CID is refused too.
    let mut req = ghdr(OP_REQUEST, 5001, 1, 65536, 0);
    req.dst_cid = 7;
    h.send(&req, &[]);
    assert_eq!(h.recv_n(1)[0].0.op, OP_RST);
}

#[test]
fn host_half_close_and_hangup() {
    let mut h = Harness::new(16);
    let (mut s, host_port) = established(&mut h, 65536);
    s.write_all(b"last").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let p = h.recv_n(2);
    assert_eq!(p[0].1, b"last");
    assert_eq!(p[1].0.op, OP_SHUTDOWN);
    assert_eq!(p[1].0.flags, SHUTDOWN_SEND);
    // The guest can still answer.
    let mut rw = ghdr(OP_RW, GPORT, host_port, 65536, 4);
    rw.len = 5;
    h.send(&rw, b"reply");
    assert_eq!(read_exactly(&mut s, 5), b"reply");
    assert!(h.settle().is_empty());
    assert_eq!(h.turn(50), 0, "half-closed stream spins the loop");

    // Full hang-up: the guest is told the host receives no more either.
    let (s2, host_port2) = established(&mut h, 65536);
    drop(s2);
    let p = h.recv_n(1);
    assert_eq!(p[0].0.op, OP_SHUTDOWN);
    assert_eq!(p[0].0.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    assert_eq!(h.turn(50), 0, "hung-up stream spins the loop");
    h.send(&ghdr(OP_RST, GPORT, host_port2, 0, 0), &[]);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 1);
}

#[test]
fn unknown_connection_gets_rst() {
    let mut h = Harness::new(16);
    let mut rw = ghdr(OP_RW, 4000, 77, 65536, 0);
    rw.len = 3;
    h.send(&rw, b"abc");
    let p = h.recv_n(1);
    assert_eq!(p[0].0.op, OP_RST);
    assert_eq!(
        (p[0].0.src_port, p[0].0.dst_port, p[0].0.dst_cid),
        (77, 4000, CID)
    );
    // RST to an unknown connection is not answered.
    h.send(&ghdr(OP_RST, 4000, 77, 0, 0), &[]);
    assert!(h.settle().is_empty());
}

#[test]
fn malformed_packets_are_dropped() {
    let mut h = Harness::new(16);
    let good = ghdr(OP_RW, 4000, 77, 65536, 0);
    // Short header.
    h.guest.send_raw(&mut good.to_bytes()[..20].to_vec(), &[]);
    // len beyond the chain.
    let mut bad = good;
    bad.len = 100;
    h.guest.send(&bad, b"short");
    // len beyond the maximum.
    bad.len = MAX_PKT_PAYLOAD as u32 + 1;
    h.guest.send(&bad, b"x");
    // Wrong source CID, wrong type, unknown op, payload on a control op.
    let mut b = good;
    b.src_cid = 9;
    h.guest.send(&b, &[]);
    let mut b = good;
    b.type_ = 2;
    h.guest.send(&b, &[]);
    let mut b = good;
    b.op = 42;
    h.guest.send(&b, &[]);
    let mut b = ghdr(OP_REQUEST, 4000, 77, 0, 0);
    b.len = 1;
    h.guest.send(&b, b"z");
    h.notify_tx();
    assert!(h.settle().is_empty(), "a malformed packet got an answer");
    // All consumed, and the device still works.
    let used = h.guest.txq.used_idx(&h.guest.mem);
    assert_eq!(used, 7);
    h.send(&ghdr(OP_CREDIT_REQUEST, 4000, 77, 0, 0), &[]);
    assert_eq!(h.recv_n(1)[0].0.op, OP_RST);
}

#[test]
fn rx_buffer_too_small_is_skipped() {
    let mut h = Harness::new(0);
    // One useless 8-byte buffer, then a good one.
    h.guest.post_rx_raw(&[wr(0x80_0000, 8)]);
    h.guest.post_rx_raw(&[wr(0x80_1000, RX_BUF)]);
    h.notify_rx();
    h.send(&ghdr(OP_CREDIT_UPDATE, 4000, 77, 0, 0), &[]);
    h.settle();
    let used = h.guest.rxq.used_idx(&h.guest.mem);
    assert_eq!(used, 2);
    assert_eq!(h.guest.rxq.used_elem(&h.guest.mem, 0).1, 0);
    assert_eq!(h.guest.rxq.used_elem(&h.guest.mem, 1).1, HDR_SIZE as u32);
}

#[test]
fn packets_wait_for_rx_buffers() {
    let mut h = Harness::new(0);
    h.send(&ghdr(OP_REQUEST, 5000, 999, 65536, 0), &[]);
    assert_eq!(h.guest.rxq.used_idx(&h.guest.mem), 0);
    assert_eq!(h.turn(50), 0);
    h.guest.post_rx(1);
    h.notify_rx();
    assert_eq!(h.recv_n(1)[0].0.op, OP_RST);
}

#[test]
fn transport_reset_drops_connections_and_notifies() {
    let mut h = Harness::new(16);
    h.guest.post_events(2);
    h.notify_ev();
    h.turn(10);
    let (mut s, _) = established(&mut h, 65536);
    let irqs = h.irq.count();
    h.dev.lock().unwrap().transport_reset();
    h.turn(10);
    assert_eq!(h.guest.events(), vec![EVENT_TRANSPORT_RESET]);
    assert!(h.irq.count() > irqs);
    assert_eof(&mut s);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn config_features_and_activation_errors() {
    let dir = TempDir::new();
    let cfg = VsockConfig {
        guest_cid: 0x1_0000_0007,
        uds_path: dir.0.join("v.sock"),
    };
    assert!(matches!(Vsock::new(&cfg), Err(VsockError::InvalidCid(_))));
    let cfg = VsockConfig {
        guest_cid: 2,
        ..cfg
    };
    assert!(matches!(Vsock::new(&cfg), Err(VsockError::InvalidCid(2))));
    let bad = VsockConfig {
        guest_cid: 3,
        uds_path: dir.0.join("missing/dir/v.sock"),
    };
    assert!(matches!(Vsock::new(&bad), Err(VsockError::Bind { .. })));

    // A stale socket file is replaced.
    let cfg = VsockConfig {
        guest_cid: 0x1234,
        uds_path: dir.0.join("v.sock"),
    };
    drop(UnixListener::bind(&cfg.uds_path).unwrap());
    let mut dev = Vsock::new(&cfg).unwrap();
    assert_eq!(dev.device_type(), crate::virtio::TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234);
    let mut b = [0xffu8; 4];
    dev.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
    dev.read_config(100, &mut b);
    assert_eq!(b, [0; 4]);
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features(), 1 << crate::virtio::VIRTIO_F_VERSION_1);

    let g = Guest::new();
    let irq = Arc::new(VirtioInterrupt::new(Box::new(CountingInterrupt::default())));
    let err = dev
        .activate(g.mem.clone(), irq, vec![Guest::queue(&g.rxq)])
        .unwrap_err();
    assert!(matches!(
        err,
        crate::virtio::ActivateError::QueueCount { .. }
    ));
    assert!(!dev.is_activated());
    assert!(dev.queue_states().is_empty());
}

#[test]
fn snapshot_restore_resets_the_guest_transport() {
    let mut h = Harness::new(16);
    let (mut s, _) = established(&mut h, 65536);
    h.dev
        .lock()
        .unwrap()
        .set_acked_features(1 << crate::virtio::VIRTIO_F_VERSION_1);
    let state = h.dev.lock().unwrap().save();
    assert!(state.activated);
    assert_eq!(state.config.guest_cid, CID);
    assert_eq!(h.dev.lock().unwrap().queue_states().len(), 3);
    let json = serde_json::to_string(&state).unwrap();
    let state: super::super::VsockState = serde_json::from_str(&json).unwrap();

    // Restore beside the original on another path; the transport activates.
    let dir = TempDir::new();
    let uds = dir.0.join("r.sock");
    let dev = Vsock::restore(
        VsockConstructorArgs {
            uds_path_override: Some(uds.clone()),
        },
        &state,
    )
    .unwrap();
    assert!(!dev.is_activated());
    assert_eq!(dev.acked_features(), 1 << crate::virtio::VIRTIO_F_VERSION_1);
    let mut r = Harness::with_device(dev, dir, uds, 16);
    // The event buffers come after activation: the event waits for them.
    assert!(r.guest.events().is_empty());
    r.guest.post_events(1);
    r.notify_ev();
    r.turn(10);
    assert_eq!(r.guest.events(), vec![EVENT_TRANSPORT_RESET]);
    // Sent once only.
    r.guest.post_events(1);
    r.notify_ev();
    r.turn(10);
    assert!(r.guest.events().is_empty());
    // The restored device serves new connections.
    let (_s2, req) = r.host_connect(GPORT);
    assert_eq!(req.op, OP_REQUEST);
    drop(h);
    assert_eof(&mut s);

    let mut bad = state.clone();
    bad.acked_features = 1 << 5;
    assert!(matches!(
        Vsock::restore(VsockConstructorArgs::default(), &bad),
        Err(VsockError::Features { .. })
    ));
}

#[test]
fn driver_reset_and_reactivation() {
    let mut h = Harness::new(16);
    let (mut s, _) = established(&mut h, 65536);
    assert!(h.dev.lock().unwrap().reset());
    h.turn(10);
    assert!(!h.dev.lock().unwrap().is_activated());
    assert_eof(&mut s);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
    // While inactive, host connections are closed at once.
    let mut early = UnixStream::connect(&h.uds).unwrap();
    h.turn(10);
    assert_eof(&mut early);
    // The old queue eventfds left the event loop; new ones work.
    h.activate(16);
    let (_s, req) = h.host_connect(GPORT);
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(h.turn(50), 0);
}

/// Regression (found by fuzzing): an avail index the queue refuses (more
/// than a queue's worth ahead) made the queue loop spin forever on the
/// event-loop thread. The device must give up on the queue and return.
#[test]
fn out_of_range_tx_avail_index_does_not_hang() {
    let h = Harness::new(4);
    let avail_idx = vm_memory::GuestAddress(h.guest.txq.avail.0 + 2);
    h.guest.mem.write_obj(0x0100u16, avail_idx).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dev = h.dev.clone();
    std::thread::spawn(move || {
        dev.lock().unwrap().process_queues();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("process_queues must return on a refused avail index");
}

/// A vsock state as snapshots wrote it before the feature bits moved into
/// `Features`: it must still restore, and a device saves the same JSON.
#[test]
fn snapshot_state_from_before_features_restores() {
    let dir = TempDir::new();
    let uds = serde_json::to_string(&dir.0.join("old.sock")).unwrap();
    let json = |activated: bool| {
        format!(
            r#"{{"config":{{"guest_cid":7,"uds_path":{uds}}},"acked_features":4294967296,"activated":{activated}}}"#
        )
    };
    let state: super::super::VsockState = serde_json::from_str(&json(true)).unwrap();
    let dev = Vsock::restore(VsockConstructorArgs::default(), &state).unwrap();
    assert_eq!(dev.acked_features(), 1 << crate::virtio::VIRTIO_F_VERSION_1);
    assert!(!dev.is_activated());
    assert_eq!(serde_json::to_string(&dev.save()).unwrap(), json(false));
}
