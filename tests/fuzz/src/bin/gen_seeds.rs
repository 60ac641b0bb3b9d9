//! Writes the hand-made seeds into `corpus/<target>/seed-*` (run from tests/fuzz:
//! `cargo run --bin gen_seeds [CORPUS_DIR]`). Seeds are regenerated identically; files the fuzzer added to
//! the corpus are left alone.

use std::path::Path;

use vmm_fuzz::seeds::{data, seal_state, DeviceSeed, F_INDIRECT, F_NEXT};

/// Named seeds of one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn put(corpus: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = corpus.join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("seed-{name}")), bytes)
}

/// virtio-blk request header: type, reserved, sector.
fn blk_hdr(rtype: u32, sector: u64) -> Vec<u8> {
    let mut h = rtype.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn block_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let (hdr, buf, status) = (data(0), data(0x100), data(0x1000));
    let request = |rtype: u32, sector: u64, len: u32, write: bool| {
        let mut s = DeviceSeed::new(1);
        s.put(hdr, &blk_hdr(rtype, sector));
        s.put(buf, &vec![0x5a; len as usize]);
        s.put(status, &[0xff]);
        s.queues[0].chain(&[(hdr, 16, false), (buf, len, write), (status, 1, true)]);
        s
    };
    let mut out = vec![
        ("read", request(0, 1, 1024, true).encode()),
        ("write", request(1, 2, 512, false).encode()),
        ("get-id", request(8, 0, 20, true).encode()),
        ("bad-type", request(77, 0, 512, true).encode()),
        ("beyond-end", request(0, 15, 1024, true).encode()),
    ];
    let mut flush = DeviceSeed::new(1);
    flush.put(hdr, &blk_hdr(4, 0));
    flush.queues[0].chain(&[(hdr, 16, false), (status, 1, true)]);
    out.push(("flush", flush.encode()));
    // Several requests in one queue, plus a read-only disk (last data byte odd).
    let mut many = request(0, 0, 512, true);
    many.put(data(0x2000), &blk_hdr(1, 3));
    many.queues[0].chain(&[
        (data(0x2000), 16, false),
        (buf, 512, false),
        (status, 1, true),
    ]);
    many.put(data(0x3000), &[1]);
    out.push(("two-requests-read-only", many.encode()));
    // A chain whose last descriptor points back at its head.
    let mut looped = request(0, 1, 512, true);
    looped.queues[0].descs[2].flags |= F_NEXT;
    looped.queues[0].descs[2].next = 0;
    out.push(("loop", looped.encode()));
    // An indirect table in the buffer area.
    let mut ind = DeviceSeed::new(1);
    ind.put(hdr, &blk_hdr(0, 1));
    ind.put(status, &[0xff]);
    let table = data(0x4000);
    let mut t = Vec::new();
    for (i, (addr, len, flags)) in [(hdr, 16u32, F_NEXT), (buf, 512, F_NEXT | 2), (status, 1, 2)]
        .into_iter()
        .enumerate()
    {
        t.extend_from_slice(&addr.to_le_bytes());
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
        t.extend_from_slice(&(i as u16 + 1).to_le_bytes());
    }
    ind.put(table, &t);
    ind.queues[0].chain(&[(table, t.len() as u32, false)]);
    ind.queues[0].descs[0].flags = F_INDIRECT;
    out.push(("indirect", ind.encode()));
    out
}

fn net_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frame: Vec<u8> = (0..12).map(|_| 0).chain((0..98).map(|i| i as u8)).collect();
    let mut tx = DeviceSeed::new(2);
    tx.put(data(0), &frame);
    tx.queues[1].chain(&[(data(0), 12, false), (data(12), 98, false)]);
    let mut rx = DeviceSeed::new(2);
    rx.queues[0].chain(&[(data(0x1000), 12, true), (data(0x100c), 1526, true)]);
    rx.host = frame.clone();
    let mut both = DeviceSeed::new(2);
    both.put(data(0), &frame);
    both.queues[1].chain(&[(data(0), 110, false)]);
    both.queues[0].chain(&[(data(0x1000), 4096, true)]);
    both.host = frame;
    vec![
        ("tx", tx.encode()),
        ("rx", rx.encode()),
        ("rx-and-tx", both.encode()),
    ]
}

