//! A sustained transfer both ways at once on one connection, with a guest
//! that grants little credit and a host reader that pauses: checks content,
//! flow control and a graceful close without deadlock.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::super::packet::*;
use super::*;

/// Byte `i` of test stream `seed` (a splitmix64 of the 8-byte block).
fn byte_at(seed: u64, i: u64) -> u8 {
    let mut z = (seed ^ (i / 8)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> ((i % 8) * 8)) as u8
}

fn fill(seed: u64, start: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = byte_at(seed, start + k as u64);
    }
}

const H2G: u64 = 0x1111;
const G2H: u64 = 0x2222;

/// Size of each direction, MiB (`VSOCK_STRESS_MIB` overrides).
fn stress_len() -> u64 {
    let mib = std::env::var("VSOCK_STRESS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16u64);
    mib << 20
}

#[test]
fn bidirectional_transfer_with_flow_control() {
    let total = stress_len();
    transfer(total, total);
}

/// One direction at a time: progress then rests on explicit credit updates
/// alone (no data packets carry credit the other way).
#[test]
fn one_way_transfers_make_progress() {
    transfer(0, 8 << 20);
    transfer(8 << 20, 0);
}

/// Moves `h2g` bytes host->guest and `g2h` bytes guest->host at once.
fn transfer(h2g: u64, g2h: u64) {
    let guest_buf_alloc: u32 = 128 * 1024;
    let gport = 7000;
    let mut h = Harness::new(64);

    let (mut s, req) = h.host_connect(gport);
    let host_port = req.src_port;
    h.send(
        &ghdr(OP_RESPONSE, gport, host_port, guest_buf_alloc, 0),
        &[],
    );
    // The `OK` line, byte by byte so no data is eaten.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    assert_eq!(line, format!("OK {host_port}\n").into_bytes());
    s.set_read_timeout(None).unwrap();

    let mut ws = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 48 * 1024 + 17];
        let mut pos = 0u64;
        while pos < h2g {
            let n = (buf.len() as u64).min(h2g - pos) as usize;
            fill(H2G, pos, &mut buf[..n]);
            ws.write_all(&buf[..n]).unwrap();
            pos += n as u64;
        }
        ws.shutdown(Shutdown::Write).unwrap();
    });
    let mut rs = s;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pos = 0u64;
        let mut next_pause = 1u64 << 20;
        loop {
            let n = rs.read(&mut buf).unwrap();
            if n == 0 {
                return pos;
            }
            for (k, &b) in buf[..n].iter().enumerate() {
                assert_eq!(
                    b,
                    byte_at(G2H, pos + k as u64),
                    "guest->host byte {}",
                    pos + k as u64
                );
            }
            pos += n as u64;
            if pos >= next_pause {
                // A slow reader now and then: the device must hold back.
                std::thread::sleep(Duration::from_millis(20));
                next_pause += 4 << 20;
            }
        }
    });

    // Guest state, Linux-like: every packet carries our credit; an explicit
    // update once half the buffer was consumed unannounced, or when asked.
    let mut rx_pos = 0u64;
    let mut last_fwd_sent = 0u64;
    let mut tx_pos = 0u64;
    let (mut peer_buf_alloc, mut peer_fwd) = (req.buf_alloc, req.fwd_cnt);
    let mut got_shutdown = false;
    let mut sent_shutdown = false;
    let mut got_rst = false;
    let mut payload = vec![0u8; 64 * 1024];
    let mut chunk = 4096usize;
    let start = Instant::now();
    // Generous: 100 MiB each way takes ~7 s in a debug build.
    let deadline = start + Duration::from_secs(30 + (h2g + g2h) / (1 << 20));
    while !got_rst {
        h.turn(5);
        let pkts = h.guest.recv(true);
        if !pkts.is_empty() {
            h.notify_rx();
        }
        let mut credit_asked = false;
        for (hdr, data) in pkts {
            assert_eq!((hdr.src_port, hdr.dst_port), (host_port, gport));
            peer_buf_alloc = hdr.buf_alloc;
            peer_fwd = hdr.fwd_cnt;
            match hdr.op {
                OP_RW => {
                    assert!(!got_shutdown, "data after SHUTDOWN");
                    let unacked = rx_pos - last_fwd_sent + data.len() as u64;
                    assert!(
                        unacked <= u64::from(guest_buf_alloc),
                        "device overran guest credit"
                    );
                    for (k, &b) in data.iter().enumerate() {
                        assert_eq!(
                            b,
                            byte_at(H2G, rx_pos + k as u64),
                            "host->guest byte {}",
                            rx_pos + k as u64
                        );
                    }
                    rx_pos += data.len() as u64;
                }
                OP_CREDIT_UPDATE => {}
                OP_CREDIT_REQUEST => credit_asked = true,
                OP_SHUTDOWN => {
                    assert_eq!(hdr.flags, SHUTDOWN_SEND);
                    assert_eq!(rx_pos, h2g, "SHUTDOWN before all data");
                    got_shutdown = true;
                }
                OP_RST => {
                    assert!(sent_shutdown, "unexpected RST");
                    got_rst = true;
                }
                op => panic!("unexpected op {op}"),
            }
        }
        let mut sent = false;
        if credit_asked || rx_pos - last_fwd_sent > u64::from(guest_buf_alloc / 2) {
            h.guest.send(
                &ghdr(
                    OP_CREDIT_UPDATE,
                    gport,
                    host_port,
                    guest_buf_alloc,
                    rx_pos as u32,
                ),
                &[],
            );
            last_fwd_sent = rx_pos;
            sent = true;
        }
        loop {
            let in_flight = (tx_pos as u32).wrapping_sub(peer_fwd);
            let credit = peer_buf_alloc.saturating_sub(in_flight) as u64;
            let n = credit.min(g2h - tx_pos).min(chunk as u64) as usize;
            if n == 0 || !h.guest.tx_room(2) {
                break;
            }
            fill(G2H, tx_pos, &mut payload[..n]);
            let mut rw = ghdr(OP_RW, gport, host_port, guest_buf_alloc, rx_pos as u32);
            rw.len = n as u32;
            h.guest.send(&rw, &payload[..n]);
            last_fwd_sent = rx_pos;
            tx_pos += n as u64;
            // Vary packet sizes up to the 64 KiB maximum.
            chunk = chunk * 2 % (64 * 1024) + 1000;
            sent = true;
        }
        if got_shutdown && tx_pos == g2h && !sent_shutdown {
            let mut sd = ghdr(
                OP_SHUTDOWN,
                gport,
                host_port,
                guest_buf_alloc,
                rx_pos as u32,
            );
            sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            h.guest.send(&sd, &[]);
            sent_shutdown = true;
            sent = true;
        }
        if sent {
            h.notify_tx();
        }
        assert!(
            Instant::now() < deadline,
            "stalled: rx {rx_pos}/{h2g} tx {tx_pos}/{g2h}, peer credit {peer_buf_alloc}/{peer_fwd}, \
             shutdown got {got_shutdown} sent {sent_shutdown}"
        );
    }
    writer.join().unwrap();
    assert_eq!(reader.join().unwrap(), g2h);
    assert_eq!(rx_pos, h2g);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
    eprintln!(
        "vsock transfer: {} KiB host->guest, {} KiB guest->host in {:?}",
        h2g >> 10,
        g2h >> 10,
        start.elapsed()
    );
}
