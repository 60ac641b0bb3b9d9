//! The guest-agent protocol decoder: frames (`read_frame`) and the JSON messages both sides
//! parse (`proto::Request` in the agent, `proto::Response` in the host), plus the host-side
//! client reading what a hostile guest answers (the bytes come from the guest through vsock).
//!
//! The first byte picks the mode:
//! - 0: the rest is a byte stream of frames; every frame body is decoded as both message types;
//! - 1: the rest is the agent's side of a connection; the host client sends a request (the
//!   mode byte's upper bits pick which) and reads the answer from it.
#![no_main]

use std::io::{Cursor, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use guest_agent::client::AgentClient;
use guest_agent::frame::read_frame;
use guest_agent::proto::{ExecRequest, Request, Response};
use libfuzzer_sys::fuzz_target;

/// Frames decoded per input at most (each is at least 4 bytes, so inputs end sooner).
const MAX_FRAMES: usize = 64;

fn frames(stream: &[u8]) {
    let mut cur = Cursor::new(stream);
    for _ in 0..MAX_FRAMES {
        match read_frame(&mut cur) {
            Ok(Some(body)) => {
                assert!(body.len() <= guest_agent::frame::MAX_FRAME_SIZE);
                if let Ok(req) = serde_json::from_slice::<Request>(&body) {
                    let again = serde_json::to_vec(&req).expect("serialize request");
                    let back: Request = serde_json::from_slice(&again).expect("reparse request");
                    assert_eq!(back, req, "request round trip");
                }
                if let Ok(resp) = serde_json::from_slice::<Response>(&body) {
                    let again = serde_json::to_vec(&resp).expect("serialize response");
                    let back: Response = serde_json::from_slice(&again).expect("reparse response");
                    assert_eq!(back, resp, "response round trip");
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fn client(which: u8, agent_bytes: &[u8]) {
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects (the agent side
    // closes early; libFuzzer's main does not ignore SIGPIPE as a Rust main does).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let (host, mut agent) = UnixStream::pair().expect("socketpair");
    // The answer fits the socket buffer for small inputs; larger ones are cut by the writer
    // thread closing at the end, which the client must report, not hang on.
    let bytes = agent_bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = agent.write_all(&bytes);
        let _ = agent.shutdown(std::net::Shutdown::Write);
        // Keep reading what the client sends so its request write never blocks.
        let mut sink = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut agent, &mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    let mut c = AgentClient::from_stream(host);
    c.set_timeout(Duration::from_secs(2));
    match which % 6 {
        0 => drop(c.ping()),
        1 => drop(c.exec(&ExecRequest::new(["true"]))),
        2 => drop(c.exec_streaming(&ExecRequest::new(["true"]), |_, _| {})),
        3 => drop(c.freeze(None, Duration::from_secs(1))),
        4 => drop(c.read_file("/etc/hostname", None)),
        _ => drop(c.write_file("/tmp/x", b"data", 0o644)),
    }
    drop(c);
    let _ = writer.join();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        frames(rest);
    } else {
        client(mode >> 1, rest);
    }
});
