//! The real API server (`vmm::api::ApiServer`), spawned once per fuzzing process on a temporary
//! socket, with a stand-in for the VMM's event loop that answers every request without doing
//! anything. Each input is sent on a fresh connection, followed by end of stream.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::api::{ApiAction, ApiRequest, ApiServer, ApiServerHandle};
use vmm_sys_util::eventfd::EventFd;

use crate::ScratchDir;

/// How long the server may take to answer and close after the client's end of stream. The
/// server's own request timeout is 5 s; an input that makes it wait longer than this after
/// EOF is reported as a hang.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(3);

struct Server {
    _dir: ScratchDir,
    sock: PathBuf,
    _handle: ApiServerHandle,
}

/// Answers like an idle, running VMM would.
fn fake_vmm(rx: mpsc::Receiver<ApiRequest>, wake: EventFd) {
    std::thread::spawn(move || loop {
        if wake.read().is_err() {
            return;
        }
        while let Ok(req) = rx.try_recv() {
            let reply = match req.action {
                ApiAction::GetVm => Ok(json!({"state": "Running"})),
                ApiAction::MemoryStats => Ok(json!({"faults": 0})),
                _ => Ok(Value::Null),
            };
            let _ = req.reply.send(reply);
        }
    });
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // A peer that closes early must not kill the fuzzer: libFuzzer's main does not ignore
        // SIGPIPE the way a Rust main does.
        // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // The API thread's seccomp filter allows what the VMM needs, not what the sanitizer
        // and libFuzzer runtimes call from that thread; the filter has its own tests.
        vmm::seccomp::set_enabled(false);
        let dir = ScratchDir::new("api").expect("scratch dir");
        let sock = dir.0.join("api.sock");
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(0).expect("eventfd");
        let handle = ApiServer::spawn(&sock, tx, wake.try_clone().expect("dup eventfd"))
            .expect("spawn API server");
        fake_vmm(rx, wake);
        Server {
            _dir: dir,
            sock,
            _handle: handle,
        }
    })
}

/// Sends `input` on a new connection, half-closes it and returns everything the server wrote
/// before closing. Panics (a finding) when the server is gone or does not close in
/// [`CLOSE_DEADLINE`].
pub fn exchange(input: &[u8]) -> Vec<u8> {
    let s = server();
    let mut stream = UnixStream::connect(&s.sock)
        .unwrap_or_else(|e| panic!("API server no longer accepts connections: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set timeout");
    stream
        .set_write_timeout(Some(CLOSE_DEADLINE))
        .expect("set timeout");
    // The server may answer and close before reading everything (e.g. 413): not an error.
    let _ = stream.write_all(input);
    let _ = stream.shutdown(Shutdown::Write);
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            // libFuzzer's timers interrupt blocking reads.
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the API response: {e}"),
        }
        assert!(
            start.elapsed() < CLOSE_DEADLINE,
            "API server kept the connection open {CLOSE_DEADLINE:?} after the client's EOF \
             ({} bytes answered)",
            out.len()
        );
    }
    out
}

/// Checks that every response in `out` is a well-formed HTTP/1.1 response whose error bodies
/// are the documented `{"fault_message": ...}` JSON.
pub fn check_responses(out: &[u8]) {
    let mut rest = out;
    while !rest.is_empty() {
        let head_end = find(rest, b"\r\n\r\n")
            .unwrap_or_else(|| panic!("response without a complete head: {:?}", lossy(rest)));
        let head = std::str::from_utf8(&rest[..head_end])
            .unwrap_or_else(|_| panic!("response head is not UTF-8: {:?}", lossy(rest)));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let len: usize = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim().parse().expect("numeric Content-Length"))
            .unwrap_or(0);
        let body_start = head_end + 4;
        assert!(
            rest.len() >= body_start + len,
            "truncated response body: {:?}",
            lossy(rest)
        );
        let body = &rest[body_start..body_start + len];
        if status >= 400 {
            let v: Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {:?}", lossy(body)));
            assert!(
                v["fault_message"].is_string(),
                "error body without fault_message: {v}"
            );
        }
        assert!(
            status != 100 || len == 0,
            "100 Continue with a body: {head}"
        );
        rest = &rest[body_start + len..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}
