//! A small client for a sandbox VMM's control API: HTTP/1.1 with JSON
//! bodies on a Unix socket, one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use vmm::api::{ActionBody, ActionType, PatchVm, SnapshotType, VmStateChange};

use super::error::{Error, Result};
use super::net;

/// Longest response head we accept.
const MAX_HEAD: usize = 64 * 1024;

/// Longer than the server's own 120 s limit, so its 504 reaches us.
const TIMEOUT: Duration = Duration::from_secs(130);

/// One sandbox's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    sock: PathBuf,
    sandbox: String,
}

impl ApiClient {
    pub fn new(sock: &Path, sandbox: &str) -> Self {
        ApiClient {
            sock: sock.to_path_buf(),
            sandbox: sandbox.to_string(),
        }
    }

    /// Sends a request; a 2xx answer's JSON body (Null when empty) or an
    /// error carrying the server's `fault_message`.
    pub fn call<B: Serialize>(&self, method: &str, path: &str, body: Option<&B>) -> Result<Value> {
        let request = format!("{method} {path}");
        let err = |message: String| Error::Api {
            sandbox: self.sandbox.clone(),
            request: request.clone(),
            message,
        };
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| err(e.to_string()))?),
            None => None,
        };
        let (status, bytes) = http(&self.sock, method, path, body.as_deref(), TIMEOUT)
            .map_err(|e| err(format!("{}: {e}", self.sock.display())))?;
        let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| err(format!("status {status}, unreadable body: {e}")))?
        };
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let msg = value
                .get("fault_message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            Err(err(format!("{status}: {msg}")))
        }
    }

    /// The VM's state as the VMM reports it (`Running`, `Paused`, ...).
    pub fn vm_state(&self) -> Result<String> {
        let v = self.call::<()>("GET", "/vm", None)?;
        Ok(v.get("state")
            .and_then(Value::as_str)
            .unwrap_or("Unknown")
            .to_string())
    }

    pub fn pause(&self) -> Result<()> {
        self.patch_state(VmStateChange::Paused)
    }

    pub fn resume(&self) -> Result<()> {
        self.patch_state(VmStateChange::Resumed)
    }

    fn patch_state(&self, state: VmStateChange) -> Result<()> {
        self.call("PATCH", "/vm", Some(&PatchVm { state }))
            .map(|_| ())
    }

    /// Writes the paused VM's state and memory files.
    pub fn create_snapshot(&self, kind: SnapshotType, state: &Path, memory: &Path) -> Result<()> {
        // The wire shape (vmm/api/openapi.yaml), which is stabler than the
        // server's Rust types.
        let body = serde_json::json!({
            "snapshot_type": kind,
            "snapshot_path": state,
            "mem_file_path": memory,
        });
        self.call("PUT", "/snapshot/create", Some(&body))
            .map(|_| ())
    }

    /// Loads a snapshot into this (empty) VMM and resumes it, with the disk,
    /// vsock socket and TAP (the VM's network interface, if it has one)
    /// replaced by the sandbox's own and dirty-page tracking on (for later
    /// diff snapshots).
    pub fn load_snapshot(
        &self,
        state: &Path,
        memory: &Path,
        disk: &Path,
        vsock: &Path,
        tap: Option<&str>,
    ) -> Result<()> {
        let taps: Vec<Value> = tap
            .map(|t| serde_json::json!({ "iface_id": net::IFACE_ID, "host_dev_name": t }))
            .into_iter()
            .collect();
        let body = serde_json::json!({
            "snapshot_path": state,
            "mem_backend": { "backend_type": "File", "backend_path": memory },
            "resume_vm": true,
            "track_dirty_pages": true,
            "drive_overrides": [{ "drive_id": "rootfs", "path_on_host": disk }],
            "vsock_override": { "uds_path": vsock },
            "network_overrides": taps,
        });
        self.call("PUT", "/snapshot/load", Some(&body)).map(|_| ())
    }

    /// Asks the VMM to end.
    pub fn stop(&self) -> Result<()> {
        let body = ActionBody {
            action_type: ActionType::Stop,
        };
        self.call("PUT", "/actions", Some(&body)).map(|_| ())
    }
}