/// A vsock packet header from the guest (CID 3) to the host.
fn vsock_hdr(src_port: u32, dst_port: u32, len: u32, op: u16, flags: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(44);
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&src_port.to_le_bytes());
    b.extend_from_slice(&dst_port.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&op.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(256u32 * 1024).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

fn vsock_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let rx_bufs = |s: &mut DeviceSeed| {
        for i in 0..4 {
            s.queues[0].chain(&[(data(0x8000 + i * 0x1100), 0x1000 + 44, true)]);
        }
        for i in 0..2 {
            s.queues[2].chain(&[(data(0x10000 + i * 0x10), 8, true)]);
        }
    };
    let mut connect = DeviceSeed::new(3);
    connect.put(data(0), &vsock_hdr(5000, 1024, 0, 1, 0));
    connect.queues[1].chain(&[(data(0), 44, false)]);
    rx_bufs(&mut connect);
    // Connect, then send data and a credit request, then shut down.
    let mut session = DeviceSeed::new(3);
    session.put(data(0), &vsock_hdr(5000, 1024, 0, 1, 0));
    session.put(data(0x100), &vsock_hdr(5000, 1024, 5, 5, 0));
    session.put(data(0x200), b"hello");
    session.put(data(0x300), &vsock_hdr(5000, 1024, 0, 7, 0));
    session.put(data(0x400), &vsock_hdr(5000, 1024, 0, 4, 3));
    session.queues[1]
        .chain(&[(data(0), 44, false)])
        .chain(&[(data(0x100), 44, false), (data(0x200), 5, false)])
        .chain(&[(data(0x300), 44, false)])
        .chain(&[(data(0x400), 44, false)]);
    rx_bufs(&mut session);
    // No listener on this port: RST.
    let mut refused = DeviceSeed::new(3);
    refused.put(data(0), &vsock_hdr(5001, 99, 0, 1, 0));
    refused.queues[1].chain(&[(data(0), 44, false)]);
    rx_bufs(&mut refused);
    // A host program connects to the guest's port 52 and sends bytes.
    let mut host = DeviceSeed::new(3);
    rx_bufs(&mut host);
    host.host = b"CONNECT 52\nping".to_vec();
    vec![
        ("guest-connect", connect.encode()),
        ("guest-session", session.encode()),
        ("guest-refused", refused.encode()),
        ("host-connect", host.encode()),
    ]
}

fn http(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    match body {
        Some(b) => r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => r.push_str("\r\n"),
    }
    r.into_bytes()
}

const LOAD: &str = r#"{"snapshot_path":"/s/vmstate","mem_backend":{"backend_type":"Uffd","backend_path":"/s/memory"},"resume_vm":true,"track_dirty_pages":false,"network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],"vsock_override":{"uds_path":"/s/v.sock"},"drive_overrides":[{"drive_id":"rootfs","path_on_host":"/s/disk"}],"working_set":{"prefetch":true,"record_ms":100,"background_fill":true}}"#;
const CREATE: &str =
    r#"{"snapshot_type":"Diff","snapshot_path":"/s/vmstate","mem_file_path":"/s/memory"}"#;
const MERGE: &str = r#"{"base_mem_file_path":"/s/base","diff_mem_file_path":"/s/diff","snapshot_path":"/s/vmstate"}"#;

