//! A minimal HTTP/1.1 client for the VMM's control API on its Unix socket, and the few requests
//! every test makes (VM state, pause/resume, snapshot create/load bodies).
//!
//! Written by hand instead of with an HTTP crate on purpose: tests also send malformed framing
//! (absurd lengths, huge headers) that a real client would refuse to produce, and they need to
//! tell "the VMM answered" from "the VMM closed the connection" (it was killed).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::paths::utf8;

/// How long a request may take: a snapshot of a large guest in the nested host is slow.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

/// Why a request got no complete answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be connected (no VMM listening).
    #[error("connect {}: {source}", sock.display())]
    Connect {
        /// The API socket.
        sock: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the answer failed (including the read timeout).
    #[error("read from {}: {source}", sock.display())]
    Read {
        /// The API socket.
        sock: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the connection before a complete answer (e.g. it was killed).
    #[error("{}: connection closed after {received} bytes of the answer", sock.display())]
    Closed {
        /// The API socket.
        sock: PathBuf,
        /// Bytes received before the end.
        received: usize,
    },
    /// The answer is not HTTP.
    #[error("{}: no HTTP status line in {head:?}", sock.display())]
    NotHttp {
        /// The API socket.
        sock: PathBuf,
        /// The head that was received.
        head: String,
    },
}

/// `Content-Length` of an HTTP head, 0 when absent.
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// Sends `request` as is and returns (status, body) of the first complete answer. A failed write
/// is not an error by itself: the server may answer (413, 431) and close before taking a whole
/// oversized request; the answer decides.
pub fn try_raw_api(sock: &Path, request: &[u8]) -> Result<(u16, String), ApiError> {
    let mut stream = UnixStream::connect(sock).map_err(|source| ApiError::Connect {
        sock: sock.to_path_buf(),
        source,
    })?;
    let read_err = |source| ApiError::Read {
        sock: sock.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(read_err)?;
    let _ = stream.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The peer reset the connection after we stopped writing: like an end of stream.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(read_err(e)),
        };
        if n == 0 {
            return Err(ApiError::Closed {
                sock: sock.to_path_buf(),
                received: buf.len(),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let body_start = head_end + 4;
        let len = content_length(&head);
        if buf.len() < body_start + len {
            continue;
        }
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ApiError::NotHttp {
                sock: sock.to_path_buf(),
                head: head.clone(),
            })?;
        let body = String::from_utf8_lossy(&buf[body_start..body_start + len]).into_owned();
        return Ok((status, body));
    }
}

/// One request with an optional JSON body: (status, body).
pub fn try_api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ApiError> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    match body {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    try_raw_api(sock, req.as_bytes())
}

/// [`try_api`] that panics (a failed test) when there is no answer.
pub fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_api(sock, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`try_raw_api`] that panics when there is no answer.
pub fn raw_api(sock: &Path, request: &[u8]) -> (u16, String) {
    try_raw_api(sock, request).unwrap_or_else(|e| panic!("raw request: {e}"))
}

/// A request that must succeed (2xx); returns the body.
pub fn api_ok(sock: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    let (code, resp) = api(sock, method, path, body);
    assert!(
        (200..300).contains(&code),
        "{method} {path} {} on {}: {code} {resp}",
        body.unwrap_or(""),
        sock.display()
    );
    resp
}

/// The `fault_message` of an error answer (panics when the body is not JSON).
pub fn fault_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["fault_message"].as_str().unwrap_or_default().to_string()
}

/// `GET /vm`'s state: NotLoaded, Running, Paused.
pub fn vm_state(sock: &Path) -> String {
    let (code, body) = api(sock, "GET", "/vm", None);
    assert_eq!(code, 200, "GET /vm: {body}");
    let v: Value = serde_json::from_str(&body).expect("GET /vm JSON");
    v["state"].as_str().unwrap_or("").to_string()
}

/// `PATCH /vm` to `Paused`; the VM must then report Paused. The answer is 200 with
/// `{"pause_us": N}` (the OpenAPI file says 204): both are accepted.
pub fn pause(sock: &Path) {
    let (code, body) = api(sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert!(code == 200 || code == 204, "pause: {code} {body}");
    assert_eq!(vm_state(sock), "Paused");
}

/// `PATCH /vm` to `Resumed`; the VM must then report Running.
pub fn resume(sock: &Path) {
    let (code, body) = api(sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert!(code == 200 || code == 204, "resume: {code} {body}");
    assert_eq!(vm_state(sock), "Running");
}

/// The body of `PUT /snapshot/create` into `dir/vmstate` and `dir/memory` (creates `dir`).
pub fn create_body(kind: &str, dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("create snapshot dir");
    format!(
        r#"{{"snapshot_type":"{kind}","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        utf8(&dir.join("vmstate")),
        utf8(&dir.join("memory"))
    )
}

/// `PUT /snapshot/create` of `kind` into `dir`; must answer 200; returns the stats JSON.
pub fn create_snapshot(sock: &Path, kind: &str, dir: &Path) -> Value {
    let (code, resp) = api(
        sock,
        "PUT",
        "/snapshot/create",
        Some(&create_body(kind, dir)),
    );
    assert_eq!(
        code,
        200,
        "snapshot create {kind} into {}: {resp}",
        dir.display()
    );
    serde_json::from_str(&resp).expect("snapshot stats JSON")
}

/// The body of `PUT /snapshot/load` from a state file and a memory file (File backend).
pub fn file_load_body(state: &Path, mem: &Path, resume: bool) -> String {
    format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":{resume}}}"#,
        utf8(state),
        utf8(mem)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(answer: &'static [u8]) -> (PathBuf, std::thread::JoinHandle<()>) {
        // One directory per call: tests run in parallel threads of one process.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-tests-api-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            c.write_all(answer).unwrap();
        });
        (sock, t)
    }

    #[test]
    fn reads_status_and_body_by_content_length() {
        let (sock, t) = serve_once(b"HTTP/1.1 400 Bad\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(
            try_api(&sock, "GET", "/", None).unwrap(),
            (400, "hi".into())
        );
        t.join().unwrap();
    }

    #[test]
    fn a_truncated_answer_is_an_error() {
        let (sock, t) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhi");
        let err = try_api(&sock, "GET", "/", None).unwrap_err();
        assert!(matches!(err, ApiError::Closed { .. }), "{err}");
        t.join().unwrap();
    }
}