/// One HTTP/1.1 exchange; returns the status and the body.
fn http(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(b) = body {
        stream.write_all(b)?;
    }
    read_response(&mut stream)
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads a response framed by Content-Length (or by the end of the stream).
fn read_response(r: &mut impl Read) -> std::io::Result<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("response head too large"));
        }
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Err(bad("connection closed before a complete response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut length = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = Some(
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("bad Content-Length {v:?}")))?,
                );
            }
        }
    }
    let mut body = buf[head_end + 4..].to_vec();
    match length {
        Some(len) => {
            while body.len() < len {
                let n = r.read(&mut chunk)?;
                if n == 0 {
                    return Err(bad("connection closed inside the body"));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None if status == 204 || status == 304 => body.clear(),
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::TempDir;
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves one connection: records the request, sends `reply`.
    fn serve_once(sock: &Path, reply: String) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 1024];
            // Head, then the body by Content-Length.
            loop {
                let n = s.read(&mut chunk).unwrap();
                req.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map(|v| v.trim().parse::<usize>().unwrap())
                        .unwrap_or(0);
                    if req.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            s.write_all(reply.as_bytes()).unwrap();
            String::from_utf8(req).unwrap()
        })
    }

    #[test]
    fn requests_and_answers() {
        let t = TempDir::new("api");
        let sock = t.0.join("a.sock");
        let server = serve_once(
            &sock,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"state\":\"Paused\"}\n".into(),
        );
        let c = ApiClient::new(&sock, "dev");
        assert_eq!(c.vm_state().unwrap(), "Paused");
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /vm HTTP/1.1\r\n"), "{req}");

        std::fs::remove_file(&sock).unwrap();
        let server = serve_once(&sock, "HTTP/1.1 204 No Content\r\n\r\n".into());
        c.pause().unwrap();
        let req = server.join().unwrap();
        assert!(req.starts_with("PATCH /vm HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n{\"state\":\"Paused\"}"), "{req}");

        std::fs::remove_file(&sock).unwrap();
        let body = r#"{"fault_message":"the VM is not paused"}"#;
        let server = serve_once(
            &sock,
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        let e = c
            .create_snapshot(SnapshotType::Full, Path::new("/s"), Path::new("/m"))
            .unwrap_err()
            .to_string();
        server.join().unwrap();
        assert!(
            e.contains("sandbox dev: PUT /snapshot/create: 400: the VM is not paused"),
            "{e}"
        );
    }

    #[test]
    fn restores_get_the_sandbox_s_own_tap() {
        let t = TempDir::new("api-load");
        let sock = t.0.join("a.sock");
        let c = ApiClient::new(&sock, "dev");
        for tap in [Some("tap7"), None] {
            let _ = std::fs::remove_file(&sock);
            let server = serve_once(&sock, "HTTP/1.1 204 No Content\r\n\r\n".into());
            let p = Path::new;
            c.load_snapshot(p("/s"), p("/m"), p("/d"), p("/v"), tap)
                .unwrap();
            let req = server.join().unwrap();
            let body: Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            let want = match tap {
                Some(t) => serde_json::json!([{ "iface_id": "eth0", "host_dev_name": t }]),
                None => serde_json::json!([]),
            };
            assert_eq!(body["network_overrides"], want, "{body}");
            assert_eq!(body["drive_overrides"][0]["path_on_host"], "/d");
            // The shape the VMM accepts.
            serde_json::from_value::<vmm::api::LoadSnapshotParams>(body).unwrap();
        }
    }

    #[test]
    fn framing_errors() {
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}";
        assert!(read_response(&mut r).is_err());
        let mut r: &[u8] = b"garbage\r\n\r\n";
        assert!(read_response(&mut r).is_err());
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n{\"a\":1}";
        assert_eq!(read_response(&mut r).unwrap(), (200, b"{\"a\":1}".to_vec()));
        let c = ApiClient::new(Path::new("/nonexistent/x.sock"), "dev");
        let e = c.stop().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.sock"), "{e}");
    }
}