fn api_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut pipelined = http("GET", "/vm", None);
    pipelined.extend(http("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)));
    pipelined.extend(http("GET", "/version", None));
    let mut expect =
        b"PUT /snapshot/create HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n".to_vec();
    expect.extend(format!("Content-Length: {}\r\n\r\n{CREATE}", CREATE.len()).bytes());
    let chunked = format!(
        "PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        25, r#"{"action_type":"Stop"}   "#
    );
    vec![
        ("get-vm", http("GET", "/vm", None)),
        ("version", http("GET", "/version", None)),
        ("pause", http("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))),
        ("create", http("PUT", "/snapshot/create", Some(CREATE))),
        ("load", http("PUT", "/snapshot/load", Some(LOAD))),
        ("merge", http("PUT", "/snapshot/merge", Some(MERGE))),
        (
            "save-working-set",
            http(
                "PUT",
                "/actions",
                Some(r#"{"action_type":"SaveWorkingSet"}"#),
            ),
        ),
        ("memory-stats", http("GET", "/snapshot/memory-stats", None)),
        (
            "bad-json",
            http("PUT", "/snapshot/load", Some("{\"snapshot_path\":")),
        ),
        ("pipelined", pipelined),
        ("expect-continue", expect),
        ("chunked", chunked.into_bytes()),
        ("http10", b"GET /vm HTTP/1.0\r\n\r\n".to_vec()),
    ]
}

fn body_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |sel: u8, body: &str| {
        let mut v = vec![sel];
        v.extend_from_slice(body.as_bytes());
        v
    };
    vec![
        ("load", with(0, LOAD)),
        (
            "load-minimal",
            with(
                0,
                r#"{"snapshot_path":"a","mem_backend":{"backend_type":"File","backend_path":"b"}}"#,
            ),
        ),
        ("create", with(1, CREATE)),
        ("merge", with(2, MERGE)),
        ("patch-vm", with(3, r#"{"state":"Resumed"}"#)),
        ("action", with(4, r#"{"action_type":"Stop"}"#)),
    ]
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn agent_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let requests: &[&str] = &[
        r#"{"id":1,"op":"ping","protocol_version":1}"#,
        r#"{"id":2,"op":"exec","argv":["sh","-c","echo hi"],"env":["A=b"],"cwd":"/","stdin":"aGk=","timeout_ms":1000,"max_output_bytes":100,"stream":true}"#,
        r#"{"id":3,"op":"freeze","mountpoints":["/"],"timeout_ms":3000}"#,
        r#"{"id":4,"op":"write_file","path":"/tmp/x","data":"AAEC","mode":420}"#,
        r#"{"id":5,"op":"read_file","path":"/etc/hostname","max_bytes":10}"#,
    ];
    let responses: &[&str] = &[
        r#"{"id":1,"type":"pong","protocol_version":1,"agent_version":"0.1.0","agent_uptime_ms":5,"boot_uptime_ms":9}"#,
        r#"{"id":1,"type":"exec_result","exit_code":0,"signal":null,"timed_out":false,"duration_ms":3,"stdout":"aGkK","stderr":"","stdout_truncated":false,"stderr_truncated":false}"#,
        r#"{"id":1,"type":"output","stream":"stdout","data":"aGkK"}"#,
        r#"{"id":1,"type":"exit","exit_code":0,"signal":null,"timed_out":false,"duration_ms":3}"#,
        r#"{"id":1,"type":"frozen","mountpoints":["/"]}"#,
        r#"{"id":1,"type":"file_data","data":"aGk="}"#,
        r#"{"id":1,"type":"file_written","bytes":4}"#,
        r#"{"id":null,"type":"error","message":"bad request"}"#,
    ];
    let mut all = vec![0u8];
    for r in requests.iter().chain(responses) {
        all.extend(frame(r.as_bytes()));
    }
    let mut out = vec![("frames", all)];
    // Host client modes: mode byte 1 | (which << 1), which = ping, exec, exec_streaming,
    // freeze, read_file, write_file.
    let answers: [(&str, u8, Vec<&str>); 6] = [
        ("client-ping", 0, vec![responses[0]]),
        ("client-exec", 1, vec![responses[1]]),
        ("client-stream", 2, vec![responses[2], responses[3]]),
        ("client-freeze", 3, vec![responses[4]]),
        ("client-read", 4, vec![responses[5]]),
        ("client-write", 5, vec![responses[6], responses[7]]),
    ];
    for (name, which, bodies) in answers {
        let mut v = vec![1 | (which << 1)];
        for b in bodies {
            v.extend(frame(b.as_bytes()));
        }
        out.push((name, v));
    }
    out
}

fn snapshot_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let payload = br#"{"a":[1,2.5,"x",null,true,{"b":{}}]}"#;
    let mut raw = vec![0u8];
    raw.extend(seal_state(payload));
    let mut sealed = vec![1u8];
    sealed.extend_from_slice(payload);
    let mut ws = vec![2u8];
    ws.extend_from_slice(b"VMMWSET1");
    ws.extend_from_slice(&3u64.to_le_bytes());
    for o in [0u64, 0x1000, 0x3ff_f000] {
        ws.extend_from_slice(&o.to_le_bytes());
    }
    vec![("raw", raw), ("sealed", sealed), ("working-set", ws)]
}

fn main() -> std::io::Result<()> {
    // The corpus beside this crate, or the directory given as the only argument.
    let corpus = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let sets: [(&str, Seeds); 7] = [
        ("virtio_block", block_seeds()),
        ("virtio_net", net_seeds()),
        ("virtio_vsock", vsock_seeds()),
        ("api_http", api_seeds()),
        ("api_bodies", body_seeds()),
        ("agent_proto", agent_seeds()),
        ("snapshot_state", snapshot_seeds()),
    ];
    for (target, seeds) in sets {
        for (name, bytes) in seeds {
            put(&corpus, target, name, &bytes)?;
        }
    }
    println!("seeds written under {}", corpus.display());
    Ok(())
}
